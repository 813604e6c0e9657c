"""Token streams: one memory-mapped 1-D array of token ids per split, cached on disk.

`load_stream(data_cfg, split)` returns a TokenStream for any dataset the config names. Prepared arrays
live under `data.cache_dir/<dataset>-<fingerprint>/<split>.bin` with a `meta.json`; they are written to
a temporary name and renamed, so an interrupted preparation never leaves a half-written cache.

Datasets: `stdlib` (built-in, offline), `enwik8` (lm/data/enwik8.py: byte level, 90M/5M/5M split, the
verified raw file is memory-mapped directly), `wikitext103` (lm/data/wikitext.py: raw folder, hub parquet,
zip or the hub) and `tokens` (a folder written by tokenizers/encode_corpus.py). `data.tokenizer` is
"byte" or a sentencepiece .model; text prepared with a tokenizer is cached per split as
`<cache_dir>/<dataset>-<fingerprint>/<split>.bin` + `<split>.json` (tokens, bytes, words), the json
written last, so concurrent ranks and interrupted runs are safe. The fingerprint covers the source
files (path, size, mtime) and the tokenizer (hash of the .model file).
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

from lm.config import ConfigError, DataConfig
from lm.data import enwik8, stdlib_corpus, wikitext
from lm.data.tokenizer import BYTE, Tokenizer, default_workers, dtype_for_vocab, encode_text, load_tokenizer
from lm.fileio import atomic_write_bytes


class DataError(ConfigError):
    """The data the config names is unusable (corrupt, inconsistent, too short); the message names the
    file or key and the fix. A ConfigError, so lm.train reports it as one line and a non-zero exit."""


class DataNotFound(FileNotFoundError, DataError):
    """The data the config names is missing (a FileNotFoundError and a DataError)."""


@dataclass
class TokenStream:
    tokens: np.ndarray  # 1-D, uint8 / uint16 / uint32
    vocab_size: int
    n_bytes: int  # bytes of original text behind these tokens (for bits per byte)
    n_words: Optional[int] = None  # word count (WikiText convention) where defined
    name: str = ""

    def __len__(self) -> int:
        return len(self.tokens)


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
        atomic_write_bytes(folder / f"{split}.bin", blob)
    atomic_write_bytes(meta, json.dumps({"dtype": "uint8", "vocab_size": 256, **manifest}, indent=1).encode())
    return folder


def _is_byte(cfg: DataConfig) -> bool:
    return getattr(cfg, "tokenizer", BYTE) in (None, "", BYTE)


def load_stream(cfg: DataConfig, split: str) -> TokenStream:
    """The token stream of one split of the dataset `cfg` names. Missing data raises DataNotFound,
    unusable data DataError (both ConfigErrors whose message names the path and the fix)."""
    try:
        return _load_stream(cfg, split)
    except DataError:
        raise
    except FileNotFoundError as exc:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        raise DataNotFound(message) from None
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _load_stream(cfg: DataConfig, split: str) -> TokenStream:
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, got {split!r}")
    cache_dir = Path(os.path.expanduser(cfg.cache_dir))
    if cfg.dataset == "tokens":
        return load_token_folder(cfg.data_path, split)
    if cfg.dataset == "stdlib" and _is_byte(cfg):
        folder = _stdlib_cache(cache_dir)
        tokens = np.memmap(folder / f"{split}.bin", dtype=np.uint8, mode="r")
        if split == "train" and cfg.max_train_bytes:
            tokens = tokens[: cfg.max_train_bytes]
        return TokenStream(tokens, 256, n_bytes=len(tokens), name=f"stdlib/{split}")
    if cfg.dataset == "enwik8" and _is_byte(cfg):
        # Byte level: the verified raw file *is* the prepared array; memory-map the split's range.
        raw = enwik8.prepare(cfg.data_path, cache_dir)
        tokens = enwik8.load_split(raw, split, total=raw.stat().st_size)
        if split == "train" and cfg.max_train_bytes:
            tokens = tokens[: cfg.max_train_bytes]
        return TokenStream(tokens, 256, n_bytes=len(tokens), name=f"enwik8/{split}")
    if cfg.dataset in ("stdlib", "enwik8", "wikitext103"):
        return _prepared_stream(cfg, split, cache_dir)
    raise ValueError(f"data.dataset={cfg.dataset!r} is not one of stdlib, enwik8, wikitext103, tokens")


# --------------------------------------------------------------------------------------------
# Text datasets: original bytes of a split, and their cached tokenisation
# --------------------------------------------------------------------------------------------


@dataclass
class SplitData:
    """One split's original content: its bytes (n_bytes = len(data)) and word count where defined."""

    data: bytes
    n_words: Optional[int] = None
    _text: Optional[str] = None

    def text(self) -> str:
        if self._text is None:
            self._text = self.data.decode("utf-8", errors="replace")
        return self._text


