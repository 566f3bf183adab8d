--- parallelize.cli_map: `pzlua --map EXECUTOR [options] < inputs > outputs`,
-- the shell's parallel map (the help text is in parallelize.cli_map_args).
--
-- One pool of workers, each running the user's function wrapped by
-- parallelize.cli_map_worker; stdin streams through p:stream (read lazily,
-- a bounded window, keep_results = false), so that any number of lines
-- goes through in constant memory; results are written as they come, or
-- in input order with -k (the stream's ordered option).
--
-- Rules this file owns:
-- - Output and joblog are written in batches, the output first: a joblog
--   entry is written only once its line's output is out, so that a run
--   killed at any moment leaves a joblog whose lines are all done, and
--   `--resume` runs exactly the others. A batch is written when it is
--   large, when it is 0.2 s old, and whenever no other result is waiting
--   (so a slow stream shows each result at once).
-- - Failures are counted here, not by the pool's fail_fast: a line that is
--   not JSON is a failure the pool never sees (the worker returns it), and
--   --halt needs a count. `now` ends the running calls (p:stop(0)),
--   `soon` lets the calls the workers hold finish (p:stop(), which a
--   Ctrl-C meanwhile cuts short); what finished either way is written and
--   logged.
-- - The executor is loaded by every worker before any input is read; one
--   that cannot be loaded is one message and exit status 255.
-- - A call's argument is its line's text alone, and a line that succeeded
--   without --joblog comes back as its output text alone (see
--   parallelize.cli_map_worker): strings, which travel without the encoder
--   and its tables (a table each way cost a third of the throughput). The
--   line numbers stay here, by the stream's positions (Run:note_line): the
--   pool is this file's alone, and the stream queues its calls one after
--   the other, so the call of position i has id id_base + i, which is how
--   p:take()'s ids and error records find theirs after a run cut short.
-- - Exit status: the failed lines, at most 101; 130 after Ctrl-C, 143
--   after SIGTERM, 129 after SIGHUP (each stops the run as Ctrl-C does);
--   255 for anything that stopped the command itself.
local parallelize = require "parallelize"
local core = require "parallelize.core"
local cli_args = require "parallelize.cli_map_args"
local joblog = require "parallelize.cli_map_joblog"

local format, tostring, type, ipairs, pcall, select = string.format, tostring, type, ipairs, pcall, select
local concat, min = table.concat, math.min
local now, pool_counts, commit, write_then = core.now, core.pool_counts, core.commit, core.write_then
local read_line, line_ready, later = core.read_line, core.line_ready, parallelize.later

local M = {}

local STATUS_INTERRUPTED, STATUS_BROKEN, MAX_FAILURES = 130, 255, 101
-- The signals other than SIGINT that stop a run as Ctrl-C does.
local SIGNAL_NAMES = { [1] = "SIGHUP", [15] = "SIGTERM" }
-- A batch is written when it holds this many lines or this many bytes of
-- output, or is this old. The bytes bound the parent's memory whatever
-- the lines' size: counted in lines alone, 1 MiB results made batches of
-- a GiB, held and then copied again to be written (3.5 GB at its peak for
-- 2,400 of them).
local BATCH_LINES, BATCH_BYTES, BATCH_SECONDS = 1024, 1048576, 0.2

--- The constructor every worker runs (a Deferred): it travels to the
-- worker as bytecode, and the worker side is a module there.
local function build_executor(spec)
  return require("parallelize.cli_map_worker").executor(spec)
end

-- A run ---------------------------------------------------------------------

local Run = {}
Run.__index = Run

--- A message on stderr, "<prog> --map: ...". Over a progress bar drawn
-- in place, the bar's line is cleared first (it is drawn again later).
function Run:say(fmt, ...)
  io.stdout:flush()
  io.stderr:write(self.clear_bar, self.prefix, format(fmt, ...), "\n")
end

-- Ctrl-C's "interrupted!" may land on any instruction (the run then
-- stops and writes what it holds: cut_short). A line is counted done, its
-- output and its joblog entry buffered, in one core.commit; a batch is
-- written and its buffer emptied in one core.write_then: so a line is in
-- the output exactly when it is done, and the output before its joblog
-- entry, and --resume finishes exactly the lines not done.

