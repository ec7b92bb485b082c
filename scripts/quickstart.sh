#!/usr/bin/env bash
# Sets up a virtualenv from scratch and runs the quickstart sweep (the README's main command).
# Extra arguments go to `tune-dynsdpb sweep`, e.g. --output-dir runs/qs --methods dlb dynsdpb
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -e ".[lora,minilm]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
tune-dynsdpb sweep search_spaces/quickstart.yaml --data-dir "${DATA_DIR:-../shared/data}" "$@"
