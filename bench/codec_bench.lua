-- codec_bench.lua - parallelize.encode/decode against LuaJIT's string.buffer
-- serializer on five values. A benchmark, not a test: it prints
-- nanoseconds per call and the ratio parallelize / string.buffer, and the
-- same figures as key=value lines for bench/run.sh.
--
--   LUA_PATH="lua/?.lua;;" LUA_CPATH="build/?.so;;" luajit bench/codec_bench.lua
--   build/pzlua bench/codec_bench.lua
--
-- A case takes about BENCH_SECONDS (default 1), split in ROUNDS rounds; a
-- round times each of the four operations (encode and decode, each codec)
-- in turn, over enough calls for a quarter of the round.  The fastest round
-- of each operation counts.  Interleaving the operations and keeping the
-- best keeps other load on the machine out of the figures, and out of the
-- ratios above all, as far as it can be.

local p = require "parallelize"
local core = require "parallelize.core"
local sbuf = require "string.buffer"

local now = core.now
local SECONDS = tonumber(os.getenv("BENCH_SECONDS")) or 1
local ROUNDS = 20

-- The values ------------------------------------------------------------------

local floats = {}
for i = 1, 1000 do
  -- no two alike, none integral: each takes a full double in either format
  floats[i] = i * 1.37 + 0.001 * (i % 7)
end

local flat = {}
for i = 1, 100 do
  -- small integers (one byte each in our format) and doubles, alternating
  flat[i] = (i % 2 == 0) and (i * 7) % 100 or i * 1.37
end

local ints = {}
for i = 1, 1000 do
  -- integers of one to three bytes in our format, all different
  ints[i] = i * 37
end

local chars = {}
for i = 1, 1024 do chars[i] = string.char(32 + (i * 31) % 95) end
local kib_string = table.concat(chars)

local record = {
  id = 123456,
  name = "Ada Lovelace",
  email = "ada@example.org",
  active = true,
  score = 98.25,
  tags = { "math", "engines", "poetry" },
  address = { street = "12 St James's Square", city = "London", zip = "SW1Y 4JH" },
  history = { { year = 1842, what = "notes" }, { year = 1843, what = "translation" } },
}

local cases = {
  { name = "array of 1,000 floats", key = "floats", value = floats },
  { name = "small nested record", key = "record", value = record },
  { name = "1 KiB string", key = "kib_string", value = kib_string },
  { name = "flat table of 100 numbers", key = "flat", value = flat },
  { name = "array of 1,000 integers", key = "ints", value = ints },
}

-- Timing ----------------------------------------------------------------------

-- Keeps the last result alive so that no call is optimized away.
local sink

--- How many calls of fn(arg) take about `seconds` (after a warm-up).
local function calls_for(fn, arg, seconds)
  local n = 8
  local elapsed
  repeat
    n = n * 2
    local t0 = now()
    for _ = 1, n do sink = fn(arg) end
    elapsed = now() - t0
  until elapsed >= seconds / 4
  return math.max(1, math.floor(n * seconds / elapsed))
end

--- Nanoseconds per call of each ops[i].fn(ops[i].arg): the fastest of
-- ROUNDS rounds, the operations taking turns within each round.
local function time_per_call(ops, seconds)
  local per_op = seconds / ROUNDS / #ops
  for _, op in ipairs(ops) do
    op.n, op.best = calls_for(op.fn, op.arg, per_op), math.huge
  end
  for _ = 1, ROUNDS do
    for _, op in ipairs(ops) do
      local fn, arg = op.fn, op.arg
      collectgarbage()
      local t0 = now()
      for _ = 1, op.n do sink = fn(arg) end
      local per = (now() - t0) / op.n
      if per < op.best then op.best = per end
    end
  end
  assert(sink ~= nil)
  local ns = {}
  for i, op in ipairs(ops) do ns[i] = op.best * 1e9 end
  return ns
end

