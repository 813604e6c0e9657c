"""The EMA scan in Triton: forward and backward, (B, T, D) layout, fp32 state.

Same signature, recurrence and return value as `lm.ops.ema_scan.ema_scan_reference`:
    h_t = pb x_t + q h_{t-1};  y_t = scale sum_n gamma h_t + omega x_t;  out_t = SiLU(y_t) if silu else y_t

Design. The sequence is cut into chunks of L tokens (KernelConfig.chunk); programs run over
(chunk, batch, block of BD channels) and hold the (N, BD) state in registers, fp32, one thread per channel with
all its N states (see _NO_ALIGN), so the sums over N need no shuffles. Inside a chunk the
recurrence runs step by step (one x row per step, U steps unrolled so their loads are issued together);
across chunks a carried (N, D) state joins them:
  forward   1. chunk_state: each chunk's end state from a zero start, h' = q h' + x (pb applied later);
            2. state_pass:  H_{c+1} = q^L H_c + pb h'_c, sequential over chunks per (b, d, n): the state
                            before every chunk (kept for backward) and h_T;
            3. chunk_scan:  from H_c, the recurrence with the output epilogue (omega skip, optional SiLU);
                            with SiLU under autograd the pre-activation is stored (input dtype) for backward.
  backward  (dy = upstream gradient times SiLU'(y) when fused)
            1. forward order per chunk from H_c: the state h, its derivative w = dh/dq (w = q w + h_{t-1}),
               the partial sums of dgamma (dy h) and dq (dy w), the chunk-end w, and the chunk's adjoint
               seed sum_t dy_t c q^(t - t0 + 1) for the state before it;
            2. reverse pass over chunks: the adjoint G_c of the state after every chunk, dh_0, and the
               cross-chunk part of dq (sum_c G_c w_end_c);
            3. reverse order per chunk from G_c: the adjoint g_t = c dy_t + q g_{t+1}, dx_t = sum_n pb g_t +
               omega dy_t, and the partial sums of dpb (g x) and domega (dy x).
State tensors between the kernels are (B, NC, N, D) fp32 and the parameters (N, D), so every tile access is
coalesced. Partial sums are per (batch, chunk) and reduced by torch (deterministic, no atomics).
Why a register loop and not an (L x L) decay matrix per (d, n): every channel has its own decay, so no
operand of a product is shared across channels; a Toeplitz product per channel costs L/2 FMAs per
token-channel for the output alone, against 2-3 N for the whole recurrence step, and needs no tensor
core. The state stays fp32 and exact (no bf16 powers of q).

Importing needs Triton (ImportError otherwise, the dispatcher falls back); it needs no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelConfig:
    """Launch settings (the sweep of lm.bench.kernels, `python -m evals.bench_kernels --sweep`, passes others to
    `ema_scan_triton`)."""

    chunk: int = 128
    """Tokens per chunk."""
    block_d: int = 64
    """Channels per program (one per thread: block_d = 32 x warps)."""
    warps: int = 2
    unroll: int = 8
    """Recurrence steps (and chunks in the passes) per unrolled loop body."""
    pass_block: int = 128
    """(d, n) states per program of the passes over chunks."""


CONFIG = KernelConfig()
"""The settings every call uses unless it passes its own."""

_NO_ALIGN = ("s_xb", "s_xt", "D")
"""Arguments the chunk kernels are not specialised on. Unknown divisibility of D and the strides keeps the compiler
from vectorising the (N, BD) tile and per-token loads along the channels; its layout then gives each thread whole
channels with all N states (threads along d), so the sums over N stay in registers and no per-channel work
repeats across lanes. Vectorised, it spreads N over lanes (measured 1.6x slower)."""


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile(PTR, d, dm, n, D):
    """The (N, BD) fp32 tile at PTR (row-major (N, D)), zero outside D."""
    return tl.load(PTR + n[:, None] * D + d[None, :], mask=dm[None, :], other=0.0)


@triton.jit
def _dy(DO, YP, off, dm, SILU: tl.constexpr):
    """Upstream gradient at one time step, through the SiLU when it is fused (YP = pre-activation)."""
    g = tl.load(DO + off, mask=dm, other=0.0).to(tl.float32)
    if SILU:
        yp = tl.load(YP + off, mask=dm, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-yp))
        g = g * s * (1.0 + yp * (1.0 - s))
    return g


@triton.jit
def _chunk_program(s_xb, s_xt, T, D, NC, L: tl.constexpr, N: tl.constexpr, BD: tl.constexpr):
    """This program's part: chunk c = program_id(0) of sequence b = program_id(1), channels d (block
    program_id(2)). Returns d, its mask, the offsets of the (N, BD) tile of (b, c) in a (B, NC, N, D) tensor and
    of the chunk's first token in (B, T, D) with strides (s_xb, s_xt, 1), and the chunk's length."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(2) * BD + tl.arange(0, BD)
    t0 = c * L
    tile = ((b * NC + c) * N + tl.arange(0, N)[:, None]) * D + d[None, :]
    return d, d < D, tile, b * s_xb + t0.to(tl.int64) * s_xt + d, tl.minimum(L, T - t0)


