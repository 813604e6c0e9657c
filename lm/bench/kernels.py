"""Benchmark of the LongVQ block's non-attention kernels: the EMA scan (Triton) against the FFT path, the fused
quantizer against its PyTorch twin, the block's element-wise gates (Triton) against theirs (eager and, when asked,
under torch.compile), and the sync-free codebook update.

    result = run_kernel_bench(("ema", "quantize", "gates", "update"), tokens=65536, contexts=[8192, 131072],
                              device=torch.device("cuda"))
    print("\n".join(kernel_table(result["rows"])))

For each kernel it first checks the results in `dtype` (bf16 on the GPU) against the fp32 reference (relative
errors in result["checks"], kernels above the declared tolerance in result["failed_checks"]), then times forward
and forward+backward (lm.bench.timing.Timer: median of triton.testing.do_bench on CUDA) at one block of the 125M model
(`BlockShape`: D = 768, N = 16, 12 heads of 64, S = 512) with `tokens` tokens per call (B = tokens / T). The
Triton kernels are called directly, so the benchmark also runs on the CPU under TRITON_INTERPRET=1 (fp32, tiny
shapes; timings there mean nothing). `ideal_*` columns are the roofline bound of the kernel's own traffic and
FLOPs on an H200.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import platform
from dataclasses import dataclass
from typing import Iterable

import torch
import triton

from lm.bench.timing import Timer, rel_error
from lm.model.ema import MultiDimEMA
from lm.model.quantizer import VectorQuantizer, apply_updates
from lm.ops import ema_scan_fused, gates_fused, vq_quantize_fused
from lm.ops.ema_scan import ema_scan_reference
from lm.ops.gates import gate_split_reference, gated_residual_reference
from lm.ops.vq_quantize import vq_quantize_reference

log = logging.getLogger(__name__)

HBM_BYTES_PER_S = 4.8e12  # H200
FP32_FLOPS = 67e12  # CUDA-core fp32 (FMA = 2 flops), H100/H200 SXM
BF16_FLOPS = 790e12  # dense tensor-core bf16
TOL_BF16 = {"ema_out": 1e-2, "ema_grad": 2e-2, "commit": 1e-2, "codes_equal": 0.97, "gates": 1e-2}
KERNELS = ("ema", "quantize", "gates", "update")
EMA_SWEEP = tuple((c, 32 * w, w, u) for c, w, u in itertools.product((64, 128, 256), (1, 2, 4), (4, 8, 16)))
"""(chunk, block_d, warps, unroll) launch settings the EMA sweep tries (one channel per thread: block_d = 32 warps)."""
QUANTIZE_SWEEP = tuple(itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (1, 2, 3)))
"""(block_m, block_s, warps, stages) launch settings the quantizer sweep tries."""
GATES_SWEEP = tuple(itertools.product((8, 16, 32, 64), (64, 128, 256), (2, 4, 8)))
"""(block_m, block_n, warps) launch settings the gates sweep tries (one KernelConfig for both sites)."""
ARM_MS = (10, 50)
"""(warm-up, timed) milliseconds per compared arm (Timer)."""
SWEEP_MS = (3, 10)
"""(warm-up, timed) milliseconds per swept launch setting."""


@dataclass(frozen=True)
class BlockShape:
    """Sizes of one LongVQ block: model width D, EMA dimensions N, H heads of d, codebook S."""

    D: int = 768
    N: int = 16
    H: int = 12
    d: int = 64
    S: int = 512

    @property
    def gate_sizes(self) -> tuple[int, int, int]:
        """(D, z_dim, E) of the gates: z_dim = H d (q/k head dim d), E = 2 D."""
        return self.D, self.H * self.d, 2 * self.D


def ema_cost(tokens: int, D: int, N: int, chunk: int) -> tuple[int, int, int, int]:
    """(forward bytes, backward bytes, forward FLOPs, backward FLOPs) of the Triton scan per call: activations in
    2-byte dtypes, fp32 chunk states."""
    act = tokens * D * 2
    states = (tokens // chunk + 1) * D * N * 4
    fwd_bytes = 2 * act + act + act + 4 * states  # x twice, out, SiLU pre-activation, chunk states
    bwd_bytes = 2 * 3 * act + act + 10 * states  # x, dout, pre-activation twice; dx; partials and states
    fwd_flops = 2 * tokens * D * N * 4  # FMAs per (token, d, n): 1 chunk state + 3 scan
    bwd_flops = 2 * tokens * D * N * 11  # 7 forward-order + 4 reverse-order
    return fwd_bytes, bwd_bytes, fwd_flops, bwd_flops


def quantize_cost(tokens: int, H: int, d: int, S: int) -> tuple[int, int, int]:
    """(forward bytes, backward bytes, FLOPs) of the fused quantizer per call (codebook and statistics in L2)."""
    keys = tokens * H * d * 2
    return 2 * keys + tokens * H * 8, 3 * keys + tokens * H * 8, 2 * tokens * H * S * d


def roofline_ms(nbytes: float, flops: float, peak_flops: float) -> float:
    """The lower bound max(bytes / HBM bandwidth, FLOPs / peak) in milliseconds."""
    return max(nbytes / HBM_BYTES_PER_S, flops / peak_flops) * 1e3


def ema_scan_call(m: MultiDimEMA, x: torch.Tensor, config=ema_scan_fused.CONFIG) -> torch.Tensor:
    """The module's SiLU output through the Triton scan, called as MultiDimEMA.forward calls it."""
    pb, q = m.coefficients()
    y, _ = ema_scan_fused.ema_scan_triton(x, pb, q, m.gamma.to(q.dtype), m.omega.to(q.dtype), scale=m.scale,
                                          silu=True, config=config)
    return y


