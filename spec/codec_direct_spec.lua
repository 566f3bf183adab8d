-- The direct walk of tables (src/codec_direct.c), which reads LuaJIT's
-- objects instead of going through the C API, against the C API path:
-- random values of every shape it writes, and of shapes it must leave to
-- the C API path, written both ways (core.codec_direct switches it), must
-- decode to the value, sharing and cycles included, and be the same bytes
-- where the C API path keeps no padded count (and with the JIT on: with it
-- off, that path does not pack sequences of numbers, and the walk does).

local p = require "parallelize"
local core = require "parallelize.core"
local support = require "spec.support"

local encode, decode = p.encode, p.decode

--- v encoded by the C API path alone.
local function encode_slow(v)
  core.codec_direct(false)
  local ok, s = pcall(encode, v)
  core.codec_direct(true)
  assert(ok, s)
  return s
end

--- True when a and b are the same number, NaN and the sign of zero told.
local function same_number(a, b)
  if a ~= a then return b ~= b end
  return a == b and (a ~= 0 or 1 / a == 1 / b)
end

-- Every table the values use as a key holds a number of its own under this
-- key, by which its copy is found among the decoded table's keys.
local KEY_ID = "\0key"

--- Compares a with b, where tables of a must map one to one onto tables of
-- b (seen): sharing and cycles must be kept, not just contents.  Returns
-- nil, or where they differ.
local function differ(a, b, seen, back, path)
  if type(a) ~= type(b) then return path .. ": " .. type(a) .. " against " .. type(b) end
  if type(a) == "number" then
    return not same_number(a, b) and path .. ": " .. tostring(a) .. " against " .. tostring(b) or nil
  end
  if type(a) ~= "table" then
    return a ~= b and path .. ": " .. tostring(a) .. " against " .. tostring(b) or nil
  end
  if seen[a] ~= nil or back[b] ~= nil then
    return (seen[a] ~= b or back[b] ~= a) and path .. ": sharing differs" or nil
  end
  seen[a], back[b] = b, a
  local count = 0
  for k, v in pairs(a) do
    count = count + 1
    local key = k
    if type(k) == "table" then -- a table key: its image in b, by its id
      key = seen[k]
      if key == nil then
        for kb in pairs(b) do
          if type(kb) == "table" and rawget(kb, KEY_ID) == rawget(k, KEY_ID) then key = kb end
        end
        if key == nil then return path .. ": table key not found" end
        local d = differ(k, key, seen, back, path .. "[key]")
        if d then return d end
      end
    end
    local d = differ(v, b[key], seen, back, path .. "[" .. tostring(k) .. "]")
    if d then return d end
  end
  for _ in pairs(b) do count = count - 1 end
  return count ~= 0 and path .. ": entry counts differ" or nil
end

--- Where two encodings first differ, and the bytes around it in hex.
local function first_difference(a, b)
  local i = 1
  while i <= #a and a:byte(i) == b:byte(i) do i = i + 1 end
  local function hex(s) return (s:sub(math.max(1, i - 8), i + 16):gsub(".", function(c)
    return string.format("%02x ", c:byte()) end)) end
  return "at byte " .. i .. " of " .. #a .. "/" .. #b .. ": " .. hex(a) .. "| " .. hex(b)
end

local function check_same(v, got, what)
  local d = differ(v, got, {}, {}, what)
  assert(d == nil, d)
end

-- Random values ---------------------------------------------------------------

local random = math.random

local NUMBERS = { 0, -0.0, 1, -1, 127, 128, -128, 2 ^ 31, 2 ^ 53, 2 ^ 53 + 2, -(2 ^ 53 + 2),
  0.5, -2.25, 1e300, 1 / 0, -1 / 0, 0 / 0, 3.14159, 2 ^ 51 + 0.5, 2 ^ 52 + 1 }

local function random_string()
  local n = ({ 0, 1, 3, 8, 15, 16, 17, 31, 32, 33, 100, 1000 })[random(12)]
  local chars = {}
  for i = 1, n do chars[i] = string.char(random(0, 255)) end
  return table.concat(chars)
end

