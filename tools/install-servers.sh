#!/bin/sh
# install-servers.sh PACKAGE... - installs the Debian packages of the
# servers the specs start themselves (spec/servers.lua: sshd, munge,
# slurmctld, slurmd, network namespaces), without letting the packages'
# install scripts start any service. `make deps` runs it.
#
# Rules it owns:
# - Every package installed already: nothing is touched, nothing runs.
#   Running it twice does what running it once did.
# - Not root: nothing is installed. The specs that use these servers need
#   root and report themselves as skipped without it, so the packages would
#   be of no use; a line says which are missing.
# - Debian's maintainer scripts start a daemon through invoke-rc.d, which
#   first asks /usr/sbin/policy-rc.d: exit status 101 means "do not". A
#   policy-rc.d that already answers 101 is left as it is. Otherwise one
#   that answers 101 stands in for the install only, and afterwards the
#   machine gets back exactly what it had (the old file, or none): whatever
#   apt-get's outcome, and on SIGINT, SIGTERM or SIGHUP. Nothing later needs
#   it: the specs start the daemons themselves, with configurations of
#   their own, and never through invoke-rc.d.
# - A stand-in left by a run that was killed outright (SIGKILL) carries a
#   marker line; the next run puts back what it had replaced first.

set -u

POLICY=/usr/sbin/policy-rc.d
SAVED=/usr/sbin/policy-rc.d.pz-saved
MARKER='# stand-in written by parallelize install-servers.sh'

missing=""
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
        missing="$missing $p"
done
[ -n "$missing" ] || exit 0

if [ "$(id -u)" != 0 ]; then
    echo "not root: not installing$missing (the specs that need them will be skipped)"
    exit 0
fi

# Puts back what a stand-in replaced: the saved file, or nothing.
restore_policy() {
    if [ -f "$POLICY" ] && grep -qxF "$MARKER" "$POLICY"; then
        if [ -e "$SAVED" ]; then
            mv -f "$SAVED" "$POLICY"
        else
            rm -f "$POLICY"
        fi
    fi
}

# A stand-in of ours from a run killed before it could clean up.
restore_policy

# apt-get runs in the background and is waited for, so that a signal to
# this script reaches it (as SIGTERM) and it has ended before the stand-in
# goes: an install going on without it could start a service.
child=""
on_signal() {
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null
        wait "$child"
    fi
    exit "$1"
}
run() {
    "$@" &
    child=$!
    wait "$child"
    status=$?
    child=""
    return "$status"
}

trap 'on_signal 130' INT
trap 'on_signal 143' TERM HUP

standin=0
if [ -x "$POLICY" ]; then
    "$POLICY" ssh start > /dev/null 2>&1
    denies=$?
else
    denies=0
fi
if [ "$denies" -ne 101 ]; then
    standin=1
    trap 'restore_policy' EXIT
    if [ -e "$POLICY" ]; then
        cp -p "$POLICY" "$SAVED" || exit 1
    fi
    printf '#!/bin/sh\n%s\n# Denies every service action while packages install.\nexit 101\n' \
        "$MARKER" > "$POLICY.tmp" && chmod 755 "$POLICY.tmp" && mv -f "$POLICY.tmp" "$POLICY" || exit 1
fi

echo "installing:$missing"
# Other installs on the machine may hold dpkg's lock for a while: wait for it.
# shellcheck disable=SC2086 # $missing is a list of words
run apt-get update -qq &&
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=300 $missing
status=$?
[ "$standin" -eq 1 ] && restore_policy
exit $status
