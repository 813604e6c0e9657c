"""Tests of the fused (Triton) VQ attention against the pure-PyTorch chunked reference: on a CUDA GPU, or on
the CPU under Triton's interpreter (TRITON_INTERPRET=1, fp32 only; tests/ops/test_fused_interpreter.py runs
this module that way in CI, so the kernels' arithmetic is checked on every change, not only on the GPU).

Tolerances, as relative error ||fused - ref|| / ||ref|| per tensor (outputs and the gradients of q,
k_hat, v and bias under a random upstream gradient):
  * fp32: 1e-4. The kernel runs its fp32 dots in IEEE fp32 (no TF32) and the reference runs with
    TF32 off; the measured error is ~1e-6 (dominated by summation order and atomics in dbias).
  * bf16: 2e-2 against the fp32 reference on the same (bf16-rounded) inputs. The kernel rounds the
    softmax weights and the per-code means to bf16 before the tensor-core products (as the bf16
    reference and FlashAttention do); measured ~4e-3.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from lm.ops.vq_attention_ref import VQAttentionState, chunked_vq_attention
from tests.fused_kernels import DEVICE, FUSED_MARKS, INTERPRET, gpu_only

pytestmark = FUSED_MARKS

triton = pytest.importorskip("triton")
from lm.ops import vq_attention_fused as fz  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
STATE_FIELDS = ("cur_k", "cur_v", "cur_codes", "prev_k", "prev_v", "prev_codes", "cache_count", "cache_sum")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make_inputs(B, T, H, Dk, Dv, S, C, dtype, with_bias, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = DEVICE
    codebook = torch.randn(H, S, Dk, device=dev, generator=g)
    codes = torch.randint(0, S, (B, T, H), device=dev, generator=g)
    k_hat = codebook[torch.arange(H, device=dev)[None, None, :], codes].to(dtype)
    q = torch.randn(B, T, H, Dk, device=dev, generator=g).to(dtype)
    v = torch.randn(B, T, H, Dv, device=dev, generator=g).to(dtype)
    bias = torch.randn(H, C + 1, device=dev, generator=g) if with_bias else None
    return q, k_hat, v, codes, codebook.to(dtype), bias


def run(fn, q, k_hat, v, codes, codebook, bias, C, grad, state=None, upcast=False):
    cast = (lambda x: x.float()) if upcast else (lambda x: x)
    leaves = [cast(x).detach().clone().requires_grad_() for x in (q, k_hat, v)]
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out, _ = fn(*leaves, codes, cast(codebook), chunk_size=C, bias=b, state=state)
    out.backward(grad.to(out.dtype))
    return [out] + [x.grad for x in leaves] + ([b.grad] if b is not None else [])


SHAPES = [
    # B, T, H, Dk, Dv, S, C
    (2, 64 * 3 + 5, 3, 64, 32, 128, 64),  # odd length, Dk != Dv, B*H = 6
    (1, 128 * 4, 2, 32, 64, 96, 128),  # S not a multiple of the code block (padded codes)
    (2, 40, 2, 16, 16, 64, 64),  # T < C: own chunk only
    (1, 256 * 3 + 17, 2, 128, 128, 256, 256),  # wide heads
]


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=gpu_only)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_matches_reference(shape, dtype, with_bias):
    B, T, H, Dk, Dv, S, C = shape
    q, k_hat, v, codes, cb, bias = make_inputs(B, T, H, Dk, Dv, S, C, dtype, with_bias)
    assert fz.supports(q, v, C, None) or INTERPRET
    grad = torch.randn(B, T, H, Dv, device=DEVICE)
    # bias=None: the reference is given an all-zero bias (same function; its bias=None path builds
    # CPU zeros and fails on CUDA), the fused kernel runs its no-bias variant.
    ref_bias = bias if bias is not None else torch.zeros(H, C + 1, device=DEVICE)
    ref = run(chunked_vq_attention, q, k_hat, v, codes, cb, ref_bias, C, grad, upcast=True)
    got = run(fz.fused_vq_attention, q, k_hat, v, codes, cb, bias, C, grad)
    names = ["out", "dq", "dk", "dv", "dbias"]
    for name, a, b in zip(names, got, ref):
        assert a.dtype == (torch.float32 if name == "dbias" else dtype), name
        assert torch.isfinite(a).all(), name
        err = rel(a, b)
        assert err <= TOL[dtype], f"{name}: rel err {err:.2e} > {TOL[dtype]:.0e}"


def test_fused_matches_reference_with_raw_local_keys():
    """model.longvq.local_raw_keys: the local keys are not codewords; the kernel takes any key tensor for
    the own / previous chunk and codewords only for the cache, like the reference."""
    B, T, H, Dk, Dv, S, C = 2, 64 * 3 + 5, 2, 32, 64, 64, 64
    q, _, v, codes, cb, bias = make_inputs(B, T, H, Dk, Dv, S, C, torch.float32, True, seed=9)
    k_raw = torch.randn(B, T, H, Dk, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1))
    grad = torch.randn(B, T, H, Dv, device=DEVICE)
    ref = run(chunked_vq_attention, q, k_raw, v, codes, cb, bias, C, grad)
    got = run(fz.fused_vq_attention, q, k_raw, v, codes, cb, bias, C, grad)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], got, ref):
        assert rel(a, b) <= TOL[torch.float32], name


@pytest.mark.parametrize("bias_grad", ["gather", "atomic"])
def test_bias_gradient_paths(bias_grad):
    """Both dbias paths of the dq kernel (KernelConfig.bias_grad) give the reference's gradients."""
    q, k_hat, v, codes, cb, bias = make_inputs(1, 64 * 4 + 3, 2, 64, 64, 64, 64, torch.float32, True, seed=3)
    grad = torch.randn(1, 64 * 4 + 3, 2, 64, device=DEVICE)
    ref = run(chunked_vq_attention, q, k_hat, v, codes, cb, bias, 64, grad)
    config = dataclasses.replace(fz.CONFIG, bias_grad=bias_grad)
    got = run(functools.partial(fz.fused_vq_attention, config=config), q, k_hat, v, codes, cb, bias, 64, grad)
    for a, b in zip(got, ref):
        assert rel(a, b) <= 1e-4


