--- parallelize: run Lua calls in parallel worker processes.
--
-- The public API. The mechanism (codec, processes, the I/O thread) lives in
-- the C module parallelize.core; this file checks arguments, fills in
-- defaults and gives the pool its Lua shape. See docs/api.md.

-- The C module is built against LuaJIT 2.1 and uses its API and bytecode:
-- anywhere else (PUC Lua, LuaJIT 2.0) say so, before loading it fails with
-- an undefined symbol.
if type(jit) ~= "table" or (jit.version_num or 0) < 20100 then
  error("parallelize needs LuaJIT 2.1 (this is " .. (type(jit) == "table" and tostring(jit.version) or _VERSION)
    .. ")", 0)
end

local core = require "parallelize.core"

local error, type, select, pairs, ipairs = error, type, select, pairs, ipairs
local getmetatable, setmetatable, tostring, pcall = getmetatable, setmetatable, tostring, pcall
local format, floor, sort, concat = string.format, math.floor, table.sort, table.concat
local rawgetmetatable = debug.getmetatable -- the pool's metatable hides itself

local pool_new, pool_wait, pool_drain = core.pool_new, core.pool_wait, core.pool_drain
local pool_stop, pool_env, pool_counts = core.pool_stop, core.pool_env, core.pool_counts
local pool_size, pool_stopped, now = core.pool_size, core.pool_stopped, core.now

local M = {
  _VERSION = "parallelize 0.1.0",
  null = core.null,
  encode = core.encode,
  decode = core.decode,
  getpid = core.getpid,
  sleep = core.sleep,
}

local function pack(...)
  return { n = select("#", ...), ... }
end

