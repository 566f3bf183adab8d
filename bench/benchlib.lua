--- Helpers shared by the benchmark scripts of bench/: a monotonic clock and
-- a thread's CPU clock, order statistics, /proc readers (memory; CPU time
-- and context switches per thread and per process), key=value output and
-- a pool wrapper that always stops the pool.
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
-- glibc's struct dirent on 64-bit Linux (the same as struct dirent64).
pcall(ffi.cdef, [[
typedef struct pz_bench_dirent {
  uint64_t d_ino; int64_t d_off; unsigned short d_reclen; unsigned char d_type; char d_name[256];
} pz_bench_dirent;
void *opendir(const char *name);
pz_bench_dirent *readdir(void *dir);
int closedir(void *dir);
int getpid(void);
]])

local B = {}

local CLOCK_MONOTONIC, CLOCK_THREAD_CPUTIME_ID = 1, 3
local ts = ffi.new("pz_bench_timespec")

--- Monotonic seconds (arbitrary origin).
function B.now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

--- CPU seconds the calling thread has used.
function B.thread_cpu()
  ffi.C.clock_gettime(CLOCK_THREAD_CPUTIME_ID, ts)
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

--- The whole text of a file, or nil when it cannot be read.
local function slurp(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local text = f:read("*a")
  f:close()
  return text
end
B.slurp = slurp

--- The fields of /proc/<pid>/smaps_rollup ("self" by default), in bytes,
-- or nil when the file cannot be read.
function B.smaps(pid)
  local text = slurp("/proc/" .. tostring(pid or "self") .. "/smaps_rollup")
  if not text then return nil end
  local t = {}
  for k, v in text:gmatch("\n?([%w_]+):%s+(%d+) kB") do t[k] = tonumber(v) * 1024 end
  return t
end

--- The names in a directory (without "." and ".."), or {} when it cannot
-- be read.
function B.listdir(path)
  local names = {}
  local dir = ffi.C.opendir(path)
  if dir == nil then return names end
  while true do
    local e = ffi.C.readdir(dir)
    if e == nil then break end
    local name = ffi.string(e.d_name)
    if name ~= "." and name ~= ".." then names[#names + 1] = name end
  end
  ffi.C.closedir(dir)
  return names
end

--- This process's pid.
function B.getpid()
  return ffi.C.getpid()
end

--- What the scheduler counted for one thread (pid/task/tid; tid defaults
-- to pid): cpu_s (seconds on a CPU, from schedstat), vol and invol
-- (voluntary and involuntary context switches). nil when it is gone.
function B.thread_stats(pid, tid)
  local dir = "/proc/" .. pid .. "/task/" .. (tid or pid)
  local status = slurp(dir .. "/status")
  if not status then return nil end
  local sched = slurp(dir .. "/schedstat") or ""
  return {
    cpu_s = (tonumber(sched:match("^(%d+)")) or 0) * 1e-9,
    vol = tonumber(status:match("\nvoluntary_ctxt_switches:%s*(%d+)")) or 0,
    invol = tonumber(status:match("\nnonvoluntary_ctxt_switches:%s*(%d+)")) or 0,
  }
end

--- The sums of thread_stats over every thread of process pid, or nil.
function B.process_stats(pid)
  local sum, any = { cpu_s = 0, vol = 0, invol = 0 }, false
  for _, tid in ipairs(B.listdir("/proc/" .. pid .. "/task")) do
    local t = B.thread_stats(pid, tid)
    if t then
      any = true
      for k, v in pairs(t) do sum[k] = sum[k] + v end
    end
  end
  return any and sum or nil
end

--- The pids of the direct children of process pid (every thread's).
function B.children(pid)
  local kids = {}
  for _, tid in ipairs(B.listdir("/proc/" .. pid .. "/task")) do
    local text = slurp("/proc/" .. pid .. "/task/" .. tid .. "/children") or ""
    for k in text:gmatch("%d+") do kids[#kids + 1] = tonumber(k) end
  end
  return kids
end

--- A snapshot of the scheduler's counts for this process and a pool's
-- other processes (`pids`, an array): main (this thread), io (every other
-- thread of this process: a pool's I/O thread), workers (the pids given,
-- summed; each[i] for pids[i] alone) and others (the rest of this
-- process's children: a pool's spawner, summed). Each is {cpu_s =, vol =,
-- invol =}.
function B.tree_stats(pids)
  local self = B.getpid()
  local snap = {}
  snap.main = B.thread_stats(self) or { cpu_s = 0, vol = 0, invol = 0 }
  snap.io = { cpu_s = 0, vol = 0, invol = 0 }
  for _, tid in ipairs(B.listdir("/proc/" .. self .. "/task")) do
    if tonumber(tid) ~= self then
      local t = B.thread_stats(self, tid)
      if t then for k, v in pairs(t) do snap.io[k] = snap.io[k] + v end end
    end
  end
  local is_worker = {}
  snap.workers = { cpu_s = 0, vol = 0, invol = 0 }
  snap.each = {}
  for i, pid in ipairs(pids) do
    is_worker[pid] = true
    local t = B.process_stats(pid)
    if t then for k, v in pairs(t) do snap.workers[k] = snap.workers[k] + v end end
    snap.each[i] = t or { cpu_s = 0, vol = 0, invol = 0 }
  end
  snap.others = { cpu_s = 0, vol = 0, invol = 0 }
  for _, pid in ipairs(B.children(self)) do
    if not is_worker[pid] then
      local t = B.process_stats(pid)
      if t then for k, v in pairs(t) do snap.others[k] = snap.others[k] + v end end
    end
  end
  return snap
end

--- after - before, part by part, for two tree_stats snapshots.
function B.tree_delta(before, after)
  local function minus(a, b)
    return { cpu_s = a.cpu_s - b.cpu_s, vol = a.vol - b.vol, invol = a.invol - b.invol }
  end
  local d = { each = {} }
  for part, a in pairs(after) do
    if part ~= "each" then d[part] = minus(a, before[part]) end
  end
  for i, a in ipairs(after.each) do d.each[i] = minus(a, before.each[i]) end
  return d
end

--- A field of /proc/self/status in bytes (VmHWM, VmRSS, ...), or nil.
function B.status_bytes(field)
  local kb = (slurp("/proc/self/status") or ""):match("\n" .. field .. ":%s*(%d+) kB")
  return kb and tonumber(kb) * 1024
end

--- Resets this process's peak RSS (VmHWM) to its current RSS. False when
-- the kernel does not allow it.
function B.reset_peak_rss()
  local f = io.open("/proc/self/clear_refs", "w")
  if not f then return false end
  local ok = f:write("5")
  return (f:close() and ok) and true or false
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
