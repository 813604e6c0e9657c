"""Kernel-level benchmark of VQ attention: the fused kernel against the chunked PyTorch reference and SDPA.

    rows = check_fused(device)                                   # fused vs reference, fp32 and bf16
    row = context_row(AttentionShape(), 8192, 65536, [512, 256], device)

`check_fused` compares outputs and gradients (q, k, v, bias) with the reference on small shapes with odd
lengths. `context_row` times forward+backward in bf16 (lm.bench.timing.Timer: median of triton.testing.do_bench
on CUDA) with `tokens` tokens per call (B = tokens / T, at least 1): the fused kernel per chunk size (with and
without bias, forward alone, peak memory, TFLOP/s), the chunked reference at the first chunk size, and causal
SDPA with the same head count per backend. `config_sweep` times launch settings and the kernel's parts at one
context. The fused kernel is called directly, so all of it also runs on the CPU under TRITON_INTERPRET=1 (fp32,
tiny shapes, SDPA backend "math").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lm.bench.timing import Timer, rel_error
from lm.ops import vq_attention_fused as fz
from lm.ops.vq_attention_ref import chunked_vq_attention

CHECK_CASES = ((2, 64 * 3 + 5, 3, 64, 32, 128, 64), (1, 512 * 3 + 77, 2, 64, 64, 512, 512),
               (1, 256 * 5 + 1, 2, 128, 64, 200, 256))
"""(B, T, H, Dk, Dv, S, C) shapes of the correctness check."""
CHECK_DTYPES = ((torch.float32, 1e-4), (torch.bfloat16, 2e-2))
"""(dtype, tolerance on the relative error of the output and every gradient)."""
TILE_SWEEP = (
    dict(fwd_block_n=64, dq_block_n=64, dkdv_block_m=64),  # 64 x 64 tiles everywhere
    dict(stages=2),
    dict(stages=4),
    dict(fwd_block_n=64),
    dict(fwd_block_m=128, fwd_block_n=64, fwd_warps=8),
    dict(dq_block_n=64),
    dict(dq_block_n=16),
    dict(dq_block_m=32),
    dict(dq_block_m=128, bwd_warps=8),
    dict(dkdv_block_m=64),
    dict(dkdv_block_m=16),
    dict(dkdv_block_n=32),
    dict(dkdv_block_n=128, bwd_warps=8),
    dict(cache_block=32),
)
"""KernelConfig changes (on top of CONFIG) the tile rows of `config_sweep` time, fwd+bwd with bias: 64 x 64 tiles
everywhere, other stage counts, then one kernel's tiles at a time around the defaults (bwd_warps and stages apply
to every backward kernel)."""
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


@dataclass(frozen=True)
class AttentionShape:
    """H heads, query/key head dim Dk, value head dim Dv, codebook size S."""

    H: int = 12
    Dk: int = 64
    Dv: int = 64
    S: int = 512


def attention_inputs(B: int, T: int, shape: AttentionShape, C: int, dtype, device: torch.device,
                     with_bias: bool = True, seed: int = 0):
    """Random (q, k_hat, v, codes, codebook, bias) in dtype: k_hat the codebook rows of the codes, bias (H, C + 1)
    fp32 or None."""
    H, Dk, Dv, S = shape.H, shape.Dk, shape.Dv, shape.S
    g = torch.Generator(device=device).manual_seed(seed)
    cb = torch.randn(H, S, Dk, device=device, generator=g)
    codes = torch.randint(0, S, (B, T, H), device=device, generator=g)
    k_hat = cb[torch.arange(H, device=device)[None, None, :], codes].to(dtype)
    q = torch.randn(B, T, H, Dk, device=device, generator=g).to(dtype)
    v = torch.randn(B, T, H, Dv, device=device, generator=g).to(dtype)
    bias = (0.1 * torch.randn(H, C + 1, device=device, generator=g)) if with_bias else None
    return q, k_hat, v, codes, cb.to(dtype), bias


def forward_backward(fn: Callable, q, k, v, codes, cb, bias, C: int, grad, **kwargs) -> list:
    """[out, dq, dk, dv(, dbias)] of fn(q, k, v, codes, cb, chunk_size=C, bias=bias) with upstream gradient grad."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    b = bias.detach().requires_grad_() if bias is not None else None
    out, _ = fn(*leaves, codes, cb, chunk_size=C, bias=b, **kwargs)
    out.backward(grad)
    return [out] + [x.grad for x in leaves] + ([b.grad] if b is not None else [])


