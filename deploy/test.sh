#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. As root on Debian 12.
# Extra arguments go to pytest (e.g. `bash deploy/test.sh tests/unit -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/python -m pytest "$@"