@pytest.mark.parametrize("T1,T2", [(3 * 64, 2 * 64 + 9), (64, 64 * 3), (2 * 64, 5)])
def test_streaming_equals_one_pass(T1, T2):
    """Two calls with the state in between equal one call; states equal the reference's states."""
    C, S, H, D = 64, 128, 2, 32
    T = T1 + T2
    q, k_hat, v, codes, cb, bias = make_inputs(2, T, H, D, D, S, C, torch.float32, True, seed=5)
    ref, ref_state = chunked_vq_attention(q, k_hat, v, codes, cb, chunk_size=C, bias=bias, return_state=True)
    sl1, sl2 = slice(0, T1), slice(T1, T)
    o1, s1 = fz.fused_vq_attention(q[:, sl1], k_hat[:, sl1], v[:, sl1], codes[:, sl1], cb, chunk_size=C,
                                   bias=bias, return_state=True)
    _, r1 = chunked_vq_attention(q[:, sl1], k_hat[:, sl1], v[:, sl1], codes[:, sl1], cb, chunk_size=C,
                                 bias=bias, return_state=True)
    for f in STATE_FIELDS:
        a, b = getattr(s1, f), getattr(r1, f)
        assert (a is None) == (b is None), f
        if a is not None:
            assert a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-4), f
    assert fz.supports(q, v, C, s1) or INTERPRET
    o2, s2 = fz.fused_vq_attention(q[:, sl2], k_hat[:, sl2], v[:, sl2], codes[:, sl2], cb, chunk_size=C,
                                   bias=bias, state=s1, return_state=True)
    assert rel(torch.cat([o1, o2], dim=1), ref) <= 1e-5
    assert s2.pos == ref_state.pos == T
    for f in STATE_FIELDS:
        a, b = getattr(s2, f), getattr(ref_state, f)
        if a is not None:
            assert a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-4), f

    # gradients of the second piece with the state given equal the reference's
    grad = torch.randn(2, T2, H, D, device=DEVICE)
    args = [x[:, sl2] for x in (q, k_hat, v, codes)]
    got = run(fz.fused_vq_attention, *args[:3], args[3], cb, bias, C, grad, state=s1)
    want = run(chunked_vq_attention, *args[:3], args[3], cb, bias, C, grad, state=r1)
    for a, b in zip(got, want):
        assert rel(a, b) <= 1e-4


