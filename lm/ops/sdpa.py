"""Causal softmax attention for the Transformer baseline: FlashAttention when installed (flash-attn 4, the CuTe
DSL kernels, or flash-attn 2), else PyTorch SDPA with an explicitly chosen backend.

    attend = CausalAttention("auto")         # one per attention module; holds its own fallback record
    out = attend(q, k, v)                     # attend.last_backend: the backend that ran
    resolve_backend("auto", q, k, v)          # the backend a call would use, without running anything

q, k, v: (B, H, T, D) and (B, H, S, D) with S >= T (a KV cache holds S - T earlier tokens).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn4", "flash_attn", "cudnn", "flash", "efficient", "math")
_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """Cached: a failed import rescans sys.path every time, which costs milliseconds per call."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def flash_attn4_available() -> bool:
    """flash-attn 4 (package flash-attn-4, module flash_attn.cute) imports, and a Hopper-or-newer GPU is visible."""
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken CuTe DSL install raises more than ImportError
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def installed_flash_backends() -> list[str]:
    """The FlashAttention packages that can run here, fastest first (flash-attn 4, then flash-attn 2)."""
    return [name for name, ok in (("flash_attn4", flash_attn4_available()), ("flash_attn", flash_attn_available()))
            if ok]


def candidates(requested: str, q: Tensor) -> list[str]:
    """The backends tried, in order: the requested one, or auto's preference list for q's device and dtype."""
    if requested != "auto":
        return [requested]
    if q.is_cuda:
        order = installed_flash_backends() if q.dtype in _HALF else []
        return order + ["cudnn", "flash", "efficient", "math"]
    return ["flash", "math"]


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def _causal_mask(T: int, S: int, device) -> Optional[Tensor]:
    """None when SDPA's is_causal (T == S) or no mask (T == 1) expresses the rule; else the (T, S) keep-mask."""
    if T == S or T == 1:
        return None
    qpos = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= qpos


def supports(name: str, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether backend `name` can run these inputs, by the same checks SDPA's dispatcher makes (no kernel runs)."""
    if name == "math":
        return True
    if name == "flash_attn4":
        return flash_attn4_available() and q.is_cuda and q.dtype in _HALF and q.shape[-1] in (64, 96, 128)
    if name == "flash_attn":
        return flash_attn_available() and q.is_cuda and q.dtype in _HALF and q.shape[-1] <= 256
    if not q.is_cuda:
        return name == "flash"  # PyTorch's CPU flash kernel takes every floating dtype
    from torch.backends import cuda

    T, S = q.shape[2], k.shape[2]
    params = cuda.SDPAParams(q, k, v, _causal_mask(T, S, q.device), 0.0, T == S, False)
    check = {"cudnn": cuda.can_use_cudnn_attention, "flash": cuda.can_use_flash_attention,
             "efficient": cuda.can_use_efficient_attention}[name]
    return bool(check(params, False))


def resolve_backend(requested: str, q: Tensor, k: Optional[Tensor] = None, v: Optional[Tensor] = None,
                    skip: frozenset | set = frozenset()) -> str:
    """The backend `CausalAttention(requested)` would run for inputs like q, k, v (k, v default to q): the
    requested one, or auto's first candidate that can run them. Pure: runs no attention, changes nothing.
    skip: (backend, device type, dtype) entries to pass over (a CausalAttention's record of failures)."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {BACKENDS}")
    k = q if k is None else k
    v = k if v is None else v
    for name in candidates(requested, q):
        if (name, q.device.type, q.dtype) in skip:
            continue
        if requested != "auto" or supports(name, q, k, v):
            return name
    return "math"


@torch.compiler.disable  # a JIT-compiled CuTe kernel: compiled graphs call it as an opaque function
def _run_flash_attn4(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """flash-attn 4 in (B, T, H, D) layout; causal masks align to the last query (the KV-cache rule used here)."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _run(name: str, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if name == "flash_attn4":
        return _run_flash_attn4(q, k, v)
    if name == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel

    T, S = q.shape[2], k.shape[2]
    with sdpa_kernel([_sdpa_backend(name)]):
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(T, S, q.device))


class CausalAttention:
    """Causal attention with a backend preference, for one module. With "auto", the first backend of the
    preference list that runs is used; a backend that raised for a (device type, dtype) is recorded in
    `failed` and not tried again by this object. `last_backend` names the backend of the latest call."""

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
        self.backend = backend
        self.failed: set[tuple[str, str, torch.dtype]] = set()
        self.last_backend: Optional[str] = None

    def resolve(self, q: Tensor, k: Optional[Tensor] = None, v: Optional[Tensor] = None) -> str:
        """The backend a call with these inputs would use (pure)."""
        return resolve_backend(self.backend, q, k, v, skip=self.failed)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        errors = []
        for name in candidates(self.backend, q):
            if (name, q.device.type, q.dtype) in self.failed:
                continue
            try:
                out = _run(name, q, k, v)
            except (RuntimeError, ImportError) as exc:
                if self.backend != "auto":
                    raise RuntimeError(f"attention backend {name!r} cannot run these inputs ({exc}); "
                                       "set model.transformer.attn_backend=auto") from exc
                self.failed.add((name, q.device.type, q.dtype))
                errors.append(f"{name}: {str(exc).splitlines()[0]}")
                continue
            if self.last_backend != name and not torch.compiler.is_compiling():  # logging would break a graph
                log.debug("transformer attention backend: %s", name)
            self.last_backend = name
            return out
        raise RuntimeError("no attention backend could run: " + "; ".join(errors))
