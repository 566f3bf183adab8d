--- parallelize.cli_map_worker: the worker side of `pzlua --map`. Each
-- worker builds its executor here (a Deferred constructor): it loads the
-- user's function, then wraps it so that one call takes one input line,
-- decodes it, calls the function, encodes its first result and says where
-- and when it ran.
--
-- Rules this file owns:
-- - A call's argument is its line's text; its result is the output text
--   (JSON, or a string as it is with --lines) when the line succeeded and
--   no timing was asked for, else {status, text [, pid, start, seconds]}:
--   status "ok" with the output text, or a failure that retrying cannot
--   mend ("bad input": the line is not JSON, or not an array with
--   --spread; "bad result": JSON cannot hold what the function returned)
--   with its message. Those are returned, never raised. (Strings travel
--   without the encoder's tables: the parent keeps the line numbers.)
-- - An error the user's function raises is raised again, so that the
--   pool's retries apply, as a table that carries the pid, start and
--   duration of the attempt; its __tostring is the message.
-- - stdout carries the results: what the user's function prints goes to
--   stderr.
-- - A function that cannot be loaded raises one message that says what
--   was tried and why it failed: the pool gives the worker up with it.
local core = require "parallelize.core"
local is_callable = require("parallelize.options").is_callable

local type, pcall, tostring, unpack = type, pcall, tostring, unpack
local getmetatable, setmetatable = getmetatable, setmetatable
local format, concat = string.format, table.concat
local now, getpid, json_encode = core.now, core.getpid, core.json_encode

local M = {}

-- Arrays this long are checked before --spread passes them (see call).
local BIG_SPREAD = 4000

-- The C functions this file needs, declared under names of our own
-- (asm labels) so that a user's ffi.cdef of the same functions never
-- clashes with ours.
local ffi = require "ffi"
pcall(ffi.cdef, [[
struct pz_map_timespec { long tv_sec; long tv_nsec; };
int pz_map_clock_gettime(int clock, struct pz_map_timespec *ts) __asm__("clock_gettime");
int pz_map_dup2(int from, int to) __asm__("dup2");
]])
local C = ffi.C
local CLOCK_REALTIME = 0
local timespec = ffi.new("struct pz_map_timespec")

--- Seconds since the epoch, to the microsecond: when a call started.
local function wall_clock()
  C.pz_map_clock_gettime(CLOCK_REALTIME, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end


--- t[a][b]... for the dotted path "a.b...", or nil where a step is missing.
local function index_path(t, path)
  for key in path:gmatch("[^.]+") do
    if type(t) ~= "table" and not (getmetatable(t) and getmetatable(t).__index) then return nil end
    t = t[key]
  end
  return t
end

--- The function of a module: "mymod.clean" requires the longest prefix
-- that is a module ("mymod.clean", then "mymod") and indexes the rest; a
-- name without a dot is a module that returns a function.
local function module_function(name)
  local parts = {}
  for part in name:gmatch("[^.]+") do parts[#parts + 1] = part end
  local missing = {}
  for k = #parts, 1, -1 do
    local modname = concat(parts, ".", 1, k)
    local ok, mod = pcall(require, modname)
    if ok then
      if k == #parts then return mod, modname end
      local rest = concat(parts, ".", k + 1)
      local f = index_path(mod, rest)
      if f == nil then
        error(format("module '%s' has no function %s", modname, rest), 0)
      end
      return f, name
    end
    -- A module that exists and fails is the answer: its own error.
    if not tostring(mod):find("module '" .. modname .. "' not found", 1, true) then
      error(format("module '%s' failed to load: %s", modname, tostring(mod)), 0)
    end
    missing[#missing + 1] = tostring(mod)
  end
  error(missing[#missing], 0)
end

--- The function of a file: `path` run once in this worker, then its
-- function `name` (in the table the file returns, else the global of that
-- name); without a name, what the file returns.
local function file_function(path, name)
  local chunk, err = loadfile(path)
  if not chunk then error(tostring(err), 0) end
  local ok, returned = pcall(chunk)
  if not ok then error(format("%s failed when run: %s", path, tostring(returned)), 0) end
  if not name then
    if returned == nil then error(format("%s returns nothing: it must return a function", path), 0) end
    return returned, path
  end
  local f
  if type(returned) == "table" then f = index_path(returned, name) end
  if f == nil then f = index_path(_G, name) end
  if f == nil then
    error(format("%s defines no function %s (neither in the table it returns nor as a global)", path, name), 0)
  end
  return f, path .. ":" .. name
end

--- The inline function: code that is a function expression.
local function inline_function(code)
  local chunk, err = loadstring("return " .. code, "=(command line)")
  if not chunk then error(tostring(err), 0) end
  local ok, f = pcall(chunk)
  if not ok then error(tostring(f), 0) end
  return f, "the inline function"
end

--- The user's function for spec.shape and its fields; raises why not.
local function load_function(spec)
  local f, what
  if spec.shape == "inline" then
    f, what = inline_function(spec.code)
  elseif spec.shape == "file" then
    f, what = file_function(spec.path, spec.name)
  else
    f, what = module_function(spec.name)
  end
  if not is_callable(f) then
    error(format("%s is not a function (it is a %s)", what, type(f)), 0)
  end
  return f
end

--- Points this worker's stdout (descriptor 1, the parent's stdout) at its
-- stderr: the parent writes the results there, line by line, and
-- anything else would corrupt them.
local function stdout_to_stderr()
  io.stdout:flush()
  if C.pz_map_dup2(2, 1) < 0 then
    error("cannot send the function's output to stderr: " .. tostring(ffi.errno()), 0)
  end
end

-- An error the user's function raised, raised again with where and when
-- the attempt ran; the pool's error record shows the message. A member of
-- this module, so that the metatable travels by name.
local Failure = { __tostring = function(f) return f.message end }
M.Failure = Failure

--- The message of an error value: a string as it is, a table as JSON
-- when it can be written so (error({code = 400}) reads {"code":400}).
local function message_of(value, cjson)
  if type(value) == "string" then return value end
  local mt = getmetatable(value)
  if type(mt) == "table" and mt.__tostring then return tostring(value) end
  if type(value) == "table" then
    local ok, text = pcall(json_encode, value, cjson.null)
    if ok then return "error object " .. text end
  end
  return format("(error object is a %s value)", type(value))
end

--- The executor of one worker: spec.shape ("module", "file", "inline"),
-- spec.name, spec.path, spec.code say what to load; spec.lines (raw
-- lines instead of JSON), spec.spread (a JSON array is the arguments),
-- spec.timing (return pid, start and duration) how to call it.
function M.executor(spec)
  stdout_to_stderr()
  local ok, cjson = pcall(require, "cjson")
  if not ok then error("lua-cjson is needed: " .. tostring(cjson), 0) end
  -- An instance of our own: the user's function may change its settings.
  cjson = cjson.new()
  local decode, null = cjson.decode, cjson.null
  --- lua-cjson's encoding, numbers written exactly (ljson.h).
  local function encode(v) return json_encode(v, null) end
  local f = load_function(spec)
  local lines, spread, timing = spec.lines, spec.spread, spec.timing
  local pid = getpid()

  --- The output text of the function's first result; nil and why when
  -- JSON cannot hold it.
  local function output(v)
    if lines and type(v) == "string" then return v end
    if v == nil then return "null" end
    local encoded, text = pcall(encode, v)
    if not encoded then return nil, "cannot write the result as JSON: " .. tostring(text) end
    return text
  end

  local function finish(start, t0, status, text)
    if timing then return { status, text, pid, start, now() - t0 } end
    if status == "ok" then return text end
    return { status, text }
  end

  local function call(text, start, t0)
    local ok_result, first
    if lines then
      ok_result, first = pcall(f, text)
    else
      local decoded, value = pcall(decode, text)
      if not decoded then
        return finish(start, t0, "bad input", "not JSON: " .. tostring(value))
      end
      if spread then
        if not text:find("^%s*%[") then
          return finish(start, t0, "bad input", "--spread needs a JSON array")
        end
        -- LuaJIT passes at most about 8,000 values (its C stack's
        -- limit): an array past it is bad input, not the function's error
        -- (which --retries would run again).
        local n = #value
        if n >= BIG_SPREAD and not pcall(unpack, value, 1, n) then
          return finish(start, t0, "bad input",
            format("--spread: %d elements are too many to pass as arguments", n))
        end
        ok_result, first = pcall(f, unpack(value, 1, n))
      else
        ok_result, first = pcall(f, value)
      end
    end
    if not ok_result then
      local failure = setmetatable({ message = message_of(first, cjson) }, Failure)
      if timing then failure.pid, failure.start, failure.seconds = pid, start, now() - t0 end
      error(failure, 0)
    end
    local out, why = output(first)
    if out == nil then return finish(start, t0, "bad result", why) end
    return finish(start, t0, "ok", out)
  end

  return function(text)
    local start, t0
    if timing then start, t0 = wall_clock(), now() end
    return call(text, start, t0)
  end
end

return M
