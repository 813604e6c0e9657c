"""Nearest-code assignment in one Triton kernel: same signature and result as
`lm.ops.vq_quantize.vq_quantize_reference`, without the (B, T, H, S) score tensor.

Forward, one program per (block of BM key rows, head):
  * the keys' (BM, d) tile stays in registers; the codebook passes by in (BS, d) tiles in the keys' dtype (bf16
    tiles for bf16 keys, fp32 with IEEE products for fp32 keys), scores ||c||^2 - 2 k.c accumulated in fp32
    (||c||^2 from the fp32 codebook), a running (min, argmin) per row in registers (ties: the lower index);
  * the fp32 code vector c_z is gathered, k_hat = k + (c_z - k) is rounded as the reference rounds it (in k's
    dtype), codes are stored as int64;
  * per row ||k - c_z||^2 and ||k||^2 in fp32, summed per program into a partial (reduced by torch: the
    commitment loss and the error statistics are deterministic);
  * training: per-code statistics by atomic adds into the fp32 count (H, S) and sum (H, S, d) buffers (the
    order of the float additions is not fixed, like the reference's scatter_add on CUDA).
Backward (one elementwise kernel): dk = dk_hat + 2 g / (B T H) * (k - c_z), with c_z gathered again in fp32.

Importing needs Triton (ImportError otherwise, the dispatcher falls back); it needs no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SUPPORTED_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class KernelConfig:
    """Launch settings (the sweep of lm.bench.kernels passes others to `vq_quantize_fused`). Every program
    reads the head's whole codebook (64 KB in bf16 at S = 512, d = 64) from L2, so more rows per program means
    less L2 traffic."""

    block_m: int = 128
    """Key rows per tile."""
    block_s: int = 64
    """Codes per tile."""
    warps: int = 8
    stages: int = 2


CONFIG = KernelConfig()
"""The settings every call uses unless it passes its own."""


@triton.jit
def _key_rows(s_km, s_kh, M, BM: tl.constexpr, D: tl.constexpr):
    """This program's keys: head h = program_id(1), rows (block program_id(0)) of the flattened (B T) and their
    mask, the offsets of the (BM, D) key tile in (B T, H, D) with strides (s_km, s_kh, 1), and arange(D)."""
    h = tl.program_id(1)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    dd = tl.arange(0, D)
    return h, rows, rows < M, rows.to(tl.int64)[:, None] * s_km + h * s_kh + dd[None, :], dd


@triton.jit
def _quantize_kernel(K, CB, CBF, CN, KH, CODES, PART, CNT, SUM, M, S, H, s_km, s_kh,
                     D: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, STATS: tl.constexpr,
                     PREC: tl.constexpr):
    h, rows, rm, k_off, dd = _key_rows(s_km, s_kh, M, BM, D)
    k = tl.load(K + k_off, mask=rm[:, None], other=0.0)
    best = tl.full([BM], float("inf"), tl.float32)
    arg = tl.zeros([BM], tl.int32)
    cols = tl.arange(0, BS)
    for s0 in range(0, S, BS):
        s_idx = s0 + cols
        sm = s_idx < S
        c = tl.load(CB + (h * S + s_idx)[:, None] * D + dd[None, :], mask=sm[:, None], other=0.0)
        cn = tl.load(CN + h * S + s_idx, mask=sm, other=float("inf"))
        score = cn[None, :] - 2.0 * tl.dot(k, tl.trans(c), input_precision=PREC)
        blk_min = tl.min(score, axis=1)
        blk_arg = tl.argmin(score, axis=1) + s0
        better = blk_min < best
        arg = tl.where(better, blk_arg, arg)
        best = tl.where(better, blk_min, best)
    q = tl.load(CBF + (h * S + arg)[:, None] * D + dd[None, :])  # fp32 code vectors
    kf = k.to(tl.float32)
    diff = (q.to(k.dtype).to(tl.float32) - kf).to(k.dtype)  # as the reference: k + (c_z.to(k.dtype) - k)
    k_hat = (kf + diff.to(tl.float32)).to(KH.dtype.element_ty)
    tl.store(KH + k_off, k_hat, mask=rm[:, None])
    tl.store(CODES + rows.to(tl.int64) * H + h, arg.to(tl.int64), mask=rm)
    r = kf - q
    err = tl.where(rm, tl.sum(r * r, axis=1), 0.0)
    ksq = tl.where(rm, tl.sum(kf * kf, axis=1), 0.0)
    part = (tl.program_id(0) * H + h) * 2
    tl.store(PART + part, tl.sum(err, axis=0))
    tl.store(PART + part + 1, tl.sum(ksq, axis=0))
    if STATS:
        code = h * S + arg
        tl.atomic_add(CNT + code, tl.full([BM], 1.0, tl.float32), mask=rm, sem="relaxed")
        tl.atomic_add(SUM + code[:, None] * D + dd[None, :], kf, mask=rm[:, None], sem="relaxed")


@triton.jit
def _commit_grad_kernel(K, CBF, CODES, GKH, GC, DK, M, S, H, s_km, s_kh, scale,
                        D: tl.constexpr, BM: tl.constexpr, HAS_GKH: tl.constexpr):
    """DK = GKH + (2 g / (B T H)) (k - c_z), g = GC[0] the commitment loss's upstream gradient."""
    h, rows, rm, k_off, dd = _key_rows(s_km, s_kh, M, BM, D)
    kf = tl.load(K + k_off, mask=rm[:, None], other=0.0).to(tl.float32)
    code = tl.load(CODES + rows.to(tl.int64) * H + h, mask=rm, other=0)
    q = tl.load(CBF + (h * S + code)[:, None] * D + dd[None, :], mask=rm[:, None], other=0.0)
    g = (kf - q) * (tl.load(GC) * scale)
    if HAS_GKH:
        g += tl.load(GKH + k_off, mask=rm[:, None], other=0.0).to(tl.float32)
    tl.store(DK + k_off, g.to(DK.dtype.element_ty), mask=rm[:, None])


