"""What every part of lm.checkpoint shares: the on-disk names, the error type, tags and hashing."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch.distributed as tdist

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


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_distributed() -> bool:
    return tdist.is_initialized() and tdist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def pipeline_layer_files(folder: Path) -> list[Path]:
    """A pipeline checkpoint's per-layer model files (layer_00 = embedding, then the blocks, then the norm)."""
    return sorted(Path(folder).glob("layer_*-model_states.pt"))
