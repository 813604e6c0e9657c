"""Activation checkpointing per block, applied from outside the model (parameter names unchanged).

The forward is recomputed during backward; the recomputation must not count codebook statistics a
second time, so the block's quantizer statistics are saved before it and restored after it. (Switching
accumulation off instead would make the recomputation a different program: under torch.compile a
different graph, which may save a different set of tensors, and checkpointing refuses that.)
"""

from __future__ import annotations

import torch.utils.checkpoint as torch_checkpoint
from torch import nn


def _checkpointed(block: nn.Module, forward):
    quantizers = [m for m in block.modules() if hasattr(m, "stat_names")]

    def wrapped(x, state=None, return_state: bool = False, **kwargs):
        if state is not None or return_state or not block.training:
            return forward(x, state, return_state, **kwargs)
        calls = []

        def run(inp):
            recompute = bool(calls)
            calls.append(1)
            saved = [(getattr(vq, n), getattr(vq, n).clone()) for vq in quantizers for n in vq.stat_names] if recompute else []
            try:
                return forward(inp, **kwargs)
            finally:
                for buf, copy in saved:
                    buf.copy_(copy)

        return torch_checkpoint.checkpoint(run, x, use_reentrant=False)

    return wrapped


def apply_activation_checkpointing(blocks, num_blocks: int = 0) -> None:
    """Recompute the activations of the first `num_blocks` blocks (0 = all) in backward instead of storing
    them (in place). Checkpointing only some blocks trades memory for less recomputation."""
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0 (0 = all blocks), got {num_blocks}")
    blocks = list(blocks)
    for block in blocks[:num_blocks] if num_blocks else blocks:
        if not getattr(block, "_activation_checkpointed", False):
            block.forward = _checkpointed(block, block.forward)
            block._activation_checkpointed = True
