"""The quality race: two recipes (LongVQ and its matched Transformer) trained on the same data for the same
training time, then scored on held-out text.

Training, per context and arm: the recipe at data.seq_len = context, batch = tokens_per_step // context
sequences (as `grad_accum` micro-batches), through lm.engine (the trainer's step and engine), on windows of
lm.data.WindowSampler(train split, context, seed): both arms see the same windows in the same order. One
untimed warm-up forward/backward first (compilation and autotuning are charged to neither arm; its gradients
and codebook statistics are dropped, nothing is updated). Then steps run until the arm's training time (the
sum of step times, each between device synchronisations, data loading included) reaches the budget, with the
learning rate on lm.optim.TimeSchedule (warmup + cosine over the elapsed fraction of the budget). A
non-finite loss ends the arm (`diverged_at_step`).

Evaluation, per arm, after training (eval mode, the engine's precision): bits per byte on the held-out split
in disjoint windows of the context (lm.engine.score), loss by position inside the window in buckets,
codebook health over the evaluation and the attention-mass split on held-out windows (LongVQ).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lm.config import RunConfig, dump_config
from lm.data import WindowSampler
from lm.engine import TrainLoop, build_engine, eval_mode, score, warmup_step, windows_nll
from lm.metrics import capture_attention_inputs
from lm.ops.vq_diagnostics import attention_mass_split, summarize_mass
from lm.optim import TimeSchedule
from lm.parallel.compile import eager_blocks


@dataclass
class RaceOptions:
    budget_minutes: float = 3.0  # training time per arm and context
    tokens_per_step: int = 65536
    grad_accum: int = 1
    warmup_frac: float = 0.05  # lr warmup, fraction of the budget
    warmup_steps: int = 1  # untimed kernel warm-up forward/backward passes
    max_steps: Optional[int] = None  # also stop an arm after N steps
    val_points: int = 10  # held-out evaluations during training
    log_every: int = 10  # codebook statistics every N steps
    mass_windows: int = 1  # held-out windows for the attention-mass split
    seed: int = 1234
    engine: str = "torch"


@dataclass
class ArmRecord:
    """What training one arm produced (plus `eval` after evaluate_arm)."""

    steps: int = 0
    log: dict = field(default_factory=lambda: {"step": [], "time_s": [], "loss": [], "lr": [], "step_s": []})
    val_curve: dict = field(default_factory=lambda: {"step": [], "time_s": [], "loss": []})
    codebook_log: dict = field(default_factory=lambda: {"step": []})


def arm_config(cfg: RunConfig, context: int, opts: RaceOptions) -> RunConfig:
    c = copy.deepcopy(cfg)
    batch = max(1, opts.tokens_per_step // context)
    accum = max(1, min(opts.grad_accum, batch))
    c.data.seq_len = context
    c.train.micro_batch_size = math.ceil(batch / accum)
    c.train.grad_accum_steps = accum
    c.train.seed = opts.seed
    c.validate()
    return c


def train_arm(cfg: RunConfig, context: int, train_tokens, val_windows: torch.Tensor, opts: RaceOptions,
              device: torch.device, on_step: Optional[Callable] = None, log: Callable = print):
    """Train one arm for the time budget. Returns (engine, record dict). on_step(step, scalars) sees every
    logged scalar (TensorBoard)."""
    c = arm_config(cfg, context, opts)
    engine = build_engine(c, opts.engine, device=device) if opts.engine == "torch" else build_engine(c, opts.engine)
    sampler = WindowSampler(train_tokens, context, opts.seed)
    micro, accum = c.train.micro_batch_size, c.train.grad_accum_steps
    budget = opts.budget_minutes * 60.0
    loop = TrainLoop(engine, sampler, TimeSchedule(c.optim, opts.warmup_frac), micro_batch_size=micro,
                     grad_accum_steps=accum, loss_chunk_tokens=c.train.loss_chunk_tokens, max_steps=opts.max_steps,
                     loss_impl=c.train.loss_impl, time_budget_s=budget, sync_timing=True)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    engine.train()
    t0 = time.perf_counter()
    for _ in range(opts.warmup_steps):  # compile / autotune; nothing is updated
        warmup_step(engine, [sampler.micro_batch(0, m, 0, 1, micro) for m in range(accum)],
                    loss_chunk_tokens=c.train.loss_chunk_tokens, loss_impl=c.train.loss_impl)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    warmup_s = time.perf_counter() - t0

    rec = ArmRecord()
    diverged = None
    val_every = budget / opts.val_points if opts.val_points > 0 else math.inf
    next_val, last_print = val_every, 0.0
    wall0 = time.perf_counter()
    batch = micro * accum
    while not loop.done():
        step = loop.state.step + 1
        result = loop.step(codebook_stats=(step - 1) % opts.log_every == 0)
        if result.skipped:
            diverged = loop.state.step
            log(f"  {c.model.arch} @ {context}: non-finite loss at step {diverged}; stopping this arm")
            break
        s = loop.state
        for key, value in (("step", s.step), ("time_s", s.elapsed), ("loss", result.loss), ("lr", result.lr),
                           ("step_s", result.step_time_s)):
            rec.log[key].append(value)
        scalars = {"train/loss": result.loss, "train/lr": result.lr}
        if result.codebook:
            rec.codebook_log["step"].append(s.step)
            for k, v in result.codebook.items():
                rec.codebook_log.setdefault(k, []).append(v)
                scalars[f"codebook/{k}"] = v
        if s.elapsed >= next_val or loop.done():
            next_val += val_every
            with eval_mode(engine.module), eager_blocks(engine.module):  # eval shapes must not recompile
                vl = windows_nll(engine.module, val_windows, batch, engine.device, engine.autocast).loss
            rec.val_curve["step"].append(s.step)
            rec.val_curve["time_s"].append(s.elapsed)
            rec.val_curve["loss"].append(vl)
            scalars["valid/loss"] = vl
        if on_step is not None:
            on_step(s.step, scalars)
        if s.elapsed - last_print >= budget / 10 or loop.done():
            last_print = s.elapsed
            log(f"  {c.model.arch} @ {context}: step {s.step}, {s.elapsed:.0f}/{budget:.0f} s, loss {result.loss:.4f}, "
                f"lr {result.lr:.2e}, {s.step * batch * context / s.elapsed:,.0f} tokens/s")
    s = loop.state
    tail = rec.log["loss"][-max(1, len(rec.log["loss"]) // 20):]
    record = {"steps": len(rec.log["step"]), "batch": batch, "micro_batch": micro, "grad_accum": accum,
              "tokens_seen": len(rec.log["step"]) * batch * context, "train_time_s": s.elapsed, "warmup_s": warmup_s,
              "wall_s": time.perf_counter() - wall0,
              "tokens_per_s": len(rec.log["step"]) * batch * context / s.elapsed if s.elapsed else None,
              "final_train_loss": float(np.mean(tail)) if tail else None, "diverged_at_step": diverged,
              "precision": engine.precision, "engine": opts.engine,
              "peak_mem_gib": torch.cuda.max_memory_allocated(engine.device) / 2**30 if engine.device.type == "cuda" else None,
              "log": rec.log, "val_curve": rec.val_curve, "codebook_log": rec.codebook_log}
    return engine, record


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


class CodeStats:
    """Forward hooks on every quantizer: code counts and quantisation error over an evaluation."""

    def __init__(self, model):
        self.layers: dict[int, dict] = {}
        self.handles = []
        for i, vq in model.named_quantizers():
            self.layers[i] = {"vq": vq, "counts": None, "err": 0.0, "norm": 0.0}
            self.handles.append(vq.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def hook(mod, inputs, outputs):
            k, codes = inputs[0], outputs[1]
            H, S = mod.n_heads, mod.codebook_size
            with torch.no_grad(), torch.autocast(k.device.type, enabled=False):
                kf = k.detach().float()
                quant = mod.codebook[torch.arange(H, device=k.device)[None, None], codes]
                counts = torch.zeros(H, S, dtype=torch.long, device=k.device).scatter_add_(
                    1, codes.reshape(-1, H).t(), torch.ones(H, codes.numel() // H, dtype=torch.long, device=k.device))
                d = self.layers[i]
                d["counts"] = counts if d["counts"] is None else d["counts"] + counts
                d["err"] += float((kf - quant).pow(2).sum())
                d["norm"] += float(kf.pow(2).sum())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def summary(self) -> list[dict]:
        out = []
        for i, d in sorted(self.layers.items()):
            vq, counts = d["vq"], d["counts"]
            if counts is None:
                continue
            c = counts.double().cpu()
            p = c / c.sum(-1, keepdim=True).clamp(min=1)
            ppl = (-(p * p.clamp(min=1e-30).log()).sum(-1)).exp()  # (H,)
            used = (c > 0).double().mean(-1)  # (H,)
            cc = vq.c_count.double().cpu()
            dead = (cc < vq.dead_code_threshold * cc.mean(-1, keepdim=True)).double().mean() if vq.dead_code_threshold > 0 else None
            out.append({"layer": i, "codebook_size": vq.codebook_size, "usage": float(used.mean()),
                        "usage_min_head": float(used.min()), "usage_per_head": used.tolist(),
                        "perplexity": float(ppl.mean()), "perplexity_per_head": ppl.tolist(),
                        "rel_error": math.sqrt(d["err"] / max(d["norm"], 1e-30)),
                        "dead_codes_ema": None if dead is None else float(dead),
                        "tokens": int(c[0].sum())})
        return out


def linear_edges(T: int, width: int) -> list[int]:
    return list(range(0, T, max(1, width))) + [T]


def log2_edges(T: int) -> list[int]:
    edges, e = [0], 1
    while e < T:
        edges.append(e)
        e *= 2
    return edges + [T]


def bucketize(pos_sum: np.ndarray, pos_cnt: np.ndarray, edges: list[int]) -> dict:
    """Mean loss (nats) per position bucket [edges[i], edges[i+1])."""
    loss, count = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        n = int(pos_cnt[a:b].sum())
        count.append(n)
        loss.append(float(pos_sum[a:b].sum() / n) if n else None)
    return {"edges": list(edges), "loss": loss, "count": count}


def long_context_summary(pc: dict, C: int) -> dict:
    """Does the loss keep falling beyond 2C? Loss of the first bucket at/after 2C against the last bucket."""
    edges, loss = pc["edges"], pc["loss"]
    late = [(a, l) for a, l in zip(edges[:-1], loss) if a >= 2 * C and l is not None]
    if len(late) < 2:
        return {"first_after_2C": late[0][1] if late else None, "last": late[-1][1] if late else None,
                "drop_after_2C": None, "falls_after_2C": None, "slope_per_doubling": None}
    first, last = late[0][1], late[-1][1]
    x = np.log2([a + (edges[edges.index(a) + 1] - a) / 2 for a, _ in late])
    slope = float(np.polyfit(x, [l for _, l in late], 1)[0])
    return {"first_after_2C": first, "last": last, "drop_after_2C": first - last, "falls_after_2C": bool(last < first),
            "slope_per_doubling": slope}


@torch.no_grad()
def attention_mass(model, window: torch.Tensor, device: torch.device, autocast=None) -> list[dict]:
    """Per LongVQ layer: softmax mass on own chunk / previous chunk / code cache for one batch of windows."""
    import contextlib

    with (autocast or contextlib.nullcontext)():
        captured = capture_attention_inputs(model, window.to(device))
    out = []
    for i, C, cap in captured:
        split = attention_mass_split(**cap, chunk_size=C)
        T = split["tokens"]
        late = summarize_mass(split, 2 * C)
        edges = linear_edges(T, C)
        out.append({"layer": i, "own": split["own"], "prev": split["prev"], "cache": split["cache"],
                    "entropy": split["entropy"], "entropy_flat": split["entropy_flat"],
                    "beyond_2C": late,
                    "cache_per_head_beyond_2C": summarize_mass(split, 2 * C, per_head=True)["cache"],
                    "cache_by_chunk_bucket": {"edges": edges, "cache": [
                        float(split["per_position"]["cache"][a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]}})
        del cap
    return out


def evaluate_arm(engine, cfg: RunConfig, context: int, eval_tokens: torch.Tensor, opts: RaceOptions, chunk: int,
                 split: str) -> dict:
    """Held-out bpb, loss by position, codebook health and attention mass of a trained arm."""
    model = engine.module
    batch = max(1, opts.tokens_per_step // context)
    t0 = time.perf_counter()
    with eval_mode(model), eager_blocks(model):
        stats = CodeStats(model)
        try:
            s = score(model, eval_tokens, mode="disjoint", context=context, batch_size=batch, device=engine.device,
                      autocast=engine.autocast, per_position=True)
        finally:
            stats.remove()
        n = s.tokens
        res = {"split": split, "tokens": n, "bytes": n, "windows": math.ceil(n / context),
               "nll_sum": s.nll_sum, "loss": s.loss, "bpb": s.loss / math.log(2), "protocol": "disjoint",
               "per_position": {"chunk": bucketize(s.pos_sum, s.pos_cnt, linear_edges(context, chunk)),
                                "log2": bucketize(s.pos_sum, s.pos_cnt, log2_edges(context)),
                                "fine": bucketize(s.pos_sum, s.pos_cnt, linear_edges(context, max(1, context // 128)))},
               "chunk_bucket_width": chunk}
        res["long_context"] = long_context_summary(res["per_position"]["chunk"], chunk)
        if cfg.model.arch == "longvq":
            res["codebook"] = stats.summary()
            k = min(opts.mass_windows, max(1, n // context))
            window = eval_tokens[: k * context].view(k, context) if n >= context else eval_tokens[:n][None]
            res["attention_mass"] = attention_mass(model, window, engine.device, engine.autocast)
    res["eval_s"] = time.perf_counter() - t0
    return res


def save_export(engine, cfg: RunConfig, context: int, folder: Path, source: str = "lm.bench.race") -> Path:
    """model.safetensors (fp32) + config.yaml: the export layout evals.perplexity / evals.generate load."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in engine.module.state_dict().items()}
    if cfg.model.tie_embeddings:
        state.pop("head.weight", None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"source": source, "format": "longvq-export-1"})
    run = copy.deepcopy(cfg)
    run.data.seq_len = context
    dump_config(run, folder / "config.yaml")
    return folder
