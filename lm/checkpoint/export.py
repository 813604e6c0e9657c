"""A checkpoint's weights on one process: the consolidated fp32 state dict with the plain model's parameter
names, whatever the layout it was saved in (per-layout adapters), and the safetensors export."""

from __future__ import annotations

import re
from pathlib import Path
import os

from lm.checkpoint.common import CONFIG, CheckpointError, pipeline_layer_files
from lm.checkpoint.safety import check_loadable, safe_load
from lm.checkpoint.store import load_checkpoint_config, resolve_checkpoint, verify
from lm.config import dump_config


def load_module_state(root: Path, tag: str) -> dict:
    """Consolidated fp32 state dict with the plain model's names, from any ZeRO stage or pipeline."""
    folder = Path(root) / tag
    layers = pipeline_layer_files(folder)
    if layers:
        return pipeline_to_plain(layers)
    plain = folder / "mp_rank_00_model_states.pt"
    if plain.is_file():
        sd = safe_load(plain).get("module")
        if sd:  # ZeRO-3 leaves this empty: its weights live in the partitioned optimizer shards
            return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    check_loadable(folder)  # DeepSpeed's consolidation below opens the shards with its own torch.load
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))


def pipeline_to_plain(layer_files: list[Path]) -> dict:
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
