"""LM head + cross-entropy without the (tokens x vocab) logits tensor.

    loss = linear_cross_entropy(h, w, targets, chunk_tokens=0, compute_dtype=None)

h (N, d) final hidden states, w (V, d) head weight, targets (N,) int64 (-100 = ignored). Returns the mean
cross-entropy over the non-ignored targets (float32 scalar), like `F.cross_entropy(h @ w.T, targets)`.

chunk_tokens = 0 is the reference: full logits, then `F.cross_entropy`. chunk_tokens > 0 is the
memory-saving path: logits of `chunk_tokens` rows at a time (float32 softmax), and because the gradient
of a mean cross-entropy is known in closed form, the gradients of h and w are computed in the same pass
and stored; backward only scales them. Peak extra memory is one chunk of logits plus dh (N, d) and an
fp32 dw (V, d), instead of the logits, their fp32 copy and their gradient: at 131,072 tokens x 32,000
vocab that is about 25 GiB saved. compute_dtype is the matmul dtype (bf16 under autocast); the
reference applies the same cast, so both paths round alike.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax / accumulation dtype: float32 at least (float64 inputs stay float64)."""
    return torch.promote_types(dtype, torch.float32)


def logits_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (..., V) against targets (...), softmax in float32 at least."""
    return F.cross_entropy(logits.to(_acc(logits.dtype)).reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _reference(h: Tensor, w: Tensor, targets: Tensor, dtype: torch.dtype) -> Tensor:
    return logits_cross_entropy(h.to(dtype) @ w.to(dtype).t(), targets)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, chunk: int, dtype: torch.dtype):
        N = h.shape[0]
        hc, wc = h.to(dtype), w.to(dtype)
        valid_all = targets != IGNORE_INDEX
        acc = _acc(dtype)
        count = valid_all.sum().clamp(min=1).to(acc)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            logits = (hc[s:e] @ wc.t()).to(acc)  # (n, V)
            t, valid = targets[s:e], valid_all[s:e]
            lse = torch.logsumexp(logits, dim=-1)
            tgt = logits.gather(1, t.clamp(min=0)[:, None])[:, 0]
            total += ((lse - tgt) * valid).sum()
            if need_h or need_w:
                # d(mean CE)/d logits = (softmax - onehot(target)) / count, zero on ignored rows
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(e - s, device=g.device), t.clamp(min=0)] -= 1.0
                g.mul_((valid.to(g.dtype) / count)[:, None])
                gd = g.to(dtype)
                if need_h:
                    grad_h[s:e] = (gd @ wc).to(h.dtype)
                if need_w:
                    grad_w += (gd.t() @ hc[s:e]).to(acc)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (need_h, need_w)
        ctx.w_dtype = w.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        gh = saved.pop(0) * grad_out if need_h else None
        gw = (saved.pop(0) * grad_out).to(ctx.w_dtype) if need_w else None
        return gh, gw, None, None, None


def linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, chunk_tokens: int = 0,
                         compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Mean cross-entropy of the logits h @ w.T against targets; see the module docstring."""
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"h must be (N, d) and w (V, d); got {tuple(h.shape)} and {tuple(w.shape)}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"targets must be ({h.shape[0]},), got {tuple(targets.shape)}")
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0 = full logits), got {chunk_tokens}")
    dtype = compute_dtype or h.dtype
    if chunk_tokens == 0:
        return _reference(h, w, targets, dtype)
    return _ChunkedLinearCE.apply(h, w, targets, chunk_tokens, dtype)


__all__ = ["linear_cross_entropy", "logits_cross_entropy", "IGNORE_INDEX"]
