"""One decoding step of causal chunked VQ attention over a fixed-shape state (CUDA-graph capturable).

    static = StaticVQAttentionState.from_state(state, chunk_size=C, codebook_size=S)   # after a prefill
    out = vq_attention_decode_step(q, k_hat, v, codes, codebook, static, bias=b)       # (B, 1, H, Dv); static updated

The rule is the one of vq_attention_ref.py (same shapes, one new token per call): the query attends exactly to
the keys of its own chunk and of the previous chunk (with the relative-position bias) and to older keys through
the per-code cache of counts and value sums. Unlike `VQAttentionState`, whose current chunk grows by one token
per call, every buffer here keeps its shape:

    pos          () int64 device scalar: tokens processed so far; the new token goes to slot n = pos % C
    cur_*        (B, H, C, .) the current chunk; slots >= n are masked out of the scores
    prev_*       (B, H, C, .) the previous complete chunk; masked out while pos < C
    cache_*      (B, H, S) / (B, H, S, Dv) per-code counts and value sums of every older chunk
    cur_count, cur_sum, prev_count, prev_sum   the same per-code statistics of the current and previous chunk

The step writes the new token into its slot (index_copy_ at the device index), adds it to the current chunk's
statistics (an element-wise one-hot update, O(S Dv) per head) and attends; when the slot was the chunk's last
one it rolls the state with masks, not Python branches: the previous chunk's statistics join the cache (when
there was a previous chunk) and the current chunk, with its statistics, becomes the previous one. Nothing is
read back to the host and no shape depends on a device value, so the step can be captured in a CUDA graph and
replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lm.ops.vq_attention_ref import (
    DenseAttentionState,
    VQAttentionState,
    code_statistics,
    code_stats,
)


@dataclass
class StaticVQAttentionState:
    """Fixed-shape decoding state of one VQ attention layer (see the module docstring). Updated in place by
    `vq_attention_decode_step`; `to_state()` converts back (reads `pos`: a host synchronisation)."""

    pos: Tensor  # () int64
    cur_k: Tensor  # (B, H, C, Dk)
    cur_v: Tensor  # (B, H, C, Dv)
    cur_codes: Tensor  # (B, H, C) int64
    prev_k: Tensor  # (B, H, C, Dk)
    prev_v: Tensor  # (B, H, C, Dv)
    prev_codes: Tensor  # (B, H, C) int64
    cache_count: Tensor  # (B, H, S) float32 (float64 for float64 values)
    cache_sum: Tensor  # (B, H, S, Dv)
    cur_count: Tensor  # (B, H, S) statistics of the tokens in cur_* (slots < pos % C)
    cur_sum: Tensor  # (B, H, S, Dv)
    prev_count: Tensor  # (B, H, S) statistics of prev_* (zero while pos < C)
    prev_sum: Tensor  # (B, H, S, Dv)

    @property
    def chunk_size(self) -> int:
        return self.cur_k.shape[2]

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def from_state(cls, state, *, chunk_size: int, codebook_size: int) -> "StaticVQAttentionState":
        """From the state a parallel forward returned (`VQAttentionState` of the chunked/fused forms, or the dense
        oracle's `DenseAttentionState`). New buffers; the given state is not modified."""
        C, S = chunk_size, codebook_size
        if isinstance(state, DenseAttentionState):
            return cls._from_dense(state, C, S)
        if not isinstance(state, VQAttentionState):
            raise TypeError(f"expected a VQAttentionState or DenseAttentionState, got {type(state).__name__}")
        B, H, n, Dk = state.cur_k.shape
        Dv = state.cur_v.shape[-1]
        if n != state.pos % C:
            raise ValueError(f"state holds {n} current-chunk tokens, expected pos % chunk_size = {state.pos % C}")
        dev = state.cur_k.device
        cur_k = state.cur_k.new_zeros(B, H, C, Dk)
        cur_v = state.cur_v.new_zeros(B, H, C, Dv)
        cur_codes = torch.zeros(B, H, C, dtype=torch.long, device=dev)
        cur_k[:, :, :n] = state.cur_k
        cur_v[:, :, :n] = state.cur_v
        cur_codes[:, :, :n] = state.cur_codes
        if state.prev_k is not None:
            prev_k, prev_v, prev_codes = state.prev_k.clone(), state.prev_v.clone(), state.prev_codes.clone()
        else:
            prev_k, prev_v, prev_codes = torch.zeros_like(cur_k), torch.zeros_like(cur_v), torch.zeros_like(cur_codes)
        return cls._with_chunk_stats(state.pos, cur_k, cur_v, cur_codes, prev_k, prev_v, prev_codes,
                                     state.cache_count.clone(), state.cache_sum.clone(), C, S)

    @classmethod
    def _with_chunk_stats(cls, pos: int, cur_k, cur_v, cur_codes, prev_k, prev_v, prev_codes, cache_count, cache_sum,
                          C: int, S: int):
        """The state at position `pos`, with the per-code statistics of its current and previous chunks computed
        from their slots."""
        n, has_prev = pos % C, pos >= C
        slots = torch.arange(C, device=cur_k.device)
        cur_count, cur_sum = code_stats(cur_codes, cur_v, slots < n, S)
        prev_count, prev_sum = code_stats(prev_codes, prev_v, (slots < C) & has_prev, S)
        acc = cache_sum.dtype
        return cls(torch.tensor(pos, dtype=torch.long, device=cur_k.device), cur_k, cur_v, cur_codes,
                   prev_k, prev_v, prev_codes, cache_count, cache_sum, cur_count.to(acc), cur_sum.to(acc), prev_count.to(acc), prev_sum.to(acc))

    @classmethod
    def _from_dense(cls, state: DenseAttentionState, C: int, S: int) -> "StaticVQAttentionState":
        """The dense state holds every position: split it into current chunk, previous chunk and cache."""
        B, H, P, Dk = state.k.shape
        Dv = state.v.shape[-1]
        n, full = P % C, P // C
        start = full * C  # first position of the current chunk
        dev = state.k.device
        cur_k, cur_v = state.k.new_zeros(B, H, C, Dk), state.v.new_zeros(B, H, C, Dv)
        cur_codes = torch.zeros(B, H, C, dtype=torch.long, device=dev)
        cur_k[:, :, :n], cur_v[:, :, :n], cur_codes[:, :, :n] = (state.k[:, :, start:], state.v[:, :, start:],
                                                               state.codes[:, :, start:])
        if full >= 1:
            sl = slice(start - C, start)
            prev_k, prev_v, prev_codes = (state.k[:, :, sl].clone(), state.v[:, :, sl].clone(),
                                          state.codes[:, :, sl].clone())
        else:
            prev_k, prev_v, prev_codes = torch.zeros_like(cur_k), torch.zeros_like(cur_v), torch.zeros_like(cur_codes)
        old = max(start - C, 0)  # positions before the previous chunk
        count, total = code_statistics(state.codes[:, :, :old].transpose(1, 2), state.v[:, :, :old].transpose(1, 2), S)
        return cls._with_chunk_stats(P, cur_k, cur_v, cur_codes, prev_k, prev_v, prev_codes, count, total, C, S)

    def to_state(self) -> VQAttentionState:
        """The equivalent `VQAttentionState` (copies; one host read of `pos`)."""
        pos = int(self.pos)
        C = self.chunk_size
        n = pos % C
        has_prev = pos >= C
        return VQAttentionState(
            pos=pos, cur_k=self.cur_k[:, :, :n].clone(), cur_v=self.cur_v[:, :, :n].clone(),
            cur_codes=self.cur_codes[:, :, :n].clone(),
            prev_k=self.prev_k.clone() if has_prev else None, prev_v=self.prev_v.clone() if has_prev else None,
            prev_codes=self.prev_codes.clone() if has_prev else None,
            cache_count=self.cache_count.clone(), cache_sum=self.cache_sum.clone())


def vq_attention_decode_step(q: Tensor, k_hat: Tensor, v: Tensor, codes: Tensor, codebook: Tensor,
                             state: StaticVQAttentionState, *, bias: Optional[Tensor] = None,
                             scale: Optional[float] = None) -> Tensor:
    """Attention output (B, 1, H, Dv) of one new token; `state` is updated in place (see the module docstring).

    q, k_hat (B, 1, H, Dk), v (B, 1, H, Dv), codes (B, 1, H), codebook (H, S, Dk), bias (H, C + 1). The
    arithmetic (dtypes, order of the score parts) is that of `chunked_vq_attention` for a token inside a chunk."""
    B, T, H, Dk = q.shape
    if T != 1:
        raise ValueError(f"vq_attention_decode_step takes one token per call, got {T}")
    C, S = state.chunk_size, codebook.shape[1]
    scale = Dk ** -0.5 if scale is None else scale
    dev, dt = q.device, q.dtype
    acc = torch.promote_types(dt, torch.float32)
    neg_inf = float("-inf")
    n = state.pos % C  # () slot of the new token in its chunk
    slots = torch.arange(C, device=dev)
    slot = n.reshape(1)  # the new token's key, value and code go to slot n (written in place: one slot)
    state.cur_k.index_copy_(2, slot, k_hat.transpose(1, 2).to(state.cur_k.dtype))
    state.cur_v.index_copy_(2, slot, v.transpose(1, 2).to(state.cur_v.dtype))
    state.cur_codes.index_copy_(2, slot, codes.transpose(1, 2))
    cur_k, cur_v, cur_codes = state.cur_k, state.cur_v, state.cur_codes  # (B, H, C, Dk), (B, H, C, Dv), (B, H, C)
    has_prev = state.pos >= C  # () the token's chunk has a previous chunk

    qh = q.transpose(1, 2)  # (B, H, 1, Dk)
    s_cur = (qh @ cur_k.to(dt).transpose(-1, -2)).to(acc) * scale  # (B, H, 1, C)
    s_prev = (qh @ state.prev_k.to(dt).transpose(-1, -2)).to(acc) * scale
    if bias is not None:
        s_cur = s_cur + bias[:, (n - slots).clamp(min=0)].to(acc)[None, :, None]
        d = n + C - slots
        s_prev = s_prev + torch.where(d <= C, bias[:, d.clamp(max=C)], bias.new_zeros(())).to(acc)[None, :, None]
    s_cur = s_cur.masked_fill(slots > n, neg_inf)
    s_prev = s_prev.masked_fill(~has_prev, neg_inf)
    cnt = state.cache_count.to(acc)
    log_n = torch.where(cnt > 0, cnt.clamp(min=1).log(), torch.full_like(cnt, neg_inf))
    s_cache = (qh @ codebook.detach().to(dt).transpose(-1, -2)[None]).to(acc) * scale + log_n[:, :, None, :]
    p = torch.softmax(torch.cat([s_cur, s_prev, s_cache], dim=-1), dim=-1)
    p_cur, p_prev, p_cache = p.split([C, C, S], dim=-1)
    vt = v.dtype
    out = p_cur.to(vt) @ cur_v.to(vt) + p_prev.to(vt) @ state.prev_v.to(vt)
    u_bar = state.cache_sum.to(acc) / cnt.clamp(min=1)[..., None]
    out = (out + (p_cache @ u_bar).to(out.dtype)).transpose(1, 2)  # (B, 1, H, Dv)

    # The new token's statistics: one-hot of its code (B, H, S), times its value for the sums.
    with torch.autocast(dev.type, enabled=False):
        hot = F.one_hot(codes[:, 0], S).to(state.cur_count.dtype)  # (B, H, S)
        cur_count = state.cur_count + hot
        cur_sum = state.cur_sum + hot[..., None] * v[:, 0, :, None, :].to(state.cur_sum.dtype)
    # Roll when the chunk is now full: the previous chunk (if any) joins the cache, the current becomes previous.
    full = n == C - 1
    joins = (full & has_prev).to(state.cache_count.dtype)
    state.cache_count.add_(state.prev_count * joins)
    state.cache_sum.add_(state.prev_sum * joins)
    state.prev_count.copy_(torch.where(full, cur_count, state.prev_count))
    state.prev_sum.copy_(torch.where(full, cur_sum, state.prev_sum))
    state.cur_count.copy_(cur_count.masked_fill(full, 0.0))
    state.cur_sum.copy_(cur_sum.masked_fill(full, 0.0))
    state.prev_k.copy_(torch.where(full, cur_k, state.prev_k))
    state.prev_v.copy_(torch.where(full, cur_v, state.prev_v))
    state.prev_codes.copy_(torch.where(full, cur_codes, state.prev_codes))
    state.pos.add_(1)
    return out


__all__ = ["StaticVQAttentionState", "vq_attention_decode_step"]
