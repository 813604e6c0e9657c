"""Multi-dimensional damped EMA (MEGA's SSM): a chunked scan or an FFT convolution for training, the recurrence
for decoding.

Per channel d and EMA dimension n (docs/model.md):
    p = sigmoid(delta), a = sigmoid(alpha), q = 1 - p * a
    h_t[d, n] = p * beta * x_t[d] + q * h_{t-1}[d, n]
    y_t[d]    = sqrt(1/N) * sum_n gamma[d, n] * h_t[d, n] + omega[d] * x_t[d]
The parallel form convolves x with K[d, l] = sqrt(1/N) sum_n gamma p beta q^l (FFT, fp32) and adds the
contribution of an incoming state h_0: sqrt(1/N) sum_n gamma q^(t+1) h_0. The scan form
(lm/ops/ema_scan.py: a Triton kernel on CUDA, its PyTorch twin elsewhere) runs the recurrence in chunks;
`impl` (model.longvq.ema_impl) picks: fft, scan, or auto (the Triton scan where it runs, else fft).

Sequence parallelism (`sp`, lm/parallel/sequence.py): each rank reduces its segment to the final state it
would reach from a zero state; the earlier ranks' final states, combined in closed form (decay q^T per
segment of T tokens), are this segment's true initial state, from which the segment's outputs come in one
pass. The final state (and, for a carried state, the state contribution of the FFT path) is computed in
blocks of about sqrt(T) positions, so no (D, N, T) tensor is formed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lm.ops.ema_scan import MODULE_IMPLS, ema_scan, resolve_ema_impl


class MultiDimEMA(nn.Module):
    def __init__(self, dim: int, ndim: int = 16, impl: str = "fft"):
        super().__init__()
        if impl not in MODULE_IMPLS:
            raise ValueError(f"ema impl must be one of {MODULE_IMPLS}, got {impl!r}")
        self.dim, self.ndim, self.impl = dim, ndim, impl
        self.scale = math.sqrt(1.0 / ndim)
        self.delta = nn.Parameter(torch.empty(dim, ndim))
        self.alpha = nn.Parameter(torch.empty(dim, ndim))
        self.beta = nn.Parameter(torch.empty(dim, ndim))
        self.gamma = nn.Parameter(torch.empty(dim, ndim))
        self.omega = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.delta, 0.0, 0.2)
        nn.init.normal_(self.alpha, 0.0, 0.2)
        sign = torch.ones(self.ndim)
        sign[1::2] = -1.0
        self.beta.copy_(sign.expand(self.dim, -1) + 0.02 * torch.randn(self.dim, self.ndim))
        nn.init.normal_(self.gamma, 0.0, 1.0)
        nn.init.normal_(self.omega, 0.0, 1.0)

    @property
    def acc_dtype(self) -> torch.dtype:
        """Computation dtype: float32 at least (float64 parameters stay float64)."""
        return torch.promote_types(self.delta.dtype, torch.float32)

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """(p * beta, q), each (D, N), in acc_dtype."""
        f = self.acc_dtype
        p = torch.sigmoid(self.delta.to(f))
        q = 1.0 - p * torch.sigmoid(self.alpha.to(f))
        return p * self.beta.to(f), q

    def _powers(self, q: Tensor, start: int, stop: int, step: int = 1) -> Tensor:
        """q ** l for l in range(start, stop, step): (D, N, L)."""
        exps = torch.arange(start, stop, step, device=q.device, dtype=q.dtype)
        return torch.exp(exps[None, None] * q.log()[..., None])

    def kernel(self, length: int) -> Tensor:
        """K (D, L). Under autograd the (D, N, L) Vandermonde is recomputed in backward, not stored:
        stored, it would cost D * N * L floats per layer (3 GiB at L = 64K, D = 768, N = 16)."""
        if torch.is_grad_enabled():
            return checkpoint(self._kernel, length, use_reentrant=False)
        return self._kernel(length)

    def _kernel(self, length: int) -> Tensor:
        pb, q = self.coefficients()
        # a broadcast product and a sum, not an einsum (= batched GEMM): under torch.compile this is one
        # fused reduction that never writes the (D, N, L) powers to memory
        return ((pb * self.gamma.to(q.dtype) * self.scale)[..., None] * self._powers(q, 0, length)).sum(1)

    def forward(self, x: Tensor, state: Optional[Tensor] = None, return_state: bool = False, silu: bool = False,
                sp=None):
        """x (B, T, D) -> (y (B, T, D), h_T (B, D, N) or None). state: h_0 (B, D, N) in acc_dtype.
        silu: return SiLU(y) instead (fused into the scan kernel's epilogue where that runs).

        sp: a sequence-parallel context (x is this rank's segment); the initial state comes from the
        earlier ranks through `sp.ema_initial_state` and gradients flow back to them."""
        if sp is not None and state is not None:
            raise ValueError("the EMA takes either a carried state or a sequence-parallel context, not both")
        with torch.autocast(x.device.type, enabled=False):  # FFT and kernel in float32 even under bf16 autocast
            if sp is not None:
                return self._forward_segment(x, return_state, sp, silu)
            if x.shape[1] == 1 and state is not None:  # decoding: one recurrence step, no FFT
                y, h = self.step(x, state)
                return (F.silu(y) if silu else y), (h if return_state else None)
            impl = resolve_ema_impl(self.impl, x, self.ndim)
            if impl == "fft":
                y, h = self._forward(x, state, return_state)
                return (F.silu(y) if silu else y), h
            pb, q = self.coefficients()
            return ema_scan(x, pb, q, self.gamma.to(q.dtype), self.omega.to(q.dtype), scale=self.scale, state=state,
                            return_state=return_state, silu=silu, impl=impl)

    def _forward_segment(self, x: Tensor, return_state: bool, sp, silu: bool):
        """One segment of a sequence split over ranks: this segment's final state from a zero state (a
        reduction, `final_state`), the true initial state from the earlier ranks' final states in closed form
        (`sp.ema_initial_state`), then the segment's outputs from that state in one pass (the scan kernel with
        SiLU in its epilogue where it runs)."""
        T = x.shape[1]
        impl = resolve_ema_impl(self.impl, x, self.ndim)
        pb, q = self.coefficients()
        local_final = self.final_state(x.to(self.acc_dtype).transpose(1, 2), pb, q)  # carries autograd to x
        h0 = sp.ema_initial_state(local_final, q.pow(T))
        if impl == "fft":
            y, h = self._forward(x, h0, return_state)
            return (F.silu(y) if silu else y), h
        return ema_scan(x, pb, q, self.gamma.to(q.dtype), self.omega.to(q.dtype), scale=self.scale, state=h0,
                        return_state=return_state, silu=silu, impl=impl)

    def _forward(self, x: Tensor, state: Optional[Tensor], return_state: bool):
        B, T, D = x.shape
        f = self.acc_dtype
        xf = x.to(f).transpose(1, 2)  # (B, D, T)
        k = self.kernel(T)
        n = 2 * T
        y = torch.fft.irfft(torch.fft.rfft(xf, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :T]
        pb, q = self.coefficients()
        if state is not None:
            y = y + self.state_contribution(state.to(f), q, T)
        y = y.transpose(1, 2) + x.to(f) * self.omega.to(f)
        new_state = None
        if return_state:
            new_state = self.final_state(xf, pb, q)
            if state is not None:
                new_state = new_state + q.pow(T)[None] * state.to(f)
        return y.to(x.dtype), new_state

    @staticmethod
    def _block(T: int) -> int:
        return max(1, math.isqrt(T - 1) + 1) if T > 1 else 1

    def final_state(self, xf: Tensor, pb: Tensor, q: Tensor) -> Tensor:
        """h_T = sum_t pb q^(T-1-t) x_t from h_0 = 0 (xf: (B, D, T) in acc_dtype) -> (B, D, N).

        Two levels: positions t = k L + l in K blocks of L ~ sqrt(T); partial states per block with the
        powers q^(L-1-l), then the blocks combined with q^(L (K-1-k)). Memory O(D N sqrt(T))."""
        B, D, T = xf.shape
        L = self._block(T)
        K = -(-T // L)
        xb = F.pad(xf, (K * L - T, 0)).view(B, D, K, L)  # leading zeros leave the final state unchanged
        partial = torch.einsum("dnl,bdkl->bdnk", self._powers(q, L - 1, -1, -1), xb)
        return pb[None] * torch.einsum("dnk,bdnk->bdn", self._powers(q, L * (K - 1), -1, -L), partial)

    def state_contribution(self, state: Tensor, q: Tensor, T: int) -> Tensor:
        """sqrt(1/N) sum_n gamma q^(t+1) h_0 for t < T: (B, D, T), in blocks as `final_state`."""
        B, D, _ = state.shape
        L = self._block(T)
        K = -(-T // L)
        gamma = self.gamma.to(q.dtype) * self.scale
        outer = (gamma * q)[None, ..., None] * state[..., None] * self._powers(q, 0, K * L, L)[None]  # (B, D, N, K)
        y = torch.einsum("bdnk,dnl->bdkl", outer, self._powers(q, 0, L))
        return y.reshape(B, D, K * L)[..., :T]

    def step(self, x: Tensor, state: Optional[Tensor] = None):
        """Recurrent reference: x (B, T, D), one token at a time. Returns (y, h_T)."""
        B, T, D = x.shape
        pb, q = self.coefficients()
        f = q.dtype
        h = x.new_zeros(B, D, self.ndim, dtype=f) if state is None else state.to(f)
        ys = []
        for t in range(T):
            h = pb[None] * x[:, t, :, None].to(f) + q[None] * h
            ys.append((h * self.gamma.to(f)[None]).sum(-1) * self.scale + x[:, t].to(f) * self.omega.to(f))
        return torch.stack(ys, dim=1).to(x.dtype), h
