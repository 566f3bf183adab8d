-- Faults: killed and crashing workers, poison inputs, failing
-- initialization, stuck workers, huge and hostile messages, and what is
-- left behind afterwards. Ctrl-C and a dying parent are in
-- signals_spec.lua; the long chaos run in chaos_spec.lua.
local parallelize = require "parallelize"
local core = require "parallelize.core"
local support = require "spec.support"

local Parallelize, Deferred, rep = parallelize.Parallelize, parallelize.Deferred, parallelize.rep

local SIGKILL = 9

--- Checks that every call 1..n has exactly one result or error.
local function assert_each_once(p, n, aborted)
  local seen = {}
  local function see(id, what)
    assert.is_nil(seen[id], "call " .. id .. " seen twice (" .. what .. ")")
    seen[id] = true
  end
  for _, id in ipairs(p.ids) do see(id, "result") end
  for _, e in ipairs(p.errors) do see(e.id, "error") end
  for _, a in ipairs(aborted or {}) do see(a.id, "aborted") end
  for i = 1, n do assert.is_true(seen[i], "call " .. i .. " lost") end
end

-- An executor that dies, the way `how` says, the first time it sees each
-- value listed in `die_on` (a marker file per value remembers), or every
-- time when `always` is set.
local function crasher(how, dir, die_on, always)
  return function(x)
    if die_on[x] then
      local marker = dir .. "/" .. x
      local f = io.open(marker, "r")
      if always or not f then
        if f then f:close() end
        f = io.open(marker, "w")
        f:close()
        if how == "kill" then
          local ffi = require "ffi"
          pcall(ffi.cdef, "int kill(int pid, int sig); int getpid(void);")
          ffi.C.kill(ffi.C.getpid(), 9)
        elseif how == "segv" then
          local ffi = require "ffi"
          return ffi.cast("int *", 0)[0]
        elseif how == "exit" then
          os.exit(7)
        end
      end
      if f then f:close() end
    end
    return x * 10
  end
end

