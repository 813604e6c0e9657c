#!/usr/bin/env bash
# Multi-node without SSH: run this same command on every node (by hand, by srun, or by any scheduler);
# torchrun's c10d rendezvous joins them.
#   NNODES=2 NPROC=8 MASTER_ADDR=node1 bash launch/run_torchrun.sh launch/configs/X.yaml parallel.zero_stage=2
# Under Slurm, srun starts one copy per node and SLURM_* variables fill these in (launch/slurm.sbatch).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
NNODES=${NNODES:-${SLURM_NNODES:-1}}
require_count NNODES "nodes taking part"
if [ -z "${NPROC+x}" ] && [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ]; then NPROC=$SLURM_GPUS_ON_NODE; fi
resolve_nproc
check_port MASTER_PORT
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n1 || true)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-longvq}}
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "$RDZV_ID" \
  -m lm.train "$@"
