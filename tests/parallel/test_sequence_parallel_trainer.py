"""lm.train under sequence parallelism (CPU, gloo, fp32): SP=2 on 2 processes trains like SP=1 on one process
with the same global batch (losses, held-out loss, codebooks bit-identical on every rank), so do DP 2 x SP 2
on 4 processes and the Transformer with Ulysses; a checkpoint taken with SP=2 resumes on SP=1 and on SP=4 with the uninterrupted losses; a
wrong exchange inside the trainer shows in its losses; held-out scoring split over an SP group equals one
process's.

Tolerance: the trainer runs DeepSpeed in fp32 (DeepSpeed reduces gradients in fp32 and keeps fp32 master
weights, so a float64 model would not be trained in float64 either). Segment sums and the two-rank gradient
average change the float32 summation order only: measured loss differences are below 5e-7 over 6 steps,
asserted within TOL = 1e-5 (the data-parallel tests' tolerance); codebooks (EMA sums of keys, up to ~25
here) differ by up to 8e-6, a few float32 ulps, asserted within TOL absolute + TOL relative. The exact, float64 statement of the same equality is
tests/parallel/test_sequence_parallel.py (1e-10); the wrong-exchange test below checks that TOL still
separates a correct trainer from a broken one by orders of magnitude.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lm.config import ConfigError
from tests.dist_harness import run_dist
from tests.test_train import ROOT, tiny_cfg

TOL = 1e-5  # fp32, summation order only (see the module docstring)
STEPS = 6
SAVE_AT = 3


def _train(cfg, resume=None, broken=None):
    if broken is not None:  # this forked process only: one exchange of the SP context is made wrong
        from lm.parallel.sequence import SequenceContext

        original = getattr(SequenceContext, broken)
        setattr(SequenceContext, broken, lambda self, *a: original(self, *a) * 0)
    from lm.train import train

    return train(cfg, resume=resume)


def cfg_for(run_dir, cache, sp: int, *extra):
    """Global batch 8 sequences of 32 tokens (chunks of 8); ZeRO-2 (resumable on another number of replicas).
    Weights drawn 15x wider than the recipes' (init_std 0.3): at the usual 0.02 the logits of a fresh tiny model
    hardly depend on its hidden states, and dropping the whole code cache moved the loss by only ~1e-5."""
    return tiny_cfg(run_dir, cache, f"train.max_steps={STEPS}", "optim.grad_clip=0.5", "parallel.zero_stage=2",
                    "train.grad_accum_steps=2", "model.init_std=0.3", f"parallel.sequence_parallel={sp}", *extra)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sp_trainer_cache"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """One process (SP=1) and SP=2 on 2 processes, the same recipe: checkpoints at step 3, held-out loss at
    steps 3 and 6."""
    root = tmp_path_factory.mktemp("sp_trainer")
    extra = (f"train.save_every={SAVE_AT}", "train.keep_last=5", f"train.eval_every={SAVE_AT}", "train.eval_batches=2")
    (single,) = run_dist(_train, 1, cfg=cfg_for(root / "sp1", cache, 1, *extra))
    sp2 = run_dist(_train, 2, cfg=cfg_for(root / "sp2", cache, 2, *extra))
    return {"single": single, "sp2": sp2, "root": root}


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_sp2_trains_like_one_process(runs):
    single, sp2 = runs["single"], runs["sp2"]
    assert len(single["losses"]) == STEPS
    for r in sp2:
        torch.testing.assert_close(r["losses"], single["losses"], atol=TOL, rtol=0)
        assert r["consumed_samples"] == single["consumed_samples"] == STEPS * 8  # sequences, not segments
        for layer, cb in r["codebooks"].items():  # bit-identical on every rank; the one-process codebooks up to TOL
            assert torch.equal(cb, sp2[0]["codebooks"][layer])
            torch.testing.assert_close(cb, single["codebooks"][layer], atol=TOL, rtol=TOL)
    report = sp2[0]["report"]
    assert len(set(report["codebook_sha256_per_rank"])) == 1
    assert (report["world_size"], report["data_parallel"], report["sequence_parallel"]) == (2, 1, 2)
    assert report["tokens_per_step"] == single["report"]["tokens_per_step"] == 8 * 32  # the mesh's tokens, once each
    from lm.parallel.sequence import exchange_bytes

    cfg = cfg_for(runs["root"] / "sp2", "unused", 2)  # micro-batch 4 x 2 accumulation steps, fp32 activations
    assert report["exchange_bytes_per_layer_per_step"] == 2 * exchange_bytes(cfg.model, 4, 2, 32, torch.float32)["per_layer"]
    assert single["report"]["exchange_bytes_per_layer_per_step"] is None
    # held-out loss, scored with each window split over the SP group, and the logged training loss
    root = runs["root"]
    torch.testing.assert_close(scalars(root / "sp2", "valid/loss"), scalars(root / "sp1", "valid/loss"), atol=TOL, rtol=0)
    torch.testing.assert_close(scalars(root / "sp2", "train/loss"), single["losses"], atol=TOL, rtol=0)
    per_gpu = scalars(root / "sp2", "train/tokens_per_s_per_gpu")
    total = scalars(root / "sp2", "train/tokens_per_s")
    assert all(abs(t / 2 - g) <= 1e-6 * t for t, g in zip(total, per_gpu))
    state = torch.load(root / "sp2/checkpoints/global_step3/trainer_state.pt", weights_only=True)
    assert state["topology"]["sequence_parallel"] == 2


def test_data_parallel_times_sequence_parallel_trains_like_one_process(runs, tmp_path, cache):
    """World 4 = DP 2 x SP 2 (ranks 0, 1: sequences of DP index 0; ranks 2, 3: DP index 1), one micro-batch
    per step instead of two: the same global batch of 8 sequences."""
    results = run_dist(_train, 4, cfg=cfg_for(tmp_path / "dp2sp2", cache, 2, "train.grad_accum_steps=1"))
    for r in results:
        torch.testing.assert_close(r["losses"], runs["single"]["losses"], atol=TOL, rtol=0)
        assert r["consumed_samples"] == runs["single"]["consumed_samples"]
        for layer, cb in r["codebooks"].items():
            assert torch.equal(cb, results[0]["codebooks"][layer])
            torch.testing.assert_close(cb, runs["single"]["codebooks"][layer], atol=TOL, rtol=TOL)
    report = results[0]["report"]
    assert (report["data_parallel"], report["sequence_parallel"], report["tokens_per_step"]) == (2, 2, 8 * 32)


@pytest.mark.parametrize("resumed_sp", [1, 4])
def test_sp2_checkpoint_resumes_on_another_sequence_parallel_size(runs, cache, tmp_path, resumed_sp):
    run = tmp_path / "run"
    shutil.copytree(runs["root"] / "sp2", run)
    shutil.rmtree(run / "checkpoints/global_step6")  # as if the SP=2 run died after its step-3 checkpoint
    (run / "checkpoints/latest").write_text("global_step3")
    resumed = run_dist(_train, resumed_sp, cfg=cfg_for(run, cache, resumed_sp), resume="auto")
    for r in resumed:  # optimizer state and data position survive: the next steps are the uninterrupted run's
        assert r["step"] == STEPS
        torch.testing.assert_close(r["losses"], runs["single"]["losses"][SAVE_AT:], atol=2 * TOL, rtol=0)
        for layer, cb in r["codebooks"].items():  # restored with the checkpoint, then bit-identical on every rank
            assert torch.equal(cb, resumed[0]["codebooks"][layer])
            torch.testing.assert_close(cb, runs["single"]["codebooks"][layer], atol=2 * TOL, rtol=2 * TOL)
    assert (run / "checkpoints/universal/global_step3/done").is_file()


def test_transformer_with_ulysses_trains_like_one_process(tmp_path, cache):
    extra = ("model.arch=transformer", "model.transformer.n_heads=4", "train.max_steps=3")
    (single,) = run_dist(_train, 1, cfg=cfg_for(tmp_path / "sp1", cache, 1, *extra))
    sp2 = run_dist(_train, 2, cfg=cfg_for(tmp_path / "sp2", cache, 2, *extra))
    for r in sp2:
        torch.testing.assert_close(r["losses"], single["losses"], atol=TOL, rtol=0)


@pytest.mark.parametrize("broken", ["cache_prefix", "ema_initial_state"])
def test_a_wrong_exchange_shows_in_the_trainer_losses(runs, tmp_path, cache, broken):
    """The same SP=2 run with one exchange zeroed: far outside TOL (so the equality above is not vacuous)."""
    wrong = run_dist(_train, 2, cfg=cfg_for(tmp_path / "wrong", cache, 2, "train.max_steps=2"), broken=broken)
    diff = max(abs(a - b) for a, b in zip(wrong[0]["losses"], runs["single"]["losses"]))
    assert diff > 100 * TOL, diff


def _main(argv):
    import contextlib
    import io

    from lm.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_a_world_that_sequence_parallel_does_not_divide_is_a_config_error(tmp_path, cache):
    argv = [str(ROOT / "launch/configs/quickstart.yaml"), f"train.run_dir={tmp_path}", f"data.cache_dir={cache}",
            "parallel.sequence_parallel=2", "train.max_steps=1"]
    ((code, err),) = run_dist(_main, 1, argv=argv)
    assert code == 2 and err.count("\n") == 1, err
    assert "world size 1 is not divisible by parallel.sequence_parallel=2" in err


def test_the_torch_engine_refuses_sequence_parallelism(tmp_path, cache):
    from lm.engine import build_engine

    with pytest.raises(ConfigError, match="parallel.sequence_parallel=2 needs the DeepSpeed engine"):
        build_engine(cfg_for(tmp_path, cache, 2), "torch", device=torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# Held-out scoring split over the SP group (lm.engine.score(..., sp=ctx))
# --------------------------------------------------------------------------------------------


def _score_model():
    from lm.config import LongVQConfig, ModelConfig
    from lm.model import build_model

    lv = LongVQConfig(attention_impl="chunked", chunk_size=4, codebook_size=8, n_heads=2, z_dim=16, ema_dim=4,
                      residual="add")
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="longvq", vocab_size=32, d_model=32, n_layers=2, longvq=lv)).double().eval()
    tokens = torch.randint(0, 32, (75,), generator=torch.Generator().manual_seed(5))  # 74 targets: 4 windows + 10
    return model, tokens


def _score_worker():
    from lm.engine import score
    from lm.parallel.dist import init_distributed
    from lm.parallel.sequence import build_sequence_context

    init_distributed()
    ctx = build_sequence_context(torch.distributed.get_world_size())
    model, tokens = _score_model()
    return score(model, tokens, mode="disjoint", context=16, batch_size=3, per_position=True, sp=ctx)


def test_sequence_parallel_scoring_equals_one_process():
    """Windows of 16 split over 2 ranks (2 chunks each), a last window of 10 targets padded: the sum, the
    count and the per-position sums of one process (float64), the same on every rank."""
    from lm.engine import score

    model, tokens = _score_model()
    ref = score(model, tokens, mode="disjoint", context=16, batch_size=3, per_position=True)
    results = run_dist(_score_worker, world_size=2)
    for r in results:
        assert r.tokens == ref.tokens == 74
        assert abs(r.nll_sum - ref.nll_sum) <= 1e-10 * ref.tokens
        assert r.nll_sum == results[0].nll_sum
        assert (r.pos_cnt == ref.pos_cnt).all()
        assert abs(r.pos_sum - ref.pos_sum).max() <= 1e-10
