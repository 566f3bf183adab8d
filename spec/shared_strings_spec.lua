-- Big strings (64 KiB and more) between the parent and forked workers
-- through the memory the pool shares with them (src/arena.h): the bytes
-- arrive exactly, whatever happens to the call, and p:stats().shared shows
-- which way they went.
local parallelize = require "parallelize"
local support = require "spec.support"

local Parallelize = parallelize.Parallelize

local KIB = 1024

-- Stops p and returns nil, for `p = stop(p)` in a finally: busted keeps
-- each test's finally, and with it the stopped pool and all it holds
-- (here, hundreds of MiB), unless the finally lets go of it.
local function stop(p)
  p:stop()
  return nil
end

-- A string of n bytes that differs from every other (i) in many places.
local function text(i, n)
  local head = ("<%d>"):format(i)
  local unit = string.char(65 + i % 26, 97 + i % 23, 48 + i % 10)
  return head .. string.rep(unit, math.floor((n - 2 * #head) / 3)) .. head
end

describe("big strings through shared memory", function()
  -- Hundreds of MiB of strings pass through this process's heap here: a
  -- full collection afterwards brings its next collection back near,
  -- where the specs run after it (finalizers during drains) expect it.
  after_each(function()
    collectgarbage()
    collectgarbage()
  end)
  it("carry each call's arguments and results exactly, many times the region's size over",
    function()
      local p = Parallelize(function(s, i)
        return s:reverse(), { s = s, n = #s, i = i }, s:sub(1, 8)
      end, { workers = 2 })
      finally(function() p = stop(p) end)
      -- 360 calls of 300 KiB: 105 MiB each way, past the 64 MiB of the
      -- calls' area, so its blocks are freed and used again.
      local n, size, want = 360, 300 * KIB, {}
      for i = 1, n do
        want[i] = text(i, size)
        p(want[i], i)
      end
      for i = 1, n do
        local ok, reversed, t, head = p:result(i)
        assert.is_true(ok)
        assert.are.equal(want[i]:reverse(), reversed)
        assert.are.equal(want[i], t.s)
        assert.are.same({ #want[i], i }, { t.n, t.i })
        assert.are.equal(want[i]:sub(1, 8), head)
      end
      local shared = p:stats().shared
      local bytes = 0
      for i = 1, n do bytes = bytes + #want[i] end
      -- Every argument went through shared memory (p(s) waits for room
      -- there); results too while their worker's ring had room (this loop
      -- drains only when it waits), the rest inline.
      assert.are.equal(bytes, shared.sent)
      assert.is_true(shared.received > 16 * 1024 * KIB and shared.received <= 2 * bytes,
        "received " .. shared.received)
    end)

  it("leave smaller strings, and tables' strings going out, inline", function()
    local p = Parallelize(function(x) return x end, { workers = 1 })
    finally(function() p = stop(p) end)
    local small = string.rep("a", 64 * KIB - 1)
    p(small)
    p({ string.rep("b", 100 * KIB) })
    p:wait()
    assert.are.equal(small, select(2, p:result(1)))
    assert.are.equal(100 * KIB, #select(2, p:result(2))[1])
    -- The table's string came back through the worker's ring, not out.
    assert.are.same({ sent = 0, received = 100 * KIB }, p:stats().shared)
  end)

  it("are counted once in a value its decoder read twice (a shared table after them)", function()
    -- A result that shares a table is decoded again from its start
    -- (src/codec_dec.c): the string is read twice, and counted once.
    local p = Parallelize(function(n)
      local t = { n }
      return { string.rep("s", 100 * KIB), t, t }
    end, { workers = 1 })
    finally(function() p = stop(p) end)
    p(7)
    p:wait()
    local r = select(2, p:result(1))
    assert.are.equal(100 * KIB, #r[1])
    assert.is_true(rawequal(r[2], r[3]))
    assert.are.same({ 7 }, r[2])
    assert.are.same({ sent = 0, received = 100 * KIB }, p:stats().shared)
  end)

  it("carry a map's items and results, round the workers' rings many times", function()
    -- 400 items of 200 KiB: 80 MiB each way, five times what the rings of
    -- two workers hold; the map drains as results come, so none waits.
    local list, bytes = {}, 0
    for i = 1, 400 do
      list[i] = text(i, 200 * KIB + i)
      bytes = bytes + #list[i]
    end
    local p = Parallelize(function(s) return s:upper() end, { workers = 2 })
    finally(function() p = stop(p) end)
    local out = p:map(list)
    for i = 1, 400 do assert.are.equal(list[i]:upper(), out[i]) end
    assert.are.same({ sent = bytes, received = bytes }, p:stats().shared)
  end)

  it("keep a call's arguments for the call that runs again after its worker died", function()
    local marks = support.tmpdir()
    local p = Parallelize(function(s, i, dir)
      local mark = dir .. "/" .. i
      local f = io.open(mark, "r")
      if not f then
        -- the first attempt of every third call kills its worker
        if i % 3 == 0 then
          assert(io.open(mark, "w")):close()
          local ffi = require "ffi"
          pcall(ffi.cdef, "int kill(int, int); int getpid(void);")
          ffi.C.kill(ffi.C.getpid(), 9)
        end
      else
        f:close()
      end
      return #s, s:sub(-12)
    end, { workers = 2, max_deaths = 2 })
    finally(function() -- (busted keeps one finally a test: the last)
      p:stop()
      support.rmdir(marks)
    end)
    local want = {}
    for i = 1, 30 do
      want[i] = text(i, 200 * KIB)
      p(want[i], i, marks)
    end
    for i = 1, 30 do
      local ok, n, tail = p:result(i)
      assert.is_true(ok, tostring(n))
      assert.are.same({ #want[i], want[i]:sub(-12) }, { n, tail })
    end
    assert.are.equal(10, p:stats().deaths)
  end)

  it("come back in errors' arguments and in what stop aborts", function()
    local p = Parallelize(function(s) error("no thanks: " .. #s) end, { workers = 2 })
    finally(function() p = stop(p) end)
    local big = text(1, 150 * KIB)
    p(big)
    p:wait()
    local err = p.errors[1]
    assert.are.equal(big, err.args[1])
    assert.matches("no thanks: " .. #big, err.message, 1, true)

    local q = Parallelize(function(s, dt)
      require("parallelize").sleep(dt)
      return #s
    end, { workers = 1 })
    local want = {}
    for i = 1, 6 do
      want[i] = text(i, 120 * KIB)
      q(want[i], 0.3)
    end
    local aborted = q:stop(0)
    assert.is_true(#aborted >= 4)
    for _, call in ipairs(aborted) do assert.are.equal(want[call.id], call[1]) end
  end)

  it("stay for a call cancelled after it was sent, until its worker is past it", function()
    -- The worker is busy; the next call waits in it, sent, not started, and is
    -- cancelled: its error comes at once. Two more then take the calls
    -- area's bytes again (the second goes round to where its string was):
    -- when the worker reaches the cancelled call it must still read its
    -- own bytes.
    local dir = support.tmpdir()
    local p = Parallelize(function(s, log)
      if s == "busy" then require("parallelize").sleep(0.5) return 0 end
      if log then
        local f = assert(io.open(log, "w"))
        f:write(s:sub(1, 8), " ", #s)
        f:close()
      end
      return #s
    end, { workers = 1 })
    finally(function()
      p = stop(p)
      support.rmdir(dir)
    end)
    local log = dir .. "/seen"
    -- Quick calls first: the worker is then sent several calls at a time.
    for _ = 1, 50 do p("quick") end
    assert.is_true(p:wait(10))
    p("busy")
    local id = p(string.rep("A", 1024 * KIB), log)
    -- Both held by the worker: handed to it under the I/O lock, which
    -- p:stats takes, and written to its socket in the same turn.
    assert.is_true(support.eventually(function() return p:stats().running == 2 end, 5))
    assert.is_true(p:cancel(id))
    local ok, err = p:result(id, 5)
    assert.is_false(ok)
    assert.is_true(err.cancelled)
    local b, c = p(string.rep("B", 1024 * KIB)), p(string.rep("C", 1024 * KIB))
    assert.is_true(p:wait(10))
    assert.are.same({ true, 1024 * KIB }, { p:result(c) })
    assert.are.same({ true, 1024 * KIB }, { p:result(b) })
    -- the cancelled call ran (its answer dropped) on its own bytes
    assert.are.equal("AAAAAAAA " .. 1024 * KIB, support.read(log))
    -- and its bytes are free again: another round of the area works
    for _ = 1, 80 do p(string.rep("D", 1024 * KIB)) end
    assert.is_true(p:wait(20))
    assert.are.equal(3 * 1024 * KIB + 80 * 1024 * KIB, p:stats().shared.sent)
  end)

  it("count toward max_message", function()
    local p = Parallelize(function(n) return string.rep("r", n) end,
      { workers = 1, max_message = 100 * KIB })
    finally(function() p = stop(p) end)
    -- (a few bytes above the string: the count, the tag, where it is)
    local ok, err = pcall(p, string.rep("x", 200 * KIB))
    assert.is_false(ok)
    assert.matches("cannot queue the call: its arguments are 2048%d%d bytes encoded, "
      .. "above max_message %(102400%)", err)
    local id = p(200 * KIB)
    p:wait()
    assert.matches("the result of call " .. id .. " is 2048%d%d bytes, above max_message %(102400%)",
      select(2, p:result(id)).message)
    assert.are.same({ sent = 0, received = 0 }, p:stats().shared)
  end)

  it("give a ring the blocks of a result that is not sent", function()
    -- 16 MiB of strings fill a worker's ring (one worker: 16 MiB a ring):
    -- once above max_message, once before a value the codec refuses.
    -- Neither frame is sent; the results after them still use the ring.
    local p = Parallelize(function(how, n)
      if how == "small" then return string.rep("s", n) end
      local t = {}
      for i = 1, 16 do t[i] = string.rep(string.char(64 + i), 1024 * KIB) end
      if how == "thread" then t[17] = coroutine.create(print) end
      return unpack(t)
    end, { workers = 1, max_message = 8 * 1024 * KIB })
    finally(function() p = stop(p) end)
    for _, how in ipairs({ "refused", "thread" }) do
      local id = p(how)
      p:wait()
      local ok, err = p:result(id)
      assert.is_false(ok)
      assert.matches(how == "refused" and "above max_message" or "cannot encode a thread",
        err.message)
      local before = p:stats().shared.received
      for _ = 1, 20 do p("small", 200 * KIB) end
      p:wait()
      -- (Not always all 20: while this loop does not drain, a ring that
      -- went round early holds only what lies before its unread blocks,
      -- and the rest goes inline. A ring lost to the refused blocks took
      -- none of them.)
      local received = p:stats().shared.received - before
      assert.is_true(received >= 200 * KIB and received <= 20 * 200 * KIB, "received " .. received)
    end
  end)

  it("keep a ring in use when a result with a table follows big ones", function()
    -- (s, {}): s is placed as a scalar before the table sends the rest of
    -- the tuple to the full encoder. (That encoder once started over and
    -- placed s again, past a skip round the ring: no frame named the
    -- first block, and the parent's tail stayed a round behind.)
    local p = Parallelize(function(k)
      local s = string.rep(string.char(65 + k % 26), 1024 * KIB)
      if k == 2 then return s, {} end
      return s
    end, { workers = 1 })
    finally(function() p = stop(p) end)
    for k = 1, 60 do
      p(k)
      p:wait()
    end
    for k = 1, 60 do
      assert.are.equal(string.rep(string.char(65 + k % 26), 1024 * KIB), select(2, p:result(k)))
    end
    -- every result came back through the ring (the tail was left a round
    -- behind after 16 of them, and the ring then full for good)
    assert.are.equal(60 * 1024 * KIB, p:stats().shared.received)
  end)

  it("place a result's big strings once when a table comes after them", function()
    -- Two 6 MiB strings, then a table: the ring (16 MiB with one worker)
    -- takes both once. Placed a second time by an encoder starting over
    -- for the table, 24 MiB do not fit, and both went inline.
    local p = Parallelize(function(n)
      local s = string.rep("x", n)
      return s, s .. "y", {}
    end, { workers = 1 })
    finally(function() p = stop(p) end)
    local ok, a, b, t = p:result(p(6 * 1024 * KIB))
    assert.is_true(ok)
    assert.are.same({ 6 * 1024 * KIB, 6 * 1024 * KIB + 1, "table" }, { #a, #b, type(t) })
    assert.are.equal(12 * 1024 * KIB + 1, p:stats().shared.received)
  end)

  it("make p:stop() raise 'busy' from a finalizer while a map's chunk encodes", function()
    local core = require "parallelize.core"
    local p = Parallelize(function(t) return #t[1] + t[2]() end, { workers = 2 })
    local function inside_chunk()
      local level = 2
      while true do
        local info = debug.getinfo(level, "f")
        if not info then return false end
        if info.func == core.pool_submit_chunk then return true end
        level = level + 1
      end
    end
    local stop_ok, stop_err
    local function arm()
      local u = newproxy(true)
      getmetatable(u).__gc = function()
        if stop_ok ~= nil then return end
        if inside_chunk() then
          stop_ok, stop_err = pcall(p.stop, p)
        else
          arm()
        end
      end
    end
    local saved, saved_mul = collectgarbage("setpause", 0), collectgarbage("setstepmul", 1000)
    finally(function() -- (busted keeps one finally a test: the last)
      stop_ok = stop_ok == nil and "disarmed" or stop_ok
      collectgarbage("setpause", saved)
      collectgarbage("setstepmul", saved_mul)
      p = stop(p)
    end)
    -- Items hold a big string (placed in the arena first) and a function,
    -- whose bytecode the encoder allocates: a collection step runs there.
    local list, want = {}, {}
    for i = 1, 100 do
      local v = i
      list[i] = { text(i, 100 * KIB), function() return v end }
      want[i] = #list[i][1] + i
    end
    collectgarbage() -- (what earlier specs left would make the cycles long)
    -- Up to 80 maps: where a cycle's finalizers run is chance (the whole
    -- suite in one process missed the encode in 20 maps once in CI, after
    -- passing hundreds of runs); it stops at the first that lands.
    for _ = 1, 80 do
      if stop_ok ~= nil then break end
      for _ = 1, 4 do arm() end
      assert.are.same(want, p:map(list))
    end
    collectgarbage("setpause", saved)
    collectgarbage("setstepmul", saved_mul)
    assert.is_false(stop_ok)
    assert.matches("the pool is busy: p:stop%(%) called while a map encodes a chunk", stop_err)
    assert.is_false(p.stopped)
  end)

  it("make p(s) wait for room rather than go inline", function()
    local p = Parallelize(function(s) return #s end, { workers = 2 })
    finally(function() p = stop(p) end)
    -- 200 MiB of arguments through a 64 MiB area, none held by the script.
    local s = string.rep("w", 1024 * KIB)
    for _ = 1, 200 do p(s) end
    p:wait()
    assert.are.equal(200, #p.results)
    assert.are.equal(200 * 1024 * KIB, p:stats().shared.sent)
  end)

  it("never leave p(s) waiting on a record it already has (2 GiB, bounded in time)", function()
    -- A wait for room in shared memory once slept for the record after
    -- one that came in while it drained: a map of 1 MiB strings hung now
    -- and then.  Here each p(s) and map waits for room many times over.
    local script = [[
      local P = require "parallelize"
      local p = P.Parallelize(function(s) return s end, { workers = 3 })
      local s = string.rep("m", 1024 * 1024)
      local list = {}
      for i = 1, 1000 do list[i] = s end
      for _ = 1, 1000 do p(s) end
      local out = p:map(list)
      p:wait()
      local ok = #p.results == 1000 and #out == 1000 and out[1000] == s and p.results[1000] == s
      print(ok and "ok" or "wrong", ("%d"):format(p:stats().shared.sent))
      p:stop()
    ]]
    local path = support.tmpdir() .. "/loop.lua"
    finally(function() support.rmdir(path:match("(.*)/")) end)
    support.write(path, script)
    local out = support.run("timeout 120 " .. support.quote(support.pzlua()) .. " " .. path)
    assert.are.equal("ok\t" .. 2000 * 1024 * 1024, out:gsub("%s+$", ""))
  end)

  it("work in a pool made inside a worker", function()
    local out = parallelize.map(function(i)
      local P = require "parallelize"
      local inner = P.Parallelize(function(s) return s .. s end, { workers = 1 })
      local s = string.rep(string.char(64 + i), 80 * 1024)
      inner(s)
      inner:wait()
      local r = inner.results[1]
      local sent = inner:stats().shared.sent
      inner:stop()
      return #r .. ":" .. r:sub(1, 1) .. ":" .. sent
    end, { 1, 2, 3 }, { workers = 2 })
    assert.are.same({ "163840:A:81920", "163840:B:81920", "163840:C:81920" }, out)
  end)

  it("are not used by workers behind a launcher", function()
    local p = Parallelize(function(s) return s:upper() end,
      { workers = 1, launcher = function() return { support.pzlua(), "--worker" } end })
    finally(function() p = stop(p) end)
    local s = text(7, 300 * KIB)
    p(s)
    p:wait()
    assert.are.equal(s:upper(), p.results[1])
    assert.are.same({ sent = 0, received = 0 }, p:stats().shared)
  end)
end)
