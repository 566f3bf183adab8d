--- parallelize.launchers: commands that start workers on other hosts.
--
-- A launcher is a command that ends up running `pzlua --worker` somewhere,
-- with its stdin and stdout connected back: the pool starts one per worker
-- slot, with the argv that launcher(slot) returns, and talks to the worker
-- through the command's stdin and stdout (src/spawner.c executes it,
-- src/remote.c is the other end). ssh{...} and srun{...} make the usual
-- ones; the public API exports them as parallelize.ssh and parallelize.srun.
local options = require "parallelize.options"

local error, type, pairs, ipairs, pcall = error, type, pairs, ipairs, pcall
local setmetatable, tostring = setmetatable, tostring
local format, floor, sort, concat = string.format, math.floor, table.sort, table.concat
local describe = options.describe

local M = {}

--- The argv launcher(i) gives worker slot i, checked: a non-empty array of
-- strings (numbers become strings). Raises a message for Parallelize.
function M.argv(launcher, i)
  local ok, argv = pcall(launcher, i)
  if not ok then
    error(format("Parallelize: the launcher of worker %d raised: %s", i, tostring(argv)), 0)
  end
  if type(argv) ~= "table" or argv[1] == nil then
    error(format("Parallelize: the launcher of worker %d returned %s, not a command (an array of strings)",
      i, describe(argv)), 0)
  end
  local words = {}
  for k = 1, #argv do
    local a = argv[k]
    if type(a) == "number" then a = tostring(a) end
    if type(a) ~= "string" or a:find("\0", 1, true) then
      error(format("Parallelize: word %d of the launcher's command for worker %d is %s, not a string",
        k, i, describe(argv[k])), 0)
    end
    words[k] = a
  end
  return words
end

local Launcher_mt = {
  __call = function(self, slot) return self.command_of(slot) end,
  __tostring = function(self) return "parallelize launcher (" .. self.kind .. ")" end,
}

