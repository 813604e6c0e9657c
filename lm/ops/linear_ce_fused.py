"""Cross-entropy of one chunk of logits and its gradient, in one Triton kernel that overwrites the logits.

    loss_rows = ce_grad_inplace_triton(logits, targets, scale)

Same signature and result as `lm.ops.linear_ce.ce_grad_inplace_reference`: logits (n, V) any float dtype
(unit stride along V, any row stride), targets (n,) integer (-100 = ignored). Returns the per-row loss
lse - logit[target] (0 on ignored rows) in float32 (float64 for float64 logits), and the logits now hold
(softmax - onehot(target)) * scale in their own dtype (zero rows for ignored targets). A target outside
[0, V) that is not -100 gives a NaN loss and a NaN gradient row.

One program per row, two passes over it:
  1. the log-sum-exp by an online maximum and rescaled sum over BLOCK_V-wide tiles, in float32 registers;
  2. the tiles again (mostly from L2: a bf16 row of 32K logits is 64 KB), softmax - onehot, times scale,
     rounded to the logits' dtype and stored in place.
No (n, V) float32 tensor exists; the traffic is two reads and one write of the chunk. Row offsets are int64,
so chunks with n V >= 2^31 elements are addressed correctly. The math is float32 whatever the dtype (float64
logits keep float32 accuracy here; the dispatcher sends them to the reference).

Importing needs Triton (ImportError otherwise, the dispatcher falls back); it needs no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from lm.ops.linear_ce import IGNORE_INDEX

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes the CUDA dispatcher sends here (the interpreter also takes float64)."""


@dataclass(frozen=True)
class KernelConfig:
    """Launch settings. A row of V = 32,000..50,304 logits takes 8..13 tiles of 4,096: 16 elements per thread
    at 8 warps, in registers, with 16-byte bf16 loads."""

    block_v: int = 4096
    """Logits per tile (a power of two; capped at the next power of two above V)."""
    warps: int = 8


CONFIG = KernelConfig()
"""The settings every call uses unless it passes its own."""


@triton.jit
def _ce_grad_kernel(X, TGT, LOSS, V, stride_row, scale, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = X + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)

    # pass 1: log-sum-exp with a running maximum m and the sum s of exp(x - m)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)

    t = tl.load(TGT + row).to(tl.int64)
    valid = t != IGNORE
    in_range = (t >= 0) & (t < V)
    x_t = tl.load(base + tl.where(in_range, t, 0)).to(tl.float32)
    nan = float("nan")
    loss = tl.where(valid, tl.where(in_range, lse - x_t, nan), 0.0)
    tl.store(LOSS + row, loss.to(LOSS.dtype.element_ty))
    coef = tl.where(valid, tl.where(in_range, scale, nan), 0.0)

    # pass 2: (softmax - onehot) * scale over the same tiles, in place
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)) * coef
        g = tl.where(valid, g, 0.0)
        tl.store(base + cols, g.to(X.dtype.element_ty), mask=mask)


def supports(logits: Tensor) -> bool:
    """True when the kernel runs these logits on the GPU (else the dispatcher uses the reference)."""
    return (logits.is_cuda and logits.dim() == 2 and logits.dtype in SUPPORTED_DTYPES
            and (logits.shape[1] <= 1 or logits.stride(1) == 1))


def ce_grad_inplace_triton(logits: Tensor, targets: Tensor, scale: float, *, out: Optional[Tensor] = None,
                           config: KernelConfig = CONFIG) -> Tensor:
    """The kernel (see the module docstring). out: an optional (n,) buffer for the per-row loss."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (n, V) tensor, got {logits.dtype} {tuple(logits.shape)}")
    n, V = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"targets must be ({n},), got {tuple(targets.shape)}")
    if V > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have unit stride along the vocabulary, got strides {logits.stride()}")
    loss_dtype = torch.promote_types(logits.dtype, torch.float32)
    if out is None:
        out = torch.empty(n, dtype=loss_dtype, device=logits.device)
    elif out.shape != (n,) or out.dtype != loss_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({n},) {loss_dtype} tensor, got {out.dtype} {tuple(out.shape)}")
    if n == 0:
        return out
    block = min(config.block_v, triton.next_power_of_2(max(V, 1)))
    warps = max(1, min(config.warps, block // 128))
    _ce_grad_kernel[(n,)](logits, targets.contiguous(), out, V, logits.stride(0), float(scale),
                          IGNORE=IGNORE_INDEX, BLOCK_V=block, num_warps=warps)
    return out


__all__ = ["ce_grad_inplace_triton", "supports", "KernelConfig", "CONFIG", "SUPPORTED_DTYPES"]
