"""Checkpoints you can trust: resume on another topology, atomic saves under SIGKILL and full disks,
SIGTERM save-and-exit, corrupt and malicious files refused, non-finite loss policies, export."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lm import checkpoint
from lm.checkpoint import CheckpointError
from tests.dist_harness import run_dist
from tests.test_train import ROOT, tiny_cfg


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ckpt_cache"))


def _train(cfg, resume=None, patch=None):
    if patch is not None:
        patch()
    from lm.train import train

    return train(cfg, resume=resume)


def cfg_for(run_dir, cache, *extra):
    return tiny_cfg(run_dir, cache, "train.max_steps=6", "train.save_every=3", "train.keep_last=5", *extra)


def crash_after_step3(run_dir: Path) -> None:
    """Make the run look as if it died right after publishing its step-3 checkpoint."""
    import shutil

    shutil.rmtree(run_dir / "checkpoints/global_step6")
    (run_dir / "checkpoints/latest").write_text("global_step3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """Uninterrupted single-process runs (global batch 8) to compare resumed runs against."""
    out = {}
    for stage in (1, 2):
        d = tmp_path_factory.mktemp(f"ref{stage}")
        (out[stage],) = run_dist(_train, 1, cfg=cfg_for(d, cache, "train.grad_accum_steps=2", f"parallel.zero_stage={stage}"))
    return out


@pytest.mark.parametrize("saved_world,resumed_world", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(tmp_path, cache, reference, saved_world, resumed_world):
    accum = lambda w: f"train.grad_accum_steps={2 // w}"  # noqa: E731  same global batch on any world size
    run = tmp_path / "run"
    run_dist(_train, saved_world, cfg=cfg_for(run, cache, accum(saved_world), "parallel.zero_stage=2"))
    crash_after_step3(run)
    resumed = run_dist(_train, resumed_world, cfg=cfg_for(run, cache, accum(resumed_world), "parallel.zero_stage=2"),
                       resume="auto")
    for r in resumed:  # optimizer state survived the resharding: the next steps match the straight run
        torch.testing.assert_close(r["losses"], reference[2]["losses"][3:], rtol=2e-5, atol=2e-5)
        assert_same_codebooks(r, reference[2])  # buffers too (universal loading restores parameters only)
    assert (run / "checkpoints/universal/global_step3/done").is_file()


def assert_same_codebooks(result: dict, reference: dict) -> None:
    """Codebooks at the end of a resumed run equal the uninterrupted run's (a codebook reset at the resume
    would show here long before it shows in the loss of a fresh tiny model)."""
    assert result["codebooks"].keys() == reference["codebooks"].keys()
    for layer, cb in result["codebooks"].items():
        torch.testing.assert_close(cb, reference["codebooks"][layer], rtol=2e-5, atol=2e-5)


def test_pipeline_checkpoint_resumes_on_one_stage(tmp_path, cache, reference):
    run = tmp_path / "run"
    run_dist(_train, 2, cfg=cfg_for(run, cache, "train.grad_accum_steps=2", "parallel.zero_stage=1",
                                     "parallel.pipeline_stages=2"))
    crash_after_step3(run)
    (r,) = run_dist(_train, 1, cfg=cfg_for(run, cache, "train.grad_accum_steps=2", "parallel.zero_stage=1"), resume="auto")
    torch.testing.assert_close(r["losses"], reference[1]["losses"][3:], rtol=2e-5, atol=2e-5)
    assert_same_codebooks(r, reference[1])


def test_zero_stage_change_is_refused_with_the_fix(tmp_path, cache):
    run = tmp_path / "run"
    run_dist(_train, 1, cfg=cfg_for(run, cache, "parallel.zero_stage=2", "train.max_steps=3"))
    with pytest.raises(RuntimeError, match=r"resume it with parallel.zero_stage=2"):
        run_dist(_train, 1, cfg=cfg_for(run, cache, "parallel.zero_stage=3"), resume="auto")


def test_config_for_another_model_is_refused(tmp_path, cache):
    run = tmp_path / "run"
    run_dist(_train, 1, cfg=cfg_for(run, cache, "train.max_steps=3"))
    with pytest.raises(RuntimeError, match=r"model\.n_layers: checkpoint 2 vs run 3"):
        run_dist(_train, 1, cfg=cfg_for(run, cache, "model.n_layers=3"), resume="auto")


def test_resume_applies_a_changed_lr_and_refuses_a_changed_window(tmp_path, cache):
    """optim.lr on resume is what the next steps use (and what config.yaml records); data.seq_len is refused
    with the reason and the fix."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lm.optim import lr_lambda

    run = tmp_path / "run"
    run_dist(_train, 1, cfg=cfg_for(run, cache, "train.max_steps=3"))
    cfg = cfg_for(run, cache, "train.max_steps=5", "optim.lr=1e-2")
    run_dist(_train, 1, cfg=cfg, resume="auto")
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert lr[4] == pytest.approx(1e-2 * lr_lambda(3, cfg.optim, 5), rel=1e-6)
    assert "lr: 0.01" in (run / "config.yaml").read_text()
    with pytest.raises(RuntimeError, match=r"data\.seq_len 32 -> 64 .*keep data\.seq_len=32"):
        run_dist(_train, 1, cfg=cfg_for(run, cache, "train.max_steps=7", "data.seq_len=64"), resume="auto")


