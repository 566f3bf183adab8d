-- The value codec as Lua sees it: parallelize.encode(v) -> string and
-- parallelize.decode(s [, {functions = true}]) -> v. Round trips of tricky
-- values, sharing and cycles, functions, module references, every error
-- message, malformed input, and a seeded random round trip.

local p = require "parallelize"
local ffi = require "ffi"
local support = require "spec.support"

local encode, decode, null = p.encode, p.decode, p.null
local FN = { functions = true }

local REFUSE_FUNCTION = "refusing to load an encoded function: decode with {functions = true}, "
  .. "and only data you trust"
local REFUSE_REFERENCE = "refusing to load a function reference: decode with {functions = true}, "
  .. "and only data you trust"

local function roundtrip(v, opts)
  return decode(encode(v), opts)
end

--- The message of the error f(...) raises; fails when it raises none.
local function error_of(f, ...)
  local ok, e = pcall(f, ...)
  assert(not ok, "expected an error, got none")
  return e
end

local varint = support.varint

-- The format version byte encode writes (decode also reads version 1, which
-- the hand-made inputs below use).
local V = "\2"

--- The 8 bytes of a double, little-endian as the format writes them.
local function double_bytes(d)
  local b = ffi.string(ffi.new("double[1]", d), 8)
  return ffi.abi("le") and b or b:reverse()
end

--- True when a and b are the same number: NaN equals NaN, 0 differs from -0.
local function same_number(a, b)
  if a ~= a then return b ~= b end
  if a ~= b then return false end
  if a == 0 then return 1 / a == 1 / b end
  return true
end

-- Deep equality that also checks the sharing structure: objects of `a` and
-- of `b` are paired on first sight, and a pair must hold everywhere (so
-- one table reachable twice must decode to one table reachable twice, and a
-- cycle to the same cycle). Table keys that are tables are matched by
-- trying each unpaired candidate, undoing the pairs a failed try made.
local deep_equal