--- Writes the batch: the output first, then the joblog entries of the
-- same lines. Raises when a write fails; after that nothing more is
-- written (a batch written again could repeat the part that went out),
-- and the lines of the batches not written stay counted in `unwritten`.
-- Between the two writes, `unlogged` counts the lines whose output went
-- out: when the joblog's write then fails, those lines are the output's
-- last ones, and --resume, which knows only the joblog, runs them again;
-- counted among the lines not done, they were said to need exactly
-- that rerun, which wrote them twice.
function Run:flush()
  if self.write_error then return end
  if self.nout > 0 then
    local ok, err = write_then(io.stdout, concat(self.outbuf, "", 1, self.nout), 5, self, "outbuf", {}, self, "nout", 0,
      self, "outbytes", 0, self, "unwritten", self.log and self.unwritten or 0,
      self, "unlogged", self.log and self.unlogged + self.nout / 2 or 0)
    if not ok then self:write_failed("cannot write the output: " .. tostring(err)) end
  end
  if self.nlog > 0 then
    local ok, err = write_then(self.log, concat(self.logbuf, "", 1, self.nlog), 4, self, "logbuf", {}, self, "nlog", 0,
      self, "unwritten", 0, self, "unlogged", 0)
    if not ok then self:write_failed(format("cannot write the joblog %s: %s", self.opts.joblog, tostring(err))) end
  end
  self.flushed_at = now()
end

--- A write that failed: noted, so that no later flush writes, and raised.
function Run:write_failed(message)
  self.write_error = message
  error(message, 0)
end

--- The joblog entry of a line (false without a joblog).
function Run:log_entry(line, pid, start, seconds, status, message)
  return self.log ~= nil and joblog.entry(self.cjson, line, pid, start, seconds, status, message)
end

--- A line done: its output, and its joblog entry.
function Run:succeeded(line, text, pid, start, seconds)
  local n, m, entry = self.nout, self.nlog, self:log_entry(line, pid, start, seconds, "ok")
  local bytes = self.outbytes + #text + 1
  if entry then
    commit(8, self.outbuf, n + 1, text, self.outbuf, n + 2, "\n", self, "nout", n + 2, self, "outbytes", bytes,
      self.logbuf, m + 1, entry, self, "nlog", m + 1, self, "done", self.done + 1,
      self, "unwritten", self.unwritten + 1)
  else
    commit(6, self.outbuf, n + 1, text, self.outbuf, n + 2, "\n", self, "nout", n + 2, self, "outbytes", bytes,
      self, "done", self.done + 1, self, "unwritten", self.unwritten + 1)
  end
end

--- A line failed: its message on stderr, its joblog entry, and --halt.
function Run:failed(line, status, message, pid, start, seconds)
  self:say("line %d: %s", line, message)
  local m, entry = self.nlog, self:log_entry(line, pid, start, seconds, status, message)
  if entry then
    commit(5, self.logbuf, m + 1, entry, self, "nlog", m + 1, self, "done", self.done + 1,
      self, "failures", self.failures + 1, self, "unwritten", self.unwritten + 1)
  else
    commit(2, self, "done", self.done + 1, self, "failures", self.failures + 1)
  end
  local halt = self.opts.halt
  if halt and self.failures >= halt.fail then self.halted = true end
end

-- Line numbers by stream position, for the positions between the source
-- and the loop's body (the stream bounds how many: four times its window):
-- position i in slot i % size + 1 of two arrays, false where free, grown
-- when a slot is still taken. (A table indexed by position, each entry
-- cleared when used, is a hash of a sliding window of integers: in the
-- interpreted source, its rehashes cost the unordered run nine tenths of
-- its throughput.)
local FIRST_SLOTS = 1024

local function free_slots(n)
  local t = {}
  for k = 1, n do t[k] = false end
  return t
end