def _python(code: str, env_extra=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


TRAIN_ARGS = ["launch/configs/quickstart.yaml", "data.seq_len=32", "model.d_model=32", "model.n_layers=2",
              "model.longvq.chunk_size=8", "model.longvq.codebook_size=16", "model.longvq.z_dim=16",
              "model.longvq.ema_dim=4", "train.micro_batch_size=4", "train.progress_bar=false", "train.eval_every=0",
              "optim.warmup_steps=2", "train.log_every=1", "train.keep_last=5"]


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path, cache):
    run = tmp_path / "run"
    args = TRAIN_ARGS + [f"train.run_dir={run}", f"data.cache_dir={cache}", "train.max_steps=6", "train.save_every=2"]
    code = f"""
import os, signal, lm.checkpoint.store as c
real = c.os.replace
def replace(src, dst):
    if str(dst).endswith("global_step4"):      # shards written, not yet published
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
c.os.replace = replace
from lm.train import main
main({args!r})
"""
    proc = _python(code)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    ckpt = run / "checkpoints"
    assert checkpoint.read_latest(ckpt) == "global_step2"
    assert (ckpt / ".staging-global_step4/global_step4").is_dir()  # the half-published save
    checkpoint.verify(ckpt / "global_step2")
    (resumed,) = run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=6", "train.save_every=2"), resume="auto")
    assert len(resumed["losses"]) == 4 and resumed["step"] == 6  # continued from step 2
    assert not (ckpt / ".staging-global_step4").exists()  # cleaned by the next save of that step
    assert checkpoint.read_latest(ckpt) == "global_step6"


def test_full_disk_while_saving_publishes_nothing(tmp_path, cache):
    run = tmp_path / "run"

    def patch():
        import deepspeed.runtime.engine as eng
        import torch as t

        real = t.save

        def save(obj, f, *a, **k):
            if "global_step4" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(obj, f, *a, **k)

        eng.torch.save = save  # what DeepSpeed's checkpoint engine calls
        import deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine as tce
        tce.torch.save = save

    with pytest.raises(RuntimeError, match=r"No space left.*nothing was published.*global_step2"):
        run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=6", "train.save_every=2"), patch=patch)
    assert checkpoint.read_latest(run / "checkpoints") == "global_step2"
    checkpoint.verify(run / "checkpoints/global_step2")
    assert not list((run / "checkpoints").glob(".staging-*"))  # the failed save cleaned up after itself


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, cache):
    run = tmp_path / "run"
    args = TRAIN_ARGS + [f"train.run_dir={run}", f"data.cache_dir={cache}", "train.max_steps=100000"]
    # exit status 9 if the run left its process group up (lm.parallel.dist.shutdown_distributed)
    proc = _python(f"import sys\nimport torch.distributed as dist\nfrom lm.train import main\nrc = main({args!r})\n"
                   f"sys.exit(9 if dist.is_initialized() else rc)")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 3 loss" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "preempted; checkpoint" in out
    tag = checkpoint.read_latest(run / "checkpoints")
    stopped_at = int(tag.removeprefix("global_step"))
    assert stopped_at >= 3
    state = checkpoint.load_trainer_state(run / "checkpoints", tag)
    assert state["step"] == stopped_at and state["consumed_samples"] == stopped_at * 4
    (resumed,) = run_dist(_train, 1, cfg=tiny_cfg(run, cache, f"train.max_steps={stopped_at + 2}"), resume="auto")
    assert resumed["step"] == stopped_at + 2 and len(resumed["losses"]) == 2


