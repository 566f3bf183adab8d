-- Pools made inside workers: in an executor, in a Deferred constructor,
-- several levels deep, with the same guarantees as a pool made by the
-- script itself.
local parallelize = require "parallelize"
local support = require "spec.support"

local Parallelize, Deferred, rep = parallelize.Parallelize, parallelize.Deferred, parallelize.rep

--- Every pid below pid (default: this process), depth first.
local function descendants(pid, into)
  into = into or {}
  for _, child in ipairs(support.children(pid)) do
    into[#into + 1] = child
    descendants(child, into)
  end
  return into
end

--- An executor that fans x out to a pool of its own, `depth` levels down;
-- returns the sum of (x + i) for i = 1..width at the bottom level, and the
-- pids of the processes below it while its pool ran.
local function fan_out(x, depth, width)
  local pz = require "parallelize"
  if depth == 0 then return x end
  local q = pz.Parallelize(pz.rep(fan_out, 2))
  for i = 1, width do q(x + i, depth - 1, width) end
  assert(q:wait(30), "the inner pool did not finish")
  local sum = 0
  for _, v in ipairs(q.results) do sum = sum + v end
  assert(#q.errors == 0, q.errors[1] and q.errors[1].message)
  assert(#q:stop() == 0, "the inner pool aborted calls")
  return sum
end

--- What fan_out(x, depth, width) returns, computed here.
local function expected(x, depth, width)
  if depth == 0 then return x end
  local sum = 0
  for i = 1, width do sum = sum + expected(x + i, depth - 1, width) end
  return sum
end

describe("a pool made inside a worker", function()
  it("works in an executor (the call returns)", function()
    local p = Parallelize({ function()
      local q = require("parallelize").Parallelize({ function(x) return x end })
      q(1); q:wait(); q:stop(); return 1
    end })
    finally(function() p:stop(5) end)
    p(1)
    assert.is_true(p:wait(15))
    assert.are.same({ 1 }, p.results)
  end)

  it("works in a Deferred constructor (p.executors returns)", function()
    local p = Parallelize({ Deferred(function()
      local pz = require "parallelize"
      local q = pz.Parallelize(pz.rep(function(x) return x * 2 end, 2))
      for i = 1, 10 do q(i) end
      q:wait()
      local sum = 0
      for _, v in ipairs(q.results) do sum = sum + v end
      q:stop()
      return function(x) return x + sum end
    end) })
    finally(function() p:stop(5) end)
    assert.are.equal(1, #p.executors)
    p(1)
    assert.is_true(p:wait(15))
    assert.are.same({ 111 }, p.results)
  end)

  it("works four levels deep, every call answered once", function()
    local p = Parallelize(rep(fan_out, 2))
    finally(function() p:stop(5) end)
    for x = 1, 3 do p(x * 100, 3, 3) end
    assert.is_true(p:wait(60))
    assert.are.same({}, p.errors)
    local got = {}
    for i, id in ipairs(p.ids) do got[id] = p.results[i] end
    for x = 1, 3 do assert.are.equal(expected(x * 100, 3, 3), got[x]) end
  end)

  it("loses no call of the inner pool when its workers are killed", function()
    local dir = support.tmpdir()
    -- The inner executor kills its own worker the first time it sees
    -- each multiple of 7 (a marker file remembers).
    local function inner(x)
      if x % 7 == 0 then
        local marker = dir .. "/" .. x
        local f = io.open(marker, "r")
        if not f then
          f = assert(io.open(marker, "w"))
          f:close()
          local ffi = require "ffi"
          pcall(ffi.cdef, "int kill(int pid, int sig); int getpid(void);")
          ffi.C.kill(ffi.C.getpid(), 9)
        end
        f:close()
      end
      return x
    end
    local p = Parallelize({ function(n)
      local pz = require "parallelize"
      local q = pz.Parallelize(pz.rep(inner, 3))
      for i = 1, n do q(i) end
      assert(q:wait(30))
      local seen, sum = {}, 0
      for i, id in ipairs(q.ids) do
        assert(not seen[id], "call " .. id .. " answered twice")
        seen[id] = true
        sum = sum + q.results[i]
      end
      assert(#q.errors == 0 and #q.ids == n, "inner calls lost")
      q:stop()
      return sum
    end })
    finally(function() -- (busted keeps one finally a test: the last)
      p:stop(5)
      support.rmdir(dir)
    end)
    p(200)
    assert.is_true(p:wait(60))
    assert.are.same({}, p.errors)
    assert.are.same({ 200 * 201 / 2 }, p.results)
  end)

  it("leaves no process behind at any level after stop", function()
    local p = Parallelize(rep(function(s)
      local pz = require "parallelize"
      local q = pz.Parallelize(pz.rep(function(t)
        local pz2 = require "parallelize"
        local r = pz2.Parallelize(pz2.rep(function(u) pz2.sleep(u) return u end, 2))
        r(t); r(t)
        r:wait()
        r:stop()
        return t
      end, 2))
      q(s); q(s)
      q:wait()
      q:stop()
      return s
    end, 2))
    local stopped = false
    finally(function() if not stopped then p:stop(5) end end)
    p(0.5); p(0.5)
    -- Three levels of pools are running: 2 workers, 4 below them, 8 below those,
    -- each level with its spawners.
    local seen = support.eventually(function()
      local all = descendants()
      return #all >= 2 + 1 + 2 * (2 + 1) + 4 * (2 + 1) and all
    end, 10)
    assert.is_truthy(seen, "the nested pools did not all start")
    assert.is_true(p:wait(30))
    assert.are.same({ 0.5, 0.5 }, p.results)
    assert.are.same({}, p:stop())
    stopped = true
    for _, pid in ipairs(seen) do
      assert.is_false(support.alive(pid), "process " .. pid .. " outlived stop")
    end
    assert.are.same({}, descendants())
  end)

  it("dies with its parent, the whole tree, even when the parent is SIGKILLed", function()
    local dir = support.tmpdir()
    local script = dir .. "/tree.lua"
    support.write(script, [[
local pz = require "parallelize"
local p = pz.Parallelize(pz.rep(function()
  local pz2 = require "parallelize"
  local q = pz2.Parallelize(pz2.rep(function() pz2.sleep(60) end, 2))
  q(); q()
  q:wait()
end, 2))
p(); p()
io.stdout:write("ready\n")
io.stdout:flush()
p:wait()
]])
    local proc = io.popen(support.quote(support.pzlua()) .. " " .. support.quote(script)
      .. " & echo $!; wait", "r")
    local pid = tonumber(proc:read("*l"))
    finally(function() -- (busted keeps one finally a test: the last)
      support.rmdir(dir)
      if pid then support.kill(pid, 9) end
      proc:close()
      support.rmdir(dir)
    end)
    assert.are.equal("ready", proc:read("*l"))
    -- 2 workers + spawner, each worker with 2 workers + a spawner of its own.
    local tree = support.eventually(function()
      local all = descendants(pid)
      return #all >= 3 + 2 * 3 and all
    end, 10)
    assert.is_truthy(tree, "the nested pools did not all start")
    assert.is_true(support.kill(pid, 9))
    for _, child in ipairs(tree) do
      assert.is_truthy(support.eventually(function() return not support.alive(child) end, 3),
        "process " .. child .. " outlived its SIGKILLed ancestor")
    end
  end)
end)
