"""sentencepiece train -> encode -> decode, encode_corpus shards read back by load_stream, the CLIs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm.config import DataConfig, load_config
from lm.data import load_stream, wikitext
from lm.data.tokenizer import ByteTokenizer, encode_text, load_tokenizer
from tests.data.wikitext_fixture import make_splits

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("sentencepiece")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", ROOT / "tokenizers" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("wt")
    texts = make_splits()
    for split, text in texts.items():
        (root / f"wiki.{split}.raw").write_text(text, encoding="utf-8")
    return root, texts


@pytest.fixture(scope="module")
def spm_model(corpus, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("spm") / "tiny"
    train = _script("train_sentencepiece")
    rc = train.main(["--dataset", "wikitext103", "--data-path", str(root), "--vocab-size", "320",
                     "--soft-vocab-limit", "--out", str(out), "--no-progress",
                     "--cache-dir", str(tmp_path_factory.mktemp("cache"))])
    assert rc == 0
    assert Path(f"{out}.model").is_file() and Path(f"{out}.vocab").is_file()
    return f"{out}.model"


def test_tokenizers_folder_is_not_a_package():
    assert not (ROOT / "tokenizers" / "__init__.py").exists()


def test_config_tokenizer_field(spm_model):
    cfg = load_config(ROOT / "launch" / "configs" / "quickstart.yaml", overrides=[f"data.tokenizer={spm_model}"])
    assert cfg.data.tokenizer == spm_model
    assert DataConfig().tokenizer == "byte"


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_round_trip(corpus, tmp_path, model_type):
    root, texts = corpus
    text_file = tmp_path / "train.txt"
    text_file.write_text(texts["train"], encoding="utf-8")
    out = tmp_path / model_type
    rc = _script("train_sentencepiece").main(["--text", str(text_file), "--vocab-size", "400", "--soft-vocab-limit",
                                              "--model-type", model_type, "--out", str(out), "--no-progress"])
    assert rc == 0
    tok = load_tokenizer(f"{out}.model")
    assert tok.vocab_size <= 400
    for text in (texts["test"], " = Unseen ☃ zebra 𝄞 = \n\n  two  spaces\tand tab\n", ""):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode(texts["test"])) < len(texts["test"].encode("utf-8"))  # it actually merges


def test_chunked_parallel_encoding_is_deterministic(corpus, spm_model):
    _, texts = corpus
    tok = load_tokenizer(spm_model)
    one = encode_text(texts["train"], tok, workers=1, chunk_chars=300)
    two = encode_text(texts["train"], tok, workers=2, chunk_chars=300)
    assert np.array_equal(one, two) and one.dtype == np.uint16
    assert tok.decode(one) == texts["train"]


def test_byte_tokenizer():
    tok = ByteTokenizer()
    ids = tok.encode("héllo\n")
    assert tok.vocab_size == 256 and ids.dtype == np.uint8 and len(ids) == 7 and tok.decode(ids) == "héllo\n"


def test_encode_corpus_shards_read_back(corpus, spm_model, tmp_path, capsys):
    root, texts = corpus
    out = tmp_path / "shards"
    enc = _script("encode_corpus")
    args = ["--dataset", "wikitext103", "--data-path", str(root), "--tokenizer", spm_model, "--out", str(out),
            "--workers", "2", "--chunk-chars", "500", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert enc.main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == spm_model and set(meta["splits"]) == {"train", "valid", "test"}
    tok = load_tokenizer(spm_model)
    for split, text in texts.items():
        stream = load_stream(DataConfig(dataset="tokens", data_path=str(out)), split)
        assert stream.vocab_size == tok.vocab_size
        assert stream.n_bytes == len(text.encode("utf-8"))
        assert stream.n_words == wikitext.count_words(text)
        assert tok.decode(np.asarray(stream.tokens)) == text
        # the same tokens as preparing the dataset on the fly with data.tokenizer
        direct = load_stream(DataConfig(dataset="wikitext103", data_path=str(root), tokenizer=spm_model,
                                        cache_dir=str(tmp_path / "cache")), split)
        assert np.array_equal(np.asarray(direct.tokens), np.asarray(stream.tokens))
        assert direct.n_words == stream.n_words and direct.n_bytes == stream.n_bytes
    # resumable: a second run skips complete splits and redoes a damaged one
    mtime = (out / "train.bin").stat().st_mtime_ns
    (out / "test.bin").write_bytes(b"\0\0")
    capsys.readouterr()
    assert enc.main(args) == 0
    log = capsys.readouterr().out
    assert "train: already complete" in log and "test: already complete" not in log
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    assert load_stream(DataConfig(dataset="tokens", data_path=str(out)), "test").n_words == wikitext.count_words(texts["test"])
    # another tokenizer into the same folder is refused
    assert enc.main(args[:4] + ["--tokenizer", "byte"] + args[6:]) == 2


def test_encode_corpus_runs_as_a_script(corpus, tmp_path):
    root, texts = corpus
    out = tmp_path / "bytes"
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "tokenizers" / "encode_corpus.py"), "--text",
                           f"test={root / 'wiki.test.raw'}", "--count-words", "--out", str(out), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stream = load_stream(DataConfig(dataset="tokens", data_path=str(out)), "test")
    assert stream.vocab_size == 256 and np.asarray(stream.tokens).tobytes() == texts["test"].encode("utf-8")
    assert stream.n_words == wikitext.count_words(texts["test"])
