#!/usr/bin/env bash
# Run rayskd's tests. Creates .venv and installs everything on first use.
#   ./scripts/test.sh                 all tests
#   ./scripts/test.sh -m "not slow"   only the fast unit tests
#   ./scripts/test.sh tests/test_x.py any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
exec python -m pytest "$@"
