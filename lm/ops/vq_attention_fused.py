"""Fused GPU path of causal chunked VQ attention (Triton): forward and backward.

Same signature, rule and return value as `lm.ops.vq_attention_ref.chunked_vq_attention` (the rule:
docs/model.md, "Causal chunked VQ attention"). Layout [B, T, H, D]; chunks of C tokens aligned to absolute
position 0.

Design (FlashAttention-2 style, one online softmax per query over three parts):
  * cache statistics (torch, fp32): per-chunk code counts and value sums by `index_add_`, exclusive
    prefix over chunks with lag 2 (plus the state's cache), giving log2 N[b,h,r,s] and the per-code
    means Ubar[b,h,r,s,:] (stored in the input dtype for the tensor-core product);
  * forward kernel, one program per (query block of BM rows inside chunk r, b*h): loops over codebook
    blocks of BN codes (score q.c*scale + log N, value Ubar), over the previous chunk's keys, BN at a time
    (bias b[i+C-j] where i + C - j <= C), and over the own chunk's keys causally (bias b[i-j]); keeps acc,
    running max and sum; stores out and the base-2 log-sum-exp. Scores never exceed one (BM x BN) tile. Every
    kernel reads the bias by distance from its (C + 1)-vector per head (scaled to base 2 once on the host),
    which stays in L1: no Toeplitz tiles;
  * backward, all in kernels (no fp32 copies of q/k/v-sized tensors in torch): delta = rowsum(dO * O);
    kernel cache (per code block: one reverse pass over the chunks, dUbar[r] = p_cache^T dO of chunk r's
    queries, kept as the suffix sum dSum[r'] = sum_{r >= r'} dUbar[r] / max(N[r], 1) in registers; dSum[r + 2]
    is the gradient of chunk r's value sums);
    kernel dq (per block of BM queries, BN codes / keys per step: recompute p, dS; dq, and the bias gradient
    as diagonal sums of each (BM x BN) dS tile, folded with tl.gather and added atomically into one partial
    row per (b, h, chunk));
    kernel dk/dv (per block of BN keys, BM queries per step: queries of the own chunk at or after the key and
    all queries of the next chunk, plus dSum[r + 2] gathered at the key's code), storing in the input dtype.
Tile sizes: KernelConfig's fwd_block_m/n, dq_block_m/n and dkdv_block_n/m (16..128; by default 64 rows stepping
over 32 keys or queries; a tile that does not divide the chunk size runs at the largest power of two that
does); the delta and cache kernels step over 64 queries. The codebook is padded with empty codes to a multiple of the code steps (and of 64).
With a state (pos % C == 0) the forward and dq kernels read the state's previous chunk in place, as
separate (B, H, C, D) tensors, for chunk 0 (no copy of the keys/values; the dk/dv kernel reads only this
call's keys), and the state's cache seeds the prefix sums; the new state is built exactly as the reference.
When the incoming state carries autograd (sequence parallelism: it comes from the other ranks), its
previous chunk's keys and values and its cached value sums get the reference's gradients, on the host
side of the backward: the cache sums dSum[0] (every chunk), the previous chunk's values dSum[1] (chunks
1, 2, ...) gathered at their codes, and the exact window (chunk 0's queries against the C previous keys)
recomputed in torch from the saved log-sum-exp: O(C^2) per (b, h), nothing of size T.

Importing needs Triton (ImportError otherwise, the dispatcher falls back); it needs no GPU.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import triton
import triton.language as tl

from lm.ops.vq_attention_ref import VQAttentionState, check_inputs, local_bias

LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_SUPPORTED_DIMS = (16, 32, 64, 128)
BLK = 64  # chunk_size must be a multiple of it; the default tile, the delta and cache kernels' query block
TILES = (16, 32, 64, 128)
"""The allowed tile sizes (KernelConfig.*_block_m / *_block_n)."""



@dataclass(frozen=True)
class KernelConfig:
    """Launch settings (lm.bench.vq_attention.config_sweep passes others to `fused_vq_attention`). The defaults are
    the fastest forward+backward of that sweep on an H200 at the 125M shape (docs/benchmarks.md): 64-row tiles
    stepping over 32 keys or queries, 4 warps, 3 stages."""

    fwd_warps: int = 4
    bwd_warps: int = 4
    stages: int = 3
    bias_grad: Literal["gather", "atomic", "skip"] = "gather"
    """How the dq kernel sums the bias gradient: gather = diagonal sums of each dS tile by tl.gather, then
    2 x max(dq_block_m, dq_block_n) atomics per tile; atomic = one atomic per tile element; skip = none (timing
    breakdowns only: the bias gets a WRONG, zero gradient). A gather launch that fails to compile falls back to
    atomic for that call, with a warning."""
    cache_block: int = 0
    """Codes per program of the backward's cache kernel (16, 32 or 64), which walks every chunk for its code
    block; 0 = auto: 64, halved (down to 16) while the grid has fewer than two programs per multiprocessor."""
    fwd_block_m: int = 64
    """Queries per program of the forward kernel."""
    fwd_block_n: int = 32
    """Keys / codes per inner step of the forward kernel."""
    dq_block_m: int = 64
    """Queries per program of the backward's dq kernel."""
    dq_block_n: int = 32
    """Keys / codes per inner step of the dq kernel."""
    dkdv_block_n: int = 64
    """Keys per program of the backward's dk/dv kernel."""
    dkdv_block_m: int = 32
    """Queries per inner step of the dk/dv kernel.

    Every tile size is one of TILES. A tile that does not divide chunk_size runs at the largest power of two
    that does (at least 64, chunk sizes being multiples of 64): 128 runs as 64 at chunk_size 192."""


