-- Lua code that runs inside the pool's own operations and uses the same
-- pool: __gc finalizers (a collection can start at any allocation), a
-- function's environment read while its arguments are encoded, and the
-- top-level code of a module that a decoded result names. Either the
-- nested operation works on a consistent pool, or it raises a clear error;
-- never a lost, doubled or mixed-up call.
local parallelize = require "parallelize"
local core = require "parallelize.core"
local support = require "spec.support"

local Parallelize, rep = parallelize.Parallelize, parallelize.rep

local UNDER_ASAN = (os.getenv("PZLUA") or ""):match("asan") ~= nil

-- The pool's own C functions: Lua that runs while one of them is on the
-- stack runs inside the pool.
local POOL_C = {
  [core.pool_drain] = "drain", [core.pool_wait] = "wait", [core.pool_stop] = "stop",
  [core.pool_call] = "call",
}

--- Which pool function the caller runs inside, or nil.
local function inside_pool()
  for level = 3, 60 do
    local info = debug.getinfo(level, "f")
    if not info then return nil end
    if POOL_C[info.func] then return POOL_C[info.func] end
  end
end

--- Checks that each call 1..n has exactly one result or error, and returns
-- id -> result. Plain checks: busted's asserts are slow over 200,000 calls.
local function each_once(p, n)
  local got = {}
  local results, ids, errors = p.results, p.ids, p.errors -- copies: read once
  for i, id in ipairs(ids) do
    if got[id] ~= nil then error("call " .. id .. " answered twice", 2) end
    got[id] = results[i]
  end
  for _, e in ipairs(errors) do
    if got[e.id] ~= nil then error("call " .. e.id .. " answered twice", 2) end
    got[e.id] = e
  end
  for id = 1, n do
    if got[id] == nil then error("call " .. id .. " lost", 2) end
  end
  return got
end

