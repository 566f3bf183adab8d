--- The soak: the chaos run of spec/chaos.lua at scale, for a few minutes.
-- `make soak` runs it; the environment can change the scale:
--   PZ_SOAK_CALLS (default 5,000,000), PZ_SOAK_WORKERS (256),
--   PZ_SOAK_INTERVAL (seconds between kills, 0.002), PZ_SOAK_WORK (loop
--   iterations per call, 3000), PZ_SOAK_ROUNDS (3), PZ_SOAK_TIMEOUT (900).
-- After those rounds, one more with timeouts and recycling under the same
-- chaos: every PZ_SOAK_HANG_EVERY-th call (1000) hangs and is ended by its
-- timeout (0.25 s), and each worker is replaced after
-- PZ_SOAK_MAX_CALLS calls (500); its calls default to a tenth of the others
-- (PZ_SOAK_CONTROL_CALLS). Last, a round through p:map, whose items travel
-- in chunks (src/chunk.h), while a process of its own SIGKILLs a worker
-- every PZ_SOAK_INTERVAL: PZ_SOAK_MAP_CALLS items (1,000,000) through
-- PZ_SOAK_MAP_WORKERS workers (64).
local chaos = require "spec.chaos"
-- Every pool's spawner from the fork server: its rounds leave a big heap.
assert(require("parallelize").forkserver())

local function env(name, default)
  return tonumber(os.getenv(name)) or default
end

local opts = {
  calls = env("PZ_SOAK_CALLS", 5000000),
  workers = env("PZ_SOAK_WORKERS", 256),
  interval = env("PZ_SOAK_INTERVAL", 0.002),
  work = env("PZ_SOAK_WORK", 3000),
  timeout = env("PZ_SOAK_TIMEOUT", 900),
  progress = function(line) io.stdout:write("  ", line, "\n"); io.stdout:flush() end,
}

local total_calls, total_kills = 0, 0
for round = 1, env("PZ_SOAK_ROUNDS", 3) do
  collectgarbage("collect") -- each round from a collected heap, as a new process would
  opts.seed = round
  print(("soak round %d: %d calls through %d workers, SIGKILLing a random worker with %g ms pauses"):format(
    round, opts.calls, opts.workers, opts.interval * 1000))
  local f = chaos.run(opts)
  total_calls, total_kills = total_calls + f.calls, total_kills + f.kills
  print(("round %d: ok in %.1f s (%.0f calls/s), %d kills (%.0f a second), %d poison-flagged, nothing lost, "
    .. "nothing duplicated, no process left"):format(round, f.elapsed, f.rate, f.kills, f.kills / f.elapsed, f.poison))
end
local control = {}
for k, v in pairs(opts) do control[k] = v end
control.calls = env("PZ_SOAK_CONTROL_CALLS", math.floor(opts.calls / 10))
control.hang_every = env("PZ_SOAK_HANG_EVERY", 1000)
control.call_timeout = 0.25
control.max_calls = env("PZ_SOAK_MAX_CALLS", 500)
control.max_deaths = 255
control.seed = 99
-- (The rounds before leave garbage of millions of results. When a pool's
-- spawner was forked from this process it was as big, and so was every
-- worker it forked: each fork and exit then took tens of ms, and with
-- the three rounds' pools kept alive by a trace, this round's recycling
-- and kills starved a call that does not hang past its 0.25 s timeout,
-- 3 runs of 3. Spawners come from the fork server, started at the top,
-- small whatever this process holds: src/forkserver.h.)
collectgarbage("collect")
print(("soak round with timeouts and recycling: %d calls, every %dth hangs (timeout %g s), workers replaced "
  .. "after %d calls"):format(control.calls, control.hang_every, control.call_timeout, control.max_calls))
local f = chaos.run(control)
total_calls, total_kills = total_calls + f.calls, total_kills + f.kills
print(("round ok in %.1f s: %d kills, %d timeouts, %d recycles, %d poison-flagged, nothing lost, nothing "
  .. "duplicated, no process left"):format(f.elapsed, f.kills, f.timeouts, f.recycles, f.poison))
local through_map = { mode = "map", calls = env("PZ_SOAK_MAP_CALLS", 1000000), workers = env("PZ_SOAK_MAP_WORKERS", 64),
  interval = opts.interval, work = opts.work, timeout = opts.timeout, seed = 7, max_deaths = 255, init_attempts = 1000 }
print(("soak round through p:map (chunks): %d items through %d workers, a worker SIGKILLed every %g ms"):format(
  through_map.calls, through_map.workers, through_map.interval * 1000))
chaos.run(through_map)
f = chaos.last
total_calls, total_kills = total_calls + f.calls, total_kills + f.kills
print(("round ok in %.1f s (%.0f items/s): %d kills, %d poison-flagged, nothing lost, nothing duplicated, no "
  .. "process left"):format(f.elapsed, f.rate, f.kills, f.poison))
print(("soak: %d calls, %d kills, all accounted for"):format(total_calls, total_kills))
