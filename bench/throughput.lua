--- Throughput of tiny calls (issue 5): n calls of x * 2 over 2 workers,
-- `p(i)` in a loop, then `p:wait()`, then the results read (and summed).
-- The pool is created and p.executors read before the clock starts. Each
-- run uses a fresh pool; the median run is reported.
--
--   build/pzlua bench/throughput.lua     (PZ_BENCH_N, PZ_BENCH_RUNS)
--
-- Output: key=value lines, all rates in calls per second.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local B = require "benchlib"
local parallelize = require "parallelize"

local N = math.floor(B.env_number("PZ_BENCH_N", 200000))
local WORKERS = 2
local RUNS = B.runs(5)

local function double(x) return x * 2 end

local function one_run()
  return B.with_pool(parallelize.rep(double, WORKERS), nil, nil, function(p)
    local ready = #p.executors
    if ready ~= WORKERS then error("only " .. ready .. " executors initialized", 0) end
    local t0 = B.now()
    for i = 1, N do p(i) end
    local t1 = B.now()
    B.wait(p, 120, "throughput")
    local t2 = B.now()
    local results = p.results
    local sum = 0
    for i = 1, #results do sum = sum + results[i] end
    local t3 = B.now()
    local errors = #p.errors
    if #results ~= N or sum ~= N * (N + 1) or errors ~= 0 then
      error(string.format("wrong results: %d results (want %d), sum %.17g (want %.17g), %d errors",
        #results, N, sum, N * (N + 1), errors), 0)
    end
    return { total = t3 - t0, queue = t1 - t0, wait = t2 - t1, read = t3 - t2, rate = N / (t3 - t0) }
  end)
end

local runs = {}
local rates = {}
for r = 1, RUNS do
  runs[r] = one_run()
  rates[r] = string.format("%.0f", runs[r].rate)
end
local m = runs[B.median_index(runs, "rate")]

B.emit("n", N)
B.emit("workers", WORKERS)
B.emit("runs", RUNS)
B.emit("calls_per_s", m.rate)
B.emit("calls_per_s_all", table.concat(rates, ","))
B.emit("seconds", m.total)
B.emit("queue_seconds", m.queue)
B.emit("wait_seconds", m.wait)
B.emit("read_seconds", m.read)
