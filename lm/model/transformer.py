"""Baseline Transformer mixer: pre-norm causal self-attention with RoPE (FFN is shared, common.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lm.config import ModelConfig
from lm.model.common import RMSNorm
from lm.ops.sdpa import CausalAttention


@dataclass
class KVCache:
    k: Tensor  # (B, H, P, hd)
    v: Tensor

    @property
    def pos(self) -> int:
        return self.k.shape[2]


def rope_tables(T: int, offset: int, head_dim: int, base: float, device) -> tuple[Tensor, Tensor]:
    inv = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(offset, offset + T, device=device, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, hd), rotating pairs (x[2i], x[2i+1])."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


class SelfAttentionMixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tc = cfg.transformer
        self.n_heads, self.head_dim = tc.n_heads, cfg.d_model // tc.n_heads
        self.rope_base = tc.rope_base
        self.attention = CausalAttention(tc.attn_backend)  # this module's backend choice and fallback record
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, state: Optional[KVCache] = None, return_state: bool = False, sp=None):
        """sp: sequence-parallel context (lm/parallel/sequence.py) when x is one segment of a sequence split
        over ranks: RoPE at the segment's global positions, attention over the whole sequence by Ulysses."""
        B, T, D = x.shape
        if sp is not None and (state is not None or return_state):
            raise ValueError("a KV cache and a sequence-parallel context cannot be combined")
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        offset = sp.position_offset(T) if sp is not None else (0 if state is None else state.pos)
        cos, sin = rope_tables(T, offset, self.head_dim, self.rope_base, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None:
            k = torch.cat([state.k, k], dim=2)
            v = torch.cat([state.v, v], dim=2)
        if sp is not None:
            y = sp.head_parallel_attention(q, k, v, self._attend)
        else:
            y = self._attend(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, D)
        new_state = KVCache(k.detach(), v.detach()) if return_state else None
        return x + self.dropout(self.out(y)), new_state, x.new_zeros(()), {}

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attention(q, k, v)
