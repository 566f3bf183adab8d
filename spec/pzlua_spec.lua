-- pzlua's command line, run as a subprocess: options, the arg table, exit
-- status and error reports, the built-in parallelize, the REPL, LUA_INIT and
-- Ctrl-C. Where pzlua promises to behave as Debian's luajit (2.1), the
-- "as luajit" tests run both with the same arguments and compare what they
-- print, each named by its own argv[0].
--
-- The interpreter under test is $PZLUA when set (the sanitizer pass, or an
-- installed copy), else build/pzlua of this tree.

local support = require "spec.support"

local shell_quote, read_file, write_file = support.quote, support.read, support.write
local PZLUA = support.pzlua()

--- s as a Lua pattern that matches s itself.
local function literal(s)
  return (s:gsub("%p", "%%%0"))
end

-- Messages start with argv[0], which is how the specs run pzlua: its path.
local NAME = literal(PZLUA)

local tmpfiles = {}
local function tmpname()
  local name = os.tmpname()
  tmpfiles[#tmpfiles + 1] = name
  return name
end

--- Runs pzlua with args (a list, each quoted) and returns stdout, stderr and
-- the exit status. opts.stdin: text for stdin (else /dev/null);
-- opts.env: a shell prefix such as "LUA_INIT=x"; opts.cwd: a directory;
-- opts.interp: another interpreter to run (luajit).
-- LUA_INIT is unset unless opts.env sets it, so the caller's does not leak in.
local function run(args, opts)
  opts = opts or {}
  local quoted = {}
  for i, a in ipairs(args) do quoted[i] = shell_quote(a) end
  local errfile = tmpname()
  local input = "/dev/null"
  if opts.stdin then
    input = tmpname()
    write_file(input, opts.stdin)
  end
  local cmd = string.format("%senv -u LUA_INIT %s %s %s <%s 2>%s; echo \"EXIT:$?\"",
    opts.cwd and ("cd " .. shell_quote(opts.cwd) .. " && ") or "",
    opts.env or "", shell_quote(opts.interp or PZLUA), table.concat(quoted, " "),
    shell_quote(input), shell_quote(errfile))
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  local body, status = out:match("^(.*)EXIT:(%d+)\n$")
  assert(body, "no exit status in: " .. out)
  return body, read_file(errfile) or "", tonumber(status)
end

local function script_file(source)
  local name = tmpname()
  write_file(name, source)
  return name
end

-- Debian's luajit, which pzlua's command line follows.
local LUAJIT = (function()
  local p = io.popen("command -v luajit")
  local path = p:read("*l")
  p:close()
  return path
end)()

--- What an interpreter prints, made comparable with the other's: its own
-- name (argv[0]) becomes PROG, addresses 0xADDR.
local function normalized(text, interp)
  return (text:gsub(literal(interp), "PROG"):gsub("0x%x+", "0xADDR"))
end

--- Runs luajit and pzlua with the same args and options; asserts that they
-- print the same (normalized) stdout and stderr and exit with the same
-- status. pzlua's one addition, its version line after LuaJIT's banner, is
-- left out of the comparison. Returns pzlua's stdout, stderr and status.
local function same_as_luajit(args, opts)
  assert(LUAJIT, "luajit is not installed (make deps installs it)")
  opts = opts or {}
  local jout, jerr, jstatus = run(args, { stdin = opts.stdin, env = opts.env, cwd = opts.cwd, interp = LUAJIT })
  local out, err, status = run(args, opts)
  local out_without_version = out:gsub("^(LuaJIT [^\n]*\n)pzlua [^\n]*\n", "%1")
  assert.same({ normalized(jout, LUAJIT), normalized(jerr, LUAJIT), jstatus },
    { normalized(out_without_version, PZLUA), normalized(err, PZLUA), status })
  return out, err, status
end

local function sleep(seconds)
  os.execute("sleep " .. seconds)
end

-- Polls pred() every 50 ms for at most seconds; returns its last value.
local function wait_for(seconds, pred)
  for _ = 1, seconds * 20 do
    local v = pred()
    if v then return v end
    sleep(0.05)
  end
  return pred()
end

describe("pzlua", function()
  teardown(function()
    for _, name in ipairs(tmpfiles) do os.remove(name) end
  end)

  describe("-e", function()
    it("runs a chunk", function()
      assert.same({ "2\n", "", 0 }, { run({ "-e", "print(1 + 1)" }) })
    end)

    it("runs several chunks in order, attached or not", function()
      assert.same({ "a\nb\n", "", 0 }, { run({ "-e", "io.write('a\\n')", "-eprint('b')" }) })
    end)

    it("without its argument is a usage error", function()
      local out, err, status = run({ "-e" })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^" .. NAME .. ": '%-e' needs an argument\nusage: " .. NAME .. " ", err)
    end)
  end)

  describe("-l", function()
    it("only requires, as luajit: a module's own global is there, no other is set", function()
      -- cfg.lua sets the global cfg and returns nothing; parallelize sets
      -- no global and returns its table, which -l does not keep either.
      local dir = support.tmpdir()
      finally(function() support.rmdir(dir) end)
      write_file(dir .. "/cfg.lua", "cfg = { a = 42 }\n")
      local out = same_as_luajit({ "-l", "cfg", "-e", "print(cfg.a)" }, { cwd = dir })
      assert.equal("42\n", out)
      assert.same({ "nil\ttrue\n", "", 0 },
        { run({ "-l", "parallelize", "-e", "print(parallelize, package.loaded.parallelize ~= nil)" }) })
    end)

    it("takes an attached name and runs in order with -e", function()
      assert.same({ "nil\ntrue\n", "", 0 },
        { run({ "-e", "print(package.loaded.parallelize)", "-lparallelize",
                "-e", "print(package.loaded.parallelize ~= nil)" }) })
    end)

    it("fails with status 1 for a missing module", function()
      local out, err, status = run({ "-l", "no.such.module" })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^" .. NAME .. ": module 'no.such.module' not found", err)
    end)
  end)

  describe("-j and -O", function()
    it("fail with luajit's short messages, no module search, no traceback", function()
      local _, err, status = same_as_luajit({ "-jbogus" })
      assert.same({ PZLUA .. ": unknown luaJIT command or jit.* modules not installed\n", 1 }, { err, status })
      _, err, status = same_as_luajit({ "-Obogus" })
      assert.same({ PZLUA .. ": unknown or malformed optimization flag 'bogus'\n", 1 }, { err, status })
      -- An error of the command itself: its message alone.
      _, err, status = same_as_luajit({ "-jon=1" })
      assert.same({ PZLUA .. ": bad argument #1 to '?' (function expected, got string)\n", 1 }, { err, status })
    end)

    it("run jit.* functions and jit.* modules with their arguments split as luajit splits them", function()
      local dir = support.tmpdir()
      finally(function() support.rmdir(dir) end)
      os.execute("mkdir " .. shell_quote(dir .. "/jit"))
      write_file(dir .. "/jit/echo.lua", [[
        return { start = function(...)
          local t = { select("#", ...) }
          for i = 1, select("#", ...) do t[#t + 1] = tostring((select(i, ...))) end
          print(table.concat(t, " "))
        end }
      ]])
      local out = same_as_luajit({ "-jecho=a,,b,", "-jecho", "-jecho=", "-jecho=,", "-e", "print(1)" }, { cwd = dir })
      assert.equal("4 a nil b nil\n0\n0\n2 nil nil\n1\n", out)
      out = same_as_luajit({ "-joff", "-O3,-fold", "-e", "print(jit.status())" })
      assert.matches("^false\t", out)
      assert.falsy(out:find("\tfold\t", 1, true))
    end)
  end)

  describe("-v", function()
    it("prints luajit's own banner first, then pzlua's and parallelize's versions", function()
      local jout = run({ "-v" }, { interp = LUAJIT })
      assert.matches("^LuaJIT 2%.1[^\n]*\n$", jout)
      local out, err, status = run({ "-v" })
      assert.same({ "", 0 }, { err, status })
      assert.equal(jout .. "pzlua scm -- parallelize 0.1.0\n", out)
    end)

    it("-i prints the banner, then luajit's JIT line before the prompt", function()
      local jout = run({ "-i" }, { interp = LUAJIT })
      local banner, jit_line = jout:match("^(LuaJIT [^\n]*\n)(JIT: O[NF][^\n]*\n)> \n$")
      assert.truthy(banner, jout)
      local out, err, status = run({ "-i" })
      assert.same({ "", 0 }, { err, status })
      assert.equal(banner .. "pzlua scm -- parallelize 0.1.0\n" .. jit_line .. "> \n", out)
    end)
  end)

  it("--help explains the options and that parallelize is built in", function()
    local out, err, status = run({ "--help" })
    assert.same({ "", 0 }, { err, status })
    assert.matches("^usage: " .. NAME .. " %[options%]", out)
    for _, needle in ipairs({ "-e chunk", "-l name", "-i ", "-v ", "-E ", "--  ", "-   ", "parallelize" }) do
      assert.truthy(out:find(needle, 1, true), needle)
    end
  end)

  describe("bad usage, as luajit: the usage on stderr, nothing on stdout, status 1", function()
    -- pzlua says why on a line of its own before the usage.
    for _, case in ipairs({
      { args = { "-x" }, why = "unrecognized option '%-x'" },
      { args = { "-e" }, why = "'%-e' needs an argument" },
      { args = { "-l" }, why = "'%-l' needs an argument" },
      { args = { "-j" }, why = "'%-j' needs an argument" },
      { args = { "-vx" }, why = "unrecognized option '%-vx'" },
      { args = { "-ix" }, why = "unrecognized option '%-ix'" },
      { args = { "--x" }, why = "unrecognized option '%-%-x'" },
      { args = { "-h" }, why = "unrecognized option '%-h'" },
      { args = { "-e", "x = 1", "-b" }, why = "'%-b' must come before the other options" },
    }) do
      it(table.concat(case.args, " "), function()
        local jout, jerr, jstatus = run(case.args, { interp = LUAJIT })
        assert.same({ "", 1 }, { jout, jstatus })
        assert.matches("^usage: ", jerr)
        local out, err, status = run(case.args)
        assert.same({ "", 1 }, { out, status })
        assert.matches("^" .. NAME .. ": " .. case.why .. "\nusage: " .. NAME
          .. " %[options%]%.%.%. %[script %[args%]%.%.%.%]\n", err)
        for _, option in ipairs({ "-e chunk", "-l name", "-b ...", "-j cmd", "-O[opt]",
                                  "-i ", "-v ", "-E ", "-- ", "- " }) do
          assert.truthy(err:find("\n  " .. option, 1, true), option)
        end
      end)
    end

    it("what luajit accepts is accepted: -E with a tail, -O before -b, -- alone", function()
      same_as_luajit({ "-Ex", "-e", "print(1)" })
      local dir = support.tmpdir()
      finally(function() support.rmdir(dir) end)
      write_file(dir .. "/m.lua", "return 1\n")
      local out = same_as_luajit({ "-O3", "-bl", "m.lua" }, { cwd = dir })
      assert.matches("BYTECODE", out)
      same_as_luajit({ "--" }, { stdin = "print('stdin ran')" })
    end)
  end)

  describe("scripts", function()
    local show_args = [[
      local t = {}
      for i = -3, #arg do t[#t + 1] = tostring(arg[i]) end
      print(table.concat(t, " "))
      print(select("#", ...), ...)
    ]]

    it("get their arguments as ... and in arg, with negative indexes", function()
      local script = script_file(show_args)
      local out, err, status = run({ "-e", "x = 1", script, "a", "-e", "b c" })
      assert.same({ "", 0 }, { err, status })
      assert.equal(string.format("%s -e x = 1 %s a -e b c\n3\ta\t-e\tb c\n", PZLUA, script), out)
    end)

    it("after -- runs the script and passes options on to it", function()
      local script = script_file(show_args)
      local out, _, status = run({ "--", script, "-v" })
      assert.equal(0, status)
      assert.equal(string.format("nil %s -- %s -v\n1\t-v\n", PZLUA, script), out)
    end)

    it("- reads the script from stdin", function()
      local out, err, status = run({ "-", "a", "b" }, { stdin = show_args })
      assert.same({ "", 0 }, { err, status })
      assert.equal(string.format("nil nil %s - a b\n2\ta\tb\n", PZLUA), out)
    end)

    it("runs stdin when there are no arguments and stdin is not a terminal", function()
      assert.same({ "from stdin\n", "", 0 }, { run({}, { stdin = "print('from stdin')" }) })
    end)

    it("leaves arg for the interpreter's options when there is no script", function()
      assert.same({ "-e\tnil\n", "", 0 }, { run({ "-e", "print(arg[-2], arg[0])" }) })
    end)
  end)

  describe("errors", function()
    it("exit 1 with the message and a traceback on stderr", function()
      local script = script_file("local function f() error('boom') end\nf()\n")
      local out, err, status = same_as_luajit({ script })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^" .. NAME .. ": [^\n]*:1: boom\nstack traceback:\n", err)
      assert.truthy(err:find("in function 'f'", 1, true), err)
    end)

    it("start with argv[0], as luajit's do", function()
      local dir = support.tmpdir()
      finally(function() support.rmdir(dir) end)
      local link = dir .. "/my-lua"
      os.execute("ln -s " .. shell_quote(PZLUA) .. " " .. shell_quote(link))
      local _, err, status = run({ "-e", "error('boom', 0)" }, { interp = link })
      assert.same({ link .. ": boom\nstack traceback:\n", 1 }, { err:sub(1, #link + 24), status })
      _, err, status = run({ "-x" }, { interp = link })
      assert.matches("^" .. literal(link) .. ": unrecognized option '%-x'\nusage: " .. literal(link) .. " ", err)
      assert.equal(1, status)
    end)

    it("describe error objects that are not strings as luajit does", function()
      local _, err = same_as_luajit({ "-e", "error({})" })
      assert.equal(PZLUA .. ": (error object is not a string)\n", err)
      _, err = same_as_luajit({ "-e", "error(nil)" })
      assert.equal("", err) -- luajit prints nothing; the status says it failed
      same_as_luajit({ "-e", "error()" })
      same_as_luajit({ "-e", "error(42)" })
      _, err = same_as_luajit({ "-e", "error(setmetatable({}, {__tostring = function() return 'custom' end}))" })
      assert.matches("^" .. NAME .. ": custom\nstack traceback:\n", err)
      same_as_luajit({ "-e", "error(setmetatable({}, {__tostring = function() return {} end}))" })
      -- (luajit says only "error in error handling" here: where pzlua differs)
      local status
      _, err, status = run({ "-e", "error(setmetatable({}, {__tostring = function() error('bad', 0) end}))" })
      assert.matches("^" .. NAME .. ": %(error object is a table value; its __tostring raised: bad%)\n"
        .. "stack traceback:\n", err)
      assert.equal(1, status)
      for _, chunk in ipairs({ "error({})", "error(nil)" }) do
        assert.equal(1, select(3, run({ "-e", chunk })))
      end
    end)

    it("report syntax errors and missing scripts", function()
      local out, err, status = same_as_luajit({ "-e", "x = = 1" })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^" .. NAME .. ": %(command line%):1: unexpected symbol near '='\n$", err)
      out, err, status = same_as_luajit({ "no/such/script.lua" })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^" .. NAME .. ": cannot open no/such/script.lua", err)
    end)

    it("of stdin's chunk exit 1 (luajit exits 0 there)", function()
      local out, err, status = run({}, { stdin = "error('from stdin')" })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^" .. NAME .. ": stdin:1: from stdin\nstack traceback:\n", err)
    end)

    it("stop the actions that follow", function()
      local out, _, status = run({ "-e", "print(1)", "-e", "error('x')", "-e", "print(2)" })
      assert.same({ "1\n", 1 }, { out, status })
    end)

    it("os.exit sets the status", function()
      assert.same({ "", "", 3 }, { run({ "-e", "os.exit(3)" }) })
      assert.same({ "", "", 0 }, { run({ "-e", "os.exit(true)" }) })
    end)
  end)

  describe("started with a standard descriptor closed", function()
    it("gives no file its number: what goes to a closed stdout fails, and goes into no file", function()
      local path = tmpname()
      local errfile = tmpname()
      local chunk = string.format("local f = assert(io.open(%q, 'w')) io.stdout:write('to stdout') "
        .. "local ok, err = io.stdout:flush() f:write('to the file') f:close() "
        .. "io.stderr:write(tostring(ok), ' ', tostring(err), '\\n')", path)
      local status = os.execute(string.format("%s -e %s >&- 2>%s", shell_quote(PZLUA), shell_quote(chunk),
        shell_quote(errfile)))
      assert.same({ "to the file", "nil Bad file descriptor\n" }, { read_file(path), read_file(errfile) })
      assert.is_true(status == 0 or status == true)
    end)

    it("pzlua --map: with stdout closed, the results go into no file, and the run fails", function()
      local log, input = tmpname(), tmpname()
      write_file(input, "1\n2\n")
      os.remove(log)
      local status = os.execute(string.format("%s --map --joblog %s 'function(x) return x * 10 end' < %s "
        .. ">&- 2>/dev/null", shell_quote(PZLUA), shell_quote(log), shell_quote(input)))
      assert.is_falsy(status == 0 or status == true)
      assert.same("", read_file(log))
    end)

    it("the module under plain luajit: once required, no file takes stdout's number", function()
      -- (The module of this tree, not the sanitized pzlua's.)
      local path, errfile = tmpname(), tmpname()
      local chunk = string.format("package.path = 'lua/?.lua;' .. package.path package.cpath = 'build/?.so;' "
        .. "require 'parallelize' local f = assert(io.open(%q, 'w')) io.stdout:write('to stdout') "
        .. "local ok, err = io.stdout:flush() f:write('to the file') f:close() "
        .. "io.stderr:write(tostring(ok), ' ', tostring(err), '\\n')", path)
      local status = os.execute(string.format("luajit -e %s >&- 2>%s", shell_quote(chunk), shell_quote(errfile)))
      assert.same({ "to the file", "nil Bad file descriptor\n" }, { read_file(path), read_file(errfile) })
      assert.is_true(status == 0 or status == true)
    end)
  end)

  describe("parallelize is built in", function()
    local nowhere = "LUA_PATH='/nonexistent/?.lua' LUA_CPATH='/nonexistent/?.so'"
    local check = "local p = require 'parallelize' local c = require 'parallelize.core' "
      .. "print(type(p), type(c), type(package.preload.parallelize), p._VERSION)"

    it("with LUA_PATH and LUA_CPATH pointing nowhere, from another directory", function()
      local out, err, status = run({ "-e", check }, { env = nowhere, cwd = "/" })
      assert.same({ "", 0 }, { err, status })
      assert.matches("^table\ttable\tfunction\tparallelize", out)
    end)

    it("with LUA_PATH and LUA_CPATH empty, and with -E", function()
      local out, err, status = run({ "-e", check }, { env = "LUA_PATH= LUA_CPATH=", cwd = "/" })
      assert.same({ "", 0 }, { err, status })
      assert.matches("^table\ttable\tfunction\tparallelize", out)
      out, err, status = run({ "-E", "-e", check }, { env = nowhere, cwd = "/" })
      assert.same({ "", 0 }, { err, status })
      assert.matches("^table\ttable\tfunction\tparallelize", out)
    end)
  end)

  describe("-i", function()
    it("reads from a pipe, prints values, continues incomplete chunks", function()
      local input = table.concat({
        "x = 20",
        "=x + 1",
        "x * 2",
        "function f()",
        "  return 'multi', nil",
        "end",
        "f()",
        "error('oops', 0)",
        "= 1 +",
        " 2",
      }, "\n") .. "\n"
      local out, err, status = run({ "-i" }, { stdin = input })
      assert.equal(0, status)
      local rest = out:match("^LuaJIT [^\n]*\npzlua [^\n]*\nJIT: [^\n]*\n(.*)$")
      assert.equal("> > 21\n> 40\n> >> >> > multi\tnil\n> > >> 3\n> \n", rest)
      assert.matches("^oops\nstack traceback:\n", err)
    end)

    it("keeps an error's position and the functions of its traceback, as luajit", function()
      -- Each line as luajit runs it: `f()` is a call, not `return f()` (a
      -- tail call would drop the line's frame, its position and f's name).
      local input = table.concat({
        "error('oops')",
        "function f() error('inner') end",
        "f()",
        "local function g() error('deep') end g()",
      }, "\n") .. "\n"
      local _, err = same_as_luajit({ "-i" }, { stdin = input })
      local want = {
        "^stdin:1: oops\nstack traceback:\n\t%[C%]: in function 'error'\n\tstdin:1: in main chunk\n",
        "\nstdin:1: inner\nstack traceback:\n\t%[C%]: in function 'error'\n\tstdin:1: in function 'f'\n"
          .. "\tstdin:1: in main chunk\n",
        "\nstdin:1: deep\nstack traceback:\n\t%[C%]: in function 'error'\n\tstdin:1: in function 'g'\n"
          .. "\tstdin:1: in main chunk\n",
      }
      for _, pattern in ipairs(want) do assert.matches(pattern, err) end
    end)

    it("prints a bare expression's values, its calls keeping their frame", function()
      local input = table.concat({
        "function two() return 1, nil end",
        "two()",
        "function where() return debug.getinfo(2, 'l').currentline, debug.traceback('tb', 1) end",
        "where() -- a comment",
        "1 + 1, 'x'",
      }, "\n") .. "\n"
      local out, err, status = run({ "-i" }, { stdin = input })
      assert.same({ "", 0 }, { err, status })
      local rest = out:match("^LuaJIT [^\n]*\npzlua [^\n]*\nJIT: [^\n]*\n(.*)$")
      -- where() sees the line that called it, which is still on the stack.
      assert.matches("^> > 1\tnil\n> > 1\ttb\nstack traceback:\n\tstdin:1: in function 'where'\n"
        .. "\tstdin:1: in main chunk\n.*\n> 2\tx\n> \n$", rest)
    end)

    it("runs after the script, which sees arg", function()
      local script = script_file("y = ...\n")
      local out, _, status = run({ "-i", script, "from script" }, { stdin = "=y\n" })
      assert.equal(0, status)
      assert.matches("\n> from script\n> \n$", out)
    end)
  end)

  describe("LUA_INIT", function()
    it("runs a chunk before anything else", function()
      assert.same({ "42\n", "", 0 }, { run({ "-e", "print(init_ran)" }, { env = "LUA_INIT='init_ran = 42'" }) })
    end)

    it("runs @file", function()
      local init = script_file("init_ran = 'file'\n")
      assert.same({ "file\n", "", 0 },
        { run({ "-e", "print(init_ran)" }, { env = "LUA_INIT=" .. shell_quote("@" .. init) }) })
    end)

    it("is ignored with -E", function()
      assert.same({ "nil\n", "", 0 }, { run({ "-E", "-e", "print(init_ran)" }, { env = "LUA_INIT='init_ran = 42'" }) })
    end)

    it("stops the run when it fails", function()
      local out, err, status = run({ "-e", "print(1)" }, { env = "LUA_INIT='error(\"bad init\", 0)'" })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^" .. NAME .. ": bad init\n", err)
    end)
  end)

  describe("Ctrl-C", function()
    -- Starts pzlua -e chunk as a background job of a non-interactive shell
    -- (so it starts with SIGINT ignored, as such jobs do), and returns its
    -- PID and the files that get its output and its exit status.
    -- opts.interp: another interpreter; opts.script (run in opts.cwd)
    -- instead of the chunk.
    local function start(chunk, opts)
      opts = opts or {}
      local out, pidfile, statusfile = tmpname(), tmpname(), tmpname()
      local what = opts.script and shell_quote(opts.script) or "-e " .. shell_quote(chunk)
      local cmd = string.format("(%s%s %s >%s 2>&1 & echo $! >%s; wait $!; echo $? >%s) </dev/null >/dev/null 2>&1 &",
        opts.cwd and ("cd " .. shell_quote(opts.cwd) .. " && ") or "",
        shell_quote(opts.interp or PZLUA), what, shell_quote(out), shell_quote(pidfile), shell_quote(statusfile))
      os.execute(cmd)
      local pid = wait_for(10, function() return (read_file(pidfile) or ""):match("^(%d+)\n") end)
      assert(pid, "pzlua did not start")
      return pid, out, statusfile
    end

    local function exit_status(statusfile)
      return wait_for(20, function() return (read_file(statusfile) or ""):match("^(%d+)\n") end)
    end

    -- Killed before it returns, whatever happened (not in a finally: busted
    -- keeps one a test, and a test's own would replace it, or it theirs).
    local function run_interrupted(chunk, signals, opts)
      local pid, out, statusfile = start(chunk, opts)
      local ok, text, status = pcall(function()
        assert.truthy(wait_for(20, function() return (read_file(out) or ""):find("ready\n", 1, true) end),
          "pzlua did not get ready")
        for _ = 1, signals do
          os.execute("kill -INT " .. pid)
          sleep(0.3)
        end
        return read_file(out), exit_status(statusfile)
      end)
      os.execute("kill -KILL " .. pid .. " 2>/dev/null")
      if not ok then error(text, 0) end
      return text, status
    end

    it("raises 'interrupted!', which pcall catches", function()
      -- The JIT cannot be interrupted inside a compiled loop (as in luajit),
      -- so this loop runs interpreted.
      local out, status = run_interrupted([[
        jit.off()
        print("ready") io.stdout:flush()
        local ok, e = pcall(function() while true do end end)
        print(ok, e) print("done")
      ]], 1)
      assert.matches("^ready\nfalse\t[^\n]*interrupted!\ndone\n$", out)
      assert.equal("0", status)
    end)

    it("raises 'interrupted!' that ends the script with status 1", function()
      local out, status = run_interrupted([[
        jit.off()
        print("ready") io.stdout:flush()
        while true do os.clock() end
      ]], 1)
      assert.matches("^ready\n" .. NAME .. ": [^\n]*interrupted!\nstack traceback:\n", out)
      assert.equal("1", status)
    end)

    it("names the line that was running, as luajit: loop.lua:2: interrupted!", function()
      local dir = support.tmpdir()
      finally(function() support.rmdir(dir) end)
      write_file(dir .. "/loop.lua", 'jit.off() print("ready") io.stdout:flush()\nwhile true do end\n')
      for _, interp in ipairs({ LUAJIT, PZLUA }) do
        local out, status = run_interrupted(nil, 1, { interp = interp, cwd = dir, script = "loop.lua" })
        assert.equal("1", status)
        assert.equal("ready\n" .. interp .. ": loop.lua:2: interrupted!\nstack traceback:\n"
          .. "\tloop.lua:2: in main chunk\n", out:gsub("\t%[C%]: at 0x%x+\n$", ""))
      end
    end)

    it("a second Ctrl-C kills when the first cannot stop compiled code", function()
      local out, status = run_interrupted([[
        print("ready") io.stdout:flush()
        while true do end
      ]], 2)
      assert.equal("ready\n", out)
      assert.equal("130", status)
    end)
  end)
end)
