--- parallelize.caller: where the user's code is on the stack, so that an
-- error raised deep inside parallelize (Ctrl-C's "interrupted!", a map's
-- failed item) names the user's line, not ours.
local getinfo = debug.getinfo

local M = {}

-- The chunk names of parallelize's Lua files (each marks itself), and C
-- functions of parallelize that stand between them and the user's code
-- (the pool's __call, which may wait for room).
local ours, our_c = {}, {}

--- Marks the calling file as parallelize's own.
function M.mark()
  ours[getinfo(2, "S").source] = true
end
M.mark()

--- Marks a C function of parallelize's as standing between its Lua code and
-- the user's.
function M.mark_c(fn)
  our_c[fn] = true
end

--- The level to give error() so that it blames the first function on the
-- stack outside parallelize: the user's code that called into the API (or
-- a C function such as pcall, which has no position). Call it from the
-- function that raises.
function M.level()
  local level = 3 -- 1 is this function, 2 the one that raises
  while true do
    local info = getinfo(level, "Sf")
    if not info or not (ours[info.source] or our_c[info.func]) then return level - 1 end
    level = level + 1
  end
end

--- The position error(msg, M.level()) would put before msg ("file:line: ",
-- or "" where there is none), for a message made whole before anything
-- is marked as reported: error() adding it later needs memory, and short
-- of it the message is lost. Call it from the function that raises.
function M.where()
  local level = 3 -- 1 is this function, 2 the one that raises
  while true do
    local info = getinfo(level, "Slf")
    if not info then return "" end
    if not (ours[info.source] or our_c[info.func]) then
      -- (as LuaJIT's error(): line 0 too, a function without line
      -- information, stripped bytecode; -1 is a C function's)
      if (info.currentline or -1) >= 0 then return info.short_src .. ":" .. info.currentline .. ": " end
      return ""
    end
    level = level + 1
  end
end

--- Raises err again: Ctrl-C's "interrupted!" at the user's line (the hook
-- raised it at ours), anything else as it is.
function M.reraise(err)
  if type(err) == "string" and err:sub(-12) == "interrupted!" then
    error("interrupted!", M.level())
  end
  error(err, 0)
end

return M
