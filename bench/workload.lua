--- The workloads of issue 14, one measurement per run, on a fresh pool:
-- bench/run.sh runs them in rounds, interleaved with their anchors
-- (bench/py_anchor.py, bench/socketpair.c), and compares them round by
-- round.
--
--   build/pzlua bench/workload.lua tiny N WORKERS
--       `p(i)` for i = 1..N, `p:wait()`, the results read and summed;
--       the executor is x * 2. Prints calls_per_s.
--   build/pzlua bench/workload.lua map N WORKERS
--       the same through `p:map(list)` (the list built before the clock
--       starts). Checks that every result is at its input's position.
--   build/pzlua bench/workload.lua stream N WORKERS [MAX_PENDING]
--       the same through `for i, ok, v in p:stream(list)` (the list built
--       before the clock starts), each v checked against its i as it
--       comes and summed; with MAX_PENDING, the stream's window is that
--       instead of its default.
--   build/pzlua bench/workload.lua stream_fn N WORKERS [MAX_PENDING]
--       the same with an iterator function as the source, returning
--       1, 2, ... N and then nil: inputs made as the stream pulls them.
--   build/pzlua bench/workload.lua pzmap N WORKERS
--       `parallelize.map(f, list, {workers = WORKERS})`, one shot: the
--       clock runs from before the pool starts to after it has stopped,
--       as Python's `with Pool(n) as pool: pool.map(...)` does in
--       bench/py_anchor.py's oneshot_map. Prints seconds and calls_per_s
--       only (the processes are gone before anything could read /proc).
--   build/pzlua bench/workload.lua busy N WORKERS US
--       N calls of a busy loop calibrated, in this run and before the pool
--       starts, to take US microseconds of CPU. Each call measures the CPU
--       it took in its worker (the thread's CPU clock around the loop) and
--       returns it: ideal_s = the sum / WORKERS. Prints seconds, ideal_s
--       and vs_ideal = seconds / ideal_s.
--   build/pzlua bench/workload.lua busy_map N WORKERS US
--       the same through `p:map(list)`: chunks of items (src/chunk.h), as
--       Python's Pool.map sends them.
--   build/pzlua bench/workload.lua bytes N WORKERS SIZE
--       N calls `p(s)` with one string of SIZE bytes, the executor
--       returning it, so SIZE bytes go each way. Prints gb_per_s, bytes in
--       plus bytes out per second (1 GB = 1e9 bytes), and the parent's
--       peak resident memory (VmHWM, reset just before the first call)
--       above its resident memory at that moment, which already holds the
--       string. The results are equal to s, and LuaJIT interns strings, so
--       they add no memory of their own: what the peak shows is the pool's.
--   build/pzlua bench/workload.lua bytes_map N WORKERS SIZE
--       the same through `p:map(list)`.
--
-- Every workload also prints, from /proc (schedstat and status, read just
-- before the first call and just after the results are read): CPU seconds
-- and voluntary and involuntary context switches of the main thread
-- (main_*), of the I/O thread (io_*: every other thread of this process),
-- of the workers (workers_*, summed; worker_cpu_s_each lists each one's
-- CPU seconds) and of the spawner (others_*), and
-- per call: switches_per_call (all of them) and io_wakeups_per_call (the
-- I/O thread's voluntary switches: each is one sleep, ended by a wake-up);
-- and the ids of each: tid_main, tids_io, pids_workers, pids_others.
--
-- Output: key=value lines. An error (wrong results, a timeout) exits
-- with status 1.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local B = require "benchlib"
local parallelize = require "parallelize"

local WAIT_S = 600 -- no run comes near it; a hang ends as an error

local function usage()
  io.stderr:write("usage: workload.lua tiny|map|pzmap N WORKERS | stream|stream_fn N WORKERS [MAX_PENDING]"
    .. " | busy[_map] N WORKERS US | bytes[_map] N WORKERS SIZE\n")
  os.exit(2)
end

local KINDS = { tiny = true, map = true, pzmap = true, stream = true, stream_fn = true, busy = true, busy_map = true,
  bytes = true, bytes_map = true }
local kind = arg[1]
local N, WORKERS, PARAM = tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4])
if not (N and WORKERS and N >= 1 and WORKERS >= 1) then usage() end
local NEEDS_PARAM = { busy = true, busy_map = true, bytes = true, bytes_map = true }
if NEEDS_PARAM[kind] and not (PARAM and PARAM > 0) then usage() end
if (kind == "stream" or kind == "stream_fn") and arg[4] and not (PARAM and PARAM >= 1) then usage() end
if not KINDS[kind] then usage() end

local function fail(fmt, ...)
  error(string.format(fmt, ...), 0)
end

