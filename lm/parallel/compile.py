"""torch.compile per block, applied from outside the model (parameter names unchanged).

Compiling block by block keeps graphs small and identical across layers (one compilation reused), and
leaves the fused attention kernel (an autograd Function) as a graph break. Off by default: measure it
(`python -m evals.throughput --compile`) before turning it on for a run. `set_tf32` switches TF32
matmuls. `eager_blocks(model)` runs the original Python forwards for a while (evaluation with other
shapes or diagnostics hooks, without recompiling).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def compile_blocks(blocks, backend: str = "inductor") -> None:
    """Compile each block's forward. The block's `forward` becomes a small switch between the compiled
    and the original forward (`eager_blocks` flips it), so wrappers applied later around `forward`
    (activation checkpointing) stay in place in both modes."""
    for block in blocks:
        if not hasattr(block, "_compiled_forward"):
            eager = block.forward
            compiled = torch.compile(eager, backend=backend, dynamic=False)

            def forward(*args, _block=block, **kwargs):
                run = _block._eager_forward if _block._run_eager else _block._compiled_forward
                return run(*args, **kwargs)

            block._eager_forward, block._compiled_forward, block._run_eager = eager, compiled, False
            block.forward = forward


def set_tf32(enabled: bool) -> None:
    """float32 matmuls on TF32 tensor cores (CUDA; no effect on CPU). The only fp32 GEMM of a bf16-autocast
    step is LongVQ's key-to-codebook distance, whose argmin tolerates the 10-bit mantissa (near-ties only)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def maybe_compile(model: nn.Module, enabled: bool, backend: str) -> None:
    if enabled:
        compile_blocks(model.blocks, backend)


@contextlib.contextmanager
def eager_blocks(model: nn.Module):
    """Inside: compiled blocks run their original eager forward (under any wrapper applied after
    compiling, e.g. activation checkpointing). No-op for a model never compiled."""
    blocks = [b for b in getattr(model, "blocks", []) if hasattr(b, "_compiled_forward")]
    previous = [b._run_eager for b in blocks]
    for block in blocks:
        block._run_eager = True
    try:
        yield model
    finally:
        for block, prev in zip(blocks, previous):
            block._run_eager = prev
