"""Activation checkpointing per block, applied from outside the model (parameter names unchanged).

The forward is recomputed during backward; the recomputation must not count codebook statistics a
second time, so the block's quantizers skip accumulation while it runs.
"""

from __future__ import annotations

import torch.utils.checkpoint as torch_checkpoint
from torch import nn


def _checkpointed(block: nn.Module, forward):
    quantizers = [m for m in block.modules() if hasattr(m, "accumulate_stats")]

    def wrapped(x, state=None, return_state: bool = False):
        if state is not None or return_state or not block.training:
            return forward(x, state, return_state)
        calls = []

        def run(inp):
            recompute = bool(calls)
            calls.append(1)
            for vq in quantizers:
                vq.accumulate_stats = not recompute
            try:
                return forward(inp)
            finally:
                for vq in quantizers:
                    vq.accumulate_stats = True

        return torch_checkpoint.checkpoint(run, x, use_reentrant=False)

    return wrapped


def apply_activation_checkpointing(blocks) -> None:
    """Recompute each block's activations in backward instead of storing them (in place)."""
    for block in blocks:
        if not getattr(block, "_activation_checkpointed", False):
            block.forward = _checkpointed(block, block.forward)
            block._activation_checkpointed = True
