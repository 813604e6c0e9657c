"""Fixed-shape decoding (LanguageModel.static_state / decode_step, lm/ops/vq_attention_decode.py): decoding one
token per step equals the parallel forward over several chunk boundaries, equals the growing-state step token by
token (outputs and the whole state, including the roll into previous chunk and cache), and updates its buffers in
place without changing a shape (what a CUDA graph replay needs)."""

import pytest
import torch

from lm.config import LongVQConfig, ModelConfig
from lm.model import build_model
from lm.model.transformer import KV_BLOCK, StaticKVCache, masked_decode_attention
from lm.ops.vq_attention_decode import StaticVQAttentionState, vq_attention_decode_step
from lm.ops.vq_attention_ref import chunked_vq_attention, code_stats
from tests.tolerances import assert_close

C = 4  # chunk size: 19 tokens cross 4 chunk boundaries


def tiny(arch: str, impl: str = "chunked", **longvq) -> ModelConfig:
    lv = LongVQConfig(attention_impl=impl, chunk_size=C, codebook_size=8, n_heads=2, z_dim=16, ema_dim=4, **longvq)
    cfg = ModelConfig(arch=arch, vocab_size=32, d_model=32, n_layers=2, longvq=lv)
    cfg.transformer.n_heads = 2
    return cfg


def model_of(cfg: ModelConfig, dtype: torch.dtype):
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype).eval()
    if cfg.arch == "longvq":  # codebooks spread like trained keys, so that several codes are in use
        for vq in model.quantizers():
            vq.c_sum.normal_()
    return model


ARMS = [("longvq", "chunked"), ("longvq", "dense"), ("transformer", "chunked")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch,impl", ARMS)
@pytest.mark.parametrize("prompt_len", [1, 4, 6])
def test_static_decode_equals_parallel_forward(arch, impl, dtype, prompt_len):
    """Prefill prompt_len tokens, then decode_step the rest: the logits equal one parallel forward (declared
    tolerances of tests/tolerances.py for the dtype)."""
    model = model_of(tiny(arch, impl), dtype)
    tokens = torch.randint(0, 32, (2, 19))
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens[:, :prompt_len], return_state=True)
        state = model.static_state(out.state, capacity=tokens.shape[1])
        steps = [model.decode_step(tokens[:, t:t + 1], state) for t in range(prompt_len, tokens.shape[1])]
    assert_close(torch.stack(steps, dim=1), full[:, prompt_len:], dtype, msg=f"{arch}/{impl} static decode")


def _attn_states(state):
    return [s.attn for s in state]


