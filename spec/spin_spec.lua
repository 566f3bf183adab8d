-- Polling before sleeping (option `spin`, src/spin.h): a waiting main
-- thread and a worker that ran out of calls poll a while before they
-- sleep, and stop polling when waits are usually longer. These specs check
-- the CPU it costs, not the latency it buys (bench/latency.lua does that).
local parallelize = require "parallelize"
local support = require "spec.support"

local Parallelize = parallelize.Parallelize

describe("spin", function()
  local p
  after_each(function()
    if p then p:stop(0) end
    p = nil
  end)

  it("is an option from 0 to 0.01 seconds", function()
    for _, bad in ipairs({ -1e-6, 0.02, "1", 0 / 0 }) do
      assert.has_error(function() Parallelize({ print }, { spin = bad }) end)
    end
    for _, ok in ipairs({ 0, 50e-6, 0.01 }) do
      p = Parallelize({ function(x) return x + 1 end }, { spin = ok })
      p(1)
      assert.is_true(p:wait(10))
      assert.are.same({ 2 }, p.results)
      p:stop()
      p = nil
    end
  end)

  it("leaves an idle pool asleep", function()
    p = Parallelize(parallelize.rep(function(x) return x end, 2), { spin = 0.01 })
    -- Both workers initialized: one slow to start (under ASan) missed the
    -- calls, and p.pids named it only on the second read.
    local _ = p.executors
    for i = 1, 100 do p(i) end
    assert.is_true(p:wait(10))
    parallelize.sleep(0.05)
    -- (p.pids read once)
    local pids, before = p.pids, {}
    assert.are.equal(2, #pids)
    for i, pid in ipairs(pids) do before[i] = assert(support.cpu_seconds(pid), "no worker " .. pid) end
    local parent = os.clock()
    parallelize.sleep(0.5)
    for i, pid in ipairs(pids) do
      local now = support.cpu_seconds(pid)
      assert.is_truthy(now, ("worker %d (pid %d) ended while idle"):format(i, pid))
      local used = now - before[i]
      assert.is_true(used <= 0.02, ("worker %d used %.2f s of CPU while idle"):format(i, used))
    end
    local used = os.clock() - parent
    assert.is_true(used <= 0.02, ("the parent used %.2f s of CPU while idle"):format(used))
  end)

  it("stops polling when waits are long", function()
    -- 40 calls 20 ms apart. Polling 10 ms before each sleep would cost the
    -- worker, and a waiting parent, 0.4 s of CPU; backing off after a few
    -- long waits keeps it to a few polls.
    p = Parallelize({ function(x)
      parallelize.sleep(0.02)
      return x
    end }, { spin = 0.01 })
    local _ = p.executors
    local pid = p.pids[1]
    local worker, parent = support.cpu_seconds(pid), os.clock()
    for i = 1, 40 do
      p(i)
      assert.is_true(p:wait(10))
      parallelize.sleep(0.02)
    end
    assert.are.equal(40, #p.results)
    worker, parent = support.cpu_seconds(pid) - worker, os.clock() - parent
    assert.is_true(worker < 0.15, ("the worker used %.2f s of CPU"):format(worker))
    assert.is_true(parent < 0.15, ("the parent used %.2f s of CPU"):format(parent))
  end)
end)