CONFIG = KernelConfig(bias_grad="gather" if hasattr(tl, "gather") else "atomic")
"""The settings every call uses unless it passes its own (gather where this Triton has tl.gather)."""
_BIAS_GRAD_MODES = {"atomic": 0, "gather": 1, "skip": 2}  # the kernels' GATHER constexpr
_CACHE_BLOCKS = (0, 16, 32, 64)
_TILE_FIELDS = ("fwd_block_m", "fwd_block_n", "dq_block_m", "dq_block_n", "dkdv_block_n", "dkdv_block_m")


def check_config(config: KernelConfig) -> None:
    """ValueError naming the first KernelConfig field with a value the kernels do not take."""
    if config.bias_grad not in _BIAS_GRAD_MODES:
        raise ValueError(f"KernelConfig.bias_grad must be one of {tuple(_BIAS_GRAD_MODES)}, got {config.bias_grad!r}")
    if config.cache_block not in _CACHE_BLOCKS:
        raise ValueError(f"KernelConfig.cache_block must be one of {_CACHE_BLOCKS}, got {config.cache_block!r}")
    for name in _TILE_FIELDS:
        value = getattr(config, name)
        if type(value) is not int or value not in TILES:
            raise ValueError(f"KernelConfig.{name} must be one of {TILES}, got {value!r}")
    for name in ("fwd_warps", "bwd_warps"):
        value = getattr(config, name)
        if type(value) is not int or value not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.{name} must be one of (1, 2, 4, 8, 16), got {value!r}")
    if type(config.stages) is not int or config.stages < 1:
        raise ValueError(f"KernelConfig.stages must be an integer >= 1, got {config.stages!r}")


def tiles_for(config: KernelConfig, chunk_size: int) -> dict[str, int]:
    """The tile sizes the kernels run at for this chunk size: each KernelConfig tile field, capped at the largest
    power of two dividing chunk_size (a multiple of 64)."""
    cap = chunk_size & -chunk_size
    return {name: min(getattr(config, name), cap) for name in _TILE_FIELDS}


def _bias_base2(bias: Tensor) -> Tensor:
    """The bias in the base-2 score domain, bias * log2(e): (H, C + 1) fp32, contiguous."""
    return (bias.float() * LOG2E).contiguous()


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _bias_at(B2, h, d, C: tl.constexpr):
    """B2[h, d] for distances d (any shape) inside the window 0 <= d <= C, else 0."""
    ok = (d >= 0) & (d <= C)
    return tl.load(B2 + h * (C + 1) + tl.where(ok, d, 0), mask=ok, other=0.0)


@triton.jit
def _softmax_step(s, m_i, l_i, acc, vals, PREC: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _prev_chunk(K, V, PK, PV, b, h, r, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                s_pkb, s_pkt, s_pkh, s_pvb, s_pvt, s_pvh, HAS_PREV: tl.constexpr, C: tl.constexpr):
    """Chunk r's previous chunk: (number of keys, key row-0 pointer, key row stride, value row-0 pointer, value
    row stride). Rows (r - 1) * C.. of K/V for r >= 1; for r == 0 the state's chunk PK/PV (HAS_PREV) or none."""
    kp_base = K + b * s_kb + h * s_kh + (r - 1) * C * s_kt
    vp_base = V + b * s_vb + h * s_vh + (r - 1) * C * s_vt
    kp_st = s_kt
    vp_st = s_vt
    if HAS_PREV:
        n_prev = C
        if r == 0:
            kp_base = PK + b * s_pkb + h * s_pkh
            vp_base = PV + b * s_pvb + h * s_pvh
            kp_st = s_pkt
            vp_st = s_pvt
    else:
        n_prev = tl.minimum(r * C, C)
    return n_prev, kp_base, kp_st, vp_base, vp_st


@triton.jit
def _fwd_kernel(Q, K, V, PK, PV, CB, LOGN, UBAR, BIAS, O, LSE,
                s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                s_pkb, s_pkt, s_pkh, s_pvb, s_pvt, s_pvh, s_ob, s_ot, s_oh,
                T, H, R, qk_scale,
                HAS_BIAS: tl.constexpr, HAS_PREV: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
                DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    NMB: tl.constexpr = C // BM
    r = pid_m // NMB
    mb = pid_m % NMB
    i_loc = mb * BM + tl.arange(0, BM)
    q_pos = r * C + i_loc
    q_ok = q_pos < T
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    offs_n = tl.arange(0, BN)
    q = tl.load(Q + b * s_qb + h * s_qh + q_pos[:, None] * s_qt + dk[None, :], mask=q_ok[:, None], other=0.0)
    m_i = tl.full([BM], -1e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DV], tl.float32)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh

    # 1) per-code cache of chunks <= r - 2: score q.c*scale + log N, value Ubar
    cb_base = CB + h * S * DK
    ln_base = LOGN + (bh * R + r) * S
    u_base = UBAR + (bh * R + r) * S * DV
    for s0 in range(0, S, BN):
        c = tl.load(cb_base + (s0 + offs_n)[:, None] * DK + dk[None, :])
        s = tl.dot(q, tl.trans(c), input_precision=PREC) * qk_scale
        s = s + tl.load(ln_base + s0 + offs_n)[None, :]
        u = tl.load(u_base + (s0 + offs_n)[:, None] * DV + dv[None, :])
        m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, u, PREC)

    # 2) previous chunk, exact; bias b[i + C - j] inside the window (distance <= C). Chunk r - 1 of K/V, or
    # for r == 0 the state's previous chunk PK/PV (B, H, C, D) when there is one
    n_prev, kp_base, kp_st, vp_base, vp_st = _prev_chunk(K, V, PK, PV, b, h, r, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                                                         s_pkb, s_pkt, s_pkh, s_pvb, s_pvt, s_pvh, HAS_PREV, C)
    for j0 in range(0, n_prev, BN):
        j = j0 + offs_n
        k = tl.load(kp_base + j[:, None] * kp_st + dk[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if HAS_BIAS:
            base = mb * BM + C - j0  # distance of the tile's pair (first query, first key)
            if base - (BN - 1) <= C:  # some pair of the tile inside the window (smallest: last key)
                s += _bias_at(BIAS, h, i_loc[:, None] + C - j[None, :], C)
        vv = tl.load(vp_base + j[:, None] * vp_st + dv[None, :])
        m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, vv, PREC)

    # 3) own chunk, causal; bias b[i - j]
    ko = r * C
    hi = tl.minimum((mb + 1) * BM, T - r * C)
    for j0 in range(0, hi, BN):
        j = j0 + offs_n
        k_ok = (r * C + j) < T
        k = tl.load(k_base + (ko + j)[:, None] * s_kt + dk[None, :], mask=k_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        d = i_loc[:, None] - j[None, :]
        keep = (d >= 0) & k_ok[None, :]
        if HAS_BIAS:
            s += _bias_at(BIAS, h, d, C)
        s = tl.where(keep, s, float("-inf"))
        vv = tl.load(v_base + (ko + j)[:, None] * s_vt + dv[None, :], mask=k_ok[:, None], other=0.0)
        m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, vv, PREC)

    out = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + q_pos[:, None] * s_ot + dv[None, :], out.to(O.dtype.element_ty),
             mask=q_ok[:, None])
    tl.store(LSE + bh * (R * C) + q_pos, m_i + tl.log2(l_i))


