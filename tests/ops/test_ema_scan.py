"""The EMA scan: the PyTorch chunked scan and the Triton kernel against the recurrence (MultiDimEMA.step), the FFT
convolution and a closed form; outputs, final states and the gradients of every input.

The Triton tests carry the `gpu` + `triton_interpret` markers: on a GPU they run on CUDA (fp32 and bf16), on the
CPU tests/ops/test_fused_interpreter.py runs them under Triton's interpreter (fp32).

Tolerances (declared once here):
  * reference scan vs recurrence / FFT, float64: tests/tolerances.py ELEMENTWISE[float64] (same math, other order);
  * Triton fp32 vs the float64 reference: relative error ||a - b|| / ||b|| <= 1e-5 per tensor (fp32 state and
    sums; measured ~2e-7 under the interpreter);
  * Triton bf16 vs the fp32 reference on the same bf16 inputs: 1e-2 (output rounded to bf16 once; measured on
    the H200 by the lead).
"""

from __future__ import annotations


import pytest
import torch

from lm.model.ema import MultiDimEMA
from lm.ops.ema_scan import ema_scan, ema_scan_reference, resolve_ema_impl, resolve_impl
from tests.fused_kernels import DEVICE, INTERPRET, gpu_only
from tests.tolerances import assert_close

TOL_FP32, TOL_BF16 = 1e-5, 1e-2
NAMES = ("out", "h_T", "dx", "dpb", "dq", "dgamma", "domega", "dh0")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make(B, T, D, N, seed=0, dtype=torch.float64, device="cpu"):
    """Random EMA parameters (as the module initialises them), input and incoming state."""
    torch.manual_seed(seed)
    ema = MultiDimEMA(D, N).to(dtype)
    pb, q = (t.detach() for t in ema.coefficients())
    x = torch.randn(B, T, D, dtype=dtype)
    h0 = torch.randn(B, D, N, dtype=dtype)
    to = lambda t: t.detach().to(device)  # noqa: E731
    return ema, to(x), to(pb), to(q), to(ema.gamma), to(ema.omega), to(h0)


