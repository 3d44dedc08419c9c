#!/usr/bin/env bash
# The test suite: lint, then unit, libvirt test-driver and real-guest tests.
# Needs what scripts/setup.sh installs and a running libvirtd (scripts/start-libvirt.sh).
set -eu -o pipefail
cd "$(dirname "$0")/.."
ruff check vmjobs placement images tests bench
exec python3 -m pytest -q -p no:cacheprovider "$@"
