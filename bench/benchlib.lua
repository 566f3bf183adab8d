--- Helpers shared by the benchmark scripts of bench/: a monotonic clock,
-- order statistics, /proc readers, key=value output and a pool wrapper
-- that always stops the pool.
--
-- A script finds this file beside itself:
--
--     local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
--     package.path = dir .. "/?.lua;" .. package.path
--     local B = require "benchlib"
local ffi = require "ffi"

pcall(ffi.cdef, [[
typedef struct pz_bench_timespec { long tv_sec; long tv_nsec; } pz_bench_timespec;
int clock_gettime(int clk, pz_bench_timespec *ts);
]])

local B = {}

local CLOCK_MONOTONIC = 1
local ts = ffi.new("pz_bench_timespec")

--- Monotonic seconds (arbitrary origin).
function B.now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

--- A number from the environment variable `name`, or `default`.
function B.env_number(name, default)
  local v = tonumber(os.getenv(name) or "")
  if v == nil then return default end
  return v
end

--- How many times a noisy measurement is repeated: PZ_BENCH_RUNS, or
-- `default`. Always odd so that the median is one of the runs.
function B.runs(default)
  local n = math.floor(B.env_number("PZ_BENCH_RUNS", default))
  if n < 1 then n = 1 end
  if n % 2 == 0 then n = n + 1 end
  return n
end

--- The q-quantile (0..1) of an ascending array, nearest rank.
function B.quantile(sorted, q)
  local n = #sorted
  if n == 0 then return 0 / 0 end
  local k = math.floor(q * (n - 1) + 0.5) + 1
  if k < 1 then k = 1 elseif k > n then k = n end
  return sorted[k]
end

--- The median of an array of numbers (the array is not changed).
function B.median(list)
  local c = {}
  for i = 1, #list do c[i] = list[i] end
  table.sort(c)
  return B.quantile(c, 0.5)
end

--- The index in `list` of the run whose `key` is the median of all runs.
function B.median_index(list, key)
  local idx = {}
  for i = 1, #list do idx[i] = i end
  table.sort(idx, function(a, b) return list[a][key] < list[b][key] end)
  return idx[math.floor((#idx + 1) / 2)]
end

--- Prints one `key=value` line; numbers get 6 significant digits.
function B.emit(key, value)
  if type(value) == "number" then
    if value == math.floor(value) and math.abs(value) < 1e15 then
      value = string.format("%d", value)
    else
      value = string.format("%.6g", value)
    end
  end
  io.write(key, "=", tostring(value), "\n")
  io.flush()
end

--- Prints a comment line (ignored by run.sh).
function B.note(fmt, ...)
  io.write("# ", string.format(fmt, ...), "\n")
  io.flush()
end

--- The fields of /proc/<pid>/smaps_rollup ("self" by default), in bytes,
-- or nil when the file cannot be read.
function B.smaps(pid)
  local f = io.open("/proc/" .. tostring(pid or "self") .. "/smaps_rollup", "r")
  if not f then return nil end
  local text = f:read("*a")
  f:close()
  local t = {}
  for k, v in text:gmatch("\n?([%w_]+):%s+(%d+) kB") do t[k] = tonumber(v) * 1024 end
  return t
end

--- Collects garbage until the heap stops shrinking.
function B.full_gc()
  local before
  repeat
    before = collectgarbage("count")
    collectgarbage("collect")
  until collectgarbage("count") >= before
end

--- Runs fn(p) on a new pool and stops the pool in any case, with
-- stop_timeout as stop()'s finish_timeout (nil: let calls finish). After
-- an error the pool is stopped with a finish_timeout of 0, so that a hung
-- call cannot keep the benchmark from ending. Returns what fn returned;
-- re-raises fn's error after stopping.
function B.with_pool(executors, options, stop_timeout, fn)
  local parallelize = require "parallelize"
  local p = parallelize.Parallelize(executors, options)
  local res = { pcall(fn, p) }
  p:stop(res[1] and stop_timeout or 0)
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2)
end

--- Raises unless p:wait(timeout) reports every call finished: a benchmark
-- must end by itself even when the library hangs.
function B.wait(p, timeout, what)
  if not p:wait(timeout) then
    error(string.format("%s: p:wait(%g) timed out with %s calls pending", what or "wait",
      timeout, tostring(p.pending)), 0)
  end
end

return B