@triton.jit
def _accum_bias(ptr, ds, base, C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GATHER: tl.constexpr):
    """dbias[base + (i - j)] += ds[i, j] for a (BM x BN) tile, rows i, columns j (entries outside the window are
    zero).

    GATHER == 1: the tile's diagonal sums, 2 x max(BM, BN) atomics. BM >= BN: x[i, t] = ds[i, (i - t) mod BN]
    (tl.gather along the columns); with i = a * BN + i', entry (i, t) has distance i - j = a * BN + t when i' >= t,
    else a * BN + t - BN, so per (a, t) the sum over i' >= t goes to the first distance and the sum over i' < t to
    the second. BM < BN, the same along the rows: x[s, j] = ds[(j + s) mod BM, j]; with j = b * BM + j', entry
    (s, j) has distance s - b * BM when j' + s < BM, else s - b * BM - BM.
    GATHER == 0: one atomic per tile element."""
    if GATHER == 1:
        if BM == BN:
            ii = tl.arange(0, BM)[:, None]
            tt = tl.arange(0, BN)[None, :]
            x = tl.gather(ds, (ii - tt + BN) % BN, axis=1)  # x[i, t] = ds[i, (i - t) mod BN]
            lower = tl.sum(tl.where(ii >= tt, x, 0.0), axis=0)  # distance t
            upper = tl.sum(tl.where(ii < tt, x, 0.0), axis=0)  # distance t - BN
            d_lo = base + tl.arange(0, BN)
            d_up = d_lo - BN
        elif BM > BN:
            A: tl.constexpr = BM // BN
            ii = tl.arange(0, BM)[:, None]
            tt = tl.arange(0, BN)[None, :]
            x = tl.reshape(tl.gather(ds, (ii - tt + BN) % BN, axis=1), (A, BN, BN))  # x[a, i', t]
            i3 = tl.arange(0, BN)[None, :, None]
            t3 = tl.arange(0, BN)[None, None, :]
            lower = tl.sum(tl.where(i3 >= t3, x, 0.0), axis=1)  # (A, BN): distance a * BN + t
            upper = tl.sum(tl.where(i3 < t3, x, 0.0), axis=1)  # distance a * BN + t - BN
            d_lo = base + tl.arange(0, A)[:, None] * BN + tl.arange(0, BN)[None, :]
            d_up = d_lo - BN
        else:
            A: tl.constexpr = BN // BM
            ss = tl.arange(0, BM)[:, None]
            jj = tl.arange(0, BN)[None, :]
            x = tl.reshape(tl.gather(ds, (jj + ss) % BM, axis=0), (BM, A, BM))  # x[s, b, j']
            s3 = tl.arange(0, BM)[:, None, None]
            j3 = tl.arange(0, BM)[None, None, :]
            lower = tl.sum(tl.where(j3 + s3 < BM, x, 0.0), axis=2)  # (BM, A): distance s - b * BM
            upper = tl.sum(tl.where(j3 + s3 >= BM, x, 0.0), axis=2)  # distance s - b * BM - BM
            d_lo = base + tl.arange(0, BM)[:, None] - tl.arange(0, A)[None, :] * BM
            d_up = d_lo - BM
        tl.atomic_add(ptr + d_lo, lower, mask=(d_lo >= 0) & (d_lo <= C), sem="relaxed")
        tl.atomic_add(ptr + d_up, upper, mask=(d_up >= 0) & (d_up <= C), sem="relaxed")
    elif GATHER == 0:
        d = base + tl.arange(0, BM)[:, None] - tl.arange(0, BN)[None, :]
        tl.atomic_add(ptr + d, ds, mask=(d >= 0) & (d <= C), sem="relaxed")


