"""Perplexity scoring protocols: disjoint, sliding and carry agree when the context covers the text,
and LongVQ's carried state makes short segments score exactly like one long window."""

import pytest
import torch

from lm.engine import score
from lm.model import build_model


def score_disjoint(model, tokens, context, batch_size, device):
    return score(model, tokens, mode="disjoint", context=context, batch_size=batch_size, device=device).nll_sum


def score_sliding(model, tokens, context, stride, device):
    return score(model, tokens, mode="sliding", context=context, stride=stride, device=device).nll_sum


def score_carry(model, tokens, segment, device):
    return score(model, tokens, mode="carry", context=segment, device=device).nll_sum


@pytest.fixture
def stream():
    return torch.randint(0, 32, (41,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("arch", ["longvq", "transformer"])
def test_all_modes_agree_when_the_window_covers_the_text(tiny_model_config, stream, arch):
    model = build_model(tiny_model_config(arch, "chunked")).double().eval()
    cpu = torch.device("cpu")
    whole = len(stream)
    a = score_disjoint(model, stream, whole, batch_size=2, device=cpu)
    b = score_sliding(model, stream, whole, stride=7, device=cpu)
    c = score_carry(model, stream, whole, device=cpu)
    assert a == pytest.approx(b, rel=1e-12) and a == pytest.approx(c, rel=1e-12)
    # and the total really depends on the windowing when it does not cover the text
    assert score_disjoint(model, stream, 5, batch_size=2, device=cpu) != pytest.approx(a, rel=1e-6)


def test_longvq_carry_in_short_segments_equals_one_long_window(tiny_model_config, stream):
    model = build_model(tiny_model_config("longvq", "chunked")).double().eval()
    cpu = torch.device("cpu")
    full = score_disjoint(model, stream, len(stream), batch_size=1, device=cpu)
    assert score_carry(model, stream, 6, device=cpu) == pytest.approx(full, rel=1e-10)


def test_sliding_with_stride_equal_to_context_is_disjoint(tiny_model_config, stream):
    model = build_model(tiny_model_config("transformer")).double().eval()
    cpu = torch.device("cpu")
    assert score_sliding(model, stream, 8, stride=8, device=cpu) == pytest.approx(
        score_disjoint(model, stream, 8, batch_size=3, device=cpu), rel=1e-12)


def test_per_position_sums_add_up_and_bad_inputs_are_refused(tiny_model_config, stream):
    model = build_model(tiny_model_config("longvq", "chunked")).double().eval()
    cpu = torch.device("cpu")
    r = score(model, stream, mode="disjoint", context=16, batch_size=2, device=cpu, per_position=True)
    assert r.tokens == len(stream) - 1 and r.pos_cnt.sum() == r.tokens
    assert r.pos_sum.sum() == pytest.approx(r.nll_sum, rel=1e-12)
    assert list(r.pos_cnt[:8]) == [3] * 8 and list(r.pos_cnt[8:]) == [2] * 8  # 40 targets: 16 + 16 + 8
    for bad in ({"context": 0}, {"context": -5}, {"context": 8, "batch_size": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            score(model, stream, device=cpu, **bad)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        score(model, stream[:1], context=8, device=cpu)
    with pytest.raises(ValueError, match="stride"):
        score(model, stream, mode="sliding", context=8, stride=9, device=cpu)
