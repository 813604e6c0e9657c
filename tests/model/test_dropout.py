"""model.longvq.attention_dropout drops the attention output (before the reset gate), only in training."""

import dataclasses

import pytest
import torch

from lm.config import ConfigError, RunConfig
from lm.model.longvq import LongVQMixer


def _mixers(tiny_model_config, p):
    cfg = tiny_model_config("longvq", "chunked")
    torch.manual_seed(0)
    plain = LongVQMixer(cfg).double()
    dropped = LongVQMixer(dataclasses.replace(cfg, longvq=dataclasses.replace(cfg.longvq, attention_dropout=p))).double()
    dropped.load_state_dict(plain.state_dict())  # the dropout adds no parameters
    return plain, dropped


def test_attention_dropout_drops_the_attention_output_in_training_only(tiny_model_config):
    plain, dropped = _mixers(tiny_model_config, 1.0)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        plain.eval(), dropped.eval()
        torch.testing.assert_close(dropped(x)[0], plain(x)[0], rtol=0, atol=0)  # eval: no dropout
        plain.train(), dropped.train()
        out = dropped(x)[0]
        assert not torch.allclose(out, plain(x)[0])
        # every attention output dropped: the values (v_proj feeds only the attention) no longer matter
        dropped.v_proj.weight.mul_(-3.0)
        dropped.v_proj.bias.add_(1.0)
        torch.testing.assert_close(dropped(x)[0], out, rtol=0, atol=0)
        dropped.eval()
        assert not torch.allclose(dropped(x)[0], plain.eval()(x)[0])  # ... while in eval they do


def test_dropout_values_are_checked():
    cfg = RunConfig()
    cfg.model.longvq.attention_dropout = 1.0
    with pytest.raises(ConfigError, match=r"model\.longvq\.attention_dropout is a dropout probability and must be in \[0, 1\)"):
        cfg.validate()
