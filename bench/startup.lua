--- Start-up (issue 5): `Parallelize(rep(f, 250))` until every executor is
-- initialized (#p.executors == 250), then the private memory of each idle
-- worker (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup, PIDs
-- from p.pids). The median run's time is reported; memory figures are over
-- every worker of every run.
--
--   build/pzlua bench/startup.lua     (PZ_BENCH_WORKERS, PZ_BENCH_RUNS)
--
-- Output: key=value lines, times in seconds, memory in KiB.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local B = require "benchlib"
local parallelize = require "parallelize"

local WORKERS = math.floor(B.env_number("PZ_BENCH_WORKERS", 250))
local RUNS = B.runs(3)

local function identity(x) return x end

local mem_sum, mem_count, mem_max, mem_min = 0, 0, 0, math.huge
local unreadable = 0

local function one_run()
  B.full_gc()
  local t0 = B.now()
  local p = parallelize.Parallelize(parallelize.rep(identity, WORKERS))
  local t1 = B.now()
  local ok, res = pcall(function()
    local ready = #p.executors
    local t2 = B.now()
    if ready ~= WORKERS then error("only " .. ready .. " of " .. WORKERS .. " executors initialized", 0) end
    local pids = p.pids
    for slot = 1, WORKERS do
      local s = pids[slot] and B.smaps(pids[slot])
      if s and s.Private_Clean and s.Private_Dirty then
        local priv = s.Private_Clean + s.Private_Dirty
        mem_sum, mem_count = mem_sum + priv, mem_count + 1
        if priv > mem_max then mem_max = priv end
        if priv < mem_min then mem_min = priv end
      else
        unreadable = unreadable + 1
      end
    end
    -- One call per worker would show that they work; 2 * WORKERS calls
    -- cover every worker with round-robin dispatch or not.
    for i = 1, 2 * WORKERS do p(i) end
    B.wait(p, 30, "startup")
    if #p.results ~= 2 * WORKERS then error("wrong results: " .. #p.results, 0) end
    return { new = t1 - t0, ready = t2 - t0 }
  end)
  local t3 = B.now()
  p:stop(ok and nil or 0)
  if not ok then error(res, 0) end
  res.stop = B.now() - t3
  return res
end

local runs, readys = {}, {}
for r = 1, RUNS do
  runs[r] = one_run()
  readys[r] = string.format("%.4f", runs[r].ready)
end
local m = runs[B.median_index(runs, "ready")]

B.emit("workers", WORKERS)
B.emit("runs", RUNS)
B.emit("ready_s", m.ready)
B.emit("new_s", m.new)
B.emit("stop_s", m.stop)
B.emit("ready_s_all", table.concat(readys, ","))
B.emit("worker_private_kib_mean", mem_count > 0 and mem_sum / mem_count / 1024 or 0 / 0)
B.emit("worker_private_kib_max", mem_count > 0 and mem_max / 1024 or 0 / 0)
B.emit("worker_private_kib_min", mem_count > 0 and mem_min / 1024 or 0 / 0)
B.emit("workers_measured", mem_count)
B.emit("workers_unreadable", unreadable)
