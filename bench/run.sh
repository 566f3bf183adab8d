#!/bin/sh
# run.sh - the benchmarks of issues 5, 12, 14 and 15, and their anchors, in one run.
# `make bench` runs it from the top of the tree after building:
#
#     sh bench/run.sh
#
# Each benchmark is a script of its own, runnable alone, that prints
# key=value lines (lines starting with # are comments):
#
#   bench/throughput.lua   tiny calls per second, 2 workers
#   bench/latency.lua      round trip p(x); p:wait() on an idle pool
#   bench/balance.lua      200 sleeps of 1..50 ms over 8 workers vs ideal
#   bench/startup.lua      250 workers ready; private memory per idle worker
#   bench/memory.lua       parent bytes per pending call (1,000,000 queued)
#   bench/codec_bench.lua  the codec (when present; its output is shown)
#   bench/stream_rss.lua   issue 12: 10,000,000 lines through p:stream with
#                          keep_results = false, the parent's RSS sampled
#                          every 1,000,000 lines; lines per second; with
#                          the stream's default window, then (a
#                          diagnostic) with max_pending = PZ_BENCH_STREAM_WIDE
#   bench/py_anchor.py     Python anchors: Pool.imap_unordered (chunksize=1)
#                          and Pool.map with the same n and workers; a pipe
#                          ping-pong with os.pipe + os.fork
#   bench/pingpong.c       a raw pipe ping-pong in C, compiled here with cc:
#                          placed by the scheduler, and pinned across two
#                          CPUs; also a 4-hop relay through a middle process
#                          (as many wake-ups as a pool's round trip has)
#   taskset -c 0           latency.lua and the C ping-pong again with every
#                          process on one CPU (a diagnostic)
#
# The workloads of issue 14 run in rounds (bench/rounds.lua): each round
# runs the pool and its anchors once each, one after the other, and each
# ratio is taken within a round; the table shows the median [min-max] over
# the rounds. Each measurement is a process of its own, on a fresh pool:
#
#   bench/workload.lua     the pool: tiny calls (a p(i) loop, p:map,
#                          p:stream from an array and from an iterator,
#                          and parallelize.map in one shot), calls of
#                          100 us of CPU and calls with 1 MiB in and out
#                          (each by a p(i) loop and by p:map); CPU
#                          and context switches per thread and per
#                          process, from /proc
#   bench/py_anchor.py     Python's Pool.map on the same work (map, busy,
#                          bytes), and in one shot beside parallelize.map:
#                          Pool.map and Pool.imap_unordered (chunksize=1)
#                          with the pool's start and stop on the clock
#   bench/socketpair.c     the C limits, compiled here with cc: tiny
#                          messages batched 256 per write through
#                          socketpairs with 2 worker processes, and a pump
#                          of 1 MiB messages in and out
#
# Issue 15, `pzlua --map` against a process per line or per block, in
# rounds too (PZ_BENCH_MAP_ROUNDS), then alone over a long input:
#
#   bench/mapcli.lua       one system on the same JSON records through
#                          bench/map_job.lua: pzlua --map (and with -k),
#                          GNU parallel --pipe (a luajit per 1 MB block),
#                          GNU parallel and xargs -P (a luajit per line;
#                          these two on the first PZ_BENCH_MAP_JOB_LINES
#                          and PZ_BENCH_MAP_XARGS_LINES records: at a few
#                          hundred processes a second, all of them would
#                          take many minutes); ratios of lines per second
#   bench/map_rss.lua      10,000,000 lines piped through pzlua --map
#                          --lines, the command's RSS sampled from
#                          /proc/PID/status every 1,000,000 lines out
#
# Not run here: bench/profile.py runs one of these workloads under perf and
# prints where its time goes, per thread and per call.
#
# All of them run in this one invocation on this machine, then one aligned
# table sums up: each figure, its anchor, the ratio and the target. Timings
# are printed, never asserted; the exit status is 1 only when a benchmark
# failed to run (an error, a wrong count, or a timeout).
#
# Environment:
#   PZLUA             interpreter with the module built in (build/pzlua)
#   PYTHON            Debian's python3 (/usr/bin/python3 when it is there,
#                     else python3 from PATH; make deps-bench installs it)
#   CC                C compiler for the C anchors (cc)
#   PZ_BENCH_RUNS     runs per noisy figure (each script has its default)
#   PZ_BENCH_ROUNDS   rounds of the issue 14 workloads (default 5)
#   PZ_BENCH_TINY_N   tiny calls per measurement (200000)
#   PZ_BENCH_BUSY_N   calls of 100 us per measurement (20000)
#   PZ_BENCH_BYTES_N  calls with 1 MiB in and out per measurement (2000)
#   PZ_BENCH_PY_RUNS  runs of Pool.imap_unordered chunksize=1 (default 3;
#                     each takes ~10 s at 200,000 calls)
#   PZ_BENCH_STREAM_WIDE   the wider window of the diagnostic p:stream
#                     row (max_pending; default 32768, what 2 workers may
#                     hold with the pool's default max_inflight of 16384:
#                     the stream's default window widens to it only after
#                     16 results, and starts at 256 per worker)
#   PZ_BENCH_STREAM_LINES  lines of the long stream (10000000; a multiple
#                     of 1000000, the sampling interval)
#   PZ_BENCH_MAP_LINES      records through pzlua --map and GNU parallel
#                     --pipe (100000)
#   PZ_BENCH_MAP_JOB_LINES  records through GNU parallel, a process per line
#                     (1000)
#   PZ_BENCH_MAP_XARGS_LINES  records through xargs -P, a process per line
#                     (5000)
#   PZ_BENCH_MAP_ROUNDS     rounds of the pzlua --map comparison (3)
#   PZ_BENCH_MAP_RSS_LINES  lines of the long pzlua --map run (10000000; a
#                     multiple of 1000000)
#   PZ_BENCH_TIMEOUT  seconds one benchmark (one measurement, in the
#                     rounds) may take before it is killed (default 300;
#                     the long stream gets three times that)

