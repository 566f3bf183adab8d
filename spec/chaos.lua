--- The chaos run shared by spec/chaos_spec.lua (short, in make test) and
-- spec/soak/soak.lua (long, make soak): many calls through many workers
-- while workers are SIGKILLed at random, then a check that every call has
-- exactly one result (or, for a call flagged as poison, one error) and that
-- no process is left.
local parallelize = require "parallelize"
local core = require "parallelize.core"
local support = require "spec.support"

local M = {}

local SIGKILL = 9

--- The pid of the parent of process pid, or nil.
local function ppid(pid)
  local stat = support.read("/proc/" .. pid .. "/stat")
  return stat and tonumber(stat:match("^%d+ %b() %a (%d+)"))
end

M.ppid = ppid

--- A random worker of the pool, as a local pool's workers are: a child of
-- the spawner (only ever a process that is still a worker of this pool).
local function local_victim(p, spawner, workers)
  local pid = p.pids[math.random(1, workers)]
  if pid and ppid(pid) == spawner then return pid end
end

--- Starts spec/chaos_killer.lua on the workers of `spawner`; returns a
-- function that stops it and returns how many workers it killed.
local function start_killer(spawner, opts)
  local dir = support.tmpdir()
  local root = debug.getinfo(1, "S").source:match("^@(.*)spec/[^/]*$") or "./"
  os.execute(("cd %s && LUA_PATH=%s %s spec/chaos_killer.lua %d %s %d %s </dev/null >/dev/null 2>&1 &")
    :format(support.quote(root), support.quote("./?.lua;lua/?.lua;;"), support.quote(support.pzlua()),
      spawner, tostring(opts.interval), opts.seed or 1, support.quote(dir .. "/stop")))
  return function()
    support.write(dir .. "/stop", "stop")
    local count = support.eventually(function() return tonumber(support.read(dir .. "/stop.count") or "") end, 10)
    support.rmdir(dir)
    return assert(tonumber(count), "the killer did not report")
  end
end

--- Drives the calls 1..n through one of the consuming methods while the
-- killer runs; returns id -> result and the error records.
local drive = {}

function drive.map(p, n)
  local list = {}
  for i = 1, n do list[i] = i end
  local out = p:map(list)
  local got = {}
  for i = 1, n do got[i] = out[i] end
  return got, {}
end

