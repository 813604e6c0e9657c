"""The language model: token embedding -> N x (mixer, FFN) -> norm -> tied head. Architecture only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from lm.config import ModelConfig
from lm.model.common import FeedForward, RMSNorm
from lm.model.longvq import LongVQMixer
from lm.model.quantizer import VectorQuantizer, apply_updates
from lm.model.transformer import SelfAttentionMixer
from lm.ops.linear_ce import linear_cross_entropy, logits_cross_entropy

MIXERS = {"longvq": LongVQMixer, "transformer": SelfAttentionMixer}


@dataclass
class ModelOutput:
    logits: Optional[Tensor]  # (B, T, V); None when the loss was computed chunk-wise without them
    aux_loss: Tensor  # scalar: weighted commitment losses summed over layers (0 for the Transformer)
    state: Optional[list] = None  # per-layer streaming state when return_state=True
    metrics: dict = field(default_factory=dict)  # detached per-layer diagnostics ("layer{i}/usage", ...)
    loss: Optional[Tensor] = None  # mean cross-entropy against `targets`, when they were given


class LMHead(nn.Linear):
    """The output projection; given targets it returns the mean cross-entropy instead, optionally without
    materialising the logits (lm/ops/linear_ce.py). Computing the loss inside the head's own forward keeps
    its (possibly ZeRO-3-partitioned, possibly tied) weight gathered while it is used."""

    def forward(self, h: Tensor, targets: Optional[Tensor] = None, chunk_tokens: int = 0, impl: str = "auto") -> Tensor:
        if targets is None:
            return super().forward(h)
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.weight, targets.reshape(-1), chunk_tokens, dtype,
                                    impl)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer = MIXERS[cfg.arch](cfg)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.mixer.ffn_kind, cfg.norm_eps, cfg.dropout)

    def forward(self, x: Tensor, state=None, return_state: bool = False, sp=None):
        if getattr(self.mixer, "fuses_next_norm", False) and self.ffn.norm.weight is not None:
            (x, normed), state, aux, metrics = self.mixer(x, state, return_state, sp=sp, norm=self.ffn.norm)
            return self.ffn(x, normed), state, aux, metrics
        x, state, aux, metrics = self.mixer(x, state, return_state, sp=sp)
        return self.ffn(x), state, aux, metrics


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, self.cfg.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.cfg.init_std)

    def forward(self, tokens: Tensor, state: Optional[list] = None, return_state: bool = False,
                targets: Optional[Tensor] = None, loss_chunk_tokens: int = 0, loss_impl: str = "auto",
                sp=None) -> ModelOutput:
        """targets (B, T): also return the mean cross-entropy in `loss`. loss_chunk_tokens > 0 computes it
        that many tokens at a time and returns no logits (memory of long contexts); loss_impl picks what
        computes each chunk's losses and gradient ("auto", "triton", "torch": lm/ops/linear_ce.py).

        sp: a sequence-parallel context (lm.parallel.sequence.SequenceContext; None on one process): tokens
        are then this rank's segment of longer sequences, every layer takes the state of the earlier
        segments from the other ranks, and `loss` is the mean over this segment."""
        if tokens.dtype != torch.long:
            raise TypeError(f"tokens must be int64 token ids, got {tokens.dtype}")
        x = self.embed(tokens)
        aux = x.new_zeros((), dtype=torch.float32)
        new_states, metrics = [], {}
        for i, block in enumerate(self.blocks):
            x, s, a, m = block(x, None if state is None else state[i], return_state, sp=sp)
            aux = aux + a
            new_states.append(s)
            metrics.update({f"layer{i}/{k}": v for k, v in m.items()})
        h = self.norm(x)
        logits = loss = None
        if targets is None or loss_chunk_tokens == 0:
            logits = self.head(h)
        if targets is not None:
            loss = (self.head(h, targets, loss_chunk_tokens, loss_impl) if loss_chunk_tokens
                    else logits_cross_entropy(logits, targets))
        return ModelOutput(logits, aux, new_states if return_state else None, metrics, loss)

    def static_state(self, state: list, capacity: int) -> list:
        """Per-layer fixed-shape decoding states (for `decode_step`) holding the state a forward with
        return_state=True returned; `capacity`: the most positions the sequence will reach (the Transformer's
        cache length; LongVQ's state does not depend on it)."""
        return [block.mixer.static_state(s, capacity) for block, s in zip(self.blocks, state)]

    def decode_step(self, tokens: Tensor, state: list) -> Tensor:
        """Logits (B, V) after one new token per sequence, tokens (B, 1), with the per-layer static states of
        `static_state`, updated in place. No host synchronisation and no shape that depends on the position:
        the step can be captured in a CUDA graph (lm.engine.decoder). Equals forward() with a carried state."""
        x = self.embed(tokens)
        for block, s in zip(self.blocks, state):
            x = block.ffn(block.mixer.decode_step(x, s))
        return self.head(self.norm(x))[:, -1]

    def quantizers(self) -> list[VectorQuantizer]:
        return [vq for _, vq in self.named_quantizers()]

    def named_quantizers(self) -> list[tuple[int, VectorQuantizer]]:
        """(layer index, quantizer) for every LongVQ layer."""
        return [(i, b.mixer.quantizer) for i, b in enumerate(self.blocks) if hasattr(b.mixer, "quantizer")]

    def apply_codebook_updates(self) -> None:
        """Call once per optimizer step (after statistics were summed over data-parallel ranks)."""
        apply_updates(self.quantizers())

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n
