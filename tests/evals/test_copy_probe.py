"""evals.copy_probe: the task is what it says (period-P repeats), variants parse, and a Transformer learns a
short copy within a few dozen steps (the probe can tell retrieval from chance)."""

import argparse
import json

import pytest
import torch

from evals import copy_probe as cp


def test_batches_repeat_with_the_period():
    x, y = cp._batch(torch.Generator().manual_seed(0), 3, 40, 7)
    assert x.shape == y.shape == (3, 40)
    assert torch.equal(x[:, 7:], x[:, :-7]) and torch.equal(y[:, :-1], x[:, 1:])


def test_variant_sets_longvq_keys_and_refuses_unknown_ones():
    args = argparse.Namespace(chunk_size=8, codebook_size=16)
    cfg = cp._config("longvq+local_raw_keys=true+codebook_decay=0.9", args)
    assert cfg.longvq.local_raw_keys is True and cfg.longvq.codebook_decay == 0.9 and cfg.longvq.chunk_size == 8
    with pytest.raises(ValueError, match="unknown"):
        cp._config("longvq+nope=1", args)
    with pytest.raises(ValueError, match="must start"):
        cp._config("rnn", args)


def test_transformer_learns_a_short_copy(tmp_path):
    out = tmp_path / "p.json"
    assert cp.main(["--period", "4", "--context", "32", "--steps", "150", "--variants", "transformer",
                    "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["repeat_loss"] < 0.5 * row["chance"] < row["first_period_loss"] + 0.5
