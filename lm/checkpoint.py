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

Trust boundary: our files load with `torch.load(weights_only=True)` and YAML with `safe_load`.
DeepSpeed's own loader unpickles its shards fully; we only hand it shards whose sha256 matches the
manifest written at save time.
"""

from __future__ import annotations

import hashlib
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

from lm.config import RunConfig, config_from_dict, dump_config, to_dict
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
    _barrier()
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
    return latest.read_text().strip() if latest.is_file() else None


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, str]:
    """(checkpoint root, tag) for a run dir, a checkpoints dir (uses `latest`), or one tag dir."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        tag = read_latest(root)
        if tag is not None:
            if not (root / tag).is_dir():
                raise CheckpointError(f"{root / 'latest'} names {tag!r}, which is missing under {root}")
            return root, tag
    if p.is_dir() and (p / CONFIG).is_file():
        return p.parent, p.name
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: the path does not exist")
    raise CheckpointError(f"no checkpoint at {p}: expected a run dir, a checkpoints dir with 'latest', or a "
                          f"global_stepN dir containing {CONFIG}")


def verify(folder: Path, hashes: bool = True) -> dict:
    """Check the manifest: every listed file present with its size (and sha256). Returns the manifest."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: the save did not complete (or it was not written by "
                              "lm.train); resume from an earlier checkpoint")
    manifest = json.loads(mpath.read_text())
    problems = []
    for rel, info in manifest["files"].items():
        f = folder / rel
        if not f.is_file():
            problems.append(f"missing {rel}")
        elif f.stat().st_size != info["bytes"]:
            problems.append(f"{rel} is {f.stat().st_size} bytes, expected {info['bytes']}")
        elif hashes and sha256_file(f) != info["sha256"]:
            problems.append(f"{rel} content does not match its sha256 (corrupt or modified)")
    if problems:
        raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt: " + "; ".join(problems[:5]))
    return manifest


def newest_good(ckpt_root: Path) -> Optional[str]:
    """The newest tag that verifies, starting from `latest` (for --resume auto)."""
    latest = read_latest(ckpt_root)
    tags = list_tags(ckpt_root)
    if latest in tags:
        tags = tags[: tags.index(latest) + 1]
    for tag in reversed(tags):
        try:
            verify(ckpt_root / tag)
            return tag
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", tag, exc)
    return None


def load_checkpoint_config(root: Path, tag: str) -> RunConfig:
    path = Path(root) / tag / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} missing: not a checkpoint written by lm.train")
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f))


def load_trainer_state(root: Path, tag: str) -> dict:
    return torch.load(Path(root) / tag / STATE_FILE, map_location="cpu", weights_only=True)


def check_compatible(saved: RunConfig, current: RunConfig, where: Path) -> None:
    """The model must be the same architecture and shape; name every key that differs."""
    a, b = to_dict(saved.model), to_dict(current.model)
    diffs = []

    def walk(x, y, prefix):
        for k in sorted(set(x) | set(y)):
            if isinstance(x.get(k), dict) and isinstance(y.get(k), dict):
                walk(x[k], y[k], f"{prefix}{k}.")
            elif x.get(k) != y.get(k) and k not in ("attention_impl", "ema_impl", "quantizer_impl", "attn_backend", "dropout",
                                                     "attention_dropout", "hidden_dropout"):
                diffs.append(f"model.{prefix}{k}: checkpoint {x.get(k)!r} vs run {y.get(k)!r}")

    walk(a, b, "")
    if diffs:
        raise CheckpointError(f"checkpoint {where} was trained with a different model: " + "; ".join(diffs[:8]))


# --------------------------------------------------------------------------------------------
# Load into an engine (resume) and on one process (eval / export)
# --------------------------------------------------------------------------------------------


def load(engine, ckpt_root: Path, tag: str, buffers_from: Optional[Path] = None) -> None:
    """Load checkpoint `tag` under `ckpt_root` into a DeepSpeed engine (collective). buffers_from: the original
    checkpoint folder of a universal checkpoint: DeepSpeed's universal loading restores parameters and
    optimizer state but not the module's buffers (the codebooks), which are copied from there."""
    path, _ = engine.load_checkpoint(str(ckpt_root), tag=tag, load_module_strict=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint {tag} under {ckpt_root}")
    align_optimizer_steps(getattr(engine, "optimizer", None))
    if buffers_from is not None:
        restore_buffers(engine.module, saved_module_state(Path(buffers_from)))


def saved_module_state(folder: Path) -> dict:
    """The module state DeepSpeed saved in a checkpoint folder, named as in the engine's module (a plain model,
    or a PipelineModule whose layer i is submodule "i"). Under ZeRO-3 it holds the buffers but not the weights."""
    layers = _pipeline_layer_files(folder)
    if layers:
        out = {}
        for p in layers:
            i = int(re.match(r"layer_(\d+)-", p.name).group(1))
            out.update({f"{i}.{k}": v for k, v in torch.load(p, map_location="cpu", weights_only=True).items()})
        return out
    plain = folder / "mp_rank_00_model_states.pt"
    if not plain.is_file():  # ZeRO-3: one file per rank, each with every buffer (and empty weights)
        plain = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return torch.load(plain, map_location="cpu", weights_only=True)["module"]


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


def to_universal(ckpt_root: Path, tag: str) -> Path:
    """Convert a ZeRO >= 1 checkpoint to DeepSpeed's universal format (resumable on any topology)."""
    out_root = Path(ckpt_root) / "universal"
    out = out_root / tag
    if (out / "done").is_file():
        return out_root
    import subprocess
    import sys

    tmp = out_root / f".tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(ckpt_root) / tag),
           "--output_folder", str(tmp), "--num_extract_workers", "2", "--num_merge_workers", "1", "--inject_missing_state"]
    log.info("converting %s to a universal checkpoint: %s", tag, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"universal conversion failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    for name in (STATE_FILE, CONFIG, MANIFEST):
        shutil.copy2(Path(ckpt_root) / tag / name, tmp / name)
    (tmp / "done").write_text("ok")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out_root


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
        sd = torch.load(plain, map_location="cpu", weights_only=True)["module"]
        if sd:  # ZeRO-3 leaves this empty: its weights live in the partitioned optimizer shards
            return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))


