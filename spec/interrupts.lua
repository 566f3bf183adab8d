--- The interrupt harness: Ctrl-C at random moments. Each trial runs
-- spec/interrupt_trial.lua (a pool's blocking methods in a loop, in one of
-- its modes) under pzlua or a plain luajit as a background job, sends it
-- SIGINT at a random moment after it is ready, and reads what it found
-- (see that file). `pzlua --map` has trials of its own: a run over a file
-- of numbers, interrupted, then finished with --resume; every line must
-- come out exactly once over the two runs.
--
-- A trial is one of:
--   ok          the interrupt came out within LOST_AFTER seconds and every
--               check held
--   lost        no "interrupted!" within LOST_AFTER seconds of the signal
--               (the process is then killed)
--   bad         it came out, but something was wrong: the error, a
--               second wait, a call in no place or in two, the interrupt
--               in an error record (the reason is kept)
-- and `user_window` counts the ok trials where the interrupt landed in the
-- trial's own code between a method's return and the line recording what
-- it handed out (values lost there are the script's, not parallelize's).
--
-- M.run(opts) runs the trials and returns the tally; spec/soak/interrupts.lua
-- runs hundreds, spec/interrupts_spec.lua a few of each kind.
local support = require "spec.support"
local core = require "parallelize.core"

local quote = support.quote
local SIGINT, SIGKILL = 2, 9
local LOST_AFTER = 2

local M = {}

M.modes = { "calls", "loop", "loop_room", "result", "map", "map_unchunked", "stream", "stream_ordered", "executors" }

local ROOT = io.popen("pwd"):read("*l")

--- The interpreters: pzlua, and a plain luajit finding the module in the tree.
function M.interpreters()
  return {
    { name = "pzlua", cmd = quote(support.pzlua()) },
    { name = "luajit", cmd = ("env LUA_PATH=%s LUA_CPATH=%s luajit"):format(
        quote(ROOT .. "/lua/?.lua;" .. ROOT .. "/?.lua;;"), quote(ROOT .. "/build/?.so;;")) },
  }
end

--- Starts `cmd` in the tree's top directory as a background job, its
-- stdin from `stdin` (default /dev/null), stdout to dir/out, stderr to
-- dir/err and its exit status to dir/status; returns its pid.
local function start(dir, cmd, stdin)
  os.execute(("cd %s && (%s >%s/out 2>%s/err <%s & echo $! >%s/pid; wait $!; echo $? >%s/status) "
    .. "</dev/null >/dev/null 2>&1 &"):format(quote(ROOT), cmd, quote(dir), quote(dir),
      quote(stdin or "/dev/null"), quote(dir), quote(dir)))
  local pid = support.eventually(function() return tonumber((support.read(dir .. "/pid") or ""):match("^%d+")) end, 10)
  assert(pid, "the interpreter did not start")
  return pid
end

local function status_of(dir, seconds)
  return support.eventually(function()
    return tonumber((support.read(dir .. "/status") or ""):match("^%d+"))
  end, seconds)
end

--- Polls pred every millisecond for at most `seconds`; returns its value.
local function poll(pred, seconds)
  return support.eventually(pred, seconds, 0.001)
end

--- One trial of interpreter `interp` in `mode`, SIGINT `delay` seconds
-- after "ready". Returns {kind = "ok" | "lost" | "bad", why =, latency =,
-- user_window =, where =}.
function M.trial(interp, mode, seed, delay)
  local dir = support.tmpdir()
  local pid = start(dir, ("%s spec/interrupt_trial.lua %s %d"):format(interp.cmd, mode, seed))
  local out = function() return support.read(dir .. "/out") or "" end
  local result
  if not poll(function() return out():find("ready\n", 1, true) end, 30) then
    support.kill(pid, SIGKILL)
    result = { kind = "bad", why = "never ready: " .. (support.read(dir .. "/err") or "") }
  else
    core.sleep(delay)
    local sent = core.now()
    support.kill(pid, SIGINT)
    local caught = poll(function() return out():match("\ncaught ([%d.]+)") end, LOST_AFTER)
    if not caught then
      support.kill(pid, SIGKILL)
      result = { kind = "lost", why = ("no interrupt %g s after the signal"):format(LOST_AFTER) }
    else
      local status = status_of(dir, 60)
      local text = out()
      local verdict = text:match("\nverdict ([^\n]*)")
      local where = text:match("\ncaught [%d.]+ ([^\n]*)")
      result = { latency = tonumber(caught) - sent, where = where,
        user_window = tonumber(text:match("user_window=(%d+)") or 0) > 0 }
      if status == nil then
        support.kill(pid, SIGKILL)
        result.kind, result.why = "bad", "did not end after the interrupt"
      elseif verdict == "ok" and status == 0 then
        result.kind = "ok"
      else
        result.kind = "bad"
        result.why = (verdict or ("exit status " .. tostring(status) .. ": " .. (support.read(dir .. "/err") or "")))
          :sub(1, 400) .. " [" .. tostring(where) .. "]"
      end
    end
  end
  status_of(dir, 10)
  support.rmdir(dir)
  return result
