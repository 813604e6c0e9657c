"""LM head + cross-entropy without a full-precision (tokens x vocab) logits tensor.

    loss = linear_cross_entropy(h, w, targets, chunk_tokens=0, compute_dtype=None, impl="auto")

h (N, d) final hidden states, w (V, d) head weight, targets (N,) int64 (-100 = ignored). Returns the mean
cross-entropy over the non-ignored targets (float32 scalar; float64 for float64 inputs), like
`F.cross_entropy(h @ w.T, targets)`.

chunk_tokens = 0 is the reference: full logits, then `F.cross_entropy`. chunk_tokens > 0 is the
memory-saving path. Per chunk of rows: the logits h_c @ w.T in compute_dtype (bf16 under autocast), then
`ce_grad_inplace` turns them, in place, into the per-row losses and the logits gradient softmax - onehot;
then dh_c = g @ w and dw += g.T @ h_c (float32 accumulation). The gradients of a mean cross-entropy are
known in closed form, so they are computed in this pass and backward only scales them by the upstream
gradient / the count of valid targets. Peak extra memory is one chunk of logits in compute_dtype plus dh
(N, d) and a float32 dw (V, d), instead of the logits, their float32 copy and their gradient: at 131,072
tokens x 32,000 vocab about 25 GiB saved. The reference applies the same compute_dtype cast, so both paths
round the logits alike.

impl picks what computes the losses and the gradient of each chunk:
  * "triton": one kernel per chunk (lm/ops/linear_ce_fused.py): float32 log-sum-exp in registers, the
    gradient written over the logits in their dtype; no float32 copy of the chunk;
  * "torch": `ce_grad_inplace_reference`, float32 math on a float32 copy of the chunk (the reference twin);
  * "auto": "triton" for CUDA logits in float32/bf16/fp16 when Triton imports, else "torch"; if the kernel
    fails to build or launch it warns once and uses "torch".
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lm.ops.dispatch import check_impl, choose_auto, require_fused

IGNORE_INDEX = -100
IMPLS = ("auto", "triton", "torch")


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax / accumulation dtype: float32 at least (float64 inputs stay float64)."""
    return torch.promote_types(dtype, torch.float32)


def logits_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (..., V) against targets (...), softmax in float32 at least."""
    return F.cross_entropy(logits.to(_acc(logits.dtype)).reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def ce_grad_inplace_reference(logits: Tensor, targets: Tensor, scale: float, *,
                              out: Optional[Tensor] = None) -> Tensor:
    """Per-row cross-entropy of logits (n, V) against targets (n,) (-100 = ignored), and its gradient in place.

    Returns the losses lse - logit[target] (0 on ignored rows) as an (n,) tensor in float32 (float64 for
    float64 logits), written into `out` when given. The logits are overwritten with
    (softmax - onehot(target)) * scale in their own dtype, zero rows for ignored targets. A target outside
    [0, V) that is not -100 gives a NaN loss and a NaN gradient row. The math runs on a float32 copy of the
    chunk (none for float32 logits); `lm.ops.linear_ce_fused.ce_grad_inplace_triton` is the fused twin."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (n, V) tensor, got {logits.dtype} {tuple(logits.shape)}")
    n, V = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"targets must be ({n},), got {tuple(targets.shape)}")
    acc = _acc(logits.dtype)
    if out is not None and (out.shape != (n,) or out.dtype != acc):
        raise ValueError(f"out must be a ({n},) {acc} tensor, got {out.dtype} {tuple(out.shape)}")
    x = logits.to(acc)  # the logits themselves when they are float32 already
    valid = targets != IGNORE_INDEX
    in_range = (targets >= 0) & (targets < V)
    t = torch.where(in_range, targets, 0).to(torch.long)[:, None]
    lse = torch.logsumexp(x, dim=-1)
    nan = torch.full_like(lse, float("nan"))
    loss = torch.where(valid, torch.where(in_range, lse - x.gather(1, t)[:, 0], nan), 0.0)
    coef = torch.where(valid, torch.where(in_range, torch.full_like(lse, scale), nan), 0.0)
    g = x.sub_(lse[:, None]).exp_()
    g.scatter_add_(1, t, -in_range.to(acc)[:, None])
    g.mul_(coef[:, None]).masked_fill_(~valid[:, None], 0.0)
    if g.data_ptr() != logits.data_ptr():
        logits.copy_(g)
    if out is None:
        return loss
    return out.copy_(loss)


def resolve_impl(impl: str, logits: Tensor) -> str:
    """'triton' or 'torch' for this chunk of logits (see the module docstring)."""
    check_impl("cross-entropy impl (train.loss_impl)", impl, IMPLS)
    if impl != "auto":
        return impl
    return choose_auto("loss_impl=auto", logits.is_cuda, "linear_ce_fused", lambda m: m.supports(logits),
                       fast="triton", fallback="torch")