--- How a message shows a value the caller gave: its type, and the value
-- itself when short ("a string \"3\"", "a boolean true", "a table").
local function describe(v)
  local t = type(v)
  if t == "string" then
    return format("a string %q", #v > 40 and v:sub(1, 40) .. "..." or v)
  elseif t == "boolean" or t == "number" then
    return format("a %s %s", t, tostring(v))
  elseif t == "nil" then
    return "nil"
  end
  return "a " .. t
end

--- True when v can be called: a function, or a value whose metatable has
-- __call.
local function is_callable(v)
  if type(v) == "function" then return true end
  local mt = getmetatable(v)
  return type(mt) == "table" and mt.__call ~= nil
end

-- Deferred -----------------------------------------------------------------

local Deferred_mt = {
  __tostring = function(d) return "Deferred(" .. tostring(d.ctor) .. ")" end,
}

--- Deferred(ctor, ...): an executor built inside its worker by ctor(...).
function M.Deferred(ctor, ...)
  if ctor == M then error("use parallelize.Deferred(...), not parallelize:Deferred(...)", 2) end
  if not is_callable(ctor) then
    error(format("Deferred: the constructor is not callable (a %s)", type(ctor)), 2)
  end
  return setmetatable({ ctor = ctor, args = pack(...) }, Deferred_mt)
end

--- True when v was made by Deferred.
function M.is_deferred(v)
  return getmetatable(v) == Deferred_mt
end

--- rep(v, n) -> {v, v, ... n times}: turnkey-pylib's `[f] * 50` in Lua.
function M.rep(v, n)
  if type(n) ~= "number" or n < 0 or n ~= floor(n) then
    error("rep: n must be a non-negative integer (got " .. tostring(n) .. ")", 2)
  end
  local t = {}
  for i = 1, n do t[i] = v end
  return t
end

-- Options -------------------------------------------------------------------

-- name -> {default, kind, lowest, highest}
local OPTIONS = {
  max_deaths = { 3, "integer", 1, 255 },
  respawn = { true, "boolean" },
  max_message = { 1024 ^ 3, "integer", 1024, core.max_message_limit },
  max_inflight = { 256, "integer", 1, 2 ^ 20 },
  window = { 0.002, "number", 0, 3600 },
  init_attempts = { 5, "integer", 1, 1000 },
  kill_grace = { 1, "number", 0, 3600 },
  spin = { 100e-6, "number", 0, 0.01 },
  kill_leftovers = { true, "boolean" },
  launcher = { false, "launcher" },
}

-- The valid option names, sorted, for the message about an unknown one.
local OPTION_NAMES = {}
for name in pairs(OPTIONS) do OPTION_NAMES[#OPTION_NAMES + 1] = name end
sort(OPTION_NAMES)
OPTION_NAMES = concat(OPTION_NAMES, ", ")

local function check_options(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("Parallelize: options must be a table (got " .. describe(opts) .. ")", 3)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not OPTIONS[k] then
      error(format("Parallelize: unknown option %s (the options are %s)",
        type(k) == "string" and "'" .. k .. "'" or "[" .. tostring(k) .. "]", OPTION_NAMES), 3)
    end
  end
  local out = {}
  for name, o in pairs(OPTIONS) do
    local v = opts[name]
    if v == nil then
      v = o[1]
    elseif o[2] == "launcher" then
      if v ~= false and not is_callable(v) then
        error(format("Parallelize: option launcher must be a function(slot) returning a command, "
          .. "or what parallelize.ssh{...} or parallelize.srun{...} return (got %s)", describe(v)), 3)
      end
    elseif o[2] == "boolean" then
      if type(v) ~= "boolean" then
        error(format("Parallelize: option %s must be a boolean (got %s)", name, describe(v)), 3)
      end
    else
      if type(v) ~= "number" or v ~= v or v < o[3] or v > o[4]
          or (o[2] == "integer" and v ~= floor(v)) then
        -- A number is shown bare ("got 0"), anything else with its type.
        error(format("Parallelize: option %s must be %s from %s to %s (got %s)", name,
          o[2] == "integer" and "an integer" or "a number", tostring(o[3]), tostring(o[4]),
          type(v) == "number" and tostring(v) or describe(v)), 3)
      end
    end
    out[name] = v
  end
  return out
end

-- Executors -----------------------------------------------------------------

--- The spec the C core sends to worker i for executor e, or an error.
local function executor_spec(e, i)
  if M.is_deferred(e) then
    return { kind = "deferred", spec = e.ctor, args = e.args }
  end
  local t = type(e)
  if t == "string" then
    if not e:match("^[%a_][%w_]*[%w_.-]*$") or e:find("..", 1, true) or e:sub(-1) == "." then
      error(format("executor %d: %q is not a module name such as \"mod.func\"", i, e), 3)
    end
    return { kind = "module", spec = e, args = { n = 0 } }
  end
  if is_callable(e) and t ~= "userdata" then
    return { kind = "value", spec = e, args = { n = 0 } }
  end
  error(format("executor %d is not callable (a %s)", i, t), 3)
end

-- Launchers ----------------------------------------------------------------
--
-- A launcher is a command that ends up running `pzlua --worker` somewhere,
-- with its stdin and stdout connected back: the pool starts one per worker
-- slot, with the argv that launcher(slot) returns, and talks to the worker
-- through the command's stdin and stdout. ssh{...} and srun{...} make the
-- usual ones.

--- The argv launcher(i) gives worker slot i, checked: a non-empty array of
-- strings (numbers become strings).
local function launcher_argv(launcher, i)
  local ok, argv = pcall(launcher, i)
  if not ok then
    error(format("Parallelize: the launcher of worker %d raised: %s", i, tostring(argv)), 0)
  end
  if type(argv) ~= "table" or argv[1] == nil then
    error(format("Parallelize: the launcher of worker %d returned %s, not a command (an array of strings)",
      i, describe(argv)), 0)
  end
  local words = {}
  for k = 1, #argv do
    local a = argv[k]
    if type(a) == "number" then a = tostring(a) end
    if type(a) ~= "string" or a:find("\0", 1, true) then
      error(format("Parallelize: word %d of the launcher's command for worker %d is %s, not a string",
        k, i, describe(argv[k])), 0)
    end
    words[k] = a
  end
  return words
end

local Launcher_mt = {
  __call = function(self, slot) return self.command_of(slot) end,
  __tostring = function(self) return "parallelize launcher (" .. self.kind .. ")" end,
}

--- Checks the keys of a launcher's spec table: the array part, and the
-- named fields in `known`.
local function check_spec(what, spec, known)
  if type(spec) ~= "table" then
    error(format("%s: expects a table such as %s{ ... } (got %s)", what, what, describe(spec)), 3)
  end
  for k in pairs(spec) do
    if not (type(k) == "number" and k >= 1 and k <= #spec and k == floor(k)) and not known[k] then
      local names = {}
      for name in pairs(known) do names[#names + 1] = name end
      sort(names)
      error(format("%s: unknown field %s (the fields are %s)", what,
        type(k) == "string" and "'" .. k .. "'" or "[" .. tostring(k) .. "]", concat(names, ", ")), 3)
    end
  end
end

--- A list of words from a string (one word) or an array of strings.
local function words_of(what, field, v, default)
  if v == nil then v = default end
  if type(v) == "string" and v ~= "" then return { v } end
  if type(v) == "table" and #v > 0 then
    local list = {}
    for i = 1, #v do
      if type(v[i]) ~= "string" then
        error(format("%s: %s[%d] must be a string (got %s)", what, field, i, describe(v[i])), 3)
      end
      list[i] = v[i]
    end
    return list
  end
  error(format("%s: %s must be a non-empty string or array of strings (got %s)", what, field, describe(v)), 3)
end

--- A word quoted for a POSIX shell (the remote login shell of ssh).
local function shell_quote(word)
  if word:match("^[%w@%%+=:,./_-]+$") then return word end
  return "'" .. word:gsub("'", "'\\''") .. "'"
end

local function append(list, more)
  for _, v in ipairs(more) do list[#list + 1] = v end
  return list
end

local SSH_FIELDS = { per_host = true, options = true, command = true, program = true }

--- ssh{host, ... [, per_host =] [, options =] [, command =] [, program =]}:
-- a launcher that starts each worker with ssh on one of the hosts. Without
-- per_host, worker slots go round the hosts; with it, the first per_host
-- slots go to the first host, the next per_host to the second, and so on.
function M.ssh(spec)
  if spec == M then error("use parallelize.ssh{...}, not parallelize:ssh{...}", 2) end
  check_spec("ssh", spec, SSH_FIELDS)
  local hosts = {}
  for i = 1, #spec do
    local h = spec[i]
    if type(h) ~= "string" or h == "" or h:sub(1, 1) == "-" then
      error(format("ssh: host %d must be a destination such as \"node1\" or \"user@node2\" (got %s)", i,
        describe(h)), 2)
    end
    hosts[i] = h
  end
  if #hosts == 0 then error("ssh: no host given: ssh{\"node1\", \"user@node2\", ...}", 2) end
  local per_host = spec.per_host
  if per_host ~= nil and (type(per_host) ~= "number" or per_host < 1 or per_host ~= floor(per_host)) then
    error(format("ssh: per_host must be a positive integer (got %s)", describe(per_host)), 2)
  end
  local options = spec.options == nil and {} or words_of("ssh", "options", spec.options)
  local remote = {}
  for i, w in ipairs(words_of("ssh", "command", spec.command, "pzlua")) do
    -- a single string is the user's shell command as written; a list is
    -- quoted word by word
    remote[i] = type(spec.command) == "table" and shell_quote(w) or w
  end
  remote[#remote + 1] = "--worker"
  remote = concat(remote, " ")
  -- What the protocol needs comes first: no terminal (a pty would mangle
  -- the frames), no escape character, never a password prompt on the
  -- protocol's stdin. The user's options come next, so that theirs win
  -- over the defaults after them (ssh keeps the first value it is given):
  -- keepalives that notice a dead link in 15 s, a bound on connecting.
  local base = append(words_of("ssh", "program", spec.program, "ssh"),
    { "-T", "-e", "none", "-o", "BatchMode=yes" })
  append(base, options)
  append(base, { "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=30" })
  return setmetatable({
    kind = "ssh", hosts = hosts, per_host = per_host,
    command_of = function(slot)
      local h
      if per_host then
        h = floor((slot - 1) / per_host) + 1
        if h > #hosts then
          error(format("ssh: worker %d has no place: %d host%s x per_host %d = %d workers", slot, #hosts,
            #hosts == 1 and "" or "s", per_host, #hosts * per_host), 0)
        end
      else
        h = (slot - 1) % #hosts + 1
      end
      return append(append({}, base), { "--", hosts[h], remote })
    end,
  }, Launcher_mt)
end

local SRUN_FIELDS = { command = true, program = true }

--- srun{option, ... [, command =] [, program =]}: a launcher that starts
-- each worker as a one-task job step (or job) with Slurm's srun; the array
-- holds srun's options.
function M.srun(spec)
  if spec == M then error("use parallelize.srun{...}, not parallelize:srun{...}", 2) end
  check_spec("srun", spec, SRUN_FIELDS)
  local argv = words_of("srun", "program", spec.program, "srun")
  for i = 1, #spec do
    if type(spec[i]) ~= "string" then
      error(format("srun: option %d must be a string (got %s)", i, describe(spec[i])), 2)
    end
    argv[#argv + 1] = spec[i]
  end
  -- After the user's options, so that they win: one task (one worker per
  -- srun), and output unbuffered (srun otherwise holds a partial line
  -- back, and a frame rarely ends with a newline).
  append(argv, { "--ntasks=1", "--unbuffered" })
  append(argv, words_of("srun", "command", spec.command, "pzlua"))
  argv[#argv + 1] = "--worker"
  return setmetatable({
    kind = "srun",
    command_of = function() return append({}, argv) end,
  }, Launcher_mt)
end

-- The pool ------------------------------------------------------------------

local pool_mt = core.pool_metatable
local methods = {}

--- Every method starts with this: a method called with a dot (`p.wait()`)
-- gets no pool as its first argument, and the user is told so rather than
-- about a bad argument to some function of the core.
local function check_self(p, method)
  if rawgetmetatable(p) ~= pool_mt then
    error(format("use p:%s(), not p.%s()", method, method), 3)
  end
end

--- Waits on the pool for `what` ("calls" or "init") until the deadline
-- (monotonic seconds, or nil). A signal returns from the C wait so that an
-- interrupt hook (Ctrl-C's "interrupted!") fires here; otherwise the wait
-- goes on. Returns the final status.
local function wait_loop(p, what, deadline)
  while true do
    local left
    if deadline then
      left = deadline - now()
      if left < 0 then left = 0 end
    end
    local status = pool_wait(p, what, left)
    if status ~= "interrupted" then return status end
  end
end

-- This file's chunk name, to tell its functions from the user's.
local THIS_SOURCE = debug.getinfo(1, "S").source

--- The stack level, as its caller counts, of the first function that is not
-- in this file: the user's code that called into the API (or a C function
-- such as pcall, which has no position).
local function user_level()
  local level = 3 -- 1 is user_level, 2 its caller
  while true do
    local info = debug.getinfo(level, "S")
    if not info or info.source ~= THIS_SOURCE then return level - 1 end
    level = level + 1
  end
end

--- wait_loop, with Ctrl-C's "interrupted!" raised at the user's line: the
-- interrupt hook raises it with the position of the Lua code running,
-- ours; it is caught here and raised again from the user's level. Other
-- errors go through unchanged.
local function wait_for(p, what, deadline)
  local ok, status = pcall(wait_loop, p, what, deadline)
  if ok then return status end
  if type(status) == "string" and status:sub(-12) == "interrupted!" then
    error("interrupted!", user_level())
  end
  error(status, 0)
end
-- Interrupt hooks fire only in the interpreter: compiled (or stitched)
-- code would loop back into the C wait without noticing Ctrl-C.
if jit then
  jit.off(wait_loop)
  jit.off(wait_for)
end

--- p:wait([timeout]) -> true when every queued call has finished, false
-- when timeout seconds passed first. Raises when no worker is left.
function methods.wait(p, timeout)
  check_self(p, "wait")
  if pool_stopped(p) then error("wait: the pool is stopped", 2) end
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0 or timeout ~= timeout) then
    error("wait: timeout must be a non-negative number (got "
      .. (type(timeout) == "number" and tostring(timeout) or describe(timeout)) .. ")", 2)
  end
  local status = wait_for(p, "calls", timeout and now() + timeout)
  if status == "fatal" then error(pool_env(p).fatal, 2) end
  return status == "done"
end

--- p:stop([finish_timeout]) -> the arguments of every call that never
-- finished, each {n =, id =, ...}.
function methods.stop(p, finish_timeout)
  check_self(p, "stop")
  if finish_timeout ~= nil and (type(finish_timeout) ~= "number" or finish_timeout < 0
      or finish_timeout ~= finish_timeout) then
    error("stop: finish_timeout must be a non-negative number (got "
      .. (type(finish_timeout) == "number" and tostring(finish_timeout) or describe(finish_timeout)) .. ")", 2)
  end
  return pool_stop(p, finish_timeout)
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- Properties: computed on each read.
local properties = {}

-- The tables the I/O thread's records are drained into (see src/lpool.c).
for _, name in ipairs({ "results", "ids", "errors", "init_errors" }) do
  properties[name] = function(p)
    pool_drain(p)
    return pool_env(p)[name]
  end
end

--- Waits for every worker to initialize (or be given up), then returns
-- the copies of the initialized executors in worker order.
function properties.executors(p)
  if not pool_stopped(p) then wait_for(p, "init") end
  local env, list = pool_env(p), {}
  local execs = env.executors
  for i = 1, pool_size(p) do
    if execs[i] ~= nil then list[#list + 1] = execs[i] end
  end
  return list
end

function properties.pids(p)
  pool_drain(p)
  return copy(pool_env(p).pids)
end

function properties.size(p)
  return pool_size(p)
end

function properties.calls(p)
  return (pool_counts(p))
end

function properties.pending(p)
  pool_drain(p)
  local calls, finished = pool_counts(p)
  if pool_stopped(p) then return 0 end
  return calls - finished
end

function properties.stopped(p)
  return pool_stopped(p)
end

pool_mt.__index = function(p, k)
  local m = methods[k]
  if m then return m end
  local prop = properties[k]
  if prop then return prop(p) end
  return nil
end

pool_mt.__newindex = function(_, k)
  error("cannot set field '" .. tostring(k) .. "' of a pool", 2)
end

--- Parallelize(executors [, options]) -> p: one worker process per
-- executor. See docs/api.md for executors and options.
function M.Parallelize(executors, options)
  if executors == M then error("use parallelize.Parallelize(...), not parallelize:Parallelize(...)", 2) end
  if type(executors) ~= "table" then
    error("Parallelize: executors must be an array (got a " .. type(executors) .. ")", 2)
  end
  local n = #executors
  if n == 0 then error("Parallelize: executors must be a non-empty array", 2) end
  local opts = check_options(options)
  local specs = {}
  for i = 1, n do
    local e = executors[i]
    specs[i] = executor_spec(e, i)
  end
  local launcher = opts.launcher
  if launcher then
    for i = 1, n do
      local ok, argv = pcall(launcher_argv, launcher, i)
      if not ok then error(argv, 2) end
      specs[i].launcher = argv
    end
  end
  return pool_new(specs, opts)
end

-- The documented option defaults, for reference.
M.defaults = {}
for name, o in pairs(OPTIONS) do M.defaults[name] = o[1] end

return M
