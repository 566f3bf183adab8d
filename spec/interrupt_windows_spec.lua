-- Ctrl-C at every instruction: where a blocking method moves results
-- around (a map's claim released after its wait, a stream's hand-out,
-- p:take, p:result, p:stop's aborted list), an interrupt landing in the
-- middle must leave every call in exactly one place.
--
-- Ctrl-C's handler raises "interrupted!" from a debug hook at the next
-- instruction; here a count hook raises it after n instructions, for
-- every n up to past the method's end, in this process (no signal: the
-- signal's own path is spec/interrupt_spec.lua's and spec/interrupts.lua's).
-- After each interrupt the pool is waited for, and the calls are counted:
-- handed out + in p.results / p.errors (or p:take()) + aborted = calls,
-- each id once. When the hook fires in this file's own code, between a
-- method's return and the line that records what it returned, what is
-- lost there is this file's: that one hand-out is not counted against
-- parallelize.
local parallelize = require "parallelize"

local THIS = debug.getinfo(1, "S").source
-- Locals: busted runs this file with an environment whose __index is Lua
-- code, where the hook would fire (and be taken for this file's window).
local sethook, getinfo, pcall, error, select, type = debug.sethook, debug.getinfo, pcall, error, select, type
local HUGE = math.huge
local where -- where the last interrupt landed, for the messages

--- Runs f() with a hook raising "interrupted!" at its n-th instruction
-- (counted here: the count the hook is set with starts again whenever
-- parallelize puts the hook back after deferring it, ldefer.h; deferred
-- instructions are not counted, as no interrupt can land on them).
-- Returns whether the hook did not fire (f ran to its end), and, when it
-- fired, whether it was in this file (the caller's own window).
local function interrupted_after(n, f)
  local fired, in_this_file, k = false, false, 0
  local function hook()
    k = k + 1
    if k < n then return end
    sethook()
    fired = true
    local info = getinfo(2, "Sl")
    in_this_file = info.source == THIS
    where = info.short_src .. ":" .. tostring(info.currentline)
    error("interrupted!")
  end
  local ok, err = pcall(function()
    sethook(hook, "", 1)
    f()
    sethook()
  end)
  sethook()
  if not ok and not fired then error(err, 0) end
  return not fired, in_this_file
end

--- Every id in 1..calls is once in the pool's store (ids, errors) or in
-- `consumed` (ids a method handed out); returns how many are in neither.
local function missing(p, consumed_count, extra_ids)
  local seen, twice = {}, nil
  local function once(id)
    if seen[id] then twice = id end
    seen[id] = true
  end
  for _, id in ipairs(p.ids) do once(id) end
  for _, e in ipairs(p.errors) do once(e.id) end
  for _, id in ipairs(extra_ids or {}) do once(id) end
  assert(twice == nil, "call " .. tostring(twice) .. " is in two places")
  local n = 0
  for _ in pairs(seen) do n = n + 1 end
  return p.calls - n - consumed_count
end

--- Runs run(p, note) interrupted after n = 1, 1 + step, ... instructions
-- until it runs to its end, waiting for the pool after each interrupt;
-- run calls note(handed, window) as it goes: how many calls it has handed
-- out (or a function counting them, called after the interrupt), and how
-- many the caller's window may hold. Returns the number of
-- interrupts and what went wrong.
local function sweep(p, step, run)
  local consumed, interrupts, failures = 0, 0, {}
  local n = 1
  while n < 100000 do
    local handed, window = 0, 0
    local ok, in_this_file = interrupted_after(n, function()
      run(p, function(h, w) handed, window = h, w end)
    end)
    assert(p:wait(10), "the second wait timed out")
    if ok then break end
    interrupts = interrupts + 1
    if type(handed) == "function" then handed = handed() end -- (counted outside the interrupt's reach)
    consumed = consumed + handed
    local short = missing(p, consumed)
    if short ~= 0 and not (in_this_file and short <= window) then
      failures[#failures + 1] = ("after %d instructions (%s): %d calls in no place"):format(n, where, short)
    end
    consumed = consumed + short -- counted once
    n = n + step
  end
  return interrupts, failures
end

--- Instructions f() runs (as interrupted_after counts them).
local function instructions(f)
  local n = 0
  sethook(function() n = n + 1 end, "", 1)
  f()
  sethook()
  return n
end

describe("Ctrl-C at every instruction", function()
  local p
  after_each(function()
    sethook()
    if p then p:stop() end
    p = nil
  end)

  local function echo(x) return x end

  local function numbers(n)
    local list = {}
    for k = 1, n do list[k] = k end
    return list
  end

  for _, case in ipairs({
    { what = "p:map, unchunked (a pool with timeout)", opts = { workers = 2, timeout = 60 } },
    { what = "p:map in chunks", opts = { workers = 2 } },
  }) do
    it(case.what .. " releases its claim whatever instruction the interrupt lands on", function()
      p = parallelize.Parallelize(echo, case.opts)
      local list = numbers(40)
      local interrupts, failures = sweep(p, 1, function(pool, note)
        local before = pool.calls
        note(0, HUGE)
        local out = pool:map(list)
        note(function() return out and pool.calls - before end, HUGE)
      end)
      assert.is_true(interrupts > 50, "interrupted only " .. interrupts .. " times")
      assert.same({}, failures)
    end)
  end

  -- An interrupted stream keeps its claim until the pool stops: one pool
  -- per interrupt, at points spread over the whole stream. The long one
  -- crosses the compaction of the claim's lists (past 1024 results) and,
  -- with the loop's own calls between its inputs, has many runs of ids.
  for _, case in ipairs({
    { n = 30, points = 100, workers = 1 },
    { n = 1300, points = 40, workers = 2, own_every = 5, what = "long, the loop queuing calls of its own, " },
  }) do
    for _, ordered in ipairs({ false, true }) do
      it("a stream " .. (case.what or "") .. (ordered and "in order " or "") .. "hands out or keeps each result",
          function()
        local list = numbers(case.n)
        local own_every = case.own_every
        local function run(pool, note)
          local handed = 0
          note(0, 1)
          for i in pool:stream(list, { ordered = ordered }) do
            handed = handed + 1
            note(handed, 1)
            if own_every and i % own_every == 0 then pool(-i) end
          end
        end
        p = parallelize.Parallelize(echo, { workers = case.workers })
        local _ = p.executors
        local total = instructions(function() run(p, function() end) end)
        p:stop()
        local failures, interrupts = {}, 0
        for k = 1, case.points do
          local n = math.floor(k * total / (case.points + 1)) + k % 7
          p = parallelize.Parallelize(echo, { workers = case.workers })
          _ = p.executors
          local handed, window = 0, 0
          local ok, in_this_file = interrupted_after(n, function()
            run(p, function(h, w) handed, window = h, w end)
          end)
          if not ok then interrupts = interrupts + 1 end
          assert(p:wait(10), "the second wait timed out")
          local aborted = p:stop()
          assert.equal(0, #aborted)
          local short = missing(p, handed)
          if short ~= 0 and not (not ok and in_this_file and short <= window) then
            failures[#failures + 1] = ("after %d instructions (%s): %d calls in no place"):format(n, where, short)
          end
          p = nil
        end
        assert.is_true(interrupts > case.points * 0.8, "interrupted only " .. interrupts .. " times")
        assert.same({}, failures)
      end)
    end
  end

  -- Stepped again after the interrupt (its iterator kept), a stream goes
  -- on when the interrupt landed in a wait or a hand-out, and raises that
  -- it cannot when it landed while the stream queued inputs (its positions
  -- then were not its calls': results at the wrong positions, an input
  -- queued twice). Either way each call is in one place.
  for _, case in ipairs({ { ordered = false, source = "array" }, { ordered = true, source = "function" } }) do
    it(("a %sstream from %s stepped again after an interrupt goes on, or says it cannot, and loses nothing")
        :format(case.ordered and "ordered " or "", case.source), function()
      local N, resumed, ended = 120, 0, 0
      for n = 1, 1200, 6 do
        p = parallelize.Parallelize(echo, { workers = 2 })
        local list = numbers(N)
        local src = list
        if case.source == "function" then
          local j = 0
          src = function() j = j + 1 return list[j] end
        end
        local step, state, control = p:stream(src, { ordered = case.ordered, max_pending = 16 })
        -- (take calls no code of other files: an interrupt landing there
        -- would be taken for the stream's)
        local seen, handed, dup, at_end, wrong = {}, 0, 0, false, nil
        local function take(turns)
          for _ = 1, turns do
            local i, _, v = step(state, control)
            if i == nil then at_end = true return end
            control = i
            if i ~= v then wrong = i end
            if seen[v] then dup = dup + 1 end
            seen[v], handed = true, handed + 1
          end
        end
        take(4) -- past the first refill
        -- lost: the interrupt landed in this file, where a result the step
        -- returned may be lost before it is counted (the caller's window)
        local done, lost = interrupted_after(n, function() take(HUGE) end)
        local ok, err = pcall(take, HUGE)
        if not ok then
          assert.matches(":%d+: stream: an error or interrupt left it while it queued inputs, and it cannot go on", err)
        end
        local aborted = p:stop()
        assert.is_nil(wrong, "the result handed out for an input is another's")
        assert.equal(0, dup, "results handed out twice")
        for _, v in ipairs(p.results) do
          assert.is_nil(seen[v], "input " .. v .. " both handed out and in p.results")
          seen[v] = true
        end
        local placed = handed + #p.results + #aborted
        if not (lost and placed == p.calls - 1) then assert.equal(p.calls, placed, "calls in no place") end
        assert.equal(0, #p.errors)
        if ok then
          assert.is_true(at_end)
          assert.equal(N, p.calls, "inputs left out of a stream that went on")
          if not lost then assert.equal(N, handed, "results not handed out by a stream that went on") end
        end
        if not done then
          if ok then resumed = resumed + 1 else ended = ended + 1 end
        end
        p = nil
      end
      assert.is_true(resumed > 20 and ended > 0, ("went on after %d interrupts, ended after %d"):format(resumed, ended))
    end)
  end

  it("p:take hands over or keeps what the store holds", function()
    p = parallelize.Parallelize(echo, { workers = 2 })
    local taken, interrupts, failures = {}, 0, {}
    for n = 1, 60 do
      for k = 1, 5 do p(k) end
      p:wait()
      local got
      local ok, in_this_file = interrupted_after(n, function() got = { p:take() } end)
      if not ok then interrupts = interrupts + 1 end
      for _, id in ipairs(got and got[2] or {}) do taken[#taken + 1] = id end
      local short = missing(p, 0, taken)
      if short ~= 0 and not (not ok and in_this_file) then
        failures[#failures + 1] = ("after %d instructions (%s): %d calls in no place"):format(n, where, short)
      end
      if short ~= 0 then -- lost here, or reported: not again
        p:stop()
        p = parallelize.Parallelize(echo, { workers = 2 })
        taken = {}
      end
    end
    assert.is_true(interrupts > 10)
    assert.same({}, failures)
  end)

  it("p:result without keep_results hands over or keeps the outcome", function()
    p = parallelize.Parallelize(echo, { workers = 2, keep_results = false })
    local interrupts, failures = 0, {}
    for n = 1, 300 do
      local id = p(n)
      local got
      local ok, in_this_file = interrupted_after(n, function() got = select(2, p:result(id)) end)
      assert(p:wait(10), "the second wait timed out")
      local results, ids = p:take()
      if not ok then interrupts = interrupts + 1 end
      local kept = #ids == 1 and ids[1] == id and results[1] == n
      if (got == n) == kept and not (not ok and in_this_file and not kept) then
        failures[#failures + 1] = ("after %d instructions: call %d %s"):format(n, id,
          kept and "handed out and kept" or "in no place")
      end
    end
    assert.is_true(interrupts > 50)
    assert.same({}, failures)
  end)

  it("p:stop returns its aborted list, or the next p:stop does", function()
    local interrupts, failures = 0, {}
    for n = 1, 80 do
      p = parallelize.Parallelize(function(s) parallelize.sleep(s) return s end, { workers = 1 })
      for _ = 1, 3 do p(0.01) end
      local aborted
      local ok, in_this_file = interrupted_after(n, function() aborted = p:stop() end)
      if not ok then interrupts = interrupts + 1 end
      local ids = {}
      for _, a in ipairs(aborted or {}) do ids[#ids + 1] = a.id end
      for _, a in ipairs(p:stop()) do ids[#ids + 1] = a.id end
      local short = missing(p, 0, ids)
      if short ~= 0 and not (not ok and in_this_file) then
        failures[#failures + 1] = ("after %d instructions (%s): %d calls in no place"):format(n, where, short)
      end
      p = nil
      if ok then break end
    end
    assert.is_true(interrupts > 10)
    assert.same({}, failures)
  end)
end)
