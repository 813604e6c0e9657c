"""The fused Triton kernels on the CPU: their test modules (the tests marked `triton_interpret`, fp32 cases) run in
a subprocess under Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton is imported, hence the
subprocess). Skipped where Triton is not installed; tests/run.sh installs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]

# test module -> how many of its tests must have run (not skipped) under the interpreter
MODULES = {
    "tests/ops/test_vq_attention_fused.py": 34,
    "tests/ops/test_ema_scan.py": 18,
    "tests/ops/test_vq_quantize.py": 19,
    "tests/ops/test_linear_ce_fused.py": 27,
    "tests/ops/test_gates.py": 46,
    "tests/evals/test_bench_kernels.py": 3,
    "tests/evals/test_bench_vq_attention.py": 3,
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_fused_kernels_match_the_reference_under_the_interpreter(module):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "-m", "triton_interpret", str(ROOT / module)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "failed" not in summary, tail
    assert int(summary.split(" passed")[0].split()[-1]) >= MODULES[module], tail  # the fp32 cases really ran
