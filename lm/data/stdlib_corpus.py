"""The built-in offline corpus: this Python's standard-library source files, byte level.

Every machine with Python has it, so the main job and the tests need no download. Files are read in
sorted order of their path relative to the stdlib root (site-packages excluded) and assigned to
train / valid / test by a stable hash of that relative path, so the split of a file never changes
between runs or machines with the same Python. Each file's bytes are followed by one separator byte
(0, which never occurs in source text). Nothing of it is copied into this repository.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Optional

SEPARATOR = b"\x00"
SPLITS = ("train", "valid", "test")
HELD_OUT_PERCENT = 4  # percent of files in each of valid and test


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """Stable split of one file: 4% valid, 4% test, the rest train (sha256 of the relative path)."""
    bucket = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < HELD_OUT_PERCENT:
        return "valid"
    if bucket < 2 * HELD_OUT_PERCENT:
        return "test"
    return "train"


def list_files(root: Optional[Path] = None) -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of every .py file, sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library folder not found: {root}")
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in ("site-packages", "dist-packages", "__pycache__") for part in rel.parts):
            continue
        out.append((rel.as_posix(), path))
    out.sort(key=lambda item: item[0])
    if not out:
        raise FileNotFoundError(f"no .py files under {root}: is this a full Python installation?")
    return out


def build_splits(root: Optional[Path] = None) -> tuple[dict[str, bytes], dict]:
    """Read the corpus: {split: bytes} and a manifest (file counts, bytes, content hash)."""
    parts: dict[str, list[bytes]] = {s: [] for s in SPLITS}
    counts = {s: 0 for s in SPLITS}
    digest = hashlib.sha256()
    for rel, path in list_files(root):
        data = path.read_bytes().replace(SEPARATOR, b"")
        split = split_of(rel)
        parts[split].append(data + SEPARATOR)
        counts[split] += 1
        digest.update(rel.encode() + b"\n" + hashlib.sha256(data).digest())
    blobs = {s: b"".join(parts[s]) for s in SPLITS}
    manifest = {
        "root": str(root or stdlib_root()),
        "files": counts,
        "bytes": {s: len(b) for s, b in blobs.items()},
        "sha256": digest.hexdigest(),
    }
    return blobs, manifest