set -u

cd "$(dirname "$0")/.." || exit 2

PZLUA=${PZLUA:-build/pzlua}
if [ -z "${PYTHON:-}" ]; then
    # Debian's interpreter, not whatever a version manager puts first.
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
CC=${CC:-cc}
PY_RUNS=${PZ_BENCH_PY_RUNS:-3}
TIMEOUT=${PZ_BENCH_TIMEOUT:-300}
ROUNDS=${PZ_BENCH_ROUNDS:-5}
TINY_N=${PZ_BENCH_TINY_N:-200000}
BUSY_N=${PZ_BENCH_BUSY_N:-20000}
BYTES_N=${PZ_BENCH_BYTES_N:-2000}
STREAM_WIDE=${PZ_BENCH_STREAM_WIDE:-32768}
STREAM_LINES=${PZ_BENCH_STREAM_LINES:-10000000}
MAP_LINES=${PZ_BENCH_MAP_LINES:-100000}
MAP_JOB_LINES=${PZ_BENCH_MAP_JOB_LINES:-1000}
MAP_XARGS_LINES=${PZ_BENCH_MAP_XARGS_LINES:-5000}
MAP_ROUNDS=${PZ_BENCH_MAP_ROUNDS:-3}
MAP_RSS_LINES=${PZ_BENCH_MAP_RSS_LINES:-10000000}
MIB=1048576

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pz-bench.XXXXXX") || exit 2
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM HUP

: > "$tmp/all.kv"
failures=""

# bench NAME COMMAND...: runs one benchmark under a timeout, shows its
# output, and files its key=value lines as NAME.key=value.
# bench_for SECONDS NAME COMMAND...: the same with another timeout.
bench() {
    bench_for "$TIMEOUT" "$@"
}
bench_for() {
    limit=$1
    name=$2
    shift 2
    printf '\n=== %s: %s\n' "$name" "$*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" < /dev/null > "$tmp/$name.out" 2> "$tmp/$name.err"
    rc=$?
    cat "$tmp/$name.out"
    if [ -s "$tmp/$name.err" ]; then
        sed 's/^/stderr: /' "$tmp/$name.err"
    fi
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        printf '%s: TIMED OUT after %ss (killed)\n' "$name" "$limit"
        failures="$failures $name(timeout)"
        echo "$name.failed=timeout" >> "$tmp/all.kv"
    elif [ "$rc" -ne 0 ]; then
        printf '%s: FAILED with exit status %s\n' "$name" "$rc"
        failures="$failures $name(exit-$rc)"
        echo "$name.failed=exit $rc" >> "$tmp/all.kv"
    fi
    grep -E '^[A-Za-z0-9_.]+=' "$tmp/$name.out" | sed "s/^/$name./" >> "$tmp/all.kv"
    printf '    (%ss)\n' "$(($(date +%s) - t0))"
}

# value NAME KEY: a figure filed by bench, or nothing.
value() {
    sed -n "s/^$1\\.$2=//p" "$tmp/all.kv" | tail -n 1
}

if [ ! -x "$PZLUA" ]; then
    echo "run.sh: $PZLUA is missing: build it first (make all)" >&2
    exit 2
fi

started=$(date +%s)
printf 'parallelize benchmarks: %s, %s CPUs, %s\n' "$(uname -srm)" \
    "$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo '?')" "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
load_before=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
printf 'load average before: %s\n' "$load_before"

# Each figure is measured right beside its anchor, so that both see the
# same load on the (shared) machine.

# ---- throughput, and Python's Pool with the same n and workers -----------
bench throughput "$PZLUA" bench/throughput.lua
n=$(value throughput n)
workers=$(value throughput workers)
have_python=0
if command -v "$PYTHON" > /dev/null 2>&1; then
    have_python=1
    bench py_throughput "$PYTHON" bench/py_anchor.py throughput "${n:-200000}" "${workers:-2}" "$PY_RUNS"
else
    printf '\n=== Python anchors: %s not found, skipped\n' "$PYTHON"
fi

# ---- latency, and pipe ping-pongs with the same number of round trips ----
bench latency "$PZLUA" bench/latency.lua
trips=$(value latency trips)
have_pingpong=0
if command -v "$CC" > /dev/null 2>&1 &&
        "$CC" -std=c11 -O2 -Wall -Wextra -o "$tmp/pingpong" bench/pingpong.c 2> "$tmp/cc.err"; then
    have_pingpong=1
    bench c_pingpong "$tmp/pingpong" "${trips:-3000}" 3 2
    bench c_pingpong_cross "$tmp/pingpong" "${trips:-3000}" 3 2 1
    bench c_relay "$tmp/pingpong" "${trips:-3000}" 3 4
else
    printf '\n=== C ping-pong anchor: %s could not build bench/pingpong.c, skipped\n' "$CC"
    [ -s "$tmp/cc.err" ] && cat "$tmp/cc.err"
fi
if [ "$have_python" -eq 1 ]; then
    bench py_pingpong "$PYTHON" bench/py_anchor.py pingpong "${trips:-3000}" 3