local function pair(st, a, b)
  st.ab[a], st.ba[b] = b, a
  st.log[#st.log + 1] = a
end

local function undo(st, mark)
  for i = #st.log, mark + 1, -1 do
    local a = st.log[i]
    st.ba[st.ab[a]] = nil
    st.ab[a] = nil
    st.log[i] = nil
  end
end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

local function tables_equal(a, b, st)
  if not deep_equal(getmetatable(a), getmetatable(b), st) then return false end
  if count(a) ~= count(b) then return false end
  local table_keys = {}
  for k, v in pairs(a) do
    if type(k) == "table" then
      table_keys[#table_keys + 1] = k
    else
      local w = rawget(b, k)
      if w == nil or not deep_equal(v, w, st) then return false end
    end
  end
  local taken = {}
  for _, k in ipairs(table_keys) do
    local found = false
    local paired = st.ab[k]
    if paired ~= nil then
      found = rawget(b, paired) ~= nil and not taken[paired] and deep_equal(a[k], b[paired], st)
      if found then taken[paired] = true end
    else
      for bk, bv in pairs(b) do
        if type(bk) == "table" and not taken[bk] and st.ba[bk] == nil then
          local mark = #st.log
          if deep_equal(k, bk, st) and deep_equal(a[k], bv, st) then
            taken[bk], found = true, true
            break
          end
          undo(st, mark)
        end
      end
    end
    if not found then return false end
  end
  return true
end

deep_equal = function(a, b, st)
  st = st or { ab = {}, ba = {}, log = {} }
  local ta = type(a)
  if ta ~= type(b) then return false end
  if ta == "number" then return same_number(a, b) end
  if ta ~= "table" and ta ~= "function" then return rawequal(a, b) end
  if st.ab[a] ~= nil or st.ba[b] ~= nil then return rawequal(st.ab[a], b) end
  pair(st, a, b)
  if ta == "function" then -- a Lua function travels as a copy, a C function as itself
    return rawequal(a, b) or (debug.getinfo(a, "S").what ~= "C" and debug.getinfo(b, "S").what ~= "C")
  end
  return tables_equal(a, b, st)
end

describe("codec", function()
  describe("scalars", function()
    local cases = {
      { "nil", nil },
      { "true", true },
      { "false", false },
      { "0", 0 },
      { "-0.0", -0.0 },
      { "NaN", 0 / 0 },
      { "+inf", math.huge },
      { "-inf", -math.huge },
      { "2^53", 2 ^ 53 },
      { "-(2^53)", -(2 ^ 53) },
      { "2^53 - 1", 2 ^ 53 - 1 },
      { "1 - 2^53", 1 - 2 ^ 53 },
      { "2^53 + 2", 2 ^ 53 + 2 },
      { "-(2^53 + 2)", -(2 ^ 53 + 2) },
      { "2^63", 2 ^ 63 },
      { "2^64", 2 ^ 64 },
      { "127", 127 },
      { "128", 128 },
      { "-127", -127 },
      { "-128", -128 },
      { "-1", -1 },
      { "255", 255 },
      { "16383", 16383 },
      { "16384", 16384 },
      { "0.1", 0.1 },
      { "-0.5", -0.5 },
      { "127.5", 127.5 },
      { "1/3", 1 / 3 },
      { "1e308", 1e308 },
      { "-1e308", -1e308 },
      { "5e-324", 5e-324 },
      { "-5e-324", -5e-324 },
      { "2.2250738585072014e-308", 2.2250738585072014e-308 },
      { "empty string", "" },
      { "\\0", "\0" },
      { "a\\0b", "a\0b" },
      { "31 bytes", string.rep("s", 31) },
      { "32 bytes", string.rep("s", 32) },
      { "33 bytes", string.rep("s", 33) },
      { "127 bytes", string.rep("x", 127) },
      { "128 bytes", string.rep("x", 128) },
      { "null", null },
    }
    for _, case in ipairs(cases) do
      it("round-trips " .. case[1], function()
        local v = case[2]
        local d = roundtrip(v)
        assert.are.equal(type(v), type(d))
        if type(v) == "number" then
          assert.is_true(same_number(v, d), ("%.17g became %.17g"):format(v, d))
        else
          assert.is_true(rawequal(v, d))
        end
        -- also inside a table, as an array item and as a hash value
        if v ~= nil then
          local t = roundtrip({ v, k = v })
          assert.is_true(same_number(v, t[1]) or rawequal(v, t[1]))
          assert.is_true(same_number(v, t.k) or rawequal(v, t.k))
        end
      end)
    end

    it("keeps the sign of -0.0 and the NaN-ness of NaN", function()
      local z = roundtrip(-0.0)
      assert.are.equal(-math.huge, 1 / z)
      assert.are.equal(math.huge, 1 / roundtrip(0))
      local nan = roundtrip(0 / 0)
      assert.is_true(nan ~= nan)
    end)

    it("uses the wire format of codec_format.h", function()
      assert.are.equal(V .. "\0", encode(nil))
      assert.are.equal(V .. "\1", encode(false))
      assert.are.equal(V .. "\2", encode(true))
      assert.are.equal(V .. "\3", encode(null))
      assert.are.equal(V .. "\x80", encode(0))
      assert.are.equal(V .. "\xff", encode(127))
      assert.are.equal(V .. "\5\x80\1", encode(128))
      assert.are.equal(V .. "\6\1", encode(-1))
      assert.are.equal(V .. "\6\x7f", encode(-127))
      assert.are.equal(V .. "\6\x80\1", encode(-128))
      assert.are.equal(V .. "\5" .. varint(2 ^ 53), encode(2 ^ 53))
      assert.are.equal(V .. "\6" .. varint(2 ^ 53), encode(-(2 ^ 53)))
      assert.are.equal(V .. "\4" .. double_bytes(2 ^ 53 + 2), encode(2 ^ 53 + 2))
      assert.are.equal(V .. "\4" .. double_bytes(-0.0), encode(-0.0))
      assert.are.equal(V .. "\4" .. double_bytes(0.1), encode(0.1))
      assert.are.equal(V .. "\x40", encode(""))
      assert.are.equal(V .. "\x41\0", encode("\0"))
      assert.are.equal(V .. "\x5f" .. string.rep("s", 31), encode(string.rep("s", 31)))
      assert.are.equal(V .. "\7\32" .. string.rep("s", 32), encode(string.rep("s", 32)))
      assert.are.equal(V .. "\8\0\0", encode({}))
      assert.are.equal(V .. "\8\2\0\x81\x82", encode({ 1, 2 }))
    end)

    it("round-trips a string of every byte, and every one-byte string", function()
      local bytes = {}
      for i = 0, 255 do
        bytes[#bytes + 1] = string.char(i)
        assert.are.equal(string.char(i), roundtrip(string.char(i)))
      end
      local all = table.concat(bytes)
      assert.are.equal(all, roundtrip(all))
      assert.are.equal(all:reverse(), roundtrip(all:reverse()))
    end)

    it("round-trips a 1 MiB string", function()
      local chunk = {}
      for i = 0, 255 do chunk[#chunk + 1] = string.char(i) end
      local s = table.concat(chunk):rep(4096)
      assert.are.equal(2 ^ 20, #s)
      local e = encode(s)
      assert.are.equal(1 + 1 + 3 + 2 ^ 20, #e)
      assert.are.equal(s, decode(e))
      -- and as a value among others
      local t = decode(encode({ s, s .. "x", n = 1 }))
      assert.are.equal(s, t[1])
      assert.are.equal(s .. "x", t[2])
    end)
  end)

  describe("tables", function()
    it("round-trips keys of every encodable type", function()
      local tk1, tk2 = { "key" }, { nested = { 1 } }
      local v = {
        [1] = "one", [2] = "two", [3] = "three",
        [0] = "zero", [-1] = "minus one", [-2 ^ 53] = "low",
        [2 ^ 53] = "high", [2 ^ 60] = "huge", [0.5] = "half", [-0.25] = "neg quarter",
        [1e300] = "big", [math.huge] = "inf", [-math.huge] = "-inf", [5e-324] = "tiny",
        s = "string", [""] = "empty", ["\0\255"] = "bytes", [string.rep("k", 40)] = "long key",
        [true] = "yes", [false] = "no",
        [tk1] = "table key", [tk2] = { "table key with a table value" },
        [null] = "null key",
      }
      local d = roundtrip(v)
      assert.is_true(deep_equal(v, d))
      assert.are.equal("one", d[1])
      assert.are.equal("half", d[0.5])
      assert.are.equal("neg quarter", d[-0.25])
      assert.are.equal("high", d[2 ^ 53])
      assert.are.equal("inf", d[math.huge])
      assert.are.equal("yes", d[true])
      assert.are.equal("no", d[false])
      assert.are.equal("null key", d[null])
      assert.are.equal(count(v), count(d))
    end)

    it("round-trips arrays with holes and mixed array/hash tables", function()
      local cases = {
        { 1, nil, 3 },
        { nil, nil, nil, 4 },
        { [1] = "a", [3] = "c", [100] = "far" },
        { 1, 2, 3, x = "x", y = { 4, 5 }, [10] = 10 },
        { [2] = 2, [3] = 3 },
        { "a", "b", [0] = "zero", [-1] = "neg" },
        { 1.5, 2.5, 3.5 },
      }
      for _, v in ipairs(cases) do
        local d = roundtrip(v)
        assert.is_true(deep_equal(v, d))
        assert.are.equal(count(v), count(d))
      end
      local big = {}
      for i = 1, 1000 do big[i] = i * 1.5 end
      big[500] = nil
      big.n = 1000
      assert.is_true(deep_equal(big, roundtrip(big)))
    end)

    it("round-trips long sequences, and tables that only look like one", function()
      local function seq(n, f)
        local t = {}
        for i = 1, n do t[i] = f and f(i) or i end
        return t
      end
      local shared = { "s" }
      local cases = {
        seq(8), seq(20, function(i) return i * 0.5 end), seq(255), seq(256), seq(257), seq(1000),
        seq(600, function(i) return i % 3 == 0 and shared or ("x"):rep(i % 40) end),
        seq(30, function(i) return i % 2 == 0 end),
        seq(12, function(i) return { i, { i } } end),
      }
      -- a hole made up for by another key (the length may still say 10)
      local holed = seq(10)
      holed[5], holed.x = nil, 5
      cases[#cases + 1] = holed
      local extra = seq(10)
      extra.n = 10
      cases[#cases + 1] = extra
      local zero = seq(10)
      zero[0] = 0
      cases[#cases + 1] = zero
      local float_key = seq(10)
      float_key[2.5] = "between"
      cases[#cases + 1] = float_key
      -- __index fills no hole and __len is not asked
      local meta = setmetatable(seq(10), { __index = function() return "meta" end, __len = function() return 99 end })
      meta[4] = nil
      cases[#cases + 1] = meta
      for i, v in ipairs(cases) do
        local d = roundtrip(v, FN)
        assert.is_true(deep_equal(v, d), "case " .. i)
        assert.are.equal(count(v), count(d), "case " .. i)
      end
      -- a sequence is written as an array part alone
      assert.are.equal(V .. "\8\20\0", encode(seq(20)):sub(1, 4))
      assert.are.equal(V .. "\8" .. varint(100) .. "\0", encode(seq(100)):sub(1, 4))
      local d = roundtrip(cases[7])
      assert.is_true(rawequal(d[3], d[600]))
      local dm = roundtrip(meta, FN)
      assert.is_nil(rawget(dm, 4))
      assert.are.equal("meta", dm[4])
      assert.are.equal(5, dm[5])
    end)

    it("keeps nested tables apart and nested 1000 levels deep", function()
      local v = { a = { b = { c = { "deep" } } }, list = { { 1 }, { 2 }, { 3 } } }
      assert.is_true(deep_equal(v, roundtrip(v)))
      local deep = {}
      local cur = deep
      for _ = 2, 1000 do cur[1] = {}; cur = cur[1] end
      cur[1] = "bottom"
      local d = roundtrip(deep)
      for _ = 1, 1000 do d = d[1] end
      assert.are.equal("bottom", d)
      -- long sequences at every level, the way down through their first
      -- item, and through their last
      for _, where in ipairs({ 1, 300 }) do
        local long = {}
        cur = long
        for level = 1, 999 do
          for i = 1, 300 do cur[i] = i + level end
          cur[where] = {}
          cur = cur[where]
        end
        cur[1] = "bottom"
        d = roundtrip(long)
        for level = 1, 999 do
          assert.are.equal(300, #d)
          assert.are.equal(level + (where == 1 and 300 or 1), d[where == 1 and 300 or 1])
          d = d[where]
        end
        assert.are.equal("bottom", d[1])
      end
    end)

    it("keeps shared references shared", function()
      local t = { "shared" }
      local v = { t, t, x = t, inner = { t } }
      local d = roundtrip(v)
      assert.is_true(rawequal(d[1], d[2]))
      assert.is_true(rawequal(d[1], d.x))
      assert.is_true(rawequal(d[1], d.inner[1]))
      assert.are.equal("shared", d[1][1])
      -- and two equal but distinct tables stay distinct
      local e = roundtrip({ { 1 }, { 1 } })
      assert.is_false(rawequal(e[1], e[2]))
      -- a table that is both a key and a value
      local k = { "k" }
      local kv = roundtrip({ [k] = k })
      local dk, dv = next(kv)
      assert.is_true(rawequal(dk, dv))
    end)

    it("keeps cycles", function()
      local t = {}
      t.self = t
      local d = roundtrip(t)
      assert.is_true(rawequal(d, d.self))

      local a, b = { name = "a" }, { name = "b" }
      a.b, b.a = b, a
      local da = roundtrip(a)
      assert.are.equal("b", da.b.name)
      assert.is_true(rawequal(da, da.b.a))

      local ring = { n = 1 }
      local cur = ring
      for i = 2, 50 do cur.next = { n = i }; cur = cur.next end
      cur.next = ring
      local dr = roundtrip({ ring, ring.next.next })
      local x = dr[1]
      for _ = 1, 50 do x = x.next end
      assert.is_true(rawequal(dr[1], x))
      assert.is_true(rawequal(dr[2], dr[1].next.next))

      local key_cycle = {}
      key_cycle[key_cycle] = key_cycle
      local dk = roundtrip(key_cycle)
      assert.is_true(rawequal(dk[dk], dk))
    end)

    it("round-trips tables with plain metatables, shared and cyclic", function()
      local mt = { __mode = "k", tag = "meta" }
      local v = { setmetatable({ 1 }, mt), setmetatable({ 2 }, mt) }
      local d = roundtrip(v)
      assert.are.equal("meta", getmetatable(d[1]).tag)
      assert.are.equal("k", getmetatable(d[1]).__mode)
      assert.is_true(rawequal(getmetatable(d[1]), getmetatable(d[2])))
      local own = {}
      setmetatable(own, own)
      local dm = roundtrip(own)
      assert.is_true(rawequal(dm, getmetatable(dm)))
      -- a metatable is read raw: __metatable does not hide it, __pairs and
      -- __index are not called
      local guarded = setmetatable({ x = 1 }, { __metatable = "locked", __index = { y = 2 } })
      local dg = roundtrip(guarded)
      assert.are.equal("locked", getmetatable(dg))
      assert.are.equal(1, rawget(dg, "x"))
      assert.are.equal(2, dg.y)
    end)

    it("keeps sharing among many tables", function()
      -- past the first few objects the encoder numbers them in a hash
      -- table, which grows; every object is met twice
      for _, many in ipairs({ 7, 8, 9, 31, 33, 64, 65, 500 }) do
        local objs, v = {}, {}
        for i = 1, many do objs[i] = { i } end
        for i = 1, many do
          v[2 * i - 1] = objs[i]
          v[2 * i] = objs[(i * 7) % many + 1]
        end
        local d = roundtrip(v)
        for i = 1, many do
          assert.are.equal(i, d[2 * i - 1][1])
          assert.is_true(rawequal(d[2 * i], d[2 * ((i * 7) % many) + 1]), "many " .. many .. ", i " .. i)
        end
        assert.is_true(deep_equal(v, d))
      end
    end)

    it("keeps sharing that first shows late: after many tables, or after a function or a module", function()
      -- The decoder keeps no table until it meets a reference, a function
      -- or a module; then it decodes the value again from its start.
      local objs, floats = {}, {}
      for i = 1, 40 do objs[i] = { i, name = "t" .. i } end
      for i = 1, 20 do floats[i] = i + 0.5 end
      local v = { objs, floats, { objs[33], objs[2], floats, objs } }
      v[3].root = v
      local d = roundtrip(v)
      assert.is_true(deep_equal(v, d))
      assert.is_true(rawequal(d[3][1], d[1][33]))
      assert.is_true(rawequal(d[3][2], d[1][2]))
      assert.is_true(rawequal(d[3][3], d[2]))
      assert.is_true(rawequal(d[3][4], d[1]))
      assert.is_true(rawequal(d[3].root, d))
      assert.are.equal("t33", d[3][1].name)

      local t = { x = 1 }
      local function get() return t end
      local df = roundtrip({ { a = 1 }, { b = 2 }, t, get, string.upper, math }, FN)
      assert.are.same({ a = 1 }, df[1])
      assert.is_true(rawequal(df[4](), df[3]))
      assert.are.equal(string.upper, df[5])
      assert.are.equal(math, df[6])
      local dm = roundtrip({ { 1 }, { 2, { 3 } }, math, { 4 } })
      assert.are.same({ { 1 }, { 2, { 3 } } }, { dm[1], dm[2] })
      assert.are.equal(math, dm[3])
      assert.are.same({ 4 }, dm[4])
    end)

    it("never takes a new table for an old one freed while encoding", function()
      -- A function's environment with __index runs during the encode (the
      -- encoder reads the globals the function uses through it). Here it
      -- drops the tables written so far, collects them, and makes new ones
      -- where the encoder has not been yet: the encoder knows tables by
      -- address, so the old ones must stay alive until it is done, or a new
      -- table at an old one's address would be written as a reference to it.
      local first, later = {}, {}
      for i = 1, 200 do first[i] = { "old", i } end
      local env = setmetatable({}, { __index = function(_, name)
        if name == "pz_spec_trigger" then
          for i = 1, 200 do first[i] = nil end
          collectgarbage()
          collectgarbage()
          for i = 1, 200 do later[i] = { "new", i } end
        end
        return nil
      end })
      local f = setfenv(function() return pz_spec_trigger end, env) -- luacheck: ignore
      local d = roundtrip({ first, f, later }, FN)
      assert.are.equal(200, #d[3])
      for i = 1, 200 do
        assert.are.same({ "new", i }, d[3][i])
      end
    end)

    it("round-trips parallelize.null as itself", function()
      assert.is_true(rawequal(null, roundtrip(null)))
      local d = roundtrip({ null, k = null, [null] = null })
      assert.are.equal(null, d[1])
      assert.are.equal(null, d.k)
      assert.are.equal(null, d[null])
      assert.are.equal("userdata", type(null))
      local ok, cjson = pcall(require, "cjson")
      if ok then
        assert.are.equal(cjson.null, null)
        assert.are.equal(cjson.null, roundtrip(cjson.null))
      end
    end)
  end)

  describe("packed arrays of numbers", function()
    local function floats(n, f)
      local t = {}
      for i = 1, n do t[i] = f and f(i) or i + 0.5 end
      return t
    end
    local function packed_bytes(t)
      local parts = { V, "\15", varint(#t) }
      for i = 1, #t do parts[#parts + 1] = double_bytes(t[i]) end
      return table.concat(parts)
    end

    it("write a sequence of numbers, most not integers, as doubles", function()
      for _, n in ipairs({ 16, 17, 100, 1000 }) do
        local t = floats(n)
        assert.are.equal(packed_bytes(t), encode(t))
        assert.is_true(deep_equal(t, roundtrip(t)))
      end
      -- exactly half integral still packs
      local half = floats(16, function(i) return i % 2 == 0 and i or i + 0.25 end)
      assert.are.equal(packed_bytes(half), encode(half))
    end)

    it("round-trip every double, NaN, infinities and -0.0 among them", function()
      local t = { -0.0, 0.5, math.huge, -math.huge, 0 / 0, 5e-324, -5e-324, 1.7976931348623157e308,
        2 ^ 53 + 2, -(2 ^ 60), 0.1, 1 / 3, -2.5, 1e-300, 12345.678, -0.0 }
      local d = roundtrip(t)
      assert.are.equal(#t, #d)
      for i = 1, #t do assert.is_true(same_number(t[i], d[i]), "item " .. i) end
      assert.are.equal(packed_bytes(t), encode(t))
    end)

    it("are not used for other tables", function()
      local short = floats(15)
      local with_mt = setmetatable(floats(16), { tag = "mt" })
      local extra = floats(16)
      extra.n = 16
      local zero = floats(16)
      zero[0] = 0.5
      local mixed = floats(16)
      mixed[9] = "nine"
      local integral = floats(16, function(i) return i % 4 == 0 and i + 0.5 or i end)
      local holed = floats(20)
      holed[10] = nil
      for name, t in pairs({ short = short, with_mt = with_mt, extra = extra, zero = zero, mixed = mixed,
        integral = integral, holed = holed }) do
        local s = encode(t)
        assert.is_true(s:byte(2) == 8 or s:byte(2) == 9, name)
        assert.is_true(deep_equal(t, roundtrip(t)), name)
      end
    end)

    it("find a sequence whatever order its keys come in", function()
      -- keys set from the top down land in the hash part, in any order
      local t = {}
      for i = 40, 1, -1 do t[i] = i * 0.25 + 0.125 end
      assert.are.equal(packed_bytes(t), encode(t))
      assert.is_true(deep_equal(t, roundtrip(t)))
      t[17.5] = 1
      assert.are.equal(8, encode(t):byte(2))
      assert.is_true(deep_equal(t, roundtrip(t)))
    end)

    -- A table whose array part holds slot #t is told a sequence by index
    -- and one look past #t (src/codec_array.c); the others by a walk of
    -- every key. Tables of every shape, both ways, round-trip whole.
    it("tell sequences from other tables whatever their array and hash parts hold", function()
      local new_table = require "table.new"
      math.randomseed(14)
      local values = { 0.5, 2, -3.25, "s", true, 1e300 }
      for round = 1, 3000 do
        local t = new_table(math.random(0, 64), math.random(0, 8))
        local fill = math.random(0, 70)
        for i = 1, fill do t[i] = math.random() < 0.8 and i + 0.5 or values[math.random(#values)] end
        for _ = 1, math.random(0, 3) do
          local r = math.random(8)
          local k = r == 1 and 0 or r == 2 and -1 or r == 3 and 2.5 or r == 4 and "x"
            or math.random(1, 80)
          t[k] = math.random() < 0.3 and nil or values[math.random(#values)]
        end
        local d = roundtrip(t)
        assert.is_true(deep_equal(t, d), "round " .. round)
        assert.are.equal(count(t), count(d), "round " .. round)
      end
    end)

    it("are tables like any other: shared, keys, in cycles, plain once decoded", function()
      local a = floats(20)
      local v = { a, a, [a] = a, list = { a } }
      v.self = v
      local d = roundtrip(v)
      assert.is_true(rawequal(d[1], d[2]))
      assert.is_true(rawequal(d[1], d[d[1]]))
      assert.is_true(rawequal(d[1], d.list[1]))
      assert.is_true(rawequal(d, d.self))
      local p1 = d[1]
      assert.are.equal(20, #p1)
      assert.is_nil(p1[0])
      assert.is_nil(p1[21])
      assert.is_nil(next(p1, 20))
      p1[21] = 21.5
      assert.are.equal(21, #p1)
      assert.are.equal(20.5, p1[20])
    end)

    it("decode a NaN of any payload as NaN", function()
      -- LuaJIT tags its other values inside NaNs: a NaN read as it is
      -- would forge one
      local nans = { "\255\255\255\255\251\255\255\255", "\52\18\0\0\251\255\255\255",
        "\1\0\0\0\0\0\240\127", "\0\0\0\0\0\0\248\255", "\255\255\255\255\255\255\255\127" }
      local parts = { V, "\15", varint(20) }
      for i = 1, 20 do
        parts[#parts + 1] = i % 4 == 0 and nans[i / 4 % #nans + 1] or double_bytes(i + 0.5)
      end
      local d = decode(table.concat(parts))
      for i = 1, 20 do
        assert.are.equal("number", type(d[i]))
        if i % 4 == 0 then assert.is_true(d[i] ~= d[i]) else assert.are.equal(i + 0.5, d[i]) end
      end
    end)

    it("are neither written nor read through the FFI with the JIT off", function()
      local t = floats(100)
      local s = encode(t)
      assert.are.equal(15, s:byte(2))
      -- Beside a C function (a module reference, which the direct walk
      -- leaves to the C API path), the table goes through the helpers.
      local beside = encode({ t, print })
      assert.are.equal(15, beside:byte(5))
      jit.off()
      finally(function() jit.on() end)
      -- the helpers look at the JIT's state every 64th call
      local last
      for _ = 1, 70 do last = encode({ t, print }) end
      assert.are.equal(8, last:byte(5))
      assert.is_true(deep_equal({ t, print }, decode(last, { functions = true })))
      -- The direct walk packs in C, the JIT on or off.  It gives a table
      -- back when the module index's address filter passes its address
      -- (about 1 in 100 tables: codec_index.c), so some of ten must pack.
      local packed = 0
      for _ = 1, 10 do
        local fresh = floats(100)
        if encode(fresh) == s then packed = packed + 1 end
      end
      assert.is_true(packed > 0)
      local d
      for _ = 1, 70 do d = decode(s) end
      assert.is_true(deep_equal(t, d))
      jit.on()
      for _ = 1, 70 do last = encode(t) end
      assert.are.equal(s, last)
    end)

    it("reject counts the bytes cannot hold, and tag 0x0f in version 1", function()
      assert.are.equal("cannot decode: array of 1099511627776 doubles does not fit in the 3 bytes left at byte 2",
        error_of(decode, V .. "\15" .. varint(2 ^ 40) .. "abc"))
      assert.are.equal("cannot decode: array of 2 doubles does not fit in the 15 bytes left at byte 2",
        error_of(decode, V .. "\15\2" .. string.rep("\0", 15)))
      assert.are.equal("cannot decode: bad or truncated array size at byte 3", error_of(decode, V .. "\15"))
      assert.are.equal("cannot decode: unknown tag 0x0f at byte 2", error_of(decode, "\1\15\0"))
      assert.are.same({}, decode(V .. "\15\0"))
      local s = encode(floats(16))
      for i = 1, #s - 1 do
        local e = error_of(decode, s:sub(1, i))
        assert.are.equal("cannot decode: ", e:sub(1, 15), e)
      end
    end)
  end)

  -- Sequences of numbers that are mostly integers keep the table format, one
  -- tag per number, but are written from the doubles the survey gathers and
  -- read in blocks of 256 (codec_enc.c's enc_survey, codec_dec.c's
  -- dec_numbers): the same bytes as one number at a time.
  describe("sequences of integers", function()
    --- The bytes of t as the table format writes it, one number at a time.
    local function table_bytes(t)
      local parts = { V, "\8", varint(#t), "\0" }
      for i = 1, #t do parts[#parts + 1] = encode(t[i]):sub(2) end
      return table.concat(parts)
    end
    local function ints(n, f)
      local t = {}
      for i = 1, n do t[i] = f and f(i) or i end
      return t
    end

    it("are written as the table format, whatever the integers' sizes", function()
      local cases = {
        ints(8), ints(15), ints(16), ints(1000, function(i) return i * 37 end),
        ints(300, function(i) return -i * 1000003 end),
        ints(40, function(i) return 2 ^ 53 - i end),
        -- fractions, fewer than half of them, the first value one or not
        ints(64, function(i) return i % 3 == 0 and i + 0.5 or i end),
        ints(40, function(i) return i % 3 == 1 and i + 0.25 or i end),
        -- -0.0 and 2^53 + 2 travel as doubles (an infinity would pack the table)
        ints(20, function(i) return ({ -0.0, 2 ^ 53 + 2, -(2 ^ 53 + 2), 1, 0 })[i % 5 + 1] end),
      }
      for n, t in ipairs(cases) do
        assert.are.equal(table_bytes(t), encode(t), "case " .. n)
        local d = roundtrip(t)
        assert.are.equal(#t, #d, "case " .. n)
        for i = 1, #t do assert.is_true(same_number(t[i], d[i]), "case " .. n .. " item " .. i) end
      end
    end)

    it("keep a NaN among them a NaN", function()
      local t = ints(30, function(i) return i == 7 and 0 / 0 or i end)
      local d = roundtrip(t)
      assert.are.equal(30, #d)
      assert.is_true(d[7] ~= d[7])
      for i = 1, 30 do if i ~= 7 then assert.are.equal(i, d[i]) end end
    end)

    it("decode a NaN of any payload among integers as NaN", function()
      local nans = { "\255\255\255\255\251\255\255\255", "\52\18\0\0\251\255\255\255",
        "\0\0\0\0\0\0\248\255" }
      local parts = { V, "\8", varint(300), "\0" }
      for i = 1, 300 do
        parts[#parts + 1] = i % 100 == 0 and "\4" .. nans[i / 100] or encode(i):sub(2)
      end
      local d = decode(table.concat(parts))
      for i = 1, 300 do
        assert.are.equal("number", type(d[i]))
        if i % 100 == 0 then assert.is_true(d[i] ~= d[i]) else assert.are.equal(i, d[i]) end
      end
    end)

    it("decode when other values follow the numbers, at and around a block's end", function()
      for _, at in ipairs({ 1, 2, 255, 256, 257, 512, 600 }) do
        local t = ints(600, function(i) return i * 7 end)
        t[at] = at % 2 == 0 and { at } or "s" .. at
        local d = roundtrip(t)
        assert.is_true(deep_equal(t, d), "other value at " .. at)
        assert.are.equal(table_bytes(t), encode(t), "other value at " .. at)
      end
      local t = ints(300, function(i) return i > 260 and "x" .. i or i end)
      assert.is_true(deep_equal(t, roundtrip(t)))
    end)

    it("read integers of every varint width, and non-minimal varints", function()
      local t = {}
      for w = 0, 53 do t[#t + 1] = 2 ^ w; t[#t + 1] = -(2 ^ w) end
      assert.is_true(deep_equal(t, roundtrip(t)))
      -- 5 as a positive integer of one, two and three varint bytes
      local parts = { V, "\8", varint(20), "\0" }
      for i = 1, 20 do parts[#parts + 1] = ({ "\5\5", "\5\133\0", "\5\133\128\0", "\6\5" })[i % 4 + 1] end
      local d = decode(table.concat(parts))
      for i = 1, 20 do assert.are.equal(({ 5, 5, 5, -5 })[i % 4 + 1], d[i]) end
    end)

    it("refuse a bad number inside the run where one at a time would", function()
      local good = table_bytes(ints(300, function(i) return i * 100 end))
      -- integer out of range (2^53 + 2) at item 270
      local parts = { V, "\8", varint(300), "\0" }
      for i = 1, 300 do
        parts[#parts + 1] = i == 270 and "\5" .. varint(2 ^ 53 + 2) or encode(i * 100):sub(2)
      end
      local bad = table.concat(parts)
      local at = #table.concat(parts, "", 1, 4 + 269) + 1
      assert.are.equal("cannot decode: integer out of range at byte " .. at, error_of(decode, bad))
      for i = 1, #good - 1 do
        local e = error_of(decode, good:sub(1, i))
        assert.are.equal("cannot decode: ", e:sub(1, 15), e)
      end
    end)

    it("are written and read the same with the JIT off", function()
      local t = ints(500, function(i) return i * 3 end)
      local s = encode(t)
      jit.off()
      finally(function() jit.on() end)
      local last, d
      for _ = 1, 70 do last = encode(t) end
      for _ = 1, 70 do d = decode(s) end
      jit.on()
      assert.are.equal(s, last)
      assert.is_true(deep_equal(t, d))
    end)
  end)

  describe("functions", function()
    it("travel with their upvalues, by value", function()
      local n, list = 10, { 1, 2, 3 }
      local function f(k) return n + #list + k end
      local s = encode(f)
      n, list = 20, {}
      local g = decode(s, FN)
      assert.are.equal(14, g(1))
      assert.are.equal(21, f(1))
      assert.are_not.equal(f, g)
      assert.are.equal("n", (debug.getupvalue(g, 1)))
    end)

    it("keep upvalues shared between closures shared", function()
      local function counter()
        local calls = 0
        return function() calls = calls + 1; return calls end, function() return calls end
      end
      local inc, get = counter()
      inc()
      local d = decode(encode({ inc, get, again = inc }), FN)
      assert.are.equal(debug.upvalueid(d[1], 1), debug.upvalueid(d[2], 1))
      assert.are_not.equal(debug.upvalueid(inc, 1), debug.upvalueid(d[1], 1))
      assert.is_true(rawequal(d[1], d.again))
      assert.are.equal(1, d[2]())
      assert.are.equal(2, d[1]())
      assert.are.equal(2, d[2]())
      assert.are.equal(1, get()) -- the original is untouched
      -- two closures sharing one of two upvalues
      local a, b = 1, 2
      local function fa() return a + b end
      local function fb() return a end
      local e = decode(encode({ fa, fb }), FN)
      assert.are.equal(debug.upvalueid(e[1], 1), debug.upvalueid(e[2], 1))
      assert.are_not.equal(debug.upvalueid(e[1], 2), debug.upvalueid(e[2], 1))
      assert.are.equal(3, e[1]())
    end)

    it("keep a shared upvalue shared when the other closure sits inside it", function()
      local box
      local function get() return box end
      box = { get2 = function() return box end }
      local d = decode(encode(get), FN)
      local inner = d().get2
      assert.are.equal(debug.upvalueid(d, 1), debug.upvalueid(inner, 1))
      assert.is_true(rawequal(d(), inner()))
    end)

    it("round-trip a recursive local function that is its own upvalue", function()
      local function fact(n) if n <= 1 then return 1 end return n * fact(n - 1) end
      local g = decode(encode(fact), FN)
      assert.are.equal(120, g(5))
      local name, up = debug.getupvalue(g, 1)
      assert.are.equal("fact", name)
      assert.is_true(rawequal(g, up))
      -- and mutual recursion through upvalues
      local is_even, is_odd
      function is_even(n) if n == 0 then return true end return is_odd(n - 1) end
      function is_odd(n) if n == 0 then return false end return is_even(n - 1) end
      local d = decode(encode({ is_even, is_odd }), FN)
      assert.is_true(d[1](10))
      assert.is_true(d[2](7))
      assert.is_true(rawequal(d[2], select(2, debug.getupvalue(d[1], 1))))
      assert.is_true(rawequal(d[1], select(2, debug.getupvalue(d[2], 1))))
    end)

    it("carry the script's globals they read", function()
      _G.PZ_SPEC_GLOBAL = { k = 41 }
      _G.PZ_SPEC_GFUNC = function(x) return x + 1 end
      local function f() return PZ_SPEC_GFUNC(PZ_SPEC_GLOBAL.k) end -- luacheck: globals PZ_SPEC_GLOBAL PZ_SPEC_GFUNC
      local s = encode(f)
      _G.PZ_SPEC_GLOBAL, _G.PZ_SPEC_GFUNC = nil, nil
      local g = decode(s, FN)
      assert.are.equal(42, g())
      assert.are.same({ k = 41 }, _G.PZ_SPEC_GLOBAL)
      -- a global the decoding state already has is kept
      _G.PZ_SPEC_GLOBAL = { k = 1 }
      local h = decode(s, FN)
      assert.are.equal(2, h())
      _G.PZ_SPEC_GLOBAL, _G.PZ_SPEC_GFUNC = nil, nil
    end)

    it("carry their globals into a fresh state", function()
      _G.PZ_SPEC_FRESH = { greeting = "hello from the parent" }
      local f = function(suffix) return PZ_SPEC_FRESH.greeting .. suffix end -- luacheck: globals PZ_SPEC_FRESH
      local s = encode(f)
      _G.PZ_SPEC_FRESH = nil
      local path = os.tmpname()
      finally(function() os.remove(path) end)
      local out = assert(io.open(path, "wb"))
      out:write(s)
      out:close()
      -- $PZLUA (the sanitizer pass sets it), else this tree's build/pzlua
      local pzlua = os.getenv("PZLUA")
      if not pzlua or pzlua == "" then
        pzlua = (debug.getinfo(1, "S").source:match("^@(.*)spec/[^/]*$") or "") .. "build/pzlua"
      end
      local chunk = ([[
        local p = require "parallelize"
        local fh = assert(io.open(%q, "rb"))
        local g = p.decode(fh:read("*a"), {functions = true})
        fh:close()
        io.write(g("!"), "|", tostring(PZ_SPEC_FRESH ~= nil))]]):format(path)
      local cmd = ("'%s' -e '%s' 2>&1"):format(pzlua, (chunk:gsub("'", "'\\''")))
      local proc = assert(io.popen(cmd))
      local text = proc:read("*a")
      proc:close()
      assert.are.equal("hello from the parent!|true", text)
    end)

    it("refer to C functions and module members by reference", function()
      assert.are.equal(string.format, roundtrip(string.format, FN))
      assert.are.equal(print, roundtrip(print, FN))
      local d = roundtrip({ fmt = string.format, concat = table.concat, floor = math.floor }, FN)
      assert.are.equal(string.format, d.fmt)
      assert.are.equal(table.concat, d.concat)
      assert.are.equal(math.floor, d.floor)
      -- a reference to a function is small: no bytecode
      assert.is_true(#encode(string.format) < 20)
      -- a closure's C function upvalue travels by reference too
      local fmt = string.format
      local g = roundtrip(function(x) return fmt("<%d>", x) end, FN)
      assert.are.equal("<7>", g(7))
      assert.are.equal(string.format, select(2, debug.getupvalue(g, 1)))
    end)

    it("refer to module tables by reference", function()
      assert.are.equal(string, roundtrip(string))
      assert.are.equal(math, roundtrip(math))
      assert.are.equal(_G, roundtrip(_G))
      assert.are.equal(package.loaded, roundtrip(package.loaded))
      local d = roundtrip({ s = string, t = table, again = string })
      assert.are.equal(string, d.s)
      assert.are.equal(table, d.t)
      assert.are.equal(string, d.again)
      assert.are.equal(p, roundtrip(p))
    end)

    it("refer to a module loaded a moment ago by reference", function()
      local mod = { data = { 1, 2 } }
      package.loaded.pz_spec_fresh_module = mod
      finally(function() package.loaded.pz_spec_fresh_module = nil end)
      assert.are.equal(mod, roundtrip(mod))
      assert.are.equal(mod.data, roundtrip(mod.data))
      assert.are.equal(mod, roundtrip({ mod })[1])
    end)

    it("never refer to a module replaced under the same name as to its successor", function()
      local defer = support.defer(finally)
      local old, new = { v = "old" }, { v = "new" }
      package.loaded.pz_spec_replaced = old
      defer(function() package.loaded.pz_spec_replaced = nil end)
      assert.are.equal(old, roundtrip(old))
      package.loaded.pz_spec_replaced = new -- package.loaded keeps its size
      local d = roundtrip(old)
      assert.are_not.equal(new, d)
      assert.are_not.equal(old, d)
      assert.are.equal("old", d.v)
      assert.are.equal(new, roundtrip(new))
      assert.are.equal(new, roundtrip({ new })[1])
      -- nor a member reassigned since
      local first = { "first" }
      new.member = first
      package.loaded.pz_spec_other = true -- package.loaded changes: the index is rebuilt
      defer(function() package.loaded.pz_spec_other = nil end)
      assert.are.equal(first, roundtrip(first))
      new.member = { "second" }
      local dm = roundtrip(first)
      assert.are_not.equal(new.member, dm)
      assert.are.same({ "first" }, dm)
      assert.are.equal(new.member, roundtrip(new.member))
    end)

    it("find a C function a loaded module gained after the index was built", function()
      local mod = {}
      package.loaded.pz_spec_gains = mod
      finally(function() package.loaded.pz_spec_gains = nil end)
      assert.are.equal(mod, roundtrip(mod)) -- the index knows the module now
      local cf = coroutine.wrap(print)
      mod.cf = cf
      assert.are.equal(cf, roundtrip(cf, FN))
      assert.are.equal(cf, roundtrip({ f = cf }, FN).f)
      -- a Lua function gained later works too, whether it travels by
      -- reference or by value
      mod.lf = function(x) return x * 2 end
      assert.are.equal(84, roundtrip(mod.lf, FN)(42))
    end)

    it("send an instance of a local class with its methods", function()
      local Point = {}
      Point.__index = Point
      function Point.new(x, y) return setmetatable({ x = x, y = y }, Point) end
      function Point:norm1() return math.abs(self.x) + math.abs(self.y) end
      function Point.__add(a, b) return Point.new(a.x + b.x, a.y + b.y) end
      local d = roundtrip({ Point.new(1, -2), Point.new(3, 4) }, FN)
      assert.are.equal(3, d[1]:norm1())
      assert.are.equal(7, d[2]:norm1())
      assert.is_true(rawequal(getmetatable(d[1]), getmetatable(d[2])))
      assert.are_not.equal(Point, getmetatable(d[1]))
      local sum = d[1] + d[2]
      assert.are.equal(4, sum.x)
      assert.are.equal(getmetatable(d[1]), getmetatable(sum))
      -- without functions = true, the methods are refused
      assert.are.equal(REFUSE_FUNCTION, error_of(decode, encode(Point.new(1, 2))))
    end)

    it("refer to a class that is a module member by reference", function()
      local M = {}
      M.Point = {}
      M.Point.__index = M.Point
      function M.Point.new(x, y) return setmetatable({ x = x, y = y }, M.Point) end
      function M.Point:sum() return self.x + self.y end
      package.loaded.pz_spec_shapes = M
      finally(function() package.loaded.pz_spec_shapes = nil end)
      local s = encode(M.Point.new(2, 3))
      -- the metatable is a reference: decoding needs no functions
      for _, opts in ipairs({ {}, FN }) do
        local d = decode(s, opts)
        assert.are.equal(M.Point, getmetatable(d))
        assert.are.equal(5, d:sum())
      end
      assert.is_nil(s:find("sum", 1, true))
    end)

    it("are refused without {functions = true}", function()
      assert.are.equal(REFUSE_FUNCTION, error_of(decode, encode(function() end)))
      assert.are.equal(REFUSE_FUNCTION, error_of(decode, encode({ 1, { f = function() end } })))
      assert.are.equal(REFUSE_FUNCTION, error_of(decode, encode(function() end), { functions = false }))
      assert.are.equal(REFUSE_REFERENCE, error_of(decode, encode(string.format)))
      assert.are.equal(REFUSE_REFERENCE, error_of(decode, encode({ print })))
    end)

    it("need a loaded module when decoding without functions", function()
      local s = "\1\11" .. varint(#"pz_spec_nowhere") .. "pz_spec_nowhere"
      assert.are.equal("cannot decode: module 'pz_spec_nowhere' is not loaded at byte 2", error_of(decode, s))
      local e = error_of(decode, s, FN)
      assert.are.equal("cannot decode: cannot require module 'pz_spec_nowhere': ",
        e:sub(1, #"cannot decode: cannot require module 'pz_spec_nowhere': "))
      local member = "\1\12\6string\4nope"
      assert.are.equal("cannot decode: 'string.nope' is a nil, not a table or function at byte 2",
        error_of(decode, member))
      package.loaded.pz_spec_string_module = "not a table"
      finally(function() package.loaded.pz_spec_string_module = nil end)
      local name = "pz_spec_string_module"
      assert.are.equal("cannot decode: module 'pz_spec_string_module' is not a table at byte 2",
        error_of(decode, "\1\12" .. varint(#name) .. name .. "\1x"))
      assert.are.equal("cannot decode: 'pz_spec_string_module' is a string, not a table or function at byte 2",
        error_of(decode, "\1\11" .. varint(#name) .. name))
    end)
  end)

  describe("encode errors", function()
    local co = coroutine.create(print)
    local LIGHT = debug.upvalueid(function() return co end, 1) -- a light userdata

    local cases = {
      { "a thread", { co = co }, "cannot encode a thread at value.co" },
      { "a thread at the root", co, "cannot encode a thread at value" },
      { "a full userdata", io.stdout, "cannot encode a userdata at value" },
      { "a userdata in an array", { 1, { io.stderr } }, "cannot encode a userdata at value[2][1]" },
      { "a thread in a long array", { 1, 2, 3, 4, 5, 6, 7, 8, co, 10 }, "cannot encode a thread at value[9]" },
      { "in a long array in a long array", { 1, 2, 3, 4, 5, 6, 7, 8, 9, { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, io.stdout } },
        "cannot encode a userdata at value[10][11]" },
      { "a light userdata", { lu = LIGHT }, "cannot encode a light userdata at value.lu" },
      { "a cdata", { n = ffi.new("int") }, "cannot encode a cdata at value.n" },
      { "a cdata pointer", ffi.cast("void *", 1), "cannot encode a cdata at value" },
      { "a C function not in package.loaded", { f = coroutine.wrap(print) },
        "cannot encode a C function (not found in package.loaded) at value.f" },
      { "a thread as a key", { [co] = 1 }, "cannot encode a thread at value<key>" },
      { "in a metatable", setmetatable({}, { __index = io.stdout }),
        "cannot encode a userdata at value<metatable>.__index" },
      { "under a table key", { [{}] = { f = co } }, "cannot encode a thread at value[table].f" },
      { "under keys of every kind",
        { ["a b"] = { [3] = { [true] = { [1.5] = { [0.1] = { [-2] = { ["end"] = { [math.huge] = co } } } } } } } },
        'cannot encode a thread at value["a b"][3][true][1.5][0.10000000000000001][-2]["end"][inf]' },
      { "under a long key", { [string.rep("\1", 100)] = co },
        'cannot encode a thread at value["' .. string.rep("\\1", 60) .. '..."]' },
      { "in an upvalue", (function() return function() return co end end)(),
        "cannot encode a thread at value<upvalue 'co'>" },
    }
    for _, case in ipairs(cases) do
      it("names the type and the path: " .. case[1], function()
        assert.are.equal(case[3], error_of(encode, case[2]))
      end)
    end

    it("names a global a function reads", function()
      _G.PZ_SPEC_CO = co
      finally(function() _G.PZ_SPEC_CO = nil end)
      local function f() return PZ_SPEC_CO end -- luacheck: globals PZ_SPEC_CO
      assert.are.equal("cannot encode a thread at value<global 'PZ_SPEC_CO'>", error_of(encode, f))
    end)

    it("refuses nesting deeper than 1000 levels, keeping both ends of the path", function()
      local deep = {}
      local cur = deep
      for _ = 1, 1000 do cur[1] = {}; cur = cur[1] end
      assert.are.equal("cannot encode: nesting deeper than 1000 levels at value"
        .. string.rep("[1]", 8) .. "..." .. string.rep("[1]", 12), error_of(encode, deep))
      -- a cycle is not nesting
      local t = {}
      t[1] = t
      local d = roundtrip(t)
      assert.is_true(rawequal(d, d[1]))
    end)

    it("leaves the encoder usable after an error", function()
      for _ = 1, 3 do
        error_of(encode, { 1, 2, { co } })
        assert.are.same({ 1, { 2 } }, roundtrip({ 1, { 2 } }))
      end
    end)

    it("writes what cannot travel as a string in lossy mode", function()
      local d = decode(encode({ co = co, u = io.stdout, f = coroutine.wrap(print), c = ffi.new("int"),
        lu = LIGHT, ok = 1 }, { lossy = true }))
      assert.are.same({ co = "<thread>", u = "<userdata>", f = "<C function>", c = "<cdata>",
        lu = "<light userdata>", ok = 1 }, d)
    end)

    it("checks its arguments", function()
      assert.are.equal("bad argument #1 to '?' (value expected)", error_of(encode))
      assert.are.equal("bad argument #1 to '?' (string expected, got number)", error_of(decode, 1))
      assert.are.equal("bad argument #1 to '?' (string expected, got no value)", error_of(decode))
      assert.are.equal("bad argument #2 to '?' (table expected, got number)", error_of(decode, "\1\0", 1))
    end)
  end)

  describe("malformed input", function()
    it("empty, or with a wrong version byte", function()
      assert.are.equal("cannot decode: empty input (no format version byte)", error_of(decode, ""))
      assert.are.equal("cannot decode: unknown format version 3 at byte 1 (expected 2)", error_of(decode, "\3\0"))
      assert.are.equal("cannot decode: unknown format version 0 at byte 1 (expected 2)", error_of(decode, "\0"))
      assert.are.equal("cannot decode: unknown format version 255 at byte 1 (expected 2)", error_of(decode, "\255"))
      assert.are.equal("cannot decode: truncated input at byte 2", error_of(decode, "\1"))
      assert.are.equal("cannot decode: truncated input at byte 2", error_of(decode, "\2"))
      -- version 1 is read too: it is version 2 without packed arrays
      assert.are.equal(5, decode("\1\x85"))
      assert.are.same({ 1, 2 }, decode("\1\8\2\0\x81\x82"))
    end)

    it("truncated at every byte", function()
      local shared = { "s" }
      local values = {
        { 1, 2.5, "str", { x = true, [3] = false }, n = -0.0, big = 2 ^ 53, null = null },
        { a = shared, b = shared, c = { shared, { shared } } },
        { string.rep("long string ", 20), 128, -300, 1e300, { {} }, [{ 1 }] = { 2 } },
        setmetatable({ 1, 2 }, { __mode = "k" }),
        { 1, 2.5, "three", { 4 }, 5, 6, 7, 8, 9, 10, 11, shared, shared },
        string.rep("x", 200),
        -2 ^ 53,
      }
      local cyc = { 1 }
      cyc.me = cyc
      values[#values + 1] = cyc
      for _, v in ipairs(values) do
        local s = encode(v)
        decode(s)
        for i = 1, #s - 1 do
          local e = error_of(decode, s:sub(1, i))
          assert.are.equal("cannot decode: ", e:sub(1, 15), e)
        end
      end
    end)

    it("truncated at every byte, with functions", function()
      local up = { 1 }
      local function f(x) return up[1] + x end
      local s = encode({ f, f, string.format })
      decode(s, FN)
      for i = 1, #s - 1 do
        local e = error_of(decode, s:sub(1, i), FN)
        assert.are.equal("cannot decode: ", e:sub(1, 15), e)
      end
    end)

    it("with trailing bytes", function()
      assert.are.equal("cannot decode: 1 trailing byte after the value at byte 3", error_of(decode, "\1\x81\0"))
      assert.are.equal("cannot decode: 2 trailing bytes after the value at byte 6",
        error_of(decode, encode({ 1 }) .. "xy"))
    end)

    it("with huge declared lengths and counts, quickly and without allocating them", function()
      local before_t, before_m = os.clock(), collectgarbage("count")
      local cases = {
        { "\1\7" .. varint(2 ^ 62),
          "cannot decode: string of 4611686018427387904 bytes exceeds the 0 bytes left at byte 3" },
        { "\1\7" .. varint(2 ^ 31) .. "abc",
          "cannot decode: string of 2147483648 bytes exceeds the 3 bytes left at byte 3" },
        { "\1\8" .. varint(2 ^ 32 - 1) .. "\0",
          "cannot decode: table of 4294967295 + 0 entries does not fit in the 0 bytes left at byte 2" },
        { "\1\8\0" .. varint(2 ^ 40) .. "\1\1",
          "cannot decode: table of 0 + 1099511627776 entries does not fit in the 2 bytes left at byte 2" },
        { "\1\8\3\1\1\1\1\1", "cannot decode: table of 3 + 1 entries does not fit in the 4 bytes left at byte 2" },
        { "\1\7" .. string.rep("\255", 10) .. "\1", "cannot decode: bad or truncated string at byte 3" },
        { "\1\8" .. string.rep("\255", 9) .. "\1\0",
          "cannot decode: table of 18446744073709551615 + 0 entries does not fit in the 0 bytes left at byte 2" },
        -- a tenth byte holding bits past the 64th
        { "\1\8" .. string.rep("\255", 9) .. "\127\0", "cannot decode: bad or truncated table size at byte 3" },
        { "\1\7" .. string.rep("\128", 9) .. "\2", "cannot decode: bad or truncated string at byte 3" },
        { "\1\5\129" .. string.rep("\128", 6) .. "\16", "cannot decode: integer out of range at byte 2" },
        { "\1\6" .. varint(2 ^ 60), "cannot decode: integer out of range at byte 2" },
        { "\1\11" .. varint(2 ^ 33) .. "x",
          "cannot decode: module name of 8589934592 bytes exceeds the 1 bytes left at byte 3" },
      }
      for _, case in ipairs(cases) do
        assert.are.equal(case[2], error_of(decode, case[1]))
      end
      assert.is_true(os.clock() - before_t < 0.5)
      assert.is_true(collectgarbage("count") - before_m < 10 * 1024)
    end)

    it("with references to objects not yet decoded", function()
      assert.are.equal("cannot decode: reference 0 to an object not yet decoded (0 so far) at byte 3",
        error_of(decode, "\1\10\0"))
      assert.are.equal("cannot decode: reference 1 to an object not yet decoded (1 so far) at byte 6",
        error_of(decode, "\1\8\1\0\10\1"))
      assert.are.equal("cannot decode: reference 99 to an object not yet decoded (2 so far) at byte 9",
        error_of(decode, "\1\8\2\0\8\0\0\10\99"))
      assert.are.equal("cannot decode: bad or truncated reference at byte 3", error_of(decode, "\1\10"))
      -- a reference to a table still being decoded is a cycle, and fine
      local t = decode("\1\8\1\0\10\0")
      assert.is_true(rawequal(t, t[1]))
    end)

    it("with unknown tags, and each tag byte alone", function()
      for _, tag in ipairs({ 0x0f, 0x11, 0x20, 0x3f, 0x60, 0x7f }) do
        assert.are.equal(("cannot decode: unknown tag 0x%02x at byte 2"):format(tag),
          error_of(decode, "\1" .. string.char(tag) .. "\0\0"))
      end
      -- 0x10 names a string in a pool's shared memory: only a pool reads it
      assert.are.equal("cannot decode: a string in a pool's shared memory, outside a pool at byte 2",
        error_of(decode, "\1\16\0\0"))
      assert.are.equal("cannot decode: upvalue join outside a function's upvalues at byte 2",
        error_of(decode, "\1\14\0\1"))
      for tag = 0, 255 do
        for _, opts in ipairs({ {}, FN }) do
          local ok, e = pcall(decode, "\1" .. string.char(tag), opts)
          if ok then
            assert.is_true(tag <= 3 or tag == 0x40 or tag >= 0x80, "tag " .. tag)
          else
            assert.is_true(e:sub(1, 15) == "cannot decode: " or e == REFUSE_FUNCTION, e)
          end
        end
      end
    end)

    it("with invalid table contents", function()
      assert.are.equal("cannot decode: nil table key at byte 5", error_of(decode, "\1\8\0\1\0\x81"))
      assert.are.equal("cannot decode: NaN table key at byte 5",
        error_of(decode, "\1\8\0\1\4" .. double_bytes(0 / 0) .. "\x81"))
      assert.are.equal("cannot decode: metatable is a number, not a table at byte 5",
        error_of(decode, "\1\9\0\0\x81"))
      assert.are.equal("cannot decode: truncated number at byte 2", error_of(decode, "\1\4\0\0\0"))
      assert.are.equal("cannot decode: truncated string at byte 2", error_of(decode, "\1\x45abc"))
      -- nil values in the array part make holes
      local t = decode("\1\8\3\0\0\x82\0")
      assert.are.same({ [2] = 2 }, t)
    end)

    it("nested deeper than 1000 levels", function()
      local open = string.rep("\8\1\0", 1001)
      assert.are.equal("cannot decode: nesting deeper than 1000 levels at byte 3002",
        error_of(decode, "\1" .. open .. "\x80"))
      local ok = decode("\1" .. string.rep("\8\1\0", 1000) .. "\x80")
      assert.are.equal("table", type(ok))
      -- a metatable counts as one level deeper than its table
      local mts = string.rep("\9\0\0", 1001) .. "\8\0\0"
      assert.are.equal("cannot decode: nesting deeper than 1000 levels at byte 3002",
        error_of(decode, "\1" .. mts))
    end)

    it("with bad bytecode, upvalues or globals, with functions", function()
      assert.are.equal("cannot decode: bad bytecode (attempt to load chunk with wrong mode) at byte 2",
        error_of(decode, "\1\13\3abc\0\0", FN))
      -- a function with no upvalue: tag, varint length, bytecode, 0, 0
      local s = encode(function() return 1 end)
      assert.are.equal("\13", s:sub(2, 2))
      local len = s:byte(3)
      assert.is_true(len < 128)
      local head = s:sub(1, 3 + len) -- up to the end of the bytecode
      assert.are.equal(head .. "\0\0", s)
      assert.are.equal(1, decode(s, FN)())
      assert.are.equal(("cannot decode: function has 0 upvalues, the encoding 1 at byte %d"):format(#head + 1),
        error_of(decode, head .. "\1\x81\0", FN))
      assert.are.equal(("cannot decode: truncated function at byte %d"):format(#head + 1),
        error_of(decode, head, FN))
      assert.are.equal(("cannot decode: 3 globals do not fit in the 2 bytes left at byte %d"):format(#head + 2),
        error_of(decode, head .. "\0\3\1x", FN))
      -- a function with one upvalue joined to a function's upvalue that is
      -- not there, or to a table
      local x = 1
      local one = encode(function() return x end)
      len = one:byte(3)
      head = one:sub(1, 3 + len)
      assert.are.equal(head .. "\1\x81\0", one)
      assert.are.equal(("cannot decode: upvalue join names upvalue 5, which does not exist at byte %d")
        :format(#head + 2), error_of(decode, head .. "\1\14\0\5\0", FN))
      assert.are.equal(("cannot decode: upvalue join names upvalue 0, which does not exist at byte %d")
        :format(#head + 2), error_of(decode, head .. "\1\14\0\0\0", FN))
      assert.are.equal(("cannot decode: truncated upvalue join at byte %d"):format(#head + 2),
        error_of(decode, head .. "\1\14\0", FN))
      local in_table = "\1\8\1\0" .. head:sub(2) .. "\1\14\0\1\0"
      assert.are.equal(("cannot decode: upvalue join names a table, not a Lua function at byte %d")
        :format(#head + 5), error_of(decode, in_table, FN))
      -- joined to its own first upvalue: allowed, and harmless
      local self_join = decode(head .. "\1\14\0\1\0", FN)
      assert.is_nil(self_join())
      -- globals are not set over the decoding state's own
      local g = decode(head .. "\1\x81\1\5print\x82", FN)
      assert.are.equal(1, g())
      assert.are.equal("function", type(print))
    end)
  end)

  describe("random values", function()
    -- A generator of nested values: numbers from a list of awkward ones and
    -- random integers and doubles, strings of random bytes, booleans, null,
    -- tables with arrays, holes, hash parts keyed by every encodable type,
    -- metatables, and references to earlier tables (sharing and cycles).
    local awkward = { 0, -0.0, 1, -1, 127, 128, -128, 255, 256, 2 ^ 31, 2 ^ 32, 2 ^ 53, -(2 ^ 53),
      2 ^ 53 - 1, 2 ^ 53 + 2, 0.1, 0.5, -0.5, 1e308, -1e308, 5e-324, math.huge, -math.huge, 0 / 0 }
    local random = math.random

    local function rand_string()
      local n = random(0, 10) == 0 and random(32, 300) or random(0, 40)
      local b = {}
      for i = 1, n do b[i] = string.char(random(0, 255)) end
      return table.concat(b)
    end

    local function rand_number()
      local r = random(1, 4)
      if r == 1 then return awkward[random(#awkward)] end
      if r == 2 then return random(-1000, 1000) end
      if r == 3 then return (random() - 0.5) * 10 ^ random(-300, 300) end
      return random(0, 2 ^ 30) * 2 ^ random(0, 30) * (random(2) == 1 and 1 or -1)
    end

    local gen_table

    local function gen_value(depth, pool)
      local r = random(1, 12)
      if r <= 3 then return rand_number() end
      if r <= 5 then return rand_string() end
      if r == 6 then return random(2) == 1 end
      if r == 7 then return null end
      if r == 8 and #pool > 0 then return pool[random(#pool)] end
      if depth > 0 then return gen_table(depth - 1, pool) end
      return rand_string()
    end

    local function gen_key(depth, pool)
      local r = random(1, 8)
      if r <= 2 then
        local k = rand_number()
        if k ~= k then k = 0.25 end
        return k
      end
      if r <= 5 then return rand_string() end
      if r == 6 then return random(2) == 1 end
      if r == 7 and #pool > 0 then return pool[random(#pool)] end
      if depth > 0 and random(3) == 1 then return gen_table(depth - 1, pool) end
      return rand_string()
    end

    gen_table = function(depth, pool)
      local t = {}
      pool[#pool + 1] = t
      local n = random(8) == 1 and random(8, 40) or random(0, 6)
      for i = 1, n do
        if random(5) > 1 then t[i] = gen_value(depth, pool) end
      end
      for _ = 1, random(0, 5) do
        t[gen_key(depth, pool)] = gen_value(depth, pool)
      end
      if random(12) == 1 then
        local mt = random(3) == 1 and #pool > 0 and pool[random(#pool)] or { tag = rand_string() }
        setmetatable(t, mt)
      end
      return t
    end

    it("round-trip, with their sharing structure (seed 12345)", function()
      math.randomseed(12345)
      local started = os.clock()
      local n, tables, bytes = 3000, 0, 0
      for i = 1, n do
        local pool = {}
        local v = gen_value(4, pool)
        local s = encode(v)
        bytes = bytes + #s
        local d = decode(s)
        if not deep_equal(v, d) then
          error(("value %d differs after a round trip (encoded: %q)"):format(i, s))
        end
        -- decoding twice gives two separate but equal values
        local d2 = decode(s)
        if type(d) == "table" then
          assert.is_false(rawequal(d, d2))
          tables = tables + 1
        end
        assert.is_true(deep_equal(d, d2))
        -- random truncations fail cleanly
        if #s > 2 then
          local cut = random(1, #s - 1)
          local ok, e = pcall(decode, s:sub(1, cut))
          assert.is_false(ok)
          assert.are.equal("cannot decode: ", e:sub(1, 15), e)
        end
      end
      assert.is_true(tables > n / 4)
      assert.is_true(bytes > 100000)
      assert.is_true(os.clock() - started < 20)
    end)

    it("compare with the sharing structure, not only the contents", function()
      local t = { 1 }
      assert.is_true(deep_equal({ t, t }, { t, t }))
      assert.is_false(deep_equal({ t, t }, { { 1 }, { 1 } }))
      assert.is_false(deep_equal({ { 1 }, { 1 } }, { t, t }))
      assert.is_false(deep_equal({ 0 }, { -0.0 }))
      assert.is_true(deep_equal({ 0 / 0 }, { 0 / 0 }))
      local c1, c2 = {}, {}
      c1.x, c2.x = c1, {}
      assert.is_false(deep_equal(c1, c2))
      assert.is_true(deep_equal({ [{ 1 }] = 1, [{ 2 }] = 2 }, { [{ 2 }] = 2, [{ 1 }] = 1 }))
      assert.is_false(deep_equal({ [{ 1 }] = 1, [{ 2 }] = 2 }, { [{ 2 }] = 1, [{ 1 }] = 2 }))
    end)
  end)
end)
