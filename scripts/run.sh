#!/usr/bin/env bash
# Set up the environment and run the main job: train the embedded default (configs/tiny.py) on the shipped corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train.py --config configs/tiny.py --workdir "${WORKDIR:-runs/tiny}" "$@"
