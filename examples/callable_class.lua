--- turnkey-pylib's second Parallelize example: callable "class instances" as executors,
-- built serially in the parent, then copied into fifty workers.
local parallelize = require "parallelize"
local Parallelize, getpid = parallelize.Parallelize, parallelize.getpid

--- Renders a value for printing (the Python original printed reprs).
local function repr(v)
  if type(v) ~= "table" then return type(v) == "string" and ("%q"):format(v) or tostring(v) end
  local parts = {}
  for i = 1, v.n or #v do parts[#parts + 1] = repr(v[i]) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

local ExampleExecutor = {}
ExampleExecutor.__index = ExampleExecutor

function ExampleExecutor.new(name)
  local self = setmetatable({ name = name }, ExampleExecutor)
  print(("__init__(%s)"):format(self.name))
  return self
end

function ExampleExecutor:__call(...)
  local args = { n = select("#", ...), ... }
  print(("pid %d: self.name=%s __call__(%s)"):format(getpid(), self.name, repr(args)))
  return args
end

local executors = {}
for i = 1, 50 do
  executors[i] = ExampleExecutor.new(tostring(i - 1))
end
local p = Parallelize(executors)

local ok, err = pcall(function()
  for i = 0, 249 do
    p(i)
  end
  p:wait()
  print("p.results: " .. repr(p.results))
end)

p:stop()
print("after stop")
if not ok then error(err, 0) end