@gpu_only
def test_supports_and_fallback():
    from lm.ops.vq_attention import resolve_impl, vq_attention

    q, k_hat, v, codes, cb, bias = make_inputs(1, 200, 2, 64, 64, 64, 64, torch.float32, True)
    assert fz.supports(q, v, 64)
    assert fz.supports(q.bfloat16(), v.bfloat16(), 512)
    assert not fz.supports(q.cpu(), v.cpu(), 64)  # CPU
    assert not fz.supports(q.half(), v.half(), 64)  # fp16 not handled
    assert not fz.supports(q, v, 96)  # chunk not a multiple of 64
    assert not fz.supports(q, v, 32)
    assert not fz.supports(q[..., :48], v, 64)  # head dim 48
    _, st = chunked_vq_attention(q[:, :70], k_hat[:, :70], v[:, :70], codes[:, :70], cb, chunk_size=64,
                                 bias=bias, return_state=True)
    assert st.pos % 64 != 0 and not fz.supports(q, v, 64, st)
    assert resolve_impl("auto", q, v, 64, None) == "fused"
    assert resolve_impl("auto", q, v, 64, st) == "chunked"
    assert resolve_impl("auto", q.half(), v.half(), 64, None) == "chunked"
    # the dispatcher's fallback with an unaligned state still gives the reference's result
    out, _ = vq_attention(q[:, 70:], k_hat[:, 70:], v[:, 70:], codes[:, 70:], cb, chunk_size=64, bias=bias,
                          state=st, impl="auto")
    ref, _ = chunked_vq_attention(q, k_hat, v, codes, cb, chunk_size=64, bias=bias)
    assert rel(out, ref[:, 70:]) <= 1e-5
    # auto on aligned input runs the fused kernel and agrees with the reference
    out, _ = vq_attention(q, k_hat, v, codes, cb, chunk_size=64, bias=bias, impl="auto")
    assert rel(out, ref) <= 1e-4


def check_state_gradients(T, config=fz.CONFIG, C=64):
    B, H, Dk, Dv, S = 2, 2, 32, 16, 96
    q, k_hat, v, codes, cb, bias = make_inputs(B, T, H, Dk, Dv, S, C, torch.float32, True, seed=11)
    g = torch.Generator(device=DEVICE).manual_seed(12)
    prev_codes = torch.randint(0, S, (B, H, C), device=DEVICE, generator=g)
    count = torch.randint(0, 4, (B, H, S), device=DEVICE, generator=g).float()
    fields = dict(prev_k=cb[torch.arange(H, device=DEVICE)[None, :, None], prev_codes],
                  prev_v=torch.randn(B, H, C, Dv, device=DEVICE, generator=g),
                  cache_sum=torch.randn(B, H, S, Dv, device=DEVICE, generator=g) * count[..., None])
    grad = torch.randn(B, T, H, Dv, device=DEVICE)
    results = []
    for fn in (chunked_vq_attention, functools.partial(fz.fused_vq_attention, config=config)):
        leaves = {k: t.detach().clone().requires_grad_() for k, t in fields.items()}
        state = VQAttentionState(pos=5 * C, cur_k=q.new_zeros(B, H, 0, Dk), cur_v=v.new_zeros(B, H, 0, Dv),
                                 cur_codes=codes.new_zeros(B, H, 0), prev_codes=prev_codes, cache_count=count,
                                 **leaves)
        got = run(fn, q, k_hat, v, codes, cb, bias, C, grad, state=state)
        results.append(got + [leaves[k].grad for k in ("prev_k", "prev_v", "cache_sum")])
    names = ["out", "dq", "dk", "dv", "dbias", "dprev_k", "dprev_v", "dcache_sum"]
    for name, a, b in zip(names, results[1], results[0]):
        assert a is not None and torch.isfinite(a).all(), name
        err = rel(a, b)
        assert err <= TOL[torch.float32], f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("T", [64, 2 * 64 + 5, 3 * 64], ids=["one_chunk", "partial", "three_chunks"])
def test_gradients_flow_into_an_incoming_state(T):
    """Sequence parallelism hands the kernel a state built from other ranks' tensors: its previous chunk's
    keys and values and its cached value sums get the reference's gradients (exact window, cache means)."""
    check_state_gradients(T)


@pytest.mark.parametrize("cache_block", [16, 32])
def test_cache_gradient_with_smaller_code_blocks(cache_block):
    """The backward's cache kernel with fewer codes per program (KernelConfig.cache_block; auto picks them when
    the grid is small for the GPU) gives the reference's gradients, the state's included."""
    check_state_gradients(4 * 64 + 7, dataclasses.replace(fz.CONFIG, cache_block=cache_block))


