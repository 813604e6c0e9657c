"""enwik8: the first 100,000,000 bytes of the English Wikipedia XML dump of 2006-03-03 (Hutter Prize).

Accepted as `data.data_path` = the raw `enwik8` file, `enwik8.zip` (one member named `enwik8`), or a
folder holding either. With no path, `<cache_dir>/enwik8/` is searched and, failing that, the zip is
downloaded from http://mattmahoney.net/dc/enwik8.zip into it. The raw bytes are always checked (size
and sha256) before use; a wrong file is refused with the expected and found values.

Standard split on raw bytes (Transformer-XL / awd-lstm `prep_enwik8.py`): train = [0, 90M),
valid = [90M, 95M), test = [95M, 100M). Byte-level vocabulary of 256 (205 values occur), so bits per
token = bits per byte (bpc). Sizes and hashes are parameters so tests can use a small synthetic file;
module-level constants are read at call time (tests may patch them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from lm.fileio import atomic_write_bytes

ENWIK8_SIZE = 100_000_000
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"
ZIP_URL = "http://mattmahoney.net/dc/enwik8.zip"
ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
ZIP_SIZE = 36_445_475
MEMBER = "enwik8"
SPLITS = ("train", "valid", "test")


def split_offsets(total: Optional[int] = None) -> dict[str, tuple[int, int]]:
    """Byte ranges [start, end) of each split: the last 2 twentieths are valid then test.

    total=100,000,000 gives train [0, 90M), valid [90M, 95M), test [95M, 100M)."""
    total = ENWIK8_SIZE if total is None else int(total)
    held = total // 20
    return {"train": (0, total - 2 * held), "valid": (total - 2 * held, total - held), "test": (total - held, total)}


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(block)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


class ChecksumError(ValueError):
    """The file is not enwik8 (wrong size or sha256)."""


def verify_raw(path: Path, expected_size: Optional[int] = None, expected_sha256: Optional[str] = None,
               stamp_dir: Optional[Path] = None) -> Path:
    """Check size and sha256 of a raw enwik8 file; raise ChecksumError naming expected vs found.

    With stamp_dir, a successful check is remembered (by path, size and mtime) so the 100 MB hash is
    computed once per file, not once per process."""
    expected_size = ENWIK8_SIZE if expected_size is None else expected_size
    expected_sha256 = (ENWIK8_SHA256 if expected_sha256 is None else expected_sha256).lower()
    path = Path(path)
    st = path.stat()
    if st.st_size != expected_size:
        raise ChecksumError(
            f"{path} is not enwik8: expected {expected_size:,} bytes, found {st.st_size:,} bytes "
            f"(get the original from {ZIP_URL})")
    stamp = None
    if stamp_dir is not None:
        key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{expected_sha256}".encode()).hexdigest()[:16]
        stamp = Path(stamp_dir) / f"verified-{key}.json"
        if stamp.is_file():
            return path
    found = sha256_file(path)
    if found != expected_sha256:
        raise ChecksumError(
            f"{path} is not enwik8: expected sha256 {expected_sha256}, found {found} "
            f"(size {st.st_size:,} bytes is right, so the file is corrupted or a different text; "
            f"re-download {ZIP_URL})")
    if stamp is not None:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(stamp, json.dumps({"path": str(path.resolve()), "size": st.st_size,
                                             "sha256": found}).encode())
        except OSError:
            pass  # read-only cache: verify again next time
    return path


def extract_zip(zip_path: Path, dest_dir: Path, expected_size: Optional[int] = None,
                expected_sha256: Optional[str] = None) -> Path:
    """Extract the `enwik8` member to dest_dir/enwik8 (atomically) and verify it."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / MEMBER
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise ChecksumError(f"{zip_path} is not a valid zip file (re-download {ZIP_URL})") from None
    with zf:
        names = zf.namelist()
        member = MEMBER if MEMBER in names else next((n for n in names if Path(n).name == MEMBER), None)
        if member is None:
            raise ChecksumError(f"{zip_path} has no member named {MEMBER!r} (members: {names[:5]})")
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    try:
        verify_raw(tmp, expected_size, expected_sha256)
    except ChecksumError as exc:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(f"{zip_path}: member {member}: {exc}") from None
    os.replace(tmp, out)
    verify_raw(out, expected_size, expected_sha256, stamp_dir=dest_dir)  # records the stamp (no re-hash cost on reuse)
    return out


