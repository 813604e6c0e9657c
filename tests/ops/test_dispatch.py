"""lm.ops.dispatch: the impl="auto" rule shared by the EMA scan, the quantizer and VQ attention."""

import logging

import pytest
import torch

from lm.ops.dispatch import check_impl, choose_auto, load_fused, require_fused


def test_off_cuda_takes_the_fallback_and_logs_why_once(caplog):
    x = torch.randn(2, 3)
    with caplog.at_level(logging.INFO, logger="lm.ops.dispatch"):
        for _ in range(3):
            choice = choose_auto("test off-cuda", x.is_cuda, "ema_scan_fused", lambda m: True, fast="triton",
                                 fallback="reference")
            assert choice == "reference"
    lines = [r.getMessage() for r in caplog.records if "test off-cuda" in r.getMessage()]
    assert lines == ["test off-cuda -> reference (inputs are not on CUDA)"]


def test_on_cuda_follows_the_kernels_supports():
    pytest.importorskip("triton")
    seen = []

    def supports(module):
        seen.append(module.__name__)
        return module.__name__ == "lm.ops.vq_quantize_fused"

    assert choose_auto("test yes", True, "vq_quantize_fused", supports, fast="fused", fallback="reference") == "fused"
    assert choose_auto("test no", True, "ema_scan_fused", supports, fast="triton", fallback="fft") == "fft"
    assert seen == ["lm.ops.vq_quantize_fused", "lm.ops.ema_scan_fused"]


def test_unknown_names_and_choices_are_refused():
    with pytest.raises(ValueError, match="no fused kernel module lm.ops.nope"):
        load_fused("nope")
    with pytest.raises(ValueError, match=r"quantizer impl 'fast' is not one of \('reference', 'auto'\)"):
        check_impl("quantizer impl", "fast", ("reference", "auto"))
    check_impl("quantizer impl", "auto", ("reference", "auto"))


@pytest.mark.parametrize("name", ["ema_scan_fused", "vq_quantize_fused", "vq_attention_fused", "linear_ce_fused",
                                  "gates_fused"])
def test_require_fused_returns_the_module(name):
    pytest.importorskip("triton")
    assert require_fused(name, "unused").__name__ == f"lm.ops.{name}"


def test_choose_auto_traces_under_compile_without_a_graph_break():
    pytest.importorskip("triton")

    def f(x):
        c = choose_auto("test compiled", True, "vq_attention_fused", lambda m: m.supports(x, x, 64), fast="fused",
                        fallback="chunked")
        return x + 1 if c == "fused" else x - 1

    torch._dynamo.reset()
    x = torch.randn(1, 8, 2, 16)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), x - 1)  # CPU tensors: not supported
