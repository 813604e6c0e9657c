"""chunked == dense oracle (float64, outputs and gradients), streaming == full pass, empty-cache edges."""

import pytest
import torch

from lm.ops.vq_attention_ref import chunked_vq_attention, dense_vq_attention
from tests.tolerances import assert_close

IMPLS = {"dense": dense_vq_attention, "chunked": chunked_vq_attention}


def make_inputs(B, T, H, Dk, Dv, S, C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, dtype=dtype, generator=g)
    k = torch.randn(B, T, H, Dk, dtype=dtype, generator=g)
    v = torch.randn(B, T, H, Dv, dtype=dtype, generator=g)
    codebook = torch.randn(H, S, Dk, dtype=dtype, generator=g)
    bias = torch.randn(H, C + 1, dtype=dtype, generator=g)
    dist = ((k[..., None, :] - codebook[None, None]) ** 2).sum(-1)
    codes = dist.argmin(-1)
    quant = codebook[torch.arange(H)[None, None], codes]
    return q.requires_grad_(), k.requires_grad_(), quant, v.requires_grad_(), codes, codebook, bias.requires_grad_()


def run(impl, q, k, quant, v, codes, codebook, bias, C, **kw):
    k_hat = k + (quant - k).detach()  # straight-through, as the quantizer does
    return IMPLS[impl](q, k_hat, v, codes, codebook, chunk_size=C, bias=bias, **kw)


@pytest.mark.parametrize("T,C", [(1, 4), (4, 4), (7, 4), (8, 4), (13, 4), (12, 3), (30, 5), (33, 1), (5, 16), (64, 16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_equals_dense_outputs_and_gradients(T, C, with_bias):
    q, k, quant, v, codes, cb, bias = make_inputs(2, T, 3, 5, 6, 7, C, seed=T * 31 + C)
    b = bias if with_bias else None
    results = {}
    for impl in IMPLS:
        out, _ = run(impl, q, k, quant, v, codes, cb, b, C)
        upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
        inputs = (q, k, v) + ((bias,) if with_bias else ())
        grads = torch.autograd.grad((out * upstream).sum(), inputs)
        results[impl] = (out,) + grads
    for name, a, e in zip(["out", "dq", "dk", "dv", "dbias"], results["chunked"], results["dense"]):
        assert_close(a, e, msg=name)


def test_far_keys_get_no_gradient_but_near_keys_do():
    """Keys two or more chunks back reach later queries only through the (constant) codebook."""
    C, T = 4, 16
    q, k, quant, v, codes, cb, bias = make_inputs(1, T, 1, 3, 3, 5, C)
    out, _ = run("chunked", q, k, quant, v, codes, cb, bias, C)
    (dk,) = torch.autograd.grad(out[:, 12:].sum(), k)  # queries of chunk 3
    assert dk[:, :8].abs().max() == 0  # chunks 0, 1: cache only
    assert dk[:, 8:].abs().max() > 0  # chunks 2, 3: exact


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("pieces", [[5, 8, 1, 9], [4, 4, 4, 11], [1] * 23, [23]])
def test_streaming_equals_full_pass(impl, pieces):
    C, T = 4, sum(pieces)
    q, k, quant, v, codes, cb, bias = make_inputs(2, T, 2, 4, 3, 6, C, seed=len(pieces))
    with torch.no_grad():
        full, _ = run(impl, q, k, quant, v, codes, cb, bias, C)
        outs, state, s = [], None, 0
        for n in pieces:
            sl = slice(s, s + n)
            o, state = run(impl, q[:, sl], k[:, sl], quant[:, sl], v[:, sl], codes[:, sl], cb, bias, C,
                           state=state, return_state=True)
            outs.append(o)
            s += n
        assert state.pos == T
    assert_close(torch.cat(outs, dim=1), full, msg=f"{impl} streamed in {pieces}")


def test_output_depends_on_far_past_through_cache():
    """Changing a value 3 chunks back changes the output (the cache is not a no-op)."""
    C, T = 4, 16
    q, k, quant, v, codes, cb, bias = make_inputs(1, T, 1, 3, 3, 5, C)
    with torch.no_grad():
        out1, _ = run("chunked", q, k, quant, v, codes, cb, bias, C)
        v2 = v.clone()
        v2[:, 0] += 1.0
        out2, _ = run("chunked", q, k, quant, v2, codes, cb, bias, C)
    assert (out2[:, 12:] - out1[:, 12:]).abs().max() > 1e-6
