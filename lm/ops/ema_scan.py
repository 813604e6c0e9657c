"""Multi-dimensional damped EMA as a chunked linear scan in (B, T, D) layout: public entry and PyTorch twin.

    out, h_T = ema_scan(x, pb, q, gamma, omega, scale=s, state=h_0, return_state=True, silu=False, impl="auto")

Per channel d and EMA dimension n (the recurrence of lm/model/ema.py):
    h_t[d, n] = pb[d, n] x_t[d] + q[d, n] h_{t-1}[d, n]
    y_t[d]    = scale * sum_n gamma[d, n] h_t[d, n] + omega[d] x_t[d]
    out_t     = SiLU(y_t) if silu else y_t
Shapes: x (B, T, D) any float dtype; pb, q, gamma (D, N); omega (D); state h_0 (B, D, N) or None (zeros).
Returns (out (B, T, D) in x.dtype, h_T (B, D, N) in the accumulation dtype, or None). The accumulation
dtype is float32 at least (float64 parameters keep float64 in the reference). Every input gets a gradient.

impl: "reference" (`ema_scan_reference`, pure PyTorch, any device: the executable spec and the CPU path),
"triton" (lm/ops/ema_scan_fused.py, CUDA), "auto" (triton where `supports` says so, else reference; the
choice is logged once). `resolve_ema_impl` maps the model's `ema_impl` setting (fft | scan | auto) onto
these plus the FFT convolution that lm/model/ema.py keeps as a reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lm.ops.dispatch import check_impl, choose_auto, require_fused

IMPLS = ("reference", "triton", "auto")
MODULE_IMPLS = ("fft", "scan", "auto")


def _auto(setting: str, x: Tensor, ndim: int, fallback: str) -> str:
    return choose_auto(setting, x.is_cuda, "ema_scan_fused", lambda m: m.supports(x, ndim), fast="triton",
                       fallback=fallback)


def resolve_impl(impl: str, x: Tensor, ndim: int) -> str:
    """'reference' or 'triton' for these inputs (logs the choice for 'auto' once)."""
    check_impl("ema_scan impl", impl, IMPLS)
    return impl if impl != "auto" else _auto("ema_scan impl=auto", x, ndim, "reference")


def resolve_ema_impl(impl: str, x: Tensor, ndim: int) -> str:
    """The model setting `model.longvq.ema_impl` -> 'fft', 'reference' or 'triton' (logged once).

    fft: the FFT convolution (lm/model/ema.py). scan: the chunked scan (Triton where supported, else its
    PyTorch twin). auto: the Triton scan where supported, else fft."""
    check_impl("ema_impl", impl, MODULE_IMPLS)
    if impl == "fft":
        return "fft"
    return _auto(f"ema_impl={impl}", x, ndim, "reference" if impl == "scan" else "fft")


# --------------------------------------------------------------------------------------------
# Reference: the chunked scan in plain PyTorch
# --------------------------------------------------------------------------------------------


def _powers(q: Tensor, length: int) -> Tensor:
    """q ** l for l = 0 .. length by cumulative products (any sign of q): (D, N, length + 1)."""
    ones = torch.ones(*q.shape, 1, dtype=q.dtype, device=q.device)
    if length == 0:
        return ones
    return torch.cat([ones, torch.cumprod(q[..., None].expand(*q.shape, length), dim=-1)], dim=-1)


def ema_scan_reference(x: Tensor, pb: Tensor, q: Tensor, gamma: Tensor, omega: Tensor, *, scale: float,
                       state: Optional[Tensor] = None, return_state: bool = False, silu: bool = False,
                       chunk_size: Optional[int] = None):
    """The scan in chunks of L = chunk_size tokens, all in matrix products (differentiable by autograd).

    Inside chunk c (tokens t0 .. t0 + L - 1, local index i):
        y_i = sum_{j <= i} K[i - j] x_j               K[l] = scale sum_n gamma pb q^l   (Toeplitz, per d)
            + scale sum_n gamma q^(i + 1) H_c         H_c  = state before the chunk
        H_{c+1} = q^L H_c + sum_j pb q^(L - 1 - j) x_j
    The last chunk is zero-padded (padding after the end changes no earlier output); h_T uses its true length.
    chunk_size None = 64 (the result does not depend on it beyond rounding).
    """
    B, T, D = x.shape
    N = q.shape[-1]
    f = torch.promote_types(pb.dtype, torch.float32)
    pb, q, gamma, omega = (t.to(f) for t in (pb, q, gamma, omega))
    c = gamma * scale
    xf = x.to(f)
    h = state.to(f) if state is not None else xf.new_zeros(B, D, N)
    if T == 0:
        return x.new_zeros(B, 0, D), (h if return_state else None)
    L = max(1, min(int(chunk_size or 64), T))
    nc = -(-T // L)
    xc = F.pad(xf, (0, 0, 0, nc * L - T)).view(B, nc, L, D)
    pw = _powers(q, L)  # (D, N, L + 1)
    kern = torch.einsum("dn,dnl->dl", c * pb, pw[..., :L])  # K[d, l], l < L
    lag = torch.arange(L, device=x.device)[:, None] - torch.arange(L, device=x.device)[None, :]
    toeplitz = torch.where(lag >= 0, kern[:, lag.clamp(min=0)], kern.new_zeros(()))  # (D, L, L)
    y = torch.einsum("dts,bcsd->bctd", toeplitz, xc)
    into = torch.einsum("dns,bcsd->bcdn", pb[..., None] * pw[..., :L].flip(-1), xc)  # chunk input -> end state
    starts = [h]
    for ci in range(nc - 1):
        starts.append(pw[..., L] * starts[-1] + into[:, ci])
    hs = torch.stack(starts, dim=1)  # (B, nc, D, N)
    y = y + torch.einsum("dnt,bcdn->bctd", c[..., None] * pw[..., 1:], hs)
    y = y.reshape(B, nc * L, D)[:, :T] + xf * omega
    out = (F.silu(y) if silu else y).to(x.dtype)
    if not return_state:
        return out, None
    last = T - (nc - 1) * L
    tail = torch.einsum("dns,bsd->bdn", pb[..., None] * pw[..., :last].flip(-1), xc[:, -1, :last])
    return out, pw[..., last] * hs[:, -1] + tail


def ema_scan(x: Tensor, pb: Tensor, q: Tensor, gamma: Tensor, omega: Tensor, *, scale: float,
             state: Optional[Tensor] = None, return_state: bool = False, silu: bool = False,
             chunk_size: Optional[int] = None, impl: str = "auto"):
    """Dispatch to the reference or the Triton scan (see the module docstring)."""
    impl = resolve_impl(impl, x, q.shape[-1])
    kwargs = dict(scale=scale, state=state, return_state=return_state, silu=silu, chunk_size=chunk_size)
    if impl == "reference":
        return ema_scan_reference(x, pb, q, gamma, omega, **kwargs)
    fused = require_fused("ema_scan_fused", "ema_scan impl=triton needs Triton; use impl=reference or auto")
    return fused.ema_scan_triton(x, pb, q, gamma, omega, **kwargs)


__all__ = ["ema_scan", "ema_scan_reference", "resolve_impl", "resolve_ema_impl", "IMPLS", "MODULE_IMPLS"]
