"""torch.compile per block, applied from outside the model (parameter names unchanged).

Compiling block by block keeps graphs small and identical across layers (one compilation reused), and
leaves the fused attention kernel (an autograd Function) as a graph break. Off by default: measure it
(`python -m evals.throughput --compile`) before turning it on for a run.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(blocks, backend: str = "inductor") -> None:
    for block in blocks:
        if not getattr(block, "_compiled", False):
            block.forward = torch.compile(block.forward, backend=backend, dynamic=False)
            block._compiled = True


def maybe_compile(model: nn.Module, enabled: bool, backend: str) -> None:
    if enabled:
        compile_blocks(model.blocks, backend)