def _pipeline_to_plain(layer_files: list[Path]) -> dict:
    """Pipeline layer files (layer_00 = embedding, 1..L = blocks, L+1 = final norm) -> plain names."""
    idx = {int(re.match(r"layer_(\d+)-", p.name).group(1)): p for p in layer_files}
    n_blocks = max(idx) - 1
    out = {}
    for i, path in sorted(idx.items()):
        sd = torch.load(path, map_location="cpu", weights_only=True)
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

    root, tag = resolve_checkpoint(path)
    verify(root / tag)
    cfg = load_checkpoint_config(root, tag)
    state = load_module_state(root, tag)
    if cfg.model.tie_embeddings:
        state.pop("head.weight", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"source": str(root / tag), "format": "longvq-export-1"})
    dump_config(cfg, out / CONFIG)
    return out


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m lm.checkpoint", description="Checkpoint tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="consolidated fp32 safetensors + config for one-process eval/generation")
    e.add_argument("checkpoint")
    e.add_argument("out_dir")
    v = sub.add_parser("verify", help="check a checkpoint's manifest (sizes and sha256)")
    v.add_argument("checkpoint")
    u = sub.add_parser("universal", help="convert to DeepSpeed's universal format (what resume does itself)")
    u.add_argument("checkpoint")
    args = p.parse_args(argv)
    try:
        if args.cmd == "export":
            print(f"exported to {export(args.checkpoint, args.out_dir)}")
        elif args.cmd == "verify":
            root, tag = resolve_checkpoint(args.checkpoint)
            m = verify(root / tag)
            print(f"{root / tag}: OK ({len(m['files'])} files, topology {m['topology']})")
        else:
            root, tag = resolve_checkpoint(args.checkpoint)
            print(f"universal checkpoint: {to_universal(root, tag) / tag}")
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