--- Checks the keys of a launcher's spec table: the array part, and the
-- named fields in `known`.
local function check_spec(what, spec, known)
  if type(spec) ~= "table" then
    error(format("%s: expects a table such as %s{ ... } (got %s)", what, what, describe(spec)), 3)
  end
  for k in pairs(spec) do
    if not (type(k) == "number" and k >= 1 and k <= #spec and k == floor(k)) and not known[k] then
      local names = {}
      for name in pairs(known) do names[#names + 1] = name end
      sort(names)
      error(format("%s: unknown field %s (the fields are %s)", what,
        type(k) == "string" and "'" .. k .. "'" or "[" .. tostring(k) .. "]", concat(names, ", ")), 3)
    end
  end
end

--- A list of words from a string (one word) or an array of strings.
local function words_of(what, field, v, default)
  if v == nil then v = default end
  if type(v) == "string" and v ~= "" then return { v } end
  if type(v) == "table" and #v > 0 then
    local list = {}
    for i = 1, #v do
      if type(v[i]) ~= "string" then
        error(format("%s: %s[%d] must be a string (got %s)", what, field, i, describe(v[i])), 3)
      end
      list[i] = v[i]
    end
    return list
  end
  error(format("%s: %s must be a non-empty string or array of strings (got %s)", what, field, describe(v)), 3)
end

--- A word quoted for a POSIX shell (the remote login shell of ssh).
local function shell_quote(word)
  if word:match("^[%w@%%+=:,./_-]+$") then return word end
  return "'" .. word:gsub("'", "'\\''") .. "'"
end

local function append(list, more)
  for _, v in ipairs(more) do list[#list + 1] = v end
  return list
end

local SSH_FIELDS = { per_host = true, options = true, command = true, program = true }

--- ssh{host, ... [, per_host =] [, options =] [, command =] [, program =]}:
-- a launcher that starts each worker with ssh on one of the hosts. Without
-- per_host, worker slots go round the hosts; with it, the first per_host
-- slots go to the first host, the next per_host to the second, and so on.
function M.ssh(spec)
  if spec ~= nil and spec == package.loaded.parallelize then
    error("use parallelize.ssh{...}, not parallelize:ssh{...}", 2)
  end
  check_spec("ssh", spec, SSH_FIELDS)
  local hosts = {}
  for i = 1, #spec do
    local h = spec[i]
    if type(h) ~= "string" or h == "" or h:sub(1, 1) == "-" then
      error(format("ssh: host %d must be a destination such as \"node1\" or \"user@node2\" (got %s)", i,
        describe(h)), 2)
    end
    hosts[i] = h
  end
  if #hosts == 0 then error("ssh: no host given: ssh{\"node1\", \"user@node2\", ...}", 2) end
  local per_host = spec.per_host
  if per_host ~= nil and (type(per_host) ~= "number" or per_host < 1 or per_host ~= floor(per_host)) then
    error(format("ssh: per_host must be a positive integer (got %s)", describe(per_host)), 2)
  end
  local ssh_options = spec.options == nil and {} or words_of("ssh", "options", spec.options)
  local remote = {}
  for i, w in ipairs(words_of("ssh", "command", spec.command, "pzlua")) do
    -- a single string is the user's shell command as written; a list is
    -- quoted word by word
    remote[i] = type(spec.command) == "table" and shell_quote(w) or w
  end
  remote[#remote + 1] = "--worker"
  remote = concat(remote, " ")
  -- What the protocol needs comes first: no terminal (a pty would mangle
  -- the frames), no escape character, never a password prompt on the
  -- protocol's stdin. The user's options come next, so that theirs win
  -- over the defaults after them (ssh keeps the first value it is given):
  -- keepalives that notice a dead link in 15 s, a bound on connecting.
  local base = append(words_of("ssh", "program", spec.program, "ssh"),
    { "-T", "-e", "none", "-o", "BatchMode=yes" })
  append(base, ssh_options)
  append(base, { "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=30" })
  return setmetatable({
    kind = "ssh", hosts = hosts, per_host = per_host,
    command_of = function(slot)
      local h
      if per_host then
        h = floor((slot - 1) / per_host) + 1
        if h > #hosts then
          error(format("ssh: worker %d has no place: %d host%s x per_host %d = %d workers", slot, #hosts,
            #hosts == 1 and "" or "s", per_host, #hosts * per_host), 0)
        end
      else
        h = (slot - 1) % #hosts + 1
      end
      return append(append({}, base), { "--", hosts[h], remote })
    end,
  }, Launcher_mt)
end

local SRUN_FIELDS = { command = true, program = true }

--- srun{option, ... [, command =] [, program =]}: a launcher that starts
-- each worker as a one-task job step (or job) with Slurm's srun; the array
-- holds srun's options. Made inside an allocation (SLURM_JOB_ID is set), it
-- adds --exact.
function M.srun(spec)
  if spec ~= nil and spec == package.loaded.parallelize then
    error("use parallelize.srun{...}, not parallelize:srun{...}", 2)
  end
  check_spec("srun", spec, SRUN_FIELDS)
  local argv = words_of("srun", "program", spec.program, "srun")
  for i = 1, #spec do
    if type(spec[i]) ~= "string" then
      error(format("srun: option %d must be a string (got %s)", i, describe(spec[i])), 2)
    end
    argv[#argv + 1] = spec[i]
  end
  -- After the user's options, so that they win: one task (one worker per
  -- srun), and output unbuffered (srun otherwise holds a partial line
  -- back, and a frame rarely ends with a newline). Inside an allocation
  -- each worker is a job step, and a step takes the whole allocation
  -- unless it asks for only what it needs (--exact): the others would
  -- wait for it to end, which a worker never does by itself.
  append(argv, { "--ntasks=1", "--unbuffered" })
  if os.getenv("SLURM_JOB_ID") then argv[#argv + 1] = "--exact" end
  append(argv, words_of("srun", "command", spec.command, "pzlua"))
  argv[#argv + 1] = "--worker"
  return setmetatable({
    kind = "srun",
    command_of = function() return append({}, argv) end,
  }, Launcher_mt)
end

return M