def check_fused(device: torch.device, cases: Iterable[tuple] = CHECK_CASES,
                dtypes: Iterable[tuple] = CHECK_DTYPES) -> list[dict]:
    """The fused kernel against the fp32 chunked reference, with bias: one row per (dtype, case) with the relative
    errors of (out, dq, dk, dv, dbias) and ok = all finite and within the dtype's tolerance."""
    rows = []
    for dtype, tol in dtypes:
        for case in cases:
            B, T, H, Dk, Dv, S, C = case
            q, k, v, codes, cb, bias = attention_inputs(B, T, AttentionShape(H, Dk, Dv, S), C, dtype, device, seed=T)
            grad = torch.randn(B, T, H, Dv, device=device)
            ref = forward_backward(chunked_vq_attention, q.float(), k.float(), v.float(), codes, cb.float(), bias,
                                   C, grad)
            got = forward_backward(fz.fused_vq_attention, q, k, v, codes, cb, bias, C, grad.to(dtype))
            errs = [rel_error(a, b) for a, b in zip(got, ref)]
            rows.append({"dtype": str(dtype), "shape(B,T,H,Dk,Dv,S,C)": case,
                         "rel_err(out,dq,dk,dv,dbias)": [float(f"{e:.3g}") for e in errs], "tol": tol,
                         "ok": all(math.isfinite(e) and e <= tol for e in errs)})
    return rows


def vq_flops(B: int, T: int, H: int, Dk: int, Dv: int, C: int, S: int) -> float:
    """Forward+backward FLOPs counted like FlashAttention (backward = 2.5 forward): keys per query ~ C/2 + C + S."""
    keys = min(T, C) / 2 + (C if T > C else 0) + (S if T > 2 * C else 0)
    return 3.5 * 2 * B * H * T * keys * (Dk + Dv)


def sdpa_flops(B: int, T: int, H: int, D: int) -> float:
    """Forward+backward FLOPs of causal attention, counted as `vq_flops`."""
    return 3.5 * 2 * B * H * T * (T / 2) * 2 * D


