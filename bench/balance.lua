--- Load balance (issue 5): 200 calls that sleep 1 ms .. 50 ms (durations
-- from a fixed seed) over 8 workers. Ideal = total work / 8; the ratio
-- elapsed / ideal is reported for the median run (a fresh pool each run).
--
--   build/pzlua bench/balance.lua     (PZ_BENCH_RUNS)
--
-- Output: key=value lines, times in seconds.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local B = require "benchlib"
local parallelize = require "parallelize"

local CALLS = 200
local WORKERS = 8
local MIN_S, MAX_S = 0.001, 0.050
local RUNS = B.runs(3)

-- Durations from a fixed seed, with a generator of our own (a 31-bit LCG)
-- so that they do not depend on the interpreter's math.random.
local durations, total, longest = {}, 0, 0
do
  local state = 20240605
  for i = 1, CALLS do
    state = (state * 1103515245 + 12345) % 2147483648
    local d = MIN_S + (MAX_S - MIN_S) * (state / 2147483648)
    durations[i] = d
    total = total + d
    if d > longest then longest = d end
  end
end
local ideal = total / WORKERS

local function sleeper(seconds)
  parallelize.sleep(seconds)
  return seconds
end

local function one_run()
  return B.with_pool(parallelize.rep(sleeper, WORKERS), nil, nil, function(p)
    local ready = #p.executors
    if ready ~= WORKERS then error("only " .. ready .. " executors initialized", 0) end
    local t0 = B.now()
    for i = 1, CALLS do p(durations[i]) end
    B.wait(p, 60, "balance")
    local elapsed = B.now() - t0
    local results = p.results
    if #results ~= CALLS or #p.errors ~= 0 then
      error(string.format("wrong results: %d results (want %d), %d errors", #results, CALLS, #p.errors), 0)
    end
    return { elapsed = elapsed, ratio = elapsed / ideal }
  end)
end

local runs, ratios = {}, {}
for r = 1, RUNS do
  runs[r] = one_run()
  ratios[r] = string.format("%.4f", runs[r].ratio)
end
local m = runs[B.median_index(runs, "ratio")]

B.emit("calls", CALLS)
B.emit("workers", WORKERS)
B.emit("runs", RUNS)
B.emit("total_work_s", total)
B.emit("longest_call_s", longest)
B.emit("ideal_s", ideal)
B.emit("elapsed_s", m.elapsed)
B.emit("ratio", m.ratio)
B.emit("ratio_all", table.concat(ratios, ","))
