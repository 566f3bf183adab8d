-- Runs (src/run.h): the I/O thread sends a local worker many small calls in
-- a row as one frame, the worker makes them in one compiled loop and
-- answers those that returned together. Each call must still behave as
-- a call of its own: its result, every value of it, its error, its death,
-- its cancel.
local parallelize = require "parallelize"
local core = require "parallelize.core"
local support = require "spec.support"

local Parallelize, Deferred = parallelize.Parallelize, parallelize.Deferred

-- The executor of most tests: what it does depends on x % 100, and it
-- counts the calls made from a run's loop: their caller (a C function) is
-- not the one that made the worker's first call, which came alone (a
-- worker gets runs once it has answered).
local run_calls, lone_caller = 0, nil -- each worker has its own copies
local function mixed(x)
  local caller = debug.getinfo(2, "f").func
  lone_caller = lone_caller or caller
  if caller ~= lone_caller then run_calls = run_calls + 1 end
  if x == "count" then return run_calls end
  local k = x % 100
  if k == 7 then error({ code = x }) end
  if k == 13 then error("bad " .. x) end
  if k == 21 then return x, "two", nil end
  if k == 33 then return end
  if k == 45 then return nil end
  if k == 57 then return string.rep("y", 600 + x % 50) end
  if k == 66 then return coroutine.create(print) end
  return x * 2
end

--- Queues 1..n, a number at a time, after a warm-up of 2000 calls of
-- warm(k) (default 100 * k: x % 100 == 0, plain calls for `mixed`) that
-- gives the workers the average call time that runs need. Returns the
-- ids, once they have all finished.
local function queue(p, n, warm)
  for k = 1, 2000 do p(warm and warm(k) or 100 * k) end
  assert.is_true(p:wait(60), "the warm-up did not finish")
  local ids = {}
  for i = 1, n do ids[i] = p(i) end
  assert.is_true(p:wait(60), "the calls did not finish")
  return ids
end

local function above_the_list(k) return 100000 + k end

--- Asserts that a run's loop made more than half of n calls (the warm-up's
-- first ones and a few others are made alone), as the executor counted
-- them (as `mixed` does; its size matters: one test sends it under a
-- max_message of 1 KiB).
local function assert_most_in_runs(p, n)
  local count = p("count")
  assert.is_true(p:wait(10))
  local _, in_runs = p:result(count)
  assert.is_true(in_runs > n / 2, "calls made in runs: " .. in_runs)
end

--- Whether numbers a and b are the same, NaN and the sign of 0 included.
local function exactly(a, b)
  if a ~= a then return b ~= b end
  if a == 0 and b == 0 then return 1 / a == 1 / b end
  return a == b
end

