"""LongVQ token mixer: MEGA's gated EMA block with its attention replaced by causal chunked VQ attention.

docs/model.md describes the block, the attention rule and the codebook. With x the residual stream (B, T, D):
    xn = RMSNorm(x)
    v  = SiLU(xn W_v)                                    value branch (B, T, E)
    m  = Dropout(SiLU(EMA(xn)))                          damped multi-dimensional EMA (the SSM; hidden_dropout)
    u, z, r, hx = split(m W_mx)                          u = sigmoid (update gate), z, r = SiLU
    q = kappa_q * z + mu_q;  k = RMSNorm_nogain(kappa_k * z + mu_k)   per head
        (options: key_norm=center_rms subtracts the per-head mean of k first; query_norm RMS-normalises q too;
         query_temperature multiplies q by a learned exp(s_h) per head;
         local_raw_keys gives the attention k instead of k_hat: exact keys locally, codewords in the cache)
    k_hat, codes = VQ(k)                                 straight-through, per-layer codebook
    a = Dropout(vq_attention(q, k_hat, v, ...))          causal chunked VQ attention (attention_dropout)
    h = SiLU(hx + (a * r) W_h)
    out = x + u * (h - x)                                gated residual (residual=add: out = x + u * h)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.config import ModelConfig
from lm.model.common import RMSNorm
from lm.model.ema import MultiDimEMA
from lm.model.quantizer import VectorQuantizer
from lm.ops import vq_attention
from lm.ops.gates import gate_split, gated_residual, gated_residual_norm, resolve_impl
from lm.ops.vq_attention_decode import StaticVQAttentionState, vq_attention_decode_step


@dataclass
class LongVQState:
    ema: Tensor  # (B, D, N) float32
    attn: object  # VQAttentionState (chunked/fused) or DenseAttentionState (dense)


@dataclass
class StaticLongVQState:
    """Fixed-shape decoding state (LongVQMixer.decode_step updates it in place)."""

    ema: Tensor  # (B, D, N) float32
    attn: StaticVQAttentionState

    def tensors(self) -> list[Tensor]:
        return [self.ema] + self.attn.tensors()


class LongVQMixer(nn.Module):
    fuses_next_norm = True
    """forward takes `norm`, the block's next RMSNorm, and may return its result (see forward)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        lv = cfg.longvq
        D = cfg.d_model
        self.d_model, self.z_dim = D, lv.z_dim
        self.hidden = lv.hidden_dim  # resolved by ModelConfig (2 * d_model when null)
        self.n_heads, self.chunk_size = lv.n_heads, lv.chunk_size
        self.impl, self.normalize_keys, self.commit_beta = lv.attention_impl, lv.normalize_keys, lv.commit_beta
        self.key_norm, self.query_norm, self.local_raw_keys = lv.key_norm, lv.query_norm, lv.local_raw_keys
        self.residual, self.gate_impl = lv.residual, lv.gate_impl
        self.norm = RMSNorm(D, cfg.norm_eps)
        self.v_proj = nn.Linear(D, self.hidden)
        self.ema = MultiDimEMA(D, lv.ema_dim, impl=lv.ema_impl)
        self.mx_proj = nn.Linear(D, D + lv.z_dim + self.hidden + D)
        self.qk_scale = nn.Parameter(torch.ones(2, lv.z_dim))
        self.qk_shift = nn.Parameter(torch.zeros(2, lv.z_dim))
        # b[d] for distances d = 0..C, stored padded to a multiple of 8 entries per head so the parameter's size is
        # a multiple of 16 bytes in bf16 (engines pack parameters into flat buffers; the padding keeps every
        # later parameter aligned there). The padding entries are never read and get no gradient.
        self.rel_bias = nn.Parameter(torch.zeros(lv.n_heads, -(-(lv.chunk_size + 1) // 8) * 8))
        self.log_q_scale = nn.Parameter(torch.zeros(lv.n_heads)) if lv.query_temperature else None
        self.quantizer = VectorQuantizer(lv.n_heads, lv.codebook_size, lv.z_dim // lv.n_heads, lv.codebook_decay,
                                         dead_code_threshold=lv.dead_code_threshold, init=lv.codebook_init,
                                         dead_code_reseed=lv.dead_code_reseed, impl=lv.quantizer_impl)
        self.h_proj = nn.Linear(self.hidden, D)
        self.hidden_dropout = nn.Dropout(lv.hidden_dropout)
        self.attention_dropout = nn.Dropout(lv.attention_dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.capture = False  # True: keep the attention inputs of the next forward in self.captured (diagnostics)

    @property
    def bias(self) -> Tensor:
        """The relative-position bias (H, C + 1) without its padding."""
        return self.rel_bias[:, : self.chunk_size + 1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "rel_bias"
        saved = state_dict.get(key)
        if saved is not None and saved.shape[-1] == self.chunk_size + 1 < self.rel_bias.shape[-1]:
            state_dict[key] = F.pad(saved, (0, self.rel_bias.shape[-1] - saved.shape[-1]))  # saved unpadded
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, state: Optional[LongVQState] = None, return_state: bool = False, sp=None,
                norm: Optional[nn.Module] = None):
        """sp: sequence-parallel context (lm/parallel/sequence.py) when x is one segment of a sequence split
        over ranks; the EMA state and the attention state of the tokens before it come through it.

        norm: the RMSNorm (lm.model.common.RMSNorm, with a weight) that the block applies to this mixer's
        output next. Given, the first result is (out, normed): normed = norm(out) when the gated residual and
        the norm ran as one fused kernel (gate_impl resolves to triton, no dropout), else None (the caller
        applies norm itself)."""
        if sp is not None and state is not None:
            raise ValueError("a carried state and a sequence-parallel context cannot be combined")
        a = self._attention_inputs(x, None if state is None else state.ema, return_state, sp)
        attend = vq_attention if sp is None else sp.vq_attention
        kwargs = {} if sp is not None else {"state": None if state is None else state.attn}
        attn, attn_state = attend(
            a.q, a.keys, a.v, a.codes, a.codebook, chunk_size=self.chunk_size, bias=self.bias,
            return_state=return_state, impl=self.impl, **kwargs)
        if self.capture:  # lm.ops.vq_diagnostics.attention_mass_split(**self.captured, chunk_size=C)
            self.captured = dict(q=a.q.detach(), k_hat=a.keys.detach(), v=a.v.detach(), codes=a.codes,
                                 codebook=a.codebook, bias=self.bias.detach())
        out = self._output(x, attn, a, norm)
        new_state = LongVQState(a.ema_state, attn_state) if return_state else None
        return out, new_state, self.commit_beta * a.commit, a.metrics

    def static_state(self, state: LongVQState, capacity: int = 0) -> StaticLongVQState:
        """The fixed-shape decoding state holding a prefill's state (`capacity` is not needed: the state's size
        does not depend on the length)."""
        attn = StaticVQAttentionState.from_state(state.attn, chunk_size=self.chunk_size,
                                                 codebook_size=self.quantizer.codebook_size)
        return StaticLongVQState(state.ema.clone(), attn)

    def decode_step(self, x: Tensor, state: StaticLongVQState) -> Tensor:
        """forward() for one new token x (B, 1, D) with a fixed-shape state, updated in place (see
        lm/ops/vq_attention_decode.py: no host read, no shape that depends on the position, so the step can be
        captured in a CUDA graph). Returns the mixer output (B, 1, D)."""
        if x.shape[1] != 1:
            raise ValueError(f"decode_step takes one token per call, got {x.shape[1]}")
        a = self._attention_inputs(x, state.ema, True, None)
        state.ema.copy_(a.ema_state)
        attn = vq_attention_decode_step(a.q, a.keys, a.v, a.codes, a.codebook, state.attn, bias=self.bias)
        return self._output(x, attn, a)

    def _attention_inputs(self, x: Tensor, ema_state: Optional[Tensor], return_state: bool, sp) -> "_AttentionInputs":
        """Everything before the attention: norm, value branch, EMA, gates, q/k, quantizer."""
        B, T, D = x.shape
        H, E, dz = self.n_heads, self.hidden, self.z_dim
        xn = self.norm(x)
        v = F.silu(self.v_proj(xn))
        ema_out, ema_state = self.ema(xn, ema_state, return_state, silu=True, sp=sp)  # SiLU(EMA)
        m = self.hidden_dropout(ema_out)
        # u = sigmoid, z and r = SiLU, q and k the affine maps of z per head with their norms; hx a view of mx.
        # q and k in the activation dtype (bf16 under autocast): fp32 affine params must not promote them
        u, q, k, r, hx = gate_split(
            self.mx_proj(m), self.qk_scale, self.qk_shift, sizes=(D, dz, E), heads=H, query_norm=self.query_norm,
            key_norm=self.key_norm if self.normalize_keys else None, dtype=v.dtype, impl=self.gate_impl)
        if self.log_q_scale is not None:  # learned temperature per head
            q = q * self.log_q_scale.exp().to(v.dtype)[:, None]
        k_hat, codes, commit, metrics = self.quantizer(k)
        keys = k if self.local_raw_keys else k_hat  # local attention keys; the cache always uses codewords
        return _AttentionInputs(q, keys, v.view(B, T, H, E // H), codes, self.quantizer.codebook.to(q.dtype), u, r,
                                hx, ema_state, commit, metrics)

    def _output(self, x: Tensor, attn: Tensor, a: "_AttentionInputs", norm: Optional[nn.Module] = None):
        """Everything after the attention: output projection, gates, residual; with `norm`, (out, normed or
        None) (see forward)."""
        B, T, D = x.shape
        y = self.h_proj(self.attention_dropout(attn.reshape(B, T, self.hidden)) * a.r)
        # h = Dropout(SiLU(hx + y)); out = x + u * h (add) or x + u * (h - x) (gated)
        kwargs = dict(residual=self.residual, dropout=self.dropout.p if self.training else 0.0, impl=self.gate_impl)
        if norm is None:
            return gated_residual(a.hx, y, a.u, x, **kwargs)
        if resolve_impl(self.gate_impl, "gated_residual_norm", y, supported=kwargs["dropout"] == 0) == "triton":
            return gated_residual_norm(a.hx, y, a.u, x, norm.weight, eps=norm.eps, **kwargs)
        return gated_residual(a.hx, y, a.u, x, **kwargs), None


@dataclass
class _AttentionInputs:
    q: Tensor  # (B, T, H, dk)
    keys: Tensor  # local attention keys (quantized, or raw with local_raw_keys)
    v: Tensor  # (B, T, H, E / H)
    codes: Tensor  # (B, T, H)
    codebook: Tensor  # (H, S, dk) in q's dtype
    u: Tensor
    r: Tensor
    hx: Tensor
    ema_state: Optional[Tensor]
    commit: Tensor
    metrics: dict