def ce_grad_inplace(logits: Tensor, targets: Tensor, scale: float, impl: str = "auto", *,
                    out: Optional[Tensor] = None) -> tuple[Tensor, str]:
    """`ce_grad_inplace_reference` or its Triton twin, chosen by impl. Returns (per-row losses, the impl that
    ran: 'triton' or 'torch'); pass the latter as impl to the next chunk's call so that a failed kernel is
    tried once per loop. Explicit impl='triton' raises when Triton is missing or the kernel fails."""
    choice = resolve_impl(impl, logits)
    if choice == "torch":
        return ce_grad_inplace_reference(logits, targets, scale, out=out), "torch"
    fused = require_fused("linear_ce_fused", "train.loss_impl=triton needs Triton (pip install triton); set "
                                             "train.loss_impl=torch or auto")
    if impl == "triton":
        return fused.ce_grad_inplace_triton(logits, targets, scale, out=out), "triton"
    try:
        return fused.ce_grad_inplace_triton(logits, targets, scale, out=out), "triton"
    except Exception as err:  # the kernel did not compile or launch: nothing was written yet
        warnings.warn(f"the Triton cross-entropy kernel failed ({type(err).__name__}: {err}); using the PyTorch "
                      f"reference instead (train.loss_impl=torch skips the attempt)", RuntimeWarning, stacklevel=2)
        return ce_grad_inplace_reference(logits, targets, scale, out=out), "torch"


def _reference(h: Tensor, w: Tensor, targets: Tensor, dtype: torch.dtype) -> Tensor:
    return logits_cross_entropy(h.to(dtype) @ w.to(dtype).t(), targets)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, chunk: int, dtype: torch.dtype, impl: str):
        N = h.shape[0]
        hc, wc = h.to(dtype), w.to(dtype)
        acc = _acc(dtype)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1).to(acc)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        losses = torch.empty(N, dtype=acc, device=h.device)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            g = hc[s:e] @ wc.t()  # (n, V) logits in the compute dtype ...
            _, impl = ce_grad_inplace(g, targets[s:e], 1.0, impl, out=losses[s:e])  # ... now softmax - onehot
            if need_h:
                if grad_h.dtype == g.dtype:
                    torch.mm(g, wc, out=grad_h[s:e])
                else:
                    grad_h[s:e] = g @ wc
            if need_w:  # accumulated in `acc` (float32 at least)
                if grad_w is None:
                    grad_w = (g.t() @ hc[s:e]).to(acc)
                elif g.dtype == acc:
                    grad_w.addmm_(g.t(), hc[s:e])
                else:
                    grad_w.add_(g.t() @ hc[s:e])  # a (V, d) product in the compute dtype, added in float32
        if need_w and grad_w is None:  # no rows
            grad_w = torch.zeros(w.shape, dtype=acc, device=w.device)
        ctx.save_for_backward(count, *(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (need_h, need_w)
        ctx.w_dtype = w.dtype
        return losses.sum() / count

    @staticmethod
    def backward(ctx, grad_out):
        count, *saved = ctx.saved_tensors
        need_h, need_w = ctx.has
        k = grad_out / count  # the 1 / count of the mean, applied here rather than to the chunks' gradients
        gh = saved.pop(0) * k if need_h else None
        gw = (saved.pop(0) * k).to(ctx.w_dtype) if need_w else None
        return gh, gw, None, None, None, None


@torch.compiler.disable  # under torch.compile: an opaque call (the chunk loop and the kernel launches)
def _chunked(*args):
    return _ChunkedLinearCE.apply(*args)


def linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, chunk_tokens: int = 0,
                         compute_dtype: Optional[torch.dtype] = None, impl: str = "auto") -> Tensor:
    """Mean cross-entropy of the logits h @ w.T against targets; see the module docstring."""
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"h must be (N, d) and w (V, d); got {tuple(h.shape)} and {tuple(w.shape)}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"targets must be ({h.shape[0]},), got {tuple(targets.shape)}")
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0 = full logits), got {chunk_tokens}")
    if impl not in IMPLS:
        raise ValueError(f"cross-entropy impl {impl!r} is not one of {IMPLS} (train.loss_impl)")
    dtype = compute_dtype or h.dtype
    if chunk_tokens == 0:
        return _reference(h, w, targets, dtype)
    return _chunked(h, w, targets, chunk_tokens, dtype, impl)


__all__ = ["linear_cross_entropy", "logits_cross_entropy", "ce_grad_inplace", "ce_grad_inplace_reference",
           "resolve_impl", "IGNORE_INDEX", "IMPLS"]
