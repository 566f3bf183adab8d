--- One trial of the interrupt harness (spec/interrupts.lua): run as
--
--     pzlua spec/interrupt_trial.lua MODE SEED        (or a plain luajit)
--
-- it makes a pool, prints "ready", then runs MODE's blocking methods in a
-- loop until Ctrl-C's "interrupted!" comes out of them; the driver sends
-- SIGINT at a random moment. Then it checks what the user is promised:
--
--   - the error is "interrupted!" (nothing else came out first);
--   - a second wait works (p:wait() returns true within 20 s);
--   - every call is in exactly one place: handed out already (a map's or
--     stream's values, p:result, p:take), p.results / p.errors, or
--     p:stop()'s aborted list; no error record or aborted entry is the
--     interrupt swallowed (a message with "interrupted!" or "cannot be").
--
-- It prints `caught <seconds> <where>: <message>` at once, then one line
-- `verdict ok` or `verdict bad: <why>; ...`, with counts on a `counts` line.
--
-- Values identify calls: every call's argument is a number used once (its
-- result is the number itself; a negative one raises), so that duplicates
-- show. Ids are counted: calls = ids in the pool's lists + ids in aborted +
-- ids taken + calls consumed by the maps and streams that ended, + values
-- handed out by an interrupted stream.
--
-- The interrupt may land in this script's own code between a method's
-- return and the line that records what it handed out: a value is then
-- lost here, not in parallelize. The message handler notes whether the
-- first Lua function on the stack is this file's, and `at_handoff` says
-- how many calls such a window may hold; a shortfall within it is
-- reported as `user_window`, not as a failure.
io.stdout:setvbuf("line")
local parallelize = require "parallelize"
local core = require "parallelize.core"

local mode, seed = arg[1], tonumber(arg[2]) or 1
math.randomseed(seed)
local now = core.now
local THIS = debug.getinfo(1, "S").source

local function executor(x, pause)
  if pause then parallelize.sleep(pause) end
  if x % 1 == 0.5 then parallelize.sleep(0.002) end -- a slower item of a map
  if type(x) == "number" and x < 0 then error("bad " .. x) end
  return x
end

local opts = { workers = 2, quiet = true }
if mode == "map_unchunked" then opts.timeout = 60 end
if mode == "result" then opts.keep_results = false end
if mode == "loop_room" then opts.max_pending = 16 end

local next_x = 0
--- A fresh argument: a number never used before, negative (raising) with
-- probability `bad`.
local function fresh(bad)
  next_x = next_x + 1
  if bad and math.random() < bad then return -next_x end
  return next_x
end

local p = parallelize.Parallelize(executor, opts)
local _ = p.executors

-- What was handed out to this script: value -> true; ids handed out.
local handed, handed_ids, taken_ids = {}, {}, {}
local consumed = 0 -- calls consumed by maps and streams that ended
local stream_handed = 0 -- values handed out by the stream being run
local at_handoff = 0

