-- The benchmark tools of bench/ work and report what they claim to: the
-- rounds driver (order, medians, ratios within a round, skipped and failed
-- systems), one small measurement of each workload of the pool, of the C
-- limits and of the Python anchors. Speed itself is `make bench`'s; only
-- the shape and the sanity of the figures are checked here.
local support = require "spec.support"

local quote = support.quote

local parse, pzlua = support.parse_kv, support.run_bench

local function number(kv, key)
  local v = tonumber(kv[key])
  assert(v, "no number " .. key .. " in the output")
  return v
end

local function python()
  for _, p in ipairs({ "/usr/bin/python3", "python3" }) do
    local _, status = support.run("command -v " .. p .. " >/dev/null")
    if status == 0 then return p end
  end
  return nil
end

describe("bench/rounds.lua", function()
  it("runs systems in turns and takes each ratio within a round", function()
    local defer = support.defer(finally)
    local dir = support.tmpdir()
    defer(function() support.rmdir(dir) end)
    local order = dir .. "/order"
    local a = string.format("n=$(cat %s 2>/dev/null || echo 0); n=$((n+1)); echo $n > %s; "
      .. "echo a >> %s; echo v=$((n*10)); echo tag=x; echo '# a comment=1'", quote(dir .. "/a"),
      quote(dir .. "/a"), quote(order))
    local b = "echo b >> " .. quote(order) .. "; echo v=5"
    local s = "echo s >> " .. quote(order) .. "; echo skipped=not here"
    local f = "echo f >> " .. quote(order) .. "; echo half=1; exit 3"
    local kv, out, status = pzlua("rounds.lua", table.concat({ "3", quote("a=" .. a), quote("b=" .. b),
      quote("s=" .. s), quote("f=" .. f), "r=a.v/b.v", "r2=a.v/s.v", "r3=f.half/b.v" }, " "))
    assert.are.equal(1, status, out)
    -- Round 1 starts with a, round 2 with b, round 3 with the third
    -- system; a skipped or failed system runs once.
    assert.are.equal("a\nb\ns\nf\nb\na\na\nb\n", support.read(order))
    assert.are.equal("3", kv.rounds)
    assert.are.equal("20 10 30 (10,20,30)", kv["a.v"])
    assert.are.equal("5 5 5 (5,5,5)", kv["b.v"])
    assert.are.equal("x", kv["a.tag"])
    assert.is_nil(kv["a.a comment"])
    assert.are.equal("4 2 6 (2,4,6)", kv.r)
    assert.are.equal("n/a", kv.r2)
    assert.are.equal("n/a", kv.r3)
    assert.are.equal("not here", kv["s.skipped"])
    assert.are.equal("round 1: exit status 3", kv["f.failed"])
    assert.is_nil(kv["f.half"])
  end)

  it("exits 0 when every system ran", function()
    local kv, out, status = pzlua("rounds.lua", "1 'a=echo v=3' 'b=echo v=2' r=a.v/b.v")
    assert.are.equal(0, status, out)
    assert.are.equal("1.5 1.5 1.5 (1.5)", kv.r)
  end)

  it("refuses arguments it cannot read", function()
    local _, out, status = pzlua("rounds.lua", "x 'a=echo v=1'")
    assert.are.equal(2, status, out)
    _, out, status = pzlua("rounds.lua", "1 'not a system'")
    assert.are.equal(2, status, out)
  end)
end)

