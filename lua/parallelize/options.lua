--- parallelize.options: the pool's options (names, defaults, ranges) and the
-- messages about values a caller got wrong. Policy lives here; the C core
-- trusts what this module has checked.
local core = require "parallelize.core"

local error, type, pairs, tostring, getmetatable = error, type, pairs, tostring, getmetatable
local format, floor, sort, concat = string.format, math.floor, table.sort, table.concat

local M = {}

--- How a message shows a value the caller gave: its type, and the value
-- itself when short ("a string \"3\"", "a boolean true", "a table").
function M.describe(v)
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
local describe = M.describe

--- True when v can be called: a function, or a value whose metatable has
-- __call (an executor, a Deferred constructor, `pzlua --map`'s function).
function M.is_callable(v)
  if type(v) == "function" then return true end
  local mt = getmetatable(v)
  return type(mt) == "table" and mt.__call ~= nil
end

-- name -> {default, kind, lowest, highest}; a nil default means "none".
local OPTIONS = {
  max_deaths = { 3, "integer", 1, 255 },
  respawn = { true, "boolean" },
  max_message = { 1024 ^ 3, "integer", 1024, core.max_message_limit },
  max_inflight = { 16384, "integer", 1, 2 ^ 20 },
  window = { 0.004, "number", 0, 3600 },
  init_attempts = { 5, "integer", 1, 1000 },
  kill_grace = { 1, "number", 0, 3600 },
  spin = { 100e-6, "number", 0, 0.01 },
  kill_leftovers = { true, "boolean" },
  max_pending = { nil, "integer", 1, 2 ^ 40 },
  max_pending_bytes = { 64 * 1024 ^ 2, "integer", 1, 2 ^ 50 },
  keep_results = { true, "boolean" },
  workers = { nil, "integer", 1, 100000 },
  timeout = { nil, "number", 0.001, 4e6 },
  init_timeout = { nil, "number", 0.001, 4e6 },
  retries = { 0, "integer", 0, 255 },
  max_calls = { nil, "integer", 1, 2 ^ 53 },
  fail_fast = { false, "boolean" },
  progress = { false, "progress" },
  quiet = { false, "boolean" },
  launcher = { nil, "launcher" },
}
M.OPTIONS = OPTIONS

-- The valid option names, sorted, for the message about an unknown one.
local names = {}
for name in pairs(OPTIONS) do names[#names + 1] = name end
sort(names)
local OPTION_NAMES = concat(names, ", ")

--- Checks one value against its option's kind and range; raises at `level`
-- with `who` ("Parallelize") naming the caller.
function M.check_value(who, name, v, level)
  local o = OPTIONS[name]
  if o[2] == "progress" then
    if type(v) ~= "boolean" and v ~= "always" then
      error(format('%s: option %s must be a boolean or "always" (got %s)', who, name, describe(v)), level + 1)
    end
  elseif o[2] == "launcher" then
    if not M.is_callable(v) then
      error(format("%s: option launcher must be a function(slot) returning a command, or what "
        .. "parallelize.ssh{...} or parallelize.srun{...} return (got %s)", who, describe(v)), level + 1)
    end
  elseif o[2] == "boolean" then
    if type(v) ~= "boolean" then
      error(format("%s: option %s must be a boolean (got %s)", who, name, describe(v)), level + 1)
    end
  elseif type(v) ~= "number" or v ~= v or v < o[3] or v > o[4]
      or (o[2] == "integer" and v ~= floor(v)) then
    -- A number is shown bare ("got 0"), anything else with its type.
    error(format("%s: option %s must be %s from %s to %s (got %s)", who, name,
      o[2] == "integer" and "an integer" or "a number", tostring(o[3]), tostring(o[4]),
      type(v) == "number" and tostring(v) or describe(v)), level + 1)
  end
end

--- The options table `opts` (or nil) checked and completed with the
-- defaults; raises at `level` (as error counts it, from the caller of
-- check) naming `who`.
function M.check(who, opts, level)
  level = level + 1
  if opts ~= nil and type(opts) ~= "table" then
    error(who .. ": options must be a table (got " .. describe(opts) .. ")", level)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not OPTIONS[k] then
      error(format("%s: unknown option %s (the options are %s)", who,
        type(k) == "string" and "'" .. k .. "'" or "[" .. tostring(k) .. "]", OPTION_NAMES), level)
    end
  end
  local out = {}
  for name, o in pairs(OPTIONS) do
    local v = opts[name]
    if v == nil then
      v = o[1]
    else
      M.check_value(who, name, v, level)
    end
    out[name] = v
  end
  return out
end

--- The documented defaults (options whose default is "none" are absent).
M.defaults = {}
for name, o in pairs(OPTIONS) do M.defaults[name] = o[1] end

return M
