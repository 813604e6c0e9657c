# Sourced by the launch scripts: repo root, python, and environment shared by every launcher.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
BIN=$(dirname "$PYTHON")
# NVLink multicast (NVLS) stays off: it is not needed for this model's collectives, and on shared
# hosts a job using it can take other tenants' GPUs down. Override by exporting these yourself.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
# require_count NAME: the variable NAME must hold a positive whole number (e.g. NPROC=8); otherwise say so
# and stop, instead of silently running something else.
require_count() {
  local value=${!1}
  if [[ ! "$value" =~ ^[0-9]+$ ]] || (( 10#$value < 1 )); then
    echo "$1=$value: give a positive whole number${2:+ ($2)}" >&2
    exit 2
  fi
  printf -v "$1" '%d' "$((10#$value))"
}
# resolve_nproc: NPROC as given (checked), else one process per GPU of this node, else 1 (CPU).
resolve_nproc() {
  if [ -n "${NPROC+x}" ]; then
    require_count NPROC "processes per node; leave NPROC unset for one per GPU"
    return
  fi
  NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU || true)
  [ "${NPROC:-0}" -ge 1 ] || NPROC=1
}
# check_port NAME: the variable NAME, if set, must be a TCP port number.
check_port() {
  local value=${!1:-}
  [ -z "$value" ] && return
  if [[ ! "$value" =~ ^[0-9]+$ ]] || (( 10#$value < 1 || 10#$value > 65535 )); then
    echo "$1=$value: give a TCP port number between 1 and 65535" >&2
    exit 2
  fi
}
