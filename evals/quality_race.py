"""Quality at equal compute: LongVQ against a matched Transformer, same data, same wall-clock budget.

    python -m evals.quality_race [--preset 40m|tiny] [--contexts 4096 16384] [--budget-minutes M]
        [--arch longvq transformer] [--out-dir evals/results] [--tag NAME] [--set ARCH.key=value]
        [--optim [ARCH.]key=value] [--tokens-per-step N] [--grad-accum K] [--eval-tokens N]
        [--eval-split test] [--seed S] [--device auto] [--tensorboard]
    python -m evals.quality_race --merge A.json B.json[:ARCH@CONTEXT,...] --tag NAME [--out-dir DIR]   # one report

Plain PyTorch on one device, no DeepSpeed (never imported: the GPU box lacks it). Issue 7; docs/quality.md.

Models (presets, edited per arm with `--set ARCH.key.path=value`, ARCH = longvq | transformer | all):
  40m   both: 12 layers, d_model 512, vocab 256 (bytes), tied embeddings.
        LongVQ: chunk C = 512, codebook S = 512, 8 heads, z_dim 512 (q/k head dim 64), hidden 1024 (v head
        dim 128), EMA dim 16, FFN 1024: 41,560,672 parameters. Transformer: 8 heads x 64, RoPE, SwiGLU FFN
        1536: 41,038,336 parameters. Ratio 1.013. Head dims 64/128 and C a multiple of 64: the fused kernel runs.
        LongVQ options (measured on the H200, docs/quality.md): residual=add, local_raw_keys, query_norm,
        dead_code_reseed=batch; peak lr 3e-3 for LongVQ, 1e-3 for the Transformer (both from a sweep).
  tiny  CPU smoke test (the throughput benchmark's tiny preset): 2 layers, d_model 64, LongVQ C = S = 16,
        2 heads; contexts 64 and 128.
Both counts and their ratio are printed; the run stops with exit code 2 when they differ by more than
--param-tolerance (10 %).

Data: the built-in offline corpus (this Python's standard library, byte level, files split into
train/valid/test by a hash of their path), `lm.data.load_stream(DataConfig(dataset="stdlib"))`. Training
batches come from `WindowSampler(train, context, seed)`: both arms see the same windows in the same order.

Training, per context and arm: AdamW (peak lr from the preset, or 1e-3; --optim [ARCH.]key=value; fused on
CUDA; the trainer's parameter groups: no decay for norms,
biases, embeddings, EMA, q/k affine and the relative bias), bf16 autocast on CUDA (fp32 weights), fp32 on
CPU, gradient clipping, `model.apply_codebook_updates()` after every optimizer step. One untimed warm-up
forward/backward first (gradients and codebook statistics discarded, nothing updated) so kernel
compilation and autotuning are charged to neither arm. Then steps run until the arm's training time
reaches the budget. Training time is the sum of the step times, each measured between device
synchronisations (data loading included; held-out evaluations during training excluded).

Learning-rate schedule: time-based. The multiplier at a step is `lm.optim.lr_lambda` evaluated at the
elapsed fraction of the budget, mapped onto 10,000 virtual steps (warmup = --warmup-frac of the budget,
then cosine to min_lr_ratio at the end of the budget). Chosen over "estimate the step count from the
first steps' speed" because the arms run at different speeds and the first steps are not representative:
a time-based cosine ends its decay exactly when the budget ends, for either arm, at any speed.

Evaluation, per arm, after training (eval mode, autocast as in training):
  bits per byte   held-out split (--eval-split, default test; the first --eval-tokens tokens, default all)
                  cut into disjoint windows of the training context, each token scored with the context
                  inside its window (the `disjoint` protocol of evals/perplexity.py; the last, shorter
                  window included). Byte level, so bpb = NLL / ln 2 / tokens.
  per position    mean loss by position inside the window, in buckets: `chunk` (width C of the LongVQ
                  arm, so buckets >= 2C are where only the code cache reaches back), `log2` ([0,1), [1,2),
                  [2,4), ...) and `fine` (128 buckets per window, for the plot).
  codebooks       (LongVQ) per layer over the whole evaluation: fraction of codes used (per head, mean and
                  min over heads), code perplexity exp(H(p)) (mean over heads; max S), relative
                  quantisation error ||k - c_z|| / ||k||, and the dead-code fraction of the EMA counts.
  attention mass  (LongVQ) per layer on the first --mass-windows held-out windows: share of softmax mass
                  on the own chunk, the previous chunk and the code cache (lm.ops.vq_diagnostics), over
                  all queries and over queries at positions >= 2C (those that have a cache); and the mean
                  entropy of each query's attention over its slots against flat attention (q.k = 0) of
                  the same query: the mass split alone cannot tell flat attention from sharp attention
                  whose targets are spread evenly over the window, the entropy can.
During training: train loss every step (vs step and vs time), held-out loss on the first --val-tokens of
the valid split at --val-points evenly spaced times, LongVQ codebook statistics every --log-every steps.

Outputs (rewritten after every arm, so a run cut short keeps its finished arms): OUT_DIR/quality_TAG.json
(everything: command, date, device, budget, parameter counts, configs, curves, evaluations, summary),
quality_TAG.png (loss vs step, loss vs time, loss vs position, code usage vs step; a row per context) and
quality_TAG.md (the report, with the issue's targets marked met / missed). --tensorboard also writes
TensorBoard scalars under OUT_DIR/tb_TAG/CONTEXT_ARCH; --save-dir exports the trained models (fp32
safetensors + config.yaml) for `python -m evals.perplexity --checkpoint DIR` (e.g. --mode carry).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from evals import throughput as tp
from evals.common import pick_device
from lm.config import ConfigError, DataConfig, ModelConfig, OptimConfig, from_dict, to_dict
from lm.data import WindowSampler, load_stream
from lm.metrics import capture_attention_inputs
from lm.model import build_model
from lm.parallel.compile import eager_blocks, maybe_compile, set_tf32
from lm.ops.vq_diagnostics import attention_mass_split, summarize_mass
from lm.optim import lr_lambda, param_groups

ARCHS = tp.ARCHS
SCHEDULE_RESOLUTION = 10_000
SCHEDULE = ("time-based: lm.optim.lr_lambda(round(f * 10000), warmup_steps = warmup_frac * 10000, max_steps = 10000), "
            "f = elapsed training time / budget")

PRESETS: dict[str, dict] = {
    # The models are the throughput benchmark's presets (evals/throughput.py), so `python -m evals.throughput
    # --preset 40m` times and profiles exactly what the race trains.
    "40m": {**copy.deepcopy(tp.PRESETS["40m"]),
            # Per-arm peak learning rates from the H200 sweeps (docs/quality.md, 2026-11-29; 1.5 min budget,
            # 4K / 16K test bpb): LongVQ 1e-3 1.57 / -, 2e-3 1.50 / 1.80, 3e-3 1.44 / 1.72, 5e-3 - / 1.67;
            # Transformer 5e-4 - / 1.60, 1e-3 0.86 / 1.64, 2e-3 0.91 / 1.87. --optim overrides them.
            "optim": {"longvq": {"lr": 3e-3}, "transformer": {"lr": 1e-3}}},
    "tiny": copy.deepcopy(tp.PRESETS["tiny"]),
}
PRESET_DEFAULTS = {
    "40m": {"contexts": [4096, 16384], "tokens_per_step": 65536},
    "tiny": {"contexts": [64, 128], "tokens_per_step": 512},
}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def time_lr_multiplier(frac: float, optim: OptimConfig, warmup_frac: float) -> float:
    """lr multiplier at elapsed fraction `frac` of the budget (lm.optim.lr_lambda over virtual steps)."""
    n = SCHEDULE_RESOLUTION
    o = dataclasses.replace(optim, warmup_steps=int(round(warmup_frac * n)))
    return lr_lambda(min(n, max(0, int(frac * n))), o, n)


def optim_configs(items: list[str], defaults: Optional[dict] = None) -> dict[str, OptimConfig]:
    """{arch: OptimConfig} from a preset's per-arm defaults ({arch: {key: value}}) and "[ARCH.]key=value"
    items on top (no ARCH = both arms)."""
    trees: dict[str, dict] = {a: dict((defaults or {}).get(a, {})) for a in ARCHS}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--optim {item!r} must look like [ARCH.]key=value, e.g. lr=1e-3 or longvq.lr=2e-3")
        key, raw = item.split("=", 1)
        target, _, leaf = key.rpartition(".")
        if target not in ("",) + ARCHS + ("all",):
            raise ConfigError(f"--optim {item!r}: {target!r} is not longvq, transformer or all")
        for arch in (ARCHS if target in ("", "all") else (target,)):
            trees[arch][leaf] = yaml.safe_load(raw)
    return {a: from_dict(OptimConfig, t) for a, t in trees.items()}


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


def _clean(obj):
    """JSON-safe: tensors to lists, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if torch.is_tensor(obj):
        return _clean(obj.tolist())
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _corpus_info(data_cfg: DataConfig) -> dict:
    info = {"dataset": data_cfg.dataset, "python": platform.python_version()}
    try:
        from lm.data.streams import _stdlib_cache

        folder = _stdlib_cache(Path(os.path.expanduser(data_cfg.cache_dir)))
        meta = json.loads((folder / "meta.json").read_text())
        info.update(cache=folder.name, files=meta.get("files"), bytes=meta.get("bytes"), sha256=meta.get("sha256"))
    except Exception as exc:  # noqa: BLE001 - provenance only
        info["error"] = str(exc)
    return info


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


