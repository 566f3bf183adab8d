#!/usr/bin/env bash
# new-machine-check.sh - the README's two commands as new users run them on
# a new machine. Runs only inside a root made by tools/fresh-root.sh (it
# adds a user and installs sudo): .ci/run runs
#
#     tools/fresh-root.sh "bash tools/new-machine-check.sh"
#
# Steps, in /project, each one failing the check when it fails:
#   1. a user with passwordless sudo (as a developer's account is) runs
#      `make run`: the first run on the machine installs the build's
#      packages through sudo, builds as that user and runs the demo;
#   2. root runs `make run` again: it must install nothing and still work;
#   3. root runs `make check` (`make test` and the sanitizer pass): it
#      installs the test tools (root's own path, without sudo) and runs
#      every test.
# Between them, make run and make check (all of make test's work, and its
# install step) each run once for the first time, both ways of installing
# are used, and "a second run installs nothing" is checked, at the cost of
# one more `make run` (seconds), not of a second `make check`.

set -euo pipefail

if [ "${PZ_FRESH_ROOT:-}" != 1 ]; then
    echo "new-machine-check: runs only inside tools/fresh-root.sh (it adds a user and installs sudo)" >&2
    exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."

USER_NAME=pzuser

step() { printf '\n=== new machine: %s\n' "$*"; }
fail() { printf 'new-machine-check: FAILED: %s\n' "$*" >&2; exit 1; }

# What dpkg has installed, for "installs nothing".
installed() { dpkg-query -W -f='${Package} ${Version} ${Status}\n' | sort; }

step "setting up: $USER_NAME, with passwordless sudo"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends sudo > /dev/null
# Back to a new machine's state: no package lists, so `make run` must fetch
# them itself.
apt-get clean
rm -rf /var/lib/apt/lists/*
useradd --create-home --shell /bin/bash "$USER_NAME"
echo "$USER_NAME ALL=(ALL) NOPASSWD: ALL" > "/etc/sudoers.d/$USER_NAME"
chmod 440 "/etc/sudoers.d/$USER_NAME"
chown -R "$USER_NAME:" .

step "1. make run, as $USER_NAME (first run on this machine)"
su --login "$USER_NAME" --command "cd $(pwd) && make run" || fail "make run as a user with sudo"
command -v luajit > /dev/null || fail "make run as $USER_NAME did not install luajit"

step "2. make run again, as root: installs nothing"
before=$(installed)
log=$(mktemp)
make run 2>&1 | tee "$log" || fail "make run, the second time"
if grep -q '^installing:' "$log" || [ "$(installed)" != "$before" ]; then
    fail "the second make run installed packages"
fi
rm -f "$log"

step "3. make check (make test and the sanitizer pass), as root"
make check || fail "make check"
