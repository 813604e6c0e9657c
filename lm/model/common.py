"""Pieces both architectures share: norm, feed-forward, token embedding and LM head."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)  # one fused op where the backend has it


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """RMS normalisation without gain over the last dim (used on keys before quantisation)."""
    return F.rms_norm(x, (x.shape[-1],), None, eps)


class FeedForward(nn.Module):
    """Pre-norm FFN: SwiGLU (Transformer) or MEGA's normalized FFN W2 SiLU(W1 LN(x)) (LongVQ)."""

    def __init__(self, dim: int, hidden: int, kind: str = "swiglu", eps: float = 1e-5, dropout: float = 0.0):
        super().__init__()
        assert kind in ("swiglu", "silu"), kind
        self.kind = kind
        self.norm = RMSNorm(dim, eps)
        self.w_in = nn.Linear(dim, 2 * hidden if kind == "swiglu" else hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, normed: Optional[Tensor] = None) -> Tensor:
        """normed: self.norm(x) when the caller already has it (a kernel that fused it into x's producer)."""
        h = self.w_in(self.norm(x) if normed is None else normed)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.silu(h)
        return x + self.dropout(self.w_out(h))
