"""The fused cross-entropy kernel (lm/ops/linear_ce_fused.py) against its PyTorch twin
(`lm.ops.linear_ce.ce_grad_inplace_reference`), and the chunked LM-head loss with impl="triton" against the
full-logits reference. Marked `gpu` + `triton_interpret`: CUDA on a GPU, the CPU under Triton's interpreter
through tests/ops/test_fused_interpreter.py.

Tolerances (the kernel's log-sum-exp is float32 in a different summation order; its exp is the GPU's fast
exp): per-row losses within 1e-5 absolute + 1e-5 relative; the in-place gradient in float32 within 1e-6
absolute + 1e-5 relative; in bf16 / fp16 within one rounding step of the stored dtype (relative 2^-7 / 2^-10)
plus 1e-6 absolute (Triton's interpreter truncates float32 -> bf16 where the GPU rounds to nearest); float64 logits (interpreter only) carry the kernel's float32 accuracy. The LM-head loss
and the gradients of h and w: float32 within 1e-5 / 1e-4 of the full-logits reference; bf16 compute dtype
within 2e-3 of the chunked torch path (the same bf16 GEMMs; the gradient rounds to bf16 in both).
"""

from __future__ import annotations

import os

import pytest
import torch

from lm.ops.linear_ce import (IGNORE_INDEX, ce_grad_inplace, ce_grad_inplace_reference, linear_cross_entropy,
                              resolve_impl)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.triton_interpret,
    pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET), reason="needs a CUDA GPU (or TRITON_INTERPRET=1)"),
]
gpu_only = pytest.mark.skipif(INTERPRET, reason="CUDA-specific (sizes, dispatch on CUDA tensors)")
pytest.importorskip("triton")
from lm.ops import linear_ce_fused as fce  # noqa: E402

SMALL = fce.KernelConfig(block_v=64, warps=2)  # several tiles per row at small V
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.float64: (1e-6, 1e-5),
            torch.bfloat16: (1e-6, 2.0 ** -7), torch.float16: (1e-6, 2.0 ** -10)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if INTERPRET else [])


