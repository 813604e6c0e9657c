"""GPU smoke run: every recipe in launch/configs/ trains a few steps through `python -m lm.train`.

    python -m evals.gpu_smoke [--recipes launch/configs/*.yaml] [--steps 6] [--parallel 3] [--gpus 1]
        [--multi-gpu 2] [--out runs/smoke/smoke_TAG.json]

One JSON row per run with recipe, world_size, tokens_per_s (the trainer's own median after warm-up),
peak_mem_gib, final_loss and status ("ok" or the error), plus the ZeRO stage, compile, precision and
whether the recipe's data was replaced by the built-in corpus (datasets that are not on the machine).
--multi-gpu N (N >= 2) adds N-process torchrun runs of the 125M recipes with ZeRO-2 and ZeRO-3.
Method: lm.bench.smoke. Exit status 1 when any run failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from lm.bench.smoke import ROW_FIELDS, SmokeRun, markdown, run_all

MULTI_GPU_RECIPES = ["launch/configs/longvq_125m.yaml", "launch/configs/transformer_125m.yaml"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.gpu_smoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="*", default=None, help="default: every launch/configs/*.yaml")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--parallel", type=int, default=1, help="single-process runs at once")
    p.add_argument("--gpus", type=int, default=1, help="spread single-process runs over this many GPUs")
    p.add_argument("--multi-gpu", type=int, default=0, metavar="N", help="also N-process ZeRO-2/3 runs of the 125M recipes")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--out", default="runs/smoke/smoke.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.parallel < 1 or args.gpus < 1 or args.multi_gpu == 1 or args.multi_gpu < 0:
        p.error("--steps, --parallel and --gpus must be >= 1, and --multi-gpu 0 or >= 2")
    recipes = args.recipes if args.recipes is not None else sorted(str(x) for x in Path("launch/configs").glob("*.yaml"))
    missing = [r for r in recipes if not Path(r).is_file()]
    if missing:
        p.error(f"recipe not found: {missing[0]}")
    runs = [SmokeRun(r) for r in recipes]
    runs += [SmokeRun(r, args.multi_gpu, (f"parallel.zero_stage={z}",)) for z in (2, 3) for r in MULTI_GPU_RECIPES
             if args.multi_gpu]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# GPU smoke run ({dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}, {args.steps} steps per run)"
    done: list[dict] = []

    def on_row(row):
        done.append(row)
        print(" ".join(f"{k}={row.get(k)}" for k in ROW_FIELDS), flush=True)
        out.write_text(json.dumps(done, indent=1))

    rows = run_all(runs, steps=args.steps, parallel=args.parallel, gpus=args.gpus, timeout=args.timeout,
                   workdir=out.parent / "smoke_runs", on_row=on_row)
    out.write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, header))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