@pytest.mark.parametrize("field,value", [("cache_block", 8), ("bias_grad", "tiles"), ("fwd_block_m", 256),
                                         ("fwd_block_n", 8), ("dq_block_m", 48), ("dq_block_n", 64.0),
                                         ("dkdv_block_n", 0), ("dkdv_block_m", 512)])
def test_config_is_checked(field, value):
    q, k_hat, v, codes, cb, bias = make_inputs(1, 64, 1, 16, 16, 64, 64, torch.float32, False)
    with pytest.raises(ValueError, match=f"KernelConfig.{field} must be one of"):
        fz.fused_vq_attention(q, k_hat, v, codes, cb, chunk_size=64,
                              config=dataclasses.replace(fz.CONFIG, **{field: value}))


def test_tiles_are_capped_by_the_chunk_size():
    config = dataclasses.replace(fz.CONFIG, fwd_block_m=128, fwd_block_n=32, dq_block_m=128, dq_block_n=128,
                                 dkdv_block_n=16, dkdv_block_m=128)
    assert fz.tiles_for(config, 256) == dict(fwd_block_m=128, fwd_block_n=32, dq_block_m=128, dq_block_n=128,
                                             dkdv_block_n=16, dkdv_block_m=128)
    assert fz.tiles_for(config, 192) == dict(fwd_block_m=64, fwd_block_n=32, dq_block_m=64, dq_block_n=64,
                                             dkdv_block_n=16, dkdv_block_m=64)
    assert fz.tiles_for(fz.CONFIG, 512) == dict(fwd_block_m=64, fwd_block_n=32, dq_block_m=64, dq_block_n=32,
                                                 dkdv_block_n=64, dkdv_block_m=32)  # the defaults


# rectangular tiles: (fwd_block_m, fwd_block_n, dq_block_m, dq_block_n, dkdv_block_n, dkdv_block_m)
TILE_CASES = {
    "hopper_dq128x32": (128, 64, 128, 32, 128, 32),
    "hopper_dq128x64": (128, 64, 128, 64, 128, 64),
    "wide_keys": (64, 128, 32, 128, 32, 128),  # more keys than queries per tile: the BM < BN paths
}


def tile_config(tiles, bias_grad):
    names = ("fwd_block_m", "fwd_block_n", "dq_block_m", "dq_block_n", "dkdv_block_n", "dkdv_block_m")
    return dataclasses.replace(fz.CONFIG, bias_grad=bias_grad, fwd_warps=8, bwd_warps=8, **dict(zip(names, tiles)))


@pytest.mark.parametrize("tiles,bias_grad,C", [
    ("hopper_dq128x32", "gather", 128), ("hopper_dq128x64", "atomic", 128), ("wide_keys", "gather", 128),
    ("hopper_dq128x32", "gather", 192),  # 128 does not divide C: those tiles run at 64
], ids=lambda x: str(x))
def test_rectangular_tiles_match_reference(tiles, bias_grad, C):
    """Every kernel with (BM x BN) tiles, BM != BN both ways, and both dbias paths: the output and the gradients
    of q, k, v and bias equal the reference's (odd length, S = 96 padded to the code step, T past 2 chunks)."""
    B, T, H, Dk, Dv, S = 1, 3 * C + 5, 2, 16, 32, 96
    q, k_hat, v, codes, cb, bias = make_inputs(B, T, H, Dk, Dv, S, C, torch.float32, True, seed=7)
    grad = torch.randn(B, T, H, Dv, device=DEVICE)
    ref = run(chunked_vq_attention, q, k_hat, v, codes, cb, bias, C, grad)
    fused = functools.partial(fz.fused_vq_attention, config=tile_config(TILE_CASES[tiles], bias_grad))
    got = run(fused, q, k_hat, v, codes, cb, bias, C, grad)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], got, ref):
        err = rel(a, b)
        assert err <= TOL[torch.float32], f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("tiles,bias_grad", [("hopper_dq128x32", "gather"), ("wide_keys", "atomic")])
def test_rectangular_tiles_with_an_incoming_state(tiles, bias_grad):
    """Chunk 0 reads the state's previous chunk with rectangular tiles; the state's tensors get the reference's
    gradients."""
    check_state_gradients(2 * 128 + 7, tile_config(TILE_CASES[tiles], bias_grad), C=128)