fi
# Reported beside it: the same round trip without polling (spin = 0), and
# with a 2 ms pause before each trip, so that every process involved is
# asleep when the call comes (the ping-pong pauses as long).
bench latency_nospin env PZ_BENCH_SPIN=0 "$PZLUA" bench/latency.lua
bench latency_paused env PZ_BENCH_PAUSE=0.002 PZ_BENCH_TRIPS=1000 "$PZLUA" bench/latency.lua
if [ "$have_pingpong" -eq 1 ]; then
    bench c_pingpong_paused "$tmp/pingpong" 1000 3 2 0 2000
fi

# A diagnostic: latency again with every process on one CPU. A wake-up on
# the same CPU is a plain context switch, while one on the other, idle, CPU
# of a virtual machine may cost tens of microseconds; this separates the two.
if command -v taskset > /dev/null 2>&1; then
    bench latency_cpu0 taskset -c 0 "$PZLUA" bench/latency.lua
    if [ "$have_pingpong" -eq 1 ]; then
        bench c_pingpong_cpu0 taskset -c 0 "$tmp/pingpong" "${trips:-3000}" 3 2
    fi
fi

# ---- load balance, start-up, memory, codec -------------------------------
bench balance "$PZLUA" bench/balance.lua
bench startup "$PZLUA" bench/startup.lua
bench memory "$PZLUA" bench/memory.lua
codec_present=0
if [ -f bench/codec_bench.lua ]; then
    codec_present=1
    bench codec "$PZLUA" bench/codec_bench.lua
fi

# ---- issue 14: the workloads, in rounds beside their anchors -------------
# q WORD: WORD quoted for sh -c (bench/rounds.lua runs each command so).
q() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}
have_socketpair=0
if command -v "$CC" > /dev/null 2>&1 &&
        "$CC" -std=c11 -O2 -Wall -Wextra -o "$tmp/socketpair" bench/socketpair.c 2> "$tmp/cc_sp.err"; then
    have_socketpair=1
else
    printf '\n=== C socketpair limits: %s could not build bench/socketpair.c, skipped\n' "$CC"
    [ -s "$tmp/cc_sp.err" ] && cat "$tmp/cc_sp.err"
fi
pz="$(q "$PZLUA") bench/workload.lua"
py="$(q "$PYTHON") bench/py_anchor.py"
sp=$(q "$tmp/socketpair")
# rounds GROUP ARGS...: bench/rounds.lua over ARGS (systems and ratios),
# each command under the timeout of one benchmark, the whole group under a
# few times that.
rounds() {
    group=$1
    shift
    bench_for $((TIMEOUT * 3)) "$group" env PZ_BENCH_CMD_TIMEOUT="$TIMEOUT" \
        "$PZLUA" bench/rounds.lua "$ROUNDS" "$@"
}

# Tiny calls, 2 workers: the pool's ways against Pool.map with automatic
# chunks and the C limit (which runs ten times as many calls, so that its
# clock is not dominated by its first milliseconds); and (issue 12) p:map
# and p:stream against the p(i) loop, the stream from an array and from an
# iterator with its default window, and from an array with a wide one (a
# diagnostic: what the stream costs apart from its window).
set -- "pz_loop=$pz tiny $TINY_N 2" "pz_map=$pz map $TINY_N 2" \
    "pz_stream=$pz stream $TINY_N 2" "pz_stream_fn=$pz stream_fn $TINY_N 2" \
    "pz_stream_wide=$pz stream $TINY_N 2 $STREAM_WIDE"
[ "$have_python" -eq 1 ] && set -- "$@" "py_map=$py map $TINY_N 2"
[ "$have_socketpair" -eq 1 ] && set -- "$@" "c_batch=$sp tiny $((TINY_N * 10)) 2 256"
rounds tiny2 "$@" \
    loop_vs_py=pz_loop.calls_per_s/py_map.calls_per_s loop_vs_c=pz_loop.calls_per_s/c_batch.calls_per_s \
    map_vs_py=pz_map.calls_per_s/py_map.calls_per_s map_vs_c=pz_map.calls_per_s/c_batch.calls_per_s \
    map_vs_loop=pz_map.calls_per_s/pz_loop.calls_per_s \
    stream_vs_loop=pz_stream.calls_per_s/pz_loop.calls_per_s \
    stream_fn_vs_loop=pz_stream_fn.calls_per_s/pz_loop.calls_per_s \
    stream_wide_vs_loop=pz_stream_wide.calls_per_s/pz_loop.calls_per_s

# parallelize.map in one shot (issue 12), its pool's start and stop on the
# clock, against Python's Pool.map (automatic chunks) and
# Pool.imap_unordered (chunksize=1) written the same way.
set -- "pz=$pz pzmap $TINY_N 2"
[ "$have_python" -eq 1 ] && set -- "$@" "py_map=$py oneshot map $TINY_N 2" \
    "py_imap=$py oneshot imap_unordered $TINY_N 2"
rounds oneshot "$@" \
    pz_vs_py_map=pz.calls_per_s/py_map.calls_per_s pz_vs_py_imap=pz.calls_per_s/py_imap.calls_per_s

# The same with 256 workers, against Pool.map with 256 processes.
set -- "pz_loop=$pz tiny $TINY_N 256" "pz_map=$pz map $TINY_N 256"
[ "$have_python" -eq 1 ] && set -- "$@" "py_map=$py map $TINY_N 256"
rounds tiny256 "$@" \
    loop_vs_py=pz_loop.calls_per_s/py_map.calls_per_s map_vs_py=pz_map.calls_per_s/py_map.calls_per_s

