"""torch.compile per block, applied from outside the model with `nn.Module.compile` (parameter names unchanged).

Compiling block by block keeps graphs small and identical across layers (one compilation reused), and
leaves the fused attention kernel (an autograd Function) as a graph break. Off by default: measure it
(`python -m evals.throughput --compile`) before turning it on for a run. `set_tf32` switches TF32
matmuls. `eager_blocks(model)` runs the compiled blocks eagerly for a while (evaluation with other
shapes or diagnostics hooks, without recompiling).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def compile_blocks(blocks, backend: str = "inductor") -> None:
    """Compile each block in place (`block.compile`: the module's call is compiled, hooks included, so
    activation checkpointing applied before or after stays in effect)."""
    for block in blocks:
        block.compile(backend=backend, dynamic=False)


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
    """Inside: compiled code runs eagerly, with no compilation or recompilation (torch.compiler's
    "force_eager" stance for the duration of the block); forward hooks such as activation checkpointing
    still apply. No-op for a model never compiled."""
    with torch.compiler.set_stance("force_eager"):
        yield model
