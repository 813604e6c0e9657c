"""Diagnostics of causal chunked VQ attention: where the softmax mass of each query goes.

    split = attention_mass_split(q, k_hat, v, codes, codebook, chunk_size=C, bias=b)
    split["own"], split["prev"], split["cache"]          # fractions, sum to 1

The rule is exactly that of `chunked_vq_attention` (lm/ops/vq_attention_ref.py, state=None, so chunks are
aligned to position 0 of the window): query i in chunk r scores the keys of its own chunk (causal, bias
b[i - j]), the keys of chunk r - 1 (bias b[i - j] where i - j <= C) and the S codewords of the code cache,
each codeword weighted by how many keys of chunks <= r - 2 carry that code (score + log count). The mass
of a query is split into the three regions; the cache region is everything older than the previous chunk,
so in the dense oracle's terms it is the mass on keys j with chunk(j) <= chunk(i) - 2.

To read q, k_hat, v, codes, codebook and bias out of a model, set `mixer.capture = True` on the LongVQ
mixers (lm/model/longvq.py) before one forward without a carried state, then
`attention_mass_split(**mixer.captured, chunk_size=mixer.chunk_size)`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lm.ops.vq_attention_ref import check_inputs, code_stats, local_bias

REGIONS = ("own", "prev", "cache")


@torch.no_grad()
def attention_mass_split(q: Tensor, k_hat: Tensor, v: Tensor, codes: Tensor, codebook: Tensor, *, chunk_size: int,
                         bias: Optional[Tensor] = None, scale: Optional[float] = None) -> dict:
    """Fractions of softmax mass on the own chunk, the previous chunk and the code cache.

    Shapes as in vq_attention_ref (q, k_hat (B, T, H, Dk); v (B, T, H, Dv), used only for the shape check;
    codes (B, T, H); codebook (H, S, Dk); bias (H, C + 1)). Scores are computed in float32 (float64 inputs
    stay float64), whatever the input dtype. Returns
        own, prev, cache        floats: mean over batch, heads and query positions (sum to 1)
        per_position            {region: (T,) float64 CPU tensor}, mean over batch and heads
        per_head                {region: (H,) float64 CPU tensor}, mean over batch and positions
        per_head_position       {region: (H, T) float64 CPU tensor}, mean over batch
        entropy, entropy_flat   mean entropy (nats) of each query's distribution over its slots (own keys,
                                previous keys, codes), and of the flat distribution (q.k = 0, no bias) of
                                the same query; per_head also holds both per head. entropy/entropy_flat
                                near 1: the attention is flat; near 0: each query picks a few keys
        chunk_size, codebook_size, tokens
    Memory is O(B H T (2C + S)) for the scores: call it on one or a few windows.
    """
    check_inputs(q, k_hat, v, codes, codebook, chunk_size, bias)
    B, T, H, Dk = q.shape
    S, C = codebook.shape[1], chunk_size
    scale = Dk ** -0.5 if scale is None else scale
    dev = q.device
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(dev.type, enabled=False):
        R = math.ceil(T / C)
        pad = R * C - T
        qb = F.pad(q.transpose(1, 2).to(acc), (0, 0, 0, pad)).view(B, H, R, C, Dk)
        kb = F.pad(k_hat.transpose(1, 2).to(acc), (0, 0, 0, pad)).view(B, H, R, C, Dk)
        zb = F.pad(codes.transpose(1, 2), (0, pad)).view(B, H, R, C)
        valid = (torch.arange(R * C, device=dev) < T).view(R, C)
        kp = torch.cat([kb.new_zeros(B, H, 1, C, Dk), kb[:, :, :-1]], dim=2)  # previous chunk's keys
        prev_valid = torch.arange(R, device=dev) >= 1

        # Cache seen by chunk r: code counts of chunks <= r - 2 (the same lag-2 prefix as the chunked form).
        cnt, _ = code_stats(zb, kb.new_zeros(B, H, R, C, 1), valid, S)  # (B, H, R, S)
        cache_cnt = F.pad(cnt.cumsum(2), (0, 0, 2, 0))[:, :, :R]
        log_n = torch.where(cache_cnt > 0, cache_cnt.clamp(min=1).log(), torch.full_like(cache_cnt, float("-inf")))

        b_pres, b_prev = local_bias(None if bias is None else bias.to(acc), C, acc, dev)
        causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
        s_pres = (qb @ kb.transpose(-1, -2)) * scale + b_pres[None, :, None]
        s_pres = s_pres.masked_fill(~causal, float("-inf"))
        s_prev = (qb @ kp.transpose(-1, -2)) * scale + b_prev[None, :, None]
        s_prev = s_prev.masked_fill(~prev_valid[:, None, None], float("-inf"))
        s_cache = torch.einsum("bhrcd,hsd->bhrcs", qb, codebook.detach().to(acc)) * scale + log_n[:, :, :, None, :]
        scores = torch.cat([s_pres, s_prev, s_cache], dim=-1)
        p = torch.softmax(scores, dim=-1)
        mass = [x.sum(-1).reshape(B, H, R * C)[:, :, :T].double() for x in p.split([C, C, S], dim=-1)]
        # sharpness: entropy of the query's distribution over its slots (own keys, previous keys, codes)
        # against the flat attention of the same query (q.k = 0, no bias: each visible token weighted
        # alike, a code by its count). The mass split of content-based attention whose targets are spread
        # evenly over the window equals the flat one too, so only the entropy tells flat from sharp.
        flat = torch.where(torch.isinf(scores), scores, torch.zeros_like(scores))
        flat[..., 2 * C:] = log_n[:, :, :, None, :].expand_as(s_cache)
        ent = [(-(torch.softmax(x, -1) * torch.log_softmax(x, -1)).nan_to_num().sum(-1)).reshape(B, H, R * C)[:, :, :T]
               for x in (scores, flat)]
    out: dict = {"chunk_size": C, "codebook_size": S, "tokens": T, "per_position": {}, "per_head": {},
                 "per_head_position": {}}
    out["entropy"], out["entropy_flat"] = (float(e.double().mean()) for e in ent)
    out["per_head"]["entropy"], out["per_head"]["entropy_flat"] = (e.double().mean(dim=(0, 2)).cpu() for e in ent)
    for name, m in zip(REGIONS, mass):
        out[name] = float(m.mean())
        hp = m.mean(dim=0).cpu()  # (H, T)
        out["per_head_position"][name] = hp
        out["per_position"][name] = hp.mean(dim=0)
        out["per_head"][name] = hp.mean(dim=1)
    return out


def summarize_mass(split: dict, lo: int = 0, hi: Optional[int] = None, per_head: bool = False) -> dict:
    """Mean fractions over query positions [lo, hi) of one attention_mass_split result (None if empty);
    per_head=True gives a list per head instead of one float."""
    hi = split["tokens"] if hi is None else min(hi, split["tokens"])
    if hi <= lo:
        return {name: None for name in REGIONS}
    if per_head:
        return {name: split["per_head_position"][name][:, lo:hi].mean(dim=1).tolist() for name in REGIONS}
    return {name: float(split["per_position"][name][lo:hi].mean()) for name in REGIONS}


__all__ = ["attention_mass_split", "summarize_mass", "REGIONS"]
