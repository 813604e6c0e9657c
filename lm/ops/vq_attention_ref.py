"""Causal chunked VQ attention in pure PyTorch: the dense O(T^2) oracle and the chunked O(T(C+S)) form.

The rule and why it is exact: docs/model.md. Shapes (FLA-style layout [B, T, H, D]):
    q      (B, T, H, Dk)   queries
    k_hat  (B, T, H, Dk)   quantized keys (straight-through already applied by the quantizer)
    v      (B, T, H, Dv)   values
    codes  (B, T, H)       int64 code index of each key (k_hat == codebook[h, codes] in value)
    codebook (H, S, Dk)    per-head codebook (treated as a constant: no gradient)
    bias   (H, C + 1)      learned relative-position bias b[d] for distance d = i - j in [0, C]
Returns (out (B, T, H, Dv), new_state or None).

Attention rule (the same for every implementation): query i attends causally to every key j <= i with
score q_i . k_hat_j * scale + (bias[i - j] if i - j <= C else 0). Chunks of C tokens are aligned to
absolute position 0. Keys in the query's own chunk and the previous chunk are "near": they are used
exactly. Older keys reach the query through a per-code cache of counts and value sums, so they give
no gradient to the keys (the codebook is a constant). The dense oracle reproduces that gradient rule
by detaching far keys, so outputs *and* gradients of the two forms agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# --------------------------------------------------------------------------------------------
# States
# --------------------------------------------------------------------------------------------


@dataclass
class VQAttentionState:
    """What the chunked form carries between calls (per layer).

    pos: tokens processed so far. The current chunk holds n = pos % C tokens (cur_*); prev_* is the
    last complete chunk (None before the first chunk completes); cache_* sums every older chunk.
    Memory is O(C (Dk + Dv) + S Dv) per head: constant in the sequence length.
    A returned state is detached (streaming, decoding). An incoming state may carry autograd (sequence
    parallelism builds it from other ranks' tensors): `chunked_vq_attention` then gives its prev_k,
    prev_v and cache_sum the gradients the same tokens would get in one pass over the whole sequence.
    """

    pos: int
    cur_k: Tensor  # (B, H, n, Dk)
    cur_v: Tensor  # (B, H, n, Dv)
    cur_codes: Tensor  # (B, H, n)
    prev_k: Optional[Tensor]  # (B, H, C, Dk)
    prev_v: Optional[Tensor]  # (B, H, C, Dv)
    prev_codes: Optional[Tensor]  # (B, H, C)
    cache_count: Tensor  # (B, H, S) float32
    cache_sum: Tensor  # (B, H, S, Dv) float32

    def detach(self) -> "VQAttentionState":
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        return replace(self, cur_k=d(self.cur_k), cur_v=d(self.cur_v), prev_k=d(self.prev_k),
                       prev_v=d(self.prev_v), cache_count=d(self.cache_count), cache_sum=d(self.cache_sum))


@dataclass
class DenseAttentionState:
    """The dense oracle's state: the whole history of keys, codes and values (O(T) memory)."""

    pos: int
    k: Tensor  # (B, H, P, Dk) the keys as given (quantized, or raw with local_raw_keys)
    v: Tensor  # (B, H, P, Dv)
    codes: Tensor  # (B, H, P)


def empty_state(q: Tensor, v: Tensor, codebook: Tensor) -> VQAttentionState:
    B, _, H, Dk = q.shape
    Dv, S = v.shape[-1], codebook.shape[1]
    dev = q.device
    return VQAttentionState(
        pos=0,
        cur_k=q.new_zeros(B, H, 0, Dk), cur_v=v.new_zeros(B, H, 0, Dv),
        cur_codes=torch.zeros(B, H, 0, dtype=torch.long, device=dev),
        prev_k=None, prev_v=None, prev_codes=None,
        cache_count=torch.zeros(B, H, S, dtype=_acc_dtype(v), device=dev),
        cache_sum=torch.zeros(B, H, S, Dv, dtype=_acc_dtype(v), device=dev),
    )


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Softmax / statistics precision: float32 at least (float64 inputs stay float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def check_inputs(q, k_hat, v, codes, codebook, chunk_size, bias):
    """Assert that the attention inputs have consistent shapes (see the module docstring)."""
    B, T, H, Dk = q.shape
    assert k_hat.shape == q.shape, f"k_hat {tuple(k_hat.shape)} != q {tuple(q.shape)}"
    assert v.shape[:3] == (B, T, H), f"v {tuple(v.shape)} does not match q {tuple(q.shape)}"
    assert codes.shape == (B, T, H), f"codes {tuple(codes.shape)} must be (B, T, H)"
    assert codebook.shape[0] == H and codebook.shape[2] == Dk, f"codebook {tuple(codebook.shape)} must be (H, S, Dk)"
    assert chunk_size >= 1
    if bias is not None:
        assert bias.shape == (H, chunk_size + 1), f"bias {tuple(bias.shape)} must be (H, chunk_size + 1)"


# --------------------------------------------------------------------------------------------
# Dense oracle
# --------------------------------------------------------------------------------------------


def dense_vq_attention(q: Tensor, k_hat: Tensor, v: Tensor, codes: Tensor, codebook: Tensor, *,
                       chunk_size: int, bias: Optional[Tensor] = None, scale: Optional[float] = None,
                       state: Optional[DenseAttentionState] = None, return_state: bool = False):
    """O(T^2) softmax attention with the chunked form's rules: keys of the own and previous chunk as
    given (k_hat: quantized with a straight-through gradient, or raw keys), keys further back as their
    codewords codebook[codes] (no gradient), plus the local bias."""
    check_inputs(q, k_hat, v, codes, codebook, chunk_size, bias)
    B, T, H, Dk = q.shape
    C = chunk_size
    scale = Dk ** -0.5 if scale is None else scale
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k_hat, v))  # (B, H, T, D)
    zh = codes.transpose(1, 2)  # (B, H, T)
    P = 0 if state is None else state.pos
    if state is not None:
        kh = torch.cat([state.k.to(kh.dtype), kh], dim=2)
        vh = torch.cat([state.v.to(vh.dtype), vh], dim=2)
        zh = torch.cat([state.codes, zh], dim=2)
    dev = q.device
    k_far = codebook.detach().to(kh.dtype)[torch.arange(H, device=dev)[None, :, None], zh]  # (B, H, P+T, Dk)
    qpos = torch.arange(P, P + T, device=dev)
    kpos = torch.arange(0, P + T, device=dev)
    dist = qpos[:, None] - kpos[None, :]  # (T, P+T)
    near = (qpos[:, None] // C - kpos[None, :] // C) <= 1
    s = torch.where(near, qh @ kh.transpose(-1, -2), qh @ k_far.transpose(-1, -2)).to(_acc_dtype(q)) * scale
    if bias is not None:
        in_window = (dist >= 0) & (dist <= C)
        s = s + torch.where(in_window, bias[:, dist.clamp(0, C)], bias.new_zeros(()))[None].to(s.dtype)
    s = s.masked_fill(dist < 0, float("-inf"))
    out = torch.softmax(s.to(_acc_dtype(q)), dim=-1).to(vh.dtype) @ vh
    new_state = DenseAttentionState(pos=P + T, k=kh.detach(), v=vh.detach(), codes=zh) if return_state else None
    return out.transpose(1, 2), new_state


# --------------------------------------------------------------------------------------------
# Chunked form
# --------------------------------------------------------------------------------------------


def code_statistics(codes: Tensor, values: Tensor, S: int) -> tuple[Tensor, Tensor]:
    """Per-code counts and value sums over all positions: codes (B, T, H), values (B, T, H, Dv) ->
    (count (B, H, S), sums (B, H, S, Dv)) in float32 at least, differentiable in `values`. A scatter-add:
    memory O(B H S Dv), whatever T (the cache that one segment hands to the later ones)."""
    B, T, H = codes.shape
    Dv = values.shape[-1]
    acc, dev = _acc_dtype(values), values.device
    with torch.autocast(dev.type, enabled=False):
        bh = (torch.arange(B, device=dev)[:, None, None] * H + torch.arange(H, device=dev)[None, None, :])
        idx = (bh * S + codes).reshape(-1)
        count = torch.zeros(B * H * S, dtype=torch.int64, device=dev).scatter_add_(0, idx, torch.ones_like(idx))
        count = count.to(acc)  # not bincount: on CUDA it reads the indices' min and max back to the host
        sums = torch.zeros(B * H * S, Dv, dtype=acc, device=dev).index_add(0, idx, values.reshape(-1, Dv).to(acc))
    return count.view(B, H, S), sums.view(B, H, S, Dv)


def code_stats(codes: Tensor, values: Tensor, valid: Tensor, S: int) -> tuple[Tensor, Tensor]:
    """Per-chunk code histograms and value sums. codes (..., C), values (..., C, Dv), valid (..., C)."""
    acc = _acc_dtype(values)
    with torch.autocast(values.device.type, enabled=False):  # exact counts even under bf16 autocast
        onehot = F.one_hot(codes, S).to(acc) * valid[..., None].to(acc)  # (..., C, S)
        counts = onehot.sum(dim=-2)  # (..., S)
        sums = onehot.transpose(-1, -2) @ values.to(acc)  # (..., S, Dv)
    return counts, sums


def local_bias(bias: Optional[Tensor], C: int, dtype, device=None) -> tuple[Tensor, Tensor]:
    """Bias matrices (H, C, C) for the own chunk (distance i - j) and the previous chunk (i + C - j)."""
    i = torch.arange(C)[:, None]
    j = torch.arange(C)[None, :]
    if bias is None:
        z = torch.zeros(1, C, C, dtype=dtype, device=device)
        return z, z
    dev = bias.device
    d_pres = (i - j).clamp(min=0).to(dev)
    d_prev = (i + C - j).to(dev)
    b_pres = bias[:, d_pres]
    b_prev = torch.where(d_prev <= C, bias[:, d_prev.clamp(max=C)], bias.new_zeros(()))
    return b_pres.to(dtype), b_prev.to(dtype)


def _within_chunk(q, k_hat, v, codes, codebook, state: VQAttentionState, C, bias, scale, return_state):
    """New tokens that all fall inside the current, partly filled chunk (n > 0, n + T <= C)."""
    B, T, H, Dk = q.shape
    S = codebook.shape[1]
    dev, dt, acc = q.device, q.dtype, _acc_dtype(q)
    n = state.pos % C
    qh = q.transpose(1, 2)  # (B, H, T, Dk)
    k_cur = torch.cat([state.cur_k.to(dt), k_hat.transpose(1, 2)], dim=2)  # (B, H, n + T, Dk)
    v_cur = torch.cat([state.cur_v.to(v.dtype), v.transpose(1, 2)], dim=2)
    z_cur = torch.cat([state.cur_codes, codes.transpose(1, 2)], dim=2)
    i = torch.arange(n, n + T, device=dev)[:, None]  # in-chunk offsets of the queries
    j = torch.arange(n + T, device=dev)[None, :]
    s_cur = (qh @ k_cur.transpose(-1, -2)).to(acc) * scale
    if bias is not None:
        s_cur = s_cur + bias[:, (i - j).clamp(min=0)].to(acc)[None]
    s_cur = s_cur.masked_fill(j > i, float("-inf"))
    parts, values = [s_cur], [v_cur]
    if state.prev_k is not None:
        jp = torch.arange(C, device=dev)[None, :]
        s_prev = (qh @ state.prev_k.to(dt).transpose(-1, -2)).to(acc) * scale
        if bias is not None:
            d = i + C - jp
            s_prev = s_prev + torch.where(d <= C, bias[:, d.clamp(max=C)], bias.new_zeros(())).to(acc)[None]
        parts.append(s_prev)
        values.append(state.prev_v.to(v.dtype))
    cnt = state.cache_count.to(acc)
    log_n = torch.where(cnt > 0, cnt.clamp(min=1).log(), torch.full_like(cnt, float("-inf")))
    s_cache = (qh @ codebook.detach().to(dt).transpose(-1, -2)[None]).to(acc) * scale + log_n[:, :, None, :]
    p = torch.softmax(torch.cat(parts + [s_cache], dim=-1), dim=-1)
    sizes = [x.shape[-1] for x in parts] + [S]
    ps = p.split(sizes, dim=-1)
    out = sum(pi.to(vi.dtype) @ vi for pi, vi in zip(ps[:-1], values))
    u_bar = state.cache_sum.to(acc) / cnt.clamp(min=1)[..., None]
    out = (out + (ps[-1] @ u_bar).to(out.dtype)).transpose(1, 2)
    new_state = None
    if return_state:
        if n + T < C:
            new_state = replace(state, pos=state.pos + T, cur_k=k_cur, cur_v=v_cur, cur_codes=z_cur)
        else:  # the chunk completed: it becomes "previous", the old previous chunk joins the cache
            count, total = state.cache_count.to(acc), state.cache_sum.to(acc)
            if state.prev_k is not None:
                c0, s0 = code_stats(state.prev_codes, state.prev_v, torch.ones(C, dtype=torch.bool, device=dev), S)
                count, total = count + c0, total + s0
            new_state = VQAttentionState(
                pos=state.pos + T, cur_k=k_cur[:, :, :0], cur_v=v_cur[:, :, :0], cur_codes=z_cur[:, :, :0],
                prev_k=k_cur, prev_v=v_cur, prev_codes=z_cur, cache_count=count, cache_sum=total)
        new_state = new_state.detach()
    return out, new_state


def chunked_vq_attention(q: Tensor, k_hat: Tensor, v: Tensor, codes: Tensor, codebook: Tensor, *,
                         chunk_size: int, bias: Optional[Tensor] = None, scale: Optional[float] = None,
                         state: Optional[VQAttentionState] = None, return_state: bool = False):
    """Chunked causal VQ attention, all chunks at once, with state in and out."""
    check_inputs(q, k_hat, v, codes, codebook, chunk_size, bias)
    B, T, H, Dk = q.shape
    Dv, S, C = v.shape[-1], codebook.shape[1], chunk_size
    scale = Dk ** -0.5 if scale is None else scale
    dev, dt, acc = q.device, q.dtype, _acc_dtype(q)
    if state is None:
        state = empty_state(q, v, codebook)
    n = state.pos % C
    assert state.cur_k.shape[2] == n, "state.cur_k does not hold pos % chunk_size tokens"
    if n > 0 and n + T <= C:  # decoding / small streaming pieces: only the new queries, O(T (C + S))
        return _within_chunk(q, k_hat, v, codes, codebook, state, C, bias, scale, return_state)

    # Prepend the partial current chunk so every chunk starts at an absolute multiple of C.
    # (no zero-size concatenations or pads when nothing is carried: torch.compile's inductor mishandles them)
    qh, kh, vh, zh = (x.transpose(1, 2) for x in (q, k_hat, v, codes))
    if n:
        qh = torch.cat([q.new_zeros(B, H, n, Dk), qh], dim=2)
        kh = torch.cat([state.cur_k.to(dt), kh], dim=2)
        vh = torch.cat([state.cur_v.to(v.dtype), vh], dim=2)
        zh = torch.cat([state.cur_codes, zh], dim=2)
    L = n + T
    R = math.ceil(L / C)
    pad = R * C - L
    if pad:
        qh, kh, vh = (F.pad(x, (0, 0, 0, pad)) for x in (qh, kh, vh))
        zh = F.pad(zh, (0, pad))
    qb = qh.reshape(B, H, R, C, Dk)
    kb = kh.reshape(B, H, R, C, Dk)
    vb = vh.reshape(B, H, R, C, Dv)
    zb = zh.reshape(B, H, R, C)
    valid = (torch.arange(R * C, device=dev) < L).view(R, C)

    has_prev = state.prev_k is not None
    prev0_k = state.prev_k.to(dt) if has_prev else q.new_zeros(B, H, C, Dk)
    prev0_v = state.prev_v.to(v.dtype) if has_prev else v.new_zeros(B, H, C, Dv)
    kp = torch.cat([prev0_k[:, :, None], kb[:, :, :-1]], dim=2)  # (B, H, R, C, Dk) chunk r-1
    vp = torch.cat([prev0_v[:, :, None], vb[:, :, :-1]], dim=2)
    prev_valid = torch.ones(R, dtype=torch.bool, device=dev)
    prev_valid[0] = has_prev

    # Cache for chunk r = state cache + stats of every chunk <= r - 2 (exclusive prefix with lag 2).
    cnt, sm = code_stats(zb, vb, valid, S)  # (B, H, R, S), (B, H, R, S, Dv)
    if has_prev:
        c0, s0 = code_stats(state.prev_codes, state.prev_v, torch.ones(C, dtype=torch.bool, device=dev), S)
    else:
        c0, s0 = cnt.new_zeros(B, H, S), sm.new_zeros(B, H, S, Dv)
    step_cnt = torch.cat([c0[:, :, None], cnt], dim=2)  # index m <-> chunk (first - 1 + m)
    step_sum = torch.cat([s0[:, :, None], sm], dim=2)
    excl_cnt = state.cache_count[:, :, None].to(acc) + F.pad(step_cnt.cumsum(2), (0, 0, 1, 0))[:, :, : R + 1]
    excl_sum = state.cache_sum[:, :, None].to(acc) + F.pad(step_sum.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, : R + 1]
    cache_cnt, cache_sum = excl_cnt[:, :, :R], excl_sum[:, :, :R]  # (B, H, R, S), (B, H, R, S, Dv)

    b_pres, b_prev = local_bias(bias, C, acc, dev)
    causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    neg_inf = float("-inf")
    s_pres = (qb @ kb.transpose(-1, -2)).to(acc) * scale + b_pres[None, :, None]
    s_pres = s_pres.masked_fill(~causal, neg_inf)
    s_prev = (qb @ kp.transpose(-1, -2)).to(acc) * scale + b_prev[None, :, None]
    s_prev = s_prev.masked_fill(~prev_valid[:, None, None], neg_inf)
    log_n = torch.where(cache_cnt > 0, cache_cnt.clamp(min=1).log(), torch.full_like(cache_cnt, neg_inf))
    cb = codebook.detach().to(dt)
    s_cache = torch.einsum("bhrcd,hsd->bhrcs", qb, cb).to(acc) * scale + log_n[:, :, :, None, :]

    p = torch.softmax(torch.cat([s_pres, s_prev, s_cache], dim=-1), dim=-1)
    p_pres, p_prev, p_cache = p.split([C, C, S], dim=-1)
    u_bar = cache_sum / cache_cnt.clamp(min=1)[..., None]  # per-code mean value (B, H, R, S, Dv)
    out = p_pres.to(vb.dtype) @ vb + p_prev.to(vb.dtype) @ vp + (p_cache @ u_bar.to(acc)).to(vb.dtype)
    out = out.reshape(B, H, R * C, Dv)[:, :, n:L].transpose(1, 2)

    new_state = None
    if return_state:
        n2 = L % C
        if n2 == 0:  # every chunk complete: the last one becomes "previous"
            last = R - 1
            new_state = VQAttentionState(
                pos=state.pos + T, cur_k=kb.new_zeros(B, H, 0, Dk), cur_v=vb.new_zeros(B, H, 0, Dv),
                cur_codes=zb.new_zeros(B, H, 0), prev_k=kb[:, :, last], prev_v=vb[:, :, last],
                prev_codes=zb[:, :, last], cache_count=excl_cnt[:, :, R], cache_sum=excl_sum[:, :, R])
        else:
            last = R - 1
            if R >= 2:
                pk, pv, pz = kb[:, :, R - 2], vb[:, :, R - 2], zb[:, :, R - 2]
            else:
                pk, pv, pz = state.prev_k, state.prev_v, state.prev_codes
            new_state = VQAttentionState(
                pos=state.pos + T, cur_k=kb[:, :, last, :n2], cur_v=vb[:, :, last, :n2],
                cur_codes=zb[:, :, last, :n2], prev_k=pk, prev_v=pv, prev_codes=pz,
                cache_count=excl_cnt[:, :, R - 1], cache_sum=excl_sum[:, :, R - 1])
        new_state = new_state.detach()
    return out, new_state