local function random_number()
  if random(3) == 1 then return NUMBERS[random(#NUMBERS)] end
  if random(2) == 1 then return random(-100000, 100000) end
  return (random() - 0.5) * 10 ^ random(-5, 20)
end

local random_value, random_table
local keys_made = 0
-- Values still to be made in the current case: a table's items are
-- scalars once it is spent, which bounds a value's size.
local budget = 0

--- A key of any kind the walk writes, or a table.
local function random_key(pool, depth)
  local r = random(10)
  if r <= 4 then return random_string() end
  if r <= 7 then
    local k = random_number()
    return k == k and k or 1 -- not NaN
  end
  if r == 8 then return random(2) == 1 end
  if r == 9 then return random(0, 40) end
  local t = random_table(pool, depth + 1)
  keys_made = keys_made + 1
  t[KEY_ID] = keys_made
  return t
end

--- A table of a random shape: a sequence (of numbers or not, long or
-- short, possibly with a hole, t[0] or hash keys added), a record, a mix,
-- made with an array part bigger than it needs or with none.
function random_table(pool, depth)
  local shape = random(6)
  local t
  if random(2) == 1 then t = {} else t = require("table.new")(random(0, 40), random(0, 8)) end
  pool[#pool + 1] = t
  if shape <= 3 then
    local n = ({ 1, 2, 7, 8, 15, 16, 17, 40, 300 })[random(9)]
    local numbers = random(2) == 1
    for i = 1, n do
      t[i] = numbers and random_number() or random_value(pool, depth + 1)
    end
    if shape == 2 then
      local r = random(4)
      if r == 1 then t[0] = random_number()
      elseif r == 2 then t[random(n)] = nil
      elseif r == 3 then t.x = random_value(pool, depth + 1)
      else t[n + 2] = 1 end
    end
    if shape == 3 and numbers then
      -- mostly integral or mostly not, exactly at the packing rule's edge
      for i = 1, n do t[i] = (i <= math.floor(n / 2)) and i + 0.5 or i end
    end
  else
    for _ = 1, random(0, 12) do
      local k = random_key(pool, depth)
      if k ~= nil and k == k then t[k] = random_value(pool, depth + 1) end
    end
    if shape == 5 then
      for i = 1, random(5) do t[i] = random_value(pool, depth + 1) end
    end
  end
  return t
end

--- Any value the walk writes; now and then a table met before (shared, or a
-- cycle when it is an ancestor).
function random_value(pool, depth, no_nil)
  budget = budget - 1
  local r = random(12)
  if budget < 0 and r <= 4 then r = 5 end
  if #pool > 0 and r == 1 then return pool[random(#pool)] end
  if depth < 4 and r <= 4 then return random_table(pool, depth) end
  if r <= 7 then return random_number() end
  if r <= 10 then return random_string() end
  if r == 11 then return random(2) == 1 end
  if no_nil then return 0 end
  return random(2) == 1
end

-- The specs --------------------------------------------------------------------

describe("the direct walk of tables", function()
  it("is in use on this LuaJIT (its layout is known)", function()
    assert.is_true(core.codec_direct())
  end)

  it("writes random values as the C API path does, sharing and cycles kept", function()
    local seed = tonumber(os.getenv("PZ_SEED")) or os.time()
    math.randomseed(seed)
    local compared, what_seed = 0, "seed " .. seed
    for case = 1, 2500 do
      budget = random(2) == 1 and 50 or 2000
      local v = random_table({}, 0)
      local fast, slow = encode(v), encode_slow(v)
      local what = "seed " .. seed .. " case " .. case
      check_same(v, decode(fast), what .. " (direct)")
      check_same(v, decode(slow), what .. " (C API)")
      if #slow < 1000 then -- no count left padded (codec_enc.c's COMPACT_MAX)
        compared = compared + 1
        assert(fast == slow, what .. ": the bytes differ " .. first_difference(fast, slow))
      end
    end
    -- About 1,055 of the 2,500 cases are small enough, 25 either way from
    -- seed to seed: the floor of 1,000 failed about one seed in fifty.
    assert.is_true(compared > 800, what_seed .. ": only " .. compared .. " cases compared by bytes")
  end)

  it("leaves to the C API path what it does not write, at any depth", function()
    local mt = setmetatable({ x = 1 }, { __index = { y = 2 } })
    local cases = {
      { f = function() return 1 end },
      { deep = { deeper = { string.format } } }, -- a module member
      { 1, 2, mt },
      { coroutine = coroutine },                 -- a module table
      { [string.rep] = true },
    }
    for i, v in ipairs(cases) do
      local fast, slow = encode(v), encode_slow(v)
      assert.are.equal(slow, fast, "case " .. i)
    end
    local ok, err = pcall(encode, { a = { b = coroutine.create(print) } })
    assert.is_false(ok)
    assert.matches("cannot encode a thread at value.a.b", err, 1, true)
    -- the walk gave up; nothing of its output is left in the next encode
    assert.are.equal(encode_slow({ 1, { 2 } }), encode({ 1, { 2 } }))
  end)

  it("gives up beyond 100 levels, where the C API path goes on to 1000", function()
    local v = {}
    local t = v
    for _ = 1, 300 do t.next = {}; t = t.next end
    local fast = encode(v)
    assert.are.equal(encode_slow(v), fast)
    local d = decode(fast)
    for _ = 1, 300 do d = d.next end
    assert.are.same({}, d)
  end)

  it("numbers more tables than its list holds, sharing kept across them", function()
    local shared = { "s" }
    local v = {}
    for i = 1, 500 do v[i] = { i, shared, { i } } end
    v.self = v
    local d = decode(encode(v))
    -- over a kilobyte: the C API path may keep counts padded, so the
    -- values are compared, not the bytes
    check_same(v, d, "direct")
    check_same(v, decode(encode_slow(v)), "C API")
    assert.are.equal(d, d.self)
    for i = 2, 500 do assert.are.equal(d[1][2], d[i][2]) end
  end)

  it("sees a module loaded since the last encode, and one replaced", function()
    local name = "pz_direct_spec_module"
    local m = { answer = { 42 } }
    assert.are.equal(8, encode({ m }):byte(5)) -- by value
    package.loaded[name] = m
    local s = encode({ m, m.answer })
    assert.are.equal(encode_slow({ m, m.answer }), s)
    local d = decode(s)
    assert.are.equal(m, d[1]) -- the receiving state's own, by name
    assert.are.equal(m.answer, d[2])
    local m2 = { answer = { 43 } }
    package.loaded[name] = m2
    assert.are.equal(m2, decode(encode({ m2 }))[1])
    package.loaded[name] = nil
    collectgarbage()
    assert.are_not.equal(m2, decode(encode({ m2 }))[1]) -- by value again
  end)

  -- The cases below were found in review.

  it("packs a sequence whose number not finite comes after the fractions are counted", function()
    for _, n in ipairs({ 130, 300 }) do
      for _, odd in ipairs({ math.huge, -math.huge, 0 / 0 }) do
        local t = {}
        for i = 1, n - 1 do t[i] = i end
        t[n] = odd
        local fast = encode(t)
        assert.are.equal(15, fast:byte(2)) -- PZ_T_DOUBLES
        assert.are.equal(encode_slow(t), fast)
      end
    end
  end)

  it("does not leave the index current when its rebuild raised", function()
    -- A script of its own: a finalizer raising inside compiled code, or
    -- after compiled traces of busted's, is LuaJIT's trouble; with the JIT
    -- off from the start it raises where it should.
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    support.write(dir .. "/raised.lua", [[
      jit.off()
      local P = require "parallelize"
      for i = 1, 40 do
        local m = {}
        for j = 1, 20 do m["f" .. j] = {} end
        package.loaded["bulk" .. i] = m
      end
      P.encode({}) -- the index, without the module below
      local m = { k = 1 }
      package.loaded.raised = m
      collectgarbage("collect")
      collectgarbage("setstepmul", 10)
      local started, fired = false, false
      for _ = 1, 50 do
        getmetatable(newproxy(true)).__gc = function()
          if not started then started = true return end
          if not fired then fired = true; error("raised by a finalizer") end
        end
      end
      while not started do collectgarbage("step", 0) end
      local ok, err = pcall(P.encode, {}) -- the index's rebuild meets the error
      collectgarbage("setstepmul", 200)
      print(ok, err, P.encode(m):byte(2))
    ]])
    local out, status = support.run(support.quote(support.pzlua()) .. " " .. dir .. "/raised.lua")
    assert.are.equal(0, status, out)
    -- the encode raised, and the module then travels by name (PZ_T_MODULE)
    assert.matches("^false\t[^\n]*raised by a finalizer\t11\n$", out)
  end)

  it("leaves a pool's big string to the C API path, placed in shared memory once", function()
    local pool = p.Parallelize(function(n) return { string.rep("x", n), print } end,
      { workers = 1, max_message = 300000 })
    finally(function() pool:stop() end)
    pool(200000)
    assert.is_true(pool:wait(30))
    assert.are.equal(0, #pool.errors, pool.errors[1] and tostring(pool.errors[1].message))
    assert.are.equal(200000, #pool.results[1][1])
  end)
end)
