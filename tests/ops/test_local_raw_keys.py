"""local_raw_keys: the attention gets the raw keys for its own and previous chunk and codewords for the
cache. chunked == dense (float64, outputs and gradients, streaming) with raw keys, and the model-level
invariants (causality, streaming == full, decode == parallel) hold with the option on."""

import pytest
import torch

from lm.model import build_model
from lm.ops.vq_attention_ref import chunked_vq_attention, dense_vq_attention
from tests.model.test_invariants import first_leak
from tests.ops.test_vq_attention_reference import make_inputs
from tests.tolerances import assert_close

IMPLS = {"dense": dense_vq_attention, "chunked": chunked_vq_attention}


@pytest.mark.parametrize("T,C", [(7, 4), (13, 4), (30, 5), (64, 16)])
def test_chunked_equals_dense_with_raw_local_keys(T, C):
    q, k, _, v, codes, cb, bias = make_inputs(2, T, 3, 5, 6, 7, C, seed=T + C)
    results = {}
    for name, fn in IMPLS.items():
        out, _ = fn(q, k, v, codes, cb, chunk_size=C, bias=bias)  # raw k: not k + (quant - k).detach()
        up = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
        results[name] = (out,) + torch.autograd.grad((out * up).sum(), (q, k, v, bias))
    for label, a, e in zip(["out", "dq", "dk", "dv", "dbias"], results["chunked"], results["dense"]):
        assert_close(a, e, msg=label)
    # raw keys differ from their codewords, so the local part really used them
    quant_out, _ = chunked_vq_attention(q, cb[torch.arange(3)[None, None], codes], v, codes, cb, chunk_size=C, bias=bias)
    assert (quant_out - results["chunked"][0]).abs().max() > 1e-6


@pytest.mark.parametrize("impl", list(IMPLS))
def test_streaming_equals_full_pass_with_raw_local_keys(impl):
    C, pieces = 4, [5, 8, 1, 9]
    q, k, _, v, codes, cb, bias = make_inputs(2, sum(pieces), 2, 4, 3, 6, C, seed=11)
    fn = IMPLS[impl]
    with torch.no_grad():
        full, _ = fn(q, k, v, codes, cb, chunk_size=C, bias=bias)
        outs, state, s = [], None, 0
        for n in pieces:
            sl = slice(s, s + n)
            o, state = fn(q[:, sl], k[:, sl], v[:, sl], codes[:, sl], cb, chunk_size=C, bias=bias,
                          state=state, return_state=True)
            outs.append(o)
            s += n
    assert_close(torch.cat(outs, dim=1), full, msg=impl)


@pytest.mark.parametrize("impl", ["chunked", "dense"])
def test_model_invariants_with_raw_local_keys(tiny_model_config, impl):
    torch.manual_seed(0)
    cfg = tiny_model_config("longvq", impl)
    cfg.longvq.local_raw_keys = True
    model = build_model(cfg).double().eval()
    tokens = torch.randint(0, 32, (2, 19))
    for t in [0, 4, 9, 17]:
        assert first_leak(model, tokens, t) is None
    with torch.no_grad():
        full = model(tokens).logits
        outs, state, s = [], None, 0
        for n in [6, 1, 5, 1, 1, 5]:  # pieces and single-token decode steps
            out = model(tokens[:, s:s + n], state=state, return_state=True)
            outs.append(out.logits)
            state, s = out.state, s + n
        cfg_q = tiny_model_config("longvq", impl)  # same weights with quantised local keys: a different model
        quantised = build_model(cfg_q).double().eval()
        quantised.load_state_dict(model.state_dict())
        other = quantised(tokens).logits
    assert_close(torch.cat(outs, dim=1), full, torch.float32, msg=f"{impl} streaming/decode")
    assert (other - full).abs().max() > 1e-6  # the option changes the computation
