"""evals/fused_gradcheck.py: the whole-model implementation check agrees where the implementations agree
(chunked reference vs dense oracle on the CPU, fp32), and reports a wrong implementation."""

import json

import pytest

from evals import fused_gradcheck as fg
from lm.model import longvq as longvq_module

ARGS = ["--recipe", "launch/configs/longvq_tiny.yaml", "--context", "64", "--train-steps", "2", "--batch", "2",
        "--check-batch", "2", "--impls", "chunked", "dense", "--device", "cpu"]


def test_chunked_and_dense_agree_on_the_whole_model(tmp_path, one_thread):
    out = tmp_path / "gc.json"
    assert fg.main(ARGS + [f"data.cache_dir={tmp_path / 'corpus'}", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["train_loss"]) == 2 and "bf16" not in r  # no bf16 pass on the CPU
    assert r["fp32"]["loss_chunked"] == pytest.approx(r["fp32"]["loss_dense"], rel=1e-6)
    assert r["fp32"]["grad_rel_err_total"] < 1e-5


def test_a_wrong_implementation_is_reported(tmp_path, one_thread, monkeypatch):
    real = longvq_module.vq_attention

    def off_by_ten_percent(*a, impl, **kw):
        out, state = real(*a, impl=impl, **kw)
        return (out * 1.1 if impl == "dense" else out), state

    monkeypatch.setattr(longvq_module, "vq_attention", off_by_ten_percent)
    out = tmp_path / "gc.json"
    assert fg.main(ARGS + [f"data.cache_dir={tmp_path / 'corpus'}", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["fp32"]["grad_rel_err_total"] > 1e-4  # 100x the agreement above


def test_fused_needs_a_gpu(capsys):
    assert fg.main(["--recipe", "launch/configs/longvq_tiny.yaml", "--device", "cpu"]) == 2
    assert "chunked dense" in capsys.readouterr().err