@triton.jit
def _coefficients(PB, Q, C, d, dm, D, N: tl.constexpr):
    """The (N, BD) tiles of pb, q and c = scale gamma for channels d."""
    n = tl.arange(0, N)
    return _tile(PB, d, dm, n, D), _tile(Q, d, dm, n, D), _tile(C, d, dm, n, D)


@triton.jit
def _pass_program(Q, T, NC, DN, L: tl.constexpr, BLOCK: tl.constexpr):
    """This program's part of a pass over chunks: sequence b = program_id(0) (int64), flat (n, d) states e (block
    program_id(1)) and their mask, q there, and the chunk decays q^L (a full chunk) and q^(T - (NC - 1) L) (the
    last chunk)."""
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = e < DN
    q = tl.load(Q + e, mask=m, other=0.0)
    q_full = tl.full([BLOCK], 1.0, tl.float32)
    for _ in range(0, L):
        q_full = q_full * q
    q_last = tl.full([BLOCK], 1.0, tl.float32)
    for _ in range(0, T - (NC - 1) * L):
        q_last = q_last * q
    return tl.program_id(0).to(tl.int64), e, m, q, q_full, q_last


@triton.jit
def _load_or_zeros(PTR, off, m, PRESENT: tl.constexpr, BLOCK: tl.constexpr):
    """The (BLOCK,) fp32 values at PTR + off where PRESENT, else zeros."""
    if PRESENT:
        x = tl.load(PTR + off, mask=m, other=0.0)
    else:
        x = tl.zeros([BLOCK], tl.float32)
    return x


@triton.jit(do_not_specialize=_NO_ALIGN)
def _chunk_state_kernel(X, Q, E, s_xb, s_xt, T, D, NC,
                        L: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, U: tl.constexpr):
    d, dm, tile, off, steps = _chunk_program(s_xb, s_xt, T, D, NC, L, N, BD)
    q = _tile(Q, d, dm, tl.arange(0, N), D)
    xp = X + off
    h = tl.zeros([N, BD], tl.float32)
    full = steps - steps % U
    for i in range(0, full, U):
        for u in tl.static_range(U):
            xt = tl.load(xp + (i + u) * s_xt, mask=dm, other=0.0).to(tl.float32)
            h = h * q + xt[None, :]
    for i in range(full, steps):
        xt = tl.load(xp + i * s_xt, mask=dm, other=0.0).to(tl.float32)
        h = h * q + xt[None, :]
    tl.store(E + tile, h, mask=dm[None, :])


@triton.jit
def _pass_step(E, HS, base, c, e, m, h, pb, q_full, q_last, NC, DN):
    live = (e * 0 + c) < NC  # chunk c exists (as a block: the interpreter wants block masks)
    ok = m & live
    tl.store(HS + base + c * DN + e, h, mask=ok)
    x = tl.load(E + base + c * DN + e, mask=ok, other=0.0)
    decay = tl.where(c == NC - 1, q_last, q_full)
    return tl.where(live, decay * h + pb * x, h)


