--- A long run of `pzlua --map` in constant memory: LINES lines (default
-- 10,000,000) piped into `pzlua --map -j 2 --lines 'function(l) return #l
-- end'`, whose resident memory (VmRSS of /proc/PID/status, the command's
-- own process) is sampled as it is, once in each SAMPLE lines (default
-- 1,000,000) that come out, a quarter into each (0.25 M, 1.25 M, ...: at
-- the very end the command is exiting). The target: flat within a few MiB
-- from the first sample to the last.
--
--   build/pzlua bench/map_rss.lua [LINES [SAMPLE]]
--
-- The lines are made by a second process (this script with --generate)
-- as the pipe takes them, so that no file of half a gigabyte is written,
-- and what grows, if anything, is the command's. Its output goes to a
-- file (three bytes a line: every line is 50 to 57 bytes long), whose
-- size this script polls to know how many lines have come out: a reader
-- that keeps up, so that what is measured is the command, not a backlog
-- of results waiting for a slow reader (which p:stream does not bound).
-- Every line must come back once with its length: the count and the sum
-- of the lengths (the generator writes its own sum to a file at the end)
-- are checked, else the script exits with status 1.
--
-- Output: key=value lines: lines, sample_every, rss_mib_at (one figure per
-- sample, comma-separated), rss_first_mib, rss_last_mib, rss_max_mib,
-- rss_growth_mib (last - first), rss_max_growth_mib (max - first),
-- seconds, lines_per_s.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local B = require "benchlib"
local core = require "parallelize.core"

local format = string.format
local MIB = 1048576

--- The line generator: LINES lines on stdout, their lengths' sum in SUMFILE.
if arg[1] == "--generate" then
  local n, sumfile = tonumber(arg[2]), arg[3]
  local out, bytes, chunk = io.stdout, 0, {}
  for i = 1, n do
    local line = format("line %d of the input: some words to count, %08x", i, i * 2654435761 % 4294967296)
    bytes = bytes + #line
    chunk[#chunk + 1] = line
    if #chunk == 4096 or i == n then
      chunk[#chunk + 1] = ""
      out:write(table.concat(chunk, "\n"))
      chunk = {}
    end
  end
  out:close()
  local f = assert(io.open(sumfile, "w"))
  f:write(format("%.17g\n", bytes))
  f:close()
  os.exit(0, true)
end

local LINES = tonumber(arg[1] or "10000000")
local SAMPLE = tonumber(arg[2] or "1000000")
if not (LINES and SAMPLE and LINES >= 1 and SAMPLE >= 1 and LINES % SAMPLE == 0) then
  io.stderr:write("usage: map_rss.lua [LINES [SAMPLE]] (LINES a multiple of SAMPLE)\n")
  os.exit(2, true)
end

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local read_file = B.slurp

--- VmRSS of process pid in bytes, or nil when it is gone.
local function rss(pid)
  local kb = (read_file("/proc/" .. pid .. "/status") or ""):match("\nVmRSS:%s*(%d+) kB")
  return kb and tonumber(kb) * 1024
end

local pzlua = os.getenv("PZLUA") or arg[-1] or "build/pzlua"
local tmp = os.tmpname()
local pidfile, sumfile, outfile, donefile = tmp .. ".pid", tmp .. ".sum", tmp .. ".out", tmp .. ".done"
-- $! of a pipeline started with & is its last command: the map.
local command = format("(%s %s --generate %d %s | %s --map -j 2 --lines 'function(l) return #l end' > %s & "
  .. "echo $! > %s; wait $!; echo $? > %s) &", quote(pzlua), quote(arg[0]), LINES, quote(sumfile), quote(pzlua),
  quote(outfile), quote(pidfile), quote(donefile))
local LINE_BYTES = 3
local function file_size(path)
  local f = io.open(path, "rb")
  if not f then return 0 end
  local size = f:seek("end")
  f:close()
  return size or 0
end

local t0 = B.now()
assert(os.execute(command) == 0, "cannot start the command")
local pid
local samples = {}
local status
-- Each sample is taken a quarter into its SAMPLE lines, polling every
-- 5 ms: the last one then has three quarters of them to be taken in before
-- the command ends (a sample of a process already gone is not taken).
repeat
  core.sleep(0.005)
  pid = pid or tonumber(read_file(pidfile) or "")
  local out_lines = math.floor(file_size(outfile) / LINE_BYTES)
  if pid and out_lines >= (#samples + 0.25) * SAMPLE and #samples < LINES / SAMPLE then
    samples[#samples + 1] = rss(pid)
  end
  status = tonumber(read_file(donefile) or "")
until status
local seconds = B.now() - t0
local count, lengths = 0, 0
for line in io.lines(outfile) do
  count = count + 1
  lengths = lengths + tonumber(line)
end
local want = tonumber(read_file(sumfile) or "")
for _, f in ipairs({ tmp, pidfile, sumfile, outfile, donefile }) do os.remove(f) end
if status ~= 0 or count ~= LINES or lengths ~= want or #samples == 0 then
  io.stderr:write(format("map_rss.lua: %d lines came back (want %d), lengths sum to %.17g (want %s), "
    .. "%d samples, exit status %d\n", count, LINES, lengths, tostring(want), #samples, status))
  os.exit(1, true)
end

local list, first, last, max = {}, samples[1], samples[#samples], 0
for k, v in ipairs(samples) do
  list[k] = format("%.2f", v / MIB)
  if v > max then max = v end
end
B.emit("lines", LINES)
B.emit("sample_every", SAMPLE)
B.emit("rss_mib_at", table.concat(list, ","))
B.emit("rss_first_mib", first / MIB)
B.emit("rss_last_mib", last / MIB)
B.emit("rss_max_mib", max / MIB)
B.emit("rss_growth_mib", (last - first) / MIB)
B.emit("rss_max_growth_mib", (max - first) / MIB)
B.emit("seconds", seconds)
B.emit("lines_per_s", LINES / seconds)
