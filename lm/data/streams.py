"""Token streams: one memory-mapped 1-D array of token ids per split, cached on disk.

`load_stream(data_cfg, split)` returns a TokenStream for any dataset the config names. Prepared arrays
live under `data.cache_dir/<dataset>-<fingerprint>/<split>.bin` with a `meta.json`; they are written to
a temporary name and renamed, so an interrupted preparation never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from lm.config import DataConfig
from lm.data import stdlib_corpus


@dataclass
class TokenStream:
    tokens: np.ndarray  # 1-D, uint8 / uint16 / uint32
    vocab_size: int
    n_bytes: int  # bytes of original text behind these tokens (for bits per byte)
    n_words: Optional[int] = None  # word count (WikiText convention) where defined
    name: str = ""

    def __len__(self) -> int:
        return len(self.tokens)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stdlib_cache(cache_dir: Path) -> Path:
    listing = "\n".join(f"{rel}:{path.stat().st_size}" for rel, path in stdlib_corpus.list_files())
    fingerprint = hashlib.sha256(listing.encode()).hexdigest()[:12]
    tag = f"stdlib-py{platform.python_version()}-{fingerprint}"
    folder = cache_dir / tag
    meta = folder / "meta.json"
    if meta.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    blobs, manifest = stdlib_corpus.build_splits()
    for split, blob in blobs.items():
        _atomic_write_bytes(folder / f"{split}.bin", blob)
    _atomic_write_bytes(meta, json.dumps({"dtype": "uint8", "vocab_size": 256, **manifest}, indent=1).encode())
    return folder


def load_stream(cfg: DataConfig, split: str) -> TokenStream:
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, got {split!r}")
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    if cfg.dataset == "stdlib":
        folder = _stdlib_cache(cache_dir)
        tokens = np.memmap(folder / f"{split}.bin", dtype=np.uint8, mode="r")
        if split == "train" and cfg.max_train_bytes:
            tokens = tokens[: cfg.max_train_bytes]
        return TokenStream(tokens, 256, n_bytes=len(tokens), name=f"stdlib/{split}")
    if cfg.dataset == "tokens":
        return load_token_folder(cfg.data_path, split)
    raise NotImplementedError(
        f"data.dataset={cfg.dataset!r} is not available in this build; use data.dataset=stdlib or tokens")


def load_token_folder(path: Optional[str], split: str) -> TokenStream:
    """A folder written by tokenizers/encode_corpus.py: {split}.bin + meta.json."""
    if not path:
        raise ValueError("data.dataset=tokens needs data.data_path=FOLDER (made by tokenizers/encode_corpus.py)")
    folder = Path(path)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: encode the corpus first with tokenizers/encode_corpus.py")
    meta = json.loads(meta_path.read_text())
    bin_path = folder / f"{split}.bin"
    if not bin_path.is_file():
        raise FileNotFoundError(f"{bin_path} not found (splits present: {sorted(meta.get('splits', {}))})")
    tokens = np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r")
    info = meta.get("splits", {}).get(split, {})
    return TokenStream(tokens, int(meta["vocab_size"]), n_bytes=int(info.get("bytes", len(tokens))),
                       n_words=info.get("words"), name=f"{folder.name}/{split}")