# Calls of 100 us of CPU, 2 workers: each system against its own ideal,
# then against each other.
set -- "pz=$pz busy $BUSY_N 2 100" "pz_map=$pz busy_map $BUSY_N 2 100"
[ "$have_python" -eq 1 ] && set -- "$@" "py=$py busy $BUSY_N 2 100"
rounds busy "$@" \
    pz_vs_py=pz.vs_ideal/py.vs_ideal seconds_vs_py=pz.seconds/py.seconds \
    switches_vs_py=pz.switches_per_call/py.switches_per_call \
    map_vs_py=pz_map.vs_ideal/py.vs_ideal map_switches_vs_py=pz_map.switches_per_call/py.switches_per_call

# 1 MiB strings in and out, 2 workers.
set -- "pz=$pz bytes $BYTES_N 2 $MIB" "pz_map=$pz bytes_map $BYTES_N 2 $MIB"
[ "$have_python" -eq 1 ] && set -- "$@" "py=$py bytes $BYTES_N 2 $MIB"
[ "$have_socketpair" -eq 1 ] && set -- "$@" "c_pump=$sp pump $BYTES_N $MIB 2"
rounds bytes "$@" pz_vs_c=pz.gb_per_s/c_pump.gb_per_s pz_vs_py=pz.gb_per_s/py.gb_per_s \
    map_vs_c=pz_map.gb_per_s/c_pump.gb_per_s

# ---- issue 12: a long stream in constant memory --------------------------
# The default window, then (a diagnostic) the wide one of the tiny rows:
# what a larger default would cost in memory and gain in speed.
bench_for $((TIMEOUT * 3)) stream10m "$PZLUA" bench/stream_rss.lua "$STREAM_LINES" 1000000
bench_for $((TIMEOUT * 3)) stream10m_wide "$PZLUA" bench/stream_rss.lua "$STREAM_LINES" 1000000 "$STREAM_WIDE"

# ---- issue 15: pzlua --map against GNU parallel and xargs -----------------
# The same records through bench/map_job.lua by each system, 2 processes at
# a time, in rounds; then a long run's memory.
mc="$(q "$PZLUA") bench/mapcli.lua"
bench_for $((TIMEOUT * 3)) mapcli env PZ_BENCH_CMD_TIMEOUT="$TIMEOUT" "$PZLUA" bench/rounds.lua "$MAP_ROUNDS" \
    "pz=$mc pzmap $MAP_LINES 2" "pz_k=$mc pzmap_k $MAP_LINES 2" "gnu_pipe=$mc gnu_pipe $MAP_LINES 2" \
    "gnu_job=$mc gnu_job $MAP_JOB_LINES 2" "xargs=$mc xargs $MAP_XARGS_LINES 2" \
    pz_vs_gnu_pipe=pz.lines_per_s/gnu_pipe.lines_per_s pz_vs_gnu_job=pz.lines_per_s/gnu_job.lines_per_s \
    pz_vs_xargs=pz.lines_per_s/xargs.lines_per_s k_vs_pz=pz_k.lines_per_s/pz.lines_per_s
bench_for $((TIMEOUT * 3)) map10m "$PZLUA" bench/map_rss.lua "$MAP_RSS_LINES" 1000000

load_after=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
printf '\nload average after: %s\n' "$load_after"

# ---- the table -----------------------------------------------------------
# Rows: figure, parallelize, anchor, ratio, target, verdict. The ratio is
# figure / anchor where there is an anchor, else figure / the target's limit.
printf '\n=== summary (%ss in all; load average before: %s; after: %s)\n\n' \
    "$(($(date +%s) - started))" "$load_before" "$load_after"
