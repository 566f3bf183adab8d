--- parallelize.cli_map_args: the command line of `pzlua --map` (what
-- follows --map), read into a table of options, and its help text.
--
-- Rules this file owns: options may come before or after the executor,
-- as `--name value`, `--name=value`, or `-jN`/`-j N`; exactly one word is
-- the executor; every value is checked here, so that a mistake is one
-- message naming the option before anything runs. What the executor word
-- means (a module function, a file, an inline function) is decided here
-- too; loading it is the worker's (parallelize.cli_map_worker).
local format, floor, tonumber = string.format, math.floor, tonumber

local M = {}

M.usage = [[
usage: pzlua --map EXECUTOR [options] < inputs > outputs

Calls a Lua function on every line of stdin in parallel worker processes,
and writes one result per line on stdout. Each line is a JSON value, passed
as the function's argument; each result is written as JSON (nil as null).

EXECUTOR is one of:
  mymod.clean                  function clean of module mymod (require)
  script.lua:clean             function clean that script.lua returns in a
                               table, or defines as a global
  script.lua                   the function that script.lua returns
  'function(rec) ... end'      an inline function (one shell word)

Options:
  -j N, --jobs N               N workers (default: the CPUs)
  -k, --keep-order             write results in input order (default: as
                               calls finish)
  --lines                      pass each line as a string, not JSON; write
                               string results as they are
  --spread                     a JSON array line is the function's arguments
  --timeout S                  a call running longer than S seconds fails,
                               its worker is ended and replaced
  --retries N                  a call whose function raised runs up to N
                               more times
  --init-timeout S             a worker that has not loaded the function
                               within S seconds is ended and started again;
                               after 5 such tries, the run stops (status 255)
  --max-calls N                replace each worker after N calls
  --halt now,fail=N            after N failures, end the running calls and stop
  --halt soon,fail=N           after N failures, start no other line, let the
                               running calls finish and stop
  --joblog FILE                append one JSON line per finished line to FILE:
                               line, pid, start, seconds, status, error
  --resume                     with --joblog: skip the lines FILE shows done
  --resume-failed              with --joblog: skip only the lines FILE shows
                               succeeded
  --progress                   a progress line on stderr
  -h, --help                   this help

Failures (an error, a timeout, a line that is not JSON) are reported on
stderr with their line numbers; the exit status is the number of failed
lines, at most 101, 0 when all succeeded; 130 after Ctrl-C, 143 after
SIGTERM, 129 after SIGHUP (each stops the run and says how many lines were
not done); 255 for a usage error or an executor that cannot be loaded.
]]

--- What the executor word names: {shape = "inline", code =}, {shape =
-- "file", path =, name =} or {shape = "module", name =}; nil and why.
function M.executor(word)
  if word:match("^%s*function[%s(]") then
    return { shape = "inline", code = word }
  end
  local path, name = word:match("^(.+%.lua):([%a_][%w_.]*)$")
  if path then
    return { shape = "file", path = path, name = name }
  end
  if word:match("%.lua$") or word:find("/", 1, true) then
    return { shape = "file", path = word }
  end
  if word:match("^[%a_][%w_]*$") or word:match("^[%a_][%w_]*[%w_.]*[%w_]$") and not word:find("..", 1, true) then
    return { shape = "module", name = word }
  end
  return nil, format("'%s' is not an executor: name a module function (mymod.clean), a file "
    .. "(script.lua or script.lua:clean) or write an inline function ('function(x) ... end')", word)
end

local function integer(option, v, lowest, highest)
  local n = tonumber(v)
  if not n or n ~= floor(n) or n < lowest or n > highest then
    return nil, format("%s needs an integer from %d to %d (got '%s')", option, lowest, highest, v)
  end
  return n
end

--- The value of --halt: {when = "now" | "soon", fail = N}.
local function halt(v)
  local when, n = v:match("^(%a+),fail=(%d+)$")
  if not when or (when ~= "now" and when ~= "soon") or tonumber(n) < 1 then
    return nil, format("--halt needs now,fail=N or soon,fail=N with N at least 1 (got '%s')", v)
  end
  return { when = when, fail = tonumber(n) }
end

-- option -> {field, kind}: kind "flag", or how a value is read.
local OPTIONS = {
  ["-j"] = { "jobs", "jobs" }, ["--jobs"] = { "jobs", "jobs" },
  ["-k"] = { "keep_order", "flag" }, ["--keep-order"] = { "keep_order", "flag" },
  ["--lines"] = { "lines", "flag" },
  ["--spread"] = { "spread", "flag" },
  ["--timeout"] = { "timeout", "seconds" },
  ["--init-timeout"] = { "init_timeout", "seconds" },
  ["--retries"] = { "retries", "retries" },
  ["--max-calls"] = { "max_calls", "max_calls" },
  ["--halt"] = { "halt", "halt" },
  ["--joblog"] = { "joblog", "file" },
  ["--resume"] = { "resume", "flag" },
  ["--resume-failed"] = { "resume_failed", "flag" },
  ["--progress"] = { "progress", "flag" },
  ["-h"] = { "help", "flag" }, ["--help"] = { "help", "flag" },
}

local READ = {
  jobs = function(o, v) return integer(o, v, 1, 100000) end,
  retries = function(o, v) return integer(o, v, 0, 255) end,
  max_calls = function(o, v) return integer(o, v, 1, 2 ^ 53) end,
  seconds = function(o, v)
    local n = tonumber(v)
    if not (n and n >= 0.001 and n <= 4e6) then -- (NaN compares false either way)
      return nil, format("%s needs a number of seconds from 0.001 to 4000000 (got '%s')", o, v)
    end
    return n
  end,
  halt = function(_, v) return halt(v) end,
  file = function(o, v)
    if v == "" then return nil, o .. " needs a file name" end
    return v
  end,
}

--- Reads the words after --map; returns the options, or nil and the
-- message for a usage error.
function M.parse(words)
  local opts, executor = {}, nil
  local i, only_words = 1, false
  while i <= #words do
    local w = words[i]
    if only_words or w:sub(1, 1) ~= "-" or w == "-" then
      if executor then
        return nil, format("one executor only: '%s' and '%s' (quote an inline function as one word)",
          executor, w)
      end
      executor = w
    elseif w == "--" then
      only_words = true
    else
      local name, value = w:match("^(%-%-[%w-]+)=(.*)$")
      if not name then
        name = w
        if w:match("^%-j.") then name, value = "-j", w:sub(3) end
      end
      local o = OPTIONS[name]
      if not o then return nil, format("unknown option '%s'", w) end
      local field, kind = o[1], o[2]
      if kind == "flag" then
        if value then return nil, format("%s takes no value", name) end
        opts[field] = true
      else
        if not value then
          i = i + 1
          value = words[i]
          if value == nil then return nil, format("%s needs a value", name) end
        end
        local v, err = READ[kind](name, value)
        if v == nil then return nil, err end
        opts[field] = v
      end
    end
    i = i + 1
  end
  if opts.help then return opts end
  if not executor then return nil, "no executor given" end
  local spec, err = M.executor(executor)
  if not spec then return nil, err end
  opts.executor, opts.spec = executor, spec
  if opts.lines and opts.spread then return nil, "--lines and --spread do not go together" end
  if opts.resume_failed then opts.resume = true end
  if opts.resume and not opts.joblog then
    return nil, (opts.resume_failed and "--resume-failed" or "--resume") .. " needs --joblog FILE"
  end
  return opts
end

return M