local function note_value(v)
  if type(v) == "table" and getmetatable(v) == core.error_metatable then v = v.args[1] end
  handed[#handed + 1] = v
end

local function record_taken(results, ids, errors)
  for k = 1, #results do handed[#handed + 1] = results[k]; taken_ids[#taken_ids + 1] = ids[k] end
  for k = 1, #errors do handed[#handed + 1] = errors[k].args[1]; taken_ids[#taken_ids + 1] = errors[k].id end
end

--- The calls queued so far: core.pool_counts rather than p.calls, whose
-- Lua code in parallelize would count an interrupt landing there, after
-- a map or stream has returned, as parallelize's.
local function calls_so_far()
  return (core.pool_counts(p))
end

local function list_of(n, bad)
  local l = {}
  for k = 1, n do l[k] = fresh(bad) end
  return l
end

local body = {}

-- p(x) loops with waits, and p:take() now and then.
function body.calls()
  while true do
    for _ = 1, math.random(1, 60) do
      if math.random() < 0.1 then p(fresh(0.1), 0.001) else p(fresh(0.1)) end
    end
    p:wait()
    if math.random() < 0.3 then
      at_handoff = math.huge
      local results, ids, errors = p:take()
      record_taken(results, ids, errors)
      at_handoff = 0
    end
  end
end

-- A long loop of p(x), compiled (the JIT takes p(x) of a number through
-- the FFI: the interrupt must come out of it, and the p(x) it lands in
-- queue nothing), with a compiled spin between the calls so that the
-- workers keep up; under loop_room, max_pending makes most p(x) wait.
local function spin(n)
  local s = 0
  for k = 1, n do s = s + k % 7 end
  return s
end
local spun = 0
function body.loop()
  while true do
    for _ = 1, math.random(1000, 20000) do
      p(fresh(0.01))
      spun = spun + spin(50)
    end
    p:wait()
  end
end
body.loop_room = body.loop

-- p:result(id) with keep_results = false: each answer handed over once.
function body.result()
  while true do
    local id = p(fresh(0.1), math.random() < 0.5 and 0.001 or nil)
    at_handoff = 1
    local ok, v = p:result(id)
    handed_ids[#handed_ids + 1] = id
    if ok then handed[#handed + 1] = v else handed[#handed + 1] = v.args[1] end
    at_handoff = 0
  end
end

local function map_loop()
  while true do
    local list = list_of(math.random(1, 400))
    if math.random() < 0.3 then list[math.random(#list)] = fresh() + 0.5 end -- a slower item
    local before = calls_so_far()
    at_handoff = #list
    local out = p:map(list)
    consumed = consumed + (calls_so_far() - before)
    for k = 1, #out do handed[#handed + 1] = out[k] end
    at_handoff = 0
  end
end
body.map = map_loop
body.map_unchunked = map_loop

local function stream_loop(ordered)
  while true do
    local list = list_of(math.random(1, 300), 0.05)
    local before = calls_so_far()
    stream_handed = 0
    at_handoff = 1
    for _, _, v in p:stream(list, { ordered = ordered }) do
      note_value(v)
      stream_handed = stream_handed + 1
    end
    consumed = consumed + (calls_so_far() - before)
    at_handoff = 0
    stream_handed = 0
  end
end
function body.stream() stream_loop(false) end
function body.stream_ordered() stream_loop(true) end

-- Pools made and read (p.executors waits for Deferred constructors), with
-- a call or two, then stopped: the interrupt lands in Parallelize, in
-- p.executors, or in p:stop. Only the last pool is checked.
local aborted_seen = {}
function body.executors()
  p:stop()
  while true do
    p = nil
    handed, aborted_seen = {}, {}
    p = parallelize.Parallelize(parallelize.Deferred(function(pause)
      parallelize.sleep(pause)
      return executor
    end, math.random() * 0.05), opts)
    local _ = p.executors
    for _ = 1, math.random(0, 4) do p(fresh(), 0.01) end
    at_handoff = math.huge
    aborted_seen = p:stop()
    at_handoff = 0
  end
end

local run = body[mode]
if not run then
  io.stderr:write("unknown mode ", tostring(mode), "\n")
  os.exit(2)
end

print("ready")
local where
local ok, err = xpcall(run, function(e)
  for level = 2, 50 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.what ~= "C" then
      where = (info.source == THIS and "user" or "library") .. " " .. info.short_src .. ":" .. info.currentline
      break
    end
  end
  return e
end)
local caught_at = now()
local window = where and where:match("^user") and at_handoff or 0
print(("caught %.6f %s: %s"):format(caught_at, tostring(where), tostring(err):gsub("\n.*", "")))

local bad = {}
local function fail(fmt, ...) bad[#bad + 1] = fmt:format(...) end

if ok then fail("the loop ended") end
if type(err) ~= "string" or not err:find("interrupted!$") then fail("not the interrupt: %s", tostring(err)) end

if p == nil then
  -- (executors mode: the interrupt came out of Parallelize itself, maybe
  -- after the core made the pool: the state is closed on the way out, so
  -- that the pool, garbage now, is ended and freed rather than left to
  -- the process's exit, which the leak checker of a sanitized build
  -- reports)
  print("counts calls=0")
  print(#bad == 0 and "verdict ok" or "verdict bad: " .. table.concat(bad, "; "))
  io.stdout:flush()
  os.exit(0, true)
end
if not p.stopped then
  local t0 = now()
  local waited_ok, waited = pcall(p.wait, p, 20)
  if not waited_ok then fail("the second wait raised: %s", tostring(waited))
  elseif not waited then fail("the second wait timed out after %.1f s", now() - t0) end
end

-- (executors mode: what an interrupted p:stop did not hand out, the next
-- one returns)
local aborted = p:stop()
for _, a in ipairs(aborted_seen) do aborted[#aborted + 1] = a end

-- Where each call is.
local ids_seen, values_seen, places = {}, {}, 0
local function id_once(id, where_)
  if ids_seen[id] then fail("call %s twice (%s and %s)", tostring(id), ids_seen[id], where_) end
  ids_seen[id] = where_
  places = places + 1
end
local function value_once(v, where_)
  if type(v) == "table" then -- a chunk's results, or its items
    for k = 1, #v do value_once(v[k], where_) end
    return
  end
  if type(v) ~= "number" then fail("a value that is no call's: %s in %s", tostring(v), where_) return end
  local key = math.abs(v) - math.abs(v) % 1
  if values_seen[key] then fail("value %s twice (%s and %s)", tostring(v), values_seen[key], where_) end
  values_seen[key] = where_
end

local results, ids, errors
if opts.keep_results == false then
  results, ids, errors = p:take()
else
  results, ids, errors = p.results, p.ids, p.errors
end
for k = 1, #results do id_once(ids[k], "results"); value_once(results[k], "results") end
for _, e in ipairs(errors) do
  id_once(e.id, "errors")
  local m = tostring(e.message)
  if m:find("interrupted") or m:find("cannot be") then fail("the interrupt in an error record: %s", m) end
  value_once(e.args and e.args[1], "errors")
end
for _, a in ipairs(aborted) do
  id_once(a.id, "aborted")
  if a.error then fail("an aborted call's arguments lost: %s", a.error) end
  value_once(a[1], "aborted")
end
for _, id in ipairs(taken_ids) do id_once(id, "taken") end
for _, id in ipairs(handed_ids) do id_once(id, "handed") end
for _, v in ipairs(handed) do value_once(v, "handed") end

local calls = p.calls
local accounted = places + consumed + stream_handed
local short = calls - accounted
-- (This script's own counts may be off by what its window holds, either
-- way: an interrupt between two of its assignments.)
local user_window = 0
if short ~= 0 and math.abs(short) <= window then
  user_window = math.abs(short)
elseif short < 0 then
  fail("%d calls accounted for twice", -short)
elseif short > 0 then
  fail("%d of %d calls in no place", short, calls)
end
print(("counts calls=%d results=%d errors=%d aborted=%d taken=%d consumed=%d stream_handed=%d user_window=%d")
  :format(calls, #results, #errors, #aborted, #taken_ids, consumed, stream_handed, user_window))
print(#bad == 0 and "verdict ok" or "verdict bad: " .. table.concat(bad, "; "))
