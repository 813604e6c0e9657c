"""Causal softmax attention for the Transformer baseline: flash-attn when installed, else PyTorch SDPA
with an explicitly chosen backend. The backend that actually ran is recorded in `last_backend`.

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

BACKENDS = ("auto", "flash_attn", "cudnn", "flash", "efficient", "math")
_failed: set = set()
last_backend: Optional[str] = None


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """Cached: a failed import rescans sys.path every time, which costs milliseconds per call."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def candidates(requested: str, q: Tensor) -> list[str]:
    if requested != "auto":
        return [requested]
    if q.is_cuda:
        order = (["flash_attn"] if flash_attn_available() and q.dtype in (torch.float16, torch.bfloat16) else [])
        return order + ["cudnn", "flash", "efficient", "math"]
    return ["flash", "math"]


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def _run(name: str, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    T, S = q.shape[2], k.shape[2]
    if name == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_sdpa_backend(name)]):
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if T == 1:
            return F.scaled_dot_product_attention(q, k, v)
        qpos = torch.arange(S - T, S, device=q.device)[:, None]
        mask = torch.arange(S, device=q.device)[None, :] <= qpos
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """Causal attention; the first backend of the preference list that runs is used and recorded."""
    global last_backend
    errors = []
    for name in candidates(backend, q):
        if (name, q.device.type, q.dtype) in _failed:
            continue
        try:
            out = _run(name, q, k, v)
        except (RuntimeError, ImportError) as exc:
            if backend != "auto":
                raise RuntimeError(f"attention backend {name!r} cannot run these inputs ({exc}); "
                                   "set model.transformer.attn_backend=auto") from exc
            _failed.add((name, q.device.type, q.dtype))
            errors.append(f"{name}: {str(exc).splitlines()[0]}")
            continue
        if last_backend != name and not torch.compiler.is_compiling():  # logging would break a compiled graph
            log.info("transformer attention backend: %s", name)
        last_backend = name
        return out
    raise RuntimeError("no attention backend could run: " + "; ".join(errors))
