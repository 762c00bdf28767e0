#!/usr/bin/env bash
# Set up (idempotent) and run the demo. As root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/vpn-director demo "$@"
