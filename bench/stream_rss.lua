--- A long stream in constant memory (issue 12): LINES lines (default
-- 10,000,000) through `p:stream` on a pool of 2 workers with
-- keep_results = false, each line's length computed by a worker. The
-- parent's resident memory (VmRSS, /proc/self/status) is sampled after
-- every SAMPLE lines (default 1,000,000) have come back, as they are,
-- without forcing a garbage collection first: what a user's process
-- would show. The target: flat within a few MiB from the first sample to
-- the last.
--
--   build/pzlua bench/stream_rss.lua [LINES [SAMPLE [MAX_PENDING]]]
--   build/pzlua bench/stream_rss.lua --file [LINES [SAMPLE [MAX_PENDING]]]
--
-- The lines come from an iterator function that makes each one when the
-- stream pulls it ("line 1234567 of the input: ..." , 50 to 60 bytes), so
-- that what grows, if anything, is the pool's and the stream's alone: no
-- file of half a gigabyte on a shared disk, no page cache. With --file,
-- the script first writes the same lines to a temporary file and streams
-- `io.lines(path)` instead (what a user would write; stdio's buffer is
-- constant), then removes the file; the clock and the samples cover the
-- stream only.
--
-- Every line must come back exactly once, with its length: the script
-- checks the count, the sum of the positions and the sum of the lengths,
-- and exits with status 1 otherwise.
--
-- Output: key=value lines: source (iterator or file), file (its path,
-- removed by then), lines, sample_every, rss_mib_at (one figure
-- per sample, in order, comma-separated), lua_heap_mib_at (the Lua heap
-- at the same moments, collectgarbage "count"), rss_first_mib,
-- rss_last_mib, rss_max_mib, rss_growth_mib (last - first),
-- rss_max_growth_mib (max - first), seconds, lines_per_s.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local B = require "benchlib"

local WORKERS = 2
local MIB = 1048576

local args = {}
for k = 1, #arg do args[k] = arg[k] end
local from_file = false
if args[1] == "--file" then
  from_file = true
  table.remove(args, 1)
end
local LINES = tonumber(args[1] or "10000000")
local SAMPLE = tonumber(args[2] or "1000000")
local WINDOW = args[3] and tonumber(args[3])
if not (LINES and SAMPLE and LINES >= 1 and SAMPLE >= 1 and LINES % SAMPLE == 0)
    or (args[3] and not (WINDOW and WINDOW >= 1)) then
  io.stderr:write("usage: stream_rss.lua [--file] [LINES [SAMPLE [MAX_PENDING]]]"
    .. " (LINES a multiple of SAMPLE)\n")
  os.exit(2)
end

local function fail(fmt, ...)
  error(string.format(fmt, ...), 0)
end

local format = string.format
local function make_line(i)
  return format("line %d of the input: some words to count, %08x", i, i * 2654435761 % 4294967296)
end

--- The lines as an iterator, and a function giving the sum of the
-- lengths of those it made so far.
local function generated()
  local i = 0
  local bytes = 0
  return function()
    if i == LINES then return nil end
    i = i + 1
    local line = make_line(i)
    bytes = bytes + #line
    return line
  end, function() return bytes end
end

--- The same lines written to a temporary file; returns its path and the
-- sum of the lengths.
local function write_file()
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  local bytes = 0
  local chunk = {}
  for i = 1, LINES do
    local line = make_line(i)
    bytes = bytes + #line
    chunk[#chunk + 1] = line
    if #chunk == 4096 or i == LINES then
      chunk[#chunk + 1] = ""
      local ok, err = f:write(table.concat(chunk, "\n"))
      if not ok then
        f:close()
        os.remove(path)
        fail("cannot write %s: %s", path, tostring(err))
      end
      chunk = {}
    end
  end
  assert(f:close())
  return path, bytes
end

local path, file_bytes
if from_file then path, file_bytes = write_file() end

local function run(p)
  local src, made_bytes
  if from_file then
    src = io.lines(path)
  else
    src, made_bytes = generated()
  end
  local opts = WINDOW and { max_pending = WINDOW } or nil
  local rss, heap = {}, {}
  local count, positions, lengths = 0, 0, 0
  B.full_gc()
  local rss_start = B.status_bytes("VmRSS")
  local t0 = B.now()
  for i, ok, len in p:stream(src, opts) do
    if not ok then fail("line %d failed: %s", i, tostring(len)) end
    count = count + 1
    positions = positions + i
    lengths = lengths + len
    if count % SAMPLE == 0 then
      rss[#rss + 1] = B.status_bytes("VmRSS")
      heap[#heap + 1] = collectgarbage("count") * 1024
    end
  end
  local t = B.now() - t0
  local want_bytes = from_file and file_bytes or made_bytes()
  if count ~= LINES or positions ~= LINES * (LINES + 1) / 2 or lengths ~= want_bytes then
    fail("%d lines came back (want %d), positions sum to %.17g (want %.17g), lengths to %.17g (want %.17g)",
      count, LINES, positions, LINES * (LINES + 1) / 2, lengths, want_bytes)
  end
  return { rss = rss, heap = heap, rss_start = rss_start, seconds = t }
end

local ok, r = pcall(B.with_pool, function(line) return #line end,
  { workers = WORKERS, keep_results = false }, nil, run)
if path then os.remove(path) end
if not ok then error(r, 0) end

local function mib_list(list)
  local out = {}
  for k, v in ipairs(list) do out[k] = format("%.2f", v / MIB) end
  return table.concat(out, ",")
end

local first, last, max = r.rss[1], r.rss[#r.rss], 0
for _, v in ipairs(r.rss) do
  if v > max then max = v end
end
B.emit("source", from_file and "file" or "iterator")
if path then B.emit("file", path) end
B.emit("lines", LINES)
B.emit("workers", WORKERS)
B.emit("max_pending", WINDOW or "default")
B.emit("sample_every", SAMPLE)
B.emit("rss_start_mib", r.rss_start / MIB)
B.emit("rss_mib_at", mib_list(r.rss))
B.emit("lua_heap_mib_at", mib_list(r.heap))
B.emit("rss_first_mib", first / MIB)
B.emit("rss_last_mib", last / MIB)
B.emit("rss_max_mib", max / MIB)
B.emit("rss_growth_mib", (last - first) / MIB)
B.emit("rss_max_growth_mib", (max - first) / MIB)
B.emit("seconds", r.seconds)
B.emit("lines_per_s", LINES / r.seconds)
