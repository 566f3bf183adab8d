-- core.read_line: a line of a Lua file, every byte up to a newline, NUL
-- bytes and all, gathered in a buffer kept from call to call (src/lreadline.c).
-- `pzlua --map` reads its input with it; cli_map_spec covers a read that
-- Ctrl-C interrupts.
local core = require "parallelize.core"
local support = require "spec.support"

local read_line = core.read_line

--- A file holding `text`, opened for reading.
local function file_with(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  f = assert(io.open(path, "rb"))
  os.remove(path)
  return f
end

--- Every read_line of f until the end: a list of {text, whole}.
local function all_lines(f)
  local got = {}
  while true do
    local text, whole = read_line(f)
    if text == nil then break end
    got[#got + 1] = { text, whole }
  end
  return got
end

describe("core.read_line", function()
  it("gives every byte up to each newline, NUL bytes and carriage returns too", function()
    local f = file_with("one\n\0two\0\n\nthree\r\nlast")
    assert.are.same({ { "one", true }, { "\0two\0", true }, { "", true }, { "three\r", true }, { "last", true } },
      all_lines(f))
    assert.is_nil(read_line(f)) -- the end stays the end
    f:close()
  end)

  it("gives nothing for an empty file, and raises for a closed one", function()
    local f = file_with("")
    assert.is_nil(read_line(f))
    f:close()
    assert.has_error(function() read_line(f) end, "read_line: the file is closed")
  end)

  it("reads lines far longer than the file's buffer whole, and short ones after them", function()
    local long = {}
    for i = 1, 5 do long[i] = string.rep(string.char(96 + i), (i * 997 * 1024) % (3 * 1024 * 1024) + 1) end
    local text = table.concat({ long[1], "short", long[2], long[3], "x", long[4], long[5] }, "\n") .. "\n"
    local f = file_with(text)
    local got = all_lines(f)
    f:close()
    local want = { long[1], "short", long[2], long[3], "x", long[4], long[5] }
    assert.are.equal(#want, #got)
    for i = 1, #want do
      assert.is_true(got[i][1] == want[i], "line " .. i .. " (" .. #want[i] .. " bytes) differs")
      assert.is_true(got[i][2])
    end
  end)

  it("reads alongside file:read on the same file", function()
    local f = file_with("alpha\nbeta\ngamma\ndelta\n")
    assert.are.equal("alpha", (read_line(f)))
    assert.are.equal("beta", f:read("*l"))
    assert.are.equal("ga", f:read(2))
    assert.are.equal("mma", (read_line(f)))
    assert.are.equal("delta", f:read("*l"))
    assert.is_nil(read_line(f))
    f:close()
  end)

  it("reads from two files in turn, each line its own", function()
    local a, b = file_with("a1\na2\na3"), file_with("b1\nb2\n")
    assert.are.same({ "a1", "b1", "a2", "b2", "a3" },
      { (read_line(a)), (read_line(b)), (read_line(a)), (read_line(b)), (read_line(a)) })
    assert.is_nil(read_line(a))
    assert.is_nil(read_line(b))
    a:close()
    b:close()
  end)

  it("can be called from a finalizer that runs while it pushes a line", function()
    -- A finalizer that reads a line of its own runs at the collection step
    -- read_line's push of its line takes (the allocation check of
    -- lua_pushlstring), where the buffer it gathered in must still hold the
    -- line whole. Where steps land is not left to the collector's pacing:
    -- it locks into a pattern that its string hash seed (random in each
    -- process) and the addresses of newproxy's metatables pick, and about
    -- one run in ten never stepped inside read_line (none of 100,000
    -- finalizers there). Each round here makes garbage with finalizers,
    -- steps the collector one step at a time until the first of them ran
    -- (it is then finalizing, most of the garbage still to go), and asks
    -- for a step at the next allocation check: read_line's, as it pushes.
    -- In a pzlua of its own, whose collections are short; interpreted (a
    -- trace neither calls finalizers nor lets these loops be compiled).
    local script = os.tmpname()
    local f = assert(io.open(script, "wb"))
    f:write([=[
      jit.off()
      local read_line = require("parallelize.core").read_line
      local function file_with(text)
        local path = os.tmpname()
        local w = assert(io.open(path, "wb"))
        w:write(text)
        w:close()
        local r = assert(io.open(path, "rb"))
        os.remove(path)
        return r
      end
      local ROUNDS, GARBAGE = 200, 100
      local inner = file_with(string.rep("inner line\n", ROUNDS * GARBAGE + 1000))
      local outer_lines = {}
      for i = 1, ROUNDS do -- longer than stdio's buffer: gathered over refills
        outer_lines[i] = string.rep(string.char(97 + i % 26), 5000 + i * 7)
      end
      local outer = file_with(table.concat(outer_lines, "\n") .. "\n")
      local inner_got, bad, nested, reading, ran = 0, 0, 0, false, false
      local function finalizer()
        ran = true
        if reading then nested = nested + 1 end
        local text = read_line(inner)
        if text then
          inner_got = inner_got + 1
          if text ~= "inner line" then bad = bad + 1 end
        end
      end
      for i = 1, ROUNDS do
        collectgarbage() -- a whole cycle: nothing left to finalize
        for _ = 1, GARBAGE do getmetatable(newproxy(true)).__gc = finalizer end
        ran = false
        for _ = 1, 1e6 do
          collectgarbage("step", 0)
          if ran then break end
        end
        if not ran then error("round " .. i .. ": no finalizer ran in a million steps") end
        local before = nested
        collectgarbage("restart") -- the next allocation check steps
        reading = true
        local text = read_line(outer)
        reading = false
        if text ~= outer_lines[i] then
          error(("line %d differs: %d bytes, %q"):format(i, text and #text or -1, tostring(text):sub(1, 20)))
        end
        if nested == before then error("round " .. i .. ": no finalizer ran inside read_line") end
      end
      collectgarbage()
      print(("bad %d inner %d nested %d"):format(bad, inner_got, nested))
      inner:close()
      outer:close()
    ]=])
    f:close()
    local out, status = support.run(support.quote(support.pzlua()) .. " " .. support.quote(script))
    os.remove(script)
    assert.are.equal(0, status, out)
    local bad, inner_got, nested = out:match("bad (%d+) inner (%d+) nested (%d+)")
    assert.is_truthy(bad, out)
    assert.are.equal(0, tonumber(bad))
    assert.are.equal(200 * 100, tonumber(inner_got))
    assert.is_true(tonumber(nested) >= 200, out)
  end)

  it("frees what it gathered of a line it has no memory for, and goes on #nosan", function()
    -- A pzlua of its own limits its address space (RLIMIT_AS; no
    -- AddressSanitizer, which reserves terabytes) to 100 MB above what it
    -- has: a 100 MB line fails with 64 MB gathered. Kept until the next
    -- read_line, those left room for a string of 16 MB at most (it takes
    -- twice its size to build); freed, for one of 36 MB.
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    local w = assert(io.open(dir .. "/input", "wb"))
    local mb = string.rep("x", 1048576)
    for _ = 1, 100 do w:write(mb) end
    w:write("\nafter\n")
    w:close()
    support.write(dir .. "/low.lua", [[
local read_line = require("parallelize.core").read_line
local ffi = require "ffi"
ffi.cdef "struct pz_spec_rlimit { unsigned long cur, max; };"
ffi.cdef "int setrlimit(int resource, const struct pz_spec_rlimit *rlim);"
local f = assert(io.open(arg[1], "rb"))
local vmsize
for line in io.lines("/proc/self/status") do vmsize = vmsize or tonumber(line:match("^VmSize:%s*(%d+)")) end
assert(ffi.C.setrlimit(9, ffi.new("struct pz_spec_rlimit", vmsize * 1024 + 100 * 1048576, -1ULL)) == 0)
print("read", pcall(read_line, f))
local ok, s = pcall(string.rep, "z", 26 * 1048576)
print("string", ok, ok and #s or s)
s = nil
assert(ffi.C.setrlimit(9, ffi.new("struct pz_spec_rlimit", -1ULL, -1ULL)) == 0)
local rest, whole = read_line(f)
print("rest", #rest, whole, rest:find("[^x]"))
print("next", read_line(f))
print("end", read_line(f))
]])
    local out, status = support.run("timeout -k 5 60 " .. support.quote(support.pzlua()) .. " "
      .. support.quote(dir .. "/low.lua") .. " " .. support.quote(dir .. "/input"))
    assert.are.equal(0, status, out)
    assert.matches("read\tfalse\tread_line: out of memory for a line of %d+ bytes\n", out)
    assert.matches("string\ttrue\t27262976\n", out)
    local rest = tonumber(out:match("rest\t(%d+)\ttrue\tnil\n"))
    assert.is_true(rest and rest > 0 and rest < 100 * 1048576, out)
    assert.matches("next\tafter\ttrue\nend\tnil\n", out)
  end)
end)
