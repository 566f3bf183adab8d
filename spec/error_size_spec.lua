-- An executor's error whose message, traceback or value is above
-- max_message: the worker must send an ERROR frame the parent accepts, as
-- it does for a result that is too large. A frame above max_message is
-- taken for a malformed one: the worker is killed, its call runs again,
-- raises again, and the pool never ends it.
local parallelize = require "parallelize"

describe("an error above max_message", function()
  local p
  after_each(function()
    if p then p:stop(0) end
    p = nil
  end)

  it("becomes the call's error, cut to fit, and the worker goes on", function()
    p = parallelize.Parallelize(function(n)
      if n == 0 then return parallelize.getpid() end
      error(string.rep("e", n))
    end, { workers = 1, max_message = 1024 })
    local pid = p:result(p(0)) and select(2, p:result(p(0)))
    local ok, err = p:result(p(5000), 10)
    assert.is_false(ok, "no answer: " .. tostring(err))
    assert.matches("^spec/error_size_spec%.lua:%d+: eeee", err.message)
    assert.is_true(#err.message <= 1024)
    -- The same worker answers the next call: it was not killed for it.
    assert.are.same({ true, pid }, { p:result(p(0), 10) })
  end)

  it("from a Deferred constructor, is the slot's init error, cut to fit", function()
    p = parallelize.Parallelize(parallelize.Deferred(function()
      error(string.rep("z", 5000))
    end), { workers = 1, max_message = 1024 })
    local _ = p.executors
    local e = p.init_errors[1]
    assert.is_truthy(e, "no init error")
    -- Not "died during initialization 5 times ... a malformed frame".
    assert.matches("^spec/error_size_spec%.lua:%d+: zzzz", e.message)
    assert.is_true(#e.message <= 1024)
  end)

  it("in a map's chunk, names its item", function()
    local list = {}
    for i = 1, 60 do list[i] = i end
    -- Bounded: the map runs in a call of another pool's worker, whose
    -- result this process waits for with a timeout.
    local outer = parallelize.Parallelize(function(items)
      local inner = require("parallelize").Parallelize(function(x)
        if x == 30 then error(string.rep("v", 3000)) end
        return x
      end, { workers = 1, max_message = 1024 })
      local ok, err = pcall(inner.map, inner, items)
      inner:stop(0)
      return ok, tostring(err):sub(1, 40)
    end, { workers = 1 })
    local done, ok, msg = outer:result(outer(list), 10)
    outer:stop(0)
    assert.is_true(done, "no answer from the map: " .. tostring(ok))
    assert.is_false(ok)
    assert.matches("^map: item 30 failed: ", msg)
  end)
end)