function drive.result(p, n)
  for i = 1, n do p(i) end
  local got, errors = {}, {}
  for id = 1, n do
    local ok, v = p:result(id)
    if ok then got[id] = v else errors[#errors + 1] = v end
  end
  return got, errors
end

local function stream(p, n, ordered)
  local got, errors, last = {}, {}, 0
  for i, ok, v in p:stream(function() if last < n then last = last + 1 return last end end,
      { ordered = ordered }) do
    assert(got[i] == nil, "input " .. i .. " yielded twice")
    if ok then got[i] = v else got[i] = false; errors[#errors + 1] = v end
  end
  return got, errors
end
function drive.stream(p, n) return stream(p, n, false) end
function drive.ordered(p, n) return stream(p, n, true) end

--- Runs the chaos. opts: calls, workers, interval (seconds between kills),
-- work (loop iterations per call), seed, timeout (seconds), hang_every (every
-- so many calls loop forever), call_timeout and max_calls (the pool's
-- timeout and max_calls), max_deaths and init_attempts (the pool's),
-- progress (a
-- function called with a status line every second, optional), mode: "loop"
-- (p(i) in a loop, killed from this process while it waits), or "map",
-- "result", "stream", "ordered" (the method drives the calls while a
-- killer process kills). In the loop mode, also: sleep (seconds each call
-- sleeps, after its work; default 0), options (more options for
-- Parallelize: a launcher...), victim (function(p, spawner, workers) -> a
-- pid to SIGKILL or nil; by default a random worker, a child of the
-- spawner).
-- Returns a table of figures; raises with a description on any breach.
function M.run(opts)
  local work = opts.work or 0
  local victim = opts.victim or local_victim
  math.randomseed(opts.seed or 1)
  local before = {}
  for _, pid in ipairs(support.children()) do before[pid] = true end
  local pause = opts.sleep or 0
  local pool_options = { max_deaths = opts.max_deaths, init_attempts = opts.init_attempts, max_calls = opts.max_calls,
    timeout = opts.call_timeout }
  for k, v in pairs(opts.options or {}) do pool_options[k] = v end
  local hang_every = opts.hang_every or 0
  local p = parallelize.Parallelize(parallelize.rep(function(x)
    -- A hanging call sleeps (a spinning one would starve the others of CPU
    -- and make them time out too, which a wall-clock timeout rightly does).
    if hang_every > 0 and x % hang_every == 0 then parallelize.sleep(3600) end
    local s = 0
    for i = 1, work do s = s + i % 7 end
    if pause > 0 then parallelize.sleep(pause) end
    return x * 2 + s * 0
  end, opts.workers), pool_options)
  local ok, err = pcall(function()
    local _ = p.executors
    local spawner
    for _, pid in ipairs(support.children()) do
      if not before[pid] then spawner = pid end
    end
    assert(spawner, "cannot find the pool's spawner process")

    if opts.mode and opts.mode ~= "loop" then
      local t0 = core.now()
      local stop_killer = start_killer(spawner, opts)
      local ok2, got, errors = pcall(drive[opts.mode], p, opts.calls)
      local kills = stop_killer()
      if not ok2 then error(got, 0) end
      local elapsed = core.now() - t0
      for i = 1, opts.calls do
        assert(got[i] ~= nil, "call " .. i .. " was lost")
        assert(got[i] == false or got[i] == i * 2, "call " .. i .. " has a wrong result: " .. tostring(got[i]))
      end
      for _, e in ipairs(errors) do
        assert(e.message:match("^call %d+ killed %d+ workers?"), "unexpected error: " .. e.message)
      end
      assert(#p:stop() == 0, "calls aborted")
      assert(support.eventually(function() return not support.alive(spawner) end, 5), "the spawner lives on")
      M.last = { calls = opts.calls, workers = opts.workers, kills = kills, poison = #errors,
        elapsed = elapsed, rate = opts.calls / elapsed }
      return
    end

    local t0 = core.now()
    for i = 1, opts.calls do p(i) end
    local seen_pids, kills, next_report = {}, 0, t0 + 1
    local deadline = t0 + (opts.timeout or 60)
    while p.pending > 0 do
      assert(core.now() < deadline, ("chaos: %d calls still pending after %d s"):format(p.pending, opts.timeout or 60))
      for _, pid in pairs(p.pids) do seen_pids[pid] = true end
      local pid = victim(p, spawner, opts.workers)
      if pid and support.kill(pid, SIGKILL) then kills = kills + 1 end
      core.sleep(opts.interval)
      if opts.progress and core.now() >= next_report then
        next_report = next_report + 1
        opts.progress(("%.0f s: %d of %d calls done, %d kills"):format(core.now() - t0,
          opts.calls - p.pending, opts.calls, kills))
      end
    end
    assert(p:wait(), "wait timed out")
    local elapsed = core.now() - t0

    -- every call exactly once
    local results, ids, errors = p.results, p.ids, p.errors
    local seen = {}
    for i = 1, #ids do
      local id = ids[i]
      assert(not seen[id], "call " .. id .. " has two results")
      assert(results[i] == id * 2, "call " .. id .. " has a wrong result: " .. tostring(results[i]))
      assert(hang_every == 0 or id % hang_every ~= 0, "call " .. id .. " should have hung")
      seen[id] = true
    end
    local timeouts = 0
    for _, e in ipairs(errors) do
      assert(not seen[e.id], "call " .. e.id .. " has a result and an error")
      if e.timeout then
        assert(hang_every > 0 and e.id % hang_every == 0, "call " .. e.id .. " timed out: " .. e.message)
        timeouts = timeouts + 1
      else
        assert(e.message:match("^call %d+ killed %d+ workers?"), "unexpected error: " .. e.message)
      end
      seen[e.id] = true
    end
    for i = 1, opts.calls do assert(seen[i], "call " .. i .. " was lost") end

    local aborted = p:stop()
    assert(#aborted == 0, #aborted .. " calls aborted")
    -- nothing left: not the spawner, not a worker
    assert(support.eventually(function() return not support.alive(spawner) end, 5), "the spawner lives on")
    for pid in pairs(seen_pids) do
      assert(support.eventually(function() return not support.alive(pid) end, 5), "worker " .. pid .. " lives on")
    end
    M.last = {
      calls = opts.calls, workers = opts.workers, kills = kills, poison = #errors - timeouts,
      timeouts = timeouts, recycles = p:stats().recycles, elapsed = elapsed, rate = opts.calls / elapsed,
      spawner = spawner,
    }
  end)
  p:stop(0)
  -- The closure above may live on in a compiled trace, and with it its
  -- upvalue p: the pool and every result it keeps (131 MB after a round
  -- of 5,000,000 calls, freed only by jit.flush). Let go of it here.
  p = nil
  if not ok then error(err, 0) end
  return M.last
end

return M
