"""Checkpoints you can trust: DeepSpeed's sharded layout, written atomically, verified on load.

Layout:
    RUN_DIR/checkpoints/latest                 names the newest complete checkpoint (written last)
    RUN_DIR/checkpoints/global_stepN/          DeepSpeed's model/optimizer shards, plus
        config.yaml                            the resolved run config
        trainer_state.pt                       step, samples consumed, RNG states, topology (tensors
                                               and plain types only: loads with weights_only=True)
        manifest.json                          every file with its size and sha256 (written last)
    RUN_DIR/checkpoints/universal/global_stepN DeepSpeed universal checkpoint, made on demand when a
                                               run resumes on another topology

Saving writes everything under `.staging-global_stepN/`, fsyncs it, renames the tag folder into
place and only then replaces `latest`: a crash or a full disk mid-save never changes what `latest`
points to. Loading verifies the manifest (every shard present, sizes and hashes match) and that the
checkpoint's model config equals the run's, before anything is unpickled.

Trust boundary: nothing in a checkpoint is unpickled beyond tensors, plain containers and the three
DeepSpeed classes DeepSpeed itself stores (ALLOWED_GLOBALS). Every `.pt` file loads with
`torch.load(weights_only=True)` under that allow-list: ours directly, DeepSpeed's through the
SafeCheckpointEngine handed to the engine for the duration of a load. Where DeepSpeed opens files with
its own `torch.load(weights_only=False)` (universal checkpoints, ZeRO-3 consolidation), every file it can
open is first loaded the same safe way and a file that fails is refused before DeepSpeed sees it. The
universal conversion runs in a child process in which torch is forced to weights_only loading
(TORCH_FORCE_WEIGHTS_ONLY_LOAD=1) with the same allow-list. `verify` checks the manifest (sizes, sha256,
no unlisted files) and also loads every file the safe way, so a tampered checkpoint whose manifest was
re-hashed still fails verification. YAML loads with `safe_load`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as tdist
import yaml

from lm.config import ConfigError, RunConfig, config_from_dict, dump_config, to_dict
from lm.fileio import atomic_write_bytes, fsync_path

log = logging.getLogger("lm.checkpoint")
TAG_RE = re.compile(r"^global_step(\d+)$")
FORMAT = 1
STATE_FILE, MANIFEST, CONFIG = "trainer_state.pt", "manifest.json", "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message says which and why."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def list_tags(ckpt_root: Path) -> list[str]:
    if not ckpt_root.is_dir():
        return []
    tags = [p.name for p in ckpt_root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


# --------------------------------------------------------------------------------------------
# Small file helpers
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Safe loading (the trust boundary)
# --------------------------------------------------------------------------------------------

ALLOWED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO optimizer states (also with fp32 and bf16)
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO optimizer states, universal optimizer_state.pt
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 optimizer states (parameter slices)
)
"""Every global besides tensors, storages, dtypes and plain containers that DeepSpeed 0.19 writes into
the checkpoints lm.train makes: listed with torch.serialization.get_unsafe_globals_in_checkpoint over
ZeRO-0/1/2/3, pipeline (ZeRO-0/1), fp32 and bf16 checkpoints of both architectures and their universal
conversions (tests/test_security.py::test_allow_list_is_exactly_what_deepspeed_stores keeps it honest)."""


@functools.lru_cache(maxsize=1)
def allowed_globals() -> tuple:
    """The ALLOWED_GLOBALS objects (imports DeepSpeed on first use)."""
    from lm.parallel.dist import import_deepspeed

    import_deepspeed()
    out = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return tuple(out)


def _refusal(path: Path, exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        glob = re.search(r"GLOBAL ([\w.]+)", text)
        operand = re.search(r"Unsupported operand (\d+)", text)
        detail = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(
            ("Weights only load failed", "Check the documentation", "Please file an issue"))]
        if glob:
            what = f"it references {glob.group(1)}, which is not a tensor, a plain value or one of the DeepSpeed classes"
        elif operand:
            what = f"it uses pickle opcode {operand.group(1)}, which torch's weights-only loader never accepts in"
        else:
            what = f"{detail[0][:160] if detail else 'unpickling failed'}; that is not what"
        return (f"{path}: refusing to unpickle it: {what} a checkpoint written by lm.train contains; the file was "
                f"modified or not written by lm.train (nothing in it was run)")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    return f"{path} cannot be read as a torch checkpoint file ({type(exc).__name__}: {first}); it is corrupt or not a checkpoint file"


def safe_load(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """torch.load with weights_only=True and the ALLOWED_GLOBALS allow-list; CheckpointError naming the
    file (and the offending global) otherwise. mmap=True maps the tensor data instead of reading it
    (zip-format files only; legacy files are read whole)."""
    path = Path(path)
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(list(allowed_globals())), warnings.catch_warnings():
            # a non-default pickle protocol is what a planted file looks like; the refusal below says it plainly
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=use_mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CheckpointError(_refusal(path, exc)) from None


def check_loadable(folder: str | os.PathLike) -> int:
    """Load every `.pt` file under `folder` the safe way (tensor data memory-mapped, not read); raise
    CheckpointError for the first that fails. Run before DeepSpeed opens files with its own unrestricted
    torch.load. Returns the number of files checked."""
    files = sorted(p for p in Path(folder).rglob("*.pt"))
    for f in files:
        safe_load(f, mmap=True)
    return len(files)


class SafeCheckpointEngine:
    """DeepSpeed checkpoint engine whose `load` is `safe_load`; everything else is delegated to the engine's
    own checkpoint engine (saving is unchanged). `lm.checkpoint.load` hands it to the engine for the
    duration of a load."""

    def __init__(self, inner):
        self._inner = inner
        self.name = "SafeCheckpointEngine"

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _is_dist() -> bool:
    return tdist.is_initialized() and tdist.get_world_size() > 1


def _barrier() -> None:
    if _is_dist():
        tdist.barrier()


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def trainer_state(cfg: RunConfig, step: int, consumed_samples: int, world_size: int, layout: str = "plain",
                  **extra) -> dict:
    return {
        "format": FORMAT,
        "step": step,
        "consumed_samples": consumed_samples,
        "topology": {"world_size": world_size, "zero_stage": cfg.parallel.zero_stage,
                     "pipeline_stages": cfg.parallel.pipeline_stages, "layout": layout},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **extra,
    }


def save(engine, cfg: RunConfig, ckpt_root: Path, step: int, consumed_samples: int, world_size: int,
         is_rank0: bool, keep_last: int, extra: Optional[dict] = None, layout: str = "plain") -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    ckpt_root = Path(ckpt_root)
    tag = tag_for(step)
    staging = ckpt_root / f".staging-{tag}"
    if is_rank0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted save
    _barrier()
    try:
        state = trainer_state(cfg, step, consumed_samples, world_size, layout=layout, **(extra or {}))
        engine.save_checkpoint(str(staging), tag=tag, client_state={"step": step, "consumed_samples": consumed_samples},
                               save_latest=False)
        _barrier()
        folder = staging / tag
        if is_rank0:
            torch.save(state, folder / STATE_FILE)
            dump_config(cfg, folder / CONFIG)
        _barrier()
        # hash the shards in parallel: rank r hashes every world-th file
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        rank, world = (tdist.get_rank(), tdist.get_world_size()) if _is_dist() else (0, 1)
        mine = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in files[rank::world]}
        if _is_dist():
            parts = [None] * world
            tdist.all_gather_object(parts, mine)
            entries = {k: v for part in parts for k, v in part.items()}
        else:
            entries = mine
        if is_rank0:
            for p in files:
                fsync_path(p)
            manifest = {"format": FORMAT, "tag": tag, "step": step, "topology": state["topology"],
                        "files": dict(sorted(entries.items()))}
            atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
            final = ckpt_root / tag
            if final.exists():  # re-saving the same step: move the old copy away first
                old = ckpt_root / f".old-{tag}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, final)
            fsync_path(ckpt_root)
            atomic_write_bytes(ckpt_root / "latest", tag.encode())
            shutil.rmtree(staging, ignore_errors=True)
            prune(ckpt_root, keep_last)
    except OSError:  # e.g. a full disk: nothing was published; leave no half-written staging folder
        if is_rank0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    _barrier()
    return ckpt_root / tag


def prune(ckpt_root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    latest = read_latest(ckpt_root)
    for tag in list_tags(ckpt_root)[:-keep_last]:
        if tag != latest:
            shutil.rmtree(ckpt_root / tag, ignore_errors=True)
            shutil.rmtree(ckpt_root / "universal" / tag, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Find and verify
# --------------------------------------------------------------------------------------------


def read_latest(ckpt_root: Path) -> Optional[str]:
    latest = Path(ckpt_root) / "latest"
    return latest.read_bytes().decode("utf-8", errors="replace").strip() if latest.is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, str]:
    """(checkpoint root, tag) for a run dir, a checkpoints dir (uses `latest`), or one tag dir."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        tag = read_latest(root)
        if tag is not None:
            if not TAG_RE.match(tag):
                raise CheckpointError(f"{root / 'latest'} holds {tag[:80]!r}, not a checkpoint tag (global_stepN): it is corrupt")
            if not (root / tag).is_dir():
                raise CheckpointError(f"{root / 'latest'} names {tag!r}, which is missing under {root}")
            return root, tag
    if p.is_dir() and (p / CONFIG).is_file():
        return p.parent, p.name
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: the path does not exist")
    raise CheckpointError(f"no checkpoint at {p}: expected a run dir, a checkpoints dir with 'latest', or a "
                          f"global_stepN dir containing {CONFIG}")