--- Notes that stream position i is line n.
function Run:note_line(i, n)
  local size = self.slots
  local k = i % size + 1
  if self.slot_pos[k] then
    -- Twice the slots: every position held moves to its new slot (two
    -- positions apart in size slots are apart in twice as many too), in
    -- new arrays that replace the old in one commit. Moved one by one
    -- into arrays already in place, an interrupt halfway lost the
    -- positions not yet moved: their lines were written and logged as
    -- line 0, which --resume does not know, and so ran again.
    local pos, line = self.slot_pos, self.slot_line
    local bigger = 2 * size
    local new_pos, new_line = free_slots(bigger), free_slots(bigger)
    for j = 1, size do
      local p = pos[j]
      if p then
        local m = p % bigger + 1
        new_pos[m], new_line[m] = p, line[j]
      end
    end
    commit(3, self, "slots", bigger, self, "slot_pos", new_pos, self, "slot_line", new_line)
    return self:note_line(i, n)
  end
  self.slot_pos[k], self.slot_line[k] = i, n
end

--- The line number of the call at stream position i, which is then
-- forgotten: each is asked for once.
function Run:line_of(i)
  local k = i % self.slots + 1
  if self.slot_pos[k] ~= i then return 0 end
  self.slot_pos[k] = false
  return self.slot_line[k]
end

--- The result of the call at position i: the output text, or
-- {status, text [, pid, start, seconds]} (see parallelize.cli_map_worker).
function Run:result(r, i)
  local line = self:line_of(i)
  if type(r) == "string" then
    self:succeeded(line, r)
  elseif r[1] == "ok" then
    self:succeeded(line, r[2], r[3], r[4], r[5])
  else
    self:failed(line, r[1], r[2], r[3], r[4], r[5])
  end
end

--- The error record of the call at position i: the function raised
-- (after its retries), the call timed out, or it killed its workers.
function Run:error(e, i)
  local line = self:line_of(i)
  local v = e.value
  local status, message, pid, start, seconds = "error", tostring(e.message)
  if e.kind == "timeout" then
    status, message, seconds = "timeout", format("timed out after %.14g s", self.timeout), self.timeout
  elseif e.kind == "killer" then
    -- "call 4 killed 3 workers ...": the pool's call number is not the
    -- line's (blank lines and --resume skip lines), which is said first.
    local id = tostring(e.id)
    status = "crashed"
    message = message:gsub("^call " .. id .. " ", "", 1):gsub(" while running call " .. id .. "$", "", 1)
  elseif type(v) == "table" and v.message ~= nil then
    message, pid, start, seconds = tostring(v.message), v.pid, v.start, v.seconds
  end
  local attempts = type(e.attempts) == "table" and #e.attempts or 0
  if attempts > 1 then message = format("%s (%d attempts)", message, attempts) end
  self:failed(line, status, message, pid, start, seconds)
end

--- Whether line `text` (number n) is to be skipped: done by an earlier
-- run (--resume), or blank (JSON lines may be separated by blank lines).
function Run:skipped(n, text)
  if self.done_before and self.done_before:has(n) then return true end
  return not self.opts.lines and not text:find("%S")
end

--- The stream's source: the next input line to run as {number, text}.
function Run:source()
  local stdin, EINTR = io.stdin, 4
  local interrupted = 0
  -- core.read_line, not stdin:read("*l"), which cuts a line at a NUL
  -- byte and joins the rest to the next line. A line a signal cut short
  -- comes in parts, gathered here.
  local parts, nparts = {}, 0
  local function next_line()
    while true do
      -- A slow input (`tail -f log |`) must not hold back the results of
      -- the lines before: while some are out, a line not there yet is
      -- parallelize.later, and the stream hands out what finished.
      if self.submitted > self.consumed and not line_ready(stdin) then return later end
      local text, err, code = read_line(stdin)
      if text == nil then
        if err == nil then
          self.eof = true
          return nil
        end
        -- Ctrl-C interrupts the read, and its hook raises "interrupted!"
        -- at the next call: the read is tried again until then.
        interrupted = interrupted + 1
        if code ~= EINTR or interrupted > 100 then error("cannot read the input: " .. tostring(err), 0) end
      elseif not err then
        nparts = nparts + 1
        parts[nparts] = text
      else
        if nparts > 0 then
          nparts = nparts + 1
          parts[nparts] = text
          text = concat(parts, "", 1, nparts)
          parts, nparts = {}, 0
        end
        interrupted = 0
        -- A line is counted read, with its bytes, and submitted in one
        -- commit: an interrupt between the read and the count leaves it
        -- to count_unread, which reads on from bytes_read; one between
        -- two separate assignments lost it from both counts.
        local n, bytes = self.lines_read + 1, self.bytes_read + #text + 1
        if self:skipped(n, text) then
          commit(2, self, "lines_read", n, self, "bytes_read", bytes)
        else
          local i = self.submitted + 1
          commit(3, self, "lines_read", n, self, "bytes_read", bytes, self, "submitted", i)
          self:note_line(i, n)
          return text
        end
      end
    end
  end
  -- Interpreted, so that Ctrl-C's hook always fires in it.
  jit.off(next_line)
  return next_line
