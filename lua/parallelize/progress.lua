--- parallelize.progress: the one-line progress bar of a pool (option
-- progress), drawn on stderr while a blocking method waits: done/total,
-- rate, ETA, errors. On a terminal it is redrawn in place at most 10 times
-- a second and erased when the waiting ends; with progress = "always" and
-- stderr not a terminal, it is written as plain lines, at most one a
-- second.
local core = require "parallelize.core"

local format, floor, max = string.format, math.floor, math.max
local stderr, now = io.stderr, core.now

local M = {}

--- A bar for the pool's option value (true or "always"), or nil when none
-- is to be drawn (false, or true and stderr not a terminal).
function M.new(option)
  if not option then return nil end
  local tty = core.isatty(2)
  if not tty and option ~= "always" then return nil end
  return { tty = tty, every = tty and 0.1 or 1, last = -math.huge, shown = false,
    t0 = now(), samples = {} }
end

local function duration(s)
  if s ~= s or s == math.huge then return "?" end
  s = floor(s + 0.5)
  if s >= 3600 then return format("%dh%02dm", floor(s / 3600), floor(s % 3600 / 60)) end
  if s >= 60 then return format("%dm%02ds", floor(s / 60), s % 60) end
  return format("%ds", s)
end

--- The rate over the last few seconds, from the bar's own samples of the
-- finished count.
local function rate(bar, t, finished)
  local samples = bar.samples
  samples[#samples + 1] = { t, finished }
  while #samples > 2 and samples[1][1] < t - 5 do table.remove(samples, 1) end
  local first = samples[1]
  local dt = t - first[1]
  if dt <= 0 then return 0 end
  return (finished - first[2]) / dt
end

--- Draws the bar for `finished` of `total` calls (total nil: unknown), with
-- `errors` failed, unless it was drawn less than its interval ago (or
-- `force`).
function M.draw(bar, finished, total, errors, force)
  local t = now()
  if not force and t - bar.last < bar.every then return end
  bar.last = t
  local r = rate(bar, t, finished)
  local line
  if total and total > 0 then
    local left = max(total - finished, 0)
    line = format("%d/%d calls (%d%%), %.0f/s, ETA %s, %d errors", finished, total,
      floor(100 * finished / total), r, duration(r > 0 and left / r or math.huge), errors)
  else
    line = format("%d calls, %.0f/s, %s, %d errors", finished, r, duration(t - bar.t0), errors)
  end
  if bar.tty then
    stderr:write("\r", line, "\27[K")
  else
    stderr:write(line, "\n")
  end
  stderr:flush()
  bar.shown = true
  bar.drawn = finished
end

--- The waiting has ended: a bar on a terminal is erased; written as lines,
-- it gets a last line with the final counts. A waiting that ended before
-- it drew (within a second of the last line: a p:result per call, a wait
-- with a timeout in a loop) writes one too when every call has finished
-- and the last line written does not say so, so that the log ends with
-- the final counts.
function M.finish(bar, finished, total, errors)
  if not bar.shown then
    if not bar.tty and total and total > 0 and finished >= total and bar.drawn ~= finished then
      M.draw(bar, finished, total, errors, true)
      bar.shown = false
    end
    return
  end
  if bar.tty then
    stderr:write("\r\27[K")
    stderr:flush()
  else
    M.draw(bar, finished, total, errors, true)
  end
  bar.shown = false
end

return M