def read_manifest(folder: Path) -> dict:
    """The parsed manifest.json of a checkpoint folder; CheckpointError when it is missing, not JSON, or
    lacks its file list."""
    mpath = Path(folder) / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: the save did not complete (or it was not written by "
                              "lm.train); resume from an earlier checkpoint")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{mpath} is not valid JSON ({exc}): the checkpoint is corrupt") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{mpath} has no file list ('files'): the checkpoint is corrupt")
    for rel, info in files.items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise CheckpointError(f"{mpath} lists {rel!r}, which is outside the checkpoint folder: the manifest is corrupt")
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"{mpath}: the entry for {rel!r} lacks its size or sha256: the manifest is corrupt")
    return manifest


def verify(folder: Path, hashes: bool = True, contents: bool = True) -> dict:
    """Check a checkpoint before anything in it is used. Returns the manifest.

    The manifest must parse and list config.yaml and trainer_state.pt; every listed file must be present
    with its size (and sha256, `hashes`), and no other file may be in the folder. With `contents`, every
    `.pt` file must also load with weights_only=True under ALLOWED_GLOBALS (tensor data memory-mapped)
    and config.yaml must load as a valid run config: this is what refuses a tampered file whose hash was
    written into the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest["files"]
    problems = [f"the manifest does not list {name}" for name in (CONFIG, STATE_FILE) if name not in files]
    for rel, info in files.items():
        f = folder / rel
        if not f.is_file():
            problems.append(f"missing {rel}")
        elif f.stat().st_size != info["bytes"]:
            problems.append(f"{rel} is {f.stat().st_size} bytes, expected {info['bytes']}")
        elif hashes and sha256_file(f) != info["sha256"]:
            problems.append(f"{rel} content does not match its sha256 (corrupt or modified)")
    listed = set(files) | {MANIFEST}
    for f in sorted(folder.rglob("*")):
        rel = str(f.relative_to(folder))
        if not f.is_dir() and rel not in listed:
            problems.append(f"unexpected file {rel} (not in the manifest)")
    if problems:
        raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt: " + "; ".join(problems[:5]))
    if contents:
        for rel in sorted(files):
            if rel.endswith(".pt"):
                safe_load(folder / rel, mmap=True)
        load_checkpoint_config(folder.parent, folder.name)
    return manifest


def newest_good(ckpt_root: Path) -> Optional[str]:
    """The newest tag that verifies, starting from `latest` (for --resume auto).

    None when there is no checkpoint at all. When checkpoints exist but none verifies, CheckpointError
    lists each one and why: starting over would silently discard (and later overwrite) them."""
    ckpt_root = Path(ckpt_root)
    latest = read_latest(ckpt_root)
    tags = list_tags(ckpt_root)
    if latest in tags:
        tags = tags[: tags.index(latest) + 1]
    if not tags:
        return None
    failures = []
    for tag in reversed(tags):
        try:
            verify(ckpt_root / tag)
            return tag
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", tag, exc)
            failures.append(f"{tag}: {exc}")
    raise CheckpointError(
        f"--resume auto: none of the {len(tags)} checkpoint(s) under {ckpt_root} is usable, so the run was not "
        f"started over them: " + " | ".join(failures) + f". Move {ckpt_root} away (or pass train.overwrite=true) "
        "to start a new run there, or give --resume PATH of a checkpoint you trust")


def load_checkpoint_config(root: Path, tag: str) -> RunConfig:
    path = Path(root) / tag / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} missing: not a checkpoint written by lm.train")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        return config_from_dict(data if data is not None else {})
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid YAML run config ({str(exc).splitlines()[0]}): the checkpoint "
                              "is corrupt or was modified") from None
    except ConfigError as exc:
        raise CheckpointError(f"{path} is not a valid run config ({exc}): the checkpoint is corrupt or was "
                              "modified") from None


def load_trainer_state(root: Path, tag: str) -> dict:
    """trainer_state.pt (step, samples consumed, RNG states, topology), loaded the safe way."""
    path = Path(root) / tag / STATE_FILE
    state = safe_load(path)
    missing = [k for k in ("step", "consumed_samples", "topology", "rng_cpu") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a trainer state written by lm.train")
    return state


def check_compatible(saved: RunConfig, current: RunConfig, where: Path) -> None:
    """The model must be the same architecture and shape; name every key that differs (the model keys
    RESUME_RULES marks as changeable on resume are not compared)."""
    a, b = to_dict(saved.model), to_dict(current.model)
    diffs = []

    def walk(x, y, prefix):
        for k in sorted(set(x) | set(y)):
            if isinstance(x.get(k), dict) and isinstance(y.get(k), dict):
                walk(x[k], y[k], f"{prefix}{k}.")
            elif x.get(k) != y.get(k) and _resume_rule(f"model.{prefix}{k}")[0] != APPLY:
                diffs.append(f"model.{prefix}{k}: checkpoint {x.get(k)!r} vs run {y.get(k)!r}")

    walk(a, b, "")
    if diffs:
        raise CheckpointError(f"checkpoint {where} was trained with a different model: " + "; ".join(diffs[:8]))


# --------------------------------------------------------------------------------------------
# Starting a run in a run dir, and config changes on resume
# --------------------------------------------------------------------------------------------


def check_run_dir(run_dir: str | os.PathLike, resume: Optional[str], overwrite: bool) -> bool:
    """Check train.run_dir before anything is written there (rank 0, before training starts).

    Raises ConfigError when the run dir is a file or not writable (or `resume` is an empty string), and
    CheckpointError when it already holds checkpoints, `resume` is None and `overwrite` is false: saving
    would replace another run's `global_stepN` and repoint `latest`. Returns True when the run dir holds
    checkpoints that `overwrite` says to discard: the caller then calls `clear_checkpoints(run_dir)`."""
    p = Path(run_dir)
    if resume is not None and not str(resume).strip():
        raise ConfigError("--resume was given an empty value: use --resume auto (newest checkpoint in train.run_dir) "
                          "or --resume PATH")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"train.run_dir={p} is a file, not a folder: choose another train.run_dir")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"train.run_dir={p} cannot be created: {existing} is a file; choose another train.run_dir")
    why = _unwritable(existing)
    if why:
        raise ConfigError(f"train.run_dir={p} is not writable ({existing}: {why}): choose another train.run_dir or "
                          "fix its permissions")
    ckpt_root = p / "checkpoints"
    if ckpt_root.exists():
        why = "not a folder" if not ckpt_root.is_dir() else _unwritable(ckpt_root)
        if why:
            raise ConfigError(f"{ckpt_root} cannot hold checkpoints ({why}): choose another train.run_dir or fix it")
    tags = list_tags(ckpt_root)
    if not tags or resume is not None:
        return False
    if overwrite:
        return True
    raise CheckpointError(
        f"train.run_dir={p} already holds checkpoints ({', '.join(tags[-3:])}); training there without --resume "
        f"would overwrite them. Continue that run with --resume auto, choose another train.run_dir, or pass "
        f"train.overwrite=true to delete them and start a new run there")


def _unwritable(folder: Path) -> Optional[str]:
    """Why no file can be created in `folder` (None when one can): a real probe, since permission bits
    say nothing for root or on read-only mounts."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def clear_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete RUN_DIR/checkpoints (what train.overwrite=true asks for; rank 0 only)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if ckpt_root.is_dir():
        shutil.rmtree(ckpt_root)


