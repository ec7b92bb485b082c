#!/usr/bin/env bash
# Sets up a virtualenv from scratch and runs the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test . scripts/setup-venv.sh
python -m pytest -q --durations=15 "$@"