def ema_check(shape: BlockShape, T: int, B: int, device: torch.device, dtype=torch.bfloat16) -> tuple[dict, bool]:
    """Relative errors of the Triton scan in `dtype` (output, final state, every gradient) against the fp32 reference,
    and of its output against the FFT path; ok when within TOL_BF16."""
    D, N = shape.D, shape.N
    ema = MultiDimEMA(D, N).to(device)
    x = torch.randn(B, T, D, device=device).to(dtype)
    pb, q = (t.detach() for t in ema.coefficients())
    params = [pb, q, ema.gamma.detach(), ema.omega.detach()]
    h0 = torch.randn(B, D, N, device=device)
    gy = torch.randn(B, T, D, device=device)

    def grads(fn):
        leaves = [x.detach().clone().requires_grad_()] + [p.clone().requires_grad_() for p in params]
        s = h0.clone().requires_grad_()
        y, h = fn(leaves[0], *leaves[1:], scale=ema.scale, state=s, return_state=True, silu=True)
        g = torch.autograd.grad((y.float() * gy).sum() + h.sum(), leaves + [s])
        return [y.detach(), h.detach()] + list(g)

    ref = grads(lambda xx, *a, **k: ema_scan_reference(xx.float(), *a, **k))
    got = grads(ema_scan_fused.ema_scan_triton)
    errors = {name: rel_error(a, b) for name, a, b in
              zip(("out", "h_T", "dx", "dpb", "dq", "dgamma", "domega", "dh0"), got, ref)}
    with torch.no_grad():
        y_fft, _ = ema(x.float(), state=h0, silu=True)
    errors["out_vs_fft"] = rel_error(got[0], y_fft)
    ok = errors["out"] <= TOL_BF16["ema_out"] and errors["out_vs_fft"] <= TOL_BF16["ema_out"] and all(
        errors[k] <= TOL_BF16["ema_grad"] for k in ("dx", "dpb", "dq", "dgamma", "domega", "dh0"))
    return errors, ok


