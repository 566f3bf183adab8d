--- A killer for the chaos runs that drive a blocking method (map, result,
-- stream), run as a process of its own: every `interval` seconds it
-- SIGKILLs a random worker of one pool (a child of that pool's spawner,
-- nothing else) until the file `stop` exists or the spawner is gone, then
-- writes how many it killed to `stop`.count.
--
--   luajit spec/chaos_killer.lua SPAWNER_PID INTERVAL SEED STOP_FILE
-- (from the top of the tree, with spec/support.lua on LUA_PATH)
local support = require "spec.support"
local ffi = require "ffi"
pcall(ffi.cdef, "int usleep(unsigned int usec);")

local spawner, interval, seed, stop = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3]), arg[4]
math.randomseed(seed)

local kills = 0
while not support.read(stop) and support.alive(spawner) do
  local kids = support.children(spawner)
  if #kids > 0 and support.kill(kids[math.random(1, #kids)], 9) then kills = kills + 1 end
  ffi.C.usleep(math.floor(interval * 1e6))
end
local f = io.open(stop .. ".count", "w")
f:write(kills)
f:close()