end

--- How many lines of the input, not skipped, remain unread: none after
-- its end, counted when stdin is a regular file, nil otherwise (a pipe's
-- rest is not read: its writer may never end). The file is read through
-- a descriptor of its own, from the end of the last line counted: stdin's
-- stream may keep the error flag of a read that Ctrl-C interrupted.
function Run:count_unread()
  local EINTR = 4
  if self.eof then return 0 end
  -- From the end of the last line counted, not from stdin's position: a
  -- line read when an interrupt came, before it was counted, is past that.
  local at = self.start_at and self.start_at + self.bytes_read
  local f = at and io.open("/proc/self/fd/0", "rb")
  if not f then return nil end
  local n = 0
  if f:seek("set", at) then
    while true do
      local text, err, code = read_line(f)
      if text == nil then
        -- A read that fails (stdin a directory: the failure that stopped
        -- the run) leaves the rest uncounted, not counted as none: "0
        -- lines not done" was said of an input never read.
        if err ~= nil and code ~= EINTR then n = nil end
        if err == nil or code ~= EINTR then break end
      else
        self.lines_read = self.lines_read + 1
        if not self:skipped(self.lines_read, text) then n = n + 1 end
      end
    end
  end
  f:close()
  return n
end

--- A failure as a shell user reads it. Where in this library it was
-- raised means nothing there ("parallelize/cli_map.lua:341: no worker is
-- left..."): dropped. A bare lack of memory says whose.
local function describe_failure(err)
  local text = tostring(err):gsub("^[^\n:]*parallelize[/%w_]*%.lua:%d+: ", "", 1)
  if text == "not enough memory" then
    return "not enough memory in this process (its address space limit, or the machine's memory)"
  end
  return text
end

--- The end of a run cut short (Ctrl-C, --halt, an error): the pool is
-- stopped (`finish` as p:stop's), what finished is written, and the lines
-- not done are counted. Returns that count and whether it covers the
-- whole input.
function Run:cut_short(p, finish)
  -- What stop returns (the calls never run) is counted below as not done:
  -- a stop that ended every process but could not list them (short of
  -- memory) is enough, and what had finished is still taken and written.
  local stopped, stop_err = pcall(p.stop, p, finish)
  if not stopped and not tostring(stop_err):find("stop: the aborted calls could not be listed", 1, true) then
    error(stop_err, 0)
  end
  local results, ids, errors = p:take()
  for k, r in ipairs(results) do self:result(r, ids[k] - self.id_base) end
  for _, e in ipairs(errors) do self:error(e, e.id - self.id_base) end
  -- After a failed write nothing more is written, and the lines not
  -- written are not done either.
  if not self.write_error then
    local ok, err = pcall(self.flush, self)
    if not ok then self:say("%s", describe_failure(err)) end
  end
  local not_done = self.submitted - self.done + self.unwritten - self.unlogged
  local unread = self:count_unread()
  return not_done + (unread or 0), unread ~= nil
end

--- cut_short(p, 0) after a failure, which may have been a lack of memory
-- that the cut-short's own work meets again: tried twice (a stop and a
-- take that raised keep what they hold for the next), with a collection
-- between; then said, and counted from what was written.
function Run:cut_short_protected(p)
  local ok, count, whole = pcall(self.cut_short, self, p, 0)
  if ok then return count, whole end
  -- Ctrl-C (or SIGTERM, SIGHUP) during it, in a run that failed
  -- otherwise: tried again all the same (pzlua raises no second one), and
  -- the status and a line say it (main).
  if type(count) == "string" and count:find("interrupted!$") then self.interrupted_late = true end
  collectgarbage()
  ok, count, whole = pcall(self.cut_short, self, p, 0)
  if ok then return count, whole end
  self:say("could not take and write what had finished: %s", describe_failure(count))
  return self.submitted - self.done + self.unwritten - self.unlogged, false
end

function Run:not_done_message(count, whole)
  local rerun = self.log and format("; rerun with --resume --joblog %s to finish them", self.opts.joblog) or ""
  local unlogged = ""
  if self.unlogged > 0 then
    -- (a joblog write that failed may still have written some entries,
    -- whole: --resume skips those lines)
    unlogged = format("; the output's last %d lines went out, but not all their joblog entries: "
      .. "--resume runs those lines again", self.unlogged)
  end
  if whole then return format("%d lines not done%s%s", count, count > 0 and rerun or "", unlogged) end
  return format("%d lines read and not done, and the rest of the input not read%s%s", count, rerun, unlogged)
end

--- The pool, its workers ready; nil and why when the executor cannot be
-- loaded.
function Run:start_pool()
  local opts = self.opts
  local spec = opts.spec
  local timeout = opts.timeout
  self.timeout = timeout
  local p = parallelize.Parallelize(parallelize.Deferred(build_executor, {
    shape = spec.shape, name = spec.name, path = spec.path, code = spec.code,
    lines = opts.lines or false, spread = opts.spread or false, timing = opts.joblog ~= nil,
  }), {
    workers = opts.jobs, keep_results = false, timeout = timeout, retries = opts.retries,
    init_timeout = opts.init_timeout, max_calls = opts.max_calls,
    progress = opts.progress and "always" or false,
    -- (the run counts every line not done and says so: the pool's own
    -- warning, a pool dropped with calls unfinished, would say it again,
    -- with advice for a script)
    quiet = true,
  })
  local _ = p.executors -- every worker has loaded the function, or was given up
  local failed = p.init_errors[1]
  if failed then
    p:stop(0)
    local what = spec.shape == "inline" and "the inline function" or opts.executor
    return nil, format("cannot load %s: %s", what, tostring(failed.message))
  end
  return p
end

--- Streams stdin through the pool; returns the exit status.
function Run:stream(p)
  local ordered = self.opts.keep_order or false
  self.id_base = p.calls
  self.streaming = true
  -- The stream's narrow window, 256 lines a worker, kept: its default
  -- widens for string results (p:stream), and the input read ahead of a
  -- reader that does not keep up would grow with it (a MB and more of
  -- lines held, where the reader should set the pace).
  local window = math.max(64, 256 * p.size)
  for i, ok, r in p:stream(self:source(), { ordered = ordered, max_pending = window }) do
    self.consumed = self.consumed + 1
    if ok then self:result(r, i) else self:error(r, i) end
    if self.halted then break end
    -- Written when large, old, or when the stream holds no other result
    -- (it is about to wait). The counts are read without draining the
    -- pool (p.pending would drain it): the stream drains when it waits.
    if self.nout >= 2 * BATCH_LINES or self.outbytes >= BATCH_BYTES or self.nlog >= BATCH_LINES
        or now() - self.flushed_at >= BATCH_SECONDS
        or select(2, pool_counts(p)) <= self.consumed then
      self:flush()
    end
  end
  if self.halted then
    local halt = self.opts.halt
    local count, whole = self:cut_short(p, halt.when == "now" and 0 or nil)
    self:say("halted after %d failures (--halt %s,fail=%d): %s", self.failures, halt.when, halt.fail,
      self:not_done_message(count, whole))
  else
    self:flush()
    p:stop()
  end
  return min(self.failures, MAX_FAILURES)
end

--- Reads the joblog for --resume, then opens it; nil and why on failure.
function Run:open_joblog()
  local opts = self.opts
  if opts.resume then
    local done, err = joblog.read_done(opts.joblog, self.cjson, opts.resume_failed)
    if not done then return nil, format("cannot read the joblog: %s", tostring(err)) end
    self.done_before = done
  end
  local f, err = joblog.open(opts.joblog, opts.resume)
  if not f then return nil, format("cannot open the joblog: %s", tostring(err)) end
  self.log = f
  return true
end

--- Runs the command with the words after --map; `prog` names the program
-- in messages. Returns the exit status.
function M.main(prog, ...)
  local run = setmetatable({
    prefix = tostring(prog or "pzlua") .. " --map: ", clear_bar = "",
    outbuf = {}, nout = 0, outbytes = 0, logbuf = {}, nlog = 0, flushed_at = now(), id_base = 0,
    slots = FIRST_SLOTS, slot_pos = free_slots(FIRST_SLOTS), slot_line = free_slots(FIRST_SLOTS),
    lines_read = 0, bytes_read = 0, submitted = 0, consumed = 0, done = 0, unwritten = 0, unlogged = 0,
    failures = 0,
  }, Run)
  local opts, why = cli_args.parse({ ... })
  if not opts then
    run:say("%s", why)
    io.stderr:write("usage: ", tostring(prog or "pzlua"), " --map EXECUTOR [options] < inputs > outputs",
      " (--map --help: the options)\n")
    return STATUS_BROKEN
  end
  if opts.help then
    io.stdout:write(cli_args.usage)
    return 0
  end
  run.opts = opts
  local has_cjson, cjson = pcall(require, "cjson")
  if not has_cjson then
    run:say("lua-cjson is not installed (%s; Debian: apt-get install lua-cjson)",
      tostring(cjson):match("^[^\n]*"):gsub(":$", ""))
    return STATUS_BROKEN
  end
  run.cjson = cjson
  if opts.progress and core.isatty(2) then run.clear_bar = "\r\27[K" end
  io.stdout:setvbuf("no") -- each batch is one write, made when this file says
  run.start_at = io.stdin:seek("cur") -- nil for a pipe (count_unread)

  local p
  local ok, status = pcall(function()
    -- In here, so that a Ctrl-C while --resume reads a long joblog is
    -- one message and its status, as later (it was a traceback, 255).
    if opts.joblog then
      local opened, open_err = run:open_joblog()
      if not opened then
        run:say("%s", open_err)
        return STATUS_BROKEN
      end
    end
    local err
    p, err = run:start_pool()
    if not p then
      run:say("%s", err)
      return STATUS_BROKEN
    end
    return run:stream(p)
  end)
  if not ok then
    local interrupted = type(status) == "string" and status:find("interrupted!$") ~= nil
    local failure = describe_failure(status)
    -- pzlua's handler raises "interrupted!" for SIGTERM and SIGHUP too, and
    -- says which signal it was: the status is then 128 + its number.
    local signal = interrupted and M.signal_caught and M.signal_caught() or 0
    local how = SIGNAL_NAMES[signal] and "stopped by " .. SIGNAL_NAMES[signal] or "interrupted"
    -- A pool stopped by the run's own p:stop (--halt soon waits there for
    -- the running calls; the last one at the end) still has its finished
    -- calls to take, its batch to write and its lines to count.
    local said, say_err = pcall(function()
      if p and (not p.stopped or run.streaming) then
        local count, whole = run:cut_short_protected(p)
        if interrupted then
          run:say("%s: %d lines done, %s", how, run.done - run.unwritten + run.unlogged,
            run:not_done_message(count, whole))
        else
          run:say("%s", failure)
          run:say("stopped: %s", run:not_done_message(count, whole))
        end
      elseif interrupted then
        run:say("%s before any input was read", how)
      else
        run:say("%s", failure)
      end
    end)
    if not said then -- (short of memory even for this: what is freed now may let a line through)
      collectgarbage()
      pcall(run.say, run, "%s; then, stopping: %s", failure, describe_failure(say_err))
    end
    -- (a signal during the cut-short of a run that failed: its status)
    if not interrupted and (run.interrupted_late
        or type(say_err) == "string" and say_err:find("interrupted!$")) then
      interrupted = true
      signal = M.signal_caught and M.signal_caught() or 0
      pcall(run.say, run, "%s while stopping", SIGNAL_NAMES[signal] and "stopped by " .. SIGNAL_NAMES[signal]
        or "interrupted")
    end
    status = interrupted and (SIGNAL_NAMES[signal] and 128 + signal or STATUS_INTERRUPTED) or STATUS_BROKEN
  end
  if run.log then run.log:close() end
  if ok and status ~= STATUS_BROKEN and run.failures > 0 then
    run:say("%d of %d lines failed", run.failures, run.done)
  end
  return status
end

return M
