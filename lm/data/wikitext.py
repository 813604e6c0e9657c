"""WikiText-103 (raw, no <unk>) from any of its published layouts, as the exact original text.

Sources accepted as `data.data_path` (each gives byte-identical text per split):
  (a) the official raw folder: `wiki.{train,valid,test}.raw`, directly or in a `wikitext-103-raw/`
      subfolder;
  (b) the Hugging Face hub parquet files: `<config>/{train,validation,test}-0000K-of-0000N.parquet`,
      column `text`, one row per original line, blank lines stored as "" (the folder given may be the
      config folder or its parent; `wikitext-103-raw-v1` is preferred over other configs);
  (c) the zip `wikitext-103-raw-v1.zip` (the file, or a folder holding it);
  (d) no path: `datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1")` (datasets is
      imported only then).
Rows map back to the file with `"".join(r if r else " \\n" for r in rows)` (blank lines are " \\n").

Word count (the unit of word-level perplexity): whitespace-separated tokens plus one end-of-line per
line of the original file. The WikiText-103 test split gives 245,569, as fairseq reports.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

HUB_REPO = "Salesforce/wikitext"
HUB_CONFIG = "wikitext-103-raw-v1"
RAW_SUBDIR = "wikitext-103-raw"
ZIP_NAME = "wikitext-103-raw-v1.zip"
SPLITS = ("train", "valid", "test")
HUB_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
# torchtext's published line counts of WikiText-103 (a sanity check, not a hard requirement).
NUM_LINES = {"train": 1_801_350, "valid": 3_760, "test": 4_358}
_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<k>\d+)-of-(?P<n>\d+)\.parquet$")


# --------------------------------------------------------------------------------------------
# Word count
# --------------------------------------------------------------------------------------------


def count_words(text: str, chunk_chars: int = 1 << 22) -> int:
    """Whitespace-separated tokens + one end-of-line per line (a last line without "\\n" counts too).

    Same as fairseq's count on the tokenised file: each line is split on whitespace and gets an <eos>.
    Counted in chunks cut after newlines, so memory stays small on the 540 MB training split."""
    words, lines, start, n = 0, 0, 0, len(text)
    while start < n:
        end = min(n, start + chunk_chars)
        if end < n:
            cut = text.find("\n", end)
            end = n if cut < 0 else cut + 1
        piece = text[start:end]
        words += len(piece.split())
        lines += piece.count("\n")
        start = end
    if text and not text.endswith("\n"):
        lines += 1
    return words + lines


def rows_to_text(rows: Iterable[Optional[str]]) -> str:
    """Hub rows (one per original line, blank lines as "") back to the original file text."""
    return "".join(r if r else " \n" for r in rows)


def text_to_rows(text: str) -> list[str]:
    """The hub's row format for a raw file (inverse of rows_to_text for canonical files)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line + "\n" if line.strip() else "" for line in lines]


