"""Kernel benchmark for the LongVQ block's non-attention kernels: the EMA scan (Triton) against the FFT path, the
fused quantizer against its PyTorch twin, the element-wise gates (Triton) against theirs, and the sync-free codebook
update. CUDA only.

For each kernel it first checks bf16 results against the reference (relative errors printed, and failing the run
when above the declared tolerance), then times forward and forward+backward (median of triton.testing.do_bench)
at the 125M shape (D = 768, N = 16, 12 heads of 64, S = 512) with --tokens tokens per call (B = tokens / T).
Prints a table and writes JSON (default runs/bench_kernels_<date>.json). The method is lm.bench.kernels.

    python -m evals.bench_kernels
    python -m evals.bench_kernels --contexts 8192 --sweep            # also sweep the kernels' launch settings
    python -m evals.bench_kernels --kernels gates --compile-gates   # the gates: eager, compiled and Triton
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

from evals.common import kernel_bench_unavailable, positive_ints


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evals.bench_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=65536, help="tokens per call (B = tokens / T)")
    p.add_argument("--contexts", type=positive_ints, default="4096,8192,32768,131072", help="comma-separated T values")
    p.add_argument("--kernels", default="ema,quantize,gates,update",
                   help="comma-separated: ema, quantize, gates, update")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep the EMA scan, quantizer and gates CONFIG (first context)")
    p.add_argument("--compile-fft", action="store_true", help="also time the FFT path under torch.compile")
    p.add_argument("--compile-gates", action="store_true", help="also time the gates' reference under torch.compile")
    p.add_argument("--out", default=None, help="JSON path (default runs/bench_kernels_<date>.json)")
    args = p.parse_args(argv)
    if args.tokens < 1:
        p.error("--tokens must be >= 1")
    args.kernels = args.kernels.split(",")
    bad = [k for k in args.kernels if k not in ("ema", "quantize", "gates", "update")]
    if bad:
        p.error(f"--kernels {bad[0]!r}: choose from ema, quantize, gates, update")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    why = kernel_bench_unavailable("evals.bench_kernels")
    if why:
        print(why, file=sys.stderr)
        return 2
    from lm.bench import kernels as kb

    torch.backends.cuda.matmul.allow_tf32 = False
    result = kb.run_kernel_bench(args.kernels, args.tokens, args.contexts, torch.device("cuda"), sweep=args.sweep,
                                 compile_fft=args.compile_fft, compile_gates=args.compile_gates)
    print("\n".join(kb.kernel_table(result["rows"])))
    for name, c in result["checks"].items():
        print(f"check {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in c.items()))
    out = Path(args.out or f"runs/bench_kernels_{_dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if result["failed_checks"]:
        print(f"bf16 check failed for: {', '.join(result['failed_checks'])} (errors above the declared tolerances)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
