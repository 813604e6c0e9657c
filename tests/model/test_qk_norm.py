"""LongVQ q/k normalisation options (LongVQConfig.key_norm, .query_norm): defaults keep the old formula
bit for bit, center_rms keys are zero-mean unit-RMS per head, query_norm gives unit-RMS queries, and the
model stays causal with every option."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lm.config import ConfigError, LongVQConfig, ModelConfig, from_dict
from lm.model import build_model
from lm.model.common import rms_normalize
from tests.model.test_invariants import decode_token_by_token, first_leak

OPTIONS = [dict(key_norm="center_rms"), dict(query_norm=True), dict(key_norm="center_rms", query_norm=True)]


def _model(tiny_model_config, impl="chunked", **opts):
    torch.manual_seed(0)
    cfg = tiny_model_config("longvq", impl)
    cfg = dataclasses.replace(cfg, longvq=dataclasses.replace(cfg.longvq, **opts))
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # non-trivial q/k affine, so the checks below are not vacuous
        for block in model.blocks:
            block.mixer.qk_scale.normal_(1.0, 0.5)
            block.mixer.qk_shift.normal_(0.0, 0.5)
    return model


def _capture(model, tokens):
    """Per layer: z (recomputed from mx_proj's output), k before quantisation, and the mixer's captured q."""
    seen, hooks = [], []
    for block in model.blocks:
        mixer, rec = block.mixer, {}
        mixer.capture = True
        hooks.append(mixer.mx_proj.register_forward_hook(lambda m, i, o, rec=rec: rec.__setitem__("mx", o)))
        hooks.append(mixer.quantizer.register_forward_pre_hook(lambda m, i, rec=rec: rec.__setitem__("k", i[0])))
        seen.append((mixer, rec))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for mixer, rec in seen:
        D, dz = mixer.d_model, mixer.z_dim
        z = F.silu(rec["mx"][..., D:D + dz])
        out.append((mixer, z, rec["k"], mixer.captured["q"]))
        mixer.capture = False
    return out


def test_defaults_are_the_old_formula_bit_for_bit(tiny_model_config):
    assert (LongVQConfig().key_norm, LongVQConfig().query_norm) == ("rms", False)
    model = _model(tiny_model_config)
    tokens = torch.randint(0, 32, (2, 19))
    for mixer, z, k, q in _capture(model, tokens):
        B, T, H = q.shape[0], q.shape[1], mixer.n_heads
        old_q = (z * mixer.qk_scale[0] + mixer.qk_shift[0]).view(B, T, H, -1)
        old_k = rms_normalize((z * mixer.qk_scale[1] + mixer.qk_shift[1]).view(B, T, H, -1))
        assert torch.equal(q, old_q) and torch.equal(k, old_k)
        assert k.mean(-1).abs().max() > 1e-2  # the old keys do have a common mode (what center_rms removes)


def test_center_rms_keys_are_zero_mean_unit_rms_per_head(tiny_model_config):
    model = _model(tiny_model_config, key_norm="center_rms")
    for mixer, z, k, q in _capture(model, torch.randint(0, 32, (2, 19))):
        assert k.mean(-1).abs().max() < 1e-12
        torch.testing.assert_close(k.pow(2).mean(-1), torch.ones_like(k[..., 0]), atol=1e-4, rtol=0)
        B, T, H = q.shape[0], q.shape[1], mixer.n_heads  # q untouched without query_norm
        assert torch.equal(q, (z * mixer.qk_scale[0] + mixer.qk_shift[0]).view(B, T, H, -1))


def test_key_norm_only_applies_with_normalize_keys(tiny_model_config):
    model = _model(tiny_model_config, key_norm="center_rms", normalize_keys=False)
    for mixer, z, k, q in _capture(model, torch.randint(0, 32, (2, 19))):
        B, T, H = q.shape[0], q.shape[1], mixer.n_heads
        assert torch.equal(k, (z * mixer.qk_scale[1] + mixer.qk_shift[1]).view(B, T, H, -1))


def test_query_norm_gives_unit_rms_queries(tiny_model_config):
    model = _model(tiny_model_config, query_norm=True)
    for mixer, z, k, q in _capture(model, torch.randint(0, 32, (2, 19))):
        torch.testing.assert_close(q.pow(2).mean(-1), torch.ones_like(q[..., 0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(k.pow(2).mean(-1), torch.ones_like(k[..., 0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["chunked", "dense"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_causality_with_new_options(tiny_model_config, impl, opts):
    model = _model(tiny_model_config, impl, **opts)
    tokens = torch.randint(0, 32, (2, 19))  # chunk 4: positions >= 2C read the code cache
    for t in [0, 3, 4, 9, 17]:
        assert first_leak(model, tokens, t) is None, f"{opts}: logits up to {t} depend on later tokens"


def test_config_validates_the_new_fields():
    lv = from_dict(LongVQConfig, {"key_norm": "center_rms", "query_norm": True})
    assert (lv.key_norm, lv.query_norm) == ("center_rms", True)
    with pytest.raises(ConfigError, match="key_norm"):
        from_dict(ModelConfig, {"longvq": {"key_norm": "layer"}})
    with pytest.raises(ConfigError, match="query_norm"):
        from_dict(LongVQConfig, {"query_norm": "yes"})


def test_query_temperature_scales_queries_per_head_and_learns(tiny_model_config):
    model = _model(tiny_model_config, query_norm=True, query_temperature=True)
    tokens = torch.randint(0, 32, (2, 19))
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.log_q_scale.copy_(torch.linspace(-0.5, 0.7, block.mixer.n_heads))
    for mixer, z, k, q in _capture(model, tokens):
        rms = q.pow(2).mean(-1).sqrt()  # (B, T, H): exp(s_h) for unit-RMS queries
        torch.testing.assert_close(rms, mixer.log_q_scale.exp().expand_as(rms).to(rms), atol=1e-4, rtol=0)
    model.train()
    out = model(tokens)
    (out.logits.sum() + out.aux_loss).backward()
    assert all(float(b.mixer.log_q_scale.grad.abs().sum()) > 0 for b in model.blocks)
    plain = _model(tiny_model_config)
    assert all(b.mixer.log_q_scale is None for b in plain.blocks)  # off by default: no extra parameter
    for t in [0, 4, 17]:
        assert first_leak(model.eval(), tokens, t) is None


def test_query_temperature_decode_matches_parallel(tiny_model_config):
    model = _model(tiny_model_config, query_norm=True, query_temperature=True)
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.log_q_scale.fill_(0.8)
    full, decoded = decode_token_by_token(model, torch.randint(0, 32, (1, 13)))
    torch.testing.assert_close(decoded, full, atol=1e-9, rtol=1e-7)