awk -F '=' -v codec_present="$codec_present" -v stream_wide="$STREAM_WIDE" '
    {
        key = $1
        val = substr($0, length($1) + 2)
        v[key] = val
    }
    function has(k) { return (k in v) && v[k] != "" }
    function rate(x) {
        if (x >= 1e6) return sprintf("%.2f M/s", x / 1e6)
        if (x >= 1e3) return sprintf("%.1f k/s", x / 1e3)
        return sprintf("%.0f /s", x)
    }
    function us(x) { return sprintf("%.1f us", x) }
    function ratio(a, b) { return (b > 0) ? sprintf("%.2fx", a / b) : "n/a" }
    function row(f, p, a, r, t, s) {
        nrows++
        c[nrows, 1] = f; c[nrows, 2] = p; c[nrows, 3] = a
        c[nrows, 4] = r; c[nrows, 5] = t; c[nrows, 6] = s
    }
    function failed(name) {
        return has(name ".failed") ? "FAILED (" v[name ".failed"] ")" : "no figure"
    }
    function verdict(ok) { return ok ? "met" : "MISSED" }
    # The rows of a long run sampled for memory (bench/stream_rss.lua,
    # bench/map_rss.lua), its keys under k: the growth, the largest growth,
    # every sample.
    function rss_rows(k, label,    first, last, growth) {
        first = v[k ".rss_first_mib"] + 0
        last = v[k ".rss_last_mib"] + 0
        growth = v[k ".rss_growth_mib"] + 0
        row(label, sprintf("%+.2f MiB (%.2f -> %.2f)", growth, first, last),
            sprintf("RSS at %.0f M lines %.2f MiB", v[k ".sample_every"] / 1e6, first),
            ratio(last, first), "< 4 MiB (flat)", verdict(growth < 4))
        row("  same, max growth over the samples", sprintf("%+.2f MiB", v[k ".rss_max_growth_mib"]),
            "-", "-", "< 4 MiB", verdict(v[k ".rss_max_growth_mib"] + 0 < 4))
        row("  same, RSS at each 1 M lines (MiB)", v[k ".rss_mib_at"], "-", "-", "(reported)", "-")
    }

    # The rounds of issue 14 file each figure as "MEDIAN MIN MAX (ALL)".
    function med(k) { return v[k] + 0 }
    # "MEDIAN UNIT [MIN-MAX]" of figure k, divided by scale, in format f.
    function spread(k, scale, f, unit,    a, n) {
        n = split(v[k], a, " ")
        if (n < 3) return sprintf(f "%s", a[1] / scale, unit)
        return sprintf(f "%s [" f "-" f "]", a[1] / scale, unit, a[2] / scale, a[3] / scale)
    }
    # The state of system S of group G when it has no figure K.
    function missing(g, s) {
        if (has(g "." s ".failed")) return "FAILED (" v[g "." s ".failed"] ")"
        if (has(g "." s ".skipped")) return "n/a (" v[g "." s ".skipped"] ")"
        if (has(g ".failed")) return "FAILED (" v[g ".failed"] ")"
        return "not run"
    }
    # A row of group G: ours = system S figure K (scale, printf format F,
    # UNIT), anchor = label AL and system AS figure AK (same scale, format
    # and unit; AS empty for none), ratio = ratio key R of the group, its
    # target text T, and the verdict: median ratio (or, without R, our
    # median) compared with THR by OP (">=", "<=", "<", ">"; "": none).
    function rrow(label, g, s, k, scale, f, unit, al, as, ak, r, t, op, thr,    ours, anc, rat, x, ok) {
        ours = has(g "." s "." k) ? spread(g "." s "." k, scale, f, unit) : missing(g, s)
        if (as == "") anc = al
        else anc = al " " (has(g "." as "." ak) ? spread(g "." as "." ak, scale, f, unit) : missing(g, as))
        rat = (r != "" && has(g "." r) && v[g "." r] != "n/a") ? spread(g "." r, 1, "%.2f", "x") : (r == "" ? "-" : "n/a")
        x = ""
        if (r != "" && rat != "n/a") x = med(g "." r)
        else if (r == "" && has(g "." s "." k)) x = med(g "." s "." k) / scale
        if (op == "" || x == "") ok = (op == "" ? "-" : (ours ~ /^FAILED/ ? "FAILED" : "-"))
        else if (op == ">=") ok = verdict(x >= thr)
        else if (op == "<=") ok = verdict(x <= thr)
        else if (op == "<") ok = verdict(x < thr)
        else ok = verdict(x > thr)
        row(label, ours, anc, rat, t, ok)
    }
    END {
        row("figure", "parallelize", "anchor", "ratio", "target", "verdict")

        # Throughput.
        if (has("throughput.calls_per_s")) {
            ours = v["throughput.calls_per_s"] + 0
            label = "tiny calls/s (" v["throughput.workers"] " workers, n=" v["throughput.n"] ")"
            if (has("py_throughput.imap_unordered_cs1_calls_per_s")) {
                py = v["py_throughput.imap_unordered_cs1_calls_per_s"] + 0
                row(label, rate(ours), "py imap_unordered cs=1 " rate(py), ratio(ours, py),
                    ">= 10x and >= 1 M/s", verdict(ours >= 1e6 && ours >= 10 * py))
            } else {
                row(label, rate(ours), "py imap_unordered: " failed("py_throughput"), "n/a",
                    ">= 10x and >= 1 M/s", verdict(ours >= 1e6) " (1 M/s part)")
            }
        } else {
            row("tiny calls/s", failed("throughput"), "", "", ">= 10x and >= 1 M/s", "FAILED")
        }

        # Issue 14: tiny calls, 2 and 256 workers.
        n = has("tiny2.pz_loop.n") ? med("tiny2.pz_loop.n") : ""
        rrow("tiny calls x*2 (n=" n ", 2 workers), p(i) loop", "tiny2", "pz_loop", "calls_per_s", 1e6, "%.2f", " M/s",
            "Pool.map auto chunks", "py_map", "calls_per_s", "loop_vs_py", ">= 2x", ">=", 2)
        rrow("  same", "tiny2", "pz_loop", "calls_per_s", 1e6, "%.2f", " M/s",
            "C socketpair 256/write", "c_batch", "calls_per_s", "loop_vs_c", ">= 0.5x", ">=", 0.5)
        rrow("tiny calls x*2 (2 workers), p:map(list)", "tiny2", "pz_map", "calls_per_s", 1e6, "%.2f", " M/s",
            "Pool.map auto chunks", "py_map", "calls_per_s", "map_vs_py", ">= 2x", ">=", 2)
        rrow("  same", "tiny2", "pz_map", "calls_per_s", 1e6, "%.2f", " M/s",
            "C socketpair 256/write", "c_batch", "calls_per_s", "map_vs_c", ">= 0.5x", ">=", 0.5)
        rrow("tiny calls x*2 (256 workers), p(i) loop", "tiny256", "pz_loop", "calls_per_s", 1e6, "%.2f", " M/s",
            "Pool.map 256 procs", "py_map", "calls_per_s", "loop_vs_py", "> 1x", ">", 1)
        rrow("tiny calls x*2 (256 workers), p:map(list)", "tiny256", "pz_map", "calls_per_s", 1e6, "%.2f", " M/s",
            "Pool.map 256 procs", "py_map", "calls_per_s", "map_vs_py", "> 1x", ">", 1)

        # Issue 12: p:map and p:stream against the p(i) loop, same rounds.
        n = has("tiny2.pz_loop.n") ? med("tiny2.pz_loop.n") : ""
        rrow("p:map(list), tiny calls x*2 (n=" n ", 2 workers)", "tiny2", "pz_map", "calls_per_s", 1e6, "%.2f", " M/s",
            "p(i) loop + wait", "pz_loop", "calls_per_s", "map_vs_loop", ">= 1x", ">=", 1)
        rrow("p:stream(array), same", "tiny2", "pz_stream", "calls_per_s", 1e6, "%.3f", " M/s",
            "p(i) loop + wait", "pz_loop", "calls_per_s", "stream_vs_loop", ">= 0.67x (within 1.5x)", ">=", 1 / 1.5)
        rrow("p:stream(iterator), same", "tiny2", "pz_stream_fn", "calls_per_s", 1e6, "%.3f", " M/s",
            "p(i) loop + wait", "pz_loop", "calls_per_s", "stream_fn_vs_loop", ">= 0.67x (within 1.5x)", ">=", 1 / 1.5)
        rrow("p:stream(array), max_pending=" stream_wide ", same", "tiny2", "pz_stream_wide", "calls_per_s", 1e6, "%.3f", " M/s",
            "p(i) loop + wait", "pz_loop", "calls_per_s", "stream_wide_vs_loop", "(diagnostic)", "", 0)

        # Issue 12: parallelize.map in one shot against the pools of Python.
        n = has("oneshot.pz.n") ? med("oneshot.pz.n") : ""
        rrow("parallelize.map one shot (n=" n ", 2 workers)", "oneshot", "pz", "calls_per_s", 1e6, "%.2f", " M/s",
            "Pool.map auto chunks, one shot", "py_map", "calls_per_s", "pz_vs_py_map", "(reported)", "", 0)
        rrow("  same", "oneshot", "pz", "calls_per_s", 1e6, "%.2f", " M/s",
            "Pool.imap_unordered cs=1, one shot", "py_imap", "calls_per_s", "pz_vs_py_imap", "(reported)", "", 0)

        # Issue 12: the long stream.
        if (has("stream10m.rss_growth_mib")) {
            label = sprintf("%.0f M-line p:stream (" v["stream10m.source"] ", keep_results=false)", v["stream10m.lines"] / 1e6)
            rss_rows("stream10m", label ", parent RSS growth")
            ls = v["stream10m.lines_per_s"] + 0
            if (has("tiny2.pz_stream.calls_per_s"))
                row("  same, lines/s", rate(ls), "p:stream(array) tiny calls " rate(med("tiny2.pz_stream.calls_per_s")),
                    ratio(ls, med("tiny2.pz_stream.calls_per_s")), "(reported)", "-")
            else
                row("  same, lines/s", rate(ls), "-", "-", "(reported)", "-")
        } else {
            row("10 M-line p:stream, parent RSS growth", failed("stream10m"), "", "", "< 4 MiB (flat)", "FAILED")
        }
        if (has("stream10m_wide.rss_growth_mib")) {
            w = "max_pending=" v["stream10m_wide.max_pending"]
            row("  same, " w ", parent RSS growth", sprintf("%+.2f MiB (%.2f -> %.2f)", v["stream10m_wide.rss_growth_mib"],
                v["stream10m_wide.rss_first_mib"], v["stream10m_wide.rss_last_mib"]), "-", "-", "(diagnostic)", "-")
            ls = v["stream10m_wide.lines_per_s"] + 0
            if (has("stream10m.lines_per_s"))
                row("  same, " w ", lines/s", rate(ls), "default window " rate(v["stream10m.lines_per_s"] + 0),
                    ratio(ls, v["stream10m.lines_per_s"]), "(diagnostic)", "-")
            else
                row("  same, " w ", lines/s", rate(ls), "-", "-", "(diagnostic)", "-")
        } else {
            row("  same, wide window", failed("stream10m_wide"), "", "", "(diagnostic)", "-")
        }

        # Issue 15: pzlua --map against a process per block and per line.
        n = has("mapcli.pz.lines") ? med("mapcli.pz.lines") : ""
        jl = has("mapcli.gnu_job.lines") ? med("mapcli.gnu_job.lines") : "?"
        xl = has("mapcli.xargs.lines") ? med("mapcli.xargs.lines") : "?"
        rrow("pzlua --map, " n " JSON lines (2 workers)", "mapcli", "pz", "lines_per_s", 1, "%.0f", " lines/s",
            "GNU parallel --pipe, a luajit per 1 MB block", "gnu_pipe", "lines_per_s", "pz_vs_gnu_pipe", "(reported)", "", 0)
        rrow("  same", "mapcli", "pz", "lines_per_s", 1, "%.0f", " lines/s",
            "GNU parallel, a luajit per line (" jl " lines)", "gnu_job", "lines_per_s", "pz_vs_gnu_job", ">= 100x", ">=", 100)
        rrow("  same", "mapcli", "pz", "lines_per_s", 1, "%.0f", " lines/s",
            "xargs -P 2, a luajit per line (" xl " lines)", "xargs", "lines_per_s", "pz_vs_xargs", "(reported)", "", 0)
        rrow("  same with -k (input order)", "mapcli", "pz_k", "lines_per_s", 1, "%.0f", " lines/s",
            "without -k", "pz", "lines_per_s", "k_vs_pz", "(reported)", "", 0)
        if (has("map10m.rss_growth_mib")) {
            label = sprintf("%.0f M lines through pzlua --map --lines, its RSS growth", v["map10m.lines"] / 1e6)
            rss_rows("map10m", label)
            ls = v["map10m.lines_per_s"] + 0
            if (has("stream10m.lines_per_s"))
                row("  same, lines/s", rate(ls), "10 M-line p:stream " rate(v["stream10m.lines_per_s"] + 0),
                    ratio(ls, v["stream10m.lines_per_s"]), "(reported)", "-")
            else
                row("  same, lines/s", rate(ls), "-", "-", "(reported)", "-")
        } else {
            row("10 M lines through pzlua --map, its RSS growth", failed("map10m"), "", "", "< 4 MiB (flat)", "FAILED")
        }

        # Issue 14: calls of 100 us of CPU.
        n = has("busy.pz.n") ? med("busy.pz.n") : ""
        rrow("calls of 100 us CPU (n=" n ", 2 workers), wall", "busy", "pz", "seconds", 1, "%.3f", " s",
            "ideal (CPU of the calls / 2)", "pz", "ideal_s", "pz.vs_ideal", "<= 1.05x ideal", "<=", 1.05)
        rrow("  same, x of its ideal", "busy", "pz", "vs_ideal", 1, "%.3f", "x",
            "Pool.map, x of its ideal", "py", "vs_ideal", "pz_vs_py", "<= 1x Pool.map", "<=", 1)
        rrow("  same, context switches per call", "busy", "pz", "switches_per_call", 1, "%.3f", "",
            "Pool.map", "py", "switches_per_call", "switches_vs_py", "(reported)", "", 0)
        rrow("  same, I/O thread wake-ups per call", "busy", "pz", "io_wakeups_per_call", 1, "%.3f", "",
            "-", "", "", "", "< 0.1 (not per result)", "<", 0.1)
        rrow("  same through p:map(list), x of its ideal", "busy", "pz_map", "vs_ideal", 1, "%.3f", "x",
            "Pool.map, x of its ideal", "py", "vs_ideal", "map_vs_py", "<= 1.05x ideal, <= 1x Pool.map", "<=", 1)
        rrow("  same through p:map, context switches per call", "busy", "pz_map", "switches_per_call", 1, "%.3f", "",
            "Pool.map", "py", "switches_per_call", "map_switches_vs_py", "(reported)", "", 0)
        rrow("  same through p:map, I/O thread wake-ups per call", "busy", "pz_map", "io_wakeups_per_call", 1, "%.3f", "",
            "-", "", "", "", "< 0.1 (not per result)", "<", 0.1)

        # Issue 14: 1 MiB strings in and out.
        n = has("bytes.pz.n") ? med("bytes.pz.n") : ""
        rrow("1 MiB in and out (n=" n ", 2 workers)", "bytes", "pz", "gb_per_s", 1, "%.2f", " GB/s",
            "C socketpair pump", "c_pump", "gb_per_s", "pz_vs_c", ">= 0.8x", ">=", 0.8)
        rrow("  same", "bytes", "pz", "gb_per_s", 1, "%.2f", " GB/s",
            "Pool.map chunksize=1", "py", "gb_per_s", "pz_vs_py", "(reported)", "", 0)
        rrow("  same, parent peak RSS above start", "bytes", "pz", "peak_above_start_mib", 1, "%.0f", " MiB",
            "Pool.map, above its results", "py", "peak_above_held_mib", "", "< 300 MiB", "<", 300)
        rrow("  same through p:map(list)", "bytes", "pz_map", "gb_per_s", 1, "%.2f", " GB/s",
            "C socketpair pump", "c_pump", "gb_per_s", "map_vs_c", ">= 0.8x", ">=", 0.8)
        rrow("  same through p:map, parent peak RSS above start", "bytes", "pz_map", "peak_above_start_mib", 1, "%.0f", " MiB",
            "-", "", "", "", "< 300 MiB", "<", 300)

        # Latency.
        if (has("latency.p50_us")) {
            label = "latency round trip, idle pool,"
            if (has("c_pingpong.p50_us")) {
                row(label " p50", us(v["latency.p50_us"]), "C pipe ping-pong p50 " us(v["c_pingpong.p50_us"]),
                    ratio(v["latency.p50_us"], v["c_pingpong.p50_us"]), "p50 < 100 us",
                    verdict(v["latency.p50_us"] + 0 < 100))
                row(label " p10", us(v["latency.p10_us"]), "C pipe ping-pong p10 " us(v["c_pingpong.p10_us"]),
                    ratio(v["latency.p10_us"], v["c_pingpong.p10_us"]), "(reported)", "-")
                row(label " p90", us(v["latency.p90_us"]), "C pipe ping-pong p90 " us(v["c_pingpong.p90_us"]),
                    ratio(v["latency.p90_us"], v["c_pingpong.p90_us"]), "(reported)", "-")
            } else {
                row(label " p50", us(v["latency.p50_us"]), "C ping-pong: " failed("c_pingpong"),
                    "n/a", "p50 < 100 us", verdict(v["latency.p50_us"] + 0 < 100))
                row(label " p10", us(v["latency.p10_us"]), "", "", "(reported)", "-")
                row(label " p90", us(v["latency.p90_us"]), "", "", "(reported)", "-")
            }
            if (has("c_pingpong_cross.p50_us"))
                row(label " p50", us(v["latency.p50_us"]), "C ping-pong across 2 CPUs p50 " us(v["c_pingpong_cross.p50_us"]),
                    ratio(v["latency.p50_us"], v["c_pingpong_cross.p50_us"]), "(reported)", "-")
            if (has("c_relay.p50_us"))
                row(label " p50", us(v["latency.p50_us"]), "C 4-hop pipe relay p50 " us(v["c_relay.p50_us"]),
                    ratio(v["latency.p50_us"], v["c_relay.p50_us"]), "(reported)", "-")
            if (has("py_pingpong.p50_us"))
                row(label " p50", us(v["latency.p50_us"]), "py pipe ping-pong p50 " us(v["py_pingpong.p50_us"]),
                    ratio(v["latency.p50_us"], v["py_pingpong.p50_us"]), "(reported)", "-")
            if (has("latency_nospin.p50_us"))
                row("latency round trip, spin = 0, p50", us(v["latency_nospin.p50_us"]),
                    "C pipe ping-pong p50 " us(v["c_pingpong.p50_us"]),
                    ratio(v["latency_nospin.p50_us"], v["c_pingpong.p50_us"]), "(reported)", "-")
            if (has("latency_paused.p50_us"))
                row("latency round trip, 2 ms pause before each, p50", us(v["latency_paused.p50_us"]),
                    "C ping-pong, same pause, p50 " us(v["c_pingpong_paused.p50_us"]),
                    ratio(v["latency_paused.p50_us"], v["c_pingpong_paused.p50_us"]), "(reported)", "-")
            if (has("latency_cpu0.p50_us")) {
                if (has("c_pingpong_cpu0.p50_us"))
                    row("latency round trip, all on CPU 0, p50", us(v["latency_cpu0.p50_us"]),
                        "C ping-pong on CPU 0 p50 " us(v["c_pingpong_cpu0.p50_us"]),
                        ratio(v["latency_cpu0.p50_us"], v["c_pingpong_cpu0.p50_us"]), "(diagnostic)", "-")
                else
                    row("latency round trip, all on CPU 0, p50", us(v["latency_cpu0.p50_us"]), "-", "-", "(diagnostic)", "-")
            }
        } else {
            row("latency p50", failed("latency"), "", "", "p50 < 100 us", "FAILED")
        }

        # Load balance.
        if (has("balance.ratio")) {
            row("balance " v["balance.calls"] " sleeps 1-50 ms, " v["balance.workers"] " workers",
                sprintf("%.3f s", v["balance.elapsed_s"]), sprintf("ideal (work/%d) %.3f s",
                v["balance.workers"], v["balance.ideal_s"]), sprintf("%.3fx", v["balance.ratio"]),
                "<= 1.10x ideal", verdict(v["balance.ratio"] + 0 <= 1.10))
        } else {
            row("balance", failed("balance"), "", "", "<= 1.10x ideal", "FAILED")
        }

        # Start-up and idle worker memory.
        if (has("startup.ready_s")) {
            w = v["startup.workers"]
            row("start-up: " w " workers ready", sprintf("%.3f s", v["startup.ready_s"]), "-",
                ratio(v["startup.ready_s"], 0.5), "< 0.5 s", verdict(v["startup.ready_s"] + 0 < 0.5))
            row("idle worker private mem, mean", sprintf("%.0f KiB", v["startup.worker_private_kib_mean"]),
                "-", ratio(v["startup.worker_private_kib_mean"], 1024), "< 1 MiB",
                verdict(v["startup.worker_private_kib_mean"] + 0 < 1024))
            row("idle worker private mem, max", sprintf("%.0f KiB", v["startup.worker_private_kib_max"]),
                "-", ratio(v["startup.worker_private_kib_max"], 1024), "< 1 MiB",
                verdict(v["startup.worker_private_kib_max"] + 0 < 1024))
        } else {
            row("start-up", failed("startup"), "", "", "< 0.5 s; < 1 MiB/worker", "FAILED")
        }

        # Pending calls.
        if (has("memory.rss_bytes_per_call")) {
            row("parent RSS per pending call", sprintf("%.1f B", v["memory.rss_bytes_per_call"]), "-",
                ratio(v["memory.rss_bytes_per_call"], 100), "< 100 B/call",
                verdict(v["memory.rss_bytes_per_call"] + 0 < 100))
            row("parent Private_Dirty per pending call", sprintf("%.1f B", v["memory.private_dirty_bytes_per_call"]),
                "-", ratio(v["memory.private_dirty_bytes_per_call"], 100), "< 100 B/call",
                verdict(v["memory.private_dirty_bytes_per_call"] + 0 < 100))
        } else {
            row("memory per pending call", failed("memory"), "", "", "< 100 B/call", "FAILED")
        }

        # Codec.
        if (codec_present == 1)
            row("codec (bench/codec_bench.lua)", has("codec.failed") ? failed("codec") : "ran: output above",
                "-", "-", "-", has("codec.failed") ? "FAILED" : "-")
        else
            row("codec (bench/codec_bench.lua)", "not present", "-", "-", "-", "-")

        for (i = 1; i <= nrows; i++)
            for (j = 1; j <= 6; j++)
                if (length(c[i, j]) > wd[j]) wd[j] = length(c[i, j])
        for (i = 1; i <= nrows; i++) {
            line = ""
            for (j = 1; j <= 6; j++) {
                cell = c[i, j]
                if (j < 6) while (length(cell) < wd[j]) cell = cell " "
                line = line (j > 1 ? "   " : "") cell
            }
            print line
        }
        print ""
        print "ratio: parallelize / anchor where there is an anchor (calls/s: higher is better;"
        print "times: lower is better), else parallelize / the target limit (below 1 is within it)."
    }
' "$tmp/all.kv"

if [ -n "$failures" ]; then
    printf '\nbenchmarks that failed to run:%s\n' "$failures"
    exit 1
fi
exit 0
