#!/bin/sh
# run-tests.sh - every test of the project. `make check` runs it after the
# build (normal and ASan), from the top of the tree; `make test` runs every
# step but c, which doubles the time:
#
#     LUAJIT=luajit sh tools/run-tests.sh
#
# Steps, in order; each prints a header, and what it counts:
#   a. luacheck over lua spec examples bench tools       1 test
#   b. the busted suite (spec/), normal build            1 per test busted runs
#   c. the busted suite under build/asan/pzlua           1 per test busted runs,
#      (AddressSanitizer + UBSan; specs tagged           + 1: no sanitizer report
#      "nosan" are left out)
#   d. luarocks lint and make of the rockspec into a     1 test
#      throwaway tree, then a plain luajit requiring it
#      from there; luarocks test in the copy it built     1 test
#      (the rockspec's test section: busted, offline)
#   e. make install PREFIX=<tmp>, then <tmp>/bin/pzlua   2 tests
#      and a plain luajit requiring the installed module
#   f. examples/*.lua run with build/pzlua               1 per example
# and ends with one line of its own, `tests: N passed, N failed`, exiting 1
# when anything failed; when busted skipped tests (pending, e.g. the server
# specs without root), the line goes on with `, N skipped: NAME; NAME`.
#
# Environment:
#   LUAJIT            interpreter for the normal build (default luajit)
#   BUSTED            busted's script (default: `command -v busted`)
#   PZ_TEST_STEPS     which steps to run, e.g. "ab" (default abcdef)
#   PZ_TEST_TIMEOUT   seconds one busted pass may take (default 900)
#   PZ_EXAMPLE_TIMEOUT  seconds one example may take (default 60)
#
# Specs find the interpreter under test in $PZLUA (build/pzlua, or
# build/asan/pzlua in the sanitizer pass) when they run pzlua as a process.

set -u

LUAJIT=${LUAJIT:-luajit}
MAKE=${MAKE:-make}
STEPS=${PZ_TEST_STEPS:-abcdef}
TEST_TIMEOUT=${PZ_TEST_TIMEOUT:-900}
EXAMPLE_TIMEOUT=${PZ_EXAMPLE_TIMEOUT:-60}

cd "$(dirname "$0")/.." || exit 2

passed=0
failed=0
failed_names=""
skipped=0
started=$(date +%s)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pz-tests.XXXXXX") || exit 2
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM HUP

pass() {
    passed=$((passed + 1))
    printf 'PASS: %s\n' "$1"
}

fail() {
    failed=$((failed + 1))
    failed_names="$failed_names
  $1"
    printf 'FAIL: %s\n' "$1"
}

step_started=0
header() {
    step_started=$(date +%s)
    printf '\n=== %s\n' "$1"
}

footer() {
    printf '    (%ss)\n' "$(($(date +%s) - step_started))"
}

want() {
    case $STEPS in *"$1"*) return 0 ;; esac
    return 1
}

# Shows the last lines of a log, indented, after a failure.
show_log() {
    printf -- '---- last lines of %s:\n' "$2"
    tail -n "${3:-40}" "$1" | sed 's/^/    /'
}

