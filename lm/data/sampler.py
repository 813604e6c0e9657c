"""Deterministic training batches as a pure function of the number of samples consumed.

The stream is cut into non-overlapping windows of seq_len + 1 tokens; each epoch visits them in a
permutation seeded by (seed, epoch). Global sample g is window perm_{g // W}[g % W]. A global batch
is the next `micro * accum * dp` samples; micro-batch m of data-parallel rank r takes the slice
starting at consumed + (m * dp + r) * micro. Any world size with the same global batch sees the same
samples, and resuming from `consumed_samples` neither repeats nor skips one.
"""

from __future__ import annotations

import numpy as np
import torch

from lm.config import ConfigError


class WindowSampler:
    """Windows of seq_len + 1 tokens of one stream; `name` says which in errors (e.g. "stdlib/valid")."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, name: str = "the data split"):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ConfigError(f"{name} has {len(tokens)} tokens, fewer than one window of data.seq_len + 1 = "
                              f"{seq_len + 1}: lower data.seq_len or give more data")
        self._perm_epoch, self._perm = -1, None

    def _window(self, g: int) -> int:
        epoch, idx = divmod(g, self.n_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return int(self._perm[idx])

    def samples(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (count, seq_len) for global samples [start, start + count)."""
        L = self.seq_len
        rows = [np.asarray(self.tokens[w * L: w * L + L + 1], dtype=np.int64) for w in map(self._window, range(start, start + count))]
        block = torch.from_numpy(np.stack(rows))
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def micro_batch(self, consumed: int, micro: int, rank: int, dp: int, batch: int):
        return self.samples(consumed + (micro * dp + rank) * batch, batch)
