-- p:map in chunks (src/chunk.h): many items travel as one call that the
-- worker runs as their calls, one after the other. What must hold is what
-- a map of one call per item promises: every item once, results in order,
-- the first error named by its item, nothing lost when a worker dies.
local parallelize = require "parallelize"
local support = require "spec.support"

local Parallelize, null = parallelize.Parallelize, parallelize.null

local function range(n)
  local list = {}
  for i = 1, n do list[i] = i end
  return list
end

describe("a map in chunks", function()
  local p
  after_each(function()
    if p then p:stop() end
    p = nil
  end)

  it("returns every item's first result in input order, null for nil, in far fewer calls", function()
    p = Parallelize(function(x)
      if x % 7 == 0 then return nil end
      return x * 3, "dropped"
    end, { workers = 3 })
    local n = 50000
    local out = p:map(range(n))
    assert.are.equal(n, #out)
    for i = 1, n do
      if i % 7 == 0 then
        assert.are.equal(null, out[i])
      else
        assert.are.equal(i * 3, out[i])
      end
    end
    -- Chunks are sized to about 2 ms of work each: 50,000 tiny items take
    -- some dozens of calls, never one each.
    assert.is_true(p.calls < n / 100, "calls: " .. p.calls)
    assert.are.same({}, p.results)
    assert.are.same({}, p.errors)
    -- The pool goes on as before: calls of its own, another map.
    local id = p(5)
    assert.are.same({ true, 15, "dropped" }, { p:result(id) })
    assert.are.same({ 3, 6, null }, p:map({ 1, 2, 7 }))
  end)

  it("lets go of its list, its items, its answers and its output once it has returned", function()
    -- Compiled traces keep the closures they called: with the JIT on, the
    -- map's closures, and what their upvalues held, outlived it.
    p = Parallelize(function(s) return { #s } end, { workers = 2 })
    local held = setmetatable({}, { __mode = "v" })
    local function run(k, size)
      local list = {}
      for i = 1, 40 do list[i] = string.rep("v", size) .. k .. ":" .. i end
      local out = p:map(list)
      assert.are.equal(size + #tostring(k) + 3, out[40][1])
      held[#held + 1], held[#held + 2], held[#held + 3] = list, out, out[1]
    end
    -- items of 1 KB go in chunks; of 150 KB, as calls of their own
    for k = 1, 20 do run(k, k % 2 == 0 and 1000 or 150 * 1024) end
    assert.are.same({}, support.uncollected(held))
  end)

  it("lets go of its pool: a pool dropped after its maps is collected", function()
    local pools = setmetatable({}, { __mode = "k" })
    for k = 1, 10 do
      local q = Parallelize(function(x) return x * 2 end, { workers = 2 })
      for _ = 1, 3 do assert.are.equal(4000, q:map(range(2000))[2000]) end
      pools[q] = k
    end
    assert.are.equal(0, #support.uncollected(pools))
  end)

  it("runs every item exactly once, each in some worker", function()
    -- Each worker keeps the items it ran; its close hands them over
    -- (p.closed, by slot, after stop).
    p = Parallelize(parallelize.Deferred(function()
      local seen = {}
      return setmetatable({ close = function() return seen end }, {
        __call = function(_, x)
          seen[#seen + 1] = x
          return parallelize.getpid()
        end,
      })
    end), { workers = 2 })
    local n = 20000
    local out = p:map(range(n))
    -- p.pids is by slot, and has no entry for a slot whose worker has not
    -- initialized yet: one slow to start (a loaded machine) leaves the
    -- whole map to the other, and a hole at [1] that ipairs stops at.
    local slot_of = {}
    for slot, pid in pairs(p.pids) do slot_of[pid] = slot end
    for i = 1, n do assert.is_truthy(slot_of[out[i]], "item " .. i .. " ran in " .. tostring(out[i])) end
    p:stop()
    local ran = {}
    for slot, seen in pairs(p.closed) do
      for _, x in ipairs(seen) do
        assert.is_nil(ran[x], "item " .. x .. " ran twice")
        ran[x] = slot
      end
    end
    for i = 1, n do assert.are.equal(slot_of[out[i]], ran[i], "item " .. i) end
  end)

  it("runs every item in some worker while another is still starting", function()
    -- Worker 1 initializes only once the map has returned: the map is
    -- worker 2's alone, and p.pids, which names a slot once its worker has
    -- initialized, has slot 2 only.
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    local gate = dir .. "/gate"
    p = Parallelize({
      parallelize.Deferred(function()
        for _ = 1, 6000 do
          local f = io.open(gate)
          if f then
            f:close()
            break
          end
          parallelize.sleep(0.01)
        end
        return function() return parallelize.getpid() end
      end),
      function() return parallelize.getpid() end,
    })
    local n = 20000
    local out = p:map(range(n))
    local before = p.pids
    assert.is_nil(before[1])
    for i = 1, n do assert.are.equal(before[2], out[i], "item " .. i) end
    support.write(gate, "")
    local _ = p.executors -- both initialized
    local now = p.pids
    assert.are.equal(before[2], now[2])
    assert.is_number(now[1])
    assert.are_not.equal(now[1], now[2])
  end)

  it("raises for the item that raised, at the user's line", function()
    p = Parallelize(function(x)
      if x == 3777 then error("bad item " .. x) end
      return x
    end, { workers = 2 })
    local ok, err = pcall(function()
      local out = p:map(range(10000)) -- the line the error names
      return out
    end)
    assert.is_false(ok)
    assert.matches("^spec/map_chunks_spec%.lua:%d+: map: item 3777 failed: .*bad item 3777\nstack traceback:", err)
    -- Every call the map made has its outcome in the store: nothing lost.
    p:wait()
    assert.are.equal(p.calls, #p.results + #p.errors)
    assert.are.same({ 1, 2 }, p:map({ 1, 2 }))
  end)

  it("leaves every chunk accounted for after it raised: results, errors, or aborted with its items", function()
    p = Parallelize(function(x)
      parallelize.sleep(0.005)
      if x == 20 then error("item twenty") end
      if x == 5 then return nil end
      return x
    end, { workers = 1 })
    local ok, err = pcall(p.map, p, range(200))
    assert.is_false(ok)
    assert.matches("map: item 20 failed: .*item twenty", err)
    local calls = p.calls
    local aborted = p:stop(0)
    -- The first chunk (items 1-16) answered; the second raised at item 20
    -- (its answer, items 17-19 and the error, is item 20's error record);
    -- the one queued after them never ran.
    assert.are.equal(calls, #p.results + #p.errors + #aborted)
    -- (counted as what it is: the chunk that raised is a failed call)
    assert.are.equal(#p.errors, p:stats().failed)
    assert.is_true(#aborted >= 1)
    local items, count = aborted[1][1], aborted[1][2]
    assert.are.equal(count, #items)
    assert.are.equal(33, items[1])
    -- The answers' results (which the map decodes straight into its output)
    -- are in the store as each chunk's table of results, null for nil.
    assert.are.same({ { 1, 2, 3, 4, null, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 } }, p.results)
    assert.are.equal(1, #p.errors)
    local e = p.errors[1]
    assert.are.equal("map: item 20 failed: " .. e.value, e.message)
    assert.matches("item twenty$", e.value)
    assert.are.same({ 17, 18, 19 }, e.results)
    assert.are.equal(17, e.first)
    local chunk_items = {}
    for j = 1, 16 do chunk_items[j] = 16 + j end
    assert.are.same({ n = 2, chunk_items, 16 }, e.args) -- as stop() gives a chunk's
  end)

  -- A chunk stops at an item that raises, and answers with the results of
  -- the items before it and the item's error. Once its map has let it go
  -- (the map raised, for another item or Ctrl-C), that answer is the
  -- item's error record in p.errors, wherever it was then: still running
  -- (the drain stores it when it comes) or answered and not yet taken (the
  -- map's release moves it). It was stored as the partial array of
  -- results, the item's error and the items after it in no list.
  local function check_failed_chunk(e, first, k, count, why, done)
    assert.are.equal(require("parallelize.core").error_metatable, getmetatable(e))
    assert.are.equal("raised", e.kind)
    assert.are.equal(("map: item %d failed: %s"):format(first + k - 1, e.value), e.message)
    assert.are.equal(e.message, tostring(e))
    assert.matches(why .. "$", e.value)
    assert.matches("^stack traceback:", e.traceback)
    assert.are.equal(first, e.first)
    assert.are.same(done, e.results)
    assert.are.equal(k - 1, #e.results)
    local items = {}
    for j = 1, count do items[j] = first + j - 1 end
    assert.are.same({ n = 2, items, count }, e.args)
  end

  -- 16 items on 2 workers: chunks 1-4, 5-7, 8-10, 11-12 are queued first.
  -- Item 2 fails at once: the map raises. Item 9 fails only once the file
  -- `go` exists, which the test makes after the map raised (20 s at most);
  -- with `how` "exit", its worker exits instead (its chunk fails whole).
  -- With `scale`, item 7 returns nil and the others x * scale (else x).
  local function late_failure(go, how, scale, opts)
    return Parallelize(function(x)
      if x == 9 then
        local t = os.time()
        while not io.open(go) and os.time() - t < 20 do parallelize.sleep(0.005) end
        if how == "exit" then os.exit(7) end
        error("nine")
      end
      if x == 2 then error("two") end
      if scale and x == 7 then return nil end
      return x * (scale or 1)
    end, opts or { workers = 2 })
  end

  it("stores a chunk stopped at a failed item as its error record when it answers after the map raised", function()
    local dir = support.tmpdir()
    local go = dir .. "/go"
    finally(function() support.rmdir(dir) end)
    p = late_failure(go, "error", 10)
    local ok, err = pcall(p.map, p, range(16))
    assert.is_false(ok)
    assert.matches("map: item 2 failed: .*two", err)
    support.write(go, "")
    assert.is_true(p:wait(30))
    -- Every call in exactly one place; the failed chunks as errors.
    assert.are.equal(p.calls, #p.results + #p.errors)
    assert.are.equal(2, #p.errors)
    assert.are.equal(2, p:stats().failed)
    local by_first = {}
    for _, e in ipairs(p.errors) do by_first[e.first] = e end
    check_failed_chunk(by_first[1], 1, 2, 4, "two", { 10 })
    check_failed_chunk(by_first[8], 8, 2, 3, "nine", { 80 })
    -- p:result says the same of the chunk that answered late.
    local r = { p:result(by_first[8].id) }
    assert.are.same({ false, by_first[8] }, r)
    -- The chunks that ran every item are arrays of results, null for nil.
    local stored = {}
    for k, res in ipairs(p.results) do
      assert.are.equal("table", type(res), "result of call " .. tostring(p.ids[k]))
      stored[#stored + 1] = res
    end
    table.sort(stored, function(a, b) return a[1] < b[1] end)
    -- (the map may have queued chunks after these before it raised, as
    -- answers came in: each is its items' results too)
    assert.are.same({ 50, 60, null }, stored[1])
    assert.are.same({ 110, 120 }, stored[2])
    for k = 3, #stored do
      local res = stored[k]
      assert.is_true(res[1] > 120 and res[1] % 10 == 0)
      for j = 2, #res do assert.are.equal(res[1] + 10 * (j - 1), res[j]) end
    end
    assert.are.equal(p.calls, 2 + #stored)
  end)

  it("stores a late chunk's answer that cannot be made into its record as an error of kind parent", function()
    -- Short of memory to make the record (here: the function that makes
    -- it raises as an allocation would), the answer is salvaged as any
    -- record the parent cannot take: its call's error, in one place.
    local dir = support.tmpdir()
    local go = dir .. "/go"
    finally(function() support.rmdir(dir) end)
    p = late_failure(go, "error", 10)
    assert.is_false(pcall(p.map, p, range(16)))
    local env = require("parallelize.core").pool_env(p)
    local real = env.chunk_answer
    local late -- the chunk of items 8-10, still running
    for id, info in pairs(env.chunks) do
      if info.into_at[id] == 7 then late = id end
    end
    assert.is_number(late)
    env.chunk_answer = function(info, id, ...)
      if id == late then error("not enough memory", 0) end
      return real(info, id, ...)
    end
    support.write(go, "")
    assert.is_true(p:wait(30))
    env.chunk_answer = real
    assert.are.equal(p.calls, #p.results + #p.errors)
    local e = select(2, p:result(late))
    assert.are.equal("parent", e.kind)
    assert.matches("the result of call " .. late .. " cannot be used in the parent: not enough memory", e.message)
    assert.is_nil(env.chunks[late])
  end)

  -- p:map(range(16)) on p, its waits wrapped: once `now(claims)` is true
  -- of the pool's claims after a wait, the map's next step raises
  -- "interrupted!" as Ctrl-C would there. Then waits, and checks that
  -- every call is in one place, one of them an error.
  local function map_interrupted_when(now)
    local chunks, core = require "parallelize.chunks", require "parallelize.core"
    local real = support.upvalue(chunks.map, "wait_for")
    local ok, err = pcall(support.with_upvalue, chunks.map, "wait_for", function(q, ...)
      local status = real(q, ...)
      if now(core.pool_env(q).claims) then error("interrupted!", 0) end
      return status
    end, function() return p:map(range(16)) end)
    assert.is_false(ok)
    assert.are.equal("interrupted!", err)
    assert.is_true(p:wait(30))
    assert.are.equal(p.calls, #p.results + #p.errors)
    assert.are.equal(1, #p.errors)
  end

  it("stores a chunk stopped at a failed item as its error record when the map raised before taking it", function()
    -- Interrupted once a chunk's answer that stopped at an item is in the
    -- map's lists, not yet taken.
    p = Parallelize(function(x)
      if x == 6 then error("six") end
      if x == 3 then return nil end
      return x * 10
    end, { workers = 2 })
    map_interrupted_when(function(claims)
      for _, c in pairs(claims) do
        for _, id in ipairs(c.ids) do
          local ex = c.extras[id]
          if ex and ex.n > 2 then return true end
        end
      end
    end)
    check_failed_chunk(p.errors[1], 5, 2, 3, "six", { 50 })
    for k, res in ipairs(p.results) do
      assert.are.equal("table", type(res), "result of call " .. tostring(p.ids[k]))
      for j = 1, #res do assert.are_not.equal(nil, res[j]) end
    end
    local seen = 0
    for _, res in ipairs(p.results) do
      if res[1] == 10 then
        assert.are.same({ 10, 20, null, 40 }, res)
        seen = seen + 1
      end
    end
    assert.are.equal(1, seen)
  end)

  -- A chunk that fails whole (its worker died running it) after its map
  -- let it go: its error record goes to the store, and its env.chunks
  -- entry (with the map's list and output) goes with it, as a result's
  -- does; it stayed until stop.
  it("lets go of a chunk's entry when its late answer is an error of the whole chunk", function()
    local dir = support.tmpdir()
    local go = dir .. "/go"
    finally(function() support.rmdir(dir) end)
    p = late_failure(go, "exit", nil, { workers = 2, quiet = true })
    local list = range(16)
    local held = setmetatable({ list }, { __mode = "v" })
    assert.is_false(pcall(p.map, p, list))
    list = nil -- luacheck: ignore 311 (dropped: the pool must not keep it)
    support.write(go, "")
    assert.is_true(p:wait(30))
    assert.are.equal(p.calls, #p.results + #p.errors)
    local env = require("parallelize.core").pool_env(p)
    assert.are.same({}, env.chunks)
    collectgarbage()
    collectgarbage()
    assert.is_nil(held[1])
  end)

  -- Once the map's release is complete, a chunk still out needs only
  -- what chunks.register kept of it (its items, its first): the map's
  -- list (the caller's) and output are not pinned until it answers.
  it("keeps neither the map's list nor its output for a chunk still out after the release", function()
    local dir = support.tmpdir()
    local go = dir .. "/go"
    finally(function() support.rmdir(dir) end)
    p = late_failure(go, "error", 10)
    local list = range(16)
    local held = setmetatable({ list }, { __mode = "v" })
    assert.is_false(pcall(p.map, p, list))
    list = nil -- luacheck: ignore 311 (dropped: the pool must not keep it)
    local env = require("parallelize.core").pool_env(p)
    assert.is_not_nil(next(env.chunks)) -- (item 9's chunk is still out)
    collectgarbage()
    collectgarbage()
    assert.is_nil(held[1])
    support.write(go, "")
    assert.is_true(p:wait(30))
    assert.are.equal(p.calls, #p.results + #p.errors)
    local late
    for _, e in ipairs(p.errors) do
      if e.message:find("item 9 failed", 1, true) then late = e end
    end
    assert.is_not_nil(late)
    assert.are.equal(late.first + late.args[2] - 1, late.args[1][late.args[2]])
    assert.are.equal(late.first, late.args[1][1])
  end)

  it("lets go of a chunk's entry when its error of the whole chunk was in the lists at the release", function()
    -- Interrupted once a killer error of a chunk is in the map's lists,
    -- not yet taken.
    p = Parallelize(function(x)
      if x == 6 then os.exit(7) end
      return x
    end, { workers = 2, quiet = true, max_deaths = 100 })
    map_interrupted_when(function(claims)
      for _, c in pairs(claims) do
        if #c.errors > 0 then return true end
      end
    end)
    assert.are.same({}, require("parallelize.core").pool_env(p).chunks)
  end)

  -- Ctrl-C right after a chunk was queued, before the map tracked it (the
  -- hook fires at the instruction after pool_submit_chunk's return; here
  -- the function is wrapped to raise there): its answer found no entry in
  -- env.chunks, and became "map: item K of call N (a chunk of a map's
  -- items)" with K its place in the chunk, no first, args {n = 0}; a chunk
  -- that ran every item kept nil in its array of results.
  local function interrupted_after_queuing(executor, list)
    local chunks, core = require "parallelize.chunks", require "parallelize.core"
    local real = support.upvalue(chunks.map, "pool_submit_chunk")
    p = Parallelize(executor, { workers = 2 })
    local ok, err = pcall(support.with_upvalue, chunks.map, "pool_submit_chunk", function(...)
      local id, bytes = real(...)
      if id then error("interrupted!", 0) end
      return id, bytes
    end, function() return p:map(list) end)
    assert.is_false(ok)
    assert.are.equal("interrupted!", err)
    assert.is_true(p:wait(30))
    assert.are.equal(1, p.calls)
    assert.are.equal(p.calls, #p.results + #p.errors)
    assert.are.same({}, core.pool_env(p).chunks)
    assert.are.same({}, core.pool_env(p).chunk_tags or {})
  end

  it("stores the failed chunk an interrupt left untracked as its item's error record", function()
    interrupted_after_queuing(function(x)
      if x == 3 then
        parallelize.sleep(0.05)
        error("three")
      end
      if x == 2 then return nil end
      return x * 10
    end, range(16))
    check_failed_chunk(p.errors[1], 1, 3, p.errors[1].args[2], "three", { 10, null })
  end)

  -- Ctrl-C as the map is about to queue a chunk (its hook fires at the
  -- call's instruction, before pool_submit_chunk runs): nothing is queued,
  -- and no note of a pending chunk is left for the release to name by tag
  -- (the map noted it before the call: env.chunk_tags kept the map's info
  -- until the tag was claimed again or stop).
  it("leaves no entry for a chunk an interrupt kept from being queued", function()
    local chunks, core = require "parallelize.chunks", require "parallelize.core"
    p = Parallelize(function(x) return x end, { workers = 2 })
    local ok, err = pcall(support.with_upvalue, chunks.map, "pool_submit_chunk", function()
      error("interrupted!", 0)
    end, function() return p:map(range(16)) end)
    assert.is_false(ok)
    assert.are.equal("interrupted!", err)
    assert.is_true(p:wait(30))
    assert.are.equal(0, p.calls)
    assert.are.same({}, core.pool_env(p).chunks)
    assert.are.same({}, core.pool_env(p).chunk_tags)
  end)

  -- The chunk an interrupt left untracked fails whole (its worker died
  -- running it, max_deaths 1): its env.chunk_tags entry, holding the
  -- map's list and output, goes with its error record, as a result's does.
  it("lets go of the untracked chunk's entry when its late answer is an error of the whole chunk", function()
    local chunks, core = require "parallelize.chunks", require "parallelize.core"
    local real = support.upvalue(chunks.map, "pool_submit_chunk")
    p = Parallelize(function(x)
      if x == 3 then
        parallelize.sleep(0.05)
        os.exit(7)
      end
      return x
    end, { workers = 2, quiet = true, max_deaths = 1 })
    local list = range(16)
    local held = setmetatable({ list }, { __mode = "v" })
    local ok, err = pcall(support.with_upvalue, chunks.map, "pool_submit_chunk", function(...)
      local id, bytes = real(...)
      if id then error("interrupted!", 0) end
      return id, bytes
    end, function() return p:map(list) end)
    list = nil -- luacheck: ignore 311 (dropped: the pool must not keep it)
    assert.is_false(ok)
    assert.are.equal("interrupted!", err)
    assert.is_true(p:wait(30))
    assert.are.equal(1, p.calls)
    assert.are.equal(1, #p.errors)
    assert.are.equal("killer", p.errors[1].kind)
    assert.are.same({}, core.pool_env(p).chunks)
    assert.are.same({}, core.pool_env(p).chunk_tags)
    collectgarbage()
    collectgarbage()
    assert.is_nil(held[1])
  end)

  it("stores the chunk an interrupt left untracked as its array of results, null for nil", function()
    interrupted_after_queuing(function(x)
      parallelize.sleep(0.01)
      if x % 2 == 0 then return nil end
      return x
    end, range(16))
    local r = p.results[1]
    assert.are.equal("table", type(r))
    for k = 1, table.maxn(r) do
      assert.are.equal(k % 2 == 0 and null or k, r[k])
    end
  end)

  -- Short of memory in the release's register (new keys in env.chunks),
  -- after a map raised: the move is noted half-made, so that the next wait
  -- finishes it (it was noted after the register: only stop moved the
  -- map's answers, and p:result of its calls raised "attempt to index
  -- upvalue 'starts'", the map's closure being cleared).
  local function with_register_failing(times, body)
    local pool_release_after = support.upvalue(require("parallelize.chunks").map, "release_after_map")
    local release = support.upvalue(pool_release_after, "release")
    local release_now = support.upvalue(release, "release_now")
    local real = support.upvalue(release_now, "chunk_register")
    local left = times
    return support.with_upvalue(release_now, "chunk_register", function(...)
      if left > 0 then
        left = left - 1
        error("not enough memory", 0)
      end
      return real(...)
    end, body)
  end

  local function failing_map()
    p = Parallelize(function(x)
      if x == 20 then error("twenty") end
      return x
    end, { workers = 2 })
    local ok, err = pcall(p.map, p, range(64))
    assert.is_false(ok)
    assert.matches("map: item 20 failed", err)
  end

  it("finishes at the next wait a release whose register ran out of memory", function()
    with_register_failing(1, function()
      failing_map()
      assert.is_true(p:wait(30))
      assert.are.equal(p.calls, #p.results + #p.errors)
      assert.are.equal(1, #p.errors)
      assert.are.equal(20, p.errors[1].first + #p.errors[1].results)
    end)
  end)

  it("says a call of a map whose move is still half-made belongs to it", function()
    with_register_failing(3, function()
      failing_map()
      local ok, err = pcall(p.result, p, 1)
      assert.is_false(ok)
      assert.matches("result: call 1 belongs to a map or a stream", err)
    end)
    assert.is_true(p:wait(30))
    assert.are.equal(p.calls, #p.results + #p.errors)
  end)

  it("gives a late chunk's record the items it ran, though the caller refilled the list since", function()
    -- (the record's args were read from the map's list when the answer
    -- came: the next batch's items, put in the same table meanwhile)
    local dir = support.tmpdir()
    local go = dir .. "/go"
    finally(function() support.rmdir(dir) end)
    p = late_failure(go)
    local list = range(16)
    assert.is_false(pcall(p.map, p, list))
    for i = 1, 16 do list[i] = 100 + i end
    support.write(go, "")
    assert.is_true(p:wait(30))
    local late
    for _, e in ipairs(p.errors) do
      if e.value:match("nine$") then late = e end
    end
    assert.is_table(late)
    local items = {}
    for j = 1, late.args[2] do items[j] = late.first + j - 1 end
    assert.are.same(items, late.args[1])
    assert.are.equal(9, late.first + #late.results)
  end)

  it("names the item whose result the parent cannot decode, and goes on", function()
    -- The result of item 7 is a module only the workers have: the parent
    -- cannot load it. The chunk's answer fails while it is decoded into the
    -- map's output; its items run again one call each.
    p = Parallelize(parallelize.Deferred(function()
      package.loaded.only_in_workers = { here = true }
      return function(x)
        if x == 7 then return package.loaded.only_in_workers end
        return x * 2
      end
    end), { workers = 2 })
    local ok, err = pcall(p.map, p, range(100))
    assert.is_false(ok)
    assert.matches("map: item 7 failed: .*cannot be used in the parent", err)
    -- The pool goes on, and a map's output holds only its own results.
    local list = range(2000)
    list[7] = -7
    local out = p:map(list)
    assert.are.equal(2000, #out)
    for i = 1, 2000 do assert.are.equal(list[i] * 2, out[i]) end
  end)

  it("names the item that cannot travel, and says what p(item) would", function()
    p = Parallelize(function(x) return x end, { workers = 2 })
    local list = range(300)
    list[77] = coroutine.create(print)
    local ok, err = pcall(p.map, p, list)
    assert.is_false(ok)
    local _, err1 = pcall(p, list[77])
    assert.matches("cannot encode a thread at args%[1%]$", err1)
    assert.are.equal("map: item 77 cannot be sent: " .. err1, err)
    -- The items queued before it still run, their results in the store,
    -- each once.
    assert.is_true(p:wait(10))
    local seen = {}
    -- (a chunk's answer is there whole: a table of its items' results)
    for _, r in ipairs(p:take()) do
      for _, v in ipairs(type(r) == "table" and r or { r }) do
        assert.is_true(v >= 1 and v < 77 and not seen[v])
        seen[v] = true
      end
    end
  end)

  it("names the item whose result cannot travel (the chunk runs again as one call per item)", function()
    p = Parallelize(function(x)
      if x == 1234 then return coroutine.create(print) end
      return x
    end, { workers = 2 })
    local ok, err = pcall(p.map, p, range(3000))
    assert.is_false(ok)
    assert.matches("map: item 1234 failed: call %d+: cannot encode a thread at result%[1%]", err)
  end)

  it("names the item that kills its worker, after max_deaths deaths as one call", function()
    p = Parallelize(function(x)
      if x == 321 then os.exit(7) end
      return x
    end, { workers = 2, max_deaths = 2 })
    local ok, err = pcall(p.map, p, range(1000))
    assert.is_false(ok)
    assert.matches("map: item 321 failed: .*killed 2 workers", err)
  end)

  it("runs a chunk's items as calls of their own once its worker died running it", function()
    -- Item 20 kills its worker every time. Its chunk is not run again whole
    -- max_deaths times (each time killing a worker and running the items
    -- before 20 again): one death for the chunk, max_deaths for the item.
    p = Parallelize(function(x)
      if x == 20 then os.exit(7) end
      return x
    end, { workers = 1, max_deaths = 3 })
    local ok, err = pcall(p.map, p, range(100))
    assert.is_false(ok)
    assert.matches("map: item 20 failed: .*killed 3 workers", err)
    assert.are.equal(1 + 3, p:stats().deaths)
  end)

  it("splits chunks whose arguments are above max_message; one item above it raises as p(item) would", function()
    p = Parallelize(function(s) return #s end, { workers = 2, max_message = 4096 })
    local list = {}
    for i = 1, 400 do list[i] = string.rep("x", 100 + i % 10) end
    local out = p:map(list)
    for i = 1, 400 do assert.are.equal(100 + i % 10, out[i]) end
    list[200] = string.rep("y", 5000)
    local ok, err = pcall(p.map, p, list)
    assert.is_false(ok)
    assert.matches("above max_message %(4096%)", err)
  end)

  it("splits chunks whose answer is above max_message", function()
    p = Parallelize(function(i) return string.rep("r", 200 + i % 3) end, { workers = 2, max_message = 4096 })
    local out = p:map(range(500))
    for i = 1, 500 do assert.are.equal(200 + i % 3, #out[i]) end
  end)

  it("goes one call per item where a chunk would not act as its items' calls", function()
    for _, opts in ipairs({ { retries = 1 }, { timeout = 60 }, { max_calls = 100000 }, { fail_fast = true },
      { progress = true } }) do
      local q = Parallelize(function(x) return x + 1 end, opts)
      local out = q:map(range(300))
      assert.are.equal(300, #out)
      assert.are.equal(301, out[300])
      local what = next(opts)
      assert.are.equal(300, q.calls, what)
      q:stop()
    end
  end)
  it("runs a map inside a chunk's executor (the worker's own pools run chunks too)", function()
    -- The inner pool's workers are forked from a worker that is running a
    -- chunk: they must compile the chunk runner in their own Lua state.
    p = Parallelize(function(x)
      local inner = require("parallelize").map(function(y) return y * 2 end, { x, x + 1 }, { workers = 1 })
      return inner[1] + inner[2]
    end, { workers = 1 })
    assert.are.same({ 6, 10, 14 }, p:map({ 1, 2, 3 }))
  end)

  it("gives every worker a share before any chunk has answered: n items on n workers are n calls", function()
    -- Nothing is known of an item's cost before the first answer: a first
    -- chunk of many slow items would hold one worker while the others idle
    -- (20 items of 0.1 s on 4 workers took 1.6 s in 2 chunks, 0.5 s as calls).
    p = Parallelize(function(x) return x + 1 end, { workers = 4 })
    assert.are.same({ 2, 3, 4, 5 }, p:map({ 1, 2, 3, 4 }))
    assert.are.equal(4, p.calls)
    local out = p:map(range(20))
    assert.are.equal(21, out[20])
    assert.is_true(p.calls - 4 >= 8, "calls: " .. p.calls - 4)
  end)

  -- A chunk's items travel as one value, and its results too, but each is
  -- encoded apart (PZ_ENCODE_APART, codec.h): what two items share arrives
  -- as two copies, as in two calls.
  it("gives each item its own copy of the tables it shares with other items, as p(item) would", function()
    p = Parallelize(function(x)
      x.shared.count = x.shared.count + 1
      return x.shared.count
    end, { workers = 1 })
    local shared = { count = 0 }
    local list = {}
    for i = 1, 50 do list[i] = { shared = shared } end
    local out = p:map(list)
    for i = 1, 50 do assert.are.equal(1, out[i], "item " .. i) end
    assert.are.equal(0, shared.count)
  end)

  it("gives each item's result its own tables, as p(item)'s result would", function()
    p = Parallelize(parallelize.Deferred(function()
      local cache = { hits = 0 }
      return function(x)
        cache.hits = cache.hits + 1
        return cache, x
      end
    end), { workers = 1 })
    local out = p:map(range(10))
    out[1].mine = true
    for i = 2, 10 do assert.is_nil(out[i].mine, "result " .. i .. " is result 1") end
    -- Within one item, sharing and cycles travel as they are.
    local q = Parallelize(function(x)
      local t = { x = x }
      t.self = t
      return { a = t, b = t }
    end, { workers = 1 })
    local got = q:map(range(40))
    q:stop()
    for i = 1, 40 do
      assert.are.equal(got[i].a, got[i].b)
      assert.are.equal(got[i].a, got[i].a.self)
      assert.are.equal(i, got[i].a.x)
      if i > 1 then assert.are_not.equal(got[i - 1].a, got[i].a) end
    end
  end)

  it("gives functions that share an upvalue in two items their own copies of it", function()
    p = Parallelize(function(f) return f() end, { workers = 1 })
    local n = 0
    local function bump() n = n + 1 return n end
    local list = {}
    for i = 1, 30 do list[i] = bump end
    local out = p:map(list)
    for i = 1, 30 do assert.are.equal(1, out[i], "item " .. i) end
    assert.are.equal(0, n)
  end)
  -- Worker deaths in the middle of chunks: spec/chaos_spec.lua drives p:map
  -- while a worker is SIGKILLed every few milliseconds.

  it("leaves every failing map's calls whole and no entry behind, wherever an interrupt lands", function()
    -- A count hook raises "interrupted!" (as Ctrl-C's would) at the n-th
    -- instruction of a map of 60 items with failing and nil items (a map
    -- that ends first is not interrupted, and is checked the same): after
    -- each wait, every
    -- chunk record is whole (first, args {n = 2, items, count}), no array
    -- has a nil hole, and env.chunks and env.chunk_tags are empty (an
    -- interrupt between pool_submit_chunk's queuing and its note, or after
    -- the map tracked the chunk and before it cleared the note, left an
    -- entry by tag: 48 of about 1,550 points did).
    local core = require "parallelize.core"
    local this = debug.getinfo(1, "S").source
    -- (locals: a global read goes through busted's environment, whose
    -- __index is Lua code the hook would fire in, outside the pcall)
    local sethook, getinfo, raise = debug.sethook, debug.getinfo, error
    -- (interpreted: a count hook fires in no compiled code, and what the
    -- JIT has compiled by now depends on the specs run before)
    jit.off()
    finally(function() jit.on() end)
    p = Parallelize(function(x)
      if x % 10 == 7 then require("parallelize").sleep(0.003) end
      if x % 25 == 13 then error("bad " .. x) end
      if x % 4 == 0 then return nil end
      return x
    end, { workers = 2, quiet = true })
    local env = core.pool_env(p)
    -- Every n up to 400 (the map's first chunks are queued there, in the
    -- same instructions each run), then every fourth up to 1,600.
    local points = {}
    for n = 1, 400 do points[#points + 1] = n end
    for n = 404, 1600, 4 do points[#points + 1] = n end
    local interrupts, base = 0, 0
    for _, n in ipairs(points) do
      local list = {}
      for i = 1, 60 do list[i] = base + i end
      base = base + 100
      local k, fired = 0, nil
      local e0, r0 = #p.errors, #p.results
      pcall(function()
        sethook(function()
          -- (once: a deferred section that began before it fired puts the
          -- hook back when it ends, ldefer.h)
          if fired then return end
          local info = getinfo(2, "Sl")
          if info.source == this then return end
          k = k + 1
          if k < n then return end
          sethook()
          fired = info.short_src .. ":" .. info.currentline
          raise("interrupted!")
        end, "", 1)
        p:map(list)
      end)
      sethook()
      assert.is_true(p:wait(30))
      if fired then interrupts = interrupts + 1 end
      local errors, results = p.errors, p.results
      for j = e0 + 1, #errors do
        local e = errors[j]
        if e.message:find("^map:") then
          assert.is_number(e.first, fired)
          assert.are.equal(2, e.args.n, fired)
        end
      end
      for j = r0 + 1, #results do
        local r = results[j]
        if type(r) == "table" then
          for q = 1, table.maxn(r) do assert.are_not.equal(nil, r[q], fired) end
        end
      end
      assert.are.same({}, env.chunks, fired)
      assert.are.same({}, env.chunk_tags, fired)
    end
    -- (how many instructions a map runs depends on how its waits fall)
    assert.is_true(interrupts > 100, interrupts .. " interrupts")
    local aborted = p:stop()
    assert.are.equal(p.calls, #p.results + #p.errors + #aborted)
  end)
end)

describe("parallelize.map", function()
  it("chunks too, and leaves no process behind", function()
    local out = parallelize.map(function(x) return -x end, range(30000), { workers = 2 })
    assert.are.equal(30000, #out)
    assert.are.equal(-30000, out[30000])
    assert.are.same({}, support.children())
  end)
end)
