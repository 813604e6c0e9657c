"""Nearest-code assignment of keys: public entry and PyTorch twin (what VectorQuantizer.forward computes).

    k_hat, codes, commit = vq_quantize(k, codebook, stats=(count, total, err), impl="auto")

Shapes: k (B, T, H, d) any float dtype; codebook (H, S, d) float32 (a constant: no gradient).
Returns
    k_hat  (B, T, H, d) k.dtype   value k + (c_z - k) in k's dtype, gradient the identity (straight-through);
    codes  (B, T, H) int64        z = argmin_s ||k - c_s||^2 (the first index among equal distances);
    commit ()  float32            mean over (B, T, H) of ||k - c_z||^2 in float32, differentiable in k.
stats (optional, training): float32 buffers updated in place, count (H, S) += keys per code, total (H, S, d) +=
their sum, err (2,) += (sum ||k - c_z||^2, sum ||k||^2).

impl: "reference" (`vq_quantize_reference`: float32 score tensor (B, T, H, S), argmin, gather, scatter-add),
"fused" (lm/ops/vq_quantize_fused.py: one Triton kernel, CUDA; no score tensor), "auto" (fused where
`supports` says so, else reference; logged once).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lm.ops.dispatch import check_impl, choose_auto, require_fused

IMPLS = ("reference", "fused", "auto")


def resolve_impl(impl: str, k: Tensor) -> str:
    """'reference' or 'fused' for these keys (logs the choice for 'auto' once)."""
    check_impl("quantizer impl", impl, IMPLS)
    if impl != "auto":
        return impl
    return choose_auto("vq_quantize impl=auto", k.is_cuda, "vq_quantize_fused", lambda m: m.supports(k),
                       fast="fused", fallback="reference")


@torch.no_grad()
def accumulate_stats(stats: tuple[Tensor, Tensor, Tensor], k: Tensor, codes: Tensor, quant: Tensor) -> None:
    """Add this batch to (count (H, S), total (H, S, d), err (2,)): k float32 (B, T, H, d), quant = c_z float32."""
    count, total, err = stats
    H, d = count.shape[0], total.shape[-1]
    err[0] += (k - quant).pow(2).sum().to(err.dtype)
    err[1] += k.pow(2).sum().to(err.dtype)
    flat_codes = codes.reshape(-1, H).t()  # (H, N)
    flat_k = k.reshape(-1, H, d).transpose(0, 1)  # (H, N, d)
    count.scatter_add_(1, flat_codes, torch.ones_like(flat_codes, dtype=count.dtype))
    total.scatter_add_(1, flat_codes[..., None].expand(-1, -1, d), flat_k.to(total.dtype))


def vq_quantize_reference(k: Tensor, codebook: Tensor, *, stats: Optional[tuple[Tensor, Tensor, Tensor]] = None):
    """Distances in float32 through a (B, T, H, S) score tensor (see the module docstring)."""
    B, T, H, d = k.shape
    cb = codebook.float().detach()
    with torch.no_grad(), torch.autocast(k.device.type, enabled=False):
        kf = k.detach().float()
        # argmin_s ||k - c_s||^2 = argmin_s (||c_s||^2 - 2 k.c_s): ||k||^2 is constant per row
        scores = cb.pow(2).sum(-1)[None, None] - 2 * torch.einsum("bthd,hsd->bths", kf, cb)
        codes = scores.argmin(dim=-1)  # (B, T, H)
    head = torch.arange(H, device=k.device)[None, None].expand(B, T, H)
    quant = cb[head, codes]  # (B, T, H, d) float32
    k_hat = k + (quant.to(k.dtype) - k).detach()
    with torch.autocast(k.device.type, enabled=False):
        commit = (k.float() - quant).pow(2).sum(-1).mean()
        if stats is not None:
            accumulate_stats(stats, kf, codes, quant)
    return k_hat, codes, commit


def vq_quantize(k: Tensor, codebook: Tensor, *, stats: Optional[tuple[Tensor, Tensor, Tensor]] = None,
                impl: str = "auto"):
    """Dispatch to the reference or the fused kernel (see the module docstring)."""
    impl = resolve_impl(impl, k)
    if impl == "reference":
        return vq_quantize_reference(k, codebook, stats=stats)
    fused = require_fused("vq_quantize_fused",
                          "quantizer_impl=fused needs Triton and a CUDA GPU; use quantizer_impl=reference or auto")
    return fused.vq_quantize_fused(k, codebook, stats=stats)


__all__ = ["vq_quantize", "vq_quantize_reference", "accumulate_stats", "resolve_impl", "IMPLS"]
