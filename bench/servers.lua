--- The server fixtures of spec/servers.lua, measured: how long each takes
-- to start and stop, a line's round trip and the throughput through `cat`
-- over ssh (direct, and through a master connection), srun -u and the
-- namespace's link, the cost of 32 connections at once, how long a cut
-- link takes to be noticed with the keepalives the fixtures use, and what
-- delay(20) adds. Anchors, measured in the same run: the same round trip
-- and throughput through a local `cat` on pipes, and a TCP connect on the
-- undelayed link. Needs root (it starts sshd, munge, namespaces); without
-- it, it says so and prints no figure.
--
--   build/pzlua bench/servers.lua      (from the top of the tree)
--
-- Environment: PZ_BENCH_TRIPS (line round trips per link, default 300),
-- PZ_BENCH_MIB (MiB through each `cat`, default 16), PZ_BENCH_RUNS (runs
-- of each start-up and of the cut, default 3).
--
-- Output: key=value lines; times in seconds unless the key says _us or
-- _ms, throughput in MB/s (10^6 bytes per second, each way).
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. dir .. "/../?.lua;" .. dir .. "/../lua/?.lua;" .. package.path
local B = require "benchlib"
local servers = require "spec.servers"
local support = require "spec.support"

local TRIPS = math.floor(B.env_number("PZ_BENCH_TRIPS", 300))
local MIB = math.floor(B.env_number("PZ_BENCH_MIB", 16))
local RUNS = B.runs(3)

local ok, why = servers.can_run()
if not ok then
  B.note("server benchmarks skipped: %s", why)
  return
end

