-- The server fixtures of spec/servers.lua, each proved against the real
-- server with real traffic: sshd on 127.0.0.1, a one-node Slurm, and sshd in
-- a network namespace whose link is cut, restored and slowed. After each
-- test nothing it started is left: no process (by pid and start time), no
-- namespace, veth or temporary directory.
--
-- They need root and the servers' programs: without them each test reports
-- itself skipped (busted's pending, listed by name in the summary of
-- tools/run-tests.sh) with the reason. Tagged nosan: they test the
-- fixtures and the servers, not this project's C code, so the sanitizer
-- pass leaves them out.
local core = require "parallelize.core"
local servers = require "spec.servers"
local support = require "spec.support"

local SIGKILL = 9

-- Starts fixture `kind` for the running test, or skips the test when this
-- machine cannot run it; the fixture is stopped when the test ends,
-- whatever happens.
local function fixture(kind, defer)
  local ok, why = servers.can_run(kind)
  if not ok then pending(why) end
  local h, err = servers[kind]()
  assert(h, err)
  defer(function() h:stop() end)
  return h
end

local concat = support.concat

-- The clients a test starts (ssh, srun), each with its stdin and stdout as
-- pipes and its stderr in a log; all remembered in `seen` (pid -> start
-- time) for the final check, and killed at the end of the test if still
-- there.
local function clients(defer)
  local dir = support.tmpdir()
  local self = { seen = {}, dir = dir, n = 0 }
  defer(function()
    for pid, start in pairs(self.seen) do
      if support.start_time(pid) == start then support.kill(pid, SIGKILL) end
      servers.reap(pid, 2)
    end
    support.rmdir(dir)
  end)
  function self.spawn(argv)
    self.n = self.n + 1
    local log = ("%s/client-%d.log"):format(dir, self.n)
    local pid, to, from = servers.spawn(argv, { pipes = true, log = log })
    assert(pid, to)
    self.seen[pid] = support.start_time(pid)
    return { pid = pid, to = to, from = from, log = log }
  end
  -- Runs argv to its end with `input` on its stdin, within `seconds`:
  -- returns its output, its exit code and its stderr.
  function self.run(argv, input, seconds)
    local c = self.spawn(argv)
    local out, err = servers.exchange(c.to, c.from, input or "", seconds or 30)
    if not out then
      support.kill(c.pid, SIGKILL)
      servers.reap(c.pid, 5)
      error(("%s: %s; its stderr: %s"):format(servers.shell(argv), err, support.read(c.log) or ""))
    end
    local done, status = servers.reap(c.pid, 10)
    assert(done, servers.shell(argv) .. ": still running after its output ended")
    return out, servers.exit_code(status), support.read(c.log) or ""
  end
  return self
end

