#!/bin/sh
# run-valgrind.sh - the workloads of spec/valgrind/ under valgrind's
# memcheck. `make valgrind` runs it after the build, from the top of the
# tree:
#
#     sh tools/run-valgrind.sh [WORKLOAD...]
#
# Workloads (all by default): codec, pool, failures, stream, readline and
# launcher (spec/valgrind/workloads.lua, run by build/valgrind/pzlua: its
# Lua states allocate with malloc, so memcheck sees each Lua object; see
# src/lstate.h); seeds (the libFuzzer harnesses of the value and frame
# decoders, built without libFuzzer in build/valgrind/fuzz/, over the seed
# corpora of spec/fuzz/: each input in a heap block of its exact size); and map
# (`pzlua --map` over small inputs, its output compared with the expected
# one). Each checks its results: a wrong one fails like a memory error.
#
# Every process gets a log of its own (valgrind follows fork: the spawner
# and every worker are checked too). The run fails when a workload fails,
# or when any log reports an error memcheck did not suppress: invalid
# reads or writes, uses of uninitialised values, bad frees, syscall
# arguments, and leaks definitely or indirectly lost. tools/valgrind.supp
# holds the suppressions, each with why it is not our code's fault.
#
# It ends with one line: `valgrind: N workloads passed` (exit 0), or
# `valgrind: FAILED: ...` naming the workloads and the logs to read (exit 1).
#
# Environment:
#   VALGRIND            valgrind's command (default valgrind)
#   PZ_VALGRIND_PZLUA   the pzlua to check (default build/valgrind/pzlua)
#   PZ_VALGRIND_TIMEOUT seconds one workload may take (default 600)
#   PZ_VALGRIND_LOGS    where to keep the logs (default: a temporary
#                       directory, removed when everything passed)

set -u

cd "$(dirname "$0")/.." || exit 2