@torch.no_grad()
def heldout_nll(model, tokens: torch.Tensor, context: int, batch_size: int, device: torch.device):
    """Disjoint windows of `context` over a 1-D token tensor: (NLL sum in nats, per-position NLL sums and
    counts as float64/int64 numpy arrays of length `context`). The same totals as score_disjoint."""
    n_targets = len(tokens) - 1
    starts = list(range(0, n_targets, context))
    full = [s for s in starts if s + context <= n_targets]
    pos_sum, pos_cnt = np.zeros(context), np.zeros(context, dtype=np.int64)
    total = 0.0

    def score(x, y):
        nonlocal total
        with tp._autocast(device):
            logits = model(x.to(device)).logits
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                              reduction="none").view(y.shape).double()
        L = y.shape[1]
        pos_sum[:L] += nll.sum(0).cpu().numpy()
        pos_cnt[:L] += y.shape[0]
        total += float(nll.sum())

    for i in range(0, len(full), batch_size):
        group = full[i: i + batch_size]
        score(torch.stack([tokens[s: s + context] for s in group]), torch.stack([tokens[s + 1: s + context + 1] for s in group]))
    for s in starts[len(full):]:
        score(tokens[s:n_targets][None], tokens[s + 1:][None])
    return total, pos_sum, pos_cnt