def _file_stamp(paths) -> str:
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append(f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(out)


def source_key(cfg: DataConfig, split: str, cache_dir: Path) -> str:
    """Cheap identity of the split's source content (enwik8 is checksum-verified here)."""
    if cfg.dataset == "enwik8":
        raw = enwik8.prepare(cfg.data_path, cache_dir)
        return f"enwik8:{enwik8.ENWIK8_SHA256}:{raw.stat().st_size}"
    if cfg.dataset == "wikitext103":
        src = wikitext.locate(cfg.data_path)
        if src.kind == "hub":
            return f"wikitext103:hub:{wikitext.HUB_REPO}/{wikitext.HUB_CONFIG}"
        return f"wikitext103:{src.kind}:{_file_stamp(src.fingerprint_files(split))}"
    if cfg.dataset == "stdlib":
        return "stdlib:" + _stdlib_cache(cache_dir).name
    raise ValueError(f"data.dataset={cfg.dataset!r} has no text source")


def read_split(cfg: DataConfig, split: str, cache_dir: Optional[Path] = None) -> SplitData:
    """The split's original bytes (and WikiText word count) for any text dataset."""
    cache_dir = Path(os.path.expanduser(cfg.cache_dir)) if cache_dir is None else cache_dir
    if cfg.dataset == "enwik8":
        raw = enwik8.prepare(cfg.data_path, cache_dir)
        return SplitData(enwik8.read_split_bytes(raw, split, total=raw.stat().st_size))
    if cfg.dataset == "wikitext103":
        text = wikitext.read_split(wikitext.locate(cfg.data_path), split)
        return SplitData(text.encode("utf-8"), wikitext.count_words(text), _text=text)
    if cfg.dataset == "stdlib":
        return SplitData((_stdlib_cache(cache_dir) / f"{split}.bin").read_bytes())
    raise ValueError(f"data.dataset={cfg.dataset!r} has no text source (tokens folders are already encoded)")


def encode_split(data: SplitData, tokenizer: Tokenizer, workers: int = 1, progress: bool = False,
                 desc: str = "encode") -> np.ndarray:
    if tokenizer.name == BYTE:
        return np.frombuffer(data.data, dtype=np.uint8)
    return encode_text(data.text(), tokenizer, workers=workers, progress=progress, desc=desc)


def _prepared_stream(cfg: DataConfig, split: str, cache_dir: Path) -> TokenStream:
    tokenizer = load_tokenizer(cfg.tokenizer)
    key = f"{source_key(cfg, split, cache_dir)}|{tokenizer.fingerprint}"
    folder = cache_dir / f"{cfg.dataset}-{tokenizer.fingerprint[:20]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    meta_path = folder / f"{split}.json"
    if not meta_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        data = read_split(cfg, split, cache_dir)
        big = len(data.data) > (8 << 20)
        tokens = encode_split(data, tokenizer, workers=default_workers() if big else 1, progress=big,
                              desc=f"{cfg.dataset}/{split}")
        tokens = np.ascontiguousarray(tokens, dtype=dtype_for_vocab(tokenizer.vocab_size))
        atomic_write_bytes(folder / f"{split}.bin", tokens.tobytes())
        meta = {"dtype": tokens.dtype.name, "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name,
                "tokens": int(len(tokens)), "bytes": len(data.data), "words": data.n_words, "source": key}
        atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    meta = json.loads(meta_path.read_text())
    tokens = np.memmap(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r") if meta["tokens"] else \
        np.zeros(0, dtype=np.dtype(meta["dtype"]))
    n_bytes, n_words = int(meta["bytes"]), meta.get("words")
    if split == "train" and cfg.max_train_bytes and cfg.max_train_bytes < n_bytes:
        keep = len(tokens) if n_bytes == 0 else int(len(tokens) * cfg.max_train_bytes / n_bytes)
        tokens, n_bytes, n_words = tokens[:keep], cfg.max_train_bytes, None
    return TokenStream(tokens, int(meta["vocab_size"]), n_bytes=n_bytes, n_words=n_words,
                       name=f"{cfg.dataset}/{split}")


def load_token_folder(path: Optional[str], split: str) -> TokenStream:
    """A folder written by tokenizers/encode_corpus.py: {split}.bin + meta.json."""
    if not path:
        raise DataError("data.dataset=tokens needs data.data_path=FOLDER (made by tokenizers/encode_corpus.py)")
    folder = Path(path)
    if not folder.is_dir():
        raise DataNotFound(f"data.data_path={folder} is not a folder: give the folder tokenizers/encode_corpus.py wrote")
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataNotFound(f"{meta_path} not found: data.data_path={folder} has no metadata; encode the corpus first "
                           "with tokenizers/encode_corpus.py")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        vocab_size = int(meta["vocab_size"])
        splits = meta.get("splits", {})
        if dtype.kind != "u" or vocab_size < 1 or not isinstance(splits, dict):
            raise ValueError("unsupported dtype or vocab_size")
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta_path} is not valid token-shard metadata ({type(exc).__name__}: {exc}); re-run "
                        "tokenizers/encode_corpus.py into this folder") from None
    bin_path = folder / f"{split}.bin"
    if not bin_path.is_file():
        raise DataNotFound(f"{bin_path} not found (splits present: {sorted(splits)})")
    info = splits.get(split, {}) if isinstance(splits.get(split, {}), dict) else {}
    size = bin_path.stat().st_size
    expected = info.get("tokens")
    if size % dtype.itemsize or (expected is not None and size != expected * dtype.itemsize):
        raise DataError(f"{bin_path} is {size} bytes but meta.json promises {expected} {dtype} tokens: the shard is "
                        "truncated or corrupt; re-run tokenizers/encode_corpus.py for this split")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    return TokenStream(tokens, vocab_size, n_bytes=int(info.get("bytes", len(tokens))),
                       n_words=info.get("words"), name=f"{folder.name}/{split}")
