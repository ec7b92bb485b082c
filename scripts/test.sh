#!/usr/bin/env bash
# Sets up a virtualenv from scratch and runs the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test . scripts/setup-venv.sh
# Two pytest workers (pytest-xdist; TEST_WORKERS=0 runs in this process alone): on 2 cores the suite's many
# waits (a store frozen for 20 s, a server down for 15 s, Ray starting) overlap with the other
# worker's work. Each worker has its own basetemp, Ray and MLflow server.
python -m pytest -q --durations=15 -n "${TEST_WORKERS:-2}" --dist worksteal "$@"
