"""Distributed training on CPU processes (gloo): ZeRO 1/2/3 data parallel and a 2-stage pipeline give
the single-process losses for the same global batch, and codebooks stay identical on every rank."""

import time

import pytest
import torch

from lm.config import ConfigError, load_config
from tests.dist_harness import run_dist
from tests.test_train import ROOT, tiny_cfg

STEPS = 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("par_cache"))


def _train(cfg):
    from lm.train import train

    return train(cfg)


def _run(tmp_path, cache, name, world, *extra):
    # ZeRO-3: partition every parameter (DeepSpeed keeps parameters below 1e5 elements whole by default,
    # which would leave this tiny model unpartitioned and the test without its point)
    cfg = tiny_cfg(tmp_path / name, cache, f"train.max_steps={STEPS}", "optim.grad_clip=0.5",
                   "parallel.zero3_persistence_threshold=0", *extra)
    t = time.perf_counter()
    out = run_dist(_train, world_size=world, cfg=cfg)
    print(f"{name}: {world} proc(s) {time.perf_counter() - t:.1f}s")
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache):
    """The reference: one process, global batch 8 = micro 4 x accumulation 2."""
    return _run(tmp_path_factory.mktemp("single"), cache, "single", 1, "train.grad_accum_steps=2")[0]


def assert_same_codebooks(results, reference, atol):
    for r in results:
        assert r["codebooks"].keys() == reference["codebooks"].keys()
        for layer, cb in r["codebooks"].items():
            torch.testing.assert_close(cb, reference["codebooks"][layer], atol=atol, rtol=0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_data_parallel_matches_single_process(tmp_path, cache, single, stage):
    results = _run(tmp_path, cache, f"zero{stage}", 2, f"parallel.zero_stage={stage}")
    for r in results:
        torch.testing.assert_close(r["losses"], single["losses"], rtol=1e-5, atol=1e-5)
    # replicas are bit-identical; equal to the single process up to float summation order
    assert_same_codebooks(results[1:], results[0], atol=0)
    assert_same_codebooks(results, single, atol=1e-5)
    assert results[0]["consumed_samples"] == single["consumed_samples"]


def test_chunked_loss_under_zero3_matches_single_process(tmp_path, cache, single):
    """The chunked head loss reads the tied weight inside the head's forward: ZeRO-3 has it gathered there."""
    results = _run(tmp_path, cache, "zero3_chunked", 2, "parallel.zero_stage=3", "train.loss_chunk_tokens=24")
    for r in results:
        torch.testing.assert_close(r["losses"], single["losses"], rtol=1e-5, atol=1e-5)


def test_pipeline_matches_plain_model(tmp_path, cache, single):
    results = _run(tmp_path, cache, "pipe", 2, "parallel.pipeline_stages=2", "parallel.zero_stage=1",
                   "train.grad_accum_steps=2")
    for r in results:  # the loss is reduced from the last stage to every rank
        torch.testing.assert_close(r["losses"], single["losses"], rtol=1e-5, atol=1e-5)
    merged = {"codebooks": {k: v for r in results for k, v in r["codebooks"].items()}}
    assert sorted(merged["codebooks"]) == sorted(single["codebooks"])  # each layer's codebook on its stage
    assert_same_codebooks([merged], single, atol=1e-5)


def test_activation_checkpointing_changes_nothing(tmp_path, cache, single):
    (r,) = _run(tmp_path, cache, "ckpt", 1, "train.grad_accum_steps=2", "parallel.activation_checkpointing=true")
    torch.testing.assert_close(r["losses"], single["losses"], rtol=1e-6, atol=1e-6)
    assert_same_codebooks([r], single, atol=1e-6)  # recomputation does not double-count codebook statistics


def test_partial_activation_checkpointing_changes_nothing(tmp_path, cache, single):
    (r,) = _run(tmp_path, cache, "ckpt1", 1, "train.grad_accum_steps=2", "parallel.activation_checkpointing=true",
                "parallel.activation_checkpointing_blocks=1")
    torch.testing.assert_close(r["losses"], single["losses"], rtol=1e-6, atol=1e-6)
    assert_same_codebooks([r], single, atol=1e-6)
    with pytest.raises(ConfigError, match="activation_checkpointing_blocks"):
        load_config(ROOT / "launch/configs/quickstart.yaml", overrides=["parallel.activation_checkpointing_blocks=99"])


def test_checkpointing_only_the_first_blocks():
    from lm.config import ModelConfig
    from lm.model import build_model
    from lm.parallel.activation_checkpointing import apply_activation_checkpointing, is_checkpointed

    cfg = ModelConfig(arch="transformer", vocab_size=32, d_model=16, n_layers=3, ffn_dim=32)
    cfg.transformer.n_heads = 2
    torch.manual_seed(0)
    model = build_model(cfg)
    ref = build_model(cfg)
    ref.load_state_dict(model.state_dict())
    apply_activation_checkpointing(model.blocks, 2)
    assert [is_checkpointed(b) for b in model.blocks] == [True, True, False]
    assert list(model.state_dict()) == list(ref.state_dict())  # parameter names unchanged
    x = torch.randint(0, 32, (2, 9))
    for m in (model, ref):
        m(x).logits.pow(2).mean().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="num_blocks"):
        apply_activation_checkpointing(model.blocks, -1)


