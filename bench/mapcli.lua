--- One measurement of the `pzlua --map` benchmark: LINES JSON records
-- (the same ones every time) through bench/map_job.lua's transform, by one
-- of the systems compared, with WORKERS processes at once. bench/run.sh
-- runs the systems in rounds (bench/rounds.lua) and compares them round by
-- round.
--
--   build/pzlua bench/mapcli.lua SYSTEM LINES WORKERS
--
-- SYSTEM is one of:
--   pzmap      pzlua --map -j WORKERS bench/map_job.lua:transform < in > out
--   pzmap_k    the same with -k (results in input order)
--   gnu_pipe   parallel -j WORKERS --pipe luajit bench/map_job.lua: GNU
--              parallel cuts stdin into blocks (its default, 1 MB) and
--              starts one luajit per block, which runs every line of it
--   gnu_job    parallel -j WORKERS luajit bench/map_job.lua: one luajit
--              per line, the line its argument
--   xargs      xargs -P WORKERS -n 1 -d '\n' luajit bench/map_job.lua:
--              one luajit per line, the same
--
-- The clock covers the command alone (the input is written before, the
-- output checked after): every record must come back once, transformed
-- (the count, the sum of the ids, the sum of the totals and each name are
-- checked), else the script exits with status 1. A system whose program is
-- not installed prints skipped=REASON.
--
-- Output: key=value lines: system, lines, workers, seconds, lines_per_s.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local B = require "benchlib"
local cjson = require "cjson"

local SYSTEM, LINES, WORKERS = arg[1], tonumber(arg[2] or ""), tonumber(arg[3] or "2")
local COMMANDS = {
  pzmap = "%s --map -j %d %s:transform",
  pzmap_k = "%s --map -k -j %d %s:transform",
  gnu_pipe = "parallel --will-cite -j %d --pipe luajit %s",
  gnu_job = "parallel --will-cite -j %d luajit %s",
  xargs = "xargs -P %d -n 1 -d '\\n' luajit %s",
}
if not COMMANDS[SYSTEM] or not LINES or LINES < 1 or not WORKERS or WORKERS < 1 then
  io.stderr:write("usage: mapcli.lua pzmap|pzmap_k|gnu_pipe|gnu_job|xargs LINES WORKERS\n")
  os.exit(2, true)
end

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function fail(fmt, ...)
  io.stderr:write("mapcli.lua: ", string.format(fmt, ...), "\n")
  os.exit(1, true)
end

local program = SYSTEM:match("^gnu") and "parallel" or SYSTEM == "xargs" and "xargs" or nil
if program and os.execute("command -v " .. program .. " > /dev/null 2>&1") ~= 0 then
  B.emit("skipped", program .. " is not installed (Debian: parallel, findutils)")
  os.exit(0, true)
end
if program and os.execute("command -v luajit > /dev/null 2>&1") ~= 0 then
  B.emit("skipped", "luajit is not installed")
  os.exit(0, true)
end

-- The records, and what their transforms sum to.
local function price(i) return (i % 1000) * 0.25 end
local function qty(i) return i % 7 end

local tmp = os.tmpname()
os.remove(tmp)
assert(os.execute("mkdir " .. quote(tmp)) == 0, "cannot make a temporary directory")
local input, output = tmp .. "/in", tmp .. "/out"
local function cleanup() os.execute("rm -rf " .. quote(tmp)) end

local f = assert(io.open(input, "w"))
local chunk, total = {}, 0
for i = 1, LINES do
  chunk[#chunk + 1] = string.format('{"id":%d,"name":"item %d","price":%.2f,"qty":%d}', i, i, price(i), qty(i))
  total = total + price(i) * qty(i)
  if #chunk == 4096 or i == LINES then
    chunk[#chunk + 1] = ""
    assert(f:write(table.concat(chunk, "\n")))
    chunk = {}
  end
end
assert(f:close())

local pzlua = os.getenv("PZLUA") or arg[-1] or "build/pzlua"
local job = dir .. "/map_job.lua"
local command = SYSTEM:match("^pzmap") and string.format(COMMANDS[SYSTEM], quote(pzlua), WORKERS, quote(job))
  or string.format(COMMANDS[SYSTEM], WORKERS, quote(job))
local t0 = B.now()
local status = os.execute(string.format("%s < %s > %s", command, quote(input), quote(output)))
local seconds = B.now() - t0
if status ~= 0 then
  cleanup()
  fail("%s exited with status %s", command, tostring(status))
end

-- Every record once, transformed.
local count, ids, totals = 0, 0, 0
local seen = {}
for line in io.lines(output) do
  local ok, r = pcall(cjson.decode, line)
  if not ok or type(r) ~= "table" then
    cleanup()
    fail("not a record in the output: %s", line)
  end
  if seen[r.id] or r.name ~= "ITEM " .. tostring(r.id) then
    cleanup()
    fail("record %s twice, or not transformed: %s", tostring(r.id), line)
  end
  seen[r.id] = true
  count, ids, totals = count + 1, ids + r.id, totals + r.total
end
cleanup()
if count ~= LINES or ids ~= LINES * (LINES + 1) / 2 or math.abs(totals - total) > 1e-6 * math.max(1, total) then
  fail("%d records came back (want %d), ids sum to %.17g (want %.17g), totals to %.17g (want %.17g)",
    count, LINES, ids, LINES * (LINES + 1) / 2, totals, total)
end

B.emit("system", SYSTEM)
B.emit("lines", LINES)
B.emit("workers", WORKERS)
B.emit("seconds", seconds)
B.emit("lines_per_s", LINES / seconds)
