"""The element-wise gates of the LongVQ block around its GEMMs: public entries and PyTorch twins.

Two sites of `lm.model.longvq.LongVQMixer.forward` (docs/model.md has the block's equations):

    u, q, k, r, hx = gate_split(mx, qk_scale, qk_shift, sizes=(D, dz, E), heads=H, query_norm=False,
                                key_norm="rms", dtype=dt, impl="auto")
        mx (..., D + dz + E + D), the output of the shared projection, is split into
            u  = sigmoid(mx[:D])                                         (..., D)     mx.dtype
            z  = SiLU(mx[D:D + dz]),  r = SiLU(mx[D + dz:D + dz + E])    r: (..., E)  mx.dtype
            q  = (z * qk_scale[0] + qk_shift[0]).to(dt)  per head (..., H, dz / H), RMS-normalised when query_norm
            k  = (z * qk_scale[1] + qk_shift[1]).to(dt)  per head, normalised by key_norm: None (off), "rms"
                 (RMS norm without gain) or "center_rms" (LayerNorm without gain), eps 1e-6
            hx = mx[D + dz + E:]                                         (..., D)     a view of mx
        qk_scale, qk_shift: (2, dz). Gradients: mx, qk_scale, qk_shift.

    out = gated_residual(hx, y, u, x, residual="add", dropout=0.0, impl="auto")
        h   = Dropout_p(SiLU(hx + y))          y = the output projection of the gated attention, (a * r) W_h
        out = x + u * h                        residual="add"
        out = x + u * (h - x)                  residual="gated"
        All (..., D); out has the promoted dtype of its inputs. Gradients: hx, y, u, x.

    out, normed = gated_residual_norm(hx, y, u, x, weight, eps=eps, residual="add", dropout=0.0, impl="auto")
        out as gated_residual, then the pre-norm of the feed-forward that follows the mixer in its block:
        normed = F.rms_norm(out, (D,), weight.to(out.dtype), eps)   (lm.model.common.RMSNorm's expression)
        weight (D,). normed has the dtype F.rms_norm gives there (fp32 under CUDA autocast, else out's).
        Gradients: hx, y, u, x, weight, from the cotangents of both outputs.

impl: "reference" (the PyTorch expressions above, the CPU path and the executable spec), "triton"
(lm/ops/gates_fused.py: one kernel per site forward and one backward; CUDA), "auto" (see `resolve_impl`).
The Triton gated residual (with or without the norm) has no dropout: with dropout > 0 (training with
model.dropout) auto takes the reference and impl="triton" is an error. The product a * r that feeds W_h stays a PyTorch multiply: it is
one element-wise kernel forward (the GEMM's input) and its backward is two products of the GEMM's input
gradient, which no single kernel here would save a pass over.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lm.ops.dispatch import check_impl, choose_auto, log_choice, require_fused

IMPLS = ("reference", "triton", "auto")
KEY_NORMS = (None, "rms", "center_rms")
RESIDUALS = ("add", "gated")
NORM_EPS = 1e-6
"""eps of the per-head normalisations of q and k (lm.model.common.rms_normalize's)."""


def resolve_impl(impl: str, site: str, x: Tensor, supported: bool = True) -> str:
    """'reference' or 'triton' for the gate site `site` ("gate_split", "gated_residual" or
    "gated_residual_norm") on input x.

    auto: triton when x is on CUDA, Triton imports and `supported` (the site's options are ones the kernel
    has); the reference under torch.compile (Inductor fuses these element-wise ops into its own kernels, and
    the Triton call would be an opaque break in the compiled graph) and everywhere else. The choice is logged
    once per site and reason."""
    check_impl("model.longvq.gate_impl", impl, IMPLS)
    if impl != "auto":
        return impl
    setting = f"gate_impl=auto ({site})"
    if torch.compiler.is_compiling():
        return "reference"
    if not supported:
        log_choice(setting, "reference", "the kernel does not support these options")
        return "reference"
    return choose_auto(setting, x.is_cuda, "gates_fused", lambda m: m.supports(x), fast="triton",
                       fallback="reference")


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def _check_split(mx: Tensor, qk_scale: Tensor, sizes: tuple[int, int, int], heads: int, key_norm) -> None:
    D, dz, E = sizes
    if mx.shape[-1] != 2 * D + dz + E:
        raise ValueError(f"gate_split: mx has {mx.shape[-1]} columns, sizes {sizes} need {2 * D + dz + E}")
    if tuple(qk_scale.shape) != (2, dz) or dz % heads:
        raise ValueError(f"gate_split: qk_scale {tuple(qk_scale.shape)} must be (2, {dz}) with {dz} divisible "
                         f"by {heads} heads")
    if key_norm not in KEY_NORMS:
        raise ValueError(f"gate_split: key_norm {key_norm!r} is not one of {KEY_NORMS}")


def gate_split_reference(mx: Tensor, qk_scale: Tensor, qk_shift: Tensor, *, sizes: tuple[int, int, int],
                         heads: int, query_norm: bool = False, key_norm: Optional[str] = "rms",
                         dtype: Optional[torch.dtype] = None):
    """(u, q, k, r, hx) by PyTorch's element-wise ops (see the module docstring)."""
    _check_split(mx, qk_scale, sizes, heads, key_norm)
    D, dz, E = sizes
    dt = dtype or mx.dtype
    lead = mx.shape[:-1]
    u, zr, hx = mx.split([D, dz + E, D], dim=-1)
    u = torch.sigmoid(u)
    z, r = F.silu(zr).split([dz, E], dim=-1)
    q = (z * qk_scale[0] + qk_shift[0]).to(dt).view(*lead, heads, dz // heads)
    k = (z * qk_scale[1] + qk_shift[1]).to(dt).view(*lead, heads, dz // heads)
    if query_norm:
        q = F.rms_norm(q, (q.shape[-1],), None, NORM_EPS)
    if key_norm == "rms":
        k = F.rms_norm(k, (k.shape[-1],), None, NORM_EPS)
    elif key_norm == "center_rms":
        k = F.layer_norm(k, (k.shape[-1],), eps=NORM_EPS)
    return u, q, k, r, hx


def gated_residual_reference(hx: Tensor, y: Tensor, u: Tensor, x: Tensor, *, residual: str = "add",
                             dropout: float = 0.0) -> Tensor:
    """x + u * h (add) or x + u * (h - x) (gated), h = Dropout_p(SiLU(hx + y)); dropout p > 0 drops (training)."""
    if residual not in RESIDUALS:
        raise ValueError(f"gated_residual: residual {residual!r} is not one of {RESIDUALS}")
    h = F.silu(hx + y)
    if dropout > 0:
        h = F.dropout(h, dropout, training=True)
    return x + u * h if residual == "add" else x + u * (h - x)


def gated_residual_norm_reference(hx: Tensor, y: Tensor, u: Tensor, x: Tensor, weight: Tensor, *, eps: float,
                                  residual: str = "add", dropout: float = 0.0) -> tuple[Tensor, Tensor]:
    """(out, normed): `gated_residual_reference`, then F.rms_norm(out, (D,), weight.to(out.dtype), eps)."""
    out = gated_residual_reference(hx, y, u, x, residual=residual, dropout=dropout)
    return out, F.rms_norm(out, (out.shape[-1],), weight.to(out.dtype), eps)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def gate_split(mx: Tensor, qk_scale: Tensor, qk_shift: Tensor, *, sizes: tuple[int, int, int], heads: int,
               query_norm: bool = False, key_norm: Optional[str] = "rms", dtype: Optional[torch.dtype] = None,
               impl: str = "auto"):
    """Dispatch to the reference or the Triton kernel (see the module docstring)."""
    kwargs = dict(sizes=sizes, heads=heads, query_norm=query_norm, key_norm=key_norm, dtype=dtype)
    if resolve_impl(impl, "gate_split", mx) == "reference":
        return gate_split_reference(mx, qk_scale, qk_shift, **kwargs)
    fused = require_fused("gates_fused", "model.longvq.gate_impl=triton needs Triton; use gate_impl=reference or auto")
    return fused.gate_split_triton(mx, qk_scale, qk_shift, **kwargs)


def gated_residual(hx: Tensor, y: Tensor, u: Tensor, x: Tensor, *, residual: str = "add", dropout: float = 0.0,
                   impl: str = "auto") -> Tensor:
    """Dispatch to the reference or the Triton kernel (see the module docstring). dropout: the probability in
    effect (0 outside training)."""
    if resolve_impl(impl, "gated_residual", y, supported=dropout == 0) == "reference":
        return gated_residual_reference(hx, y, u, x, residual=residual, dropout=dropout)
    if dropout > 0:
        raise ValueError("model.longvq.gate_impl=triton has no dropout: training with model.dropout > 0 needs "
                         "gate_impl=auto or reference")
    fused = require_fused("gates_fused", "model.longvq.gate_impl=triton needs Triton; use gate_impl=reference or auto")
    return fused.gated_residual_triton(hx, y, u, x, residual=residual)


def gated_residual_norm(hx: Tensor, y: Tensor, u: Tensor, x: Tensor, weight: Tensor, *, eps: float,
                        residual: str = "add", dropout: float = 0.0, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Dispatch to the reference or the Triton kernel (see the module docstring): (out, normed). dropout: the
    probability in effect (0 outside training)."""
    if resolve_impl(impl, "gated_residual_norm", y, supported=dropout == 0) == "reference":
        return gated_residual_norm_reference(hx, y, u, x, weight, eps=eps, residual=residual, dropout=dropout)
    if dropout > 0:
        raise ValueError("model.longvq.gate_impl=triton has no dropout: training with model.dropout > 0 needs "
                         "gate_impl=auto or reference")
    fused = require_fused("gates_fused", "model.longvq.gate_impl=triton needs Triton; use gate_impl=reference or auto")
    return fused.gated_residual_norm_triton(hx, y, u, x, weight, eps=eps, residual=residual)


__all__ = ["gate_split", "gate_split_reference", "gated_residual", "gated_residual_reference", "gated_residual_norm",
           "gated_residual_norm_reference", "resolve_impl",
           "IMPLS", "KEY_NORMS", "RESIDUALS", "NORM_EPS"]
