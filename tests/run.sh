#!/usr/bin/env bash
# The test suite: set up the environment (.venv from requirements.txt), then run pytest on CPU.
# GPU tests skip themselves without CUDA. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
# Triton for the CPU run of the fused kernels under its interpreter (tests/ops/test_fused_interpreter.py);
# test-only: the CPU main job does not need it (GPU installs get it with torch)
.venv/bin/python -c "import triton" >/dev/null 2>&1 || .venv/bin/pip install -q --disable-pip-version-check "triton>=3.2,<4"
exec .venv/bin/python -m pytest -q tests "$@"
