-- The results API: cpu_count, one executor with `workers`, map (one-shot
-- and on a pool), result(id), stream, take, keep_results, max_pending, and
-- what results and errors carry.
local parallelize = require "parallelize"
local core = require "parallelize.core"
local support = require "spec.support"

local Parallelize, null = parallelize.Parallelize, parallelize.null

describe("cpu_count", function()
  it("is the number of CPUs this process may run on", function()
    local out = support.run("nproc")
    assert.are.equal(tonumber(out:match("%d+")), parallelize.cpu_count())
    out = support.run("taskset -c 0 " .. support.quote(support.pzlua())
      .. " -e 'print(require(\"parallelize\").cpu_count())'")
    assert.are.equal("1", out:match("%d+"))
  end)
end)

describe("one executor", function()
  it("gets cpu_count() workers, or options.workers", function()
    local p = Parallelize(function() return parallelize.getpid() end)
    finally(function() p:stop() end)
    assert.are.equal(parallelize.cpu_count(), p.size)
    local q = Parallelize(function() end, { workers = 3 })
    assert.are.equal(3, q.size)
    assert.are.equal(3, #q.executors)
    q:stop()
    local r = Parallelize(parallelize.Deferred(function() return print end), { workers = 2 })
    assert.are.equal(2, #r.executors)
    r:stop()
  end)

  it("refuses workers with an array", function()
    assert.has_error(function() Parallelize({ print }, { workers = 2 }) end,
      "Parallelize: option workers is for a single executor; an array has one worker per element")
  end)
end)

describe("map", function()
  it("returns the first results in input order, null for nil", function()
    local list = {}
    for i = 1, 300 do list[i] = i end
    local out = parallelize.map(function(x)
      require("parallelize").sleep((x * 7919 % 13) / 10000)
      if x % 50 == 0 then return nil end
      return x * 2, "ignored"
    end, list, { workers = 4 })
    assert.are.equal(300, #out)
    for i = 1, 300 do
      if i % 50 == 0 then assert.are.equal(null, out[i]) else assert.are.equal(i * 2, out[i]) end
    end
    assert.are.same({}, support.children())
  end)

  it("raises on the first error with the item's index, the message and the traceback", function()
    local ok, err = pcall(parallelize.map, function(x)
      if x == "bad" then error("cannot parse " .. x) end
      return x
    end, { "a", "b", "bad", "c" }, { workers = 2 })
    assert.is_false(ok)
    assert.matches("^map: item 3 failed: .*cannot parse bad\nstack traceback:", err)
    assert.are.same({}, support.children())
  end)

  it("names the item that cannot travel, in chunks or not", function()
    for _, opts in ipairs({ { workers = 2 }, { workers = 2, timeout = 30 } }) do
      local p = Parallelize(function(x) return x end, opts)
      local list = {}
      for i = 1, 100 do list[i] = i end
      list[40] = io.stdout
      local ok, err = pcall(p.map, p, list)
      assert.is_false(ok)
      assert.are.equal("map: item 40 cannot be sent: cannot encode a userdata at args[1]", err)
      -- What was queued before it runs, its results in the store, each
      -- once: all of items 1-39 unchunked, some of them in chunks.
      assert.is_true(p:wait(10))
      local seen = {}
      -- (a chunk's answer is there whole: a table of its items' results)
      local count = 0
      for _, r in ipairs(p:take()) do
        for _, v in ipairs(type(r) == "table" and r or { r }) do
          assert.is_true(v >= 1 and v < 40 and not seen[v])
          seen[v], count = true, count + 1
        end
      end
      if opts.timeout then assert.are.equal(39, count) end
      p:stop()
    end
  end)

  it("works on a pool that stays up, many times", function()
    local p = Parallelize(function(x) return x + 1 end, { workers = 2 })
    finally(function() p:stop() end)
    for round = 1, 20 do
      local list = {}
      for i = 1, 100 + round do list[i] = i * round end
      local out = p:map(list)
      assert.are.equal(#list, #out)
      for i = 1, #list do assert.are.equal(i * round + 1, out[i]) end
    end
    assert.are.same({}, p.results) -- a map's results are its own
    assert.are.same({}, p:map({}))
  end)

  it("keeps the pool's other calls apart", function()
    local p = Parallelize(function(x) return x end, { workers = 2 })
    finally(function() p:stop() end)
    local before = p("before")
    local out = p:map({ 1, 2, 3 })
    local after = p("after")
    assert.is_true(p:wait(10))
    assert.are.same({ 1, 2, 3 }, out)
    local results, ids = p.results, p.ids
    local byid = {}
    for i, id in ipairs(ids) do byid[id] = results[i] end
    assert.are.same({ [before] = "before", [after] = "after" }, byid)
  end)
end)

describe("result", function()
  it("gives every value a call returned, nils included, or its error", function()
    local p = Parallelize(function(kind)
      if kind == "two" then return nil, "not found" end
      if kind == "none" then return end
      if kind == "nil" then return nil end
      if kind == "null" then return require("parallelize").null end
      if kind == "table" then error({ code = 42 }) end
      return kind, 1, nil, 3
    end, { workers = 2 })
    finally(function() p:stop() end)
    local ids = {}
    for _, kind in ipairs({ "two", "none", "nil", "null", "table", "many" }) do ids[kind] = p(kind) end
    assert.are.same({ n = 3, true, nil, "not found" }, { n = select("#", p:result(ids.two)), p:result(ids.two) })
    assert.are.equal(1, select("#", p:result(ids.none)))
    assert.are.equal(2, select("#", p:result(ids["nil"])))
    assert.is_nil(select(2, p:result(ids["nil"])))
    assert.are.equal(null, select(2, p:result(ids.null)))
    local ok, err = p:result(ids.table)
    assert.is_false(ok)
    assert.are.same({ code = 42 }, err.value)
    assert.are.equal("string", type(err.message))
    assert.are.equal(err.message, tostring(err))
    assert.are.equal(ids.table, err.id)
    assert.are.same({ n = 1, "table" }, err.args)
    assert.are.equal(5, select("#", p:result(ids.many)))
    assert.are.equal(3, select(5, p:result(ids.many)))
    -- p.results keeps the first value, null for nil
    local results, pids = p.results, p.ids
    local first = {}
    for i, id in ipairs(pids) do first[id] = results[i] end
    assert.are.equal(null, first[ids.two])
    assert.are.equal(null, first[ids.none])
    assert.are.equal(null, first[ids.null])
    assert.are.equal("many", first[ids.many])
  end)

  it("waits for the call, and gives up after timeout", function()
    local p = Parallelize(function(s) require("parallelize").sleep(s) return s end, { workers = 1 })
    finally(function() p:stop(0) end)
    local slow = p(0.5)
    local t0 = core.now()
    assert.are.same({ nil, "timeout" }, { p:result(slow, 0.1) })
    assert.is_true(core.now() - t0 < 0.4)
    assert.are.same({ true, 0.5 }, { p:result(slow) })
  end)

  it("refuses ids that no call has, and a call with a dot", function()
    local p = Parallelize(function(x) return x end, { workers = 1 })
    finally(function() p:stop() end)
    p(1)
    assert.has_error(function() p:result(2) end, "result: no call has id 2 (ids go from 1 to 1)")
    assert.has_error(function() p:result(1.5) end, "result: no call has id 1.5 (ids go from 1 to 1)")
    assert.has_error(function() p.result(1) end, "use p:result(), not p.result()")
  end)

  it("says that a call a stream or a map handed out is no longer the pool's", function()
    local p = Parallelize(function(x) return x end, { workers = 1 })
    finally(function() p:stop() end)
    for _ in p:stream({ 1, 2 }) do end
    p:map({ 3 })
    local last = p(4)
    assert.are.same({ true, 4 }, { p:result(last) })
    for id = 1, last - 1 do
      assert.has_error(function() p:result(id) end, "result: call " .. id .. " was handed out already "
        .. "(by p:take(), or by the map or stream it belonged to)")
    end
  end)

  it("takes a result out of the pool when keep_results is false", function()
    local p = Parallelize(function(x) return x * 3 end, { workers = 2, keep_results = false })
    finally(function() p:stop() end)
    local id = p(5)
    assert.are.same({ true, 15 }, { p:result(id) })
    assert.has_error(function() p:result(id) end,
      "result: call 1 was handed out already (by an earlier p:result(), p:take(), or by the map or stream "
        .. "it belonged to)")
    assert.has_error(function() return p.results end,
      "p.results is not kept (keep_results = false): take results with p:take(), p:result(id), p:map() or p:stream()")
    assert.has_error(function() return p.errors end)
    assert.has_error(function() return p.ids end)
  end)

  for _, keep in ipairs({ true, false }) do
    it("gives after stop what the store holds, and says why it has no other (keep_results "
      .. tostring(keep) .. ")", function()
      local p = Parallelize(function(x)
        if x == 2 then error("two") end
        if x == 3 then require("parallelize").sleep(30) end
        return x * 3
      end, { workers = 1, keep_results = keep })
      p(1)
      p(2)
      p(3)
      p(4) -- behind the long one: aborted
      assert.is_true(p:wait(0) == false)
      for _ = 1, 2000 do -- (20 s at most)
        if p:stats().done + p:stats().failed >= 2 then break end
        p:wait(0.01)
      end
      local aborted = p:stop(0)
      assert.are.equal(2, #aborted)
      assert.are.same({ true, 3 }, { p:result(1) })
      local ok, e = p:result(2)
      assert.is_false(ok)
      assert.matches("two$", e.message)
      assert.has_error(function() p:result(4) end,
        "result: the pool is stopped, and call 4 has no outcome in its store (aborted, handed out, a map's or "
          .. "a stream's, or no call)")
      if not keep then
        assert.has_error(function() p:result(1) end) -- handed over already
      end
    end)
  end
end)

describe("the pool's lists", function()
  it("are copies: sorting or clearing one never touches the pool", function()
    local p = Parallelize(function(x) return 100 - x end, { workers = 2 })
    finally(function() p:stop() end)
    for i = 1, 50 do p(i) end
    assert.is_true(p:wait(10))
    local results = p.results
    table.sort(results)
    for k in pairs(p.ids) do results[k] = nil end
    local again, ids = p.results, p.ids
    assert.are.equal(50, #again)
    for i, id in ipairs(ids) do assert.are.equal(100 - id, again[i]) end
  end)

  it("are taken whole by p:take(), ids paired with results", function()
    local p = Parallelize(function(x) if x == 7 then error("seven") end return -x end, { workers = 2 })
    finally(function() p:stop() end)
    for i = 1, 10 do p(i) end
    assert.is_true(p:wait(10))
    local results, ids, errors = p:take()
    assert.are.equal(9, #results)
    for i, id in ipairs(ids) do assert.are.equal(-id, results[i]) end
    assert.are.equal(1, #errors)
    assert.are.equal(7, errors[1].id)
    assert.are.same({}, p.results)
    assert.are.same({}, p.errors)
    p(11)
    assert.is_true(p:wait(10))
    assert.are.same({ -11 }, p.results)
    assert.are.same({ 11 }, p.ids)
  end)

  it("take() works without keep_results, sorted by id", function()
    local p = Parallelize(function(x) return x end, { workers = 2, keep_results = false })
    finally(function() p:stop() end)
    for i = 1, 20 do p(i) end
    assert.is_true(p:wait(10))
    local results, ids = p:take()
    for i = 1, 20 do
      assert.are.equal(i, ids[i])
      assert.are.equal(i, results[i])
    end
    assert.are.same({}, (p:take()))
  end)

  --- Runs body() with a finalizer that runs fin() at every collection
  -- (it arms a new one each time) and a collector tuned to collect often;
  -- then disarms it, lets what is left of it run, and restores the
  -- collector. Errors of fin that reach a collection outside body are
  -- dropped.
  local function with_finalizer_storm(fin, body)
    local armed = true
    local function arm()
      local u = newproxy(true)
      getmetatable(u).__gc = function()
        if armed then arm() end
        fin()
      end
    end
    arm()
    local pause, stepmul = collectgarbage("setpause", 100), collectgarbage("setstepmul", 400)
    local ok, err = pcall(body)
    armed = false
    pcall(collectgarbage)
    pcall(collectgarbage)
    collectgarbage("setpause", pause)
    collectgarbage("setstepmul", stepmul)
    if not ok then error(err, 0) end
  end

  --- Runs the rest of the case interpreted, and stops p at its end. A
  -- finalizer's error must not come out of compiled code: LuaJIT before
  -- its fix of January 2023 (LuaJIT pull request 946; Debian 12's is
  -- older) runs the collection step of a trace's exit outside any
  -- protected call, and a finalizer's error raised there crashes the
  -- process (in this busted process: once in about ten suites, a general
  -- protection fault in err_unwind).
  local function interpreted_till_the_end(p)
    jit.flush()
    jit.off()
    finally(function()
      jit.on()
      p:stop()
    end)
  end

  --- Queues p(1) .. p(n), making garbage as it goes so that collections
  -- run; with `protected`, through pcall (a finalizer's error may surface
  -- at any allocation), noting in `args` (made beforehand with room for n,
  -- so that nothing allocates outside pcall) the argument of each call
  -- made: a p(i) that raised made none (the drain it runs once records
  -- pile up makes the first allocation of p(i), before the call is
  -- queued), and the ids of the calls after it are no longer their i.
  local function loop_with_garbage(p, n, args)
    local junk = {}
    local function litter(i) junk[i % 1024] = { i } end -- made once: nothing allocates outside pcall
    for i = 1, n do
      if args then
        local ok, id = pcall(p, i)
        if ok then args[id] = i end
      else
        p(i)
      end
      if i % 64 == 0 then
        if args then pcall(litter, i) else litter(i) end
      end
    end
    return #junk
  end

  -- A finalizer's p:take() runs wherever a collection step does: inside a
  -- drain (which p(x) runs too, once results pile up), where it takes
  -- nothing, or inside another p:take(). It must take each result once,
  -- none may be lost, and it must not raise (an error in a finalizer is
  -- passed on to whatever allocated).
  for _, keep in ipairs({ true, false }) do
    for _, kind in ipairs({ "numbers", "strings" }) do
      it("give each result once to a finalizer's p:take() and the script's (" .. kind
        .. (keep and "" or ", keep_results = false") .. ")", function()
        local executor = kind == "numbers" and function(x) return x end or function(x) return "s" .. x end
        local p = Parallelize(executor, { workers = 2, keep_results = keep })
        finally(function() p:stop() end)
        local got, dup = {}, 0
        local function note(results, ids)
          for k = 1, #ids do
            if got[ids[k]] ~= nil then dup = dup + 1 end
            got[ids[k]] = results[k]
          end
        end
        local n = 300000
        with_finalizer_storm(function() note(p:take()) end, function()
          loop_with_garbage(p, n)
          assert.is_true(p:wait(60))
        end)
        note(p:take())
        local wrong = 0
        for id = 1, n do
          if got[id] ~= executor(id) then wrong = wrong + 1 end
        end
        assert.are.same({ dup = 0, wrong = 0 }, { dup = dup, wrong = wrong })
      end)
    end
  end

  it("make a call whose drain a finalizer's error broke an error only, and stay usable", function()
    local p = Parallelize(function(x) return x, x end, { workers = 2 }) -- two values: an extras entry
    local n, raised, done = 100000, 0, false
    local args = require("table.new")(n, 0) -- args[id]: the argument of call id
    interpreted_till_the_end(p)
    with_finalizer_storm(function()
      raised = raised + 1
      error("boom from a finalizer")
    end, function()
      loop_with_garbage(p, n, args)
      for _ = 1, 50 do
        local ok, finished = pcall(p.wait, p, 60)
        if ok and finished then done = true break end
      end
    end)
    assert.is_true(done, "p:wait() kept raising")
    assert.is_true(raised > 0)
    local results, ids, errors = p:take()
    local seen, both, made = {}, 0, 0
    for k = 1, #ids do
      assert.are.equal(args[ids[k]], results[k])
      seen[ids[k]] = true
    end
    for _, e in ipairs(errors) do
      if seen[e.id] then both = both + 1 end
      seen[e.id] = true
      assert.matches("boom from a finalizer", e.message)
    end
    local missing = 0
    for id = 1, n do
      if args[id] ~= nil then
        made = made + 1
        if not seen[id] then missing = missing + 1 end
      end
    end
    -- every call made is in the lists once, and there are no others
    assert.are.same({ both = 0, missing = 0, calls = made }, { both = both, missing = missing,
      calls = (core.pool_counts(p)) })
  end)

  it("make no call for a p(x) that a finalizer's error at its drain's start broke", function()
    local p = Parallelize(function(x) return x, x end, { workers = 2 })
    interpreted_till_the_end(p)
    local n = 20000 -- their records hold far more than the 64 KiB that count as piling up
    for i = 1, n do p(i) end -- the 1024th sees the JIT off: the C function is p(x) from then on
    assert.is_truthy(support.eventually(function() return core.pool_stats(p).done == n end, 60))
    -- Many finalizers that raise, pending at once: once one has run, every
    -- collection step runs the next, at whatever allocates, and the first
    -- allocation of the p(x) below is its drain's first push.
    local stepmul = collectgarbage("setstepmul", 1)
    collectgarbage() -- what else waits for its finalizer runs now, then is freed
    collectgarbage()
    collectgarbage("stop")
    for _ = 1, 1000 do getmetatable(newproxy(true)).__gc = function() error("boom from a finalizer") end end
    collectgarbage("restart")
    while pcall(collectgarbage, "step", 0) do end
    local ok, id = pcall(p, n + 1)
    local calls = core.pool_counts(p)
    collectgarbage("setstepmul", stepmul)
    for _ = 1, 2000 do if pcall(collectgarbage) then break end end
    assert.are.same({ false, n }, { ok, calls }) -- raised: nothing queued
    assert.matches("boom from a finalizer", id)
    assert.are.equal(n + 1, p(n + 2)) -- the next call takes the id
    assert.is_true(p:wait(60))
    local results, ids = p:take()
    assert.are.same({ n + 1, n + 1, n + 2 }, { #ids, ids[n + 1], results[n + 1] })
  end)

  it("take the results in as a loop of p(x) goes, once they pile up", function()
    local p = Parallelize(function(x) return 2 * x end, { workers = 2 })
    finally(function() p:stop() end)
    local n = 20000 -- their records hold far more than the 64 KiB that count as piling up
    for i = 1, n do p(i) end
    -- every result in, nothing drained since: core.pool_stats does not drain
    assert.is_truthy(support.eventually(function() return core.pool_stats(p).done == n end, 60))
    -- a compiled loop of p(x) hands every 1024th call to the C function, which drains
    for i = n + 1, n + 2048 do p(i) end
    local _, finished = core.pool_counts(p)
    assert.is_true(finished >= n, "drained " .. finished)
    assert.is_true(p:wait(60))
    local results, ids = p.results, p.ids
    assert.are.equal(n + 2048, #results)
    for k, id in ipairs(ids) do assert.are.equal(2 * id, results[k]) end
  end)
end)

describe("stream", function()
  for _, ordered in ipairs({ false, true }) do
    it(("hands out what finished while its source returns parallelize.later (ordered = %s)")
      :format(tostring(ordered)), function()
      local p = Parallelize(function(x) return x * 10 end, { workers = 2 })
      finally(function() p:stop() end)
      -- Input k + 1 is ready only once the result of input k is out: a
      -- stream that waited in its source for the next input, or queued
      -- `later` as one, would never finish (bounded by `asked`).
      local handed, next_input, asked = 0, 1, 0
      local function src()
        asked = asked + 1
        assert(asked < 100000, "the source was asked too often: the stream did not hand out meanwhile")
        if next_input > 5 then return nil end
        if next_input > handed + 1 then return parallelize.later end
        next_input = next_input + 1
        return next_input - 1
      end
      local got = {}
      for i, ok, v in p:stream(src, { ordered = ordered }) do
        assert.is_true(ok)
        got[#got + 1] = { i, v }
        handed = handed + 1
      end
      assert.are.same({ { 1, 10 }, { 2, 20 }, { 3, 30 }, { 4, 40 }, { 5, 50 } }, got)
      assert.are.equal("parallelize.later", tostring(parallelize.later))
      assert.has_error(function() parallelize.later.x = 1 end, "parallelize.later is a constant")
    end)
  end

  it("yields i, ok, values for each input of an array, each once", function()
    local p = Parallelize(function(x)
      require("parallelize").sleep((x * 31 % 7) / 2000)
      if x % 10 == 0 then error("ten " .. x) end
      return x * x, x
    end, { workers = 3 })
    finally(function() p:stop() end)
    local list = {}
    for i = 1, 200 do list[i] = i end
    local seen = {}
    for i, ok, a, b in p:stream(list) do
      assert.is_nil(seen[i])
      seen[i] = true
      if i % 10 == 0 then
        assert.is_false(ok)
        assert.matches("ten " .. i, a.message)
      else
        assert.is_true(ok)
        assert.are.equal(i * i, a)
        assert.are.equal(i, b)
      end
    end
    for i = 1, 200 do assert.is_true(seen[i]) end
    assert.are.same({}, p.results) -- never accumulate in the pool
    assert.are.same({}, p.errors)
  end)

  it("yields in input order with ordered = true", function()
    local p = Parallelize(function(x)
      require("parallelize").sleep((x * 7 % 5) / 1000)
      return x
    end, { workers = 4 })
    finally(function() p:stop() end)
    local list = {}
    for i = 1, 100 do list[i] = i end
    local want = 1
    for i, ok, v in p:stream(list, { ordered = true, max_pending = 5 }) do
      assert.are.equal(want, i)
      assert.is_true(ok)
      assert.are.equal(i, v)
      want = want + 1
    end
    assert.are.equal(101, want)
  end)

  for _, ordered in ipairs({ false, true }) do
    it(("hands out one value, several, nil and errors alike, the window refilled many times over "
      .. "(ordered = %s)"):format(tostring(ordered)), function()
      -- 400 inputs through a window of 3: an ordered stream's slots for
      -- what it holds back (4 * 3 of them) are reused some 33 times.
      local p = Parallelize(function(x)
        require("parallelize").sleep((x * 13 % 5) / 4000)
        if x % 7 == 0 then error("seven " .. x, 0) end
        if x % 5 == 0 then return nil, x end
        if x % 3 == 0 then return x, x + 1, x + 2 end
        if x % 11 == 0 then return nil end
        return x
      end, { workers = 3 })
      finally(function() p:stop() end)
      local list = {}
      for i = 1, 400 do list[i] = i end
      local seen, last = {}, 0
      for i, ok, a, b, c in p:stream(list, { ordered = ordered, max_pending = 3 }) do
        assert.is_nil(seen[i], "input " .. i .. " handed out twice")
        seen[i] = true
        if ordered then
          assert.are.equal(last + 1, i)
          last = i
        end
        if i % 7 == 0 then
          assert.is_false(ok)
          assert.are.equal("seven " .. i, a.message)
        elseif i % 5 == 0 then
          assert.is_true(ok)
          assert.is_nil(a)
          assert.are.equal(i, b)
        elseif i % 3 == 0 then
          assert.is_true(ok)
          assert.are.same({ i, i + 1, i + 2 }, { a, b, c })
        elseif i % 11 == 0 then
          assert.is_true(ok)
          assert.is_nil(a)
        else
          assert.is_true(ok)
          assert.are.equal(i, a)
          assert.is_nil(b)
        end
      end
      for i = 1, 400 do assert.is_true(seen[i], "input " .. i .. " never handed out") end
    end)

    it(("gives each input its own result while the loop queues calls of its own (ordered = %s)")
      :format(tostring(ordered)), function()
      -- The loop's p(...) calls take ids between the stream's: its inputs
      -- become many runs of ids, not one.
      local p = Parallelize(function(x)
        require("parallelize").sleep((x * 17 % 3) / 4000)
        return x * 10
      end, { workers = 2 })
      finally(function() p:stop() end)
      local list = {}
      for i = 1, 300 do list[i] = i end
      local own, n, last = {}, 0, 0
      for i, ok, v in p:stream(list, { ordered = ordered, max_pending = 4 }) do
        assert.is_true(ok)
        assert.are.equal(i * 10, v)
        if ordered then
          assert.are.equal(last + 1, i)
          last = i
        end
        n = n + 1
        if i % 2 == 0 then own[p(-i)] = -i end
      end
      assert.are.equal(300, n)
      assert.is_true(p:wait(10))
      local results, ids = p:take()
      local got = 0
      for k, id in ipairs(ids) do
        assert.are.equal(own[id] * 10, results[k], "call " .. id .. " is the loop's own")
        got = got + 1
      end
      assert.are.equal(150, got)
    end)
  end

  it("pulls an iterator lazily, keeping at most max_pending waiting", function()
    local dir = support.tmpdir()
    local lines = {}
    for i = 1, 500 do lines[i] = "line " .. i end
    support.write(dir .. "/in.txt", table.concat(lines, "\n") .. "\n")
    local p = Parallelize(function(s) return #s end, { workers = 2 })
    finally(function() -- (busted keeps one finally a test: the last)
      p:stop()
      support.rmdir(dir)
    end)
    local most, count = 0, 0
    for i, ok, n in p:stream(io.lines(dir .. "/in.txt"), { max_pending = 8 }) do
      local _, _, pending = core.pool_counts(p)
      if pending > most then most = pending end
      assert.is_true(ok)
      assert.are.equal(#lines[i], n)
      count = count + 1
    end
    assert.are.equal(500, count)
    assert.is_true(most <= 8, "pending reached " .. most)
  end)

  for _, ordered in ipairs({ false, true }) do
    local name = ("reads src no further ahead of a slow loop than four times max_pending (ordered = %s)")
      :format(tostring(ordered))
    it(name, function()
      local p = Parallelize(function(x) return x end, { workers = 2 })
      finally(function() p:stop() end)
      local read, most = 0, 0
      local function src()
        if read == 300 then return nil end
        read = read + 1
        return read
      end
      local count = 0
      for i, ok, v in p:stream(src, { max_pending = 10, ordered = ordered }) do
        assert.is_true(ok)
        assert.are.equal(i, v)
        count = count + 1
        -- the workers are far faster than this loop: all the calls the
        -- stream may have out finish while it sleeps
        if count <= 50 then core.sleep(0.01) end
        if read - count > most then most = read - count end
      end
      assert.are.equal(300, count)
      assert.is_true(most <= 40, "src was read " .. most .. " inputs ahead of the loop")
      assert.is_true(most >= 10, "src was read only " .. most .. " ahead: the window did not fill")
    end)
  end

  for _, ordered in ipairs({ false, true }) do
    it(("keeps big string results it holds to about max_pending_bytes (ordered = %s)"):format(tostring(ordered)),
      function()
        -- 1 MiB results, max_pending_bytes 8 MiB: once the stream has seen
        -- 16 of them, it keeps about 8 calls out (at least 2 per worker),
        -- where its count alone allows 4 * 64 (4 * 512 by default: a GiB
        -- held while the loop's body waits). Measured once the calls read
        -- before any result told its size (at most 4 * 64 + 16) are out.
        local p = Parallelize(function(x) return string.rep("x", 1048576) .. x end,
          { workers = 2, max_pending_bytes = 8 * 1048576 })
        finally(function() p:stop() end)
        local n, read, most = 600, 0, 0
        local function src()
          if read == n then return nil end
          read = read + 1
          return read
        end
        local count = 0
        for i, ok, v in p:stream(src, { ordered = ordered, max_pending = 64 }) do
          assert.is_true(ok)
          assert.are.equal(1048576 + #tostring(i), #v)
          count = count + 1
          if count > 300 then
            if count <= 320 then core.sleep(0.005) end
            if read - count > most then most = read - count end
          end
        end
        assert.are.equal(n, count)
        assert.is_true(most <= 16, "src was read " .. most .. " inputs ahead of the loop")
      end)
  end

  it("keeps nothing in the pool with keep_results = false", function()
    local p = Parallelize(function(x) return x end, { workers = 2, keep_results = false })
    finally(function() p:stop() end)
    local sum = 0
    for _, ok, v in p:stream(function()
      sum = sum + 0
      return nil
    end) do assert(ok and v) end
    local n = 0
    local i = 0
    for _, ok, v in p:stream(function() i = i + 1; if i <= 20000 then return i end end) do
      assert(ok)
      n = n + v
    end
    assert.are.equal(20000 * 20001 / 2, n)
    local env = core.pool_env(p)
    assert.is_nil(next(env.unclaimed))
    assert.is_nil(next(env.claims))
  end)

  for _, ordered in ipairs({ false, true }) do
    it(("left early, leaves what it had not handed out to p.results at stop (ordered = %s)")
      :format(tostring(ordered)), function()
      -- Input 1 is slow: an ordered stream holds back the others' results
      -- until it is done, and hands out only two of them here.
      local p = Parallelize(function(x)
        if x == 1 then require("parallelize").sleep(0.2) end
        if x % 5 == 0 then error("five " .. x) end
        return x
      end, { workers = 2 })
      finally(function() p:stop() end)
      local list = {}
      for i = 1, 60 do list[i] = i end
      local it, got = p:stream(list, { ordered = ordered }), {}
      for _ = 1, 2 do
        local i, ok, v = it()
        got[i] = true
        if ok then assert.are.equal(i, v) end
      end
      local aborted = p:stop()
      local results, ids, errors = p:take()
      for k, id in ipairs(ids) do
        assert.is_nil(got[id], "call " .. id .. " handed out by the stream and kept too")
        got[id] = true
        assert.are.equal(id, results[k])
      end
      for _, e in ipairs(errors) do
        assert.is_nil(got[e.id], "call " .. e.id .. " handed out by the stream and kept too")
        got[e.id] = true
        assert.matches("five " .. e.id, e.message)
      end
      for _, a in ipairs(aborted) do got[a.id] = true end
      for i = 1, 60 do assert.is_true(got[i], "call " .. i .. " lost") end
    end)
  end

  it("makes p:result refuse its calls, and not the loop's own calls between them", function()
    local p = Parallelize(function(x) return x end, { workers = 2 })
    finally(function() p:stop() end)
    local list = {}
    for i = 1, 40 do list[i] = i end
    local it = p:stream(list, { max_pending = 2 })
    assert.is_true(select(2, it())) -- whichever call finished first (unordered)
    local own = p(-1)
    -- The stream may have queued several inputs ahead before `own` (up to
    -- 4 windows), and queues more once its held results are handed out:
    -- turn until it has queued one after `own` (within the 40 inputs).
    local n, newest = 1
    repeat
      assert.is_true(select(2, it()))
      n = n + 1
      newest = core.pool_counts(p)
    until newest > own or n == 40
    assert.is_true(newest > own, "the stream queued nothing after the loop's own call")
    assert.has_error(function() p:result(newest) end,
      ("result: call %d belongs to a map or a stream"):format(newest))
    assert.are.same({ true, -1 }, { p:result(own, 10) })
    for _ in it do n = n + 1 end
    assert.are.equal(40, n)
  end)

  it("left early, ordered, leaves the first value of what it held back with several", function()
    -- Input 1 is slow: the others are held back, each with nil then its
    -- input (every value, not only the first, is kept); p:take() gives the
    -- first, null.
    local p = Parallelize(function(x)
      if x == 1 then require("parallelize").sleep(0.3) end
      return nil, x
    end, { workers = 2 })
    finally(function() p:stop() end)
    local it = p:stream({ 1, 2, 3, 4, 5, 6 }, { ordered = true })
    local i, ok, a, b = it()
    assert.are.same({ 1, true, nil, 1 }, { i, ok, a, b })
    -- the others were held back while input 1 ran
    local aborted = p:stop()
    assert.are.same({}, aborted)
    local results, ids = p:take()
    assert.are.same({ 2, 3, 4, 5, 6 }, ids)
    assert.are.same({ null, null, null, null, null }, results)
  end)

  it("raises when stepped after p:stop(), having handed over what it held", function()
    local p = Parallelize(function(x) return x end, { workers = 2 })
    finally(function() p:stop() end)
    local list = {}
    for i = 1, 100 do list[i] = i end
    local it, consumed = p:stream(list), 0
    for _ = 1, 10 do
      assert.is_true(select(2, it()))
      consumed = consumed + 1
    end
    local aborted = p:stop()
    local results = p:take()
    assert.are.equal(100, consumed + #results + #aborted)
    assert.has_error(function() it() end,
      "stream: the pool was stopped; what the stream had not handed out went to its results")
    assert.are.equal(0, #p:take())
  end)

  it("says so, at the loop's line, when its source stopped the pool", function()
    local p = Parallelize(function(x) return x end, { workers = 1 })
    finally(function() p:stop() end)
    local n, handed, aborted = 0, 0, nil
    local function src()
      n = n + 1
      if n == 3 then aborted = p:stop() end
      if n < 10 then return n end
    end
    local ok, err = pcall(function()
      for _ in p:stream(src) do handed = handed + 1 end -- the line the error names
    end)
    assert.is_false(ok)
    assert.matches("^spec/results_spec%.lua:%d+: stream: the pool was stopped; what the stream had not handed out "
      .. "went to its results$", err)
    -- the two inputs queued before the stop are in one place each
    local results, _, errors = p:take()
    assert.are.equal(2, p.calls)
    assert.are.equal(p.calls, handed + #results + #errors + #aborted)
  end)

  it("says what failed when its source steps the stream itself", function()
    local p = Parallelize(function(x) return x end, { workers = 2 })
    finally(function() p:stop() end)
    local it, n, inner_ok, inner_err, handed = nil, 0, nil, nil, 0
    it = p:stream(function()
      n = n + 1
      if n == 5 then inner_ok, inner_err = pcall(it) end
      if n <= 10 then return n end
    end)
    local ok, err = pcall(function()
      for _ in it do handed = handed + 1 end -- the line the error names
    end)
    assert.is_false(inner_ok)
    assert.matches("stream: an error or interrupt left it while it queued inputs, and it cannot go on", inner_err)
    assert.is_false(ok)
    assert.matches("^spec/results_spec%.lua:%d+: stream: its source stepped the stream, which cannot go on: "
      .. "what it had not handed out went to the pool's results$", err)
    assert.is_nil(it()) -- ended
    -- the four inputs queued before are each in one place; the fifth the
    -- source returned never became a call
    p:wait()
    local results, _, errors = p:take()
    local aborted = p:stop()
    assert.are.equal(4, p.calls)
    assert.are.equal(p.calls, handed + #results + #errors + #aborted)
  end)

  -- Once string results size the calls out (max_pending_bytes over their
  -- mean size), two per worker were let out even when that was more than
  -- four times a small window: beyond the bound, and beyond the ring an
  -- ordered stream holds results back in, where input k + 4 took input k's
  -- slot (results handed out at each other's positions, or a loop waiting
  -- for good on a slot overwritten).
  for _, ordered in ipairs({ false, true }) do
    it(("keeps four times a small window out with big string results (ordered = %s)")
      :format(tostring(ordered)), function()
      -- In a process of its own: a loop waiting for good on a slot
      -- overwritten must fail the spec, not hang it.
      local dir = support.tmpdir()
      finally(function() support.rmdir(dir) end)
      support.write(dir .. "/s.lua", ([[
        local parallelize = require "parallelize"
        local p = parallelize.Parallelize(function(x)
          -- in each run of four, the first finishes last
          parallelize.sleep(x %% 4 == 1 and 0.02 or 0.002)
          return string.rep("s", 1000) .. "#" .. x
        end, { workers = 4, max_pending_bytes = 1000 })
        local list = {}
        for i = 1, 120 do list[i] = i end
        local handed, most, wrong = 0, 0, 0
        for i, ok, v in p:stream(list, { ordered = %s, max_pending = 1 }) do
          assert(ok)
          handed = handed + 1
          most = math.max(most, p.calls - handed + 1)
          if tonumber(v:match("#(%%d+)$")) ~= i then wrong = wrong + 1 end
        end
        p:stop()
        print(("handed=%%d wrong=%%d most=%%d"):format(handed, wrong, most))
      ]]):format(tostring(ordered)))
      local out, status = support.run("timeout 30 " .. support.quote(support.pzlua()) .. " "
        .. support.quote(dir .. "/s.lua"))
      assert.are.equal(0, status, out)
      local handed, wrong, most = out:match("handed=(%d+) wrong=(%d+) most=(%d+)")
      assert.are.equal("120", handed, out)
      assert.are.equal("0", wrong, out)
      assert.is_true(tonumber(most) <= 4, out)
    end)
  end

  it("names the item that cannot travel; the items before it stay its own", function()
    local p = Parallelize(function(x) return x end, { workers = 2 })
    finally(function() p:stop() end)
    local list = {}
    for i = 1, 200 do list[i] = i end
    list[150] = coroutine.create(print)
    local it, seen = p:stream(list, { max_pending = 8 }), {}
    local ok, err = pcall(function()
      for i, good, v in it do
        assert.is_true(good)
        assert.are.equal(i, v)
        seen[#seen + 1] = i
      end
    end)
    assert.is_false(ok)
    assert.are.equal("stream: item 150 cannot be sent: cannot encode a thread at args[1]", err)
    -- Stepped again, it hands out inputs queued before the one that failed
    -- (before, their calls were unknown to it: "internal error"), then
    -- fails on it again; what it had not handed out goes to the store.
    ok, err = pcall(function()
      for i, good, v in it do
        assert.is_true(good)
        assert.are.equal(i, v)
        seen[#seen + 1] = i
      end
    end)
    assert.is_false(ok)
    assert.matches("^stream: item 150 cannot be sent", err)
    -- (what no worker had taken yet is aborted by stop, its input with it)
    for _, a in ipairs(p:stop()) do seen[#seen + 1] = a[1] end
    for _, v in ipairs(p:take()) do seen[#seen + 1] = v end
    table.sort(seen)
    assert.are.equal(149, #seen)
    for i = 1, 149 do assert.are.equal(i, seen[i]) end
  end)

  it("ends when its pool is stopped from its loop's last turn", function()
    local p = Parallelize(function(x) return x end, { workers = 2 })
    finally(function() p:stop() end)
    local seen = 0
    for i, ok in p:stream({ 1, 2, 3 }, { ordered = true }) do
      assert.is_true(ok)
      seen = seen + 1
      if i == 3 then p:stop() end
    end
    assert.are.equal(3, seen)
    assert.are.equal(0, #p:take())
  end)

  it("left early many times on one pool, leaves room for more maps and streams", function()
    -- Each loop left by break kept its claim (one of 255 tags) until stop:
    -- the 256th stream or map on the pool raised "too many maps and
    -- streams at once", though none of the others could be stepped again.
    local p = Parallelize(function(x) return x * 2 end, { workers = 2 })
    finally(function() p:stop() end)
    local handed = 0
    local function first_above(limit)
      for _, ok, v in p:stream({ 1, 2, 3, 4 }) do
        assert.is_true(ok)
        handed = handed + 1
        if v > limit then return v end
      end
    end
    for _ = 1, 300 do assert.is_true(first_above(4) > 4) end
    assert.are.same({ 2, 4, 6 }, p:map({ 1, 2, 3 }))
    local n = 0
    for _, ok in p:stream({ 1, 2, 3 }) do n = n + (ok and 1 or 0) end
    assert.are.equal(3, n)
    -- nothing lost, nothing twice
    p:wait()
    local aborted = p:stop()
    assert.are.equal(300 * 4, handed + #p.results + #p.errors + #aborted)
  end)

  it("lets go of its source, its results and its pool once it has ended", function()
    -- Compiled traces keep the closures they called: with the JIT on, a
    -- finished stream's closures, and what their upvalues held (the
    -- source, the results, the pool), outlived it.
    local held = setmetatable({}, { __mode = "v" })
    local pool = setmetatable({}, { __mode = "k" })
    local function run(p, k, ordered)
      local list = {}
      for i = 1, 40 do list[i] = string.rep("v", k % 2 == 0 and 1000 or 150 * 1024) .. k .. ":" .. i end
      local last, n = nil, 0
      for i, ok, v in p:stream(list, { ordered = ordered }) do
        assert(ok)
        assert.are.equal(#list[i], v[1])
        last, n = v, n + 1
      end
      assert.are.equal(40, n)
      held[#held + 1], held[#held + 2] = list, last
    end
    local p = Parallelize(function(s) return { #s } end, { workers = 2 })
    for k = 1, 20 do run(p, k, k % 4 < 2) end
    p:stop()
    -- A pool dropped, never stopped, after its stream: collected.
    local q = Parallelize(function(s) return { #s } end, { workers = 2 })
    for k = 21, 30 do run(q, k, k % 4 < 2) end
    pool[q] = true
    q = nil -- luacheck: ignore 311
    assert.are.same({}, support.uncollected(held))
    assert.is_nil(next(pool), "the pool dropped after its stream was not collected")
  end)
end)

describe("max_pending", function()
  it("makes p(...) wait while that many calls wait for a worker", function()
    local p = Parallelize(function(s) require("parallelize").sleep(s) end, { workers = 1, max_pending = 2 })
    finally(function() p:stop() end)
    local most = 0
    local t0 = core.now()
    for _ = 1, 8 do
      p(0.05)
      local _, _, pending = core.pool_counts(p)
      if pending > most then most = pending end
    end
    assert.is_true(most <= 2, "pending reached " .. most)
    assert.is_true(core.now() - t0 >= 0.2, "p(...) did not wait")
    assert.is_true(p:wait(10))
  end)
end)

describe("big results", function()
  local KiB = 1024
  it("come back whole, each to its call, many in flight", function()
    local p = Parallelize(function(i, size) return string.rep(string.char(64 + i % 60), size), i end,
      { workers = 2 })
    finally(function() p:stop() end)
    local ids = {}
    for i = 1, 40 do ids[i] = p(i, 256 * KiB + i * 1000) end
    for i = 1, 40 do
      local ok, s, j = p:result(ids[i], 30)
      assert.is_true(ok)
      assert.are.equal(i, j)
      assert.are.equal(256 * KiB + i * 1000, #s)
      assert.are.equal(string.rep(string.char(64 + i % 60), #s), s)
    end
  end)

  it("left unread when the pool stops are freed with it", function()
    local p = Parallelize(function(size) return string.rep("r", size) end, { workers = 2 })
    for _ = 1, 8 do p(512 * KiB) end
    local t0 = core.now()
    while p:stats().done < 8 and core.now() - t0 < 30 do require("parallelize").sleep(0.01) end
    p:stop()
  end)
end)

describe("max_pending_bytes", function()
  local MiB = 1024 * 1024
  it("makes p(...) wait while the calls waiting for a worker hold that many bytes", function()
    local p = Parallelize(function(s)
      require("parallelize").sleep(0.02)
      return #s
    end, { workers = 1, max_pending_bytes = 2.5 * MiB })
    finally(function() p:stop() end)
    local most, n = 0, 24
    for i = 1, n do
      p(string.rep(string.char(64 + i), MiB))
      local _, _, pending = core.pool_counts(p)
      if pending > most then most = pending end
    end
    -- Two frames of a little over 1 MiB are under the limit, a third is not.
    assert.is_true(most <= 3, "pending reached " .. most)
    assert.is_true(p:wait(30))
    assert.are.equal(n, #p.results)
    for i = 1, n do assert.are.equal(MiB, p.results[i]) end
  end)

  it("queues a call bigger than the limit when no other waits", function()
    local p = Parallelize(function(s) return #s end, { workers = 1, max_pending_bytes = 1000 })
    finally(function() p:stop() end)
    for _ = 1, 3 do p(string.rep("x", 100000)) end
    assert.is_true(p:wait(10))
    assert.are.same({ 100000, 100000, 100000 }, p.results)
  end)
end)
