"""Device and markers of the fused-kernel tests: on a GPU they run on CUDA; on the CPU only under Triton's
interpreter (TRITON_INTERPRET=1, fp32), as tests/ops/test_fused_interpreter.py runs them."""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and not CUDA
DEVICE = "cuda" if CUDA else "cpu"
FUSED_MARKS = [pytest.mark.gpu, pytest.mark.triton_interpret]
"""The pytestmark of a module whose tests all run fused kernels (tests/conftest.py skips them on a CPU outside the
interpreter)."""
gpu_only = pytest.mark.skipif(not CUDA, reason="CUDA-specific (bf16, dispatch on CUDA tensors)")
