"""Bad input gets a clear error that names the fix (files the tests write themselves)."""

import json

import numpy as np
import pytest

from lm.config import DataConfig
from lm.data import load_stream
from lm.data.tokenizer import load_tokenizer


def test_unknown_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.model not found.*'byte' or the path of a \.model"):
        load_tokenizer(str(tmp_path / "nope.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match=r"junk\.model is not a sentencepiece model"):
        load_tokenizer(str(junk))


def test_truncated_token_shard_is_refused(tmp_path):
    (tmp_path / "train.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    (tmp_path / "meta.json").write_text(json.dumps(
        {"dtype": "uint16", "vocab_size": 1000, "splits": {"train": {"tokens": 100, "bytes": 400}}}))
    cfg = DataConfig(dataset="tokens", data_path=str(tmp_path))
    assert len(load_stream(cfg, "train")) == 100
    (tmp_path / "train.bin").write_bytes(np.arange(60, dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match=r"truncated or corrupt; re-run tokenizers/encode_corpus.py"):
        load_stream(cfg, "train")


def test_missing_data_paths_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="data.data_path=FOLDER"):
        load_stream(DataConfig(dataset="tokens"), "train")
    with pytest.raises(FileNotFoundError, match="encode the corpus first"):
        load_stream(DataConfig(dataset="tokens", data_path=str(tmp_path)), "valid")
