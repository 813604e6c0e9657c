"""WikiText-103 sources (raw folder, hub parquet, zip) give identical text, tokens and word counts."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lm.config import DataConfig
from lm.data import load_stream, wikitext
from tests.data.wikitext_fixture import make_splits

SPLITS = ("train", "valid", "test")


def write_raw(folder: Path, texts: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (folder / f"wiki.{split}.raw").write_bytes(text.encode("utf-8"))
    return folder


def write_zip(path: Path, texts: dict) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("wikitext-103-raw/", "")
        for split, text in texts.items():
            zf.writestr(f"wikitext-103-raw/wiki.{split}.raw", text.encode("utf-8"))
    return path


def write_parquet(root: Path, texts: dict, shards: int = 2) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = root / wikitext.HUB_CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        rows = wikitext.text_to_rows(text)
        assert "" in rows and all(r == "" or r.endswith("\n") for r in rows)
        n = shards if split == "train" else 1
        step = -(-len(rows) // n)
        for k in range(n):
            table = pa.table({"text": rows[k * step:(k + 1) * step]})
            pq.write_table(table, folder / f"{wikitext.HUB_SPLIT[split]}-{k:05d}-of-{n:05d}.parquet")
    return root


def test_word_count_handmade():
    text = " \n = Title = \n \n Hello world , foo @-@ bar . \n"
    # lines: " " -> 0+1, " = Title = " -> 3+1, " " -> 0+1, " Hello world , foo @-@ bar . " -> 7+1
    assert wikitext.count_words(text) == 14
    assert wikitext.count_words(text.rstrip("\n")) == 14  # a last line without "\n" still counts one end-of-line
    assert wikitext.count_words("") == 0
    assert wikitext.count_words(" a  b\tc \n\n") == 3 + 1 + 1
    # chunked counting equals the one-shot rule
    big = text * 50
    assert wikitext.count_words(big, chunk_chars=7) == len(big.split()) + big.count("\n") == 14 * 50


def test_rows_round_trip():
    text = make_splits()["test"]
    rows = wikitext.text_to_rows(text)
    assert len(rows) == text.count("\n")
    assert wikitext.rows_to_text(rows) == text


def test_formats_identical(tmp_path):
    texts = make_splits()
    raw = write_raw(tmp_path / "raw", texts)
    sub = write_raw(tmp_path / "nested" / wikitext.RAW_SUBDIR, texts).parent
    zpath = write_zip(tmp_path / wikitext.ZIP_NAME, texts)
    zdir = tmp_path / "zipdir"
    zdir.mkdir()
    write_zip(zdir / wikitext.ZIP_NAME, texts)
    paths = {"raw": raw, "raw-subfolder": sub, "zip": zpath, "zip-folder": zdir}
    try:
        paths["parquet"] = write_parquet(tmp_path / "hub", texts)
    except pytest.skip.Exception:
        pass
    kinds = {name: wikitext.locate(str(p)).kind for name, p in paths.items()}
    assert kinds["raw"] == kinds["raw-subfolder"] == "raw" and kinds["zip"] == kinds["zip-folder"] == "zip"
    for split in SPLITS:
        expected_tokens = np.frombuffer(texts[split].encode("utf-8"), dtype=np.uint8)
        for name, path in paths.items():
            assert wikitext.read_split(wikitext.locate(str(path)), split) == texts[split], (name, split)
            cfg = DataConfig(dataset="wikitext103", data_path=str(path), cache_dir=str(tmp_path / "cache"))
            stream = load_stream(cfg, split)
            assert stream.vocab_size == 256
            assert np.array_equal(np.asarray(stream.tokens), expected_tokens), (name, split)
            assert stream.n_bytes == len(texts[split].encode("utf-8"))
            assert stream.n_words == wikitext.count_words(texts[split])


def test_parquet_formats_and_shards(tmp_path):
    texts = make_splits()
    root = write_parquet(tmp_path / "hub", texts, shards=3)
    cfg_folder = root / wikitext.HUB_CONFIG
    for p in (root, cfg_folder, next(cfg_folder.glob("test-*.parquet"))):
        assert wikitext.read_split(wikitext.locate(str(p)), "test") == texts["test"]
    assert wikitext.read_split(wikitext.locate(str(root)), "train") == texts["train"]
    next(cfg_folder.glob("train-00001-*.parquet")).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        wikitext.read_split(wikitext.locate(str(root)), "train")


def test_cache_reused_and_invalidated(tmp_path):
    texts = make_splits()
    raw = write_raw(tmp_path / "raw", texts)
    cfg = DataConfig(dataset="wikitext103", data_path=str(raw), cache_dir=str(tmp_path / "cache"))
    a = load_stream(cfg, "test")
    assert len(list((tmp_path / "cache").glob("*/test.json"))) == 1
    b = load_stream(cfg, "test")
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not list((tmp_path / "cache").rglob("*.tmp*"))
    (raw / "wiki.test.raw").write_bytes((texts["test"] + " extra words \n").encode())
    c = load_stream(cfg, "test")
    assert c.n_words == a.n_words + 3


def test_missing_and_wrong_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="WikiText-103 not found"):
        wikitext.locate(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="wiki"):
        wikitext.locate(str(tmp_path / "empty"))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "wiki.test.tokens").write_text(" = A = \n")
    with pytest.raises(FileNotFoundError, match="<unk>"):
        wikitext.locate(str(tok))


def test_hub_without_datasets_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    cfg = DataConfig(dataset="wikitext103", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="data.data_path"):
        load_stream(cfg, "test")
