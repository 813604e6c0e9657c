"""Activation checkpointing per block, applied from outside the model with torch's composable `checkpoint`
(forward hooks on the block: the module tree and the parameter names stay unchanged, so checkpoints of runs
with and without it are interchangeable).

The forward is recomputed during backward; the recomputation must not count codebook statistics a
second time, so the block's quantizer statistics are saved before it and restored after it (the
recomputation context torch's checkpoint takes). Switching accumulation off instead would make the
recomputation a different program: under torch.compile a different graph, which may save a different set
of tensors, and checkpointing refuses that.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed._composable import checkpoint


class _KeepStatistics:
    """Context of a recomputation: the quantizers' statistics buffers are as before it when it ends."""

    def __init__(self, quantizers: list):
        self.quantizers = quantizers
        self.saved: list = []

    def __enter__(self):
        self.saved = [(getattr(vq, n), getattr(vq, n).clone()) for vq in self.quantizers for n in vq.stat_names]
        return self

    def __exit__(self, *exc):
        for buf, copy in self.saved:
            buf.copy_(copy)
        self.saved = []
        return False


def _statistics_guard(block: nn.Module):
    """context_fn for checkpoint: nothing around the forward, statistics kept around the recomputation."""
    quantizers = [m for m in block.modules() if hasattr(m, "stat_names")]
    return lambda: (contextlib.nullcontext(), _KeepStatistics(quantizers))


def is_checkpointed(block: nn.Module) -> bool:
    """True when `apply_activation_checkpointing` made this block recompute its activations."""
    return checkpoint.state(block) is not None


def apply_activation_checkpointing(blocks, num_blocks: int = 0) -> None:
    """Recompute the activations of the first `num_blocks` blocks (0 = all) in backward instead of storing
    them (in place, idempotent). Checkpointing only some blocks trades memory for less recomputation."""
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0 (0 = all blocks), got {num_blocks}")
    blocks = list(blocks)
    for block in blocks[:num_blocks] if num_blocks else blocks:
        if not is_checkpointed(block):
            checkpoint(block, context_fn=_statistics_guard(block))