describe("Lua code that runs inside the pool", function()
  local saved_pause
  -- Frequent collections, from a heap without the garbage of the specs
  -- before: the cases below need finalizers to run inside the pool's
  -- functions, and a cycle over a big heap runs them seldom (in the whole
  -- suite, once, none ran there in 100,000 calls; with 200 MB of live
  -- tables, never).
  before_each(function()
    collectgarbage()
    saved_pause = collectgarbage("setpause", 20)
  end)
  after_each(function()
    collectgarbage("setpause", saved_pause)
    collectgarbage()
  end)

  it("can read p.pending and p.results from a finalizer while results drain", function()
    local p = Parallelize(rep(function(x) return "r" .. x end, 2))
    finally(function() if p then p:stop() end end)
    local inside, problems, runs, done = 0, {}, 0, false
    -- A few garbage proxies at any time: each finalizer makes one more,
    -- until done. (p.results is a copy, made at each read: read it now
    -- and then.)
    local function arm()
      local u = newproxy(true)
      getmetatable(u).__gc = function()
        -- Once done, nothing: p is gone, and an error raised in a
        -- finalizer can crash LuaJIT.
        if done then return end
        runs = runs + 1
        local ok, err = pcall(function()
          local pending, count = p.pending, runs % 1024 == 0 and #p.results or 0
          assert(pending >= 0 and count >= 0)
        end)
        if not ok then problems[#problems + 1] = err end
        -- Records being drained, by whichever pool function: p(x) drains
        -- them too once they pile up (every 1024th call of a compiled loop).
        if core.pool_draining(p) then inside = inside + 1 end
        if not p.stopped then arm() end
      end
    end
    for _ = 1, 4 do arm() end
    -- A cycle of the collector over what the specs before left (busted
    -- keeps their `finally` functions, and so their pools: 50 MB and more)
    -- can outlast a batch: before each, many proxies become garbage and
    -- the collector is stepped until the first of their finalizers ran;
    -- the rest run at the next allocations, the drains' among them.
    local function start_finalizing()
      for _ = 1, 2000 do arm() end
      local before = runs
      repeat collectgarbage("step") until runs > before
    end
    -- Batches until finalizers have run inside a drain, at least 100,000
    -- calls (10,000 under ASan).
    local n, batch = 0, UNDER_ASAN and 5000 or 25000
    repeat
      start_finalizing()
      for i = n + 1, n + batch do p(i) end
      n = n + batch
      assert.is_true(p:wait(120))
    until (inside > 0 and n >= 4 * batch / (UNDER_ASAN and 2 or 1)) or n >= 400000
    -- The thousands of chains armed would otherwise go on to the end of
    -- the spec file, each copying p.results now and then: half a minute.
    done = true
    collectgarbage("setpause", saved_pause)
    assert.are.same({}, problems)
    assert.is_true(inside > 0, "no finalizer ran while the pool drained")
    local got = each_once(p, n)
    local wrong = {}
    for id = 1, n do
      if got[id] ~= "r" .. id then wrong[#wrong + 1] = id .. "=" .. tostring(got[id]) end
    end
    assert.are.same({}, wrong)
    assert.are.equal(0, p.pending)
    -- Its 100,000 results would stay alive with busted's hold on this
    -- `finally`, and the frequent collections of the cases below would
    -- go over them (eight times the work: a quarter of a minute).
    p:stop()
    p = nil
  end)

  it("queues a call whole when p(...) runs while another p(...) encodes", function()
    local p = Parallelize(rep(function(a, b)
      if type(a) == "function" then return "function:" .. tostring(a()) end
      return tostring(a) .. ":" .. tostring(b)
    end, 2))
    finally(function() p:stop() end)
    local nested = {}
    -- Encoding f reads its global SETTING through f's environment, whose
    -- __index queues another call from inside p(...).
    local function f() return SETTING end -- luacheck: globals SETTING
    setfenv(f, setmetatable({}, { __index = function(_, k)
      assert(inside_pool() == "call")
      nested[#nested + 1] = p("nested", k)
      return 42
    end }))
    local outer = p(f)
    assert.are.equal(1, #nested)
    assert.is_true(p:wait(10))
    local got = each_once(p, 2)
    assert.are.equal("function:42", got[outer])
    assert.are.equal("nested:SETTING", got[nested[1]])
  end)

  it("queues every call whole when finalizers call p(...) during p(...)", function()
    local p = Parallelize(rep(function(tag, k, t)
      return tag .. ":" .. k .. ":" .. #t .. ":" .. t[#t] .. (t.fn and ":" .. t.fn() or "")
    end, 2))
    finally(function() p:stop() end)
    local expect, inside, done = {}, 0, false
    local function arm()
      local u = newproxy(true)
      getmetatable(u).__gc = function()
        if done then return end
        if inside_pool() == "call" then inside = inside + 1 end
        local k = #expect + 1
        local id = p("fin", k, { k, k + 1 })
        expect[id] = "fin:" .. k .. ":2:" .. (k + 1)
        arm()
      end
    end
    for _ = 1, 4 do arm() end
    -- Each call's function reads a global through an environment whose
    -- __index allocates: the encoder reads it inside p(...), so that
    -- collections, and the finalizers, run there whatever heap the specs
    -- before left. (With the loop's own allocations alone they ran there
    -- seldom after big specs: in none of 100,000 calls once.)
    local env = setmetatable({}, { __index = function(_, k)
      local junk = {}
      for j = 1, 64 do junk[j] = { j } end
      if k == "OFFSET" then return #junk - 64 end
      return _G[k]
    end })
    -- Batches until finalizers have run inside p(...), at least 10,000
    -- calls (2,000 under ASan).
    local i, batch = 0, UNDER_ASAN and 1000 or 5000
    repeat
      for _ = 1, batch do
        i = i + 1
        local t = {}
        for j = 1, 1 + i % 20 do t[j] = { j, "x" .. j } end
        t[#t + 1] = "end" .. i
        -- A function travels as bytecode: encoding it allocates, so that
        -- collections (and the finalizers) run inside p(...).
        local v = i
        t.fn = setfenv(function() return v + OFFSET end, env) -- luacheck: globals OFFSET
        local id = p("main", i, t)
        expect[id] = "main:" .. i .. ":" .. #t .. ":end" .. i .. ":" .. i
      end
    until (inside > 0 and i >= 2 * batch) or i >= 100000
    assert.is_true(p:wait(120))
    -- A finalizer can still queue a call after wait's last look (Lua
    -- allocates on wait's way out, and a collection may run): wait cannot
    -- answer for calls queued after it returned. None is queued once done
    -- is set, and a second wait sees the last of them finish.
    done = true
    assert.is_true(p:wait(120))
    collectgarbage("setpause", saved_pause)
    local got = each_once(p, #expect)
    local wrong = {}
    for id, want in pairs(expect) do
      if got[id] ~= want then wrong[#wrong + 1] = id .. ": " .. tostring(got[id]) .. " ~= " .. want end
    end
    assert.are.same({}, wrong)
    assert.is_true(inside > 0, "no finalizer ran inside p(...)")
  end)

  describe("a result that names a module", function()
    local dir, saved_path
    before_each(function()
      dir = support.tmpdir()
      saved_path = package.path
      package.path = dir .. "/?.lua;" .. package.path
    end)
    after_each(function()
      package.path = saved_path
      for name in pairs(package.loaded) do
        if name:match("^reentry_") then package.loaded[name] = nil end
      end
      _G.REENTRY = nil
      support.rmdir(dir)
    end)

    --- Writes module `name` whose top-level code, in the parent, runs
    -- `body` with the pool as `p` (it does nothing in the workers).
    local function module(name, body)
      support.write(dir .. "/" .. name .. ".lua", ([[
local M = { marker = {} }
local R = rawget(_G, "REENTRY")
if R then
  local p = R.pool
  %s
end
return M
]]):format(body))
    end

    it("lets its top-level code read p.results and queue a call", function()
      module("reentry_reader", [[
R.seen = #p.results
R.id = p("from the module")
R.where = R.inside()
]])
      local p = Parallelize(rep(function(x)
        if x == "marker" then return require("reentry_reader").marker end
        return x
      end, 2))
      finally(function() p:stop() end)
      _G.REENTRY = { pool = p, inside = inside_pool }
      for i = 1, 100 do p(i) end
      p("marker")
      for i = 102, 200 do p(i) end
      assert.is_true(p:wait(20))
      local R = _G.REENTRY
      assert.is_truthy(R.where == "drain" or R.where == "wait", R.where)
      assert.is_true(R.seen >= 0 and R.seen <= 200)
      assert.are.equal(201, R.id)
      local got = each_once(p, 201)
      assert.are.equal(require("reentry_reader").marker, got[101])
      assert.are.equal("from the module", got[201])
      for i = 1, 100 do assert.are.equal(i, got[i]) end
    end)

    it("makes p:wait() and p:stop() from its top-level code raise 'busy'", function()
      module("reentry_waiter", [[
R.wait_ok, R.wait_err = pcall(p.wait, p)
R.stop_ok, R.stop_err = pcall(p.stop, p)
R.exec_ok, R.exec_err = pcall(function() return p.executors end)
]])
      local p = Parallelize(rep(function(x)
        if x == 2 then return require("reentry_waiter").marker end
        return x
      end, 2))
      finally(function() p:stop() end)
      _G.REENTRY = { pool = p }
      for i = 1, 3 do p(i) end
      assert.is_true(p:wait(20))
      local R = _G.REENTRY
      assert.is_false(R.wait_ok)
      assert.matches("the pool is busy: p:wait%(%) called while the pool turns results into Lua values",
        R.wait_err)
      assert.is_false(R.stop_ok)
      assert.matches("the pool is busy: p:stop%(%) called while the pool turns results", R.stop_err)
      assert.is_false(R.exec_ok)
      assert.matches("the pool is busy: p.executors called", R.exec_err)
      each_once(p, 3)
      assert.is_false(p.stopped)
      assert.are.same({}, p:stop())
    end)
  end)

  it("lets p:stop() run while p(...) encodes, and that p(...) then raises 'stopped'", function()
    local p = Parallelize({ function(f) return f() end })
    local stopped
    finally(function() if not stopped then p:stop() end end)
    local id = p(function() return 1 end)
    local stop_ok, aborted
    local function f() return VALUE end -- luacheck: globals VALUE
    setfenv(f, setmetatable({}, { __index = function()
      stop_ok, aborted = pcall(p.stop, p, 10)
      return 7
    end }))
    local ok, err = pcall(p, f)
    stopped = stop_ok
    assert.is_true(stop_ok, aborted)
    assert.is_false(ok)
    assert.matches("the pool is stopped", err)
    assert.is_true(p.stopped)
    -- the call queued before is accounted for: run, or aborted by the stop
    local results, ids = p:take()
    if #ids == 1 then
      assert.are.same({ { id }, { 1 } }, { ids, results })
    else
      assert.are.equal(1, #aborted)
      assert.are.equal(id, aborted[1].id)
    end
  end)

  it("is not left busy by an encode that raised", function()
    local p = Parallelize({ function(t) return t[1] end })
    local ok, err = pcall(p, { coroutine.create(print) })
    assert.is_false(ok)
    assert.matches("cannot encode a thread", err)
    -- from the same place: the next call and stop work
    assert.are.equal(1, p({ 5 }))
    assert.is_true(p:wait(10))
    assert.are.same({ 5 }, p.results)
    assert.are.same({}, p:stop())
  end)

  -- Deeper in the C stack than the p(...) that raised: a comparator that
  -- table.sort calls, a coroutine.
  local function from_deeper(how, fn)
    if how == "table.sort" then
      local ok, err
      table.sort({ 2, 1 }, function(a, b)
        if ok == nil then ok, err = pcall(fn) end
        return a < b
      end)
      return ok, err
    end
    return coroutine.wrap(function() return pcall(fn) end)()
  end

  for _, how in ipairs({ "table.sort", "coroutine" }) do
    for _, what in ipairs({ "p(...)", "p:map" }) do
      it(("lets p:stop() run from a %s after %s raised in its encode"):format(how, what), function()
        local p = Parallelize(function(t) return t[1] end, { workers = 1 })
        local stopped
        finally(function() if not stopped then p:stop() end end)
        local ok, err
        if what == "p(...)" then
          ok, err = pcall(p, { coroutine.create(print) })
        else
          ok, err = pcall(p.map, p, { { 1 }, { coroutine.create(print) } })
        end
        assert.is_false(ok)
        assert.matches("cannot encode a thread", err)
        local stop_ok, aborted = from_deeper(how, function() return p:stop(10) end)
        assert.is_true(stop_ok, aborted)
        stopped = true
        assert.is_table(aborted)
        assert.is_true(p.stopped)
      end)
    end
  end
end)
