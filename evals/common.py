"""Load a model for evaluation on one process, without the trainer or DeepSpeed's engine.

Accepts a run dir, a checkpoints dir, one checkpoint tag dir (any ZeRO stage or pipeline layout), or an
export dir written by `python -m lm.checkpoint export` (model.safetensors + config.yaml)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from typing import Optional
from pathlib import Path

import torch
import yaml

from lm import checkpoint
from lm.config import ConfigError, RunConfig, config_from_dict
from lm.model import build_model


def pick_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when available, else the CPU), 'cpu', 'cuda' or 'cuda:N'; ValueError naming --device
    for anything else or for a GPU this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: only cpu and cuda devices are supported; use auto, cpu, cuda or cuda:N")
    return device


def recipe_parser(prog: str, doc: str, *, overrides_help: str, recipe_help: str) -> argparse.ArgumentParser:
    """The parser of a benchmark over training recipes: positional KEY=VALUE config overrides and a repeatable
    --recipe (args.recipes); finish with `parse_recipe_args`."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    p.add_argument("--recipe", dest="recipes", action="append", default=None, help=recipe_help)
    return p


def parse_recipe_args(p: argparse.ArgumentParser, argv, default_recipes: list[str]) -> argparse.Namespace:
    """Parse argv with a `recipe_parser`: an override without '=' (a recipe given without --recipe) is a usage
    error; no --recipe means default_recipes."""
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"{bad[0]!r} is not a key=value override (recipes go after --recipe)")
    args.recipes = args.recipes or list(default_recipes)
    return args


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1 ('8192,131072')."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 8192,131072)") \
            from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values


def kernel_bench_unavailable(prog: str) -> Optional[str]:
    """Why a Triton kernel benchmark cannot run on this machine (no CUDA GPU, no Triton), or None when it can."""
    if not torch.cuda.is_available():
        return f"{prog} needs a CUDA GPU (none found); run it on the GPU machine"
    if importlib.util.find_spec("triton") is None:
        return f"{prog} needs Triton (pip install triton)"
    return None


def write_json(path: str | os.PathLike, obj) -> None:
    """Write an evaluation result as indented JSON, creating the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _load_export(folder: Path) -> tuple[RunConfig, dict]:
    from safetensors.torch import load_file

    path = folder / "config.yaml"
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        cfg = config_from_dict(data if data is not None else {})
    except FileNotFoundError:
        raise checkpoint.CheckpointError(f"{path} missing: an export holds model.safetensors and config.yaml") from None
    except (yaml.YAMLError, UnicodeDecodeError, ConfigError) as exc:
        raise checkpoint.CheckpointError(f"{path} is not a valid run config ({str(exc).splitlines()[0]}): the export "
                                         "is corrupt or was modified") from None
    try:
        return cfg, load_file(str(folder / "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a corrupt file
        raise checkpoint.CheckpointError(f"{folder / 'model.safetensors'} cannot be read ({exc}): the export is "
                                         "corrupt") from None


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
