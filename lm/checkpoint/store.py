"""Saving, finding, verifying and loading checkpoints (DeepSpeed's sharded layout plus our own files)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as tdist
import yaml

from lm.checkpoint.common import (CONFIG, FORMAT, MANIFEST, STATE_FILE, TAG_RE, CheckpointError, barrier,
                                      is_distributed, list_tags, pipeline_layer_files, sha256_file, tag_for)
from lm.checkpoint.safety import SafeCheckpointEngine, check_loadable, safe_load
from lm.config import ConfigError, RunConfig, config_from_dict, dump_config
from lm.fileio import atomic_write_bytes, fsync_path

log = logging.getLogger("lm.checkpoint")


def trainer_state(cfg: RunConfig, step: int, consumed_samples: int, world_size: int, layout: str = "plain",
                  **extra) -> dict:
    return {
        "format": FORMAT,
        "step": step,
        "consumed_samples": consumed_samples,
        "topology": {"world_size": world_size, "zero_stage": cfg.parallel.zero_stage,
                     "pipeline_stages": cfg.parallel.pipeline_stages,
                     "sequence_parallel": cfg.parallel.sequence_parallel, "layout": layout},
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
    barrier()
    try:
        state = trainer_state(cfg, step, consumed_samples, world_size, layout=layout, **(extra or {}))
        engine.save_checkpoint(str(staging), tag=tag, client_state={"step": step, "consumed_samples": consumed_samples},
                               save_latest=False)
        barrier()
        folder = staging / tag
        if is_rank0:
            torch.save(state, folder / STATE_FILE)
            dump_config(cfg, folder / CONFIG)
        barrier()
        # hash the shards in parallel: rank r hashes every world-th file
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        rank, world = (tdist.get_rank(), tdist.get_world_size()) if is_distributed() else (0, 1)
        mine = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                for p in files[rank::world]}
        if is_distributed():
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
    barrier()
    return ckpt_root / tag


def prune(ckpt_root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    latest = read_latest(ckpt_root)
    for tag in list_tags(ckpt_root)[:-keep_last]:
        if tag != latest:
            shutil.rmtree(ckpt_root / tag, ignore_errors=True)
            shutil.rmtree(ckpt_root / "universal" / tag, ignore_errors=True)


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


def load(engine, ckpt_root: Path, tag: str, buffers_from: Optional[Path] = None) -> None:
    """Load a checkpoint into a DeepSpeed engine (every rank), unpickling nothing beyond ALLOWED_GLOBALS.

    DeepSpeed reads its model and optimizer shards through the engine's checkpoint engine, which is a
    SafeCheckpointEngine for the duration of the call. A universal checkpoint's files are opened by
    DeepSpeed's own torch.load, so they are all checked with `check_loadable` first. buffers_from: the original
    checkpoint folder of a universal checkpoint: DeepSpeed's universal loading restores parameters and optimizer
    state but not the module's buffers (the codebooks), which are copied from there."""
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
    if buffers_from is not None:
        restore_buffers(engine.module, saved_module_state(Path(buffers_from)))


def saved_module_state(folder: Path) -> dict:
    """The module state DeepSpeed saved in a checkpoint folder, named as in the engine's module (a plain model,
    or a PipelineModule whose layer i is submodule "i"), loaded the safe way. Under ZeRO-3 it holds the buffers
    but not the weights."""
    layers = pipeline_layer_files(folder)
    if layers:
        out = {}
        for p in layers:
            i = int(re.match(r"layer_(\d+)-", p.name).group(1))
            out.update({f"{i}.{k}": v for k, v in safe_load(p).items()})
        return out
    plain = folder / "mp_rank_00_model_states.pt"
    if not plain.is_file():  # ZeRO-3: one file per rank, each with every buffer (and empty weights)
        plain = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return safe_load(plain)["module"]


@torch.no_grad()
def restore_buffers(module, state: dict) -> int:
    """Copy every buffer of `module` that `state` holds (in the buffer's own dtype); CheckpointError when a
    persistent buffer is missing. Returns the number of buffers restored."""
    persistent = set(module.state_dict().keys())
    restored, missing = 0, []
    for name, buf in module.named_buffers():
        if name in state:
            buf.copy_(state[name].to(buf.device, buf.dtype))
            restored += 1
        elif name in persistent:
            missing.append(name)
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} buffer(s) of the model, e.g. {missing[0]}")
    return restored


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