APPLY, REFUSE = "apply", "refuse"
_SAME_DATA = ("the run's position in its data (samples consumed) indexes windows of this exact token stream; "
              "another stream would silently repeat or skip data")
_SAME_FUNCTION = "the trained weights were learned for this setting; changing it changes what they compute"
_SHAPE = "the checkpoint's weights have the shape this sets"
RESUME_RULES: dict[str, tuple[str, str]] = {
    # model: shapes and the function the weights compute cannot change; regularisation, implementation
    # choices and codebook-update hyperparameters can
    "model.arch": (REFUSE, _SHAPE), "model.vocab_size": (REFUSE, _SHAPE), "model.d_model": (REFUSE, _SHAPE),
    "model.n_layers": (REFUSE, _SHAPE), "model.ffn_dim": (REFUSE, _SHAPE), "model.tie_embeddings": (REFUSE, _SHAPE),
    "model.norm_eps": (REFUSE, _SAME_FUNCTION), "model.init_std": (APPLY, "initialisation only: no effect on a resumed run"),
    "model.dropout": (APPLY, "regularisation"),
    "model.longvq.attention_impl": (APPLY, "the same attention computed another way"),
    "model.longvq.ema_impl": (APPLY, "the same EMA computed another way"),
    "model.longvq.quantizer_impl": (APPLY, "the same quantizer computed another way"),
    "model.longvq.chunk_size": (REFUSE, _SAME_FUNCTION), "model.longvq.codebook_size": (REFUSE, _SHAPE),
    "model.longvq.n_heads": (REFUSE, _SHAPE), "model.longvq.z_dim": (REFUSE, _SHAPE),
    "model.longvq.hidden_dim": (REFUSE, _SHAPE), "model.longvq.ema_dim": (REFUSE, _SHAPE),
    "model.longvq.commit_beta": (APPLY, "a loss weight"), "model.longvq.codebook_decay": (APPLY, "a codebook-update rate"),
    "model.longvq.codebook_init": (APPLY, "initialisation only: no effect on a resumed run"),
    "model.longvq.dead_code_threshold": (APPLY, "a codebook-update rule"),
    "model.longvq.dead_code_reseed": (APPLY, "a codebook-update rule"),
    "model.longvq.normalize_keys": (REFUSE, _SAME_FUNCTION), "model.longvq.key_norm": (REFUSE, _SAME_FUNCTION),
    "model.longvq.query_norm": (REFUSE, _SAME_FUNCTION), "model.longvq.query_temperature": (REFUSE, _SHAPE),
    "model.longvq.local_raw_keys": (REFUSE, _SAME_FUNCTION), "model.longvq.residual": (REFUSE, _SAME_FUNCTION),
    "model.longvq.attention_dropout": (APPLY, "regularisation"), "model.longvq.hidden_dropout": (APPLY, "regularisation"),
    "model.transformer.n_heads": (REFUSE, _SAME_FUNCTION), "model.transformer.rope_base": (REFUSE, _SAME_FUNCTION),
    "model.transformer.attn_backend": (APPLY, "the same attention computed another way"),
    # data: the stream and its windows must stay; where it is read from may move
    "data.dataset": (REFUSE, _SAME_DATA), "data.tokenizer": (REFUSE, _SAME_DATA),
    "data.max_train_bytes": (REFUSE, _SAME_DATA),
    "data.seq_len": (REFUSE, "a training sample is a window of data.seq_len + 1 tokens: another length re-cuts the "
                             "stream, so the run's position in it (samples consumed) no longer means anything"),
    "data.data_path": (APPLY, "where the data is read from (it must hold the same data)"),
    "data.cache_dir": (APPLY, "where prepared data is cached"),
    # optimizer hyperparameters and the schedule apply from the next step
    "optim.lr": (APPLY, "schedule"), "optim.min_lr_ratio": (APPLY, "schedule"), "optim.warmup_steps": (APPLY, "schedule"),
    "optim.weight_decay": (APPLY, "optimizer hyperparameter"), "optim.beta1": (APPLY, "optimizer hyperparameter"),
    "optim.beta2": (APPLY, "optimizer hyperparameter"), "optim.eps": (APPLY, "optimizer hyperparameter"),
    "optim.grad_clip": (APPLY, "optimizer hyperparameter"),
    # train: the run's length, cadence and policies apply; the data order and the precision cannot change
    "train.run_dir": (APPLY, "where the run writes"), "train.overwrite": (APPLY, "only read when a run starts"),
    "train.max_steps": (APPLY, "the run's length (the cosine schedule stretches to the new length)"),
    "train.micro_batch_size": (APPLY, "split of the global batch (the global batch itself is checked separately)"),
    "train.grad_accum_steps": (APPLY, "split of the global batch (the global batch itself is checked separately)"),
    "train.seed": (REFUSE, "the seed sets the order in which the run visits its data; another seed would repeat "
                           "some samples and skip others"),
    "train.precision": (REFUSE, "bf16 runs keep bf16 weights with fp32 master copies in the optimizer, fp32 and "
                                "bf16-mixed runs fp32 weights: the checkpoints are laid out differently"),
    "train.log_every": (APPLY, "cadence"), "train.save_every": (APPLY, "cadence"), "train.keep_last": (APPLY, "cadence"),
    "train.eval_every": (APPLY, "cadence"), "train.eval_batches": (APPLY, "cadence"),
    "train.progress_bar": (APPLY, "display"), "train.compile": (APPLY, "implementation"),
    "train.compile_backend": (APPLY, "implementation"), "train.tf32": (APPLY, "implementation"),
    "train.loss_chunk_tokens": (APPLY, "implementation"), "train.on_nonfinite": (APPLY, "policy"),
    "train.max_skipped_steps": (APPLY, "policy"),
    # parallel: the topology is judged by the resume planner (universal conversion, or a refusal with the fix)
    "parallel.zero_stage": (APPLY, "topology (checked when the checkpoint is planned for loading)"),
    "parallel.pipeline_stages": (APPLY, "topology (checked when the checkpoint is planned for loading)"),
    "parallel.offload_optimizer": (APPLY, "where optimizer state lives, not what it holds"),
    "parallel.activation_checkpointing": (APPLY, "memory/compute trade-off"),
    "parallel.activation_checkpointing_blocks": (APPLY, "memory/compute trade-off"),
    "parallel.zero3_persistence_threshold": (APPLY, "how ZeRO-3 partitions parameters (refused for ZeRO-3 checkpoints)"),
    "parallel.sequence_parallel": (APPLY, "topology: each sequence is split over more or fewer ranks, the weights "
                                          "and the data order are the same"),
}
"""How each config key may differ between a checkpoint's config and the resumed run's (see
resume_config_changes). Every key of RunConfig is listed (tests/test_checkpoint.py checks it)."""


