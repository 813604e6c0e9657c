"""Starting and resuming runs: which run dirs are refused (check_run_dir) and which config changes a
resumed run applies or refuses (resume_config_changes)."""

import os

import pytest

from lm import checkpoint
from lm.checkpoint import RESUME_RULES, CheckpointError, check_run_dir, clear_checkpoints, resume_config_changes
from lm.config import ConfigError, RunConfig, config_from_dict, to_dict
from tests.test_train import ROOT, tiny_cfg


def _with(cfg: RunConfig, **changes) -> RunConfig:
    """A copy of cfg with dotted keys (underscores for dots) changed: _with(cfg, optim__lr=0.1)."""
    d = to_dict(cfg)
    for dotted, value in changes.items():
        node = d
        *path, last = dotted.split("__")
        for part in path:
            node = node[part]
        node[last] = value
    return config_from_dict(d)


def _leaf_keys(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_every_config_key_has_a_resume_rule():
    keys = set(_leaf_keys(to_dict(RunConfig())))
    assert keys == set(RESUME_RULES), (keys - set(RESUME_RULES), set(RESUME_RULES) - keys)


@pytest.fixture
def cfg(tmp_path):
    return tiny_cfg(tmp_path / "run", tmp_path / "cache")


def test_applicable_changes_are_returned(cfg):
    new = _with(cfg, optim__lr=1e-2, train__max_steps=50, train__log_every=5, train__eval_every=7,
                model__longvq__attention_impl="dense", model__dropout=0.1, data__cache_dir="/elsewhere")
    applied = resume_config_changes(cfg, new)
    assert applied == {"optim.lr": (cfg.optim.lr, 1e-2), "train.max_steps": (cfg.train.max_steps, 50),
                       "train.log_every": (1, 5), "train.eval_every": (0, 7),
                       "model.longvq.attention_impl": (cfg.model.longvq.attention_impl, "dense"),
                       "model.dropout": (0.0, 0.1), "data.cache_dir": (cfg.data.cache_dir, "/elsewhere")}
    assert resume_config_changes(cfg, cfg) == {}


@pytest.mark.parametrize("change, pattern", [
    ({"data__seq_len": 64}, r"data\.seq_len 32 -> 64 \(a training sample is a window.*keep data\.seq_len=32\)"),
    ({"model__d_model": 64}, r"model\.d_model 32 -> 64 \(the checkpoint's weights have the shape.*keep model\.d_model=32"),
    ({"train__seed": 7}, r"train\.seed 1234 -> 7 \(the seed sets the order.*keep train\.seed=1234"),
    ({"data__dataset": "enwik8"}, r"data\.dataset 'stdlib' -> 'enwik8'.*repeat or skip data"),
    ({"train__precision": "bf16"}, r"train\.precision 'auto' -> 'bf16'"),
    ({"train__micro_batch_size": 8}, r"the global batch 4 -> 8 .*product is 4"),
    ({"model__longvq__residual": "gated"}, r"model\.longvq\.residual 'add' -> 'gated'"),
])
def test_changes_that_cannot_apply_are_refused_with_the_fix(cfg, change, pattern):
    with pytest.raises(CheckpointError, match=r"cannot resume with these config changes: .*" + pattern):
        resume_config_changes(cfg, _with(cfg, **change))


def test_all_refusals_are_named_at_once(cfg):
    with pytest.raises(CheckpointError) as err:
        resume_config_changes(cfg, _with(cfg, data__seq_len=64, model__n_layers=3, optim__lr=0.5))
    msg = str(err.value)
    assert "data.seq_len" in msg and "model.n_layers" in msg and "optim.lr" not in msg
    assert "start a new run" in msg


def test_global_batch_may_be_split_differently_across_processes(cfg):
    saved = _with(cfg, train__grad_accum_steps=2)  # on 1 process: micro 4 x accum 2 = 8 samples per step
    one_proc = _with(cfg, train__grad_accum_steps=1)
    # on 2 processes, micro 4 x accum 1 x 2 = 8 samples per step: the same global batch, split differently
    applied = resume_config_changes(saved, one_proc, saved_world=1, current_world=2)
    assert applied == {"train.grad_accum_steps": (2, 1)}
    with pytest.raises(CheckpointError, match=r"global batch 8 -> 4 .*data-parallel processes"):
        resume_config_changes(saved, one_proc, saved_world=1, current_world=1)
    # pipeline stages do not add data-parallel ranks: 2 processes as 2 stages keep 1 data-parallel rank
    pp = _with(saved, parallel__pipeline_stages=2, parallel__zero_stage=1)
    assert resume_config_changes(saved, pp, saved_world=1, current_world=2) == {
        "parallel.pipeline_stages": (1, 2), "parallel.zero_stage": (0, 1)}


def test_zero3_partitioning_threshold_is_fixed_for_zero3_checkpoints(cfg):
    z3 = _with(cfg, parallel__zero_stage=3)
    with pytest.raises(CheckpointError, match="parallel.zero3_persistence_threshold .*partitioned by this threshold"):
        resume_config_changes(z3, _with(z3, parallel__zero3_persistence_threshold=0))
    assert "parallel.zero3_persistence_threshold" in resume_config_changes(cfg, _with(cfg, parallel__zero3_persistence_threshold=0))


def test_check_compatible_follows_the_rules(cfg, tmp_path):
    checkpoint.check_compatible(cfg, _with(cfg, model__longvq__commit_beta=0.5, model__init_std=0.1), tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.longvq\.chunk_size: checkpoint 8 vs run 16"):
        checkpoint.check_compatible(cfg, _with(cfg, model__longvq__chunk_size=16), tmp_path)


# --------------------------------------------------------------------------------------------
# check_run_dir
# --------------------------------------------------------------------------------------------


def _fake_tag(run_dir, step=2):
    (run_dir / "checkpoints" / f"global_step{step}").mkdir(parents=True)


def test_new_and_empty_run_dirs_are_fine(tmp_path):
    assert check_run_dir(tmp_path / "new/run", None, False) is False
    (tmp_path / "empty").mkdir()
    assert check_run_dir(tmp_path / "empty", None, False) is False
    assert check_run_dir(tmp_path / "empty", "auto", False) is False


def test_run_dir_with_checkpoints_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    _fake_tag(run, 2)
    _fake_tag(run, 4)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints \(global_step2, global_step4\).*--resume auto"
                                              r".*train\.overwrite=true"):
        check_run_dir(run, None, False)
    assert check_run_dir(run, "auto", False) is False  # resuming: nothing to clear
    assert check_run_dir(run, str(run / "checkpoints/global_step2"), False) is False
    assert check_run_dir(run, None, True) is True  # overwrite: the caller clears them
    clear_checkpoints(run)
    assert not (run / "checkpoints").exists() and run.is_dir()
    assert check_run_dir(run, None, False) is False


def test_run_dir_that_is_a_file_or_unwritable_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"train\.run_dir=.*file is a file, not a folder"):
        check_run_dir(f, None, False)
    with pytest.raises(ConfigError, match=r"cannot be created: .*file is a file"):
        check_run_dir(f / "sub", None, False)
    with pytest.raises(ConfigError, match="--resume was given an empty value"):
        check_run_dir(tmp_path / "ok", "", False)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that may write anywhere (root): permissions are not enforced")
        with pytest.raises(ConfigError, match="is not writable"):
            check_run_dir(locked / "run", None, False)
    finally:
        locked.chmod(0o700)


def test_unwritable_run_dir_is_refused_even_as_root(tmp_path):
    """Root ignores permission bits; a read-only place it cannot write is /proc."""
    with pytest.raises(ConfigError, match="not writable|cannot be created"):
        check_run_dir("/proc/longvq-run", None, False)
