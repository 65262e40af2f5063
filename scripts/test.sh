#!/usr/bin/env bash
# Run rayskd's tests. Creates .venv and installs everything on first use.
#   ./scripts/test.sh                 all tests
#   ./scripts/test.sh -m "not slow"   only the fast unit tests
#   ./scripts/test.sh tests/test_x.py any pytest arguments
# Two pytest-xdist workers side by side, a test file each at a time (RAYSKD_TEST_WORKERS=0: one
# process): a rayskd run leaves a core idle for about a third of its time (start-up, waits for
# restarts and timeouts), and the tests' processes are told apart by worker (tests/conftest.py).
# Files start in the order tests/conftest.py gives (longest first), not xdist's (most tests first).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
exec python -m pytest -n "${RAYSKD_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
