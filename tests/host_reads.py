"""A dispatch mode that fails on the ops that read device values back to the host: `.item()` / `float()` /
`bool()` (aten._local_scalar_dense), data-dependent shapes (nonzero, boolean-mask indexing) and bincount (on
CUDA it reads the indices' min and max to size its output). It runs on the CPU, so CPU tests prove that code
would not synchronise on a GPU."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.masked_select,
              torch.ops.aten.bincount)


class NoHostReads(TorchDispatchMode):
    """AssertionError("host read: OP") on any op of HOST_READS inside the block."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in HOST_READS:
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))
