-- Workers beyond the parent's machine: launchers (a command that runs
-- `pzlua --worker` somewhere, its stdin and stdout connected back), ssh and
-- Slurm's srun, each against real servers (spec/servers.lua): sshd on
-- 127.0.0.1, a one-node Slurm, sshd in a network namespace whose link is
-- cut. Nothing is mocked.
--
-- The first group needs no server (the launcher runs pzlua --worker on this
-- machine, or through a pipe the test can break) and runs under the
-- sanitizers too. The server tests need root and the servers' programs:
-- without them each reports itself skipped with the reason; they are
-- tagged nosan (the sanitizer pass would only slow down sshd and Slurm).
local parallelize = require "parallelize"
local core = require "parallelize.core"
local bit = require "bit"
local chaos = require "spec.chaos"
local servers = require "spec.servers"
local support = require "spec.support"

local Parallelize = parallelize.Parallelize
local SIGINT, SIGKILL = 2, 9
local PZLUA = support.pzlua()
local ROOT = io.popen("pwd"):read("*l")
local HOST = (support.read("/proc/sys/kernel/hostname") or "?"):match("^%S+")

-- Script parts for the tests of a socket as the parent's stderr: the
-- first makes one (sv[1] as fd 2; sv[0] the test's end) and defines
-- launcher_lines(want [, seconds]), which reads what came through it for
-- up to `seconds` (5) until `want` lines the launchers wrote ("said-by-the-launcher") are
-- there, and returns how many are; the second prints that for 2.
local SOCKET_AS_STDERR = [[
  local ffi = require "ffi"
  ffi.cdef "int socketpair(int, int, int, int *); int dup2(int, int); int kill(int, int);"
  ffi.cdef "long read(int, void *, unsigned long); int fcntl(int, int, ...);"
  local sv = ffi.new("int[2]")
  assert(ffi.C.socketpair(1, 1, 0, sv) == 0) -- AF_UNIX, SOCK_STREAM
  io.stderr:flush()
  assert(ffi.C.dup2(sv[1], 2) == 2)
  assert(ffi.C.fcntl(sv[0], 4, ffi.cast("long", 2048)) == 0) -- F_SETFL O_NONBLOCK (the test's end)
  local buf, got = ffi.new("char[65536]"), {}
  local function launcher_lines(want, seconds)
    local function count() return select(2, table.concat(got):gsub("said%-by%-the%-launcher", "")) end
    for _ = 1, (seconds or 5) * 100 do
      local n = tonumber(ffi.C.read(sv[0], buf, 65536))
      if n > 0 then got[#got + 1] = ffi.string(buf, n) end
      if count() >= want then break end
      require("parallelize").sleep(0.01)
    end
    return count()
  end
]]
local PRINT_LAUNCHER_LINES = [[
  print("launcher lines " .. launcher_lines(2))
]]

local function cmdline(pid)
  return ((support.read("/proc/" .. pid .. "/cmdline") or ""):gsub("%z", " "))
end

local concat = support.concat

-- The pool's spawner, a new child of this process after `before`.
local function new_child(before)
  for _, pid in ipairs(support.children()) do
    if not before[pid] then return pid end
  end
end

local function children_set()
  local set = {}
  for _, pid in ipairs(support.children()) do set[pid] = true end
  return set
end

-- Waits for every pid of the list to be gone; returns the ones still there.
local function gone(pids, seconds)
  local left
  support.eventually(function()
    left = {}
    for _, pid in ipairs(pids) do
      if support.alive(pid) then left[#left + 1] = pid .. " " .. cmdline(pid) end
    end
    return #left == 0
  end, seconds or 5)
  return left
end

-- The LuaJIT bytecode format as the handshake names it, worked out here
-- from string.dump's header (ESC L J, format, flags).
local function bytecode_tag()
  local d = string.dump(function() end)
  local flags = d:byte(5)
  return ("LJ%d %s%s"):format(d:byte(4), bit.band(flags, 1) ~= 0 and "be" or "le",
    bit.band(flags, 8) ~= 0 and " fr2" or "")
end

-- A frame as frame.h lays it out.
local function frame(ftype, id, payload)
  local function le(n, bytes)
    local t = {}
    for i = 1, bytes do
      t[i] = string.char(n % 256)
      n = math.floor(n / 256)
    end
    return table.concat(t)
  end
  -- length, type, deaths, tag, tries, flags and 3 reserved bytes, timeout_ms, id
  return le(#payload, 4) .. string.char(ftype, 0, 0, 0) .. le(0, 4) .. le(0, 4) .. le(id, 8) .. payload
end

local function short(s)
  return string.char(#s) .. s
end

-- Sends `payload` as an INIT frame to a `pzlua --worker` started with argv
-- (directly, or through ssh) and returns the message of the INIT_ERROR it
-- answers with, and the worker's exit code.
-- (Its input stays open until the answer is in: a worker whose input ends
-- is ended at once, whatever it has not read yet.)
local function init_error_of(argv, payload)
  local dir = support.tmpdir()
  local pid, to, from = servers.spawn(argv, { pipes = true, log = dir .. "/stderr" })
  assert(pid, to)
  assert(servers.write_all(to, frame(1, 0, payload)))
  local head, err = servers.read_exact(from, 24, 30)
  local body
  if head then body, err = servers.read_exact(from, head:byte(1) + 256 * head:byte(2), 10) end
  local done, status = servers.reap(pid, 10)
  servers.close(to)
  servers.close(from)
  local stderr = support.read(dir .. "/stderr") or ""
  support.rmdir(dir)
  assert(body, tostring(err) .. "; stderr: " .. stderr)
  assert.is_true(done, "the worker did not exit")
  assert.are.equal(3, head:byte(5), "not an INIT_ERROR frame")
  -- the message's length: a varint of one or two bytes here
  local n, at = body:byte(1), 1
  if n >= 128 then n, at = n - 128 + 128 * body:byte(2), 2 end
  return body:sub(at + 1, at + n), servers.exit_code(status)
end

describe("remote workers: launchers", function()
  describe("pzlua --worker", function()
    it("serves a pool through a launcher; what executors print goes to stderr, never into the protocol",
        function()
      local dir = support.tmpdir()
      finally(function() support.rmdir(dir) end)
      support.write(dir .. "/script.lua", ([[
        local parallelize = require "parallelize"
        local p = parallelize.Parallelize({
          function(x) print("printed by a call"); return x + 1 end,
          parallelize.Deferred(function(k)
            -- runs in its worker whatever calls it gets
            print("printed by a worker")
            io.write("\0\1\2 binary noise\n")
            return function(x) return x * k end
          end, 10),
          "string.upper",
        }, { launcher = function(slot) return { %q, "--worker" } end })
        for i = 1, 30 do p(i) end
        p:wait()
        local _ = p.executors -- every worker has started
        print("results " .. #p.results .. " errors " .. #p.errors .. " init " .. #p.init_errors)
        for _, e in ipairs(p.errors) do print(e.message) end
        print("aborted " .. #p:stop())
      ]]):format(PZLUA))
      local out, status = support.run(("(%s %s 2> %s)"):format(support.quote(PZLUA),
        support.quote(dir .. "/script.lua"), support.quote(dir .. "/stderr")))
      assert.are.equal(0, status, out)
      local stderr = support.read(dir .. "/stderr")
      assert.matches("^results 30 errors 0 init 0\naborted 0\n$", out)
      assert.matches("printed by a worker\n", stderr)
      assert.matches("binary noise\n", stderr)
    end)

    it("refuses a parent of another protocol or LuaJIT, naming both versions and its host", function()
      local mine = jit.version .. " (bytecode " .. bytecode_tag() .. ")"
      local msg, code = init_error_of({ PZLUA, "--worker" },
        "PZ\2" .. short("LuaJIT 2.1.9-other") .. short("LJ9 be") .. "rest not read")
      assert.are.equal(0, code)
      assert.are.equal("host " .. HOST .. ": version mismatch: the parent runs LuaJIT 2.1.9-other (bytecode "
        .. "LJ9 be), this worker " .. mine .. "; both speak parallelize protocol 2, but functions travel "
        .. "as LuaJIT bytecode, which needs the same LuaJIT on both sides", msg)

      msg = init_error_of({ PZLUA, "--worker" }, "PZ\9" .. short(jit.version) .. short(bytecode_tag()))
      assert.are.equal("host " .. HOST .. ": version mismatch: the parent speaks parallelize protocol 9, "
        .. "this worker protocol 2 (" .. jit.version .. ", bytecode " .. bytecode_tag() .. ")", msg)

      msg = init_error_of({ PZLUA, "--worker" }, "\20\0\0\0 an old INIT payload")
      assert.matches("^host " .. HOST:gsub("%p", "%%%0") .. ": the parent sent no version handshake", msg)
    end)

    it("is alone on its command line", function()
      local out, status = support.run(support.quote(PZLUA) .. " -e 'print(1)' --worker < /dev/null")
      assert.are.equal(1, status)
      assert.matches("'%-%-worker' takes no other argument\nusage: ", out)
    end)
  end)

  it("sends the parent's versions first in every INIT frame", function()
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    local capture = dir .. "/init"
    local p = Parallelize({ function() end }, {
      init_attempts = 1,
      launcher = function() return { "sh", "-c", "head -c 200 > " .. support.quote(capture) } end,
    })
    local _ = p.executors
    p:stop()
    local bytes = assert(support.read(capture))
    assert.are.equal(1, bytes:byte(5)) -- INIT
    local prefix = "PZ\2" .. short(jit.version) .. short(bytecode_tag())
    assert.are.equal(prefix, bytes:sub(25, 24 + #prefix)) -- after the 24-byte header
  end)

  it("says when a launcher cannot be run, after the back-off", function()
    local t0 = core.now()
    local p = Parallelize({ function() end }, {
      init_attempts = 2,
      launcher = function() return { "/nonexistent/pz-launcher", "--flag" } end,
    })
    p(1)
    local ok, err = pcall(p.wait, p)
    assert.is_false(ok)
    local why = "worker 1 could not be started (2 attempts); the last time, it could not run its launcher "
      .. "/nonexistent/pz-launcher (No such file or directory)"
    assert.are.equal("no worker is left and none can be started: " .. why, err:match("(no worker.*)$"))
    assert.are.equal(why, p.init_errors[1].message)
    assert.is_true(core.now() - t0 >= 0.05, "no back-off between the attempts")
    assert.are.equal(1, #p:stop())
  end)

  it("says when the remote shell cannot find pzlua", function()
    local p = Parallelize({ function() end }, {
      init_attempts = 1,
      launcher = function() return { "sh", "-c", "exec 2>/dev/null; /nonexistent/pzlua --worker" } end,
    })
    local _ = p.executors
    assert.matches("ended: its launcher sh exited with status 127 %(its command was not found there: is pzlua "
      .. "on the remote PATH%?%)$", p.init_errors[1] and p.init_errors[1].message or "no init error")
    assert.are.equal(0, #p:stop())
  end)

  -- A command that sends the worker's stdin or stdout elsewhere: closed,
  -- it wrote "writing results: Bad file descriptor" (stdout) or just "Bad
  -- file descriptor" (stdin); to /dev/null or a file, the pool waited for
  -- its first answer for ever.
  it("refuses a stdin or stdout that is not connected back (closed, /dev/null, a file), saying which", function()
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    for _, case in ipairs {
      { "exec >&-", "stdout is closed" },
      { "exec <&-", "stdin is closed" },
      { "exec >/dev/null", "stdout is a device %(/dev/null%?%)" },
      { "exec <" .. support.quote(dir .. "/input"), "stdin is a file" },
    } do
      support.write(dir .. "/input", "")
      local err = dir .. "/err"
      os.remove(err)
      local p = Parallelize({ function() end }, {
        init_attempts = 1,
        launcher = function()
          return { "sh", "-c", case[1] .. " 2>" .. support.quote(err) .. "; exec " .. support.quote(PZLUA)
            .. " --worker" }
        end,
      })
      p(1)
      local ok, why = pcall(p.wait, p, 10)
      assert.is_false(ok, case[1] .. ": the pool waited")
      assert.matches("worker 1 died during initialization 1 time; the last time, pid %d+ ended: its launcher sh "
        .. "exited with status 1$", why)
      assert.matches("^pzlua %-%-worker: its " .. case[2] .. ", not a link to the parent: the "
        .. "launcher must run it with its stdin and stdout connected back to the pool\n$", support.read(err) or "")
      assert.are.equal(1, #p:stop())
    end
  end)

  it("shows what came instead of a frame (a shell printing on stdout)", function()
    local p = Parallelize({ function() end }, {
      init_attempts = 1,
      launcher = function() return { "sh", "-c", "echo 'Welcome to node2'; exec " .. PZLUA .. " --worker" } end,
    })
    local _ = p.executors
    local msg = p.init_errors[1] and p.init_errors[1].message or "no init error"
    assert.matches('malformed frame %(unknown frame type: "Welcome to node2\\x0a', msg)
    assert.matches('"%.%.%.; does the remote shell print on stdout%?%)$', msg)
    p:stop()
  end)

  it("shows what a launcher wrote when it ends having written less than a frame's header", function()
    local p = Parallelize({ function() end }, {
      init_attempts = 1,
      launcher = function() return { "sh", "-c", "echo 'module: not found'; exit 1" } end,
    })
    local _ = p.executors
    local msg = p.init_errors[1] and p.init_errors[1].message or "no init error"
    assert.matches('ended: its launcher sh exited with status 1, having written "module: not found\\x0a" on its '
      .. "stdout$", msg)
    p:stop()
  end)

  it("refuses a greeting that reads as the header of a long frame, at once", function()
    -- Four bytes printed before the worker's INIT_OK make the parser see a
    -- frame whose length is those bytes ("hi!\n": 170 MB) and whose type is
    -- the INIT_OK's length: with a length of 2 to 8 modulo 256, a type
    -- that exists. The pool then waited for the 170 MB for ever (and
    -- reserved room for them). An executor's size is the user's, so one
    -- that hits is found here.
    local function executor(n)
      return setmetatable({ pad = ("x"):rep(n) }, { __call = function(_, x) return x end })
    end
    local n
    for k = 1, 600 do
      local len = #parallelize.encode(executor(k), { lossy = true })
      if len % 256 >= 2 and len % 256 <= 8 then
        n = k
        break
      end
    end
    assert(n, "no executor size gives a frame type")
    local p = Parallelize({ executor(n) }, {
      init_attempts = 1,
      launcher = function() return { "sh", "-c", "printf 'hi!\\n'; exec " .. PZLUA .. " --worker" } end,
    })
    finally(function() p:stop(0) end)
    p(1)
    local t0 = core.now()
    local ok, err = pcall(p.wait, p, 10)
    assert.is_false(ok, "the pool waited for a frame that will never come")
    assert.is_true(core.now() - t0 < 5)
    assert.matches('malformed frame %(not a worker\'s first answer: "hi!\\x0a', err)
    assert.matches("does the remote shell print on stdout%?%)$", err)
    assert.are.equal(1, #p:stop())
  end)

  it("recycles remote workers (max_calls), and names the launcher of a replacement that cannot be run", function()
    -- A slot's replacement is the slot's second record (io.h): its
    -- launcher was looked up by record, past the end of the pool's table
    -- of launchers (a crash of the parent as the first retired worker
    -- ended, or a garbage name).
    local dir = support.tmpdir()
    local defer = support.defer(finally) -- stops the pool, then removes dir
    defer(function() support.rmdir(dir) end)
    local script = dir .. "/launch.sh"
    support.write(script, "#!/bin/sh\nexec " .. support.quote(PZLUA) .. " --worker\n")
    assert.are.equal(0, select(2, support.run("chmod +x " .. support.quote(script))))
    local p = Parallelize(parallelize.rep(function(x) return x end, 2), {
      max_calls = 5, init_attempts = 1,
      launcher = function(slot) return slot == 1 and { PZLUA, "--worker" } or { script } end,
    })
    defer(function() p:stop(0) end)
    local first = p.executors and p.pids
    assert.are.equal(0, #p.init_errors)
    os.remove(script) -- slot 2's replacement cannot be run now
    for i = 1, 40 do p(i) end
    assert.is_true(p:wait(30))
    local seen = {}
    for i, v in ipairs(p.results) do
      assert.are.equal(p.ids[i], v)
      assert.is_nil(seen[v])
      seen[v] = true
    end
    assert.are.equal(40, #p.results)
    assert.are_not.equal(first[1], p.pids[1], "slot 1 was not recycled")
    assert.are.equal(1, #p.init_errors)
    assert.matches("could not run its launcher " .. script:gsub("%p", "%%%0") .. " %(No such file or directory%)$",
      p.init_errors[1].message)
    assert.are.equal(0, #p:stop())
  end)

  it("charges a death only to the call a remote worker was running, and ends a poison call", function()
    local p = Parallelize(parallelize.rep(function(x)
      if x == 13 then
        local ffi = require "ffi"
        pcall(ffi.cdef, "int kill(int, int); int getpid(void);")
        ffi.C.kill(ffi.C.getpid(), 9)
      end
      if x == 17 then os.exit(3) end
      -- 255 is also a lost link's status (ssh's): reported as 254, it is
      -- charged like any other (as 255 it was run again for ever)
      if x == 19 then os.exit(255) end
      return x
    end, 2), { launcher = function() return { PZLUA, "--worker" } end, max_deaths = 3 })
    for i = 1, 40 do p(i) end
    assert.is_true(p:wait(60), "the calls did not all end")
    local seen = {}
    for i, v in ipairs(p.results) do
      assert.are.equal(p.ids[i], v)
      assert.is_nil(seen[v], "call " .. v .. " has two results")
      seen[v] = true
    end
    assert.are.equal(37, #p.results)
    local errors = {}
    for _, e in ipairs(p.errors) do errors[e.id] = e.message end
    assert.matches("^call 13 killed 3 workers %(max_deaths = 3%); the last: worker %d %(pid %d+%) ended: its "
      .. "launcher .*pzlua exited with status 137 %(the worker was killed by signal 9 on its host%) while "
      .. "running call 13$", errors[13])
    assert.matches("^call 17 killed 3 workers .* exited with status 3 while running call 17$", errors[17])
    assert.matches("^call 19 killed 3 workers .* exited with status 254 while running call 19$", errors[19])
    assert.are.equal(0, #p:stop())
  end)

  it("ends a worker whose input ends, even in the middle of a long call; that is not the call's fault",
      function()
    -- cat stands for the link: the worker reads what cat passes on, and
    -- killing cat ends its input, as a dropped connection does.
    -- (The shell's own stderr goes nowhere: it would report cat's death.)
    local launcher = { "sh", "-c", "exec 3>&2 2>/dev/null; cat | exec " .. PZLUA .. " --worker 2>&3" }
    local p = Parallelize({ function(x)
      if x == "spin" then while true do end end
      return x
    end }, { launcher = function() return launcher end })
    finally(function() p:stop(0) end)
    local _ = p.executors
    local worker = p.pids[1]
    local supervisor = chaos.ppid(worker)
    local sh = chaos.ppid(supervisor)
    assert.matches("%-%-worker", cmdline(supervisor))
    local cat
    for _, pid in ipairs(support.children(sh)) do
      if cmdline(pid):match("^cat") then cat = pid end
    end
    assert(cat, "cannot find cat")
    p("spin")
    core.sleep(0.3)
    assert.is_true(support.alive(worker))
    assert.is_true(support.kill(cat, SIGKILL))
    assert.are.same({}, gone({ worker, supervisor }, 3))
    -- The call goes to the relaunched worker, uncharged.
    assert.is_truthy(support.eventually(function() return p.pids[1] ~= worker end, 10))
    local aborted = p:stop(0)
    assert.are.equal(1, #aborted)
    assert.are.equal("spin", aborted[1][1])
    assert.are.same({}, p.errors)
  end)

  it("stop and a collected pool leave no process behind", function()
    for _, collect in ipairs { false, true } do
      local before = children_set()
      local p = Parallelize(parallelize.rep(function(x) return x end, 3),
        { launcher = function() return { PZLUA, "--worker" } end })
      local _ = p.executors
      local spawner = new_child(before)
      local pids = { spawner }
      for _, pid in ipairs(support.children(spawner)) do pids[#pids + 1] = pid end
      for _, pid in pairs(p.pids) do pids[#pids + 1] = pid end
      assert.are.equal(7, #pids) -- the spawner, 3 supervisors, 3 workers
      for i = 1, 100 do p(i) end
      if collect then
        p = nil -- luacheck: ignore
        collectgarbage()
        collectgarbage()
      else
        p:wait()
        assert.are.equal(0, #p:stop())
      end
      assert.are.same({}, gone(pids, 5))
    end
  end)

  -- A socket as the parent's stderr: launchers write to a relay (spawner.c,
  -- stderr_relay). The relay holds nothing of the script's but stderr, so
  -- a launcher's helper that keeps the relay's pipe (here a background
  -- sleep) keeps no reader of the script's stdout waiting; and a relay
  -- that dies is replaced, where its dead pipe killed every relaunched
  -- launcher by SIGPIPE at its first write to stderr.
  it("carries what launchers write to a socket as stderr, through a relay that holds nothing else and is replaced",
    function()
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    support.write(dir .. "/script.lua", SOCKET_AS_STDERR .. [[
      local parallelize = require "parallelize"
      local command = "echo said-by-the-launcher >&2; (sleep 6 </dev/null >/dev/null &); exec "
        .. arg[1] .. " --worker"
      local p = parallelize.Parallelize(function(x) return x end,
        { workers = 1, launcher = function() return { "sh", "-c", command } end, init_attempts = 2 })
      local _ = p.executors
      local function parent_of(pid)
        return tonumber(io.open("/proc/" .. pid .. "/stat"):read("*a"):match("^%d+ %b() %S+ (%d+)"))
      end
      -- The first launcher's line through before its relay is killed (on a
      -- busy machine the relay had not copied it yet: lost with its pipe).
      assert(launcher_lines(1) == 1, "the first launcher's line did not come through")
      local launcher = parent_of(p.pids[1]) -- p.pids: the worker, its supervisor's child
      local spawner = parent_of(launcher)
      local killed = 0
      for pid in io.open("/proc/" .. spawner .. "/task/" .. spawner .. "/children"):read("*a"):gmatch("%d+") do
        if tonumber(pid) ~= launcher then
          ffi.C.kill(tonumber(pid), 9)
          killed = killed + 1
        end
      end
      print("relays killed " .. killed)
      parallelize.sleep(0.2)
      ffi.C.kill(launcher, 9) -- relaunched, with the relay gone
      -- The worker dies with its supervisor (a parent-death signal), but
      -- only once the SIGKILLed supervisor has finished exiting: a map made
      -- before then ran on the old worker, and nothing was relaunched.
      for _ = 1, 500 do
        if p:stats().deaths > 0 then break end
        parallelize.sleep(0.01)
      end
      local ok, r = pcall(p.map, p, { 1, 2, 3 })
      print("map " .. tostring(ok) .. " " .. tostring(ok and r[3] or r))
      print("init errors " .. #p.init_errors)
      p:stop()
      print("deaths " .. p:stats().deaths)
      print("launcher lines " .. launcher_lines(2))
    ]])
    local t0 = core.now()
    -- support.run reads the script's stdout to its end of file
    local out, status = support.run(("timeout 30 %s %s %s"):format(support.quote(PZLUA),
      support.quote(dir .. "/script.lua"), support.quote(PZLUA)))
    local took = core.now() - t0
    assert.are.equal(0, status, out)
    -- The relaunch works (it died by SIGPIPE at its first write to a dead
    -- relay's pipe, until the slot was given up) and its line comes
    -- through the replacement relay.
    assert.matches("^relays killed 1\nmap true 3\ninit errors 0\ndeaths 1\nlauncher lines 2\n$", out)
    assert.is_true(took < 4, "the script's stdout stayed open " .. took .. " s (the background sleep's 6)")
  end)

  describe("options", function()
    local f = function() end

    it("checks the launcher and what it returns", function()
      assert.has_error(function() Parallelize({ f }, { launcher = 42 }) end,
        "Parallelize: option launcher must be a function(slot) returning a command, or what "
          .. "parallelize.ssh{...} or parallelize.srun{...} return (got a number 42)")
      local ok, err = pcall(Parallelize, { f }, { launcher = function() return nil end })
      assert.is_false(ok)
      assert.matches("Parallelize: the launcher of worker 1 returned nil, not a command %(an array of strings%)$",
        err)
      ok, err = pcall(Parallelize, { f, f }, { launcher = function(i) return { "ssh", i == 2 and {} or "x" } end })
      assert.is_false(ok)
      assert.matches("Parallelize: word 2 of the launcher's command for worker 2 is a table, not a string$", err)
      ok, err = pcall(Parallelize, { f }, { launcher = function() error("no such host") end })
      assert.is_false(ok)
      assert.matches("Parallelize: the launcher of worker 1 raised: .*no such host$", err)
    end)

    it("ssh{...}: the command for each slot, spread over the hosts", function()
      local l = parallelize.ssh { "n1", "u@n2", per_host = 2, options = { "-p", "2222" },
                                  command = "/opt/bin/pzlua" }
      local tail = { "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=30" }
      local head = { "ssh", "-T", "-e", "none", "-o", "BatchMode=yes", "-p", "2222" }
      assert.are.same(concat(head, tail, { "--", "n1", "/opt/bin/pzlua --worker" }), l(2))
      assert.are.same(concat(head, tail, { "--", "u@n2", "/opt/bin/pzlua --worker" }), l(3))
      assert.has_error(function() l(5) end, "ssh: worker 5 has no place: 2 hosts x per_host 2 = 4 workers")
      local ok, err = pcall(Parallelize, parallelize.rep(f, 5), { launcher = l })
      assert.is_false(ok)
      assert.matches("the launcher of worker 5 raised: ssh: worker 5 has no place", err)

      local r = parallelize.ssh { "a", "b", "c", command = { "/opt/my tools/pzlua", "-E" }, program = "/usr/bin/ssh" }
      assert.are.same({ "/usr/bin/ssh", "-T", "-e", "none", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=5",
        "-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=30", "--", "b", "'/opt/my tools/pzlua' -E --worker" },
        r(5))
      assert.are.equal("parallelize launcher (ssh)", tostring(r))
      assert.are.same({ "a", "b", "c" }, r.hosts)
    end)

    it("srun{...}: one task per worker, unbuffered, after the user's options", function()
      -- inside an allocation (a test run from a batch job) it adds --exact
      local exact = os.getenv("SLURM_JOB_ID") and { "--exact" } or {}
      local l = parallelize.srun { "-O", "--partition=batch" }
      assert.are.same(concat({ "srun", "-O", "--partition=batch", "--ntasks=1", "--unbuffered" }, exact,
        { "pzlua", "--worker" }), l(7))
      l = parallelize.srun { command = "/opt/bin/pzlua", program = { "env", "SLURM_CONF=/x", "srun" } }
      assert.are.same(concat({ "env", "SLURM_CONF=/x", "srun", "--ntasks=1", "--unbuffered" }, exact,
        { "/opt/bin/pzlua", "--worker" }), l(1))
    end)

    it("ssh{...} and srun{...} say what is wrong with their table", function()
      assert.has_error(function() parallelize.ssh {} end, 'ssh: no host given: ssh{"node1", "user@node2", ...}')
      assert.has_error(function() parallelize.ssh { "-oProxyCommand=x" } end,
        'ssh: host 1 must be a destination such as "node1" or "user@node2" (got a string "-oProxyCommand=x")')
      assert.has_error(function() parallelize.ssh { "a", per_host = 0 } end,
        "ssh: per_host must be a positive integer (got a number 0)")
      assert.has_error(function() parallelize.ssh { "a", port = 22 } end,
        "ssh: unknown field 'port' (the fields are command, options, per_host, program)")
      assert.has_error(function() parallelize.ssh { "a", options = { "-p", 22 } } end,
        "ssh: options[2] must be a string (got a number 22)")
      assert.has_error(function() parallelize.ssh "node1" end,
        'ssh: expects a table such as ssh{ ... } (got a string "node1")')
      assert.has_error(function() parallelize.srun { 5 } end, "srun: option 1 must be a string (got a number 5)")
      assert.has_error(function() parallelize.srun { command = "" } end,
        'srun: command must be a non-empty string or array of strings (got a string "")')
    end)
  end)
end)

-- ------------------------------------------------------------ real servers

-- Starts fixture `kind` for the running test, or skips the test when this
-- machine cannot run it; stopped when the test ends, whatever happens.
local function fixture(kind, defer)
  local ok, why = servers.can_run(kind)
  if not ok then pending(why) end
  local h, err = servers[kind]()
  assert(h, err)
  defer(function() h:stop() end)
  return h
end

-- The ssh options of a fixture, with keepalives that notice a dead link
-- in about 3 s.
local function ssh_options(h)
  return concat(h.options, { "-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3" })
end

-- The processes of fixture h now (its daemons and their helpers, before a
-- test starts anything), pid -> start time.
local function baseline(h)
  local set = {}
  for pid, start in pairs(h:processes()) do set[pid] = start end
  return set
end

-- The processes of fixture h that were not there at `base` (sessions,
-- shells, workers, job steps), as "pid cmdline" lines, waiting up to
-- `seconds` for there to be none.
local function nothing_left(h, base, seconds)
  local left
  support.eventually(function()
    left = {}
    for pid, start in pairs(h:processes()) do
      if base[pid] ~= start and support.alive(pid) then left[#left + 1] = pid .. " " .. cmdline(pid) end
    end
    table.sort(left)
    return #left == 0
  end, seconds or 10)
  return left
end

-- A remote worker of fixture h: a `pzlua --worker` process whose parent is
-- its supervisor, among the fixture's processes.
local function is_remote_worker(h, pid)
  local parent = chaos.ppid(pid)
  return parent ~= nil and cmdline(pid):find("--worker", 1, true) ~= nil
    and cmdline(parent):find("--worker", 1, true) ~= nil and h:processes()[pid] ~= nil
end

--- Starts, under pzlua and in a session of its own (as a terminal runs
-- it), a script that prints "self <pid>" and then runs `body` (Lua source)
-- with `launcher` (an argv) in the local LAUNCHER; returns the path of its
-- output (stdout and stderr).
local function start_parent(dir, launcher, body)
  local quoted = {}
  for i, a in ipairs(launcher) do quoted[i] = ("%q"):format(a) end
  support.write(dir .. "/script.lua", [[
    io.stdout:setvbuf("line")
    local parallelize = require "parallelize"
    print("self " .. parallelize.getpid())
    local LAUNCHER = { ]] .. table.concat(quoted, ", ") .. [[ }
  ]] .. body)
  local out = dir .. "/out"
  os.execute(("cd %s && setsid %s %s > %s 2>&1 &"):format(support.quote(ROOT), support.quote(PZLUA),
    support.quote(dir .. "/script.lua"), support.quote(out)))
  return out
end

describe("remote workers on real servers #nosan", function()
  describe("over ssh", function()
    it("8 workers keep every call exactly once while remote workers and ssh clients are killed; nothing is "
        .. "left on either side", function()
      local defer = support.defer(finally)
      local s = fixture("sshd", defer)
      local s0 = baseline(s)
      local clients, killed = {}, { workers = 0, clients = 0 }
      local turn = 0
      local f = chaos.run({
        calls = 2000, workers = 8, interval = 0.25, sleep = 0.02, seed = 16, timeout = 90,
        options = {
          init_attempts = 50,
          launcher = parallelize.ssh { s.destination, options = ssh_options(s), command = PZLUA },
        },
        victim = function(p, spawner, workers)
          turn = turn + 1
          for _, pid in ipairs(support.children(spawner)) do
            if cmdline(pid):match("^ssh ") then clients[pid] = true end
          end
          if turn % 2 == 0 then
            local list = {}
            for pid in pairs(clients) do
              if chaos.ppid(pid) == spawner then list[#list + 1] = pid end
            end
            if #list > 0 then
              killed.clients = killed.clients + 1
              return list[math.random(#list)]
            end
          else
            local pid = p.pids[math.random(1, workers)]
            if pid and is_remote_worker(s, pid) then
              killed.workers = killed.workers + 1
              return pid
            end
          end
        end,
      })
      print(("\nssh chaos: %d calls, %d workers, %d kills (%d remote workers, %d ssh clients), %d poison, %.1f s")
        :format(f.calls, f.workers, f.kills, killed.workers, killed.clients, f.poison, f.elapsed))
      assert.is_true(killed.workers >= 5 and killed.clients >= 5, "too few kills")
      local list = {}
      for pid in pairs(clients) do list[#list + 1] = pid end
      assert.are.same({}, gone(list, 5))
      assert.are.same({}, nothing_left(s, s0, 10))
    end)

    it("a remote worker in a long computation ends when its ssh client is killed", function()
      local defer = support.defer(finally)
      local s = fixture("sshd", defer)
      local s0 = baseline(s)
      local before = children_set()
      local p = Parallelize({ function() while true do end end }, {
        launcher = parallelize.ssh { s.destination, options = ssh_options(s), command = PZLUA },
        respawn = false,
      })
      defer(function() p:stop(0) end)
      local _ = p.executors
      local worker = p.pids[1]
      assert.is_true(is_remote_worker(s, worker))
      local ssh = support.children(new_child(before))[1]
      assert.matches("^ssh ", cmdline(ssh))
      p(1)
      core.sleep(0.3)
      assert.is_true(support.kill(ssh, SIGKILL))
      assert.are.same({}, gone({ worker }, 5))
      assert.are.same({}, nothing_left(s, s0, 10))
      local ok, err = pcall(p.wait, p)
      assert.is_false(ok)
      assert.matches("worker 1 %(pid %d+%) ended: its launcher ssh killed by signal 9; not replaced "
        .. "%(respawn = false%)$", err)
      assert.are.equal(1, #p:stop())
    end)

    it("says which host lacks a module, and which runs another version", function()
      local defer = support.defer(finally)
      local s = fixture("sshd", defer)
      local s0 = baseline(s)
      -- Found here through a path relative to this directory; the worker's
      -- directory over ssh is root's home, where it is not.
      local saved = package.path
      package.path = "./spec/?.lua;" .. package.path
      defer(function() package.path = saved end)
      assert.is_table(require "support")
      local p = Parallelize({ "support.pzlua" }, {
        launcher = parallelize.ssh { s.destination, options = ssh_options(s), command = PZLUA },
      })
      local _ = p.executors
      local msg = p.init_errors[1] and p.init_errors[1].message or "no init error"
      assert.matches("^host " .. HOST:gsub("%p", "%%%0") .. ": module 'support' not found:", msg)
      p(1)
      local ok, err = pcall(p.wait, p)
      assert.is_false(ok)
      assert.matches("no worker is left and none can be started: host .*: module 'support' not found", err)
      assert.are.equal(1, #p:stop())

      msg = init_error_of(s:command(PZLUA .. " --worker"), "PZ\2" .. short("LuaJIT 2.1.9-other")
        .. short(bytecode_tag()))
      assert.are.equal("host " .. HOST .. ": version mismatch: the parent runs LuaJIT 2.1.9-other (bytecode "
        .. bytecode_tag() .. "), this worker " .. jit.version .. " (bytecode " .. bytecode_tag() .. "); both speak "
        .. "parallelize protocol 2, but functions travel as LuaJIT bytecode, which needs the same LuaJIT on "
        .. "both sides", msg)
      assert.are.same({}, nothing_left(s, s0, 10))
    end)

    it("leaves the parent's stderr blocking, though ssh makes its own stderr non-blocking", function()
      local defer = support.defer(finally)
      local s = fixture("sshd", defer)
      local dir = support.tmpdir()
      defer(function() support.rmdir(dir) end)
      local argv = {}
      for _, a in ipairs(parallelize.ssh { s.destination, options = ssh_options(s), command = PZLUA }(1)) do
        argv[#argv + 1] = ("%q"):format(a)
      end
      -- stderr is a pipe (to cat), the case where the flag would be shared
      support.write(dir .. "/script.lua", [[
        local parallelize = require "parallelize"
        local function flags()
          return tonumber(io.open("/proc/self/fdinfo/2"):read("*a"):match("flags:%s*(%d+)"), 8)
        end
        local p = parallelize.Parallelize(parallelize.rep(function(x) return x end, 2),
          { launcher = function() return { ]] .. table.concat(argv, ", ") .. [[ } end })
        local _ = p.executors
        print("init errors " .. #p.init_errors)
        print("nonblocking " .. tostring(require("bit").band(flags(), 2048) ~= 0))
        p:stop()
      ]])
      local out, status = support.run(("%s %s 2>&1 | cat"):format(support.quote(PZLUA),
        support.quote(dir .. "/script.lua")))
      assert.are.equal(0, status, out)
      assert.are.equal("init errors 0\nnonblocking false\n", out)
    end)

    -- A socket as stderr (a service's journal, a supervisor's socketpair)
    -- cannot be reopened apart as a pipe is: shared with ssh, which makes it
    -- non-blocking, the parent's own writes to stderr failed with EAGAIN
    -- whenever its reader lagged.  Launchers write to a relay instead.
    it("leaves the parent's stderr blocking when it is a socket, and passes what launchers write on", function()
      local defer = support.defer(finally)
      local s = fixture("sshd", defer)
      local s0 = baseline(s)
      local dir = support.tmpdir()
      defer(function() support.rmdir(dir) end)
      local argv = {}
      for _, a in ipairs(parallelize.ssh { s.destination, options = ssh_options(s),
                                            command = "echo said-by-the-launcher >&2; " .. PZLUA }(1)) do
        argv[#argv + 1] = ("%q"):format(a)
      end
      support.write(dir .. "/script.lua", SOCKET_AS_STDERR .. [[
        local function nonblocking(fd)
          local flags = tonumber(io.open("/proc/self/fdinfo/" .. fd):read("*a"):match("flags:%s*(%d+)"), 8)
          return require("bit").band(flags, 2048) ~= 0
        end
        local parallelize = require "parallelize"
        local p = parallelize.Parallelize(parallelize.rep(function(x) return x end, 2),
          { launcher = function() return { ]] .. table.concat(argv, ", ") .. [[ } end })
        local _ = p.executors
        print("init errors " .. #p.init_errors)
        print("nonblocking " .. tostring(nonblocking(2)))
        p:stop()
      ]] .. PRINT_LAUNCHER_LINES)
      local out, status = support.run(("%s %s"):format(support.quote(PZLUA), support.quote(dir .. "/script.lua")))
      assert.are.equal(0, status, out)
      assert.are.equal("init errors 0\nnonblocking false\nlauncher lines 2\n", out)
      assert.are.same({}, nothing_left(s, s0, 10))
    end)

    -- A parent in a session of its own, as a terminal runs it, with two
    -- remote workers each in a call that sleeps: Ctrl-C, or the parent
    -- killed outright, ends them all.
    for _, case in ipairs { { "Ctrl-C", SIGINT }, { "the parent killed with SIGKILL", SIGKILL } } do
      it(case[1] .. " ends the remote workers and the ssh clients", function()
        local defer = support.defer(finally)
        local s = fixture("sshd", defer)
        local s0 = baseline(s)
        local dir = support.tmpdir()
        defer(function() support.rmdir(dir) end)
        local out = start_parent(dir,
          parallelize.ssh { s.destination, options = ssh_options(s), command = PZLUA }(1), [[
          local p = parallelize.Parallelize(parallelize.rep(function() parallelize.sleep(100) end, 2),
            { launcher = function() return LAUNCHER end })
          local _ = p.executors
          print("workers " .. table.concat(p.pids, " "))
          p(1)
          p(2)
          p:wait()
        ]])
        local text
        support.eventually(function()
          text = support.read(out) or ""
          return text:match("workers [%d ]+\n")
        end, 30)
        local parent = tonumber(text:match("self (%d+)"))
        assert(parent, text)
        defer(function() support.kill(parent, SIGKILL) end)
        local workers = {}
        for pid in (text:match("workers ([%d ]+)\n") or ""):gmatch("%d+") do workers[#workers + 1] = tonumber(pid) end
        assert.are.equal(2, #workers, text)
        local processes = { parent }
        for _, spawner in ipairs(support.children(parent)) do
          processes[#processes + 1] = spawner
          for _, pid in ipairs(support.children(spawner)) do processes[#processes + 1] = pid end
        end
        assert.are.equal(4, #processes) -- the parent, its spawner, two ssh clients
        core.sleep(0.3)
        for _, pid in ipairs(workers) do assert.is_true(is_remote_worker(s, pid)) end
        assert.is_true(support.kill(case[2] == SIGINT and -parent or parent, case[2]))
        assert.are.same({}, gone(processes, 10))
        assert.are.same({}, gone(workers, 5))
        assert.are.same({}, nothing_left(s, s0, 10))
        if case[2] == SIGINT then assert.matches("interrupted!", support.read(out)) end
      end)
    end
  end)

  describe("on Slurm", function()
    it("a pool of 8 through srun keeps every call exactly once while tasks and sruns are killed and steps "
        .. "cancelled; nothing is left", function()
      local defer = support.defer(finally)
      local q = fixture("slurm", defer)
      local q0 = baseline(q)
      local cancelled, killed, turn = 0, { tasks = 0, sruns = 0 }, 0
      local sruns = {}
      local f = chaos.run({
        calls = 1800, workers = 8, interval = 0.6, sleep = 0.02, seed = 17, timeout = 120,
        options = {
          init_attempts = 50,
          launcher = parallelize.srun { "-O", "--quiet", command = PZLUA,
                                        program = { "env", "SLURM_CONF=" .. q.conf, "srun" } },
        },
        victim = function(p, spawner, workers)
          turn = turn + 1
          for _, pid in ipairs(support.children(spawner)) do sruns[pid] = true end
          if turn % 3 == 0 then
            local steps = q:steps()
            if #steps > 0 and q:scancel(steps[math.random(#steps)]) then cancelled = cancelled + 1 end
          elseif turn % 3 == 1 then
            local pid = p.pids[math.random(1, workers)]
            if pid and is_remote_worker(q, pid) then
              killed.tasks = killed.tasks + 1
              return pid
            end
          else
            local list = support.children(spawner)
            if #list > 0 then
              killed.sruns = killed.sruns + 1
              return list[math.random(#list)]
            end
          end
        end,
      })
      print(("\nslurm chaos: %d calls, %d workers, %d tasks and %d sruns killed, %d steps cancelled, "
        .. "%d poison, %.1f s"):format(f.calls, f.workers, killed.tasks, killed.sruns, cancelled, f.poison, f.elapsed))
      assert.is_true(killed.tasks >= 2 and killed.sruns >= 2 and cancelled >= 2, "too few kills")
      local list = {}
      for pid in pairs(sruns) do list[#list + 1] = pid end
      assert.are.same({}, gone(list, 10))
      assert.are.same({}, nothing_left(q, q0, 20))
      assert.is_truthy(support.eventually(function() return #q:jobs() == 0 end, 20), "jobs are left")
    end)

    -- When the step is cancelled (srun killed or signalled), Slurm
    -- SIGKILLs the task, pzlua --worker's supervisor, before it can end
    -- the worker's process group; what the executor left running in the
    -- background was then reparented to PID 1, out of proctrack/linuxproc's
    -- reach, and outlived the pool. The supervisor now adopts it.
    it("what an executor leaves running ends with its step: timeout, cancel, stop(0), stop(1)", function()
      local defer = support.defer(finally)
      local q = fixture("slurm", defer)
      local dir = support.tmpdir()
      defer(function() support.rmdir(dir) end)
      -- the program left behind: a sleep of a length nothing else uses
      local marker = string.format("%d.%d", 6000 + support.getpid() % 1000, math.random(100, 999))
      local launcher = parallelize.srun { "--quiet", command = PZLUA,
                                          program = { "env", "SLURM_CONF=" .. q.conf, "srun" } }
      local function left()
        local pids = {}
        for _, name in ipairs(support.list("/proc")) do
          local pid = tonumber(name)
          if pid and (support.read("/proc/" .. pid .. "/cmdline") or "") == "sleep\0" .. marker .. "\0" then
            pids[#pids + 1] = pid
          end
        end
        return pids
      end
      defer(function()
        for _, pid in ipairs(left()) do support.kill(pid, 9) end
      end)
      for _, case in ipairs({ "timeout", "cancel", "stop(0)", "stop(1)" }) do
        local p = Parallelize({ function()
          os.execute(string.format("sleep %s > /dev/null 2>&1 &", marker))
          require("parallelize").sleep(60)
        end }, { launcher = launcher, respawn = false, quiet = true, timeout = case == "timeout" and 1 or nil })
        defer(function() p:stop(0) end)
        assert.are.equal(1, #p.executors)
        local id = p()
        assert.is_truthy(support.eventually(function() return #left() == 1 end, 10), case .. ": not started")
        if case == "cancel" then p:cancel(id) end
        if case == "timeout" or case == "cancel" then assert.is_false((p:result(id, 10))) end
        if case == "stop(1)" then p:stop(1) else p:stop(0) end
        assert.is_truthy(support.eventually(function() return #left() == 0 end, 10),
          case .. ": the executor's program outlived its step: " .. table.concat(left(), " "))
      end
      assert.is_truthy(support.eventually(function() return #q:jobs() == 0 end, 10), "jobs are left")
    end)

    it("inside an allocation, the workers are job steps that share it", function()
      local defer = support.defer(finally)
      local q = fixture("slurm", defer)
      local q0 = baseline(q)
      local dir = support.tmpdir()
      defer(function() support.rmdir(dir) end)
      support.write(dir .. "/script.lua", ([[
        local parallelize = require "parallelize"
        local p = parallelize.Parallelize(parallelize.rep(function()
          parallelize.sleep(0.2)
          return os.getenv("SLURM_JOB_ID") .. "." .. os.getenv("SLURM_STEP_ID")
        end, 2), { launcher = parallelize.srun { "--quiet", command = %q } })
        print("executors " .. #p.executors .. " init errors " .. #p.init_errors)
        for _ = 1, 30 do p() end
        p:wait()
        local steps, n = {}, 0
        for _, v in ipairs(p.results) do
          if not steps[v] then n = n + 1 end
          steps[v] = true
        end
        print("steps " .. n .. " job " .. os.getenv("SLURM_JOB_ID"))
        for v in pairs(steps) do print(v) end
        p:stop()
      ]]):format(PZLUA))
      -- (without --exact the first step would take the whole allocation,
      -- and the other workers would wait for it for ever)
      local out, status = servers.run { "timeout", "60", "env", "SLURM_CONF=" .. q.conf, "salloc", "-n2", "--quiet",
                                        PZLUA, dir .. "/script.lua" }
      assert.are.equal(0, status, out)
      local job = out:match("steps 2 job (%d+)\n")
      assert(job, out)
      assert.matches("executors 2 init errors 0\n", out)
      for step in out:gmatch("\n(%d+)%.%d+\n") do assert.are.equal(job, step) end
      assert.are.same({}, nothing_left(q, q0, 20))
    end)

    -- An srun queued for an allocation has asked slurmctld for a job that
    -- outlives it: killed outright (SIGKILL), it left the job pending in
    -- the queue for good, to start some day with no srun to talk to.
    it("a worker whose srun is still queued for resources: stop, and the parent's death, take its job "
        .. "out of the queue", function()
      local defer = support.defer(finally)
      local q = fixture("slurm", defer)
      local dir = support.tmpdir()
      defer(function() support.rmdir(dir) end)
      local program = { "env", "SLURM_CONF=" .. q.conf, "srun" }
      -- (--begin: the jobs wait in the queue, as on a full cluster)
      local queued = parallelize.srun { "--begin=now+3600", "--quiet", command = PZLUA, program = program }
      -- kill_grace = 0 too: srun gets at least 0.1 s (SIGKILL in the same
      -- pass as SIGTERM left the jobs of 3 queued workers in the queue)
      for _, case in ipairs({ { grace = 1, how = "stop()" }, { grace = 0, how = "stop(0)" } }) do
        local p = Parallelize(parallelize.rep(function(x) return x end, 3),
          { launcher = queued, kill_grace = case.grace })
        defer(function() p:stop(0) end)
        p(1)
        assert.is_truthy(support.eventually(function() return #q:jobs() == 3 end, 10), "the jobs were not queued")
        -- (stopped at once: a moment's wait here let sruns take SIGKILL)
        if case.grace > 0 then assert.is_false(p:wait(0.2)) end
        local aborted = case.how == "stop()" and p:stop() or p:stop(0)
        assert.are.equal(1, #aborted)
        assert.is_truthy(support.eventually(function() return #q:jobs() == 0 end, 5),
          case.how .. " with kill_grace " .. case.grace .. " left jobs in the queue: " .. table.concat(q:jobs(), " "))
      end

      -- The parent killed: its spawner ends the sruns.
      local out = start_parent(dir, queued(1), [[
        local p = parallelize.Parallelize(parallelize.rep(function(x) return x end, 2),
          { launcher = function() return LAUNCHER end })
        p(1)
        p:wait()
      ]])
      local parent
      support.eventually(function()
        parent = tonumber((support.read(out) or ""):match("self (%d+)\n"))
        return parent
      end, 10)
      assert(parent, support.read(out))
      defer(function() support.kill(parent, SIGKILL) end)
      assert.is_truthy(support.eventually(function() return #q:jobs() == 2 end, 10), "the jobs were not queued")
      local processes = { parent }
      for _, pid in ipairs(support.children(parent)) do
        processes[#processes + 1] = pid
        for _, srun in ipairs(support.children(pid)) do processes[#processes + 1] = srun end
      end
      assert.are.equal(4, #processes) -- the parent, its spawner, two sruns
      assert.is_true(support.kill(parent, SIGKILL))
      assert.are.same({}, gone(processes, 5))
      assert.is_truthy(support.eventually(function() return #q:jobs() == 0 end, 5),
        "the parent's death left jobs in the queue: " .. table.concat(q:jobs(), " "))
    end)

    it("init_timeout ends a worker whose srun stays queued, and takes its job out of the queue", function()
      local defer = support.defer(finally)
      local q = fixture("slurm", defer)
      local program = { "env", "SLURM_CONF=" .. q.conf, "srun" }
      local queued = parallelize.srun { "--begin=now+3600", "--quiet", command = PZLUA, program = program }
      local p = Parallelize({ function(x) return x end }, { launcher = queued, init_timeout = 8, init_attempts = 1 })
      defer(function() p:stop(0) end)
      p(1)
      assert.is_truthy(support.eventually(function() return #q:jobs() == 1 end, 10), "the job was not queued")
      local ok, err = pcall(p.wait, p, 30)
      assert.is_false(ok)
      assert.matches("no worker is left and none can be started: worker 1 died during initialization 1 time; "
        .. "the last time, pid %d+ was ended by the pool: it had not initialized within init_timeout %(8 s%)", err)
      assert.is_truthy(support.eventually(function() return #q:jobs() == 0 end, 5),
        "init_timeout left the job in the queue: " .. table.concat(q:jobs(), " "))
    end)
  end)

  describe("through a slow link", function()
    it("a timeout does not count the time the call's arguments took to leave", function()
      local defer = support.defer(finally)
      local n = fixture("netns", defer)
      local n0 = baseline(n)
      local p = Parallelize({ function(s)
        if s == "" then parallelize.sleep(30) end
        return #s
      end }, {
        timeout = 1.5,
        launcher = parallelize.ssh { n.destination, options = ssh_options(n), command = PZLUA },
      })
      defer(function() p:stop(0) end)
      local _ = p.executors
      assert.are.equal(0, #p.init_errors)
      local throttled, why = n:throttle(80) -- 10 MB/s
      if not throttled then pending(why) end
      -- 30 MiB: about 3 s to go through; the call runs in microseconds.
      -- Its clock used to start when it was handed to the worker, and it
      -- timed out as its last bytes were written.
      local t0 = core.now()
      local id = p(("x"):rep(30 * 2 ^ 20))
      local ok, v = p:result(id, 60)
      local took = core.now() - t0
      assert.is_true(took > 2, ("the link is not slow: %.2f s"):format(took))
      -- (the error record holds the 30 MiB: only its message is shown)
      assert(ok, type(v) == "table" and v.message or tostring(v))
      assert.are.equal(30 * 2 ^ 20, v)
      -- A call that runs too long still ends.
      local got = { p:result(p(""), 60) }
      assert.is_false(got[1])
      assert.are.equal("call 2 timed out after 1.5 s", got[2].message)
      assert.are.equal(0, #p:stop())
      assert.are.same({}, nothing_left(n, n0, 15))
    end)
  end)

  describe("through a link that is cut", function()
    it("requeues the calls of the cut workers; the pool finishes on the others and on relaunched workers",
        function()
      local defer = support.defer(finally)
      local n = fixture("netns", defer)
      local n0 = baseline(n)
      local s = fixture("sshd", defer)
      local s0 = baseline(s)
      -- A connection tried while the link is down is lost for good here
      -- (the kernel routes it through another interface, with another
      -- source address): connecting gives up after 3 s and is tried again.
      local far = parallelize.ssh { n.destination, options = concat(ssh_options(n), { "-o", "ConnectTimeout=3" }),
                                    command = PZLUA }
      local near = parallelize.ssh { s.destination, options = ssh_options(s), command = PZLUA }
      local before = children_set()
      local p = Parallelize(parallelize.rep(function(x)
        parallelize.sleep(0.05)
        return { x, parallelize.getpid() }
      end, 4), {
        init_attempts = 100,
        launcher = function(slot) if slot <= 2 then return far(slot) end return near(slot) end,
      })
      defer(function() p:stop(0) end)
      local _ = p.executors
      assert.are.equal(0, #p.init_errors)
      local spawner = new_child(before)
      local cut_workers = { p.pids[1], p.pids[2] }
      local cut_clients = {}
      for _, pid in ipairs(support.children(spawner)) do
        if cmdline(pid):find(n.destination, 1, true) then cut_clients[#cut_clients + 1] = pid end
      end
      assert.are.equal(2, #cut_clients)
      for i = 1, 600 do p(i) end
      core.sleep(0.5)
      n:cut()
      -- ssh's keepalives notice in about 3 s; the clients exit 255.
      assert.are.same({}, gone(cut_clients, 15))
      n:restore()
      assert.is_true(p:wait(60), "the pool did not finish")
      local seen, by = {}, {}
      for _, r in ipairs(p.results) do
        assert.is_nil(seen[r[1]], "call " .. r[1] .. " has two results")
        seen[r[1]] = true
        by[r[2]] = (by[r[2]] or 0) + 1
      end
      for i = 1, 600 do assert.is_true(seen[i], "call " .. i .. " was lost") end
      assert.are.same({}, p.errors) -- a lost link is not the calls' fault
      local relaunched = 0
      for slot = 1, 2 do
        local pid = p.pids[slot]
        assert.are_not.equal(cut_workers[slot], pid, "worker " .. slot .. " was not relaunched")
        relaunched = relaunched + (by[pid] or 0)
      end
      assert.is_true(relaunched > 0, "the relaunched workers ran nothing")
      assert.are.equal(0, #p:stop())
      -- The cut workers' sessions end on the far side too.
      assert.are.same({}, gone(cut_workers, 15))
      assert.are.same({}, nothing_left(n, n0, 15))
      assert.are.same({}, nothing_left(s, s0, 10))
    end)
  end)
end)