end

--- One `pzlua --map` trial: `lines` numbers through `-j 2` (ordered when
-- `keep`), SIGINT `delay` seconds after the start, then a --resume run
-- with the same joblog. Every input must be in the two outputs exactly
-- once.
function M.cli_trial(lines, keep, delay)
  local dir = support.tmpdir()
  local input = {}
  for k = 1, lines do input[k] = tostring(k) end
  support.write(dir .. "/in", table.concat(input, "\n") .. "\n")
  local fn = quote("function(x) if x % 97 == 0 then require('parallelize').sleep(0.002) end return x end")
  local cmd = ("%s --map -j 2 %s --joblog %s/log %s"):format(quote(support.pzlua()), keep and "-k" or "",
    quote(dir), fn)
  local pid = start(dir, cmd, dir .. "/in")
  core.sleep(delay)
  local sent = core.now()
  support.kill(pid, SIGINT)
  local result
  local status = status_of(dir, LOST_AFTER)
  if not status then
    support.kill(pid, SIGKILL)
    result = { kind = "lost", why = ("still running %g s after the signal"):format(LOST_AFTER) }
  else
    result = { latency = core.now() - sent, kind = "ok" }
    local first = support.read(dir .. "/out") or ""
    local err = support.read(dir .. "/err") or ""
    if status ~= 130 and status ~= 0 then
      result.kind, result.why = "bad", "exit status " .. status .. ": " .. err:sub(1, 300)
    else
      local _, again = support.run(("cd %s && %s --map -j 2 --joblog %s/log --resume %s < %s/in > %s/out2")
        :format(quote(ROOT), quote(support.pzlua()), quote(dir), fn, quote(dir), quote(dir)))
      local second = support.read(dir .. "/out2") or ""
      local seen, why = {}, nil
      for line in (first .. second):gmatch("[^\n]+") do
        local n = tonumber(line)
        if not n or n < 1 or n > lines then why = why or ("a line that is no input: " .. line)
        elseif seen[n] then why = why or ("line " .. n .. " twice")
        else seen[n] = true end
      end
      for k = 1, lines do
        if not seen[k] then why = why or ("line " .. k .. " in neither output") end
      end
      if again ~= 0 then why = why or ("the resumed run ended with status " .. tostring(again)) end
      if why then
        result.kind, result.why = "bad", why .. " (first run: " .. err:gsub("\n", " | "):sub(1, 200) .. ")"
      end
    end
  end
  status_of(dir, 10)
  support.rmdir(dir)
  return result
end

--- Runs opts.trials trials of each mode (opts.modes, default all) under
-- each interpreter, and opts.cli_trials of pzlua --map; the SIGINT comes
-- after a delay drawn uniformly from [0, opts.max_delay] (0.3 s). Calls
-- opts.progress(line) after each kind. Returns the tally: rows
-- {name =, trials =, ok =, lost =, bad =, user_window =, max_latency =,
-- why = {reasons}}, and the totals.
function M.run(opts)
  math.randomseed(opts.seed or os.time())
  local max_delay = opts.max_delay or 0.3
  local rows, total = {}, { trials = 0, ok = 0, lost = 0, bad = 0, user_window = 0 }
  local function add(row, r)
    row.trials = row.trials + 1
    row[r.kind] = row[r.kind] + 1
    total.trials, total[r.kind] = total.trials + 1, total[r.kind] + 1
    if r.user_window then row.user_window, total.user_window = row.user_window + 1, total.user_window + 1 end
    if r.latency and r.latency > row.max_latency then row.max_latency = r.latency end
    if r.why then row.why[#row.why + 1] = r.why end
  end
  local function new_row(name)
    local row = { name = name, trials = 0, ok = 0, lost = 0, bad = 0, user_window = 0, max_latency = 0, why = {} }
    rows[#rows + 1] = row
    return row
  end
  local function report(row)
    if opts.progress then
      opts.progress(("%-24s %4d trials: %4d ok, %3d lost, %3d bad, %3d in the script's window; "
        .. "slowest interrupt %.0f ms"):format(row.name, row.trials, row.ok, row.lost, row.bad, row.user_window,
        row.max_latency * 1000))
      for k = 1, math.min(#row.why, 5) do opts.progress("    " .. row.why[k]) end
    end
  end
  for _, interp in ipairs(opts.interpreters or M.interpreters()) do
    for _, mode in ipairs(opts.modes or M.modes) do
      local row = new_row(interp.name .. " " .. mode)
      for _ = 1, opts.trials do
        add(row, M.trial(interp, mode, math.random(1, 1e6), math.random() * max_delay))
      end
      report(row)
    end
  end
  if (opts.cli_trials or 0) > 0 then
    local row = new_row("pzlua --map")
    for k = 1, opts.cli_trials do
      add(row, M.cli_trial(opts.cli_lines or 200000, k % 2 == 0, 0.05 + math.random() * max_delay))
    end
    report(row)
  end
  return rows, total
end

return M
