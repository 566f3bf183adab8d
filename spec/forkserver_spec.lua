-- The fork server (src/forkserver.h): a pool's spawner comes from a small
-- process forked when the module was loaded, not from the script, yet
-- starts in the state the script is in when it makes the pool. Each case
-- runs a script of its own under pzlua, so that what it changes (its
-- heap, directory, environment, stdout, no_new_privs) stays there.
local support = require "spec.support"

-- What every script starts with: the module, the FFI calls it needs, and
-- status(pid, key): a field of /proc/pid/status.
local PRELUDE = [[
local parallelize = require "parallelize"
local core = require "parallelize.core"
local ffi = require "ffi"
ffi.cdef [=[
  int chdir(const char *path);
  int setenv(const char *name, const char *value, int overwrite);
  unsigned umask(unsigned mask);
  int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
  int open(const char *path, int flags, int mode);
  int dup(int fd);
  int dup2(int from, int to);
  int close(int fd);
  int fork(void);
  int waitpid(int pid, int *status, int options);
  void _exit(int status);
  int getppid(void);
  int setsid(void);
  int getsid(int pid);
  int getuid(void);
  int setgroups(size_t n, const unsigned *groups);
  int setgid(unsigned gid);
  int setuid(unsigned uid);
  char **environ;
  long readlink(const char *path, char *buf, size_t size);
]=]
-- The socket inodes this process holds.
local function sockets()
  local set, buf = {}, ffi.new("char[256]")
  for fd = 0, 255 do
    local n = tonumber(ffi.C.readlink("/proc/self/fd/" .. fd, buf, 256))
    local inode = n > 0 and ffi.string(buf, n):match("^socket:%[(%d+)%]$")
    if inode then set[inode] = true end
  end
  return set
end
local function status(pid, key)
  local f = assert(io.open("/proc/" .. pid .. "/status"))
  local s = f:read("*a")
  f:close()
  return tonumber(s:match(key .. ":%s*(%d+)"))
end
-- The pid of the spawner of pool p: the parent of a worker of it (the one
-- that ran a call: another slot's may not have started yet).
local function spawner_of(p)
  p(0)
  p:wait()
  local _, worker = next(p.pids)
  local f = assert(io.open("/proc/" .. worker .. "/stat"))
  local ppid = tonumber(f:read("*a"):match("^%d+ %b() %S+ (%d+)"))
  f:close()
  return ppid
end
]]

local function run(script)
  local dir = support.tmpdir()
  local path = dir .. "/script.lua"
  support.write(path, PRELUDE .. script)
  local out, code = support.run("cd " .. dir .. " && timeout 120 " .. support.quote(support.pzlua()) .. " " .. path)
  support.rmdir(dir)
  return out, code
end

describe("the fork server", function()
  it("is not started unless asked for: a spawner is then a fork of the script", function()
    local out, code = run [[
      local heap = string.rep("z", 300 * 1048576)
      local p = parallelize.Parallelize(function(x) return x end, { workers = 1 })
      print("spawner", status(spawner_of(p), "VmRSS"), #heap, core.forkserver_pid())
      p:stop()
    ]]
    assert.are.equal(0, code, out)
    local kb = tonumber(out:match("spawner\t(%d+)"))
    assert.is_true(kb > 250 * 1024, out)
    assert.matches("\tnil\n", out, 1, true)
  end)

  it("gives workers the environment exactly, oom_score_adj, dumpability and session changes", function()
    local out, code = run [[
      assert(parallelize.forkserver())
      -- an environment setenv cannot make: a name twice, an entry without "="
      local strings = { "PZ_TWICE=first", "PZ_TWICE=second", "PZ_NO_EQUALS", "PATH=" .. os.getenv("PATH") }
      local env = ffi.new("char *[?]", #strings + 1)
      local keep = {}
      for i, s in ipairs(strings) do
        keep[i] = ffi.new("char[?]", #s + 1, s)
        env[i - 1] = keep[i]
      end
      ffi.C.environ = env
      local f = assert(io.open("/proc/self/oom_score_adj", "w"))
      f:write("500\n")
      f:close()
      assert(ffi.C.prctl(4, 0, 0, 0, 0) == 0) -- PR_SET_DUMPABLE 0
      local worker = function()
        local c = require "ffi"
        c.cdef [=[ char **environ; int prctl(int, unsigned long, unsigned long, unsigned long, unsigned long); ]=]
        local seen, e = {}, c.C.environ
        local i = 0
        while e[i] ~= nil do seen[#seen + 1] = c.string(e[i]) i = i + 1 end
        local adj = io.open("/proc/self/oom_score_adj"):read("*l")
        return table.concat(seen, ","), adj, c.C.prctl(3, 0, 0, 0, 0) -- PR_GET_DUMPABLE
      end
      local p = parallelize.Parallelize(worker, { workers = 1 })
      print("env", select(2, p:result(p())))
      p:stop()
      -- a new session: the server's spawners would stay in the old one
      assert(ffi.C.setsid() > 0)
      p = parallelize.Parallelize(function() return parallelize.getpid() end, { workers = 1 })
      local spawner = spawner_of(p)
      print("session", ffi.C.getsid(spawner) == ffi.C.getsid(0), core.forkserver_pid())
      p:stop()
    ]]
    assert.are.equal(0, code, out)
    assert.matches("env\tPZ_TWICE=first,PZ_TWICE=second,PZ_NO_EQUALS,PATH=[^\t]*\t500\t0\n", out)
    assert.matches("session\ttrue\tnil\n", out, 1, true)
  end)

  it("ends, and is not used, once a root script drops its privileges or sets securebits", function()
    local ffi = require "ffi"
    pcall(ffi.cdef, "int getuid(void);")
    if ffi.C.getuid() ~= 0 then
      pending("needs root")
      return
    end
    local out, code = run [[
      assert(parallelize.forkserver())
      local server = core.forkserver_pid()
      assert(ffi.C.setgroups(0, nil) == 0 and ffi.C.setgid(65534) == 0 and ffi.C.setuid(65534) == 0)
      assert(ffi.C.chdir("/") == 0) -- a directory nobody may use: the request is sent
      local p = parallelize.Parallelize(function()
        return io.popen("id -u"):read("*l")
      end, { workers = 1 })
      print("uid", select(2, p:result(p())), core.forkserver_pid(), server ~= nil)
      p:stop()
    ]]
    assert.are.equal(0, code, out)
    assert.matches("uid\t65534\tnil\ttrue\n", out, 1, true)
    -- securebits, which no /proc file shows: the script's side sees them
    out, code = run [[
      assert(parallelize.forkserver())
      assert(ffi.C.prctl(28, 0x2f, 0, 0, 0) == 0) -- PR_SET_SECUREBITS: NOROOT, its lock, KEEP_CAPS_LOCKED
      local p = parallelize.Parallelize(function()
        local c = require "ffi"
        c.cdef "int prctl(int, unsigned long, unsigned long, unsigned long, unsigned long);"
        return c.C.prctl(27, 0, 0, 0, 0) -- PR_GET_SECUREBITS
      end, { workers = 1 })
      print("securebits", select(2, p:result(p())), core.forkserver_pid())
      p:stop()
    ]]
    assert.are.equal(0, code, out)
    assert.matches("securebits\t47\tnil\n", out, 1, true)
  end)

  it("makes spawners that do not hold the script's heap, children of the script", function()
    local out, code = run [[
      assert(parallelize.forkserver())
      local heap = string.rep("x", 300 * 1048576) -- taken after the server started
      local p = parallelize.Parallelize(function(x) return x end, { workers = 2 })
      local spawner = spawner_of(p)
      local f = assert(io.open("/proc/" .. spawner .. "/stat"))
      local ppid = tonumber(f:read("*a"):match("^%d+ %b() %S+ (%d+)"))
      f:close()
      print("script", status(parallelize.getpid(), "VmRSS"), #heap)
      print("spawner", status(spawner, "VmRSS"), ppid == parallelize.getpid(), core.forkserver_pid() ~= nil)
      p:stop()
    ]]
    assert.are.equal(0, code, out)
    local script_kb = tonumber(out:match("script\t(%d+)"))
    local spawner_kb, parent, server = out:match("spawner\t(%d+)\t(%a+)\t(%a+)")
    assert.is_true(script_kb > 300 * 1024, out)
    assert.is_true(tonumber(spawner_kb) < 50 * 1024, out) -- about 1 MB; 300 MB and more if forked from the script
    assert.are.equal("true", parent, out)
    assert.are.equal("true", server, out)
  end)

  it("gives workers the directory, environment, umask and stdout the script has when it makes the pool", function()
    local out, code = run [[
      assert(parallelize.forkserver())
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir) == 0)
      assert(ffi.C.chdir(dir) == 0)
      assert(ffi.C.setenv("PZ_FORKSERVER_SPEC", "set after loading", 1) == 0)
      local old_mask = ffi.C.umask(tonumber("027", 8))
      local saved = ffi.C.dup(1)
      local fd = ffi.C.open(dir .. "/out", 577, 420) -- O_WRONLY | O_CREAT | O_TRUNC, 0644
      assert(fd >= 0 and ffi.C.dup2(fd, 1) == 1)
      ffi.C.close(fd)
      local p = parallelize.Parallelize(function()
        local c = require "ffi"
        c.cdef "unsigned umask(unsigned mask);"
        local m = c.C.umask(0)
        c.C.umask(m)
        local pwd = io.popen("pwd"):read("*l")
        io.write("written by a worker\n")
        io.flush()
        return pwd, os.getenv("PZ_FORKSERVER_SPEC"), m
      end, { workers = 1 })
      local ok, pwd, env, mask = p:result(p())
      p:stop()
      io.flush()
      ffi.C.dup2(saved, 1)
      ffi.C.umask(old_mask)
      local f = assert(io.open(dir .. "/out"))
      local written = f:read("*a")
      f:close()
      os.execute("rm -rf " .. dir)
      print("ok", ok, pwd == dir, env, string.format("%o", mask))
      print("stdout", (written:gsub("\n", "|")))
    ]]
    assert.are.equal(0, code, out)
    assert.matches("ok\ttrue\ttrue\tset after loading\t27\n", out, 1, true)
    assert.matches("stdout\twritten by a worker|\n", out, 1, true)
  end)

  it("is not used when the script has changed what it cannot copy (no_new_privs): the script forks", function()
    local out, code = run [[
      assert(parallelize.forkserver())
      local heap = string.rep("y", 300 * 1048576)
      assert(ffi.C.prctl(38, 1, 0, 0, 0) == 0) -- PR_SET_NO_NEW_PRIVS
      local p = parallelize.Parallelize(function(x) return x * 2 end, { workers = 2 })
      local spawner = spawner_of(p)
      print("spawner", status(spawner, "VmRSS"), #heap, p:result(p(21)))
      print("server", core.forkserver_pid())
      p:stop()
    ]]
    assert.are.equal(0, code, out)
    local kb, _, ok, v = out:match("spawner\t(%d+)\t(%d+)\t(%a+)\t(%d+)")
    assert.is_true(tonumber(kb) > 250 * 1024, out) -- a copy of the script: the server said no
    assert.are.same({ "true", "42" }, { ok, v })
    assert.matches("server\tnil\n", out, 1, true) -- it ended: never again
  end)

  it("ends when the script is killed", function()
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    support.write(dir .. "/script.lua", PRELUDE .. [[
      assert(parallelize.forkserver())
      print("server", core.forkserver_pid(), parallelize.getpid())
      io.stdout:flush()
      parallelize.sleep(60)
    ]])
    local p = io.popen("exec " .. support.quote(support.pzlua()) .. " " .. dir .. "/script.lua")
    local server, script = p:read("*l"):match("^server\t(%d+)\t(%d+)$")
    server, script = tonumber(server), tonumber(script)
    assert.is_true(support.alive(server))
    assert.is_true(support.kill(script, 9))
    p:close()
    assert.is_true(support.eventually(function() return not support.alive(server) end, 1))
  end)

  it("ends, and is not used, once the script chroots into a bind mount of /", function()
    local ffi = require "ffi"
    pcall(ffi.cdef, "int getuid(void);")
    if ffi.C.getuid() ~= 0 or os.execute("command -v unshare >/dev/null") ~= 0 then
      pending("needs root and unshare")
      return
    end
    -- The same root directory (device and inode) as the server's, seen
    -- from another path: only /sys is left out of the jail. (unshare -m
    -- makes the new namespace's mounts private.)
    local dir = support.tmpdir()
    finally(function() support.rmdir(dir) end)
    assert(os.execute("mkdir " .. dir .. "/jail") == 0)
    support.write(dir .. "/script.lua", PRELUDE .. [[
      ffi.cdef "int chroot(const char *path);"
      assert(parallelize.forkserver())
      assert(ffi.C.chroot(arg[1]) == 0 and ffi.C.chdir("/") == 0)
      local p = parallelize.Parallelize(function()
        return io.open("/sys/kernel/mm/transparent_hugepage/enabled") ~= nil
      end, { workers = 1 })
      print("sys", select(2, p:result(p())), core.forkserver_pid())
      p:stop()
    ]])
    local jail = dir .. "/jail"
    local mounts = "mount --bind / " .. jail .. " && mount --bind /dev " .. jail
      .. "/dev && mount --bind /proc " .. jail .. "/proc"
    local out, code = support.run("timeout 60 unshare -m sh -c " .. support.quote(mounts .. " && "
      .. support.quote(support.pzlua()) .. " " .. dir .. "/script.lua " .. jail))
    assert.are.equal(0, code, out)
    assert.matches("sys\tfalse\tnil\n", out, 1, true)
  end)

  it("is not used by a forked copy of the script, and a killed server is not used again", function()
    local out, code = run [[
      local before = sockets()
      assert(parallelize.forkserver())
      local server = assert(core.forkserver_pid())
      local mine = {}
      for inode in pairs(sockets()) do
        if not before[inode] then mine[#mine + 1] = inode end
      end
      assert(#mine == 1, "the script's end of the server's socket")
      local pid = ffi.C.fork()
      if pid == 0 then
        -- a copy never holds the server's socket (it could claim the
        -- script's pid, were it privileged enough)
        local server_end = mine[1]
        if sockets()[server_end] then ffi.C._exit(3) end
        local p = parallelize.Parallelize(function(x) return x + 1 end, { workers = 2 })
        local spawner = spawner_of(p)
        local ok = p:result(p(1)) and spawner ~= nil
        local f = assert(io.open("/proc/" .. spawner .. "/stat"))
        local mine = tonumber(f:read("*a"):match("^%d+ %b() %S+ (%d+)")) == parallelize.getpid()
        p:stop()
        io.stdout:flush()
        ffi.C._exit((ok and mine and core.forkserver_pid() == nil) and 0 or 1)
      end
      local st = ffi.new("int[1]")
      assert(ffi.C.waitpid(pid, st, 0) == pid)
      print("copy", st[0])
      assert(os.execute("kill -9 " .. server) == 0)
      local p = parallelize.Parallelize(function(x) return x + 1 end, { workers = 2 })
      print("after kill", p:result(p(1)))
      print("server", core.forkserver_pid())
      p:stop()
    ]]
    assert.are.equal(0, code, out)
    assert.matches("copy\t0\n", out, 1, true)
    assert.matches("after kill\ttrue\t2\n", out, 1, true)
    assert.matches("server\tnil\n", out, 1, true)
  end)
end)
