"""Attention kernels: pure functions (tensors in, tensors out); modules in lm/model call them."""

from lm.ops.vq_attention import VQAttentionState, DenseAttentionState, resolve_impl, vq_attention

__all__ = ["vq_attention", "resolve_impl", "VQAttentionState", "DenseAttentionState"]