def test_pipeline_with_zero3_is_rejected_before_launch():
    with pytest.raises(ConfigError, match="ZeRO-2/3"):
        load_config(ROOT / "launch/configs/quickstart.yaml", overrides=["parallel.pipeline_stages=2", "parallel.zero_stage=3"])


def test_dry_run_prints_topology_and_memory(capsys):
    from lm.train import main

    assert main([str(ROOT / "launch/configs/quickstart.yaml"), "--dry-run", "--world-size", "8",
                 "parallel.pipeline_stages=2", "parallel.zero_stage=1", "train.grad_accum_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "world 8 = DP 4 x SP 1 x PP 2; ZeRO-1" in out
    assert "global batch 256" in out  # 16 micro x 4 accum x 4 DP
    assert "memory per GPU" in out and '"stage": 1' in out
    assert main([str(ROOT / "launch/configs/quickstart.yaml"), "--dry-run", "--world-size", "3",
                 "parallel.pipeline_stages=2"]) == 2  # 2 stages do not divide 3 processes


def test_optimizer_offload_matches(tmp_path, cache, single):
    (r,) = _run(tmp_path, cache, "offload", 1, "train.grad_accum_steps=2", "parallel.zero_stage=2",
                "parallel.offload_optimizer=true")
    torch.testing.assert_close(r["losses"], single["losses"], rtol=1e-5, atol=1e-5)


def test_first_batch_codebook_init_is_identical_on_every_rank(tmp_path, cache, single):
    results = _run(tmp_path, cache, "init", 2, "parallel.zero_stage=1", "model.longvq.codebook_init=first_batch")
    ref = _run(tmp_path, cache, "init1", 1, "train.grad_accum_steps=2", "model.longvq.codebook_init=first_batch")[0]
    assert_same_codebooks(results[1:], results[0], atol=0)  # rank 0's sample was broadcast
    assert_same_codebooks(results, ref, atol=1e-5)
    torch.testing.assert_close(results[0]["losses"], ref["losses"], rtol=1e-5, atol=1e-5)


def test_batch_reseeding_keeps_codebooks_identical_on_every_rank(tmp_path, cache):
    """dead_code_reseed=batch moves dead codes onto rank 0's worst-served keys (broadcast with the statistics),
    so every rank's codebook is the same and equals one process with the same global batch."""
    # threshold 0.9 of the mean count: some codes are re-seeded at every step of this short run
    opts = ("model.longvq.dead_code_reseed=batch", "model.longvq.dead_code_threshold=0.9")
    results = _run(tmp_path, cache, "reseed", 2, "parallel.zero_stage=1", *opts)
    ref = _run(tmp_path, cache, "reseed1", 1, "train.grad_accum_steps=2", *opts)[0]
    assert_same_codebooks(results[1:], results[0], atol=0)
    assert_same_codebooks(results, ref, atol=1e-5)
    split = _run(tmp_path, cache, "split1", 1, "train.grad_accum_steps=2", "model.longvq.dead_code_threshold=0.9")[0]
    with pytest.raises(AssertionError):  # and the re-seeding really ran: not the codebooks of splitting
        assert_same_codebooks([ref], split, atol=1e-3)


def test_compiled_blocks_give_the_same_losses(tmp_path, cache, single):
    """train.compile wires torch.compile per block (the 'eager' backend traces without generating code)."""
    (r,) = _run(tmp_path, cache, "compiled", 1, "train.grad_accum_steps=2", "train.compile=true",
                "train.compile_backend=eager")
    torch.testing.assert_close(r["losses"], single["losses"], rtol=1e-6, atol=1e-6)
    assert_same_codebooks([r], single, atol=1e-6)
