"""The optimizer (AdamW that can skip an update), its parameter groups (no weight decay for norms, biases,
embeddings, EMA and gate scalars), and the learning-rate schedules (warmup + cosine over optimizer updates,
or over the elapsed fraction of a time budget). Codebooks are buffers, so they never reach the optimizer.

The learning rate is a pure function of the schedule position, which the training loop keeps and
checkpoints; no scheduler object holds state of its own.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from lm.config import OptimConfig


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose update can be suppressed: while `skip_updates` is true, `step()` changes
    neither the parameters nor the optimizer state (moments, step counters). Engines that wrap it (DeepSpeed
    ZeRO, the bf16 master-weight copy) still run their own bookkeeping around the call, which then copies
    the unchanged master weights back: a skipped step leaves every parameter bit-identical.

    The fused implementation can also skip on the device: with `found_inf` set to a 0-dim float tensor, the
    update is queued as usual and does nothing where the tensor holds 1 (torch's fused kernel reads it; the
    step counters are restored), so the host may queue the update before it knows whether to skip."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_updates = False
        self.found_inf = None  # read by torch's fused AdamW: 1 = leave everything unchanged

    @property
    def skips_on_device(self) -> bool:
        """Whether `found_inf` works: every group runs the fused implementation (a loaded optimizer state keeps
        the flag it was saved with)."""
        return all(g.get("fused") for g in self.param_groups)

    @contextlib.contextmanager
    def skipping(self, skip):
        """Inside the block `step()` skips as `skip` says: a bool (`skip_updates`), or a 0-dim bool tensor decided
        on the device (`found_inf`, fused only); both are cleared afterwards."""
        if isinstance(skip, torch.Tensor):
            self.found_inf = skip.float()
        else:
            self.skip_updates = bool(skip)
        try:
            yield
        finally:
            self.skip_updates = False
            self.found_inf = None

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_updates:
            return None
        if self.found_inf is not None and not self.skips_on_device:
            raise ValueError("AdamW.found_inf needs the fused implementation (build_optimizer(..., fused=True))")
        return super().step(closure)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = p.ndim == 2 and ("embed" not in name) and (".ema." not in name) and ("qk_" not in name) and ("rel_bias" not in name)
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: OptimConfig, fused: bool = False) -> AdamW:
    """AdamW over `param_groups(model)` with the config's betas, eps and weight decay (lr is set per step);
    fused: torch's fused implementation (CPU and CUDA), which can skip an update on the device."""
    return AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                 eps=optim.eps, **({"fused": True} if fused else {}))


def lr_lambda(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (linear warmup, then cosine to min_lr_ratio)."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StepSchedule:
    """Warmup + cosine over optimizer updates: lr(updates) = optim.lr * lr_lambda(updates, optim, max_steps)."""

    def __init__(self, optim: OptimConfig, max_steps: int):
        self.optim, self.max_steps = optim, max_steps

    def lr(self, updates: int, time_fraction: float = 0.0) -> float:
        return self.optim.lr * lr_lambda(updates, self.optim, self.max_steps)

    def describe(self) -> str:
        o = self.optim
        return (f"step-based: lr {o.lr:g}, linear warmup {o.warmup_steps} updates, cosine to {o.min_lr_ratio:g} x lr "
                f"at update {self.max_steps}")


class TimeSchedule:
    """Warmup + cosine over the elapsed fraction f of a time budget: lr_lambda evaluated at round(f * 10000)
    of 10,000 virtual steps (warmup = warmup_fraction of them). A time-based cosine ends its decay exactly when
    the budget ends, whatever the speed of the model it drives."""

    RESOLUTION = 10_000

    def __init__(self, optim: OptimConfig, warmup_fraction: float):
        import dataclasses

        self.optim, self.warmup_fraction = optim, warmup_fraction
        self._virtual = dataclasses.replace(optim, warmup_steps=int(round(warmup_fraction * self.RESOLUTION)))

    def lr(self, updates: int, time_fraction: float = 0.0) -> float:
        n = self.RESOLUTION
        return self.optim.lr * lr_lambda(min(n, max(0, int(time_fraction * n))), self._virtual, n)

    def describe(self) -> str:
        return (f"time-based: lr {self.optim.lr:g} x lm.optim.lr_lambda(round(f * {self.RESOLUTION}), warmup "
                f"{self.warmup_fraction:g} of the budget, {self.RESOLUTION} virtual steps), f = elapsed training time / budget")
