"""Load a model for evaluation on one process, without the trainer or DeepSpeed's engine.

Accepts a run dir, a checkpoints dir, one checkpoint tag dir (any ZeRO stage or pipeline layout), or an
export dir written by `python -m lm.checkpoint export` (model.safetensors + config.yaml)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from lm import checkpoint
from lm.config import RunConfig, config_from_dict
from lm.model import build_model


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write an evaluation result as indented JSON, creating the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _load_export(folder: Path) -> tuple[RunConfig, dict]:
    from safetensors.torch import load_file

    with open(folder / "config.yaml") as f:
        cfg = config_from_dict(yaml.safe_load(f))
    return cfg, load_file(str(folder / "model.safetensors"))


def load_for_eval(path: str | os.PathLike, device: torch.device, untrained: bool = False):
    """(model in eval mode, run config, checkpoint description).

    untrained=True builds the same architecture with fresh weights (the baseline a run must beat)."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        cfg, state = _load_export(p)
        where = str(p)
    else:
        root, tag = checkpoint.resolve_checkpoint(p)
        if (root / tag / checkpoint.MANIFEST).is_file():
            checkpoint.verify(root / tag)
        cfg = checkpoint.load_checkpoint_config(root, tag)
        state = None if untrained else checkpoint.load_module_state(root, tag)
        where = str(root / tag)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if not untrained:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "head.weight" and cfg.model.tie_embeddings)]
        if missing or unexpected:
            raise checkpoint.CheckpointError(f"{where} does not match model.arch={cfg.model.arch}: missing "
                                             f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device).eval()
    return model, cfg, where