describe("a worker that dies", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(function() support.rmdir(dir) end)

  for _, how in ipairs({ "kill", "segv", "exit" }) do
    it("(" .. how .. ") loses nothing and is replaced", function()
      local p = Parallelize(rep(crasher(how, dir, { [5] = true, [17] = true }), 3))
      finally(function() p:stop() end)
      local _ = p.executors
      local before = p.pids
      for i = 1, 40 do p(i) end
      assert.is_true(p:wait(30))
      assert.are.equal(40, #p.results)
      assert.are.equal(0, #p.errors)
      assert_each_once(p, 40)
      for i, id in ipairs(p.ids) do assert.are.equal(id * 10, p.results[i]) end
      -- two workers were replaced: new pids (once the replacements have
      -- started), and the old ones are gone
      local function replaced()
        local after, n = p.pids, 0
        for slot = 1, 3 do
          if after[slot] ~= before[slot] then
            n = n + 1
            assert.is_false(support.alive(before[slot]))
          end
        end
        return n == 2
      end
      assert.is_true(support.eventually(replaced, 10))
      assert.are.equal(3, #p.executors)
    end)
  end

  it("that keeps dying on one input makes that input an error (max_deaths)", function()
    local p = Parallelize(rep(crasher("segv", dir, { [3] = true }, true), 2))
    finally(function() p:stop() end)
    for i = 1, 10 do p(i) end
    assert.is_true(p:wait(30))
    assert.are.equal(9, #p.results)
    assert.are.equal(1, #p.errors)
    local e = p.errors[1]
    assert.are.equal(3, e.id)
    assert.are.same({ n = 1, 3 }, e.args)
    assert.matches("^call 3 killed 3 workers %(max_deaths = 3%); the last: worker %d %(pid %d+%) "
      .. "killed by signal 11 while running call 3$", e.message)
    assert_each_once(p, 10)
  end)

  it("reports how it ended (os.exit) and honours max_deaths", function()
    local p = Parallelize({ crasher("exit", dir, { [2] = true }, true) }, { max_deaths = 2 })
    finally(function() p:stop() end)
    for i = 1, 4 do p(i) end
    assert.is_true(p:wait(30))
    assert.are.equal(3, #p.results)
    assert.matches("killed 2 workers %(max_deaths = 2%).* exited with status 7 while running call 2$",
      p.errors[1].message)
  end)

  it("charges only the running call, not the calls queued behind it", function()
    -- Tiny calls pile up in the worker; the one that kills it is charged.
    local p = Parallelize({ crasher("kill", dir, { [50] = true }, true) }, { max_deaths = 2 })
    finally(function() p:stop() end)
    for i = 1, 200 do p(i) end
    assert.is_true(p:wait(30))
    assert.are.equal(199, #p.results)
    assert.are.equal(1, #p.errors)
    assert.are.equal(50, p.errors[1].id)
    assert_each_once(p, 200)
  end)

  it("after a call that broke it is charged with its death, though it died between calls", function()
    -- Call 30 closes the worker's descriptors and returns: the worker dies
    -- writing results (or reading calls), named by no call. Its worker
    -- then gets one call at a time until one is answered, so that a second
    -- such death is the call's: 30 fails after max_deaths, the rest run,
    -- and the pool does not start workers without end.
    local p = Parallelize(rep(function(x)
      if x == 30 then
        local ffi = require "ffi"
        pcall(ffi.cdef, "int close(int fd);")
        for fd = 3, 64 do ffi.C.close(fd) end
      end
      return x * 10
    end, 2))
    finally(function() p:stop(0) end)
    for i = 1, 100 do p(i) end
    assert.is_true(p:wait(30))
    assert.are.equal(99, #p.results)
    assert.are.equal(1, #p.errors)
    local e = p.errors[1]
    assert.are.equal(30, e.id)
    assert.are.equal("killer", e.kind)
    assert.matches("^call 30 killed 3 workers %(max_deaths = 3%); the last: worker %d %(pid %d+%) "
      .. "exited with status 3 after running call 30$", e.message)
    -- a death that was nobody's, then one of its own, at most three times
    assert.is_true(p:stats().deaths <= 6, p:stats().deaths .. " deaths")
    assert_each_once(p, 100)
  end)

  it("after a call that broke it: the suspects wait for an empty worker without stalling the pool", function()
    -- The other worker is busy with a long call when the suspect comes
    -- back: it waits until a worker holds nothing. The I/O thread once
    -- went round without sleeping meanwhile, holding its lock: nothing
    -- was read again, and wait(8) timed out in 3 runs of 4.
    local p = Parallelize(rep(function(x)
      if x == "poison" then
        local ffi = require "ffi"
        pcall(ffi.cdef, "int close(int fd);")
        for fd = 3, 64 do ffi.C.close(fd) end
      elseif x == "long" then
        parallelize.sleep(0.5)
      end
      return x
    end, 2))
    finally(function() p:stop(0) end)
    for i = 1, 20 do p(i) end
    assert.is_true(p:wait(10))
    local t0 = core.now()
    local long, poison = p("long"), p("poison")
    assert.is_true(p:wait(8))
    assert.is_true(core.now() - t0 < 5)
    assert.are.same({ true, "long" }, { p:result(long) })
    local ok, err = p:result(poison)
    assert.is_false(ok)
    assert.are.equal("killer", err.kind)
    assert.is_table(p:stats()) -- the I/O lock is free
  end)

  it("is not replaced with respawn = false; the pool shrinks, then fails", function()
    local p = Parallelize(rep(crasher("exit", dir, { [1] = true }, true), 2), { respawn = false })
    finally(function() p:stop() end)
    local _ = p.executors
    p(1)
    -- the first worker dies on 1; 1 is retried on the other, which dies too
    local ok, err = pcall(p.wait, p, 30)
    assert.is_false(ok)
    assert.matches("no worker is left and none can be started: worker %d %(pid %d+%) exited with status 7; "
      .. "not replaced %(respawn = false%)", err)
    local aborted = p:stop()
    assert.are.equal(1, #aborted)
  end)

  it("goes on with the workers left when respawn = false", function()
    local p = Parallelize(rep(crasher("exit", dir, { [1] = true }), 3), { respawn = false })
    finally(function() p:stop() end)
    local _ = p.executors
    for i = 1, 30 do p(i) end
    assert.is_true(p:wait(30))
    assert.are.equal(30, #p.results)
    local alive = 0
    for _, pid in pairs(p.pids) do
      if support.alive(pid) then alive = alive + 1 end
    end
    assert.are.equal(2, alive)
  end)
end)

-- A lone call on an idle pool is sent by the main thread, which reads its
-- answer on the worker's socket itself (ioloop.c, "lending"); the I/O
-- thread takes the worker back on the next call, or when it dies.
describe("a lone call", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(function() support.rmdir(dir) end)

  for _, how in ipairs({ "kill", "segv", "exit" }) do
    it("whose worker dies (" .. how .. ") is run again", function()
      local p = Parallelize(rep(crasher(how, dir, { [2] = true, [4] = true }), 2))
      finally(function() p:stop() end)
      local _ = p.executors
      for i = 1, 6 do
        p(i)
        assert.is_true(p:wait(30))
        assert.are.equal(i, #p.results)
        assert.are.equal(i * 10, p.results[i])
      end
      assert_each_once(p, 6)
    end)
  end

  it("whose worker dies while nobody waits is run again", function()
    local p = Parallelize(rep(crasher("kill", dir, { [1] = true }), 2))
    finally(function() p:stop() end)
    local _ = p.executors
    p(1)
    core.sleep(0.3)
    assert.is_true(p:wait(30))
    assert.are.same({ 10 }, p.results)
  end)

  it("that always kills its worker becomes an error", function()
    local p = Parallelize(rep(crasher("kill", dir, { [1] = true }, true), 2))
    finally(function() p:stop() end)
    local _ = p.executors
    p(1)
    assert.is_true(p:wait(30))
    assert.are.equal(0, #p.results)
    assert.matches("^call 1 killed 3 workers", p.errors[1].message)
  end)

  it("shows up in p.results without a wait", function()
    local p = Parallelize(rep(function(x) return x + 1 end, 2))
    finally(function() p:stop() end)
    local _ = p.executors
    p(41)
    assert.is_true(support.eventually(function() return #p.results == 1 end, 10))
    assert.are.same({ 42 }, p.results)
    assert.are.equal(0, p.pending)
  end)

  it("does not keep its worker from the calls that follow", function()
    local p = Parallelize(rep(function()
      parallelize.sleep(0.02)
      return parallelize.getpid()
    end, 2))
    finally(function() p:stop() end)
    local _ = p.executors
    p()
    core.sleep(0.05) -- the lone call is answered; nobody has read it yet
    for _ = 2, 20 do p() end
    assert.is_true(p:wait(30))
    local first, others = p.results[1], {}
    for i = 2, 20 do others[p.results[i]] = true end
    assert.is_true(others[first], "the first call's worker got none of the 19 calls after it")
    assert.are.equal(2, #p.pids)
  end)

  it("leaves its worker to the I/O thread afterwards, even when no other is left", function()
    -- While the lone call runs, the other worker dies for good: the I/O
    -- thread then has no worker it may feed. Once the answer is read, the
    -- next call must still reach the first worker.
    local p = Parallelize(rep(function(seconds)
      local f = io.open(dir .. "/running", "w")
      f:write(parallelize.getpid())
      f:close()
      parallelize.sleep(seconds)
      return seconds
    end, 2), { respawn = false })
    finally(function() p:stop(0) end)
    local _ = p.executors
    local pids = p.pids
    assert.are.equal(2, #pids)
    p(0.5)
    local running
    assert.is_true(support.eventually(function()
      running = tonumber(support.read(dir .. "/running") or "")
      return running ~= nil
    end, 10))
    local other = running == pids[1] and pids[2] or pids[1]
    assert.is_true(support.kill(other, SIGKILL))
    assert.is_true(support.eventually(function() return not support.alive(other) end, 10))
    -- the I/O thread has handled the death
    assert.is_true(support.eventually(function() return p:stats().deaths == 1 end, 10))
    assert.is_true(p:wait(10))
    p(0)
    assert.is_true(p:wait(5), "the call after the lone one was never sent")
    assert.are.same({ 0.5, 0 }, p.results)
  end)

  it("running when stop is called is waited for, or aborted by stop(0)", function()
    local fds = support.fd_count()
    local p = Parallelize(rep(function(x)
      parallelize.sleep(0.2)
      return x
    end, 2))
    local _ = p.executors
    p(1)
    -- held by its worker, not merely queued: stop lets it finish
    assert.is_true(support.eventually(function() return p:stats().running == 1 end, 10))
    local aborted = p:stop()
    assert.are.same({}, aborted)
    assert.are.same({ 1 }, p.results)
    p = Parallelize(rep(function(x)
      parallelize.sleep(30)
      return x
    end, 2))
    _ = p.executors
    p(1)
    core.sleep(0.05)
    local t0 = core.now()
    aborted = p:stop(0)
    assert.is_true(core.now() - t0 < 5)
    assert.are.equal(1, #aborted)
    assert.are.equal(1, aborted[1].id)
    assert.are.same({ n = 1, 1 }, { n = aborted[1].n, aborted[1][1] })
    -- the lent socket went with the rest
    assert.are.equal(fds, support.fd_count())
    assert.are.same({}, support.children())
  end)
end)

describe("initialization that keeps failing", function()
  it("backs off, gives the slot up after init_attempts, and wait raises", function()
    local defer = support.defer(finally)
    local dir = support.tmpdir()
    defer(function() support.rmdir(dir) end)
    local log = dir .. "/attempts"
    local function ctor()
      local f = io.open(log, "a")
      f:write("x")
      f:close()
      os.exit(3)
    end
    local t0 = core.now()
    local p = Parallelize({ Deferred(ctor) }, { init_attempts = 4 })
    defer(function() p:stop() end)
    for i = 1, 5 do p(i) end
    local ok, err = pcall(p.wait, p)
    local elapsed = core.now() - t0
    assert.is_false(ok)
    assert.matches("worker 1 died during initialization 4 times; the last time, pid %d+ exited with status 3", err)
    assert.are.equal(4, #support.read(log))
    -- backed off 0.05 + 0.1 + 0.2 s between the attempts: not a tight loop
    assert.is_true(elapsed >= 0.3, "gave up after " .. elapsed .. " s")
    assert.are.equal(1, #p.init_errors)
    assert.are.equal(5, #p:stop())
  end)

  it("runs a Deferred constructor again in a replacement worker", function()
    local defer = support.defer(finally)
    local dir = support.tmpdir()
    defer(function() support.rmdir(dir) end)
    local log = dir .. "/ctor"
    local function ctor()
      local f = io.open(log, "a")
      f:write("c")
      f:close()
      return function(x)
        if x == 3 then os.exit(1) end
        return x
      end
    end
    local p = Parallelize({ Deferred(ctor) }, { max_deaths = 1 })
    defer(function() p:stop() end)
    for i = 1, 5 do p(i) end
    assert.is_true(p:wait(30))
    assert.are.equal(4, #p.results)
    assert.are.equal(1, #p.errors)
    assert.are.equal("cc", support.read(log))
  end)
end)

describe("found in review", function()
  -- The decoder once checked the stack as it entered the first table of
  -- a value, for more room than a tuple's count leaves: the last table of
  -- the longest tuples the encoder takes could not be decoded.
  it("decodes a call of as many arguments as p(...) takes, the last a table", function()
    local p = Parallelize(function(...) return select("#", ...), select(select("#", ...), ...)[1] end,
      { workers = 1 })
    finally(function() p:stop() end)
    local n, id = 7990, nil -- (unpack stops at 7999)
    local args = {}
    repeat
      n = n - 1
      for i = 1, n - 1 do args[i] = i end
      args[n] = { "last" }
      local ok, got = pcall(p, unpack(args, 1, n))
      if ok then id = got else assert.matches("stack overflow", got) end
    until id or n < 7000
    assert(id, "no tuple of 7000 to 7990 arguments could be queued")
    local ok, count, last = p:result(id)
    assert.is_true(ok, type(count) == "table" and count.message or nil)
    assert.are.equal(n, count)
    assert.are.equal("last", last)
  end)

  it("stop(0) ends workers still starting, whose pid the spawner has not told yet", function()
    local p = Parallelize({ Deferred(function() while true do end end) }, { kill_grace = 0 })
    local t0 = core.now()
    p:stop(0)
    assert.is_true(core.now() - t0 < 2)
    assert.are.equal(0, #support.children())
  end)

  it("charges a call that kills its worker while its arguments are decoded", function()
    local defer = support.defer(finally)
    local dir = support.tmpdir()
    defer(function() support.rmdir(dir) end)
    -- a module that a worker (where busted is not loaded) cannot load
    -- without dying
    support.write(dir .. "/pz_spec_crashmod.lua", [[
      if not package.loaded.busted then os.exit(9) end
      return { f = function() return 1 end }
    ]])
    local saved = package.path
    package.path = dir .. "/?.lua;" .. package.path
    local m = require "pz_spec_crashmod"
    defer(function() package.path, package.loaded.pz_spec_crashmod = saved, nil end)
    local p = Parallelize({ function(x) return type(x) end })
    defer(function() p:stop() end)
    p(m.f)
    p(2)
    assert.is_true(p:wait(30))
    assert.are.same({ "number" }, p.results)
    assert.matches("^call 1 killed 3 workers .* exited with status 9 while running call 1$", p.errors[1].message)
  end)

  it("sends finished results before a long call starts", function()
    local p = Parallelize({ function(x)
      if x == "slow" then parallelize.sleep(2) elseif x == "mid" then parallelize.sleep(0.1) end
      return x
    end })
    finally(function() p:stop(0) end)
    p("mid")
    parallelize.sleep(0.01)
    p("fast")
    p("slow")
    assert.is_true(support.eventually(function() return #p.results == 2 end, 1.5))
    assert.are.same({ "mid", "fast" }, p.results)
  end)

  -- A script's start: every descriptor taken, by the files in `files`.
  local TAKE_EVERY_FD = [[
    local parallelize = require "parallelize"
    local files = {}
    while true do
      local f = io.open("/dev/null")
      if not f then break end
      files[#files + 1] = f
    end
  ]]

  it("retries, then gives up, when no descriptor is left to start a worker", function()
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    support.write(dir .. "/fds.lua", TAKE_EVERY_FD .. [[
      for _ = 1, 5 do table.remove(files):close() end
      local p = parallelize.Parallelize({ function(x) return x end }, { init_attempts = 3 })
      p(1)
      local ok, err = pcall(p.wait, p)
      print(ok, err)
      for _, f in ipairs(files) do f:close() end
      print(#p:stop())
    ]])
    local out, status = support.run("ulimit -n 64; timeout 30 " .. support.quote(support.pzlua()) .. " "
      .. support.quote(dir .. "/fds.lua"))
    assert.are.equal(0, status, out)
    assert.matches("false\t[^\n]*no worker is left and none can be started: worker 1 could not be started: "
      .. "socketpair: Too many open files\n1\n$", out)
  end)

  it("says why when its spawner cannot start: on stderr, and in each slot's init error", function()
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    -- Every descriptor taken, then freed one at a time until the pool can
    -- be made: the first pool made has a spawner whose descriptor table is
    -- full, which cannot open /dev/null for its stdin.
    support.write(dir .. "/spawner.lua", TAKE_EVERY_FD .. [[
      local ok, p
      repeat
        table.remove(files):close()
        ok, p = pcall(parallelize.Parallelize, function(x) return x end, { workers = 3 })
      until ok
      print("executors", #p.executors)
      for _, e in ipairs(p.init_errors) do print("init error", e.worker, e.message) end
      for _, f in ipairs(files) do f:close() end
      print("aborted", #p:stop())
      os.exit(0, true)
    ]])
    local out, status = support.run("ulimit -n 64; timeout 30 " .. support.quote(support.pzlua()) .. " "
      .. support.quote(dir .. "/spawner.lua"))
    assert.are.equal(0, status, out)
    assert.truthy(out:find("parallelize: the spawner process could not go on: open /dev/null: Too many open files\n",
      1, true), out)
    assert.truthy(out:find("executors\t0\n", 1, true), out)
    for w = 1, 3 do
      assert.truthy(out:find("init error\t" .. w .. "\tthe spawner process died before this worker initialized "
        .. "(it could not go on: open /dev/null: Too many open files)\n", 1, true), out)
    end
  end)
end)

describe("values the parent cannot decode", function()
  it("turn a result into that call's error, keeping an error's own message", function()
    local dir = support.tmpdir()
    local defer = support.defer(finally)
    defer(function() support.rmdir(dir) end)
    -- a module that loads in workers but not in the parent (where busted is)
    support.write(dir .. "/pz_spec_workeronly.lua", [[
      if package.loaded.busted then error("not in the parent") end
      return { name = "worker only" }
    ]])
    local saved = package.path
    package.path = dir .. "/?.lua;" .. package.path
    defer(function() package.path = saved end)
    local p = Parallelize({ function(x)
      if x == "module" then return require("pz_spec_workeronly") end
      if x == "raise" then error("it failed") end
      return x
    end })
    defer(function() p:stop() end)
    p("module")
    p("fine")
    assert.is_true(p:wait(10))
    assert.are.same({ "fine" }, p.results)
    assert.are.equal(1, p.errors[1].id)
    assert.matches("^the result of call 1 cannot be used in the parent: .*not in the parent", p.errors[1].message)
  end)

  it("keep an error whose arguments name a module the parent dropped", function()
    local dir = support.tmpdir()
    local defer = support.defer(finally)
    defer(function() support.rmdir(dir) end)
    support.write(dir .. "/pz_spec_dropped.lua", "return { f = function() end }\n")
    local saved = package.path
    package.path = dir .. "/?.lua;" .. package.path
    local m = require "pz_spec_dropped"
    defer(function() package.path, package.loaded.pz_spec_dropped = saved, nil end)
    local p = Parallelize({ function() parallelize.sleep(0.2); error("it failed") end })
    defer(function() p:stop() end)
    p(m.f)
    -- the worker still finds the module; the parent no longer does
    package.loaded.pz_spec_dropped, package.path = nil, saved
    assert.is_true(p:wait(10))
    local e = p.errors[1]
    assert.are.equal(1, e.id)
    assert.are.equal(0, e.args.n)
    assert.matches("it failed %(its arguments cannot be decoded in the parent: .*pz_spec_dropped", e.message)
    assert.matches("stack traceback", e.traceback, 1, true)
  end)
end)

describe("stop with a finish_timeout", function()
  it("terminates a worker stuck in an endless loop, and reaps it", function()
    local p = Parallelize({ function(x)
      if x == 1 then while true do end end
      return x
    end })
    local _ = p.executors
    local pid = p.pids[1]
    p(1)
    p(2)
    parallelize.sleep(0.1)
    local t0 = core.now()
    local aborted = p:stop(0.5)
    local elapsed = core.now() - t0
    assert.is_true(elapsed >= 0.45 and elapsed < 2, "stop took " .. elapsed)
    assert.are.equal(2, #aborted)
    assert.is_false(support.alive(pid))
    assert.are.equal(0, #support.children())
  end)

  it("kills a worker that ignores SIGTERM after kill_grace", function()
    local p = Parallelize({ function()
      local ffi = require "ffi"
      pcall(ffi.cdef, "typedef void (*pz_sighandler)(int); pz_sighandler signal(int sig, pz_sighandler h);")
      ffi.C.signal(15, ffi.cast("pz_sighandler", 1)) -- SIG_IGN
      while true do end
    end }, { kill_grace = 0.3 })
    local _ = p.executors
    local pid = p.pids[1]
    p()
    parallelize.sleep(0.1)
    local t0 = core.now()
    local aborted = p:stop(0.2)
    local elapsed = core.now() - t0
    assert.is_true(elapsed >= 0.45 and elapsed < 2.5, "stop took " .. elapsed)
    assert.are.equal(1, #aborted)
    assert.is_false(support.alive(pid))
  end)

  it("terminates a worker whose call closed its flusher's descriptors, without waiting for kill_grace", function()
    -- SIGTERM's handler wakes the flusher through an eventfd; with that
    -- closed it woke nobody, and the worker ran on until SIGKILL. With the
    -- timerfd alone closed, the flusher woken by SIGTERM once saw the
    -- closed one first and stopped, the signal spent. (In a process of its
    -- own: under busted the flusher happened to see the closed descriptors
    -- before the signal came, which hid it.)
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    support.write(dir .. "/t.lua", [[
      local parallelize = require "parallelize"
      local which = arg[1]
      local p = parallelize.Parallelize(function(seconds)
        local ffi = require "ffi"
        pcall(ffi.cdef, "int close(int fd); long readlink(const char *path, char *buf, size_t len);")
        local buf = ffi.new("char[256]")
        for fd = 3, 1023 do
          local n = tonumber(ffi.C.readlink("/proc/self/fd/" .. fd, buf, 255))
          local target = n > 0 and ffi.string(buf, n) or ""
          if which:find(target:match("%[(%a+)%]") or "-", 1, true) then ffi.C.close(fd) end
        end
        parallelize.sleep(seconds)
        return seconds
      end, { workers = 1, kill_grace = 5 })
      p(30)
      parallelize.sleep(0.2)
      local now = require("parallelize.core").now
      local t0 = now()
      local aborted = p:stop(0.2)
      print(string.format("stop=%.3f aborted=%d", now() - t0, #aborted))
    ]])
    for _, which in ipairs({ "eventfd,timerfd", "timerfd", "eventfd" }) do
      local out, status = support.run("timeout 30 " .. support.quote(support.pzlua()) .. " " .. dir .. "/t.lua "
        .. which)
      assert.are.equal(0, status, out)
      local took, aborted = out:match("stop=([%d.]+) aborted=(%d+)")
      assert.are.equal("1", aborted, out)
      assert.is_true(tonumber(took) < 2, which .. " closed: stop took " .. tostring(took))
    end
  end)

  it("lets running calls finish when they are quick enough", function()
    local p = Parallelize(rep(function(x) parallelize.sleep(0.2); return x end, 2))
    local _ = p.executors
    p(1)
    p(2)
    assert.is_true(support.eventually(function() return p:stats().running == 2 end, 10))
    local aborted = p:stop(5)
    assert.are.equal(0, #aborted)
    assert.are.equal(2, #p.results)
  end)
end)

describe("messages", function()
  it("carry a 100 MB argument and a 100 MB result", function()
    local p = Parallelize({ function(s, n)
      if s then return #s, s:sub(1, 3) end
      return string.rep("y", n)
    end })
    finally(function() p:stop() end)
    local big = string.rep("x", 100 * 1024 * 1024)
    p(big)
    p(nil, 100 * 1024 * 1024)
    big = nil -- luacheck: ignore 311
    assert.is_true(p:wait(120))
    assert.are.equal(0, #p.errors)
    local sizes = {}
    for i, r in ipairs(p.results) do sizes[p.ids[i]] = type(r) == "string" and -#r or r end
    assert.are.equal(100 * 1024 * 1024, sizes[1])
    assert.are.equal(-100 * 1024 * 1024, sizes[2])
  end)

  it("above max_message fail with a clear error, and the pool goes on", function()
    local p = Parallelize({ function(n) return string.rep("z", n) end }, { max_message = 4096 })
    finally(function() p:stop() end)
    local ok, err = pcall(p, string.rep("a", 5000))
    assert.is_false(ok)
    assert.matches("cannot queue the call: its arguments are 500%d bytes encoded, above max_message %(4096%)", err)
    p(10000)
    p(10)
    assert.is_true(p:wait(10))
    assert.are.equal(1, #p.results)
    assert.are.equal(string.rep("z", 10), p.results[1])
    assert.matches("^the result of call 1 is 100%d%d bytes, above max_message %(4096%)$", p.errors[1].message)
  end)

  it("turns a result that cannot be encoded into that call's error", function()
    local p = Parallelize({ function(kind)
      if kind == "co" then return { co = coroutine.create(print) } end
      if kind == "ud" then return io.stdout end
      return parallelize.getpid()
    end })
    finally(function() p:stop() end)
    p("co")
    p("ud")
    p("pid")
    assert.is_true(p:wait(10))
    assert.are.equal(2, #p.errors)
    local byid = {}
    for _, e in ipairs(p.errors) do byid[e.id] = e.message end
    assert.are.equal("call 1: cannot encode a thread at result[1].co", byid[1])
    assert.are.equal("call 2: cannot encode a userdata at result[1]", byid[2])
    assert.are.equal(p.pids[1], p.results[1])
  end)

  it("kills a worker that writes garbage to its socket, not the parent", function()
    local p = Parallelize({ function(x)
      if x == 2 then
        local ffi = require "ffi"
        pcall(ffi.cdef, "long write(int fd, const void *buf, unsigned long n);")
        local junk = string.rep("\255", 64)
        ffi.C.write(3, junk, #junk)
        parallelize.sleep(5)
      end
      return x
    end }, { max_deaths = 1 })
    finally(function() p:stop() end)
    for i = 1, 4 do p(i) end
    assert.is_true(p:wait(30))
    assert.are.equal(3, #p.results)
    assert.are.equal(1, #p.errors)
    assert.matches("^call 2 killed 1 worker %(max_deaths = 1%); the last: worker 1 %(pid %d+%) was killed "
      .. "after it sent a malformed frame %(unknown frame type%) while running call 2$", p.errors[1].message)
  end)
end)

describe("after stop", function()
  it("no descriptor, process or thread is left", function()
    local function threads() return #support.list("/proc/self/task") end
    local fds, kids, nthreads = support.fd_count(), #support.children(), threads()
    local p = Parallelize(rep(function(x) return x end, 4))
    assert.are.equal(nthreads + 1, threads())
    for i = 1, 100 do p(i) end
    p:wait()
    local pids = p.pids
    p:stop()
    assert.are.equal(fds, support.fd_count())
    assert.are.equal(kids, #support.children())
    assert.are.equal(nthreads, threads())
    for _, pid in pairs(pids) do assert.is_false(support.alive(pid)) end
  end)

  it("stats count no call pending or running: those are in the aborted list", function()
    -- A worker killed with calls in hand: they are requeued, and with no
    -- replacement (respawn = false) they wait there until stop aborts
    -- them. The requeued frames stay on the I/O side after the stop (a
    -- stop tried again must find them), and stats counted them as pending.
    local p = Parallelize(function(s) parallelize.sleep(s) return s end,
      { workers = 1, respawn = false, quiet = true })
    for _ = 1, 5 do p(0.2) end
    assert.is_true(support.eventually(function() return p:stats().running > 0 end, 10))
    local pid = assert(p.pids[1])
    assert.is_true(support.kill(pid, SIGKILL))
    assert.is_true(support.eventually(function() return p:stats().deaths == 1 end, 10))
    assert.are.equal(5, p:stats().pending)
    local aborted = p:stop()
    assert.are.equal(5, #aborted)
    local st = p:stats()
    assert.are.equal(0, st.pending)
    assert.are.equal(0, st.running)
    assert.are.equal(5, st.aborted)
    assert.are.equal(st.calls, st.done + st.failed + st.aborted)
  end)

  it("stats count no call retrying: one stopped before it ran again is aborted", function()
    local p = Parallelize(function(x)
      parallelize.sleep(0.1)
      error("boom " .. x)
    end, { workers = 1, retries = 3, quiet = true })
    p(1)
    p(2)
    assert.is_true(support.eventually(function() return p:stats().retries >= 1 end, 10))
    local aborted = p:stop(0)
    assert.are.equal(2, #aborted)
    local st = p:stats()
    assert.are.equal(0, st.retrying)
    assert.are.equal(0, st.pending)
    assert.are.equal(2, st.aborted)
  end)
end)

describe("respawning", function()
  it("does not deadlock while the main thread prints, requires and allocates", function()
    local defer = support.defer(finally)
    local sink = assert(io.open("/dev/null", "w"))
    defer(function() sink:close() end)
    local p = Parallelize(rep(function(x) parallelize.sleep(0.001); return x end, 4))
    defer(function() p:stop() end)
    local _ = p.executors
    local n = 2000
    for i = 1, n do p(i) end
    local deadline, kills, spawner = core.now() + 60, 0, support.children()
    while p.pending > 0 and core.now() < deadline do
      for _ = 1, 200 do
        sink:write(("line %d %s\n"):format(kills, string.rep("x", 100)))
        -- a C module: dlopen takes the dynamic loader's lock
        package.loaded.cjson = nil
        pcall(require, "cjson")
        local t = {}
        for k = 1, 100 do t[k] = { k } end
        assert(#t == 100)
      end
      sink:flush()
      -- kill a worker that is still a child of our spawner
      local pids = p.pids
      local pid = pids[math.random(1, 4)]
      local kids = support.children(spawner[1])
      for _, k in ipairs(kids) do
        if k == pid then
          support.kill(pid, SIGKILL)
          kills = kills + 1
          break
        end
      end
      parallelize.sleep(0.002)
    end
    assert.is_true(p:wait(30))
    assert.is_true(kills > 5, "only " .. kills .. " kills")
    assert.are.equal(n, #p.results + #p.errors)
    assert_each_once(p, n)
  end)
end)
