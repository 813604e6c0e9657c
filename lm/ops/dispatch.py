"""Choosing between a fused Triton kernel and its PyTorch twin: the shared rule behind every op's impl="auto".

    fused = load_fused("ema_scan_fused")               # the module, or None without Triton
    check_impl("ema_scan impl", impl, IMPLS)          # ValueError naming the choices
    choice = choose_auto("ema_scan impl=auto", x.is_cuda, "ema_scan_fused",
                         lambda m: m.supports(x, ndim), fast="triton", fallback="reference")

`choose_auto` takes the fast implementation when the inputs are on CUDA, Triton imports and the kernel's
`supports` accepts them; otherwise the fallback. Each distinct (setting, choice, reason) is logged once (in
eager calls: under torch.compile the choice is made but not logged).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


def load_fused(name: str) -> Optional[ModuleType]:
    """The kernel module lm.ops.<name> (ema_scan_fused, vq_quantize_fused, vq_attention_fused, linear_ce_fused,
    gates_fused), or
    None when Triton is missing (CPU-only installs). Imported on first use; the imports are literal so that
    torch.compile traces them without a graph break."""
    try:
        if name == "ema_scan_fused":
            from lm.ops import ema_scan_fused as fused
        elif name == "vq_quantize_fused":
            from lm.ops import vq_quantize_fused as fused
        elif name == "vq_attention_fused":
            from lm.ops import vq_attention_fused as fused
        elif name == "linear_ce_fused":
            from lm.ops import linear_ce_fused as fused
        elif name == "gates_fused":
            from lm.ops import gates_fused as fused
        else:
            raise ValueError(f"no fused kernel module lm.ops.{name}")
    except ImportError:
        return None
    return fused


def require_fused(name: str, message: str) -> ModuleType:
    """The kernel module lm.ops.<name>; RuntimeError(message) when Triton is missing."""
    fused = load_fused(name)
    if fused is None:
        raise RuntimeError(message)
    return fused


def check_impl(setting: str, impl: str, choices: tuple[str, ...]) -> None:
    """ValueError when impl is not one of choices (setting names it in the message)."""
    if impl not in choices:
        raise ValueError(f"{setting} {impl!r} is not one of {choices}")


@functools.lru_cache(maxsize=None)
def log_choice(setting: str, choice: str, why: str) -> None:
    """Log `setting -> choice (why)` at INFO, once per distinct triple."""
    log.info("%s -> %s (%s)", setting, choice, why)


def choose_auto(setting: str, on_cuda: bool, module: str, supports: Callable[[ModuleType], bool], *, fast: str,
                fallback: str) -> str:
    """fast when the inputs are on CUDA, lm.ops.<module> imports and supports(module) is true, else fallback.

    The choice and its reason are logged once under `setting` (eager calls only)."""
    fused = load_fused(module) if on_cuda else None
    if fused is not None and supports(fused):
        choice, why = fast, "the CUDA kernel supports these inputs"
    elif not on_cuda:
        choice, why = fallback, "inputs are not on CUDA"
    elif fused is None:
        choice, why = fallback, "Triton is not installed"
    else:
        choice, why = fallback, "the CUDA kernel does not support these inputs"
    if not torch.compiler.is_compiling():  # logging inside a compiled region would break its graph
        log_choice(setting, choice, why)
    return choice


__all__ = ["load_fused", "require_fused", "check_impl", "log_choice", "choose_auto"]
