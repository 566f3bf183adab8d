--- Helpers shared by the specs: processes, descriptors, temporary files,
-- running pzlua as a subprocess.
local M = {}

local ffi = require "ffi"
pcall(ffi.cdef, [[
int kill(int pid, int sig);
int getpid(void);
long sysconf(int name);
typedef struct pz_spec_dir pz_spec_dir;
struct pz_spec_dirent {
  uint64_t d_ino;
  int64_t d_off;
  unsigned short d_reclen;
  unsigned char d_type;
  char d_name[256];
};
pz_spec_dir *opendir(const char *name);
struct pz_spec_dirent *readdir(pz_spec_dir *dir);
int closedir(pz_spec_dir *dir);
]])

--- The names in a directory (without . and ..), read without starting a
-- process (a popen'd `ls` would show up among our children).
function M.list(dir)
  local d = ffi.C.opendir(dir)
  if d == nil then return {} end
  local names = {}
  while true do
    local e = ffi.C.readdir(d)
    if e == nil then break end
    local name = ffi.string(e.d_name)
    if name ~= "." and name ~= ".." then names[#names + 1] = name end
  end
  ffi.C.closedir(d)
  return names
end

--- The pid of this process.
function M.getpid()
  return ffi.C.getpid()
end

--- The fields of /proc/PID/stat after the command name (which may hold
-- spaces): [1] is the state (field 3 of proc(5)), [2] the parent's pid,
-- [12] and [13] utime and stime. nil when the process is gone.
local function stat_fields(pid)
  local f = io.open("/proc/" .. pid .. "/stat", "r")
  if not f then return nil end
  -- (nil when the process was reaped between the open and the read)
  local stat = f:read("*a") or ""
  f:close()
  local fields = {}
  for v in (stat:match("^%d+ %b() (.*)$") or ""):gmatch("%S+") do fields[#fields + 1] = v end
  fields.comm = stat:match("^%d+ %((.*)%) ")
  return fields
end

--- True when a process with this pid exists and is not a zombie.
function M.alive(pid)
  local fields = stat_fields(pid)
  local state = fields and fields[1]
  return state ~= nil and state ~= "Z" and state ~= "X"
end

--- CPU time (user + system, seconds) a process has used; nil when it is
-- gone.
function M.cpu_seconds(pid)
  local fields = stat_fields(pid)
  if not fields then return nil end
  return (tonumber(fields[12]) + tonumber(fields[13])) / tonumber(ffi.C.sysconf(2)) -- _SC_CLK_TCK
end

--- The pids of the live children of pid (default: this process), but
-- for its fork server.
function M.children(pid)
  pid = pid or M.getpid()
  local list = {}
  for _, name in ipairs(M.list("/proc")) do
    local fields = name:match("^%d+$") and stat_fields(name)
    -- A process's fork server (src/forkserver.h) lives as long as it does.
    if fields and tonumber(fields[2]) == pid and fields[1] ~= "Z" and fields.comm ~= "pz-forkserver" then
      list[#list + 1] = tonumber(name)
    end
  end
  return list
end

--- The start time of a process (field 22 of proc(5): clock ticks since
-- boot); with the pid, it names a process even after the pid is reused.
-- nil when the process is gone.
function M.start_time(pid)
  local fields = stat_fields(pid)
  return fields and tonumber(fields[20])
end

--- Every process of the machine, zombies included: pid -> { ppid = ,
-- state = (a letter of proc(5)), start = (as start_time) }.
function M.processes()
  local all = {}
  for _, name in ipairs(M.list("/proc")) do
    local fields = name:match("^%d+$") and stat_fields(name)
    if fields then
      all[tonumber(name)] = { ppid = tonumber(fields[2]), state = fields[1], start = tonumber(fields[20]) }
    end
  end
  return all
end

--- How many descriptors this process has open.
function M.fd_count()
  return #M.list("/proc/self/fd") - 1 -- the directory being read
end

--- Sends signal sig to pid; returns true on success.
function M.kill(pid, sig)
  return ffi.C.kill(pid, sig) == 0
end

--- Waits up to `seconds` (5) for pred() to be true, looking every `step`
-- seconds (0.01); returns its last value.
function M.eventually(pred, seconds, step)
  local core = require "parallelize.core"
  local deadline = core.now() + (seconds or 5)
  repeat
    local v = pred()
    if v then return v end
    core.sleep(step or 0.01)
  until core.now() > deadline
  return pred()
end

--- After two full collections, the keys of the weak table `held` whose
-- entries are still there (sorted when they can be): what something
-- still keeps alive.
function M.uncollected(held)
  collectgarbage()
  collectgarbage()
  local left = {}
  for k in pairs(held) do left[#left + 1] = k end
  pcall(table.sort, left)
  return left
end

--- The items of every list given, in order, in one new list.
function M.concat(...)
  local all = {}
  for _, list in ipairs { ... } do
    for _, v in ipairs(list) do all[#all + 1] = v end
  end
  return all
end

--- busted keeps one `finally` per test (a second replaces the first):
-- defer(finally) registers it once and returns a function that adds
-- clean-ups, run last first, each protected.
function M.defer(finally)
  local fns = {}
  finally(function()
    for i = #fns, 1, -1 do pcall(fns[i]) end
  end)
  return function(fn) fns[#fns + 1] = fn end
end

--- A fresh temporary directory; removed by M.rmdir.
function M.tmpdir()
  local p = io.popen("mktemp -d /tmp/pz-spec.XXXXXX")
  local dir = p:read("*l")
  p:close()
  return dir
end

function M.rmdir(dir)
  if dir and dir:match("^/tmp/pz%-spec%.") then os.execute("rm -rf '" .. dir .. "'") end
end

function M.write(path, text)
  local f = assert(io.open(path, "wb"))
  assert(f:write(text))
  assert(f:close())
end

function M.read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

--- The pzlua under test, as an absolute path: $PZLUA (relative to the
-- current directory), else build/pzlua of the tree this file is in.
function M.pzlua()
  local p, dir = os.getenv("PZLUA"), nil
  if not p or p == "" then
    p, dir = "build/pzlua", debug.getinfo(1, "S").source:match("^@(.*)spec/[^/]*$")
  end
  if p:sub(1, 1) == "/" then return p end
  if not dir or dir:sub(1, 1) ~= "/" then
    local pwd = io.popen("pwd")
    dir = pwd:read("*l") .. "/" .. (dir or "")
    pwd:close()
  end
  return dir .. p
end

--- LEB128, as the codec and frames write it (for hand-made inputs).
function M.varint(n)
  local out = {}
  repeat
    local byte = n % 128
    n = (n - byte) / 128
    if n > 0 then byte = byte + 128 end
    out[#out + 1] = string.char(byte)
  until n == 0
  return table.concat(out)
end

--- Quotes s for the shell.
function M.quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

--- Runs a shell command; returns its stdout+stderr and its exit status.
function M.run(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"#status=$?\"")
  local out = p:read("*a")
  p:close()
  local status = tonumber(out:match("#status=(%d+)%s*$"))
  return out:gsub("#status=%d+%s*$", ""), status
end

--- The key=value lines of a benchmark's output, as a table.
function M.parse_kv(out)
  local kv = {}
  for line in out:gmatch("[^\n]+") do
    local k, v = line:match("^([%w_.]+)=(.*)$")
    if k then kv[k] = v end
  end
  return kv
end

--- Runs `pzlua bench/<script> args...` from the top of the tree; returns
-- its key=value lines, the whole output and the exit status.
function M.run_bench(script, args)
  local out, status = M.run(M.quote(M.pzlua()) .. " bench/" .. script .. " " .. args)
  return M.parse_kv(out), out, status
end

--- f's upvalue `name` and its index, or nothing when f has none.
function M.upvalue(f, name)
  for i = 1, 255 do
    local n, v = debug.getupvalue(f, i)
    if not n then return end
    if n == name then return v, i end
  end
end

--- Runs body() with f's upvalue `name` set to value, and puts it back
-- afterwards whatever body did; the JIT is flushed both times (a trace
-- keeps an upvalue never assigned in Lua as a constant: the value put
-- back was not called). Returns what body returns, raises what it raises.
function M.with_upvalue(f, name, value, body)
  local real, idx = M.upvalue(f, name)
  assert(idx, "no upvalue " .. name)
  debug.setupvalue(f, idx, value)
  jit.flush()
  local r = { pcall(body) }
  debug.setupvalue(f, idx, real)
  jit.flush()
  if not r[1] then error(r[2], 0) end
  return unpack(r, 2, table.maxn(r))
end

return M
