"""The engines behind the one training step: precision modes, plain torch = DeepSpeed, and a skipped step
(a non-finite loss on any process) that leaves parameters, optimizer state, codebooks and the schedule
bit-identical, at every ZeRO stage and on two processes with weight decay on."""

from pathlib import Path

import pytest
import torch

from lm.config import load_config
from lm.engine import RandomTokens, TorchEngine, TrainLoop
from lm.optim import StepSchedule
from tests.dist_harness import run_dist

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "launch/configs/longvq_tiny.yaml")


def tiny(*extra):
    return load_config(TINY, overrides=["data.seq_len=64", "train.micro_batch_size=4", "optim.weight_decay=0.1",
                                        "optim.warmup_steps=0", "model.longvq.dead_code_reseed=batch", *extra])


def _dtypes(engine, cfg):
    seen = []
    h = engine.module.blocks[0].mixer.v_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loop = TrainLoop(engine, RandomTokens(256, 64), StepSchedule(cfg.optim, 2), micro_batch_size=4, max_steps=1)
    loss = loop.step().loss
    h.remove()
    return next(engine.module.parameters()).dtype, seen[0], loss


def _ds_dtypes(precision):
    from lm.engine import DeepSpeedEngine

    cfg = tiny(f"train.precision={precision}", "parallel.zero_stage=2")
    return _dtypes(DeepSpeedEngine(cfg, 1), cfg)


@pytest.mark.parametrize("precision,weights,activations", [("fp32", torch.float32, torch.float32),
                                                          ("bf16", torch.bfloat16, torch.bfloat16),
                                                          ("bf16-mixed", torch.float32, torch.bfloat16)])
def test_precision_modes_mean_the_same_on_both_engines(precision, weights, activations):
    cfg = tiny(f"train.precision={precision}")
    w, a, loss = _dtypes(TorchEngine(cfg, device=torch.device("cpu")), cfg)
    assert (w, a) == (weights, activations) and loss > 0
    ((w, a, loss),) = run_dist(_ds_dtypes, world_size=1, precision=precision)
    assert (w, a) == (weights, activations) and loss > 0


def _losses(kind, stage=0, steps=3):
    from lm.engine import build_engine

    cfg = tiny(f"parallel.zero_stage={stage}")
    engine = build_engine(cfg, kind, device=torch.device("cpu")) if kind == "torch" else build_engine(cfg, kind)
    loop = TrainLoop(engine, RandomTokens(256, 64, seed=5), StepSchedule(cfg.optim, steps), micro_batch_size=4,
                     max_steps=steps)
    return [loop.step().loss for _ in range(steps)]


def test_torch_and_deepspeed_engines_take_the_same_steps():
    torch_losses = _losses("torch")
    for stage in (0, 2):
        (ds,) = run_dist(_losses, world_size=1, kind="deepspeed", stage=stage)
        assert ds == pytest.approx(torch_losses, rel=1e-5), (stage, ds, torch_losses)


def _snapshot(engine):
    # ZeRO-3 keeps each process's shard in ds_tensor (the parameter itself is empty outside a forward)
    params = {n: getattr(p, "ds_tensor", p).detach().float().clone() for n, p in engine.module.named_parameters()}
    state = {}
    for i, group in enumerate(engine.optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            for k, v in engine.optimizer.state.get(p, {}).items():
                state[f"{i}.{j}.{k}"] = v.detach().clone() if torch.is_tensor(v) else v
    books = {f"{i}.{n}": getattr(vq, n).clone() for i, vq in engine.quantizers for n in ("c_sum", "c_count", "n_updates")}
    return params, state, books


def _same(a, b):
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), k


def _skip_check(kind="deepspeed", stage=0, nan_rank=0, poison="nan"):
    """Two good steps, then one whose loss is non-finite on `nan_rank` only: nothing may change. poison="nan":
    the loss times NaN (NaN gradients too); "inf": +inf added to the loss, gradients stay finite, so only the
    step's own skip (on the device with the fused optimizer) keeps the update out."""
    import os

    from lm.engine import build_engine

    cfg = tiny(f"parallel.zero_stage={stage}")
    engine = build_engine(cfg, kind, device=torch.device("cpu")) if kind == "torch" else build_engine(cfg, kind)
    loop = TrainLoop(engine, RandomTokens(256, 64, seed=5), StepSchedule(cfg.optim, 10), micro_batch_size=4, max_steps=10)
    loop.step()
    loop.step()
    before, updates = _snapshot(engine), loop.state.updates
    forward = engine.forward
    rank = int(os.environ.get("RANK", "0"))

    def poisoned(x, y, *loss_options):
        out = forward(x, y, *loss_options)
        if rank == nan_rank:
            out.loss = out.loss * float("nan") if poison == "nan" else out.loss + float("inf")
        return out

    engine.forward = poisoned
    result = loop.step()
    engine.forward = forward
    after = _snapshot(engine)
    _same(before, after)
    assert result.skipped and result.nonfinite == 1 and loop.state.updates == updates and loop.state.step == 3
    assert result.grad_norm is None
    good = loop.step()  # and training goes on
    assert not good.skipped and loop.state.updates == updates + 1
    after_good = _snapshot(engine)
    assert any(not torch.equal(after_good[0][k], after[0][k]) for k in after[0])  # the good step did update
    return engine.skips_on_device


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_skipped_step_changes_nothing_on_the_torch_engine(poison):
    assert _skip_check("torch", poison=poison)  # fused AdamW: the skip is decided on the device


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_skipped_step_changes_nothing_under_deepspeed(stage, poison):
    assert run_dist(_skip_check, world_size=1, stage=stage, poison=poison) == [True]


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(poison):
    assert run_dist(_skip_check, world_size=2, stage=2, nan_rank=1, poison=poison) == [True, True]


def test_the_optimizer_skips_on_the_device_only_when_fused():
    from lm.optim import AdamW

    for fused in (True, False):
        p = torch.nn.Parameter(torch.randn(6))
        p.grad = torch.randn(6)
        opt = AdamW([p], lr=0.1, fused=fused)
        assert opt.skips_on_device is fused
        opt.found_inf = torch.tensor(1.0)
        if not fused:
            with pytest.raises(ValueError, match="fused"):
                opt.step()
            continue
        before = p.detach().clone()
        opt.step()
        assert torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == 0 and not opt.state[p]["exp_avg"].any()
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        assert not torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == 1


def test_a_recipe_the_hardware_cannot_run_is_refused_before_anything_is_built(tmp_path):
    import subprocess
    import sys

    from lm.config import ConfigError
    from lm.engine import check_hardware

    cfg = tiny("model.longvq.attention_impl=fused")
    with pytest.raises(ConfigError, match="attention_impl=fused needs a CUDA GPU.*attention_impl=auto"):
        check_hardware(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="attention_impl=fused"):
        TorchEngine(cfg, device=torch.device("cpu"))
    proc = subprocess.run([sys.executable, "-m", "lm.train", TINY, "model.longvq.attention_impl=fused",
                           f"train.run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "config error: model.longvq.attention_impl=fused needs a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