def run(fn, x, pb, q, gamma, omega, h0, *, scale, silu, gy, gh, **kw):
    """Outputs and the gradients of (x, pb, q, gamma, omega, h0) under upstream gradients gy (on out), gh (on h_T)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, pb, q, gamma, omega)]
    s = h0.detach().clone().requires_grad_() if h0 is not None else None
    out, h_T = fn(*leaves, scale=scale, state=s, return_state=True, silu=silu, **kw)
    loss = (out.double() * gy.double()).sum() + (h_T.double() * gh.double()).sum()
    grads = torch.autograd.grad(loss, leaves + ([s] if s is not None else []))
    return [out.detach(), h_T.detach()] + [g.detach() for g in grads]


def check(got, want, tol):
    """Every tensor within relative error `tol` (AssertionError naming the first that is not)."""
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err = rel(a, b)
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"


# --------------------------------------------------------------------------------------------
# Reference scan (CPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("T", [1, 13, 37, 64])
@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_reference_matches_recurrence_and_fft(chunk, T, with_state):
    ema, x, pb, q, gamma, omega, h0 = make(2, T, 5, 4, seed=T)
    h0 = h0 if with_state else None
    y, h = ema_scan_reference(x, pb, q, gamma, omega, scale=ema.scale, state=h0, return_state=True, chunk_size=chunk)
    y_rec, h_rec = ema.step(x, h0)
    assert_close(y, y_rec, msg="out vs recurrence")
    assert_close(h, h_rec, msg="h_T vs recurrence")
    with torch.no_grad():
        y_fft, h_fft = ema._forward(x, h0, True)
    assert_close(y, y_fft, msg="out vs FFT")
    assert_close(h, h_fft, msg="h_T vs FFT")


@pytest.mark.parametrize("silu", [False, True], ids=["linear", "silu"])
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "state"])
def test_reference_gradients_match_recurrence(with_state, silu):
    """Gradients of x, the module parameters (delta, alpha, beta, gamma, omega) and h_0, upstream on out and h_T."""
    torch.manual_seed(3)
    ema = MultiDimEMA(4, 3, impl="scan").double()
    x = torch.randn(2, 23, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True) if with_state else None
    gy, gh = torch.randn(2, 23, 4, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    leaves = [x] + list(ema.parameters()) + ([h0] if with_state else [])
    act = torch.nn.functional.silu if silu else (lambda t: t)

    def loss(y, h):
        return (y * gy).sum() + (h * gh).sum()

    got = torch.autograd.grad(loss(*ema(x, h0, return_state=True, silu=silu)), leaves)
    y, h = ema.step(x, h0)
    want = torch.autograd.grad(loss(act(y), h), leaves)
    for a, b in zip(got, want):
        assert_close(a, b, msg="grad")


def test_reference_closed_form():
    """N = 2, pb = 1, q = (1/2, 1/4), gamma = (1, 2), scale 1, omega 3, x = (1, 0, 0, 2), h_0 = (4, 8):
    h_t = q h_{t-1} + x_t, y_t = h_t[0] + 2 h_t[1] + 3 x_t."""
    x = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64).view(1, 4, 1)
    pb = torch.ones(1, 2, dtype=torch.float64)
    q = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    gamma = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    omega = torch.tensor([3.0], dtype=torch.float64)
    h0 = torch.tensor([[[4.0, 8.0]]], dtype=torch.float64)
    # h: (3, 3), (1.5, 0.75), (0.75, 0.1875), (2.375, 2.046875)
    want = torch.tensor([3 + 6 + 3, 1.5 + 1.5, 0.75 + 0.375, 2.375 + 4.09375 + 6], dtype=torch.float64).view(1, 4, 1)
    for chunk in (1, 3, 4):
        y, h = ema_scan_reference(x, pb, q, gamma, omega, scale=1.0, state=h0, return_state=True, chunk_size=chunk)
        assert_close(y, want, msg=f"chunk {chunk}")
        assert_close(h, torch.tensor([[[2.375, 2.046875]]], dtype=torch.float64), msg="h_T")


@pytest.mark.parametrize("silu", [False, True], ids=["linear", "silu"])
def test_module_scan_equals_fft_and_streams(silu):
    torch.manual_seed(5)
    fft = MultiDimEMA(6, 4, impl="fft").double()
    scan = MultiDimEMA(6, 4, impl="scan").double()
    scan.load_state_dict(fft.state_dict())
    x = torch.randn(2, 70, 6, dtype=torch.float64)
    y_fft, h_fft = fft(x, return_state=True, silu=silu)
    y_scan, h_scan = scan(x, return_state=True, silu=silu)
    assert_close(y_scan, y_fft, msg="out")
    assert_close(h_scan, h_fft, msg="h_T")
    y1, h1 = scan(x[:, :33], return_state=True, silu=silu)
    y2, _ = scan(x[:, 33:], state=h1, silu=silu)
    assert_close(torch.cat([y1, y2], 1), y_fft, msg="two calls with the state between = one call")


def test_dispatch_on_cpu():
    x = torch.randn(1, 8, 4)
    assert resolve_ema_impl("fft", x, 4) == "fft"
    assert resolve_ema_impl("auto", x, 4) == "fft"  # the Triton scan runs on CUDA only
    assert resolve_ema_impl("scan", x, 4) == "reference"
    assert resolve_impl("auto", x, 4) == "reference"
    with pytest.raises(ValueError, match="ema_impl"):
        resolve_ema_impl("fast", x, 4)
    with pytest.raises(ValueError, match="ema impl"):
        MultiDimEMA(4, 4, impl="fast")
    ema = MultiDimEMA(4, 4)
    pb, q = ema.coefficients()
    y, _ = ema_scan(x, pb, q, ema.gamma, ema.omega, scale=ema.scale, impl="auto")
    assert_close(y, ema.step(x)[0], msg="auto on CPU")


# --------------------------------------------------------------------------------------------
# Triton kernel (CUDA, or the CPU under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------

SHAPES = [
    # B, T, D, N, chunk
    (2, 37, 6, 4, 8),  # odd T (last chunk of 5), D smaller than the channel block
    (1, 48, 40, 16, 16),  # D over two channel blocks (masked), T a multiple of the chunk
    (2, 5, 3, 2, 16),  # T shorter than one chunk
    (1, 1, 4, 4, 8),  # a single token
]


def _fused():
    if not (torch.cuda.is_available() or INTERPRET):
        pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1)")
    pytest.importorskip("triton")
    from lm.ops import ema_scan_fused

    return ema_scan_fused


def _compare(shape, with_state, silu, seed=0):
    B, T, D, N, chunk = shape
    fz = _fused()
    ema, x, pb, q, gamma, omega, h0 = make(B, T, D, N, seed=seed, device=DEVICE)
    h0 = h0 if with_state else None
    gy = torch.randn(B, T, D, dtype=torch.float64, device=DEVICE)
    gh = torch.randn(B, D, N, dtype=torch.float64, device=DEVICE)
    want = run(ema_scan_reference, x, pb, q, gamma, omega, h0, scale=ema.scale, silu=silu, gy=gy, gh=gh)
    f32 = [t.float() if t is not None else None for t in (x, pb, q, gamma, omega, h0)]
    got = run(fz.ema_scan_triton, *f32, scale=ema.scale, silu=silu, gy=gy, gh=gh, chunk_size=chunk)
    return fz, ema, got, want, (x, pb, q, gamma, omega, h0, gy, gh, chunk)


@pytest.mark.parametrize("silu", [False, True], ids=["linear", "silu"])
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_triton_matches_reference(shape, with_state, silu):
    _, _, got, want, _ = _compare(shape, with_state, silu)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    check(got, want, TOL_FP32)


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_a_wrong_kernel_fails_the_check():
    """The check is not vacuous: the Triton kernel with the decay off by one step (h_t = q (pb x_t + q h_{t-1}),
    i.e. pb -> q pb) or with the output one step late fails it."""
    fz, ema, got, want, (x, pb, q, gamma, omega, h0, gy, gh, chunk) = _compare(SHAPES[0], True, False, seed=1)
    check(got, want, TOL_FP32)
    f32 = [t.float() for t in (x, pb, q, gamma, omega, h0)]
    off_by_one = run(lambda x, pb, q, *a, **k: fz.ema_scan_triton(x, q * pb, q, *a, **k), *f32,
                     scale=ema.scale, silu=False, gy=gy, gh=gh, chunk_size=chunk)
    with pytest.raises(AssertionError, match="rel err"):
        check(off_by_one, want, TOL_FP32)

    def late(x, *a, **k):
        out, h = fz.ema_scan_triton(x, *a, **k)
        return torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1), h

    with pytest.raises(AssertionError, match="out: rel err"):
        check(run(late, *f32, scale=ema.scale, silu=False, gy=gy, gh=gh, chunk_size=chunk), want, TOL_FP32)


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_triton_streaming_equals_one_pass():
    fz = _fused()
    ema, x, pb, q, gamma, omega, _ = make(2, 29, 5, 4, seed=2, dtype=torch.float32, device=DEVICE)
    kw = dict(scale=ema.scale, silu=True, chunk_size=8)
    full, h_full = fz.ema_scan_triton(x, pb, q, gamma, omega, return_state=True, **kw)
    y1, h1 = fz.ema_scan_triton(x[:, :11], pb, q, gamma, omega, return_state=True, **kw)
    y2, h2 = fz.ema_scan_triton(x[:, 11:], pb, q, gamma, omega, state=h1, return_state=True, **kw)
    assert rel(torch.cat([y1, y2], 1), full) <= TOL_FP32
    assert rel(h2, h_full) <= TOL_FP32


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("silu", [False, True], ids=["linear", "silu"])
def test_triton_bf16_matches_fp32_reference(silu):
    fz = _fused()
    ema, x, pb, q, gamma, omega, h0 = make(2, 1000, 96, 16, seed=4, device=DEVICE)
    xb = x.to(torch.bfloat16)
    gy = torch.randn(2, 1000, 96, dtype=torch.float64, device=DEVICE)
    gh = torch.randn(2, 96, 16, dtype=torch.float64, device=DEVICE)
    want = run(ema_scan_reference, xb.float(), *(t.float() for t in (pb, q, gamma, omega, h0)), scale=ema.scale,
               silu=silu, gy=gy, gh=gh)
    got = run(fz.ema_scan_triton, xb, *(t.float() for t in (pb, q, gamma, omega, h0)), scale=ema.scale, silu=silu,
              gy=gy, gh=gh)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    check(got, want, TOL_BF16)


@gpu_only
@pytest.mark.gpu
def test_auto_picks_triton_on_cuda():
    fz = _fused()
    x = torch.randn(2, 300, 64, device="cuda")
    assert fz.supports(x, 16) and not fz.supports(x.cpu(), 16) and not fz.supports(x, 12)
    assert resolve_ema_impl("auto", x, 16) == "triton" and resolve_ema_impl("auto", x, 12) == "fft"
    assert resolve_ema_impl("scan", x, 12) == "reference"
    ema = MultiDimEMA(64, 16, impl="auto").cuda()
    ref = MultiDimEMA(64, 16, impl="fft").cuda()
    ref.load_state_dict(ema.state_dict())
    assert rel(ema(x, silu=True)[0], ref(x, silu=True)[0]) <= TOL_FP32


def test_model_with_scan_equals_model_with_fft(tiny_model_config):
    """The whole LongVQ model (SiLU fused into the EMA call) gives the same logits and gradients with either path."""
    from lm.model import build_model

    models = []
    for impl in ("fft", "scan"):
        cfg = tiny_model_config()
        cfg.longvq.ema_impl = impl
        torch.manual_seed(0)
        models.append(build_model(cfg).train())
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randint(0, 32, (2, 19))
    outs, grads = [], []
    for m in models:
        out = m(x)
        (out.logits.pow(2).mean() + out.aux_loss).backward()
        outs.append(out.logits.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert rel(outs[1], outs[0]) <= 1e-5
    assert rel(grads[1], grads[0]) <= 1e-4
