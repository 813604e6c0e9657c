"""Multi-dimensional damped EMA (MEGA's SSM), by FFT convolution for training and by recurrence for decoding.

Per channel d and EMA dimension n (research/longvq_algorithm.md §A.2.3):
    p = sigmoid(delta), a = sigmoid(alpha), q = 1 - p * a
    h_t[d, n] = p * beta * x_t[d] + q * h_{t-1}[d, n]
    y_t[d]    = sqrt(1/N) * sum_n gamma[d, n] * h_t[d, n] + omega[d] * x_t[d]
The parallel form convolves x with K[d, l] = sqrt(1/N) sum_n gamma p beta q^l (FFT, fp32) and adds the
contribution of an incoming state h_0: sqrt(1/N) sum_n gamma q^(t+1) h_0.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


class MultiDimEMA(nn.Module):
    def __init__(self, dim: int, ndim: int = 16):
        super().__init__()
        self.dim, self.ndim = dim, ndim
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

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """(p * beta, q), each (D, N) in float32."""
        p = torch.sigmoid(self.delta.float())
        q = 1.0 - p * torch.sigmoid(self.alpha.float())
        return p * self.beta.float(), q

    def kernel(self, length: int) -> Tensor:
        """K (D, L) in float32."""
        pb, q = self.coefficients()
        powers = torch.exp(torch.arange(length, device=q.device, dtype=torch.float32)[None, None] * q.log()[..., None])
        return torch.einsum("dn,dnl->dl", pb * self.gamma.float() * self.scale, powers)

    def forward(self, x: Tensor, state: Optional[Tensor] = None, return_state: bool = False):
        """x (B, T, D) -> (y (B, T, D), h_T (B, D, N) or None). state: h_0 (B, D, N) float32."""
        B, T, D = x.shape
        xf = x.float().transpose(1, 2)  # (B, D, T)
        k = self.kernel(T)
        n = 2 * T
        y = torch.fft.irfft(torch.fft.rfft(xf, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :T]
        pb, q = self.coefficients()
        if state is not None:
            decay = torch.exp(torch.arange(1, T + 1, device=x.device, dtype=torch.float32)[None, None] * q.log()[..., None])
            y = y + torch.einsum("dn,dnt,bdn->bdt", self.gamma.float() * self.scale, decay, state.float())
        y = y.transpose(1, 2) + x.float() * self.omega.float()
        new_state = None
        if return_state:
            rev = torch.exp(torch.arange(T - 1, -1, -1, device=x.device, dtype=torch.float32)[None, None] * q.log()[..., None])
            new_state = torch.einsum("dn,dnt,bdt->bdn", pb, rev, xf)
            if state is not None:
                new_state = new_state + q.pow(T)[None] * state.float()
        return y.to(x.dtype), new_state

    def step(self, x: Tensor, state: Optional[Tensor] = None):
        """Recurrent reference: x (B, T, D), one token at a time. Returns (y, h_T)."""
        B, T, D = x.shape
        pb, q = self.coefficients()
        h = x.new_zeros(B, D, self.ndim, dtype=torch.float32) if state is None else state.float()
        ys = []
        for t in range(T):
            h = pb[None] * x[:, t, :, None].float() + q[None] * h
            ys.append((h * self.gamma.float()[None]).sum(-1) * self.scale + x[:, t].float() * self.omega.float())
        return torch.stack(ys, dim=1).to(x.dtype), h
