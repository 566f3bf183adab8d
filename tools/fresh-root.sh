#!/usr/bin/env bash
# fresh-root.sh - runs commands on a brand-new Debian 12 machine: a root
# made for the run, with a clone of this project in it, so that nothing
# installed on this machine by hand can hide a missing install step.
#
#     tools/fresh-root.sh [COMMANDS]
#
# COMMANDS is a bash command line, run as root in /project of the new root
# with stdin from /dev/null (default: "make run && make test", the README's
# two commands). /project is a clone of the commit checked out here (HEAD:
# changes not committed are not in it). The environment inside is a new
# login's (PATH, HOME=/root, TERM), plus CI when set here and
# PZ_FRESH_ROOT=1, which tools meant to run only inside such a root check.
#
# The root is what a new machine has: debootstrap --variant=minbase bookworm
# plus gcc, libc6-dev, make, git and ca-certificates, with this machine's
# apt sources. It is made once (a few minutes) and kept pristine in
# $PZ_FRESH_DIR; each run mounts an overlay over it (writes go to the run's
# own directory), so a run takes only as long as its commands.
#
# Inside, the run has namespaces of its own: mounts, process ids, host
# name, IPC. Mounted: the overlay, a new /proc, /sys (recursively), /dev,
# /dev/pts, a new tmpfs on /dev/shm and on /run. Daemons, network
# namespaces and mounts that the commands make stay inside. When the run
# ends, however it ends (done, failed, out of time, Ctrl-C, or this script
# killed), its first process dies, the kernel kills every process left in
# its pid namespace, and its mounts go with its mount namespace; the run's
# directory is removed then, or by the next run.
#
# Exit status: the commands'; 124 when they ran out of time; 125 when no new
# root can be made here (not root; no debootstrap, nor a way to install it;
# no Debian mirror in the apt sources; no overlayfs...), after one line on
# stderr: "fresh-root: cannot make a new root: <why>". A command's own 125 is
# returned as 1, so that 125 always means that.
#
# Environment:
#   PZ_FRESH_DIR       where the root and the runs live
#                      (default /var/tmp/parallelize-fresh-root)
#   PZ_FRESH_TIMEOUT   seconds the commands may take (default 2700)
#   PZ_FRESH_MIRROR    Debian mirror for debootstrap (default: the first
#                      one this machine's apt sources give for bookworm)
#   PZ_FRESH_MAX_AGE   days after which the root is made again (default 30)

# shellcheck disable=SC2317 # cleanup and on_signal are called by traps
set -u

SUITE=bookworm
VARIANT=minbase
# What a new machine has besides the minimal base.
BASE_PACKAGES="gcc libc6-dev make git ca-certificates"
# Bump when the way the root is made changes: a new key makes a new root.
FORMAT=2

DIR=${PZ_FRESH_DIR:-/var/tmp/parallelize-fresh-root}
# Making the root takes 1-3 minutes and the CI commands about 4: the limits
# (20 and 45 minutes) end a hung run well inside a 90-minute CI budget.
TIMEOUT=${PZ_FRESH_TIMEOUT:-2700}
BUILD_TIMEOUT=1200
MAX_AGE=${PZ_FRESH_MAX_AGE:-30}
ROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { printf 'fresh-root: %s\n' "$*" >&2; }
cannot() { say "cannot make a new root: $*"; exit 125; }

# ---------------------------------------------------------------- inside
# The parts below run as the first process of new namespaces (see
# in_namespaces), called back through this script with a first argument
# starting with "__".