# Round trip through the module, for the install checks (d, e). When
# PZ_EXPECT_PREFIX is set, the module must come from below it.
CHECK='
local p = require "parallelize"
local v = { 1, 2.5, "a\0b\255", { x = true, [3] = false }, n = -0.0, big = 2^53 }
local d = p.decode(p.encode(v))
assert(d[1] == 1 and d[2] == 2.5 and d[3] == "a\0b\255", "round trip: scalars differ")
assert(d[4].x == true and d[4][3] == false, "round trip: nested table differs")
assert(1 / d.n == -math.huge and d.big == 2^53, "round trip: numbers differ")
local want = os.getenv("PZ_EXPECT_PREFIX")
if want then
  for _, f in ipairs({ package.searchpath("parallelize", package.path) or "?",
                       package.searchpath("parallelize.core", package.cpath) or "?" }) do
    assert(f:sub(1, #want) == want, "loaded " .. f .. ", not from " .. want)
  end
end
print("round trip ok")
'

spec_files=$(find spec -name '*_spec.lua' 2>/dev/null | sort)
BUSTED=${BUSTED:-$(command -v busted)}

# run_busted_count NAME COUNTS RC [EXTRA_OK]: counts a finished busted pass. COUNTS is the
# file tools/busted_counts.lua wrote at the end of the suite; RC busted's
# exit status. Prints nothing to parse: counts come from the file only.
run_busted_count() {
    name=$1 counts=$2 rc=$3 extra_ok=${4:-0}
    if [ ! -s "$counts" ]; then
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            fail "$name: timed out after ${TEST_TIMEOUT}s (PZ_TEST_TIMEOUT)"
        else
            fail "$name: busted did not finish the suite (exit status $rc)"
        fi
        return
    fi
    read -r s f e p < "$counts"
    case "$s$f$e$p" in
        *[!0-9]*|'') fail "$name: unreadable counts: $(cat "$counts")"; return ;;
    esac
    passed=$((passed + s))
    failed=$((failed + f + e))
    # After the counts, one line per skipped (pending) test: "name<TAB>reason".
    skipped=$((skipped + p))
    tail -n +2 "$counts" >> "$tmp/skipped"
    [ $((f + e)) -gt 0 ] && failed_names="$failed_names
  $name: $f failed, $e errors (see busted's report above)"
    if [ $((f + e)) -gt 0 ] && [ -s "$counts.failed" ]; then
        failed_names="$failed_names
$(sed 's/^/    /' "$counts.failed")"
    fi
    printf '%s: %d passed, %d failed, %d errors, %d pending\n' "$name" "$s" "$f" "$e" "$p"
    # busted exits with failures + errors; anything else is a failure of its
    # own, unless the caller has already counted its cause (extra_ok).
    if [ "$rc" -ne 0 ] && [ $((f + e)) -eq 0 ] && [ "$extra_ok" -eq 0 ]; then
        fail "$name: busted exited with status $rc after all tests passed"
    fi
}

# ---------------------------------------------------------------- a.
if want a; then
    header "a. luacheck"
    dirs=""
    for d in lua spec examples bench tools; do
        [ -d "$d" ] && dirs="$dirs $d"
    done
    color=""
    [ -t 1 ] || color="--no-color"
    # shellcheck disable=SC2086 # word splitting of $dirs is intended
    if luacheck -q $color $dirs; then
        pass "luacheck:$dirs"
    else
        fail "luacheck:$dirs (warnings or errors above)"
    fi
    footer
fi

# suite_can_run NAME: true when there are specs and busted to run them;
# otherwise says why (a missing busted is a failure).
suite_can_run() {
    if [ -z "$spec_files" ]; then
        echo "no spec/*_spec.lua yet: nothing to run"
        return 1
    fi
    if [ -z "$BUSTED" ]; then
        fail "$1: not installed"
        return 1
    fi
    return 0
}

# run_suite COUNTS INTERPRETER [BUSTED OPTION...]: busted over spec/ under
# INTERPRETER, within the time limit, stdin closed, its counts written to
# COUNTS; returns busted's status. --ignore-lua: never let busted re-exec
# itself under another interpreter (its --lua option, also settable in
# .busted). The caller sets LUA_PATH, LUA_CPATH and PZLUA.
run_suite() {
    counts=$1 interpreter=$2
    shift 2
    timeout -k 10 "$TEST_TIMEOUT" "$interpreter" "$BUSTED" --ignore-lua "$@" \
        -o tools/busted_counts.lua -Xoutput "$counts" spec < /dev/null
}

# ---------------------------------------------------------------- b.
if want b; then
    header "b. busted, normal build ($LUAJIT)"
    if suite_can_run busted; then
        LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/?.so;;" PZLUA="$(pwd)/build/pzlua" \
            run_suite "$tmp/counts-b" "$LUAJIT"
        run_busted_count "busted" "$tmp/counts-b" $?
    fi
    footer
fi

# ---------------------------------------------------------------- c.
# The suite under pzlua built with -fsanitize=address,undefined. Only our C
# code is instrumented: Debian's libluajit is not, and runs fine beside
# ASan as it is: LuaJIT allocates its own heap with mmap (which ASan does
# not track, so LuaJIT's memory never shows as a leak), and lua_error
# unwinds through _Unwind_RaiseException, which ASan intercepts to unpoison
# the C frames it skips. So no special option is needed to make LuaJIT
# work; the options below only make the reports strict and findable:
#   detect_leaks=1      LeakSanitizer at every instrumented process's exit
#   abort_on_error=0, exitcode=86
#                       exit (no core dump) with a status of its own
#   log_path=DIR/san    every report, from busted's process and from any
#                       worker or pzlua it starts (whose stderr a spec may
#                       capture or close), goes to DIR/san.<pid>: any such
#                       file with a report fails the pass
#   UBSAN halt_on_error=1, print_stacktrace=1
#                       the first undefined behaviour ends the process with
#                       a stack (the build also has -fno-sanitize-recover)
# Busted's own stderr is searched for reports as well: with gcc, UBSan is a
# runtime (libubsan) separate from ASan's and ignores log_path, so its
# reports always go to stderr. A UBSan report of a process whose stderr a
# spec captures then shows only as that process's exit status 1; building
# build/asan/pzlua with clang (one runtime for both) closes that gap.
# parallelize and parallelize.core are built into pzlua (package.preload),
# and --cpath points where no module is, so the uninstrumented
# build/parallelize/core.so can never stand in for the instrumented code.
if want c; then
    header "c. busted under AddressSanitizer + UBSan (build/asan/pzlua)"
    if ! suite_can_run "busted (asan)"; then
        :
    elif [ ! -x build/asan/pzlua ]; then
        fail "busted (asan): build/asan/pzlua is missing (make asan)"
    else
        san="$tmp/san"
        mkdir -p "$san"
        ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=86:log_path=$san/san" \
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$san/san" \
        LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH=";;" PZLUA="$(pwd)/build/asan/pzlua" \
            run_suite "$tmp/counts-c" build/asan/pzlua \
            --cpath="./build/asan/?.so" --exclude-tags=nosan 2> "$tmp/asan.stderr"
        rc=$?
        cat "$tmp/asan.stderr" >&2
        # A report is any file the sanitizers wrote, or one of their
        # headlines on busted's own stderr (in case log_path was not honoured).
        reported=0
        for r in "$san"/san.*; do
            [ -f "$r" ] || continue
            reported=1
            show_log "$r" "sanitizer report $(basename "$r")" 80
        done
        if grep -q -e 'ERROR: AddressSanitizer' -e 'ERROR: LeakSanitizer' \
                -e 'runtime error:' "$tmp/asan.stderr"; then
            reported=1
            echo "(sanitizer report on stderr, above)"
        fi
        if [ "$reported" -eq 0 ]; then
            pass "sanitizers: no report"
        else
            fail "sanitizers: reports found (above)"
        fi
        run_busted_count "busted (asan)" "$tmp/counts-c" "$rc" "$reported"
    fi
    footer
fi

# ---------------------------------------------------------------- d.
# Built from a copy of the tree (without build/), as LuaRocks would build
# it for a user; LuaRocks' own LUA_INCDIR for 5.1 is Lua's, not LuaJIT's,
# and the Makefile falls back to pkg-config's then.
if want d; then
    header "d. luarocks make of the rockspec"
    rockspec=parallelize-scm-1.rockspec
    src="$tmp/rock-src"
    tree="$tmp/rock-tree"
    mkdir -p "$src"
    if ! command -v luarocks > /dev/null; then
        fail "luarocks make: luarocks not installed"
    elif ! tar -cf - --exclude=./build --exclude=./.git . | (cd "$src" && tar -xf -); then
        fail "luarocks make: could not copy the tree"
    elif ! (cd "$src" && luarocks --lua-version=5.1 lint "$rockspec" \
                && luarocks --lua-version=5.1 make --deps-mode=none --tree "$tree" "$rockspec") \
            > "$tmp/luarocks.log" 2>&1; then
        show_log "$tmp/luarocks.log" "luarocks make"
        fail "luarocks make: build or install failed"
    else
        missing=""
        for f in lib/lua/5.1/parallelize/core.so share/lua/5.1/parallelize.lua bin/pzlua; do
            [ -e "$tree/$f" ] || missing="$missing $f"
        done
        if [ -n "$missing" ]; then
            fail "luarocks make: not installed in the tree:$missing"
        elif (cd "$tmp" &&
              LUA_PATH="$tree/share/lua/5.1/?.lua;$tree/share/lua/5.1/?/init.lua" \
              LUA_CPATH="$tree/lib/lua/5.1/?.so" PZ_EXPECT_PREFIX="$tree/" \
              "$LUAJIT" -e "$CHECK") > "$tmp/rock-check.log" 2>&1; then
            pass "luarocks make: plain $LUAJIT requires parallelize from the tree"
        else
            show_log "$tmp/rock-check.log" "the check"
            fail "luarocks make: plain $LUAJIT cannot use the module from the tree"
        fi
        # The test section, as a user runs it after luarocks make: here on
        # two spec files (the whole suite ran in b and c), with nothing on
        # the search paths but the copy's own lua/ and build/ (from .busted).
        if (cd "$src" && unset LUA_PATH LUA_CPATH &&
            timeout -k 10 "$TEST_TIMEOUT" luarocks --lua-version=5.1 test "$rockspec" -- \
                spec/docs_spec.lua spec/messages_spec.lua) > "$tmp/rock-test.log" 2>&1 &&
           grep -q '^[1-9][0-9]* successes / 0 failures / 0 errors' "$tmp/rock-test.log"; then
            pass "luarocks test: $(grep -o '^[0-9]* successes' "$tmp/rock-test.log"), offline"
        else
            show_log "$tmp/rock-test.log" "luarocks test"
            fail "luarocks test: failed"
        fi
    fi
    footer
fi

# ---------------------------------------------------------------- e.
if want e; then
    header "e. make install PREFIX=<tmp>"
    prefix="$tmp/prefix"
    if ! "$MAKE" --no-print-directory install PREFIX="$prefix" > "$tmp/install.log" 2>&1; then
        show_log "$tmp/install.log" "make install"
        fail "make install: failed"
    else
        # pzlua needs no search path at all: run it from elsewhere, without one.
        if (cd "$tmp" && unset LUA_PATH LUA_CPATH && "$prefix/bin/pzlua" -e "$CHECK") \
                > "$tmp/pzlua-check.log" 2>&1; then
            pass "make install: PREFIX/bin/pzlua runs a round trip, no LUA_PATH"
        else
            show_log "$tmp/pzlua-check.log" "the check"
            fail "make install: PREFIX/bin/pzlua cannot run a round trip"
        fi
        if (cd "$tmp" &&
            LUA_PATH="$prefix/share/lua/5.1/?.lua;$prefix/share/lua/5.1/?/init.lua" \
            LUA_CPATH="$prefix/lib/lua/5.1/?.so" PZ_EXPECT_PREFIX="$prefix/" \
            "$LUAJIT" -e "$CHECK") > "$tmp/luajit-check.log" 2>&1; then
            pass "make install: plain $LUAJIT requires parallelize from PREFIX"
        else
            show_log "$tmp/luajit-check.log" "the check"
            fail "make install: plain $LUAJIT cannot use the module from PREFIX"
        fi
    fi
    footer
fi

# ---------------------------------------------------------------- f.
if want f; then
    header "f. examples with build/pzlua"
    found=0
    for ex in examples/*.lua; do
        [ -f "$ex" ] || continue
        found=1
        log="$tmp/example.log"
        t0=$(date +%s)
        PZ_SLEEP_SCALE=0.05 timeout -k 5 "$EXAMPLE_TIMEOUT" build/pzlua "$ex" \
            < /dev/null > "$log" 2>&1
        rc=$?
        if [ "$rc" -eq 0 ]; then
            pass "example $ex ($(($(date +%s) - t0))s)"
        else
            show_log "$log" "$ex" 30
            if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
                fail "example $ex: timed out after ${EXAMPLE_TIMEOUT}s"
            else
                fail "example $ex: exit status $rc"
            fi
        fi
    done
    [ "$found" -eq 1 ] || echo "no examples/*.lua yet"
    footer
fi

printf '\n=== done in %ss\n' "$(($(date +%s) - started))"
if [ "$failed" -gt 0 ]; then
    printf 'failed:%s\n' "$failed_names"
fi
if [ "$skipped" -gt 0 ]; then
    printf 'skipped:\n'
    sort -u "$tmp/skipped" | awk -F '\t' '{ print "  " $1 ($2 == "" ? "" : " (" $2 ")") }'
    printf 'tests: %d passed, %d failed, %d skipped: %s\n' "$passed" "$failed" "$skipped" \
        "$(cut -f1 "$tmp/skipped" | sort -u | awk '{ printf "%s%s", (NR > 1 ? "; " : ""), $0 }')"
else
    printf 'tests: %d passed, %d failed\n' "$passed" "$failed"
fi
[ "$failed" -eq 0 ]
