-- A script that forks (ffi.C.fork, a C module's fork) while a pool runs:
-- the child's copy of the pool has no I/O thread, and its workers and
-- sockets are the parent's. The child must neither hang on it (at its
-- exit, when its Lua state closes and the pool is collected) nor use it
-- (a call it lent straight to a worker was lost to the parent's pool).
local support = require "spec.support"

local function run(body)
  local dir = support.tmpdir()
  local path = dir .. "/fork.lua"
  support.write(path, [[
local P = require "parallelize"
local ffi = require "ffi"
ffi.cdef "int fork(void); int waitpid(int, int *, int); void _exit(int);"
local function in_child(fn)
  local pid = ffi.C.fork()
  if pid == 0 then fn() return true end
  local st = ffi.new("int[1]")
  ffi.C.waitpid(pid, st, 0)
  print("child status", st[0])
end
]] .. body)
  local out, status = support.run("timeout 60 " .. support.quote(support.pzlua()) .. " " .. support.quote(path))
  support.rmdir(dir)
  return out, status
end

-- Not under ASan (#nosan): the sanitizer's allocator keeps its locks
-- through a fork, so a child forked while one of the parent's threads
-- allocated (the I/O thread, at any moment) hung at its first allocation
-- (1 run in 6 here); glibc's malloc is made safe across fork.
describe("a pool in a process forked from the script #nosan", function()
  it("lets the child end (its state closed) without waiting for the parent's pool", function()
    local out, status = run([[
local p = P.Parallelize(function(x) P.sleep(0.02) return x end, { workers = 2 })
for i = 1, 40 do p(i) end
P.sleep(0.05)
if in_child(function() end) then return end -- the child's chunk ends: lua_close
assert(p:wait(30))
print("sum", #p.results + #p.errors + #p:stop())
]])
    assert.are.equal(0, status, out)
    assert.truthy(out:find("child status\t0\n", 1, true), out)
    assert.truthy(out:find("sum\t40\n", 1, true), out)
    assert.falsy(out:find("was dropped", 1, true), out)
  end)

  it("refuses the parent's pool in the child, which loses the parent no call", function()
    local out, status = run([[
local p = P.Parallelize(function(x) return x * 10 end, { workers = 1 })
p(1)
p:wait()
P.sleep(0.05) -- an idle pool: the next call would be lent to its worker
in_child(function()
  local ok, err = pcall(p, 7)
  io.stdout:write("child call ", tostring(ok), " ", tostring(err), "\n")
  local ok2, err2 = pcall(p.stop, p)
  io.stdout:write("child stop ", tostring(ok2), " ", tostring(err2), "\n")
  io.stdout:flush()
  ffi.C._exit(0)
end)
local id = p(2)
print("parent", id, p:result(id, 10))
local s = p:stats()
print("counts", s.calls, s.done, #p.results + #p.errors + #p:stop())
]])
    assert.are.equal(0, status, out)
    assert.truthy(out:find("child call false [^\n]*this process is a fork of it, and cannot use it"), out)
    assert.truthy(out:find("child stop false [^\n]*this process is a fork of it"), out)
    assert.truthy(out:find("parent\t2\ttrue\t20\n", 1, true), out)
    assert.truthy(out:find("counts\t2\t2\t2\n", 1, true), out)
  end)

  it("lets the child make and use a pool of its own", function()
    local out, status = run([[
local p = P.Parallelize(function(x) P.sleep(0.02) return x end, { workers = 2 })
for i = 1, 20 do p(i) end
if in_child(function()
  local q = P.Parallelize(function(x) return x + 1 end, { workers = 2 })
  io.stdout:write("child map ", table.concat(q:map({ 1, 2, 3 }), " "), " ", #q:stop(), "\n")
end) then return end
assert(p:wait(30))
print("sum", #p.results + #p:stop())
]])
    assert.are.equal(0, status, out)
    assert.truthy(out:find("child map 2 3 4 0\n", 1, true), out)
    assert.truthy(out:find("child status\t0\n", 1, true), out)
    assert.truthy(out:find("sum\t20\n", 1, true), out)
  end)
end)