def download_zip(dest_dir: Path, url: Optional[str] = None, expected_sha256: Optional[str] = None) -> Path:
    """Download enwik8.zip into dest_dir (temporary name, checked, then renamed)."""
    url = url or ZIP_URL
    expected_sha256 = (ZIP_SHA256 if expected_sha256 is None else expected_sha256).lower()
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / "enwik8.zip"
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            from tqdm import tqdm

            with tqdm(total=total, desc="enwik8.zip", unit="B", unit_scale=True, dynamic_ncols=True) as bar:
                while True:
                    buf = resp.read(1 << 20)
                    if not buf:
                        break
                    f.write(buf)
                    bar.update(len(buf))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download enwik8 from {url} ({exc}). If this machine is offline, fetch enwik8.zip "
            f"elsewhere and either pass data.data_path=/path/to/enwik8.zip (or the extracted enwik8 file, or "
            f"a folder holding either) or copy it to {out}") from None
    found = sha256_file(tmp)
    if found != expected_sha256:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(f"downloaded {url}: expected sha256 {expected_sha256}, found {found}")
    os.replace(tmp, out)
    return out


def prepare(data_path: Optional[str], cache_dir: Path, expected_size: Optional[int] = None,
            expected_sha256: Optional[str] = None, download: bool = True) -> Path:
    """Path of a verified raw enwik8 file, from data_path (file / zip / folder) or the cache / download."""
    work = Path(cache_dir) / "enwik8"
    if data_path:
        p = Path(os.path.expanduser(str(data_path)))
        if p.is_dir():
            candidates = [p / MEMBER, p / "enwik8.zip"]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(f"{p} holds neither enwik8 nor enwik8.zip")
            p = found
        if not p.is_file():
            raise FileNotFoundError(f"enwik8 not found at {p} (expected the raw 100,000,000-byte file, "
                                    f"enwik8.zip, or a folder holding either)")
        if zipfile.is_zipfile(p):
            key = hashlib.sha256(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}".encode()).hexdigest()[:12]
            dest = work / f"from-zip-{key}"
            if (dest / MEMBER).is_file():
                return verify_raw(dest / MEMBER, expected_size, expected_sha256, stamp_dir=dest)
            return extract_zip(p, dest, expected_size, expected_sha256)
        return verify_raw(p, expected_size, expected_sha256, stamp_dir=work)
    if (work / MEMBER).is_file():
        return verify_raw(work / MEMBER, expected_size, expected_sha256, stamp_dir=work)
    zip_path = work / "enwik8.zip"
    if not zip_path.is_file():
        if not download:
            raise FileNotFoundError(f"enwik8 not found: pass data.data_path or put enwik8.zip at {zip_path}")
        zip_path = download_zip(work)
    return extract_zip(zip_path, work, expected_size, expected_sha256)


def load_split(raw_path: Path, split: str, total: Optional[int] = None) -> np.memmap:
    """The split's bytes as a read-only uint8 memmap view of the raw file (no copy)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    start, end = split_offsets(total)[split]
    data = np.memmap(raw_path, dtype=np.uint8, mode="r")
    if len(data) < end:
        raise ValueError(f"{raw_path} has {len(data):,} bytes, fewer than the split end {end:,}")
    return data[start:end]


def read_split_bytes(raw_path: Path, split: str, total: Optional[int] = None) -> bytes:
    return load_split(raw_path, split, total).tobytes()
