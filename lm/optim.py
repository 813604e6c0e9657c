"""Parameter groups (no weight decay for norms, biases, embeddings, EMA and gate scalars) and the
warmup + cosine learning-rate schedule. Codebooks are buffers, so they never reach the optimizer."""

from __future__ import annotations

import math

from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lm.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = p.ndim == 2 and ("embed" not in name) and (".ema." not in name) and ("qk_" not in name) and ("rel_bias" not in name)
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (linear warmup, then cosine to min_lr_ratio)."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_factory(optim: OptimConfig, max_steps: int):
    return lambda optimizer: LambdaLR(optimizer, lambda s: lr_lambda(s, optim, max_steps))