@triton.jit
def _state_pass_kernel(E, PB, Q, H0, HS, HT, T, NC, DN,
                       L: tl.constexpr, HAS_H0: tl.constexpr, BLOCK: tl.constexpr, U: tl.constexpr):
    """HS[b, c] = state before chunk c; HT[b] = state after the last chunk (length T - (NC-1) L). U chunks per
    unrolled loop body, so their loads are issued together (the loop is sequential over chunks)."""
    b, e, m, q, q_full, q_last = _pass_program(Q, T, NC, DN, L, BLOCK)
    pb = tl.load(PB + e, mask=m, other=0.0)
    h = _load_or_zeros(H0, b * DN + e, m, HAS_H0, BLOCK)
    base = b * NC * DN
    for c0 in range(0, NC, U):
        for u in tl.static_range(U):
            h = _pass_step(E, HS, base, c0 + u, e, m, h, pb, q_full, q_last, NC, DN)
    tl.store(HT + b * DN + e, h, mask=m)


@triton.jit
def _fwd_step(xp, yp, pp, t, s_xt, dm, h, q, pb, cc, om, SILU: tl.constexpr, STORE_PRE: tl.constexpr):
    xt = tl.load(xp + t * s_xt, mask=dm, other=0.0).to(tl.float32)
    h = h * q + pb * xt[None, :]
    y = tl.sum(h * cc, axis=0) + om * xt
    if STORE_PRE:
        tl.store(pp + t * s_xt, y.to(pp.dtype.element_ty), mask=dm)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(yp + t * s_xt, y.to(yp.dtype.element_ty), mask=dm)
    return h


@triton.jit(do_not_specialize=_NO_ALIGN)
def _chunk_scan_kernel(X, PB, Q, C, OM, HS, Y, YP, s_xb, s_xt, T, D, NC,
                       L: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, U: tl.constexpr,
                       SILU: tl.constexpr, STORE_PRE: tl.constexpr):
    """Y and YP are contiguous (B, T, D) like X after the host's contiguity check (same strides)."""
    d, dm, tile, off, steps = _chunk_program(s_xb, s_xt, T, D, NC, L, N, BD)
    pb, q, cc = _coefficients(PB, Q, C, d, dm, D, N)
    om = tl.load(OM + d, mask=dm, other=0.0)
    h = tl.load(HS + tile, mask=dm[None, :], other=0.0)
    xp, yp, pp = X + off, Y + off, YP + off
    full = steps - steps % U
    for i in range(0, full, U):
        for u in tl.static_range(U):
            h = _fwd_step(xp, yp, pp, i + u, s_xt, dm, h, q, pb, cc, om, SILU, STORE_PRE)
    for i in range(full, steps):
        h = _fwd_step(xp, yp, pp, i, s_xt, dm, h, q, pb, cc, om, SILU, STORE_PRE)


@triton.jit
def _bwd_fwd_step(xp, gp, ypp, t, s_xt, dm, h, w, p, g, dc, dq, q, pb, SILU: tl.constexpr):
    xt = tl.load(xp + t * s_xt, mask=dm, other=0.0).to(tl.float32)
    dy = _dy(gp, ypp, t * s_xt, dm, SILU)[None, :]
    w = w * q + h  # d h_t / d q with the chunk's start state held fixed
    h = h * q + pb * xt[None, :]
    dc += dy * h
    dq += dy * w
    p = p * q  # q^(t - t0 + 1): how the start state reaches h_t
    g += p * dy
    return h, w, p, g, dc, dq


