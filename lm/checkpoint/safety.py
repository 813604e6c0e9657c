"""The trust boundary: nothing in a checkpoint is unpickled beyond tensors, plain containers and the three
DeepSpeed classes DeepSpeed itself stores (ALLOWED_GLOBALS)."""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from lm.checkpoint.common import CheckpointError


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


def refusal_message(path: Path, exc: BaseException) -> str:
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
        raise CheckpointError(refusal_message(path, exc)) from None


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