# --------------------------------------------------------------------------------------------
# Locating a source
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    kind: str  # "raw" | "parquet" | "zip" | "hub"
    path: Optional[Path]  # folder (raw, parquet), zip file, or None (hub)

    def describe(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else self.kind

    def fingerprint_files(self, split: str) -> list[Path]:
        """Files whose (name, size, mtime) identify this split's content (for the cache key)."""
        if self.kind == "raw":
            return [self.path / f"wiki.{split}.raw"]
        if self.kind == "parquet":
            return parquet_shards(self.path, split)
        if self.kind == "zip":
            return [self.path]
        return []


def _raw_folder(p: Path) -> Optional[Path]:
    for folder in (p, p / RAW_SUBDIR):
        if any((folder / f"wiki.{s}.raw").is_file() for s in SPLITS):
            return folder
    return None


def _parquet_folder(p: Path) -> Optional[Path]:
    for folder in (p / HUB_CONFIG, p, p / "wikitext" / HUB_CONFIG):
        if folder.is_dir() and any(_SHARD_RE.match(f.name) for f in folder.glob("*.parquet")):
            return folder
    return None


def locate(data_path: Optional[str]) -> Source:
    """Work out which layout `data_path` is (see the module docstring)."""
    if not data_path:
        return Source("hub", None)
    p = Path(os.path.expanduser(str(data_path)))
    if p.is_file():
        if zipfile.is_zipfile(p):
            return Source("zip", p)
        if p.suffix == ".parquet":
            return Source("parquet", p.parent)
        if p.name.startswith("wiki.") and p.suffix == ".raw":
            return Source("raw", p.parent)
        raise ValueError(f"{p}: expected a folder, {ZIP_NAME} or a parquet shard for WikiText-103")
    if not p.is_dir():
        raise FileNotFoundError(
            f"WikiText-103 not found at {p}: pass the raw folder (wiki.{{train,valid,test}}.raw), the hub parquet "
            f"folder, or {ZIP_NAME}")
    raw = _raw_folder(p)
    if raw is not None:
        return Source("raw", raw)
    pq = _parquet_folder(p)
    if pq is not None:
        return Source("parquet", pq)
    zips = [p / ZIP_NAME] + sorted(p.glob("wikitext-103*raw*.zip"))
    for z in zips:
        if z.is_file():
            return Source("zip", z)
    hint = ""
    other = sorted(c.name for c in p.iterdir() if c.is_dir() and any(c.glob("*.parquet")))
    if other:
        hint = f" (found parquet configs {other}; the one evaluated here is {HUB_CONFIG})"
    elif any(p.glob("**/wiki.*.tokens")):
        hint = (" (found wiki.*.tokens: that is the tokenised version with <unk>; the raw version "
                "wiki.*.raw / wikitext-103-raw-v1 is the one evaluated here)")
    raise FileNotFoundError(
        f"{p} holds no WikiText-103 data: expected wiki.{{train,valid,test}}.raw (or {RAW_SUBDIR}/), "
        f"{HUB_CONFIG}/<split>-0000K-of-0000N.parquet, or {ZIP_NAME}{hint}")


def parquet_shards(folder: Path, split: str) -> list[Path]:
    """All shards of one split, in order; refuses an incomplete set."""
    hub = HUB_SPLIT[split]
    shards = []
    for f in folder.glob(f"{hub}-*.parquet"):
        m = _SHARD_RE.match(f.name)
        if m and m.group("split") == hub:
            shards.append((int(m.group("k")), int(m.group("n")), f))
    if not shards:
        raise FileNotFoundError(f"no {hub}-0000K-of-0000N.parquet shards in {folder}")
    shards.sort()
    n = shards[0][1]
    if [k for k, _, _ in shards] != list(range(n)) or any(m != n for _, m, _ in shards):
        raise FileNotFoundError(f"incomplete parquet shards for {hub} in {folder}: have "
                                f"{[f.name for _, _, f in shards]}, expected {n} shards 0..{n - 1}")
    return [f for _, _, f in shards]


# --------------------------------------------------------------------------------------------
# Reading a split
# --------------------------------------------------------------------------------------------


def _read_raw(folder: Path, split: str) -> str:
    f = folder / f"wiki.{split}.raw"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found")
    return f.read_bytes().decode("utf-8")


def _read_parquet(folder: Path, split: str) -> str:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("reading WikiText parquet files needs pyarrow: pip install pyarrow") from None
    parts = []
    for shard in parquet_shards(folder, split):
        table = pq.read_table(shard, columns=["text"])
        parts.append(rows_to_text(table.column("text").to_pylist()))
    return "".join(parts)


def _read_zip(zip_path: Path, split: str) -> str:
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        member = next((n for n in names if n.endswith(f"wiki.{split}.raw")), None)
        if member is None:
            tokens = [n for n in names if n.endswith(f"wiki.{split}.tokens")]
            extra = " (this is the tokenised zip with <unk>; use wikitext-103-raw-v1.zip)" if tokens else ""
            raise FileNotFoundError(f"{zip_path} has no wiki.{split}.raw member{extra}")
        return zf.read(member).decode("utf-8")


def _read_hub(split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(
            f"data.data_path is not set and the `datasets` package is missing: either pip install datasets "
            f"(it downloads {HUB_REPO} {HUB_CONFIG}) or pass data.data_path= the raw folder, the parquet "
            f"folder or {ZIP_NAME}") from None
    try:
        ds = datasets.load_dataset(HUB_REPO, HUB_CONFIG, split=HUB_SPLIT[split])
    except Exception as exc:  # offline, hub errors, ...: name the way out
        raise RuntimeError(
            f"could not load {HUB_REPO} ({HUB_CONFIG}) with datasets ({type(exc).__name__}: {exc}). Offline? "
            f"Download the data elsewhere and pass data.data_path= the raw folder (wiki.*.raw), the parquet "
            f"folder ({HUB_CONFIG}/*.parquet) or {ZIP_NAME}") from None
    return rows_to_text(ds["text"])


def read_split(source: Source, split: str) -> str:
    """The split's text, byte-identical to the official wiki.{split}.raw whatever the layout."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source.kind == "raw":
        return _read_raw(source.path, split)
    if source.kind == "parquet":
        return _read_parquet(source.path, split)
    if source.kind == "zip":
        return _read_zip(source.path, split)
    return _read_hub(split)
