#!/usr/bin/env bash
# The test suite: set up the environment (.venv from requirements.txt), then run pytest on CPU.
# GPU tests skip themselves without CUDA. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec .venv/bin/python -m pytest -q tests "$@"
