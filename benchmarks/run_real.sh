#!/usr/bin/env bash
# Real-data results for one task: sweep (3 arms, equal trial budgets), then the finals over seeds
# at equal epochs and at equal compute. Usage: bash benchmarks/run_real.sh rte|mrpc|cola|cb|stsb|sst2
# (or <task>-large, the larger protocol of benchmarks/real/<task>-large.yaml: cola, sst2, cb)
# Env: DATA_DIR (default ../shared/data), OUT (default runs/real), SEEDS (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
task=$1
out=${OUT:-runs/real}/$task
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -f "$out/sweep.json" ]; then
  tune-dynsdpb sweep --resume --output-dir "$out" --no-progress
else
  tune-dynsdpb sweep "benchmarks/real/$task.yaml" --data-dir "${DATA_DIR:-../shared/data}" --output-dir "$out" --no-progress
fi
for budget in epochs compute; do
  [ -d "$out/report-$budget" ] || tune-dynsdpb compare "$out" --seeds "${SEEDS:-5}" --budget "$budget"
done
