-- make_seeds.lua - writes the seed corpora of the two libFuzzer harnesses:
--   spec/fuzz/seeds_fuzz_value/   values, tuples and Lua-facing encodings
--   spec/fuzz/seeds_fuzz_frame/   frame streams as a worker writes them
-- From the top of the tree, after `make`:
--   LUA_PATH="lua/?.lua;;" LUA_CPATH="build/?.so;;" luajit spec/fuzz/make_seeds.lua
-- The files are small and hold no randomness, so the script can be run
-- again after a format change and the result committed. Records may come
-- out with their keys in another order from run to run (the order of
-- LuaJIT's hash part), which makes them different seeds, no worse ones.

local p = require "parallelize"

local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."

local support = require "spec.support"
local write, varint = support.write, support.varint

local function le(n, bytes)
  local out = {}
  for i = 1, bytes do
    local byte = n % 256
    out[i] = string.char(byte)
    n = (n - byte) / 256
  end
  return table.concat(out)
end

-- The encoding of v without the format version byte (what pz_decode_value
-- reads).
local function raw(v)
  return p.encode(v):sub(2)
end

-- values --------------------------------------------------------------------

local shared = { "shared" }
local cycle = { name = "cycle" }
cycle.self = cycle
local with_mt = setmetatable({ 1, 2 }, { __mode = "k", tag = "mt" })

local values = {
  { "nil", nil },
  { "true", true },
  { "zero", 0 },
  { "fixint_max", 127 },
  { "posint", 128 },
  { "negint", -300 },
  { "int_2_53", 2 ^ 53 },
  { "double", 0.5 },
  { "negative_zero", -0.0 },
  { "nan", 0 / 0 },
  { "empty_string", "" },
  { "short_string", "hello" },
  { "long_string", string.rep("0123456789", 4) },
  { "null", p.null },
  { "empty_table", {} },
  { "array", { 1, 2, 3, "four", 5.5 } },
  { "record", { id = 7, name = "x", tags = { "a", "b" }, ok = true, [2.5] = false } },
  { "shared", { shared, shared, k = shared } },
  { "cycle", cycle },
  { "metatable", with_mt },
  { "table_key", { [{ 1 }] = { 2 } } },
  { "holes", { 1, nil, 3, [10] = 10 } },
  { "module_ref", { s = string, t = table } },
  { "member_ref", { loaded = package.loaded } },
  { "nested", { { { { { "deep" } } } } } },
}

-- sequences and packed arrays of doubles (format 2)
local floats, halves, strings = {}, {}, {}
for i = 1, 20 do
  floats[i] = i + 0.5
  halves[i] = i % 2 == 0 and i or i * 0.25
  strings[i] = "s" .. i
end
values[#values + 1] = { "packed", floats }
values[#values + 1] = { "packed_half_integral", halves }
values[#values + 1] = { "sequence_of_strings", strings }
values[#values + 1] = { "packed_shared", { floats, floats, [floats] = true } }

local vdir = dir .. "/seeds_fuzz_value"
os.execute("mkdir -p '" .. vdir .. "'")
for _, case in ipairs(values) do
  write(vdir .. "/value_" .. case[1], raw(case[2]))
end
-- whole Lua-facing encodings: version byte first (each is also a valid
-- one-value tuple)
write(vdir .. "/encoded_record", p.encode(values[17][2]))
write(vdir .. "/encoded_shared", p.encode(values[18][2]))
-- tuples: a count, then values sharing one reference numbering
write(vdir .. "/tuple_three", varint(3) .. raw(1) .. raw("two") .. raw({ 3 }))
write(vdir .. "/tuple_empty", varint(0))
-- a few malformed ones near valid ones
write(vdir .. "/bad_ref", "\8\1\0\10\5")
write(vdir .. "/bad_count", "\8\255\255\255\255\15\0")
-- packed doubles that are NaNs with payloads (LuaJIT's tags live there)
write(vdir .. "/packed_nans", "\15\4" .. le(0, 8) .. "\255\255\255\255\251\255\255\255"
  .. "\1\0\0\0\0\0\240\127" .. "\0\0\0\0\0\0\248\255")
write(vdir .. "/packed_too_long", "\15" .. varint(2 ^ 40) .. le(0, 8))
-- strings in a pool's shared memory (tag 0x10: offset, length), in a tuple
-- (the harness gives tuples a 4 KiB region): inside it, and past its end
write(vdir .. "/tuple_shared", varint(2) .. "\16" .. varint(100) .. varint(3000)
  .. "\8\1\0\16" .. varint(4000) .. varint(96))
write(vdir .. "/tuple_shared_past", varint(1) .. "\16" .. varint(4000) .. varint(97))

-- frames --------------------------------------------------------------------

local TYPES = { INIT = 1, INIT_OK = 2, INIT_ERROR = 3, CALL = 4, RESULT = 5, ERROR = 6, STOP = 7 }

-- The 24-byte header of frame.h: length, type, deaths, tag, tries, flags
-- and 3 reserved bytes, timeout_ms, id.
local function frame(type_name, id, payload, tag)
  return le(#payload, 4) .. string.char(TYPES[type_name], 0, tag or 0, 0) .. le(0, 4) .. le(0, 4) .. le(id, 8)
    .. payload
end

local function prefixed(s)
  return varint(#s) .. s
end

-- Two leading bytes: read size - 1, and log2 of the largest payload.
local function stream(read_size, max_log2, ...)
  return string.char(read_size - 1, max_log2) .. table.concat({ ... })
end

local result = frame("RESULT", 1, varint(123456) .. varint(1) .. raw({ ok = true, n = 42 }))
local err = frame("ERROR", 2, varint(999) .. prefixed("boom: it failed") .. prefixed("stack traceback:\n\t[C]: ?")
  .. raw({ code = 42 }), 3)
local init_ok = frame("INIT_OK", 4242, raw("<executor>"))
local init_err = frame("INIT_ERROR", 0, prefixed("cannot load module 'x'") .. "traceback")
-- The version handshake (src/handshake.h) as the fuzz harness's worker
-- expects it, then the settings.
local handshake = "PZ\1" .. string.char(#"LuaJIT 2.1.0-beta3") .. "LuaJIT 2.1.0-beta3"
  .. string.char(#"LJ2 le fr2") .. "LJ2 le fr2"
local init = frame("INIT", 0, handshake .. prefixed(raw({ path = "./?.lua", cpath = "./?.so", kind = "module",
  max_message = 2 ^ 20, spin_ns = 100000, kill_leftovers = true }))
  .. prefixed(raw("module")) .. varint(1) .. raw("args"))
local stop = frame("STOP", 0, "")

local fdir = dir .. "/seeds_fuzz_frame"
os.execute("mkdir -p '" .. fdir .. "'")
write(fdir .. "/answers_one_read", stream(256, 20, init_ok, result, err))
write(fdir .. "/answers_small_reads", stream(3, 20, result, err, result))
write(fdir .. "/init_error", stream(64, 16, init_err))
write(fdir .. "/init_and_stop", stream(256, 20, init, stop))
write(fdir .. "/too_long", stream(256, 4, result))
write(fdir .. "/bad_type", stream(256, 20, le(0, 4) .. "\99\0\0\0" .. le(0, 4) .. le(0, 4) .. le(0, 8)))
write(fdir .. "/partial", stream(5, 20, result:sub(1, 30)))
print("seeds written to " .. vdir .. " and " .. fdir)
