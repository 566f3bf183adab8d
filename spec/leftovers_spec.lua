-- What workers leave behind: programs an executor started and left
-- running, workers still initializing when stop comes, and the signal
-- dispositions programs started by an executor inherit.
local parallelize = require "parallelize"
local core = require "parallelize.core"
local support = require "spec.support"

local Parallelize, Deferred = parallelize.Parallelize, parallelize.Deferred

--- An executor that starts `sleep 100` in the background and an io.popen it
-- never closes, and returns their pids.
local function leave_running()
  local f = io.popen("sleep 100 & echo $!")
  local bg = tonumber(f:read("*l"))
  f:close()
  local unclosed = io.popen("echo $$; exec sleep 100")
  local popen_pid = tonumber(unclosed:read("*l"))
  _G.KEEP_OPEN = unclosed
  return { bg, popen_pid }
end

describe("processes a worker leaves running", function()
  it("are killed when the worker ends (stop)", function()
    local p = Parallelize({ leave_running })
    p()
    assert.is_true(p:wait(10))
    local pids = p.results[1]
    for _, pid in ipairs(pids) do assert.is_true(support.alive(pid), "not started: " .. pid) end
    assert.are.same({}, p:stop())
    for _, pid in ipairs(pids) do
      assert.is_truthy(support.eventually(function() return not support.alive(pid) end, 3),
        "process " .. pid .. " outlived stop")
    end
  end)

  it("are killed when the worker dies", function()
    local p = Parallelize({ function(x)
      if x == "die" then os.exit(3) end
      return leave_running()
    end })
    finally(function() p:stop() end)
    p("start")
    assert.is_true(p:wait(10))
    local pids = p.results[1]
    p("die") -- the executor's death is a call that kills its worker: retried, then an error
    assert.is_true(p:wait(20))
    for _, pid in ipairs(pids) do
      assert.is_truthy(support.eventually(function() return not support.alive(pid) end, 3),
        "process " .. pid .. " outlived its worker")
    end
  end)

  it("are killed when a worker behind a launcher is ended for a timeout", function()
    -- The launcher is `pzlua --worker` itself: its supervisor is what
    -- kills the worker's leftovers, so it must not be the one SIGKILLed.
    local p = Parallelize({ function(x)
      if x == "start" then return leave_running() end
      require("parallelize").sleep(100)
    end }, { timeout = 0.5, launcher = function() return { support.pzlua(), "--worker" } end })
    local pids = {}
    finally(function()
      p:stop(0)
      for _, pid in ipairs(pids) do
        if support.alive(pid) then support.kill(pid, 9) end
      end
    end)
    p("start")
    assert.is_true(p:wait(10))
    pids = p.results[1]
    for _, pid in ipairs(pids) do assert.is_true(support.alive(pid), "not started: " .. pid) end
    p("sleep")
    assert.is_true(p:wait(10))
    assert.is_true(p.errors[1].timeout)
    for _, pid in ipairs(pids) do
      assert.is_truthy(support.eventually(function() return not support.alive(pid) end, 3),
        "process " .. pid .. " outlived its worker")
    end
  end)

  it("are killed when the parent is SIGKILLed", function()
    local dir = support.tmpdir()
    local script = dir .. "/parent.lua"
    support.write(script, [[
local pz = require "parallelize"
local p = pz.Parallelize({ function()
  local f = io.popen("sleep 100 & echo $!")
  local pid = f:read("*l")
  f:close()
  return pid
end })
p()
p:wait()
io.stdout:write(p.results[1], "\n")
io.stdout:flush()
pz.sleep(100)
]])
    local proc = io.popen(support.quote(support.pzlua()) .. " " .. support.quote(script) .. " & echo $!; wait")
    local parent = tonumber(proc:read("*l"))
    finally(function()
      support.kill(parent, 9)
      proc:close()
      support.rmdir(dir)
    end)
    local left = tonumber(proc:read("*l"))
    assert.is_true(support.alive(left))
    assert.is_true(support.kill(parent, 9))
    assert.is_truthy(support.eventually(function() return not support.alive(left) end, 3),
      "process " .. left .. " outlived the parent")
  end)

  it("survive the worker with kill_leftovers = false", function()
    -- (no unclosed io.popen here: the worker's exit would wait for it)
    local p = Parallelize({ function()
      local f = io.popen("sleep 100 & echo $!")
      local pid = tonumber(f:read("*l"))
      f:close()
      return { pid }
    end }, { kill_leftovers = false })
    p()
    assert.is_true(p:wait(10))
    local pids = p.results[1]
    p:stop()
    finally(function() for _, pid in ipairs(pids) do support.kill(pid, 9) end end)
    core.sleep(0.2)
    for _, pid in ipairs(pids) do assert.is_true(support.alive(pid), "process " .. pid .. " was killed") end
  end)

  it("get SIGINT and SIGQUIT with their default actions, while the worker ignores them", function()
    local p = Parallelize({ function()
      local f = io.popen("cat /proc/self/status")
      local status = f:read("*a")
      f:close()
      local own = io.open("/proc/self/status"):read("*a")
      return { child = status:match("SigIgn:%s*(%x+)"), worker = own:match("SigCgt:%s*(%x+)") }
    end })
    finally(function() p:stop() end)
    p()
    assert.is_true(p:wait(10))
    local masks = p.results[1]
    local bit = require "bit"
    local function has(mask, sig) return bit.band(tonumber(mask:sub(-8), 16), bit.lshift(1, sig - 1)) ~= 0 end
    assert.is_false(has(masks.child, 2), "SIGINT is ignored in programs the executor starts")
    assert.is_false(has(masks.child, 3), "SIGQUIT is ignored in programs the executor starts")
    assert.is_true(has(masks.worker, 2), "the worker does not catch SIGINT")
    assert.is_true(has(masks.worker, 3), "the worker does not catch SIGQUIT")
  end)
end)

describe("a worker still initializing when stop comes", function()
  it("is ended at once: it holds no call", function()
    local p = Parallelize({ Deferred(function()
      require("parallelize").sleep(30)
      return function(x) return x end
    end) })
    p(1)
    core.sleep(0.2)
    local t0 = core.now()
    local aborted = p:stop()
    assert.is_true(core.now() - t0 < 3, "stop waited for the constructor")
    assert.are.equal(1, #aborted)
    assert.are.equal(1, aborted[1][1])
    assert.are.same({}, support.children())
  end)
end)
