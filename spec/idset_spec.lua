-- The set of finished call ids (src/idset.h), through core.idset_trial:
-- calls finishing one by one and in run records, in order and ahead of
-- the calls before them, against a plain Lua set.
local core = require "parallelize.core"

--- ops (pairs: id, 0 for one call; first, k for a run record) applied to
-- a Lua set: its lowest id not finished, and whether each of 1 .. upto is.
local function model(ops, upto)
  local done = {}
  for i = 1, #ops, 2 do
    local a, k = ops[i], ops[i + 1]
    for id = a, a + math.max(k, 1) - 1 do done[id] = true end
  end
  local low = 1
  while done[low] do low = low + 1 end
  local has = {}
  for id = 1, upto do has[id] = done[id] == true end
  return low, has
end

--- Checks core.idset_trial against the model for ops, and for each of
-- the prefixes of ops given (counts of pairs).
local function check(ops, upto, cuts)
  local function one(prefix)
    local low, has = core.idset_trial(prefix, upto)
    local want_low, want_has = model(prefix, upto)
    assert.are.equal(want_low, low)
    for id = 1, upto do
      if has[id] ~= want_has[id] then
        error(string.format("id %d: finished %s, want %s (after %d pairs)", id, tostring(has[id]),
          tostring(want_has[id]), #prefix / 2), 2)
      end
    end
  end
  one(ops)
  for _, pairs_ in ipairs(cuts or {}) do
    one({ unpack(ops, 1, 2 * pairs_) })
  end
end

--- ids 1 .. n cut into runs of 1 .. max_run (a run of 1 is sometimes a
-- lone call), the runs shuffled within a window of `spread` runs: the
-- order records arrive in from several workers.
local function arrivals(rng, n, max_run, spread, holes)
  local runs, id = {}, 1
  while id <= n do
    local k = math.min(rng(max_run), n - id + 1)
    runs[#runs + 1] = { id, k }
    id = id + k
  end
  for i = 1, #runs do
    local j = math.min(#runs, i + rng(spread) - 1)
    runs[i], runs[j] = runs[j], runs[i]
  end
  local ops = {}
  for _, r in ipairs(runs) do
    if not holes[r[1]] then
      ops[#ops + 1] = r[1]
      ops[#ops + 1] = (r[2] == 1 and rng(2) == 1) and 0 or r[2]
    end
  end
  return ops
end

describe("the set of finished calls", function()
  it("takes calls one by one, in order and ahead of the ones before", function()
    check({ 1, 0, 2, 0, 3, 0 }, 10)
    check({ 3, 0, 2, 0, 1, 0 }, 10, { 1, 2 })
    check({ 70, 0, 200, 0, 5, 0, 1, 0, 2, 0, 3, 0, 4, 0 }, 300, { 3, 5, 6 })
    check({ 64, 0, 63, 0, 128, 0 }, 200)
  end)

  it("takes run records whole, across words and the ring's edges", function()
    check({ 1, 64 }, 130)
    check({ 2, 63, 1, 1 }, 130, { 1 })
    check({ 65, 64, 1, 64 }, 200, { 1 })
    check({ 10, 500, 1, 9 }, 600, { 1 })
    check({ 100, 1, 1, 99, 101, 30 }, 200, { 1, 2 })
    check({ 5000, 100, 1, 4999 }, 5200, { 1 }) -- the ring grows to cover the first run
    check({ 3, 200, 1, 1 }, 300, { 1 }) -- 2 is still out
    check({ 1, 10, 5, 20, 3, 4 }, 40, { 1, 2 }) -- overlaps and ids already below low
    check({ 40, 0, 1, 10, 11, 40 }, 60, { 1, 2 })
    check({ 1, 10, 5, 20 }, 1100) -- ids below low set in the ring would stand for ids 1,024 above
    -- a run from low over ids recorded before: their bits go, or they would
    -- stand for the ids 1,024 and 2,048 above
    check({ 5, 0, 1, 10 }, 1100)
    check({ 5, 3, 1, 10 }, 1100)
    check({ 5, 0, 1, 2000 }, 2100)
    check({ 70, 5, 3, 0, 1, 1, 2, 200 }, 2200, { 2, 3 })
  end)

  it("agrees with a plain set on shuffled arrivals", function()
    local seed = os.time()
    math.randomseed(seed)
    local rng = math.random
    for trial = 1, 60 do
      local n = rng(3000)
      local holes = {}
      if trial % 3 == 0 then holes[rng(n)] = true end -- a call that never finishes
      local ops = arrivals(rng, n, ({ 1, 8, 70, 300 })[trial % 4 + 1], rng(12), holes)
      local ok, err = pcall(check, ops, n + 5, { rng(#ops / 2), rng(#ops / 2) })
      assert(ok, string.format("seed %d, trial %d: %s", seed, trial, tostring(err)))
    end
  end)

  it("says what is wrong with its arguments", function()
    local wrong = "idset_trial: value %d: ids are integers from 1 below 2^53, counts integers from 0 to 2^24"
    for _, case in ipairs({ { { 0, 0 }, 1 }, { { 1, -1 }, 2 }, { { 1, 0.5 }, 2 }, { { 1.5, 0 }, 1 }, { { "3", 0 }, 1 },
      { { 1, 0, 2, 2 ^ 24 + 1 }, 4 }, { { 2 ^ 53, 0 }, 1 } }) do
      local ok, err = pcall(core.idset_trial, case[1], 1)
      assert.is_false(ok)
      assert.are.equal(wrong:format(case[2]), err)
    end
    assert.has_error(function() core.idset_trial({ 1, 0, 2 }, 1) end,
      "idset_trial: the operations are pairs, and 3 values were given")
    assert.is_false((pcall(core.idset_trial, {}, 2 ^ 32 + 3)))
    assert.is_false((pcall(core.idset_trial, {}, 1.5)))
  end)
end)
