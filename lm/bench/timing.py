"""Timing of GPU kernels for the kernel benchmarks (lm.bench.kernels, lm.bench.vq_attention)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timer:
    """timer(fn, warmup, rep): median milliseconds per call of fn.

    CUDA: triton.testing.do_bench(fn, warmup, rep, return_mode="median"), which runs fn for about `warmup` ms
    untimed, then about `rep` ms of timed calls. Other devices: the same budgets in wall-clock time, with at least
    one warm-up call (when warmup > 0) and one timed call (the Triton interpreter's calls outlast any budget)."""

    device: torch.device

    def __call__(self, fn: Callable[[], object], warmup: float = 25, rep: float = 100) -> float:
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        end = time.perf_counter() + warmup / 1e3
        while warmup > 0:
            fn()
            if time.perf_counter() >= end:
                break
        times, end = [], time.perf_counter() + rep / 1e3
        while not times or time.perf_counter() < end:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


__all__ = ["Timer", "rel_error"]
