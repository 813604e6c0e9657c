"""lm.engine.decoder: greedy decoding equals the argmax of a parallel forward over the generated text (both arms,
prefill in pieces), sampling follows the seed and the softmax, misuse is refused; on CUDA, graph-replayed decoding
equals eager decoding (skipped without a GPU)."""

import math

import pytest
import torch

from lm.config import LongVQConfig, ModelConfig
from lm.engine.decoder import Decoder, choose_next, sample_next
from lm.model import build_model

C = 4


def tiny(arch: str, impl: str = "chunked", vocab: int = 32) -> ModelConfig:
    lv = LongVQConfig(attention_impl=impl, chunk_size=C, codebook_size=8, n_heads=2, z_dim=16, ema_dim=4)
    cfg = ModelConfig(arch=arch, vocab_size=vocab, d_model=32, n_layers=2, longvq=lv)
    cfg.transformer.n_heads = 2
    return cfg


def model_of(arch: str, dtype=torch.float64, device="cpu", impl="chunked", vocab=32):
    torch.manual_seed(0)
    model = build_model(tiny(arch, impl, vocab)).to(device=device, dtype=dtype).eval()
    for vq in model.quantizers():
        vq.c_sum.normal_()
    return model


@pytest.mark.parametrize("arch", ["longvq", "transformer"])
@pytest.mark.parametrize("prefill_chunk", [3, 64])
def test_greedy_equals_argmax_of_parallel_forward(arch, prefill_chunk):
    model = model_of(arch)
    prompt = torch.randint(0, 32, (2, 7))
    dec = Decoder(model, prefill_chunk=prefill_chunk)
    timings = {}
    out = dec.generate(prompt, 13, timings)  # 7 + 13 = 20 tokens: the decode steps cross 3 chunk boundaries
    assert out.shape == (2, 20) and torch.equal(out[:, :7], prompt)
    assert timings["cuda_graph"] is False and timings["new_tokens"] == 13
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    assert torch.equal(logits[:, 6:].argmax(-1), out[:, 7:])


def test_step_by_step_and_capacity():
    model = model_of("longvq")
    dec = Decoder(model)
    dec.start(torch.randint(0, 32, (1, 5)), 3)
    assert dec.new_tokens.shape == (1, 1)
    dec.step()
    dec.step()
    assert dec.new_tokens.shape == (1, 3)
    with pytest.raises(RuntimeError, match="new tokens"):
        dec.step()
    with pytest.raises(RuntimeError, match="start"):
        Decoder(model).step()


def test_misuse_is_refused():
    model = model_of("transformer")
    with pytest.raises(ValueError, match="temperature"):
        Decoder(model, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        Decoder(model, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="prompt"):
        Decoder(model).start(torch.zeros(1, 0, dtype=torch.long), 2)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        Decoder(model)


def test_sampling_follows_the_seed_and_top_k():
    model = model_of("longvq")
    prompt = torch.randint(0, 32, (2, 6))
    runs = [Decoder(model, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(s)).generate(prompt, 9)
            for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with torch.no_grad():
        logits = model(runs[0][:, :-1]).logits[:, 5:]
    top = logits.topk(5, dim=-1).indices
    assert (top == runs[0][:, 6:, None]).any(-1).all(), "a token outside the top 5 was drawn"


def test_gumbel_max_draws_follow_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]]).expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=0.7, generator=g)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    expected = torch.softmax(logits[0].double() / 0.7, -1)
    sigma = (expected * (1 - expected) / draws.numel()).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma).all(), (freq, expected)
    kept = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(kept.tolist()) == {1, 2}
    assert torch.equal(choose_next(logits[:2], 0.0, None, None), torch.tensor([2, 2]))
    u = torch.full((1, 5), math.exp(-math.exp(0.0)))  # equal noise: the draw is the argmax
    assert int(choose_next(logits[:1], 1.0, None, u)) == 2


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _states(dec: Decoder) -> list[torch.Tensor]:
    return [t.float() for s in dec.state for t in s.tensors()]


@cuda
@pytest.mark.parametrize("arch,impl", [("longvq", "chunked"), ("longvq", "auto"), ("transformer", "auto")])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cuda_graph_decode_equals_eager_decode(arch, impl, amp, temperature):
    """The same prompt and seed decoded with graph replays and eagerly: equal tokens, states equal within a
    tolerance (the two run the same kernels; atomics may order float sums differently), and in fp32 the greedy
    tokens are the argmax of a parallel forward."""
    model = model_of(arch, torch.float32, "cuda", impl, vocab=64)
    prompt = torch.randint(0, 64, (2, 2 * C + 1), device="cuda")
    runs = {}
    for graph in (True, False):
        gen = torch.Generator(device="cuda").manual_seed(7)
        dec = Decoder(model, temperature=temperature, top_k=20, generator=gen, autocast_dtype=amp, cuda_graph=graph,
                      prefill_chunk=C)
        out = dec.generate(prompt, 6 * C)
        assert dec.cuda_graph is graph, dec.graph_failed
        runs[graph] = (out, _states(dec))
    assert torch.equal(runs[True][0], runs[False][0])
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if amp is None and temperature == 0.0:
        out = runs[True][0]
        with torch.no_grad():
            logits = model(out[:, :-1]).logits[:, prompt.shape[1] - 1:]
        assert torch.equal(logits.argmax(-1), out[:, prompt.shape[1]:])


@cuda
def test_cuda_graph_decode_of_the_125m_shapes():
    """Chunk and codebook of the 125M recipe (C = S = 512), two layers: graph replays equal eager decoding across
    a chunk roll (prompt 1000 tokens, 40 new tokens cross position 1024)."""
    lv = LongVQConfig(chunk_size=512, codebook_size=512, n_heads=12, z_dim=768, ema_dim=16, residual="add")
    cfg = ModelConfig(arch="longvq", vocab_size=1000, d_model=768, n_layers=2, longvq=lv)
    torch.manual_seed(0)
    model = build_model(cfg).cuda().eval()
    prompt = torch.randint(0, 1000, (1, 1000), device="cuda")
    outs = []
    for graph in (True, False):
        dec = Decoder(model, autocast_dtype=torch.bfloat16, cuda_graph=graph, prefill_chunk=512)
        outs.append(dec.generate(prompt, 40))
        assert dec.cuda_graph is graph, dec.graph_failed
    assert torch.equal(outs[0], outs[1])


@cuda
@pytest.mark.parametrize("arch", ["longvq", "transformer"])
def test_cuda_graph_of_the_compiled_step_equals_eager_decode(arch):
    """compile_step=True (torch.compile inside the captured graph) decodes the same greedy tokens as the eager
    step (fp32; the compiled kernels may round differently, so logits are not compared bit for bit)."""
    model = model_of(arch, torch.float32, "cuda", "auto", vocab=64)
    prompt = torch.randint(0, 64, (2, 2 * C + 1), device="cuda")
    outs = []
    for compiled in (True, False):
        dec = Decoder(model, cuda_graph=compiled, compile_step=compiled, prefill_chunk=C)
        outs.append(dec.generate(prompt, 6 * C))
        assert dec.cuda_graph is compiled, dec.graph_failed
    assert torch.equal(outs[0], outs[1])
