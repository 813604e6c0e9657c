#!/usr/bin/env bash
# Several nodes through the deepspeed launcher (needs passwordless SSH + pdsh from this node to the
# others, and the same checkout/venv path on every node). Without SSH use launch/run_torchrun.sh.
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node1 bash launch/run_multinode.sh launch/configs/X.yaml ...
set -euo pipefail
source "$(dirname "$0")/_common.sh"
HOSTFILE=${HOSTFILE:-launch/hostfile}
[ -f "$HOSTFILE" ] || { echo "HOSTFILE=$HOSTFILE not found: copy launch/hostfile.example and list your nodes" >&2; exit 2; }
check_port MASTER_PORT
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
exec "$BIN/deepspeed" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module lm.train "$@"
