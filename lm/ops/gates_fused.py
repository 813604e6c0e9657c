"""The LongVQ block's element-wise gates in Triton: same signatures and results as the references in
`lm.ops.gates` (`gate_split_reference`, `gated_residual_reference`, `gated_residual_norm_reference`), one
kernel per site forward and one backward.

gate_split. Programs own BM rows of the projection output mx (row stride any, columns contiguous) and walk
its column groups: u = sigmoid and r = SiLU in (BM, BN) tiles, then z head by head in (BM, dk) tiles, where
q and k are the two affine maps of z with their optional per-head normalisation done in registers. All math
is fp32; values are rounded to the stored dtype where the reference rounds them (z to mx's dtype, q and k to
`dtype` before their norms), so bf16 results match the reference's rounding points. hx is a view of mx.
Only mx is saved for backward (the outputs are recomputed), which then writes the gradient of every mx
column (the hx columns take hx's gradient) and per-program partial sums of the qk_scale / qk_shift
gradients, reduced by torch (deterministic, no atomics).

gated_residual. 2-D tiles of (BM rows, BN channels): pre = hx + y, h = SiLU(pre), out = x + u h (add) or
x + u (h - x) (gated), rounded like the reference (pre and h in the activation dtype, the residual update in
out's dtype). Backward recomputes h from the saved inputs and writes d pre (the gradient of both hx and y),
du and, for gated, dx (for add dx is the upstream gradient itself).

gated_residual_norm. The gated residual followed by the RMS norm of its output: programs own BM whole rows
(the D channels padded to a power of two, masked) and store out, normed = out rstd w and each row's rstd
(fp32). Backward recomputes out from the inputs and the saved rstd, forms G = d out + rstd (d n w - n mean(d n
w n)) with n = out rstd, writes the gated-residual backward of G and per-program partial sums of the weight's
gradient, reduced by torch.

Importing needs Triton (ImportError otherwise, the dispatcher falls back); it needs no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import triton
import triton.language as tl

from lm.ops.gates import KEY_NORMS, NORM_EPS, RESIDUALS

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KEY_NORM_CODE = {None: 0, "rms": 1, "center_rms": 2}


@dataclass(frozen=True)
class KernelConfig:
    """Launch settings of both sites."""

    block_m: int = 16
    """Rows per program (gate_split); rows per tile (gated_residual)."""
    block_n: int = 128
    """Columns per tile."""
    warps: int = 4
    norm_block_m: int = 4
    """Rows per program of the gated residual with the norm (each program holds its rows whole, padded to a
    power of two); fewer where that would exceed `norm_elements`."""
    norm_elements: int = 8192
    """The most row elements one program of the gated residual with the norm holds."""
    norm_warps: int = 8


CONFIG = KernelConfig()
"""The settings every call uses unless it passes its own."""


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _round(x, PTR):
    """x (fp32) rounded to the element type of PTR and back."""
    return x.to(PTR.dtype.element_ty).to(tl.float32)


@triton.jit
def _rows(M, BM: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    return rows.to(tl.int64), rows < M


@triton.jit
def _head_norm(x, cm, DK, NORM: tl.constexpr, eps):
    """Per-row normalisation of a (BM, BDK) tile over its DK valid columns (cm): NORM 0 none, 1 RMS, 2 centred
    RMS (LayerNorm without gain). Returns (y, rstd) with y zero outside cm."""
    x = tl.where(cm[None, :], x, 0.0)
    if NORM == 2:
        x = tl.where(cm[None, :], x - (tl.sum(x, axis=1) / DK)[:, None], 0.0)
    if NORM == 0:
        rstd = tl.zeros_like(tl.sum(x, axis=1)) + 1.0
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / DK + eps)
    return x * rstd[:, None], rstd


@triton.jit
def _head_norm_bwd(dy, y, rstd, cm, DK, NORM: tl.constexpr):
    """The gradient of the input of `_head_norm` from the output's gradient dy (y = its output)."""
    dy = tl.where(cm[None, :], dy, 0.0)
    if NORM == 0:
        dx = dy
    else:
        dx = dy - y * (tl.sum(dy * y, axis=1) / DK)[:, None]
        if NORM == 2:
            dx = dx - (tl.sum(dy, axis=1) / DK)[:, None]
        dx = dx * rstd[:, None]
    return tl.where(cm[None, :], dx, 0.0)


