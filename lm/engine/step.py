"""One optimizer step, written once against the engine interface (lm.engine.engines).

    result = train_step(engine, batches, lr=..., loss_chunk_tokens=0, loss_impl="auto", stop=False)

For each micro-batch (x, y): forward (LM head + cross-entropy, chunked when asked), loss = CE + commitment
loss, backward (gradients accumulate). Then one collective sums, over every process, the CE and
commitment sums, the micro-batch count, the number of non-finite losses and the stop requests; that is the
step's only host synchronisation besides what the engine's optimizer does. If any process saw a non-finite
loss the step is skipped everywhere: no parameter, optimizer state or codebook changes, and the schedule
does not advance. With the fused optimizer (`engine.skips_on_device`) the update is queued before the host
reads the sums and skips on the device, so the host's share of the optimizer step runs while the GPU still
finishes the backward. Otherwise the codebook statistics are summed over the replicas of each layer (data
parallel x sequence parallel) and every codebook takes its EMA k-means update, and the engine applies the
gradients at `lr`.

Under sequence parallelism each micro-batch is this rank's segment of its sequences (equal segments): the
reported loss, the mean of every rank's segment mean, is the mean over the whole sequences, and the
engine's gradient average over the DP x SP replicas is the gradient of that mean.

Pipelines run DeepSpeed's own schedule (engine.train_batch); they report the loss after the update, so
they cannot skip (the config refuses on_nonfinite=skip with pipelines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as tdist

from lm.model.quantizer import apply_updates
from lm.parallel.dist import all_reduce_codebook_stats


@dataclass
class StepResult:
    loss: Optional[float]  # mean CE over the step's micro-batches and processes (None when skipped)
    aux_loss: Optional[float]  # mean commitment loss (weighted, as added to the loss)
    skipped: bool  # a non-finite loss somewhere: nothing was updated
    nonfinite: int  # non-finite micro-batches over all processes
    stop: bool  # some process asked to stop after this step (preemption)
    grad_norm: object = None  # float, 0-dim tensor or None (read it only when logging: it may synchronise)
    codebook: dict = field(default_factory=dict)  # per-layer statistics of this step, when asked for

    def grad_norm_value(self) -> Optional[float]:
        return None if self.grad_norm is None else float(self.grad_norm)


def _sum_over_world(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t)
    return t


def codebook_metrics(quantizers, gather: bool) -> dict:
    """Per-layer codebook health ("layer3/usage", ...) from this step's summed statistics (synchronises).
    gather: collect the layers of every process (pipelines: layers live on other stages)."""
    metrics = [(i, vq.step_metric_tensors()) for i, vq in quantizers]
    values = torch.stack([torch.stack([v.float() for v in m.values()]) for _, m in metrics]).tolist() if metrics else []
    local = {f"layer{i}/{k}": v for (i, m), row in zip(metrics, values) for k, v in zip(m, row)}  # one host read
    if gather and tdist.is_initialized() and tdist.get_world_size() > 1:
        parts = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, local)
        local = {k: v for part in parts for k, v in part.items()}
    return local


def train_step(engine, batches: list, *, lr: float, loss_chunk_tokens: int = 0, loss_impl: str = "auto",
               stop: bool = False, codebook_stats: bool = False) -> StepResult:
    """One optimizer step over `batches` [(x, y), ...] (this process's micro-batches, on any device).
    codebook_stats: also return the per-layer codebook statistics of the step (costs a synchronisation)."""
    device = engine.device
    quantizers = engine.quantizers
    vqs = [vq for _, vq in quantizers]
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # ce, aux, micro-batches, non-finite, stop
    grad_norm = None
    if engine.pipelined:
        grad_norm = engine.train_batch([(x.to(device), y.to(device)) for x, y in batches], lr)
        ce, aux, count = engine.loss_fn.pop()  # non-zero on the last stage only
        totals += torch.tensor([ce, aux, count, float(not math.isfinite(ce + aux)), 0.0],
                               dtype=torch.float64, device=device)
    else:
        for x, y in batches:
            out = engine.forward(x.to(device, non_blocking=True), y.to(device, non_blocking=True), loss_chunk_tokens,
                                 loss_impl)
            loss = out.loss + out.aux_loss
            engine.backward(loss)  # a non-finite loss poisons only gradients that the skip below discards
            detached = torch.stack([out.loss.detach().double(), out.aux_loss.detach().double()])
            finite = torch.isfinite(detached).all()
            totals[:2] += torch.where(finite, detached, torch.zeros_like(detached))
            totals[2] += 1
            totals[3] += (~finite).double()
    totals[4] = float(stop)
    totals = _sum_over_world(totals)
    on_device = engine.skips_on_device
    if on_device:  # queue the update before reading the totals: its host work overlaps the backward's device time
        grad_norm = engine.step(lr, skip=(totals[3] > 0) | (totals[2] == 0))
    ce_sum, aux_sum, count, bad, stops = totals.tolist()
    skipped = bad > 0 or count == 0
    if skipped:
        grad_norm = None
        for vq in vqs:  # statistics of a skipped step are dropped with it
            vq.reset_stats()
    all_reduce_codebook_stats(vqs, engine.dp_group)
    if not engine.pipelined and not on_device:
        grad_norm = engine.step(lr, skip=skipped)
    stats = {}
    if not skipped:
        if codebook_stats and (vqs or engine.pipelined):
            stats = codebook_metrics(quantizers, gather=engine.pipelined)
        apply_updates(vqs)
    return StepResult(loss=None if skipped else ce_sum / count, aux_loss=None if skipped else aux_sum / count,
                      skipped=skipped, nonfinite=int(bad), stop=stops > 0, grad_norm=grad_norm, codebook=stats)


def warmup_step(engine, batches: list, *, loss_chunk_tokens: int = 0, loss_impl: str = "auto") -> None:
    """Forward and backward over `batches` (give as many as the engine accumulates) with no update: kernels
    compile and autotune, then the gradients and the codebook statistics are dropped. Not collective."""
    for x, y in batches:
        out = engine.forward(x.to(engine.device), y.to(engine.device), loss_chunk_tokens, loss_impl)
        engine.backward(out.loss + out.aux_loss)
    engine.step(0.0, skip=True)
    for _, vq in engine.quantizers:
        vq.reset_stats()
