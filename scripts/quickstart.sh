#!/usr/bin/env bash
# Sets up a virtualenv from scratch and runs the quickstart sweep (the README's main command).
# Extra arguments go to `tune-dynsdpb sweep`, e.g. --output-dir runs/qs --methods dlb dynsdpb
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=lora,minilm . scripts/setup-venv.sh
tune-dynsdpb sweep search_spaces/quickstart.yaml --data-dir "${DATA_DIR:-../shared/data}" "$@"
