-- How a worker reports a call whose executor raised: through on_error
-- (message, traceback, value), without the worker dying, even when the
-- executor left no stack or no memory behind it.
local parallelize = require "parallelize"

--- Run in a worker (it travels as an executor's upvalue): limits the
-- worker's address space (RLIMIT_AS) to what it maps now plus extra_mib.
local function limit_address_space(extra_mib)
  local ffi = require "ffi"
  pcall(ffi.cdef, [[
    struct pz_spec_rlimit { unsigned long cur, max; };
    int setrlimit(int resource, const struct pz_spec_rlimit *rlim);
  ]])
  local vmsize
  for line in io.lines("/proc/self/status") do
    vmsize = vmsize or tonumber(line:match("^VmSize:%s*(%d+)"))
  end
  local RLIMIT_AS = 9
  assert(ffi.C.setrlimit(RLIMIT_AS, ffi.new("struct pz_spec_rlimit", vmsize * 1024 + extra_mib * 1048576, -1ULL)) == 0)
end

describe("a call that fails in its worker", function()
  it("reports an executor's stack overflow with its place and traceback, call after call", function()
    -- LuaJIT leaves the message handler a little stack after an overflow,
    -- how much depends on where the executor's frames begin: the worker
    -- calls the executor as deep in the stack as it always has.
    local p = parallelize.Parallelize(function()
      local function f() return 1 + f() end
      return f()
    end, { workers = 1 })
    for i = 1, 3 do p(i) end
    assert.is_true(p:wait(60))
    p:stop()
    assert.are.equal(3, #p.errors)
    for _, e in ipairs(p.errors) do
      assert.matches("worker_errors_spec.lua:%d+: stack overflow$", e.message)
      assert.matches("in function 'f'", e.traceback)
    end
  end)

  it("reports an executor that left no memory, not even for its handler, and lives #nosan", function()
    -- The worker limits its address space (RLIMIT_AS), fills it with
    -- objects it keeps, then raises: on_error cannot build its table, and
    -- nothing may allocate outside a protected call while the worker
    -- reports the error (LuaJIT would abort the process). AddressSanitizer
    -- reserves terabytes of address space and cannot run under the limit.
    local p = parallelize.Parallelize(function(what)
      if what == "fill" then
        local slots = {}
        for i = 1, 4000000 do slots[i] = false end
        _G.pz_spec_kept = { slots = slots }
        local message = "the executor is out of memory"
        limit_address_space(32)
        pcall(function() while true do _G.pz_spec_kept = { _G.pz_spec_kept } end end)
        pcall(function() for i = 1, #slots do slots[i] = "k" .. i end end)
        error(message, 0)
      end
      return what
    end, { workers = 1, max_deaths = 1 })
    p("pid")
    p("fill")
    assert.is_true(p:wait(60))
    local deaths, pid = p:stats().deaths, p.pids[1]
    p:stop()
    assert.are.equal(1, #p.errors)
    assert.are.equal(2, p.errors[1].id)
    assert.are.equal("raised", p.errors[1].kind)
    -- Whose memory: the parent says "not enough memory" of its own too.
    assert.are.equal(string.format("not enough memory (in worker 1, pid %d)", pid), p.errors[1].message)
    assert.are.equal(0, deaths)
  end)
  it("says whose memory ran out when a map's chunk item left none #nosan", function()
    -- A chunk (chunk.c) catches its items' errors itself, or, when even its
    -- answer finds no memory, fails whole and its items run again alone
    -- (here, as a rule): either way the map's error says whose memory ran
    -- out, as the parent says "not enough memory" of its own too.
    local p = parallelize.Parallelize(function(what)
      if what == 3 then
        local slots = {}
        for i = 1, 4000000 do slots[i] = false end
        _G.pz_spec_kept = { slots = slots }
        limit_address_space(32)
        pcall(function() while true do _G.pz_spec_kept = { _G.pz_spec_kept } end end)
        pcall(function() for i = 1, #slots do slots[i] = "k" .. i end end)
        error("the executor is out of memory", 0)
      end
      return what
    end, { workers = 1, max_deaths = 1 })
    finally(function() p:stop() end)
    assert.are.equal(1, #p.executors) -- (waits for the worker to initialize)
    local pid = p.pids[1]
    local ok, err = pcall(p.map, p, { 1, 2, 3, 4 })
    assert.is_false(ok)
    assert.matches(string.format("map: item 3 failed: not enough memory %%(in worker 1, pid %d%%)$", pid),
      tostring(err))
  end)

  it("says whose memory ran out when a Deferred constructor left none #nosan", function()
    -- (the slot is given up; the message came bare, as the parent's own)
    local p = parallelize.Parallelize({ parallelize.Deferred(function()
      limit_address_space(32)
      local kept = {}
      while true do kept = { kept, {} } end
    end), function(x) return x end })
    finally(function() p:stop() end)
    for _ = 1, 6000 do -- at most a minute
      if #p.init_errors > 0 then break end
      parallelize.sleep(0.01)
    end
    assert.are.equal(1, #p.init_errors)
    assert.are.equal(1, p.init_errors[1].worker)
    assert.matches("^not enough memory %(in worker 1, pid %d+%)$", p.init_errors[1].message)
    assert.are.same({ 7 }, p:map({ 7 })) -- the other worker runs on
  end)

  it("makes runs' calls in C once memory ran out in the compiled loop #nosan", function()
    -- Runs of one-number calls are made by a compiled loop (src/wruns.h).
    -- Once the address space is full (RLIMIT_AS, as above), the loop's own
    -- reads may need memory; the call during which that happened gets the
    -- error and C makes every later call, as it did before the loop: when
    -- it was only off for the rest of a run, the first call of each later
    -- run failed for memory (80 of 60,000 here).
    local p = parallelize.Parallelize(function(what)
      if what == "fill" then
        local keep = {}
        for i = 1, 200000 do keep[i] = false end
        limit_address_space(48)
        local n = 0
        pcall(function() while true do n = n + 1; keep[n] = { n, n, n, n } end end)
        for i = 1, n, 4 do keep[i] = false end -- some room, in small blocks
        collectgarbage()
        _G.pz_spec_kept = keep
        return n
      end
      return what * 2
    end, { workers = 1, max_deaths = 3 })
    finally(function() p:stop() end)
    for k = 1, 1000 do p(k) end
    assert.is_true(p:wait(60))
    p("fill")
    assert.is_true(p:wait(60))
    local ids = {}
    for i = 1, 60000 do ids[i] = p(i) end
    assert.is_true(p:wait(120))
    local failed = 0
    for i = 1, 60000 do
      local ok, v = p:result(ids[i])
      if ok then
        assert.are.equal(2 * i, v)
      else
        failed = failed + 1
        assert.matches("^not enough memory %(in worker 1, pid %d+%)$", v.message)
      end
    end
    assert.is_true(failed <= 1, failed .. " calls failed for memory")
  end)

  it("reports an error object whose __tostring raises, with its traceback and value", function()
    local p = parallelize.Parallelize({ function(kind)
      local mt = { __tostring = function() error("no words for it") end }
      if kind == "yield" then mt.__tostring = function() return coroutine.yield() end end
      error(setmetatable({ code = 7 }, mt))
    end, parallelize.Deferred(function()
      error(setmetatable({}, { __tostring = function() error("nor for this") end }))
    end) })
    local a, b = p("raise"), p("yield")
    local _, ea = p:result(a)
    local _, eb = p:result(b)
    assert.truthy(ea.message:find("^%(error object is a table value; its __tostring raised: .*no words for it%)$"),
      ea.message)
    assert.truthy(eb.message:find("its __tostring raised: attempt to yield across C%-call boundary", 1), eb.message)
    assert.truthy(ea.traceback:find("stack traceback", 1, true), ea.traceback)
    assert.are.equal(7, ea.value.code)
    local _ = p.executors -- (waits until the second worker is given up: after its init_attempts)
    assert.are.equal(1, #p.init_errors)
    assert.truthy(p.init_errors[1].message:find("its __tostring raised: .*nor for this"), p.init_errors[1].message)
    p:stop()
  end)
end)
