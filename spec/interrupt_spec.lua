-- Where Ctrl-C's "interrupted!" points when it lands in a blocking method:
-- at the user's line that called it, not at a line inside parallelize.lua,
-- in pzlua and in a plain luajit alike (both raise it from an interrupt
-- hook, with the position of the Lua code running).
--
-- Each case runs a real interpreter on a script named user.lua as a
-- background job, sends it SIGINT while it is blocked, and reads what it
-- printed and its exit status.
local support = require "spec.support"

local quote = support.quote
local SIGINT, SIGKILL = 2, 9

local ROOT = io.popen("pwd"):read("*l")

local interpreters = {
  { name = "pzlua", cmd = quote(support.pzlua()) },
  { name = "plain luajit", cmd = ("env LUA_PATH=%s LUA_CPATH=%s luajit"):format(
      quote(ROOT .. "/lua/?.lua;" .. ROOT .. "/?.lua;;"), quote(ROOT .. "/build/?.so;;")) },
}

--- Runs `interp user.lua` in dir as a background job (stdin /dev/null,
-- stdout to dir/out, stderr to dir/err, its exit status to dir/status);
-- returns its pid.
local function start(dir, interp, source)
  support.write(dir .. "/user.lua", source)
  os.execute(("cd %s && (%s user.lua >out 2>err & echo $! >pid; wait $!; echo $? >status) </dev/null >/dev/null 2>&1 &")
    :format(quote(dir), interp.cmd))
  local pid = support.eventually(function() return tonumber((support.read(dir .. "/pid") or ""):match("^%d+")) end, 10)
  assert(pid, "the interpreter did not start")
  return pid
end

--- Waits for "ready" on its stdout, lets it block, sends SIGINT; returns
-- its stderr and exit status once it has exited.
local function interrupt(dir, pid)
  assert.truthy(support.eventually(function()
    return (support.read(dir .. "/out") or ""):find("ready\n", 1, true)
  end, 20), "the script did not get ready: " .. (support.read(dir .. "/err") or ""))
  require("parallelize.core").sleep(0.3)
  assert.is_true(support.kill(pid, SIGINT))
  local status = support.eventually(function()
    return tonumber((support.read(dir .. "/status") or ""):match("^%d+"))
  end, 20)
  -- A pool left with a call running is reported when it is collected: not
  -- what these tests look at.
  local err = (support.read(dir .. "/err") or ""):gsub("parallelize: a pool was dropped[^\n]*\n", "")
  return err, status
end

