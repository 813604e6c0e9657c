"""lm.bench.vq_attention (the method of python -m evals.bench_vq_attention) on tiny shapes.

The `gpu` + `triton_interpret` tests call the fused kernel: on a GPU on CUDA; on the CPU
tests/ops/test_fused_interpreter.py runs them under TRITON_INTERPRET=1 in fp32 with SDPA's math backend."""

import pytest
import torch

pytest.importorskip("triton")
from lm.bench import vq_attention as vb  # noqa: E402
from tests.fused_kernels import CUDA  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BACKENDS = ("flash",) if CUDA else ("math",)
SHAPE = vb.AttentionShape(H=2, Dk=16, Dv=32, S=32)
CASE = (1, 64 * 2 + 3, 2, 16, 32, 32, 64)  # (B, T, H, Dk, Dv, S, C): three chunks, the last one partial


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_check_passes_and_a_wrong_kernel_fails(monkeypatch):
    rows = vb.check_fused(DEVICE, cases=[CASE], dtypes=[(torch.float32, 1e-4)])
    assert len(rows) == 1 and rows[0]["ok"], rows
    assert len(rows[0]["rel_err(out,dq,dk,dv,dbias)"]) == 5
    real = vb.fz.fused_vq_attention
    monkeypatch.setattr(vb.fz, "fused_vq_attention", lambda *a, **k: (lambda o, s: (o * 1.01, s))(*real(*a, **k)))
    assert not vb.check_fused(DEVICE, cases=[CASE], dtypes=[(torch.float32, 1e-4)])[0]["ok"]


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_context_row_and_table():
    row = vb.context_row(SHAPE, 128, 128, [128, 64], DEVICE, sdpa_backends=BACKENDS, dtype=DTYPE)
    assert (row["context"], row["batch"], row["tokens"]) == (128, 1, 128)
    for key in ("fused_C128_ms", "fused_C128_fwd_ms", "fused_C128_nobias_ms", "chunked_C128_ms", "fused_C64_ms",
                f"sdpa_{BACKENDS[0]}_ms"):
        assert row[key] > 0, key
    assert "fused_C64_nobias_ms" not in row and "chunked_C64_ms" not in row  # first chunk size only
    assert row["fused_C128_TFLOPs"] == pytest.approx(vb.vq_flops(1, 128, 2, 16, 32, 128, 32) / row["fused_C128_ms"] / 1e9)
    assert (row["fused_C128_peak_GiB"] is None) == (not CUDA)
    table = vb.summary_table([row], [128, 64], sdpa_backends=BACKENDS)
    assert len(table) == 3 and table[2].startswith("| 128 | 1 | ") and table[2].endswith("x |")


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_config_sweep_times_every_setting():
    tiles = (*vb.TILE_SWEEP, dict(dq_block_m=48))  # the last one refused: recorded as None
    rows = vb.config_sweep(SHAPE, 128, 128, 64, DEVICE, dtype=DTYPE, tiles=tiles)
    assert len(rows) == 11 + len(tiles)
    assert all({"note", "ms", "changes", "fwd_warps", "bias_grad", "dq_block_m", "dkdv_block_n"} <= r.keys()
               for r in rows)
    assert rows[0]["note"] == "glue: cache tables only" and rows[0]["ms"] > 0
    assert all(r["ms"] is None or r["ms"] > 0 for r in rows)
    tile_rows = rows[11:-1]
    assert [r["changes"] for r in tile_rows] == list(vb.TILE_SWEEP)
    assert all(r[k] == v for r in tile_rows for k, v in r["changes"].items())
    assert all(r["ms"] is not None for r in tile_rows)  # every tile setting runs (at C = 64: capped to 64)
    assert rows[-1]["ms"] is None and "KernelConfig.dq_block_m must be one of" in rows[-1]["note"]


def test_flop_counts():
    # within one chunk: T/2 keys per query on average; past 2C: C/2 + C + S
    assert vb.vq_flops(1, 64, 1, 16, 16, 64, 32) == 3.5 * 2 * 64 * 32 * 32
    assert vb.vq_flops(1, 256, 1, 16, 16, 64, 32) == 3.5 * 2 * 256 * (32 + 64 + 32) * 32
    assert vb.sdpa_flops(1, 64, 1, 16) == 3.5 * 2 * 64 * 32 * 32
