--- Workloads for `make valgrind` (tools/run-valgrind.sh runs each under
-- memcheck, with build/valgrind/pzlua): they reach the C code broadly and check
-- their results, so that a wrong answer fails as surely as a memory error.
-- Nothing here measures time: under valgrind everything is 20-50 times
-- slower, so every wait is for an outcome, never for a deadline.
--
--   build/valgrind/pzlua spec/valgrind/workloads.lua codec|pool|failures|stream|readline
--   build/valgrind/pzlua spec/valgrind/workloads.lua launcher PZLUA
local parallelize = require "parallelize"
local core = require "parallelize.core"
local ffi = require "ffi"


--- SIGKILLs the calling process (a worker: it travels as an upvalue, and
-- declares kill in the worker's own state).
local function kill_self()
  pcall(ffi.cdef, "int kill(int pid, int sig);")
  ffi.C.kill(parallelize.getpid(), 9)
  parallelize.sleep(60)
end

local Parallelize, Deferred = parallelize.Parallelize, parallelize.Deferred
local encode, decode, null = parallelize.encode, parallelize.decode, parallelize.null
local FN = { functions = true }

local checks = 0

local function check(cond, what)
  checks = checks + 1
  if not cond then error("valgrind workload: " .. what, 2) end
end

local function eq(got, want, what)
  checks = checks + 1
  if got ~= want then
    error(("valgrind workload: %s: got %s, want %s"):format(what, tostring(got), tostring(want)), 2)
  end
end

--- The message of the error f(...) raises; fails when it raises none.
local function error_of(f, ...)
  local ok, e = pcall(f, ...)
  check(not ok, "expected an error, got none")
  return tostring(e)
end

local function sorted(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  return c
end

local function tmpfile_with(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

local workloads = {}

-- The codec both ways: every kind of value, sharing and cycles, functions
-- with upvalues, module references, big strings, and its errors.
function workloads.codec()
  local rt = function(v, opts) return decode(encode(v), opts) end

  for _, v in ipairs({ true, false, 0, 1, -1, 2 ^ 53, -2 ^ 31, 0.1, 1e308, math.huge, -math.huge, "",
    "a\0b", string.rep("s", 31), string.rep("x", 128), string.rep("y", 70000) }) do
    eq(rt(v), v, "round trip of a " .. type(v))
  end
  eq(rt(nil), nil, "round trip of nil")
  eq(rt(null), null, "round trip of null")
  local nan = rt(0 / 0)
  check(nan ~= nan, "NaN stays NaN")
  eq(1 / rt(-0.0), -math.huge, "-0.0 keeps its sign")

  -- Tables: arrays, hashes, table keys, shared references, cycles, metatables.
  local shared = { "shared" }
  local t = { 1, 2.5, "three", { 4, { 5 } }, a = shared, b = shared, [true] = false, [2.5] = "x" }
  t.self = t
  t[shared] = "table key"
  setmetatable(t.a, { __index = { hidden = 42 } })
  local u = rt(t)
  check(u.self == u, "a cycle stays a cycle")
  check(u.a == u.b, "a shared table stays shared")
  eq(u.a.hidden, 42, "a metatable travels")
  eq(u[u.a], "table key", "a table key")
  eq(u[4][2][1], 5, "nested tables")
  eq(u[true], false, "a boolean key")
  eq(u[2.5], "x", "a number key")
  local big = {}
  for i = 1, 5000 do big[i] = { i, tostring(i), i % 3 == 0 or nil } end
  for i = 1, 500 do big["k" .. i] = i * 0.5 end
  local bu = rt(big)
  for i = 1, 5000 do
    if bu[i][1] ~= i or bu[i][2] ~= tostring(i) or bu[i][3] ~= (i % 3 == 0 or nil) then
      error("valgrind workload: item " .. i .. " of a big table differs")
    end
  end
  eq(bu.k500, 250, "a big table's hash part")
  -- A big string inside a table, and many strings.
  local s = string.rep("0123456789", 100000)
  local bs = rt({ s = s, list = { s, s } })
  check(bs.s == s and bs.list[1] == s and bs.list[2] == s, "big strings in a table")

  -- Functions: upvalues by value, globals they read, nested closures,
  -- recursion through an upvalue, module references.
  local offset, tbl = 10, { k = 3 }
  local add = rt(function(x) return x + offset + tbl.k end, FN)
  eq(add(5), 18, "a closure with upvalues")
  local function fact(n) return n <= 1 and 1 or n * fact(n - 1) end
  eq(rt(fact, FN)(10), 3628800, "a recursive closure")
  local function maker(k) return function(x) return x * k end end
  eq(rt(maker(7), FN)(6), 42, "a closure made by a closure")
  eq(rt(string.format, FN), string.format, "a C function by reference")
  eq(rt(string, FN), string, "a module by reference")
  eq(rt({ f = math.floor, m = table }, FN).f(2.5), 2, "references inside a table")
  local mt = setmetatable({}, { __index = string })
  eq(getmetatable(rt(mt, FN)).__index, string, "a metatable that is a module")

  -- Errors: what cannot be encoded, what must not be decoded, bad input.
  check(error_of(encode, { co = coroutine.create(print) }):find("cannot encode a thread at value.co", 1, true),
    "a coroutine raises, naming its path")
  check(error_of(encode, io.stdout):find("cannot encode a userdata", 1, true), "a userdata raises")
  eq(decode(encode({ co = coroutine.create(print) }, { lossy = true })).co, "<thread>", "lossy encoding")
  check(error_of(decode, encode(function() end)):find("refusing to load an encoded function", 1, true),
    "a function is refused without {functions = true}")
  check(error_of(decode, encode(string.format)):find("refusing to load a function reference", 1, true),
    "a reference is refused without {functions = true}")
  local good = encode({ 1, "two", { three = 3 }, s = string.rep("z", 300) })
  for cut = 0, #good - 1 do
    local ok = pcall(decode, good:sub(1, cut))
    check(not ok, "a truncated encoding (" .. cut .. " bytes) raises")
  end
  -- Every byte flipped in turn: decode either raises or returns a value,
  -- and never reads out of bounds (memcheck watches).
  for i = 1, #good do
    local b = good:byte(i)
    for _, x in ipairs({ 0x00, 0xff, 0x80, 0x7f }) do
      pcall(decode, good:sub(1, i - 1) .. string.char(bit.bxor(b, x)) .. good:sub(i + 1))
    end
  end
  math.randomseed(7)
  for _ = 1, 300 do
    local n = math.random(0, 40)
    local bytes = {}
    for j = 1, n do bytes[j] = string.char(math.random(0, 255)) end
    pcall(decode, table.concat(bytes))
    pcall(decode, "\2" .. table.concat(bytes))
  end
  print(("codec: %d checks passed"):format(checks))
end

-- A pool's life: start, calls, results, errors in executors, p:map (in
-- chunks), p:result, callable tables, Deferred, module executors,
-- recycling with max_calls, stats, take, stop.
function workloads.pool()
  local p = Parallelize(function(x, y)
    if x == "boom" then error("boom " .. tostring(y)) end
    if x == "table error" then error({ code = 7 }) end
    if type(x) == "string" then return x:upper(), #x end
    if type(x) == "table" then return x end
    return x * 2, y
  end, { workers = 2 })
  local want = {}
  for i = 1, 200 do
    p(i)
    want[#want + 1] = i * 2
  end
  local big = string.rep("big", 40000) -- 120 KB: through the shared memory
  local big_id = p(big)
  local tbl_id = p({ 1, { 2 }, s = "x" })
  local boom_id = p("boom", 5)
  local terr_id = p("table error")
  local nil_id = p(nil, 3)
  check(p:wait(), "wait returns true")
  local ok, up, len = p:result(big_id)
  check(ok and up == big:upper() and len == #big, "a big string's result")
  local tok, tv = p:result(tbl_id)
  check(tok and tv[2][1] == 2 and tv.s == "x", "a table's result")
  local bok, berr = p:result(boom_id)
  check(not bok and berr.message:find("boom 5$"), "an executor's error: " .. tostring(berr))
  check(berr.traceback ~= "" and berr.args[1] == "boom", "an error record's traceback and args")
  local eok, eerr = p:result(terr_id)
  check(not eok and eerr.value.code == 7, "an error value that is a table")
  local nok, nerr = p:result(nil_id)
  check(not nok and nerr.message:find("attempt to perform arithmetic"), "an error with a nil argument")
  local results, ids = p.results, p.ids
  eq(#results, 202, "results")
  eq(#ids, 202, "ids")
  local nums = {}
  for _, v in ipairs(results) do
    if type(v) == "number" then nums[#nums + 1] = v end
  end
  nums = sorted(nums)
  for i = 1, 200 do eq(nums[i], want[i], "result " .. i) end
  eq(#p.errors, 3, "errors")

  -- p:map: small items (chunks of many), a big string item, an error.
  local list = {}
  for i = 1, 20000 do list[i] = i end
  local squares = p:map(list)
  eq(#squares, 20000, "a map's results")
  for i = 1, 20000, 997 do eq(squares[i], i * 2, "map item " .. i) end
  check(p.calls < 202 + 20000, "a map goes in chunks")
  local mixed = p:map({ "a", big, "ccc" })
  check(mixed[1] == "A" and mixed[2] == big:upper() and mixed[3] == "CCC", "a map of strings")
  local merr = error_of(p.map, p, { 1, "boom", 3 })
  check(merr:find("map: item 2 failed", 1, true), "a map's error names its item: " .. merr)
  local taken_results, taken_ids, taken_errors = p:take()
  check(#taken_results == #taken_ids and #taken_errors >= 3, "take hands everything over")
  local st = p:stats()
  check(st.calls == p.calls and #st.workers == 2, "stats")
  local aborted = p:stop()
  eq(#aborted, 0, "nothing aborted")
  eq(#p:stop(), 0, "a second stop")
  check(p.stopped, "stopped")

  -- parallelize.map, and an array of executors: a callable table with
  -- close, a Deferred, a module function by name.
  eq(table.concat(parallelize.map(function(x) return x + 1 end, { 1, 2, 3 }, { workers = 2 }), " "), "2 3 4",
    "parallelize.map")
  local Counter = {}
  Counter.__index = Counter
  function Counter.new(base) return setmetatable({ base = base, n = 0 }, Counter) end
  function Counter:__call(x)
    self.n = self.n + 1
    return self.base + x
  end
  function Counter:close() return self.n end
  local q = Parallelize({ Counter.new(100), Deferred(Counter.new, 200), "string.upper" })
  local execs = q.executors
  eq(#execs, 3, "executors")
  eq(execs[2].base, 200, "a Deferred executor")
  local ids2 = {}
  for i = 1, 30 do ids2[i] = q(i) end
  q:wait()
  for i = 1, 30 do
    local rok, v = q:result(ids2[i])
    check(rok and (v == 100 + i or v == 200 + i or v == tostring(i)), "call " .. i .. " of three executors")
  end
  eq(#q:stop(), 0, "nothing aborted of three executors")
  local closed = q.closed
  check(type(closed[1]) == "number" and type(closed[2]) == "number", "close ran in the workers")

  -- Recycling: max_calls replaces workers; keep_results = false.
  local r = Parallelize(function(x) return x, parallelize.getpid() end,
    { workers = 2, max_calls = 5, keep_results = false })
  local rids = {}
  for i = 1, 40 do rids[i] = r(i) end
  local pids = {}
  for i = 1, 40 do
    local rok, v, pid = r:result(rids[i])
    check(rok and v == i, "recycled call " .. i)
    pids[pid] = true
  end
  local npids = 0
  for _ in pairs(pids) do npids = npids + 1 end
  check(npids >= 4, "max_calls replaced workers (" .. npids .. " pids)")
  check(r:stats().recycles >= 2, "recycles counted")
  check(error_of(function() return r.results end):find("keep_results"), "results refused without keep_results")
  r:stop()

  -- A pool left to the garbage collector, with calls still queued.
  local g = Parallelize(function(x) return x end, { workers = 1, quiet = true })
  for i = 1, 10 do g(i) end
  g = nil -- luacheck: ignore 311
  collectgarbage()
  collectgarbage()
  print(("pool: %d checks passed"):format(checks))
end

-- What goes wrong: a worker killed mid-call (its call runs again), a call
-- that kills every worker it reaches, timeouts, cancel, a Deferred that
-- raises, a worker that exits, an executor that cannot be loaded,
-- arguments that cannot be encoded, results that cannot be, stop with a
-- finish timeout.
function workloads.failures()
  local marker = os.tmpname() -- exists: the first run of "die" kills its worker
  local p = Parallelize(function(x, path)
    if x == "die" then
      local f = io.open(path, "rb")
      if f then
        f:close()
        os.remove(path)
        kill_self()
      end
      return "ran again"
    end
    if x == "killer" then kill_self() end
    if x == "exit" then os.exit(3) end
    if x == "hang" then parallelize.sleep(600) end
    if x == "unencodable" then return coroutine.create(print) end
    return x
  end, { workers = 2, max_deaths = 2 })
  local die = p("die", marker)
  local ok, v = p:result(die)
  check(ok and v == "ran again", "a call whose worker was killed runs again: " .. tostring(v))
  check(p:stats().deaths >= 1, "the death is counted")
  local kok, kerr = p:result(p("killer"))
  check(not kok and kerr.kind == "killer", "a call that kills its workers becomes an error: " .. tostring(kerr))
  local xok, xerr = p:result(p("exit"))
  check(not xok and xerr.kind == "killer", "a worker that exits: " .. tostring(xerr))
  local uok, uerr = p:result(p("unencodable"))
  check(not uok and uerr.message:find("thread"), "a result that cannot be encoded: " .. tostring(uerr))
  local tok, terr = p:result(p:submit({ timeout = 0.5 }, "hang"))
  check(not tok and terr.timeout == true, "a call that hangs times out: " .. tostring(terr))
  local long = p("hang")
  local queued = {}
  for i = 1, 5 do queued[i] = p(i) end
  check(p:cancel(long), "cancel a running call")
  local cok, cerr = p:result(long)
  check(not cok and cerr.cancelled == true, "a cancelled call's record")
  for i = 1, 5 do
    local qok, qv = p:result(queued[i])
    check(qok and qv == i, "calls after a cancel run: " .. i)
  end
  check(not p:cancel(long), "a finished call cannot be cancelled")
  check(error_of(p, { co = coroutine.create(print) }):find("cannot encode a thread at args[1].co", 1, true),
    "arguments that cannot be encoded")
  -- Stop while calls run: they are ended and returned.
  for _ = 1, 3 do p("hang") end
  local aborted = p:stop(0.2)
  eq(#aborted, 3, "stop(finish_timeout) aborts what runs")
  eq(#p.results + #p.errors + #aborted, p.calls - 0, "every call is in one place")
  os.remove(marker)

  -- Workers that cannot start: a Deferred that raises, a module that does
  -- not exist; the pool runs on the one that works.
  local q = Parallelize({ Deferred(function() error("cannot reach the database") end), "no.such.module",
    function(x) return -x end }, { init_attempts = 1 })
  local qids = {}
  for i = 1, 10 do qids[i] = q(i) end
  for i = 1, 10 do
    local qok, qv = q:result(qids[i])
    check(qok and qv == -i, "the working executor serves call " .. i)
  end
  eq(#q.executors, 1, "one executor initialized") -- waits for every slot
  local ie = q.init_errors
  eq(#ie, 2, "two slots given up")
  local msgs = ie[1].message .. "\n" .. ie[2].message
  check(msgs:find("cannot reach the database", 1, true), "a Deferred's error: " .. msgs)
  check(msgs:find("module 'no' not found", 1, true), "a module that cannot be loaded: " .. msgs)
  q:stop()

  -- No worker left: wait raises instead of hanging.
  local none = Parallelize({ Deferred(function() error("never") end) }, { init_attempts = 1 })
  none(1)
  check(error_of(none.wait, none):find("never", 1, true), "wait raises when no worker is left")
  eq(#none:stop(), 1, "the call is aborted")

  -- Executors that cannot be sent, or are not callable.
  check(error_of(Parallelize, { 3 }):find("executor 1 is not callable", 1, true), "a number is no executor")
  local co = coroutine.create(print)
  check(error_of(Parallelize, { function() return co end }):find("thread", 1, true),
    "an executor that cannot be encoded")

  -- retries and fail_fast.
  local tries = os.tmpname()
  local rp = Parallelize(function(path)
    local f = io.open(path, "ab")
    f:write("x")
    f:close()
    error("again")
  end, { workers = 1, retries = 2 })
  local rok, rerr = rp:result(rp(tries))
  check(not rok and #rerr.attempts == 3, "retries list every attempt")
  rp:stop()
  os.remove(tries)
  local ff = Parallelize(function(x) if x == 3 then error("three") end return x end,
    { workers = 1, fail_fast = true })
  for i = 1, 5 do ff(i) end
  check(error_of(ff.wait, ff):find("fail_fast", 1, true), "fail_fast raises from wait")
  ff:stop()
  print(("failures: %d checks passed"):format(checks))
end

-- p:stream, ordered and not, from an array and from a function that
-- sometimes has nothing ready (parallelize.later).
function workloads.stream()
  local p = Parallelize(function(x)
    if x % 17 == 0 then error("seventeen") end
    if x % 5 == 0 then parallelize.sleep(0.001) end
    return x * 3, "extra"
  end, { workers = 2 })
  local list = {}
  for i = 1, 300 do list[i] = i end
  for _, ordered in ipairs({ false, true }) do
    local seen, last, errs = {}, 0, 0
    for i, ok, v, extra in p:stream(list, { ordered = ordered, max_pending = 16 }) do
      check(not seen[i], "each input once")
      seen[i] = true
      if ordered then
        eq(i, last + 1, "ordered stream")
        last = i
      end
      if i % 17 == 0 then
        check(not ok and v.message:find("seventeen$"), "a stream's error record")
        errs = errs + 1
      else
        check(ok and v == i * 3 and extra == "extra", "a stream's result")
      end
    end
    for i = 1, 300 do check(seen[i], "input " .. i .. " streamed") end
    eq(errs, 17, "a stream's errors")
  end
  local n, turn = 0, 0
  local function src()
    turn = turn + 1
    if turn % 3 == 0 then return parallelize.later end
    if n == 60 then return nil end
    n = n + 1
    return n
  end
  local count = 0
  for _, ok, v in p:stream(src, { ordered = true }) do
    count = count + 1
    check((count % 17 == 0) ~= ok, "stream from a function")
    if ok then eq(v, count * 3, "stream from a function") end
  end
  eq(count, 60, "a function source's inputs")
  -- Leave a stream early: its calls' results go to p.results at stop.
  for i in p:stream(list) do
    if i > 3 then break end
  end
  p:stop()
  check(#p.results > 0, "a stream left early leaves its results")
  print(("stream: %d checks passed"):format(checks))
end

-- Workers behind a launcher: `pzlua --worker` started by exec (the
-- spawner's launcher path and the worker's remote side), talking through
-- a socket, with no shared memory: big strings go through the socket.
-- arg[2] is the pzlua to launch (tools/run-valgrind.sh passes build/pzlua).
function workloads.launcher()
  local pzlua = assert(arg[2], "usage: workloads.lua launcher PZLUA")
  local p = Parallelize(function(x)
    if x == "boom" then error("boom") end
    if type(x) == "string" then return #x, x:sub(1, 3) end
    return x + 1
  end, { workers = 2, launcher = function() return { pzlua, "--worker" } end })
  local ids = {}
  for i = 1, 50 do ids[i] = p(i) end
  local big = string.rep("abc", 50000)
  local big_id, boom_id = p(big), p("boom")
  for i = 1, 50 do
    local ok, v = p:result(ids[i])
    check(ok and v == i + 1, "a launched worker's call " .. i)
  end
  local ok, n, head = p:result(big_id)
  check(ok and n == #big and head == "abc", "a big string through a launched worker")
  local bok, berr = p:result(boom_id)
  check(not bok and berr.message:find("boom$"), "an error from a launched worker")
  local list = {}
  for i = 1, 2000 do list[i] = i end
  local r = p:map(list)
  eq(r[2000], 2001, "a map through launched workers")
  eq(#p:stop(), 0, "nothing aborted behind a launcher")
  print(("launcher: %d checks passed"):format(checks))
end

-- core.read_line: short lines, long lines, NUL bytes, no final newline,
-- mixed with file:read, a closed file.
function workloads.readline()
  local read_line = core.read_line
  local long = string.rep("L", 3 * 1024 * 1024 + 5)
  local path = tmpfile_with("one\n\0two\0\n\nthree\r\n" .. long .. "\nshort\nlast")
  local f = assert(io.open(path, "rb"))
  os.remove(path)
  local want = { { "one", true }, { "\0two\0", true }, { "", true }, { "three\r", true }, { long, true },
    { "short", true }, { "last", true } }
  for i, w in ipairs(want) do
    local text, whole = read_line(f)
    check(text == w[1] and whole == w[2], "line " .. i)
  end
  eq(read_line(f), nil, "the end")
  eq(read_line(f), nil, "the end stays the end")
  f:close()
  check(error_of(read_line, f):find("closed", 1, true), "a closed file raises")
  path = tmpfile_with("alpha\nbeta\ngamma\ndelta\n")
  f = assert(io.open(path, "rb"))
  os.remove(path)
  eq(read_line(f), "alpha", "read_line then file:read")
  eq(f:read("*l"), "beta", "file:read then read_line")
  eq(f:read(2), "ga", "file:read(2)")
  eq(read_line(f), "mma", "read_line after file:read(2)")
  f:close()
  local lines = {}
  for i = 1, 2000 do lines[i] = string.rep(string.char(97 + i % 26), i % 300) end
  path = tmpfile_with(table.concat(lines, "\n") .. "\n")
  f = assert(io.open(path, "rb"))
  os.remove(path)
  for i = 1, 2000 do eq(read_line(f), lines[i], "many lines: " .. i) end
  f:close()
  print(("readline: %d checks passed"):format(checks))
end

local name = arg[1]
local run = workloads[name or ""]
if not run then
  local names = {}
  for k in pairs(workloads) do names[#names + 1] = k end
  table.sort(names)
  io.stderr:write("usage: workloads.lua " .. table.concat(names, "|") .. "\n")
  os.exit(2)
end
run()
