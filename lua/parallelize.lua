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
local options = require "parallelize.options"
local pool = require "parallelize.pool"
local caller = require "parallelize.caller"
local launchers = require "parallelize.launchers"
caller.mark()

local error, type, select, pairs, pcall = error, type, select, pairs, pcall
local getmetatable, setmetatable, tostring = getmetatable, setmetatable, tostring
local format, floor = string.format, math.floor
local describe = options.describe

local M = {
  _VERSION = "parallelize 0.1.0",
  null = core.null,
  encode = core.encode,
  decode = core.decode,
  getpid = core.getpid,
  sleep = core.sleep,
  cpu_count = core.cpu_count,
  forkserver = core.forkserver,
  ssh = launchers.ssh,
  srun = launchers.srun,
  later = pool.later,
}

local function pack(...)
  return { n = select("#", ...), ... }
end

local is_callable = options.is_callable

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

-- Executors -----------------------------------------------------------------

--- True when v is one executor (not an array of them).
local function is_executor(v)
  return type(v) ~= "table" or is_callable(v) or M.is_deferred(v)
end

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

--- Parallelize(executors [, options]) -> p: one worker process per element
-- of the array `executors`, or `options.workers` copies (default: the CPUs
-- this process may run on) of a single executor. See docs/api.md.
function M.Parallelize(executors, opts)
  if executors == M then error("use parallelize.Parallelize(...), not parallelize:Parallelize(...)", 2) end
  local o = options.check("Parallelize", opts, 2)
  local list = executors
  if is_executor(executors) then
    if type(executors) ~= "string" and not is_callable(executors) and not M.is_deferred(executors) then
      error("Parallelize: executors must be an array or one executor (got " .. describe(executors) .. ")", 2)
    end
    list = M.rep(executors, o.workers or core.cpu_count())
  elseif o.workers then
    error("Parallelize: option workers is for a single executor; an array has one worker per element", 2)
  end
  local n = #list
  if n == 0 then error("Parallelize: executors must be a non-empty array", 2) end
  local specs = {}
  for i = 1, n do specs[i] = executor_spec(list[i], i) end
  if o.launcher then
    for i = 1, n do
      local ok, argv = pcall(launchers.argv, o.launcher, i)
      if not ok then error(argv, 2) end
      specs[i].launcher = argv
    end
  end
  local c_opts = {}
  for k, v in pairs(o) do c_opts[k] = v end
  c_opts.max_pending = o.max_pending or 0
  c_opts.timeout = o.timeout or 0
  c_opts.init_timeout = o.init_timeout or 0
  c_opts.max_calls = o.max_calls or 0
  return pool.init(core.pool_new(specs, c_opts), o)
end

--- map(f, list [, options]) -> the first result of f(list[i]) for every i,
-- in input order (null for nil), computed by a pool of options.workers
-- (default: the CPUs) that is stopped afterwards. Raises on the first
-- error, with the item's index, the message and the traceback.
function M.map(f, list, opts)
  if type(list) ~= "table" then error("map: list must be an array (got " .. describe(list) .. ")", 2) end
  if not is_executor(f) then error("map: f must be one executor (got " .. describe(f) .. ")", 2) end
  local p = M.Parallelize(f, opts)
  local ok, out = pcall(pool.map, p, list, "map")
  if ok then
    p:stop()
    return out
  end
  p:stop(0)
  caller.reraise(out)
end

-- The documented option defaults, for reference.
M.defaults = options.defaults

return M