def _peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def config_sweep(shape: AttentionShape, tokens: int, T: int, C: int, device: torch.device,
                 dtype=torch.bfloat16, tiles: Iterable[dict] = TILE_SWEEP) -> list[dict]:
    """Time the kernel's parts (cache tables alone, forward with and without bias, forward+backward per bias-gradient
    strategy), a few warp/stage settings and the tile settings `tiles` (KernelConfig changes, forward+backward with
    bias) at context T, chunk C. One row per setting: the KernelConfig fields, changes (the fields that differ from
    CONFIG), a note and ms (None where the setting fails to compile or is refused)."""
    B = max(1, tokens // T)
    q, k, v, codes, cb, bias = attention_inputs(B, T, shape, C, dtype, device)
    grad = torch.randn(B, T, shape.H, shape.Dv, device=device, dtype=dtype)
    timer, rows = Timer(device), []

    def timed(note: str, make_fn: Callable, **changes) -> None:
        config = dataclasses.replace(fz.CONFIG, **changes)
        try:
            ms = timer(make_fn(config), 10, 50)
        except Exception as e:  # noqa: BLE001  (a setting that fails to compile: recorded as None)
            ms = None
            note = f"{note} (failed: {e!r:.200})"
        rows.append(dict(dataclasses.asdict(config), changes=changes, note=note, ms=ms))

    def fwd_bwd(b):
        return lambda config: lambda: forward_backward(fz.fused_vq_attention, q, k, v, codes, cb, b, C, grad,
                                                       config=config)

    def fwd(b):
        def make_fn(config):
            @torch.no_grad()
            def f():
                fz.fused_vq_attention(q, k, v, codes, cb, chunk_size=C, bias=b, config=config)
            return f
        return make_fn

    timed("glue: cache tables only", lambda config: lambda: fz.cache_tables(codes, v, None, C, shape.S,
                                                                             math.ceil(T / C)))
    timed("fwd, bias", fwd(bias))
    timed("fwd, no bias", fwd(None))
    timed("fwd+bwd, no bias", fwd_bwd(None))
    for bias_grad in ("gather", "atomic", "skip"):
        timed(f"fwd+bwd, bias, bias_grad={bias_grad}", fwd_bwd(bias), bias_grad=bias_grad)
    for fw, bw, st in ((8, 4, 2), (4, 8, 2), (4, 4, 3), (4, 4, 4)):
        timed("fwd+bwd, bias", fwd_bwd(bias), fwd_warps=fw, bwd_warps=bw, stages=st)
    for changes in tiles:
        timed("fwd+bwd, bias, tiles", fwd_bwd(bias), **changes)
    return rows


def _chunk_timings(shape: AttentionShape, B: int, T: int, C: int, device: torch.device, dtype, *, first: bool,
                   with_reference: bool) -> dict:
    """The fused_C{C}_* (and at the first chunk size the no-bias and chunked_C{C}_*) entries of `context_row`."""
    H, Dk, Dv, S = shape.H, shape.Dk, shape.Dv, shape.S
    timer, out = Timer(device), {}
    q, k, v, codes, cb, bias = attention_inputs(B, T, shape, C, dtype, device)
    grad = torch.randn(B, T, H, Dv, device=device, dtype=dtype)

    def fused_fwd_bwd(b):
        return lambda: forward_backward(fz.fused_vq_attention, q, k, v, codes, cb, b, C, grad)

    @torch.no_grad()
    def fused_fwd():
        fz.fused_vq_attention(q, k, v, codes, cb, chunk_size=C, bias=bias)

    _reset_peak(device)
    ms = out[f"fused_C{C}_ms"] = timer(fused_fwd_bwd(bias))
    out[f"fused_C{C}_peak_GiB"] = _peak_gib(device)
    out[f"fused_C{C}_TFLOPs"] = vq_flops(B, T, H, Dk, Dv, C, S) / ms / 1e9
    out[f"fused_C{C}_fwd_ms"] = timer(fused_fwd)
    if first:
        out[f"fused_C{C}_nobias_ms"] = timer(fused_fwd_bwd(None))
    if first and with_reference:
        _reset_peak(device)
        out[f"chunked_C{C}_ms"] = timer(
            lambda: forward_backward(chunked_vq_attention, q, k, v, codes, cb, bias, C, grad), 5, 30)
        out[f"chunked_C{C}_peak_GiB"] = _peak_gib(device)
    return out


def context_row(shape: AttentionShape, T: int, tokens: int, chunks: list[int], device: torch.device, *,
                with_reference: bool = True, sdpa_backends: Iterable[str] = ("cudnn", "flash"),
                dtype=torch.bfloat16) -> dict:
    """One context's timings (ms, forward+backward unless named _fwd): fused_C{C}_ms, _peak_GiB, _TFLOPs, _fwd_ms
    per chunk size C; fused_C{C0}_nobias_ms and chunked_C{C0}_ms/_peak_GiB at the first chunk size C0 (the
    reference when with_reference); sdpa_{backend}_ms/_TFLOPs (None when the backend refuses: its error is in
    sdpa_{backend}_error). Peak memory is None off CUDA."""
    B = max(1, tokens // T)
    row = {"context": T, "batch": B, "tokens": B * T}
    for C in chunks:
        row.update(_chunk_timings(shape, B, T, C, device, dtype, first=C == chunks[0], with_reference=with_reference))
    H, Dk = shape.H, shape.Dk
    qs, ks, vs = (torch.randn(B, H, T, Dk, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    gs = torch.randn(B, H, T, Dk, device=device, dtype=dtype)

    def sdpa():
        qs.grad = ks.grad = vs.grad = None
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(gs)

    for name in sdpa_backends:
        try:
            with sdpa_kernel([SDPA_BACKENDS[name]]):
                row[f"sdpa_{name}_ms"] = Timer(device)(sdpa, 10, 50)
            row[f"sdpa_{name}_TFLOPs"] = sdpa_flops(B, T, H, Dk) / row[f"sdpa_{name}_ms"] / 1e9
        except RuntimeError as e:  # the backend does not run these inputs on this device
            row[f"sdpa_{name}_ms"] = None
            row[f"sdpa_{name}_error"] = f"{e!r:.300}"
    return row


def summary_table(rows: list[dict], chunks: list[int], with_reference: bool = True,
                  sdpa_backends: Iterable[str] = ("cudnn", "flash")) -> list[str]:
    """Markdown lines: per context the timed columns and the speed-up of the fused kernel (first chunk size) over
    the first SDPA backend."""
    C0, backends = chunks[0], list(sdpa_backends)
    cols = [f"fused_C{c}_ms" for c in chunks] + [f"fused_C{C0}_fwd_ms", f"fused_C{C0}_TFLOPs"]
    cols += ([f"chunked_C{C0}_ms"] if with_reference else []) + [f"sdpa_{b}_ms" for b in backends]
    first = f"sdpa_{backends[0]}_ms" if backends else None
    lines = ["| context | B | " + " | ".join(cols) + f" | speedup vs {backends[0] if backends else '-'} |",
             "|" + "---|" * (len(cols) + 3)]
    for r in rows:
        sp = r[first] / r[f"fused_C{C0}_ms"] if first and r.get(first) else float("nan")
        lines.append(f"| {r['context']} | {r['batch']} | "
                     + " | ".join("-" if r.get(c) is None else f"{r[c]:.2f}" for c in cols) + f" | {sp:.2f}x |")
    return lines


__all__ = ["AttentionShape", "CHECK_CASES", "CHECK_DTYPES", "SDPA_BACKENDS", "attention_inputs", "forward_backward",
           "check_fused", "vq_flops", "sdpa_flops", "TILE_SWEEP", "config_sweep", "context_row", "summary_table"]