def test_corrupt_shard_is_rejected_and_auto_falls_back(tmp_path, cache):
    run = tmp_path / "run"
    run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=4", "train.save_every=2", "train.keep_last=5"))
    shard = run / "checkpoints/global_step4/mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt content does not match its sha256"):
        checkpoint.verify(run / "checkpoints/global_step4")
    with pytest.raises(RuntimeError, match="corrupt"):
        run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=6"), resume=str(run / "checkpoints/global_step4"))
    (r,) = run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=6"), resume="auto")
    assert len(r["losses"]) == 4  # resumed from the good step-2 checkpoint


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Evil.target}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path, cache):
    run = tmp_path / "run"
    run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=2"))
    sentinel = tmp_path / "pwned"
    Evil.target = sentinel
    folder = run / "checkpoints/global_step2"
    # 1) our own file: refused by weights_only loading (tests/test_security.py plants payloads in every kind
    #    of file, with the manifest re-hashed to match)
    with open(folder / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt: refusing to unpickle it: it references posix.system"):
        checkpoint.load_trainer_state(run / "checkpoints", "global_step2")
    # 2) a DeepSpeed shard (which DeepSpeed unpickles fully): refused by the manifest before loading
    with open(folder / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": Evil()}, f)
    with pytest.raises(RuntimeError, match="incomplete or corrupt"):
        run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=4"), resume=str(folder))
    from evals.perplexity import main

    assert main(["--checkpoint", str(run), "--max-tokens", "100", "--no-progress"]) == 2
    assert not sentinel.exists()


def _nan_at_step(step):
    """Make the training loss of the step-th micro-batch NaN (the model's loss output, as the trainer reads it)."""
    def patch():
        from lm.model.lm import LanguageModel

        real = LanguageModel.forward
        calls = {"n": 0}

        def forward(self, tokens, *args, **kwargs):
            out = real(self, tokens, *args, **kwargs)
            if out.loss is not None:
                calls["n"] += 1
                if calls["n"] == step:
                    out.loss = out.loss * float("nan")
            return out

        LanguageModel.forward = forward
    return patch


def test_nonfinite_halt_is_the_default(tmp_path, cache):
    with pytest.raises(RuntimeError, match="NonFiniteLoss.*train.on_nonfinite=halt"):
        run_dist(_train, 1, cfg=tiny_cfg(tmp_path / "r", cache, "train.max_steps=5"), patch=_nan_at_step(3))


def test_nonfinite_skip_counts_and_skips_the_update(tmp_path, cache):
    (r,) = run_dist(_train, 1, cfg=tiny_cfg(tmp_path / "r", cache, "train.max_steps=6", "train.on_nonfinite=skip"),
                    patch=_nan_at_step(3))
    assert r["step"] == 6 and r["nonfinite_events"] == 1
    assert len(r["losses"]) == 5 and all(map(lambda x: x == x, r["losses"]))  # 5 finite steps logged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "r/tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/nonfinite_events")][-1] == 1
    with pytest.raises(RuntimeError, match="max_skipped_steps=0"):
        run_dist(_train, 1, cfg=tiny_cfg(tmp_path / "r2", cache, "train.max_steps=6", "train.on_nonfinite=skip",
                                          "train.max_skipped_steps=0"), patch=_nan_at_step(3))


def test_nonfinite_rollback_reloads_the_last_checkpoint(tmp_path, cache):
    (r,) = run_dist(_train, 1, cfg=tiny_cfg(tmp_path / "r", cache, "train.max_steps=6", "train.save_every=2",
                                             "train.on_nonfinite=rollback"), patch=_nan_at_step(4))
    # steps 1-3 ok, step 4 is bad -> back to step 2, then steps 3..6 on fresh data
    assert r["step"] == 6 and r["nonfinite_events"] == 1
    assert len(r["losses"]) == 3 + 4
    assert r["consumed_samples"] == (4 + 4) * 4  # the bad step's data and what preceded it since step 2 are skipped


def test_export_loads_on_one_process_and_matches(tmp_path, cache):
    run = tmp_path / "run"
    run_dist(_train, 2, cfg=tiny_cfg(run, cache, "train.max_steps=2", "parallel.zero_stage=3"))
    out = tmp_path / "export"
    assert checkpoint.main(["export", str(run), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    from evals.perplexity import main

    results = []
    for src in (run, out):
        j = tmp_path / f"{src.name}.json"
        assert main(["--checkpoint", str(src), "--split", "valid", "--max-tokens", "500", "--no-progress", "--json", str(j)]) == 0
        results.append(json.loads(j.read_text())["nll_sum"])
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_keep_last_prunes_old_checkpoints(tmp_path, cache):
    run = tmp_path / "run"
    run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=8", "train.save_every=2", "train.keep_last=2"))
    assert checkpoint.list_tags(run / "checkpoints") == ["global_step6", "global_step8"]
    assert not list((run / "checkpoints").glob(".staging-*"))


def test_pipeline_checkpoint_evaluates_on_one_process(tmp_path, cache):
    run = tmp_path / "run"
    run_dist(_train, 2, cfg=tiny_cfg(run, cache, "train.max_steps=2", "parallel.pipeline_stages=2",
                                      "parallel.zero_stage=1"))
    from evals.common import load_for_eval

    model, cfg, _ = load_for_eval(run, torch.device("cpu"))  # strict: every plain-model weight found
    state = checkpoint.load_module_state(*checkpoint.resolve_checkpoint(run))
    torch.testing.assert_close(model.embed.weight, state["embed.weight"])
    assert any(k.startswith("blocks.1.mixer.quantizer.c_sum") for k in state)


def _train_until_halt(cfg, nan_rank):
    import os as _os

    if _os.environ["RANK"] == str(nan_rank):
        _nan_at_step(2)()
    from lm.train import NonFiniteLoss, train

    try:
        train(cfg)
    except NonFiniteLoss as exc:
        return str(exc)
    return "no halt"


def test_nonfinite_loss_on_one_rank_halts_every_rank(tmp_path, cache):
    """The rank that sees the NaN must not leave the others waiting in a collective."""
    results = run_dist(_train_until_halt, 2, timeout=60, cfg=tiny_cfg(tmp_path / "r", cache, "train.max_steps=4"),
                       nan_rank=1)
    assert all("non-finite loss at step 2" in r and "halt" in r for r in results), results


def test_fused_optimizer_step_counters_follow_the_parameters():
    """A universal-checkpoint load leaves AdamW's `step` counters on the CPU; a fused optimizer on the GPU
    then refuses to step (seen on 2 H200s). Here the parameters live on 'meta', the counter on the CPU."""
    from types import SimpleNamespace

    from lm.checkpoint import align_optimizer_steps

    p = torch.nn.Parameter(torch.ones(3, device="meta"))
    opt = torch.optim.AdamW([p], lr=0.1, capturable=True)
    opt.state[p] = {"step": torch.tensor(4.0), "exp_avg": torch.zeros(3, device="meta")}
    wrapper = SimpleNamespace(optimizer=SimpleNamespace(optimizer=opt))  # engine.optimizer (ZeRO) -> torch optim
    assert align_optimizer_steps(wrapper) == 1
    assert opt.state[p]["step"].device == p.device
    assert align_optimizer_steps(wrapper) == 0  # already aligned
    q = torch.nn.Parameter(torch.ones(2, device="meta"))
    plain = torch.optim.AdamW([q], lr=0.1)
    plain.state[q] = {"step": torch.tensor(4.0)}
    assert align_optimizer_steps(plain) == 0  # non-fused AdamW keeps CPU counters (torch's convention)
    assert plain.state[q]["step"].device.type == "cpu"


def test_auto_falls_back_past_a_broken_manifest(tmp_path, cache):
    """A manifest that is not JSON, or has no file list, marks a bad checkpoint: --resume auto takes the
    previous good one (and says why it skipped the newer ones)."""
    run = tmp_path / "run"
    run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=6", "train.save_every=2", "train.keep_last=5"))
    ckpt = run / "checkpoints"
    (ckpt / "global_step6/manifest.json").write_text('{"format": 1, "files": {"config.yaml": ')  # torn write
    (ckpt / "global_step4/manifest.json").write_text('{"format": 1, "tag": "global_step4"}')
    with pytest.raises(CheckpointError, match=r"global_step6/manifest.json is not valid JSON"):
        checkpoint.verify(ckpt / "global_step6")
    with pytest.raises(CheckpointError, match=r"global_step4/manifest.json has no file list"):
        checkpoint.verify(ckpt / "global_step4")
    assert checkpoint.newest_good(ckpt) == "global_step2"
    (r,) = run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=8"), resume="auto")
    assert len(r["losses"]) == 6 and r["step"] == 8  # continued from step 2


def test_auto_refuses_when_every_checkpoint_is_bad(tmp_path, cache):
    """Checkpoints that all fail verification are never trained over: the refusal lists each and why."""
    run = tmp_path / "run"
    run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=4", "train.save_every=2", "train.keep_last=5"))
    ckpt = run / "checkpoints"
    (ckpt / "global_step4/manifest.json").write_text("not json")
    (ckpt / "global_step2/trainer_state.pt").unlink()
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match=r"none of the 2 checkpoint\(s\) under .* is usable.*global_step4: .*not valid "
                                           r"JSON.*global_step2: .*missing trainer_state\.pt"):
        run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=6"), resume="auto")
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before  # nothing written over them
    assert checkpoint.newest_good(tmp_path / "nothing-here") is None  # no checkpoints at all: start fresh


def test_unlisted_file_in_a_checkpoint_fails_verification(tmp_path, cache):
    run = tmp_path / "run"
    run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=2"))
    folder = run / "checkpoints/global_step2"
    checkpoint.verify(folder)
    (folder / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unexpected file bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        checkpoint.verify(folder)