# __build TMP MIRROR: makes the root in TMP (a new directory). Runs in a
# mount namespace of its own, so the mounts debootstrap and apt make are
# gone with it, even when it is killed half-way.
inside_build() {
    local tmp=$1 mirror=$2 log=$1.log
    say "debootstrap --variant=$VARIANT $SUITE from $mirror (log: $log)"
    if ! debootstrap --variant="$VARIANT" "$SUITE" "$tmp" "$mirror" > "$log" 2>&1; then
        tail -n 20 "$log" | sed 's/^/    /' >&2
        exit 3
    fi
    cp -L /etc/resolv.conf "$tmp/etc/resolv.conf" || exit 4
    mount -t proc proc "$tmp/proc" || exit 4
    # The machine's own apt sources instead of debootstrap's (security and
    # updates too, as an installed machine has); if they do not work in the
    # root, the mirror debootstrap used, alone.
    local src copied=0
    mkdir -p "$tmp/etc/apt/sources.list.d"
    mv "$tmp/etc/apt/sources.list" "$tmp/etc/apt/sources.list.debootstrap" || exit 4
    for src in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$src" ] || continue
        cp "$src" "$tmp$src" && copied=1
    done
    [ "$copied" = 1 ] || cp "$tmp/etc/apt/sources.list.debootstrap" "$tmp/etc/apt/sources.list"
    in_root() { chroot "$tmp" /usr/bin/env -i PATH="$ROOT_PATH" HOME=/root DEBIAN_FRONTEND=noninteractive "$@"; }
    if ! in_root apt-get update -qq >> "$log" 2>&1; then
        say "this machine's apt sources do not work in the new root; using $mirror alone"
        rm -f "$tmp"/etc/apt/sources.list.d/*.list "$tmp"/etc/apt/sources.list.d/*.sources
        cp "$tmp/etc/apt/sources.list.debootstrap" "$tmp/etc/apt/sources.list"
        in_root apt-get update -qq >> "$log" 2>&1 || { tail -n 20 "$log" | sed 's/^/    /' >&2; exit 3; }
    fi
    rm -f "$tmp/etc/apt/sources.list.debootstrap"
    say "installing $BASE_PACKAGES"
    # shellcheck disable=SC2086 # one word per package
    if ! in_root apt-get install -y -qq --no-install-recommends $BASE_PACKAGES >> "$log" 2>&1; then
        tail -n 20 "$log" | sed 's/^/    /' >&2
        exit 3
    fi
    # As a new machine: no package lists yet, nothing in apt's cache.
    in_root apt-get clean >> "$log" 2>&1
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp/etc/resolv.conf"
    umount "$tmp/proc" || exit 4
    exit 0
}

# __run TEMPLATE RUNDIR REPO COMMANDS: the run itself. Exits with the
# commands' status, or 125 when the root cannot be set up.
inside_run() {
    local template=$1 run=$2 repo=$3 commands=$4
    local root=$run/root
    mount -t overlay overlay -o "lowerdir=$template,upperdir=$run/upper,workdir=$run/work" "$root" \
        || { say "cannot make a new root: cannot mount an overlay over $template"; exit 125; }
    local failed=""
    mount -t proc proc "$root/proc" || failed="/proc"
    mount --rbind /sys "$root/sys" || failed="$failed /sys"
    mount --bind /dev "$root/dev" || failed="$failed /dev"
    mount --bind /dev/pts "$root/dev/pts" || failed="$failed /dev/pts"
    mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$root/dev/shm" || failed="$failed /dev/shm"
    mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs "$root/run" || failed="$failed /run"
    [ -z "$failed" ] || { say "cannot make a new root: cannot mount$failed"; exit 125; }
    mkdir -m 1777 "$root/run/lock"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" || { say "cannot make a new root: no /etc/resolv.conf"; exit 125; }
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        "$(cat /proc/sys/kernel/hostname)" > "$root/etc/hosts"
    if ! git -c safe.directory='*' clone -q --no-hardlinks "$repo" "$root/project"; then
        say "cannot make a new root: cannot clone $repo"
        exit 125
    fi
    say "$(git -C "$root/project" log -1 --format='%h %s' | cut -c1-72)"
    say "running, as root in /project: $commands"
    local env=(PATH="$ROOT_PATH" HOME=/root TERM="${TERM:-dumb}" PZ_FRESH_ROOT=1)
    [ -n "${CI:-}" ] && env+=(CI="$CI")
    chroot "$root" /usr/bin/env -i "${env[@]}" /bin/bash -c "cd /project && $commands" < /dev/null
    local rc=$?
    [ "$rc" -eq 125 ] && rc=1
    exit "$rc"
}

case ${1:-} in
    __build) shift; inside_build "$@" ;;
    __run) shift; inside_run "$@" ;;
esac

# ---------------------------------------------------------------- outside

COMMANDS=${1:-"make run && make test"}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Runs this script's `$1` part (__build or __run) with the other arguments
# as the first process of new mount, pid, UTS and IPC namespaces, for at
# most $LIMIT seconds, in the background: sets NS_TIMEOUT_PID (timeout's
# pid; the namespaces' first process is a grandchild). unshare's
# --kill-child makes its child die with it; timeout runs it in a process
# group of its own, so a Ctrl-C in the terminal reaches only this script,
# whose trap ends the run (stop_namespaces).
in_namespaces() {
    timeout -s KILL "$LIMIT" unshare --mount --propagation private --pid --uts --ipc \
        --fork --kill-child=SIGKILL -- bash "$HERE/fresh-root.sh" "$@" &
    NS_TIMEOUT_PID=$!
}

# Kills unshare (the namespaces' first process gets SIGKILL from the
# kernel, then everything else in its pid namespace), then timeout.
stop_namespaces() {
    [ -n "${NS_TIMEOUT_PID:-}" ] || return 0
    local child
    for child in $(ps -o pid= --ppid "$NS_TIMEOUT_PID" 2>/dev/null); do
        kill -KILL "$child" 2>/dev/null
    done
    kill -KILL "$NS_TIMEOUT_PID" 2>/dev/null
    wait "$NS_TIMEOUT_PID" 2>/dev/null
    NS_TIMEOUT_PID=""
}

# Waits for the namespaces started by in_namespaces; returns their status.
wait_namespaces() {
    local rc
    # (stderr: not bash's notice that timeout killed itself with SIGKILL)
    { wait "$NS_TIMEOUT_PID"; } 2> /dev/null
    rc=$?
    NS_TIMEOUT_PID=""
    return "$rc"
}

RUN=""
cleanup() {
    stop_namespaces
    # The run's mounts lived only in its own mount namespace: here its
    # directory is plain files. Checked all the same before removing it.
    if [ -n "$RUN" ] && [ -d "$RUN" ]; then
        if findmnt -rn -o TARGET | grep -q "^$RUN/"; then
            say "left $RUN in place: something is still mounted under it"
        else
            rm -rf "$RUN"
        fi
    fi
    [ -n "${TMP_TEMPLATE:-}" ] && rm -rf "$TMP_TEMPLATE" "$TMP_TEMPLATE.log"
}
on_signal() {
    trap - INT TERM HUP
    say "stopped by a signal: ending the run"
    cleanup
    exit 130
}
trap cleanup EXIT
trap on_signal INT TERM HUP

# The first Debian mirror the apt sources give for $SUITE (deb822 files,
# then one-line ones), or nothing.
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() { if (uri != "" && has_suite && is_deb && enabled) { print uri; found = 1; exit } }
            function reset() { uri = ""; has_suite = 0; is_deb = 0; enabled = 1 }
            BEGIN { reset() }
            /^[ \t]*$/ { flush(); reset(); next }
            /^[ \t]*#/ { next }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) has_suite = 1 }
            tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") is_deb = 1 }
            tolower($1) == "enabled:" && tolower($2) == "no" { enabled = 0 }
            END { if (!found) flush() }' "$f"
    done | head -n 1
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        sed -e 's/#.*//' -e 's/\[[^]]*\]//' |
        awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2 }'
}

