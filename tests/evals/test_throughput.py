"""evals.throughput on CPU at the tiny preset: the row contract, the matched-size check, the outputs,
the declared FLOP formulas, and no DeepSpeed anywhere on the benchmark's import path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals import throughput as tp
from lm import metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--preset", "tiny", "--contexts", "64", "128", "--tokens-per-step", "256", "--decode-prompts", "64",
        "--decode-tokens", "8", "--steps", "2", "--warmup", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "deepspeed", None)  # any `import deepspeed` during the run would fail
    try:
        rc = tp.main(TINY + ["--out-dir", str(out), "--tag", "unit", "--peak-flops", "1e12"])
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
        if r["mode"] == "train":
            assert r["batch"] == 256 // r["context"] and len(r["step_times_s"]) == 2
            assert r["flops_per_token"] > 6 * r["params"] and r["flops_formula"]
            assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
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
    assert "| train | longvq | 64 |" in md and "| decode | transformer | 64 |" in md
    png = (out / "throughput_unit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_unmatched_parameter_counts_fail_loudly(tmp_path, capsys):
    rc = tp.main(TINY + ["--out-dir", str(tmp_path), "--set", "longvq.ffn_dim=512"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "not matched" in err and "ratio" in err
    assert not list(tmp_path.iterdir())  # nothing measured
    with pytest.raises(tp.ParamMismatchError):
        tp.check_param_match({"longvq": 111, "transformer": 100})
    assert tp.check_param_match({"longvq": 109, "transformer": 100}) == pytest.approx(1.09)


def test_125m_preset_is_matched_and_flops_follow_the_declared_formulas():
    cfgs = tp.model_configs(tp.PRESETS["125m"])
    params = {a: tp.count_params(c) for a, c in cfgs.items()}
    assert params["transformer"] == 109_529_856  # research/h200_baseline_probe.md's GPT
    assert abs(tp.check_param_match(params) - 1) <= 0.10
    tf, lv = cfgs["transformer"], cfgs["longvq"]
    assert metrics.head_dims(lv) == (12, 64, 128)
    T = 8192
    # Transformer: 6 N + 6 L d (T + 1) (= 6 L H (T+1)/2 (2 d / H))
    assert tp.flops_per_token(tf, 100, T) == pytest.approx(600 + 6 * 12 * 768 * (T + 1))
    # LongVQ: brute-force count of the keys each position attends to
    C, S = 512, 512
    keys = sum((i % C) + 1 + (C if i >= C else 0) + (S if i >= 2 * C else 0) for i in range(T)) / T
    assert metrics.mean_keys_per_query(lv, T) == pytest.approx(keys)
    assert tp.flops_per_token(lv, 100, T) == pytest.approx(600 + 6 * 12 * 12 * keys * (64 + 128))
    # per-token attention cost is flat for LongVQ, linear in T for the Transformer
    assert metrics.mean_keys_per_query(lv, 131072) < (C + 1) / 2 + C + S + 1


def test_presets_are_configurable(tmp_path):
    cfgs = tp.model_configs(tp.PRESETS["tiny"], ["all.n_layers=3", "longvq.longvq.chunk_size=8"], "chunked")
    assert cfgs["transformer"].n_layers == cfgs["longvq"].n_layers == 3
    assert cfgs["longvq"].longvq.chunk_size == 8 and cfgs["longvq"].longvq.attention_impl == "chunked"
    with pytest.raises(ValueError):
        tp.model_configs(tp.PRESETS["tiny"], ["gpt.n_layers=3"])
    with pytest.raises(ValueError):
        tp.model_configs(tp.PRESETS["tiny"], ["all.n_layerz=3"])


def test_oom_becomes_an_error_row(tmp_path, monkeypatch):
    def boom(cfg, context, args, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(tp, "decode_row", boom)
    rc = tp.main(["--preset", "tiny", "--contexts", "32", "--tokens-per-step", "32", "--decode-prompts", "16",
                  "--decode-tokens", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
                  "--arch", "longvq", "--out-dir", str(tmp_path), "--tag", "oom"])
    assert rc == 0
    rows = json.loads((tmp_path / "throughput_oom.json").read_text())
    dec = [r for r in rows if r["mode"] == "decode"]
    assert len(dec) == 1 and dec[0]["error"] == "OOM" and dec[0]["tokens_per_s"] is None
    assert all(f in dec[0] for f in tp.CONTRACT_FIELDS)
    assert "OOM" in (tmp_path / "throughput_oom.md").read_text()


def test_benchmark_imports_nothing_from_deepspeed():
    code = ("import sys, evals.throughput, evals.generate; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_profile_table_is_written(tmp_path):
    from evals.throughput import main

    assert main(["--preset", "tiny", "--contexts", "64", "--tokens-per-step", "128", "--decode-prompts",
                 "--steps", "1", "--warmup", "1", "--out-dir", str(tmp_path), "--tag", "p", "--arch", "longvq",
                 "--profile-context", "64"]) == 0
    text = (tmp_path / "throughput_p_profile_longvq.txt").read_text()
    assert "one training step" in text and "aten::" in text


@pytest.mark.parametrize("bad", [["--loss-chunk-tokens", "-1"], ["--checkpoint-blocks", "-2"], ["--compile", "--warmup", "1"]])
def test_bad_options_are_refused_at_parse_time(bad, capsys):
    with pytest.raises(SystemExit):
        tp.parse_args(["--preset", "tiny", *bad])
    err = capsys.readouterr().err
    assert "must be" in err or "needs" in err
