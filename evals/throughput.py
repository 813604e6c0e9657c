"""Training and decoding throughput / memory of LongVQ against a matched Transformer, through the trainer's path.

    python -m evals.throughput [--recipe launch/configs/longvq_125m.yaml --recipe launch/configs/transformer_125m.yaml]
        [key=value ...] [--engine deepspeed|torch] [--contexts 2048 ... 131072] [--tokens-per-step 65536]
        [--decode-prompts 4096 65536] [--decode-tokens 128] [--decode-eager] [--decode-compile] [--attn-backends cudnn flash]
        [--profile-context 8192] [--phases-context 8192]
        [--steps 5] [--warmup 2] [--out-dir runs/bench] [--tag NAME] [--peak-flops 989e12]
        [--trainer-check [--trainer-steps 12]]

Each recipe is an ordinary training recipe (launch/configs/); `key=value` overrides apply to every recipe,
exactly as on `python -m lm.train` (e.g. train.compile=false, train.loss_chunk_tokens=16384,
parallel.activation_checkpointing=true, model.longvq.attention_impl=chunked, train.precision=bf16).
Per context, a recipe runs with data.seq_len = context and tokens_per_step / context sequences.

--engine deepspeed (the default where DeepSpeed is installed) times the DeepSpeed engine lm.train builds:
its precision, ZeRO stage, compiled blocks, fused kernels and loss chunking, one process. --engine torch
times the same step without DeepSpeed (machines without it). lm.bench.throughput documents the method;
rows follow the contract fields (arch, context, mode, tokens_per_s, peak_mem_gib, mfu, params, backend,
device, date) plus the engine, precision and step times. Per context the fastest Transformer row is the
baseline (`best_baseline`) and LongVQ rows get `speedup_vs_best_baseline`. The Transformer gets one row per
attention backend (--attn-backends; default: its recipe's backend, or every fast one when that is auto).

Outputs, rewritten after every row: OUT_DIR/throughput_TAG.json (the rows), .md (a table) and .png
(tokens/s and peak memory against context); --profile-context adds OUT_DIR/throughput_TAG_profile_ARCH.txt,
--phases-context OUT_DIR/throughput_TAG_phases.json (host and device time of the forward, backward and update
of one step, lm.bench.throughput.step_phases).

--trainer-check then trains each measured row's recipe at its context through `python -m lm.train` (one
process, --trainer-steps steps; lm.bench.trainer_check) and writes OUT_DIR/trainer_vs_benchmark_TAG.json: the
trainer's steady tokens/s beside the row's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from evals.common import parse_recipe_args, pick_device, recipe_parser
from lm.bench import throughput as tp
from lm.bench import trainer_check
from lm.bench.report import throughput_markdown, throughput_plot
from lm.config import ConfigError, load_config
from lm.parallel.dist import distributed
from lm.ops import sdpa

DEFAULT_RECIPES = ["launch/configs/longvq_125m.yaml", "launch/configs/transformer_125m.yaml"]


def parse_args(argv):
    p = recipe_parser("python -m evals.throughput", __doc__, overrides_help="config overrides for every recipe",
                      recipe_help="a training recipe (repeat: one per arch)")
    p.add_argument("--engine", choices=["deepspeed", "torch"], default=None,
                   help="default: deepspeed where it is installed, else torch")
    p.add_argument("--contexts", nargs="*", type=int, default=[2048, 4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--param-tolerance", type=float, default=0.10)
    p.add_argument("--attn-backends", nargs="+", default=None, choices=list(sdpa.BACKENDS))
    p.add_argument("--decode-prompts", nargs="*", type=int, default=[4096, 65536])
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-warmup", type=int, default=2)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--decode-eager", action="store_true",
                   help="decode without capturing the step in a CUDA graph (the launch-bound comparison)")
    p.add_argument("--decode-compile", action="store_true", help="decode step through torch.compile (fewer kernels)")
    p.add_argument("--prefill-chunk", type=int, default=8192, help="prompt tokens per prefill forward")
    p.add_argument("--profile-context", type=int, default=None, help="also profile one training step per recipe")
    p.add_argument("--phases-context", type=int, default=None,
                   help="also time the phases of a training step (host vs device) per recipe at this context")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-flops", type=float, default=None, help="default 989e12 on CUDA; CPU: no MFU")
    p.add_argument("--device", default="auto", help="--engine torch: the device (deepspeed uses the process's GPU)")
    p.add_argument("--out-dir", default="runs/bench")
    p.add_argument("--tag", default=None, help="name of the output files (default ENGINE_DEVICE)")
    p.add_argument("--raise-errors", action="store_true", help="re-raise non-OOM failures (debugging)")
    p.add_argument("--trainer-check", action="store_true",
                   help="also train each measured row through `python -m lm.train` and compare tokens/s")
    p.add_argument("--trainer-steps", type=int, default=12, help="--trainer-check: steps per trainer run")
    args = parse_recipe_args(p, argv, DEFAULT_RECIPES)
    args.argv = ["python", "-m", "evals.throughput", *argv]
    if min(args.steps, args.warmup, args.tokens_per_step, args.prefill_chunk, args.decode_tokens, args.decode_batch) < 1:
        p.error("--steps, --warmup, --tokens-per-step, --prefill-chunk, --decode-tokens and --decode-batch must be >= 1")
    if args.trainer_steps < 3:
        p.error(f"--trainer-steps must be >= 3 (the trainer's rate is a median after warm-up), got {args.trainer_steps}")
    if any(c < 1 for c in args.contexts + args.decode_prompts):
        p.error("--contexts and --decode-prompts must be >= 1")
    if args.engine is None:
        args.engine = "deepspeed" if importlib.util.find_spec("deepspeed") else "torch"
    return args


def run_benchmark(args) -> list[dict]:
    if args.engine == "deepspeed":  # the process's GPU (the process group is set up by main)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = pick_device(args.device)
    loaded = {r: load_config(r, overrides=args.overrides) for r in args.recipes}
    arms = tp.arms_by_arch(loaded)
    params = {a: tp.count_params(c) for a, c in arms.items()}
    print("parameters: " + ", ".join(f"{a} {n:,}" for a, n in params.items()), flush=True)
    ratio = tp.check_param_match(params, args.param_tolerance) if len(arms) > 1 else 1.0
    peak = args.peak_flops or (tp.DEFAULT_PEAK if device.type == "cuda" else None)
    tag = args.tag or f"{args.engine}_{device.type}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    header = {"tag": tag, "device": tp.device_name(device), "torch": torch.__version__, "date": date, "engine": args.engine,
              "recipes": {c.model.arch: r for r, c in loaded.items()},
              "overrides": args.overrides, "tokens_per_step": args.tokens_per_step, "steps": args.steps,
              "warmup": args.warmup, "params": params, "param_ratio": ratio, "peak_flops": peak}
    base = {"device": header["device"], "date": date, "torch": torch.__version__, "tag": tag, "param_ratio": ratio,
            "peak_flops": peak, "engine": args.engine, "overrides": args.overrides}

    plan = []
    for context in args.contexts:
        for arch, cfg in arms.items():
            backends = [None] if arch == "longvq" else (args.attn_backends or tp.transformer_backends(cfg, device))
            plan += [("train", arch, context, b) for b in backends]
    plan += [("decode", arch, p, None) for p in args.decode_prompts for arch in arms]

    rows: list[dict] = []
    paths = {ext: out_dir / f"throughput_{tag}.{ext}" for ext in ("json", "md", "png")}
    for i, (mode, arch, context, backend) in enumerate(plan, 1):
        cfg = arms[arch] if backend is None else tp.with_backend(arms[arch], backend)
        t0 = time.perf_counter()
        if mode == "train":
            fn = lambda: tp.train_row(cfg, context, tokens_per_step=args.tokens_per_step, engine=args.engine,  # noqa: E731
                                      steps=args.steps, warmup=args.warmup, device=device)
        else:
            fn = lambda: tp.decode_row(cfg, context, decode_tokens=args.decode_tokens, decode_warmup=args.decode_warmup,  # noqa: E731
                                       batch=args.decode_batch, prefill_chunk=args.prefill_chunk, device=device,
                                       cuda_graph=not args.decode_eager, compile_step=args.decode_compile)
        res = tp.measure(fn, device, compiled=cfg.train.compile, raise_errors=args.raise_errors)
        res.setdefault("backend", cfg.model.longvq.attention_impl if arch == "longvq" else cfg.model.transformer.attn_backend)
        row = {"arch": arch, "context": context, "mode": mode, **res, "params": params[arch], **base,
               "recipe": header["recipes"].get(arch), "tokens_per_step": args.tokens_per_step if mode == "train" else None}
        tp.add_flops(row, cfg, params[arch], peak)
        if arch == "longvq":
            lv = cfg.model.longvq
            row.update(chunk_size=lv.chunk_size, codebook_size=lv.codebook_size, n_heads=lv.n_heads)
        rows.append(row)
        tp.mark_best(rows)
        tps = "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f} tok/s"
        mem = "" if row["peak_mem_gib"] is None else f", {row['peak_mem_gib']:.2f} GiB"
        mfu = "" if row["mfu"] is None else f", MFU {row['mfu']:.3f}"
        err = f"  ERROR {row['error']}" if row.get("error") else ""
        print(f"[{i}/{len(plan)}] {mode:6s} {arch:11s} ctx {context:>6} batch {row.get('batch', '-')} "
              f"backend {row['backend']}: {tps}{mem}{mfu} ({time.perf_counter() - t0:.1f}s){err}", flush=True)
        paths["json"].write_text(json.dumps(rows, indent=1))
        throughput_markdown(rows, paths["md"], header)
    try:
        throughput_plot(rows, paths["png"], f"{tag}: {header['device']}")
    except ImportError as exc:  # the JSON and the table are the results; the plot is a convenience
        print(f"warning: no plot ({exc}); install matplotlib for {paths['png'].name}", flush=True)
        del paths["png"]
    if args.profile_context:
        for arch, cfg in arms.items():
            path = out_dir / f"throughput_{tag}_profile_{arch}.txt"
            try:
                table = tp.profile_step(cfg, args.profile_context, tokens_per_step=args.tokens_per_step,
                                        engine=args.engine, device=device)
            except Exception as exc:  # noqa: BLE001 - a profile must not lose the rows above
                table = f"profile failed: {exc!r}"
            path.write_text(f"{arch}, context {args.profile_context}, one training step ({args.engine} engine)\n{table}\n")
            paths[f"profile_{arch}"] = path
            tp.free_memory(device)
    if args.phases_context:
        paths["phases"] = out_dir / f"throughput_{tag}_phases.json"
        phases = []
        for arch, cfg in arms.items():
            try:
                ph = tp.step_phases(cfg, args.phases_context, tokens_per_step=args.tokens_per_step, engine=args.engine,
                                    device=device)
            except Exception as exc:  # noqa: BLE001 - the phases must not lose the rows above
                ph = {"arch": arch, "context": args.phases_context, "error": repr(exc)}
            phases.append({**ph, "device": header["device"], "date": date, "tag": tag, "overrides": args.overrides})
            print(tp.phases_line(ph), flush=True)
            paths["phases"].write_text(json.dumps(phases, indent=1))
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    return rows


def run_trainer_check(args, rows: list[dict]) -> list[dict]:
    """--trainer-check: every measured training row trained again through `python -m lm.train`; writes
    OUT_DIR/trainer_vs_benchmark_TAG.json after every comparison and returns the comparisons."""
    if not rows:
        return []
    first = rows[0]  # every row carries the run's tag, date and device
    path = Path(args.out_dir) / f"trainer_vs_benchmark_{first['tag']}.json"
    checks: list[dict] = []

    def write(c):
        checks.append(c)
        rate = c.get("trainer_tokens_per_s")
        got = f"{rate:,.0f} tok/s ({c['trainer_over_benchmark']:.3f})" if rate else f"ERROR {c.get('trainer_error')}"
        print(f"[trainer] {c['arch']:11s} ctx {c['context']:>6}: {got}; benchmark {c['benchmark_tokens_per_s']:,.0f}",
              flush=True)
        path.write_text(json.dumps({"date": first["date"], "device": first["device"], "tag": first["tag"],
                                    "engine": args.engine, "benchmark_argv": args.argv, "rows": checks}, indent=1))

    recipes = {r["arch"]: r["recipe"] for r in rows}
    trainer_check.compare(rows, recipes, args.overrides, tokens_per_step=args.tokens_per_step,
                          steps=args.trainer_steps, on_row=write)
    if checks:
        print(f"wrote {path}", flush=True)
    return checks


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with (distributed() if args.engine == "deepspeed" else contextlib.nullcontext()):
            rows = run_benchmark(args)
    except (tp.ParamMismatchError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.get("error") and r["error"] != "OOM"]
    if args.trainer_check:
        tp.free_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # the trainer gets the GPU
        failed += [c for c in run_trainer_check(args, rows) if c.get("trainer_error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
