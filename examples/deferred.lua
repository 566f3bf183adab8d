--- turnkey-pylib's third Parallelize example: Deferred runs each executor's constructor
-- inside its own worker, so slow (I/O-bound) set-up runs in parallel.
local parallelize = require "parallelize"
local Parallelize, Deferred, getpid = parallelize.Parallelize, parallelize.Deferred, parallelize.getpid

local function repr(v)
  if type(v) ~= "table" then return type(v) == "string" and ("%q"):format(v) or tostring(v) end
  local parts = {}
  for i = 1, v.n or #v do parts[#parts + 1] = repr(v[i]) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

local ExampleExecutor = {}
ExampleExecutor.__index = ExampleExecutor

function ExampleExecutor.new(name)
  local self = setmetatable({ name = name, pid = getpid() }, ExampleExecutor)
  -- To see what a failed initialization does, raise here now and then:
  -- if math.random(2) == 1 then error("initialization failed") end
  print(("%s.__init__: pid %d"):format(self.name, self.pid))
  return self
end

function ExampleExecutor:__call(...)
  local args = { n = select("#", ...), ... }
  print(("%s.__call__(%s)"):format(self.name, repr(args)))
  return args
end

--- Called in the worker when the pool stops gracefully (the Python original's __del__).
function ExampleExecutor:close()
  print(("%s.close: self.pid=%d, getpid=%d"):format(self.name, self.pid, getpid()))
end

local deferred = {}
for i = 0, 49 do
  deferred[#deferred + 1] = Deferred(ExampleExecutor.new, i)
end

local p = Parallelize(deferred)

local ok, err = pcall(function()
  -- If necessary, .executors waits for the deferred executors to finish
  -- initializing.
  print(("len(p.executors) = %d"):format(#p.executors))
  for _, executor in ipairs(p.executors) do
    print(executor.pid)
  end

  for i = 0, 249 do
    p(i)
  end
  p:wait()
  print("p.results: " .. repr(p.results))
end)

p:stop()
print("after stop")
if not ok then error(err, 0) end