@torch.no_grad()
def attention_mass(model, window: torch.Tensor, device: torch.device) -> list[dict]:
    """Per LongVQ layer: softmax mass on own chunk / previous chunk / code cache for one batch of windows."""
    with tp._autocast(device):
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


def evaluate_arm(model, cfg: ModelConfig, context: int, eval_tokens: torch.Tensor, args, device, chunk: int) -> dict:
    model.eval()
    batch = max(1, args.tokens_per_step // context)
    stats = CodeStats(model)
    t0 = time.perf_counter()
    try:
        total, pos_sum, pos_cnt = heldout_nll(model, eval_tokens, context, batch, device)
    finally:
        stats.remove()
    n = len(eval_tokens) - 1
    res = {"split": args.eval_split, "tokens": n, "bytes": n, "windows": math.ceil(n / context),
           "nll_sum": total, "loss": total / n, "bpb": total / math.log(2) / n, "protocol": "disjoint",
           "per_position": {"chunk": bucketize(pos_sum, pos_cnt, linear_edges(context, chunk)),
                            "log2": bucketize(pos_sum, pos_cnt, log2_edges(context)),
                            "fine": bucketize(pos_sum, pos_cnt, linear_edges(context, max(1, context // 128)))},
           "chunk_bucket_width": chunk}
    pc = res["per_position"]["chunk"]
    res["long_context"] = long_context_summary(pc, chunk)
    if cfg.arch == "longvq":
        res["codebook"] = stats.summary()
        k = min(args.mass_windows, max(1, n // context))
        if n >= context:
            window = eval_tokens[: k * context].view(k, context)
        else:
            window = eval_tokens[:n][None]
        res["attention_mass"] = attention_mass(model, window, device)
    res["eval_s"] = time.perf_counter() - t0
    return res


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
def val_loss(model, windows: torch.Tensor, device, batch: int) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i: i + batch].to(device)
        with tp._autocast(device):
            logits = model(w[:, :-1]).logits
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        n += w[:, 1:].numel()
    model.train()
    return total / max(1, n)


# --------------------------------------------------------------------------------------------
# Training one arm
# --------------------------------------------------------------------------------------------


def train_arm(cfg: ModelConfig, optim: OptimConfig, context: int, sampler: WindowSampler, val_windows: torch.Tensor,
              args, device: torch.device, tb=None) -> tuple[torch.nn.Module, dict]:
    batch = max(1, args.tokens_per_step // context)
    accum = max(1, min(args.grad_accum, batch))
    micro = math.ceil(batch / accum)
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device).train()
    if args.compile:
        torch._dynamo.reset()  # a fresh recompile budget per arm (Dynamo falls back to eager past its limit)
    maybe_compile(model, args.compile is not None, args.compile or "inductor")
    set_tf32(True)
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                            eps=optim.eps, fused=device.type == "cuda")
    budget = args.budget_minutes * 60.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def fwd_bwd(x, y, scale):
        with tp._autocast(device):
            out = model(x, targets=y)
            ce = out.loss
            loss = ce + out.aux_loss
        (loss * scale).backward()
        return ce.detach()

    # Untimed warm-up: compile / autotune kernels; gradients and codebook statistics are thrown away.
    t0 = time.perf_counter()
    x, y = sampler.samples(0, min(micro, batch))
    for _ in range(args.warmup_steps):
        fwd_bwd(_to_device(x, device), _to_device(y, device), 1.0)
        opt.zero_grad(set_to_none=True)
        for vq in model.quantizers():
            vq.reset_stats()
    tp._sync(device)
    warmup_s = time.perf_counter() - t0

    log = {"step": [], "time_s": [], "loss": [], "lr": [], "step_s": []}
    val = {"step": [], "time_s": [], "loss": []}
    codelog: dict = {"step": []}
    elapsed, step, diverged = 0.0, 0, None
    val_every = budget / args.val_points if args.val_points > 0 else math.inf
    next_val = val_every
    wall0 = time.perf_counter()
    last_print = 0.0
    while elapsed < budget and (args.max_steps is None or step < args.max_steps):
        tp._sync(device)
        t_start = time.perf_counter()
        mult = time_lr_multiplier(elapsed / budget, optim, args.warmup_frac)
        for g in opt.param_groups:
            g["lr"] = optim.lr * mult
        xs, ys = sampler.samples(step * batch, batch)
        ce_sum = torch.zeros((), device=device)
        for m in range(0, batch, micro):
            x, y = _to_device(xs[m:m + micro], device), _to_device(ys[m:m + micro], device)
            ce_sum += fwd_bwd(x, y, x.shape[0] / batch) * (x.shape[0] / batch)
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        loss = float(ce_sum)
        if not math.isfinite(loss):
            diverged = step
            opt.zero_grad(set_to_none=True)
            print(f"  {cfg.arch} @ {context}: non-finite loss at step {step}; stopping this arm", flush=True)
            break
        opt.step()
        opt.zero_grad(set_to_none=True)
        code_metrics = None
        if step % args.log_every == 0 and model.quantizers():
            code_metrics = {f"layer{i}/{k}": v for i, vq in model.named_quantizers() for k, v in vq.step_metrics().items()}
        model.apply_codebook_updates()
        tp._sync(device)
        dt_step = time.perf_counter() - t_start
        elapsed += dt_step
        step += 1
        for key, value in (("step", step), ("time_s", elapsed), ("loss", loss), ("lr", optim.lr * mult), ("step_s", dt_step)):
            log[key].append(value)
        if tb is not None:
            tb.add_scalar("train/loss", loss, step)
            tb.add_scalar("train/lr", optim.lr * mult, step)
        if code_metrics is not None:
            codelog["step"].append(step)
            for k, v in code_metrics.items():
                codelog.setdefault(k, []).append(v)
                if tb is not None:
                    tb.add_scalar(f"codebook/{k}", v, step)
        if elapsed >= next_val or elapsed >= budget:
            next_val += val_every
            with eager_blocks(model):  # eval shapes / mode must not trigger recompiles
                vl = val_loss(model, val_windows, device, batch)
            val["step"].append(step)
            val["time_s"].append(elapsed)
            val["loss"].append(vl)
            if tb is not None:
                tb.add_scalar("valid/loss", vl, step)
        if elapsed - last_print >= budget / 10 or elapsed >= budget:
            last_print = elapsed
            print(f"  {cfg.arch} @ {context}: step {step}, {elapsed:.0f}/{budget:.0f} s, loss {loss:.4f}, "
                  f"lr {optim.lr * mult:.2e}, {step * batch * context / elapsed:,.0f} tokens/s", flush=True)
    tail = log["loss"][-max(1, len(log["loss"]) // 20):]
    record = {"steps": step, "batch": batch, "micro_batch": micro, "grad_accum": math.ceil(batch / micro),
              "tokens_seen": step * batch * context, "train_time_s": elapsed, "warmup_s": warmup_s,
              "wall_s": time.perf_counter() - wall0, "tokens_per_s": step * batch * context / elapsed if elapsed else None,
              "final_train_loss": float(np.mean(tail)) if tail else None, "diverged_at_step": diverged,
              "peak_mem_gib": tp._peak_gib(device), "log": log, "val_curve": val, "codebook_log": codelog}
    return model, record


def save_export(model, cfg: ModelConfig, context: int, args, folder: Path) -> Path:
    """model.safetensors + config.yaml, the export layout `evals.perplexity --checkpoint` / `evals.generate` load."""
    from safetensors.torch import save_file

    from lm.config import RunConfig, dump_config

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("head.weight", None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"source": "evals.quality_race", "format": "longvq-export-1"})
    run = RunConfig(model=copy.deepcopy(cfg), data=DataConfig(dataset="stdlib", cache_dir=args.cache_dir, seq_len=context))
    run.train.seed = args.seed
    dump_config(run, folder / "config.yaml")
    return folder


# --------------------------------------------------------------------------------------------
# Summary, report, plot
# --------------------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    """Per context: bpb of each arm, the ratio, and the issue's targets."""
    out: dict = {}
    for ctx in sorted({r["context"] for r in runs}):
        rs = {r["arch"]: r for r in runs if r["context"] == ctx and r.get("eval")}
        s: dict = {"bpb": {a: r["eval"]["bpb"] for a, r in rs.items()}}
        if "longvq" in rs:
            lv = rs["longvq"]["eval"]
            s["longvq_falls_after_2C"] = lv["long_context"]["falls_after_2C"]
            s["longvq_drop_after_2C"] = lv["long_context"]["drop_after_2C"]
            usage = [c["usage"] for c in lv.get("codebook", [])]
            s["min_layer_code_usage"] = min(usage) if usage else None
            s["codes_ok"] = (min(usage) >= 0.5) if usage else None
        if "longvq" in rs and "transformer" in rs:
            b_lv, b_tf = s["bpb"]["longvq"], s["bpb"]["transformer"]
            s["bpb_ratio_longvq_over_transformer"] = b_lv / b_tf if b_tf else None
            s["longvq_le_transformer"] = bool(b_lv <= b_tf)
            s["longvq_within_2pct"] = bool(b_lv <= 1.02 * b_tf)
        out[str(ctx)] = s
    return out


def _f(x, spec=".4f") -> str:
    return "–" if x is None else format(x, spec)


def _mark(ok) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def write_markdown(result: dict, path: Path) -> None:
    meta, runs, summary = result["meta"], result["runs"], result["summary"]
    cmds = meta.get("commands") or [meta["command"]]
    L = [f"# Quality race: {meta['tag']}", "",
         f"Device {meta['device']}, torch {meta['torch']}, {meta['date']}, preset {meta['preset']}, "
         f"precision {meta['precision']}, budget {meta['budget_minutes']:g} min of training time per arm and context, "
         f"{meta['tokens_per_step']} tokens per optimizer step, seed {meta['seed']}.", "",
         "Command(s):", "", "```", *cmds, "```", "",
         "Parameters: " + ", ".join(f"{a} {n:,}" for a, n in meta["params"].items())
         + f" (ratio longvq/transformer {meta['param_ratio']:.3f}).", "",
         f"Data: {meta['corpus'].get('dataset')} corpus of Python {meta['corpus'].get('python')} (bytes per split: "
         + ", ".join(f"{k} {v:,}" for k, v in (meta['corpus'].get('bytes') or {}).items())
         + f"), byte level; held-out split `{meta['eval_split']}` ({meta['eval_tokens']:,} tokens scored), disjoint "
         "windows of the training context.", "",
         f"Schedule: {meta['schedule']}; warmup {meta['warmup_frac']:g} of the budget; optimizer "
         + "; ".join(f"{a}: lr {o['lr']:g}, min ratio {o['min_lr_ratio']:g}, wd {o['weight_decay']:g}, clip {o['grad_clip']:g}"
                     for a, o in meta["optim"].items()) + "."
         + (" Merged from several runs: each run's own peak lr is in the table." if meta.get("merged_from") else ""), ""]
    if meta["device"].startswith("cpu"):
        L += ["> CPU run: a smoke test of the script, not a quality result.", ""]
    L += ["## Held-out bits per byte and training", "",
          "| context | arch | peak lr | steps | tokens seen | tokens/s | train loss (end) | valid loss (end) | test bpb | peak GiB |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["context"], r["arch"])):
        ev = r.get("eval") or {}
        vc = r.get("val_curve", {}).get("loss") or [None]
        lr = (r.get("optim") or meta["optim"][r["arch"]])["lr"]
        L.append(f"| {r['context']} | {r['arch']} | {lr:g} | {r['steps']} | {r['tokens_seen']:,} | {_f(r['tokens_per_s'], ',.0f')} | "
                 f"{_f(r['final_train_loss'])} | {_f(vc[-1])} | {_f(ev.get('bpb'))} | {_f(r['peak_mem_gib'], '.1f')} |"
                 + (f" diverged at step {r['diverged_at_step']}" if r.get("diverged_at_step") is not None else ""))
    L += ["", "## Loss by position (nats, buckets of the LongVQ chunk size C)", ""]
    for ctx in sorted({r["context"] for r in runs}):
        rs = sorted((r for r in runs if r["context"] == ctx and r.get("eval")), key=lambda r: r["arch"])
        if not rs:
            continue
        pc0 = rs[0]["eval"]["per_position"]["chunk"]
        C = rs[0]["eval"]["chunk_bucket_width"]
        cols = [f"[{a},{b})" for a, b in zip(pc0["edges"][:-1], pc0["edges"][1:])]
        L += [f"Context {ctx} (C = {C}; buckets from {2 * C} on are reached only through the code cache):", "",
              "| arch | " + " | ".join(cols) + " | drop after 2C |", "|---|" + "---|" * (len(cols) + 1)]
        for r in rs:
            ev = r["eval"]
            L.append(f"| {r['arch']} | " + " | ".join(_f(x, ".3f") for x in ev["per_position"]["chunk"]["loss"])
                     + f" | {_f(ev['long_context']['drop_after_2C'], '.4f')} |")
        L.append("")
    L += ["## Codebook health and attention mass (LongVQ, held-out)", "",
          "| context | layer | codes used (mean / min head) | code perplexity (of S) | rel. quant. error | dead (EMA) | "
          "mass own / prev / cache (all queries) | cache share, queries >= 2C | attention entropy / flat (nats) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r["context"]):
        ev = r.get("eval") or {}
        if r["arch"] != "longvq" or not ev:
            continue
        mass = {m["layer"]: m for m in ev.get("attention_mass", [])}
        for c in ev.get("codebook", []):
            m = mass.get(c["layer"], {})
            late = (m.get("beyond_2C") or {}).get("cache")
            L.append(f"| {r['context']} | {c['layer']} | {c['usage']:.3f} / {c['usage_min_head']:.3f} | "
                     f"{c['perplexity']:.1f} ({c['codebook_size']}) | {c['rel_error']:.3f} | {_f(c['dead_codes_ema'], '.3f')} | "
                     f"{_f(m.get('own'), '.3f')} / {_f(m.get('prev'), '.3f')} / {_f(m.get('cache'), '.3f')} | {_f(late, '.3f')} | "
                     f"{_f(m.get('entropy'), '.2f')} / {_f(m.get('entropy_flat'), '.2f')} |")
    L += ["", "## Targets (issue 7)", ""]
    for ctx, s in summary.items():
        ratio = s.get("bpb_ratio_longvq_over_transformer")
        parts = [f"- Context {ctx}: bpb " + ", ".join(f"{a} {_f(b)}" for a, b in s["bpb"].items())
                 + (f", ratio {ratio:.4f}" if ratio is not None else "")]
        if ratio is not None:
            if int(ctx) >= 16384:
                parts.append(f"  LongVQ <= Transformer (target at 16K): {_mark(s['longvq_le_transformer'])}.")
            elif int(ctx) == 4096:
                parts.append(f"  LongVQ within 2% (target at 4K): {_mark(s['longvq_within_2pct'])}.")
            else:
                parts.append(f"  (no target at this context; <=: {s['longvq_le_transformer']}, within 2%: {s['longvq_within_2pct']})")
        if "longvq_falls_after_2C" in s:
            parts.append(f"  LongVQ loss keeps falling after 2C: {_mark(s['longvq_falls_after_2C'])} "
                         f"(drop {_f(s['longvq_drop_after_2C'])} nats).")
            parts.append(f"  Every layer uses >= 50% of its codes: {_mark(s['codes_ok'])} "
                         f"(lowest layer {_f(s['min_layer_code_usage'], '.3f')}).")
        L += parts
    L += ["", f"Raw data: `{path.with_suffix('.json').name}`; plot: `{path.with_suffix('.png').name}`.", ""]
    path.write_text("\n".join(L))


def _smooth(y: list, frac: float = 0.02) -> np.ndarray:
    y = np.asarray([np.nan if v is None else v for v in y], dtype=float)
    if len(y) < 5:
        return y
    a = 1.0 / max(1.0, frac * len(y))
    out, acc = np.empty_like(y), y[0]
    for i, v in enumerate(y):
        acc = a * v + (1 - a) * acc
        out[i] = acc
    return out


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    contexts = sorted({r["context"] for r in runs})
    fig, axes = plt.subplots(len(contexts), 4, figsize=(20, 4.2 * len(contexts)), squeeze=False)
    colors = {"longvq": "tab:blue", "transformer": "tab:orange"}
    for row, ctx in zip(axes, contexts):
        rs = sorted((r for r in runs if r["context"] == ctx), key=lambda r: r["arch"])
        for r in rs:
            c, lg, vc = colors.get(r["arch"]), r["log"], r["val_curve"]
            row[0].plot(lg["step"], _smooth(lg["loss"]), color=c, label=f"{r['arch']} train")
            row[0].plot(vc["step"], vc["loss"], "o--", color=c, ms=3, label=f"{r['arch']} valid")
            row[1].plot(lg["time_s"], _smooth(lg["loss"]), color=c, label=f"{r['arch']} train")
            row[1].plot(vc["time_s"], vc["loss"], "o--", color=c, ms=3, label=f"{r['arch']} valid")
            ev = r.get("eval")
            if ev:
                fine = ev["per_position"]["fine"]
                mid = [(a + b) / 2 for a, b in zip(fine["edges"][:-1], fine["edges"][1:])]
                row[2].plot(mid, [np.nan if v is None else v for v in fine["loss"]], color=c, alpha=0.35, lw=0.8)
                pc = ev["per_position"]["chunk"]
                row[2].plot([(a + b) / 2 for a, b in zip(pc["edges"][:-1], pc["edges"][1:])],
                            [np.nan if v is None else v for v in pc["loss"]], "s-", color=c, ms=4,
                            label=f"{r['arch']} (bpb {ev['bpb']:.3f}; squares: chunk buckets)")
                C = ev["chunk_bucket_width"]
            cl = r.get("codebook_log", {})
            for k in sorted(k for k in cl if k.endswith("/usage")):
                row[3].plot(cl["step"], cl[k], label=k.split("/")[0], alpha=0.8)
        for ax, xl, title in ((row[0], "optimizer step", "loss vs step"), (row[1], "training time (s)", "loss vs time"),
                              (row[2], "position in window", "held-out loss vs position"),
                              (row[3], "optimizer step", "LongVQ: fraction of codes used")):
            ax.set_xlabel(xl)
            ax.set_title(f"context {ctx}: {title}")
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, ncol=2 if ax is row[3] else 1)
        row[0].set_ylabel("loss (nats)")
        if any(r.get("eval") for r in rs):
            row[2].set_xscale("symlog", linthresh=max(1, C // 4))
            for x, name in ((C, "C"), (2 * C, "2C")):
                row[2].axvline(x, color="gray", ls=":", lw=1)
                row[2].text(x, 1.0, name, transform=row[2].get_xaxis_transform(), va="top", fontsize=8)
        row[3].set_ylim(0, 1.05)
    fig.suptitle(f"Quality race {result['meta']['tag']} ({result['meta']['device']}, "
                 f"{result['meta']['budget_minutes']:g} min per arm)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path, tag: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    result["summary"] = summarize(result["runs"])
    paths = {ext: out_dir / f"quality_{tag}.{ext}" for ext in ("json", "md", "png")}
    clean = _clean(result)
    paths["json"].write_text(json.dumps(clean, indent=1))
    write_markdown(clean, paths["md"])
    try:
        write_plot(clean, paths["png"])
    except ImportError as exc:
        print(f"no plot ({exc})", file=sys.stderr)
    return paths


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m evals.quality_race", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="40m", choices=sorted(PRESETS))
    p.add_argument("--contexts", nargs="+", type=int, default=None, help="default: 4096 16384 (40m), 64 128 (tiny)")
    p.add_argument("--budget-minutes", type=float, default=3.0, help="training time per arm and context")
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ARCH.KEY=VALUE")
    p.add_argument("--optim", dest="optim", action="append", default=[], metavar="[ARCH.]KEY=VALUE",
                   help="OptimConfig fields (lr, min_lr_ratio, weight_decay, beta1, beta2, eps, grad_clip)")
    p.add_argument("--param-tolerance", type=float, default=0.10)
    p.add_argument("--tokens-per-step", type=int, default=None, help="default 65536 (40m), 512 (tiny)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile each block, both arms (evaluations run eager); compile time falls in the untimed warm-up")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (memory)")
    p.add_argument("--warmup-frac", type=float, default=0.05, help="lr warmup, fraction of the budget")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed kernel warm-up forward/backward passes")
    p.add_argument("--max-steps", type=int, default=None, help="also stop an arm after N steps (debugging)")
    p.add_argument("--eval-split", default="test", choices=["valid", "test"])
    p.add_argument("--eval-tokens", type=int, default=None, help="score the first N held-out targets (default all)")
    p.add_argument("--val-tokens", type=int, default=None, help="valid tokens for the curve (default tokens-per-step)")
    p.add_argument("--val-points", type=int, default=10, help="held-out evaluations during training")
    p.add_argument("--mass-windows", type=int, default=1, help="held-out windows for the attention-mass split")
    p.add_argument("--log-every", type=int, default=10, help="codebook statistics every N steps")
    p.add_argument("--cache-dir", default="~/.cache/longvq", help="data.cache_dir for the prepared corpus")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", default="evals/results")
    p.add_argument("--tag", default=None, help="output name quality_TAG.* (default PRESET_DEVICE)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    p.add_argument("--save-dir", default=None, help="also export each trained model (safetensors + config.yaml) to "
                   "SAVE_DIR/TAG_CONTEXT_ARCH, loadable by evals.perplexity --checkpoint and evals.generate")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge finished results into one report")
    args = p.parse_args(argv)
    d = PRESET_DEFAULTS[args.preset]
    args.contexts = args.contexts or list(d["contexts"])
    args.tokens_per_step = args.tokens_per_step or d["tokens_per_step"]
    if args.budget_minutes <= 0 or args.tokens_per_step < 1 or args.grad_accum < 1 or args.log_every < 1:
        p.error("--budget-minutes, --tokens-per-step, --grad-accum and --log-every must be positive")
    if args.merge and not args.tag:
        p.error("--merge needs --tag")
    return args


def merge(paths: list[str], out_dir: Path, tag: str) -> dict:
    """One result from several finished ones. A path may end in ":ARCH@CONTEXT[,ARCH@CONTEXT...]" to take
    only those runs (e.g. each arm's run at its best learning rate). Every run keeps the optimizer settings
    and command of its own file; files with different budgets, presets or batch sizes are refused."""
    results, selected = [], []
    for item in paths:
        path, sel = item, None
        head, _, tail = item.rpartition(":")
        if head and "@" in tail:
            path, sel = head, {tuple(x.split("@", 1)) for x in tail.split(",")}
            bad = {a for a, _ in sel if a not in ARCHS}
            if bad:
                raise ConfigError(f"--merge {item!r}: {sorted(bad)} not longvq or transformer")
        res = json.loads(Path(path).read_text())
        runs = [r for r in res["runs"] if sel is None or (r["arch"], str(r["context"])) in sel]
        if sel is not None and len(runs) != len(sel):
            have = sorted(f"{r['arch']}@{r['context']}" for r in res["runs"])
            raise ConfigError(f"--merge {item!r}: {path} has the runs {have}")
        for r in runs:
            r.setdefault("optim", res["meta"]["optim"][r["arch"]])
            r.setdefault("command", res["meta"]["command"])
        results.append(res)
        selected += runs
    for key in ("budget_minutes", "preset", "tokens_per_step"):
        values = {json.dumps(r["meta"].get(key)) for r in results}
        if len(values) > 1:
            raise ConfigError(f"--merge: the files differ in {key} ({', '.join(sorted(values))}): not one comparison")
    meta = copy.deepcopy(results[0]["meta"])
    meta.update(tag=tag, commands=[r["meta"]["command"] for r in results], merged_from=list(paths))
    return {"meta": meta, "runs": selected}


def run_race(args) -> dict:
    device = pick_device(args.device)
    cfgs = tp.model_configs(PRESETS[args.preset], args.overrides)
    params = {a: tp.count_params(c) for a, c in cfgs.items()}
    print("parameters: " + ", ".join(f"{a} {n:,}" for a, n in params.items())
          + f" (longvq/transformer {params['longvq'] / params['transformer']:.3f})", flush=True)
    ratio = tp.check_param_match(params, args.param_tolerance)
    optims = optim_configs(args.optim, PRESETS[args.preset].get("optim"))
    chunk = cfgs["longvq"].longvq.chunk_size
    tag = args.tag or f"{args.preset}_{device.type}"
    out_dir = Path(args.out_dir)
    data_cfg = DataConfig(dataset="stdlib", cache_dir=args.cache_dir)
    train = load_stream(data_cfg, "train")
    heldout = load_stream(data_cfg, args.eval_split)
    valid = load_stream(data_cfg, "valid")
    n_eval = len(heldout.tokens) if args.eval_tokens is None else min(len(heldout.tokens), args.eval_tokens + 1)
    eval_tokens = torch.from_numpy(np.asarray(heldout.tokens[:n_eval]).astype(np.int64))
    meta = {"tag": tag, "command": "python -m evals.quality_race " + shlex.join(args.argv), "argv": args.argv,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": tp.device_name(device),
            "torch": torch.__version__, "python": platform.python_version(), "git_commit": _git_commit(),
            "preset": args.preset, "overrides": args.overrides, "budget_minutes": args.budget_minutes,
            "budget_s": args.budget_minutes * 60, "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
            "tokens_per_step": args.tokens_per_step, "grad_accum": args.grad_accum, "seed": args.seed,
            "compile": args.compile, "tf32": device.type == "cuda", "contexts": args.contexts, "archs": args.arch, "params": params, "param_ratio": ratio,
            "configs": {a: to_dict(c) for a, c in cfgs.items()}, "optim": {a: to_dict(o) for a, o in optims.items()},
            "schedule": SCHEDULE, "warmup_frac": args.warmup_frac, "warmup_steps_untimed": args.warmup_steps,
            "eval_split": args.eval_split, "eval_tokens": n_eval - 1, "corpus": _corpus_info(data_cfg),
            "train_tokens": len(train.tokens), "chunk_bucket_width": chunk}
    result = {"meta": meta, "runs": []}
    wall0 = time.perf_counter()
    for context in args.contexts:
        sampler = WindowSampler(train.tokens, context, args.seed)
        val_n = max(1, min((args.val_tokens or args.tokens_per_step) // context, (len(valid.tokens) - 1) // (context + 1)))
        val_windows = torch.stack([torch.from_numpy(np.asarray(valid.tokens[i * (context + 1):(i + 1) * (context + 1)]).astype(np.int64))
                                   for i in range(val_n)])
        for arch in args.arch:
            cfg = copy.deepcopy(cfgs[arch])
            print(f"[{context}] {arch}: {params[arch]:,} parameters, budget {args.budget_minutes:g} min", flush=True)
            tb = None
            if args.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    tb = SummaryWriter(str(out_dir / f"tb_{tag}" / f"{context}_{arch}"))
                except ImportError as exc:
                    print(f"no TensorBoard ({exc})", file=sys.stderr)
            model, record = train_arm(cfg, optims[arch], context, sampler, val_windows, args, device, tb)
            record = {"arch": arch, "context": context, "params": params[arch], **record}
            with eager_blocks(model):
                record["eval"] = evaluate_arm(model, cfg, context, eval_tokens, args, device, chunk)
            ev = record["eval"]
            if args.save_dir:
                record["export"] = str(save_export(model, cfg, context, args, Path(args.save_dir) / f"{tag}_{context}_{arch}"))
            print(f"[{context}] {arch}: {record['steps']} steps, {record['tokens_seen']:,} tokens, "
                  f"{args.eval_split} bpb {ev['bpb']:.4f}", flush=True)
            if tb is not None:
                tb.add_scalar("eval/bpb", ev["bpb"], record["steps"])
                for c in ev.get("codebook", []):
                    for k in ("usage", "perplexity", "rel_error"):
                        tb.add_scalar(f"eval_codebook/layer{c['layer']}/{k}", c[k], record["steps"])
                for m in ev.get("attention_mass", []):
                    tb.add_scalar(f"eval_mass/layer{m['layer']}/cache", m["cache"], record["steps"])
                tb.close()
            result["runs"].append(record)
            del model
            _free(device)
            meta["wall_s"] = time.perf_counter() - wall0  # the whole command so far (budget planning)
            write_outputs(result, out_dir, tag)
            print(f"  wall time so far {meta['wall_s']:.0f} s", flush=True)
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        if args.merge:
            result = merge(args.merge, Path(args.out_dir), args.tag)
            paths = write_outputs(result, Path(args.out_dir), args.tag)
        else:
            result = run_race(args)
            paths = {ext: Path(args.out_dir) / f"quality_{result['meta']['tag']}.{ext}" for ext in ("json", "md", "png")}
    except (tp.ParamMismatchError, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for ctx, s in result.get("summary", {}).items():
        print(f"context {ctx}: " + ", ".join(f"{a} bpb {b:.4f}" for a, b in s["bpb"].items() if b is not None))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
