#!/usr/bin/env bash
# The test suite: lint, then unit, libvirt test-driver, real-guest and provisioning tests, run
# with the Python vmjobs is installed with (scripts/setup.sh's venv, made from Debian's
# /usr/bin/python3 — so CI proves the code on the Python a Debian 12 host really has).
# Needs what scripts/setup.sh installs and a running libvirtd (scripts/start-libvirt.sh).
set -eu -o pipefail
cd "$(dirname "$0")/.."
venv=${VMJOBS_VENV:-/opt/vmjobs/venv}
if [ ! -x "$venv/bin/python" ]; then
    echo "test.sh: no virtual environment at $venv; run scripts/setup.sh first" >&2
    exit 1
fi
"$venv/bin/ruff" check vmjobs placement images tests bench
# --durations=30: every run's log ends with its 30 slowest tests (setup, call, teardown), so
# a CI log shows where the suite's time goes without another run
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=30 "$@"
