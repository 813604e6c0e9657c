"""Conversion to DeepSpeed's universal format (resumable on any number of processes and pipeline stages),
in a child process in which torch is forced to weights-only loading."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import torch

from lm.checkpoint.common import CONFIG, MANIFEST, STATE_FILE, CheckpointError
from lm.checkpoint.safety import allowed_globals, check_loadable, refusal_message

log = logging.getLogger("lm.checkpoint")


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
    root_dir = str(Path(__file__).resolve().parents[2])
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


def universal_worker(src: Path, dst: Path) -> None:
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
        raise CheckpointError(f"universal conversion of {src}: " + refusal_message(src, cause)) from None
