"""Kernel-level benchmark: fused VQ attention vs the chunked PyTorch reference vs SDPA (cuDNN, flash).

Runs on a CUDA device. First checks the fused kernel against the reference (fp32 and bf16, with
bias, odd lengths), then times forward+backward in bf16 at contexts 2K..128K with `--tokens` tokens
per call (B = tokens / T, at least 1), median of `triton.testing.do_bench`. Prints a table; writes
JSON to --json. The method is lm.bench.vq_attention.

    python -m evals.bench_vq_attention --json evals/results/vq_attention_kernel_h200.json

--sweep first times the kernel's parts and launch settings (warps, stages, tile sizes; lm.bench.vq_attention.
config_sweep) at context --sweep-context, C = the first of --chunks; --sweep-only stops after it:

    python -m evals.bench_vq_attention --sweep-only --skip-check --dv 128 --chunks 512
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import platform
import sys

import torch

from evals.common import kernel_bench_unavailable, positive_ints


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m evals.bench_vq_attention", description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--contexts", type=positive_ints, default="2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--chunks", type=positive_ints, default="512,256")
    ap.add_argument("--codebook", type=int, default=512)
    ap.add_argument("--no-ref", action="store_true", help="skip timing the chunked PyTorch reference")
    ap.add_argument("--sweep", action="store_true", help="sweep fused kernel configs first")
    ap.add_argument("--sweep-only", action="store_true", help="the sweep alone (no context rows)")
    ap.add_argument("--sweep-context", type=int, default=8192, help="context length of the sweep")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args(argv)
    if min(args.tokens, args.heads, args.dk, args.dv, args.codebook, args.sweep_context) < 1:
        ap.error("--tokens, --heads, --dk, --dv, --codebook and --sweep-context must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    why = kernel_bench_unavailable("evals.bench_vq_attention")
    if why:
        print(why, file=sys.stderr)
        return 2
    import triton

    from lm.bench import vq_attention as vb
    from lm.ops import vq_attention_fused as fz

    device = torch.device("cuda")
    shape = vb.AttentionShape(args.heads, args.dk, args.dv, args.codebook)
    info = {"date": _dt.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "argv": sys.argv, "config": dataclasses.asdict(fz.CONFIG)}
    print(info, flush=True)
    result = {"info": info}
    if not args.skip_check:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 check compares against an fp32 reference
        result["check"] = vb.check_fused(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        for r in result["check"]:
            print(f"check {r['dtype']:15s} {r['shape(B,T,H,Dk,Dv,S,C)']} errs={r['rel_err(out,dq,dk,dv,dbias)']} "
                  f"{'OK' if r['ok'] else 'FAIL'}", flush=True)
        if not all(r["ok"] for r in result["check"]):
            print("CORRECTNESS CHECK FAILED", flush=True)
    if args.sweep or args.sweep_only:  # breakdown and a small config sweep, C = chunks[0]
        result["sweep_context"] = args.sweep_context
        result["sweep"] = vb.config_sweep(shape, args.tokens, args.sweep_context, args.chunks[0], device)
        for r in result["sweep"]:
            ms = "failed" if r["ms"] is None else f"{r['ms']:.2f} ms"
            print(f"sweep {ms:>9s}  {r['note']}  {r['changes']}", flush=True)
    if not args.sweep_only:
        rows = []
        for T in args.contexts:
            torch.cuda.empty_cache()
            rows.append(vb.context_row(shape, T, args.tokens, args.chunks, device, with_reference=not args.no_ref))
            print(json.dumps(rows[-1]), flush=True)
        result["rows"] = rows
        result["layout"] = {"H": shape.H, "Dk": shape.Dk, "Dv": shape.Dv, "S": shape.S, "chunks": args.chunks,
                            "dtype": "bfloat16", "bias": True,
                            "timing": "fwd+bwd, median of triton.testing.do_bench"}
        print("\n" + "\n".join(vb.summary_table(rows, args.chunks, with_reference=not args.no_ref)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result.get("check") is None or all(r["ok"] for r in result["check"]) else 1


if __name__ == "__main__":
    sys.exit(main())