@triton.jit
def _bwd_dq_kernel(Q, K, V, PK, PV, CB, LOGN, UBAR, BIAS, DO, LSE, DELTA, DQ, DBIAS,
                   s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                   s_pkb, s_pkt, s_pkh, s_pvb, s_pvt, s_pvh, s_db, s_dt, s_dh,
                   T, H, R, qk_scale, sm_scale,
                   HAS_BIAS: tl.constexpr, HAS_PREV: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
                   DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                   GATHER: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    NMB: tl.constexpr = C // BM
    r = pid_m // NMB
    mb = pid_m % NMB
    i0 = mb * BM
    i_loc = i0 + tl.arange(0, BM)
    q_pos = r * C + i_loc
    q_ok = q_pos < T
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    offs_n = tl.arange(0, BN)
    q = tl.load(Q + b * s_qb + h * s_qh + q_pos[:, None] * s_qt + dk[None, :], mask=q_ok[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + q_pos[:, None] * s_dt + dv[None, :], mask=q_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * (R * C) + q_pos)
    delta = tl.load(DELTA + bh * (R * C) + q_pos)
    dq = tl.zeros([BM, DK], tl.float32)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    db_ptr = DBIAS + (bh * R + r) * (C + 1)  # partial row of this (b, h, chunk)

    cb_base = CB + h * S * DK
    ln_base = LOGN + (bh * R + r) * S
    u_base = UBAR + (bh * R + r) * S * DV
    for s0 in range(0, S, BN):
        c = tl.load(cb_base + (s0 + offs_n)[:, None] * DK + dk[None, :])
        s = tl.dot(q, tl.trans(c), input_precision=PREC) * qk_scale + tl.load(ln_base + s0 + offs_n)[None, :]
        p = tl.exp2(s - lse[:, None])
        u = tl.load(u_base + (s0 + offs_n)[:, None] * DV + dv[None, :])
        dp = tl.dot(do, tl.trans(u), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(c.dtype), c, input_precision=PREC)

    n_prev, kp_base, kp_st, vp_base, vp_st = _prev_chunk(K, V, PK, PV, b, h, r, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                                                         s_pkb, s_pkt, s_pkh, s_pvb, s_pvt, s_pvh, HAS_PREV, C)
    for j0 in range(0, n_prev, BN):
        j = j0 + offs_n
        k = tl.load(kp_base + j[:, None] * kp_st + dk[None, :])
        vv = tl.load(vp_base + j[:, None] * vp_st + dv[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        d = i_loc[:, None] + C - j[None, :]
        win = d <= C
        if HAS_BIAS:
            if j0 + BN > i0:  # some key j >= some query i: distance <= C
                s += _bias_at(BIAS, h, d, C)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(vv), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if HAS_BIAS:
            if j0 + BN > i0:  # some key j >= some query i: distance <= C
                _accum_bias(db_ptr, tl.where(win, ds, 0.0), i0 + C - j0, C, BM, BN, GATHER)

    ko = r * C
    hi = tl.minimum(i0 + BM, T - r * C)
    for j0 in range(0, hi, BN):
        j = j0 + offs_n
        k_ok = (r * C + j) < T
        k = tl.load(k_base + (ko + j)[:, None] * s_kt + dk[None, :], mask=k_ok[:, None], other=0.0)
        vv = tl.load(v_base + (ko + j)[:, None] * s_vt + dv[None, :], mask=k_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        d = i_loc[:, None] - j[None, :]
        keep = (d >= 0) & k_ok[None, :] & q_ok[:, None]
        if HAS_BIAS:
            s += _bias_at(BIAS, h, d, C)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vv), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if HAS_BIAS:
            _accum_bias(db_ptr, ds, i0 - j0, C, BM, BN, GATHER)

    dq = dq * sm_scale
    tl.store(DQ + b * s_qb + h * s_qh + q_pos[:, None] * s_qt + dk[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_ok[:, None])


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, BIAS, DO, LSE, DELTA, CODES, DSUM, DKo, DVo,
                     s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh,
                     s_cb, s_ct, s_ch, s_gkb, s_gkt, s_gkh, s_gvb, s_gvt, s_gvh,
                     T, H, R, qk_scale, sm_scale,
                     HAS_BIAS: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
                     DK: tl.constexpr, DV: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                     PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    NNB: tl.constexpr = C // BN
    r = pid_n // NNB
    nb = pid_n % NNB
    j_loc = nb * BN + tl.arange(0, BN)
    k_real = r * C + j_loc
    k_ok = k_real < T
    dk_ = tl.arange(0, DK)
    dv_ = tl.arange(0, DV)
    offs_m = tl.arange(0, BM)
    k = tl.load(K + b * s_kb + h * s_kh + k_real[:, None] * s_kt + dk_[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + k_real[:, None] * s_vt + dv_[None, :], mask=k_ok[:, None], other=0.0)
    gk = tl.zeros([BN, DK], tl.float32)
    gv = tl.zeros([BN, DV], tl.float32)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_db + h * s_dh

    # own chunk: queries i >= j
    lo = (nb * BN // BM) * BM
    hi = tl.minimum(C, T - r * C)
    for i0 in range(lo, hi, BM):
        i_loc = i0 + offs_m
        q_pos = r * C + i_loc
        q_ok = q_pos < T
        q = tl.load(q_base + q_pos[:, None] * s_qt + dk_[None, :], mask=q_ok[:, None], other=0.0)
        do = tl.load(do_base + q_pos[:, None] * s_dt + dv_[None, :], mask=q_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * (R * C) + q_pos)
        delta = tl.load(DELTA + bh * (R * C) + q_pos)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # (BN, BM)
        d = i_loc[None, :] - j_loc[:, None]
        keep = (d >= 0) & q_ok[None, :] & k_ok[:, None]
        if HAS_BIAS:
            sT += _bias_at(BIAS, h, d, C)
        pT = tl.where(keep, tl.exp2(sT - lse[None, :]), 0.0)
        gv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        gk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)

    # next chunk: every query, bias b[i + C - j] inside the window
    n_next = tl.minimum(tl.maximum(T - (r + 1) * C, 0), C)
    for i0 in range(0, n_next, BM):
        i_loc = i0 + offs_m
        q_pos = (r + 1) * C + i_loc
        q_ok = q_pos < T
        q = tl.load(q_base + q_pos[:, None] * s_qt + dk_[None, :], mask=q_ok[:, None], other=0.0)
        do = tl.load(do_base + q_pos[:, None] * s_dt + dv_[None, :], mask=q_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * (R * C) + q_pos, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + bh * (R * C) + q_pos, mask=q_ok, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        d = i_loc[None, :] + C - j_loc[:, None]
        if HAS_BIAS:
            base = i0 + C - nb * BN
            if base - (BN - 1) <= C:
                sT += _bias_at(BIAS, h, d, C)
        pT = tl.where(q_ok[None, :], tl.exp2(sT - lse[None, :]), 0.0)
        gv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        gk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)

    # the cache path: each key's value also entered the per-code means of chunks r + 2, ...; DSUM[r + 2] holds
    # that gradient per code (_bwd_cache_kernel), gathered here at the key's code
    code = tl.load(CODES + b * s_cb + h * s_ch + k_real * s_ct, mask=k_ok, other=0)
    g_ok = k_ok & (k_real + 2 * C < R * C)  # chunk r + 2 exists
    gv += tl.load(DSUM + ((bh * R + r + 2) * S + code)[:, None] * DV + dv_[None, :], mask=g_ok[:, None], other=0.0)
    gk = gk * sm_scale
    tl.store(DKo + b * s_gkb + h * s_gkh + k_real[:, None] * s_gkt + dk_[None, :], gk.to(DKo.dtype.element_ty),
             mask=k_ok[:, None])
    tl.store(DVo + b * s_gvb + h * s_gvh + k_real[:, None] * s_gvt + dv_[None, :], gv.to(DVo.dtype.element_ty),
             mask=k_ok[:, None])


@triton.jit
def _bwd_cache_kernel(Q, CB, LOGN, DO, LSE, DSUM,
                      s_qb, s_qt, s_qh, s_db, s_dt, s_dh,
                      T, H, R, qk_scale,
                      C: tl.constexpr, S: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BS: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """DSUM[bh, r, s] = sum_{r' >= r} dUbar[r', s] / max(N[r', s], 1) for one (code block, bh), fp32.

    One reverse pass over the chunks with the suffix sum in registers. dUbar[r] = p_cache[r]^T dO over chunk
    r's queries, and p_cache / N = exp2(q.c * scale - lse) for a code with N > 0 (log N cancels), 0 otherwise;
    so each chunk adds exp2(q.c * scale - lse)^T dO. Ubar[r] = Sum[r] / max(N[r], 1) with Sum[r] the value
    sums of chunks <= r - 2 (plus the state's), so DSUM[r + 2] is the gradient of chunk r's value sums, DSUM[1]
    that of the state's previous chunk and DSUM[0] that of the state's cache."""
    sb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s_idx = sb * BS + tl.arange(0, BS)
    dk_ = tl.arange(0, DK)
    dv_ = tl.arange(0, DV)
    offs_m = tl.arange(0, BM)
    c = tl.load(CB + h * S * DK + s_idx[:, None] * DK + dk_[None, :])
    acc = tl.zeros([BS, DV], tl.float32)
    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_db + h * s_dh
    for i in range(0, R):
        r = R - 1 - i
        ln = tl.load(LOGN + (bh * R + r) * S + s_idx)
        if tl.max(ln, 0) > float("-inf"):  # chunks 0 and 1 without a state (and empty code blocks) have no cache
            code_ok = ln > float("-inf")
            hi = tl.minimum(C, T - r * C)
            for i0 in range(0, hi, BM):
                q_pos = r * C + i0 + offs_m
                q_ok = q_pos < T
                q = tl.load(q_base + q_pos[:, None] * s_qt + dk_[None, :], mask=q_ok[:, None], other=0.0)
                do = tl.load(do_base + q_pos[:, None] * s_dt + dv_[None, :], mask=q_ok[:, None], other=0.0)
                lse = tl.load(LSE + bh * (R * C) + q_pos)
                sT = tl.dot(c, tl.trans(q), input_precision=PREC) * qk_scale
                pT = tl.where(code_ok[:, None] & q_ok[None, :], tl.exp2(sT - lse[None, :]), 0.0)
                acc += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        tl.store(DSUM + ((bh * R + r) * S + s_idx)[:, None] * DV + dv_[None, :], acc)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, s_ob, s_ot, s_oh, s_db, s_dt, s_dh, T, H, R,
                      C: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr):
    """DELTA[bh, t] = sum_d dO[b, t, h, d] * O[b, t, h, d] in fp32 (0 for the padding rows t >= T)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = pid * BM + tl.arange(0, BM)
    ok = t < T
    dv = tl.arange(0, DV)
    o = tl.load(O + b * s_ob + h * s_oh + t[:, None] * s_ot + dv[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + t[:, None] * s_dt + dv[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + bh * (R * C) + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1))


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def supports(q: Tensor, v: Tensor, chunk_size: int, state=None) -> bool:
    """True when the fused kernel handles these inputs (else the dispatcher uses `chunked`)."""
    if not (q.is_cuda and v.is_cuda and torch.cuda.is_available()):
        return False
    if q.dtype not in _SUPPORTED_DTYPES or v.dtype != q.dtype or q.dim() != 4 or v.dim() != 4:
        return False
    if q.shape[-1] not in _SUPPORTED_DIMS or v.shape[-1] not in _SUPPORTED_DIMS:
        return False
    if chunk_size < BLK or chunk_size % BLK != 0 or chunk_size > 4096:
        return False
    if state is not None and state.pos % chunk_size != 0:
        return False
    return True


def cache_tables(codes: Tensor, v: Tensor, state: Optional[VQAttentionState], C: int, S: int, R: int):
    with torch.autocast(codes.device.type, enabled=False):  # counts and sums stay exact fp32
        return _cache_tables_fp32(codes, v, state, C, S, R)


def _cache_tables_fp32(codes: Tensor, v: Tensor, state: Optional[VQAttentionState], C: int, S: int, R: int):
    """Exclusive lag-2 prefix of per-chunk code counts and value sums: (B, H, R+1, S), (B, H, R+1, S, Dv) fp32.

    Entry r is the cache seen by chunk r (state cache + state's previous chunk + chunks 0..r-2 of
    this call); entry R is the cache after the call when T is a multiple of C.
    """
    B, T, H = codes.shape
    Dv = v.shape[-1]
    dev = codes.device
    r_idx = torch.arange(T, device=dev) // C
    bh = (torch.arange(B, device=dev)[:, None] * H + torch.arange(H, device=dev)[None, :])[:, None, :]
    idx = ((bh * R + r_idx[None, :, None]) * S + codes).reshape(-1)
    # exact integer counts, no float atomics; not bincount, which reads the indices' min and max back to the host
    ones = torch.ones_like(idx, dtype=torch.int32)
    cnt = torch.zeros(B * H * R * S, dtype=torch.int32, device=dev).scatter_add_(0, idx, ones).float()
    sm = torch.zeros(B * H * R * S, Dv, dtype=torch.float32, device=dev)
    sm.index_add_(0, idx, v.reshape(-1, Dv).float())
    cnt = cnt.view(B, H, R, S)
    sm = sm.view(B, H, R, S, Dv)
    if state is not None and state.prev_k is not None:
        c0 = F.one_hot(state.prev_codes, S).float().sum(-2)
        s0 = F.one_hot(state.prev_codes, S).float().transpose(-1, -2) @ state.prev_v.float()
    else:
        c0, s0 = cnt.new_zeros(B, H, S), sm.new_zeros(B, H, S, Dv)
    step_cnt = torch.cat([c0[:, :, None], cnt], dim=2)  # index m <-> chunk m - 1
    step_sum = torch.cat([s0[:, :, None], sm], dim=2)
    excl_cnt = F.pad(step_cnt.cumsum(2), (0, 0, 1, 0))[:, :, : R + 1]
    excl_sum = F.pad(step_sum.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, : R + 1]
    if state is not None:
        excl_cnt = excl_cnt + state.cache_count[:, :, None].float()
        excl_sum = excl_sum + state.cache_sum[:, :, None].float()
    return excl_cnt, excl_sum


def _rows_contiguous(x: Tensor) -> Tensor:
    """x itself when its last dimension is contiguous (the kernels' row loads), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _prev_strides(pk: Tensor, pv: Tensor, has_prev: bool):
    """The kernels' (batch, row, head) strides of the previous chunk (B, H, C, D); zeros without one."""
    if not has_prev:
        return (0,) * 6
    return pk.stride(0), pk.stride(2), pk.stride(1), pv.stride(0), pv.stride(2), pv.stride(1)


def _cache_block(setting: int, Sp: int, BH: int, device: torch.device) -> int:
    """Codes per program of the cache kernel (see KernelConfig.cache_block)."""
    if setting:
        return setting
    bs = BLK
    if device.type == "cuda":
        n_sm = torch.cuda.get_device_properties(device).multi_processor_count
        while bs > 16 and (Sp // bs) * BH < 2 * n_sm:
            bs //= 2
    return bs


def _grid_cfg(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


class _FusedVQAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_hat, v, bias, prev_k, prev_v, cache_in, prev_codes, codes, cb, logn, ubar, C, scale, cfg):
        """cache_in (B, H, S, Dv) and prev_codes (B, H, C): the incoming state's cache sums and previous
        codes, only to route gradients to the state (their values are already in logn / ubar)."""
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        R = logn.shape[1]
        Sp = cb.shape[1]
        has_prev = prev_k is not None
        if has_prev:  # read by the kernels in place, (B, H, C, D)
            pk, pv = _rows_contiguous(prev_k.to(q.dtype)), _rows_contiguous(prev_v.to(v.dtype))
        else:  # never read (HAS_PREV=False)
            pk, pv = k_hat, v
        if bias is not None:
            with torch.no_grad():
                bt = _bias_base2(bias.detach())
        else:
            bt = q.new_zeros(1, dtype=torch.float32)
        out = torch.empty(B, T, H, Dv, dtype=v.dtype, device=q.device)
        lse = torch.empty(B * H, R * C, dtype=torch.float32, device=q.device)
        prec = _grid_cfg(q.dtype)
        tiles = tiles_for(cfg, C)
        bm = tiles["fwd_block_m"]
        grid = (R * (C // bm), B * H)
        _fwd_kernel[grid](
            q, k_hat, v, pk, pv, cb, logn, ubar, bt, out, lse,
            q.stride(0), q.stride(1), q.stride(2), k_hat.stride(0), k_hat.stride(1), k_hat.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *_prev_strides(pk, pv, has_prev),
            out.stride(0), out.stride(1), out.stride(2),
            T, H, R, scale * LOG2E,
            HAS_BIAS=bias is not None, HAS_PREV=has_prev, C=C, S=Sp, DK=Dk, DV=Dv, BM=bm, BN=tiles["fwd_block_n"],
            PREC=prec, num_warps=cfg.fwd_warps, num_stages=cfg.stages)
        ctx.save_for_backward(q, k_hat, v, pk if has_prev else None, pv if has_prev else None, codes, cb, logn,
                              ubar, bt, out, lse, prev_codes, bias)
        ctx.meta = (C, scale, bias is not None, bias.dtype if bias is not None else None, cfg)
        ctx.state_dtypes = (None if prev_k is None else prev_k.dtype, None if prev_v is None else prev_v.dtype,
                            None if cache_in is None else cache_in.dtype)
        ctx.cache_codes = None if cache_in is None else cache_in.shape[2]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_hat, v, pk, pv, codes, cb, logn, ubar, bt, out, lse, prev_codes, bias = ctx.saved_tensors
        want_prev_k, want_prev_v, want_cache = ctx.needs_input_grad[4:7]
        C, scale, has_bias, bias_dtype, cfg = ctx.meta
        has_prev = pk is not None
        if not has_prev:
            pk, pv = k_hat, v
        B, T, H, Dk = q.shape
        Dv = v.shape[-1]
        R, Sp = logn.shape[1], cb.shape[1]
        dev = q.device
        do = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        delta = torch.empty(B * H, R * C, dtype=torch.float32, device=dev)
        _bwd_delta_kernel[(R * (C // BLK), B * H)](
            out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
            T, H, R, C=C, DV=Dv, BM=BLK, num_warps=4)
        prec = _grid_cfg(q.dtype)
        nw, ns = cfg.bwd_warps, cfg.stages
        tiles = tiles_for(cfg, C)

        dq = torch.empty_like(q)
        # bias gradient: one partial row per (b, h, chunk) (the atomics of a chunk's query blocks only
        # contend with each other), summed over b and chunks afterwards
        dbias = torch.zeros(B, H, R, C + 1, dtype=torch.float32, device=dev) if has_bias else bt
        def launch_dq(gather):
            _bwd_dq_kernel[(R * (C // tiles["dq_block_m"]), B * H)](
                q, k_hat, v, pk, pv, cb, logn, ubar, bt, do, lse, delta, dq, dbias,
                q.stride(0), q.stride(1), q.stride(2), k_hat.stride(0), k_hat.stride(1), k_hat.stride(2),
                v.stride(0), v.stride(1), v.stride(2), *_prev_strides(pk, pv, has_prev),
                do.stride(0), do.stride(1), do.stride(2),
                T, H, R, scale * LOG2E, scale,
                HAS_BIAS=has_bias, HAS_PREV=has_prev, C=C, S=Sp, DK=Dk, DV=Dv, BM=tiles["dq_block_m"],
                BN=tiles["dq_block_n"], PREC=prec, GATHER=gather, num_warps=nw, num_stages=ns)

        mode = _BIAS_GRAD_MODES[cfg.bias_grad] if has_bias else 0
        if mode == 1:
            try:
                launch_dq(1)
            except Exception as e:  # noqa: BLE001  (tl.gather failing to compile: tile atomics for this call)
                warnings.warn(f"vq_attention_fused: the tl.gather path failed ({e!r:.200}); using tile atomics for "
                              "dbias (pass KernelConfig(bias_grad='atomic') to skip the attempt)")
                dbias.zero_()
                launch_dq(0)
        else:
            launch_dq(mode)

        # cache gradient first: dsum[:, r] = sum_{r' >= r} dUbar[r'] / N[r'] per code, which the dk/dv kernel
        # gathers at every key's code (chunk r's keys: entry r + 2)
        dsum = torch.empty(B * H, R, Sp, Dv, dtype=torch.float32, device=dev)
        bs = _cache_block(cfg.cache_block, Sp, B * H, dev)
        _bwd_cache_kernel[(Sp // bs, B * H)](
            q, cb, logn, do, lse, dsum,
            q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
            T, H, R, scale * LOG2E,
            C=C, S=Sp, DK=Dk, DV=Dv, BS=bs, BM=BLK, PREC=prec, num_warps=nw, num_stages=ns)
        g_prev_k = g_prev_v = g_cache = None
        if want_prev_v or want_cache:
            from_chunk1 = dsum[:, 1] if R >= 2 else torch.zeros_like(dsum[:, 0])  # sum_{r >= 1} dUbar[r] / N[r]
            if want_cache:
                g_cache = dsum[:, 0].view(B, H, Sp, Dv)[:, :, : ctx.cache_codes].to(ctx.state_dtypes[2])
            if want_prev_v:  # the previous chunk's values entered the caches of chunks 1, 2, ...
                g_prev_v = from_chunk1.view(B, H, Sp, Dv).gather(2, prev_codes[..., None].expand(-1, -1, -1, Dv))
        if want_prev_k or want_prev_v:
            gk_w, gv_w = _previous_chunk_grads(q, pk, pv, do, lse, delta, bias, C, scale)
            g_prev_k = gk_w.to(ctx.state_dtypes[0]) if want_prev_k else None
            if want_prev_v:
                g_prev_v = (gv_w + (g_prev_v if g_prev_v is not None else 0.0)).to(ctx.state_dtypes[1])

        gk = torch.empty(B, T, H, Dk, dtype=q.dtype, device=dev)
        gv = torch.empty(B, T, H, Dv, dtype=v.dtype, device=dev)
        _bwd_dkdv_kernel[(R * (C // tiles["dkdv_block_n"]), B * H)](
            q, k_hat, v, bt, do, lse, delta, codes, dsum, gk, gv,
            q.stride(0), q.stride(1), q.stride(2), k_hat.stride(0), k_hat.stride(1), k_hat.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            codes.stride(0), codes.stride(1), codes.stride(2),
            gk.stride(0), gk.stride(1), gk.stride(2), gv.stride(0), gv.stride(1), gv.stride(2),
            T, H, R, scale * LOG2E, scale,
            HAS_BIAS=has_bias, C=C, S=Sp, DK=Dk, DV=Dv, BN=tiles["dkdv_block_n"],
            BM=tiles["dkdv_block_m"], PREC=prec, num_warps=nw, num_stages=ns)

        dbias_out = dbias.sum((0, 2)).to(bias_dtype) if has_bias else None
        return (dq, gk, gv, dbias_out, g_prev_k, g_prev_v, g_cache) + (None,) * 8


def _previous_chunk_grads(q, prev_k, prev_v, do, lse, delta, bias, C, scale):
    """Gradients of the previous chunk's keys and values (B, H, C, D) through the exact window: chunk 0's
    queries against the C previous keys, with the probabilities recomputed from the saved base-2 log-sum-exp
    (fp32). prev_k, prev_v: the state's previous chunk, (B, H, C, D)."""
    B, T, H, Dk = q.shape
    n = min(C, T)
    f = torch.float32
    q0 = q[:, :n].float().transpose(1, 2)  # (B, H, n, Dk)
    kp, vp = prev_k.float(), prev_v.float()  # (B, H, C, .)
    do0 = do[:, :n].float().transpose(1, 2)
    s = (q0 @ kp.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + local_bias(bias.detach(), C, f, q.device)[1][None, :, :n]
    p = torch.exp2(s * LOG2E - lse.view(B, H, -1)[:, :, :n, None])
    dp = do0 @ vp.transpose(-1, -2)
    ds = p * (dp - delta.view(B, H, -1)[:, :, :n, None])
    return (ds.transpose(-1, -2) @ q0) * scale, p.transpose(-1, -2) @ do0


@torch.compiler.disable  # under torch.compile: an opaque call (Dynamo does not trace the Triton launches);
def _apply_fused(*args):  # the table building around it stays in the compiled graph and gets fused
    return _FusedVQAttention.apply(*args)


def fused_vq_attention(q: Tensor, k_hat: Tensor, v: Tensor, codes: Tensor, codebook: Tensor, *,
                       chunk_size: int, bias: Optional[Tensor] = None, scale: Optional[float] = None,
                       state: Optional[VQAttentionState] = None, return_state: bool = False,
                       config: KernelConfig = CONFIG):
    """Drop-in for `chunked_vq_attention` on CUDA (see `supports`). Returns (out, new_state or None)."""
    check_inputs(q, k_hat, v, codes, codebook, chunk_size, bias)
    check_config(config)
    B, T, H, Dk = q.shape
    Dv, S, C = v.shape[-1], codebook.shape[1], chunk_size
    if state is not None and state.pos % C != 0:
        raise ValueError("fused_vq_attention needs state.pos % chunk_size == 0; use the chunked implementation")
    if C % BLK != 0:
        raise ValueError(f"fused_vq_attention needs chunk_size a multiple of {BLK}, got {C}; use the chunked "
                         "implementation")
    scale = Dk ** -0.5 if scale is None else float(scale)
    dt = q.dtype
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_hat = k_hat.to(dt)
    k_hat = k_hat if k_hat.stride(-1) == 1 else k_hat.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    codes = codes.long().contiguous()
    R = max(1, math.ceil(T / C))
    tiles = tiles_for(config, C)
    code_block = max(BLK, tiles["fwd_block_n"], tiles["dq_block_n"])  # the code loops' step divides Sp
    Sp = math.ceil(S / code_block) * code_block

    with torch.no_grad():
        excl_cnt, excl_sum = cache_tables(codes, v.detach(), state, C, S, R)
        cnt = excl_cnt[:, :, :R]
        logn = torch.where(cnt > 0, cnt.clamp(min=1).log2(), torch.full_like(cnt, float("-inf")))
        ubar = (excl_sum[:, :, :R] / cnt.clamp(min=1)[..., None]).to(v.dtype)
        cb = codebook.detach().to(dt)
        if Sp != S:  # pad the codebook with empty codes (log N = -inf)
            logn = F.pad(logn, (0, Sp - S), value=float("-inf"))
            ubar = F.pad(ubar, (0, 0, 0, Sp - S))
            cb = F.pad(cb, (0, 0, 0, Sp - S))
        logn = logn.reshape(B * H, R, Sp).contiguous()
        ubar = ubar.reshape(B * H, R, Sp, Dv).contiguous()
        cb = cb.contiguous()

    has_prev = state is not None and state.prev_k is not None
    out = _apply_fused(
        q, k_hat, v, bias, state.prev_k if has_prev else None, state.prev_v if has_prev else None,
        state.cache_sum if state is not None else None, state.prev_codes if has_prev else None,
        codes, cb, logn, ubar, C, scale, config)

    new_state = None
    if return_state:
        new_state = _new_state(k_hat, v, codes, state, excl_cnt, excl_sum, C, R)
    return out, new_state


def _new_state(k_hat, v, codes, state, excl_cnt, excl_sum, C, R):
    """The state after this call, built as `chunked_vq_attention` does (input state had pos % C == 0)."""
    B, T, H, Dk = k_hat.shape
    Dv = v.shape[-1]
    pos0 = 0 if state is None else state.pos
    kh, vh, zh = (x.detach().transpose(1, 2) for x in (k_hat, v, codes))  # (B, H, T, .)
    n2 = T % C
    if n2 == 0:
        st = VQAttentionState(
            pos=pos0 + T, cur_k=kh.new_zeros(B, H, 0, Dk), cur_v=vh.new_zeros(B, H, 0, Dv),
            cur_codes=zh.new_zeros(B, H, 0), prev_k=kh[:, :, T - C:], prev_v=vh[:, :, T - C:],
            prev_codes=zh[:, :, T - C:], cache_count=excl_cnt[:, :, R], cache_sum=excl_sum[:, :, R])
    else:
        s0 = (R - 1) * C
        if R >= 2:
            pk, pv, pz = kh[:, :, s0 - C:s0], vh[:, :, s0 - C:s0], zh[:, :, s0 - C:s0]
        else:
            pk, pv, pz = ((state.prev_k, state.prev_v, state.prev_codes) if state is not None
                          else (None, None, None))
        st = VQAttentionState(
            pos=pos0 + T, cur_k=kh[:, :, s0:], cur_v=vh[:, :, s0:], cur_codes=zh[:, :, s0:],
            prev_k=pk, prev_v=pv, prev_codes=pz,
            cache_count=excl_cnt[:, :, R - 1], cache_sum=excl_sum[:, :, R - 1])
    return st.detach()


__all__ = ["supports", "fused_vq_attention", "KernelConfig", "CONFIG", "TILES", "check_config", "tiles_for"]
