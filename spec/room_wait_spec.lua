-- p(...) waiting for room (max_pending) wakes once the calls it waits for
-- are taken. Its wait's target was read after the room check: when the
-- I/O thread took the pending calls in between, the wait was for one take
-- more than there were calls, and p(...) slept forever beside an idle
-- worker (a one-worker pool hung within a few thousand p(i); a stream
-- whose body queued calls on a pool with max_pending too). Run in a
-- process of its own, under `timeout`, since the failure is a hang.
local support = require "spec.support"

local function run_script(script)
  local path = os.tmpname()
  support.write(path, script)
  local out, status = support.run(("timeout 60 %s %s"):format(support.quote(support.pzlua()), support.quote(path)))
  os.remove(path)
  return out, status
end

describe("p(...) waiting for room", function()
  it("never sleeps through the takes that made room (one worker, max_pending = 2)", function()
    local out, status = run_script([[
local parallelize = require "parallelize"
for _, workers in ipairs({ 1, 2 }) do
  local p = parallelize.Parallelize(function(x) return x end, { workers = workers, max_pending = 2 })
  for k = 1, 30000 do p(k) end
  assert(p:wait(30), "wait timed out")
  assert(#p.results == 30000)
  p:stop()
end
print("done")
]])
    assert.equal(0, status, out)
    assert.matches("done", out)
  end)

  it("in a stream's body, on a pool with max_pending", function()
    local out, status = run_script([[
local parallelize = require "parallelize"
local p = parallelize.Parallelize(function(x) return x end, { workers = 1, max_pending = 2 })
local list = {}
for k = 1, 8200 do list[k] = k end
local n = 0
for i, ok, v in p:stream(list, { ordered = true, max_pending = 16 }) do
  assert(ok and v == i)
  n = n + 1
  p(-i)
end
assert(p:wait(30), "wait timed out")
assert(n == 8200 and #p.results == 8200)
p:stop()
print("done")
]])
    assert.equal(0, status, out)
    assert.matches("done", out)
  end)
end)