-- Checks that a codec round-trips the value before it is timed: the same
-- contents at every depth (none of the values shares a table).
local function check(v, decoded, path)
  path = path or "value"
  if type(v) ~= "table" then
    if decoded ~= v then error("round trip differs at " .. path) end
    return
  end
  if type(decoded) ~= "table" then error("round trip lost the table at " .. path) end
  for k, x in pairs(v) do check(x, decoded[k], path .. "[" .. tostring(k) .. "]") end
  for k in pairs(decoded) do
    if v[k] == nil then error("round trip added " .. path .. "[" .. tostring(k) .. "]") end
  end
end

local rows = {}
for _, case in ipairs(cases) do
  local v = case.value
  local ours, theirs = p.encode(v), sbuf.encode(v)
  check(v, p.decode(ours))
  check(v, sbuf.decode(theirs))
  local ns = time_per_call({
    { fn = p.encode, arg = v },
    { fn = sbuf.encode, arg = v },
    { fn = p.decode, arg = ours },
    { fn = sbuf.decode, arg = theirs },
  }, SECONDS)
  rows[#rows + 1] = { case.name, ns[1], ns[2], ns[3], ns[4], #ours, #theirs, key = case.key }
end

-- What the direct walk of tables buys (src/codec_direct.c): the record and
-- the floats encoded through the C API path alone, beside the walk, in the
-- same rounds.
local function encode_capi(v)
  core.codec_direct(false)
  local s = p.encode(v)
  core.codec_direct(true)
  return s
end
local walk_ns = time_per_call({
  { fn = p.encode, arg = record },
  { fn = encode_capi, arg = record },
  { fn = p.encode, arg = floats },
  { fn = encode_capi, arg = floats },
}, SECONDS)

-- Report ----------------------------------------------------------------------

local header = { "case", "pz enc ns", "sb enc ns", "enc ratio", "pz dec ns", "sb dec ns", "dec ratio",
  "pz bytes", "sb bytes" }
local lines = { header }
for _, r in ipairs(rows) do
  lines[#lines + 1] = {
    r[1],
    ("%.0f"):format(r[2]), ("%.0f"):format(r[3]), ("%.2f"):format(r[2] / r[3]),
    ("%.0f"):format(r[4]), ("%.0f"):format(r[5]), ("%.2f"):format(r[4] / r[5]),
    tostring(r[6]), tostring(r[7]),
  }
end
local widths = {}
for _, l in ipairs(lines) do
  for i, cell in ipairs(l) do widths[i] = math.max(widths[i] or 0, #cell) end
end
print(("codec benchmark: %s, %s, best of %d rounds, about %gs per case")
  :format(jit.version, p._VERSION, ROUNDS, SECONDS))
print("ratio = parallelize / string.buffer (below 1: parallelize is faster)")
for li, l in ipairs(lines) do
  local cells = {}
  for i, cell in ipairs(l) do
    -- the case name left-aligned, the figures right-aligned
    cells[i] = i == 1 and cell .. string.rep(" ", widths[i] - #cell) or string.rep(" ", widths[i] - #cell) .. cell
  end
  print(table.concat(cells, "  "))
  if li == 1 then
    local rule = {}
    for i = 1, #widths do rule[i] = string.rep("-", widths[i]) end
    print(table.concat(rule, "  "))
  end
end

print(("the C API path alone (the direct walk off): record %.0f ns (%.2f x the walk's %.0f), floats %.0f ns"
  .. " (%.2f x %.0f)"):format(walk_ns[2], walk_ns[2] / walk_ns[1], walk_ns[1], walk_ns[4], walk_ns[4] / walk_ns[3],
  walk_ns[3]))

-- The same figures as key=value lines, for bench/run.sh.
for _, r in ipairs(rows) do
  print(("%s_enc_ns=%.0f"):format(r.key, r[2]))
  print(("%s_enc_sb_ns=%.0f"):format(r.key, r[3]))
  print(("%s_enc_ratio=%.2f"):format(r.key, r[2] / r[3]))
  print(("%s_dec_ns=%.0f"):format(r.key, r[4]))
  print(("%s_dec_sb_ns=%.0f"):format(r.key, r[5]))
  print(("%s_dec_ratio=%.2f"):format(r.key, r[4] / r[5]))
end
print(("record_enc_capi_ns=%.0f"):format(walk_ns[2]))
print(("floats_enc_capi_ns=%.0f"):format(walk_ns[4]))
