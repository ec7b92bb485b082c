#!/usr/bin/env bash
# Sets up a virtualenv from scratch and runs the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# The CPU build of torch first: a plain `pip install torch` pulls several GB of CUDA packages.
pip install -q torch==2.13.0
pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
