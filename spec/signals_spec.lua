-- Signals from outside: Ctrl-C in the parent (pzlua and plain luajit), a
-- second Ctrl-C during stop, and the parent killed outright. Each runs a
-- real interpreter as a subprocess in a process group of its own, as a
-- terminal would, and sends the signal to the whole group.
local core = require "parallelize.core"
local support = require "spec.support"

local SIGINT, SIGKILL = 2, 9

local ROOT = io.popen("pwd"):read("*l")

-- The interpreters to run the scripts with: pzlua, and plain luajit
-- finding the module in this tree.
local interpreters = {
  { name = "pzlua", cmd = support.quote(support.pzlua()) },
  { name = "plain luajit", cmd = ("env LUA_PATH=%s LUA_CPATH=%s luajit"):format(
      support.quote(ROOT .. "/lua/?.lua;" .. ROOT .. "/?.lua;;"),
      support.quote(ROOT .. "/build/?.so;;")) },
}

--- Waits until the output file has a line matching pattern; returns the
-- captures (or the whole match).
local function await(out, pattern, seconds)
  local found
  support.eventually(function()
    local text = support.read(out) or ""
    found = { text:match(pattern) }
    return #found > 0
  end, seconds or 20)
  return unpack(found)
end

--- Starts `interp script` in a new session (its own process group) with
-- output to a file; returns its pid (which the script prints itself:
-- setsid may fork) and the output file.
local function start(dir, interp, script)
  local path, out = dir .. "/script.lua", dir .. "/out"
  support.write(path, 'io.stdout:setvbuf("line")\nprint("self " .. require("parallelize").getpid())\n'
    .. script)
  os.execute(("cd %s && setsid %s %s > %s 2>&1 &"):format(
    support.quote(ROOT), interp.cmd, support.quote(path), support.quote(out)))
  return tonumber(await(out, "self (%d+)\n")), out
end