@triton.jit(do_not_specialize=_NO_ALIGN)
def _bwd_chunk_fwd_kernel(X, DO, YP, PB, Q, C, HS, DCP, DQP, WEND, GLOC, s_xb, s_xt, T, D, NC,
                          L: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, U: tl.constexpr,
                          SILU: tl.constexpr):
    d, dm, tile, off, steps = _chunk_program(s_xb, s_xt, T, D, NC, L, N, BD)
    pb, q, cc = _coefficients(PB, Q, C, d, dm, D, N)
    m2 = dm[None, :]
    h = tl.load(HS + tile, mask=m2, other=0.0)
    w = tl.zeros([N, BD], tl.float32)
    p = tl.full([N, BD], 1.0, tl.float32)
    g = tl.zeros([N, BD], tl.float32)
    dc = tl.zeros([N, BD], tl.float32)
    dq = tl.zeros([N, BD], tl.float32)
    xp, gp, ypp = X + off, DO + off, YP + off
    full = steps - steps % U
    for i in range(0, full, U):
        for u in tl.static_range(U):
            h, w, p, g, dc, dq = _bwd_fwd_step(xp, gp, ypp, i + u, s_xt, dm, h, w, p, g, dc, dq, q, pb, SILU)
    for i in range(full, steps):
        h, w, p, g, dc, dq = _bwd_fwd_step(xp, gp, ypp, i, s_xt, dm, h, w, p, g, dc, dq, q, pb, SILU)
    tl.store(DCP + tile, dc, mask=m2)
    tl.store(DQP + tile, cc * dq, mask=m2)
    tl.store(WEND + tile, w, mask=m2)
    tl.store(GLOC + tile, cc * g, mask=m2)


@triton.jit
def _bwd_pass_step(GLOC, WEND, GN, base, c, e, m, g, dq, q_full, q_last, NC, DN):
    live = (e * 0 + c) >= 0  # chunk c exists (as a block: the interpreter wants block masks)
    ok = m & live
    tl.store(GN + base + c * DN + e, g, mask=ok)
    dq += g * tl.load(WEND + base + c * DN + e, mask=ok, other=0.0)
    decay = tl.where(c == NC - 1, q_last, q_full)
    g = tl.where(live, tl.load(GLOC + base + c * DN + e, mask=ok, other=0.0) + decay * g, g)
    return g, dq


@triton.jit
def _bwd_state_pass_kernel(GLOC, WEND, Q, DHT, GN, DH0, DQX, T, NC, DN,
                           L: tl.constexpr, HAS_DHT: tl.constexpr, BLOCK: tl.constexpr, U: tl.constexpr):
    """GN[b, c] = adjoint of the state after chunk c; DH0[b] = adjoint of h_0; DQX[b] = sum_c GN w_end."""
    b, e, m, q, q_full, q_last = _pass_program(Q, T, NC, DN, L, BLOCK)
    g = _load_or_zeros(DHT, b * DN + e, m, HAS_DHT, BLOCK)
    dq = tl.zeros([BLOCK], tl.float32)
    base = b * NC * DN
    for i0 in range(0, NC, U):
        for u in tl.static_range(U):
            g, dq = _bwd_pass_step(GLOC, WEND, GN, base, NC - 1 - i0 - u, e, m, g, dq, q_full, q_last, NC, DN)
    tl.store(DH0 + b * DN + e, g, mask=m)
    tl.store(DQX + b * DN + e, dq, mask=m)


@triton.jit
def _bwd_rev_step(xp, gp, ypp, dxp, t, s_xt, dm, r, dpb, dom, q, pb, cc, om, SILU: tl.constexpr):
    xt = tl.load(xp + t * s_xt, mask=dm, other=0.0).to(tl.float32)
    dy = _dy(gp, ypp, t * s_xt, dm, SILU)
    g = cc * dy[None, :] + r  # adjoint of h_t
    dx = tl.sum(pb * g, axis=0) + om * dy
    tl.store(dxp + t * s_xt, dx.to(dxp.dtype.element_ty), mask=dm)
    dpb += g * xt[None, :]
    dom += dy * xt
    return q * g, dpb, dom