describe("bench/workload.lua", function()
  it("measures tiny calls, with the counts of every thread and process", function()
    local kv, out, status = pzlua("workload.lua", "tiny 2000 2")
    assert.are.equal(0, status, out)
    assert.are.equal("2000", kv.n)
    assert.are.equal("2", kv.workers)
    assert.is_true(number(kv, "calls_per_s") > 0)
    assert.is_true(number(kv, "seconds") > 0)
    for _, part in ipairs({ "main", "io", "workers", "others" }) do
      for _, what in ipairs({ "cpu_s", "vol", "invol" }) do
        assert.is_true(number(kv, part .. "_" .. what) >= 0, part .. "_" .. what)
      end
    end
    -- The workers ran the calls: they used CPU.
    assert.is_true(number(kv, "workers_cpu_s") > 0)
    assert.is_true(number(kv, "switches_per_call") >= 0)
    assert.is_true(number(kv, "io_wakeups_per_call") >= 0)
    -- Who is who, for bench/profile.py: this process, its I/O thread, two
    -- workers and the spawner, all distinct.
    local ids, seen = {}, {}
    for _, key in ipairs({ "tid_main", "tids_io", "pids_workers", "pids_others" }) do
      for id in (kv[key] or ""):gmatch("%d+") do ids[#ids + 1] = id end
    end
    for _, id in ipairs(ids) do
      assert.is_nil(seen[id], "id " .. id .. " twice")
      seen[id] = true
    end
    assert.are.equal(5, #ids, out)
    assert.are.equal(2, select(2, kv.pids_workers:gsub("%d+", "")))
    assert.are.equal(2, select(2, kv.worker_cpu_s_each:gsub("[%d.]+", "")))
  end)

  it("measures p:map", function()
    local kv, out, status = pzlua("workload.lua", "map 2000 2")
    assert.are.equal(0, status, out)
    assert.is_nil(kv.skipped, out)
    assert.are.equal("2000", kv.n)
    local rate = number(kv, "calls_per_s")
    assert.is_true(math.abs(rate - 2000 / number(kv, "seconds")) < 1e-3 * rate, out)
    assert.is_true(number(kv, "workers_cpu_s") > 0, out)
  end)

  it("measures p:stream from an array and from an iterator, with its window", function()
    local cases = { { "stream 3000 2", "default" }, { "stream_fn 3000 2", "default" },
      { "stream 3000 2 64", "64" }, { "stream_fn 3000 2 1", "1" } }
    for _, case in ipairs(cases) do
      local args, window = case[1], case[2]
      local kv, out, status = pzlua("workload.lua", args)
      assert.are.equal(0, status, args .. ": " .. out)
      assert.are.equal("3000", kv.n, out)
      local rate = number(kv, "calls_per_s")
      assert.is_true(math.abs(rate - 3000 / number(kv, "seconds")) < 1e-3 * rate, out)
      assert.are.equal(window, kv.max_pending, out)
      assert.is_true(number(kv, "workers_cpu_s") > 0, out)
    end
  end)

  it("measures parallelize.map in one shot", function()
    local kv, out, status = pzlua("workload.lua", "pzmap 2000 2")
    assert.are.equal(0, status, out)
    assert.are.equal("pzmap", kv.workload)
    local rate = number(kv, "calls_per_s")
    assert.is_true(math.abs(rate - 2000 / number(kv, "seconds")) < 1e-3 * rate, out)
  end)

  it("measures busy calls against the CPU they took", function()
    local kv, out, status = pzlua("workload.lua", "busy 40 2 100")
    assert.are.equal(0, status, out)
    local per_call = number(kv, "call_cpu_us")
    -- Calibrated to 100 us in the parent; the workers' clocks say about
    -- as much (a wide margin: other load changes the speed of a CPU).
    assert.is_true(per_call > 20 and per_call < 1000, out)
    assert.is_true(number(kv, "iterations") > 0)
    local ideal = number(kv, "ideal_s")
    assert.is_true(math.abs(ideal - 40 * per_call * 1e-6 / 2) < 1e-6, out)
    assert.is_true(math.abs(number(kv, "vs_ideal") - number(kv, "seconds") / ideal) < 1e-3, out)
  end)

  it("measures strings in and out, and the parent's peak memory", function()
    local kv, out, status = pzlua("workload.lua", "bytes 8 2 65536")
    assert.are.equal(0, status, out)
    assert.are.equal("65536", kv.size)
    local gbps = number(kv, "gb_per_s")
    assert.is_true(math.abs(gbps - 2 * 8 * 65536 / number(kv, "seconds") / 1e9) < 1e-3 * gbps, out)
    assert.is_true(tonumber(kv.peak_above_start_mib) ~= nil or kv.peak_above_start_mib == "n/a", out)
  end)

  it("refuses arguments it cannot read", function()
    for _, args in ipairs({ "", "tiny", "tiny 0 2", "busy 10 2", "bytes 10 2 0", "other 1 1",
        "stream 10 2 0", "stream_fn 10 2 x" }) do
      local _, out, status = pzlua("workload.lua", args)
      assert.are.equal(2, status, args .. ": " .. out)
    end
  end)
end)

describe("bench/stream_rss.lua", function()
  local function check(kv, out, lines, every)
    assert.are.equal(tostring(lines), kv.lines, out)
    assert.are.equal(tostring(every), kv.sample_every, out)
    local samples = {}
    for x in (kv.rss_mib_at or ""):gmatch("[^,]+") do samples[#samples + 1] = tonumber(x) end
    assert.are.equal(lines / every, #samples, out)
    local _, heaps = (kv.lua_heap_mib_at or ""):gsub("[^,]+", "")
    assert.are.equal(lines / every, heaps, out)
    local first, last = number(kv, "rss_first_mib"), number(kv, "rss_last_mib")
    assert.is_true(first > 0 and math.abs(first - samples[1]) < 0.01, out)
    assert.is_true(math.abs(last - samples[#samples]) < 0.01, out)
    assert.is_true(math.abs(number(kv, "rss_growth_mib") - (last - first)) < 1e-3, out)
    assert.is_true(number(kv, "rss_max_mib") >= last, out)
    assert.is_true(number(kv, "rss_max_growth_mib") >= number(kv, "rss_growth_mib"), out)
    local rate = number(kv, "lines_per_s")
    assert.is_true(math.abs(rate - lines / number(kv, "seconds")) < 1e-3 * rate, out)
  end

  it("streams generated lines, sampling the parent's memory", function()
    local kv, out, status = pzlua("stream_rss.lua", "30000 10000")
    assert.are.equal(0, status, out)
    assert.are.equal("iterator", kv.source)
    assert.are.equal("default", kv.max_pending)
    check(kv, out, 30000, 10000)
  end)

  it("streams the lines of a file it writes and removes, with a given window", function()
    local kv, out, status = pzlua("stream_rss.lua", "--file 20000 5000 64")
    assert.are.equal(0, status, out)
    assert.are.equal("file", kv.source)
    assert.are.equal("64", kv.max_pending)
    check(kv, out, 20000, 5000)
    assert.is_string(kv.file, out)
    assert.is_nil(io.open(kv.file, "r"), "the script left " .. kv.file .. " behind")
  end)

  it("refuses arguments it cannot read", function()
    for _, args in ipairs({ "0", "1000 300", "x", "1000 100 0", "--file 10 20" }) do
      local _, out, status = pzlua("stream_rss.lua", args)
      assert.are.equal(2, status, args .. ": " .. out)
    end
  end)
end)

describe("bench/socketpair.c", function()
  local dir, exe
  setup(function()
    dir = support.tmpdir()
    exe = dir .. "/socketpair"
    local out, status = support.run("cc -std=c11 -O2 -Wall -Wextra -Werror -o " .. quote(exe) .. " bench/socketpair.c")
    assert(status == 0, out)
  end)
  teardown(function() support.rmdir(dir) end)

  it("moves tiny calls through socketpairs, checked", function()
    local out, status = support.run(quote(exe) .. " tiny 20000 2 256")
    assert.are.equal(0, status, out)
    local kv = parse(out)
    assert.are.equal("20000", kv.n)
    assert.are.equal("256", kv.batch)
    assert.is_true(number(kv, "calls_per_s") > 0)
  end)

  it("pumps large messages in and out, checked", function()
    local out, status = support.run(quote(exe) .. " pump 16 65536 2")
    assert.are.equal(0, status, out)
    local kv = parse(out)
    assert.are.equal(tostring(2 * 16 * 65536), kv.bytes)
    assert.is_true(number(kv, "gb_per_s") > 0)
  end)

  it("refuses arguments it cannot read", function()
    for _, args in ipairs({ "", "tiny 10 2", "tiny 10 0 256", "pump 10 0 2", "other 1 2 3" }) do
      local out, status = support.run(quote(exe) .. " " .. args)
      assert.are.equal(2, status, args .. ": " .. out)
    end
  end)
end)

describe("bench/py_anchor.py", function()
  local py = python()
  local function run(args)
    local out, status = support.run(quote(py) .. " bench/py_anchor.py " .. args)
    assert.are.equal(0, status, out)
    return parse(out), out
  end

  if not py then
    pending("python3 is not installed (make deps-bench)")
    return
  end

  it("measures Pool.map on tiny calls", function()
    local kv = run("map 2000 2")
    assert.are.equal("2000", kv.n)
    assert.is_true(number(kv, "calls_per_s") > 0)
    assert.is_true(number(kv, "switches_per_call") >= 0)
  end)

  it("measures Pool.map and Pool.imap_unordered in one shot", function()
    for _, how in ipairs({ "map", "imap_unordered" }) do
      local kv, out = run("oneshot " .. how .. " 2000 2")
      assert.are.equal("oneshot_" .. how, kv.workload, out)
      assert.are.equal("2000", kv.n, out)
      local rate = number(kv, "calls_per_s")
      assert.is_true(math.abs(rate - 2000 / number(kv, "seconds")) < 1e-3 * rate, out)
    end
  end)

  it("measures busy calls against the CPU they took", function()
    local kv, out = run("busy 40 2 100")
    local per_call = number(kv, "call_cpu_us")
    assert.is_true(per_call > 20 and per_call < 1000, out)
    assert.is_true(math.abs(number(kv, "ideal_s") - 40 * per_call * 1e-6 / 2) < 1e-6, out)
  end)

  it("measures bytes in and out, and the parent's peak memory", function()
    local kv, out = run("bytes 8 2 65536")
    assert.is_true(number(kv, "gb_per_s") > 0, out)
    assert.are.equal(tostring(8 * 65536 / 1048576), kv.held_mib)
  end)
end)
