"""evals.quality_race end to end on CPU at the tiny preset, and the attention-mass diagnostic against a
brute-force float64 split of the dense oracle's softmax."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals import quality_race as qr
from lm.bench import race as rc_lib
from lm.bench.throughput import check_param_match, count_params
from lm.config import OptimConfig, load_config
from lm.engine import score
from lm.metrics import head_dims
from lm.optim import TimeSchedule
from lm.model import build_model
from lm.ops.vq_diagnostics import attention_mass_split, summarize_mass

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["--recipe", str(ROOT / "launch/configs/longvq_tiny.yaml"), "--recipe", str(ROOT / "launch/configs/transformer_tiny.yaml")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def race(tmp_path_factory, cache_dir, one_thread):
    out = tmp_path_factory.mktemp("race")
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "deepspeed", None)  # any `import deepspeed` during the run would fail
    try:
        rc = qr.main(RECIPES + ["--contexts", "64", "128", "--budget-minutes", "0.015", "--eval-tokens", "1000",
                                "--val-points", "3", "--log-every", "5", "--device", "cpu", f"data.cache_dir={cache_dir}",
                                "--out-dir", str(out), "--tag", "unit", "--seed", "3", "--save-dir", str(out / "models")])
    finally:
        mp.undo()
    return rc, out


def test_race_writes_json_png_markdown(race):
    rc, out = race
    assert rc == 0
    res = json.loads((out / "quality_unit.json").read_text())
    meta = res["meta"]
    for key in ("command", "date", "device", "budget_minutes", "budget_s", "params", "param_ratio", "configs", "optim",
                "schedule", "corpus", "eval_split", "eval_tokens", "tokens_per_step", "seed", "torch"):
        assert key in meta, key
    assert meta["command"].startswith("python -m evals.quality_race --recipe") and meta["engine"] == "torch"
    assert meta["recipes"]["longvq"].endswith("longvq_tiny.yaml") and meta["precision"] == "fp32"
    assert meta["device"].startswith("cpu") and meta["budget_s"] == pytest.approx(0.9)
    assert abs(meta["params"]["longvq"] / meta["params"]["transformer"] - 1) <= 0.10
    assert meta["eval_tokens"] == 1000 and meta["corpus"]["bytes"]["test"] > 0

    runs = {(r["arch"], r["context"]): r for r in res["runs"]}
    assert set(runs) == {(a, c) for a in ("longvq", "transformer") for c in (64, 128)}
    for (arch, ctx), r in runs.items():
        assert r["params"] == meta["params"][arch]
        assert r["steps"] >= 1 and r["diverged_at_step"] is None
        assert r["train_time_s"] >= meta["budget_s"] and r["train_time_s"] < meta["budget_s"] + 5
        log = r["log"]
        assert len(log["step"]) == len(log["time_s"]) == len(log["loss"]) == len(log["lr"]) == r["steps"]
        assert all(b > a for a, b in zip(log["time_s"], log["time_s"][1:]))
        assert log["lr"][0] < log["lr"][len(log["lr"]) // 2] and log["loss"][-1] < log["loss"][0]
        assert len(r["val_curve"]["loss"]) >= 1
        ev = r["eval"]
        assert ev["tokens"] == 1000 and ev["bpb"] == pytest.approx(ev["loss"] / math.log(2))
        pc = ev["per_position"]["chunk"]
        C = ev["chunk_bucket_width"]
        assert C == 16 and pc["edges"][0] == 0 and pc["edges"][-1] == ctx and max(pc["edges"]) > 2 * C
        assert sum(pc["count"]) == 1000  # every scored token lands in one bucket
        assert sum(ev["per_position"]["log2"]["count"]) == 1000 and ev["per_position"]["log2"]["edges"][:4] == [0, 1, 2, 4]
        assert "drop_after_2C" in ev["long_context"]
        if arch == "longvq":
            cb = ev["codebook"]
            assert [c["layer"] for c in cb] == [0, 1]
            for c in cb:
                assert 0 < c["usage"] <= 1 and 1 <= c["perplexity"] <= 16 and 0 <= c["rel_error"] < 1
                assert c["tokens"] == 1000
            mass = ev["attention_mass"]
            assert [m["layer"] for m in mass] == [0, 1]
            for m in mass:
                assert m["own"] + m["prev"] + m["cache"] == pytest.approx(1.0, abs=1e-6)
                assert m["beyond_2C"]["cache"] > 0 and len(m["cache_per_head_beyond_2C"]) == 2
                assert m["cache_by_chunk_bucket"]["cache"][:2] == [0.0, 0.0]  # no cache in the first two chunks
            assert r["codebook_log"]["step"] and "layer0/usage" in r["codebook_log"]
        else:
            assert "codebook" not in ev and not r["codebook_log"]["step"]
    s = res["summary"]
    assert set(s) == {"64", "128"}
    for v in s.values():
        assert set(v["bpb"]) == {"longvq", "transformer"} and v["bpb_ratio_longvq_over_transformer"] > 0
        assert isinstance(v["codes_ok"], bool) and isinstance(v["longvq_le_transformer"], bool)

    md = (out / "quality_unit.md").read_text()
    assert "## Targets" in md and "| 128 | longvq |" in md and "CPU run" in md and "transformer_tiny.yaml" in md
    png = (out / "quality_unit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_exported_model_gives_the_same_bpb_through_the_perplexity_cli(race, cache_dir, tmp_path):
    from evals import perplexity

    _, out = race
    res = json.loads((out / "quality_unit.json").read_text())
    run = next(r for r in res["runs"] if r["arch"] == "longvq" and r["context"] == 128)
    assert Path(run["export"]) == out / "models" / "unit_128_longvq"
    rc = perplexity.main(["--checkpoint", run["export"], "--split", "test", "--max-tokens", "1000", "--device", "cpu",
                          "--no-progress", "--json", str(tmp_path / "ppl.json")])
    assert rc == 0
    ppl = json.loads((tmp_path / "ppl.json").read_text())
    assert ppl["context_len"] == 128 and ppl["tokens"] == 1000
    assert ppl["bpb"] == pytest.approx(run["eval"]["bpb"], rel=1e-5)


def test_merge_makes_one_report(race, tmp_path):
    _, out = race
    rc = qr.main(["--merge", str(out / "quality_unit.json"), "--tag", "merged", "--out-dir", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "quality_merged.json").read_text())
    assert len(res["runs"]) == 4 and res["meta"]["commands"][0].startswith("python -m evals.quality_race")
    assert (tmp_path / "quality_merged.md").is_file() and (tmp_path / "quality_merged.png").is_file()


def test_merge_selects_runs_and_refuses_different_budgets(race, tmp_path):
    _, out = race
    src = out / "quality_unit.json"
    other = json.loads(src.read_text())
    other["meta"]["optim"]["longvq"]["lr"] = 7e-3  # as if from a second command with another lr
    (tmp_path / "other.json").write_text(json.dumps(other))
    rc = qr.main(["--merge", f"{src}:transformer@64,transformer@128", f"{tmp_path / 'other.json'}:longvq@128",
                  "--tag", "best", "--out-dir", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "quality_best.json").read_text())
    assert sorted((r["arch"], r["context"]) for r in res["runs"]) == [("longvq", 128), ("transformer", 64), ("transformer", 128)]
    lv = next(r for r in res["runs"] if r["arch"] == "longvq")
    assert lv["optim"]["lr"] == 7e-3 and res["summary"]["128"]["bpb"].keys() == {"longvq", "transformer"}
    assert "| 128 | longvq | 0.007 |" in (tmp_path / "quality_best.md").read_text()
    assert qr.main(["--merge", f"{src}:longvq@999", "--tag", "x", "--out-dir", str(tmp_path)]) == 2  # no such run
    other["meta"]["budget_minutes"] = 3.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert qr.main(["--merge", str(src), str(tmp_path / "other.json"), "--tag", "x", "--out-dir", str(tmp_path)]) == 2


def test_unmatched_parameter_counts_fail(tmp_path, capsys):
    rc = qr.main(RECIPES + ["model.ffn_dim=512", "--out-dir", str(tmp_path), "--device", "cpu"])
    assert rc == 2
    assert "not matched" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_40m_recipes_are_matched_fused_compatible_and_keep_their_own_lr():
    cfgs = {a: load_config(ROOT / f"launch/configs/{a}_40m.yaml") for a in ("longvq", "transformer")}
    params = {a: count_params(c) for a, c in cfgs.items()}
    assert 38e6 < params["transformer"] < 44e6 and 38e6 < params["longvq"] < 44e6
    assert abs(check_param_match(params) - 1) <= 0.05
    H, dk, dv = head_dims(cfgs["longvq"].model)
    assert dk in (16, 32, 64, 128) and dv in (16, 32, 64, 128) and cfgs["longvq"].model.longvq.chunk_size % 64 == 0
    assert head_dims(cfgs["transformer"].model)[1] == 64
    assert (cfgs["longvq"].optim.lr, cfgs["transformer"].optim.lr) == (3e-3, 1e-3)
    shared = {a: load_config(ROOT / f"launch/configs/{a}_40m.yaml", overrides=["optim.lr=2e-3"]) for a in cfgs}
    assert {c.optim.lr for c in shared.values()} == {2e-3}  # an override reaches both arms


def test_time_based_schedule():
    o = OptimConfig(lr=1e-3, min_lr_ratio=0.1)
    sched = TimeSchedule(o, 0.05)
    m = [sched.lr(0, f) / o.lr for f in (0.0, 0.025, 0.05, 0.5, 1.0, 1.5)]
    assert m[0] == pytest.approx(1 / 500) and m[1] == pytest.approx(251 / 500)
    assert m[2] == pytest.approx(1.0) and m[3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.45 / 0.95)), rel=1e-3)
    assert m[4] == pytest.approx(0.1) and m[5] == pytest.approx(0.1)
    assert sched.lr(123, 0.5) == sched.lr(0, 0.5)  # the update count does not move a time-based schedule


def test_per_position_scoring_buckets(tiny_model_config, one_thread):
    torch.manual_seed(0)
    model = build_model(tiny_model_config("longvq")).eval()
    tokens = torch.randint(0, 32, (203,))
    r = score(model, tokens, mode="disjoint", context=24, batch_size=3, device=torch.device("cpu"), per_position=True)
    assert r.pos_cnt.sum() == 202 and r.pos_sum.sum() == pytest.approx(r.nll_sum)
    b = rc_lib.bucketize(r.pos_sum, r.pos_cnt, rc_lib.linear_edges(24, 8))
    assert b["edges"] == [0, 8, 16, 24] and sum(b["count"]) == 202
    assert b["loss"][0] == pytest.approx(r.pos_sum[:8].sum() / r.pos_cnt[:8].sum())
    assert rc_lib.log2_edges(24) == [0, 1, 2, 4, 8, 16, 24]


# --------------------------------------------------------------------------------------------
# attention_mass_split
# --------------------------------------------------------------------------------------------


def brute_force_split(q, k_hat, codes, codebook, C, bias=None, scale=None):
    """Dense T x T softmax (the dense_vq_attention rule) in float64, mass split by key region:
    (own, prev, cache) each (B, H, T)."""
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k_hat.double()) * scale
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    dist = i - j
    if bias is not None:
        s = s + torch.where((dist >= 0) & (dist <= C), bias.double()[:, dist.clamp(0, C)], torch.zeros((), dtype=torch.float64))[None]
    p = torch.softmax(s.masked_fill(dist < 0, float("-inf")), dim=-1)
    ci, cj = i // C, j // C
    return [(p * m.double()).sum(-1) for m in (cj == ci, cj == ci - 1, cj <= ci - 2)]


@pytest.mark.parametrize("T,C,with_bias", [(37, 5, True), (40, 8, False), (6, 4, True)])
def test_mass_split_matches_dense_brute_force(T, C, with_bias):
    torch.manual_seed(T)
    B, H, D, S = 2, 3, 8, 7
    codebook = torch.randn(H, S, D, dtype=torch.float64)
    codes = torch.randint(0, S, (B, T, H))
    codes[:, :, 0] = codes[:, :, 0] % 3  # repeated codes: the cache's log-count weights matter
    k_hat = codebook[torch.arange(H)[None, None], codes]
    q = 2 * torch.randn(B, T, H, D, dtype=torch.float64)
    v = torch.randn(B, T, H, 5, dtype=torch.float64)
    bias = torch.randn(H, C + 1, dtype=torch.float64) if with_bias else None
    split = attention_mass_split(q, k_hat, v, codes, codebook, chunk_size=C, bias=bias)
    ref = brute_force_split(q, k_hat, codes, codebook, C, bias)
    total = 0.0
    for name, r in zip(("own", "prev", "cache"), ref):
        torch.testing.assert_close(split["per_position"][name], r.mean(dim=(0, 1)), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(split["per_head"][name], r.mean(dim=(0, 2)), rtol=1e-9, atol=1e-12)
        assert split[name] == pytest.approx(float(r.mean()), abs=1e-12)
        total += split[name]
    assert total == pytest.approx(1.0, abs=1e-12)
    pp = split["per_position"]
    torch.testing.assert_close(pp["own"] + pp["prev"] + pp["cache"], torch.ones(T, dtype=torch.float64))
    assert pp["own"][0] == 1.0 and float(pp["cache"][: 2 * C].abs().max()) == 0.0 and float(pp["prev"][:C].abs().max()) == 0.0
    late = summarize_mass(split, 2 * C)
    if T > 2 * C:
        assert late["cache"] == pytest.approx(float(ref[2][..., 2 * C:].mean()), abs=1e-12)
        assert summarize_mass(split, 2 * C, per_head=True)["cache"] == pytest.approx(ref[2][..., 2 * C:].mean(dim=(0, 2)).tolist())
    else:
        assert late["cache"] is None


def brute_force_entropy(q, k_hat, codes, C, bias=None, flat=False):
    """Mean entropy over (b, h, i) of the query's distribution over its slots: each own / previous-chunk key,
    and each code of the cache (tokens of chunks <= r - 2 grouped by code). flat: q.k = 0 and no bias."""
    B, T, H, D = q.shape
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k_hat.double()) * D ** -0.5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    dist = i - j
    if bias is not None:
        s = s + torch.where((dist >= 0) & (dist <= C), bias.double()[:, dist.clamp(0, C)], torch.zeros((), dtype=torch.float64))[None]
    if flat:
        s = torch.zeros_like(s)
    p = torch.softmax(s.masked_fill(dist < 0, float("-inf")), dim=-1)
    total = 0.0
    for b in range(B):
        for h in range(H):
            for t in range(T):
                slots = [float(p[b, h, t, u]) for u in range(t + 1) if u // C >= t // C - 1]
                far = [u for u in range(t + 1) if u // C <= t // C - 2]
                for z in set(int(codes[b, u, h]) for u in far):
                    slots.append(sum(float(p[b, h, t, u]) for u in far if int(codes[b, u, h]) == z))
                total += -sum(x * math.log(x) for x in slots if x > 0)
    return total / (B * H * T)


@pytest.mark.parametrize("with_bias", [True, False])
def test_attention_entropy_matches_brute_force(with_bias):
    torch.manual_seed(3)
    B, T, H, D, S, C = 1, 23, 2, 8, 5, 4
    codebook = torch.randn(H, S, D, dtype=torch.float64)
    codes = torch.randint(0, S, (B, T, H))
    k_hat = codebook[torch.arange(H)[None, None], codes]
    q = 3 * torch.randn(B, T, H, D, dtype=torch.float64)
    bias = torch.randn(H, C + 1, dtype=torch.float64) if with_bias else None
    split = attention_mass_split(q, k_hat, torch.randn(B, T, H, 3, dtype=torch.float64), codes, codebook,
                                 chunk_size=C, bias=bias)
    assert split["entropy"] == pytest.approx(brute_force_entropy(q, k_hat, codes, C, bias), rel=1e-9)
    assert split["entropy_flat"] == pytest.approx(brute_force_entropy(q, k_hat, codes, C, flat=True), rel=1e-9)
    assert split["entropy"] < split["entropy_flat"]  # scaled-up random queries are sharper than flat
    sharp = attention_mass_split(q * 0, k_hat, torch.randn(B, T, H, 3, dtype=torch.float64), codes, codebook, chunk_size=C)
    assert sharp["entropy"] == pytest.approx(sharp["entropy_flat"], rel=1e-12)  # q = 0, no bias: flat
    assert len(split["per_head"]["entropy"]) == H


def test_capture_is_off_by_default_and_feeds_the_diagnostic(tiny_model_config, one_thread):
    torch.manual_seed(1)
    model = build_model(tiny_model_config("longvq", impl="chunked")).eval()
    mixers = [b.mixer for b in model.blocks]
    tokens = torch.randint(0, 32, (2, 19))
    assert all(m.capture is False for m in mixers)
    with torch.no_grad():
        model(tokens)
    assert not any(hasattr(m, "captured") for m in mixers)

    mixers[1].capture = True
    with torch.no_grad():
        model(tokens)
    assert not hasattr(mixers[0], "captured")
    cap = mixers[1].captured
    assert set(cap) == {"q", "k_hat", "v", "codes", "codebook", "bias"}
    B, T, H = 2, 19, 2
    assert cap["q"].shape[:3] == (B, T, H) and cap["codes"].shape == (B, T, H) and cap["v"].shape[:3] == (B, T, H)
    assert cap["bias"].shape == (H, mixers[1].chunk_size + 1) and not cap["q"].requires_grad
    torch.testing.assert_close(cap["k_hat"], cap["codebook"][torch.arange(H)[None, None], cap["codes"]])
    C = mixers[1].chunk_size
    split = attention_mass_split(**cap, chunk_size=C)
    ref = brute_force_split(cap["q"], cap["k_hat"], cap["codes"], cap["codebook"], C, cap["bias"])
    for name, r in zip(("own", "prev", "cache"), ref):
        torch.testing.assert_close(split["per_position"][name], r.mean(dim=(0, 1)), rtol=1e-5, atol=1e-6)
    assert split["own"] + split["prev"] + split["cache"] == pytest.approx(1.0, abs=1e-6)
    # the race's helper switches capture on for one forward and leaves it off afterwards
    layers = rc_lib.attention_mass(model, tokens, torch.device("cpu"))
    assert [m["layer"] for m in layers] == [0, 1] and all(m.capture is False for m in mixers)
    assert not any(hasattr(m, "captured") for m in mixers)


def test_race_imports_nothing_from_deepspeed():
    code = ("import sys, evals.quality_race, lm.ops.vq_diagnostics; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