@triton.jit(do_not_specialize=_NO_ALIGN)
def _bwd_chunk_rev_kernel(X, DO, YP, PB, Q, C, OM, GN, DX, DPBP, DOMP, s_xb, s_xt, T, D, NC,
                          L: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, U: tl.constexpr,
                          SILU: tl.constexpr):
    d, dm, tile, off, steps = _chunk_program(s_xb, s_xt, T, D, NC, L, N, BD)
    pb, q, cc = _coefficients(PB, Q, C, d, dm, D, N)
    om = tl.load(OM + d, mask=dm, other=0.0)
    r = tl.load(GN + tile, mask=dm[None, :], other=0.0)  # q g_{t+1} at the chunk's last token
    dpb = tl.zeros([N, BD], tl.float32)
    dom = tl.zeros([BD], tl.float32)
    xp, gp, ypp, dxp = X + off, DO + off, YP + off, DX + off
    rem = steps % U
    for i in range(0, steps - rem, U):  # from the end: t = steps - 1 - (i + u)
        for u in tl.static_range(U):
            r, dpb, dom = _bwd_rev_step(xp, gp, ypp, dxp, steps - 1 - i - u, s_xt, dm, r, dpb, dom,
                                        q, pb, cc, om, SILU)
    for i in range(0, rem):
        r, dpb, dom = _bwd_rev_step(xp, gp, ypp, dxp, rem - 1 - i, s_xt, dm, r, dpb, dom, q, pb, cc, om, SILU)
    tl.store(DPBP + tile, dpb, mask=dm[None, :])
    tl.store(DOMP + (tl.program_id(1).to(tl.int64) * NC + tl.program_id(0)) * D + d, dom, mask=dm)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def supports(x: Tensor, ndim: int) -> bool:
    """True when the Triton scan handles x (B, T, D) with N = ndim (else the dispatcher uses the reference)."""
    if not (x.is_cuda and torch.cuda.is_available()):
        return False
    if x.dim() != 3 or x.dtype not in _SUPPORTED_DTYPES or x.shape[1] == 0:
        return False
    return 1 <= ndim <= 64 and ndim & (ndim - 1) == 0


def _grid(NC, B, D, bd):
    return (NC, B, triton.cdiv(D, bd))


