#!/usr/bin/env bash
# Multi-node training on Ascend NPUs (HCCL): run this once on every node, same arguments, with that
# node's NODE_RANK.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/run_npu_cluster.sh --recipe R.yaml [section.field=value ...]
#
# Required: NNODES, NODE_RANK (0 .. NNODES-1), MASTER_ADDR (an address of node 0 every node reaches).
# Optional: MASTER_PORT (29500), NPROC_PER_NODE (8: one process per NPU of an Atlas 800T A2),
# PYTHON (python), ASCEND_TOOLKIT (/usr/local/Ascend/ascend-toolkit: its set_env.sh is sourced).
# HCCL settings (see parallel/README.md), each overridable from the environment:
#   HCCL_CONNECT_TIMEOUT  seconds to establish links at start-up (CANN default 120, range 120..7200);
#                         large jobs start slowly, so 1200 here
#   HCCL_EXEC_TIMEOUT     seconds a collective may wait for its peers (CANN default about 1800)
#   HCCL_BUFFSIZE         MB of HCCL buffer per communicator (CANN default 200); the all-to-all of one
#                         micro-batch's token copies should fit: mbs*seq*hidden*bytes*top_k/2^20
#   HCCL_IF_IP / HCCL_SOCKET_IFNAME  host NIC for bootstrapping, when auto-selection picks a wrong one
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (this node, 0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
PYTHON="${PYTHON:-python}"
ASCEND_TOOLKIT="${ASCEND_TOOLKIT:-/usr/local/Ascend/ascend-toolkit}"
if [[ -f "$ASCEND_TOOLKIT/set_env.sh" ]]; then
    # shellcheck disable=SC1091
    source "$ASCEND_TOOLKIT/set_env.sh"
fi
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"
export HCCL_BUFFSIZE="${HCCL_BUFFSIZE:-200}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m launch.torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m launch.train --no-progress "$@" train.device=npu parallel.devices_per_node="$NPROC_PER_NODE"
