"""Word-level perplexity (and bytes for bits per byte) count the scored span only: the stream's first
token has no prediction, so nll_sum covers tokens[1:n] and is divided by the words / bytes of the text
after the first token, not by those of the whole split. Expected counts are worked out by hand."""

import json
import math

import numpy as np
import pytest
import torch

from evals import perplexity
from evals.perplexity import _first_token_units, first_token_units
from lm.engine import score
from lm.config import DataConfig, LongVQConfig, ModelConfig, RunConfig
from lm.model import build_model


def _run_cli(tmp_path, monkeypatch, tokens, vocab_size, n_bytes, n_words, tokenizer=None):
    """evaluate() on a `tokens` folder holding `tokens` as its test split, with a tiny untrained model."""
    folder = tmp_path / "data"
    folder.mkdir()
    arr = np.asarray(tokens, dtype=np.uint8 if vocab_size <= 256 else np.uint16)
    (folder / "test.bin").write_bytes(arr.tobytes())
    (folder / "meta.json").write_text(json.dumps({
        "dtype": arr.dtype.name, "vocab_size": vocab_size, "tokenizer": "byte" if tokenizer is None else "fake",
        "splits": {"test": {"tokens": len(arr), "bytes": n_bytes, "words": n_words}}}))
    lv = LongVQConfig(chunk_size=4, codebook_size=8, n_heads=2, z_dim=16, ema_dim=4)
    cfg = RunConfig(model=ModelConfig(arch="longvq", vocab_size=vocab_size, d_model=32, n_layers=2, longvq=lv),
                    data=DataConfig(dataset="tokens", data_path=str(folder), seq_len=8))
    model = build_model(cfg.model).double().eval()
    monkeypatch.setattr(perplexity, "load_for_eval", lambda *a, **k: (model, cfg, "tiny"))
    if tokenizer is not None:
        monkeypatch.setattr(perplexity, "_stream_tokenizer", lambda data_cfg: tokenizer)
    out = tmp_path / "ppl.json"
    assert perplexity.main(["--checkpoint", "unused", "--split", "test", "--device", "cpu", "--no-progress",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    nll = score(model, torch.tensor(list(tokens)), context=8, batch_size=8, device=torch.device("cpu")).nll_sum
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-12)
    assert result["tokens"] == len(tokens) - 1
    return result


# (text, words of the whole text, words of the scored span = the text after its first byte), by hand:
# words = whitespace-separated words + one per line (lm.data.wikitext.count_words).
BYTE_CASES = [
    # first byte "A" is a whole word: span " cat\nsat on it\n" = 4 words + 2 lines (whole text: 5 + 2)
    ("A cat\nsat on it\n", 7, 6),
    # first byte is an end-of-line: span "ab cd\n" = 2 words + 1 line (whole text: 2 + 2)
    ("\nab cd\n", 4, 3),
    # first byte only begins "The": "he" is still scored, the word stays counted (2 + 1 either way)
    ("The cat\n", 3, 3),
    # WikiText raw files begin with the blank line " \n": the leading space holds no word (3 + 2 either way)
    (" \n = Title = \n", 5, 5),
]


@pytest.mark.parametrize("text, whole_words, scored_words", BYTE_CASES)
def test_word_ppl_divides_by_the_words_of_the_scored_span(tmp_path, monkeypatch, text, whole_words, scored_words):
    data = text.encode()
    r = _run_cli(tmp_path, monkeypatch, list(data), 256, len(data), whole_words)
    assert r["words"] == scored_words
    assert r["word_ppl"] == pytest.approx(math.exp(r["nll_sum"] / scored_words), rel=1e-12)
    assert r["bytes"] == len(data) - 1  # byte level: one byte per scored token


def test_first_token_units_by_hand():
    assert first_token_units(b"A", b" cat\n") == (1, 1)  # the word "A"
    assert first_token_units(b"\n", b"ab") == (1, 1)  # an end-of-line
    assert first_token_units(b"T", b"he cat") == (1, 0)  # "The" ends in the scored span
    assert first_token_units(b"Hello world\n", b"x") == (12, 3)  # two words and their end-of-line
    assert first_token_units(b"ab ", b"") == (3, 2)  # nothing scored: all of it (1 word + 1 line)
    # only the start of the scored span is needed: the count does not depend on how much of it is given
    assert first_token_units(b"A", b" c") == first_token_units(b"A", b" cat\nsat on it\n")


class _PieceTokenizer:
    """A subword tokenizer whose decoding concatenates pieces (as the repo's sentencepiece models do)."""

    name = "fake"

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[int(i)] for i in ids)


def test_subword_stream_counts_words_and_bytes_of_the_scored_span(tmp_path, monkeypatch):
    pieces = ["", "Hi", " there", "\n", " é", "x"]  # id 0 decodes to nothing
    ids = [1, 0, 2, 3, 4, 5, 3]  # "Hi" "" " there" "\n" " é" "x" "\n"
    text = "".join(pieces[i] for i in ids)  # "Hi there\n éx\n": 3 words + 2 lines
    tok = _PieceTokenizer(pieces)
    assert _first_token_units(np.asarray(ids), tok) == (2, 1)  # "Hi" is a whole word, 2 bytes
    r = _run_cli(tmp_path, monkeypatch, ids, 300, len(text.encode()), 5, tokenizer=tok)
    assert r["words"] == 4  # " there\n éx\n": 2 words + 2 lines
    assert r["word_ppl"] == pytest.approx(math.exp(r["nll_sum"] / 4), rel=1e-12)
    assert r["bytes"] == len(" there\n éx\n".encode())  # 12 of the text's 14 bytes ("é" is 2 bytes)
    # a first piece that only begins a word ("H" of "Hi") drops nothing
    assert _first_token_units(np.asarray([0, 1]), _PieceTokenizer(["H", "i"])) == (1, 0)