[ "$(id -u)" = 0 ] || cannot "this needs root (it mounts and chroots); try: sudo $0"
for tool in unshare chroot mount findmnt flock timeout git ps; do
    command -v "$tool" > /dev/null || cannot "$tool is not installed"
done
grep -qw overlay /proc/filesystems || modprobe overlay 2> /dev/null ||
    cannot "the kernel has no overlayfs"
REPO=$(git -C "$HERE/.." rev-parse --show-toplevel 2> /dev/null) || cannot "$HERE/.. is not a git work tree"
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2> /dev/null)" ]; then
    say "note: changes not committed in $REPO are not in the clone"
fi
mkdir -p "$DIR" || cannot "cannot create $DIR"

KEY=$(printf '%s %s %s %s' "$SUITE" "$VARIANT" "$BASE_PACKAGES" "$FORMAT" | md5sum | cut -c1-12)
TEMPLATE=$DIR/$SUITE-$VARIANT-$KEY

# Runs left behind by a run that was killed (their lock is free): removed.
for old in "$DIR"/run.*; do
    [ -d "$old" ] || continue
    if flock -n "$old/lock" true 2> /dev/null && ! findmnt -rn -o TARGET | grep -q "^$old/"; then
        rm -rf "$old"
    fi
done

# The root: made when missing or too old, by one run at a time.
exec 8> "$DIR/build.lock"
flock 8
if [ -d "$TEMPLATE" ] && [ -n "$(find "$TEMPLATE" -maxdepth 0 -mtime +"$MAX_AGE")" ]; then
    say "the root is more than $MAX_AGE days old: making it again"
    mv "$TEMPLATE" "$TEMPLATE.old.$$" && rm -rf "$TEMPLATE.old.$$"