for _, interp in ipairs(interpreters) do
  describe("Ctrl-C in a blocking method (" .. interp.name .. ")", function()
    local dir, pid
    before_each(function() dir = support.tmpdir() end)
    after_each(function()
      if pid and support.alive(pid) then support.kill(pid, SIGKILL) end
      support.rmdir(dir)
    end)

    it("p:wait() raises 'interrupted!' at the line that called it", function()
      pid = start(dir, interp, [[
io.stdout:setvbuf("line")
local parallelize = require "parallelize"
local p = parallelize.Parallelize({ function() parallelize.sleep(30) end })
p()
print("ready")
p:wait()
]])
      local err, status = interrupt(dir, pid)
      assert.equal(1, status)
      assert.matches("^[^\n]*: user%.lua:6: interrupted!\nstack traceback:\n", err)
    end)

    it("p.executors raises 'interrupted!' at the line that read it", function()
      pid = start(dir, interp, [[
io.stdout:setvbuf("line")
local parallelize = require "parallelize"
local p = parallelize.Parallelize({ parallelize.Deferred(function()
  parallelize.sleep(30)
  return print
end) })
print("ready")
local executors = p.executors
print(#executors)
]])
      local err, status = interrupt(dir, pid)
      assert.equal(1, status)
      assert.matches("^[^\n]*: user%.lua:8: interrupted!\nstack traceback:\n", err)
    end)

    it("pcall catches it with that position, and the pool stops cleanly", function()
      pid = start(dir, interp, [[
io.stdout:setvbuf("line")
local parallelize = require "parallelize"
local p = parallelize.Parallelize({ function() parallelize.sleep(30) end })
p()
print("ready")
local ok, err = pcall(function()
  p:wait(60)
end)
io.stderr:write(tostring(ok), " ", err, "\n")
io.stderr:write("aborted ", #p:stop(0), "\n")
]])
      local err, status = interrupt(dir, pid)
      assert.equal(0, status)
      assert.equal("false user.lua:7: interrupted!\naborted 1\n", err)
    end)

    -- The other blocking methods: each raises at the user's line, and after
    -- pcall and stop the calls add up: consumed + results + errors +
    -- aborted = calls.
    local blocking = {
      { what = "a p(...) waiting for room (max_pending)", line = 8, opts = "{ workers = 1, max_pending = 1 }",
        code = [[
p(30); p(30)
print("ready")
local ok, err = pcall(function()
  p(30)
end)]] },
      { what = "p:result(id)", line = 8, code = [[
local id = p(30)
print("ready")
local ok, err = pcall(function()
  p:result(id)
end)]] },
      { what = "p:map(list)", line = 8, code = [[
p(0)
print("ready")
local ok, err = pcall(function()
  p:map({ 0, 30, 30 })
end)]] },
      { what = "a p:stream loop", line = 6, code = [[
local ok, err = pcall(function()
  for _ in p:stream({ 0, 0, 30, 30 }, { ordered = true }) do
    consumed = consumed + 1
    if consumed == 2 then print("ready") end
  end
end)]] },
    }
    for _, case in ipairs(blocking) do
      it(case.what .. " raises at the user's line, and stop accounts for every call", function()
        pid = start(dir, interp, ([[
io.stdout:setvbuf("line")
local parallelize = require "parallelize"
local p = parallelize.Parallelize(function(s) parallelize.sleep(s) return s end, %s)
consumed = 0
%s
local aborted = p:stop(0)
local results, errors = #p.results, #p.errors
io.stderr:write(tostring(ok), " ", err, "\n")
io.stderr:write(("calls %%d = %%d consumed + %%d results + %%d errors + %%d aborted\n")
  :format(p.calls, consumed, results, errors, #aborted))
]]):format(case.opts or "{ workers = 2 }", case.code))
        local err, status = interrupt(dir, pid)
        assert.equal(0, status, err)
        assert.matches("^false user%.lua:" .. case.line .. ": interrupted!\n", err)
        local calls, consumed, results, errors, aborted =
          err:match("calls (%d+) = (%d+) consumed %+ (%d+) results %+ (%d+) errors %+ (%d+) aborted")
        assert.is_truthy(calls, err)
        assert.are.equal(tonumber(calls), consumed + results + errors + aborted)
        assert.is_true(tonumber(aborted) >= 1)
      end)
    end
  end)

  -- Ctrl-C in a compiled loop of p(i), which the JIT runs through the FFI
  -- (pool.lua's __call): the signal comes from the loop's own compiled
  -- code (raise(0) until the iteration named, then raise(SIGINT)), so
  -- that its hook is set while the trace runs; the next p(i) leaves the
  -- trace for the interpreter, where the hook fires. The message names no
  -- line of parallelize's, and the p(i) it lands in queues nothing.
  describe("Ctrl-C in a compiled loop of p(i) (" .. interp.name .. ")", function()
    local dir
    before_each(function() dir = support.tmpdir() end)
    after_each(function() support.rmdir(dir) end)

    it("raises at no line of parallelize's, and the p(i) it lands in queues nothing", function()
      support.write(dir .. "/user.lua", [[
local parallelize = require "parallelize"
local ffi = require "ffi"
ffi.cdef "int raise(int sig);"
local p = parallelize.Parallelize(parallelize.rep(function(x) return x end, 1))
local N, returned = 20000, 0
local ok, err = pcall(function()
  for i = 1, 2 * N - 1 do
    ffi.C.raise(2 * math.floor(i / N)) -- no branch: the trace stays whole
    p(i)
    returned = returned + 1
  end
end)
print("caught", ok, err)
assert(p:wait(30))
print(("calls %d returned %d results %d"):format(p.calls, returned, #p.results))
p:stop()
]])
      local out, status = support.run(("cd %s && LUA_PATH=%s %s user.lua"):format(quote(dir),
        quote("./?.lua;" .. ROOT .. "/lua/?.lua;;"), interp.cmd))
      assert.equal(0, status, out)
      local err = out:match("caught\tfalse\t([^\n]*)\n")
      assert.is_truthy(err, out)
      assert.is_truthy(err == "interrupted!" or err:match("^user%.lua:%d+: interrupted!$"), err)
      assert.matches("calls 19999 returned 19999 results 19999\n", out)
    end)
  end)

  -- Ctrl-C while records are turned into values: here the value names a
  -- module that the parent loads as it decodes it, whose top-level code
  -- sends SIGINT to the parent (in the middle of the drain, as a Ctrl-C
  -- may come). The interrupt must come out of the wait, at the user's
  -- line, and the record be decoded whole: not taken for a value that
  -- cannot be decoded, the interrupt lost with it. With and without a
  -- hook of the user's set before (it is taken off meanwhile, ldefer.h).
  describe("Ctrl-C while a wait decodes a record (" .. interp.name .. ")", function()
    local dir
    before_each(function() dir = support.tmpdir() end)
    after_each(function() support.rmdir(dir) end)

    for _, case in ipairs({
      { what = "a result", how = "return" },
      { what = "an error's value", how = "raise" },
      { what = "a result, under a hook of the user's", how = "return", hook = true },
      { what = "an error's value, under a hook of the user's", how = "raise", hook = true },
    }) do
      it("naming a module that sends SIGINT as it loads: " .. case.what, function()
        support.write(dir .. "/sigself.lua", [[
local ffi = require "ffi"
pcall(ffi.cdef, "int kill(int pid, int sig); int getpid(void);")
if rawget(_G, "SIGSELF_PARENT") then ffi.C.kill(ffi.C.getpid(), 2) end
return { name = "sigself" }
]])
        support.write(dir .. "/user.lua", ([[
io.stdout:setvbuf("line")
local parallelize = require "parallelize"
SIGSELF_PARENT = true
if %s then debug.sethook(function() end, "", 1000000) end
local p = parallelize.Parallelize(function(how)
  local m = require "sigself"
  if how == "raise" then error(m) end
  return m
end, { workers = 1 })
local ok, err = pcall(function()
  p(%q)
  p:wait()
end)
print("caught", ok, err)
assert(p:wait(10))
local results, errors = p.results, p.errors
print("results", #results, type(results[1]) == "table" and results[1].name)
print("errors", #errors, errors[1] and type(errors[1].value) == "table" and errors[1].value.name)
print("message", errors[1] and errors[1].message)
p:stop()
]]):format(tostring(case.hook or false), case.how))
        local out, status = support.run(("cd %s && LUA_PATH=%s %s user.lua"):format(quote(dir),
          quote("./?.lua;" .. ROOT .. "/lua/?.lua;;"), interp.cmd))
        assert.equal(0, status, out)
        assert.matches("caught\tfalse\tuser%.lua:12: interrupted!\n", out)
        if case.how == "return" then
          assert.matches("results\t1\tsigself\nerrors\t0\t", out)
        else
          assert.matches("results\t0\tfalse\nerrors\t1\tsigself\n", out)
        end
      end)
    end
  end)
end
