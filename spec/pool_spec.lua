-- The pool end to end: Parallelize, Deferred, calls, results, errors,
-- executors, wait, stop, and what is left behind afterwards.
local parallelize = require "parallelize"
local core = require "parallelize.core"
local support = require "spec.support"

local Parallelize, Deferred, rep = parallelize.Parallelize, parallelize.Deferred, parallelize.rep
local null = parallelize.null

--- Sorted copy of an array of numbers.
local function sorted(t)
  local c = {}
  for i = 1, #t do c[i] = t[i] end
  table.sort(c)
  return c
end

--- The option names, sorted and joined as the unknown-option message has them.
local function option_names()
  local names = {}
  for name in pairs(require("parallelize.options").OPTIONS) do names[#names + 1] = name end
  table.sort(names)
  return table.concat(names, ", ")
end

describe("Parallelize", function()
  it("runs 10,000 calls over 8 workers, each input's result exactly once", function()
    local p = Parallelize(rep(function(x) return x * 3 end, 8))
    finally(function() p:stop() end)
    for i = 1, 10000 do
      assert.are.equal(i, p(i))
    end
    assert.is_true(p:wait())
    local results, ids = p.results, p.ids
    assert.are.equal(10000, #results)
    assert.are.equal(10000, #ids)
    local seen = {}
    for i = 1, #results do
      assert.are.equal(ids[i] * 3, results[i])
      assert.is_nil(seen[ids[i]])
      seen[ids[i]] = true
    end
    assert.are.equal(0, #p.errors)
    assert.are.equal(10000, p.calls)
    assert.are.equal(0, p.pending)
  end)

  it("uses every worker", function()
    local p = Parallelize(rep(function() parallelize.sleep(0.02); return parallelize.getpid() end, 4))
    finally(function() p:stop() end)
    for _ = 1, 40 do p() end
    p:wait()
    local pids = {}
    for _, pid in ipairs(p.results) do pids[pid] = true end
    local n = 0
    for pid in pairs(pids) do
      n = n + 1
      assert.are_not.equal(support.getpid(), pid)
    end
    assert.are.equal(4, n)
  end)

  it("records errors with their arguments and goes on", function()
    local p = Parallelize({ function(x)
      if x % 3 == 0 then error("bad input " .. x) end
      return x
    end })
    finally(function() p:stop() end)
    for i = 1, 30 do p(i, "extra") end
    p:wait()
    assert.are.equal(20, #p.results)
    assert.are.equal(10, #p.errors)
    local e = p.errors[1]
    assert.are.equal(0, e.args[1] % 3)
    assert.are.equal(e.args[1], e.id)
    assert.are.equal("extra", e.args[2])
    assert.are.equal(2, e.args.n)
    assert.matches("bad input " .. e.args[1], e.message, 1, true)
    assert.matches("stack traceback", e.traceback, 1, true)
    -- one worker served all of them
    assert.are.equal(1, #p.executors)
  end)

  it("keeps error objects that are not strings readable", function()
    local p = Parallelize({ function(kind)
      if kind == "table" then error(setmetatable({}, { __tostring = function() return "custom" end })) end
      error({ code = 1 })
    end })
    finally(function() p:stop() end)
    p("table")
    p("plain")
    p:wait()
    local messages = {}
    for _, e in ipairs(p.errors) do messages[e.args[1]] = e.message end
    assert.are.equal("custom", messages.table)
    assert.are.equal("(error object is a table value)", messages.plain)
  end)

  it("stores parallelize.null for nil results and keeps the first value", function()
    local p = Parallelize({ function(x) return x, "second" end })
    finally(function() p:stop() end)
    p(nil)
    p(false)
    p(7)
    p:wait()
    local byid = {}
    for i, id in ipairs(p.ids) do byid[id] = p.results[i] end
    assert.are.equal(null, byid[1])
    assert.are.equal(false, byid[2])
    assert.are.equal(7, byid[3])
  end)

  it("carries closures with their upvalues and the globals they read", function()
    local defer = support.defer(finally)
    local offset, names = 100, { "a", "b" }
    -- luacheck: globals PZ_SPEC_FACTOR
    PZ_SPEC_FACTOR = 2
    defer(function() PZ_SPEC_FACTOR = nil end)
    local p = Parallelize({ function(i) return names[i] .. (offset + i * PZ_SPEC_FACTOR) end })
    defer(function() p:stop() end)
    p(1)
    p(2)
    p:wait()
    assert.are.same({ "a102", "b104" }, sorted(p.results))
  end)

  it("runs callable tables whose state changes between calls", function()
    local Counter = {}
    Counter.__index = Counter
    function Counter:__call(x)
      self.count = self.count + x
      return self.count
    end
    local p = Parallelize({ setmetatable({ count = 0 }, Counter) })
    finally(function() p:stop() end)
    for i = 1, 5 do p(i) end
    p:wait()
    assert.are.same({ 1, 3, 6, 10, 15 }, sorted(p.results))
  end)

  it("gets executors named 'module.name' by require, with the parent's package.path", function()
    local defer = support.defer(finally)
    local dir = support.tmpdir()
    defer(function() support.rmdir(dir) end)
    support.write(dir .. "/pz_spec_mod.lua", [[
      local M = { calls = 0 }
      function M.double(x) return 2 * x end
      M.nested = { triple = function(x) return 3 * x end }
      return M
    ]])
    local saved = package.path
    package.path = dir .. "/?.lua;" .. package.path
    local p1 = Parallelize({ "pz_spec_mod.double" })
    local p2 = Parallelize({ "pz_spec_mod.nested.triple" })
    package.path = saved
    defer(function() p1:stop(); p2:stop() end)
    p1(5)
    p2(5)
    p1:wait()
    p2:wait()
    assert.are.same({ 10 }, p1.results)
    assert.are.same({ 15 }, p2.results)
    assert.are.equal(0, #p1.init_errors + #p2.init_errors)
  end)

  it("reports a module executor that cannot be found as an init error", function()
    local p = Parallelize({ "pz_no_such_module.f", function(x) return x end })
    finally(function() p:stop() end)
    assert.are.equal(1, #p.executors)
    assert.are.equal(1, #p.init_errors)
    assert.are.equal(1, p.init_errors[1].worker)
    assert.matches("module 'pz_no_such_module' not found", p.init_errors[1].message, 1, true)
    p(1)
    assert.is_true(p:wait())
    assert.are.same({ 1 }, p.results)
  end)

  it("rejects what cannot be an executor at once", function()
    assert.has_error(function() Parallelize({ print, function() end, 42 }) end,
      "executor 3 is not callable (a number)")
    assert.has_error(function() Parallelize({}) end, "Parallelize: executors must be a non-empty array")
    assert.has_error(function() Parallelize(42) end,
      "Parallelize: executors must be an array or one executor (got a number 42)")
    assert.has_error(function() Parallelize({ {} }) end, "executor 1 is not callable (a table)")
    assert.has_error(function() Parallelize({ io.stdout }) end, "executor 1 is not callable (a userdata)")
    assert.has_error(function() Parallelize({ "not a name" }) end,
      'executor 1: "not a name" is not a module name such as "mod.func"')
    assert.has_error(function() Parallelize({ function() end }, { bogus = 1 }) end,
      "Parallelize: unknown option 'bogus' (the options are " .. option_names() .. ")")
    assert.has_error(function() Parallelize({ function() end }, { max_deaths = 0 }) end,
      "Parallelize: option max_deaths must be an integer from 1 to 255 (got 0)")
    assert.has_error(function() Deferred(5) end, "Deferred: the constructor is not callable (a number)")
  end)

  it("refuses an executor that cannot be encoded, naming the path", function()
    local co = coroutine.create(print)
    assert.has_error(function() Parallelize({ function() return co end }) end,
      "cannot encode a thread at executors[1]<upvalue 'co'>")
  end)

  it("raises in the caller for arguments that cannot travel, queuing nothing", function()
    local p = Parallelize({ function(x) return x end })
    finally(function() p:stop() end)
    p(1)
    assert.has_error(function() p(1, { co = coroutine.create(print) }) end,
      "cannot encode a thread at args[2].co")
    assert.has_error(function() p(io.stdout) end, "cannot encode a userdata at args[1]")
    assert.are.equal(1, p.calls)
    assert.are.equal(2, p(2))
    p:wait()
    assert.are.equal(2, #p.results)
  end)

  it("waits with a timeout, and any number of times", function()
    local p = Parallelize({ function(s) parallelize.sleep(s); return s end })
    finally(function() p:stop() end)
    assert.is_true(p:wait())
    p(0.5)
    assert.is_false(p:wait(0.05))
    assert.is_true(p:wait())
    assert.is_true(p:wait())
    p(0)
    assert.is_true(p:wait(5))
    assert.are.equal(2, #p.results)
  end)

  it("returns from wait as soon as the last result is in", function()
    local p = Parallelize({ function(s) parallelize.sleep(s) end })
    finally(function() p:stop() end)
    local _ = p.executors
    local t0 = core.now()
    p(0.2)
    p:wait()
    local elapsed = core.now() - t0
    -- no 0.1 s polling steps: far below 0.3 s even on a loaded machine
    assert.is_true(elapsed >= 0.2 and elapsed < 0.29, "wait took " .. elapsed)
  end)

  it("shows results while the main thread does other work", function()
    local p = Parallelize(rep(function(x) return x end, 2))
    finally(function() p:stop() end)
    for i = 1, 100 do p(i) end
    local seen = support.eventually(function() return #p.results == 100 end, 10)
    assert.is_true(seen)
  end)

  it("sends results while their worker runs a long call queued after them", function()
    -- The worker holds the short calls' results for a batch while it runs
    -- the long call it already has: its flusher thread writes them once
    -- the oldest has waited 4.5 ms (PZ_WOUT_LATE_NS).
    local p = Parallelize(function(x)
      parallelize.sleep(x)
      return x
    end, { workers = 1 })
    finally(function() p:stop() end)
    -- Instant calls first: the worker is then sent many calls at a time.
    for _ = 1, 300 do p(0) end
    p:wait()
    for _ = 1, 20 do p(0) end
    local t0 = core.now()
    p(2)
    local came = support.eventually(function() return #p.results == 320 end, 1)
    assert.is_true(came, "the short calls' results did not come while the long call ran")
    local waited = core.now() - t0
    assert.is_true(waited < 1, "the short calls' results came after " .. waited .. " s")
    assert.are.equal(1, p.pending) -- the long call has not finished
  end)

  it("writes the results it holds when it gets SIGTERM, before it ends", function()
    -- 50 instant calls, then one that sends SIGTERM to its own worker: the
    -- instant calls' results are still in the worker's batch (the call
    -- after them is running) and must reach the parent before the worker
    -- ends; lost, they would run again on the worker that replaces it.
    local dir = support.tmpdir()
    local log = dir .. "/ran"
    local p = Parallelize(function(x, path)
      local pz = require "parallelize"
      if x == "term" then
        os.execute("kill -TERM " .. pz.getpid())
        pz.sleep(5)
        return x
      end
      local f = assert(io.open(path, "a"))
      f:write(x, "\n")
      f:close()
      return x
    end, { workers = 1 })
    finally(function()
      p:stop()
      support.rmdir(dir)
    end)
    p:wait()
    for i = 1, 50 do p(i, log) end
    local term = p("term", log)
    p:wait()
    local ran = support.read(log)
    local _, runs = ran:gsub("\n", "")
    assert.are.equal(50, runs, "the instant calls ran " .. runs .. " times in all")
    assert.are.equal(50, #p.results)
    assert.are.equal(1, #p.errors)
    assert.are.same({ term, "killer" }, { p.errors[1].id, p.errors[1].kind })
  end)

  it("stops in the middle, returning what never ran", function()
    local p = Parallelize(rep(function(x) parallelize.sleep(0.01); return x end, 4))
    for i = 1, 400 do p(i, "arg") end
    parallelize.sleep(0.1)
    local aborted = p:stop()
    local results, errors = p.results, p.errors
    assert.are.equal(400, #results + #errors + #aborted)
    assert.is_true(#aborted > 0)
    assert.is_true(#results > 0)
    local seen = {}
    for _, id in ipairs(p.ids) do seen[id] = true end
    for _, a in ipairs(aborted) do
      assert.are.equal(2, a.n)
      assert.are.equal("arg", a[2])
      assert.are.equal(a[1], a.id)
      assert.is_nil(seen[a.id])
      seen[a.id] = true
    end
    for i = 1, 400 do assert.is_true(seen[i]) end
    assert.are.same({}, p:stop())
    assert.is_true(p.stopped)
    assert.has_error(function() p(1) end, "the pool is stopped")
    assert.has_error(function() p:wait() end, "wait: the pool is stopped")
    assert.has_error(function() p:submit({ timeout = 1 }, 1) end, "submit: the pool is stopped")
  end)

  it("calls the executor's close method on a graceful stop", function()
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    local Closer = {}
    Closer.__index = Closer
    function Closer:__call() return self.name end
    function Closer:close()
      local f = io.open(self.path, "w")
      f:write("closed " .. self.name)
      f:close()
    end
    local function make(name) return setmetatable({ name = name, path = dir .. "/b" }, Closer) end
    local p = Parallelize({ setmetatable({ name = "a", path = dir .. "/a" }, Closer), Deferred(make, "b") })
    assert.are.equal(2, #p.executors) -- both built: a worker still initializing is ended, not closed
    p()
    p:wait()
    p:stop()
    assert.are.equal("closed a", support.read(dir .. "/a"))
    assert.are.equal("closed b", support.read(dir .. "/b"))
  end)

  it("keeps two pools apart", function()
    local p1 = Parallelize(rep(function(x) return "one" .. x end, 2))
    local p2 = Parallelize(rep(function(x) return "two" .. x end, 3))
    finally(function() p1:stop(); p2:stop() end)
    for i = 1, 50 do p1(i); p2(i) end
    p1:wait()
    p2:wait()
    assert.are.equal(50, #p1.results)
    assert.are.equal(50, #p2.results)
    for i = 1, 50 do
      assert.matches("^one", p1.results[i])
      assert.matches("^two", p2.results[i])
    end
  end)

  it("has a useful tostring and size", function()
    local p = Parallelize(rep(function() end, 3))
    assert.are.equal(3, p.size)
    assert.matches("^parallelize pool %(3 workers, running%)", tostring(p))
    p:stop()
    assert.matches("^parallelize pool %(3 workers, stopped%)", tostring(p))
    assert.has_error(function() p.results = {} end, "cannot set field 'results' of a pool")
  end)

  it("leaves no process and no descriptor behind, 100 times over", function()
    local fds = support.fd_count()
    local kids = #support.children()
    local pids = {}
    for round = 1, 100 do
      local p = Parallelize(rep(function(x) return x + round end, 2))
      p(round)
      p:wait()
      assert.are.equal(2 * round, p.results[1])
      for _, pid in pairs(p.pids) do pids[#pids + 1] = pid end
      p:stop()
    end
    assert.are.equal(fds, support.fd_count())
    assert.are.equal(kids, #support.children())
    for _, pid in ipairs(pids) do assert.is_false(support.alive(pid), "worker " .. pid .. " lives") end
  end)

  it("reaps the processes of a pool collected without stop", function()
    local kids = #support.children()
    local pids
    do
      local p = Parallelize(rep(function() end, 2))
      local _ = p.executors
      pids = p.pids
    end
    collectgarbage()
    collectgarbage()
    assert.are.equal(kids, #support.children())
    for _, pid in pairs(pids) do assert.is_false(support.alive(pid)) end
  end)
end)

describe("Deferred", function()
  it("builds executors inside the workers, in parallel", function()
    local function slow_ctor(tag)
      parallelize.sleep(0.4)
      local pid = parallelize.getpid()
      return setmetatable({ tag = tag, pid = pid }, { __call = function(self, x) return self.tag .. x end })
    end
    local t0 = core.now()
    local ds = {}
    for i = 1, 6 do ds[i] = Deferred(slow_ctor, "w" .. i) end
    local p = Parallelize(ds)
    finally(function() p:stop() end)
    local execs = p.executors
    local elapsed = core.now() - t0
    -- six 0.4 s constructors one after another would take 2.4 s
    assert.is_true(elapsed < 1.6, "constructors took " .. elapsed .. " s")
    assert.are.equal(6, #execs)
    local pids = p.pids
    for i, e in ipairs(execs) do
      assert.are.equal("w" .. i, e.tag)
      assert.are.equal(pids[i], e.pid)
      assert.are_not.equal(support.getpid(), e.pid)
    end
    p("x")
    p:wait()
    assert.matches("^w%dx$", p.results[1])
  end)

  it("names in p.pids only workers that live: a dead one is left out until its replacement is ready", function()
    -- It used to keep a dead worker's pid, which may be another process's
    -- by the time a script signals it.
    for _, respawn in ipairs({ false, true }) do
      local p = Parallelize(rep(function(x) return x end, 2), { respawn = respawn })
      finally(function() p:stop() end)
      local _ = p.executors
      local before = p.pids
      assert.are.equal(2, #before)
      assert.is_true(support.kill(before[1], 9))
      if respawn then
        assert.is_truthy(support.eventually(function()
          local now = p.pids[1]
          return now ~= nil and now ~= before[1]
        end, 10), "no new pid for slot 1")
        assert.is_true(support.alive(p.pids[1]))
      else
        assert.is_truthy(support.eventually(function() return p.pids[1] == nil end, 10),
          "slot 1 still names its dead worker")
      end
      assert.are.equal(before[2], p.pids[2])
      p:stop()
    end
  end)

  it("drops a worker whose constructor raises and runs on the rest", function()
    local p = Parallelize({
      Deferred(function() error("no database") end),
      Deferred(function() return 42 end),
      Deferred(function(k) return function(x) return k * x end end, 10),
    })
    finally(function() p:stop() end)
    assert.are.equal(1, #p.executors)
    local errs = p.init_errors
    assert.are.equal(2, #errs)
    table.sort(errs, function(a, b) return a.worker < b.worker end)
    assert.are.equal(1, errs[1].worker)
    assert.matches("no database", errs[1].message, 1, true)
    assert.matches("stack traceback", errs[1].traceback, 1, true)
    assert.are.equal(2, errs[2].worker)
    assert.are.equal("the Deferred constructor returned number, which is not callable", errs[2].message)
    for i = 1, 10 do p(i) end
    p:wait()
    assert.are.equal(10, #p.results)
  end)

  it("makes wait raise the first init error when no worker initializes", function()
    local p = Parallelize({ Deferred(function() error("cannot connect") end) })
    finally(function() p:stop() end)
    p(1)
    local ok, err = pcall(p.wait, p)
    assert.is_false(ok)
    assert.matches("no worker is left and none can be started: ", err, 1, true)
    assert.matches("cannot connect", err, 1, true)
    local aborted = p:stop()
    assert.are.equal(1, #aborted)
    assert.are.equal(1, aborted[1][1])
  end)
end)

describe("helpers", function()
  it("rep repeats a value", function()
    local f = function() end
    assert.are.same({ f, f, f }, rep(f, 3))
    assert.are.same({}, rep(f, 0))
    assert.has_error(function() rep(f, -1) end, "rep: n must be a non-negative integer (got -1)")
  end)

  it("getpid and sleep", function()
    assert.are.equal(support.getpid(), parallelize.getpid())
    local t0 = core.now()
    parallelize.sleep(0.05)
    local dt = core.now() - t0
    assert.is_true(dt >= 0.05 and dt < 0.5)
    assert.has_error(function() parallelize.sleep(-1) end)
  end)
end)

describe("worker output", function()
  it("goes to the parent's stdout and stderr", function()
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    support.write(dir .. "/print.lua", [[
      local parallelize = require "parallelize"
      local p = parallelize.Parallelize(parallelize.rep(function(x)
        print("from worker " .. x)
        io.stderr:write("err " .. x .. "\n")
      end, 2))
      for i = 1, 4 do p(i) end
      p:wait()
      p:stop()
      print("done")
    ]])
    local out, status = support.run(support.quote(support.pzlua()) .. " " .. dir .. "/print.lua")
    assert.are.equal(0, status)
    for i = 1, 4 do
      assert.matches("from worker " .. i, out, 1, true)
      assert.matches("err " .. i, out, 1, true)
    end
    assert.matches("done\n$", out)
  end)
end)

describe("calls in flight", function()
  --- A pool of 2 workers whose first calls (inputs 1 and 2) take 50 ms,
  -- so that whatever the loop queues meanwhile waits for a worker, and the
  -- others about 2 us: short enough that the cap, not `window`, bounds a
  -- worker's depth (4 ms / 2 us = 2000), long enough that the I/O thread
  -- sleeps between batches of answers, when p:stats() can take its lock
  -- and see what the workers hold (it waits for that lock while the I/O
  -- thread runs: with tiny calls it saw the workers only between bursts).
  local function slow_start(options)
    local p = Parallelize(rep(function(x)
      local t = os.clock() + (x <= 2 and 0.05 or 2e-6)
      while os.clock() < t do end
      return x
    end, 2), options)
    local _ = #p.executors
    return p
  end

  --- The most calls the workers held at once (p:stats().running) until
  -- the n calls of p have finished (stats only: reading p.pending would
  -- drain results, and the sampling miss what happens meanwhile).
  local function most_held(p, n)
    local most, s = 0
    repeat
      s = p:stats()
      if s.running > most then most = s.running end
    until s.done + s.failed >= n
    return most
  end

  it("go past 256 a worker while calls wait for one, up to max_inflight", function()
    local p = slow_start({ max_inflight = 2048 })
    finally(function() p:stop() end)
    for i = 1, 50000 do p(i) end
    local most = most_held(p, 50000)
    assert.is_true(most > 2 * 256, "the workers held at most " .. most .. " calls")
    assert.is_true(most <= 2 * 2048, "the workers held " .. most .. " calls, above max_inflight")
    assert.are.equal(50000, #p.results)
  end)

  it("stay at max_inflight when it is below 256", function()
    local p = slow_start({ max_inflight = 100 })
    finally(function() p:stop() end)
    for i = 1, 20000 do p(i) end
    local most = most_held(p, 20000)
    assert.is_true(most <= 2 * 100, "the workers held " .. most .. " calls, above max_inflight")
    assert.are.equal(20000, #p.results)
  end)

  it("stay at 256 a worker when calls come no faster than the workers take them: a stream's "
    .. "window of 512, also after a backlog", function()
    local p = slow_start()
    finally(function() p:stop() end)
    for i = 1, 50000 do p(i) end
    assert.is_true(most_held(p, 50000) > 2 * 256)
    core.sleep(0.1) -- the calm the depth waits for before it goes back (50 ms)
    local src = {}
    for i = 1, 50000 do src[i] = i + 2 end
    local most, k = 0, 0
    for _, ok in p:stream(src, { max_pending = 512 }) do
      assert.is_true(ok)
      k = k + 1
      -- The backlog's depth goes as the queue empties: a few turns.
      if k > 5000 and k % 64 == 0 then
        local running = p:stats().running
        if running > most then most = running end
      end
    end
    assert.are.equal(50000, k)
    assert.is_true(most <= 2 * 256, "the workers held " .. most .. " of the stream's calls")
  end)
end)

describe("p:stream's default window", function()
  --- The most inputs a stream of n read from its source ahead of its loop,
  -- whose body takes about 2 us, slower than the workers: the window and
  -- four times it bound how far ahead it reads.
  local function read_ahead(p, n, make)
    local read, k, most = 0, 0, 0
    local function src()
      if read == n then return nil end
      read = read + 1
      return make(read)
    end
    for _, ok in p:stream(src) do
      assert.is_true(ok)
      k = k + 1
      if read - k > most then most = read - k end
      local t = os.clock() + 2e-6
      while os.clock() < t do end
    end
    assert.are.equal(n, k)
    return most
  end

  it("widens for results that are numbers, not for tables", function()
    local p = Parallelize(rep(function(x) return x end, 2))
    finally(function() p:stop() end)
    local narrow = 4 * 256 * 2 -- four times 256 a worker
    local numbers = read_ahead(p, 20000, function(i) return i end)
    assert.is_true(numbers > narrow, "a stream of numbers read only " .. numbers .. " ahead")
    local tables = read_ahead(p, 20000, function(i) return { i } end)
    assert.is_true(tables <= narrow, "a stream of tables read " .. tables .. " ahead")
  end)
end)

describe("a failed map's position", function()
  -- error(msg, level) puts "chunk:0: " before msg for a function without
  -- line information (stripped bytecode: luajit -b, string.dump(f, true));
  -- the map's message, made before its item is marked reported, must too.
  it("is error()'s for stripped bytecode, in one go and in chunks", function()
    for _, opts in ipairs({ { workers = 2 }, { workers = 2, timeout = 100 } }) do
      local p = Parallelize(function(x) if x == 2 then error("boom") end return x end, opts)
      finally(function() p:stop() end)
      local chunk = load(string.dump(function(pool)
        local r = pool:map({ 1, 2, 3 })
        return r
      end, true), "=stripped")
      local ok, err = pcall(coroutine.wrap(chunk), p)
      assert.is_false(ok)
      local ok2, want = pcall(coroutine.wrap(load(string.dump(function() error("x", 1) end, true), "=stripped")))
      assert.is_false(ok2)
      assert.are.equal(want:match("^stripped:%d+: "), err:match("^stripped:%d+: "))
      assert.matches("^stripped:0: map: item 2 failed", err)
      p:stop()
    end
  end)
end)

local upvalue, with_upvalue = support.upvalue, support.with_upvalue

describe("a map short of memory for its failed item's message", function()
  -- (unchunked: a chunked map makes the message in its work, protected)
  it("says whose lack of memory it was and leaves every call in the store", function()
    local p = Parallelize(function(x) if x >= 2 then error("bad " .. x) end return x end,
      { workers = 2, timeout = 100 })
    finally(function() p:stop() end)
    local ok, err = with_upvalue(require("parallelize.pool").map, "item_failed",
      function() error("not enough memory", 0) end, function() return pcall(p.map, p, { 1, 2, 3, 4 }) end)
    assert.is_false(ok)
    assert.matches("^map: not enough memory", tostring(err))
    assert.is_true(p:wait(10))
    local results, _, errors = p:take()
    assert.are.equal(4, #results + #errors) -- (before: 0, all in the map's claim until stop)
  end)
end)

describe("a map's release", function()
  local function release_now()
    return upvalue(upvalue(require("parallelize.pool").map, "release"), "release_now")
  end

  -- Short of memory the release is left to stop; any other error there is
  -- a fault, and a map that swallowed it left calls in no place (in its
  -- claim, not in p.results or p.errors after a wait) without a word.
  it("raises a fault other than a lack of memory, in one go and in chunks", function()
    for _, opts in ipairs({ { workers = 2 }, { workers = 2, timeout = 100 } }) do
      for _, fail_at in ipairs({ 2, 99 }) do -- an item that fails, or none
        local p = Parallelize(function(x) if x >= fail_at then error("bad " .. x) end return x end, opts)
        finally(function() p:stop() end)
        local ok, err = with_upvalue(release_now(), "pool_release", function() error("a fault in release") end,
          function() return pcall(p.map, p, { 1, 2, 3, 4 }) end)
        assert.is_false(ok)
        assert.matches("a fault in release", tostring(err), 1, true)
        if fail_at == 2 then assert.matches("map: item %d failed: ", tostring(err)) end
        p:stop()
      end
    end
  end)

  -- The claim's move to the store stopped after its tag was released; the
  -- next wait or take finishes it (before, what it held waited for stop).
  it("stopped halfway by a lack of memory, has its calls in the store by the next wait and take", function()
    local release = release_now()
    local real_release, real_env = upvalue(release, "pool_release"), upvalue(release, "pool_env")
    for _, opts in ipairs({ { workers = 2, timeout = 100 }, { workers = 2 } }) do
      local p = Parallelize(function(x) if x >= 2 then error("bad " .. x) end return x end, opts)
      finally(function() p:stop() end)
      local armed = false
      local function tag_released(...) real_release(...) armed = true end
      local function env_then_short(...)
        if armed then
          armed = false
          error("not enough memory", 0)
        end
        return real_env(...)
      end
      local ok, err = with_upvalue(release, "pool_release", tag_released, function()
        return with_upvalue(release, "pool_env", env_then_short, function() return pcall(p.map, p, { 1, 2, 3, 4 }) end)
      end)
      assert.is_false(ok)
      assert.matches("map: item %d failed", tostring(err))
      -- p:result finishes the move too: no call "belongs to a map" now.
      local handed = 0
      for id = 1, p.calls do
        local got, outcome = pcall(p.result, p, id, 10)
        if got then
          handed = handed + 1
        else
          assert.matches("was handed out already", tostring(outcome))
        end
      end
      assert.is_true(p:wait(10))
      local results, _, errors = p:take()
      assert.are.equal(3, handed) -- and the one in the map's error
      assert.are.equal(3, #results + #errors) -- (kept: keep_results)
      assert.are.equal(0, #p:stop())
    end
  end)
end)
