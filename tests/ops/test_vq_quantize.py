"""The fused quantizer kernel against its PyTorch twin (lm/ops/vq_quantize.py): codes, k_hat, the commitment loss,
the per-code statistics and the gradients. Marked `gpu` + `triton_interpret`: CUDA on a GPU, the CPU under
Triton's interpreter through tests/ops/test_fused_interpreter.py (fp32).

Tolerances:
  * fp32: codes equal (inputs are random, so no two distances tie within rounding; exact ties, tested apart,
    go to the lower index in both); k_hat equal; commitment loss, statistics and gradients within relative
    error 1e-5 (summation order, atomics);
  * bf16 (GPU): the distance tiles are bf16, so near-ties may pick another code: at least 97 % of the codes
    equal, and a differing code is no more than 1e-2 ||k||^2 farther than the best one.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from lm.model.quantizer import VectorQuantizer
from lm.ops.vq_quantize import resolve_impl, vq_quantize, vq_quantize_reference
from tests.fused_kernels import DEVICE, FUSED_MARKS, gpu_only

pytestmark = FUSED_MARKS
triton = pytest.importorskip("triton")
from lm.ops import vq_quantize_fused as fq  # noqa: E402

TOL = 1e-5


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make(B, T, H, d, S, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    codebook = torch.randn(H, S, d, device=DEVICE, generator=g)
    k = (torch.randn(B, T, H, d, device=DEVICE, generator=g) * 1.3).to(dtype)
    return k, codebook


def run(fn, k, codebook, with_stats, grad, w):
    """(k_hat, codes, commit, stats, dk) with loss (k_hat * grad).sum() + w * commit."""
    H, S, d = codebook.shape
    stats = (torch.zeros(H, S, device=DEVICE), torch.zeros(H, S, d, device=DEVICE),
             torch.zeros(2, device=DEVICE)) if with_stats else None
    leaf = k.detach().clone().requires_grad_()
    k_hat, codes, commit = fn(leaf, codebook, stats=stats)
    (dk,) = torch.autograd.grad((k_hat.float() * grad).sum() + w * commit, leaf)
    return k_hat.detach(), codes, commit.detach(), stats, dk


SHAPES = [
    # B, T, H, d, S
    (2, 37, 3, 16, 100),  # rows and codes not multiples of the blocks
    (1, 64, 2, 64, 64),
    (1, 5, 1, 32, 200),
    (2, 50, 2, 128, 70),
]


@pytest.mark.parametrize("block_m", [None, 16], ids=["default_rows", "16_rows"])
@pytest.mark.parametrize("with_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_matches_reference(shape, with_stats, block_m):
    """block_m 16: many row blocks per head (the per-program partial sums, masked last block)."""
    config = fq.CONFIG if block_m is None else dataclasses.replace(fq.CONFIG, block_m=block_m)
    B, T, H, d, S = shape
    k, cb = make(B, T, H, d, S, seed=sum(shape))
    grad = torch.randn(B, T, H, d, device=DEVICE)
    ref = run(vq_quantize_reference, k, cb, with_stats, grad, 0.7)
    got = run(functools.partial(fq.vq_quantize_fused, config=config), k, cb, with_stats, grad, 0.7)
    assert got[1].dtype == torch.long and torch.equal(got[1], ref[1]), "codes"
    assert got[0].dtype == k.dtype and torch.equal(got[0], ref[0]), "k_hat"
    assert rel(got[2], ref[2]) <= TOL, "commit"
    assert rel(got[4], ref[4]) <= TOL, "dk"
    if with_stats:
        assert torch.equal(got[3][0], ref[3][0]), "count"
        for name, a, b in zip(("sum", "err"), got[3][1:], ref[3][1:]):
            assert rel(a, b) <= TOL, name


def test_straight_through_gradient_is_the_identity():
    k, cb = make(1, 30, 2, 32, 50, seed=3)
    leaf = k.clone().requires_grad_()
    k_hat, _, _ = fq.vq_quantize_fused(leaf, cb)
    g = torch.randn_like(k)
    (dk,) = torch.autograd.grad(k_hat, leaf, g)
    assert torch.equal(dk, g)


def test_exact_ties_take_the_lower_index():
    """Duplicated codewords: both implementations return the first of the equal codes. Small integers make every
    distance exact, so the ties are exact in any summation order."""
    g = torch.Generator(device=DEVICE).manual_seed(4)
    cb = torch.randint(-3, 4, (2, 96, 16), device=DEVICE, generator=g).float()
    k = torch.randint(-3, 4, (1, 40, 2, 16), device=DEVICE, generator=g).float()
    cb[:, 70:] = cb[:, 10:36]  # codes 70.. copy codes 10..35 (other code block, same distances)
    cb[:, 5] = cb[:, 3]  # same block
    k[0, :10] = cb[torch.arange(2)[None], torch.tensor([3, 10, 20, 35, 5, 71, 80, 3, 12, 30])[:, None]]
    _, codes_ref, _ = vq_quantize_reference(k, cb)
    _, codes, _ = fq.vq_quantize_fused(k, cb)
    assert torch.equal(codes, codes_ref)
    assert (codes[0, :10] < 70).all() and (codes[0, :10] != 5).all()


def test_module_fused_equals_reference_in_training():
    torch.manual_seed(0)
    mods = [VectorQuantizer(2, 40, 16, decay=0.9, impl=impl).to(DEVICE).train() for impl in ("reference", "fused")]
    mods[1].load_state_dict(mods[0].state_dict())
    for step in range(3):
        k = torch.randn(2, 33, 2, 16, device=DEVICE)
        outs = [m(k) for m in mods]
        assert torch.equal(outs[0][1], outs[1][1])
        assert rel(mods[1].stat_sum, mods[0].stat_sum) <= TOL and torch.equal(mods[1].stat_count, mods[0].stat_count)
        for m in mods:
            m.apply_update()
        assert rel(mods[1].c_sum, mods[0].c_sum) <= TOL


@gpu_only
@pytest.mark.parametrize("shape", [(4, 1024, 12, 64, 512), (2, 300, 2, 128, 70)], ids=["125m", "wide"])
def test_bf16_codes_are_nearest_within_tolerance(shape):
    B, T, H, d, S = shape
    k, cb = make(B, T, H, d, S, dtype=torch.bfloat16, seed=6)
    _, codes_ref, commit_ref = vq_quantize_reference(k, cb)
    k_hat, codes, commit = fq.vq_quantize_fused(k, cb)
    kf = k.float()
    dist = ((kf[..., None, :] - cb[None, None]) ** 2).sum(-1)  # (B, T, H, S)
    best = dist.gather(-1, codes_ref[..., None])[..., 0]
    chosen = dist.gather(-1, codes[..., None])[..., 0]
    assert (codes == codes_ref).float().mean() >= 0.97
    assert ((chosen - best) <= 1e-2 * kf.pow(2).sum(-1)).all()
    assert rel(commit, commit_ref) <= 1e-2
    assert k_hat.dtype == torch.bfloat16


@gpu_only
def test_dispatch_and_no_synchronisation_on_cuda():
    k, cb = make(2, 256, 4, 64, 128)
    assert fq.supports(k) and fq.supports(k.bfloat16()) and not fq.supports(k.cpu()) and not fq.supports(k[..., :48])
    assert resolve_impl("auto", k) == "fused" and resolve_impl("auto", k.cpu()) == "reference"
    vq = VectorQuantizer(4, 128, 64, impl="auto").cuda().train()
    vq(k)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        k_hat, codes, commit, _ = vq(k.requires_grad_())
        commit.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = vq_quantize(k.detach(), cb, impl="auto")
    assert torch.equal(out[1], vq_quantize_reference(k.detach(), cb)[1])