local function pid_list(p)
  local list = {}
  for _, pid in pairs(p.pids) do list[#list + 1] = pid end
  return list
end

--- Which thread or process is which, for tools that see only ids (such as
-- bench/profile.py reading perf's output): tid_main, tids_io, pids_workers
-- and pids_others, each a comma-separated list.
local function roles_of(pids)
  local self = B.getpid()
  local io, others, is_worker = {}, {}, {}
  for _, tid in ipairs(B.listdir("/proc/" .. self .. "/task")) do
    if tonumber(tid) ~= self then io[#io + 1] = tid end
  end
  for _, pid in ipairs(pids) do is_worker[pid] = true end
  for _, pid in ipairs(B.children(self)) do
    if not is_worker[pid] then others[#others + 1] = pid end
  end
  return {
    tid_main = tostring(self), tids_io = table.concat(io, ","),
    pids_workers = table.concat(pids, ","), pids_others = table.concat(others, ","),
  }
end

--- Runs body(p) between two snapshots of the scheduler's counts, on a
-- pool of WORKERS copies of executor, once they are all ready. body returns
-- a table of figures, to which the counts are added.
local function measure(executor, body)
  return B.with_pool(parallelize.rep(executor, WORKERS), nil, nil, function(p)
    local ready = #p.executors
    if ready ~= WORKERS then fail("only %d of %d executors initialized", ready, WORKERS) end
    local pids = pid_list(p)
    local roles = roles_of(pids)
    B.full_gc()
    local before = B.tree_stats(pids)
    local r = body(p)
    local d = B.tree_delta(before, B.tree_stats(pids))
    local switches = 0
    for _, part in ipairs({ "main", "io", "workers", "others" }) do
      r[part .. "_cpu_s"] = d[part].cpu_s
      r[part .. "_vol"] = d[part].vol
      r[part .. "_invol"] = d[part].invol
      switches = switches + d[part].vol + d[part].invol
    end
    r.switches_per_call = switches / N
    r.io_wakeups_per_call = d.io.vol / N
    local each = {}
    for i, e in ipairs(d.each) do each[i] = string.format("%.4f", e.cpu_s) end
    r.worker_cpu_s_each = table.concat(each, ",")
    for k, v in pairs(roles) do r[k] = v end
    return r
  end)
end

local function double(x) return x * 2 end

local function tiny(p)
  local t0 = B.now()
  for i = 1, N do p(i) end
  B.wait(p, WAIT_S, "tiny")
  local results = p.results
  local sum = 0
  for i = 1, #results do sum = sum + results[i] end
  local t = B.now() - t0
  if #results ~= N or sum ~= N * (N + 1) or #p.errors ~= 0 then
    fail("wrong results: %d results (want %d), sum %.17g (want %.17g), %d errors",
      #results, N, sum, N * (N + 1), #p.errors)
  end
  return { seconds = t, calls_per_s = N / t }
end

local function map(p)
  local list = {}
  for i = 1, N do list[i] = i end
  local t0 = B.now()
  local results = p:map(list)
  local sum = 0
  for i = 1, #results do sum = sum + results[i] end
  local t = B.now() - t0
  for i = 1, N do
    if results[i] ~= 2 * i then fail("map: result %d is %s (want %d)", i, tostring(results[i]), 2 * i) end
  end
  if #results ~= N or sum ~= N * (N + 1) then fail("map: %d results (want %d)", #results, N) end
  return { seconds = t, calls_per_s = N / t }
end

--- p:stream over 1..N, from an array (built before the clock starts) or,
-- with from_fn, from an iterator function; window: the stream's
-- max_pending, or nil for its default. Each result is checked as it comes
-- (the cost of a comparison), every input must come back exactly once.
local function stream(from_fn, window)
  return function(p)
    local list
    if not from_fn then
      list = {}
      for i = 1, N do list[i] = i end
    end
    local opts = window and { max_pending = window } or nil
    local t0 = B.now()
    local src = list
    if from_fn then
      local k = 0
      src = function()
        if k < N then
          k = k + 1
          return k
        end
      end
    end
    local sum, count = 0, 0
    for i, ok, v in p:stream(src, opts) do
      if not ok then fail("stream: input %d failed: %s", i, tostring(v)) end
      if v ~= 2 * i then fail("stream: input %d gave %s (want %d)", i, tostring(v), 2 * i) end
      sum, count = sum + v, count + 1
    end
    local t = B.now() - t0
    if count ~= N or sum ~= N * (N + 1) then
      fail("stream: %d results (want %d), sum %.17g (want %.17g)", count, N, sum, N * (N + 1))
    end
    local r = { seconds = t, calls_per_s = N / t }
    r.max_pending = window or "default"
    return r
  end
end

--- parallelize.map, one shot: the pool's start and stop are on the clock.
local function pzmap()
  local list = {}
  for i = 1, N do list[i] = i end
  B.full_gc()
  local t0 = B.now()
  local results = parallelize.map(double, list, { workers = WORKERS })
  local t = B.now() - t0
  for i = 1, N do
    if results[i] ~= 2 * i then fail("pzmap: result %d is %s (want %d)", i, tostring(results[i]), 2 * i) end
  end
  if #results ~= N then fail("pzmap: %d results (want %d)", #results, N) end
  return { seconds = t, calls_per_s = N / t }
end

-- A loop whose CPU time grows with k and that the compiler cannot drop
-- (its result is returned and checked).
local function spin(k)
  local x = 0
  for i = 1, k do x = x + i % 7 end
  return x
end

--- The k for which spin(k) takes `us` microseconds of this thread's CPU,
-- and the CPU one spin(k) then takes: the median of 101 calls.
local function calibrate(us)
  for _ = 1, 50 do spin(10000) end -- compiled before it is timed
  local k, took = 10000
  repeat
    local c0 = B.thread_cpu()
    spin(k)
    took = B.thread_cpu() - c0
    if took < 2e-3 then k = k * 2 end
  until took >= 2e-3
  k = math.max(1, math.floor(k * us * 1e-6 / took + 0.5))
  local times = {}
  for i = 1, 101 do
    local c0 = B.thread_cpu()
    spin(k)
    times[i] = B.thread_cpu() - c0
  end
  return k, B.median(times)
end

-- The busy executor, built in each worker: spin(k), checked, returning the
-- CPU seconds the call took in that worker's thread.
local function timed_spin_ctor(want)
  local bench = require "benchlib"
  local thread_cpu = bench.thread_cpu
  return function(k)
    local c0 = thread_cpu()
    local x = spin(k)
    local took = thread_cpu() - c0
    if x ~= want then error("spin(" .. k .. ") gave " .. x .. " (want " .. want .. ")") end
    return took
  end
end

--- N calls with the same argument, in a p(x) loop or through p:map: the
-- results and the errors (none for a map, which raises).
local function run_all(p, x, via_map, what)
  if via_map then
    local list = {}
    for i = 1, N do list[i] = x end
    return p:map(list), {}
  end
  for _ = 1, N do p(x) end
  B.wait(p, WAIT_S, what)
  return p.results, p.errors
end

local function busy(k, calibrated, via_map)
  return function(p)
    local t0 = B.now()
    local results, errors = run_all(p, k, via_map, "busy")
    local t = B.now() - t0
    if #results ~= N or #errors ~= 0 then
      fail("wrong results: %d (want %d), %d errors%s", #results, N, #errors,
        #errors > 0 and ": " .. errors[1].message or "")
    end
    local cpu = 0
    for i = 1, N do cpu = cpu + results[i] end
    local ideal = cpu / WORKERS
    return {
      seconds = t, ideal_s = ideal, vs_ideal = t / ideal, iterations = k,
      call_cpu_us = cpu / N * 1e6, calibrated_call_cpu_us = calibrated * 1e6,
    }
  end
end

local function bytes(size, via_map)
  local pattern = {}
  for i = 0, 255 do pattern[#pattern + 1] = string.char((i * 37 + 11) % 256) end
  pattern = table.concat(pattern)
  local s = string.rep(pattern, math.ceil(size / #pattern)):sub(1, size)
  return function(p)
    B.full_gc()
    local rss0 = B.status_bytes("VmRSS")
    local reset = B.reset_peak_rss()
    local t0 = B.now()
    local results, errors = run_all(p, s, via_map, "bytes")
    local t = B.now() - t0
    local peak = B.status_bytes("VmHWM")
    if #results ~= N or #errors ~= 0 then fail("wrong results: %d (want %d), %d errors", #results, N, #errors) end
    for i = 1, N do
      if results[i] ~= s then fail("result %d differs from the string sent", i) end
    end
    local r = { seconds = t, size = size, gb_per_s = 2 * N * size / t / 1e9 }
    if rss0 and peak and reset then
      r.peak_above_start_mib = (peak - rss0) / 1048576
    else
      r.peak_above_start_mib = "n/a"
    end
    return r
  end
end

local r
if kind == "tiny" then
  r = measure(double, tiny)
elseif kind == "map" then
  r = measure(double, map)
elseif kind == "stream" or kind == "stream_fn" then
  r = measure(double, stream(kind == "stream_fn", PARAM))
elseif kind == "pzmap" then
  r = pzmap()
elseif kind == "busy" or kind == "busy_map" then
  local k, calibrated = calibrate(PARAM)
  r = measure(parallelize.Deferred(timed_spin_ctor, spin(k)), busy(k, calibrated, kind == "busy_map"))
else
  r = measure(function(x) return x end, bytes(PARAM, kind == "bytes_map"))
end

B.emit("workload", kind)
B.emit("n", N)
B.emit("workers", WORKERS)
local keys = {}
for k in pairs(r) do keys[#keys + 1] = k end
table.sort(keys)
for _, k in ipairs(keys) do B.emit(k, r[k]) end