describe("runs of small calls", function()
  it("answer each call as its own: results, every value, errors, nothing lost", function()
    local p = Parallelize(mixed, { workers = 1 })
    finally(function() p:stop() end)
    local n = 30000
    local ids = queue(p, n)
    for i = 1, n do
      local k = i % 100
      local res = { p:result(ids[i]) }
      if k == 7 then
        assert.is_false(res[1], "call " .. i)
        assert.are.equal(i, res[2].value.code)
        assert.are.equal("raised", res[2].kind)
        assert.are.same({ n = 1, i }, res[2].args)
      elseif k == 13 then
        assert.is_false(res[1], "call " .. i)
        assert.matches("bad " .. i .. "$", res[2].message)
        assert.matches("traceback", res[2].traceback)
      elseif k == 66 then
        assert.is_false(res[1], "call " .. i)
        assert.matches("call " .. ids[i] .. ": .*thread", res[2].message)
      else
        assert.is_true(res[1], "call " .. i)
        if k == 21 then
          assert.are.same({ true, i, "two", nil, n = 4 }, { n = select("#", p:result(ids[i])), p:result(ids[i]) })
        elseif k == 33 then
          assert.are.equal(1, #res)
        elseif k == 45 then
          assert.are.equal(1, select("#", p:result(ids[i])) - 1)
          assert.is_nil(res[2])
        elseif k == 57 then
          assert.are.equal(string.rep("y", 600 + i % 50), res[2])
        else
          assert.are.equal(2 * i, res[2])
        end
      end
    end
    assert_most_in_runs(p, n)
    assert.are.equal(3 * n / 100, #p.errors)
    assert.are.equal(0, p:stats().deaths)
  end)

  it("carry arguments and results of every short length byte for byte", function()
    -- A run's arguments and a worker's answers are copied a few bytes at
    -- a time (src/shortcopy.h): strings of 0 to 40 bytes, every byte value
    -- among them, and numbers of every encoded length.
    local p = Parallelize(function(x)
      local caller = debug.getinfo(2, "f").func
      lone_caller = lone_caller or caller
      if caller ~= lone_caller then run_calls = run_calls + 1 end
      if x == "count" then return run_calls end
      if type(x) == "string" then return x:reverse() end
      return -x
    end, { workers = 1 })
    finally(function() p:stop() end)
    local numbers = { 0, 127, 128, 2 ^ 14, 2 ^ 21, 2 ^ 28, 2 ^ 35, 2 ^ 42, 2 ^ 49, 2 ^ 56, 2 ^ 63, 0.5, -3 }
    local function input(i)
      if i % 3 == 0 then return numbers[i % #numbers + 1] end
      local len, bytes = i % 41, {}
      for b = 1, len do bytes[b] = string.char((i * 7 + b * 31) % 256) end
      return table.concat(bytes)
    end
    for k = 1, 2000 do p(string.rep("w", k % 20)) end -- the warm-up: runs come after it
    assert.is_true(p:wait(60))
    local n, ids = 20000, {}
    for i = 1, n do ids[i] = p(input(i)) end
    assert.is_true(p:wait(60))
    for i = 1, n do
      local ok, v = p:result(ids[i])
      assert.is_true(ok, "call " .. i)
      local x = input(i)
      if type(x) == "string" then
        assert.are.equal(x:reverse(), v, "call " .. i)
      else
        assert.are.equal(-x, v, "call " .. i)
      end
    end
    assert_most_in_runs(p, n)
  end)

  it("keep the order of results, errors and results too big for a run", function()
    local p = Parallelize(mixed, { workers = 1, max_message = 1024 })
    finally(function() p:stop() end)
    local ids = queue(p, 5000)
    local results, rids, errors = p:take()
    local seen = {}
    for k = 1, #rids do seen[rids[k]] = results[k] end
    for _, e in ipairs(errors) do seen[e.id] = e end
    for i = 1, 5000 do
      assert.is_not_nil(seen[ids[i]], "call " .. i .. " has neither a result nor an error")
    end
    -- a result of 600-650 bytes is within max_message: it travels
    assert.are.equal(string.rep("y", 607), seen[ids[57]])
    assert.are.equal(0, p:stats().deaths)
  end)

  it("charge a death to the call that was running, and run the others again", function()
    local dir = support.tmpdir()
    local defer = support.defer(finally) -- stops the pool, then removes dir
    defer(function() support.rmdir(dir) end)
    local mark = dir .. "/killed"
    local p = Parallelize(function(x)
      if x == 3333 then
        local f = io.open(mark, "r")
        if not f then
          f = assert(io.open(mark, "w"))
          f:close()
          os.exit(9) -- the first time only: it runs again on the next worker
        end
        f:close()
      end
      if x == 4444 then os.exit(9) end -- every time: it is the killer
      return x + 1
    end, { workers = 2, max_deaths = 2 })
    defer(function() p:stop() end)
    local ids = queue(p, 10000, above_the_list)
    for i = 1, 10000 do
      local ok, v = p:result(ids[i])
      if i == 4444 then
        assert.is_false(ok)
        assert.are.equal("killer", v.kind)
      else
        assert.is_true(ok, "call " .. i .. ": " .. tostring(v))
        assert.are.equal(i + 1, v)
      end
    end
    assert.are.equal(3, p:stats().deaths)
  end)

  it("cancel a call wherever it is: never both a result and a cancel", function()
    local p = Parallelize(function(x) return x end, { workers = 2 })
    finally(function() p:stop() end)
    for i = 1, 2000 do p(i) end
    assert.is_true(p:wait(60))
    local ids = {}
    for i = 1, 20000 do ids[i] = p(i) end
    local cancelled = {}
    for i = 100, 20000, 97 do
      if p:cancel(ids[i]) then cancelled[ids[i]] = true end
    end
    assert.is_true(p:wait(60))
    local results, rids, errors = p:take()
    local outcome = {}
    for k = 1, #rids do
      assert.is_nil(outcome[rids[k]])
      outcome[rids[k]] = results[k]
    end
    for _, e in ipairs(errors) do
      assert.is_nil(outcome[e.id], "call " .. e.id .. " has a result and an error")
      assert.are.equal("cancelled", e.kind)
      assert.is_true(cancelled[e.id])
      outcome[e.id] = e
    end
    for i = 1, 20000 do assert.is_not_nil(outcome[ids[i]], "call " .. i .. " lost") end
  end)

  it("send a result while a later call of the same run runs long", function()
    local p = Parallelize(function(x)
      local caller = debug.getinfo(2, "f").func
      lone_caller = lone_caller or caller
      if x > 0 then parallelize.sleep(x) end
      return caller ~= lone_caller
    end, { workers = 1 })
    finally(function() p:stop() end)
    -- Calls queued while the worker is busy go as runs, mostly: a round
    -- where none did is tried again.  Each round starts with tiny calls:
    -- the long ones raise the worker's average call time, and calls
    -- longer than 25 us on average get no runs.
    for _ = 1, 10 do
      for _ = 1, 300 do p(0) end
      assert.is_true(p:wait(60), "the tiny calls did not finish")
      p:take()
      p(0.1)
      local t0 = core.now()
      for _ = 1, 50 do p(0) end
      p(1.5)
      -- the 51 results come while the long call runs (the worker's
      -- flusher writes them), not after it
      assert.is_true(support.eventually(function() return #p.results == 51 end, 1),
        "the results of the calls before the long one did not come while it ran")
      local waited = core.now() - t0
      assert.is_true(waited < 1, "the results came after " .. waited .. " s")
      assert.are.equal(1, p.pending)
      local in_run = 0
      for _, r in ipairs(p.results) do
        if r then in_run = in_run + 1 end
      end
      assert.is_true(p:wait(10), "the long call did not finish")
      if in_run > 0 then return end
    end
    error("in 10 rounds, no call of the test went in a run")
  end)

  it("write what a run has finished when the worker gets SIGTERM", function()
    -- Results lost with the worker would count as never run: those calls
    -- would run again on its replacement, their side effects twice.
    local dir = support.tmpdir()
    local defer = support.defer(finally) -- stops the pool, then removes dir
    defer(function() support.rmdir(dir) end)
    local log = dir .. "/ran"
    local p = Parallelize(function(x)
      if x < 0 then
        os.execute("kill -TERM " .. parallelize.getpid())
        parallelize.sleep(5)
        return x
      end
      local f = assert(io.open(log, "a"))
      f:write(x, "\n")
      f:close()
      return x
    end, { workers = 1, max_deaths = 1 })
    defer(function() p:stop() end)
    for i = 1, 300 do p(1000 + i) end
    assert.is_true(p:wait(60), "the warm-up did not finish")
    for i = 1, 50 do p(i) end
    local term = p(-1)
    for i = 51, 60 do p(i) end
    assert.is_true(p:wait(60), "the calls did not finish")
    local counts = {}
    for line in support.read(log):gmatch("[^\n]+") do
      counts[line] = (counts[line] or 0) + 1
    end
    for i = 1, 60 do
      assert.are.equal(1, counts[tostring(i)], "call " .. i .. " ran " .. tostring(counts[tostring(i)]) .. " times")
    end
    assert.are.equal(1, #p.errors)
    assert.are.same({ term, "killer" }, { p.errors[1].id, p.errors[1].kind })
  end)

  it("leave a burst of slow calls after tiny ones spread over the workers", function()
    -- After tiny calls every worker may hold hundreds; calls whose time
    -- nobody knows yet still go one to each worker with room, not in a
    -- streak (or a run) to one of them (which took 3 to 6 of the 8).  Two
    -- on one worker happen: the first call may go to a worker lent to
    -- the main thread (the lone-call shortcut), which the next pick then
    -- passes over.
    local p = Parallelize(function(x)
      if x < 0 then parallelize.sleep(-x) end
      return parallelize.getpid()
    end, { workers = 8 })
    finally(function() p:stop() end)
    -- every worker ready first: a loaded machine (make test) had some
    -- still starting, and the burst went to the others
    assert.are.equal(8, #p.executors)
    queue(p, 4000, above_the_list)
    p:take()
    local ids = {}
    for i = 1, 8 do ids[i] = p(-0.05) end
    assert.is_true(p:wait(60), "the slow calls did not finish")
    local per_worker = {}
    for i = 1, 8 do
      local ok, pid = p:result(ids[i])
      assert.is_true(ok)
      per_worker[pid] = (per_worker[pid] or 0) + 1
      assert.is_true(per_worker[pid] <= 2, per_worker[pid] .. " of the 8 slow calls ran on worker " .. pid)
    end
  end)

  it("take a result the parent cannot decode as that call's error only", function()
    local dir = support.tmpdir()
    local defer = support.defer(finally)
    defer(function() support.rmdir(dir) end)
    support.write(dir .. "/pz_spec_runonly.lua", [[
      if package.loaded.busted then error("not in the parent") end
      return { name = "worker only" }
    ]])
    local saved = package.path
    package.path = dir .. "/?.lua;" .. package.path
    defer(function() package.path = saved end)
    local p = Parallelize(function(x)
      if x == 1234 then return require("pz_spec_runonly") end
      return x
    end, { workers = 1 })
    defer(function() p:stop() end)
    local ids = queue(p, 3000, above_the_list)
    for i = 1, 3000 do
      local ok, v = p:result(ids[i])
      if i == 1234 then
        assert.is_false(ok)
        assert.are.equal("parent", v.kind)
        assert.matches("^the result of call " .. ids[i] .. " cannot be used in the parent: .*not in the parent",
          v.message)
      else
        assert.is_true(ok, "call " .. i)
        assert.are.equal(i, v)
      end
    end
  end)

  -- The main thread takes the one-number results of a run's record with a
  -- compiled helper (src/lrunrec.h), and everything it stops at in C.
  local numbers = { 0, 1, 127, 128, 255, 16383, 16384, 2 ^ 21 - 1, 2 ^ 21, 2 ^ 28 - 1, 2 ^ 28, 2 ^ 35 - 1, 2 ^ 35,
    2 ^ 42 - 1, 2 ^ 42, 2 ^ 49 - 1, 2 ^ 49, 1.7e12, 2 ^ 53, -2 ^ 53, -1, -128, -(2 ^ 28), -(2 ^ 49 - 1), -2 ^ 49,
    0.5, -0.0, 1 / 0, -1 / 0, 0 / 0, 1e308, 5e-324, -2.5e-300 }
  --- The result of call x of the helper's tests: a number of the list
  -- above, mostly, and now and then something else (a string, nothing,
  -- two values), where the helper stops and C goes on.
  local function number_or_not(x)
    if x % 37 == 5 then return "s" .. x end
    if x % 53 == 9 then return end
    if x % 71 == 3 then return x, x end
    return numbers[x % #numbers + 1]
  end
  local function expected(x)
    if x % 37 == 5 then return "s" .. x end
    if x % 53 == 9 then return parallelize.null end
    if x % 71 == 3 then return x end
    return numbers[x % #numbers + 1]
  end

  it("take every kind of number exactly, with the JIT on and off", function()
    local p = Parallelize(number_or_not, { workers = 2 })
    finally(function() p:stop(); jit.on() end)
    for _, jit_on in ipairs({ true, false }) do
      if jit_on then jit.on() else jit.off() end
      local from, want, helper_before = #p.ids, {}, core.pool_helper_items(p)
      -- a warm-up first (queue's), then the calls of runs
      for k = 1, 2000 do want[p(10 * k)] = expected(10 * k) end
      assert.is_true(p:wait(60))
      for i = 1, 20000 do want[p(i)] = expected(i) end
      assert.is_true(p:wait(60))
      local results, ids = p.results, p.ids
      assert.are.equal(from + 22000, #ids)
      assert.are.equal(#ids, #results)
      for k = from + 1, #ids do
        local id = ids[k]
        assert.are.equal(type(want[id]), type(results[k]))
        assert.is_true(exactly(want[id], results[k]), "call " .. id .. ": " .. tostring(results[k]))
        want[id] = nil
      end
      assert.is_nil(next(want))
      for id = 1, #ids do assert.is_true(core.pool_finished(p, id), "call " .. id) end
      -- the helper looks at the JIT every 64th record: it may take a few after jit.off()
      local took = core.pool_helper_items(p) - helper_before
      if jit_on then
        assert.is_true(took > 1000, "the helper took " .. took)
      else
        assert.is_true(took < 64 * 256, "the helper took " .. took)
      end
    end
    local _, first, second = p:result(2000 + 3)
    assert.are.same({ 3, 3 }, { first, second }) -- 3 % 71 == 3: both values are kept
  end)

  it("take integers up to 2^49 themselves (call ids are read the same way)", function()
    -- Integers are varints on the wire (ids too); read up to four bytes, the
    -- helper left every one from 2^28 to C, and every result after call
    -- 2^28 of a pool.
    local p = Parallelize(function(x) return x * 4096 end, { workers = 2 })
    finally(function() p:stop() end)
    for k = 1, 2000 do p(k) end
    assert.is_true(p:wait(60))
    -- The helper looks at the JIT every 64th record: after the test above
    -- turned it off and on, a few batches may pass before it looks again.
    local base, took = 2 ^ 36, 0 -- results from 2^48: seven bytes
    for _ = 1, 10 do
      local from, helper_before = #p.ids, core.pool_helper_items(p)
      for i = 1, 20000 do p(base + i) end
      assert.is_true(p:wait(60))
      local results, ids = p.results, p.ids
      assert.are.equal(from + 20000, #ids)
      for k = from + 1, #ids do
        local x = base + (ids[k] - 1 - 2000) % 20000 + 1
        assert.are.equal(x * 4096, results[k], "call " .. ids[k])
      end
      took = core.pool_helper_items(p) - helper_before
      if took > 1000 then break end
    end
    assert.is_true(took > 1000, "the helper took " .. took)
  end)

  it("take a stream's numbers as the pool's own", function()
    local p = Parallelize(number_or_not, { workers = 2 })
    finally(function() p:stop() end)
    local list = {}
    for i = 1, 30000 do list[i] = i end
    local seen = 0
    for i, ok, v in p:stream(list) do
      assert.is_true(ok)
      local want = expected(i)
      if want == parallelize.null then want = nil end -- a stream gives nil for nothing
      assert.is_true(exactly(want, v), "item " .. i .. ": " .. tostring(v))
      seen = seen + 1
    end
    assert.are.equal(30000, seen)
  end)
end)

-- A worker makes a run's calls whose argument is one number with a Lua
-- loop the JIT compiles (src/wruns.h), and the others in C. The executor
-- can tell which made a call by its caller's chunk, "=parallelize.runs".
describe("the worker's compiled loop", function()
  -- numbers the helper takes, and (odd) what it leaves to C: an argument
  -- (NaN, integers from 2^49) or a result (see echo)
  local plain = { 0, 1, 127, 128, 16384, 2 ^ 21 - 1, 2 ^ 21, 2 ^ 28 - 1, 2 ^ 28, 2 ^ 35 - 1, 2 ^ 42, 2 ^ 49 - 1,
    1.7e12, -1, -128, -(2 ^ 28 - 1), -(2 ^ 28), -(2 ^ 49 - 1), 0.5, -0.0, 1 / 0, -1 / 0, 1e308, 5e-324,
    -2.5e-300 }
  local odd = { 255, 16383, 2 ^ 35, 2 ^ 49, 2 ^ 53, -2 ^ 53, -2 ^ 49, 0 / 0 }
  --- Call i's argument: odd ones now and then, between stretches of plain
  -- ones long enough for the helper to be asked again.
  local function argument(i)
    if i % 25 == 0 then return odd[i / 25 % #odd + 1] end
    return plain[i % #plain + 1]
  end

  --- A Deferred executor returning its argument, but for a string for 255,
  -- nothing for 16383 and two values for 2^35; it counts the calls the
  -- helper made, which the argument "count" returns. With jit_off its
  -- worker turns the JIT off first.
  local function echo(jit_off)
    return Deferred(function(off)
      if off then jit.off() end
      local by_helper = 0
      return function(x)
        if x == "count" then return by_helper end
        if debug.getinfo(2, "S").source == "=parallelize.runs" then by_helper = by_helper + 1 end
        if x == 255 then return "s255" end
        if x == 16383 then return end
        if x == 2 ^ 35 then return x, x end
        return x
      end
    end, jit_off)
  end
  local function expected(x)
    if x == 255 then return "s255" end
    if x == 16383 then return parallelize.null end
    return x
  end

  for _, jit_off in ipairs({ false, true }) do
    it("passes every kind of number exactly, each result to its call, JIT " .. (jit_off and "off" or "on"),
      function()
        local p = Parallelize(echo(jit_off), { workers = 1 })
        finally(function() p:stop() end)
        for k = 1, 2000 do p(k) end -- the warm-up: runs come after it
        assert.is_true(p:wait(60))
        local want, two = {}, nil
        for i = 1, 30000 do
          local x = argument(i)
          local id = p(x)
          want[id] = expected(x)
          if x == 2 ^ 35 then two = id end
        end
        assert.is_true(p:wait(60))
        local results, ids = p.results, p.ids
        for k = 2001, #ids do
          local id = ids[k]
          assert.is_true(exactly(want[id], results[k]), "call " .. id .. ": " .. tostring(results[k]))
          want[id] = nil
        end
        assert.is_nil(next(want))
        local _, first, second = p:result(two)
        assert.are.same({ 2 ^ 35, 2 ^ 35 }, { first, second })
        local count = p("count")
        assert.is_true(p:wait(10))
        local _, by_helper = p:result(count)
        if jit_off then
          assert.are.equal(0, by_helper)
        else
          -- How many depends on the runs' lengths, and so on the machine's load
          -- (7,474 of 30,000 in one CI run, 14,951-19,552 in 12 runs alone).
          assert.is_true(by_helper > 3000, "the helper made " .. by_helper .. " calls")
        end
      end)
  end

  it("makes the calls whose argument is an integer up to 2^49 itself", function()
    local p = Parallelize(Deferred(function()
      local by_helper = 0
      return function(x)
        if x == "count" then return by_helper end
        if debug.getinfo(2, "S").source == "=parallelize.runs" then by_helper = by_helper + 1 end
        return x - 2 ^ 48
      end
    end), { workers = 1 })
    finally(function() p:stop() end)
    for k = 1, 2000 do p(2 ^ 48 + k) end -- the warm-up: runs come after it
    assert.is_true(p:wait(60))
    for i = 1, 30000 do p(2 ^ 48 + 2000 + i) end
    assert.is_true(p:wait(60))
    local results, ids = p.results, p.ids
    assert.are.equal(32000, #ids)
    for k = 1, #ids do assert.are.equal(ids[k], results[k]) end
    local count = p("count")
    assert.is_true(p:wait(10))
    local _, by_helper = p:result(count)
    assert.is_true(by_helper > 3000, "the helper made " .. by_helper .. " calls")
  end)

  it("reports an executor's error, its stack overflow included, as the call's", function()
    local p = Parallelize(function(x)
      if x % 100 == 7 then error("bad " .. x) end
      if x % 100 == 9 then
        local function f() return 1 + f() end
        return f()
      end
      return x * 2
    end, { workers = 2 })
    finally(function() p:stop() end)
    for k = 1, 2000 do p(100 * k) end
    assert.is_true(p:wait(60))
    local ids = {}
    for i = 1, 20000 do ids[i] = p(i) end
    assert.is_true(p:wait(60))
    for i = 1, 20000 do
      local ok, v = p:result(ids[i])
      if i % 100 == 7 then
        assert.is_false(ok, "call " .. i)
        assert.matches("bad " .. i .. "$", v.message)
        assert.same({ n = 1, i }, v.args)
        -- the executor's frame as the C loop's call showed it, and not the
        -- loop's own
        assert.matches("\n\tspec/run_spec%.lua:%d+: in function <spec/run_spec%.lua:%d+>", v.traceback)
        assert.is_nil(v.traceback:find("parallelize.runs", 1, true), v.traceback)
      elseif i % 100 == 9 then
        assert.is_false(ok, "call " .. i)
        assert.matches("stack overflow$", v.message)
      else
        assert.is_true(ok, "call " .. i)
        assert.are.equal(2 * i, v)
      end
    end
    assert.are.equal(0, p:stats().deaths)
  end)

  it("names no place of its own in a message of error(message, 2)", function()
    local p = Parallelize(function(x)
      if x % 100 == 5 then error("bad argument " .. x, 2) end
      return x
    end, { workers = 1 })
    finally(function() p:stop() end)
    local ids = queue(p, 20000)
    for i = 5, 20000, 100 do
      local ok, e = p:result(ids[i])
      assert.is_false(ok)
      assert.are.equal("bad argument " .. i, e.message)
      assert.are.equal("bad argument " .. i, e.value)
    end
    assert.are.equal(200, #p.errors)
  end)

  it("answers every other call rightly when memory runs out for one result", function()
    -- core.worker_fail_answer(k): the helper's k-th one-number result from
    -- now finds no room, as if memory had run out (src/worker.h)
    local p = Parallelize(Deferred(function()
      require("parallelize.core").worker_fail_answer(3000)
      local made = {}
      return function(x)
        if x == "twice" then
          local n = 0
          for _, count in pairs(made) do
            if count > 1 then n = n + 1 end
          end
          return n
        end
        made[x] = (made[x] or 0) + 1
        return x * 2
      end
    end), { workers = 1 })
    finally(function() p:stop() end)
    local ids = queue(p, 20000, above_the_list)
    local failed
    for i = 1, 20000 do
      local ok, v = p:result(ids[i])
      if not ok then
        assert.is_nil(failed, "a second call failed: " .. i .. ": " .. tostring(v.message))
        failed = i
        assert.are.equal("call " .. ids[i] .. ": out of memory", v.message)
      else
        assert.are.equal(2 * i, v, "call " .. i)
      end
    end
    assert.is_not_nil(failed, "no call failed")
    local twice = p("twice")
    assert.is_true(p:wait(10))
    assert.are.same({ true, 0 }, { p:result(twice) })
    assert.are.equal(0, p:stats().deaths)
  end)

  --- Checks that call k of ids (queued with k) returned k + 1.
  local function assert_each_plus_one(p, ids)
    for i = 1, #ids do
      local ok, v = p:result(ids[i])
      assert.is_true(ok, "call " .. i .. ": " .. tostring(type(v) == "table" and v.message or v))
      assert.are.equal(i + 1, v)
    end
  end

  -- The helper takes the FFI when it first makes calls, after the
  -- executor's constructor: what that did to the FFI is what it finds.
  -- The executor keeps a cdata of its own, which must go on working.
  local function with_ffi_changed(change)
    return Deferred(function(how)
      local ffi = require "ffi"
      local own = ffi.new("double[1]")
      if how == "replaced" then
        ffi.cast = function() error("the executor's ffi.cast") end -- luacheck: ignore
        package.loaded.ffi = {}
      elseif how == "cleared" then -- as a module reloader would: loading it again would remake its state
        package.loaded.ffi = nil
      else -- "loaded again": a second load makes the FFI's state anew
        package.loaded.ffi = nil
        ffi = require "ffi"
        own = ffi.new("double[1]")
      end
      local by_helper = 0
      return function(x)
        if x == "count" then return by_helper end
        if debug.getinfo(2, "S").source == "=parallelize.runs" then by_helper = by_helper + 1 end
        own[0] = x
        return own[0] + 1
      end
    end, change)
  end

  for _, change in ipairs({ "replaced", "cleared", "loaded again" }) do
    it("makes every call rightly when the executor's constructor " .. change .. " the FFI", function()
      local p = Parallelize(with_ffi_changed(change), { workers = 1 })
      finally(function() p:stop() end)
      assert_each_plus_one(p, queue(p, 20000, above_the_list))
      local count = p("count")
      assert.is_true(p:wait(10))
      local _, by_helper = p:result(count)
      if change ~= "loaded again" then
        assert.are.equal(0, by_helper) -- C made them all
      else
        assert.is_true(by_helper > 2000, "the helper made " .. by_helper .. " calls") -- (a share that moves with load)
      end
      assert.are.equal(0, p:stats().deaths)
    end)
  end

  it("makes every call rightly when the executor loads the FFI anew between two of them", function()
    -- The FFI's state made anew under the helper's types: it takes the FFI
    -- again (before, the call's result turned into an error and the
    -- worker crashed).
    local p = Parallelize(function(x)
      if x == 5000 or x == 12000 then
        package.loaded.ffi = nil
        require "ffi"
      end
      return x + 1
    end, { workers = 1 })
    finally(function() p:stop() end)
    assert_each_plus_one(p, queue(p, 20000, above_the_list))
    assert.are.equal(0, p:stats().deaths)
  end)

  it("uses the standard functions as they were before the executor's code ran", function()
    local p = Parallelize(Deferred(function()
      select, type, pcall, require = nil, nil, nil, nil -- luacheck: ignore
      return function(x) return x + 1 end
    end), { workers = 1 })
    finally(function() p:stop() end)
    local want = {}
    for i = 1, 20000 do want[p(i)] = i + 1 end
    assert.is_true(p:wait(60))
    local results, ids = p.results, p.ids
    assert.are.equal(20000, #results)
    for k = 1, #ids do assert.are.equal(want[ids[k]], results[k]) end
  end)
end)
