"""lm.bench.kernels (the method of python -m evals.bench_kernels) on tiny shapes.

The `gpu` + `triton_interpret` tests call the Triton kernels: on a GPU they run on CUDA in bf16; on the CPU
tests/ops/test_fused_interpreter.py runs them under TRITON_INTERPRET=1 in fp32 (the timings mean nothing there;
the checks, the rows' structure and the sweep's bookkeeping do)."""

import json
import time

import pytest
import torch

pytest.importorskip("triton")
from lm.bench import kernels as kb  # noqa: E402
from lm.bench.timing import Timer  # noqa: E402
from tests.fused_kernels import CUDA  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPE = kb.BlockShape(D=16, N=4, H=2, d=16, S=16)


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_the_whole_benchmark_on_tiny_shapes():
    res = kb.run_kernel_bench(kb.KERNELS, 64, [32, 64], DEVICE, dtype=DTYPE, shape=SHAPE,
                              sweep=True, top=1, update_layers=2, update_tokens=64,
                              sweep_grids=([(32, 16, 1, 4), (16, 16, 1, 2)], [(32, 16, 1, 1)], [(8, 16, 1), (16, 32, 2)]))
    assert res["failed_checks"] == [], res["checks"]
    assert res["checks"]["ema"]["out"] <= kb.TOL_BF16["ema_out"] and res["checks"]["quantize"]["codes_equal"] > 0.97
    assert res["meta"]["dtype"] == str(DTYPE).replace("torch.", "") and res["meta"]["tokens"] == 64
    by = {}
    for r in res["rows"]:
        by.setdefault(r["kernel"], []).append(r)
    assert [(r["arm"], r["T"], r["B"]) for r in by["ema"]] == [("fft", 32, 2), ("triton_scan", 32, 2),
                                                               ("fft", 64, 1), ("triton_scan", 64, 1)]
    for r in by["ema"] + by["quantize"]:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    assert all(r["speedup_fwd_bwd_vs_fft"] == 1.0 for r in by["ema"] if r["arm"] == "fft")
    assert by["ema"][1]["ideal_fwd_ms"] > 0 and by["ema"][1]["fwd_GBps"] > 0
    assert [r["arm"] for r in by["quantize"]] == ["reference", "fused"]
    assert by["quantize"][1]["speedup_fwd_bwd_vs_reference"] == pytest.approx(
        by["quantize"][0]["fwd_bwd_ms"] / by["quantize"][1]["fwd_bwd_ms"])
    assert len(by["ema_sweep"]) == 1 and len(by["quantize_sweep"]) == 1 and len(by["gates_sweep"]) == 1  # top=1
    assert [(r["arm"], r["T"]) for r in by["gates"]] == [("reference", 32), ("triton", 32), ("reference", 64),
                                                         ("triton", 64)]
    assert res["checks"]["gates"]["d_mx"] <= kb.TOL_BF16["gates"] and by["gates"][1]["ideal_fwd_bwd_ms"] > 0
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in by["gates"])
    assert [r["arm"] for r in by["codebook_update"]] == ["split", "batch"]
    assert all(r["sync_free"] is (True if CUDA else None) for r in by["codebook_update"])
    json.dumps(res)  # the result is what the CLI writes
    table = kb.kernel_table(res["rows"])
    assert len(table) == 1 + len(res["rows"]) and "sync_free=" in table[-1]


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_a_wrong_kernel_fails_its_check(monkeypatch):
    from lm.ops import vq_quantize_fused

    real = vq_quantize_fused.vq_quantize_fused

    def shifted(k, cb, **kw):  # every key assigned the next code
        k_hat, codes, commit = real(k, cb, **kw)
        return k_hat, (codes + 1) % cb.shape[1], commit

    monkeypatch.setattr(vq_quantize_fused, "vq_quantize_fused", shifted)
    _, checks, ok = kb.quantize_rows(SHAPE, 64, 32, DEVICE, DTYPE)
    assert not ok and checks["codes_equal"] < 0.5


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_a_wrong_gate_kernel_fails_its_check(monkeypatch):
    from lm.ops import gates_fused

    real = gates_fused.gated_residual_triton
    monkeypatch.setattr(gates_fused, "gated_residual_triton", lambda *a, **k: real(*a, **{**k, "residual": "gated"}))
    errors, ok = kb.gates_check(SHAPE, 16, 2, DEVICE, DTYPE)  # the gated rule where the block asks for add
    assert not ok and errors["out"] > 0.1
    monkeypatch.undo()
    assert kb.gates_check(SHAPE, 16, 2, DEVICE, DTYPE)[1]


def test_cpu_timer_runs_its_budgets_with_at_least_one_call_each():
    calls = []
    timer = Timer(torch.device("cpu"))
    assert timer(lambda: calls.append(1), warmup=0, rep=0) >= 0 and len(calls) == 1
    calls.clear()
    assert timer(lambda: (calls.append(1), time.sleep(0.03)), warmup=1, rep=1) >= 30
    assert len(calls) == 2  # each budget is shorter than one call
    calls.clear()
    timer(lambda: calls.append(1), warmup=5, rep=20)
    assert len(calls) > 2


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown kernel"):
        kb.run_kernel_bench(["attention"], 64, [32], torch.device("cpu"))
