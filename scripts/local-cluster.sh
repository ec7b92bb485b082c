#!/usr/bin/env bash
# A real cluster on one machine, installed by pip alone (no Docker, no root needed):
# S3 (SeaweedFS), PostgreSQL (pgserver), an MLflow server on both, a Ray head and N worker nodes.
#   bash scripts/local-cluster.sh up [--workers 2]   # prints the environment to export
#   bash scripts/local-cluster.sh status
#   bash scripts/local-cluster.sh down [--purge]
# State (pids, ports, logs, data) in $LOCAL_CLUSTER_DIR (default .local-cluster/). See docs/deploy.md.
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/local_cluster.py" "$@"