fi
if [ ! -x "$TEMPLATE/usr/bin/make" ]; then
    if ! command -v debootstrap > /dev/null; then
        say "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap > /dev/null 2>&1 ||
            { apt-get update -qq > /dev/null 2>&1 &&
              DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap > /dev/null 2>&1; } ||
            cannot "debootstrap is not installed and apt-get cannot install it"
    fi
    MIRROR=${PZ_FRESH_MIRROR:-$(host_mirror | head -n 1)}
    [ -n "$MIRROR" ] || cannot "no Debian mirror for $SUITE in this machine's apt sources (set PZ_FRESH_MIRROR)"
    say "making the root once, in $TEMPLATE (a few minutes; later runs reuse it)"
    rm -rf "$DIR"/*.new.* # left by a build that was killed (the lock is ours)
    TMP_TEMPLATE=$TEMPLATE.new.$$
    started=$(date +%s)
    LIMIT=$BUILD_TIMEOUT in_namespaces __build "$TMP_TEMPLATE" "$MIRROR"
    wait_namespaces
    rc=$?
    case $rc in
        0) ;;
        3) cannot "debootstrap or apt-get failed in the new root (log above)" ;;
        124|137) cannot "making the root took more than $BUILD_TIMEOUT s" ;;
        *) cannot "making the root failed (status $rc)" ;;
    esac
    mv "$TMP_TEMPLATE" "$TEMPLATE" || cannot "cannot move the root into place"
    rm -f "$TMP_TEMPLATE.log"
    TMP_TEMPLATE=""
    say "root made in $(($(date +%s) - started)) s"
    # Roots of other keys are of no more use, unless a live run uses one.
    for other in "$DIR/$SUITE"-*; do
        [ "$other" = "$TEMPLATE" ] && continue
        case $other in *.log|*.new.*) continue ;; esac
        in_use=0
        for r in "$DIR"/run.*; do
            [ -f "$r/template" ] && [ "$(cat "$r/template")" = "$other" ] &&
                ! flock -n "$r/lock" true 2> /dev/null && in_use=1
        done
        [ "$in_use" = 0 ] && rm -rf "$other"
    done
fi

# The run: a directory of its own, locked while the run lives.
RUN=$(mktemp -d "$DIR/run.XXXXXX") || cannot "cannot create a directory in $DIR"
mkdir "$RUN/upper" "$RUN/work" "$RUN/root"
echo "$TEMPLATE" > "$RUN/template"
exec 9> "$RUN/lock"
flock 9
exec 8>&-

started=$(date +%s)
LIMIT=$TIMEOUT in_namespaces __run "$TEMPLATE" "$RUN" "$REPO" "$COMMANDS"
wait_namespaces
rc=$?
elapsed=$(($(date +%s) - started))
case $rc in
    124|137)
        if [ "$elapsed" -ge "$TIMEOUT" ]; then
            say "the commands ran out of time after $elapsed s (PZ_FRESH_TIMEOUT=$TIMEOUT)"
            rc=124
        fi ;;
esac
say "exit status $rc after $elapsed s"
exit "$rc"
