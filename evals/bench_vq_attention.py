"""Kernel-level benchmark: fused VQ attention vs the chunked PyTorch reference vs SDPA (cuDNN, flash).

Runs on a CUDA device. First checks the fused kernel against the reference (fp32 and bf16, with
bias, odd lengths), then times forward+backward in bf16 at contexts 2K..128K with `--tokens` tokens
per call (B = tokens / T, at least 1), median of `triton.testing.do_bench`. Prints a table; writes
JSON to --json.

    python3 evals/bench_vq_attention.py --json evals/results/vq_attention_kernel_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import json
import math
import platform
import sys

import torch
import torch.nn.functional as F

from lm.ops.vq_attention_ref import chunked_vq_attention


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make(B, T, H, Dk, Dv, S, C, dtype, with_bias=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    cb = torch.randn(H, S, Dk, device="cuda", generator=g)
    codes = torch.randint(0, S, (B, T, H), device="cuda", generator=g)
    k_hat = cb[torch.arange(H, device="cuda")[None, None, :], codes].to(dtype)
    q = torch.randn(B, T, H, Dk, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, T, H, Dv, device="cuda", generator=g).to(dtype)
    bias = (0.1 * torch.randn(H, C + 1, device="cuda", generator=g)) if with_bias else None
    return q, k_hat, v, codes, cb.to(dtype), bias


def fwd_bwd(fn, q, k, v, codes, cb, bias, C, grad, **kwargs):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    b = bias.detach().requires_grad_() if bias is not None else None
    out, _ = fn(*leaves, codes, cb, chunk_size=C, bias=b, **kwargs)
    out.backward(grad)
    return [out] + [x.grad for x in leaves] + ([b.grad] if b is not None else [])


def check(fz):
    """Fused vs reference on small shapes; returns rows of (case, max rel err over out/grads, ok)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    cases = [(2, 64 * 3 + 5, 3, 64, 32, 128, 64), (1, 512 * 3 + 77, 2, 64, 64, 512, 512),
             (1, 256 * 5 + 1, 2, 128, 64, 200, 256)]
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for shape in cases:
            B, T, H, Dk, Dv, S, C = shape
            q, k, v, codes, cb, bias = make(B, T, H, Dk, Dv, S, C, dtype, True, seed=T)
            grad = torch.randn(B, T, H, Dv, device="cuda")
            ref = fwd_bwd(chunked_vq_attention, q.float(), k.float(), v.float(), codes, cb.float(), bias, C, grad)
            got = fwd_bwd(fz.fused_vq_attention, q, k, v, codes, cb, bias, C, grad.to(dtype))
            errs = [rel(a, b) for a, b in zip(got, ref)]
            ok = all(math.isfinite(e) and e <= tol for e in errs)
            rows.append({"dtype": str(dtype), "shape(B,T,H,Dk,Dv,S,C)": shape,
                         "rel_err(out,dq,dk,dv,dbias)": [float(f"{e:.3g}") for e in errs], "tol": tol, "ok": ok})
            print(f"check {str(dtype):15s} {shape} errs={['%.1e' % e for e in errs]} {'OK' if ok else 'FAIL'}",
                  flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    return rows


def bench_ms(fn, warmup=25, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def vq_flops(B, T, H, Dk, Dv, C, S):
    """fwd+bwd FLOPs counted like FlashAttention (bwd = 2.5 fwd): keys per query ~ C/2 + C + S."""
    keys = min(T, C) / 2 + (C if T > C else 0) + (S if T > 2 * C else 0)
    return 3.5 * 2 * B * H * T * keys * (Dk + Dv)


def sdpa_flops(B, T, H, D):
    return 3.5 * 2 * B * H * T * (T / 2) * 2 * D


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--contexts", default="2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--chunks", default="512,256")
    ap.add_argument("--codebook", type=int, default=512)
    ap.add_argument("--no-ref", action="store_true", help="skip timing the chunked PyTorch reference")
    ap.add_argument("--sweep", action="store_true", help="sweep fused kernel configs at 8K first")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lm.ops import vq_attention_fused as fz

    info = {"date": _dt.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "argv": sys.argv, "config": dataclasses.asdict(fz.CONFIG)}
    print(info, flush=True)
    result = {"info": info}
    if not args.skip_check:
        result["check"] = check(fz)
        if not all(r["ok"] for r in result["check"]):
            print("CORRECTNESS CHECK FAILED", flush=True)

    H, Dk, Dv, S = args.heads, args.dk, args.dv, args.codebook
    dtype = torch.bfloat16
    chunks = [int(c) for c in args.chunks.split(",")]

    if args.sweep:  # breakdown and a small config sweep at 8K, C = chunks[0]
        T = 8192
        B = max(1, args.tokens // T)
        C = chunks[0]
        q, k, v, codes, cb, bias = make(B, T, H, Dk, Dv, S, C, dtype)
        grad = torch.randn(B, T, H, Dv, device="cuda", dtype=dtype)
        sweep = []

        def timed(note, make_fn, **changes):
            """Time make_fn(config) with the default kernel config changed by `changes`."""
            config = dataclasses.replace(fz.CONFIG, **changes)
            try:
                ms = bench_ms(make_fn(config), warmup=10, rep=50)
            except Exception as e:  # noqa: BLE001  (a config that fails to compile)
                print("sweep fail", note, changes, repr(e)[:300], flush=True)
                ms = None
            row = dict(dataclasses.asdict(config), note=note, ms=ms)
            sweep.append(row)
            print("sweep", row, flush=True)
            return ms

        def fb(b):
            return lambda config: functools.partial(fwd_bwd, fz.fused_vq_attention, q, k, v, codes, cb, b, C, grad,
                                                    config=config)

        def fwd(b):
            def make_fn(config):
                def f():
                    with torch.no_grad():
                        fz.fused_vq_attention(q, k, v, codes, cb, chunk_size=C, bias=b, config=config)
                return f
            return make_fn

        R = math.ceil(T / C)
        timed("glue: cache tables only", lambda config: lambda: fz.cache_tables(codes, v, None, C, S, R))
        timed("fwd, bias", fwd(bias))
        timed("fwd, no bias", fwd(None))
        timed("fwd+bwd, no bias", fb(None))
        for bg in ("gather", "atomic", "skip"):
            timed(f"fwd+bwd, bias, bias_grad={bg}", fb(bias), bias_grad=bg)
        for fw, bw, st in ((8, 4, 2), (4, 8, 2), (4, 4, 3), (4, 4, 4)):
            timed("fwd+bwd, bias", fb(bias), fwd_warps=fw, bwd_warps=bw, stages=st)
        result["sweep_8k"] = sweep
        print("config", fz.CONFIG, flush=True)

    rows = []
    for T in [int(t) for t in args.contexts.split(",")]:
        B = max(1, args.tokens // T)
        torch.cuda.empty_cache()
        row = {"context": T, "batch": B, "tokens": B * T}
        for C in chunks:
            q, k, v, codes, cb, bias = make(B, T, H, Dk, Dv, S, C, dtype)
            grad = torch.randn(B, T, H, Dv, device="cuda", dtype=dtype)
            torch.cuda.reset_peak_memory_stats()
            ms = bench_ms(lambda: fwd_bwd(fz.fused_vq_attention, q, k, v, codes, cb, bias, C, grad))
            row[f"fused_C{C}_ms"] = ms
            row[f"fused_C{C}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            row[f"fused_C{C}_TFLOPs"] = vq_flops(B, T, H, Dk, Dv, C, S) / ms / 1e9
            with torch.no_grad():
                row[f"fused_C{C}_fwd_ms"] = bench_ms(
                    lambda: fz.fused_vq_attention(q, k, v, codes, cb, chunk_size=C, bias=bias))
            if C == chunks[0]:
                row[f"fused_C{C}_nobias_ms"] = bench_ms(
                    lambda: fwd_bwd(fz.fused_vq_attention, q, k, v, codes, cb, None, C, grad))
            if not args.no_ref and C == chunks[0]:
                torch.cuda.reset_peak_memory_stats()
                row[f"chunked_C{C}_ms"] = bench_ms(
                    lambda: fwd_bwd(chunked_vq_attention, q, k, v, codes, cb, bias, C, grad), warmup=5, rep=30)
                row[f"chunked_C{C}_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            del q, k, v, codes, cb, bias, grad
        qs, ks, vs = (torch.randn(B, H, T, Dk, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        gs = torch.randn(B, H, T, Dk, device="cuda", dtype=dtype)

        def sdpa():
            qs.grad = ks.grad = vs.grad = None
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(gs)

        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    row[f"sdpa_{name}_ms"] = bench_ms(sdpa, warmup=10, rep=50)
                    row[f"sdpa_{name}_TFLOPs"] = sdpa_flops(B, T, H, Dk) / row[f"sdpa_{name}_ms"] / 1e9
            except Exception as e:  # noqa: BLE001
                row[f"sdpa_{name}_ms"] = None
                print(f"sdpa {name} failed at T={T}: {e!r}"[:300], flush=True)
        del qs, ks, vs, gs
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["rows"] = rows
    result["layout"] = {"H": H, "Dk": Dk, "Dv": Dv, "S": S, "chunks": chunks, "dtype": "bfloat16",
                        "bias": True, "timing": "fwd+bwd, median of triton.testing.do_bench"}

    C0 = chunks[0]
    cols = [f"fused_C{c}_ms" for c in chunks] + [f"fused_C{C0}_fwd_ms", f"fused_C{C0}_TFLOPs"]
    cols += ([f"chunked_C{C0}_ms"] if not args.no_ref else []) + ["sdpa_cudnn_ms", "sdpa_flash_ms"]
    print("\n| context | B | " + " | ".join(cols) + " | speedup vs cuDNN |")
    print("|" + "---|" * (len(cols) + 3))
    for r in rows:
        vals = [r.get(c) for c in cols]
        sp = (r["sdpa_cudnn_ms"] / r[f"fused_C{C0}_ms"]) if r.get("sdpa_cudnn_ms") else float("nan")
        print(f"| {r['context']} | {r['batch']} | " + " | ".join("-" if x is None else f"{x:.2f}" for x in vals)
              + f" | {sp:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