def ema_rows(shape: BlockShape, tokens: int, contexts: Iterable[int], device: torch.device,
             dtype=torch.bfloat16, compile_fft: bool = False) -> list[dict]:
    """Per context: the FFT path ('fft', and 'fft_compiled' under torch.compile when asked) and the Triton scan
    ('triton_scan', with its achieved GB/s and roofline), forward and forward+backward, speed-up against fft."""
    D, N = shape.D, shape.N
    timer, rows = Timer(device), []
    for T in contexts:
        B = max(1, tokens // T)
        x = torch.randn(B, T, D, device=device).to(dtype).requires_grad_()
        gy = torch.randn(B, T, D, device=device).to(dtype)
        fft = MultiDimEMA(D, N, impl="fft").to(device)
        fns = {"fft": lambda: fft(x, silu=True)[0], "triton_scan": lambda: ema_scan_call(fft, x)}
        if compile_fft:
            fns["fft_compiled"] = torch.compile(fns["fft"])
        fb, bb, ff, bf = ema_cost(B * T, D, N, ema_scan_fused.CONFIG.chunk)
        ideal = {"triton_scan": lambda fwd: dict(fwd_GBps=fb / fwd / 1e6, ideal_fwd_ms=roofline_ms(fb, ff, FP32_FLOPS),
                                                 ideal_fwd_bwd_ms=roofline_ms(fb + bb, ff + bf, FP32_FLOPS))}
        rows += _arm_rows("ema", fns, T, B, timer, lambda fn: fn().backward(gy), ideal, "speedup_fwd_bwd_vs_fft")
    return rows


def _arm_rows(kernel: str, fns: dict, T: int, B: int, timer, fwd_bwd, ideal: dict, speedup_key: str) -> list[dict]:
    """One row per arm (name -> forward callable): forward and forward+backward (fwd_bwd(fn) runs both) times,
    ideal[name](fwd_ms) -> extra fields where given, and the forward+backward speed-up against the first arm."""
    out = []
    for name, fn in fns.items():
        fwd = timer(fn, *ARM_MS)
        row = dict(kernel=kernel, arm=name, T=T, B=B, fwd_ms=fwd, fwd_bwd_ms=timer(lambda fn=fn: fwd_bwd(fn), *ARM_MS))
        if name in ideal:
            row.update(ideal[name](fwd))
        out.append(row)
    for r in out:
        r[speedup_key] = out[0]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return out


def ema_sweep(shape: BlockShape, tokens: int, T: int, device: torch.device, dtype=torch.bfloat16,
              grid: Iterable[tuple] = EMA_SWEEP) -> list[dict]:
    """Forward+backward of the Triton scan per (chunk, block_d, warps, unroll) in grid, fastest first; settings
    that do not compile are logged and left out."""
    D, N = shape.D, shape.N
    B = max(1, tokens // T)
    m = MultiDimEMA(D, N).to(device)
    x = torch.randn(B, T, D, device=device).to(dtype).requires_grad_()
    gy = torch.randn(B, T, D, device=device).to(dtype)
    timer, rows = Timer(device), []
    for chunk, bd, warps, unroll in grid:
        config = dataclasses.replace(ema_scan_fused.CONFIG, chunk=chunk, block_d=bd, warps=warps, unroll=unroll)
        try:
            ms = timer(lambda: ema_scan_call(m, x, config).backward(gy), *SWEEP_MS)
        except Exception as e:  # noqa: BLE001  (a setting that does not compile: report and go on)
            log.warning("EMA sweep chunk=%d block_d=%d warps=%d unroll=%d failed: %.80r", chunk, bd, warps, unroll, e)
            continue
        rows.append(dict(kernel="ema_sweep", T=T, B=B, chunk=chunk, block_d=bd, warps=warps, unroll=unroll,
                         fwd_bwd_ms=ms))
    return sorted(rows, key=lambda r: r["fwd_bwd_ms"])


def _quantizer_stats(shape: BlockShape, device: torch.device):
    H, S, d = shape.H, shape.S, shape.d
    return (torch.zeros(H, S, device=device), torch.zeros(H, S, d, device=device), torch.zeros(2, device=device))


def quantize_rows(shape: BlockShape, tokens: int, T: int, device: torch.device,
                  dtype=torch.bfloat16) -> tuple[list[dict], dict, bool]:
    """(rows, checks, ok): the fused quantizer against vq_quantize_reference at context T, keys in dtype. Checks:
    the fraction of equal codes, the commitment loss's and the code sums' relative errors."""
    H, d, S = shape.H, shape.d, shape.S
    B = max(1, tokens // T)
    g = torch.Generator(device=device).manual_seed(0)
    cb = torch.randn(H, S, d, device=device, generator=g)
    k = torch.randn(B, T, H, d, device=device, generator=g).to(dtype).requires_grad_()
    st_ref, st_fused = _quantizer_stats(shape, device), _quantizer_stats(shape, device)
    _, codes_ref, commit_ref = vq_quantize_reference(k, cb, stats=st_ref)
    _, codes, commit = vq_quantize_fused.vq_quantize_fused(k, cb, stats=st_fused)
    checks = {"codes_equal": (codes == codes_ref).float().mean().item(), "commit": rel_error(commit, commit_ref),
              "stat_sum": rel_error(st_fused[1], st_ref[1])}
    ok = checks["codes_equal"] >= TOL_BF16["codes_equal"] and checks["commit"] <= TOL_BF16["commit"]
    fb, bb, fl = quantize_cost(B * T, H, d, S)
    timer, rows = Timer(device), []
    for name, fn in (("reference", vq_quantize_reference), ("fused", vq_quantize_fused.vq_quantize_fused)):
        st = _quantizer_stats(shape, device)

        def fwd_bwd(fn=fn, st=st):
            k_hat, _, c = fn(k, cb, stats=st)
            (k_hat.float().sum() + c).backward()

        fwd = timer(lambda fn=fn, st=st: fn(k, cb, stats=st), *ARM_MS)
        row = dict(kernel="quantize", arm=name, T=T, B=B, fwd_ms=fwd, fwd_bwd_ms=timer(fwd_bwd, *ARM_MS))
        if name == "fused":
            row.update(ideal_fwd_ms=roofline_ms(fb, fl, BF16_FLOPS), ideal_fwd_bwd_ms=roofline_ms(fb + bb, fl, BF16_FLOPS))
        rows.append(row)
    rows[1]["speedup_fwd_bwd_vs_reference"] = rows[0]["fwd_bwd_ms"] / rows[1]["fwd_bwd_ms"]
    return rows, checks, ok


def quantize_sweep(shape: BlockShape, tokens: int, T: int, device: torch.device, dtype=torch.bfloat16,
                   grid: Iterable[tuple] = QUANTIZE_SWEEP) -> list[dict]:
    """Forward of the fused quantizer per (block_m, block_s, warps, stages) in grid, fastest first; settings that do
    not compile are logged and left out."""
    H, d, S = shape.H, shape.d, shape.S
    B = max(1, tokens // T)
    cb = torch.randn(H, S, d, device=device)
    k = torch.randn(B, T, H, d, device=device).to(dtype)
    st = _quantizer_stats(shape, device)
    timer, rows = Timer(device), []
    for bm, bs, warps, stages in grid:
        config = dataclasses.replace(vq_quantize_fused.CONFIG, block_m=bm, block_s=bs, warps=warps, stages=stages)
        try:
            ms = timer(lambda: vq_quantize_fused.vq_quantize_fused(k, cb, stats=st, config=config), *SWEEP_MS)
        except Exception as e:  # noqa: BLE001  (a setting that does not compile: report and go on)
            log.warning("quantizer sweep block_m=%d block_s=%d warps=%d stages=%d failed: %.80r", bm, bs, warps,
                        stages, e)
            continue
        rows.append(dict(kernel="quantize_sweep", T=T, B=B, block_m=bm, block_s=bs, warps=warps, stages=stages,
                         fwd_ms=ms))
    return sorted(rows, key=lambda r: r["fwd_ms"])


def gates_cost(tokens: int, D: int, dz: int, E: int) -> tuple[int, int]:
    """(forward bytes, backward bytes) of both gate kernels per call, activations in 2-byte dtypes."""
    W = 2 * D + dz + E
    fwd = tokens * 2 * ((W + D + E + 2 * dz) + 5 * D)  # split: mx in, u r q k out; residual: hx y u x in, out
    bwd = tokens * 2 * ((2 * W + 2 * D + E + 2 * dz) + 7 * D)  # split: mx, grads in, dmx out; residual
    return fwd, bwd


def _gates_inputs(shape: BlockShape, B: int, T: int, device: torch.device, dtype):
    D, dz, E = shape.gate_sizes
    g = torch.Generator(device=device).manual_seed(0)
    mx = torch.randn(B, T, 2 * D + dz + E, device=device, generator=g).to(dtype)
    scale = torch.randn(2, dz, device=device, generator=g) * 0.5 + 1
    shift = torch.randn(2, dz, device=device, generator=g) * 0.5
    y, x = (torch.randn(B, T, D, device=device, generator=g).to(dtype) for _ in range(2))
    return [t.requires_grad_() for t in (mx, scale, shift, y, x)]


def gates_step(split, residual, shape: BlockShape, inputs) -> list[torch.Tensor]:
    """Both gate sites as the block calls them (q, k and r feed stand-ins for the attention and the output
    projection): the block output and the q, k, r it used."""
    mx, scale, shift, y, x = inputs
    u, q, k, r, hx = split(mx, scale, shift, sizes=shape.gate_sizes, heads=shape.H, query_norm=False,
                           key_norm="rms", dtype=mx.dtype)
    return [residual(hx, y, u, x, residual="add"), q, k, r]


def _gates_fused_pair(config=None):
    if config is None:
        return gates_fused.gate_split_triton, gates_fused.gated_residual_triton
    return (functools.partial(gates_fused.gate_split_triton, config=config),
            functools.partial(gates_fused.gated_residual_triton, config=config))


def _fwd_bwd(fn):
    outs = fn()
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def gates_check(shape: BlockShape, T: int, B: int, device: torch.device, dtype=torch.bfloat16) -> tuple[dict, bool]:
    """Relative errors of the Triton gates in `dtype` (outputs, every input's gradient) against the references on
    the same inputs; ok when within TOL_BF16["gates"]."""
    inputs = _gates_inputs(shape, B, T, device, dtype)
    ups = None

    def run(split, residual):
        nonlocal ups
        outs = gates_step(split, residual, shape, inputs)
        if ups is None:
            ups = [torch.randn_like(o, dtype=torch.float32) for o in outs]
        grads = torch.autograd.grad(sum((o.float() * g).sum() for o, g in zip(outs, ups)), inputs)
        return [o.detach() for o in outs] + list(grads)

    ref = run(gate_split_reference, gated_residual_reference)
    got = run(*_gates_fused_pair())
    names = ("out", "q", "k", "r", "d_mx", "d_scale", "d_shift", "d_y", "d_x")
    errors = {name: rel_error(a, b) for name, a, b in zip(names, got, ref)}
    return errors, all(e <= TOL_BF16["gates"] for e in errors.values())


def gates_rows(shape: BlockShape, tokens: int, contexts: Iterable[int], device: torch.device, dtype=torch.bfloat16,
               compile_reference: bool = False) -> list[dict]:
    """Per context: both gate sites by PyTorch's eager ops ('reference'), under torch.compile when asked
    ('reference_compiled') and by the Triton kernels ('triton'), forward and forward+backward, speed-up against
    the eager reference (the roofline of the kernels' own traffic in `ideal_*`)."""
    D, dz, E = shape.gate_sizes
    timer, rows = Timer(device), []
    for T in contexts:
        B = max(1, tokens // T)
        inputs = _gates_inputs(shape, B, T, device, dtype)
        arms = {"reference": (gate_split_reference, gated_residual_reference), "triton": _gates_fused_pair()}
        fns = {name: (lambda pair=pair: gates_step(*pair, shape, inputs)) for name, pair in arms.items()}
        if compile_reference:
            fns["reference_compiled"] = torch.compile(fns["reference"])
        fb, bb = gates_cost(B * T, D, dz, E)
        ideal = {"triton": lambda fwd: dict(ideal_fwd_ms=roofline_ms(fb, 0, BF16_FLOPS),
                                            ideal_fwd_bwd_ms=roofline_ms(fb + bb, 0, BF16_FLOPS))}
        rows += _arm_rows("gates", fns, T, B, timer, _fwd_bwd, ideal, "speedup_fwd_bwd_vs_reference")
    return rows


def gates_sweep(shape: BlockShape, tokens: int, T: int, device: torch.device, dtype=torch.bfloat16,
                grid: Iterable[tuple] = GATES_SWEEP) -> list[dict]:
    """Forward+backward of both Triton gate sites per (block_m, block_n, warps) in grid, fastest first; settings
    that do not compile are logged and left out."""
    B = max(1, tokens // T)
    inputs = _gates_inputs(shape, B, T, device, dtype)
    timer, rows = Timer(device), []
    for bm, bn, warps in grid:
        pair = _gates_fused_pair(dataclasses.replace(gates_fused.CONFIG, block_m=bm, block_n=bn, warps=warps))
        try:
            ms = timer(lambda: _fwd_bwd(lambda: gates_step(*pair, shape, inputs)), *SWEEP_MS)
        except Exception as e:  # noqa: BLE001  (a setting that does not compile: report and go on)
            log.warning("gates sweep block_m=%d block_n=%d warps=%d failed: %.80r", bm, bn, warps, e)
            continue
        rows.append(dict(kernel="gates_sweep", T=T, B=B, block_m=bm, block_n=bn, warps=warps, fwd_bwd_ms=ms))
    return sorted(rows, key=lambda r: r["fwd_bwd_ms"])


def update_rows(shape: BlockShape, layers: int, device: torch.device, tokens: int = 2048) -> list[dict]:
    """The codebook update of `layers` quantizers as the trainer runs it (lm.model.quantizer.apply_updates: one
    batched step for all layers; timed as forwards + update minus
    forwards), split and batch re-seeding. On CUDA the update also runs once under
    torch.cuda.set_sync_debug_mode('error'): sync_free is False when it synchronises with the host (None off CUDA)."""
    timer, rows = Timer(device), []
    for mode in ("split", "batch"):
        vqs = [VectorQuantizer(shape.H, shape.S, shape.d, dead_code_reseed=mode).to(device).train()
               for _ in range(layers)]
        k = torch.randn(2, tokens // 2, shape.H, shape.d, device=device) * 0.1 + 1.0

        def forwards():
            for vq in vqs:
                vq(k)

        def step():
            forwards()
            apply_updates(vqs)

        step()
        forwards()
        sync_free = _runs_without_sync(lambda: apply_updates(vqs)) if device.type == "cuda" else None
        step_ms, fwd_ms = timer(step, *ARM_MS), timer(forwards, *ARM_MS)
        forwards()  # leave no statistics pending
        for vq in vqs:
            vq.reset_stats()
        rows.append(dict(kernel="codebook_update", arm=mode, layers=layers, step_ms=step_ms - fwd_ms,
                         sync_free=sync_free))
    return rows


def _runs_without_sync(fn) -> bool:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def run_kernel_bench(kernels: Iterable[str], tokens: int, contexts: list[int], device: torch.device, *,
                     dtype=torch.bfloat16, shape: BlockShape = BlockShape(),
                     sweep: bool = False, sweep_grids: tuple = (EMA_SWEEP, QUANTIZE_SWEEP, GATES_SWEEP),
                     top: int = 10,
                     compile_fft: bool = False, compile_gates: bool = False, update_layers: int = 12,
                     update_tokens: int = 2048) -> dict:
    """The whole benchmark: {"meta", "checks", "rows", "failed_checks"}.

    kernels: any of KERNELS. The checks and the sweeps (the `top` fastest settings of each grid) use the first
    context; the EMA and gates checks at most 8192 tokens of it, two sequences. compile_fft / compile_gates: also
    time the FFT path / the gates' reference under torch.compile."""
    kernels = set(kernels)
    unknown = kernels - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}: choose from {', '.join(KERNELS)}")
    rows, checks, failed = [], {}, []
    if "ema" in kernels:
        checks["ema"], ok = ema_check(shape, min(contexts[0], 8192), 2, device, dtype)
        failed += [] if ok else ["ema"]
        rows += ema_rows(shape, tokens, contexts, device, dtype, compile_fft)
        if sweep:
            rows += ema_sweep(shape, tokens, contexts[0], device, dtype, sweep_grids[0])[:top]
    if "quantize" in kernels:
        qrows, checks["quantize"], ok = quantize_rows(shape, tokens, contexts[0], device, dtype)
        failed += [] if ok else ["quantize"]
        rows += qrows
        if sweep:
            rows += quantize_sweep(shape, tokens, contexts[0], device, dtype, sweep_grids[1])[:top]
    if "gates" in kernels:
        checks["gates"], ok = gates_check(shape, min(contexts[0], 8192), 2, device, dtype)
        failed += [] if ok else ["gates"]
        rows += gates_rows(shape, tokens, contexts, device, dtype, compile_gates)
        if sweep:
            rows += gates_sweep(shape, tokens, contexts[0], device, dtype, sweep_grids[2])[:top]
    if "update" in kernels:
        rows += update_rows(shape, update_layers, device, update_tokens)
    meta = dict(device=device_name(device), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), tokens=tokens, dtype=str(dtype).replace("torch.", ""),
                tolerances=TOL_BF16, ema_config=dataclasses.asdict(ema_scan_fused.CONFIG),
                quantize_config=dataclasses.asdict(vq_quantize_fused.CONFIG),
                gates_config=dataclasses.asdict(gates_fused.CONFIG))
    return dict(meta=meta, checks=checks, rows=rows, failed_checks=failed)


def kernel_table(rows: list[dict]) -> list[str]:
    """The rows as a fixed-width text table (sweep rows name their launch settings)."""
    lines = [f"{'kernel':<16}{'arm':<14}{'T':>8}{'B':>4}{'fwd ms':>10}{'fwd+bwd ms':>12}{'ideal':>9}{'speedup':>9}"]
    for r in rows:
        if r["kernel"] == "ema_sweep":
            arm = "c%d bd%d w%d u%d" % (r["chunk"], r["block_d"], r["warps"], r["unroll"])
            lines.append(f"{'ema_sweep':<16}{arm:<14}{r['T']:>8}{r['B']:>4}{'':>10}{r['fwd_bwd_ms']:>12.3f}")
        elif r["kernel"] == "gates_sweep":
            arm = "m%d n%d w%d" % (r["block_m"], r["block_n"], r["warps"])
            lines.append(f"{'gates_sweep':<16}{arm:<14}{r['T']:>8}{r['B']:>4}{'':>10}{r['fwd_bwd_ms']:>12.3f}")
        elif r["kernel"] == "quantize_sweep":
            arm = "m%d s%d w%d st%d" % (r["block_m"], r["block_s"], r["warps"], r["stages"])
            lines.append(f"{'quantize_sweep':<16}{arm:<14}{r['T']:>8}{r['B']:>4}{r['fwd_ms']:>10.3f}")
        elif r["kernel"] == "codebook_update":
            lines.append(f"{'codebook_update':<16}{r['arm']:<14}{'':>8}{'':>4}{r['step_ms']:>10.3f}{'':>12}"
                         f"{'':>9}  sync_free={r['sync_free']}")
        else:
            speed = r.get("speedup_fwd_bwd_vs_fft", r.get("speedup_fwd_bwd_vs_reference"))
            ideal = r.get("ideal_fwd_bwd_ms")
            lines.append(f"{r['kernel']:<16}{r['arm']:<14}{r['T']:>8}{r['B']:>4}{r['fwd_ms']:>10.3f}"
                         f"{r['fwd_bwd_ms']:>12.3f}{(f'{ideal:.3f}' if ideal else ''):>9}"
                         f"{(f'{speed:.2f}x' if speed else ''):>9}")
    return lines


__all__ = ["BlockShape", "KERNELS", "TOL_BF16", "EMA_SWEEP", "QUANTIZE_SWEEP", "GATES_SWEEP", "ARM_MS", "SWEEP_MS",
           "ema_cost", "quantize_cost", "gates_cost", "roofline_ms", "ema_scan_call", "ema_check", "ema_rows",
           "ema_sweep", "quantize_rows", "quantize_sweep", "gates_check", "gates_rows", "gates_step", "gates_sweep",
           "update_rows", "device_name", "run_kernel_bench", "kernel_table"]
