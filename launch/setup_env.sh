#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) from requirements.txt. Idempotent: a stamp file
# records the requirements it was built from. Machines without an NVIDIA GPU get torch 2.13.0's CPU
# build (installed first so nothing pulls a multi-GB CUDA build); GPU machines get pip's default torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import torch, deepspeed" >/dev/null 2>&1; then
  exit 0
fi
echo "[setup] creating $VENV and installing requirements (first run: ~1-2 minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
fi
DS_BUILD_OPS=0 "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt
echo "$want" > "$stamp"
