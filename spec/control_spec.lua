-- Control over long runs: timeouts, cancel, retries, recycling (max_calls),
-- fail_fast, stats, progress, what close returns, and the warning for a
-- pool dropped with calls unfinished.
local parallelize = require "parallelize"
local core = require "parallelize.core"
local support = require "spec.support"

local Parallelize, Deferred = parallelize.Parallelize, parallelize.Deferred
local SIGKILL = 9

--- id -> result, and id -> error record, from the pool's lists (read once).
local function outcomes(p)
  local results, ids, errors = p.results, p.ids, p.errors
  local got, failed = {}, {}
  for i, id in ipairs(ids) do
    assert(got[id] == nil and failed[id] == nil, "call " .. id .. " answered twice")
    got[id] = results[i]
  end
  for _, e in ipairs(errors) do
    assert(got[e.id] == nil and failed[e.id] == nil, "call " .. e.id .. " answered twice")
    failed[e.id] = e
  end
  return got, failed
end

describe("timeout", function()
  it("ends a call that runs too long with its worker, and the pool finishes the rest", function()
    local p = Parallelize(function(x)
      if x == "loop" then while true do end end
      return x
    end, { workers = 2, timeout = 0.3, retries = 3, max_deaths = 1 })
    finally(function() p:stop() end)
    local t0 = core.now()
    local looping = p("loop")
    for i = 1, 20 do p(i) end
    local ok, err = p:result(looping)
    local took = core.now() - t0
    assert.is_false(ok)
    assert.are.equal("call 1 timed out after 0.3 s", err.message)
    assert.is_true(err.timeout)
    assert.are.equal("timeout", err.kind)
    assert.are.equal(0, #err.attempts) -- not retried
    assert.is_true(took >= 0.3 and took < 1.5, "timed out after " .. took .. " s")
    assert.is_true(p:wait(10))
    local got, failed = outcomes(p)
    for i = 1, 20 do assert.are.equal(i, got[i + 1]) end -- not charged: max_deaths = 1 harmed no one
    assert.are.same({ 1 }, (function() local t = {} for id in pairs(failed) do t[#t + 1] = id end return t end)())
    local s = p:stats()
    assert.are.equal(1, s.timeouts)
    assert.are.equal(1, s.deaths)
  end)

  it("names a map's item that timed out, with no empty traceback after the message", function()
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end, { workers = 2, timeout = 0.1 })
    finally(function() p:stop(0) end)
    local ok, err = pcall(p.map, p, { 0, 5, 0 })
    assert.is_false(ok)
    assert.are.equal("map: item 2 failed: call 2 timed out after 0.1 s", err)
  end)

  it("says so when, with respawn = false, the worker it ended was the last", function()
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end,
      { workers = 1, respawn = false, timeout = 0.1, quiet = true })
    finally(function() p:stop() end)
    p(5)
    p(0)
    local ok, err = pcall(p.wait, p, 10)
    assert.is_false(ok)
    assert.matches("no worker is left and none can be started: worker 1 %(pid %d+%) killed by signal 9 "
      .. "%(ended by the pool: call 1 timed out%); not replaced %(respawn = false%)", err)
  end)

  it("keeps the milliseconds it was given: 1.001 s is not cut to 1 s", function()
    -- (1.001 * 1000 is 1000.9999999999999 in a double)
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end, { workers = 2, timeout = 1.001 })
    finally(function() p:stop(0) end)
    local by_pool, by_call = p(10), p:submit({ timeout = 1.003 }, 10)
    assert.are.equal("call 1 timed out after 1.001 s", select(2, p:result(by_pool)).message)
    assert.are.equal("call 2 timed out after 1.003 s", select(2, p:result(by_call)).message)
  end)

  it("can be set per call with p:submit, or lifted with timeout = false", function()
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end, { workers = 2, timeout = 0.2 })
    finally(function() p:stop() end)
    local short = p:submit({ timeout = 0.05 }, 0.5)
    local lifted = p:submit({ timeout = false }, 0.4)
    local default = p(0.5)
    local ok, err = p:result(short)
    assert.is_false(ok)
    assert.are.equal("call 1 timed out after 0.05 s", err.message)
    assert.are.same({ true, 0.4 }, { p:result(lifted) })
    assert.are.equal("call 3 timed out after 0.2 s", select(2, p:result(default)).message)
    assert.has_error(function() p:submit({ timeout = -1 }, 1) end,
      "submit: option timeout must be a number from 0.001 to 4000000 (got -1)")
    assert.has_error(function() p:submit({ retries = 1 }, 1) end,
      "submit: unknown option retries (the options are timeout)")
  end)

  it("restarts a Deferred worker it ended (the constructor runs again)", function()
    local dir = support.tmpdir()
    local p = Parallelize(Deferred(function(log)
      local f = io.open(log, "a")
      f:write("built\n")
      f:close()
      require("parallelize").sleep(0.2)
      return function(x) if x == 0 then while true do end end return x * 2 end
    end, dir .. "/log"), { workers = 1, timeout = 0.5 })
    finally(function() -- (busted keeps one finally a test: the last)
      p:stop()
      support.rmdir(dir)
    end)
    p(0)
    for i = 1, 5 do p(i) end
    assert.is_true(p:wait(15))
    local got, failed = outcomes(p)
    assert.is_true(failed[1].timeout)
    for i = 1, 5 do assert.are.equal(i * 2, got[i + 1]) end
    local _, built = support.read(dir .. "/log"):gsub("built\n", "")
    assert.are.equal(2, built)
  end)
end)

