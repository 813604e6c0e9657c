"""Held-out scoring, one routine for every caller (lm.train's in-training evaluation, evals.perplexity,
evals.quality_race): summed negative log-likelihood in nats over a 1-D token stream.

    result = score(model, tokens, mode="disjoint", context=N, batch_size=B, device=dev, per_position=True)

The stream's first token has no prediction, so the scored span is tokens[1:]: every target exactly once,
in every mode.
  disjoint  consecutive non-overlapping windows of `context` tokens (the last may be shorter); each target
            is scored with the context inside its window. per_position=True also sums the NLL by position
            inside the window (loss against position, long-context diagnostics).
  sliding   windows of `context` tokens advanced by `stride`; a window scores only the targets no earlier
            window scored (each sees at least context - stride tokens).
  carry     segments of `context` tokens with the model state carried across them (LongVQ: EMA state and
            VQ cache, unbounded context at constant memory; Transformer: a growing KV cache).
`autocast` is the context every forward runs under (Engine.autocast(); bf16-mixed models score as they train).

Sequence parallelism (`sp`, an lm.parallel.sequence.SequenceContext; disjoint mode): every window is split
into the group's segments, each rank runs its segment with the earlier segments' state from the other ranks
(model(x, sp=sp)), and the sums are added over the group, so a context too long for one GPU is scored as it
is trained. Collective: every rank of the group calls it with the same tokens and gets the same Score. A
last, shorter window is padded to the full context at its end and only its real targets are scored (the
model is causal: padding after a position does not change its prediction).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("disjoint", "sliding", "carry")


@dataclass
class Score:
    nll_sum: float  # nats, summed over the scored targets
    tokens: int  # targets scored (= len(tokens) - 1)
    pos_sum: Optional[np.ndarray] = None  # disjoint + per_position: NLL summed by position in the window
    pos_cnt: Optional[np.ndarray] = None  # ... and the number of targets at each position

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL (float32 at least) of logits (..., V) against targets (...)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(targets.shape)


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True)


@torch.no_grad()
def score(model, tokens: torch.Tensor, *, mode: str = "disjoint", context: int, stride: Optional[int] = None,
          batch_size: int = 8, device=None, autocast: Callable = contextlib.nullcontext,
          per_position: bool = False, progress: bool = False, sp=None) -> Score:
    """NLL of `tokens` (1-D int64, at least 2) under `model` (called as model(x) -> .logits). See the module
    docstring for the modes and `sp`; raises ValueError on inputs that would score nothing."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if tokens.dim() != 1 or len(tokens) < 2:
        raise ValueError(f"need a 1-D stream of at least 2 tokens to score, got shape {tuple(tokens.shape)}")
    if context < 1:
        raise ValueError(f"context length must be >= 1, got {context}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    device = device if device is not None else next(model.parameters()).device
    n = len(tokens) - 1
    with _bar(n, progress, mode) as bar:
        def done(k):
            if bar is not None:
                bar.update(k)

        if sp is not None:
            if mode != "disjoint":
                raise ValueError(f"sequence-parallel scoring is defined for mode=disjoint only, got mode={mode}")
            return _disjoint_sp(model, tokens, context, batch_size, device, autocast, per_position, done, sp)
        if mode == "disjoint":
            return _disjoint(model, tokens, context, batch_size, device, autocast, per_position, done)
        if per_position:
            raise ValueError("per_position scoring is defined for mode=disjoint only")
        if mode == "sliding":
            stride = stride or max(1, context // 2)
            if not 1 <= stride <= context:
                raise ValueError(f"stride must be in [1, context={context}], got {stride}")
            return _sliding(model, tokens, context, stride, device, autocast, done)
        return _carry(model, tokens, context, device, autocast, done)


def _disjoint(model, tokens, context, batch_size, device, autocast, per_position, done) -> Score:
    n = len(tokens) - 1
    starts = list(range(0, n, context))
    full = [s for s in starts if s + context <= n]
    total = 0.0
    pos_sum = np.zeros(context) if per_position else None
    pos_cnt = np.zeros(context, dtype=np.int64) if per_position else None

    def run(x, y):
        nonlocal total
        with autocast():
            logits = model(x.to(device)).logits
        nll = token_nll(logits, y.to(device)).double()
        total += float(nll.sum())
        if per_position:
            L = y.shape[1]
            pos_sum[:L] += nll.sum(0).cpu().numpy()
            pos_cnt[:L] += y.shape[0]
        done(y.numel())

    for i in range(0, len(full), batch_size):
        group = full[i: i + batch_size]
        run(torch.stack([tokens[s: s + context] for s in group]), torch.stack([tokens[s + 1: s + context + 1] for s in group]))
    for s in starts[len(full):]:  # the last, shorter window
        run(tokens[s:n][None], tokens[s + 1:][None])
    return Score(total, n, pos_sum, pos_cnt)


def _disjoint_sp(model, tokens, context, batch_size, device, autocast, per_position, done, sp) -> Score:
    import torch.distributed as dist

    from lm.parallel.sequence import segment

    if context % sp.size:
        raise ValueError(f"context {context} is not divisible into {sp.size} sequence-parallel segments")
    n = len(tokens) - 1
    L = context // sp.size
    starts = list(range(0, n, context))
    padded = torch.cat([tokens, tokens.new_zeros(starts[-1] + context + 1 - len(tokens))])  # the last window, full length
    sums = torch.zeros(1 + (2 * L if per_position else 0), dtype=torch.float64, device=device)  # total, pos sums, counts

    for i in range(0, len(starts), batch_size):
        group = starts[i: i + batch_size]
        x = segment(torch.stack([padded[s: s + context] for s in group]), sp.rank, sp.size)
        y = segment(torch.stack([padded[s + 1: s + context + 1] for s in group]), sp.rank, sp.size)
        real = segment(torch.stack([torch.arange(s, s + context) < n for s in group]), sp.rank, sp.size).to(device)
        with autocast():
            logits = model(x.to(device), sp=sp).logits
        nll = torch.where(real, token_nll(logits, y.to(device)).double(), 0.0)
        sums[0] += nll.sum()
        if per_position:
            sums[1: 1 + L] += nll.sum(0)
            sums[1 + L:] += real.sum(0)
        done(sum(min(context, n - s) for s in group))
    parts = [torch.zeros_like(sums) for _ in range(sp.size)]
    dist.all_gather(parts, sums, group=sp.group)  # in segment order: rank r holds positions [r L, (r + 1) L)
    total = float(sum(float(p[0]) for p in parts))
    if not per_position:
        return Score(total, n)
    pos_sum = torch.cat([p[1: 1 + L] for p in parts]).cpu().numpy()
    pos_cnt = torch.cat([p[1 + L:] for p in parts]).cpu().numpy().astype(np.int64)
    return Score(total, n, pos_sum, pos_cnt)


def _sliding(model, tokens, context, stride, device, autocast, done) -> Score:
    n = len(tokens) - 1
    total, scored_to = 0.0, 0  # targets [0, scored_to) are done (target t predicts tokens[t + 1])
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        with autocast():
            logits = model(tokens[begin:end][None].to(device)).logits
        first = scored_to - begin  # only the targets no earlier window scored
        total += float(token_nll(logits[:, first:], tokens[scored_to + 1:end + 1][None].to(device)).double().sum())
        done(end - scored_to)
        scored_to = end
        if end == n:
            break
    return Score(total, n)


def _carry(model, tokens, segment, device, autocast, done) -> Score:
    n = len(tokens) - 1
    total, state = 0.0, None
    for s in range(0, n, segment):
        e = min(s + segment, n)
        with autocast():
            out = model(tokens[s:e][None].to(device), state=state, return_state=True)
        state = out.state
        total += float(token_nll(out.logits, tokens[s + 1:e + 1][None].to(device)).double().sum())
        done(e - s)
    return Score(total, n)


@torch.no_grad()
def windows_nll(model, windows: torch.Tensor, batch_size: int, device=None,
                autocast: Callable = contextlib.nullcontext) -> Score:
    """NLL of separate sequences: windows (N, L + 1), each scored on its own (targets windows[:, 1:])."""
    if windows.dim() != 2 or windows.shape[1] < 2 or len(windows) == 0:
        raise ValueError(f"windows must be (N >= 1, L + 1 >= 2) token ids, got shape {tuple(windows.shape)}")
    device = device if device is not None else next(model.parameters()).device
    total = 0.0
    for i in range(0, len(windows), batch_size):
        w = windows[i: i + batch_size].to(device)
        with autocast():
            logits = model(w[:, :-1]).logits
        total += float(token_nll(logits, w[:, 1:]).double().sum())
    return Score(total, windows.shape[0] * (windows.shape[1] - 1))


@contextlib.contextmanager
def eval_mode(model):
    """Inside: model.eval(); the previous mode comes back afterwards."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
