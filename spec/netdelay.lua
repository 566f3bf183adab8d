--- netdelay.lua QUEUE MS: holds every packet that netfilter hands to queue
-- QUEUE (an iptables NFQUEUE rule) for MS milliseconds, then lets it go:
-- a fixed added delay, for kernels built without the netem qdisc. Run by
-- spec/servers.lua inside the network namespace whose link it slows (a
-- queue belongs to one namespace); ends on SIGTERM.
--
-- Rules it owns:
-- - Packets leave in the order they came and none is dropped by it: each
--   is released by a batch verdict (NFQNL_MSG_VERDICT_BATCH accepts every
--   packet of the queue up to an id), so a notification lost to a full
--   socket buffer is released by the next verdict all the same.
-- - Only metadata crosses to this process (NFQNL_COPY_META), and segments
--   offloaded by the stack stay whole (NFQA_CFG_F_GSO): the cost per
--   packet is one small message, whatever the throughput.
-- - It prints "ready" once the queue is bound, and on any failure one line
--   saying what failed and why, then exits 1.
local ffi = require "ffi"
local bit = require "bit"

local function declare(decl)
  pcall(ffi.cdef, decl)
end
declare "int socket(int domain, int type, int protocol);"
declare "int bind(int fd, const void *addr, unsigned int len);"
declare "int setsockopt(int fd, int level, int name, const void *value, unsigned int len);"
declare "long send(int fd, const void *buf, unsigned long len, int flags);"
declare "long recv(int fd, void *buf, unsigned long len, int flags);"
declare "struct pz_netdelay_pollfd { int fd; short events; short revents; };"
declare "int poll(struct pz_netdelay_pollfd *fds, unsigned long n, int timeout);"
declare "struct pz_netdelay_timespec { long tv_sec; long tv_nsec; };"
declare "int clock_gettime(int clock, struct pz_netdelay_timespec *ts);"
declare "char *strerror(int errnum);"
local C = ffi.C

local AF_NETLINK, SOCK_RAW, SOCK_CLOEXEC, NETLINK_NETFILTER = 16, 3, 0x80000, 12
local SOL_SOCKET, SO_RCVBUFFORCE, SOL_NETLINK, NETLINK_NO_ENOBUFS = 1, 33, 270, 5
local NLMSG_ERROR, NLM_F_REQUEST, NLM_F_ACK = 2, 1, 4
local NFNL_SUBSYS_QUEUE = 3
local NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
local NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
local NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
local NFQNL_CFG_CMD_BIND, NFQNL_COPY_META, NFQA_CFG_F_GSO = 1, 1, 4
local NF_ACCEPT = 1
local MSG_DONTWAIT, EINTR, EAGAIN = 0x40, 4, 11
local POLLIN, CLOCK_MONOTONIC = 1, 1

local queue, delay_ms = tonumber(arg[1]), tonumber(arg[2])
io.stdout:setvbuf("line")

local function die(what)
  local err = ffi.errno()
  io.stdout:write("netdelay: ", what, ": ", ffi.string(C.strerror(err)), "\n")
  os.exit(1)
end

if not queue or not delay_ms or delay_ms < 0 then
  io.stdout:write("netdelay: usage: netdelay.lua QUEUE MS\n")
  os.exit(1)
end

-- Netlink wants host order in its headers and big-endian in netfilter's.
local function be16(n) return string.char(bit.band(bit.rshift(n, 8), 255), bit.band(n, 255)) end
local function be32(n)
  return string.char(bit.band(bit.rshift(n, 24), 255), bit.band(bit.rshift(n, 16), 255),
                     bit.band(bit.rshift(n, 8), 255), bit.band(n, 255))
end
local function le16(n) return string.char(bit.band(n, 255), bit.band(bit.rshift(n, 8), 255)) end
local function le32(n)
  return string.char(bit.band(n, 255), bit.band(bit.rshift(n, 8), 255),
                     bit.band(bit.rshift(n, 16), 255), bit.band(bit.rshift(n, 24), 255))
end
local host16 = ffi.abi("le") and le16 or be16
local host32 = ffi.abi("le") and le32 or be32

local function attribute(kind, payload)
  local len = 4 + #payload
  return host16(len) .. host16(kind) .. payload .. string.rep("\0", (4 - len % 4) % 4)
end

