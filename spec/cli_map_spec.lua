-- `pzlua --map`, the shell's parallel map, run as a subprocess on real
-- pipelines: JSON in and out, raw lines, --spread, ordering, each shape of
-- executor and one that cannot be loaded, bad lines, exit statuses,
-- timeouts, retries, --halt, the joblog and --resume after a run killed
-- with SIGKILL, and Ctrl-C sent to the process group.
--
-- The interpreter under test is $PZLUA when set (the sanitizer pass), else
-- build/pzlua of this tree.
local core = require "parallelize.core"
local support = require "spec.support"

local quote, read, write = support.quote, support.read, support.write
local PZLUA = support.pzlua()
local SIGINT, SIGKILL = 2, 9

local cjson_ok, cjson = pcall(require, "cjson")
assert(cjson_ok, "these specs need lua-cjson (make deps installs it)")

local function lines_of(text)
  local t = {}
  for l in text:gmatch("([^\n]*)\n") do t[#t + 1] = l end
  return t
end

local function sorted(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c, function(a, b)
    if type(a) == type(b) then return a < b end
    return type(a) < type(b)
  end)
  return c
end

--- "1\n2\n...n\n"
local function numbers(n, first)
  local t = {}
  for i = first or 1, n do t[#t + 1] = tostring(i) end
  return table.concat(t, "\n") .. "\n"
end

-- The start of a script that runs `pzlua --map` itself (cli.main), with
-- its Run class at hand (to wrap a method) and raise() to signal itself.
local CLI_RUN_SCRIPT = [[
jit.off()
local ffi = require "ffi"
pcall(ffi.cdef, "int raise(int sig);")
local cli = require "parallelize.cli_map"
local Run
for i = 1, 100 do
  local name, v = debug.getupvalue(cli.main, i)
  if not name then break end
  if name == "Run" then Run = v end
end
]]

local dir
before_each(function() dir = support.tmpdir() end)
after_each(function() support.rmdir(dir) end)

--- Runs `pzlua --map args...` with `input` (text) as stdin, a regular file
-- (through a pipe with opts.pipe); opts.env: a shell prefix
-- ("LUA_PATH=..."). Returns stdout, stderr, the exit status and the
-- seconds it took.
local function map(args, input, opts)
  opts = opts or {}
  local quoted = {}
  for i, a in ipairs(args) do quoted[i] = quote(a) end
  local infile, errfile = dir .. "/stdin", dir .. "/stderr"
  write(infile, input or "")
  local stdin = opts.pipe and ("cat " .. quote(infile) .. " | ") or ""
  local redirect = opts.pipe and "" or (" < " .. quote(infile))
  local cmd = string.format("cd %s && %s%s %s --map %s%s 2> %s; echo \"EXIT:$?\"", quote(dir), stdin,
    opts.env or "", quote(PZLUA), table.concat(quoted, " "), redirect, quote(errfile))
  local t0 = core.now()
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  local took = core.now() - t0
  local body, status = out:match("^(.*)EXIT:(%d+)\n$")
  assert(body, "no exit status in: " .. out)
  return body, read(errfile) or "", tonumber(status), took
end

--- The JSON values of the output lines.
local function decoded(out)
  local t = {}
  for _, l in ipairs(lines_of(out)) do t[#t + 1] = cjson.decode(l) end
  return t
end

--- The entries of a joblog, whole lines only.
local function joblog(path)
  local t = {}
  for l in (read(path) or ""):gmatch("([^\n]*)\n") do
    local ok, e = pcall(cjson.decode, l)
    if ok and type(e) == "table" then t[#t + 1] = e end
  end
  return t
end

-- The messages start with the program's name, its path here.
local PREFIX = PZLUA:gsub("%p", "%%%0") .. " %-%-map: "

describe("pzlua --map", function()
  describe("JSON lines", function()
    it("calls the function on every record and writes each result as JSON", function()
      local input = '{"name":"ada","price":2.5,"qty":4}\n{"name":"bob","price":1,"qty":0}\n'
        .. '{"name":"cy","price":10,"qty":3}\n'
      local out, err, status = map({ "-j", "2",
        "function(r) return { name = r.name:upper(), total = r.price * r.qty } end" }, input)
      assert.are.same({ "", 0 }, { err, status })
      local got = decoded(out)
      table.sort(got, function(a, b) return a.name < b.name end)
      assert.are.same({ { name = "ADA", total = 10 }, { name = "BOB", total = 0 }, { name = "CY", total = 30 } }, got)
    end)

    it("writes nil as null, only the first result, and passes JSON null as parallelize.null", function()
      local out, err, status = map({ "-k", "function(x) if x == require('parallelize').null then return 'was null' end "
        .. "if x == 1 then return nil, 'second' end return x, 'second' end" }, '1\nnull\n"s"\n[1,2]\n')
      assert.are.same({ "", 0 }, { err, status })
      assert.are.same({ "null", '"was null"', '"s"', "[1,2]" }, lines_of(out))
    end)

    it("skips blank lines, which still count in the line numbers", function()
      local out, err, status = map({ "-k", "function(x) return x * 2 end" }, '1\n\n  \n2\n{oops\n')
      assert.are.same({ "2", "4" }, lines_of(out))
      assert.matches(PREFIX .. "line 5: not JSON: Expected object key string but found invalid token at "
        .. "character 2\n", err)
      assert.are.equal(1, status)
    end)

    it("fails a line that is not JSON with its number and cjson's message, and goes on", function()
      local out, err, status = map({ "function(x) return x + 1 end" }, '1\nnope\n2\n{"a":\n3\n')
      assert.are.same({ "2", "3", "4" }, sorted(lines_of(out)))
      assert.matches(PREFIX .. "line 2: not JSON: Expected value but found invalid token at character 1\n", err)
      assert.matches(PREFIX .. "line 4: not JSON: Expected value but found T_END at character 6\n", err)
      assert.matches(PREFIX .. "2 of 5 lines failed\n$", err)
      assert.are.equal(2, status)
    end)

    it("writes every number so that it reads back as the same double", function()
      -- lua-cjson stops at 14 significant digits: 3.1415926535898,
      -- 1718000000.1235 and 1.2345678901235e+16 for the first line.
      local input = '{"id":12345678901234567,"pi":3.141592653589793,"ts":1718000000.123456}\n'
        .. '[0.1,0.2,-0.0,1e300,5e-324,123456789012345,-7]\n'
      local out, err, status = map({ "-k", "function(r) if r.pi then return r end "
        .. "return { r[1] + r[2], r[3], r[4], r[5], r[6], r[7], 1 / 3, 2 ^ 53 } end" }, input)
      assert.are.same({ "", 0 }, { err, status })
      local got = lines_of(out)
      local first = cjson.decode(got[1])
      assert.are.same({ id = 12345678901234568, pi = 3.141592653589793, ts = 1718000000.123456 }, first)
      assert.matches('"pi":3.141592653589793', got[1], 1, true)
      assert.matches('"ts":1718000000.123456', got[1], 1, true)
      assert.matches('"id":12345678901234568', got[1], 1, true)
      assert.are.equal("[0.30000000000000004,-0,1e+300,4.9406564584125e-324,123456789012345,-7,"
        .. "0.3333333333333333,9007199254740992]", got[2])
    end)

    it("writes everything else as lua-cjson does, its escapes included", function()
      -- The same values through cjson.encode in the spec (numbers of 14
      -- digits or fewer, which both write alike; objects of one key, as
      -- two Lua states may order a table's keys differently).
      local records = {
        '["a/b\\u0001\\u007f\\"\\\\\\n\\t\\u00e9",[1,2,null,4],{},true,false]',
        '{"k1":[{"k2":{"k3":[[],[[]],{"x":-1.5}]}},{"2.5":2.5},{"1":"one"}]}',
        '[1,[2,[3,[4,[5]]]],"x",{"\\u0000k":null}]',
      }
      local out, err, status = map({ "-k", "function(r) return r end" }, table.concat(records, "\n") .. "\n")
      assert.are.same({ "", 0 }, { err, status })
      local got = lines_of(out)
      for i, line in ipairs(records) do
        assert.are.equal(cjson.encode(cjson.decode(line)), got[i])
      end
    end)

    it("writes a table with an integer key above 2^31 - 1 as an object", function()
      -- lua-cjson 2.1.0 keeps the largest key in an int: it wrote such
      -- tables as objects, and {[1] = 1, [2^31] = 2} as [1], a key lost.
      local out, err, status = map({ "-k", "function(x) if x == 1 then return { [2 ^ 31] = 1 } end "
        .. "return { 1, [2 ^ 31] = 2 } end" }, "1\n2\n")
      assert.are.same({ "", 0 }, { err, status })
      local got = lines_of(out)
      assert.are.equal('{"2147483648":1}', got[1])
      assert.are.same({ ["1"] = 1, ["2147483648"] = 2 }, cjson.decode(got[2]))
    end)

    it("fails a line whose result JSON cannot hold", function()
      local out, err, status = map({ "-k", "function(x) if x == 2 then return print end return x end" }, "1\n2\n3\n")
      assert.are.same({ "1", "3" }, lines_of(out))
      assert.matches(PREFIX .. "line 2: cannot write the result as JSON: Cannot serialise function: "
        .. "type not supported\n", err)
      assert.are.equal(1, status)
    end)

    it("fails with --spread an array too long to pass as arguments as bad input, not retried", function()
      local big = {}
      for i = 1, 9000 do big[i] = i end
      local input = "[" .. table.concat(big, ",", 1, 5000) .. "]\n[" .. table.concat(big, ",") .. "]\n"
      local out, err, status = map({ "-k", "--spread", "--retries", "3", "--joblog", "jobs.log",
        "function(...) return select('#', ...) end" }, input)
      assert.are.same({ "5000\n", 1 }, { out, status })
      assert.matches(PREFIX .. "line 2: %-%-spread: 9000 elements are too many to pass as arguments\n", err)
      local entries = joblog(dir .. "/jobs.log")
      table.sort(entries, function(a, b) return a.line < b.line end)
      assert.are.same({ "ok", "bad input" }, { entries[1].status, entries[2].status })
    end)

    it("spreads a JSON array into the arguments with --spread, and fails other lines", function()
      local out, err, status = map({ "-k", "--spread", "function(a, b, c) return { a, b, c == nil } end" },
        '[1,2]\n["x","y",3]\n{"a":1}\n[]\n')
      assert.are.same({ "[1,2,true]", '["x","y",false]', "[null,null,true]" }, lines_of(out))
      assert.matches(PREFIX .. "line 3: %-%-spread needs a JSON array\n", err)
      assert.are.equal(1, status)
    end)
  end)

  describe("--lines", function()
    it("passes raw lines, writes strings raw and other values as JSON", function()
      local out, err, status = map({ "-k", "--lines",
        "function(l) if l == '' then return nil end if l:match('^%d+$') then return tonumber(l) * 2 end "
        .. "if l == 'table' then return { l } end return '<' .. l .. '>' end" },
        '{"not":"parsed"}\n21\n\ntable\n  spaced  \n')
      assert.are.same({ "", 0 }, { err, status })
      assert.are.same({ '<{"not":"parsed"}>', "42", "null", '["table"]', "<  spaced  >" }, lines_of(out))
    end)

    it("keeps a line with NUL bytes whole, in its own place, the last line without its newline too", function()
      local out, err, status = map({ "-k", "--lines", "function(l) return #l .. ':' .. l end" },
        "a\0b\nc\n\0\nd\0")
      assert.are.same({ "3:a\0b\n1:c\n1:\0\n2:d\0\n", "", 0 }, { out, err, status })
      -- Not JSON, it fails under its own number, and the others go on.
      out, err, status = map({ "-k", "function(x) return x end" }, "1\n\0\n3\n", { pipe = true })
      assert.are.same({ "1\n3\n", 1 }, { out, status })
      assert.matches("^" .. PREFIX .. "line 2: not JSON: ", err)
    end)

    it("does not go with --spread", function()
      local out, err, status = map({ "--lines", "--spread", "function(x) return x end" }, "1\n")
      assert.are.same({ "", 255 }, { out, status })
      assert.matches("^" .. PREFIX .. "%-%-lines and %-%-spread do not go together\nusage: ", err)
    end)
  end)

  describe("ordering", function()
    -- Line 1 sleeps while the other worker runs every other line.
    local slow_first = "function(x) if x == 1 then require('parallelize').sleep(0.5) end return x end"

    it("writes results as calls finish by default", function()
      local out, _, status = map({ "-j", "2", slow_first }, numbers(20))
      local got = lines_of(out)
      assert.are.equal(0, status)
      local as_numbers = {}
      for i, v in ipairs(got) do as_numbers[i] = tonumber(v) end
      table.sort(as_numbers)
      assert.are.equal(table.concat(lines_of(numbers(20)), ","), table.concat(as_numbers, ","))
      assert.are.equal("1", got[#got])
    end)

    for _, flag in ipairs({ "-j2", "-k" }) do
      it(("writes a slow input's results as its lines come (%s)"):format(flag), function()
        -- Line 2 is written only once line 1's result is out: a map that
        -- read ahead before writing what finished would wait for ever
        -- (bounded here by `timeout`).
        local fifo = dir .. "/slow"
        assert(os.execute("mkfifo " .. quote(fifo)) == 0)
        os.execute(string.format("cd %s && (timeout 30 %s --map %s %s < slow > out 2> err; echo $? > status) "
          .. "> /dev/null 2>&1 &", quote(dir), quote(PZLUA), flag, quote("function(x) return x * 10 end")))
        local writer = assert(io.open(fifo, "w"))
        local closed = false
        finally(function() if not closed then writer:close() end end)
        for n = 1, 3 do
          writer:write(n, "\n")
          writer:flush()
          assert.is_truthy(support.eventually(function() return #lines_of(read(dir .. "/out") or "") >= n end, 20),
            "line " .. n .. "'s result did not come before the next line")
        end
        writer:close()
        closed = true
        local status = support.eventually(function() return tonumber(read(dir .. "/status") or "") end, 20)
        assert.are.equal(0, status, read(dir .. "/err"))
        assert.are.same({ "10", "20", "30" }, lines_of(read(dir .. "/out")))
      end)
    end

    it("writes them in input order with -k", function()
      for _, flag in ipairs({ "-k", "--keep-order" }) do
        local out, _, status = map({ "-j", "2", flag, slow_first }, numbers(20))
        assert.are.equal(0, status)
        assert.are.same(lines_of(numbers(20)), lines_of(out))
      end
    end)
  end)

  describe("executors", function()
    local function write_files()
      os.execute("mkdir -p " .. quote(dir .. "/lib/text"))
      write(dir .. "/lib/text/clean.lua", "local M = {}\nfunction M.upper(s) return s:upper() end\n"
        .. "M.nested = { trim = function(s) return (s:gsub('^%s+', '')) end }\nreturn M\n")
      write(dir .. "/lib/shout.lua", "return function(s) return s .. '!' end\n")
      write(dir .. "/table.lua", "return { double = function(x) return 2 * x end }\n")
      write(dir .. "/global.lua", "function triple(x) return 3 * x end\n")
      write(dir .. "/returns.lua", "local k = 4\nreturn function(x) return k * x end\n")
    end

    it("can be a module function, a file's function, a file, or an inline function", function()
      write_files()
      local env = "LUA_PATH=" .. quote(dir .. "/lib/?.lua;;") .. " "
      local cases = {
        { { "text.clean.upper", "--lines" }, "ab\n", "AB", env },
        { { "text.clean.nested.trim", "--lines" }, "  ab\n", "ab", env },
        { { "shout", "--lines" }, "hi\n", "hi!", env },
        { { "string.upper", "--lines" }, "hi\n", "HI" },
        { { "table.lua:double" }, "21\n", "42" },
        { { "global.lua:triple" }, "5\n", "15" },
        { { "returns.lua" }, "5\n", "20" },
        { { "./returns.lua" }, "6\n", "24" },
        { { "function (x) return x - 1 end" }, "5\n", "4" },
        { { "  function(x) return -x end" }, "5\n", "-5" },
      }
      for _, c in ipairs(cases) do
        local out, err, status = map(c[1], c[2], { env = c[4] })
        assert.are.same({ c[3] .. "\n", "", 0 }, { out, err, status }, c[1][1])
      end
    end)

    it("that cannot be loaded is one error, before any input is read", function()
      write_files()
      write(dir .. "/broken.lua", "return function(x) return x +\n")
      write(dir .. "/raises.lua", "error('no database here')\n")
      local cases = {
        { "nosuchmod.fn", "cannot load nosuchmod.fn: module 'nosuchmod' not found:" },
        { "table.lua:nope", "cannot load table.lua:nope: table.lua defines no function nope %(neither in the "
          .. "table it returns nor as a global%)" },
        { "table.lua", "cannot load table.lua: table.lua is not a function %(it is a table%)" },
        { "missing.lua", "cannot load missing.lua: cannot open missing.lua: No such file or directory" },
        { "broken.lua", "cannot load broken.lua: broken.lua:2: unexpected symbol near '<eof>'" },
        { "raises.lua:f", "cannot load raises.lua:f: raises.lua failed when run: raises.lua:1: no database here" },
        { "function(x) return x +", "cannot load the inline function: %(command line%):1: unexpected symbol "
          .. "near '<eof>'" },
        { "string.nope", "cannot load string.nope: module 'string' has no function nope" },
      }
      -- stdin is a FIFO opened for reading and writing: a read would wait for ever.
      local fifo = dir .. "/fifo"
      assert(os.execute("mkfifo " .. quote(fifo)) == 0)
      for _, c in ipairs(cases) do
        local t0 = core.now()
        local out = support.run(string.format("cd %s && timeout 20 %s --map %s <> %s 2>&1; echo \"EXIT:$?\"",
          quote(dir), quote(PZLUA), quote(c[1]), quote(fifo)))
        assert.matches("^" .. PREFIX .. c[2], out)
        assert.matches("\nEXIT:255\n$", out)
        assert.is_true(core.now() - t0 < 10, c[1] .. " waited for input")
      end
    end)

    it("that hangs as it loads is given up after --init-timeout, tried 5 times", function()
      write(dir .. "/hangs.lua", "while true do end\n")
      local out, err, status = map({ "-j", "2", "--init-timeout", "0.2", "hangs.lua:f" }, "1\n")
      assert.are.equal("", out)
      assert.are.equal(255, status)
      assert.matches("^" .. PREFIX .. "cannot load hangs.lua:f: worker %d died during initialization 5 times; "
        .. "the last time, pid %d+ was ended by the pool: it had not initialized within init_timeout %(0%.2 s%)\n$",
        err)
      local _, bad = map({ "--init-timeout", "0", "hangs.lua:f" }, "1\n")
      assert.matches("%-%-init%-timeout needs a number of seconds from 0%.001", bad)
    end)

    it("sends what the function prints to stderr, not among the results", function()
      local out, err, status = map({ "-j", "1", "function(x) print('debug ' .. x) io.write('more\\n') return x end" },
        "1\n2\n")
      assert.are.same({ "1\n2\n", 0 }, { out, status })
      assert.are.same({ "debug 1", "debug 2", "more", "more" }, sorted(lines_of(err)))
    end)
  end)

  describe("failures and exit statuses", function()
    it("names a line that kills its workers by its line number alone, not the pool's call number", function()
      -- Blank lines are skipped: line 5 is the pool's third call.
      local out, err, status = map({ "-k", "function(x) if x == 5 then os.exit(1) end return x end" },
        "1\n\n3\n\n5\n")
      assert.are.same({ "1\n3\n", 1 }, { out, status })
      assert.matches(PREFIX .. "line 5: killed 3 workers %(max_deaths = 3%); the last: worker %d %(pid %d+%) exited "
        .. "with status 1\n", err)
      assert.is_nil(err:find("call", 1, true), err)
    end)

    it("reports an error with its line number and exits with the number of failures", function()
      local out, err, status = map({ "-k", "function(x) if x % 3 == 0 then error('no multiples of 3', 0) end "
        .. "return x end" }, numbers(10))
      assert.are.same({ "1", "2", "4", "5", "7", "8", "10" }, lines_of(out))
      for _, n in ipairs({ 3, 6, 9 }) do
        assert.matches(PREFIX .. "line " .. n .. ": no multiples of 3\n", err)
      end
      assert.are.equal(3, status)
    end)

    it("shows an error object as JSON", function()
      local _, err, status = map({ "function(x) error({ code = x }) end" }, "7\n")
      assert.matches(PREFIX .. 'line 1: error object {"code":7}\n', err)
      assert.are.equal(1, status)
    end)

    it("caps the exit status at 101", function()
      local out, _, status = map({ "function(x) error('no') end" }, numbers(150))
      assert.are.same({ "", 101 }, { out, status })
    end)

    it("ends a call past --timeout with its worker, and goes on", function()
      local out, err, status, took = map({ "-k", "-j", "2", "--timeout", "0.3",
        "function(s) require('parallelize').sleep(s) return s end" }, "0.01\n30\n0.02\n0.01\n")
      assert.are.same({ "0.01", "0.02", "0.01" }, lines_of(out))
      assert.matches(PREFIX .. "line 2: timed out after 0.3 s\n", err)
      assert.are.equal(1, status)
      assert.is_true(took < 10, "took " .. took .. " s")
    end)

    it("runs a call that raised again with --retries, and counts the attempts", function()
      -- Fails the first time each line is seen (a file per line marks it).
      local flaky = string.format("function(x) local mark = %q .. '/seen' .. x "
        .. "local f = io.open(mark) if f then f:close() return x end "
        .. "io.open(mark, 'w'):close() error('first attempt', 0) end", dir)
      local out, err, status = map({ "--retries", "1", flaky }, numbers(6))
      assert.are.same({ "", 0 }, { err, status })
      assert.are.same(lines_of(numbers(6)), sorted(lines_of(out)))
      out, err, status = map({ "--retries", "2", "function(x) error('always', 0) end" }, "1\n")
      assert.are.equal("", out)
      assert.matches(PREFIX .. "line 1: always %(3 attempts%)\n", err)
      assert.are.equal(1, status)
    end)

    it("replaces each worker after --max-calls calls", function()
      local out, _, status = map({ "-j", "2", "--max-calls", "1",
        "function() return require('parallelize').getpid() end" }, numbers(6))
      assert.are.equal(0, status)
      local pids = {}
      for _, pid in ipairs(lines_of(out)) do
        assert.is_nil(pids[pid], "pid " .. pid .. " ran two calls")
        pids[pid] = true
      end
    end)
  end)

  describe("--halt", function()
    it("now: after N failures ends the running calls and stops, counting the lines not done", function()
      -- Every line sleeps 50 ms; 5 and 10 fail; line 11 would run for 30 s.
      local fn = "function(x) local pz = require('parallelize') if x == 11 then pz.sleep(30) end pz.sleep(0.05) "
        .. "if x % 5 == 0 then error('bad ' .. x, 0) end return x end"
      local out, err, status, took = map({ "-k", "-j", "2", "--halt", "now,fail=2", fn }, numbers(40))
      assert.are.equal(2, status)
      assert.is_true(took < 10, "took " .. took .. " s")
      local got = lines_of(out)
      for _, want in ipairs({ "1", "2", "3", "4", "6", "7", "8", "9" }) do
        assert.are.equal(want, table.remove(got, 1))
      end
      -- After those, at most line 12 (the other worker's) finished in time.
      assert.is_true(#got == 0 or (#got == 1 and got[1] == "12"), out)
      local done = #lines_of(out) + 2
      assert.matches(PREFIX .. "line 5: bad 5\n" .. PREFIX .. "line 10: bad 10\n" .. PREFIX
        .. "halted after 2 failures %(%-%-halt now,fail=2%): " .. (40 - done) .. " lines not done\n", err)
    end)

    it("soon: after N failures starts no other line and lets the running ones finish", function()
      -- Lines 2 and 3 fail; line 4, on the other worker, runs 0.6 s.
      local fn = "function(x) local pz = require('parallelize') pz.sleep(x == 4 and 0.6 or 0.05) "
        .. "if x == 2 or x == 3 then error('bad ' .. x, 0) end return x end"
      local out, err, status = map({ "-j", "2", "--halt", "soon,fail=2", fn }, numbers(2000), { pipe = true })
      assert.are.equal(2, status)
      local got = sorted(lines_of(out))
      -- 1 ran, 4 was running when the halt came and finished; 5 may have
      -- been handed to the first worker as 3 ended.
      assert.is_true(table.concat(got, " ") == "1 4" or table.concat(got, " ") == "1 4 5", out)
      -- The input comes through a pipe, and was not read to its end.
      local read_not_done = tonumber(err:match("halted after 2 failures %(%-%-halt soon,fail=2%): (%d+) lines "
        .. "read and not done, and the rest of the input not read\n"))
      assert.is_truthy(read_not_done, err)
      assert.is_true(read_not_done > 10 and read_not_done < 2000 - 4, err)
    end)
    it("with -k, writes and logs the lines that finished while an earlier one ran", function()
      -- Line 1 runs 0.5 s; the others finish meanwhile, held back for the
      -- order. Line 20 fails: what finished is written all the same.
      local log = dir .. "/jobs.log"
      local fn = "function(x) if x == 1 then require('parallelize').sleep(0.5) end "
        .. "if x == 20 then error('bad ' .. x, 0) end return x end"
      local out, err, status = map({ "-k", "-j", "2", "--halt", "soon,fail=1", "--joblog", log, fn }, numbers(40))
      assert.are.equal(1, status)
      assert.are.equal(numbers(19) .. numbers(40, 21), out)
      -- Nothing to rerun: no advice to.
      assert.matches(PREFIX .. "halted after 1 failures %(%-%-halt soon,fail=1%): 0 lines not done\n", err)
      assert.are.equal(40, #joblog(log))
    end)

    it("logs each line under its own number after a halt, blank lines between them", function()
      -- Blank lines count in the numbers but are no calls: value v is on
      -- line 2v - 1. Values 2 and 3 fail; 4 runs 0.6 s on the other worker
      -- and finishes after the halt, taken back when the pool stops.
      local log = dir .. "/jobs.log"
      local fn = "function(x) local pz = require('parallelize') pz.sleep(x == 4 and 0.6 or 0.05) "
        .. "if x == 2 or x == 3 then error('bad ' .. x, 0) end return x end"
      local input = numbers(200):gsub("\n", "\n\n")
      local out, err, status = map({ "-j", "2", "--halt", "soon,fail=2", "--joblog", log, fn }, input)
      assert.are.equal(2, status)
      assert.matches(PREFIX .. "line 3: bad 2\n", err)
      assert.matches(PREFIX .. "line 5: bad 3\n", err)
      local by_line = {}
      for _, e in ipairs(joblog(log)) do by_line[e.line] = e.status end
      assert.are.same("ok", by_line[1])
      assert.are.same("error", by_line[3])
      assert.are.same("error", by_line[5])
      assert.are.same("ok", by_line[7], "line 7 (value 4) finished after the halt: " .. read(log))
      for _, v in ipairs(decoded(out)) do
        assert.are.same("ok", by_line[2 * v - 1], "value " .. v .. " is not logged on line " .. (2 * v - 1))
      end
      for line in pairs(by_line) do assert.are.equal(1, line % 2, "an entry for blank line " .. line) end
    end)
  end)

  describe("memory", function()
    it("reads no further ahead than it can hold while its reader does not keep up", function()
      -- 150,000 lines (7 bytes each, out as in); for its first 2 s,
      -- stdout is read 4 KiB every 20 ms, far slower than the workers
      -- answer.
      local n = 150000
      write(dir .. "/stdin", numbers(100000 + n, 100001))
      local reader = "local core = require 'parallelize.core' local t0 = core.now() while true do "
        .. "local s = io.stdin:read(4096) if not s then break end io.stdout:write(s) io.stdout:flush() "
        .. "if core.now() - t0 < 2 then core.sleep(0.02) end end"
      os.execute(string.format("cd %s && ({ %s --map --lines 'function(l) return l end' < stdin & "
        .. "echo $! > pid; wait; } | %s -e %s > out; echo done > done) > /dev/null 2>&1 &",
        quote(dir), quote(PZLUA), quote(PZLUA), quote(reader)))
      local pid = support.eventually(function() return tonumber(read(dir .. "/pid") or "") end, 10)
      assert.is_truthy(pid, "the command did not start")
      core.sleep(1.5)
      local pos = tonumber((read("/proc/" .. pid .. "/fdinfo/0") or ""):match("pos:%s*(%d+)"))
      local out = #(read(dir .. "/out") or "")
      assert.is_truthy(pos, "cannot read the command's input position")
      -- Ahead of what the reader took: at most the pipe (64 KiB), a
      -- batch of output, stdio's buffer and the lines of one p:stream
      -- (4096 here): about 20,000 lines, 140 KB.
      assert.is_true(pos - out < 180000, "read " .. pos - out .. " bytes ahead of the reader")
      assert.is_truthy(support.eventually(function() return read(dir .. "/done") end, 60), "did not end")
      assert.are.equal(n, #lines_of(read(dir .. "/out")))
    end)

    it("writes big results in batches bounded in bytes, not only in lines", function()
      -- 1,200 results of 1 MiB each to /dev/null: batches of 1,024 lines
      -- alone held and copied a GiB at a time (1.46 GB at the peak);
      -- bounded in bytes, the peak stays about 130 MB (more under
      -- AddressSanitizer, whose quarantine keeps 256 MB of freed memory).
      -- The peak is the largest child's of a process that runs nothing
      -- else: getrusage(RUSAGE_CHILDREN) in a pzlua that runs the command.
      write(dir .. "/stdin", numbers(1200))
      local cmd = string.format("cd %s && %s --map -j 2 --lines %s < stdin > /dev/null", quote(dir), quote(PZLUA),
        quote("function(l) return string.rep('y', 1048576) end"))
      local probe = "local ffi = require 'ffi' ffi.cdef[[ struct pz_ru { long t[4]; long maxrss; long rest[13]; }; "
        .. "int getrusage(int who, struct pz_ru *u); ]] "
        .. "local ok = os.execute(" .. string.format("%q", cmd) .. ") "
        .. "local u = ffi.new('struct pz_ru') assert(ffi.C.getrusage(-1, u) == 0) "
        .. "io.write(tostring(ok), ' ', tonumber(u.maxrss), '\\n')"
      local f = assert(io.popen(quote(PZLUA) .. " -e " .. quote(probe)))
      local out = f:read("*a")
      f:close()
      local status, kib = out:match("^(%S+) (%d+)\n$")
      assert.are.equal("0", status, out)
      assert.is_true(tonumber(kib) < 600 * 1024, "peak RSS " .. kib .. " KiB")
    end)
  end)

  describe("the joblog", function()
    it("has one JSON line per finished line: line, pid, start, seconds, status, error", function()
      local log = dir .. "/jobs.log"
      local before = os.time()
      local out, _, status = map({ "-j", "2", "--timeout", "0.5", "--joblog", log, "function(x) "
        .. "local pz = require('parallelize') pz.sleep(x == 3 and 10 or 0.05) "
        .. "if x == 2 then error('two', 0) end return { x, pz.getpid() } end" }, "1\n2\n3\nnope\n5\n")
      local after = os.time()
      assert.are.equal(3, status)
      local pid_of = {}
      for _, r in ipairs(decoded(out)) do pid_of[r[1]] = r[2] end
      local entries = joblog(log)
      assert.are.equal(5, #entries)
      local by_line = {}
      for _, e in ipairs(entries) do
        assert.is_nil(by_line[e.line], "line " .. e.line .. " logged twice")
        by_line[e.line] = e
      end
      for _, n in ipairs({ 1, 5 }) do
        local e = by_line[n]
        assert.are.same({ "ok", cjson.null, pid_of[n] }, { e.status, e.error, e.pid })
        assert.is_true(e.start >= before - 1 and e.start <= after + 1, "start " .. e.start)
        assert.is_true(e.seconds >= 0.05 and e.seconds < 5, "seconds " .. e.seconds)
      end
      local e = by_line[2]
      assert.are.same({ "error", "two" }, { e.status, e.error })
      assert.is_true(e.pid > 0 and e.start >= before - 1 and e.seconds >= 0.05)
      e = by_line[3]
      assert.are.same({ "timeout", "timed out after 0.5 s", cjson.null, cjson.null, 0.5 },
        { e.status, e.error, e.pid, e.start, e.seconds })
      e = by_line[4]
      assert.are.same({ "bad input", "not JSON: Expected value but found invalid token at character 1" },
        { e.status, e.error })
    end)

    it("logs every line once under its own number, past thousands in flight", function()
      -- Blank lines count in the numbers but are no calls: value v is on
      -- line 2v - 1; some lines take longer, so results come out of order.
      local log = dir .. "/jobs.log"
      local n = 30000
      local fn = "function(x) if x % 997 == 0 then require('parallelize').sleep(0.002) end return x end"
      local out, _, status = map({ "-j", "2", "--joblog", log, fn }, (numbers(n):gsub("\n", "\n\n")))
      assert.are.equal(0, status)
      local values = decoded(out)
      assert.are.equal(n, #values)
      local entries = joblog(log)
      assert.are.equal(n, #entries)
      local logged = {}
      for _, e in ipairs(entries) do
        assert.are.equal("ok", e.status)
        assert.is_nil(logged[e.line], "line " .. e.line .. " logged twice")
        logged[e.line] = true
      end
      for v = 1, n do assert.is_true(logged[2 * v - 1], "line " .. (2 * v - 1) .. " not logged") end
    end)

    it("is started afresh without --resume", function()
      local log = dir .. "/jobs.log"
      write(log, '{"line":1,"pid":1,"start":1,"seconds":1,"status":"ok","error":null}\n')
      local out, _, status = map({ "--joblog", log, "function(x) return x end" }, "7\n")
      assert.are.same({ "7\n", 0 }, { out, status })
      local entries = joblog(log)
      assert.are.equal(1, #entries)
      assert.are.equal("ok", entries[1].status)
      assert.are.equal(1, entries[1].line)
      assert.are_not.equal(1, entries[1].pid)
    end)

    it("--resume skips the lines done, ignoring a torn last line and ending it", function()
      local log = dir .. "/jobs.log"
      local torn = '{"line":4,"pid":12'
      write(log, '{"line":1,"pid":1,"start":1,"seconds":0,"status":"ok","error":null}\n'
        .. '{"line":2,"pid":1,"start":1,"seconds":0,"status":"error","error":"x"}\n'
        .. '{"line":3,"pid":1,"start":1,"seconds":0,"status":"ok","error":null}\n' .. torn)
      local out, _, status = map({ "-k", "--joblog", log, "--resume", "function(x) return x * 10 end" },
        numbers(6))
      assert.are.same({ "40\n50\n60\n", 0 }, { out, status })
      local text = read(log)
      assert.are.equal(1, select(2, text:gsub("\n" .. torn:gsub("%p", "%%%0") .. "\n", "")), text)
      local lines = {}
      for _, e in ipairs(joblog(log)) do lines[#lines + 1] = e.line end
      assert.are.same({ 1, 2, 3, 4, 5, 6 }, sorted(lines))
    end)

    it("--resume takes a line number past 2^32 in a joblog as that line, not another", function()
      -- Kept in 32 bits, line 2^32 + 2 stood for line 2, which was then
      -- skipped; and 1e300 made a bitset of half a GiB.
      local log = dir .. "/jobs.log"
      write(log, '{"line":4294967298,"status":"ok"}\n{"line":1e300,"status":"ok"}\n'
        .. '{"line":2147483648,"status":"ok"}\n{"line":3,"status":"ok"}\n')
      local out, _, status = map({ "-k", "--joblog", log, "--resume", "function(x) return x * 10 end" },
        numbers(4))
      assert.are.same({ "10\n20\n40\n", 0 }, { out, status })
      local set = require("parallelize.cli_map_joblog").new_lines()
      -- (2^26 and below in a bitset, of 8 MiB at most; above, a table)
      local lines = { 1, 2 ^ 26 - 1, 2 ^ 26, 2 ^ 26 + 1, 2 ^ 31, 2 ^ 32 + 1, 2 ^ 53, 1e300 }
      for _, n in ipairs(lines) do set:add(n) end
      for _, n in ipairs(lines) do assert.is_true(set:has(n), tostring(n)) end
      for _, n in ipairs({ 2, 2 ^ 26 - 2, 2 ^ 26 + 2, 2 ^ 31 + 1, 2 ^ 32, 2 ^ 32 + 2 }) do
        assert.is_false(set:has(n), tostring(n))
      end
      assert.are.equal(#lines, set.count)
    end)

    it("--resume-failed runs again the lines that failed", function()
      local log = dir .. "/jobs.log"
      write(log, '{"line":1,"pid":1,"start":1,"seconds":0,"status":"ok","error":null}\n'
        .. '{"line":2,"pid":1,"start":1,"seconds":0,"status":"error","error":"x"}\n'
        .. '{"line":3,"pid":null,"start":null,"seconds":1,"status":"timeout","error":"t"}\n')
      local out, _, status = map({ "-k", "--joblog", log, "--resume-failed", "function(x) return x end" },
        numbers(4))
      assert.are.same({ "2\n3\n4\n", 0 }, { out, status })
    end)

    it("--resume says in one line why the joblog cannot be read", function()
      local out, err, status = map({ "--joblog", ".", "--resume", "function(x) return x end" }, numbers(2))
      assert.are.same({ "", PZLUA .. " --map: cannot read the joblog: .: Is a directory\n", 255 }, { out, err, status })
    end)
  end)

  describe("a run cut short", function()
    --- Starts `pzlua --map args` in a session of its own (its own process
    -- group, as a terminal's job), stdin the file `input`; returns the
    -- job's pid, its group and the paths of its output, stderr and exit
    -- status (written when it ends).
    --- Starts `pzlua --map args...` on input in a session of its own;
    -- `ignored` (a string of signal names, "INT" by default) are the
    -- signals it starts with ignored.
    local function start(args, input, ignored)
      local quoted = {}
      for i, a in ipairs(args) do quoted[i] = quote(a) end
      local job = { out = dir .. "/out", err = dir .. "/err", status = dir .. "/status" }
      write(dir .. "/stdin", input)
      local script = string.format("trap '' %s; echo $$ > pgid; %s --map %s < stdin > out 2> err & "
        .. "echo $! > pid; wait $!; echo $? > status.tmp; mv status.tmp status", ignored or "INT", quote(PZLUA),
        table.concat(quoted, " "))
      os.execute(string.format("cd %s && setsid sh -c %s > /dev/null 2>&1 < /dev/null &", quote(dir), quote(script)))
      assert.is_truthy(support.eventually(function()
        job.pid, job.pgid = tonumber(read(dir .. "/pid") or ""), tonumber(read(dir .. "/pgid") or "")
        return job.pid and job.pgid
      end, 10), "the job did not start")
      return job
    end

    local function wait_status(job)
      local status = support.eventually(function() return tonumber(read(job.status) or "") end, 30)
      assert.is_truthy(status, "the job did not end")
      return status
    end

    --- Waits until the job's output has at least n lines.
    local function wait_output(job, n)
      assert.is_truthy(support.eventually(function()
        return #lines_of(read(job.out) or "") >= n
      end, 30), "no output")
    end

    --- The set of line numbers in a list of entries or numbers.
    local function set_of(list)
      local t = {}
      for _, v in ipairs(list) do t[tonumber(type(v) == "table" and v.line or v)] = true end
      return t
    end

    local function pids_of(entries)
      local t = {}
      for _, e in ipairs(entries) do if type(e.pid) == "number" then t[e.pid] = true end end
      return t
    end

    local function all_gone(pids)
      return support.eventually(function()
        for pid in pairs(pids) do
          if support.alive(pid) then return false end
        end
        return true
      end, 5)
    end

    it("killed with SIGKILL, a rerun with --resume runs exactly the lines its joblog lacks", function()
      local n = 2000
      local fn = "function(x) require('parallelize').sleep(0.001) return x end"
      local job = start({ "-j", "2", "--joblog", "jobs.log", fn }, numbers(n))
      wait_output(job, 100)
      assert.is_true(support.kill(job.pid, SIGKILL))
      assert.are.equal(128 + SIGKILL, wait_status(job))
      -- Whole entries, then at most one torn line.
      local text = read(dir .. "/jobs.log")
      local entries = joblog(dir .. "/jobs.log")
      assert.are.equal(#entries, select(2, text:gsub("\n", "")))
      assert.is_true(#entries >= 100 and #entries < n, #entries .. " entries")
      assert.is_true(all_gone(pids_of(entries)), "workers outlived their parent")
      -- Every line logged had its output written first.
      local first_out = set_of(lines_of(read(job.out)))
      local logged = set_of(entries)
      for line in pairs(logged) do assert.is_true(first_out[line], "line " .. line .. " logged, not written") end
      -- The rerun: exactly the others, each once.
      local out, err, status = map({ "-j", "2", "--joblog", "jobs.log", "--resume", fn }, numbers(n))
      assert.are.same({ "", 0 }, { err, status })
      local rerun = lines_of(out)
      local seen = {}
      for _, v in ipairs(rerun) do
        local line = tonumber(v)
        assert.is_nil(seen[line], "line " .. line .. " ran twice in the rerun")
        assert.is_nil(logged[line], "line " .. line .. " was done already")
        seen[line] = true
      end
      assert.are.equal(n - #entries, #rerun)
      local all = set_of(joblog(dir .. "/jobs.log"))
      for i = 1, n do assert.is_true(all[i], "line " .. i .. " is not in the joblog") end
    end)

    --- Runs a map of 300 lines, stops it with send(job) once 20 lines are
    -- out, and checks that it ended with `status` at once, saying "<how>:
    -- D lines done, N lines not done", that the D lines are written and
    -- logged, no worker is left, and a --resume runs exactly the N others.
    local function stops_and_resumes(send, status, how)
      local n = 300
      local fn = "function(x) require('parallelize').sleep(0.01) return x end"
      local job = start({ "-j", "2", "--joblog", "jobs.log", fn }, numbers(n))
      wait_output(job, 20)
      local sent = core.now()
      assert.is_true(send(job))
      assert.are.equal(status, wait_status(job))
      assert.is_true(core.now() - sent < 5, "took " .. (core.now() - sent) .. " s")
      local err = read(job.err)
      local done, not_done = err:match(how .. ": (%d+) lines done, (%d+) lines not done; "
        .. "rerun with %-%-resume %-%-joblog jobs%.log to finish them\n")
      assert.is_truthy(done, err)
      done, not_done = tonumber(done), tonumber(not_done)
      assert.are.equal(n, done + not_done)
      assert.is_true(not_done > 0)
      local entries = joblog(dir .. "/jobs.log")
      assert.are.equal(done, #lines_of(read(job.out)))
      assert.are.equal(done, #entries)
      assert.is_true(all_gone(pids_of(entries)), "workers outlived the command")
      local out, _, rerun_status = map({ "-j", "2", "--joblog", "jobs.log", "--resume", fn }, numbers(n))
      assert.are.equal(0, rerun_status)
      assert.are.equal(not_done, #lines_of(out))
      local all = set_of(joblog(dir .. "/jobs.log"))
      for i = 1, n do assert.is_true(all[i], "line " .. i .. " is not in the joblog") end
    end

    it("Ctrl-C stops at once, says how many lines were not done, and --resume finishes them", function()
      stops_and_resumes(function(job) return support.kill(-job.pgid, SIGINT) end, 130, "interrupted")
    end)

    for _, case in ipairs({ { name = "SIGTERM", number = 15 }, { name = "SIGHUP", number = 1 } }) do
      it(case.name .. " stops it as Ctrl-C does, with status " .. 128 + case.number, function()
        stops_and_resumes(function(job) return support.kill(job.pid, case.number) end, 128 + case.number,
          "stopped by " .. case.name)
      end)
    end

    it("takes SIGTERM sent twice at once, as timeout(1) sends it, as one request", function()
      -- timeout(1) signals the command and then its process group, a few
      -- microseconds apart. The second used to kill the run outright once
      -- the first had been handled (7 runs of 16 under `timeout 1 pzlua
      -- --map`): no message, the batch it held not written. Here the
      -- second comes 2 ms after the first, while this run (-k, 200,000
      -- lines of 1 ms) is still stopping: counting the lines not done
      -- reads the rest of its input.
      local n = 200000
      local job = start({ "-j", "2", "-k", "function(x) require('parallelize').sleep(0.001) return x end" },
        numbers(n))
      wait_output(job, 20)
      core.sleep(0.4)
      assert.is_true(support.kill(job.pid, 15))
      core.sleep(0.002)
      support.kill(job.pid, 15)
      assert.are.equal(143, wait_status(job))
      local err = read(job.err)
      local done, not_done = err:match("stopped by SIGTERM: (%d+) lines done, (%d+) lines not done\n")
      assert.is_truthy(done, err)
      assert.are.equal(n, tonumber(done) + tonumber(not_done))
      assert.are.equal(tonumber(done), #lines_of(read(job.out)))
    end)

    it("keeps SIGHUP ignored when it started with it ignored (nohup)", function()
      local n = 100
      local fn = "function(x) require('parallelize').sleep(0.01) return x end"
      local job = start({ "-j", "2", fn }, numbers(n), "INT HUP")
      wait_output(job, 10)
      assert.is_true(support.kill(job.pid, 1))
      assert.are.equal(0, wait_status(job))
      assert.are.equal(n, #lines_of(read(job.out)))
      assert.are.equal("", read(job.err))
    end)

    it("writes, logs and counts what is done when Ctrl-C comes as --halt soon waits for a call", function()
      -- Ctrl-C lands in the p:stop that lets the running calls finish.
      -- The pool was stopped then, which the run took for one stopped
      -- before any input was read: it said so, and wrote neither the
      -- batch it held nor the lines that finished meanwhile. And it
      -- waited for the running call: Ctrl-C ends it now.
      local n = 10
      local fn = "function(x) if x == 1 then require('parallelize').sleep(60) end "
        .. "if x == 3 then error('bad') end return x end"
      local job = start({ "-j", "2", "--halt", "soon,fail=1", "--joblog", "jobs.log", fn }, numbers(n))
      assert.is_truthy(support.eventually(function() return (read(job.err) or ""):find("line 3:") end, 10))
      core.sleep(0.2)
      assert.is_true(support.kill(-job.pgid, SIGINT))
      assert.are.equal(130, wait_status(job)) -- within 30 s, not 60
      local err = read(job.err)
      local done, not_done = err:match("interrupted: (%d+) lines done, (%d+) lines not done")
      assert.is_truthy(done, err)
      done, not_done = tonumber(done), tonumber(not_done)
      assert.are.equal(n, done + not_done)
      assert.are.equal(done, #lines_of(read(job.out)) + 1)
      assert.are.equal(done, #joblog(dir .. "/jobs.log"))
    end)

    it("counts the line being read when Ctrl-C came among the lines not done", function()
      -- Ctrl-C while core.read_line reads line 300 of a regular file: the
      -- hook fires at the first instruction after the read, the line
      -- taken from stdin and not yet counted. It used to be in neither
      -- count (done + not done one short of the input: 3 runs in 80 of
      -- a -k map of 200,000 lines stopped by SIGTERM).
      local n = 1000
      write(dir .. "/stdin", numbers(n))
      write(dir .. "/cut.lua", [[
        local ffi = require "ffi"
        pcall(ffi.cdef, "int raise(int sig);")
        local core = require "parallelize.core"
        local real, calls = core.read_line, 0
        local function wrapped(f, ...)
          local text, err, code = real(f, ...)
          if f == io.stdin then
            calls = calls + 1
            if calls == 300 then ffi.C.raise(2) end
          end
          return text, err, code
        end
        jit.off(wrapped)
        core.read_line = wrapped
        -- true: the state is closed, as pzlua --map closes it (under
        -- AddressSanitizer, what it holds would be reported as leaks)
        os.exit(require("parallelize.cli_map").main("pzlua", "-j", "2", "-k", "function(x) return x end"), true)
      ]])
      local cmd = string.format("cd %s && %s cut.lua < stdin > out 2> err; echo $?", quote(dir), quote(PZLUA))
      local p = assert(io.popen(cmd))
      local status = tonumber(p:read("*a"))
      p:close()
      assert.are.equal(130, status)
      local err = read(dir .. "/err")
      local done, not_done = err:match("interrupted: (%d+) lines done, (%d+) lines not done\n")
      assert.is_truthy(done, err)
      assert.are.equal(tonumber(done), #lines_of(read(dir .. "/out")))
      assert.are.equal(n, tonumber(done) + tonumber(not_done))
    end)

    it("stops on a Ctrl-C that came while --resume read the joblog, and drops none of its entries", function()
      -- SIGINT raised as the joblog's third entry is decoded: the hook
      -- fires at the next call or return, inside read_done's
      -- pcall(cjson.decode). Taken for a torn entry, it dropped line 3
      -- from the lines done (run again: written twice) and the signal
      -- with it (the run went on, status 0); outside that pcall, it was
      -- a traceback and status 255.
      write(dir .. "/stdin", numbers(6))
      local entries = {}
      for line = 1, 5 do entries[line] = string.format('{"line":%d,"status":"ok"}\n', line) end
      write(dir .. "/jobs.log", table.concat(entries))
      write(dir .. "/cut.lua", [[
        local ffi = require "ffi"
        pcall(ffi.cdef, "int raise(int sig);")
        local cjson = require "cjson"
        local real, calls = cjson.decode, 0
        local function wrapped(text)
          calls = calls + 1
          if calls == 3 then ffi.C.raise(2) end
          return real(text)
        end
        jit.off(wrapped)
        cjson.decode = wrapped
        os.exit(require("parallelize.cli_map").main("pzlua", "--joblog", "jobs.log", "--resume",
          "function(x) return x end"), true)
      ]])
      local cmd = string.format("cd %s && %s cut.lua < stdin > out 2> err; echo $?", quote(dir), quote(PZLUA))
      local p = assert(io.popen(cmd))
      local status = tonumber(p:read("*a"))
      p:close()
      assert.are.same({ 130, "pzlua --map: interrupted before any input was read\n", "" },
        { status, read(dir .. "/err"), read(dir .. "/out") })
      -- and the joblog is as it was: a rerun runs line 6 alone
      local out = map({ "--joblog", "jobs.log", "--resume", "function(x) return x end" }, numbers(6))
      assert.are.equal("6\n", out)
    end)

    it("logs every line under its own number when Ctrl-C came as the line numbers' slots grew", function()
      -- The first time the slots that map stream positions to line
      -- numbers grow (-j 2: past 1024 lines in flight), SIGINT is raised
      -- K instructions in. Moved one by one into arrays already in place,
      -- the positions not yet moved were lost: their lines written, and
      -- logged as line 0, which --resume does not know, so they ran again.
      local n = 20000
      write(dir .. "/stdin", numbers(n))
      write(dir .. "/cut.lua", CLI_RUN_SCRIPT .. [[
        local real, armed = Run.note_line, true
        Run.note_line = function(self, i, line)
          if armed and self.slot_pos[i % self.slots + 1] then
            armed = false
            debug.sethook(function() debug.sethook() ffi.C.raise(2) end, "", tonumber(arg[1]))
          end
          return real(self, i, line)
        end
        os.exit(cli.main("pzlua", "-j", "2", "--joblog", "jobs.log", "function(x) return x end"), true)
      ]])
      for _, k in ipairs({ 15000, 20000, 25000 }) do
        os.remove(dir .. "/jobs.log")
        local cmd = string.format("cd %s && %s cut.lua %d < stdin > out 2> err; echo $?", quote(dir), quote(PZLUA), k)
        local p = assert(io.popen(cmd))
        local status = tonumber(p:read("*a"))
        p:close()
        assert.are.equal(130, status, read(dir .. "/err"))
        local written = {}
        for _, v in ipairs(lines_of(read(dir .. "/out"))) do written[#written + 1] = tonumber(v) end
        local logged = {}
        for _, e in ipairs(joblog(dir .. "/jobs.log")) do logged[#logged + 1] = e.line end
        assert.are.same(sorted(written), sorted(logged))
      end
    end)
  end)

  describe("output that cannot be written", function()
    --- Runs `pzlua --map args...` on the numbers 1..n (a regular file),
    -- its stdout sent by `redirect` (a shell redirection or "| cmd", with
    -- SIGPIPE ignored, as under a program that ignores it); returns
    -- stderr and the exit status.
    local function map_to(redirect, n, args)
      local quoted = {}
      for i, a in ipairs(args) do quoted[i] = quote(a) end
      write(dir .. "/stdin", numbers(n))
      local cmd = string.format("cd %s && trap '' PIPE && { %s --map %s < stdin 2> err; echo $? > status; } %s",
        quote(dir), quote(PZLUA), table.concat(quoted, " "), redirect)
      os.execute(cmd)
      return read(dir .. "/err") or "", tonumber(read(dir .. "/status") or "")
    end

    local fn = "function(x) return x end"

    it("is one message and status 255, the lines not done counted: a full disk, a broken pipe", function()
      local err, status = map_to("> /dev/full", 3, { fn })
      assert.are.same({ PZLUA .. " --map: cannot write the output: No space left on device\n"
        .. PZLUA .. " --map: stopped: 3 lines not done\n", 255 }, { err, status })
      -- The joblog cannot be written, the output can: the lines of the
      -- batch whose output went out are not among the lines not done, and
      -- are said to be the output's last, which --resume runs again.
      err, status = map_to("> out", 3, { "--joblog", "/dev/full", fn })
      assert.are.equal(255, status)
      local left, rerun, unlogged = err:match("^" .. PREFIX .. "cannot write the joblog /dev/full: No space left "
        .. "on device\n" .. PREFIX .. "stopped: (%d+) lines not done([^\n]*); the output's last (%d+) lines went out, "
        .. "but not all their joblog entries: %-%-resume runs those lines again\n$")
      assert.is_truthy(left, err)
      assert.are.equal(#lines_of(read(dir .. "/out")), tonumber(unlogged))
      assert.are.equal(3, tonumber(left) + tonumber(unlogged))
      assert.are.equal(left == "0" and "" or "; rerun with --resume --joblog /dev/full to finish them", rerun)
      -- The reader is gone: what the joblog holds and what is said not
      -- done make the whole input.
      local n = 30000
      err, status = map_to("| true", n, { "--joblog", "jobs.log", fn })
      assert.are.equal(255, status)
      local not_done = err:match("^" .. PREFIX .. "cannot write the output: Broken pipe\n"
        .. PREFIX .. "stopped: (%d+) lines not done; rerun with %-%-resume %-%-joblog jobs%.log to finish them\n$")
      assert.is_truthy(not_done, err)
      assert.are.equal(n, #joblog(dir .. "/jobs.log") + tonumber(not_done))
    end)

    it("an input that cannot be read is not said to have no lines left", function()
      local cmd = string.format("cd %s && %s --map %s < . > out 2> err; echo $? > status", quote(dir), quote(PZLUA),
        quote(fn))
      os.execute(cmd)
      assert.are.same({ PZLUA .. " --map: cannot read the input: Is a directory\n"
        .. PZLUA .. " --map: stopped: 0 lines read and not done, and the rest of the input not read\n", 255 },
        { read(dir .. "/err"), tonumber(read(dir .. "/status")) })
    end)
  end)

  describe("the command line", function()
    it("rejects what it does not understand, naming it, with status 255", function()
      local cases = {
        { {}, "no executor given" },
        { { "--bogus", "f.lua" }, "unknown option '%-%-bogus'" },
        { { "-j", "0", "f.lua" }, "%-j needs an integer from 1 to 100000 %(got '0'%)" },
        { { "-jx", "f.lua" }, "%-j needs an integer from 1 to 100000 %(got 'x'%)" },
        { { "f.lua", "--timeout" }, "%-%-timeout needs a value" },
        { { "--timeout=soon", "f.lua" }, "%-%-timeout needs a number of seconds from 0.001 to 4000000 %(got 'soon'%)" },
        { { "--timeout=nan", "f.lua" }, "%-%-timeout needs a number of seconds from 0.001 to 4000000 %(got 'nan'%)" },
        { { "--init-timeout", "inf", "f.lua" }, "%-%-init%-timeout needs a number of seconds from 0.001 to "
          .. "4000000 %(got 'inf'%)" },
        { { "--halt", "later,fail=1", "f.lua" }, "%-%-halt needs now,fail=N or soon,fail=N with N at least 1 "
          .. "%(got 'later,fail=1'%)" },
        { { "--resume", "f.lua" }, "%-%-resume needs %-%-joblog FILE" },
        { { "-k=1", "f.lua" }, "unknown option '%-k=1'" },
        { { "--keep-order=1", "f.lua" }, "%-%-keep%-order takes no value" },
        { { "f.lua", "g.lua" }, "one executor only: 'f.lua' and 'g.lua'" },
        { { "1abc" }, "'1abc' is not an executor" },
      }
      for _, c in ipairs(cases) do
        local out, err, status = map(c[1], "1\n")
        assert.are.same({ "", 255 }, { out, status }, c[2])
        assert.matches("^" .. PREFIX .. c[2] .. ".*\nusage: .* %-%-map EXECUTOR %[options%] < inputs > outputs", err)
      end
    end)

    it("prints its help with --help", function()
      local out, err, status = map({ "--help" }, "")
      assert.are.same({ "", 0 }, { err, status })
      assert.matches("^usage: pzlua %-%-map EXECUTOR %[options%] < inputs > outputs\n", out)
      assert.matches("\n  %-%-halt now,fail=N ", out)
    end)

    it("must come first on pzlua's command line", function()
      local out = support.run(quote(PZLUA) .. " -e 1 --map f.lua")
      assert.matches(": '%-%-map' must come first\nusage: ", out)
    end)

    it("says in one line that lua-cjson is missing", function()
      local out, err, status = map({ "function(x) return x end" }, "1\n", { env = "LUA_CPATH=/nonexistent/?.so " })
      assert.are.same({ "", PZLUA .. " --map: lua-cjson is not installed (module 'cjson' not found; "
        .. "Debian: apt-get install lua-cjson)\n", 255 }, { out, err, status })
    end)

    it("draws the pool's progress on stderr with --progress", function()
      local out, err, status = map({ "--progress", "function(x) return x end" }, numbers(5))
      assert.are.equal(0, status)
      assert.are.equal(5, #lines_of(out))
      assert.matches("\n?5/5 calls %(100%%%), [%d.]+/s, ETA 0s, 0 errors\n$", err)
    end)
  end)
end)

describe("pzlua --map failing, then interrupted while it stops", function()
  -- The run fails (its output cannot be written); Ctrl-C lands in the
  -- cut-short that follows. cut_short_protected's pcall, there for a lack
  -- of memory, took it for one: tried again, status 255, not a word.
  it("exits 130 and says so", function()
    write(dir .. "/stdin", numbers(2000))
    write(dir .. "/cut.lua", CLI_RUN_SCRIPT .. [[
      local real, armed = Run.cut_short, true
      Run.cut_short = function(...)
        if armed then
          armed = false
          debug.sethook(function() debug.sethook() ffi.C.raise(2) end, "", tonumber(arg[1]))
        end
        return real(...)
      end
      os.exit(cli.main("pzlua", "-j", "2", "function(x) return x end"), true)
    ]])
    for _, k in ipairs({ 1, 100, 1000 }) do
      local cmd = string.format("cd %s && %s cut.lua %d < stdin > /dev/full 2> err; echo $?", quote(dir),
        quote(PZLUA), k)
      local p = assert(io.popen(cmd))
      local status = tonumber(p:read("*a"))
      p:close()
      local err = read(dir .. "/err")
      assert.are.equal(130, status, err)
      assert.matches("cannot write the output", err, 1, true)
      assert.matches("interrupted while stopping", err, 1, true)
    end
  end)
end)