--- Lists the numbers of a "name n n n" line.
local function numbers(s)
  local t = {}
  for n in (s or ""):gmatch("%d+") do t[#t + 1] = tonumber(n) end
  return t
end

local function all_gone(pids, seconds)
  return support.eventually(function()
    for _, pid in ipairs(pids) do
      if support.alive(pid) then return false end
    end
    return true
  end, seconds)
end

-- The pool part of every script: 4 sleeping workers, their pids and the
-- spawner's printed, `n` calls queued.
local PRELUDE = [[
io.stdout:setvbuf("line")
local parallelize = require "parallelize"
local core = require "parallelize.core"
local support = require "spec.support"
local p = parallelize.Parallelize(parallelize.rep(function(x)
  parallelize.sleep(%s)
  return x
end, 4))
local _ = p.executors
print("pids " .. table.concat(p.pids, " ") .. " " .. table.concat(support.children(), " "))
for i = 1, %d do p(i) end
print("ready")
]]

for _, interp in ipairs(interpreters) do
  describe("Ctrl-C (" .. interp.name .. ")", function()
    local dir, pid
    before_each(function() dir = support.tmpdir() end)
    after_each(function()
      if pid and support.alive(pid) then support.kill(pid, SIGKILL) end
      support.rmdir(dir)
    end)

    it("interrupts wait promptly; stop then returns what never ran", function()
      local out
      pid, out = start(dir, interp, PRELUDE:format("0.05", 400) .. [[
        local ok, err = pcall(p.wait, p)
        print("caught_at " .. core.now() .. " " .. tostring(ok) .. " " .. tostring(err))
        local aborted = p:stop()
        print(("counts %d %d %d %d"):format(#p.results, #p.errors, #aborted, p.calls))
      ]])
      local pids = numbers(await(out, "pids ([%d ]+)\n"))
      assert.are.equal(5, #pids) -- four workers and the spawner
      await(out, "ready\n")
      core.sleep(0.2)
      local sent = core.now()
      assert.is_true(support.kill(-pid, SIGINT))
      local caught, ok, err = await(out, "caught_at ([%d.]+) (%a+) ([^\n]*)\n")
      assert.are.equal("false", ok)
      assert.matches("interrupted!", err, 1, true)
      assert.is_true(tonumber(caught) - sent < 0.5, "interrupt took " .. (tonumber(caught) - sent) .. " s")
      local counts = numbers(await(out, "counts ([%d ]+)\n"))
      assert.are.equal(400, counts[4])
      assert.are.equal(counts[4], counts[1] + counts[2] + counts[3])
      assert.is_true(counts[3] > 0, "nothing was aborted")
      assert.is_true(all_gone({ pid }, 10))
      assert.is_true(all_gone(pids, 1))
    end)

    it("a Ctrl-C that lands while wait polls interrupts it", function()
      -- wait polls for up to 10 ms before it sleeps; the call signals the
      -- parent at once, so the signal comes while it polls. It must still
      -- interrupt the sleep that follows, not wait for the 30 s call.
      local out
      pid, out = start(dir, interp, [[
        local parallelize = require "parallelize"
        local core = require "parallelize.core"
        local support = require "spec.support"
        local p = parallelize.Parallelize({ function(parent)
          support.kill(parent, 2)
          parallelize.sleep(30)
        end }, { spin = 0.01 })
        local _ = p.executors
        local started = core.now()
        -- The call goes in inside the pcall: its worker may signal before
        -- p(...) has returned (the interrupt then lands there, caught all
        -- the same, and the script must not die of it).
        local ok, err = pcall(function()
          p(parallelize.getpid())
          return p:wait()
        end)
        print(("caught after %f %s %s"):format(core.now() - started, tostring(ok), tostring(err)))
        p:stop(0)
        print("stopped")
      ]])
      local after, ok, err = await(out, "caught after ([%d.]+) (%a+) ([^\n]*)\n")
      assert.are.equal("false", ok)
      assert.matches("interrupted!", err, 1, true)
      assert.is_true(tonumber(after) < 5, "the interrupt took " .. after .. " s")
      await(out, "stopped\n", 10)
      assert.is_true(all_gone({ pid }, 10))
    end)

    it("a Ctrl-C handled while wait drains records interrupts it", function()
      -- A result names a module the parent has not loaded: wait's drain
      -- requires it there, and the module's last act is to raise SIGINT.
      -- The handler sets its hook, which cannot fire before wait returns;
      -- wait must see it and return, not sleep until the 10 s call ends.
      support.write(dir .. "/raises_sigint.lua", [[
        local M = {}
        package.loaded[...] = M
        if rawget(_G, "RAISE_SIGINT_ON_LOAD") then
          local ffi = require "ffi"
          ffi.cdef "void raise(int sig);"
          -- A tail call to a void C function: no Lua instruction runs
          -- after the signal (the hook would fire there, inside the drain),
          -- and require keeps M.
          return ffi.C.raise(2)
        end
      ]])
      local out
      pid, out = start(dir, interp, ([[
        package.path = %q .. "/?.lua;" .. package.path
        local parallelize = require "parallelize"
        local core = require "parallelize.core"
        local p = parallelize.Parallelize(function(what)
          if what == "long" then parallelize.sleep(10) return end
          return require("raises_sigint")
        end, { workers = 2 })
        local _ = p.executors
        RAISE_SIGINT_ON_LOAD = true
        local started = core.now()
        local ok, err = pcall(function()
          p("long")
          p("module")
          -- Its result published, not drained (core.pool_stats does not
          -- drain): p:wait drains it first thing.
          while core.pool_stats(p).done < 1 do core.sleep(0.01) end
          return p:wait()
        end)
        print(("caught after %%f %%s %%s %%s"):format(core.now() - started, tostring(ok), tostring(err),
          type(package.loaded.raises_sigint)))
        p:stop(0)
        print("stopped")
      ]]):format(dir))
      local after, ok, err, loaded = await(out, "caught after ([%d.]+) (%a+) (.-) (%a+)\n")
      assert.are.equal("false", ok)
      assert.matches("interrupted!", err, 1, true)
      assert.are.equal("table", loaded) -- the drain loaded the module
      assert.is_true(tonumber(after) < 5, "the interrupt took " .. after .. " s")
      await(out, "stopped\n", 10)
      assert.is_true(all_gone({ pid }, 10))
    end)

    it("interrupts p.executors while constructors run", function()
      local out
      pid, out = start(dir, interp, [[
        io.stdout:setvbuf("line")
        local parallelize = require "parallelize"
        local core = require "parallelize.core"
        local p = parallelize.Parallelize({ parallelize.Deferred(function()
          parallelize.sleep(30)
          return print
        end) })
        print("ready")
        local ok, err = pcall(function() return p.executors end)
        print("caught_at " .. core.now() .. " " .. tostring(ok) .. " " .. tostring(err))
        p:stop(0)
        print("stopped")
      ]])
      await(out, "ready\n")
      core.sleep(0.2)
      local sent = core.now()
      support.kill(-pid, SIGINT)
      local caught, ok, err = await(out, "caught_at ([%d.]+) (%a+) ([^\n]*)\n")
      assert.are.equal("false", ok)
      assert.matches("interrupted!", err, 1, true)
      assert.is_true(tonumber(caught) - sent < 0.5)
      await(out, "stopped\n", 10)
      assert.is_true(all_gone({ pid }, 10))
    end)

    it("a Ctrl-C during stop ends the running calls, and is raised once stop has returned", function()
      -- Without a finish_timeout stop waits for the running calls however
      -- long they take; Ctrl-C there is the user's "now": they are ended
      -- as a finish_timeout passing then would end them, stop still
      -- reaps everything and accounts for every call, and the interrupt
      -- fires after it.
      local out
      pid, out = start(dir, interp, PRELUDE:format("30", 8) .. [[
        parallelize.sleep(0.2) -- the first four calls running
        print("stopping")
        local started = core.now()
        local ok, err = pcall(function()
          local aborted = p:stop() -- not a tail call: the interrupt fires in here
          return aborted
        end)
        local s = p:stats()
        print(("stopped %.3f %s %s"):format(core.now() - started, tostring(ok), tostring(err)))
        print(("counts %d %d %d %d"):format(#p.results, #p.errors, s.aborted, p.calls))
      ]])
      local pids = numbers(await(out, "pids ([%d ]+)\n"))
      await(out, "stopping\n")
      core.sleep(0.3)
      assert.is_true(support.kill(-pid, SIGINT))
      local took, ok, err = await(out, "stopped ([%d.]+) (%a+) ([^\n]*)\n", 20)
      assert.are.equal("false", ok)
      assert.matches("interrupted!", err, 1, true)
      -- kill_grace is 1 s; the calls sleep 30.
      assert.is_true(tonumber(took) < 5, "stop took " .. took .. " s")
      assert.are.same({ 0, 0, 8, 8 }, numbers(await(out, "counts ([%d ]+)\n")))
      assert.is_true(all_gone({ pid }, 10))
      assert.is_true(all_gone(pids, 1), "workers or spawner outlived the parent")
    end)

    it("a signal other than Ctrl-C during stop, whose handler sets a hook, lets the running calls finish", function()
      -- luaposix's posix.signal runs a Lua handler through a debug hook its
      -- C handler sets, as Ctrl-C's does (spec/sighook.c does the same).
      -- The script's own child ending during the stop (SIGCHLD), or a
      -- SIGALRM, SIGWINCH, is no "now": it hurried the stop all the same,
      -- and the running calls were killed and aborted.
      local so = dir .. "/sighook.so"
      local cc_out, status = support.run(("cc -shared -fPIC -O2 $(pkg-config --cflags luajit) -o %s %s"):format(
        support.quote(so), support.quote(ROOT .. "/spec/sighook.c")))
      assert.are.equal(0, status, cc_out)
      local out
      pid, out = start(dir, interp, ("package.cpath = %q .. package.cpath\n"):format(dir .. "/?.so;")
        .. PRELUDE:format("1.5", 4) .. [[
        local sighook = require "sighook"
        local got = {}
        for _, sig in ipairs({ 14, 17, 28 }) do -- SIGALRM, SIGCHLD, SIGWINCH
          sighook.signal(sig, function(n) got[#got + 1] = n end)
        end
        parallelize.sleep(0.2) -- the four calls running
        local me = parallelize.getpid()
        os.execute(("(sleep 0.2; kill -14 %d; kill -28 %d) >/dev/null 2>&1 &"):format(me, me))
        local child = io.popen("sleep 0.3") -- its end: SIGCHLD
        local started = core.now()
        local aborted = p:stop()
        print(("stopped %.3f %d %d"):format(core.now() - started, #p.results, #aborted))
        parallelize.sleep(0.5)
        table.sort(got)
        print("handled " .. table.concat(got, " "))
        child:close()
      ]])
      await(out, "ready\n")
      local took, results, aborted = await(out, "stopped ([%d.]+) (%d+) (%d+)\n", 20)
      assert.are.same({ "4", "0" }, { results, aborted }, "stop took " .. took .. " s")
      -- each handler still ran, once the stop was over
      assert.matches("handled 14 17[ 17]* 28\n", await(out, "(handled [^\n]*\n)"))
      assert.is_true(all_gone({ pid }, 10))
    end)

    it("a second Ctrl-C during stop leaves no process behind", function()
      local out
      pid, out = start(dir, interp, PRELUDE:format("1", 40) .. [[
        local ok = pcall(p.wait, p)
        print("stopping " .. tostring(ok))
        p:stop()
        print("stopped")
      ]])
      local pids = numbers(await(out, "pids ([%d ]+)\n"))
      await(out, "ready\n")
      core.sleep(0.2)
      support.kill(-pid, SIGINT)
      await(out, "stopping false\n")
      core.sleep(0.1)
      support.kill(-pid, SIGINT)
      assert.is_true(all_gone({ pid }, 5), "the parent survived the second Ctrl-C")
      assert.is_nil((support.read(out) or ""):match("stopped\n"))
      assert.is_true(all_gone(pids, 1), "workers or spawner outlived the parent")
    end)

    it("a parent killed with SIGKILL takes every worker and the spawner with it", function()
      local out
      pid, out = start(dir, interp, PRELUDE:format("10", 8) .. [[
        p:wait()
      ]])
      local pids = numbers(await(out, "pids ([%d ]+)\n"))
      await(out, "ready\n")
      core.sleep(0.1)
      assert.is_true(support.kill(pid, SIGKILL))
      assert.is_true(all_gone({ pid }, 5))
      assert.is_true(all_gone(pids, 1), "workers or spawner outlived the parent")
    end)
  end)
end
