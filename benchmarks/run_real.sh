#!/usr/bin/env bash
# The real-data results of docs/results.md: one multi-task sweep (benchmarks/real/protocol.yaml),
# then the finals over seeds at equal epochs and at equal compute; compare writes each task's
# report and the cross-task table (OUT/cross-task/). Re-running continues where it stopped.
# Env: DATA_DIR (default ../shared/data), OUT (default runs/real), SEEDS (default 5), PROTOCOL
# (default benchmarks/real/protocol.yaml; benchmarks/real/protocol-pbt.yaml for the pbt rows).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/real}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -f "$out/sweep.json" ]; then
  tune-dynsdpb sweep --resume --output-dir "$out" --no-progress || [ $? -eq 1 ]
else
  tune-dynsdpb sweep "${PROTOCOL:-benchmarks/real/protocol.yaml}" --data-dir "${DATA_DIR:-../shared/data}" --output-dir "$out" \
    --no-progress || [ $? -eq 1 ]
fi
for budget in epochs compute; do
  [ -d "$out/report-$budget" ] || tune-dynsdpb compare "$out" --seeds "${SEEDS:-5}" --budget "$budget"
done
