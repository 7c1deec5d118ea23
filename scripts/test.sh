#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the test suite on the CPU, on two pytest-xdist workers
# unless the arguments choose (-n N, or -p no:xdist). The fast tier: scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
workers=(-n 2)
for arg in "$@"; do
  case $arg in -n|-n*|--numprocesses*|no:xdist) workers=() ;; esac
done
exec .venv/bin/python -m pytest "${workers[@]}" "$@"
