#!/usr/bin/env bash
# One node, N processes (one per GPU; on a CPU-only machine, N CPU processes over gloo).
#   NPROC=8 bash launch/run_local.sh launch/configs/quickstart.yaml parallel.zero_stage=2 [--resume auto]
#   LAUNCHER=torchrun NPROC=8 bash launch/run_local.sh ...        (torchrun instead of deepspeed)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
resolve_nproc
check_port MASTER_PORT
PORT=${MASTER_PORT:-29500}
case "${LAUNCHER:-deepspeed}" in
  deepspeed) exec "$BIN/deepspeed" --num_gpus "$NPROC" --master_port "$PORT" --module lm.train "$@" ;;
  torchrun)  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m lm.train "$@" ;;
  *) echo "LAUNCHER=${LAUNCHER}: must be deepspeed or torchrun" >&2; exit 2 ;;
esac