local function concat(a, b)
  local all = {}
  for _, v in ipairs(a) do all[#all + 1] = v end
  for _, v in ipairs(b) do all[#all + 1] = v end
  return all
end

local logs = support.tmpdir()

-- Median seconds of `trips` one-line round trips through a process that
-- echoes its stdin (argv), after a warm-up; the process is ended after.
local function line_round_trip(argv, trips)
  local pid, to, from = servers.spawn(argv, { pipes = true, log = logs .. "/rtt.log" })
  assert(pid, to)
  local times = {}
  for i = 1, trips + 20 do
    local t0 = B.now()
    assert(servers.write_all(to, "x\n"))
    assert(servers.read_exact(from, 2, 30))
    if i > 20 then times[#times + 1] = B.now() - t0 end
  end
  servers.close(to)
  servers.close(from)
  assert(servers.reap(pid, 30), "the echo did not end")
  return B.median(times)
end

-- The command that says "ready" once it runs, then echoes its stdin.
local READY_CAT = "echo ready; exec cat"

-- MB/s each way of `mib` MiB through argv (which runs READY_CAT), written
-- and read at once, timed from its "ready" (so without the connection's
-- set-up); checks the bytes came back.
local function throughput(argv, mib)
  local data = string.rep("0123456789abcdef", mib * 65536)
  local pid, to, from = servers.spawn(argv, { pipes = true, log = logs .. "/cat.log" })
  assert(pid, to)
  assert(servers.read_exact(from, 6, 30) == "ready\n", "no ready")
  local t0 = B.now()
  local out, err = servers.exchange(to, from, data, 300)
  local t = B.now() - t0
  assert(out == data, err or "the bytes came back changed")
  assert(servers.reap(pid, 30))
  return #data / t / 1e6
end

-- Median start and stop times of fixture `kind` over RUNS runs.
local function start_stop(kind)
  local starts, stops = {}, {}
  for i = 1, RUNS do
    local t0 = B.now()
    local h = assert(servers[kind]())
    starts[i] = B.now() - t0
    t0 = B.now()
    assert(h:stop())
    stops[i] = B.now() - t0
  end
  return B.median(starts), B.median(stops)
end

B.note("load average before: %s", (support.read("/proc/loadavg") or "?"):match("^(%S+ %S+ %S+)"))

-- Start-up and stop.
for _, kind in ipairs { "sshd", "slurm", "netns" } do
  local start, stop = start_stop(kind)
  B.emit(kind .. "_start_s", start)
  B.emit(kind .. "_stop_s", stop)
end

-- The anchors: a local cat on pipes.
local local_rtt = line_round_trip({ "cat" }, TRIPS)
B.emit("local_cat_rtt_us", local_rtt * 1e6)
local local_mbs = throughput({ "sh", "-c", READY_CAT }, MIB)
B.emit("local_cat_mb_s", local_mbs)

-- ssh on 127.0.0.1.
do
  local s = assert(servers.sshd())
  local rtt = line_round_trip(s:command("cat"), TRIPS)
  B.emit("ssh_cat_rtt_us", rtt * 1e6)
  B.emit("ssh_cat_rtt_vs_local", rtt / local_rtt)
  local mbs = throughput(s:command(READY_CAT), MIB)
  B.emit("ssh_cat_mb_s", mbs)
  B.emit("ssh_cat_mb_s_vs_local", mbs / local_mbs)
  -- One command: a whole connection (key exchange) against a session on a
  -- master connection.
  local direct, mux = {}, {}
  s:argv(true) -- the master, started before timing
  for i = 1, RUNS do
    local t0 = B.now()
    local _, status = servers.run(s:command("true"))
    direct[i] = B.now() - t0
    assert(status == 0)
    t0 = B.now()
    _, status = servers.run(s:command("true", true))
    mux[i] = B.now() - t0
    assert(status == 0)
  end
  B.emit("ssh_command_direct_s", B.median(direct))
  B.emit("ssh_command_mux_s", B.median(mux))
  B.emit("ssh_cat_mux_rtt_us", line_round_trip(s:command("cat", true), TRIPS) * 1e6)
  B.emit("ssh_cat_mux_mb_s", throughput(s:command(READY_CAT, true), MIB))
  -- 32 at once, each until its session answers.
  for _, mux_used in ipairs { false, true } do
    local t0 = B.now()
    local sessions = {}
    for i = 1, 32 do
      local pid, to, from = servers.spawn(s:command("echo ready; cat", mux_used), { pipes = true })
      assert(pid, to)
      sessions[i] = { pid = pid, to = to, from = from }
    end
    for _, x in ipairs(sessions) do assert(servers.read_exact(x.from, 6, 60)) end
    B.emit(mux_used and "ssh_32_sessions_mux_s" or "ssh_32_connections_s", B.now() - t0)
    for _, x in ipairs(sessions) do
      servers.close(x.to)
      servers.close(x.from)
      servers.reap(x.pid, 10)
    end
  end
  assert(s:stop())
end

-- srun -u on the one-node Slurm.
do
  local q = assert(servers.slurm())
  local argv = concat(q.srun, { "-n1", "cat" })
  local t0 = B.now()
  local _, status = servers.run(concat(q.srun, { "-n1", "true" }))
  B.emit("srun_true_s", B.now() - t0)
  assert(status == 0)
  local rtt = line_round_trip(argv, TRIPS)
  B.emit("srun_cat_rtt_us", rtt * 1e6)
  B.emit("srun_cat_rtt_vs_local", rtt / local_rtt)
  local mbs = throughput(concat(q.srun, { "-n1", "sh", "-c", READY_CAT }), MIB)
  B.emit("srun_cat_mb_s", mbs)
  B.emit("srun_cat_mb_s_vs_local", mbs / local_mbs)
  assert(q:stop())
end

-- The namespace: its link, its delay, and a cut.
do
  local n = assert(servers.netns())
  local function connect_median()
    local t = {}
    for i = 1, 21 do t[i] = assert(servers.connect_time(n.host, n.port)) end
    return B.median(t)
  end
  local connect0 = connect_median()
  B.emit("netns_connect_us", connect0 * 1e6)
  local rtt0 = line_round_trip(n:command("cat"), TRIPS)
  B.emit("netns_ssh_cat_rtt_us", rtt0 * 1e6)
  B.emit("netns_ssh_cat_mb_s", throughput(n:command(READY_CAT), MIB))
  local method = n:delay(20)
  B.emit("delay_method", method)
  local connect20 = connect_median()
  B.emit("delay20_connect_ms", connect20 * 1e3)
  B.emit("delay20_connect_added_ms", (connect20 - connect0) * 1e3)
  local rtt20 = line_round_trip(n:command("cat"), math.min(TRIPS, 50))
  B.emit("delay20_ssh_cat_rtt_ms", rtt20 * 1e3)
  B.emit("delay20_ssh_cat_rtt_added_ms", (rtt20 - rtt0) * 1e3)
  B.emit("delay20_ssh_cat_mb_s", throughput(n:command(READY_CAT), MIB))
  n:delay(0)

  -- A cut: when the client gives up (exit 255), and when the server's side
  -- of the session has ended.
  local client, server = {}, {}
  for i = 1, RUNS do
    local pid, to, from = servers.spawn(n:command("echo ready; cat"), { pipes = true })
    assert(pid, to)
    assert(servers.read_exact(from, 6, 30))
    local before = n:processes()
    n:cut()
    local t0 = B.now()
    local done, status = servers.reap(pid, 30)
    assert(done and servers.exit_code(status) == 255, "ssh did not exit 255 after the cut")
    client[i] = B.now() - t0
    -- the session's processes in the namespace: every process of the
    -- fixture but the sshd listener and whatever was there before the
    -- session
    local session = {}
    for p, start in pairs(before) do
      if p ~= n.sshd_pid and (support.read("/proc/" .. p .. "/cmdline") or ""):find("^sshd: root") then
        session[p] = start
      end
    end
    while #servers.alive(session) > 0 and B.now() - t0 < 30 do require("parallelize.core").sleep(0.05) end
    server[i] = B.now() - t0
    servers.close(to)
    servers.close(from)
    n:restore()
  end
  B.emit("cut_client_exit_s", B.median(client))
  B.emit("cut_server_session_end_s", B.median(server))
  assert(n:stop())
end

support.rmdir(logs)
B.note("load average after: %s", (support.read("/proc/loadavg") or "?"):match("^(%S+ %S+ %S+)"))
