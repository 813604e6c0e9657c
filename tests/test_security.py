"""The checkpoint trust boundary: a checkpoint never runs code.

A payload (a pickle whose __reduce__ would create a marker file, or a YAML tag that would run a
command) is planted in each kind of file a checkpoint holds (model states, optimizer states,
trainer_state.pt, universal-checkpoint files, config.yaml), and manifest.json is re-hashed to match, as
a deliberate attacker would. Every entry point must then refuse with a CheckpointError that names the
file, and the marker must not exist: resume (lm.train.main --resume auto / PATH), DeepSpeed's own load
(lm.checkpoint.load into an engine, without the manifest check in front of it), the universal
conversion, `python -m lm.checkpoint verify|export`, `evals.perplexity` and `evals.generate`. A last test
keeps the allow-list honest: every file of real checkpoints of each kind loads under it.
"""

import io
import json
import os
import pickle
import shutil
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch

from lm import checkpoint
from lm.checkpoint import CheckpointError
from tests.dist_harness import run_dist
from tests.test_train import ROOT, tiny_cfg


class Payload:
    """Unpickling this runs `touch MARKER` (a blocked module: os / posix)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload:
    """Unpickling this runs Python code through builtins.exec (a global outside the allow-list)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def rehash(folder: Path) -> None:
    """Rewrite manifest.json so that every file's size and sha256 match again (what an attacker does)."""
    mpath = folder / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"] = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": checkpoint.sha256_file(p)}
                         for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    mpath.write_text(json.dumps(manifest, indent=1))


def plant(path: Path, marker: Path, style: str = "embedded") -> None:
    """Put a payload into `path`. embedded: a real torch file whose dict gains one malicious entry (the
    realistic attack: everything else still loads); pickle: the whole file is a plain pickle (protocol 2,
    os.system); exec: a default-protocol pickle calling builtins.exec; yaml: a YAML tag that runs a command."""
    if style == "yaml":
        path.write_text(path.read_text() + f"evil: !!python/object/apply:os.system ['touch {marker}']\n")
    elif style == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"step": Payload(marker)}, f, protocol=2)
    elif style == "exec":
        with open(path, "wb") as f:
            pickle.dump({"step": ExecPayload(marker)}, f)
    else:
        obj = checkpoint.safe_load(path)
        obj = obj if isinstance(obj, dict) else {"value": obj}
        obj["extra"] = Payload(marker)
        torch.save(obj, path)
    if (path.parent / "manifest.json").is_file():
        rehash(path.parent)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sec_cache"))


def _train(cfg, resume=None):
    from lm.train import train

    return train(cfg, resume=resume)


ARGS = ["data.seq_len=32", "model.d_model=32", "model.n_layers=2", "model.longvq.chunk_size=8",
        "model.longvq.codebook_size=16", "model.longvq.z_dim=16", "model.longvq.ema_dim=4", "train.micro_batch_size=4",
        "train.progress_bar=false", "train.eval_every=0", "optim.warmup_steps=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, cache):
    """A finished 2-step single-process ZeRO-2 run: model states, optimizer states, trainer state, config."""
    run = tmp_path_factory.mktemp("z2") / "run"
    run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=2", "parallel.zero_stage=2"))
    return run


@pytest.fixture
def run(tmp_path, zero2_run):
    dst = tmp_path / "run"
    shutil.copytree(zero2_run, dst)
    return dst


TAG = "global_step2"
FILES = {  # kind -> (file in the tag folder, payload style)
    "model_states": ("mp_rank_00_model_states.pt", "embedded"),
    "optim_states": ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "embedded"),
    "trainer_state": ("trainer_state.pt", "embedded"),
    "trainer_state_plain_pickle": ("trainer_state.pt", "pickle"),
    "model_states_exec": ("mp_rank_00_model_states.pt", "exec"),
    "config": ("config.yaml", "yaml"),
}


def _main_in_child(argv):
    """lm.train.main in a forked process (torch.distributed never starts in pytest's own process)."""
    from lm.train import main

    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def _resume_main(run, cache, resume, *extra):
    argv = [str(ROOT / "launch/configs/quickstart.yaml"), *ARGS, f"train.run_dir={run}", f"data.cache_dir={cache}",
            "train.max_steps=4", "parallel.zero_stage=2", *extra, "--resume", resume]
    ((rc, err),) = run_dist(_main_in_child, 1, argv=argv)
    return rc, err


def _assert_refused(rc, err, name, marker):
    assert not marker.exists(), "the payload ran"
    assert rc != 0
    assert name in err and "Traceback" not in err, err


