--- turnkey-pylib's first Parallelize example: one function, fifty workers, 250 sleeps.
--
-- Run: pzlua examples/sleeper.lua   (Ctrl-C to abort: the aborted calls
-- are counted). PZ_SLEEP_SCALE multiplies the sleeps (make run uses 0.1).
local parallelize = require "parallelize"
local Parallelize = parallelize.Parallelize

local scale = tonumber(os.getenv("PZ_SLEEP_SCALE")) or 1

local function sleeper(seconds)
  print(("pid %d: sleeping %g seconds"):format(parallelize.getpid(), seconds))
  parallelize.sleep(seconds)
  return seconds
end

local pool = Parallelize(parallelize.rep(sleeper, 50))
print("Allocated workers")

-- try ... finally, as turnkey-pylib's example does: pcall, then stop in any case.
local ok, err = pcall(function()
  for _ = 1, 250 do
    pool(1 * scale)
  end
  print("Queued parallelized invocations. Ctrl-C to abort!")
  pool:wait()
  print("Finished sleeping...")
end)

local aborted = pool:stop()
if #aborted > 0 then
  print(("len(aborted) = %d"):format(#aborted))
  print(("len(aborted) + len(results) = %d"):format(#aborted + #pool.results))
end
print(("len(pool.results) = %d"):format(#pool.results))
if not ok then error(err, 0) end