-- One netfilter message of the queue subsystem: nlmsghdr, nfgenmsg, attributes.
local function message(kind, flags, attributes)
  local body = string.char(0, 0) .. be16(queue) .. attributes -- AF_UNSPEC, NFNETLINK_V0
  return host32(16 + #body) .. host16(NFNL_SUBSYS_QUEUE * 256 + kind) .. host16(flags)
    .. host32(0) .. host32(0) .. body
end

local fd = C.socket(AF_NETLINK, SOCK_RAW + SOCK_CLOEXEC, NETLINK_NETFILTER)
if fd < 0 then die("socket(AF_NETLINK, NETLINK_NETFILTER)") end
local address = ffi.new("uint8_t[12]") -- sockaddr_nl, all zero but the family
address[0] = AF_NETLINK
if C.bind(fd, address, 12) ~= 0 then die("bind of the netlink socket") end
local size = ffi.new("int[1]", 8 * 1024 * 1024)
if C.setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, size, 4) ~= 0 then die("SO_RCVBUFFORCE") end
local one = ffi.new("int[1]", 1)
C.setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, one, 4) -- best effort: batch verdicts cover losses

local buffer_size = 256 * 1024
local buffer = ffi.new("uint8_t[?]", buffer_size)

local function read16(p) return ffi.cast("uint16_t *", p)[0] end
local function read32(p) return ffi.cast("uint32_t *", p)[0] end
local function read_be32(p) return bit.bor(bit.lshift(p[0], 24), bit.lshift(p[1], 16), bit.lshift(p[2], 8), p[3]) end

local function send(msg, what)
  if C.send(fd, msg, #msg, 0) ~= #msg then die(what) end
end

-- Sends a configuration message and waits for its acknowledgement.
local function configure(attributes, what)
  send(message(NFQNL_MSG_CONFIG, NLM_F_REQUEST + NLM_F_ACK, attributes), what)
  while true do
    local n = C.recv(fd, buffer, buffer_size, 0)
    if n < 0 then
      if ffi.errno() ~= EINTR then die(what .. ": recv") end
    elseif n >= 20 and read16(buffer + 4) == NLMSG_ERROR then
      local err = -ffi.cast("int32_t *", buffer + 16)[0]
      if err ~= 0 then
        ffi.errno(err)
        die(what)
      end
      return
    end
  end
end

configure(attribute(NFQA_CFG_CMD, string.char(NFQNL_CFG_CMD_BIND, 0) .. be16(0)), "binding queue " .. queue)
configure(attribute(NFQA_CFG_PARAMS, be32(0) .. string.char(NFQNL_COPY_META)), "metadata-only copy mode")
configure(attribute(NFQA_CFG_QUEUE_MAXLEN, be32(65536)), "queue length")
configure(attribute(NFQA_CFG_MASK, be32(NFQA_CFG_F_GSO)) .. attribute(NFQA_CFG_FLAGS, be32(NFQA_CFG_F_GSO)),
  "GSO flag")
io.stdout:write("ready\n")

local ts = ffi.new("struct pz_netdelay_timespec")
local function now_ms()
  C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

-- Packets held: their ids and release times, oldest first, in a ring.
local ids, due = {}, {}
local first, last = 1, 0

local function take(n)
  local off = 0
  while off + 16 <= n do
    local len = read32(buffer + off)
    if len < 16 or off + len > n then break end
    if read16(buffer + off + 4) == NFNL_SUBSYS_QUEUE * 256 + NFQNL_MSG_PACKET then
      local a = off + 20 -- after nlmsghdr and nfgenmsg
      while a + 4 <= off + len do
        local alen, kind = read16(buffer + a), bit.band(read16(buffer + a + 2), 0x3fff)
        if alen < 4 then break end
        if kind == NFQA_PACKET_HDR then
          last = last + 1
          ids[last], due[last] = read_be32(buffer + a + 4), now_ms() + delay_ms
          break
        end
        a = a + alen + (4 - alen % 4) % 4
      end
    end
    off = off + len + (4 - len % 4) % 4
  end
end

local pollfd = ffi.new("struct pz_netdelay_pollfd")
pollfd.fd, pollfd.events = fd, POLLIN
while true do
  local timeout = -1
  if first <= last then timeout = math.max(0, math.ceil(due[first] - now_ms())) end
  if C.poll(pollfd, 1, timeout) < 0 and ffi.errno() ~= EINTR then die("poll") end
  while true do
    local n = C.recv(fd, buffer, buffer_size, MSG_DONTWAIT)
    if n < 0 then
      local err = ffi.errno()
      if err == EAGAIN then break end
      if err ~= EINTR and err ~= 105 then die("recv") end -- 105: ENOBUFS, covered by batches
    else
      take(tonumber(n))
    end
  end
  local t, release = now_ms(), nil
  while first <= last and due[first] <= t do
    release = ids[first]
    ids[first], due[first] = nil, nil
    first = first + 1
  end
  if release then
    send(message(NFQNL_MSG_VERDICT_BATCH, NLM_F_REQUEST,
                 attribute(NFQA_VERDICT_HDR, be32(NF_ACCEPT) .. be32(release))), "verdict")
  end
end