@pytest.mark.parametrize("local_raw_keys", [False, True])
def test_static_step_equals_growing_state_step_token_by_token(local_raw_keys):
    """At every token: the same logits as forward() with the growing state, and the same state (position,
    current chunk, previous chunk, per-code cache), read back with to_state()."""
    model = model_of(tiny("longvq", local_raw_keys=local_raw_keys), torch.float64)
    tokens = torch.randint(0, 32, (2, 21))
    P = 2
    with torch.no_grad():
        out = model(tokens[:, :P], return_state=True)
        dyn = out.state
        static = model.static_state(dyn, capacity=tokens.shape[1])
        for t in range(P, tokens.shape[1]):
            x = tokens[:, t:t + 1]
            ref = model(x, state=dyn, return_state=True)
            dyn = ref.state
            logits = model.decode_step(x, static)
            assert_close(logits, ref.logits[:, -1], torch.float64, msg=f"logits at {t}")
            for layer, (d, s) in enumerate(zip(dyn, static)):
                assert_close(s.ema, d.ema, torch.float64, msg=f"EMA state, layer {layer}, token {t}")
                back = s.attn.to_state()
                assert back.pos == d.attn.pos == t + 1
                for name in ("cur_k", "cur_v", "prev_k", "prev_v", "cache_count", "cache_sum"):
                    a, b = getattr(back, name), getattr(d.attn, name)
                    assert (a is None) == (b is None), f"{name} at {t}"
                    if a is not None:
                        assert_close(a, b, torch.float64, msg=f"{name}, layer {layer}, token {t}")
                for name in ("cur_codes", "prev_codes"):
                    a, b = getattr(back, name), getattr(d.attn, name)
                    assert (a is None and b is None) or torch.equal(a, b), f"{name} at {t}"
                # the running per-code statistics of the two chunks match their slots
                slots = torch.arange(C)
                for which, valid in (("cur", slots < (t + 1) % C), ("prev", (slots < C) & (t + 1 >= C))):
                    count, total = code_stats(getattr(s.attn, f"{which}_codes"), getattr(s.attn, f"{which}_v"), valid, 8)
                    assert_close(getattr(s.attn, f"{which}_count"), count, torch.float64, msg=f"{which} count at {t}")
                    assert_close(getattr(s.attn, f"{which}_sum"), total, torch.float64, msg=f"{which} sums at {t}")
    assert int(static[0].attn.cache_count.sum()) == 2 * 2 * (tokens.shape[1] // C - 1) * C  # B H tokens cached


def test_transformer_static_cache_equals_growing_cache():
    model = model_of(tiny("transformer"), torch.float64)
    tokens = torch.randint(0, 32, (2, 11))
    with torch.no_grad():
        out = model(tokens[:, :3], return_state=True)
        dyn = out.state
        static = model.static_state(dyn, capacity=16)
        for t in range(3, tokens.shape[1]):
            dyn = model(tokens[:, t:t + 1], state=dyn, return_state=True).state
            model.decode_step(tokens[:, t:t + 1], static)
    for d, s in zip(dyn, static):
        back = s.to_cache()
        assert back.pos == d.pos == tokens.shape[1] and s.capacity == KV_BLOCK  # 16 rounded up to a block
        assert_close(back.k, d.k, torch.float64, msg="keys")
        assert_close(back.v, d.v, torch.float64, msg="values")
    with pytest.raises(ValueError, match="capacity"):
        StaticKVCache.from_cache(dyn[0], 5)


@pytest.mark.parametrize("arch", ["longvq", "transformer"])
def test_decode_step_updates_fixed_buffers_in_place(arch):
    """Every state tensor keeps its storage and shape across steps, chunk rolls included (a CUDA graph replays
    against fixed addresses), and the step reads no Python value out of a tensor."""
    model = model_of(tiny(arch), torch.float32)
    with torch.no_grad():
        out = model(torch.randint(0, 32, (1, 3)), return_state=True)
        state = model.static_state(out.state, capacity=20)
        tensors = [t for s in state for t in s.tensors()]
        before = [(t.data_ptr(), t.shape, t.dtype) for t in tensors]
        for _ in range(2 * C + 1):
            model.decode_step(torch.randint(0, 32, (1, 1)), state)
    assert [(t.data_ptr(), t.shape, t.dtype) for t in tensors] == before
    assert all(int(t) == 3 + 2 * C + 1 for s in state for t in s.tensors() if t.dim() == 0)


def test_op_level_step_equals_chunked_attention_from_every_phase():
    """vq_attention_decode_step alone against chunked_vq_attention over the whole sequence, starting from a
    static state built after each prefill length 0..2C (every phase of the chunk, with and without a
    previous chunk)."""
    torch.manual_seed(1)
    B, T, H, Dk, Dv, S = 2, 3 * C + 2, 2, 8, 6, 5
    q = torch.randn(B, T, H, Dk, dtype=torch.float64)
    v = torch.randn(B, T, H, Dv, dtype=torch.float64)
    codebook = torch.randn(H, S, Dk, dtype=torch.float64)
    codes = torch.randint(0, S, (B, T, H))
    k_hat = codebook[torch.arange(H)[None, None], codes]
    bias = torch.randn(H, C + 1, dtype=torch.float64)
    full, _ = chunked_vq_attention(q, k_hat, v, codes, codebook, chunk_size=C, bias=bias)
    for P in range(1, 2 * C + 1):
        _, st = chunked_vq_attention(q[:, :P], k_hat[:, :P], v[:, :P], codes[:, :P], codebook, chunk_size=C,
                                     bias=bias, return_state=True)
        static = StaticVQAttentionState.from_state(st, chunk_size=C, codebook_size=S)
        outs = [vq_attention_decode_step(q[:, t:t + 1], k_hat[:, t:t + 1], v[:, t:t + 1], codes[:, t:t + 1], codebook,
                                         static, bias=bias) for t in range(P, T)]
        assert_close(torch.cat(outs, dim=1), full[:, P:], torch.float64, msg=f"prefill {P}")
    with pytest.raises(ValueError, match="one token"):
        vq_attention_decode_step(q[:, :2], k_hat[:, :2], v[:, :2], codes[:, :2], codebook, static, bias=bias)


def test_masked_decode_attention_equals_sdpa_over_several_blocks():
    """The blockwise value sum over a cache of 3 blocks, filled up to a position inside the third, equals SDPA over
    the filled positions."""
    torch.manual_seed(2)
    B, H, hd, L, P = 2, 3, 8, 3 * KV_BLOCK, 2 * KV_BLOCK + 37
    q = torch.randn(B, H, 1, hd, dtype=torch.float64)
    k, v = torch.randn(B, H, L, hd, dtype=torch.float64), torch.randn(B, H, L, hd, dtype=torch.float64)
    keep = torch.arange(L) < P
    ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :P], v[:, :, :P])
    assert_close(masked_decode_attention(q, k, v, keep), ref, torch.float64, msg="blockwise decode attention")