VALGRIND=${VALGRIND:-valgrind}
TIMEOUT=${PZ_VALGRIND_TIMEOUT:-600}
PZLUA=${PZ_VALGRIND_PZLUA:-build/valgrind/pzlua}
case $PZLUA in /*) ;; *) PZLUA=$(pwd)/$PZLUA ;; esac
SUPP=$(pwd)/tools/valgrind.supp
WORKLOADS="codec pool failures stream readline launcher map seeds"

command -v "$VALGRIND" >/dev/null || { echo "valgrind: FAILED: $VALGRIND is not installed (make deps-valgrind)"; exit 1; }
[ -x "$PZLUA" ] || { echo "valgrind: FAILED: $PZLUA is not built (make)"; exit 1; }

if [ -n "${PZ_VALGRIND_LOGS:-}" ]; then
    logs=$PZ_VALGRIND_LOGS
    mkdir -p "$logs" || exit 2
    keep_logs=1
else
    logs=$(mktemp -d "${TMPDIR:-/tmp}/pz-valgrind.XXXXXX") || exit 2
    keep_logs=0
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/pz-valgrind-tmp.XXXXXX") || exit 2
trap 'rm -rf "$tmp"' EXIT
trap 'rm -rf "$tmp"; exit 130' INT
trap 'rm -rf "$tmp"; exit 143' TERM HUP

# --trace-children=yes with the skip list: local workers are forked, never
# exec'd, and valgrind follows fork by itself. The one exec of ours is the
# spawner's for a `launcher` (the launcher workload runs `pzlua --worker`
# that way, which covers the remote side of a worker): following it checks
# that pzlua too. Everything else a workload may exec is a system program
# (a shell, cat), not our code, and is left alone.
# --error-exitcode: the top process's status says so at once; the logs are
# still read, since a worker's status is the pool's business.
# Leaks: definitely and indirectly lost blocks are errors; "possibly lost"
# ones are shown, not counted: a forked worker or spawner ends with _exit
# while its threads still run, and a running thread's stack (glibc's TLS
# block, allocated in pthread_create) is then reported as possibly lost.
#
# vg LOG COMMAND...: COMMAND under memcheck, with a time limit; each
# process's log in LOG, whose %p is its pid.
vg() {
    vg_log=$1
    shift
    timeout -k 10 "$TIMEOUT" "$VALGRIND" --tool=memcheck --error-exitcode=99 \
        --leak-check=full --show-leak-kinds=definite,indirect,possible \
        --errors-for-leak-kinds=definite,indirect --track-origins=yes --num-callers=30 \
        --gen-suppressions=all --suppressions="$SUPP" \
        --trace-children=yes --trace-children-skip='/bin/*,/usr/bin/*,/sbin/*,/usr/sbin/*' \
        --log-file="$vg_log" "$@"
}

# The first line of each error memcheck reports (leaks: the kinds that count).
ERRORS='^==[0-9]+== (Invalid (read|write|free)|Conditional jump|Use of uninitialised|Syscall param|Mismatched free'
ERRORS="$ERRORS|Source and destination overlap|Argument .* of function"
ERRORS="$ERRORS|[0-9,]+ bytes in [0-9,]+ blocks are (definitely|indirectly) lost)"

passed=0
failed=""
require_freed=1
started=$(date +%s)

# run NAME COMMAND...: one workload under valgrind, its processes' logs in
# $logs/NAME.PID.log, its output in $logs/NAME.out.
run() {
    name=$1
    shift
    t0=$(date +%s)
    vg "$logs/$name.%p.log" "$@" >"$logs/$name.out" 2>&1
    status=$?
    check_logs "$name" "$status" "$t0"
}

# field LOG WHAT: what the header line "==PID== WHAT: ..." of LOG says.
field() {
    sed -n "s/^==[0-9]*== $2: //p" "$1" | head -n 1
}

# started_by_exec LOG NAME: whether the process of LOG was started by exec
# (the workload itself, `pzlua --worker` behind a launcher) rather than
# forked from a process of ours: its parent has no log of this workload,
# or ran another command line (a fork keeps its parent's).
started_by_exec() {
    parent=$(field "$1" "Parent PID")
    [ -e "$logs/$2.$parent.log" ] || return 0
    [ "$(field "$1" Command)" != "$(field "$logs/$2.$parent.log" Command)" ]
}

# check_logs NAME STATUS T0: the verdict on one workload.
check_logs() {
    bad=""
    unfreed=""
    for log in "$logs/$1".*.log; do
        [ -e "$log" ] || continue
        # A process started by exec must free everything before it exits:
        # it closes its Lua states, and what our C code allocated is freed
        # by then. (A forked process ends with _exit, holding its parent's
        # heap: see tools/valgrind.supp.)
        if [ "$require_freed" = 1 ] && grep -q "in use at exit:" "$log" &&
            started_by_exec "$log" "$1" && ! grep -q "in use at exit: 0 bytes in 0 blocks" "$log"; then
            unfreed="$unfreed $log"
        fi
        # A process that ended by a signal (a worker the workload killed)
        # writes no summary: its log is read for error headers instead.
        if grep -q "ERROR SUMMARY: [1-9]" "$log" ||
            grep -Eq "$ERRORS" "$log"; then
            bad="$bad $log"
        fi
    done
    secs=$(($(date +%s) - $3))
    if [ "$2" -eq 0 ] && [ -z "$bad" ] && [ -z "$unfreed" ]; then
        passed=$((passed + 1))
        printf 'PASS: %s (%ss)\n' "$1" "$secs"
        return
    fi
    failed="$failed $1"
    if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then
        printf 'FAIL: %s: timed out after %ss\n' "$1" "$TIMEOUT"
    elif [ "$2" -eq 99 ]; then
        printf 'FAIL: %s: memcheck reported errors in the main process\n' "$1"
    elif [ "$2" -ne 0 ]; then
        printf 'FAIL: %s: exit status %s; its output:\n' "$1" "$2"
        tail -n 20 "$logs/$1.out" | sed 's/^/    /'
    fi
    for log in $bad; do
        printf 'FAIL: %s: memcheck errors in %s:\n' "$1" "$log"
        grep -E "$ERRORS|^==[0-9]+== (Command|ERROR SUMMARY)" "$log" | head -n 10 | sed 's/^/    /'
    done
    for log in $unfreed; do
        printf 'FAIL: %s: %s exited with memory still allocated (%s); rerun with\n' \
            "$1" "$log" "$(field "$log" "    in use at exit")"
        printf '    --show-leak-kinds=all to see where it was allocated\n'
    done
}

# The map workload: `pzlua --map` on small inputs, JSON and raw lines, in
# order and not, a line that fails; the output is compared whole.
map_workload() {
    i=1
    : >"$tmp/in"
    while [ $i -le 40 ]; do
        echo "$i" >>"$tmp/in"
        i=$((i + 1))
    done
    echo "not json" >>"$tmp/in"
    seq 2 2 80 >"$tmp/want"
    t0=$(date +%s)
    status=0
    # JSON in and out, in input order: the bad line fails (exit status 1).
    vg "$logs/map.%p.log" "$PZLUA" --map 'function(x) return x * 2 end' -j 2 -k <"$tmp/in" >"$tmp/out" 2>"$logs/map.out"
    s=$?
    if [ $s -ne 1 ] || ! cmp -s "$tmp/want" "$tmp/out"; then
        echo "map (JSON, -k): exit status $s (want 1), output differs: $(diff "$tmp/want" "$tmp/out" | head -n 5)" >>"$logs/map.out"
        status=1
    fi
    # Raw lines, as they finish, sorted before comparing; a module executor.
    vg "$logs/map.%p.log" "$PZLUA" --map string.upper --lines -j 2 <"$tmp/in" 2>>"$logs/map.out" | sort >"$tmp/out"
    tr '[:lower:]' '[:upper:]' <"$tmp/in" | sort >"$tmp/want"
    if ! cmp -s "$tmp/want" "$tmp/out"; then
        echo "map (--lines): output differs: $(diff "$tmp/want" "$tmp/out" | head -n 5)" >>"$logs/map.out"
        status=1
    fi
    check_logs map "$status" "$t0"
}

# shellcheck disable=SC2086 # the list, split into words
[ $# -gt 0 ] || set -- $WORKLOADS
for w in "$@"; do
    case $w in
        map) map_workload ;;
        seeds)
            # A harness keeps its Lua state and buffers for the life of the
            # process, as under libFuzzer: what it holds at exit is not
            # looked at (leaks still are).
            require_freed=0
            for h in fuzz_value fuzz_frame; do
                run "seeds-$h" "build/valgrind/fuzz/$h" "spec/fuzz/seeds_$h"
            done
            require_freed=1
            ;;
        launcher) run "$w" "$PZLUA" spec/valgrind/workloads.lua launcher "$PZLUA" ;;
        codec | pool | failures | stream | readline) run "$w" "$PZLUA" spec/valgrind/workloads.lua "$w" ;;
        *) echo "valgrind: FAILED: no workload $w (workloads: $WORKLOADS)"; exit 2 ;;
    esac
done

total=$(($(date +%s) - started))
if [ -z "$failed" ]; then
    [ "$keep_logs" = 1 ] || rm -rf "$logs"
    echo "valgrind: $passed workloads passed, no memcheck error ($total s)"
    exit 0
fi
echo "valgrind: FAILED:$failed ($passed passed, $total s; logs in $logs)"
exit 1
