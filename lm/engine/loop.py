"""The training loop every caller shares: lm.train (step budget, checkpoints), evals.quality_race (time
budget) and evals.throughput (a few timed steps).

    loop = TrainLoop(engine, sampler, schedule, micro_batch_size=8, grad_accum_steps=1)
    while not loop.done():
        result = loop.step()            # one lm.engine.train_step on the next global batch

The loop owns the position in the data and in the schedule (LoopState, which the trainer checkpoints):
batches are a pure function of the samples consumed (lm.data.WindowSampler), and the learning rate a pure
function of the updates applied and of the elapsed fraction of a time budget (lm.optim schedules).

The sampler serves whole sequences to each data-parallel index (engine.dp_rank of engine.dp_size); under
sequence parallelism every rank of an SP group draws the same sequences and keeps its own segment
(engine.local_segment). Samples are sequences: a step consumes micro x accum x DP of them, whatever SP is.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from lm.engine.step import StepResult, train_step


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken, skipped ones included (progress against max_steps)
    updates: int = 0  # optimizer updates applied (the step schedule's position)
    consumed: int = 0  # training sequences consumed by all data-parallel ranks together (not SP segments)
    elapsed: float = 0.0  # training seconds (the sum of step times)

    def to_dict(self) -> dict:
        return asdict(self)


class TrainLoop:
    def __init__(self, engine, sampler, schedule, *, micro_batch_size: int, grad_accum_steps: int = 1,
                 loss_chunk_tokens: int = 0, loss_impl: str = "auto", max_steps: Optional[int] = None,
                 time_budget_s: Optional[float] = None, sync_timing: bool = False, state: Optional[LoopState] = None):
        """sampler: anything with micro_batch(consumed, micro_index, dp_rank, dp_size, batch) -> (x, y).
        sync_timing: synchronise the device around every step, so step times are exact (benchmarks, budgets)."""
        self.engine, self.sampler, self.schedule = engine, sampler, schedule
        self.micro, self.accum, self.loss_chunk_tokens = micro_batch_size, grad_accum_steps, loss_chunk_tokens
        self.loss_impl = loss_impl
        self.max_steps, self.time_budget_s, self.sync_timing = max_steps, time_budget_s, sync_timing
        self.state = state or LoopState()

    @property
    def samples_per_step(self) -> int:
        """Sequences of one global batch (micro x accum x DP; SP ranks share their sequences)."""
        return self.micro * self.accum * self.engine.dp_size

    def tokens_per_step(self, seq_len: int) -> int:
        """Tokens one step trains on over the whole mesh, each counted once (throughput, MFU)."""
        return self.samples_per_step * seq_len

    def batches(self) -> list:
        """This rank's micro-batches of the next step: whole sequences of its DP index, cut to its segment."""
        s, e = self.state, self.engine
        return [tuple(e.local_segment(t) for t in self.sampler.micro_batch(s.consumed, m, e.dp_rank, e.dp_size, self.micro))
                for m in range(self.accum)]

    def time_fraction(self) -> float:
        return self.state.elapsed / self.time_budget_s if self.time_budget_s else 0.0

    def done(self) -> bool:
        s = self.state
        return ((self.max_steps is not None and s.step >= self.max_steps)
                or (self.time_budget_s is not None and s.elapsed >= self.time_budget_s))

    def lr(self) -> float:
        return self.schedule.lr(self.state.updates, self.time_fraction())

    def _sync(self) -> None:
        if self.sync_timing and self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    def step(self, stop: bool = False, codebook_stats: bool = False) -> StepResult:
        """One optimizer step on the next global batch; stop: this process asks every process to stop
        after it (StepResult.stop). The result carries lr and step_time_s."""
        s, e = self.state, self.engine
        lr = self.lr()
        self._sync()
        t0 = time.perf_counter()
        batches = self.batches()
        result = train_step(e, batches, lr=lr, loss_chunk_tokens=self.loss_chunk_tokens, loss_impl=self.loss_impl,
                            stop=stop, codebook_stats=codebook_stats)
        self._sync()
        dt = time.perf_counter() - t0
        s.step += 1
        s.consumed += self.samples_per_step
        s.elapsed += dt
        if not result.skipped or e.pipelined:  # pipelines apply their update before the loss is known
            s.updates += 1
        result.lr, result.step_time_s = lr, dt
        return result


class RandomTokens:
    """A sampler of uniformly random token windows (throughput measurements: speed does not depend on the
    text). Deterministic in (seed, samples consumed), like lm.data.WindowSampler."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def micro_batch(self, consumed: int, micro: int, rank: int, dp: int, batch: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + consumed + (micro * dp + rank) * batch)
        data = torch.randint(0, self.vocab_size, (batch, self.seq_len + 1), generator=g)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()
