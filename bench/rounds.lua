--- Runs systems side by side in rounds and compares them round by round
-- (issue 14): each round runs every system once, one after the other,
-- starting one system later than the round before, so that each sees the
-- same load on a shared machine and none always goes first. A ratio is
-- computed within each round, then summarized over the rounds.
--
--   luajit bench/rounds.lua ROUNDS NAME=COMMAND... [RATIO=A.KEY/B.KEY...]
--
-- NAME=COMMAND: a system, a shell command that prints key=value lines for
-- one measurement (lines starting with # are comments). A system that
-- prints skipped=REASON is not run again, and its figures are n/a.
-- RATIO=A.KEY/B.KEY (told apart by the slash and the dots): A's KEY over
-- B's KEY, in each round where both have it.
--
-- Output: for each system and numeric key, NAME.KEY=MEDIAN MIN MAX
-- (ALL...) over the rounds, a non-numeric key as its last value; for each
-- ratio, RATIO=MEDIAN MIN MAX (ALL...); NAME.skipped=REASON, and
-- NAME.failed=WHY for a system whose command failed (exit status, or
-- PZ_BENCH_CMD_TIMEOUT seconds, default 300, passed): it is not run again
-- and the script exits with status 1 at the end. Each round is also
-- reported as a comment, with its ratios.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. package.path
local B = require "benchlib"

local CMD_TIMEOUT = B.env_number("PZ_BENCH_CMD_TIMEOUT", 300)

local rounds = tonumber(arg[1])
if not rounds or rounds < 1 or rounds ~= math.floor(rounds) then
  io.stderr:write("usage: rounds.lua ROUNDS NAME=COMMAND... [RATIO=A.KEY/B.KEY...]\n")
  os.exit(2)
end

local systems, ratios = {}, {}
for i = 2, #arg do
  local name, rest = arg[i]:match("^([%w_]+)=(.*)$")
  if not name then
    io.stderr:write("rounds.lua: not NAME=COMMAND nor RATIO=A.KEY/B.KEY: ", arg[i], "\n")
    os.exit(2)
  end
  local a, ka, b, kb = rest:match("^([%w_]+)%.([%w_]+)/([%w_]+)%.([%w_]+)$")
  if a then
    ratios[#ratios + 1] = { name = name, a = a, ka = ka, b = b, kb = kb }
  else
    systems[#systems + 1] = { name = name, command = rest, rounds = {} }
  end
end

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

--- Runs a shell command under timeout(1); returns its stdout, its stderr
-- and its exit status (124 or 137 after a timeout).
local function run(command)
  local err = os.tmpname()
  local h = io.popen(string.format("timeout -k 10 %d sh -c %s 2> %s; echo \"__status=$?\"",
    CMD_TIMEOUT, quote(command), quote(err)), "r")
  local out = h:read("*a")
  h:close()
  local f = io.open(err, "r")
  local errtext = f and f:read("*a") or ""
  if f then f:close() end
  os.remove(err)
  local status = tonumber(out:match("__status=(%d+)%s*$")) or -1
  out = out:gsub("__status=%d+%s*$", "")
  return out, errtext, status
end

local function parse(out)
  local kv = {}
  for line in out:gmatch("[^\n]+") do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then kv[k] = tonumber(v) or v end
  end
  return kv
end

local function fmt(x) return string.format("%.6g", x) end

local function value(name, r, key)
  for _, s in ipairs(systems) do
    if s.name == name then
      local kv = s.rounds[r]
      return kv and type(kv[key]) == "number" and kv[key] or nil
    end
  end
  return nil
end

--- Shows text, line by line, as comments starting with prefix.
local function comment(prefix, text)
  for line in text:gmatch("[^\n]+") do io.write("# ", prefix, line, "\n") end
end

local any_failed = false
for r = 1, rounds do
  local notes = {}
  for j = 0, #systems - 1 do
    local s = systems[(r - 1 + j) % #systems + 1]
    if not s.skipped and not s.failed then
      local t0 = B.now()
      local out, errtext, status = run(s.command)
      local secs = B.now() - t0
      comment(s.name .. " stderr: ", errtext)
      if status ~= 0 then
        s.failed = string.format("round %d: %s", r,
          (status == 124 or status == 137) and ("timed out after " .. CMD_TIMEOUT .. " s")
          or ("exit status " .. status))
        any_failed = true
        comment(s.name .. ": ", out)
        notes[#notes + 1] = s.name .. " FAILED"
      else
        local kv = parse(out)
        if kv.skipped then
          s.skipped = kv.skipped
          notes[#notes + 1] = s.name .. " skipped"
        else
          s.rounds[r] = kv
          notes[#notes + 1] = string.format("%s %.2fs", s.name, secs)
        end
      end
    end
  end
  for _, q in ipairs(ratios) do
    local a, b = value(q.a, r, q.ka), value(q.b, r, q.kb)
    if a and b and b ~= 0 then
      q[r] = a / b
      notes[#notes + 1] = string.format("%s=%.3g", q.name, a / b)
    end
  end
  B.note("round %d: %s", r, table.concat(notes, ", "))
end

--- "MEDIAN MIN MAX (v1,v2,...)" of the numbers of list (in round order).
local function summary(list)
  local sorted = {}
  for i = 1, #list do sorted[i] = list[i] end
  table.sort(sorted)
  local all = {}
  for i = 1, #list do all[i] = fmt(list[i]) end
  return string.format("%s %s %s (%s)", fmt(B.median(list)), fmt(sorted[1]), fmt(sorted[#sorted]),
    table.concat(all, ","))
end

B.emit("rounds", rounds)
for _, s in ipairs(systems) do
  if s.failed then B.emit(s.name .. ".failed", s.failed) end
  if s.skipped then B.emit(s.name .. ".skipped", s.skipped) end
  local keys, seen = {}, {}
  for r = 1, rounds do
    for k in pairs(s.rounds[r] or {}) do
      if not seen[k] then seen[k], keys[#keys + 1] = true, k end
    end
  end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local list, numeric, last = {}, true, nil
    for r = 1, rounds do
      local v = s.rounds[r] and s.rounds[r][k]
      if v ~= nil then
        last = v
        if type(v) == "number" then list[#list + 1] = v else numeric = false end
      end
    end
    B.emit(s.name .. "." .. k, numeric and summary(list) or tostring(last))
  end
end
for _, q in ipairs(ratios) do
  local list = {}
  for r = 1, rounds do
    if q[r] then list[#list + 1] = q[r] end
  end
  B.emit(q.name, #list > 0 and summary(list) or "n/a")
end
os.exit(any_failed and 1 or 0)
