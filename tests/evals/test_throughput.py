"""evals.throughput on CPU with the tiny recipes: the row contract, the matched-size check, the outputs, the
declared FLOP formulas, the trainer's engine behind --engine deepspeed, and no DeepSpeed import with
--engine torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals import throughput as cli
from lm import metrics
from lm.bench import throughput as tp
from lm.config import load_config
from tests.dist_harness import run_dist

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["--recipe", str(ROOT / "launch/configs/longvq_tiny.yaml"), "--recipe", str(ROOT / "launch/configs/transformer_tiny.yaml")]
TINY = RECIPES + ["--contexts", "64", "128", "--tokens-per-step", "256", "--decode-prompts", "64",
                  "--decode-tokens", "8", "--steps", "2", "--warmup", "1", "--device", "cpu", "--engine", "torch"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "deepspeed", None)  # any `import deepspeed` during the run would fail
    try:
        rc = cli.main(TINY + ["--out-dir", str(out), "--tag", "unit", "--peak-flops", "1e12"])
    finally:
        mp.undo()
    return rc, out


def test_rows_have_every_contract_field(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    rows = json.loads((out / "throughput_unit.json").read_text())
    seen = {(r["arch"], r["mode"], r["context"]) for r in rows}
    assert seen == {(a, "train", c) for a in ("longvq", "transformer") for c in (64, 128)} | \
        {(a, "decode", 64) for a in ("longvq", "transformer")}
    for r in rows:
        missing = [f for f in tp.CONTRACT_FIELDS if f not in r]
        assert not missing, (missing, r)
        assert "error" not in r, r
        assert r["mode"] in ("train", "decode") and r["tokens_per_s"] > 0
        assert r["device"].startswith("cpu") and r["peak_mem_gib"] is None and r["date"]
        assert r["backend"] == ("chunked" if r["arch"] == "longvq" else r["backend"]) and r["backend"]
        assert r["precision"] == "fp32" and r["engine"] == "torch"
        if r["mode"] == "train":
            assert r["batch"] == 256 // r["context"] and len(r["step_times_s"]) == 2
            assert r["flops_per_token"] > 6 * r["params"] and r["flops_formula"]
            assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
            assert r["final_loss"] > 0
        else:
            assert r["mfu"] is None and r["state_gib"] > 0
    params = {r["arch"]: r["params"] for r in rows}
    assert abs(params["longvq"] / params["transformer"] - 1) <= 0.10
    best = [r for r in rows if r["best_baseline"]]
    assert {(r["mode"], r["context"]) for r in best} == {("train", 64), ("train", 128), ("decode", 64)}
    assert all(r["arch"] == "transformer" for r in best)
    assert all(r["speedup_vs_best_baseline"] > 0 for r in rows if r["arch"] == "longvq")


def test_markdown_and_plot_are_written(tiny_run):
    _, out = tiny_run
    md = (out / "throughput_unit.md").read_text()
    assert "| train | longvq | 64 |" in md and "| decode | transformer | 64 |" in md and "longvq_tiny.yaml" in md
    png = (out / "throughput_unit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_unmatched_parameter_counts_fail_loudly(tmp_path, capsys):
    rc = cli.main(TINY + ["--out-dir", str(tmp_path), "model.ffn_dim=512"])  # only LongVQ's NFFN grows that much
    assert rc == 2
    err = capsys.readouterr().err
    assert "not matched" in err and "ratio" in err
    assert not list(tmp_path.iterdir())  # nothing measured
    with pytest.raises(tp.ParamMismatchError):
        tp.check_param_match({"longvq": 111, "transformer": 100})
    assert tp.check_param_match({"longvq": 109, "transformer": 100}) == pytest.approx(1.09)


def test_125m_recipes_are_matched_and_flops_follow_the_declared_formulas():
    lv = load_config(ROOT / "launch/configs/longvq_125m.yaml")
    tf = load_config(ROOT / "launch/configs/transformer_125m.yaml")
    params = {"longvq": tp.count_params(lv), "transformer": tp.count_params(tf)}
    assert params["transformer"] == 109_529_856  # a GPT-2-small-shaped model with a 32K vocabulary
    assert abs(tp.check_param_match(params) - 1) <= 0.10
    assert metrics.head_dims(lv.model) == (12, 64, 128)
    T = 8192
    # Transformer: 6 N + 6 L d (T + 1) (= 6 L H (T+1)/2 (2 d / H))
    assert metrics.flops_per_token(tf.model, 100, T) == pytest.approx(600 + 6 * 12 * 768 * (T + 1))
    # LongVQ: brute-force count of the keys each position attends to
    C, S = 512, 512
    keys = sum((i % C) + 1 + (C if i >= C else 0) + (S if i >= 2 * C else 0) for i in range(T)) / T
    assert metrics.mean_keys_per_query(lv.model, T) == pytest.approx(keys)
    assert metrics.flops_per_token(lv.model, 100, T) == pytest.approx(600 + 6 * 12 * 12 * keys * (64 + 128))
    # per-token attention cost is flat for LongVQ, linear in T for the Transformer
    assert metrics.mean_keys_per_query(lv.model, 131072) < (C + 1) / 2 + C + S + 1


def test_overrides_reach_every_recipe_and_bad_ones_are_refused(tmp_path, capsys):
    args = cli.parse_args(RECIPES + ["model.n_layers=3", "model.longvq.chunk_size=8"])
    assert args.overrides == ["model.n_layers=3", "model.longvq.chunk_size=8"]
    cfgs = {r: load_config(r, overrides=args.overrides) for r in args.recipes}
    assert {c.model.n_layers for c in cfgs.values()} == {3}
    assert cli.main(RECIPES + ["model.n_layerz=3", "--out-dir", str(tmp_path)]) == 2
    assert "did you mean model.n_layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(RECIPES + ["--steps", "0"])
    with pytest.raises(SystemExit):
        cli.parse_args(["launch/configs/longvq_tiny.yaml"])  # a recipe needs --recipe
    assert "--recipe" in capsys.readouterr().err


def test_oom_becomes_an_error_row(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(tp, "decode_row", boom)
    rc = cli.main(RECIPES[:2] + ["--contexts", "32", "--tokens-per-step", "32", "--decode-prompts", "16",
                                 "--decode-tokens", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
                                 "--engine", "torch", "--out-dir", str(tmp_path), "--tag", "oom"])
    assert rc == 0
    rows = json.loads((tmp_path / "throughput_oom.json").read_text())
    dec = [r for r in rows if r["mode"] == "decode"]
    assert len(dec) == 1 and dec[0]["error"] == "OOM" and dec[0]["tokens_per_s"] is None
    assert all(f in dec[0] for f in tp.CONTRACT_FIELDS)
    assert "OOM" in (tmp_path / "throughput_oom.md").read_text()


def test_torch_engine_imports_nothing_from_deepspeed():
    code = ("import sys, evals.throughput, evals.generate, evals.quality_race, lm.engine, lm.bench.race; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_profile_table_is_written(tmp_path):
    assert cli.main(RECIPES[:2] + ["--contexts", "64", "--tokens-per-step", "128", "--decode-prompts", "--engine", "torch",
                                   "--steps", "1", "--warmup", "1", "--out-dir", str(tmp_path), "--tag", "p",
                                   "--device", "cpu", "--profile-context", "64"]) == 0
    text = (tmp_path / "throughput_p_profile_longvq.txt").read_text()
    assert "one training step" in text and "aten::" in text


def test_step_phases_are_written(tmp_path):
    """--phases-context: host and device time of the forward, backward and update of a step; each phase's device
    time includes its host time, and the phases add up to the step (their medians roughly)."""
    assert cli.main(RECIPES[:2] + ["--contexts", "--decode-prompts", "--engine", "torch", "--tokens-per-step", "128",
                                   "--out-dir", str(tmp_path), "--tag", "ph", "--device", "cpu",
                                   "--phases-context", "64"]) == 0
    (row,) = json.loads((tmp_path / "throughput_ph_phases.json").read_text())
    assert (row["arch"], row["context"], row["batch"], row["engine"]) == ("longvq", 64, 2, "torch")
    for n in ("forward", "backward", "update"):
        assert 0 < row[f"{n}_host_ms"] <= row[f"{n}_ms"]
    assert row["step_ms"] == pytest.approx(row["forward_ms"] + row["backward_ms"] + row["update_ms"], rel=0.25)  # medians
    assert row["tokens_per_s"] == pytest.approx(2 * 64 / row["step_ms"] * 1e3)


def _deepspeed_row(cfg_path, out):
    from lm.bench import throughput

    cfg = load_config(cfg_path, overrides=["parallel.zero_stage=2"])
    return throughput.train_row(cfg, 64, tokens_per_step=256, engine="deepspeed", steps=2, warmup=1)


def test_deepspeed_engine_row_times_the_trainers_engine(tmp_path):
    (row,) = run_dist(_deepspeed_row, world_size=1, cfg_path=str(ROOT / "launch/configs/longvq_tiny.yaml"), out=tmp_path)
    assert row["engine"] == "deepspeed" and row["zero_stage"] == 2 and row["precision"] == "fp32"
    assert row["tokens_per_s"] > 0 and len(row["step_times_s"]) == 2 and row["final_loss"] > 0


def test_trainer_check_trains_each_row_through_lm_train(tmp_path):
    """--trainer-check: each measured training row is trained again by `python -m lm.train` (a subprocess; its
    summary.json's steady rate), and the comparison is written next to the rows."""
    rc = cli.main(RECIPES[:2] + ["--contexts", "64", "--tokens-per-step", "128", "--decode-prompts", "--steps", "2",
                                 "--warmup", "1", "--device", "cpu", "--engine", "torch", "--out-dir", str(tmp_path),
                                 "--tag", "tc", "--trainer-check", "--trainer-steps", "4"])
    assert rc == 0
    data = json.loads((tmp_path / "trainer_vs_benchmark_tc.json").read_text())
    (row,) = data["rows"]
    assert (row["arch"], row["context"], row["trainer_steps"]) == ("longvq", 64, 4)
    assert row["trainer_tokens_per_s"] > 0 and row["trainer_final_loss"] > 0
    assert row["trainer_over_benchmark"] == pytest.approx(row["trainer_tokens_per_s"] / row["benchmark_tokens_per_s"])
    assert "data.seq_len=64" in row["trainer_command"] and "train.micro_batch_size=2" in row["trainer_command"]
    assert data["benchmark_argv"][:3] == ["python", "-m", "evals.throughput"] and "--trainer-check" in data["benchmark_argv"]


def test_trainer_row_ignores_the_callers_launcher_env_and_reports_failures(monkeypatch):
    """The trainer subprocess does not inherit a launcher's RANK / WORLD_SIZE / MASTER_PORT (it would wait for 8
    processes); a run that fails comes back as trainer_error with the trainer's message."""
    from lm.bench.trainer_check import trainer_row

    recipe = str(ROOT / "launch/configs/longvq_tiny.yaml")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_PORT", "1")
    ok = trainer_row(recipe, [], 64, 128, steps=3, timeout=300)
    assert ok.get("trainer_error") is None and ok["trainer_tokens_per_s"] > 0, ok
    bad = trainer_row(recipe, ["model.d_model=-1"], 64, 128, steps=3, timeout=300)
    assert bad["trainer_error"].startswith("exit ") and "d_model" in bad["trainer_error"], bad
