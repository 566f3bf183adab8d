--- Real servers for the specs, started and stopped by the specs themselves:
-- an OpenSSH server on 127.0.0.1, a one-node Slurm (munge, slurmctld,
-- slurmd), and a second "host" in a network namespace, reached over a veth
-- pair, whose link can be cut, restored and slowed. Nothing is mocked.
--
--     local servers = require "spec.servers"
--     local ok, why = servers.can_run()      -- false, "not root" ...
--     local s = assert(servers.sshd())       -- s.ssh, s.destination, s:command("cat")
--     local q = assert(servers.slurm())      -- q.srun, q:scancel("3.0")
--     local n = assert(servers.netns())      -- n:cut(), n:restore(), n:delay(20)
--     s:stop(); q:stop(); n:stop()
--
-- Rules this file owns:
-- - Every daemon is a child of the test process, forked and executed here
--   (not through a shell's `&`, which would leave it to PID 1, which here
--   leaves its dead children as zombies for a while), with stdin
--   /dev/null, its output in a log in the
--   fixture's temporary directory, no descriptor of the test process but
--   0-2, default signal dispositions and an empty signal mask, and
--   PR_SET_PDEATHSIG SIGKILL: if the test process dies outright, its
--   daemons die with it.
-- - Every process a fixture starts carries an environment variable with a
--   value unique to the fixture (PZ_SERVERS_TAG), inherited by what it
--   forks or executes with its environment (sshd's per-connection
--   processes). slurmstepd, which slurmd starts with an empty environment
--   and double-forks so that it belongs to PID 1, is known instead by the
--   slurmd log of its fixture, which it holds open. A fixture's processes
--   are those and every descendant of those (the commands sshd runs, the
--   tasks of a step), and nothing else is ever signalled. A pid is
--   signalled only while its start time is the one recorded with it, so
--   that a reused pid is never hit.
-- - stop() ends them (SIGTERM to the daemons, 3 s of grace, SIGKILL to
--   whatever is left, up to 3 s more), then removes what the fixture
--   created: namespace, veth pair, firewall rule, temporary directory. It
--   is bounded (under 10 s), may be called twice, and returns true, or nil
--   and what it could not end or remove.
-- - A start function returns a handle, or nil and why (with the last lines
--   of the daemon's log); a failed start leaves nothing behind.
-- - Ports are found free by binding port 0 on 127.0.0.1 (a port taken in
--   between makes sshd fail, and the start is retried); namespace, link
--   and address names are derived from the test's pid and a counter, so
--   that test runs on one machine at the same time do not collide.
-- - can_run() says whether this machine can run them (root, the programs)
--   and, when not, why, so that specs skip by name with that reason.
-- - /run/sshd, sshd's privilege separation directory, is created when
--   missing and left: it is the system's own, shared by every sshd.
-- - A link's delay applies to the packets going into the namespace: the
--   netem qdisc on the host's end of the pair where the kernel has netem,
--   else an NFQUEUE rule on the namespace's INPUT chain and
--   spec/netdelay.lua, which holds each packet for the delay. Held there,
--   after crossing the pair, a packet no longer counts against its
--   sender's socket; held on the sender's side instead, it would, and TCP
--   small queues would let only a few packets out per round trip (8 MB
--   took 29 s through a 20 ms delay on the namespace's OUTPUT chain, 1.2 s
--   on its INPUT chain).
local ffi = require "ffi"
local bit = require "bit"
local core = require "parallelize.core"
local support = require "spec.support"

local M = {}

-- Every C function is declared under a name of its own (the symbol given
-- by __asm__), so that no declaration here clashes with another spec's.
for _, decl in ipairs {
  "int pz_srv_fork(void) __asm__(\"fork\");",
  "int pz_srv_execve(const char *path, const char *const *argv, const char *const *envp) __asm__(\"execve\");",
  "int pz_srv_dup2(int from, int to) __asm__(\"dup2\");",
  "int pz_srv_open(const char *path, int flags, int mode) __asm__(\"open\");",
  "int pz_srv_close(int fd) __asm__(\"close\");",
  "int pz_srv_pipe2(int *fds, int flags) __asm__(\"pipe2\");",
  "long pz_srv_read(int fd, void *buf, unsigned long n) __asm__(\"read\");",
  "long pz_srv_write(int fd, const void *buf, unsigned long n) __asm__(\"write\");",
  "int pz_srv_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)"
    .. " __asm__(\"prctl\");",
  "void pz_srv_exit(int status) __asm__(\"_exit\");",
  "int pz_srv_waitpid(int pid, int *status, int options) __asm__(\"waitpid\");",
  "int pz_srv_getppid(void) __asm__(\"getppid\");",
  "int pz_srv_geteuid(void) __asm__(\"geteuid\");",
  "int pz_srv_access(const char *path, int mode) __asm__(\"access\");",
  "int pz_srv_chmod(const char *path, unsigned int mode) __asm__(\"chmod\");",
  "int pz_srv_close_range(unsigned int first, unsigned int last, int flags) __asm__(\"close_range\");",
  "int pz_srv_fcntl(int fd, int cmd, long arg) __asm__(\"fcntl\");",
  "typedef void (*pz_srv_handler)(int);",
  "pz_srv_handler pz_srv_signal(int sig, pz_srv_handler handler) __asm__(\"signal\");",
  "typedef struct { unsigned long bits[16]; } pz_srv_sigset;",
  "int pz_srv_sigprocmask(int how, const pz_srv_sigset *set, pz_srv_sigset *old) __asm__(\"sigprocmask\");",
  "char *pz_srv_strerror(int errnum) __asm__(\"strerror\");",
  "extern char **environ;",
  "int pz_srv_socket(int domain, int type, int protocol) __asm__(\"socket\");",
  "int pz_srv_bind(int fd, const void *addr, unsigned int len) __asm__(\"bind\");",
  "int pz_srv_connect(int fd, const void *addr, unsigned int len) __asm__(\"connect\");",
  "int pz_srv_getsockname(int fd, void *addr, unsigned int *len) __asm__(\"getsockname\");",
  "int pz_srv_setsockopt(int fd, int level, int name, const void *value, unsigned int len)"
    .. " __asm__(\"setsockopt\");",
  "struct pz_srv_pollfd { int fd; short events; short revents; };",
  "int pz_srv_poll(struct pz_srv_pollfd *fds, unsigned long n, int timeout) __asm__(\"poll\");",
  "struct pz_srv_timeval { long tv_sec; long tv_usec; };",
  "long pz_srv_readlink(const char *path, char *buf, unsigned long size) __asm__(\"readlink\");",
  "int pz_srv_sigemptyset(pz_srv_sigset *set) __asm__(\"sigemptyset\");",
  "int pz_srv_sigaddset(pz_srv_sigset *set, int sig) __asm__(\"sigaddset\");",
  "int pz_srv_pthread_sigmask(int how, const pz_srv_sigset *set, pz_srv_sigset *old) __asm__(\"pthread_sigmask\");",
  "struct pz_srv_timespec { long tv_sec; long tv_nsec; };",
  "int pz_srv_sigtimedwait(const pz_srv_sigset *set, void *info, const struct pz_srv_timespec *timeout)"
    .. " __asm__(\"sigtimedwait\");",
} do
  pcall(ffi.cdef, decl)
end
local C = ffi.C

local O_RDONLY, O_WRONLY, O_CREAT, O_APPEND, O_NONBLOCK, O_CLOEXEC = 0, 1, 0x40, 0x400, 0x800, 0x80000
local F_SETFD, F_GETFL, F_SETFL, FD_CLOEXEC = 2, 3, 4, 1
local SIGTERM, SIGKILL = 15, 9
local WNOHANG, EINTR, EAGAIN, EPIPE = 1, 4, 11, 32
local PR_SET_PDEATHSIG, SIG_BLOCK, SIG_SETMASK, CLOSE_RANGE_CLOEXEC, SIGPIPE = 1, 0, 2, 4, 13
local X_OK, F_OK = 1, 0
local AF_INET, SOCK_STREAM, SOCK_CLOEXEC = 2, 1, 0x80000
local SOL_SOCKET, SO_SNDTIMEO = 1, 21
local POLLIN, POLLOUT = 1, 4

local GRACE, KILL_WAIT = 3, 3 -- seconds: SIGTERM to SIGKILL, SIGKILL to giving up

local function strerror(err)
  return ffi.string(C.pz_srv_strerror(err))
end

local function failed(what)
  return ("%s: %s"):format(what, strerror(ffi.errno()))
end

-- The directories searched for programs: PATH, then the system's sbin
-- directories, which a non-root PATH may lack.
local function search_path()
  local dirs = {}
  for d in (os.getenv("PATH") or ""):gmatch("[^:]+") do dirs[#dirs + 1] = d end
  for _, d in ipairs { "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin" } do
    dirs[#dirs + 1] = d
  end
  return dirs
end

--- The absolute path of a program, or nil when it is nowhere to be found.
function M.which(name)
  if name:find("/", 1, true) then
    return C.pz_srv_access(name, X_OK) == 0 and name or nil
  end
  for _, d in ipairs(search_path()) do
    local p = d .. "/" .. name
    if C.pz_srv_access(p, X_OK) == 0 then return p end
  end
  return nil
end

--- argv as one shell command line.
function M.shell(argv)
  local words = {}
  for i, a in ipairs(argv) do words[i] = support.quote(a) end
  return table.concat(words, " ")
end

--- Runs argv to completion through the shell; returns its output (stdout
-- and stderr) and exit status.
function M.run(argv)
  return support.run(M.shell(argv))
end

-- ---------------------------------------------------------------- processes

-- This process's environment with `extra` (name -> value) set, as a list
-- of "NAME=value" strings.
local function environment(extra)
  local list = {}
  local env = C.environ
  local i = 0
  while env[i] ~= nil do
    local entry = ffi.string(env[i])
    local name = entry:match("^([^=]*)=")
    if not (name and extra[name] ~= nil) then list[#list + 1] = entry end
    i = i + 1
  end
  for name, value in pairs(extra) do list[#list + 1] = name .. "=" .. value end
  return list
end

-- The child's side of spawn, between fork and execve: only calls on
-- values prepared before the fork (the parent may have other threads, whose
-- locks the child inherits held). Never returns.
local function exec_child(c)
  pcall(function()
    C.pz_srv_prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    if C.pz_srv_getppid() ~= c.parent then C.pz_srv_exit(127) end -- the parent died already
    C.pz_srv_sigprocmask(SIG_SETMASK, c.empty_mask, nil)
    for sig = 1, 31 do
      if sig ~= SIGKILL and sig ~= 19 then C.pz_srv_signal(sig, c.default_handler) end -- 19: SIGSTOP
    end
    if C.pz_srv_dup2(c.stdin, 0) < 0 or C.pz_srv_dup2(c.stdout, 1) < 0 or C.pz_srv_dup2(c.stderr, 2) < 0 then
      c.err[0] = ffi.errno()
      C.pz_srv_write(c.report, c.err, 4)
      C.pz_srv_exit(127)
    end
    -- Nothing of the test process beyond 0-2 may live on in a daemon (a
    -- pool's socket kept open there would never see its end of file).
    if C.pz_srv_close_range(3, 0xffffffff, CLOSE_RANGE_CLOEXEC) ~= 0 then
      for fd = 3, 1023 do C.pz_srv_fcntl(fd, F_SETFD, FD_CLOEXEC) end
    end
    C.pz_srv_execve(c.path, c.argv, c.envp)
    c.err[0] = ffi.errno()
    C.pz_srv_write(c.report, c.err, 4)
  end)
  C.pz_srv_exit(127)
end
jit.off(exec_child, true)

local function close_all(fds)
  for _, fd in ipairs(fds) do
    if fd >= 0 then C.pz_srv_close(fd) end
  end
end

--- Starts argv[1] (found with which) as a child of this process.
-- opts.env: variables to set (name -> value); opts.log: a file for its
-- stdout and stderr (appended; default /dev/null); opts.pipes: true to get
-- its stdin and stdout as pipes (stderr goes to the log). Returns pid (and,
-- with pipes, the descriptor writing its stdin and the one reading its
-- stdout, both close-on-exec), or nil and why.
function M.spawn(argv, opts)
  opts = opts or {}
  local path = M.which(argv[1])
  if not path then return nil, ("cannot find %s (PATH, /usr/sbin, /sbin)"):format(argv[1]) end
  local keep = {} -- the Lua strings the C arrays point into
  local c = { path = path, parent = support.getpid(), err = ffi.new("int[1]"),
              empty_mask = ffi.new("pz_srv_sigset"), default_handler = ffi.cast("pz_srv_handler", 0) }
  c.argv = ffi.new("const char *[?]", #argv + 1)
  for i, a in ipairs(argv) do
    keep[#keep + 1] = tostring(a)
    c.argv[i - 1] = keep[#keep]
  end
  local env = environment(opts.env or {})
  c.envp = ffi.new("const char *[?]", #env + 1)
  for i, e in ipairs(env) do c.envp[i - 1] = e end

  local opened = {}
  local function give_up(what)
    local msg = failed(what)
    close_all(opened)
    return nil, msg
  end
  local report = ffi.new("int[2]")
  if C.pz_srv_pipe2(report, O_CLOEXEC) ~= 0 then return give_up("pipe2") end
  opened[#opened + 1], opened[#opened + 2] = report[0], report[1]
  c.report = report[1]
  local log = C.pz_srv_open(opts.log or "/dev/null", O_WRONLY + O_CREAT + O_APPEND + O_CLOEXEC, 420)
  if log < 0 then return give_up("open " .. (opts.log or "/dev/null")) end
  opened[#opened + 1] = log
  c.stdout, c.stderr = log, log
  local to_child, from_child
  if opts.pipes then
    local a, b = ffi.new("int[2]"), ffi.new("int[2]")
    if C.pz_srv_pipe2(a, O_CLOEXEC) ~= 0 then return give_up("pipe2") end
    opened[#opened + 1], opened[#opened + 2] = a[0], a[1]
    if C.pz_srv_pipe2(b, O_CLOEXEC) ~= 0 then return give_up("pipe2") end
    opened[#opened + 1], opened[#opened + 2] = b[0], b[1]
    c.stdin, to_child = a[0], a[1]
    c.stdout, from_child = b[1], b[0]
  else
    c.stdin = C.pz_srv_open("/dev/null", O_RDONLY + O_CLOEXEC, 0)
    if c.stdin < 0 then return give_up("open /dev/null") end
    opened[#opened + 1] = c.stdin
  end

  local pid = C.pz_srv_fork()
  if pid == 0 then exec_child(c) end
  if pid < 0 then return give_up("fork") end
  -- The parent keeps only its ends of the pipes.
  for _, fd in ipairs(opened) do
    if fd ~= report[0] and fd ~= to_child and fd ~= from_child then C.pz_srv_close(fd) end
  end
  local n
  repeat n = C.pz_srv_read(report[0], c.err, 4) until n >= 0 or ffi.errno() ~= EINTR
  C.pz_srv_close(report[0])
  if n == 4 then -- execve (or dup2) failed in the child, which has exited
    local status = ffi.new("int[1]")
    while C.pz_srv_waitpid(pid, status, 0) < 0 and ffi.errno() == EINTR do end
    if to_child then C.pz_srv_close(to_child); C.pz_srv_close(from_child) end
    return nil, ("cannot run %s: %s"):format(path, strerror(c.err[0]))
  end
  if opts.pipes then return pid, to_child, from_child end
  return pid
end

--- Collects the exit of a child of this process, waiting up to `seconds`
-- (default 0). Returns true once it is collected (or is not, or no longer,
-- our child), false while it runs.
function M.reap(pid, seconds)
  local status = ffi.new("int[1]")
  local deadline = core.now() + (seconds or 0)
  while true do
    local r = C.pz_srv_waitpid(pid, status, WNOHANG)
    if r == pid then return true, status[0] end
    if r < 0 and ffi.errno() ~= EINTR then return true end -- ECHILD: not ours, or collected
    if core.now() >= deadline then return false end
    core.sleep(0.005)
  end
end

--- A wait status in words: "exited with status N", "was killed by signal
-- N", or "ended" when unknown.
function M.describe(status)
  if not status then return "ended" end
  local sig = bit.band(status, 0x7f)
  if sig == 0 then return ("exited with status %d"):format(bit.rshift(bit.band(status, 0xff00), 8)) end
  return ("was killed by signal %d"):format(sig)
end

--- The exit code of a wait status (128 + N for signal N), as a shell says it.
function M.exit_code(status)
  if not status then return nil end
  local sig = bit.band(status, 0x7f)
  if sig == 0 then return bit.rshift(bit.band(status, 0xff00), 8) end
  return 128 + sig
end

local function still(pid, start)
  return support.start_time(pid) == start and support.alive(pid)
end

--- Which of `set` (pid -> start time) are still alive as the same process:
-- a sorted list of pids.
function M.alive(set)
  local list = {}
  for pid, start in pairs(set) do
    if still(pid, start) then list[#list + 1] = pid end
  end
  table.sort(list)
  return list
end

-- ------------------------------------------------------------- descriptors

-- write(2) without SIGPIPE: a write to a pipe whose reader is gone raises
-- SIGPIPE, whose default action would end the test process (which does
-- not ignore it). It is blocked around the write, which then fails with
-- EPIPE, and the SIGPIPE that write left pending is taken away.
local pipe_set = ffi.new("pz_srv_sigset")
C.pz_srv_sigemptyset(pipe_set)
C.pz_srv_sigaddset(pipe_set, SIGPIPE)
local saved_mask = ffi.new("pz_srv_sigset")
local no_wait = ffi.new("struct pz_srv_timespec")
local function write_quiet(fd, ptr, n)
  C.pz_srv_pthread_sigmask(SIG_BLOCK, pipe_set, saved_mask)
  local r = C.pz_srv_write(fd, ptr, n)
  local err = ffi.errno()
  if r < 0 and err == EPIPE then C.pz_srv_sigtimedwait(pipe_set, nil, no_wait) end
  C.pz_srv_pthread_sigmask(SIG_SETMASK, saved_mask, nil)
  ffi.errno(err)
  return r
end

--- Writes all of s to fd (blocking), or returns nil and why (a reader gone
-- is "write: Broken pipe", never a SIGPIPE).
function M.write_all(fd, s)
  local off = 0
  while off < #s do
    local n = write_quiet(fd, ffi.cast("const char *", s) + off, #s - off)
    if n < 0 then
      if ffi.errno() ~= EINTR then return nil, failed("write") end
    else
      off = off + tonumber(n)
    end
  end
  return true
end

local function poll_one(fd, events, ms)
  local p = ffi.new("struct pz_srv_pollfd")
  p.fd, p.events = fd, events
  local r = C.pz_srv_poll(p, 1, ms)
  if r < 0 and ffi.errno() == EINTR then return 0 end
  return r, p.revents
end

--- Reads exactly n bytes from fd within `seconds`; returns them, or nil and
-- why (with what had arrived so far as a third value).
function M.read_exact(fd, n, seconds)
  local parts, got = {}, 0
  local buf = ffi.new("char[65536]")
  local deadline = core.now() + seconds
  while got < n do
    local left = deadline - core.now()
    if left <= 0 then return nil, ("timed out with %d of %d bytes"):format(got, n), table.concat(parts) end
    local r = poll_one(fd, POLLIN, math.ceil(left * 1000))
    if r > 0 then
      local k = C.pz_srv_read(fd, buf, math.min(65536, n - got))
      if k == 0 then return nil, ("end of file after %d of %d bytes"):format(got, n), table.concat(parts) end
      if k < 0 and ffi.errno() ~= EINTR and ffi.errno() ~= EAGAIN then return nil, failed("read") end
      if k > 0 then
        parts[#parts + 1] = ffi.string(buf, k)
        got = got + tonumber(k)
      end
    end
  end
  return table.concat(parts)
end

--- Writes `data` to fd_in while reading fd_out, then closes fd_in and reads
-- to the end of file, all within `seconds` (neither side can fill up and
-- block the other). Returns what was read, or nil and why. Closes both.
function M.exchange(fd_in, fd_out, data, seconds)
  local flags = C.pz_srv_fcntl(fd_in, F_GETFL, 0)
  C.pz_srv_fcntl(fd_in, F_SETFL, bit.bor(flags, O_NONBLOCK))
  local fds = ffi.new("struct pz_srv_pollfd[2]")
  local buf = ffi.new("char[65536]")
  local parts, off = {}, 0
  local deadline = core.now() + seconds
  local result, why
  if #data == 0 then
    C.pz_srv_close(fd_in)
    fd_in = -1
  end
  while true do
    local left = deadline - core.now()
    if left <= 0 then
      why = ("timed out after writing %d of %d bytes and reading %d"):format(off, #data, #table.concat(parts))
      break
    end
    fds[0].fd, fds[0].events, fds[0].revents = fd_out, POLLIN, 0
    fds[1].fd, fds[1].events, fds[1].revents = fd_in, POLLOUT, 0
    local r = C.pz_srv_poll(fds, fd_in >= 0 and 2 or 1, math.ceil(left * 1000))
    if r < 0 and ffi.errno() ~= EINTR then why = failed("poll") break end
    if fd_in >= 0 and fds[1].revents ~= 0 then
      local n = write_quiet(fd_in, ffi.cast("const char *", data) + off, math.min(65536, #data - off))
      if n > 0 then off = off + tonumber(n)
      elseif ffi.errno() ~= EAGAIN and ffi.errno() ~= EINTR then why = failed("write") break end
      if off == #data then
        C.pz_srv_close(fd_in)
        fd_in = -1
      end
    end
    if fds[0].revents ~= 0 then
      local n = C.pz_srv_read(fd_out, buf, 65536)
      if n == 0 then
        if fd_in >= 0 then why = ("end of file after writing %d of %d bytes"):format(off, #data) break end
        result = table.concat(parts)
        break
      elseif n > 0 then parts[#parts + 1] = ffi.string(buf, n)
      elseif ffi.errno() ~= EAGAIN and ffi.errno() ~= EINTR then why = failed("read") break end
    end
  end
  if fd_in >= 0 then C.pz_srv_close(fd_in) end
  C.pz_srv_close(fd_out)
  if result then return result end
  return nil, why
end

--- Closes a descriptor spawn returned.
function M.close(fd)
  C.pz_srv_close(fd)
end

-- ------------------------------------------------------------------ network

local function sockaddr(host, port)
  local a = ffi.new("uint8_t[16]")
  a[0], a[1] = AF_INET, 0 -- sin_family, little-endian on Linux x86 and arm
  if not ffi.abi("le") then a[0], a[1] = 0, AF_INET end
  a[2], a[3] = bit.rshift(port, 8), bit.band(port, 255)
  local i = 4
  for octet in host:gmatch("%d+") do
    a[i] = tonumber(octet)
    i = i + 1
  end
  return a
end

--- A TCP port on 127.0.0.1 that nothing listens on or is bound to now.
function M.free_port()
  local fd = C.pz_srv_socket(AF_INET, SOCK_STREAM + SOCK_CLOEXEC, 0)
  if fd < 0 then return nil, failed("socket") end
  local a = sockaddr("127.0.0.1", 0)
  local len = ffi.new("unsigned int[1]", 16)
  if C.pz_srv_bind(fd, a, 16) ~= 0 or C.pz_srv_getsockname(fd, a, len) ~= 0 then
    local msg = failed("bind to 127.0.0.1:0")
    C.pz_srv_close(fd)
    return nil, msg
  end
  C.pz_srv_close(fd)
  return a[2] * 256 + a[3]
end

--- Seconds a TCP connect to host:port takes (a SYN and its SYN-ACK: one
-- round trip), or nil and why; gives up after `seconds` (default 5).
function M.connect_time(host, port, seconds)
  local fd = C.pz_srv_socket(AF_INET, SOCK_STREAM + SOCK_CLOEXEC, 0)
  if fd < 0 then return nil, failed("socket") end
  local tv = ffi.new("struct pz_srv_timeval")
  local limit = seconds or 5
  tv.tv_sec, tv.tv_usec = math.floor(limit), (limit % 1) * 1e6
  C.pz_srv_setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, tv, ffi.sizeof(tv))
  local t0 = core.now()
  local r = C.pz_srv_connect(fd, sockaddr(host, port), 16)
  local t = core.now() - t0
  local msg = r ~= 0 and failed(("connect to %s:%d"):format(host, port))
  C.pz_srv_close(fd)
  if msg then return nil, msg end
  return t
end

-- ----------------------------------------------------------------- fixtures

local Fixture = {}
Fixture.__index = Fixture
local fixtures_started = 0

local function new_fixture(kind, class)
  fixtures_started = fixtures_started + 1
  local dir = support.tmpdir()
  if not dir or dir == "" then return nil, "cannot create a temporary directory (mktemp -d)" end
  return setmetatable({
    kind = kind, dir = dir, serial = fixtures_started, daemons = {}, known = {}, cleanups = {},
    tag = ("%d-%d-%s"):format(support.getpid(), fixtures_started, kind),
  }, class)
end

function Fixture:__tostring()
  return ("%s fixture (%s)"):format(self.kind, self.stopped and "stopped" or self.dir)
end

--- The last lines of a file, indented, for error messages.
local function tail(path, lines)
  local text = support.read(path) or ""
  local all = {}
  for line in text:gmatch("[^\n]+") do all[#all + 1] = line end
  local first = math.max(1, #all - (lines or 8) + 1)
  local out = {}
  for i = first, #all do out[#out + 1] = "    " .. all[i] end
  if #out == 0 then return " (empty log " .. path .. ")" end
  return "\n" .. table.concat(out, "\n")
end

--- Starts a daemon of this fixture (tagged, output to dir/<log>); raises
-- on failure (the start functions catch it).
function Fixture:spawn(argv, log, env)
  local vars = { PZ_SERVERS_TAG = self.tag }
  for k, v in pairs(env or {}) do vars[k] = v end
  local path = self.dir .. "/" .. log
  local pid, err = M.spawn(argv, { env = vars, log = path })
  if not pid then error(err, 0) end
  self.daemons[#self.daemons + 1] = { pid = pid, start = support.start_time(pid), log = path, name = argv[1] }
  return pid, path
end

--- Waits up to `seconds` for ready() to be true while the daemon `pid`
-- lives; raises with `what` and the daemon's log when it exits or time
-- runs out.
local function await(pid, log, what, seconds, ready)
  local deadline = core.now() + seconds
  while true do
    if ready() then return end
    local gone, status = M.reap(pid)
    if gone then
      error(("%s: the daemon %s before it was ready; its log:%s"):format(what, M.describe(status), tail(log)), 0)
    end
    if core.now() > deadline then
      error(("%s: not ready after %g s; its log:%s"):format(what, seconds, tail(log)), 0)
    end
    core.sleep(0.01)
  end
end

local function has_tag(pid, tag)
  local env = support.read("/proc/" .. pid .. "/environ")
  return env ~= nil and ("\0" .. env):find("\0PZ_SERVERS_TAG=" .. tag .. "\0", 1, true) ~= nil
end

-- True when a process has a descriptor open on a file below dir.
local function holds_file_below(pid, dir)
  local buf = ffi.new("char[4096]")
  local prefix = dir .. "/"
  for _, fd in ipairs(support.list("/proc/" .. pid .. "/fd")) do
    local n = C.pz_srv_readlink("/proc/" .. pid .. "/fd/" .. fd, buf, 4096)
    if n > #prefix and ffi.string(buf, #prefix) == prefix then return true end
  end
  return false
end

-- slurmstepd runs with an empty environment, so it carries no tag: it is
-- known by the slurmd log of its fixture, which it keeps open.
local function is_slurmstepd_of(pid, dir)
  local cmdline = support.read("/proc/" .. pid .. "/cmdline") or ""
  return cmdline:sub(1, 11) == "slurmstepd:" and holds_file_below(pid, dir)
end

--- The processes of this fixture now, as pid -> start time: its daemons,
-- every process carrying its tag, the slurmstepd of its slurmd, every
-- descendant of those, and any seen before that is still the same process
-- (a descendant its parent left).
function Fixture:processes()
  local all = support.processes()
  local mine = {}
  local function add(pid, p)
    if p.state ~= "Z" and p.state ~= "X" then mine[pid] = p.start end
  end
  for pid, p in pairs(all) do
    if self.known[pid] == p.start or has_tag(pid, self.tag)
        or (self.kind == "slurm" and is_slurmstepd_of(pid, self.dir)) then
      add(pid, p)
    end
  end
  for _, d in ipairs(self.daemons) do
    local p = all[d.pid]
    if p and p.start == d.start then add(d.pid, p) end
  end
  repeat
    local grew = false
    for pid, p in pairs(all) do
      if not mine[pid] and mine[p.ppid] and p.state ~= "Z" and p.state ~= "X" then
        add(pid, p)
        grew = true
      end
    end
  until not grew
  for pid, start in pairs(mine) do self.known[pid] = start end
  return mine
end

-- Ends one daemon of this fixture before stop(): SIGTERM, up to GRACE s,
-- then SIGKILL.
function Fixture:end_daemon(pid)
  for i, d in ipairs(self.daemons) do
    if d.pid == pid then
      if still(d.pid, d.start) then support.kill(d.pid, SIGTERM) end
      if not M.reap(d.pid, GRACE) then
        support.kill(d.pid, SIGKILL)
        M.reap(d.pid, KILL_WAIT)
      end
      table.remove(self.daemons, i)
      return
    end
  end
end

--- Ends every process of the fixture and removes what it created. Returns
-- true, or nil and what was left. Bounded; a second call returns the
-- first's answer.
function Fixture:stop()
  if self.stopped then return self.stop_ok, self.stop_problem end
  self.stopped = true
  local problems = {}
  local set = self:processes()
  for i = #self.daemons, 1, -1 do
    local d = self.daemons[i]
    if still(d.pid, d.start) then support.kill(d.pid, SIGTERM) end
  end
  local deadline = core.now() + GRACE
  local function daemons_reaped()
    local all = true
    for _, d in ipairs(self.daemons) do
      if not M.reap(d.pid) then all = false end
    end
    return all
  end
  while not daemons_reaped() and core.now() < deadline do core.sleep(0.01) end
  -- Whatever is left (sessions, steps, tasks, a daemon deaf to SIGTERM) is
  -- killed; collected again each round, since a process may have forked
  -- between two looks.
  deadline = core.now() + KILL_WAIT
  repeat
    for pid, start in pairs(self:processes()) do set[pid] = start end
    for pid, start in pairs(set) do
      if still(pid, start) then support.kill(pid, SIGKILL) end
    end
    daemons_reaped()
    if #M.alive(set) == 0 then break end
    core.sleep(0.01)
  until core.now() > deadline
  local left = M.alive(set)
  if #left > 0 then problems[#problems + 1] = "still running: pids " .. table.concat(left, ", ") end
  for i = #self.cleanups, 1, -1 do
    local ok, err = pcall(self.cleanups[i])
    if not ok then problems[#problems + 1] = tostring(err) end
  end
  support.rmdir(self.dir)
  if C.pz_srv_access(self.dir, F_OK) == 0 then
    problems[#problems + 1] = "cannot remove " .. self.dir
  end
  if #problems == 0 then
    self.stop_ok = true
  else
    self.stop_ok, self.stop_problem = nil, ("%s: %s"):format(tostring(self), table.concat(problems, "; "))
  end
  return self.stop_ok, self.stop_problem
end

-- Runs a start function; on error, stops what was started and returns nil
-- and the message.
local function starting(kind, class, build)
  local self, err = new_fixture(kind, class)
  if not self then return nil, err end
  local ok, msg = pcall(build, self)
  if ok then return self end
  self:stop()
  return nil, ("cannot start %s: %s"):format(kind, tostring(msg))
end

-- Runs argv, raising with its output when it fails.
local function must(argv)
  local out, status = M.run(argv)
  if status ~= 0 then
    error(("`%s` failed (exit status %s): %s"):format(M.shell(argv), tostring(status), out), 0)
  end
  return out
end

local function write_file(path, text, mode)
  local f, err = io.open(path, "wb")
  if not f then error(err, 0) end
  f:write(text)
  f:close()
  if mode and C.pz_srv_chmod(path, mode) ~= 0 then error(failed("chmod " .. path), 0) end
end

-- ---------------------------------------------------------------------- ssh

-- The client options of the sshd fixtures: keepalives that notice a dead
-- link in about 3 s (ServerAliveInterval 1 x ServerAliveCountMax 3), a
-- client configuration of none (-F /dev/null: the user's ~/.ssh/config
-- must not change what the specs test), throwaway host keys accepted.
local KEEPALIVE = { "-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3" }

-- Starts sshd for fixture `self` on address:port (in namespace `netns`
-- when given) with throwaway keys, and sets the handle's ssh fields.
local function start_sshd(self, address, port, netns)
  local sshd = M.which("sshd")
  if not sshd then error("cannot find sshd", 0) end
  local dir = self.dir
  for _, key in ipairs { "host_key", "client_key" } do
    must { "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pz-spec", "-f", dir .. "/" .. key }
  end
  write_file(dir .. "/authorized_keys", assert(support.read(dir .. "/client_key.pub")), 420)
  if C.pz_srv_access("/run/sshd", F_OK) ~= 0 then must { "mkdir", "-p", "-m", "0755", "/run/sshd" } end

  local attempts = port and 1 or 5
  for attempt = 1, attempts do
    local p = port or assert(M.free_port())
    write_file(dir .. "/sshd_config", table.concat({
      "Port " .. p,
      "ListenAddress " .. address,
      "HostKey " .. dir .. "/host_key",
      "PidFile " .. dir .. "/sshd.pid",
      "AuthorizedKeysFile " .. dir .. "/authorized_keys",
      "PermitRootLogin prohibit-password",
      "PubkeyAuthentication yes",
      "PasswordAuthentication no",
      "KbdInteractiveAuthentication no",
      "UsePAM no",
      "StrictModes no",
      -- 32 connections at once: the default (10:30:100) drops some.
      "MaxStartups 100:30:200",
      "MaxSessions 100",
      -- bash started by sshd reads ~/.bashrc unless SHLVL says it is nested.
      "SetEnv SHLVL=1",
      "PrintMotd no",
      -- A client gone with its link ends its session within seconds.
      "ClientAliveInterval 1",
      "ClientAliveCountMax 3",
      "",
    }, "\n"))
    local argv = { sshd, "-D", "-e", "-f", dir .. "/sshd_config" }
    if netns then argv = { "ip", "netns", "exec", netns, sshd, "-D", "-e", "-f", dir .. "/sshd_config" } end
    local log = "sshd-" .. attempt .. ".log"
    local pid, path = self:spawn(argv, log)
    local ok, err = pcall(await, pid, path, "sshd", 10, function()
      return (support.read(path) or ""):find("Server listening on", 1, true) ~= nil
    end)
    if ok then
      self.sshd_pid, self.port = pid, p
      break
    end
    local in_use = (support.read(path) or ""):find("Address already in use", 1, true)
    if attempt == attempts or not in_use then error(err, 0) end
    M.reap(pid, 1)
  end

  self.host, self.user = address, "root"
  self.destination = "root@" .. address
  self.options = {
    "-F", "/dev/null", "-p", tostring(self.port), "-i", dir .. "/client_key",
    "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
  }
  self.ssh = { "ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20" }
  for _, o in ipairs(KEEPALIVE) do self.ssh[#self.ssh + 1] = o end
  for _, o in ipairs(self.options) do self.ssh[#self.ssh + 1] = o end
end

local Ssh = setmetatable({}, { __index = Fixture })
Ssh.__index = Ssh
Ssh.__tostring = Fixture.__tostring

--- The ssh argv prefix of this server (without the destination). With
-- mux = true, through a master connection this fixture starts on first
-- use (ControlMaster): a new session then costs a few ms instead of a key
-- exchange. Raises when the master cannot start.
function Ssh:argv(mux)
  local argv = {}
  for i, a in ipairs(self.ssh) do argv[i] = a end
  if mux then
    local path = self.dir .. "/cm"
    if not self.master then
      local master = { "ssh", "-M", "-N", "-o", "ControlPath=" .. path, "-o", "ControlPersist=no" }
      for i = 2, #self.ssh do master[#master + 1] = self.ssh[i] end
      master[#master + 1] = self.destination
      local pid, log = self:spawn(master, "master.log")
      await(pid, log, "ssh master", 10, function()
        return C.pz_srv_access(path, F_OK) == 0
      end)
      self.master = pid
    end
    for _, o in ipairs { "-o", "ControlMaster=no", "-o", "ControlPath=" .. path } do argv[#argv + 1] = o end
  end
  return argv
end

--- The argv that runs the shell command `cmd` on this server (mux: as in
-- argv).
function Ssh:command(cmd, mux)
  local argv = self:argv(mux)
  argv[#argv + 1] = self.destination
  argv[#argv + 1] = cmd
  return argv
end

--- sshd on 127.0.0.1, on a free port, with throwaway host and client keys;
-- returns the handle or nil and why. Handle: host, port, user,
-- destination ("root@127.0.0.1"), options (port, identity, host keys,
-- -F /dev/null: what a launcher's `options` would carry), ssh (the argv
-- prefix: -T, BatchMode, keepalives, then options), argv(mux), command(cmd,
-- mux), processes(), stop().
function M.sshd()
  return starting("sshd", Ssh, function(self)
    start_sshd(self, "127.0.0.1")
  end)
end

-- -------------------------------------------------------------------- Slurm

local Slurm = setmetatable({}, { __index = Fixture })
Slurm.__index = Slurm
Slurm.__tostring = Fixture.__tostring

--- Runs a Slurm client (squeue, scancel, sinfo, ...) against this cluster;
-- returns its output and exit status.
function Slurm:run(argv)
  local full = { "env", "SLURM_CONF=" .. self.conf }
  for _, a in ipairs(argv) do full[#full + 1] = a end
  return M.run(full)
end

local function words(text)
  local list = {}
  for w in text:gmatch("%S+") do list[#list + 1] = w end
  return list
end

--- The ids of the jobs in the queue (running or pending).
function Slurm:jobs()
  return words((self:run { "squeue", "-h", "-o", "%i" }))
end

--- The ids of the running steps, "JOB.STEP".
function Slurm:steps()
  return words((self:run { "squeue", "-h", "-s", "-o", "%i" }))
end

--- scancel of a job ("12") or a step ("12.0"): true, or nil and scancel's
-- output.
function Slurm:scancel(id)
  local out, status = self:run { "scancel", tostring(id) }
  if status == 0 then return true end
  return nil, out
end

--- The node's state as sinfo prints it ("idle", "mix", "alloc", "comp"...).
function Slurm:state()
  local out = self:run { "sinfo", "-h", "-o", "%t" }
  return (out:match("%S+"))
end

--- Waits up to `seconds` (default 10) for the node to be idle (after an
-- abnormal end a node stays "completing" for a few seconds and new steps
-- queue meanwhile). Returns true, or false and the state seen last.
function Slurm:wait_idle(seconds)
  local deadline = core.now() + (seconds or 10)
  repeat
    local state = self:state()
    if state == "idle" then return true end
    if core.now() > deadline then return false, state end
    core.sleep(0.05)
  until false
end

local function cpu_count()
  pcall(ffi.cdef, "long pz_srv_sysconf(int name) __asm__(\"sysconf\");")
  return tonumber(C.pz_srv_sysconf(84)) -- _SC_NPROCESSORS_ONLN
end

--- A one-node Slurm: munged, slurmctld and slurmd as children of this
-- process, configuration and state in a temporary directory, ports chosen
-- free. Returns the handle or nil and why. Handle: conf, env ({ SLURM_CONF
-- = conf }), srun (argv prefix: env SLURM_CONF=... srun -u -O), node, cpus,
-- run(argv), jobs(), steps(), scancel(id), state(), wait_idle(seconds),
-- processes(), stop().
function M.slurm()
  return starting("slurm", Slurm, function(self)
    local dir = self.dir
    -- munge: a random key of our own; munged wants every directory above
    -- its socket open to all for search (x), and the socket's own to list.
    if C.pz_srv_chmod(dir, 457) ~= 0 then error(failed("chmod 0711 " .. dir), 0) end
    must { "mkdir", "-m", "0755", dir .. "/munge", dir .. "/state", dir .. "/spool" }
    local random = assert(io.open("/dev/urandom", "rb"))
    write_file(dir .. "/munge.key", random:read(1024), 256) -- 0400
    random:close()
    local socket = dir .. "/munge/munge.sock"
    local munged, log = self:spawn({ "munged", "-F", "--key-file=" .. dir .. "/munge.key",
      "--socket=" .. socket, "--pid-file=" .. dir .. "/munged.pid",
      "--log-file=" .. dir .. "/munged.log", "--seed-file=" .. dir .. "/munged.seed" }, "munged.out")
    await(munged, log, "munged", 10, function() return C.pz_srv_access(socket, F_OK) == 0 end)

    local node = (support.read("/proc/sys/kernel/hostname") or ""):match("^[^.%s]+")
    if not node then error("cannot read the host name from /proc/sys/kernel/hostname", 0) end
    self.node, self.cpus = node, cpu_count()
    self.conf = dir .. "/slurm.conf"
    local ctld_port, node_port = assert(M.free_port()), assert(M.free_port())
    while node_port == ctld_port do node_port = assert(M.free_port()) end
    write_file(self.conf, table.concat({
      "ClusterName=pzspec",
      ("SlurmctldHost=%s(127.0.0.1)"):format(node),
      "SlurmctldPort=" .. ctld_port,
      "SlurmdPort=" .. node_port,
      "AuthType=auth/munge",
      "CredType=cred/munge",
      "AuthInfo=socket=" .. socket,
      "SlurmUser=root",
      "SlurmdUser=root",
      "StateSaveLocation=" .. dir .. "/state",
      "SlurmdSpoolDir=" .. dir .. "/spool",
      "SlurmctldPidFile=" .. dir .. "/slurmctld.pid",
      "SlurmdPidFile=" .. dir .. "/slurmd.pid",
      "SlurmctldLogFile=" .. dir .. "/slurmctld.log",
      "SlurmdLogFile=" .. dir .. "/slurmd.log",
      "ProctrackType=proctrack/linuxproc",
      "TaskPlugin=task/none",
      "JobAcctGatherType=jobacct_gather/none",
      "AccountingStorageType=accounting_storage/none",
      "JobCompType=jobcomp/none",
      "MpiDefault=none",
      "MailProg=/bin/true",
      "SelectType=select/cons_tres",
      "SelectTypeParameters=CR_Core",
      "SchedulerType=sched/builtin",
      "ReturnToService=2",
      -- An srun gone silent ends its job within seconds.
      "InactiveLimit=5",
      -- scancel: SIGTERM, then SIGKILL 2 s later (default 30 s).
      "KillWait=2",
      ("NodeName=%s NodeAddr=127.0.0.1 CPUs=%d State=UNKNOWN"):format(node, self.cpus),
      -- More jobs than CPUs run at once instead of queueing.
      "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:16",
      "",
    }, "\n"))
    -- slurmd would detect the cgroup version from /sys/fs/cgroup, and give
    -- up where nothing is mounted there (a container, a chroot); with
    -- proctrack/linuxproc and task/none nothing uses cgroups, so the v1
    -- plugin, which needs no mount to start, is named outright.
    write_file(dir .. "/cgroup.conf", "CgroupPlugin=cgroup/v1\n")
    local env = { SLURM_CONF = self.conf }
    self:spawn({ "slurmctld", "-D", "-i", "-f", self.conf }, "slurmctld.out", env)
    local slurmd, slurmd_log = self:spawn({ "slurmd", "-D", "-N", node, "-f", self.conf }, "slurmd.out", env)
    await(slurmd, slurmd_log, "slurm (slurmd, waiting for an idle node)", 30, function()
      for _, d in ipairs(self.daemons) do
        if M.reap(d.pid) then error(("%s exited; its log:%s"):format(d.name, tail(d.log)), 0) end
      end
      return self:state() == "idle"
    end)
    self.env = env
    self.srun = { "env", "SLURM_CONF=" .. self.conf, "srun", "-u", "-O" }
  end)
end

-- --------------------------------------------------------- network namespace

local Netns = setmetatable({}, { __index = Ssh })
Netns.__index = Netns
Netns.__tostring = Fixture.__tostring

--- Cuts the link: the host's end of the veth pair goes down.
function Netns:cut()
  must { "ip", "link", "set", self.host_link, "down" }
end

--- Restores the link cut by cut().
function Netns:restore()
  must { "ip", "link", "set", self.host_link, "up" }
end

-- Takes away the delay set by delay().
function Netns:remove_delay()
  if self.delay_method == "netem" then
    must { "tc", "qdisc", "del", "dev", self.host_link, "root" }
  elseif self.delay_method == "nfqueue" then
    must(self.nfqueue_rule("-D"))
    core.sleep(self.delay_ms / 1000 + 0.05) -- the packets held go out before their holder ends
    self:end_daemon(self.delayer)
    self.delayer = nil
  end
  self.delay_method, self.delay_ms = nil, nil
end

--- Adds `ms` milliseconds to every packet going into the namespace (so to
-- every round trip through the link); 0 takes the delay away. Returns the
-- method used: "netem" (tc qdisc ... netem delay) where the kernel has it,
-- else "nfqueue" (an NFQUEUE rule and spec/netdelay.lua); raises when
-- neither works.
function Netns:delay(ms)
  self:remove_delay()
  if ms == 0 then return nil end
  local _, status = M.run { "tc", "qdisc", "add", "dev", self.host_link, "root", "netem", "delay", ms .. "ms" }
  if status == 0 then
    self.delay_method, self.delay_ms = "netem", ms
    return "netem"
  end
  local luajit = os.getenv("LUAJIT")
  if not luajit or luajit == "" or not M.which(luajit) then luajit = "luajit" end
  local pid, log = self:spawn({ "ip", "netns", "exec", self.namespace, luajit, M.netdelay_script,
                                "0", tostring(ms) }, "netdelay.log")
  await(pid, log, "netdelay", 10, function()
    return (support.read(log) or ""):find("ready", 1, true) ~= nil
  end)
  self.delayer, self.delay_method, self.delay_ms = pid, "nfqueue", ms
  must(self.nfqueue_rule("-A"))
  return "nfqueue"
end

--- Limits the packets going into the namespace to `mbit` megabits a
-- second (a tbf qdisc on the host's end of the pair; not with delay()).
-- Returns true, or nil and why (a kernel without tbf).
function Netns:throttle(mbit)
  local out, status = M.run { "tc", "qdisc", "replace", "dev", self.host_link, "root", "tbf", "rate", mbit .. "mbit",
                              "burst", "64kbit", "latency", "10s" }
  if status ~= 0 then return nil, "tc qdisc tbf failed: " .. out end
  return true
end

-- 10.231.0.0/16 cut into /30s, one per namespace: the host's end .1, the
-- namespace's .2 of its /30. Skips any /30 an address on this host is
-- already in (another run's namespace).
local function pick_subnet(serial)
  local first = (support.getpid() * 8 + serial) % 16384
  for k = 0, 63 do
    local index = (first + k * 257) % 16384
    local base = ("10.231.%d.%d"):format(math.floor(index / 64), (index % 64) * 4)
    local out, status = M.run { "ip", "-4", "-o", "addr", "show", "to", base .. "/30" }
    if status == 0 and not out:find("inet", 1, true) then
      local a, b, c, d = base:match("(%d+)%.(%d+)%.(%d+)%.(%d+)")
      return ("%s.%s.%s.%d"):format(a, b, c, d + 1), ("%s.%s.%s.%d"):format(a, b, c, d + 2)
    end
  end
  error("no free /30 in 10.231.0.0/16", 0)
end

--- A second "host": a network namespace joined to this one by a veth pair,
-- with sshd inside on port 22 of its address. Returns the handle or nil
-- and why. Handle: everything sshd()'s has (host is the namespace's
-- address), and namespace, host_link, namespace_link, host_address,
-- cut(), restore(), delay(ms), throttle(mbit), processes(), stop() (which deletes the
-- namespace and the pair).
function M.netns()
  return starting("netns", Netns, function(self)
    local pid, n = support.getpid(), self.serial
    self.namespace = ("pz-spec-%d-%d"):format(pid, n)
    self.host_link, self.namespace_link = ("pzh%dx%d"):format(pid, n), ("pzn%dx%d"):format(pid, n)
    local host_address, ns_address = pick_subnet(n)
    self.host_address = host_address
    must { "ip", "netns", "add", self.namespace }
    self.cleanups[#self.cleanups + 1] = function()
      local _, status = M.run { "ip", "netns", "del", self.namespace }
      if status ~= 0 then error("cannot delete namespace " .. self.namespace, 0) end
    end
    must { "ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.namespace_link }
    self.cleanups[#self.cleanups + 1] = function()
      -- Deleting one end deletes both; the namespace's end may be gone with it.
      local _, exists = M.run { "ip", "link", "show", self.host_link }
      if exists == 0 then must { "ip", "link", "del", self.host_link } end
    end
    must { "ip", "link", "set", self.namespace_link, "netns", self.namespace }
    must { "ip", "addr", "add", host_address .. "/30", "dev", self.host_link }
    must { "ip", "link", "set", self.host_link, "up" }
    must { "ip", "-n", self.namespace, "addr", "add", ns_address .. "/30", "dev", self.namespace_link }
    must { "ip", "-n", self.namespace, "link", "set", self.namespace_link, "up" }
    must { "ip", "-n", self.namespace, "link", "set", "lo", "up" }
    local namespace, link = self.namespace, self.namespace_link
    self.nfqueue_rule = function(action)
      return { "ip", "netns", "exec", namespace, "iptables", "-w", action, "INPUT", "-i", link,
               "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass" }
    end
    start_sshd(self, ns_address, 22, self.namespace)
  end)
end

M.netdelay_script = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "netdelay.lua"

-- ---------------------------------------------------------------- can_run

local NEEDS = {
  sshd = { "sshd", "ssh", "ssh-keygen" },
  slurm = { "munged", "slurmctld", "slurmd", "srun", "scancel", "squeue", "sinfo" },
  netns = { "ip", "tc", "iptables", "sshd", "ssh", "ssh-keygen", "luajit" },
}

--- Whether this machine can run the fixtures (`kind`: "sshd", "slurm" or
-- "netns"; all three when nil): true, or false and why ("not root", the
-- programs missing and the package that has them).
function M.can_run(kind)
  local kinds = kind and { kind } or { "sshd", "slurm", "netns" }
  if C.pz_srv_geteuid() ~= 0 then
    return false, ("not root (euid %d): sshd, munge and network namespaces need root"):format(C.pz_srv_geteuid())
  end
  local missing, seen = {}, {}
  for _, k in ipairs(kinds) do
    assert(NEEDS[k], "unknown fixture kind " .. tostring(k))
    for _, prog in ipairs(NEEDS[k]) do
      if not seen[prog] and not M.which(prog) then missing[#missing + 1] = prog end
      seen[prog] = true
    end
  end
  if #missing > 0 then
    return false, "missing programs: " .. table.concat(missing, ", ") .. " (make deps installs them)"
  end
  if (kind == nil or kind == "netns") and C.pz_srv_access("/proc/self/ns/net", F_OK) ~= 0 then
    return false, "no network namespaces in this kernel"
  end
  return true
end

return M
