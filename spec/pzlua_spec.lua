-- pzlua's command line, run as a subprocess: options, the arg table, exit
-- status and error reports, the built-in parallelize, the REPL, LUA_INIT and
-- Ctrl-C.
--
-- The interpreter under test is $PZLUA when set (the sanitizer pass, or an
-- installed copy), else build/pzlua of this tree.

local support = require "spec.support"

local shell_quote, read_file, write_file = support.quote, support.read, support.write
local PZLUA = support.pzlua()

local tmpfiles = {}
local function tmpname()
  local name = os.tmpname()
  tmpfiles[#tmpfiles + 1] = name
  return name
end

--- Runs pzlua with args (a list, each quoted) and returns stdout, stderr and
-- the exit status. opts.stdin: text for stdin (else /dev/null);
-- opts.env: a shell prefix such as "LUA_INIT=x"; opts.cwd: a directory.
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
    opts.env or "", shell_quote(PZLUA), table.concat(quoted, " "),
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
      assert.matches("^pzlua: '%-e' needs an argument\nusage: pzlua ", err)
    end)
  end)

  describe("-l", function()
    it("requires a module into the global of that name", function()
      assert.same({ "table\ttrue\n", "", 0 },
        { run({ "-l", "parallelize", "-e", "print(type(parallelize), parallelize == require 'parallelize')" }) })
    end)

    it("takes an attached name and runs in order with -e", function()
      assert.same({ "true\n", "", 0 },
        { run({ "-e", "string = nil", "-lstring", "-e", "print(string == require 'string')" }) })
    end)

    it("fails with status 1 for a missing module", function()
      local out, err, status = run({ "-l", "no.such.module" })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^pzlua: module 'no.such.module' not found", err)
    end)
  end)

  it("-v prints one version line naming pzlua, parallelize and LuaJIT", function()
    local out, err, status = run({ "-v" })
    assert.same({ "", 0 }, { err, status })
    assert.matches("^pzlua [^\n]* %-%- parallelize [^\n]* %-%- LuaJIT 2%.[^\n]*\n$", out)
  end)

  it("--help explains the options and that parallelize is built in", function()
    local out, err, status = run({ "--help" })
    assert.same({ "", 0 }, { err, status })
    assert.matches("^usage: pzlua %[options%]", out)
    for _, needle in ipairs({ "-e chunk", "-l name", "-i ", "-v ", "-E ", "--  ", "-   ", "parallelize" }) do
      assert.truthy(out:find(needle, 1, true), needle)
    end
  end)

  it("an unknown option prints the usage and exits 1", function()
    local out, err, status = run({ "-x" })
    assert.same({ "", 1 }, { out, status })
    assert.matches("^pzlua: unrecognized option '%-x'\nusage: pzlua ", err)
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
      local out, err, status = run({ script })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^pzlua: [^\n]*:1: boom\nstack traceback:\n", err)
      assert.truthy(err:find("in function 'f'", 1, true), err)
    end)

    it("describe error objects that are not strings", function()
      local _, err, status = run({ "-e", "error({})" })
      assert.equal(1, status)
      assert.matches("^pzlua: %(error object is a table value%)\nstack traceback:\n", err)
      _, err, status = run({ "-e", "error(setmetatable({}, {__tostring = function() return 'custom' end}))" })
      assert.equal(1, status)
      assert.matches("^pzlua: custom\nstack traceback:\n", err)
    end)

    it("report syntax errors and missing scripts", function()
      local out, err, status = run({ "-e", "x = = 1" })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^pzlua: %(command line%):1: unexpected symbol near '='\n$", err)
      out, err, status = run({ "no/such/script.lua" })
      assert.same({ "", 1 }, { out, status })
      assert.matches("^pzlua: cannot open no/such/script.lua", err)
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
      local version, rest = out:match("^([^\n]*)\n(.*)$")
      assert.matches("^pzlua ", version)
      assert.equal("> > 21\n> 40\n> >> >> > multi\tnil\n> > >> 3\n> \n", rest)
      assert.matches("^oops\nstack traceback:\n", err)
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
      assert.matches("^pzlua: bad init\n", err)
    end)
  end)

  describe("Ctrl-C", function()
    -- Starts pzlua -e chunk as a background job of a non-interactive shell
    -- (so it starts with SIGINT ignored, as such jobs do), and returns its
    -- PID and the files that get its output and its exit status.
    local function start(chunk)
      local out, pidfile, statusfile = tmpname(), tmpname(), tmpname()
      local cmd = string.format("(%s -e %s >%s 2>&1 & echo $! >%s; wait $!; echo $? >%s) </dev/null >/dev/null 2>&1 &",
        shell_quote(PZLUA), shell_quote(chunk), shell_quote(out), shell_quote(pidfile), shell_quote(statusfile))
      os.execute(cmd)
      local pid = wait_for(10, function() return (read_file(pidfile) or ""):match("^(%d+)\n") end)
      assert(pid, "pzlua did not start")
      return pid, out, statusfile
    end

    local function exit_status(statusfile)
      return wait_for(20, function() return (read_file(statusfile) or ""):match("^(%d+)\n") end)
    end

    local function run_interrupted(chunk, signals)
      local pid, out, statusfile = start(chunk)
      finally(function() os.execute("kill -KILL " .. pid .. " 2>/dev/null") end)
      assert.truthy(wait_for(20, function() return (read_file(out) or ""):find("ready\n", 1, true) end),
        "pzlua did not get ready")
      for _ = 1, signals do
        os.execute("kill -INT " .. pid)
        sleep(0.3)
      end
      return read_file(out), exit_status(statusfile)
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
      assert.matches("^ready\npzlua: [^\n]*interrupted!\nstack traceback:\n", out)
      assert.equal("1", status)
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
