--- The interrupt soak: hundreds of Ctrl-Cs at random moments (the harness
-- of spec/interrupts.lua), under pzlua and a plain luajit, in every mode,
-- and through `pzlua --map`. `make soak-interrupts` runs it (and `make
-- soak` after its rounds); the environment can change the scale:
--   PZ_SOAK_INTERRUPT_TRIALS   trials of each mode under each interpreter (30)
--   PZ_SOAK_INTERRUPT_CLI      pzlua --map trials (30)
--   PZ_SOAK_INTERRUPT_DELAY    the latest moment of the SIGINT after the
--                              trial is ready, in seconds (0.3)
--   PZ_SOAK_INTERRUPT_SEED     the random seed (the time)
-- Prints a line per mode and the totals; exits 1 when an interrupt was
-- lost or a trial found something wrong.
local harness = require "spec.interrupts"

local function env(name, default)
  return tonumber(os.getenv(name)) or default
end

local seed = env("PZ_SOAK_INTERRUPT_SEED", os.time())
local trials, cli = env("PZ_SOAK_INTERRUPT_TRIALS", 30), env("PZ_SOAK_INTERRUPT_CLI", 30)
print(("interrupt soak: %d trials of each mode under pzlua and luajit, %d of pzlua --map, seed %d"):format(
  trials, cli, seed))
local _, total = harness.run({
  trials = trials, cli_trials = cli, seed = seed, max_delay = env("PZ_SOAK_INTERRUPT_DELAY", 0.3),
  progress = function(line) io.stdout:write("  ", line, "\n"); io.stdout:flush() end,
})
print(("%d trials: %d ok, %d interrupts lost, %d found something wrong; in %d the interrupt landed in the "
  .. "trial's own code after a method had handed its results out"):format(total.trials, total.ok, total.lost,
  total.bad, total.user_window))
os.exit(total.lost + total.bad == 0 and 0 or 1)
