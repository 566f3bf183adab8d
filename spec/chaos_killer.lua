--- A killer for the chaos runs that drive a blocking method (map, result,
-- stream), run as a process of its own: every `interval` seconds it
-- SIGKILLs a random worker of one pool (a child of that pool's spawner,
-- nothing else, seen for at least MIN_AGE) until the file `stop` exists or
-- the spawner is gone, then writes how many it killed to `stop`.count.
--
-- Why MIN_AGE: killing blindly, it would find few children while slots
-- wait to restart, and kill the one just started again and again, before
-- it has served a call: each such death lengthens that slot's back-off,
-- the fewer children left are killed the sooner, and the pool (rightly)
-- spends its time waiting out back-offs. What this chaos checks is calls
-- lost or doubled when serving workers die; deaths while starting have
-- specs of their own (robustness_spec).
--
--   luajit spec/chaos_killer.lua SPAWNER_PID INTERVAL SEED STOP_FILE
-- (from the top of the tree, with spec/support.lua on LUA_PATH)
local support = require "spec.support"
local ffi = require "ffi"
pcall(ffi.cdef, "int usleep(unsigned int usec);")

local spawner, interval, seed, stop = tonumber(arg[1]), tonumber(arg[2]), tonumber(arg[3]), arg[4]
math.randomseed(seed)

local MIN_AGE = 0.02
local now = require("parallelize.core").now

local kills = 0
local first_seen = {} -- pid -> when this killer first saw it
while not support.read(stop) and support.alive(spawner) do
  local t, seen, old = now(), {}, {}
  for _, pid in ipairs(support.children(spawner)) do
    seen[pid] = first_seen[pid] or t
    if t - seen[pid] >= MIN_AGE then old[#old + 1] = pid end
  end
  first_seen = seen
  if #old > 0 and support.kill(old[math.random(1, #old)], 9) then kills = kills + 1 end
  ffi.C.usleep(math.floor(interval * 1e6))
end
-- Written whole, then renamed: the test polls for the file and must never
-- read it empty.
local f = assert(io.open(stop .. ".count.tmp", "w"))
assert(f:write(kills))
assert(f:close())
assert(os.rename(stop .. ".count.tmp", stop .. ".count"))