def _resume_rule(key: str) -> tuple[str, str]:
    return RESUME_RULES.get(key, (REFUSE, "this key is not known to be safe to change on resume"))


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_config_changes(saved: RunConfig, current: RunConfig, saved_world: Optional[int] = None,
                          current_world: Optional[int] = None) -> dict[str, tuple]:
    """The config keys that differ between a checkpoint (`saved`) and the run resuming it (`current`)
    and that the resumed run applies, as {key: (saved value, new value)}.

    Raises CheckpointError naming every change that cannot be applied, with the reason and the fix
    (RESUME_RULES): the model's shape and the function its weights compute, the data stream, its window
    length and order (data.*, train.seed), the precision, and the global batch. The global batch is
    micro_batch_size x grad_accum_steps x data-parallel ranks (ranks = world / pipeline_stages; pass the
    saved and current world sizes to include them, else they are taken as equal): it may be split
    differently (e.g. more accumulation on fewer processes) but not changed, since the run's position in
    its data and its learning-rate schedule are counted in global batches."""
    a, b = _leaves(to_dict(saved)), _leaves(to_dict(current))
    applied, refused = {}, []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key), b.get(key)
        if old == new:
            continue
        verdict, why = _resume_rule(key)
        if key == "parallel.zero3_persistence_threshold" and saved.parallel.zero_stage == 3:
            verdict, why = REFUSE, "a ZeRO-3 checkpoint's parameters are partitioned by this threshold"
        if key == "train.precision" and "bf16" not in (old, new):
            verdict = APPLY  # fp32, bf16-mixed and auto (one of the two) all keep fp32 weights and optimizer state
        if verdict == APPLY:
            applied[key] = (old, new)
        else:
            refused.append(f"{key} {old!r} -> {new!r} ({why}; keep {key}={old})")

    def global_batch(cfg: RunConfig, world: Optional[int]) -> int:
        dp = 1 if world is None else max(1, world // (cfg.parallel.pipeline_stages * cfg.parallel.sequence_parallel))
        return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp

    worlds_known = saved_world is not None and current_world is not None
    g_old = global_batch(saved, saved_world if worlds_known else None)
    g_new = global_batch(current, current_world if worlds_known else None)
    if g_old != g_new:
        refused.append(
            f"the global batch {g_old} -> {g_new} (train.micro_batch_size x train.grad_accum_steps"
            + (" x data-parallel processes" if worlds_known else "") + "; the run's position in its data and its "
            f"schedule are counted in global batches of {g_old}: choose train.micro_batch_size and "
            f"train.grad_accum_steps whose product" + (" times the data-parallel processes" if worlds_known else "")
            + f" is {g_old})")
    if refused:
        raise CheckpointError("cannot resume with these config changes: " + "; ".join(refused)
                              + ". To change them, start a new run (another train.run_dir, or train.overwrite=true)")
    return applied


# --------------------------------------------------------------------------------------------
# Load into an engine (resume) and on one process (eval / export)
# --------------------------------------------------------------------------------------------


def load(engine, ckpt_root: Path, tag: str) -> None:
    """Load a checkpoint into a DeepSpeed engine (every rank), unpickling nothing beyond ALLOWED_GLOBALS.

    DeepSpeed reads its model and optimizer shards through the engine's checkpoint engine, which is a
    SafeCheckpointEngine for the duration of the call. A universal checkpoint's files are opened by
    DeepSpeed's own torch.load, so they are all checked with `check_loadable` first."""
    folder = Path(ckpt_root) / tag
    if engine.load_universal_checkpoint():
        check_loadable(folder)
    original = engine.checkpoint_engine
    engine.checkpoint_engine = SafeCheckpointEngine(original)
    try:
        path, _ = engine.load_checkpoint(str(ckpt_root), tag=tag, load_module_strict=True)
    finally:
        engine.checkpoint_engine = original
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint {tag} under {ckpt_root}")
    align_optimizer_steps(getattr(engine, "optimizer", None))


def _torch_optimizers(opt):
    """The torch.optim optimizer(s) inside DeepSpeed's wrappers (ZeRO keeps the real one in `.optimizer`)."""
    seen = 0
    while opt is not None and seen < 4:
        if isinstance(opt, torch.optim.Optimizer):
            yield opt
        opt, seen = getattr(opt, "optimizer", None), seen + 1


def align_optimizer_steps(opt) -> int:
    """Fused / capturable torch optimizers need their `step` counters on the parameters' device.
    DeepSpeed's universal-checkpoint loader writes them as CPU tensors (found on 2 H200s: a 2 -> 1 GPU
    resume failed in fused AdamW with "state_steps is on cpu"); torch's own load_state_dict would have
    moved them. Returns how many counters were moved."""
    moved = 0
    for inner in _torch_optimizers(opt):
        if not (inner.defaults.get("fused") or inner.defaults.get("capturable")):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                step = inner.state.get(p, {}).get("step")
                if torch.is_tensor(step) and step.device != p.device:
                    inner.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
                    moved += 1
    return moved


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def to_universal(ckpt_root: Path, tag: str) -> Path:
    """Convert a ZeRO >= 1 checkpoint to DeepSpeed's universal format (resumable on any topology).

    Runs DeepSpeed's converter in a child process (`python -m lm.checkpoint universal-worker`) in which
    every torch.load is forced to weights_only=True with ALLOWED_GLOBALS, so the conversion unpickles
    nothing else either. The result goes to ckpt_root/universal/TAG (reused when complete); returns
    ckpt_root/universal."""
    import subprocess
    import sys

    out_root = Path(ckpt_root) / "universal"
    out = out_root / tag
    if (out / "done").is_file():
        return out_root
    if not any(Path(ckpt_root, tag).glob("*optim_states.pt")):
        raise CheckpointError(f"{Path(ckpt_root) / tag} is a ZeRO-0 checkpoint: it has no ZeRO optimizer shards to "
                              "convert, and resumes on the same number of processes and pipeline stages only (or "
                              "export its weights with `python -m lm.checkpoint export`)")
    tmp = out_root / f".tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "lm.checkpoint", "universal-worker", str(Path(ckpt_root) / tag), str(tmp)]
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    root_dir = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log.info("converting %s to a universal checkpoint: %s", tag, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        refused = [ln.removeprefix("error: ") for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        raise CheckpointError(refused[-1] if refused else
                              f"universal conversion of {Path(ckpt_root) / tag} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    for name in (STATE_FILE, CONFIG, MANIFEST):
        shutil.copy2(Path(ckpt_root) / tag / name, tmp / name)
    (tmp / "done").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out_root


def _universal_worker(src: Path, dst: Path) -> None:
    """The child process of `to_universal`: DeepSpeed's ds_to_universal with torch forced to weights_only."""
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") != "1":
        raise CheckpointError("universal-worker runs only with TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 (lm.checkpoint.to_universal sets it)")
    from argparse import Namespace

    allowed = list(allowed_globals())
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=2, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        with torch.serialization.safe_globals(allowed):  # inherited by the converter's forked workers
            ds_to_universal.main(args)
    except Exception as exc:  # noqa: BLE001 - an unpickling refusal, maybe raised in a worker process
        cause = exc
        while cause is not None and not isinstance(cause, pickle.UnpicklingError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        try:  # the converter does not say which file it refused: find it (the same safe loads)
            check_loadable(src)
        except CheckpointError as named:
            raise CheckpointError(f"universal conversion of {src}: {named}") from None
        raise CheckpointError(f"universal conversion of {src}: " + _refusal(src, cause)) from None


def _pipeline_layer_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("layer_*-model_states.pt"))


def load_module_state(root: Path, tag: str) -> dict:
    """Consolidated fp32 state dict with the plain model's names, from any ZeRO stage or pipeline."""
    folder = Path(root) / tag
    layers = _pipeline_layer_files(folder)
    if layers:
        return _pipeline_to_plain(layers)
    plain = folder / "mp_rank_00_model_states.pt"
    if plain.is_file():
        sd = safe_load(plain).get("module")
        if sd:  # ZeRO-3 leaves this empty: its weights live in the partitioned optimizer shards
            return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    check_loadable(folder)  # DeepSpeed's consolidation below opens the shards with its own torch.load
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))


def _pipeline_to_plain(layer_files: list[Path]) -> dict:
    """Pipeline layer files (layer_00 = embedding, 1..L = blocks, L+1 = final norm) -> plain names."""
    idx = {int(re.match(r"layer_(\d+)-", p.name).group(1)): p for p in layer_files}
    n_blocks = max(idx) - 1
    out = {}
    for i, path in sorted(idx.items()):
        sd = safe_load(path)
        for k, v in sd.items():
            v = v.float() if v.is_floating_point() else v
            if i == 0:
                out[k.replace("embedding.", "embed.", 1)] = v
            elif i <= n_blocks:
                out[f"blocks.{i - 1}.{k.removeprefix('block.')}"] = v
            else:
                out[k] = v  # norm.*, head.* (untied)
    return out


def export(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a consolidated fp32 `model.safetensors` + `config.yaml` that one process can load."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export destination {out} is a file: give a folder (created if missing) to write "
                              "model.safetensors and config.yaml into")
    root, tag = resolve_checkpoint(path)
    verify(root / tag)
    cfg = load_checkpoint_config(root, tag)
    state = load_module_state(root, tag)
    if cfg.model.tie_embeddings:
        state.pop("head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"source": str(root / tag), "format": "longvq-export-1"})
    dump_config(cfg, out / CONFIG)
    return out


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m lm.checkpoint", description="Checkpoint tools.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{export,verify,universal}")
    e = sub.add_parser("export", help="consolidated fp32 safetensors + config for one-process eval/generation")
    e.add_argument("checkpoint")
    e.add_argument("out_dir")
    v = sub.add_parser("verify", help="check a checkpoint: manifest (sizes, sha256) and safe loading of every file")
    v.add_argument("checkpoint")
    u = sub.add_parser("universal", help="convert to DeepSpeed's universal format (what resume does itself)")
    u.add_argument("checkpoint")
    w = sub.add_parser("universal-worker")  # the child process of to_universal; not for direct use
    w.add_argument("src")
    w.add_argument("dst")
    args = p.parse_args(argv)
    try:
        if args.cmd == "export":
            print(f"exported to {export(args.checkpoint, args.out_dir)}")
        elif args.cmd == "verify":
            root, tag = resolve_checkpoint(args.checkpoint)
            m = verify(root / tag)
            print(f"{root / tag}: OK ({len(m['files'])} files, topology {m.get('topology')})")
        elif args.cmd == "universal-worker":
            _universal_worker(Path(args.src), Path(args.dst))
        else:
            root, tag = resolve_checkpoint(args.checkpoint)
            verify(root / tag)
            print(f"universal checkpoint: {to_universal(root, tag) / tag}")
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
