-- Chaos: calls keep flowing while workers are SIGKILLed every few
-- milliseconds (spec/chaos.lua). The long version is `make soak`.
local chaos = require "spec.chaos"

describe("chaos", function()
  it("100,000 calls through 64 workers, a random worker SIGKILLed every few ms #nosan", function()
    local f = chaos.run({ calls = 100000, workers = 64, interval = 0.003, work = 20000, seed = 7, timeout = 50 })
    print(("\nchaos: %d calls, %d workers, %d kills, %d poison, %.1f s"):format(f.calls, f.workers, f.kills,
      f.poison, f.elapsed))
    assert.is_true(f.kills > 100, "only " .. f.kills .. " kills")
  end)

  -- Here a process of its own kills a random worker every 3 ms (one that
  -- has had time to start: spec/chaos_killer.lua says why); init_attempts
  -- is raised all the same, as a worker slow to start may still die
  -- starting five times running on a loaded machine.
  for _, mode in ipairs({ "map", "result", "stream", "ordered" }) do
    it("10,000 calls through p:" .. (mode == "ordered" and "stream(ordered)" or mode)
        .. ", 8 workers, a worker SIGKILLed every few ms", function()
      local f = chaos.run({ calls = 10000, workers = 8, interval = 0.003, work = 20000, seed = 9,
        timeout = 50, mode = mode, max_deaths = 50, init_attempts = 1000 })
      print(("\nchaos through %s: %d calls, %d workers, %d kills, %.1f s"):format(mode, f.calls, f.workers, f.kills,
        f.elapsed))
      assert.is_true(f.kills > 10, "only " .. f.kills .. " kills")
    end)
  end

  it("20,000 calls through 16 workers, a random worker SIGKILLed every few ms", function()
    local f = chaos.run({ calls = 20000, workers = 16, interval = 0.003, work = 50000, seed = 8, timeout = 50 })
    assert.is_true(f.kills > 20, "only " .. f.kills .. " kills")
  end)
end)