describe("init_timeout", function()
  --- The pid the message of a slot given up names (its last attempt).
  local function last_pid(message)
    return tonumber(message:match("the last time, pid (%d+) "))
  end

  it("ends a worker whose constructor never returns, tries again, gives it up; the other worker runs "
      .. "every call", function()
    local p = Parallelize({ Deferred(function() while true do end end), function(x) return x + 1 end },
      { init_timeout = 1, init_attempts = 2 })
    finally(function() p:stop() end)
    for i = 1, 20 do p(i) end
    assert.is_true(p:wait(30))
    local got = outcomes(p)
    for i = 1, 20 do assert.are.equal(i + 1, got[i]) end
    local t0 = core.now()
    assert.are.equal(1, #p.executors) -- returns: the hanging slot was given up
    local waited = core.now() - t0
    local e = p.init_errors[1]
    assert.are.equal(1, e.worker)
    assert.matches("^worker 1 died during initialization 2 times; the last time, pid %d+ was ended by "
      .. "the pool: it had not initialized within init_timeout %(1 s%)$", e.message)
    -- two attempts of 1 s and a back-off: far less than a hanging start
    assert.is_true(waited < 20, "p.executors took " .. waited .. " s")
    local pid = last_pid(e.message)
    assert.is_truthy(support.eventually(function() return not support.alive(pid) end, 5),
      "the worker that did not initialize is still there: " .. pid)
  end)

  it("bounds the start of a replacement too (max_calls): the pool says no worker is left instead of "
      .. "waiting for ever", function()
    local dir = support.tmpdir()
    local defer = support.defer(finally) -- stops the pool, then removes dir
    defer(function() support.rmdir(dir) end)
    -- the constructor hangs from its second run on: the replacement's
    local marker = dir .. "/started"
    local p = Parallelize({ Deferred(function(path)
      local f = io.open(path, "r")
      if f then
        f:close()
        while true do end
      end
      f = assert(io.open(path, "w"))
      f:close()
      return function(x) return x * 2 end
    end, marker) }, { init_timeout = 1, init_attempts = 1, max_calls = 2 })
    defer(function() p:stop(0) end)
    for i = 1, 4 do p(i) end
    local ok, err = pcall(p.wait, p, 30)
    assert.is_false(ok)
    assert.matches("no worker is left and none can be started: worker 1 died during initialization 1 time; "
      .. "the last time, pid %d+ was ended by the pool: it had not initialized within init_timeout", err)
    local got = outcomes(p)
    assert.are.equal(2, got[1])
    assert.are.equal(4, got[2])
  end)

  -- It was written with 3 significant digits: 0.1234 read "0.123 s", and
  -- 1234.5 "1.23e+03 s".
  it("says the init_timeout it was given", function()
    local p = Parallelize({ Deferred(function() while true do end end) }, { init_timeout = 0.1234, init_attempts = 1 })
    finally(function() p:stop(0) end)
    assert.are.equal(0, #p.executors)
    assert.matches("^worker 1 died during initialization 1 time; the last time, pid %d+ was ended by the pool: it "
      .. "had not initialized within init_timeout %(0%.1234 s%)$", p.init_errors[1].message)
  end)

  -- The launcher gets SIGTERM at the deadline and SIGKILL kill_grace
  -- later: a worker that says it initialized in between was taken as
  -- ready, given calls whose answers were never read (its reading had
  -- stopped), killed at the end of kill_grace and started again with its
  -- init_attempts reset: the calls waited for ever.
  it("does not take as ready a worker that initializes after the deadline, while its launcher "
      .. "outlives SIGTERM", function()
    local launched = support.tmpdir()
    local defer = support.defer(finally) -- stops the pool, then removes launched
    defer(function() support.rmdir(launched) end)
    local p = Parallelize({ function(x) return x end }, {
      init_timeout = 0.3, init_attempts = 2, kill_grace = 3,
      launcher = function()
        return { "sh", "-c", "echo $$ >> " .. launched .. "/pids; trap '' TERM; sleep 0.8; exec "
          .. support.quote(support.pzlua()) .. " --worker" }
      end,
    })
    defer(function() p:stop(0) end)
    for i = 1, 3 do p(i) end
    local t0 = core.now()
    local ok, err = pcall(p.wait, p, 30)
    local took = core.now() - t0
    assert.is_false(ok, "wait returned " .. tostring(err) .. " after " .. took .. " s")
    -- each launcher ends as its worker starts (about 0.8 s), not at its
    -- SIGKILL 3 s after the deadline: its input was closed
    assert.is_true(took < 5, "wait took " .. took .. " s")
    assert.matches("no worker is left and none can be started: worker 1 died during initialization 2 times; "
      .. "the last time, pid %d+ was ended by the pool: it had not initialized within init_timeout %(0%.3 s%)$",
      err)
    assert.are.equal(0, #p.executors)
    assert.are.equal(0, #p.results + #p.errors)
    assert.are.equal(3, #p:stop(0))
    local pids = {}
    for pid in support.read(launched .. "/pids"):gmatch("%d+") do pids[#pids + 1] = tonumber(pid) end
    assert.are.equal(2, #pids)
    for _, pid in ipairs(pids) do
      assert.is_truthy(support.eventually(function() return not support.alive(pid) end, 5),
        "a launcher is still there: " .. pid)
    end
  end)

  -- Its socket stayed open after the deadline: what a launcher that
  -- outlives its SIGTERM wrote then was read and kept, all of it, until
  -- its SIGKILL (a banner, a flood).
  it("reads nothing more from a worker once its deadline has passed", function()
    local function rss_kib()
      return tonumber(support.read("/proc/self/status"):match("VmRSS:%s*(%d+)"))
    end
    local p = Parallelize({ function(x) return x end }, {
      init_timeout = 0.2, init_attempts = 1, kill_grace = 5,
      launcher = function()
        return { "sh", "-c", "trap '' TERM; sleep 0.5; head -c 100000000 /dev/zero; sleep 10" }
      end,
    })
    finally(function() p:stop(0) end)
    local before = rss_kib()
    -- the launcher writes 0.3 s after the deadline, and lives until its
    -- SIGKILL, 5 s after it: what was read would be held until then
    core.sleep(2)
    local grown = rss_kib() - before
    assert.is_true(grown < 30 * 1024, "the parent grew by " .. grown .. " KiB")
    assert.are.equal(0, #p.executors)
  end)

  -- stop() sent the launcher SIGTERM again and counted its kill_grace
  -- anew: a stop near the end of the grace waited nearly a second one.
  it("keeps the SIGKILL of a launcher it has sent SIGTERM when stop comes during the grace", function()
    local launched = support.tmpdir()
    local defer = support.defer(finally) -- stops the pool, then removes launched
    defer(function() support.rmdir(launched) end)
    local p = Parallelize({ function(x) return x end }, {
      init_timeout = 0.2, kill_grace = 4,
      launcher = function()
        return { "sh", "-c", "echo $$ > " .. launched .. "/pid; trap '' TERM; while :; do sleep 0.1; done" }
      end,
    })
    defer(function() p:stop(0) end)
    p(1)
    core.sleep(3.5) -- SIGTERM at 0.2 s, SIGKILL due at 4.2 s
    local t0 = core.now()
    assert.are.equal(1, #p:stop())
    local took = core.now() - t0
    assert.is_true(took < 3, "stop took " .. took .. " s")
    local pid = tonumber(support.read(launched .. "/pid"))
    assert.is_truthy(support.eventually(function() return not support.alive(pid) end, 5),
      "the launcher is still there: " .. pid)
  end)

  it("is checked like the other options", function()
    for _, bad in ipairs({ 0, -1, "1", 0 / 0 }) do
      local ok, err = pcall(Parallelize, function() end, { init_timeout = bad })
      assert.is_false(ok)
      assert.matches("init_timeout", err)
    end
  end)
end)

describe("cancel", function()
  --- One worker holding up to ten calls, warmed up: a call p(s, gate) waits
  -- until the file gate exists (if given), then sleeps s seconds and
  -- returns s; p("die") ends its worker. Returns the pool and a directory
  -- for gates; both go when the test ends.
  local function gated_pool(options)
    local dir = support.tmpdir()
    local opts = { workers = 1, window = 10, quiet = true }
    for k, v in pairs(options) do opts[k] = v end
    local p = Parallelize(function(s, gate)
      local P = require("parallelize")
      while gate and not io.open(gate, "r") do P.sleep(0.005) end
      if s == "die" then os.exit(7) end
      P.sleep(s)
      return s
    end, opts)
    finally(function()
      p:stop(0)
      support.rmdir(dir)
    end)
    for _ = 1, 3 do p(0.001) end
    assert.is_true(p:wait(10))
    return p, dir
  end

  it("drops a call not started at once, ends a running one, and leaves a finished one", function()
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end, { workers = 1 })
    finally(function() p:stop() end)
    local done = p(0)
    assert.are.same({ true, 0 }, { p:result(done) })
    local running = p(30)
    local queued = p(0.01)
    core.sleep(0.2)
    local t0 = core.now()
    assert.is_true(p:cancel(queued))
    local ok, err = p:result(queued)
    assert.is_false(ok)
    assert.are.equal("call 3 cancelled", err.message)
    assert.is_true(err.cancelled)
    assert.is_true(core.now() - t0 < 1, "a queued call waited to be cancelled")
    assert.is_true(p:cancel(running))
    ok, err = p:result(running)
    assert.is_false(ok)
    assert.is_true(err.cancelled)
    assert.is_true(core.now() - t0 < 5, "a running call was not ended")
    assert.is_false(p:cancel(done))
    assert.is_false(p:cancel(99))
    -- the pool goes on, and everything adds up
    local after = p(0.01)
    assert.are.same({ true, 0.01 }, { p:result(after) })
    local s = p:stats()
    assert.are.equal(2, s.cancelled)
    local aborted = p:stop()
    assert.are.equal(p.calls, #p.results + #p.errors + #aborted)
  end)

  it("cancels 100,000 queued calls and the running one asked last, which ends unfinished", function()
    -- Each cancel used to search every place a call can be, one id at a
    -- time: 80,000 took the I/O thread about 8 s, and the cancel of the
    -- running call, behind them all, came after it had finished: it kept
    -- its result. Taken together (a second here), it is ended at once.
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end, { workers = 1 })
    finally(function() if p then p:stop() end end)
    local n = 100000
    local running = p(8)
    for _ = 2, n do p(0) end
    assert.is_true(support.eventually(function() return p:stats().running == 1 end, 10))
    for id = n, 1, -1 do assert.is_true(p:cancel(id)) end
    -- a second ask of one (true if the pool had not acted on the first
    -- yet): still one record
    p:cancel(n)
    assert.is_true(p:wait(60))
    local ok, err = p:result(running)
    assert.is_false(ok, "the running call finished before its cancel came")
    assert.is_true(err.cancelled)
    assert.are.equal(0, #p.results)
    assert.are.equal(n, #p.errors)
    for _, e in ipairs(p.errors) do assert(e.cancelled, e.message) end
    assert.are.equal(n, p:stats().cancelled)
    -- Its 100,000 error records would stay alive with busted's hold on
    -- this `finally`, and slow every collection of the specs after it.
    p:stop()
    p = nil
  end)

  it("answers false for an id no call has: 0, a fraction, NaN, beyond p.calls", function()
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end, { workers = 1 })
    finally(function() p:stop() end)
    local id = p(0.3) -- unfinished while the ids below are asked about
    for _, bad in ipairs({ 0, -1, 0.5, 1.5, 0 / 0, 2, math.huge }) do
      assert.is_false(p:cancel(bad), "cancel(" .. tostring(bad) .. ")")
    end
    assert.are.same({ true, 0.3 }, { p:result(id) })
  end)

  it("ends a call cancelled in its worker's queue when it starts, once, and the calls behind it run", function()
    -- A worker of short calls holds several (window): the second of these
    -- waits in the worker behind the first when it is cancelled. The
    -- first runs until the test opens its gate, after the cancel: the
    -- second cannot have started by then, however late the cancel comes.
    local p, dir = gated_pool({ max_deaths = 1 })
    for k, doomed in ipairs({ 1000, "die" }) do
      local gate = dir .. "/gate" .. k
      local first = p(0.3, gate)
      local cancelled = p(doomed)
      local behind = p(0.01)
      core.sleep(0.1)
      assert.is_true(p:cancel(cancelled))
      support.write(gate, "")
      local t0 = core.now()
      assert.is_true(p:wait(10), "the calls behind a cancelled call never ran")
      assert.is_true(core.now() - t0 < 5)
      local got, failed = outcomes(p)
      assert.are.equal(0.3, got[first])
      assert.are.equal(0.01, got[behind])
      assert.is_true(failed[cancelled].cancelled)
    end
    local n = 0
    for _ in pairs(select(2, outcomes(p))) do n = n + 1 end
    assert.are.equal(2, n) -- outcomes raises on a call answered twice
    assert.are.same({}, p:stop())
  end)

  it("counts a call cancelled in its worker's queue as failed, not also as running", function()
    -- Its record is made at the cancel; it stays in its worker's queue
    -- until the worker starts it (and is ended): counted as running too,
    -- done + failed + pending + running came to one more than the calls.
    local p, dir = gated_pool({})
    local gate = dir .. "/gate"
    local _, cancelled = p(0.3, gate), p(1000)
    p(0.01)
    core.sleep(0.1)
    assert.is_true(p:cancel(cancelled))
    -- (the I/O thread acts on the cancel soon after it returns)
    assert.is_true(support.eventually(function() return p:stats().cancelled == 1 end, 10))
    local s = p:stats()
    assert.are.same({ 6, 3, 1, 1, 0, 2 }, { s.calls, s.done, s.failed, s.cancelled, s.pending, s.running })
    support.write(gate, "")
    assert.is_true(p:wait(10))
    s = p:stats()
    assert.are.same({ 6, 5, 1, 0, 0 }, { s.calls, s.done, s.failed, s.pending, s.running })
  end)

  it("counts calls cancelled while they waited for a worker as failed, not also as pending", function()
    -- Their records are made at the cancel; they stay in the queue, flagged,
    -- until a worker has room: 502 of them counted in both pending and
    -- failed, done + failed + pending + running came to 1,503 calls of 1,001.
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end, { workers = 1 })
    finally(function() p:stop(0) end)
    local first = p(0.5)
    for _ = 1, 1000 do p(0) end
    core.sleep(0.1)
    for id = 500, 1001 do p:cancel(id) end
    assert.is_true(support.eventually(function() return p:stats().cancelled == 502 end, 10))
    local s = p:stats()
    assert.is_true(s.pending > 0, "the worker ran its calls before the test looked")
    assert.are.same({ 1001, 502, 502 }, { s.calls, s.failed, s.cancelled })
    assert.are.equal(s.calls, s.done + s.failed + s.pending + s.running)
    assert.are.same({ true, 0.5 }, { p:result(first) })
    assert.is_true(p:wait(10))
    s = p:stats()
    assert.are.same({ 1001, 499, 502, 0, 0 }, { s.calls, s.done, s.failed, s.pending, s.running })
  end)

  it("does not run again a call that raised as it was cancelled, nor blame the next for the kill", function()
    -- The kill of a cancelled call goes through the spawner: stopped
    -- (SIGSTOP), it lets the call raise first, and the worker start the
    -- next call before the kill lands. Each call says when it runs (a
    -- call its worker holds may not have started: cancelled then, it has
    -- its record at once, and never raises).
    local dir = support.tmpdir()
    local p = Parallelize(function(x, d)
      local P = require("parallelize")
      local f = assert(io.open(d .. "/" .. x .. ".runs", "w"))
      f:close()
      local until_file = x == "next" and "/go" or "/raise"
      while not io.open(d .. until_file, "r") do P.sleep(0.005) end
      if x == "next" then return x end
      error("raised as it was cancelled", 0)
    end, { workers = 1, retries = 1, max_deaths = 1, quiet = true })
    local _ = p.executors
    local spawner = support.processes()[p.pids[1]].ppid
    finally(function()
      support.kill(spawner, 18) -- SIGCONT
      p:stop(0)
      support.rmdir(dir)
    end)
    local function runs(x)
      return support.eventually(function() return support.read(dir .. "/" .. x .. ".runs") end, 10)
    end
    local cancelled = p("wait", dir)
    local next = p("next", dir)
    assert.is_truthy(runs("wait"), "the first call never started")
    assert.is_true(support.kill(spawner, 19)) -- SIGSTOP
    assert.is_true(p:cancel(cancelled))
    support.write(dir .. "/raise", "")
    local ok, err = p:result(cancelled, 10)
    assert.is_false(ok)
    assert.are.equal("raised", err.kind)
    assert.are.equal(1, #err.attempts)
    assert.is_truthy(runs("next"), "the next call never started")
    assert.is_true(support.kill(spawner, 18))
    -- the kill lands while the next call runs; that call then runs again
    assert.is_true(support.eventually(function() return p:stats().deaths == 1 end, 10), "no kill landed")
    support.write(dir .. "/go", "")
    assert.are.same({ true, "next" }, { p:result(next, 10) })
    local s = p:stats()
    assert.are.equal(0, s.retries)
    assert.are.equal(1, s.deaths)
  end)

  -- A call cancelled once its worker holds it, not running yet, has its
  -- record at once; its worker is ended as it starts it. It used to get a
  -- second record when it then overran its timeout ("timed
  -- out") or killed its worker ("killed 1 workers"): results + errors
  -- came to more than the calls, and wait could return with a call
  -- unfinished.
  for _, where in ipairs { "local", "remote" } do
    it("keeps one record for a call cancelled in its worker that then times out or kills it (" .. where .. ")",
        function()
      local dir = support.tmpdir()
      local p = Parallelize({ function(x, gate)
        local P = require("parallelize")
        while gate and not io.open(gate, "r") do P.sleep(0.002) end
        if x == "exit" then os.exit(7) end
        P.sleep(x)
        return x
      end }, {
        timeout = 0.5, window = 5, max_deaths = 1,
        launcher = where == "remote" and function() return { support.pzlua(), "--worker" } end or nil,
      })
      finally(function()
        p:stop(0)
        support.rmdir(dir)
      end)
      -- Instant calls first: the worker's depth then lets it hold the
      -- next calls at once. The call cancelled behind a running one is
      -- sent to the worker already. The running one waits for its gate,
      -- opened after the cancel: the victim cannot have started by then.
      local function cancelled_behind(x)
        for _ = 1, 50 do p(0) end
        assert.is_true(p:wait(10))
        local gate = dir .. "/" .. x
        local first, victim, last = p(0.01, gate), p(x), p(0)
        assert.is_true(support.eventually(function() return p:stats().running == 3 end, 10))
        assert.is_true(p:cancel(victim))
        support.write(gate, "")
        assert.is_true(p:wait(10))
        core.sleep(0.7) -- past the victim's timeout
        local got, failed = outcomes(p)
        assert.are.equal(0.01, got[first])
        assert.are.equal(0, got[last])
        assert.are.equal("call " .. victim .. " cancelled", failed[victim].message)
        assert.are.equal(p.calls, #p.results + #p.errors)
      end
      cancelled_behind(2)      -- it overruns its timeout
      cancelled_behind("exit") -- it kills its worker (max_deaths = 1)
      local s = p:stats()
      assert.are.equal(2, s.cancelled)
      assert.are.equal(0, s.timeouts)
      assert.is_true(s.deaths >= 1)
      assert.are.equal(0, #p:stop())
    end)
  end

  -- A cancelled call that was still waiting when the pool stopped used to
  -- come back in stop's aborted list as well as in p.errors.
  it("leaves a call cancelled while it waited out of stop's aborted list", function()
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end, { workers = 1 })
    finally(function() p:stop(0) end)
    local busy = p(2)
    local ids = {}
    for i = 1, 5 do ids[i] = p(0) end
    core.sleep(0.1)
    assert.is_true(p:cancel(ids[2]))
    local aborted = {}
    for _, a in ipairs(p:stop(0)) do aborted[#aborted + 1] = a.id end
    local _, failed = outcomes(p)
    assert.are.equal("call " .. ids[2] .. " cancelled", failed[ids[2]].message)
    assert.are.same({ busy, ids[1], ids[3], ids[4], ids[5] }, aborted)
    assert.are.equal(p.calls, #p.results + #p.errors + #aborted)
  end)

  it("reaches a call still in the submit queue", function()
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end, { workers = 1 })
    finally(function() p:stop() end)
    p(0.5)
    local ids = {}
    for i = 1, 50 do ids[i] = p(0) end
    for i = 1, 50, 2 do assert.is_true(p:cancel(ids[i])) end
    assert.is_true(p:wait(20))
    local got, failed = outcomes(p)
    for i = 1, 50 do
      if i % 2 == 1 then assert.is_true(failed[ids[i]].cancelled) else assert.are.equal(0, got[ids[i]]) end
    end
  end)
end)

describe("retries", function()
  --- An executor whose first call with each x raises, and whose second
  -- returns x * 10: a marker file in dir remembers the first.
  local function fails_once(dir)
    return function(x)
      local marker = dir .. "/" .. x
      local f = io.open(marker, "r")
      if not f then
        f = io.open(marker, "w")
        f:close()
        error("not yet " .. x)
      end
      f:close()
      return x * 10
    end
  end

  -- The attempts of a call that raised were kept after a retry succeeded,
  -- for the pool's life: a flaky executor grew the parent by hundreds of
  -- bytes a call however often p:take() emptied the store.
  it("keeps no attempt of a call once a retry has succeeded", function()
    local dir = support.tmpdir()
    local p = Parallelize(fails_once(dir), { workers = 2, retries = 2, keep_results = false })
    finally(function()
      p:stop()
      support.rmdir(dir)
    end)
    for x = 1, 200 do p(x) end
    assert.is_true(p:wait(20))
    local s = p:stats()
    assert.are.equal(200, s.retries)
    assert.are.equal(0, s.retrying)
    assert.are.equal(200, #p:take())
  end)

  it("counts the calls it keeps attempts of while they run again", function()
    local dir = support.tmpdir()
    local p = Parallelize(function(x)
      local go = io.open(dir .. "/go", "r")
      if not go then
        parallelize.sleep(0.01) -- 255 tries last seconds
        error("not yet " .. x)
      end
      go:close()
      return x
    end, { workers = 2, retries = 255 })
    finally(function()
      p:stop()
      support.rmdir(dir)
    end)
    p(1)
    p(2)
    assert.is_true(support.eventually(function() return p:stats().retrying == 2 end, 10))
    support.write(dir .. "/go", "")
    assert.is_true(p:wait(20))
    assert.are.equal(0, p:stats().retrying)
    local results = p.results
    table.sort(results) -- two workers: either may finish first
    assert.are.same({ 1, 2 }, results)
  end)

  it("runs a call that raised again, on whichever worker is free", function()
    local dir = support.tmpdir()
    local p = Parallelize(fails_once(dir), { workers = 2, retries = 1 })
    finally(function() -- (busted keeps one finally a test: the last)
      p:stop()
      support.rmdir(dir)
    end)
    for i = 1, 20 do p(i) end
    assert.is_true(p:wait(10))
    local got, failed = outcomes(p)
    assert.are.same({}, failed)
    for i = 1, 20 do assert.are.equal(i * 10, got[i]) end
    assert.are.equal(20, p:stats().retries)
  end)

  it("runs again a lone call that raised on an idle pool", function()
    -- A lone call on an idle pool is sent by the main thread itself (lend.c);
    -- its next attempt must still reach the I/O thread, asleep meanwhile.
    local dir = support.tmpdir()
    local p = Parallelize(fails_once(dir), { workers = 1, retries = 1 })
    finally(function() -- (busted keeps one finally a test: the last)
      p:stop()
      support.rmdir(dir)
    end)
    local _ = p.executors
    for i = 1, 3 do
      local ok, v = p:result(p(i), 10)
      assert.is_true(ok, tostring(v))
      assert.are.equal(i * 10, v)
    end
    assert.are.equal(3, p:stats().retries)
  end)

  it("lists every attempt in the final error", function()
    local p = Parallelize(function(x) error("attempt failed for " .. x, 0) end, { workers = 2, retries = 2 })
    finally(function() p:stop() end)
    local ok, err = p:result(p("x"))
    assert.is_false(ok)
    assert.are.equal("attempt failed for x", err.message)
    assert.are.equal(3, #err.attempts)
    for _, a in ipairs(err.attempts) do
      assert.are.equal("attempt failed for x", a.message)
      assert.is_true(a.worker == 1 or a.worker == 2)
      assert.is_true(a.pid > 0)
    end
  end)

  it("keeps the attempts that raised when a retry then times out or is cancelled", function()
    -- The parent's own errors (timeout, cancel) must not drop what the
    -- call did before: the user would see a timeout and never the raise.
    local dir = support.tmpdir()
    local p = Parallelize(function(x)
      local marker = dir .. "/" .. x
      local f = io.open(marker, "r")
      if not f then
        f = io.open(marker, "w")
        f:close()
        error("first try of " .. x, 0)
      end
      f:close()
      parallelize.sleep(30)
    end, { workers = 2, retries = 1, timeout = 0.2 })
    finally(function()
      p:stop(0)
      support.rmdir(dir)
    end)
    local timed = p("a")
    local ok, err = p:result(timed, 10)
    assert.is_false(ok)
    assert.is_true(err.timeout)
    assert.are.equal(1, #err.attempts)
    assert.are.equal("first try of a", err.attempts[1].message)
    local cancelled = p:submit({ timeout = false }, "b")
    assert.is_true(support.eventually(function()
      return support.read(dir .. "/b") ~= nil and p:stats().retries == 2
    end, 10))
    assert.is_true(p:cancel(cancelled))
    ok, err = p:result(cancelled, 10)
    assert.is_false(ok)
    assert.is_true(err.cancelled)
    assert.are.equal(1, #err.attempts)
    assert.are.equal("first try of b", err.attempts[1].message)
  end)

  it("names each attempt's worker pid, even when the worker answers before its fork is reported", function()
    -- A worker can initialize and answer before the I/O thread has read the
    -- spawner's report of its fork (the spawner is slow to return from
    -- fork on a busy machine). Many short pools make that happen: about one
    -- pool in fifty on two CPUs. Both the attempts and p:stats() must name
    -- the pid the worker itself reported (p.pids) all the same.
    local failing = function(x) error("attempt failed for " .. x, 0) end
    local t0, pools = core.now(), 0
    while core.now() - t0 < 2 and pools < 1000 do
      pools = pools + 1
      local p = Parallelize(failing, { workers = 4, retries = 2 })
      local ok, err = pcall(function()
        local id = p("x") -- queued before any worker is ready: answered at once
        local _ = p.executors -- every worker has initialized
        local pids = p.pids
        for i, w in ipairs(p:stats().workers) do
          assert(w.pid == pids[i], ("pool %d: stats names pid %d for worker %d, pid %s"):format(
            pools, w.pid, i, tostring(pids[i])))
        end
        local _, e = p:result(id)
        assert(#e.attempts == 3, "pool " .. pools .. ": " .. #e.attempts .. " attempts")
        for n, a in ipairs(e.attempts) do
          assert(a.pid == pids[a.worker], ("pool %d: attempt %d names pid %d for worker %d, pid %s"):format(
            pools, n, a.pid, a.worker, tostring(pids[a.worker])))
        end
      end)
      p:stop()
      assert(ok, err)
    end
  end)
end)

describe("max_calls", function()
  it("ends a retiring worker whose close outlasts the timeout while its replacement waits", function()
    -- A slot holds two workers: with max_calls = 1 the second retires as
    -- it takes its call, and the third could start only once the first
    -- had exited, which a close that never returns never did: wait hung.
    -- The pool's timeout bounds that close as it bounds a call.
    local close_never_returns = { __call = function(_, x) return x end,
      __index = { close = function() require("parallelize").sleep(1e6) end } }
    local p = Parallelize({ setmetatable({}, close_never_returns), setmetatable({}, close_never_returns) },
      { max_calls = 1, timeout = 0.3 })
    finally(function() p:stop(0) end)
    for i = 1, 6 do p(i) end
    assert.is_true(p:wait(30), "the slots waited for closes that never return")
    local got = p.results
    table.sort(got)
    assert.are.same({ 1, 2, 3, 4, 5, 6 }, got)
    assert.are.equal(0, #p.errors)
  end)

  it("replaces a worker after n calls, losing and doubling nothing under SIGKILLs", function()
    local n = 1000 -- (make soak recycles many more, under kills too)
    -- (max_deaths high: a call killed 3 times by chance is no loss, but
    -- it would be an error, and every call here must return)
    local p = Parallelize(function(x) return { x, require("parallelize").getpid() } end,
      { workers = 4, max_calls = 1, max_deaths = 255 })
    finally(function() p:stop() end)
    for i = 1, n do p(i) end
    local kills = 0
    while p.pending > 0 do
      for _, pid in pairs(p.pids) do
        if math.random() < 0.3 and support.kill(pid, SIGKILL) then kills = kills + 1 end
      end
      core.sleep(0.005)
    end
    assert.is_true(p:wait(60))
    local got, failed = outcomes(p)
    assert.are.same({}, failed)
    local pids = {}
    for i = 1, n do
      assert.are.equal(i, got[i][1])
      assert.is_nil(pids[got[i][2]], "pid " .. got[i][2] .. " ran two calls")
      pids[got[i][2]] = true
    end
    assert.is_true(p:stats().recycles >= n - 4 * 2)
    assert.is_true(kills > 0)
  end)

  it("lets the executor's close run, and keeps every slot's worker ready", function()
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    local Counter = {}
    Counter.__index = Counter
    function Counter:__call(x) self.n = self.n + 1 return x end
    function Counter:close()
      local f = io.open(self.dir .. "/" .. require("parallelize").getpid(), "w")
      f:write(self.n)
      f:close()
      return self.n
    end
    local p = Parallelize(Deferred(function(d) return setmetatable({ n = 0, dir = d }, Counter) end, dir),
      { workers = 2, max_calls = 5 })
    for i = 1, 40 do p(i) end
    assert.is_true(p:wait(20))
    assert.are.same({}, p:stop())
    local total, files = 0, 0
    for _, name in ipairs(support.list(dir)) do
      files = files + 1
      total = total + tonumber(support.read(dir .. "/" .. name))
    end
    assert.are.equal(40, total) -- each call ran once, each retired worker closed
    local recycles = p:stats().recycles
    assert.is_true(recycles >= 6, recycles .. " recycles") -- 5 calls each; the last ones may have fewer
    -- every retired worker closed; the last two did too, unless stop found
    -- them still starting (ended at once: they had run nothing)
    assert.is_true(files >= recycles and files <= recycles + 2, files .. " closed, " .. recycles .. " recycles")
    -- p.closed: what the last worker of each slot returned from close
    local closed = p.closed
    assert.are.equal("number", type(closed[1]))
    assert.are.equal("number", type(closed[2]))
    assert.is_true(closed[1] <= 5 and closed[2] <= 5)
  end)

  it("makes wait raise when a replacement's constructor fails and the retiring worker was the last", function()
    -- The replacement is given up while the worker it replaces still runs
    -- its last call; once that one has gone, no worker is left.
    local dir = support.tmpdir()
    local p = Parallelize({ Deferred(function(d)
      local f = io.open(d .. "/made", "r")
      if f then
        f:close()
        error("the second constructor fails")
      end
      f = io.open(d .. "/made", "w")
      f:close()
      return function(x) require("parallelize").sleep(0.2) return x end
    end, dir) }, { max_calls = 1, quiet = true })
    finally(function()
      p:stop()
      support.rmdir(dir)
    end)
    for i = 1, 3 do p(i) end
    local t0 = core.now()
    local ok, err = pcall(p.wait, p, 10)
    assert.is_false(ok, "wait returned " .. tostring(err) .. " after " .. (core.now() - t0) .. " s")
    assert.matches("no worker is left and none can be started: .*the second constructor fails", err)
    assert.are.equal(2, #p:stop())
    assert.are.same({ 1 }, p.results)
  end)
end)

describe("fail_fast", function()
  local function failing_pool()
    return Parallelize(function(x)
      if x == "bad" then error("bad input") end
      require("parallelize").sleep(x)
      return x
    end, { workers = 1, fail_fast = true })
  end

  for _, how in ipairs({ "wait", "map", "result", "stream" }) do
    it("makes " .. how .. " raise the first failure at once, and stop return the rest", function()
      local p = failing_pool()
      local t0 = core.now()
      local ok, err = pcall(function()
        if how == "wait" then
          p(0.01); p("bad")
          for _ = 1, 20 do p(0.2) end
          p:wait()
        elseif how == "map" then
          p:map({ 0.01, "bad", 0.2, 0.2, 0.2, 0.2 })
        elseif how == "result" then
          p("bad")
          local last
          for _ = 1, 10 do last = p(0.2) end
          p:result(last)
        else
          for _ in p:stream({ 0.01, "bad", 0.2, 0.2, 0.2, 0.2 }) do end
        end
      end)
      assert.is_false(ok)
      assert.matches("bad input", err)
      assert.is_true(core.now() - t0 < 2, how .. " did not raise at once")
      local aborted = p:stop()
      assert.is_true(#aborted >= 3, "only " .. #aborted .. " aborted")
    end)
  end

  it("makes wait raise a failure that was the last call to finish, and every wait after it", function()
    -- Whether another call still ran when the failure came is chance: the
    -- same script must raise either way.
    local p = failing_pool()
    finally(function() p:stop() end)
    p(0.01)
    p("bad")
    for _ = 1, 2 do
      local ok, err = pcall(p.wait, p)
      assert.is_false(ok)
      assert.matches("^fail_fast: call 2 failed: .*bad input", err)
    end
  end)

  it("leaves a call cancelled after the halt in the errors only, not also in stop's aborted", function()
    local p = failing_pool()
    p("bad")
    assert.is_true(support.eventually(function() return p:stats().failed == 1 end, 10))
    local id = p(0.01) -- never dispatched: the pool has halted
    assert.is_true(p:cancel(id))
    local aborted = p:stop()
    local errors = p.errors
    assert.are.equal(2, #errors)
    assert.is_true(errors[2].cancelled)
    assert.are.equal(id, errors[2].id)
    assert.are.same({}, aborted)
  end)

  it("counts a worker slot given up while initializing", function()
    local p = Parallelize({ Deferred(function() error("no database") end),
      function(s) require("parallelize").sleep(s) return s end }, { fail_fast = true })
    for _ = 1, 10 do p(0.2) end
    local ok, err = pcall(p.wait, p)
    assert.is_false(ok)
    assert.matches("fail_fast: worker 1 was given up: .*no database", err)
    p:stop()
  end)
end)

describe("stats", function()
  it("counts calls, failures, workers and rates", function()
    local p = Parallelize(function(x)
      if x % 5 == 0 then error("five") end
      require("parallelize").sleep(0.002)
      return x
    end, { workers = 2 })
    finally(function() p:stop() end)
    for i = 1, 100 do p(i) end
    assert.is_true(p:wait(20))
    local s = p:stats()
    assert.are.equal(100, s.calls)
    assert.are.equal(80, s.done)
    assert.are.equal(20, s.failed)
    assert.are.equal(0, s.pending)
    assert.are.equal(0, s.running)
    assert.are.equal(2, #s.workers)
    local calls, busy = 0, 0
    for _, w in ipairs(s.workers) do
      -- (a worker still starting when the calls were done has no pid yet)
      assert.is_true(w.pid > 0 or w.calls == 0)
      calls, busy = calls + w.calls, busy + w.busy
    end
    assert.are.equal(100, calls)
    assert.is_true(busy >= 80 * 0.002, "busy " .. busy)
    assert.is_true(s.elapsed > 0 and s.rate > 0)
    assert.is_true(s.recent_rate >= 0)
    for _, k in ipairs({ "aborted", "cancelled", "timeouts", "retries", "deaths", "respawns", "recycles" }) do
      assert.are.equal(0, s[k], k)
    end
    p:stop()
    assert.are.equal(100, p:stats().calls)
  end)

  it("counts no death for workers stop() ends while they initialize", function()
    local p = Parallelize(Deferred(function()
      parallelize.sleep(30)
      return function(x) return x end
    end), { workers = 2 })
    finally(function() p:stop() end)
    parallelize.sleep(0.2) -- both are forked and initializing
    assert.are.same({}, p:stop(0))
    local s = p:stats()
    assert.are.equal(0, s.deaths)
    assert.are.equal(0, #p.init_errors)
  end)
end)

describe("progress", function()
  local dir
  before_each(function()
    dir = support.tmpdir()
    support.write(dir .. "/bar.lua", [[
local pz = require "parallelize"
local p = pz.Parallelize(function(x) pz.sleep(0.03) return x end,
  { workers = 2, progress = arg[1] == "always" and "always" or true })
for i = 1, 60 do p(i) end
p:wait()
p:stop()
io.stdout:write("done\n")
]])
  end)
  after_each(function() support.rmdir(dir) end)

  it("draws a bar on a terminal, redrawn in place, erased at the end", function()
    local out = support.run("cd " .. support.quote(dir) .. " && script -qec "
      .. support.quote(support.quote(support.pzlua()) .. " bar.lua") .. " /dev/null")
    assert.matches("%d+/60 calls %(%d+%%%), %d+/s, ETA", out)
    assert.matches("\r", out)
    assert.matches("\r\27%[K", out) -- erased
    assert.matches("done", out)
  end)

  it("erases the bar before the script prints: after p(...) waited for room, in a stream's loop", function()
    support.write(dir .. "/room.lua", [[
local pz = require "parallelize"
local p = pz.Parallelize(function(x) pz.sleep(0.15) return x end, { workers = 1, progress = true, max_pending = 1 })
local _ = p.executors
io.stdout:write("ready\n")
for i = 1, 4 do p(i) end
io.stdout:write("queued\n")
io.stdout:flush()
for i in p:stream({ 1, 2, 3 }) do io.stdout:write("got " .. i .. "\n") io.stdout:flush() end
p:wait()
p:stop()
]])
    local out = support.run("cd " .. support.quote(dir) .. " && script -qec "
      .. support.quote(support.quote(support.pzlua()) .. " room.lua") .. " /dev/null")
    assert.matches("%d+/%d+ calls %(", out) -- drawn while p(...) and the stream waited
    assert.matches("\r\27%[Kqueued", out) -- and erased before each line
    assert.matches("\r\27%[Kgot 1", out)
    assert.is_nil(out:find("errors\27%[K%a"), "a line written after the bar: " .. out)
  end)

  it("draws nothing when stderr is a file, and plain lines with progress = always", function()
    local out, status = support.run("cd " .. support.quote(dir) .. " && (" .. support.quote(support.pzlua())
      .. " bar.lua 2> err.txt)")
    assert.are.equal(0, status)
    assert.are.equal("done\n", out)
    assert.are.equal("", support.read(dir .. "/err.txt"))
    support.run("cd " .. support.quote(dir) .. " && (" .. support.quote(support.pzlua())
      .. " bar.lua always 2> err.txt)")
    local err = support.read(dir .. "/err.txt")
    assert.matches("^%d+/60 calls", err)
    assert.matches("\n60/60 calls %(100%%%), %d+/s, ETA 0s, 0 errors\n$", err) -- the last line
    assert.is_nil(err:find("\r", 1, true))
  end)

  it("writes each wait's last line with progress = always, also a wait within a second of the last", function()
    -- The second wait's draws all fall within the first wait's second:
    -- its final counts are written all the same.
    support.write(dir .. "/two.lua", [[
local pz = require "parallelize"
local p = pz.Parallelize(function(x) pz.sleep(0.02) return x end, { workers = 1, progress = "always" })
for i = 1, 3 do p(i) end
p:wait()
for i = 4, 5 do p(i) end
p:wait()
for _ = 1, 20 do p:wait(0.001) end -- no line each (nothing new to say)
p(6)
while not p:wait(0.001) do end -- polling: no line a wait, one at the end
p:stop()
]])
    local _, status = support.run("cd " .. support.quote(dir) .. " && (" .. support.quote(support.pzlua())
      .. " two.lua 2> err.txt)")
    assert.are.equal(0, status)
    local err = support.read(dir .. "/err.txt")
    assert.matches("\n3/3 calls %(100%%%)[^\n]*\n", err)
    assert.matches("\n5/5 calls %(100%%%), %d+/s, ETA 0s, 0 errors\n6/6 calls %(100%%%)[^\n]*\n$", err)
    local _, lines = err:gsub("\n", "")
    assert.is_true(lines <= 5, err)
  end)

  it("with progress = always, ends the lines with the final counts after waits too short to draw", function()
    -- p:result per call: each a waiting of its own, most ending within a
    -- second of the last line (none drawn); the last one ends the run.
    support.write(dir .. "/results.lua", [[
local pz = require "parallelize"
local p = pz.Parallelize(function(x) pz.sleep(0.02) return x end, { workers = 2, progress = "always" })
local ids = {}
for i = 1, 30 do ids[i] = p(i) end
for _, id in ipairs(ids) do p:result(id) end
p:stop()
]])
    local _, status = support.run("cd " .. support.quote(dir) .. " && (" .. support.quote(support.pzlua())
      .. " results.lua 2> err.txt)")
    assert.are.equal(0, status)
    local err = support.read(dir .. "/err.txt")
    assert.matches("\n30/30 calls %(100%%%), %d+/s, ETA 0s, 0 errors\n$", err)
    local _, lines = err:gsub("\n", "")
    assert.is_true(lines <= 4, err) -- still at most one a second, and the last
  end)
end)

describe("a pool dropped with calls unfinished", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(function() support.rmdir(dir) end)

  local interpreters = {
    pzlua = support.quote(support.pzlua()),
    luajit = "env LUA_PATH='lua/?.lua;;' LUA_CPATH='build/?.so;;' luajit",
  }
  for name, cmd in pairs(interpreters) do
    it("says so on stderr, once (" .. name .. ")", function()
      support.write(dir .. "/drop.lua", [[
local pz = require "parallelize"
local p = pz.Parallelize(function(s) pz.sleep(s) end, { workers = 1, quiet = arg[1] == "quiet" })
p(5); p(5)
]])
      local out, status = support.run(cmd .. " " .. support.quote(dir .. "/drop.lua"))
      assert.are.equal(0, status, out)
      assert.matches("^parallelize: a pool was dropped %(collected, or still open when the program ended%) "
        .. "with 2 of its 2 calls unfinished; to keep them, call p:wait%(%) before the program ends", out)
      local _, lines = out:gsub("\n", "")
      assert.are.equal(1, lines)
      out = support.run(cmd .. " " .. support.quote(dir .. "/drop.lua") .. " quiet")
      assert.are.equal("", out)
    end)
  end
end)
