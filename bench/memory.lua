--- Memory of pending calls (issue 5): the parent's growth in RSS and in
-- Private_Dirty (/proc/self/smaps_rollup) across queueing 1,000,000 calls
-- of one small number each, while both workers are blocked in their first
-- call (a 60 s sleep) so that every call stays pending. The pool is then
-- stopped with finish_timeout 0, which also checks that every call comes
-- back as aborted.
--
-- Each measurement runs in a process of its own (the allocator keeps what
-- an earlier pool freed, which would hide the growth of a later one): run
-- without arguments, the script starts itself PZ_BENCH_RUNS times with
-- `--one` and reports the median run.
--
--   build/pzlua bench/memory.lua          (PZ_BENCH_CALLS, PZ_BENCH_RUNS)
--   build/pzlua bench/memory.lua --one    one measurement
--
-- Output: key=value lines, bytes per call.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local B = require "benchlib"

local CALLS = math.floor(B.env_number("PZ_BENCH_CALLS", 1000000))
local WORKERS = 2
local BLOCK_S = 60

local function measure_once()
  local parallelize = require "parallelize"
  local blocked = false
  -- Every worker's copy has its own `blocked`: its first call blocks it.
  local function executor(x)
    if not blocked then
      blocked = true
      parallelize.sleep(BLOCK_S)
    end
    return x
  end
  local p = parallelize.Parallelize(parallelize.rep(executor, WORKERS))
  local ok, r = pcall(function()
    local ready = #p.executors
    if ready ~= WORKERS then error("only " .. ready .. " executors initialized", 0) end
    for i = 1, WORKERS do p(i) end
    parallelize.sleep(0.2)
    B.full_gc()
    local m0 = B.smaps()
    local t0 = B.now()
    for i = 1, CALLS do p(i % 100) end
    local t1 = B.now()
    B.full_gc()
    local m1 = B.smaps()
    parallelize.sleep(0.3) -- let the I/O thread move what it takes
    B.full_gc()
    local m2 = B.smaps()
    local pending = p.pending
    return {
      queue_s = t1 - t0,
      pending = pending,
      rss_now = (m1.Rss - m0.Rss) / CALLS,
      rss = (m2.Rss - m0.Rss) / CALLS,
      dirty = (m2.Private_Dirty - m0.Private_Dirty) / CALLS,
      rss_per_pending = (m2.Rss - m0.Rss) / pending,
    }
  end)
  local t2 = B.now()
  local aborted = p:stop(0)
  if not ok then error(r, 0) end
  r.stop_s = B.now() - t2
  -- Every call is accounted for: finished (result or error) or aborted.
  local total = WORKERS + CALLS
  local finished = #p.results + #p.errors
  if #aborted + finished ~= total then
    error(string.format("memory: %d aborted + %d finished ~= %d calls queued", #aborted, finished, total), 0)
  end
  r.aborted = #aborted
  return r
end

local function emit_run(r)
  B.emit("calls", CALLS)
  B.emit("workers", WORKERS)
  B.emit("pending", r.pending)
  B.emit("rss_bytes_per_call", r.rss)
  B.emit("rss_bytes_per_call_at_once", r.rss_now)
  B.emit("private_dirty_bytes_per_call", r.dirty)
  B.emit("rss_bytes_per_pending_call", r.rss_per_pending)
  B.emit("queue_s", r.queue_s)
  B.emit("aborted", r.aborted)
  B.emit("stop_s", r.stop_s)
end

if arg[1] == "--one" then
  emit_run(measure_once())
  return
end

-- The parent: start RUNS children, collect their key=value lines.
local RUNS = B.runs(3)
local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
-- The interpreter and its options, as this script was started: arg[-k]
-- .. arg[-1] (pzlua's convention, as luajit's).
local lowest = 0
while arg[lowest - 1] ~= nil do lowest = lowest - 1 end
local prefix = {}
for i = lowest, -1 do prefix[#prefix + 1] = quote(arg[i]) end
if #prefix == 0 then prefix[1] = "pzlua" end
local runs, values = {}, {}
for i = 1, RUNS do
  local cmd = table.concat(prefix, " ") .. " " .. quote(arg[0]) .. " --one"
  local h = io.popen(cmd, "r")
  local out = h:read("*a")
  h:close()
  local r = {}
  for k, v in out:gmatch("([%w_]+)=([^\n]*)") do r[k] = tonumber(v) or v end
  if type(r.rss_bytes_per_call) ~= "number" then
    io.stderr:write(out)
    error("memory: run " .. i .. " printed no rss_bytes_per_call", 0)
  end
  runs[i] = r
  values[i] = string.format("%.2f", r.rss_bytes_per_call)
end
local m = runs[B.median_index(runs, "rss_bytes_per_call")]
B.emit("runs", RUNS)
emit_run({
  pending = m.pending, rss = m.rss_bytes_per_call, rss_now = m.rss_bytes_per_call_at_once,
  dirty = m.private_dirty_bytes_per_call, rss_per_pending = m.rss_bytes_per_pending_call,
  queue_s = m.queue_s, aborted = m.aborted, stop_s = m.stop_s,
})
B.emit("rss_bytes_per_call_all", table.concat(values, ","))