def supports(k: Tensor) -> bool:
    """True when the fused kernel handles keys k (B, T, H, d) (else the dispatcher uses the reference)."""
    if not (k.is_cuda and torch.cuda.is_available()):
        return False
    return k.dim() == 4 and k.dtype in _SUPPORTED_DTYPES and k.shape[-1] in _SUPPORTED_DIMS


class _FusedQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, cb_tiles, cb, cnorm, count, total, cfg):
        M, H, D = k.shape
        S = cb.shape[1]
        bm, bs = cfg.block_m, cfg.block_s
        k_hat = torch.empty_like(k)
        codes = torch.empty(M, H, dtype=torch.long, device=k.device)
        grid = (triton.cdiv(M, bm), H)
        part = torch.empty(grid[0] * H, 2, dtype=torch.float32, device=k.device)
        stats = count is not None
        _quantize_kernel[grid](
            k, cb_tiles, cb, cnorm, k_hat, codes, part, count if stats else part, total if stats else part,
            M, S, H, k.stride(0), k.stride(1),
            D=D, BM=bm, BS=bs, STATS=stats, PREC="ieee" if k.dtype == torch.float32 else "tf32",
            num_warps=cfg.warps, num_stages=cfg.stages)
        sums = part.sum(0)  # (sum ||k - c_z||^2, sum ||k||^2)
        ctx.save_for_backward(k, cb, codes)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(codes, sums)
        return k_hat, codes, sums[0] / (M * H), sums

    @staticmethod
    def backward(ctx, g_khat, g_codes, g_commit, g_sums):
        k, cb, codes = ctx.saved_tensors
        M, H, D = k.shape
        if g_commit is None:
            return g_khat, None, None, None, None, None, None
        if g_khat is not None and not g_khat.is_contiguous():
            g_khat = g_khat.contiguous()
        dk = torch.empty_like(k)
        bm = ctx.cfg.block_m
        _commit_grad_kernel[(triton.cdiv(M, bm), H)](
            k, cb, codes, g_khat if g_khat is not None else k, g_commit.float().reshape(1), dk,
            M, cb.shape[1], H, k.stride(0), k.stride(1), 2.0 / (M * H),
            D=D, BM=bm, HAS_GKH=g_khat is not None, num_warps=4)
        return dk, None, None, None, None, None, None


@torch.compiler.disable  # under torch.compile: an opaque call (Dynamo does not trace the Triton launches)
def _apply(*args):
    return _FusedQuantize.apply(*args)


def vq_quantize_fused(k: Tensor, codebook: Tensor, *, stats: Optional[tuple[Tensor, Tensor, Tensor]] = None,
                      config: KernelConfig = CONFIG):
    """Drop-in for `vq_quantize_reference` (see `supports`): (k_hat, codes, commit)."""
    B, T, H, D = k.shape
    if k.dtype not in _SUPPORTED_DTYPES or D not in _SUPPORTED_DIMS:
        raise ValueError(f"vq_quantize_fused: keys {k.dtype} with head dim {D} are not supported "
                         f"({_SUPPORTED_DTYPES}, dims {_SUPPORTED_DIMS}); use quantizer_impl=reference")
    if k.numel() == 0:
        from lm.ops.vq_quantize import vq_quantize_reference
        return vq_quantize_reference(k, codebook, stats=stats)
    kr = k.reshape(B * T, H, D).contiguous()
    with torch.no_grad():
        cb = codebook.detach().float().contiguous()
        tiles = cb if k.dtype == torch.float32 else cb.to(k.dtype)
        cnorm = cb.pow(2).sum(-1).contiguous()
    count = total = None
    if stats is not None:
        count, total, err = stats
        for t in (count, total, err):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError("vq_quantize_fused: statistics buffers must be contiguous float32")
    k_hat, codes, commit, sums = _apply(kr, tiles, cb, cnorm, count, total, config)
    if stats is not None:
        err += sums
    return k_hat.view(B, T, H, D), codes.view(B, T, H), commit


__all__ = ["supports", "vq_quantize_fused", "KernelConfig", "CONFIG"]
