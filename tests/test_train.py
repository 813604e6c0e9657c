"""End-to-end trainer tests through DeepSpeed on CPU: losses fall, resume == uninterrupted, the
TensorBoard scalars and checkpoint contents exist, and the perplexity CLI reads the checkpoint."""

import json
import math
import shutil
from pathlib import Path

import pytest

from lm.config import load_config
from tests.dist_harness import run_dist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data_cache"))


def tiny_cfg(run_dir, cache, *extra):
    return load_config(ROOT / "launch/configs/quickstart.yaml", overrides=[
        f"train.run_dir={run_dir}", f"data.cache_dir={cache}", "data.seq_len=32", "model.d_model=32",
        "model.n_layers=2", "model.longvq.chunk_size=8", "model.longvq.codebook_size=16",
        "model.longvq.z_dim=16", "model.longvq.ema_dim=4", "train.micro_batch_size=4",
        "train.progress_bar=false", "train.eval_every=0", "optim.warmup_steps=2", "train.log_every=1",
        "train.save_every=0", *extra])


def _train(cfg, resume=None):
    from lm.train import train

    return train(cfg, resume=resume)


@pytest.mark.parametrize("arch", ["longvq", "transformer"])
def test_training_reduces_loss_and_writes_artifacts(tmp_path, data_cache, arch):
    cfg = tiny_cfg(tmp_path / "run", data_cache, "train.max_steps=30", f"model.arch={arch}", "optim.lr=3e-3",
                   "train.eval_every=15", "train.eval_batches=1", "train.log_every=4")
    (summary,) = run_dist(_train, world_size=1, cfg=cfg)
    losses = summary["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    ckpt = tmp_path / "run/checkpoints"
    assert (ckpt / "latest").read_text().strip() == "global_step30"
    assert (ckpt / "global_step30/config.yaml").is_file()
    assert (tmp_path / "run/config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run/tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tokens_per_s_interval"}
    expected |= {"valid/bpb"}
    if arch == "longvq":
        expected |= {"train/commit_loss", "codebook/usage", "codebook/perplexity", "codebook/rel_error",
                     "attention/cache_share", "attention/cache_share/layer1", "attention/own_share/layer0"}
    assert expected <= tags, tags
    if arch == "longvq":  # 32-token windows, chunks of 8: the cache holds real mass, the shares sum to 1
        shares = [acc.Scalars(f"attention/{r}_share/layer0")[-1].value for r in ("cache", "prev", "own")]
        assert 0 < shares[0] < 1 and abs(sum(shares) - 1) < 1e-5
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 31))
    # the logged rate covers every step since the previous log: tokens over the steps' summed time
    per_step = {e.step: e.value for e in acc.Scalars("train/tokens_per_s")}
    logged = {e.step: e.value for e in acc.Scalars("train/tokens_per_s_interval")}
    assert sorted(logged) == [4, 8, 12, 16, 20, 24, 28, 30]  # log_every=4 and the last step
    prev = 0
    for step in sorted(logged):
        steps = range(prev + 1, step + 1)
        assert logged[step] == pytest.approx(len(steps) / sum(1 / per_step[k] for k in steps), rel=1e-5)
        prev = step


def test_resume_continues_exactly(tmp_path, data_cache):
    """A run that crashed after its step-3 checkpoint and resumes gives the uninterrupted losses."""
    extra = ("train.max_steps=6", "train.grad_accum_steps=2", "model.dropout=0.1")  # dropout: RNG must resume too
    (full,) = run_dist(_train, world_size=1, cfg=tiny_cfg(tmp_path / "a", data_cache, *extra))
    crashed = tiny_cfg(tmp_path / "b", data_cache, *extra, "train.save_every=3")
    run_dist(_train, world_size=1, cfg=crashed)
    ckpt = tmp_path / "b/checkpoints"
    shutil.rmtree(ckpt / "global_step6")  # as if the process died after saving step 3
    (ckpt / "latest").write_text("global_step3")
    (resumed,) = run_dist(_train, world_size=1, cfg=crashed, resume="auto")
    assert resumed["losses"] == full["losses"][3:], (resumed["losses"], full["losses"])
    assert resumed["consumed_samples"] == full["consumed_samples"]
    assert resumed["step"] == 6


def test_perplexity_cli_on_checkpoint(tmp_path, data_cache):
    cfg = tiny_cfg(tmp_path / "run", data_cache, "train.max_steps=20", "optim.lr=3e-3")
    run_dist(_train, world_size=1, cfg=cfg)
    from evals.perplexity import main

    results = {}
    for label, extra in [("trained", []), ("untrained", ["--untrained"])]:
        out = tmp_path / f"{label}.json"
        assert main(["--checkpoint", str(tmp_path / "run"), "--split", "valid", "--max-tokens", "2000",
                     "--json", str(out), "--no-progress", *extra]) == 0
        results[label] = json.loads(out.read_text())
    r = results["trained"]
    for key in ("dataset", "split", "tokens", "nll_sum", "ppl", "bytes", "bpb", "context_len", "mode"):
        assert key in r
    assert r["tokens"] == 2000 and r["bytes"] == 2000
    assert math.isclose(r["ppl"], math.exp(r["nll_sum"] / r["tokens"]))
    assert math.isclose(r["bpb"], r["nll_sum"] / math.log(2) / r["bytes"])
    assert r["bpb"] < results["untrained"]["bpb"] - 1.0


def test_chunked_loss_trains_like_full_logits(tmp_path, data_cache):
    """train.loss_chunk_tokens: the same losses as the full-logits path (fp32, summation order only);
    refused with pipeline stages."""
    common = ("train.max_steps=4", "train.grad_accum_steps=2")
    (full,) = run_dist(_train, world_size=1, cfg=tiny_cfg(tmp_path / "full", data_cache, *common))
    (chunked,) = run_dist(_train, world_size=1, cfg=tiny_cfg(tmp_path / "chunk", data_cache, *common,
                                                             "train.loss_chunk_tokens=24"))
    assert len(chunked["losses"]) == 4
    for a, b in zip(chunked["losses"], full["losses"]):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5), (chunked["losses"], full["losses"])
    from lm.config import ConfigError

    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        tiny_cfg(tmp_path / "pp", data_cache, "train.loss_chunk_tokens=24", "parallel.pipeline_stages=2")
