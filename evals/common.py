"""Load a model for evaluation on one process, without the trainer or DeepSpeed's engine."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lm import checkpoint
from lm.config import RunConfig
from lm.model import build_model


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_eval(path: str | os.PathLike, device: torch.device, untrained: bool = False):
    """(model in eval mode, run config, checkpoint description) from a run dir or checkpoint dir.

    untrained=True builds the same architecture with fresh weights (the baseline a run must beat)."""
    root, tag = checkpoint.resolve_checkpoint(path)
    cfg: RunConfig = checkpoint.load_checkpoint_config(root, tag)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if not untrained:
        state = checkpoint.load_module_state(root, tag)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "head.weight" or not cfg.model.tie_embeddings]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {root / tag} does not match model.arch={cfg.model.arch}: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device).eval()
    return model, cfg, str(Path(root) / tag)
