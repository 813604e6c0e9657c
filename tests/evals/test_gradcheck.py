"""lm.bench.gradcheck.fast_vs_reference: the fast path against the fp32 reference path, trained side by side."""

import json

import numpy as np
from evals import fused_gradcheck
from lm.bench.gradcheck import BF16_TOLERANCE, fast_vs_reference
from lm.data import WindowSampler

RECIPE = "launch/configs/longvq_tiny.yaml"
OVERRIDES = ["data.seq_len=128", "train.micro_batch_size=2", "optim.warmup_steps=0"]


def sampler():
    tokens = np.random.default_rng(0).integers(0, 256, 20_000).astype(np.int64)
    return WindowSampler(tokens, 128, seed=0)


def test_same_model_passes_and_reports_both_curves():
    r = fast_vs_reference(RECIPE, OVERRIDES, sampler(), steps=3, batch=2, log=lambda *_: None)
    assert r["passed"], r["checks"]
    assert len(r["loss_reference"]) == len(r["loss_fast"]) == 3
    assert r["first_batch"]["grad_rel_err_total"] <= BF16_TOLERANCE["grad_total_rel"]
    # the first step trains the same weights on the same batch: the losses agree closely
    assert abs(r["loss_fast"][0] - r["loss_reference"][0]) / r["loss_reference"][0] < 1e-3


def test_a_different_fast_path_fails():
    """A fast path that trains differently (here: 30x the learning rate) must fail the loss check."""
    r = fast_vs_reference(RECIPE, OVERRIDES, sampler(), steps=3, batch=2, fast_extra=("optim.lr=0.03",),
                          log=lambda *_: None)
    assert not r["checks"]["loss"] and not r["passed"]
    assert r["loss_rel_diff_max"] > BF16_TOLERANCE["loss_rel"]


def test_cli_writes_json_and_exit_status(tmp_path, capsys, one_thread):
    out = tmp_path / "r.json"
    rc = fused_gradcheck.main(["--bf16-vs-fp32", "--recipe", RECIPE, "--context", "128", "--train-steps", "2",
                               "--batch", "2", "--out", str(out), f"data.cache_dir={tmp_path / 'corpus'}"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["recipe"] == RECIPE and r["passed"] and len(r["loss_fast"]) == 2
    assert "passed" in capsys.readouterr().out


def test_cli_refuses_a_transformer_recipe(capsys):
    rc = fused_gradcheck.main(["--bf16-vs-fp32", "--recipe", "launch/configs/transformer_tiny.yaml", "--context", "128"])
    assert rc == 2 and "LongVQ recipe" in capsys.readouterr().err
