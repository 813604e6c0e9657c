"""Declared tolerances, one table for every numerical comparison in the suite."""

import torch

# (atol, rtol) for elementwise comparisons
ELEMENTWISE = {
    torch.float64: (1e-10, 1e-9),  # same math, different summation order
    torch.float32: (1e-5, 1e-4),
}


def assert_close(actual, expected, dtype=None, msg=""):
    atol, rtol = ELEMENTWISE[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")
