--- Remote workers over a slow link: a pool of 4 workers started with ssh
-- on a second "host" (sshd in a network namespace, spec/servers.lua) whose
-- link adds 20 ms to every round trip. What it shows is what the in-flight
-- depth of a remote slot (window / call time, plus the round trip over
-- the call time, plus one: src/slot.c) gives over such a link.
--
-- Figures and their anchors, measured in the same run:
--   - calls of 1 ms (a sleep) through the 20 ms link, with the defaults
--     and with a window of 10 ms: calls per second against the ideal (4
--     workers x 1000 calls/s) and against a local pool of 4 running the
--     same calls;
--   - the same with max_inflight = 2, the depth a local worker would get
--     (window 2 ms / 1 ms calls), and max_inflight = 1 (one call per round
--     trip): what covering the round trip is worth;
--   - tiny calls (x * 2) through the 20 ms link, through the same link
--     without delay, and through a local pool (no launcher);
--   - the time 4 workers take to start over each link.
-- Needs root (sshd, namespaces); without it, it says so and prints no
-- figure.
--
--   build/pzlua bench/remote.lua      (from the top of the tree)
--
-- Environment: PZ_BENCH_DELAY_MS (default 20), PZ_BENCH_MS_CALLS (calls of
-- 1 ms with the defaults, 4000), PZ_BENCH_TINY_N (tiny calls, 100000).
--
-- Output: key=value lines, then a table.
local dir = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
package.path = dir .. "/?.lua;" .. dir .. "/../?.lua;" .. dir .. "/../lua/?.lua;" .. package.path
local B = require "benchlib"
local parallelize = require "parallelize"
local servers = require "spec.servers"
local support = require "spec.support"

local DELAY = B.env_number("PZ_BENCH_DELAY_MS", 20)
local MS_CALLS = math.floor(B.env_number("PZ_BENCH_MS_CALLS", 4000))
local TINY_N = math.floor(B.env_number("PZ_BENCH_TINY_N", 100000))
local WORKERS = 4

local ok, why = servers.can_run("netns")
if not ok then
  B.note("remote benchmarks skipped: %s", why)
  return
end

local n = assert(servers.netns())
local function finish(err)
  n:stop()
  if err then error(err, 0) end
end

local launcher = parallelize.ssh { n.destination, options = n.options, command = support.pzlua() }

local function sleep_ms(x)
  parallelize.sleep(0.001)
  return x
end

local function double(x) return x * 2 end

-- Calls per second of `calls` calls of f over a new pool of WORKERS
-- (options as given), timed from the first call to the last result; and
-- how long the workers took to start.
local function rate(f, calls, options)
  local t0 = B.now()
  return B.with_pool(parallelize.rep(f, WORKERS), options, nil, function(p)
    local _ = p.executors
    assert(#p.init_errors == 0, p.init_errors[1] and p.init_errors[1].message)
    local started = B.now() - t0
    t0 = B.now()
    for i = 1, calls do p(i) end
    B.wait(p, 600, "remote bench")
    assert(#p.results == calls, "results missing")
    return calls / (B.now() - t0), started
  end)
end

local rows = {}
local function row(label, ours, anchor, ratio)
  rows[#rows + 1] = { label, ours, anchor, ratio }
end

local run_ok, err = pcall(function()
  B.note("load average before: %s", (support.read("/proc/loadavg") or "?"):match("^(%S+ %S+ %S+)"))
  -- Undelayed first: the anchors of the tiny calls and of the start-up.
  local tiny_fast, start_fast = rate(double, TINY_N, { launcher = launcher })
  B.emit("tiny_nodelay_calls_per_s", tiny_fast)
  B.emit("start_nodelay_s", start_fast)
  local tiny_local = rate(double, TINY_N, {})
  B.emit("tiny_local_calls_per_s", tiny_local)
  local ms_local = rate(sleep_ms, MS_CALLS, {})
  B.emit("ms_local_calls_per_s", ms_local)

  local method = n:delay(DELAY)
  B.note("link delay %d ms by %s", DELAY, method)
  local rtt = B.median { servers.connect_time(n.host, n.port), servers.connect_time(n.host, n.port),
                         servers.connect_time(n.host, n.port) }
  B.emit("link_rtt_ms", rtt * 1e3)

  local ideal = WORKERS * 1000
  local ms_default, start_slow = rate(sleep_ms, MS_CALLS, { launcher = launcher })
  B.emit("ms_calls_per_s", ms_default)
  B.emit("start_delayed_s", start_slow)
  local ms_wide = rate(sleep_ms, MS_CALLS, { launcher = launcher, window = 0.01 })
  B.emit("ms_calls_per_s_window10ms", ms_wide)
  local ms_two = rate(sleep_ms, math.max(100, math.floor(MS_CALLS / 8)), { launcher = launcher, max_inflight = 2 })
  B.emit("ms_calls_per_s_inflight2", ms_two)
  local ms_one = rate(sleep_ms, math.max(100, math.floor(MS_CALLS / 16)), { launcher = launcher, max_inflight = 1 })
  B.emit("ms_calls_per_s_inflight1", ms_one)
  local tiny_slow = rate(double, TINY_N, { launcher = launcher })
  B.emit("tiny_delayed_calls_per_s", tiny_slow)

  local ms = function(v) return ("%.0f calls/s"):format(v) end
  local k = function(v) return ("%.1f k calls/s"):format(v / 1e3) end
  row(("1 ms calls, %d workers, %d ms link"):format(WORKERS, DELAY), ms(ms_default),
      "ideal " .. ms(ideal), ms_default / ideal)
  row("  same", ms(ms_default), "local pool " .. ms(ms_local), ms_default / ms_local)
  row("  same, window = 0.01 (default 0.002)", ms(ms_wide), "ideal " .. ms(ideal), ms_wide / ideal)
  row("  same, max_inflight = 2 (a local depth)", ms(ms_two), "ideal " .. ms(ideal), ms_two / ideal)
  row("  same, max_inflight = 1", ms(ms_one), "ideal " .. ms(ideal), ms_one / ideal)
  row("  defaults vs max_inflight = 2", ms(ms_default), ms(ms_two), ms_default / ms_two)
  row(("tiny calls, %d ms link"):format(DELAY), k(tiny_slow), "no delay " .. k(tiny_fast), tiny_slow / tiny_fast)
  row("tiny calls, link without delay", k(tiny_fast), "local pool " .. k(tiny_local), tiny_fast / tiny_local)
  row(("%d workers started, %d ms link"):format(WORKERS, DELAY), ("%.2f s"):format(start_slow),
      ("no delay %.2f s"):format(start_fast), start_slow / start_fast)
end)
finish(not run_ok and err or nil)

print()
local widths = { 0, 0, 0 }
for _, r in ipairs(rows) do
  for i = 1, 3 do widths[i] = math.max(widths[i], #r[i]) end
end
local fmt = ("%%-%ds  %%-%ds  %%-%ds  %%s"):format(widths[1], widths[2], widths[3])
print(fmt:format("figure", "parallelize", "anchor", "ratio"))
for _, r in ipairs(rows) do print(fmt:format(r[1], r[2], r[3], ("%.3fx"):format(r[4]))) end