@pytest.mark.parametrize("kind", list(FILES))
def test_resume_refuses_a_planted_payload(run, cache, tmp_path, kind):
    name, style = FILES[kind]
    marker = tmp_path / "marker"
    plant(run / "checkpoints" / TAG / name, marker, style)
    rc, err = _resume_main(run, cache, "auto")  # newest_good: the only checkpoint is unusable -> refused
    _assert_refused(rc, err, name, marker)
    assert "none of the 1 checkpoint(s)" in err
    rc, err = _resume_main(run, cache, str(run / "checkpoints" / TAG))  # an explicit path: refused as well
    _assert_refused(rc, err, name, marker)


@pytest.mark.parametrize("kind", list(FILES))
def test_checkpoint_cli_refuses_a_planted_payload(run, tmp_path, capsys, kind):
    name, style = FILES[kind]
    marker = tmp_path / "marker"
    plant(run / "checkpoints" / TAG / name, marker, style)
    for argv in (["verify", str(run)], ["export", str(run), str(tmp_path / "export")],
                 ["universal", str(run / "checkpoints" / TAG)]):
        assert checkpoint.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and name in err, err
    assert not (tmp_path / "export").exists()
    assert not marker.exists()


@pytest.mark.parametrize("kind", list(FILES))
def test_evals_refuse_a_planted_payload(run, tmp_path, capsys, kind):
    from evals.generate import main as generate
    from evals.perplexity import main as perplexity

    name, style = FILES[kind]
    marker = tmp_path / "marker"
    plant(run / "checkpoints" / TAG / name, marker, style)
    assert perplexity(["--checkpoint", str(run), "--max-tokens", "64", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert name in err, err
    assert generate(["--checkpoint", str(run), "--prompt", "def ", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert name in err, err
    assert not marker.exists()


def test_evals_refuse_a_payload_even_without_a_manifest(run, tmp_path, capsys):
    """The manifest is not what keeps code from running: with it deleted, the weights-only loads still refuse."""
    from evals.perplexity import main as perplexity

    marker = tmp_path / "marker"
    folder = run / "checkpoints" / TAG
    plant(folder / "mp_rank_00_model_states.pt", marker)
    (folder / "manifest.json").unlink()
    assert perplexity(["--checkpoint", str(folder), "--max-tokens", "64", "--no-progress"]) == 2
    assert "mp_rank_00_model_states.pt: refusing to unpickle it: it references posix.system" in capsys.readouterr().err
    assert not marker.exists()


def test_export_config_payload_is_refused(run, tmp_path, capsys):
    from evals.generate import main as generate

    out = tmp_path / "export"
    assert checkpoint.main(["export", str(run), str(out)]) == 0
    marker = tmp_path / "marker"
    plant(out / "config.yaml", marker, "yaml")
    assert generate(["--checkpoint", str(out), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "config.yaml is not a valid run config" in capsys.readouterr().err
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Behind the manifest check: DeepSpeed's own loads and the universal conversion
# --------------------------------------------------------------------------------------------


def _engine_load(cfg, root, tag, universal=False):
    """Build a DeepSpeed engine for cfg's model and load (root, tag) into it through lm.checkpoint.load,
    with no verify() in front: the engine's reads themselves must be safe."""
    from lm.model import build_model
    from lm.optim import param_groups
    from lm.parallel.dist import init_distributed

    deepspeed = init_distributed()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ds_config = {"train_micro_batch_size_per_gpu": cfg.train.micro_batch_size, "gradient_accumulation_steps": 1,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                 "zero_optimization": {"stage": cfg.parallel.zero_stage}}
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds_config)
    try:
        checkpoint.load(engine, root, tag)
    except CheckpointError as exc:
        return f"refused: {exc}"
    return "loaded"


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_deepspeed_engine_load_is_weights_only(run, cache, tmp_path, name):
    marker = tmp_path / "marker"
    cfg = tiny_cfg(run, cache, "parallel.zero_stage=2")
    (ok,) = run_dist(_engine_load, 1, cfg=cfg, root=run / "checkpoints", tag=TAG)
    assert ok == "loaded"  # the safe engine loads a real checkpoint
    plant(run / "checkpoints" / TAG / name, marker)
    (result,) = run_dist(_engine_load, 1, cfg=cfg, root=run / "checkpoints", tag=TAG)
    assert result.startswith("refused: ") and f"{name}: refusing to unpickle it: it references posix.system" in result
    assert not marker.exists()


@pytest.fixture(scope="module")
def universal_run(tmp_path_factory, cache):
    """A 2-process ZeRO-2 run (resuming it on 1 process goes through a universal checkpoint)."""
    run = tmp_path_factory.mktemp("u") / "run"
    run_dist(_train, 2, cfg=tiny_cfg(run, cache, "train.max_steps=2", "parallel.zero_stage=2"))
    checkpoint.to_universal(run / "checkpoints", TAG)
    return run


UNIVERSAL_FILES = ["zero/embed.weight/fp32.pt", "zero/embed.weight/exp_avg.pt", "zero/embed.weight/step.pt",
                   "zero/optimizer_state.pt", "mp_rank_00_model_states.pt"]


@pytest.mark.parametrize("rel", UNIVERSAL_FILES)
def test_universal_checkpoint_payload_is_refused_on_resume(universal_run, cache, tmp_path, rel):
    run = tmp_path / "run"
    shutil.copytree(universal_run, run)
    marker = tmp_path / "marker"
    target = run / "checkpoints/universal" / TAG / rel
    plant(target, marker, "pickle" if rel.endswith("step.pt") else "embedded")
    rehash(run / "checkpoints/universal" / TAG)
    # 2 -> 1 process (the same global batch: twice the accumulation): loads the (cached) universal checkpoint
    rc, err = _resume_main(run, cache, "auto", "train.grad_accum_steps=2")
    _assert_refused(rc, err, rel.rsplit("/", 1)[-1], marker)
    assert "refusing to unpickle it" in err


def test_universal_conversion_is_weights_only(universal_run, tmp_path):
    """The converter's child process refuses a planted optimizer shard by itself (no verify() in front)."""
    run = tmp_path / "run"
    shutil.copytree(universal_run, run)
    shutil.rmtree(run / "checkpoints/universal")
    marker = tmp_path / "marker"
    plant(run / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(CheckpointError, match=r"universal conversion of .*zero_pp_rank_1_mp_rank_00_optim_states.pt.*"
                                              r"refusing to unpickle it: it references posix.system"):
        checkpoint.to_universal(run / "checkpoints", TAG)
    assert not marker.exists()
    assert not (run / "checkpoints/universal" / TAG).exists()


def test_zero3_consolidation_checks_every_shard_first(tmp_path, cache):
    """ZeRO-3 weights are consolidated by DeepSpeed's zero_to_fp32 (unrestricted torch.load): every shard is
    loaded the safe way first, so export and the evals refuse a planted shard even without a manifest."""
    run = tmp_path / "run"
    run_dist(_train, 1, cfg=tiny_cfg(run, cache, "train.max_steps=2", "parallel.zero_stage=3"))
    marker = tmp_path / "marker"
    folder = run / "checkpoints" / TAG
    shard = next(folder.glob("*optim_states.pt"))
    plant(shard, marker)
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=shard.name + ": refusing to unpickle it"):
        checkpoint.load_module_state(run / "checkpoints", TAG)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# The allow-list: exactly what DeepSpeed stores
# --------------------------------------------------------------------------------------------

KINDS = {
    "zero0": (1, []), "zero1_2proc": (2, ["parallel.zero_stage=1"]),
    "zero3_2proc": (2, ["parallel.zero_stage=3", "parallel.zero3_persistence_threshold=0"]),
    "pipeline_zero1": (2, ["parallel.pipeline_stages=2", "parallel.zero_stage=1"]),
    "bf16_zero2": (1, ["train.precision=bf16", "parallel.zero_stage=2"]),
    "transformer_bf16_zero0": (1, ["model.arch=transformer", "train.precision=bf16"]),
}


def test_allow_list_is_exactly_what_deepspeed_stores(tmp_path, cache):
    """Real checkpoints of each kind (and their universal conversions) load under the allow-list, and
    every allow-listed global occurs in one of them."""
    used_by = {}
    for kind, (world, extra) in KINDS.items():
        run = tmp_path / kind
        run_dist(_train, world, cfg=tiny_cfg(run, cache, "train.max_steps=2", *extra))
        root = run / "checkpoints"
        checkpoint.verify(root / TAG)  # every file of the checkpoint, loaded the safe way
        folders = [root / TAG]
        if any(p.name.endswith("optim_states.pt") for p in (root / TAG).iterdir()):
            folders.append(checkpoint.to_universal(root, TAG) / TAG)
            assert checkpoint.check_loadable(folders[-1]) > 0
        for folder in folders:
            for f in folder.rglob("*.pt"):
                for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(f)):
                    used_by.setdefault(name, set()).add(kind)
    assert set(used_by) == set(checkpoint.ALLOWED_GLOBALS), used_by


def test_safe_load_refuses_each_payload_kind(tmp_path):
    marker = tmp_path / "marker"
    for style in ("pickle", "exec"):
        f = tmp_path / f"{style}.pt"
        f.write_bytes(b"")
        plant(f, marker, style)
        with pytest.raises(CheckpointError, match=r"refusing to unpickle it"):
            checkpoint.safe_load(f)
    f = tmp_path / "embedded.pt"
    torch.save({"w": torch.ones(2)}, f)
    plant(f, marker)
    with pytest.raises(CheckpointError, match=r"it references posix.system"):
        checkpoint.safe_load(f, mmap=True)
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match=r"junk.pt cannot be read as a torch checkpoint file"):
        checkpoint.safe_load(tmp_path / "junk.pt")
    assert not marker.exists()
    # the allow-list is scoped to each load: nothing of it stays registered with torch afterwards
    assert not set(checkpoint.allowed_globals()) & set(torch.serialization.get_safe_globals())