-- Reads one line (through "\n") from fd within `seconds`.
local function read_line(fd, seconds)
  local deadline, parts = core.now() + seconds, {}
  repeat
    local c, err = servers.read_exact(fd, 1, math.max(0.01, deadline - core.now()))
    if not c then error("reading a line: " .. err .. " after " .. table.concat(parts)) end
    parts[#parts + 1] = c
  until c == "\n"
  return table.concat(parts)
end

-- Stops h, then checks that nothing it or the test started is left: no
-- process of `seen` or of the fixture, no temporary directory, namespace
-- or link; and that stop kept to its bound.
local function stop_clean(h, seen)
  for pid, start in pairs(h:processes()) do seen[pid] = start end
  local t0 = core.now()
  local ok, err = h:stop()
  assert.is_true(ok, err)
  assert.is_true(core.now() - t0 < 10, "stop took more than 10 s")
  assert.are.same({}, servers.alive(seen))
  assert.is_nil(io.open(h.dir .. "/."), h.dir .. " is left")
  if h.namespace then
    assert.is_nil((servers.run { "ip", "netns", "list" }):find(h.namespace, 1, true), h.namespace .. " is left")
    local _, status = servers.run { "ip", "link", "show", h.host_link }
    assert.are_not.equal(0, status, h.host_link .. " is left")
  end
end

-- Every byte value, then `n` pseudo-random bytes (fixed seed).
local function binary(n)
  local parts = {}
  for i = 0, 255 do parts[#parts + 1] = string.char(i) end
  local x = 12345
  local chunk = {}
  for i = 1, n do
    x = (x * 1103515245 + 12345) % 2147483648
    chunk[#chunk + 1] = string.char(math.floor(x / 65536) % 256)
    if #chunk == 4096 or i == n then
      parts[#parts + 1] = table.concat(chunk)
      chunk = {}
    end
  end
  return table.concat(parts)
end

local function median(list)
  table.sort(list)
  return list[math.ceil(#list / 2)]
end

describe("servers.spawn", function()
  it("says when a program cannot be found or cannot be run", function()
    local pid, err = servers.spawn { "pz-no-such-program" }
    assert.is_nil(pid)
    assert.are.equal("cannot find pz-no-such-program (PATH, /usr/sbin, /sbin)", err)

    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    local junk = dir .. "/junk"
    support.write(junk, "\0\1\2 not a program")
    os.execute("chmod 755 " .. support.quote(junk))
    pid, err = servers.spawn { junk }
    assert.is_nil(pid)
    assert.are.equal("cannot run " .. junk .. ": Exec format error", err)
  end)

  it("starts a child with the environment asked, no descriptor of ours beyond 0-2, and its exit status", function()
    local dir = support.tmpdir()
    local held = assert(io.open(dir .. "/held", "w")) -- not close-on-exec
    finally(function()
      held:close()
      support.rmdir(dir)
    end)
    local pid, to, from = servers.spawn({ "sleep", "30" }, { pipes = true })
    assert(pid, to)
    -- Right after the exec, the dynamic loader may hold a library open
    -- for a moment (as descriptor 3); a descriptor of ours would stay.
    local fds
    support.eventually(function()
      fds = support.list("/proc/" .. pid .. "/fd")
      table.sort(fds)
      return #fds == 3
    end, 2)
    assert.are.same({ "0", "1", "2" }, fds)
    support.kill(pid, 9)
    assert.is_true(servers.reap(pid, 5))
    servers.close(to)
    servers.close(from)

    pid, to, from = servers.spawn({ "sh", "-c", "echo $PZ_SPAWN_VAR; exit 3" },
                                  { pipes = true, env = { PZ_SPAWN_VAR = "set" } })
    assert(pid, to)
    assert.are.equal("set\n", servers.exchange(to, from, "", 10))
    local done, status = servers.reap(pid, 5)
    assert.is_true(done)
    assert.are.equal(3, servers.exit_code(status))
  end)

  it("reports a write to a child that is gone as EPIPE, with no SIGPIPE to end this process", function()
    local pid, to, from = servers.spawn({ "true" }, { pipes = true })
    assert(pid, to)
    assert.is_true(servers.reap(pid, 5))
    local ok, err = servers.write_all(to, "nobody reads this\n")
    assert.is_nil(ok)
    assert.are.equal("write: Broken pipe", err)
    local out
    out, err = servers.exchange(to, from, "nor this\n", 5)
    assert.is_nil(out)
    assert.are.equal("write: Broken pipe", err)
  end)
end)

describe("server fixtures #nosan", function()
  describe("sshd on 127.0.0.1", function()
    it("runs luajit -e and pzlua -e over ssh, through the server it started", function()
      local defer = support.defer(finally)
      local s = fixture("sshd", defer)
      local c = clients(defer)
      local out, code, err = c.run(s:command("echo $SSH_CONNECTION; luajit -e 'io.write(40 + 2)'"))
      assert.are.equal(0, code, err)
      local server_address, server_port = out:match("^127%.0%.0%.1 %d+ (%S+) (%d+)\n42$")
      assert.are.equal("127.0.0.1", server_address, out)
      assert.are.equal(s.port, tonumber(server_port))

      local script = "local p = require 'parallelize'; io.write(p.decode(p.encode({ 'via pzlua' }))[1])"
      out, code, err = c.run(s:command(support.quote(support.pzlua()) .. " -e " .. support.quote(script)))
      assert.are.equal(0, code, err)
      assert.are.equal("via pzlua", out)
      stop_clean(s, c.seen)
    end)

    it("carries 3 MiB of every byte value through ssh cat, both ways at once, intact", function()
      local defer = support.defer(finally)
      local s = fixture("sshd", defer)
      local c = clients(defer)
      local data = binary(3 * 1024 * 1024)
      local out, code, err = c.run(s:command("cat"), data, 60)
      assert.are.equal(0, code, err)
      assert.are.equal(#data, #out)
      assert.is_true(out == data, "the bytes came back changed")
      stop_clean(s, c.seen)
    end)

    -- Each client holds its session open until all 32 are in: they are
    -- there at once. Returns how many sshd connection processes served them.
    local function thirty_two(s, c, mux)
      local sessions = {}
      for i = 1, 32 do
        sessions[i] = c.spawn(s:command('echo ready; read line; echo "got $line"', mux))
      end
      for i, session in ipairs(sessions) do
        local line = read_line(session.from, 60)
        assert.are.equal("ready\n", line, "session " .. i .. ": " .. (support.read(session.log) or ""))
      end
      local connections = 0
      for pid in pairs(s:processes()) do
        local cmdline = support.read("/proc/" .. pid .. "/cmdline") or ""
        if cmdline:find("^sshd: root@notty") then connections = connections + 1 end
      end
      for i, session in ipairs(sessions) do
        assert.are.equal(("got %d\n"):format(i), servers.exchange(session.to, session.from, i .. "\n", 30))
        local done, status = servers.reap(session.pid, 10)
        assert.is_true(done)
        assert.are.equal(0, servers.exit_code(status), support.read(session.log))
      end
      return connections
    end

    it("takes 32 concurrent connections", function()
      local defer = support.defer(finally)
      local s = fixture("sshd", defer)
      local c = clients(defer)
      assert.are.equal(32, thirty_two(s, c, false))
      stop_clean(s, c.seen)
    end)

    it("takes 32 concurrent sessions through one master connection (ControlMaster)", function()
      local defer = support.defer(finally)
      local s = fixture("sshd", defer)
      local c = clients(defer)
      assert.are.equal(1, thirty_two(s, c, true))
      stop_clean(s, c.seen)
    end)
  end)

  describe("one-node Slurm", function()
    it("carries a binary frame with no newline at its end through srun -u at once, then 1 MiB intact", function()
      local defer = support.defer(finally)
      local q = fixture("slurm", defer)
      local c = clients(defer)
      local task = c.spawn(concat(q.srun, { "-n1", "cat" }))
      local frame = binary(0) .. "no newline after this"
      assert(servers.write_all(task.to, frame))
      local back, err = servers.read_exact(task.from, #frame, 15)
      assert.is_true(back == frame, tostring(err) .. "; srun's stderr: " .. (support.read(task.log) or ""))
      local data = binary(1024 * 1024)
      local out
      out, err = servers.exchange(task.to, task.from, data, 60)
      assert.is_true(out == data, err or "the bytes came back changed")
      local done, status = servers.reap(task.pid, 15)
      assert.is_true(done)
      assert.are.equal(0, servers.exit_code(status), support.read(task.log))
      stop_clean(q, c.seen)
    end)

    it("runs more tasks than CPUs at once with srun -O", function()
      local defer = support.defer(finally)
      local q = fixture("slurm", defer)
      local c = clients(defer)
      local n = 2 * q.cpus + 2
      local out, code, err = c.run(concat(q.srun, { "-n", tostring(n), "sh", "-c", "echo task $SLURM_PROCID" }),
                                   "", 60)
      assert.are.equal(0, code, err)
      local ids = {}
      for id in out:gmatch("task (%d+)") do ids[#ids + 1] = tonumber(id) end
      table.sort(ids)
      local want = {}
      for i = 0, n - 1 do want[#want + 1] = i end
      assert.are.same(want, ids)
      stop_clean(q, c.seen)
    end)

    it("scancel of a step ends its task and its srun", function()
      local defer = support.defer(finally)
      local q = fixture("slurm", defer)
      local c = clients(defer)
      local task = c.spawn(concat(q.srun, { "-n1", "sh", "-c", "echo $$; exec sleep 300" }))
      local task_pid = tonumber(read_line(task.from, 30))
      assert.is_true(support.alive(task_pid))
      -- the task is known as the fixture's (a descendant of its slurmstepd)
      assert.is_truthy(q:processes()[task_pid])
      local steps = support.eventually(function()
        local list = q:steps()
        return #list > 0 and list
      end, 10)
      assert.are.same({ "1.0" }, steps)
      assert.is_true(q:scancel(steps[1]))
      assert.is_true(support.eventually(function() return not support.alive(task_pid) end, 10),
        "the task outlived scancel")
      local done, status = servers.reap(task.pid, 20)
      assert.is_true(done, "srun outlived scancel")
      assert.are_not.equal(0, servers.exit_code(status))
      servers.close(task.to)
      servers.close(task.from)
      stop_clean(q, c.seen)
    end)
  end)

  describe("a second host in a network namespace", function()
    it("a cut link ends an ssh with keepalives (exit 255) within seconds, and the restored link works again",
        function()
      local defer = support.defer(finally)
      local n = fixture("netns", defer)
      local c = clients(defer)
      local session = c.spawn(n:command("echo ready; cat"))
      assert.are.equal("ready\n", read_line(session.from, 30), support.read(session.log))
      assert(servers.write_all(session.to, "alive\n"))
      assert.are.equal("alive\n", read_line(session.from, 10))
      n:cut()
      local t0 = core.now()
      local done, status = servers.reap(session.pid, 20)
      local noticed = core.now() - t0
      assert.is_true(done, "ssh still running 20 s after the cut")
      assert.are.equal(255, servers.exit_code(status), support.read(session.log))
      -- three unanswered keepalives, one a second: not before 2 s, well before 10
      assert.is_true(noticed >= 2 and noticed < 10, ("noticed after %.1f s"):format(noticed))
      servers.close(session.to)
      servers.close(session.from)
      n:restore()
      local out, code, err = c.run(n:command("echo back"), "", 30)
      assert.are.equal(0, code, err)
      assert.are.equal("back\n", out)
      stop_clean(n, c.seen)
    end)

    it("delay(20) adds 20 ms to every round trip, delay(0) takes it away", function()
      local defer = support.defer(finally)
      local n = fixture("netns", defer)
      local c = clients(defer)
      local session = c.spawn(n:command("echo ready; cat"))
      assert.are.equal("ready\n", read_line(session.from, 30), support.read(session.log))
      -- a TCP handshake, and a line through ssh and cat and back
      local function round_trips()
        local connects, echoes = {}, {}
        for i = 1, 5 do
          connects[i] = assert(servers.connect_time(n.host, n.port))
          local t0 = core.now()
          assert(servers.write_all(session.to, "x\n"))
          assert(servers.read_exact(session.from, 2, 10))
          echoes[i] = core.now() - t0
        end
        return median(connects), median(echoes)
      end
      local connect0, echo0 = round_trips()
      local method = n:delay(20)
      assert.is_truthy(method == "netem" or method == "nfqueue", tostring(method))
      local connect20, echo20 = round_trips()
      -- at least the 20 ms added (the path itself takes well under 1 ms);
      -- the upper bounds only catch a delay far off what was asked.
      assert.is_true(connect20 >= 0.020 and connect20 < connect0 + 0.2, ("connect %.4f s"):format(connect20))
      assert.is_true(echo20 >= 0.020 and echo20 < echo0 + 0.2, ("echo %.4f s"):format(echo20))
      n:delay(0)
      local connect_after = round_trips()
      assert.is_true(connect_after < 0.015, ("connect after delay(0): %.4f s"):format(connect_after))
      servers.close(session.to)
      servers.close(session.from)
      assert.is_true(servers.reap(session.pid, 10))
      stop_clean(n, c.seen)
    end)
  end)
end)