class _EMAScan(torch.autograd.Function):
    """Parameters pb, q, cc arrive transposed, (N, D) contiguous fp32, like every (.., N, D) state tensor here;
    h0 / h_T and their gradients are (B, D, N) at the boundary."""

    @staticmethod
    def forward(ctx, x, pb, q, cc, omega, h0, silu, L, cfg):
        B, T, D = x.shape
        N = q.shape[0]
        NC = triton.cdiv(T, L)
        bd, U, nw = cfg.block_d, cfg.unroll, cfg.warps
        f32 = dict(dtype=torch.float32, device=x.device)
        ends = torch.empty(B, NC, N, D, **f32)
        grid = _grid(NC, B, D, bd)
        _chunk_state_kernel[grid](x, q, ends, x.stride(0), x.stride(1), T, D, NC,
                                  L=L, N=N, BD=bd, U=U, num_warps=nw)
        starts = torch.empty(B, NC, N, D, **f32)
        h_T = torch.empty(B, N, D, **f32)
        h0t = None if h0 is None else h0.transpose(1, 2).contiguous()
        pblk = cfg.pass_block
        _state_pass_kernel[(B, triton.cdiv(D * N, pblk))](
            ends, pb, q, h0t if h0t is not None else ends, starts, h_T, T, NC, D * N,
            L=L, HAS_H0=h0t is not None, BLOCK=pblk, U=U, num_warps=4)
        y = torch.empty_like(x)
        store_pre = bool(silu and any(ctx.needs_input_grad[:6]))
        y_pre = torch.empty_like(x) if store_pre else None
        _chunk_scan_kernel[grid](x, pb, q, cc, omega, starts, y, y_pre if store_pre else y,
                                 x.stride(0), x.stride(1), T, D, NC,
                                 L=L, N=N, BD=bd, U=U, SILU=bool(silu), STORE_PRE=store_pre, num_warps=nw)
        ctx.save_for_backward(x, pb, q, cc, omega, starts, y_pre)
        ctx.meta = (bool(silu), L, h0 is not None, cfg)
        return y, h_T.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_y, grad_hT):
        x, pb, q, cc, omega, starts, y_pre = ctx.saved_tensors
        silu, L, has_h0, cfg = ctx.meta
        B, T, D = x.shape
        N = q.shape[0]
        NC = starts.shape[1]
        bd, U, nw = cfg.block_d, cfg.unroll, cfg.warps
        f32 = dict(dtype=torch.float32, device=x.device)
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        gy = grad_y if grad_y.is_contiguous() else grad_y.contiguous()
        yp = y_pre if y_pre is not None else gy
        grid = _grid(NC, B, D, bd)
        dc_part, dq_part, w_end, g_loc = (torch.empty(B, NC, N, D, **f32) for _ in range(4))
        _bwd_chunk_fwd_kernel[grid](x, gy, yp, pb, q, cc, starts, dc_part, dq_part, w_end, g_loc,
                                    x.stride(0), x.stride(1), T, D, NC,
                                    L=L, N=N, BD=bd, U=U, SILU=silu, num_warps=nw)
        g_next = torch.empty(B, NC, N, D, **f32)
        dh0 = torch.empty(B, N, D, **f32)
        dq_cross = torch.empty(B, N, D, **f32)
        pblk = cfg.pass_block
        dht = None if grad_hT is None else grad_hT.float().transpose(1, 2).contiguous()
        _bwd_state_pass_kernel[(B, triton.cdiv(D * N, pblk))](
            g_loc, w_end, q, dht if dht is not None else g_loc, g_next, dh0, dq_cross, T, NC, D * N,
            L=L, HAS_DHT=dht is not None, BLOCK=pblk, U=U, num_warps=4)
        dx = torch.empty_like(x)
        dpb_part = torch.empty(B, NC, N, D, **f32)
        dom_part = torch.empty(B, NC, D, **f32)
        _bwd_chunk_rev_kernel[grid](x, gy, yp, pb, q, cc, omega, g_next, dx, dpb_part, dom_part,
                                    x.stride(0), x.stride(1), T, D, NC,
                                    L=L, N=N, BD=bd, U=U, SILU=silu, num_warps=nw)
        dpb = dpb_part.sum((0, 1))
        dq = dq_part.sum((0, 1)) + dq_cross.sum(0)
        dcc = dc_part.sum((0, 1))
        dom = dom_part.sum((0, 1))
        return dx, dpb, dq, dcc, dom, (dh0.transpose(1, 2) if has_h0 else None), None, None, None


@torch.compiler.disable  # under torch.compile: an opaque call (Dynamo does not trace the Triton launches)
def _apply(*args):
    return _EMAScan.apply(*args)


def ema_scan_triton(x: Tensor, pb: Tensor, q: Tensor, gamma: Tensor, omega: Tensor, *, scale: float,
                    state: Optional[Tensor] = None, return_state: bool = False, silu: bool = False,
                    chunk_size: Optional[int] = None, config: KernelConfig = CONFIG):
    """Drop-in for `ema_scan_reference` (see `supports`). Returns (out (B, T, D) x.dtype, h_T fp32 or None).
    chunk_size overrides config.chunk."""
    B, T, D = x.shape
    N = q.shape[-1]
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"ema_scan_triton: x dtype {x.dtype} is not one of {_SUPPORTED_DTYPES}; use impl=reference")
    if N & (N - 1) or N > 64:
        raise ValueError(f"ema_scan_triton: N = {N} EMA dimensions must be a power of two <= 64; use impl=reference")
    L = int(chunk_size or config.chunk)
    f = torch.float32
    params = [t.to(f).t().contiguous() for t in (pb, q, gamma * scale)] + [omega.to(f).contiguous()]
    h0 = None if state is None else state.to(f).contiguous()
    if T == 0:
        h = h0 if h0 is not None else torch.zeros(B, D, N, dtype=f, device=x.device)
        return x.new_zeros(B, 0, D), (h if return_state else None)
    xc = x if x.is_contiguous() else x.contiguous()
    y, h_T = _apply(xc, *params, h0, bool(silu), L, config)
    return y, (h_T if return_state else None)


__all__ = ["supports", "ema_scan_triton", "KernelConfig", "CONFIG"]
