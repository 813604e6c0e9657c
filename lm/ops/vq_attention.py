"""Public entry point of causal chunked VQ attention: one signature, several implementations.

    out, state = vq_attention(q, k_hat, v, codes, codebook, chunk_size=C, bias=b,
                              state=None, return_state=False, impl="auto")

impl: "dense" (O(T^2) oracle, tests only), "chunked" (pure PyTorch, O(T (C + S))), "fused" (GPU
kernel, lm/ops/vq_attention_fused.py), "auto" (fused when it supports the inputs on CUDA, else
chunked; the choice is logged once). See vq_attention_ref.py for shapes and the exact rule.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lm.ops.dispatch import check_impl, choose_auto, require_fused
from lm.ops.vq_attention_ref import (
    DenseAttentionState,
    VQAttentionState,
    chunked_vq_attention,
    dense_vq_attention,
)

IMPLS = ("dense", "chunked", "fused", "auto")


def resolve_impl(impl: str, q: Tensor, v: Tensor, chunk_size: int, state=None) -> str:
    """The implementation that will run for these inputs (logs the choice for 'auto' once)."""
    check_impl("attention impl", impl, IMPLS)
    if impl != "auto":
        return impl
    return choose_auto("vq_attention impl=auto", q.is_cuda, "vq_attention_fused",
                       lambda m: m.supports(q, v, chunk_size, state), fast="fused", fallback="chunked")


@torch.compiler.disable
def _chunked_uncompiled(*args, **kwargs):
    return chunked_vq_attention(*args, **kwargs)


def vq_attention(q: Tensor, k_hat: Tensor, v: Tensor, codes: Tensor, codebook: Tensor, *, chunk_size: int,
                 bias: Optional[Tensor] = None, scale: Optional[float] = None, state=None,
                 return_state: bool = False, impl: str = "auto"):
    impl = resolve_impl(impl, q, v, chunk_size, state)
    kwargs = dict(chunk_size=chunk_size, bias=bias, scale=scale, state=state, return_state=return_state)
    if impl == "dense":
        return dense_vq_attention(q, k_hat, v, codes, codebook, **kwargs)
    if impl == "chunked":
        if q.is_cuda:  # inductor's CUDA code generation fails on this graph (a sympy "'-((0))' is not
            return _chunked_uncompiled(q, k_hat, v, codes, codebook, **kwargs)  # comparable" error): run it eager
        return chunked_vq_attention(q, k_hat, v, codes, codebook, **kwargs)
    fused = require_fused("vq_attention_fused",
                          "attention_impl=fused needs Triton and a CUDA GPU; use attention_impl=chunked or auto")
    return fused.fused_vq_attention(q, k_hat, v, codes, codebook, **kwargs)


__all__ = ["vq_attention", "resolve_impl", "VQAttentionState", "DenseAttentionState", "IMPLS"]
