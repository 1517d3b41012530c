#!/usr/bin/env bash
# The compose stack's head node: start Ray, deploy the Serve application on it, then live as long as Ray does.
# Ray runs in the background with --block so that, if it dies, this script (the container's PID 1) ends with it and
# the restart policy brings the node back; SIGTERM from `docker compose stop` is passed on for a clean shutdown.
set -euo pipefail

ray start --head --block \
  --port=6379 \
  --dashboard-host=0.0.0.0 --dashboard-port=8265 \
  --metrics-export-port="${RAY_METRICS_EXPORT_PORT:-8080}" \
  --num-cpus="${RAY_HEAD_CPUS:-4}" --num-gpus=0 &
ray_pid=$!
trap 'kill -TERM "$ray_pid" 2>/dev/null; wait "$ray_pid"' TERM INT

for _ in $(seq 1 60); do
  ray health-check --address 127.0.0.1:6379 >/dev/null 2>&1 && break
  kill -0 "$ray_pid" 2>/dev/null || { echo "ray start exited before the head came up" >&2; exit 1; }
  sleep 2
done

# Settings (model URI, MLflow server, API keys, replicas) come from the AIPD_* variables of the container.
# --address makes `aipd serve` deploy to this cluster and return; the application outlives the command.
aipd serve --address 127.0.0.1:6379 --host 0.0.0.0 --port 8000 --write-config /tmp/serve_config.yaml

wait "$ray_pid"
