-- p(x) from compiled code: while the JIT runs, the pool's __call hands one
-- number, or one string shorter than the arena's threshold, to a C function
-- through the FFI (src/lsubmit.c, lua/parallelize/pool.lua), and everything
-- else, or whatever that function declines, to core.pool_call. Either way
-- a call must be queued the same, get the same id and raise the same.
local parallelize = require "parallelize"
local core = require "parallelize.core"

local Parallelize, rep = parallelize.Parallelize, parallelize.rep

--- id -> first result, from the pool's store.
local function results_by_id(p)
  local by_id = {}
  local results, ids = p.results, p.ids
  for i = 1, #ids do by_id[ids[i]] = results[i] end
  return by_id
end

--- Whether two results are the same value (NaN is NaN; 0 and -0 differ).
local function same(a, b)
  if a ~= a then return b ~= b end
  if a == 0 and b == 0 then return 1 / a == 1 / b end
  return a == b
end

local function identity(x) return x end

describe("p(x) from compiled code", function()
  it("queues numbers and short strings as core.pool_call does", function()
    local p = Parallelize(rep(identity, 2))
    finally(function() p:stop() end)
    local values = { 0, -0.0, 1, -1, 1.5, 2 ^ 31, -2 ^ 53, 2 ^ 63, 1e308, 5e-324, math.huge, -math.huge,
      0 / 0, "", "a", "with\0zero", ("é"):rep(300), ("x"):rep(65535) }
    local fast_before = core.pool_fast_calls(p)
    local fast_ids, c_ids = {}, {}
    for round = 1, 300 do -- 300 rounds: the loop is compiled, and passes a look at the JIT
      for k = 1, #values do
        local id = p(values[k])
        if round == 1 then fast_ids[k] = id end
      end
    end
    for k = 1, #values do c_ids[k] = core.pool_call(p, values[k]) end
    assert.is_true(p:wait(60))
    assert.are.equal(300 * #values + #values, #p.ids)
    assert.are.equal(0, #p.errors)
    -- at least every call of the loop but the looks at the JIT went the fast way
    assert.is_true(core.pool_fast_calls(p) - fast_before >= 300 * #values)
    local by_id = results_by_id(p)
    for k = 1, #values do
      assert.is_true(same(values[k], by_id[fast_ids[k]]), "value " .. k)
      assert.is_true(same(by_id[c_ids[k]], by_id[fast_ids[k]]), "value " .. k .. " through core.pool_call")
    end
  end)

  it("numbers the calls in order with the C function's own", function()
    local p = Parallelize(rep(function(...) return select("#", ...) end, 1))
    finally(function() p:stop() end)
    local ids = { p(1), p({ 1 }), p("s"), p(1, 2), p(), p(nil), p(true), p(2.5) }
    assert.are.same({ 1, 2, 3, 4, 5, 6, 7, 8 }, ids)
    assert.is_true(p:wait(30))
    local by_id = results_by_id(p)
    assert.are.same({ 1, 1, 1, 2, 0, 1, 1, 1 }, { by_id[1], by_id[2], by_id[3], by_id[4], by_id[5], by_id[6],
      by_id[7], by_id[8] })
  end)

  it("raises as the C function does on a stopped pool and above max_message", function()
    local p = Parallelize(rep(identity, 1), { max_message = 1024 })
    local err
    for _ = 1, 50 do
      err = select(2, pcall(p, ("x"):rep(2000)))
      assert.matches("cannot queue the call: its arguments are 200%d bytes encoded, above max_message %(1024%)", err)
    end
    assert.are.equal(1, p(7))
    assert.is_true(p:wait(30))
    assert.are.same({ 7 }, p.results)
    p:stop()
    for _ = 1, 50 do
      assert.has_error(function() p(1) end, "the pool is stopped")
      assert.has_error(function() p("s") end, "the pool is stopped")
    end
  end)

  it("sends a string of the arena's size to the arena, and waits for room under max_pending", function()
    local p = Parallelize(rep(function(x)
      if type(x) == "number" then os.execute("sleep 0.01") end
      return x
    end, 2), { max_pending = 3 })
    finally(function() p:stop() end)
    local big = ("b"):rep(65536)
    local id_big = p(big)
    local most = 0
    for i = 1, 40 do
      p(i)
      local s = p:stats()
      if s.pending > most then most = s.pending end
    end
    assert.is_true(p:wait(60))
    local by_id = results_by_id(p)
    assert.are.equal(big, by_id[id_big])
    for i = 1, 40 do assert.are.equal(i, by_id[id_big + i]) end
    assert.is_true(most <= 3, "at most 3 calls waited for a worker, saw " .. most)
  end)

  it("queues a stream's numbers and short strings the same way, from an array and an iterator", function()
    local p = Parallelize(rep(identity, 2))
    finally(function() p:stop() end)
    local big = ("b"):rep(65536) -- the arena's: core.pool_submit's way
    local values = { 0, -0.0, 1, -1, 1.5, 2 ^ 53, 2 ^ 63, math.huge, 0 / 0, "", "a", "with\0zero",
      ("x"):rep(65535), big, { 1, 2 }, true, false }
    local list = {}
    for round = 1, 200 do
      for k = 1, #values do list[(round - 1) * #values + k] = values[k] end
    end
    for _, from_fn in ipairs({ false, true }) do
      local src = list
      if from_fn then
        local i = 0
        src = function()
          i = i + 1
          return list[i]
        end
      end
      local fast_before = core.pool_fast_calls(p)
      local seen = 0
      for i, ok, v in p:stream(src) do
        assert.is_true(ok)
        local want = list[i]
        if type(want) == "table" then
          assert.are.same(want, v)
        else
          assert.is_true(same(want, v), "input " .. i)
        end
        seen = seen + 1
      end
      assert.are.equal(#list, seen)
      -- from an iterator, the numbers and strings below the arena's size
      -- went the fast way, but for the looks at the JIT; from an array,
      -- those of each refill before its first other input (the rest go
      -- to pool_submit_each together)
      local fast = core.pool_fast_calls(p) - fast_before
      assert.is_true(fast >= (from_fn and 200 * 13 - 10 or 1), "fast calls: " .. fast)
    end
    -- an array of numbers goes all the fast way
    local numbers = {}
    for i = 1, 5000 do numbers[i] = i end
    local fast_before = core.pool_fast_calls(p)
    local sum = 0
    for _, ok, v in p:stream(numbers) do
      assert.is_true(ok)
      sum = sum + v
    end
    assert.are.equal(5000 * 5001 / 2, sum)
    assert.is_true(core.pool_fast_calls(p) - fast_before >= 5000)
    assert.are.same({}, p.results) -- a stream's results are its own
  end)

  it("refuses a userdata that is not a pool", function()
    local p = Parallelize(rep(identity, 1))
    finally(function() p:stop() end)
    local call = debug.getmetatable(p).__call
    for _ = 1, 50 do
      local ok, err = pcall(call, newproxy(true), 1)
      assert.is_false(ok)
      assert.matches("parallelize.pool expected", err)
    end
  end)

  it("leaves the calls to the C function while a debug hook is set, so that the hook runs", function()
    local p = Parallelize(rep(identity, 1))
    finally(function() p:stop() end)
    local through_c = 0
    local fast_before = core.pool_fast_calls(p)
    for i = 1, 2000 do p(i) end
    local fast_after_loop = core.pool_fast_calls(p)
    assert.is_true(fast_after_loop - fast_before >= 2000)
    local pool_call, getinfo = core.pool_call, debug.getinfo
    debug.sethook(function()
      if getinfo(2, "f").func == pool_call then through_c = through_c + 1 end
    end, "c")
    local ok, err = pcall(function()
      for i = 2001, 4000 do p(i) end
    end)
    debug.sethook()
    assert(ok, err)
    -- each declined: counted as asked, queued by core.pool_call, whose call the hook saw
    assert.are.equal(fast_after_loop + 2000, core.pool_fast_calls(p))
    assert.are.equal(2000, through_c)
    assert.is_true(p:wait(30))
    local by_id = results_by_id(p)
    for i = 1, 4000 do assert.are.equal(i, by_id[i]) end
  end)

  it("goes back to the C function for good once it sees the JIT off", function()
    local first = Parallelize(rep(identity, 1))
    local mt = debug.getmetatable(first)
    first:stop() -- left to the collector, its worker outlived the spec (and failed a later spec's check)
    local saved = mt.__call
    assert.are_not.equal(core.pool_call, saved)
    local p = Parallelize(rep(identity, 1))
    finally(function()
      jit.on()
      mt.__call = saved
      p:stop()
    end)
    jit.off()
    for i = 1, 3000 do p(i) end
    assert.are.equal(core.pool_call, mt.__call)
    local fast = core.pool_fast_calls(p)
    for i = 3001, 4000 do p(i) end
    assert.are.equal(fast, core.pool_fast_calls(p))
    jit.on()
    assert.is_true(p:wait(30))
    local by_id = results_by_id(p)
    for i = 1, 4000 do assert.are.equal(i, by_id[i]) end
  end)
end)
