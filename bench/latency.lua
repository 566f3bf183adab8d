--- Latency of one call on an idle pool (issue 5): the round trip
-- `p(x); p:wait()`, timed one by one over a few thousand calls, after a
-- warm-up. Each run uses a fresh 2-worker pool; the run with the median
-- p50 is reported, with its p10 and p90.
--
--   build/pzlua bench/latency.lua
--
-- Environment: PZ_BENCH_TRIPS, PZ_BENCH_RUNS; PZ_BENCH_PAUSE (seconds,
-- default 0) sleeps before each trip, so that each starts from sleeping
-- processes; PZ_BENCH_SPIN sets the pool's `spin` option (default: the
-- library's default).
--
-- Output: key=value lines, times in microseconds.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local B = require "benchlib"
local parallelize = require "parallelize"

local TRIPS = math.floor(B.env_number("PZ_BENCH_TRIPS", 3000))
local WARMUP = 200
local WORKERS = 2
local RUNS = B.runs(3)
local PAUSE = B.env_number("PZ_BENCH_PAUSE", 0)
local SPIN = os.getenv("PZ_BENCH_SPIN") and B.env_number("PZ_BENCH_SPIN", 0)

local function double(x) return x * 2 end

local function one_run()
  return B.with_pool(parallelize.rep(double, WORKERS), { spin = SPIN }, nil, function(p)
    local ready = #p.executors
    if ready ~= WORKERS then error("only " .. ready .. " executors initialized", 0) end
    local now = B.now
    for i = 1, WARMUP do
      p(i)
      B.wait(p, 10, "latency warm-up")
    end
    local times = {}
    for i = 1, TRIPS do
      if PAUSE > 0 then parallelize.sleep(PAUSE) end
      local t0 = now()
      p(i)
      local done = p:wait(10)
      times[i] = now() - t0
      if not done then error("latency: one call did not finish within 10 s", 0) end
    end
    local results = p.results
    if #results ~= WARMUP + TRIPS or results[#results] ~= 2 * TRIPS then
      error(string.format("wrong results: %d results (want %d), last %s (want %d)",
        #results, WARMUP + TRIPS, tostring(results[#results]), 2 * TRIPS), 0)
    end
    table.sort(times)
    local us = 1e6
    return {
      p10 = B.quantile(times, 0.1) * us,
      p50 = B.quantile(times, 0.5) * us,
      p90 = B.quantile(times, 0.9) * us,
      p99 = B.quantile(times, 0.99) * us,
      min = times[1] * us,
    }
  end)
end

local runs, p50s = {}, {}
for r = 1, RUNS do
  runs[r] = one_run()
  p50s[r] = string.format("%.1f", runs[r].p50)
end
local m = runs[B.median_index(runs, "p50")]

B.emit("trips", TRIPS)
B.emit("workers", WORKERS)
B.emit("runs", RUNS)
B.emit("pause_us", PAUSE * 1e6)
B.emit("spin_us", (SPIN or parallelize.defaults.spin) * 1e6)
B.emit("p10_us", m.p10)
B.emit("p50_us", m.p50)
B.emit("p90_us", m.p90)
B.emit("p99_us", m.p99)
B.emit("min_us", m.min)
B.emit("p50_us_all", table.concat(p50s, ","))
