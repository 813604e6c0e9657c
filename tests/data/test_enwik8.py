"""enwik8: split offsets, layouts (raw file, zip, folder), checksum refusal, offline message."""

from __future__ import annotations

import hashlib
import urllib.error
import zipfile

import numpy as np
import pytest

from lm.config import DataConfig
from lm.data import enwik8, load_stream

SIZE = 2_000


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """A 2,000-byte stand-in for enwik8; the module's expected size/hash are patched to match it."""
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    raw = tmp_path / "src" / "enwik8"
    raw.parent.mkdir()
    raw.write_bytes(data)
    monkeypatch.setattr(enwik8, "ENWIK8_SIZE", SIZE)
    monkeypatch.setattr(enwik8, "ENWIK8_SHA256", hashlib.sha256(data).hexdigest())
    return raw, data


def test_standard_offsets():
    assert enwik8.split_offsets() == {"train": (0, 90_000_000), "valid": (90_000_000, 95_000_000),
                                      "test": (95_000_000, 100_000_000)}
    assert enwik8.split_offsets(SIZE) == {"train": (0, 1800), "valid": (1800, 1900), "test": (1900, 2000)}


def test_split_bytes_exact(tmp_path):
    data = bytes(range(256)) * 8  # 2,048 bytes: held-out 102 bytes each
    raw = tmp_path / "enwik8"
    raw.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    path = enwik8.prepare(str(raw), tmp_path / "cache", expected_size=len(data), expected_sha256=sha)
    parts = {s: enwik8.load_split(path, s, total=len(data)) for s in enwik8.SPLITS}
    assert [len(parts[s]) for s in enwik8.SPLITS] == [1844, 102, 102]
    assert b"".join(parts[s].tobytes() for s in enwik8.SPLITS) == data
    assert parts["valid"].tobytes() == data[1844:1946] and parts["test"].tobytes() == data[1946:]


def test_layouts_and_load_stream(synthetic, tmp_path):
    raw, data = synthetic
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", data)
    zdir = tmp_path / "zdir"
    zdir.mkdir()
    (tmp_path / "enwik8.zip").rename(zdir / "enwik8.zip")
    for path in (raw, raw.parent, zdir / "enwik8.zip", zdir):
        for split, (a, b) in enwik8.split_offsets(SIZE).items():
            cfg = DataConfig(dataset="enwik8", data_path=str(path), cache_dir=str(tmp_path / "cache"))
            stream = load_stream(cfg, split)
            assert stream.vocab_size == 256 and stream.n_words is None
            assert stream.n_bytes == len(stream) == b - a
            assert np.asarray(stream.tokens).tobytes() == data[a:b], (path, split)
    # the zip was extracted once into the cache, atomically
    assert len([p for p in (tmp_path / "cache").rglob("enwik8") if p.is_file()]) == 1
    assert not list((tmp_path / "cache").rglob("*.tmp*"))


def test_wrong_size_refused(synthetic, tmp_path):
    raw, data = synthetic
    bad = tmp_path / "short"
    bad.write_bytes(data[:-1])
    with pytest.raises(enwik8.ChecksumError, match=r"expected 2,000 bytes, found 1,999 bytes"):
        enwik8.prepare(str(bad), tmp_path / "cache")


def test_wrong_checksum_refused(synthetic, tmp_path):
    raw, data = synthetic
    bad = tmp_path / "flipped"
    bad.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    found = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"expected sha256 {enwik8.ENWIK8_SHA256}, found {found}"):
        load_stream(DataConfig(dataset="enwik8", data_path=str(bad), cache_dir=str(tmp_path / "cache")), "test")
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.writestr("enwik8", bad.read_bytes())
    with pytest.raises(enwik8.ChecksumError, match="expected sha256"):
        enwik8.prepare(str(tmp_path / "bad.zip"), tmp_path / "cache")
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name.startswith("enwik8")]
    assert not left  # nothing unverified left behind


def test_real_defaults_refuse_other_files(tmp_path):
    f = tmp_path / "enwik8"
    f.write_bytes(b"not enwik8")
    with pytest.raises(enwik8.ChecksumError, match="expected 100,000,000 bytes, found 10 bytes"):
        enwik8.prepare(str(f), tmp_path / "cache")


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(enwik8.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as info:
        load_stream(DataConfig(dataset="enwik8", cache_dir=str(tmp_path / "cache")), "test")
    msg = str(info.value)
    assert enwik8.ZIP_URL in msg and "data.data_path" in msg and str(tmp_path / "cache" / "enwik8" / "enwik8.zip") in msg
