"""Kernel benchmark for the LongVQ block's non-attention kernels: the EMA scan (Triton) against the FFT path, the
fused quantizer against its PyTorch twin, and the sync-free codebook update. CUDA only.

For each kernel it first checks bf16 results against the reference (relative errors printed, and failing the run
when above the declared tolerance), then times forward and forward+backward (median of triton.testing.do_bench)
at the 125M shape (D = 768, N = 16, 12 heads of 64, S = 512) with --tokens tokens per call (B = tokens / T).
Prints a table and writes JSON (default runs/bench_kernels_<date>.json).

    python -m evals.bench_kernels
    python -m evals.bench_kernels --contexts 8192 --sweep            # also sweep the kernels' CONFIG
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import json
import platform
import sys
from pathlib import Path

import torch

HBM_BYTES_PER_S = 4.8e12  # H200
FP32_FLOPS = 67e12  # CUDA-core fp32 (FMA = 2 flops), H100/H200 SXM
BF16_FLOPS = 790e12  # dense tensor-core bf16
TOL_BF16 = {"ema_out": 1e-2, "ema_grad": 2e-2, "commit": 1e-2, "codes_equal": 0.97}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def bench_ms(fn, warmup=10, rep=50):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


def ema_model(tokens, D, N, chunk):
    """Bytes and FLOPs of the Triton scan per call (fwd, bwd): bf16 activations, fp32 chunk states."""
    act = tokens * D * 2
    states = (tokens // chunk + 1) * D * N * 4
    fwd_bytes = 2 * act + act + act + 4 * states  # x twice, out, SiLU pre-activation, chunk states
    bwd_bytes = 2 * 3 * act + act + 10 * states  # x, dout, pre-activation twice; dx; partials and states
    fwd_flops = 2 * tokens * D * N * 4  # FMAs per (token, d, n): 1 chunk state + 3 scan
    bwd_flops = 2 * tokens * D * N * 11  # 7 forward-order + 4 reverse-order
    return fwd_bytes, bwd_bytes, fwd_flops, bwd_flops


def ema_check(D, N, T, B):
    from lm.model.ema import MultiDimEMA
    from lm.ops.ema_scan import ema_scan_reference
    from lm.ops.ema_scan_fused import ema_scan_triton

    ema = MultiDimEMA(D, N).cuda()
    x = torch.randn(B, T, D, device="cuda").bfloat16()
    pb, q = (t.detach() for t in ema.coefficients())
    params = [pb, q, ema.gamma.detach(), ema.omega.detach()]
    h0 = torch.randn(B, D, N, device="cuda")
    gy = torch.randn(B, T, D, device="cuda")
    out = {}

    def grads(fn, xx):
        leaves = [xx.detach().clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
        s = h0.clone().requires_grad_()
        y, h = fn(leaves[0], *leaves[1:], scale=ema.scale, state=s, return_state=True, silu=True)
        g = torch.autograd.grad((y.float() * gy).sum() + h.sum(), leaves + [s])
        return [y.detach(), h.detach()] + list(g)

    ref = grads(lambda x, *a, **k: ema_scan_reference(x.float(), *a, **k), x)
    got = grads(ema_scan_triton, x)
    for name, a, b in zip(("out", "h_T", "dx", "dpb", "dq", "dgamma", "domega", "dh0"), got, ref):
        out[name] = rel(a, b)
    with torch.no_grad():
        y_fft, _ = ema(x.float(), state=h0, silu=True)
    out["out_vs_fft"] = rel(got[0], y_fft)
    ok = out["out"] <= TOL_BF16["ema_out"] and out["out_vs_fft"] <= TOL_BF16["ema_out"] and all(
        out[k] <= TOL_BF16["ema_grad"] for k in ("dx", "dpb", "dq", "dgamma", "domega", "dh0"))
    return out, ok


def ema_rows(tokens, contexts, D, N, compile_fft):
    from lm.model.ema import MultiDimEMA
    from lm.ops import ema_scan_fused as fz

    rows = []
    for T in contexts:
        B = max(1, tokens // T)
        x = torch.randn(B, T, D, device="cuda").bfloat16().requires_grad_()
        gy = torch.randn(B, T, D, device="cuda").bfloat16()
        arms = {"fft": MultiDimEMA(D, N, impl="fft").cuda(), "triton_scan": MultiDimEMA(D, N, impl="auto").cuda()}
        arms["triton_scan"].load_state_dict(arms["fft"].state_dict())
        fns = {name: (lambda m=m: m(x, silu=True)[0]) for name, m in arms.items()}
        if compile_fft:
            fns["fft_compiled"] = torch.compile(fns["fft"])
        fb, bb, ff, bf = ema_model(B * T, D, N, fz.CONFIG.chunk)
        for name, fn in fns.items():
            fwd = bench_ms(lambda: fn())
            fwdbwd = bench_ms(lambda: fn().backward(gy))
            row = dict(kernel="ema", arm=name, T=T, B=B, fwd_ms=fwd, fwd_bwd_ms=fwdbwd)
            if name == "triton_scan":
                row.update(fwd_GBps=fb / fwd / 1e6, ideal_fwd_ms=max(fb / HBM_BYTES_PER_S, ff / FP32_FLOPS) * 1e3,
                           ideal_fwd_bwd_ms=max((fb + bb) / HBM_BYTES_PER_S, (ff + bf) / FP32_FLOPS) * 1e3)
            rows.append(row)
        base = next(r for r in rows if r["arm"] == "fft" and r["T"] == T)
        for r in rows:
            if r["T"] == T and r["kernel"] == "ema":
                r["speedup_fwd_bwd_vs_fft"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


def ema_sweep(tokens, T, D, N):
    from lm.ops import ema_scan_fused as fz
    from lm.model.ema import MultiDimEMA

    B = max(1, tokens // T)
    m = MultiDimEMA(D, N, impl="auto").cuda()
    x = torch.randn(B, T, D, device="cuda").bfloat16().requires_grad_()
    gy = torch.randn(B, T, D, device="cuda").bfloat16()
    rows = []
    for chunk, bd, warps, unroll in itertools.product((64, 128, 256), (16, 32, 64), (1, 2, 4, 8), (4, 8, 16)):
        if bd * N // (32 * warps) < 1:
            continue
        config = dataclasses.replace(fz.CONFIG, chunk=chunk, block_d=bd, warps=warps, unroll=unroll)

        def step(config=config):  # the module's scan call (MultiDimEMA.forward) with this launch config
            pb, q = m.coefficients()
            y, _ = fz.ema_scan_triton(x, pb, q, m.gamma.to(q.dtype), m.omega.to(q.dtype), scale=m.scale, silu=True,
                                      config=config)
            y.backward(gy)

        try:
            ms = bench_ms(step, warmup=3, rep=10)
        except Exception as e:  # noqa: BLE001  (a configuration that does not compile: report and go on)
            print(f"  sweep chunk={chunk} block_d={bd} warps={warps} unroll={unroll}: failed ({e!r:.80})")
            continue
        rows.append(dict(kernel="ema_sweep", T=T, B=B, chunk=chunk, block_d=bd, warps=warps, unroll=unroll,
                         fwd_bwd_ms=ms))
    rows.sort(key=lambda r: r["fwd_bwd_ms"])
    return rows


# --------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------


def quantize_model(tokens, H, d, S):
    keys = tokens * H * d * 2
    fwd_bytes = 2 * keys + tokens * H * 8  # k in, k_hat out, codes; codebook and statistics stay in L2
    bwd_bytes = 3 * keys + tokens * H * 8
    flops = 2 * tokens * H * S * d
    return fwd_bytes, bwd_bytes, flops


def quantize_rows(tokens, contexts, H, d, S):
    from lm.ops.vq_quantize import vq_quantize_reference
    from lm.ops.vq_quantize_fused import vq_quantize_fused

    rows, checks = [], {}
    T = contexts[0]
    B = max(1, tokens // T)
    g = torch.Generator(device="cuda").manual_seed(0)
    cb = torch.randn(H, S, d, device="cuda", generator=g)
    k = torch.randn(B, T, H, d, device="cuda", generator=g).bfloat16().requires_grad_()

    def stats():
        return (torch.zeros(H, S, device="cuda"), torch.zeros(H, S, d, device="cuda"), torch.zeros(2, device="cuda"))

    st_ref, st_fused = stats(), stats()
    _, codes_ref, commit_ref = vq_quantize_reference(k, cb, stats=st_ref)
    _, codes, commit = vq_quantize_fused(k, cb, stats=st_fused)
    checks["codes_equal"] = (codes == codes_ref).float().mean().item()
    checks["commit"] = rel(commit, commit_ref)
    checks["stat_sum"] = rel(st_fused[1], st_ref[1])
    ok = checks["codes_equal"] >= TOL_BF16["codes_equal"] and checks["commit"] <= TOL_BF16["commit"]
    fb, bb, fl = quantize_model(B * T, H, d, S)
    for name, fn in (("reference", vq_quantize_reference), ("fused", vq_quantize_fused)):
        st = stats()

        def fwd():
            return fn(k, cb, stats=st)

        def fwd_bwd():
            k_hat, _, c = fn(k, cb, stats=st)
            (k_hat.float().sum() + c).backward()

        row = dict(kernel="quantize", arm=name, T=T, B=B, fwd_ms=bench_ms(fwd), fwd_bwd_ms=bench_ms(fwd_bwd))
        if name == "fused":
            row.update(ideal_fwd_ms=max(fb / HBM_BYTES_PER_S, fl / BF16_FLOPS) * 1e3,
                       ideal_fwd_bwd_ms=max((fb + bb) / HBM_BYTES_PER_S, fl / BF16_FLOPS) * 1e3)
        rows.append(row)
    rows[1]["speedup_fwd_bwd_vs_reference"] = rows[0]["fwd_bwd_ms"] / rows[1]["fwd_bwd_ms"]
    return rows, checks, ok


def quantize_sweep(tokens, T, H, d, S):
    from lm.ops import vq_quantize_fused as fq

    B = max(1, tokens // T)
    cb = torch.randn(H, S, d, device="cuda")
    k = torch.randn(B, T, H, d, device="cuda").bfloat16()
    st = (torch.zeros(H, S, device="cuda"), torch.zeros(H, S, d, device="cuda"), torch.zeros(2, device="cuda"))
    rows = []
    for bm, bs, warps, stages in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (1, 2, 3)):
        config = dataclasses.replace(fq.CONFIG, block_m=bm, block_s=bs, warps=warps, stages=stages)
        try:
            ms = bench_ms(lambda config=config: fq.vq_quantize_fused(k, cb, stats=st, config=config), warmup=3, rep=10)
        except Exception as e:  # noqa: BLE001  (a configuration that does not compile: report and go on)
            print(f"  sweep block_m={bm} block_s={bs} warps={warps} stages={stages}: failed ({e!r:.80})")
            continue
        rows.append(dict(kernel="quantize_sweep", T=T, B=B, block_m=bm, block_s=bs, warps=warps, stages=stages,
                         fwd_ms=ms))
    rows.sort(key=lambda r: r["fwd_ms"])
    return rows


def update_rows(H, d, S, layers):
    """apply_update for `layers` quantizers (one optimizer step; timed as forwards + updates minus forwards), split
    and batch re-seeding, once under torch.cuda.set_sync_debug_mode('error') (a host synchronisation raises)."""
    from lm.model.quantizer import VectorQuantizer

    rows = []
    for mode in ("split", "batch"):
        vqs = [VectorQuantizer(H, S, d, dead_code_reseed=mode).cuda().train() for _ in range(layers)]
        k = torch.randn(2, 1024, H, d, device="cuda") * 0.1 + 1.0

        def step():
            for vq in vqs:
                vq(k)
            for vq in vqs:
                vq.apply_update()

        step()
        torch.cuda.synchronize()
        for vq in vqs:
            vq(k)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for vq in vqs:
                vq.apply_update()
            sync_free = True
        except RuntimeError:
            sync_free = False
        finally:
            torch.cuda.set_sync_debug_mode("default")
        def forwards():
            for vq in vqs:
                vq(k)

        step_ms, fwd_ms = bench_ms(step), bench_ms(forwards)
        forwards()  # leave no statistics pending
        for vq in vqs:
            vq.reset_stats()
        rows.append(dict(kernel="codebook_update", arm=mode, layers=layers, step_ms=step_ms - fwd_ms,
                         sync_free=sync_free))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=65536, help="tokens per call (B = tokens / T)")
    p.add_argument("--contexts", default="4096,8192,32768,131072", help="comma-separated T values")
    p.add_argument("--kernels", default="ema,quantize,update", help="comma-separated: ema, quantize, update")
    p.add_argument("--sweep", action="store_true", help="also sweep the EMA scan and quantizer CONFIG (first context)")
    p.add_argument("--compile-fft", action="store_true", help="also time the FFT path under torch.compile")
    p.add_argument("--out", default=None, help="JSON path (default runs/bench_kernels_<date>.json)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("evals.bench_kernels needs a CUDA GPU (none found); run it on the GPU machine", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("evals.bench_kernels needs Triton (pip install triton)", file=sys.stderr)
        return 2
    contexts = [int(c) for c in args.contexts.split(",")]
    kernels = set(args.kernels.split(","))
    D, N, H, d, S = 768, 16, 12, 64, 512
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, checks, failed = [], {}, []
    if "ema" in kernels:
        checks["ema"], ok = ema_check(D, N, min(contexts[0], 8192), 2)
        failed += [] if ok else ["ema"]
        rows += ema_rows(args.tokens, contexts, D, N, args.compile_fft)
        if args.sweep:
            rows += ema_sweep(args.tokens, contexts[0], D, N)[:10]
    if "quantize" in kernels:
        qrows, checks["quantize"], ok = quantize_rows(args.tokens, contexts, H, d, S)
        failed += [] if ok else ["quantize"]
        rows += qrows
        if args.sweep:
            rows += quantize_sweep(args.tokens, contexts[0], H, d, S)[:10]
    if "update" in kernels:
        rows += update_rows(H, d, S, layers=12)
    print(f"{'kernel':<16}{'arm':<14}{'T':>8}{'B':>4}{'fwd ms':>10}{'fwd+bwd ms':>12}{'ideal':>9}{'speedup':>9}")
    for r in rows:
        if r["kernel"] == "ema_sweep":
            print(f"{'ema_sweep':<16}{'c%d bd%d w%d u%d' % (r['chunk'], r['block_d'], r['warps'], r['unroll']):<14}"
                  f"{r['T']:>8}{r['B']:>4}{'':>10}{r['fwd_bwd_ms']:>12.3f}")
        elif r["kernel"] == "quantize_sweep":
            print(f"{'quantize_sweep':<16}{'m%d s%d w%d st%d' % (r['block_m'], r['block_s'], r['warps'], r['stages']):<14}"
                  f"{r['T']:>8}{r['B']:>4}{r['fwd_ms']:>10.3f}")
        elif r["kernel"] == "codebook_update":
            print(f"{'codebook_update':<16}{r['arm']:<14}{'':>8}{'':>4}{r['step_ms']:>10.3f}{'':>12}"
                  f"{'':>9}  sync_free={r['sync_free']}")
        else:
            speed = r.get("speedup_fwd_bwd_vs_fft", r.get("speedup_fwd_bwd_vs_reference"))
            ideal = r.get("ideal_fwd_bwd_ms")
            print(f"{r['kernel']:<16}{r['arm']:<14}{r['T']:>8}{r['B']:>4}{r['fwd_ms']:>10.3f}{r['fwd_bwd_ms']:>12.3f}"
                  f"{(f'{ideal:.3f}' if ideal else ''):>9}{(f'{speed:.2f}x' if speed else ''):>9}")
    for name, c in checks.items():
        print(f"check {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in c.items()))
    out = Path(args.out or f"runs/bench_kernels_{_dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from lm.ops import ema_scan_fused, vq_quantize_fused

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), tokens=args.tokens, tolerances=TOL_BF16,
                ema_config=dataclasses.asdict(ema_scan_fused.CONFIG),
                quantize_config=dataclasses.asdict(vq_quantize_fused.CONFIG))
    out.write_text(json.dumps(dict(meta=meta, checks=checks, rows=rows, failed_checks=failed), indent=1))
    print(f"wrote {out}")
    if failed:
        print(f"bf16 check failed for: {', '.join(failed)} (errors above the declared tolerances)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
