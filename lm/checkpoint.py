"""Checkpoints in DeepSpeed's sharded layout, plus what exact resumption needs.

Layout: RUN_DIR/checkpoints/<tag>/ (DeepSpeed's model/optimizer shards) with `config.yaml` (the
resolved config) and `trainer_state.pt` beside them; RUN_DIR/checkpoints/latest names the newest tag.
The engine's client state carries the step, samples consumed, RNG states and the topology.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import yaml

from lm.config import RunConfig, config_from_dict, dump_config, to_dict

TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def list_tags(ckpt_root: Path) -> list[str]:
    if not ckpt_root.is_dir():
        return []
    tags = [p.name for p in ckpt_root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, str]:
    """(checkpoint root, tag) for a run dir, a checkpoints dir, or one tag dir."""
    p = Path(path)
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if not (root / tag).is_dir():
                raise FileNotFoundError(f"{latest} names {tag!r}, which is missing under {root}")
            return root, tag
    if p.is_dir() and (p / "config.yaml").is_file():
        return p.parent, p.name
    raise FileNotFoundError(f"no checkpoint at {p}: expected a run dir, a checkpoints dir with 'latest', or a tag dir")


def load_checkpoint_config(root: Path, tag: str) -> RunConfig:
    path = root / tag / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: not a checkpoint written by lm.train")
    with open(path) as f:
        return config_from_dict(yaml.safe_load(f))


def client_state(cfg: RunConfig, step: int, consumed_samples: int, world_size: int) -> dict:
    return {
        "step": step,
        "consumed_samples": consumed_samples,
        "config": to_dict(cfg),
        "topology": {"world_size": world_size, "zero_stage": cfg.parallel.zero_stage,
                     "pipeline_stages": cfg.parallel.pipeline_stages},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def save(engine, cfg: RunConfig, ckpt_root: Path, step: int, consumed_samples: int, world_size: int,
         is_rank0: bool, keep_last: int) -> Path:
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_root), tag=tag,
                           client_state=client_state(cfg, step, consumed_samples, world_size))
    if is_rank0:
        dump_config(cfg, ckpt_root / tag / "config.yaml")
        prune(ckpt_root, keep_last)
    return ckpt_root / tag


def prune(ckpt_root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    latest = (ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").is_file() else None
    tags = list_tags(ckpt_root)
    for tag in tags[:-keep_last]:
        if tag != latest:
            shutil.rmtree(ckpt_root / tag, ignore_errors=True)


def load(engine, ckpt_root: Path, tag: Optional[str]) -> dict:
    path, state = engine.load_checkpoint(str(ckpt_root), tag=tag)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag or 'latest'} under {ckpt_root}")
    return state


def load_module_state(root: Path, tag: str) -> dict:
    """Consolidated fp32 module state dict from a checkpoint of any ZeRO stage, on one process."""
    folder = root / tag
    plain = folder / "mp_rank_00_model_states.pt"
    if plain.is_file():
        sd = torch.load(plain, map_location="cpu", weights_only=False)["module"]
        if sd:  # ZeRO-3 writes an empty module here; its weights live in the optimizer shards
            return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
