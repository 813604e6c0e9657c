"""Sequence-parallel scaling of the trainer's step: one long sequence over N GPUs against one GPU at 1/N of the
context, for the LongVQ (state exchange) and the Transformer (DeepSpeed-Ulysses).

    python -m evals.sequence_parallel [--recipe launch/configs/longvq_125m_sp.yaml --recipe launch/configs/transformer_125m.yaml]
        [key=value ...] [--nproc 2] [--contexts 262144 524288] [--batch 1] [--steps 3] [--warmup 2]
        [--row-timeout 600] [--time-budget SECONDS] [--out-dir runs/bench] [--tag NAME] [--peak-flops 989e12]

Run it as a plain process on the machine with the GPUs: it launches one `torchrun --nproc_per_node K` per row
itself (K = N for the SP rows, 1 for the baselines), so that a row that runs out of memory on one rank ends
as an error row instead of leaving the other ranks waiting in an exchange. `key=value` overrides apply to
every recipe (e.g. parallel.activation_checkpointing=true train.compile=false, to run both arms alike); each
row then sets data.seq_len, parallel.sequence_parallel and train.micro_batch_size (--batch). lm.bench.
sequence_parallel documents the method and the row fields.

Outputs, rewritten after every row: OUT_DIR/sequence_parallel_TAG.json (header and rows), .md (a table) and .png
(tokens/s and peak memory per GPU against context, per arm and SP); each row's launch log under
OUT_DIR/sequence_parallel_TAG_rows/. Exit status 1 when a row failed other than by running out of memory or
the time budget.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch

from evals.common import parse_recipe_args, recipe_parser
from lm.bench import sequence_parallel as spb
from lm.bench.report import sequence_parallel_markdown, sequence_parallel_plot
from lm.bench.throughput import DEFAULT_PEAK
from lm.config import ConfigError

DEFAULT_RECIPES = ["launch/configs/longvq_125m_sp.yaml", "launch/configs/transformer_125m.yaml"]


def parse_args(argv):
    p = recipe_parser("python -m evals.sequence_parallel", __doc__, overrides_help="config overrides for every recipe",
                      recipe_help="a training recipe (repeat: one per arm)")
    p.add_argument("--nproc", type=int, default=2, help="GPUs (processes) of the SP rows: SP = N")
    p.add_argument("--contexts", nargs="+", type=int, default=[262144, 524288], help="SP rows' contexts (tokens)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--row-timeout", type=float, default=600, help="seconds per row (launch included)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the sweep: later rows are skipped")
    p.add_argument("--peak-flops", type=float, default=None, help="per GPU; default 989e12 on CUDA; CPU: no MFU")
    p.add_argument("--out-dir", default="runs/bench")
    p.add_argument("--tag", default=None, help="name of the output files (default: DEVICE_spN)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one row, inside torchrun
    args = parse_recipe_args(p, argv, DEFAULT_RECIPES)
    if min(args.steps, args.warmup, args.batch) < 1 or args.nproc < 2 or min(args.contexts) < 1:
        p.error("--steps, --warmup, --batch and --contexts must be >= 1, and --nproc >= 2")
    return args


def run(args) -> list[dict]:
    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < args.nproc:
        raise ConfigError(f"--nproc {args.nproc} needs {args.nproc} GPUs, {torch.cuda.device_count()} visible")
    arms = [spb.Arm(r, list(args.overrides)) for r in args.recipes]
    for r in args.recipes:
        if not Path(r).is_file():
            raise FileNotFoundError(f"recipe {r} not found")
    specs = spb.plan_rows(arms, args.contexts, args.nproc, args.batch)  # refuses bad combinations up front
    tag = args.tag or f"{'cuda' if cuda else 'cpu'}_sp{args.nproc}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"sequence_parallel_{tag}.{ext}" for ext in ("json", "md", "png")}
    header = {"tag": tag, "torch": torch.__version__, "nproc": args.nproc, "batch": args.batch, "steps": args.steps,
              "warmup": args.warmup, "recipes": args.recipes, "overrides": args.overrides,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": None}
    print(f"{len(specs)} rows: " + ", ".join(f"{s['arch']} SP={s['sequence_parallel']} @ {s['context']}" for s in specs),
          flush=True)

    def write(rows):
        r = rows[-1]
        header["device"] = header["device"] or r.get("device")  # as the workers saw it (this process uses no GPU)
        tps = "-" if r["tokens_per_s_per_gpu"] is None else f"{r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU"
        mem = "" if r["peak_mem_gib"] is None else f", {r['peak_mem_gib']:.2f} GiB/GPU"
        eff = "" if r.get("efficiency") is None else f", efficiency {r['efficiency']:.3f}"
        xb = f", exchange {r['exchange_bytes_per_layer_per_step'] / 2**20:.2f} MiB/layer/step"
        err = f"  ERROR {r['error']}" if r.get("error") else ""
        print(f"[{len(rows)}/{len(specs)}] {r['arch']:11s} SP={r['sequence_parallel']} ctx {r['context']:>7}: "
              f"{tps}{mem}{eff}{xb} ({r['seconds']} s){err}", flush=True)
        paths["json"].write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        sequence_parallel_markdown(rows, paths["md"], header)
        if "png" in paths:
            try:
                sequence_parallel_plot(rows, paths["png"], f"sequence parallelism, SP={args.nproc}: {header['device'] or '?'}")
            except ImportError as exc:  # the JSON and the table are the results; the plot is a convenience
                print(f"warning: no plot ({exc}); install matplotlib for {paths['png'].name}", flush=True)
                del paths["png"]

    peak = args.peak_flops or (DEFAULT_PEAK if cuda else None)
    rows = spb.run_sweep(arms, args.contexts, args.nproc, work_dir=out_dir / f"sequence_parallel_{tag}_rows",
                         batch=args.batch, steps=args.steps, warmup=args.warmup, row_timeout=args.row_timeout,
                         time_budget=args.time_budget, peak_flops=peak, on_row=write)
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return spb.worker(Path(args.worker))
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: run python -m evals.sequence_parallel as one plain process: it launches torchrun for each "
              "row itself", file=sys.stderr)
        return 2
    try:
        rows = run(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.get("error") and r["error"] != "OOM" and not r["error"].startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