def make(n, V, dtype, seed=0, spread=4.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (torch.randn(n, V, device=DEVICE, generator=g) * spread).to(dtype)
    targets = torch.randint(0, V, (n,), device=DEVICE, generator=g)
    return logits, targets


def both(logits, targets, scale, config=SMALL):
    """(loss, grad) of the reference and of the kernel on copies of the same logits."""
    ref, out = logits.clone(), logits.clone()
    ref_loss = ce_grad_inplace_reference(ref, targets, scale)
    out_loss = fce.ce_grad_inplace_triton(out, targets, scale, config=config)
    return (ref_loss, ref), (out_loss, out)


def check_close(ref, out, dtype):
    (ref_loss, ref_g), (out_loss, out_g) = ref, out
    assert out_loss.dtype == ref_loss.dtype == torch.promote_types(dtype, torch.float32)
    assert out_g.dtype == dtype
    torch.testing.assert_close(out_loss, ref_loss, atol=1e-5, rtol=1e-5, equal_nan=True)
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(out_g.double(), ref_g.double(), atol=atol, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [203, 64, 1])
def test_kernel_matches_reference(dtype, V):
    """V not a multiple of the tile (203), exactly one tile (64), a single class (1); ignored rows."""
    logits, targets = make(11, V, dtype)
    targets[[0, 4, 10]] = IGNORE_INDEX
    ref, out = both(logits, targets, 0.37)
    check_close(ref, out, dtype)
    assert (out[1][[0, 4, 10]] == 0).all() and (out[0][[0, 4, 10]] == 0).all()
    assert out[0].isfinite().all() and out[1].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_is_softmax_minus_onehot(dtype):
    """Independent of the twin: the gradient is softmax - onehot and the loss -log softmax[target], in float64."""
    logits, targets = make(6, 150, dtype, seed=3)
    x = logits.double().clone()  # a copy: the kernel overwrites the logits
    loss = fce.ce_grad_inplace_triton(logits, targets, 1.0, config=SMALL)
    p = torch.softmax(x, -1)
    expected_loss = -torch.log_softmax(x, -1).gather(1, targets[:, None])[:, 0]
    onehot = torch.nn.functional.one_hot(targets, 150).double()
    torch.testing.assert_close(loss.double(), expected_loss, atol=1e-5, rtol=1e-5)
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(logits.double(), p - onehot, atol=atol + 1e-6, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_ignored_chunk_gives_zero_loss_and_zero_gradient(dtype):
    logits, targets = make(5, 130, dtype, seed=1)
    targets[:] = IGNORE_INDEX
    ref, out = both(logits, targets, 0.5)
    check_close(ref, out, dtype)
    assert (out[0] == 0).all() and (out[1] == 0).all()


def test_out_of_range_target_is_nan_in_both():
    logits, targets = make(4, 90, torch.float32, seed=2)
    targets[1], targets[2] = 90, -3
    ref, out = both(logits, targets, 1.0)
    check_close(ref, out, torch.float32)
    for loss, g in (ref, out):
        assert loss[1].isnan() and loss[2].isnan() and g[1].isnan().all() and g[2].isnan().all()
        assert loss[[0, 3]].isfinite().all() and g[[0, 3]].isfinite().all()


def test_strided_rows_and_out_buffer():
    """A chunk that is a column slice of a wider buffer (row stride > V); the loss written into `out`."""
    wide, targets = make(7, 160, torch.float32, seed=4)
    ref_buf, out_buf = wide.clone(), wide.clone()
    ref_loss = ce_grad_inplace_reference(ref_buf[:, :150], targets.clamp(max=149), 2.0)
    out_loss = torch.full((7,), -1.0, device=DEVICE)
    got = fce.ce_grad_inplace_triton(out_buf[:, :150], targets.clamp(max=149), 2.0, out=out_loss, config=SMALL)
    assert got.data_ptr() == out_loss.data_ptr()
    torch.testing.assert_close(out_loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_buf, ref_buf, atol=1e-6, rtol=1e-5)
    assert torch.equal(out_buf[:, 150:], wide[:, 150:])  # columns past V untouched


def test_explicit_triton_through_the_dispatcher():
    logits, targets = make(9, 77, torch.float32, seed=5)
    targets[3] = IGNORE_INDEX
    ref = logits.clone()
    ref_loss, used_ref = ce_grad_inplace(ref, targets, 0.25, "torch")
    loss, used = ce_grad_inplace(logits, targets, 0.25, "triton")
    assert (used_ref, used) == ("torch", "triton")
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref, atol=1e-6, rtol=1e-5)


def _value_and_grads(impl, chunk, dtype, compute_dtype, N=45, d=24, V=131, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h = torch.randn(N, d, device=DEVICE, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, d, device=DEVICE, generator=g) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    t[::7] = IGNORE_INDEX
    t[16:24] = IGNORE_INDEX  # with chunk 8, one chunk has no valid target
    loss = linear_cross_entropy(h, w, t, chunk, compute_dtype, impl)
    (1.7 * loss).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [8, 16, 45, 100])
def test_linear_ce_triton_equals_full_logits_float32(chunk):
    ref = _value_and_grads("torch", 0, torch.float32, torch.float32)
    out = _value_and_grads("triton", chunk, torch.float32, torch.float32)
    for a, b, name in zip(out, ref, ("loss", "dh", "dw")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}, chunk {chunk}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_ce_triton_bf16_compute_matches_torch_path_and_reference(dtype):
    """bf16 matmuls (h, w fp32 under autocast-like compute_dtype, or bf16 themselves): the triton and torch
    chunk paths agree closely, and both stay near the full-logits reference."""
    full = _value_and_grads("torch", 0, dtype, torch.bfloat16)
    torch_path = _value_and_grads("torch", 8, dtype, torch.bfloat16)
    triton_path = _value_and_grads("triton", 8, dtype, torch.bfloat16)
    for a, b, c, name in zip(triton_path, torch_path, full, ("loss", "dh", "dw")):
        assert a.dtype == b.dtype == c.dtype, name
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=2e-3, msg=lambda m: f"{name} vs torch: {m}")
        torch.testing.assert_close(a.float(), c.float(), atol=1e-2, rtol=1e-2, msg=lambda m: f"{name} vs full: {m}")


@gpu_only
def test_auto_picks_triton_on_cuda():
    logits, _ = make(4, 100, torch.bfloat16)
    assert resolve_impl("auto", logits) == "triton"
    assert resolve_impl("auto", logits.double()) == "torch"
    assert resolve_impl("auto", logits.cpu()) == "torch"


@gpu_only
@pytest.mark.parametrize("V", [32000, 50304])
def test_kernel_bf16_at_vocabulary_size(V):
    logits, targets = make(256, V, torch.bfloat16, spread=3.0)
    targets[::9] = IGNORE_INDEX
    ref, out = both(logits, targets, 1.0 / 4096, config=fce.CONFIG)
    check_close(ref, out, torch.bfloat16)


@gpu_only
@pytest.mark.slow
def test_kernel_addresses_rows_past_2_31_elements():
    """n V > 2^31: the last rows (past the 32-bit range) are compared with the reference on those rows."""
    n, V = 65_600, 32_768  # 2.15e9 elements, 4.3 GB in bf16
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2 ** 30:
        pytest.skip("needs 16 GiB of GPU memory")
    logits = torch.empty(n, V, device="cuda", dtype=torch.bfloat16).normal_(0, 3)
    targets = torch.randint(0, V, (n,), device="cuda")
    tail = logits[-5:].clone()
    ref_loss = ce_grad_inplace_reference(tail, targets[-5:], 0.5)
    loss = fce.ce_grad_inplace_triton(logits, targets, 0.5)
    check_close((ref_loss, tail), (loss[-5:], logits[-5:]), torch.bfloat16)
