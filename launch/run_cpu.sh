#!/usr/bin/env bash
# Train on one CPU box with N gloo processes (torchrun --standalone, via launch.torchrun: SIGTERM exits 0): every parallel feature runs
# here exactly as on a cluster; "nodes" are a setting (parallel.devices_per_node).
#
#   launch/run_cpu.sh [NPROC] [section.field=value ...]
#   NPROC=4 RECIPE=configs/recipes/tiny_cpu.yaml launch/run_cpu.sh parallel.ep=4 parallel.dispatcher=hierarchical parallel.devices_per_node=2
#
# Environment: NPROC (default 4), RECIPE (default configs/recipes/tiny_cpu.yaml), PYTHON (default
# python), OMP_NUM_THREADS (default 1: N processes share the cores). The first positional argument
# may be NPROC; the rest are recipe overrides passed to launch.train.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then NPROC="$1"; shift; fi
NPROC="${NPROC:-4}"
RECIPE="${RECIPE:-configs/recipes/tiny_cpu.yaml}"
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m launch.torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" \
    -m launch.train --recipe "$RECIPE" --no-progress train.device=cpu "$@"
