--- parallelize.cli_map_joblog: the joblog of `pzlua --map` (--joblog FILE),
-- one JSON object per finished input line:
--
--   {"line":12,"pid":4242,"start":1718000000.123456,"seconds":0.000210,
--    "status":"ok","error":null}
--
-- and what --resume reads back from it: the set of lines already done.
--
-- Rules this file owns:
-- - An entry is appended only after the line's output was written (the
--   command writes its output first, then the entries of the same lines),
--   each batch in one write(2) on a file opened for appending, so that a
--   run killed at any moment leaves whole entries, then perhaps one torn
--   last line.
-- - Reading ignores any line that is not a whole entry (a torn last line);
--   before a resumed run appends, a torn last line is ended, so that it
--   cannot swallow the first new entry.
-- - pid and start are null when the worker could not report them (a call
--   ended by its timeout, or one that killed its workers).
local ffi = require "ffi"

local format, type, tostring, floor, setmetatable = string.format, type, tostring, math.floor, setmetatable
local band, bor, lshift, rshift = bit.band, bit.bor, bit.lshift, bit.rshift
local ENOENT = 2

local M = {}

--- A set of line numbers, one bit each (10 million lines: 1.2 MiB), up
-- to BIT_LINES (an 8 MiB bitset at most); the lines above it in a table.
-- (Bit operations take 32-bit integers: line 2^32 + 1 was taken for line
-- 1, and a line number of 1e300 in a joblog made a bitset of half a GiB.)
local BIT_LINES = 2 ^ 26
local Lines = {}
Lines.__index = Lines

local function new_lines()
  return setmetatable({ bits = ffi.new("uint8_t[?]", 1024), bytes = 1024, count = 0, above = {} }, Lines)
end

function Lines:add(n)
  if n > BIT_LINES then
    if not self.above[n] then
      self.above[n] = true
      self.count = self.count + 1
    end
    return
  end
  local byte, mask = rshift(n, 3), lshift(1, band(n, 7))
  if byte >= self.bytes then
    local bytes = self.bytes
    while byte >= bytes do bytes = bytes * 2 end
    local grown = ffi.new("uint8_t[?]", bytes)
    ffi.copy(grown, self.bits, self.bytes)
    self.bits, self.bytes = grown, bytes
  end
  local b = self.bits[byte]
  if band(b, mask) == 0 then
    self.bits[byte] = bor(b, mask)
    self.count = self.count + 1
  end
end

function Lines:has(n)
  if n > BIT_LINES then return self.above[n] == true end
  local byte = rshift(n, 3)
  return byte < self.bytes and band(self.bits[byte], lshift(1, band(n, 7))) ~= 0
end
M.new_lines = new_lines

--- The lines that the joblog at `path` shows done: every line with an
-- entry, or with only_ok those with an "ok" entry. A
-- missing file shows none. Returns the set and the number of entries
-- read, or nil and why the file cannot be read.
function M.read_done(path, cjson, only_ok)
  local done = new_lines()
  local f, err, code = io.open(path, "rb")
  if not f then
    if code == ENOENT then return done, 0 end
    return nil, err
  end
  local entries = 0
  while true do
    -- read, not lines(): a read that fails (a directory, an I/O error)
    -- is a reason to return, where lines() raises.
    local text, rerr = f:read("*l")
    if text == nil then
      f:close()
      if rerr then return nil, format("%s: %s", path, tostring(rerr)) end
      return done, entries
    end
    local ok, e = pcall(cjson.decode, text)
    -- Ctrl-C (SIGTERM, SIGHUP) raises "interrupted!" from a hook at the
    -- next call, which may be this one, in the pcall: taken for a torn
    -- entry, it dropped the entry (its line ran again, written twice)
    -- and the signal (the run went on). Raised again.
    if not ok and type(e) == "string" and e:find("interrupted!$") then
      f:close()
      error(e, 0)
    end
    if ok and type(e) == "table" and type(e.line) == "number" and e.line >= 1
        and e.line == floor(e.line) and type(e.status) == "string" then
      entries = entries + 1
      if not only_ok or e.status == "ok" then done:add(e.line) end
    end
  end
end

--- Opens the joblog for appending (truncated first unless `append`);
-- returns the file, or nil and why. A torn last line is ended first.
function M.open(path, append)
  local f, err = io.open(path, append and "ab" or "wb")
  if not f then return nil, err end
  f:setvbuf("no") -- each batch is one write, made when the command says
  if append then
    local size = f:seek("end")
    if size and size > 0 then
      local r = io.open(path, "rb")
      if r then
        r:seek("set", size - 1)
        local last = r:read(1)
        r:close()
        if last ~= "\n" then
          local ok, werr = f:write("\n")
          if not ok then
            f:close()
            return nil, werr
          end
        end
      end
    end
  end
  return f
end

local function number_or_null(fmt, v)
  if v == nil then return "null" end
  return format(fmt, v)
end

--- The entry of one line: pid, start, seconds may be nil (null);
-- message is nil for a line that succeeded.
function M.entry(cjson, line, pid, start, seconds, status, message)
  return format('{"line":%d,"pid":%s,"start":%s,"seconds":%s,"status":%s,"error":%s}\n', line,
    number_or_null("%d", pid), number_or_null("%.6f", start), number_or_null("%.6f", seconds),
    cjson.encode(status), message == nil and "null" or cjson.encode(tostring(message)))
end

return M
