"""LongVQConfig.residual: "gated" (MEGA, the default) is out = x + u (h - x); "add" is out = x + u h.
Same parameters, same branch; the two outputs differ by exactly u * x. Both stay causal, and streaming /
token-by-token decode equal the parallel pass with "add" as they do with "gated"."""

import dataclasses

import pytest
import torch

from lm.config import ConfigError, LongVQConfig, ModelConfig, from_dict
from lm.model import build_model
from tests.model.test_invariants import decode_token_by_token, first_leak
from tests.tolerances import assert_close


def _model(tiny_model_config, residual, impl="chunked"):
    torch.manual_seed(0)
    cfg = tiny_model_config("longvq", impl)
    cfg = dataclasses.replace(cfg, longvq=dataclasses.replace(cfg.longvq, residual=residual))
    return build_model(cfg).double().eval()


def test_default_is_megas_gated_residual():
    assert LongVQConfig().residual == "gated"
    assert from_dict(LongVQConfig, {"residual": "add"}).residual == "add"
    with pytest.raises(ConfigError, match="residual"):
        from_dict(ModelConfig, {"longvq": {"residual": "plain"}})


def test_add_and_gated_differ_by_u_times_x(tiny_model_config):
    gated, add = _model(tiny_model_config, "gated"), _model(tiny_model_config, "add")
    add.load_state_dict(gated.state_dict())
    mix_g, mix_a = gated.blocks[0].mixer, add.blocks[0].mixer
    seen = {}
    hook = mix_a.mx_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("mx", o))
    x = torch.randn(2, 11, mix_g.d_model, dtype=torch.float64)
    with torch.no_grad():
        out_g, *_ = mix_g(x)
        out_a, *_ = mix_a(x)
    hook.remove()
    u = torch.sigmoid(seen["mx"][..., :mix_a.d_model])
    assert_close(out_a, out_g + u * x, torch.float64, msg="add = gated + u * x")
    assert (out_a - out_g).abs().max() > 1e-3  # the options really differ


@pytest.mark.parametrize("impl", ["chunked", "dense"])
def test_add_residual_is_causal_and_decodes_like_the_parallel_pass(tiny_model_config, impl):
    model = _model(tiny_model_config, "add", impl)
    tokens = torch.randint(0, 32, (1, 19))  # chunk 4: positions >= 8 read the code cache
    for t in [0, 4, 9, 17]:
        assert first_leak(model, tokens, t) is None, f"logits up to {t} depend on later tokens"
    full, decoded = decode_token_by_token(model, tokens)
    assert_close(decoded, full, torch.float32, msg=f"{impl} decode with residual=add")