@triton.jit
def _qk_head(MX, Q, SCALE, SHIFT, mrow, rm, c0, h, DZ, DK, BDK: tl.constexpr, QNORM: tl.constexpr,
             KNORM: tl.constexpr, eps):
    """Head h of the z columns (starting at column c0 of mx): the column offsets, mask, rounded z, the SiLU
    input, the rounded affine maps before their norms, and the normalised q, k with their 1 / rms."""
    j = tl.arange(0, BDK)
    cm = j < DK
    cols = h * DK + j
    m2 = rm[:, None] & cm[None, :]
    a = tl.load(MX + mrow[:, None] + c0 + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    z = _round(a * _sigmoid(a), MX)
    s0 = tl.load(SCALE + cols, mask=cm, other=0.0)
    s1 = tl.load(SCALE + DZ + cols, mask=cm, other=0.0)
    b0 = tl.load(SHIFT + cols, mask=cm, other=0.0)
    b1 = tl.load(SHIFT + DZ + cols, mask=cm, other=0.0)
    qp = _round(z * s0[None, :] + b0[None, :], Q)
    kp = _round(z * s1[None, :] + b1[None, :], Q)
    q, q_rstd = _head_norm(qp, cm, DK, QNORM, eps)
    k, k_rstd = _head_norm(kp, cm, DK, KNORM, eps)
    return cols, cm, m2, a, z, s0, s1, q, q_rstd, k, k_rstd


@triton.jit
def _gate_split_fwd_kernel(MX, SCALE, SHIFT, U, Q, K, R, M, s_mx, D, DZ, E, H, DK, eps,
                           BM: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr,
                           QNORM: tl.constexpr, KNORM: tl.constexpr):
    rows, rm = _rows(M, BM)
    mrow = rows * s_mx
    n = tl.arange(0, BN)
    for c in range(0, D, BN):  # u = sigmoid
        cols = c + n
        m2 = rm[:, None] & (cols < D)[None, :]
        a = tl.load(MX + mrow[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(U + rows[:, None] * D + cols[None, :], _sigmoid(a).to(U.dtype.element_ty), mask=m2)
    for c in range(0, E, BN):  # r = SiLU
        cols = c + n
        m2 = rm[:, None] & (cols < E)[None, :]
        a = tl.load(MX + mrow[:, None] + D + DZ + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(R + rows[:, None] * E + cols[None, :], (a * _sigmoid(a)).to(R.dtype.element_ty), mask=m2)
    for h in range(0, H):  # q, k per head
        cols, cm, m2, a, z, s0, s1, q, q_rstd, k, k_rstd = _qk_head(MX, Q, SCALE, SHIFT, mrow, rm, D, h, DZ, DK,
                                                                    BDK, QNORM, KNORM, eps)
        off = rows[:, None] * DZ + cols[None, :]
        tl.store(Q + off, q.to(Q.dtype.element_ty), mask=m2)
        tl.store(K + off, k.to(K.dtype.element_ty), mask=m2)


@triton.jit
def _gate_split_bwd_kernel(MX, SCALE, SHIFT, Q, DU, DQ, DK_, DR, DHX, DMX, PART, M, s_mx, D, DZ, E, H, DK, eps,
                           BM: tl.constexpr, BN: tl.constexpr, BDK: tl.constexpr,
                           QNORM: tl.constexpr, KNORM: tl.constexpr, HAS_DHX: tl.constexpr):
    """DMX is contiguous (M, 2 D + DZ + E); the gradients DU, DQ, DK_, DR, DHX are contiguous. PART[program]
    holds (dscale_q, dscale_k, dshift_q, dshift_k) (4, DZ), fp32 partial sums over this program's rows."""
    rows, rm = _rows(M, BM)
    mrow = rows * s_mx
    W = 2 * D + DZ + E
    drow = rows * W
    n = tl.arange(0, BN)
    for c in range(0, D, BN):  # u and hx
        cols = c + n
        m2 = rm[:, None] & (cols < D)[None, :]
        a = tl.load(MX + mrow[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        g = tl.load(DU + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        s = _sigmoid(a)
        tl.store(DMX + drow[:, None] + cols[None, :], (g * s * (1.0 - s)).to(DMX.dtype.element_ty), mask=m2)
        if HAS_DHX:
            gh = tl.load(DHX + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        else:
            gh = tl.zeros([BM, BN], tl.float32)
        tl.store(DMX + drow[:, None] + D + DZ + E + cols[None, :], gh.to(DMX.dtype.element_ty), mask=m2)
    for c in range(0, E, BN):  # r
        cols = c + n
        m2 = rm[:, None] & (cols < E)[None, :]
        a = tl.load(MX + mrow[:, None] + D + DZ + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        g = tl.load(DR + rows[:, None] * E + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        s = _sigmoid(a)
        tl.store(DMX + drow[:, None] + D + DZ + cols[None, :],
                 (g * s * (1.0 + a * (1.0 - s))).to(DMX.dtype.element_ty), mask=m2)
    part = PART + tl.program_id(0).to(tl.int64) * 4 * DZ
    for h in range(0, H):  # z through q and k
        cols, cm, m2, a, z, s0, s1, q, q_rstd, k, k_rstd = _qk_head(MX, Q, SCALE, SHIFT, mrow, rm, D, h, DZ, DK,
                                                                    BDK, QNORM, KNORM, eps)
        off = rows[:, None] * DZ + cols[None, :]
        gq = _head_norm_bwd(tl.load(DQ + off, mask=m2, other=0.0).to(tl.float32), q, q_rstd, cm, DK, QNORM)
        gk = _head_norm_bwd(tl.load(DK_ + off, mask=m2, other=0.0).to(tl.float32), k, k_rstd, cm, DK, KNORM)
        gq = tl.where(rm[:, None], gq, 0.0)
        gk = tl.where(rm[:, None], gk, 0.0)
        gz = _round(gq * s0[None, :] + gk * s1[None, :], MX)  # the gradient of z in z's dtype
        s = _sigmoid(a)
        tl.store(DMX + drow[:, None] + D + cols[None, :], (gz * s * (1.0 + a * (1.0 - s))).to(DMX.dtype.element_ty),
                 mask=m2)
        tl.store(part + cols, tl.sum(gq * z, axis=0), mask=cm)
        tl.store(part + DZ + cols, tl.sum(gk * z, axis=0), mask=cm)
        tl.store(part + 2 * DZ + cols, tl.sum(gq, axis=0), mask=cm)
        tl.store(part + 3 * DZ + cols, tl.sum(gk, axis=0), mask=cm)


@triton.jit
def _residual_load(HX, Y, U, X, s_hx, s_y, s_u, s_x, rows, c, m2):
    """The fp32 values of the (rows, c) tile (m2 its mask, zero outside): pre = hx + y and h = SiLU(pre), both
    rounded to the activation dtype, sigmoid(pre), u and x."""
    hx = tl.load(HX + rows[:, None] * s_hx + c, mask=m2, other=0.0).to(tl.float32)
    y = tl.load(Y + rows[:, None] * s_y + c, mask=m2, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * s_u + c, mask=m2, other=0.0).to(tl.float32)
    x = tl.load(X + rows[:, None] * s_x + c, mask=m2, other=0.0).to(tl.float32)
    pre = _round(hx + y, HX)
    s = _sigmoid(pre)
    h = _round(pre * s, HX)
    return pre, s, h, u, x


@triton.jit
def _residual_tile(HX, Y, U, X, s_hx, s_y, s_u, s_x, M, D, BM: tl.constexpr, BN: tl.constexpr):
    rows, rm = _rows(M, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    m2 = rm[:, None] & (cols < D)[None, :]
    c = cols[None, :]
    pre, s, h, u, x = _residual_load(HX, Y, U, X, s_hx, s_y, s_u, s_x, rows, c, m2)
    return rows, c, m2, pre, s, h, u, x


@triton.jit
def _residual_out(h, u, x, U, OUT, GATED: tl.constexpr):
    """out = x + u h (add) or x + u (h - x) (gated) in fp32, rounded like the reference (to OUT's dtype)."""
    if GATED:
        upd = _round(u * _round(h - x, OUT), OUT)
    else:
        upd = _round(u * h, U)
    return _round(x + upd, OUT)


@triton.jit
def _residual_bwd_store(g, pre, s, h, u, x, HX, DPRE, DU, DX, off, m2, GATED: tl.constexpr, STORE_DX: tl.constexpr):
    """The gated-residual backward from out's gradient g: d pre (of hx and y), du and dx (gated: g (1 - u);
    add: g itself, stored when STORE_DX)."""
    if GATED:
        du = g * (h - x)
        tl.store(DX + off, (g * (1.0 - u)).to(DX.dtype.element_ty), mask=m2)
    else:
        du = g * h
        if STORE_DX:
            tl.store(DX + off, g.to(DX.dtype.element_ty), mask=m2)
    dh = _round(g * u, HX)
    tl.store(DU + off, du.to(DU.dtype.element_ty), mask=m2)
    tl.store(DPRE + off, (dh * s * (1.0 + pre * (1.0 - s))).to(DPRE.dtype.element_ty), mask=m2)


@triton.jit
def _gated_residual_fwd_kernel(HX, Y, U, X, OUT, s_hx, s_y, s_u, s_x, M, D,
                               BM: tl.constexpr, BN: tl.constexpr, GATED: tl.constexpr):
    """OUT is contiguous (M, D)."""
    rows, c, m2, pre, s, h, u, x = _residual_tile(HX, Y, U, X, s_hx, s_y, s_u, s_x, M, D, BM, BN)
    tl.store(OUT + rows[:, None] * D + c, _residual_out(h, u, x, U, OUT, GATED).to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _gated_residual_bwd_kernel(HX, Y, U, X, DO, DPRE, DU, DX, s_hx, s_y, s_u, s_x, M, D,
                               BM: tl.constexpr, BN: tl.constexpr, GATED: tl.constexpr):
    """DO, DPRE, DU and DX are contiguous (M, D); DX is written for GATED only."""
    rows, c, m2, pre, s, h, u, x = _residual_tile(HX, Y, U, X, s_hx, s_y, s_u, s_x, M, D, BM, BN)
    off = rows[:, None] * D + c
    g = tl.load(DO + off, mask=m2, other=0.0).to(tl.float32)
    _residual_bwd_store(g, pre, s, h, u, x, HX, DPRE, DU, DX, off, m2, GATED, False)


@triton.jit
def _row_tile(M, D, BM: tl.constexpr, BD: tl.constexpr):
    """BM whole rows (BD >= D columns, masked) of program 0's block."""
    rows, rm = _rows(M, BM)
    cols = tl.arange(0, BD)
    cm = cols < D
    return rows, cols, cm, rm[:, None] & cm[None, :]


@triton.jit
def _gated_residual_norm_fwd_kernel(HX, Y, U, X, W, OUT, NORMED, RSTD, s_hx, s_y, s_u, s_x, M, D, eps,
                                    BM: tl.constexpr, BD: tl.constexpr, GATED: tl.constexpr):
    """OUT and NORMED are contiguous (M, D); RSTD (M,) fp32 takes each row's 1 / rms(out)."""
    rows, cols, cm, m2 = _row_tile(M, D, BM, BD)
    c = cols[None, :]
    pre, s, h, u, x = _residual_load(HX, Y, U, X, s_hx, s_y, s_u, s_x, rows, c, m2)
    out = tl.where(m2, _residual_out(h, u, x, U, OUT, GATED), 0.0)
    off = rows[:, None] * D + c
    tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=m2)
    rstd = 1.0 / tl.sqrt(tl.sum(out * out, axis=1) / D + eps)
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    tl.store(NORMED + off, (out * rstd[:, None] * w[None, :]).to(NORMED.dtype.element_ty), mask=m2)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _gated_residual_norm_bwd_kernel(HX, Y, U, X, W, OUT, RSTD, DO, DN, DPRE, DU, DX, PART, s_hx, s_y, s_u, s_x, M, D,
                                    BM: tl.constexpr, BD: tl.constexpr, GATED: tl.constexpr, HAS_DO: tl.constexpr):
    """OUT: any tensor of out's dtype (only its element type is used). DO, DN, DPRE, DU, DX are contiguous (M, D);
    DO is read when HAS_DO. PART[program] (D,) fp32 takes this program's partial sum of
    the weight's gradient. out is recomputed (rounded as in forward); G = d out + the RMS-norm backward of
    d normed, then the gated-residual backward of G."""
    rows, cols, cm, m2 = _row_tile(M, D, BM, BD)
    c = cols[None, :]
    pre, s, h, u, x = _residual_load(HX, Y, U, X, s_hx, s_y, s_u, s_x, rows, c, m2)
    out = tl.where(m2, _residual_out(h, u, x, U, OUT, GATED), 0.0)
    off = rows[:, None] * D + c
    rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
    w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
    xhat = out * rstd[:, None]
    gn = tl.load(DN + off, mask=m2, other=0.0).to(tl.float32)
    gx = gn * w[None, :]
    g = (gx - xhat * (tl.sum(gx * xhat, axis=1) / D)[:, None]) * rstd[:, None]
    if HAS_DO:
        g = g + tl.load(DO + off, mask=m2, other=0.0).to(tl.float32)
    tl.store(PART + tl.program_id(0).to(tl.int64) * D + cols, tl.sum(gn * xhat, axis=0), mask=cm)
    _residual_bwd_store(g, pre, s, h, u, x, HX, DPRE, DU, DX, off, m2, GATED, True)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def supports(x: Tensor) -> bool:
    """True when the kernels handle an input like x (CUDA, fp32 / bf16 / fp16); else the dispatcher uses the
    reference."""
    return x.is_cuda and torch.cuda.is_available() and x.dtype in _SUPPORTED_DTYPES


def _rowwise(t: Tensor) -> Tensor:
    """t as a 2-D (rows, columns) tensor with unit column stride (a view where possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def _contiguous(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.reshape(like.shape).contiguous()


class _GateSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mx, scale, shift, sizes, heads, qnorm, knorm, dtype, cfg):
        D, dz, E = sizes
        M = mx.shape[0]
        dk = dz // heads
        u = torch.empty(M, D, dtype=mx.dtype, device=mx.device)
        r = torch.empty(M, E, dtype=mx.dtype, device=mx.device)
        q = torch.empty(M, dz, dtype=dtype, device=mx.device)
        k = torch.empty(M, dz, dtype=dtype, device=mx.device)
        grid = (triton.cdiv(M, cfg.block_m),)
        if M:
            _gate_split_fwd_kernel[grid](mx, scale, shift, u, q, k, r, M, mx.stride(0), D, dz, E, heads, dk, NORM_EPS,
                                         BM=cfg.block_m, BN=cfg.block_n, BDK=triton.next_power_of_2(dk),
                                         QNORM=qnorm, KNORM=knorm, num_warps=cfg.warps)
        ctx.save_for_backward(mx, scale, shift)
        ctx.meta = (sizes, heads, qnorm, knorm, dtype, cfg)
        return u, q, k, r, mx[:, D + dz + E:]

    @staticmethod
    def backward(ctx, du, dq, dk, dr, dhx):
        mx, scale, shift = ctx.saved_tensors
        (D, dz, E), heads, qnorm, knorm, dtype, cfg = ctx.meta
        M = mx.shape[0]
        f = dict(dtype=mx.dtype, device=mx.device)
        du = _contiguous(du, torch.empty(M, D, **f))
        dr = _contiguous(dr, torch.empty(M, E, **f))
        dq = _contiguous(dq, torch.empty(M, dz, dtype=dtype, device=mx.device))
        dk = _contiguous(dk, torch.empty(M, dz, dtype=dtype, device=mx.device))
        dhx = None if dhx is None else _contiguous(dhx, du)
        dmx = torch.empty(M, mx.shape[1], **f)
        grid = (triton.cdiv(M, cfg.block_m),)
        part = torch.zeros(grid[0], 4, dz, dtype=torch.float32, device=mx.device)
        if M:
            _gate_split_bwd_kernel[grid](mx, scale, shift, dq, du, dq, dk, dr, dhx if dhx is not None else du, dmx,
                                         part, M, mx.stride(0), D, dz, E, heads, dz // heads, NORM_EPS,
                                         BM=cfg.block_m, BN=cfg.block_n, BDK=triton.next_power_of_2(dz // heads),
                                         QNORM=qnorm, KNORM=knorm, HAS_DHX=dhx is not None, num_warps=cfg.warps)
        sums = part.sum(0)
        return dmx, sums[:2], sums[2:], None, None, None, None, None, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hx, y, u, x, gated, out_dtype, cfg):
        M, D = y.shape
        out = torch.empty(M, D, dtype=out_dtype, device=y.device)
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(D, cfg.block_n))
        if out.numel():
            _gated_residual_fwd_kernel[grid](hx, y, u, x, out, hx.stride(0), y.stride(0), u.stride(0), x.stride(0),
                                             M, D, BM=cfg.block_m, BN=cfg.block_n, GATED=gated, num_warps=cfg.warps)
        ctx.save_for_backward(hx, y, u, x)
        ctx.meta = (gated, cfg)
        return out

    @staticmethod
    def backward(ctx, g):
        hx, y, u, x = ctx.saved_tensors
        gated, cfg = ctx.meta
        M, D = y.shape
        g = g.contiguous()
        dpre = torch.empty(M, D, dtype=torch.promote_types(hx.dtype, y.dtype), device=y.device)
        du = torch.empty(M, D, dtype=u.dtype, device=u.device)
        dx = torch.empty(M, D, dtype=x.dtype, device=x.device) if gated else g.to(x.dtype)
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(D, cfg.block_n))
        if g.numel():
            _gated_residual_bwd_kernel[grid](hx, y, u, x, g, dpre, du, dx, hx.stride(0), y.stride(0), u.stride(0),
                                             x.stride(0), M, D, BM=cfg.block_m, BN=cfg.block_n, GATED=gated,
                                             num_warps=cfg.warps)
        return dpre.to(hx.dtype), dpre.to(y.dtype), du, dx, None, None, None


def _norm_blocks(D: int, cfg: KernelConfig) -> tuple[int, int]:
    """(rows per program, padded row width) of the gated residual with the norm."""
    bd = triton.next_power_of_2(D)
    return max(1, min(cfg.norm_block_m, cfg.norm_elements // bd)), bd


class _GatedResidualNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hx, y, u, x, w, eps, gated, out_dtype, normed_dtype, cfg):
        M, D = y.shape
        out = torch.empty(M, D, dtype=out_dtype, device=y.device)
        normed = torch.empty(M, D, dtype=normed_dtype, device=y.device)
        rstd = torch.empty(M, dtype=torch.float32, device=y.device)
        bm, bd = _norm_blocks(D, cfg)
        grid = (triton.cdiv(M, bm),)
        if out.numel():
            _gated_residual_norm_fwd_kernel[grid](hx, y, u, x, w, out, normed, rstd, hx.stride(0), y.stride(0),
                                                  u.stride(0), x.stride(0), M, D, eps, BM=bm, BD=bd, GATED=gated,
                                                  num_warps=cfg.norm_warps)
        ctx.save_for_backward(hx, y, u, x, w, rstd)
        ctx.meta = (gated, out_dtype, cfg)
        return out, normed

    @staticmethod
    def backward(ctx, g_out, g_normed):
        hx, y, u, x, w, rstd = ctx.saved_tensors
        gated, out_dtype, cfg = ctx.meta
        M, D = y.shape
        like = torch.empty(1, dtype=out_dtype, device=y.device)  # carries out's dtype into the kernel
        dn = _contiguous(g_normed, torch.empty(M, D, dtype=like.dtype, device=y.device))
        do = dn if g_out is None else g_out.contiguous()
        dpre = torch.empty(M, D, dtype=torch.promote_types(hx.dtype, y.dtype), device=y.device)
        du = torch.empty(M, D, dtype=u.dtype, device=u.device)
        dx = torch.empty(M, D, dtype=x.dtype, device=x.device)
        bm, bd = _norm_blocks(D, cfg)
        grid = (triton.cdiv(M, bm),)
        part = torch.zeros(grid[0], D, dtype=torch.float32, device=y.device)
        if dn.numel():
            _gated_residual_norm_bwd_kernel[grid](hx, y, u, x, w, like, rstd, do, dn, dpre, du, dx, part, hx.stride(0),
                                                  y.stride(0), u.stride(0), x.stride(0), M, D, BM=bm, BD=bd,
                                                  GATED=gated, HAS_DO=g_out is not None, num_warps=cfg.norm_warps)
        dw = part.sum(0).to(w.dtype)
        return dpre.to(hx.dtype), dpre.to(y.dtype), du, dx, dw, None, None, None, None, None


@torch.compiler.disable  # under torch.compile: an opaque call (Dynamo does not trace the Triton launches)
def _split(*args):
    return _GateSplit.apply(*args)


@torch.compiler.disable
def _residual(*args):
    return _GatedResidual.apply(*args)


def gate_split_triton(mx: Tensor, qk_scale: Tensor, qk_shift: Tensor, *, sizes: tuple[int, int, int], heads: int,
                      query_norm: bool = False, key_norm: Optional[str] = "rms", dtype: Optional[torch.dtype] = None,
                      config: KernelConfig = CONFIG):
    """Drop-in for `lm.ops.gates.gate_split_reference` (see `supports`): (u, q, k, r, hx)."""
    D, dz, E = sizes
    if mx.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"gate_split_triton: mx dtype {mx.dtype} is not one of {_SUPPORTED_DTYPES}; "
                         "use gate_impl=reference")
    if mx.shape[-1] != 2 * D + dz + E or tuple(qk_scale.shape) != (2, dz) or dz % heads or key_norm not in KEY_NORMS:
        raise ValueError(f"gate_split_triton: mx {tuple(mx.shape)}, qk_scale {tuple(qk_scale.shape)}, sizes {sizes}, "
                         f"{heads} heads and key_norm {key_norm!r} do not fit (see lm.ops.gates)")
    lead = mx.shape[:-1]
    dt = dtype or mx.dtype
    scale = qk_scale.float().contiguous()
    shift = qk_shift.float().contiguous()
    u, q, k, r, hx = _split(_rowwise(mx), scale, shift, (D, dz, E), heads, bool(query_norm),
                            _KEY_NORM_CODE[key_norm], dt, config)
    dk = dz // heads
    return (u.view(*lead, D), q.view(*lead, heads, dk), k.view(*lead, heads, dk), r.view(*lead, E),
            hx.view(*lead, D))


def _check_residual(name: str, hx: Tensor, y: Tensor, u: Tensor, x: Tensor, residual: str) -> None:
    if residual not in RESIDUALS:
        raise ValueError(f"{name}: residual {residual!r} is not one of {RESIDUALS}")
    if not (hx.shape == y.shape == u.shape == x.shape):
        raise ValueError(f"{name}: hx {tuple(hx.shape)}, y {tuple(y.shape)}, u {tuple(u.shape)} and "
                         f"x {tuple(x.shape)} must have one shape")
    for t in (hx, y, u, x):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} is not one of {_SUPPORTED_DTYPES}; use gate_impl=reference")


def gated_residual_triton(hx: Tensor, y: Tensor, u: Tensor, x: Tensor, *, residual: str = "add",
                          config: KernelConfig = CONFIG) -> Tensor:
    """Drop-in for `lm.ops.gates.gated_residual_reference` without dropout (see `supports`)."""
    _check_residual("gated_residual_triton", hx, y, u, x, residual)
    out_dtype = torch.promote_types(torch.promote_types(hx.dtype, y.dtype), torch.promote_types(u.dtype, x.dtype))
    out = _residual(_rowwise(hx), _rowwise(y), _rowwise(u), _rowwise(x), residual == "gated", out_dtype, config)
    return out.view(x.shape)


@torch.compiler.disable
def _residual_norm(*args):
    return _GatedResidualNorm.apply(*args)


def gated_residual_norm_triton(hx: Tensor, y: Tensor, u: Tensor, x: Tensor, weight: Tensor, *, eps: float,
                               residual: str = "add", config: KernelConfig = CONFIG) -> tuple[Tensor, Tensor]:
    """Drop-in for `lm.ops.gates.gated_residual_norm_reference` without dropout (see `supports`): (out, normed).
    Rows of up to a few thousand channels (each program holds `config.norm_block_m` whole rows)."""
    _check_residual("gated_residual_norm_triton", hx, y, u, x, residual)
    D = x.shape[-1]
    if tuple(weight.shape) != (D,):
        raise ValueError(f"gated_residual_norm_triton: weight {tuple(weight.shape)} must be ({D},)")
    out_dtype = torch.promote_types(torch.promote_types(hx.dtype, y.dtype), torch.promote_types(u.dtype, x.dtype))
    w = weight.to(out_dtype)
    # the dtype the reference's F.rms_norm returns here (autocast policies differ between torch versions):
    # asked of the op itself on an empty tensor
    normed_dtype = F.rms_norm(torch.empty(0, D, dtype=out_dtype, device=y.device), (D,), w, float(eps)).dtype
    if not w.is_contiguous():
        w = w.contiguous()
    out, normed = _residual_norm(_rowwise(hx), _rowwise(y), _rowwise(u), _rowwise(x), w, float(eps),
                                 residual == "gated", out_dtype, normed_dtype, config)
    return out.view(x.shape), normed.view(x.shape)


__all__ = ["supports", "gate_split_triton", "gated_residual_triton", "gated_residual_norm_triton", "KernelConfig",
           "CONFIG"]
