"""Quality at equal compute: LongVQ against a matched Transformer, same data, same training-time budget.

    python -m evals.quality_race [--recipe launch/configs/longvq_40m.yaml --recipe launch/configs/transformer_40m.yaml]
        [key=value ...] [--contexts 4096 16384] [--budget-minutes M] [--tokens-per-step N] [--grad-accum K]
        [--engine torch|deepspeed] [--eval-tokens N] [--eval-split test] [--seed S] [--out-dir runs/race] [--tag NAME]
    python -m evals.quality_race --merge A.json B.json[:ARCH@CONTEXT,...] --tag NAME [--out-dir DIR]   # one report

Each recipe is a training recipe (launch/configs/); `key=value` overrides apply to both, as on `python -m
lm.train` (e.g. optim.lr=2e-3, model.longvq.residual=gated). Each arm trains with its own recipe's optimizer
settings (the 40m recipes carry each arm's best peak lr). CPU smoke test: the *_tiny.yaml recipes.
Method (lm.bench.race): the trainer's step and engine, the same windows of the built-in corpus in the same
order for both arms, an untimed warm-up, then steps until the arm's training time reaches the budget with a
time-based warmup + cosine schedule; evaluation on the held-out split in disjoint windows of the context:
bits per byte, loss by position (buckets of the LongVQ chunk size, log2, fine), codebook health and the
attention-mass split (LongVQ).

Outputs, rewritten after every arm: OUT_DIR/quality_TAG.json (command, date, device, budget, parameter
counts, configs, curves, evaluations, summary), .png and .md (the report, with the targets marked met or
missed). --tensorboard also writes TensorBoard scalars under OUT_DIR/tb_TAG/CONTEXT_ARCH; --save-dir exports
each trained model (fp32 safetensors + config.yaml) for `python -m evals.perplexity --checkpoint DIR`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from evals.common import parse_recipe_args, pick_device, recipe_parser
from lm.bench import race
from lm.bench.race_report import merge, write_outputs
from lm.bench.throughput import ParamMismatchError, arms_by_arch, check_param_match, count_params, device_name, free_memory
from lm.config import ConfigError, load_config, to_dict
from lm.data import load_stream
from lm.optim import TimeSchedule
from lm.parallel.dist import distributed

DEFAULT_RECIPES = ["launch/configs/longvq_40m.yaml", "launch/configs/transformer_40m.yaml"]


def parse_args(argv):
    p = recipe_parser("python -m evals.quality_race", __doc__, overrides_help="config overrides for both recipes",
                      recipe_help="a training recipe (one per arch)")
    p.add_argument("--contexts", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--budget-minutes", type=float, default=3.0, help="training time per arm and context")
    p.add_argument("--param-tolerance", type=float, default=0.10)
    p.add_argument("--tokens-per-step", type=int, default=None, help="default: the first recipe's micro-batch x seq_len")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (memory)")
    p.add_argument("--engine", choices=["torch", "deepspeed"], default="torch",
                   help="torch: the trainer's step without DeepSpeed (one process); deepspeed: the trainer's engine")
    p.add_argument("--warmup-frac", type=float, default=0.05, help="lr warmup, fraction of the budget")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed kernel warm-up forward/backward passes")
    p.add_argument("--max-steps", type=int, default=None, help="also stop an arm after N steps (debugging)")
    p.add_argument("--eval-split", default="test", choices=["valid", "test"])
    p.add_argument("--eval-tokens", type=int, default=None, help="score the first N held-out targets (default all)")
    p.add_argument("--val-tokens", type=int, default=None, help="valid tokens for the curve (default tokens-per-step)")
    p.add_argument("--val-points", type=int, default=10, help="held-out evaluations during training")
    p.add_argument("--mass-windows", type=int, default=1, help="held-out windows for the attention-mass split")
    p.add_argument("--log-every", type=int, default=10, help="codebook statistics every N steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", default="runs/race")
    p.add_argument("--tag", default=None, help="output name quality_TAG.* (default ENGINE_DEVICE)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    p.add_argument("--save-dir", default=None, help="also export each trained model to SAVE_DIR/TAG_CONTEXT_ARCH")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge finished results into one report")
    args = parse_recipe_args(p, argv, DEFAULT_RECIPES)
    if args.budget_minutes <= 0 or args.grad_accum < 1 or args.log_every < 1 or min(args.contexts) < 1:
        p.error("--budget-minutes, --grad-accum, --log-every and --contexts must be positive")
    if args.tokens_per_step is not None and args.tokens_per_step < 1:
        p.error("--tokens-per-step must be positive")
    if args.merge and not args.tag:
        p.error("--merge needs --tag")
    return args


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _tensorboard(out_dir: Path, tag: str, context: int, arch: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        print(f"no TensorBoard ({exc})", file=sys.stderr)
        return None
    return SummaryWriter(str(out_dir / f"tb_{tag}" / f"{context}_{arch}"))


def run_race(args) -> dict:
    device = pick_device(args.device)
    loaded = {r: load_config(r, overrides=args.overrides) for r in args.recipes}
    arms = arms_by_arch(loaded)
    params = {a: count_params(c) for a, c in arms.items()}
    print("parameters: " + ", ".join(f"{a} {n:,}" for a, n in params.items()), flush=True)
    ratio = check_param_match(params, args.param_tolerance) if len(arms) > 1 else 1.0
    first = next(iter(loaded.values()))
    tokens_per_step = args.tokens_per_step or first.train.micro_batch_size * first.data.seq_len
    opts = race.RaceOptions(budget_minutes=args.budget_minutes, tokens_per_step=tokens_per_step, grad_accum=args.grad_accum,
                            warmup_frac=args.warmup_frac, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                            val_points=args.val_points, log_every=args.log_every, mass_windows=args.mass_windows,
                            seed=args.seed, engine=args.engine)
    chunk = arms["longvq"].model.longvq.chunk_size if "longvq" in arms else first.data.seq_len
    tag = args.tag or f"{args.engine}_{device.type}"
    out_dir = Path(args.out_dir)
    data_cfg = first.data
    train = load_stream(data_cfg, "train")
    heldout, valid = load_stream(data_cfg, args.eval_split), load_stream(data_cfg, "valid")
    n_eval = len(heldout.tokens) if args.eval_tokens is None else min(len(heldout.tokens), args.eval_tokens + 1)
    eval_tokens = torch.from_numpy(np.asarray(heldout.tokens[:n_eval]).astype(np.int64))
    meta = {"tag": tag, "command": "python -m evals.quality_race " + shlex.join(args.argv), "argv": args.argv,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device_name(device),
            "torch": torch.__version__, "python": platform.python_version(), "git_commit": _git_commit(),
            "recipes": {c.model.arch: r for r, c in loaded.items()}, "overrides": args.overrides, "engine": args.engine,
            "budget_minutes": args.budget_minutes, "budget_s": args.budget_minutes * 60, "tokens_per_step": tokens_per_step,
            "grad_accum": args.grad_accum, "seed": args.seed, "contexts": args.contexts, "archs": list(arms),
            "params": params, "param_ratio": ratio, "configs": {a: to_dict(c) for a, c in arms.items()},
            "optim": {a: to_dict(c.optim) for a, c in arms.items()},
            "schedule": TimeSchedule(first.optim, args.warmup_frac).describe(), "warmup_frac": args.warmup_frac,
            "warmup_steps_untimed": args.warmup_steps, "eval_split": args.eval_split, "eval_tokens": n_eval - 1,
            "corpus": {"dataset": data_cfg.dataset, "python": platform.python_version(), "name": train.name,
                       "bytes": {"train": int(train.n_bytes), "valid": int(valid.n_bytes), args.eval_split: int(heldout.n_bytes)}},
            "train_tokens": len(train.tokens), "chunk_bucket_width": chunk}
    result = {"meta": meta, "runs": []}
    wall0 = time.perf_counter()
    for context in args.contexts:
        val_n = max(1, min((args.val_tokens or tokens_per_step) // context, (len(valid.tokens) - 1) // (context + 1)))
        val_windows = torch.from_numpy(np.asarray(valid.tokens[: val_n * (context + 1)]).astype(np.int64)).view(val_n, context + 1)
        for arch, cfg in arms.items():
            print(f"[{context}] {arch}: {params[arch]:,} parameters, budget {args.budget_minutes:g} min", flush=True)
            tb = _tensorboard(out_dir, tag, context, arch) if args.tensorboard else None
            on_step = (lambda step, scalars: [tb.add_scalar(k, v, step) for k, v in scalars.items()]) if tb else None
            engine, record = race.train_arm(cfg, context, train.tokens, val_windows, opts, device, on_step,
                                            log=lambda m: print(m, flush=True))
            meta["precision"] = record["precision"]
            record = {"arch": arch, "context": context, "params": params[arch], **record}
            record["eval"] = ev = race.evaluate_arm(engine, cfg, context, eval_tokens, opts, chunk, args.eval_split)
            if args.save_dir:
                folder = Path(args.save_dir) / f"{tag}_{context}_{arch}"
                record["export"] = str(race.save_export(engine, cfg, context, folder, "evals.quality_race"))
            print(f"[{context}] {arch}: {record['steps']} steps, {record['tokens_seen']:,} tokens, "
                  f"{args.eval_split} bpb {ev['bpb']:.4f}", flush=True)
            if tb is not None:
                tb.add_scalar("eval/bpb", ev["bpb"], record["steps"])
                tb.close()
            result["runs"].append(record)
            del engine
            free_memory(device)
            meta["wall_s"] = time.perf_counter() - wall0
            write_outputs(result, out_dir, tag)
            print(f"  wall time so far {meta['wall_s']:.0f} s", flush=True)
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        if args.merge:
            result = merge(args.merge, args.tag)
            paths = write_outputs(result, Path(args.out_dir), args.tag)
        else:
            with (distributed() if args.engine == "deepspeed" else contextlib.nullcontext()):
                result = run_race(args)
            paths = {ext: Path(args.out_dir) / f"quality_{result['meta']['tag']}.{ext}" for ext in ("json", "md", "png")}
    except (ParamMismatchError, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for ctx, s in result.get("summary", {}).items():
        print(f"context {ctx}: " + ", ".join(f"{a} bpb {b:.4f}" for a, b in s["bpb"].items() if b is not None))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
