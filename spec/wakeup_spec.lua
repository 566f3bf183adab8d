-- The I/O thread sleeps when it has nothing to do; a call queued then must
-- wake it (src/pool.c, kick; with membarrier, the fence is the I/O
-- thread's alone). The script does nothing with the pool after p(...):
-- only the wake-up can get the call to a worker.
local parallelize = require "parallelize"
local support = require "spec.support"

local Parallelize, sleep = parallelize.Parallelize, parallelize.sleep

describe("a call queued while the I/O thread sleeps", function()
  it("reaches a worker with no other pool operation", function()
    local dir = support.tmpdir()
    local defer = support.defer(finally) -- stops the pool, then removes dir
    defer(function() support.rmdir(dir) end)
    local p = Parallelize(function(what, arg)
      if what == "hold" then
        parallelize.sleep(arg)
      else
        local f = assert(io.open(arg, "w"))
        f:close()
      end
    end, { workers = 2 })
    defer(function() p:stop() end)
    assert.is_true(p:wait(30)) -- both workers started
    for round = 1, 40 do
      -- one worker busy (no lone-call shortcut: a call is in flight), the
      -- I/O thread asleep with room for the other
      p("hold", 0.03)
      sleep(0.005)
      local path = dir .. "/" .. round
      p("touch", path)
      local seen = false
      for _ = 1, 2000 do
        local f = io.open(path, "r")
        if f then
          f:close()
          seen = true
          break
        end
        sleep(0.001)
      end
      assert.is_true(seen, "round " .. round .. ": the call did not run within 2 s")
      assert.is_true(p:wait(10))
    end
  end)
end)
