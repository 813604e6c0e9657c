"""Tokenizers behind `data.tokenizer`: raw UTF-8 bytes (vocab 256) or a sentencepiece model.

Both expose the same small interface: `name`, `vocab_size`, `encode(text) -> np.ndarray`,
`encode_bytes(data) -> np.ndarray`, `decode(ids) -> str`. `encode_text_chunks` cuts a long text at
line boundaries into chunks of about `chunk_chars` characters and encodes them, optionally over a
process pool; the result depends only on the chunk size, never on the number of workers.

Sentencepiece models made by tokenizers/train_sentencepiece.py use identity normalisation, keep every
space, have no dummy prefix, carry "\\n" as a piece of its own and fall back to bytes, so
`decode(encode(text)) == text` for any text. Models trained elsewhere are accepted as they are.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

BYTE = "byte"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, one token per byte (bits per token = bits per byte)."""

    name = BYTE
    vocab_size = 256
    fingerprint = BYTE

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, ids: Union[Sequence[int], np.ndarray]) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tobytes()).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A sentencepiece .model file (sentencepiece is imported only when one is used)."""

    def __init__(self, model_path: Union[str, os.PathLike]):
        path = Path(os.path.expanduser(str(model_path)))
        if not path.is_file():
            raise FileNotFoundError(
                f"sentencepiece model {path} not found: data.tokenizer must be 'byte' or the path of a .model file "
                f"(train one with tokenizers/train_sentencepiece.py)")
        try:
            import sentencepiece as spm
        except ImportError:
            raise RuntimeError("data.tokenizer names a sentencepiece model but the sentencepiece package is not "
                               "installed: pip install sentencepiece") from None
        self.path = path
        self._proto = path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except (RuntimeError, OSError, TypeError) as exc:
            raise ValueError(f"{path} is not a sentencepiece model ({str(exc).splitlines()[0] if str(exc) else exc}); "
                             "data.tokenizer must be 'byte' or a .model file written by tokenizers/train_sentencepiece.py") from None
        self.vocab_size = int(self._sp.vocab_size())
        self.name = str(path)
        self.fingerprint = "spm-" + hashlib.sha256(self._proto).hexdigest()[:16]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=dtype_for_vocab(self.vocab_size))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        # Text that is not valid UTF-8 (e.g. enwik8 cut mid-character) gets U+FFFD for the bad bytes.
        return self.encode(data.decode("utf-8", errors="replace"))

    def decode(self, ids: Union[Sequence[int], np.ndarray]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __getstate__(self):  # picklable for spawn-based pools
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])


Tokenizer = Union[ByteTokenizer, SentencePieceTokenizer]


def load_tokenizer(spec: Optional[str]) -> Tokenizer:
    """'byte' (or empty) -> ByteTokenizer; anything else is the path of a sentencepiece .model file."""
    if spec is None or spec == "" or spec == BYTE:
        return ByteTokenizer()
    return SentencePieceTokenizer(spec)


# --------------------------------------------------------------------------------------------
# Chunked (optionally multiprocess) encoding
# --------------------------------------------------------------------------------------------


def iter_line_chunks(text: str, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Consecutive pieces of `text` of about chunk_chars characters, each ending after a newline
    (except possibly the last); their concatenation is `text`."""
    n, start = len(text), 0
    while start < n:
        end = min(n, start + chunk_chars)
        if end < n:
            cut = text.find("\n", end)
            end = n if cut < 0 else cut + 1
        yield text[start:end]
        start = end


_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode_in_worker(chunk: str) -> np.ndarray:
    return _WORKER_TOKENIZER.encode(chunk)


def _pool_context():
    # fork is cheapest (no re-import of the parent's modules); workers only run sentencepiece.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def encode_chunks(chunks: Iterable[str], tokenizer: Tokenizer, workers: int = 1) -> Iterator[np.ndarray]:
    """Encode text chunks in order; workers > 1 spreads them over a process pool."""
    if workers <= 1 or isinstance(tokenizer, ByteTokenizer):
        for chunk in chunks:
            yield tokenizer.encode(chunk)
        return
    spec = tokenizer.name
    with _pool_context().Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        yield from pool.imap(_encode_in_worker, chunks, chunksize=1)


def encode_text(text: str, tokenizer: Tokenizer, workers: int = 1, chunk_chars: int = 1 << 20,
                progress: bool = False, desc: str = "encode") -> np.ndarray:
    """Encode a whole text into one 1-D array (dtype fitted to the vocabulary)."""
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    parts = []
    bar = _bar(len(text), progress, desc, unit="char")
    with bar:
        for ids, chunk in zip(encode_chunks(iter_line_chunks(text, chunk_chars), tokenizer, workers),
                              iter_line_chunks(text, chunk_chars)):
            parts.append(np.asarray(ids, dtype=dtype))
            bar.update(len(chunk))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 1) - 1))


def _bar(total: int, enabled: bool, desc: str, unit: str = "it"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled, dynamic_ncols=True)
