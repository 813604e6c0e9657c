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


@dataclass
class StaticKVCache:
    """A KV cache of fixed length for decoding one token per call (CUDA-graph capturable): positions < pos hold
    keys and values, the rest is masked out of the attention. Updated in place by `SelfAttentionMixer.decode_step`.
    The length is a multiple of KV_BLOCK (the attention sums over blocks of that many positions)."""

    k: Tensor  # (B, H, L, hd), L = capacity
    v: Tensor
    pos: Tensor  # () int64 device scalar: positions filled

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v, self.pos]

    @classmethod
    def from_cache(cls, cache: KVCache, capacity: int) -> "StaticKVCache":
        """Copy of a prefill's cache into buffers of at least `capacity` positions (>= cache.pos), rounded up to a
        multiple of KV_BLOCK."""
        B, H, P, hd = cache.k.shape
        if capacity < P:
            raise ValueError(f"capacity {capacity} is smaller than the {P} cached positions")
        L = -(-capacity // KV_BLOCK) * KV_BLOCK
        k, v = cache.k.new_zeros(B, H, L, hd), cache.v.new_zeros(B, H, L, hd)
        k[:, :, :P], v[:, :, :P] = cache.k, cache.v
        return cls(k, v, torch.tensor(P, dtype=torch.long, device=cache.k.device))

    def to_cache(self) -> KVCache:
        """The equivalent growing `KVCache` (copies; one host read of `pos`)."""
        P = int(self.pos)
        return KVCache(self.k[:, :, :P].clone(), self.v[:, :, :P].clone())


KV_BLOCK = 256  # positions per block of the decoding attention's value sum (StaticKVCache lengths are multiples)


def masked_decode_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
    """Softmax attention of one query per head over a fixed-length cache: q (B, H, 1, hd), k, v (B, H, L, hd),
    keep (L,) bool (the filled positions). Scores and softmax in float32 (at least) over all L positions at once; the
    weighted value sum in blocks of KV_BLOCK positions, summed afterwards, so the work spreads over the whole GPU
    for one query (a fused attention kernel runs one thread block per head and query here)."""
    B, H, L, hd = k.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q @ k.transpose(-1, -2)).to(acc) * hd ** -0.5  # (B, H, 1, L)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).to(v.dtype)
    nb = L // KV_BLOCK
    part = p.view(B, H, nb, 1, KV_BLOCK) @ v.view(B, H, nb, KV_BLOCK, hd)  # (B, H, nb, 1, hd)
    return part.sum(2, dtype=acc).to(v.dtype)  # (B, H, 1, hd)


def rope_tables(T: int, offset: int, head_dim: int, base: float, device) -> tuple[Tensor, Tensor]:
    inv = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(offset, offset + T, device=device, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos(), ang.sin()


def rope_at(pos: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """`rope_tables(1, pos, ...)` for a position held in a 0-dim device tensor (no host read): (1, hd/2) each."""
    inv = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = pos.to(torch.float32).reshape(1, 1) * inv[None]
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

    def static_state(self, state: KVCache, capacity: int) -> StaticKVCache:
        """The fixed-length decoding cache (`capacity` positions) holding a prefill's KV cache."""
        return StaticKVCache.from_cache(state, capacity)

    def decode_step(self, x: Tensor, state: StaticKVCache) -> Tensor:
        """forward() for one new token x (B, 1, D) with a fixed-length cache, updated in place: the token's
        key and value go to slot `pos`, and attention (`masked_decode_attention`) runs over all `capacity` slots
        with positions > pos masked out (no shape depends on the position, so the step can be captured in a CUDA graph). Returns
        the mixer output (B, 1, D). Positions past the capacity are not checked here (the caller's job)."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope_at(state.pos, self.head_dim, self.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        idx = state.pos.reshape(1)
        state.k.index_copy_(2, idx, k.to(state.k.dtype))
        state.v.index_copy_(2, idx, v.to(state.v.dtype))
        keep = torch.arange(state.capacity, device=x.device) <= state.pos  # (L,)
        y = masked_decode_attention(q, state.k.to(q.dtype), state.v.to(v.dtype), keep)
        state.pos.add_(1)
        y = y.transpose(1, 2).reshape(B, T, D)
        return x + self.dropout(self.out(y))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.attention(q, k, v)
