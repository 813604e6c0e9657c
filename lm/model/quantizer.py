"""Per-layer key codebook: nearest-code assignment, straight-through estimator, EMA k-means updates.

The codebook is c_sum / c_count (buffers, never optimizer parameters; docs/model.md, "Codebook learning").
Training forwards accumulate per-code statistics (counts and key sums) in `stat_count` and `stat_sum`; the
trainer sums them over data-parallel ranks and calls `apply_updates(quantizers)` (every layer's update in one
batch) once per optimizer step, so gradient accumulation and any number of replicas give the same codebook.

The update reads nothing back from the device (no host synchronisation): which step has statistics is known on
the host (a training forward ran since the last reset), the update counter has a host mirror, and dead codes
are found, sorted and re-seeded with fixed-shape tensor operations.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.ops.vq_quantize import IMPLS, accumulate_stats, vq_quantize


def code_usage_perplexity(counts: Tensor) -> tuple[Tensor, Tensor]:
    """From per-head code counts (H, S): fraction of codes used, and exp(entropy) of the code
    distribution averaged over heads."""
    probs = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    return (counts > 0).float().mean(), entropy.exp().mean()


class VectorQuantizer(nn.Module):
    def __init__(self, n_heads: int, codebook_size: int, dim: int, decay: float = 0.99, eps: float = 1e-2,
                 dead_code_threshold: float = 0.1, init: str = "random", dead_code_reseed: str = "split",
                 impl: str = "reference"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"quantizer impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl  # lm.ops.vq_quantize: reference | fused | auto
        if init not in ("random", "first_batch"):
            raise ValueError(f"codebook init must be 'random' or 'first_batch', got {init!r}")
        if dead_code_reseed not in ("split", "batch"):
            raise ValueError(f"dead_code_reseed must be 'split' or 'batch', got {dead_code_reseed!r}")
        self.dead_code_reseed = dead_code_reseed
        self.n_heads, self.codebook_size, self.dim = n_heads, codebook_size, dim
        self.decay, self.eps, self.dead_code_threshold = decay, eps, dead_code_threshold
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))
        # first_batch: the first optimizer step's update replaces the random codebook by S keys of the
        # first training micro-batch (the trainer broadcasts rank 0's sample, so replicas agree)
        self.register_buffer("initialized", torch.tensor(int(init == "random"), dtype=torch.long))
        self.init_keys = None  # (H, S, d) pending sample for the first update
        self._init_done = init == "random"  # Python mirror of `initialized`: forwards never read the buffer (sync)
        self._n_updates = 0  # Python mirror of `n_updates` (seeds the split noise without reading the buffer)
        self._stats_pending = False  # a training forward accumulated statistics since the last reset
        # dead_code_reseed="batch": the keys of the step's first training micro-batch that its codebook
        # serves worst (largest quantisation error), (H, n, d), pending for apply_update (like init_keys,
        # the trainer broadcasts rank 0's, so replicas agree)
        self.reseed_keys = None
        self.register_buffer("c_sum", torch.randn(n_heads, codebook_size, dim))
        self.register_buffer("c_count", torch.ones(n_heads, codebook_size))
        self.register_buffer("stat_sum", torch.zeros(n_heads, codebook_size, dim))
        self.register_buffer("stat_count", torch.zeros(n_heads, codebook_size))
        self.register_buffer("stat_err", torch.zeros(2))  # sum ||k - c_z||^2, sum ||k||^2 (diagnostics)
        self.batch_metrics = False  # eval forwards also report this batch's code usage / perplexity / error

    stat_names = ("stat_count", "stat_sum", "stat_err")

    @property
    def codebook(self) -> Tensor:
        """(H, S, d) float32, no gradient."""
        return (self.c_sum.float() / self.c_count.float().clamp(min=self.eps)[..., None]).detach()

    def keep_fp32(self) -> None:
        """Engines that cast the module to bf16 cast buffers too; the codebook must stay float32."""
        for name in self.stat_names + ("c_sum", "c_count"):  # n_updates is an integer
            setattr(self, name, getattr(self, name).float())

    def forward(self, k: Tensor):
        """k (B, T, H, d) -> (k_hat with straight-through gradient, codes (B, T, H), commit loss, metrics).

        metrics: the detached commitment loss, plus code usage / perplexity / relative error of this
        batch in eval mode when `batch_metrics` is set (in training the trainer reads `step_metrics()`
        over the whole step; decoding skips the extra work)."""
        B, T, H, d = k.shape
        cb = self.codebook  # (H, S, d)
        training = self.training and torch.is_grad_enabled()
        stats = (self.stat_count, self.stat_sum, self.stat_err) if training else None
        k_hat, codes, commit = vq_quantize(k, cb, stats=stats, impl=self.impl)
        if training:
            self._stats_pending = self._stats_pending or k.numel() > 0
            need_init = self.init_keys is None and self.needs_init()
            need_reseed = self.reseed_keys is None and self.dead_code_reseed == "batch" and self.dead_code_threshold > 0
            if need_init or need_reseed:  # once per optimizer step (the step's first micro-batch)
                with torch.no_grad(), torch.autocast(k.device.type, enabled=False):
                    kf = k.detach().float()
                    if need_init:
                        self.init_keys = self._sample_keys(kf)
                    if need_reseed:
                        self.reseed_keys = self._worst_served_keys(kf, self._gather(cb, codes))
        metrics = {"commit": commit.detach()}
        if self.training or not self.batch_metrics:  # training reads the step's synchronised step_metrics()
            return k_hat, codes, commit, metrics
        with torch.no_grad(), torch.autocast(k.device.type, enabled=False):
            kf, quant = k.detach().float(), self._gather(cb, codes)
            counts = torch.zeros(H, self.codebook_size, device=k.device).scatter_add_(
                1, codes.reshape(-1, H).t(), torch.ones(H, B * T, device=k.device))
            usage, perplexity = code_usage_perplexity(counts)
            metrics.update(usage=usage, perplexity=perplexity, rel_error=(kf - quant).norm() / kf.norm().clamp(min=1e-12))
        return k_hat, codes, commit, metrics

    @staticmethod
    def _gather(cb: Tensor, codes: Tensor) -> Tensor:
        """The code vectors c_z (B, T, H, d) float32."""
        H = cb.shape[0]
        return cb[torch.arange(H, device=codes.device)[None, None].expand_as(codes), codes]

    def needs_init(self) -> bool:
        """True until the first-batch initialisation happened."""
        return not self._init_done

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_done = bool(int(self.initialized))  # loaded: one read, at load time
        self._n_updates = int(self.n_updates)

    @torch.no_grad()
    def _sample_keys(self, k: Tensor) -> Tensor:
        """S keys per head, evenly spaced over the batch's positions (deterministic, no RNG)."""
        flat = k.reshape(-1, self.n_heads, self.dim)
        idx = torch.linspace(0, flat.shape[0] - 1, self.codebook_size, device=k.device).round().long()
        return flat[idx].transpose(0, 1).contiguous()  # (H, S, d)

    @torch.no_grad()
    def _worst_served_keys(self, k: Tensor, quant: Tensor) -> Tensor:
        """Per head, the min(S, N) keys with the largest quantisation error, largest first: (H, n, d)."""
        H, d = self.n_heads, self.dim
        flat = k.reshape(-1, H, d)
        err = (flat - quant.reshape(-1, H, d)).pow(2).sum(-1)  # (N, H)
        idx = err.topk(min(self.codebook_size, err.shape[0]), dim=0).indices  # (n, H)
        return flat[idx, torch.arange(H, device=k.device)[None, :]].transpose(0, 1).contiguous()

    def reset_stats(self) -> None:
        """Drop this step's statistics and pending key samples (re-seeding, first-batch initialisation: the
        next step's first micro-batch gives new ones) without updating the codebook."""
        _reset_stats([self])

    @torch.no_grad()
    def accumulate(self, k: Tensor, codes: Tensor, quant: Tensor) -> None:
        """Add a batch's statistics: k float32 (B, T, H, d), codes (B, T, H), quant = its code vectors."""
        self._stats_pending = self._stats_pending or k.numel() > 0
        accumulate_stats((self.stat_count, self.stat_sum, self.stat_err), k, codes, quant)

    @torch.no_grad()
    def step_metric_tensors(self) -> dict:
        """`step_metrics` as 0-dim device tensors (no host synchronisation)."""
        usage, perplexity = code_usage_perplexity(self.stat_count.float())
        dead = _dead_mask(self.c_count, self.dead_code_threshold)
        return {"usage": usage, "perplexity": perplexity,
                "rel_error": (self.stat_err[0] / self.stat_err[1].clamp(min=1e-12)).sqrt(),
                "dead_codes": dead.float().mean()}

    @torch.no_grad()
    def step_metrics(self) -> dict:
        """Codebook health over the statistics accumulated this step (call before apply_update), as floats: one
        device-to-host copy. Optional: nothing else reads it, so a trainer calls it on logging steps only."""
        metrics = self.step_metric_tensors()
        values = torch.stack([v.float() for v in metrics.values()]).tolist()
        return dict(zip(metrics, values))

    @torch.no_grad()
    def apply_update(self) -> None:
        """One EMA k-means step from the accumulated (already all-reduced) statistics, then reset them
        (`apply_updates([self])`).

        Whether there are statistics is the host's record of training forwards since the last reset (every
        replica of a data-parallel group runs the same forwards); nothing is read back from the device."""
        apply_updates([self])

    def _update_key(self) -> tuple | None:
        """Quantizers with equal keys take their EMA step together (apply_updates); None: no batched step
        (no statistics, or the first-batch initialisation is due)."""
        if not self._stats_pending or (self.init_keys is not None and self.needs_init()):
            return None
        reseed = self.dead_code_reseed if self.dead_code_threshold > 0 else "off"
        keys = None if self.reseed_keys is None or reseed != "batch" else (tuple(self.reseed_keys.shape), self.reseed_keys.dtype)
        return (tuple(self.c_sum.shape), self.c_sum.dtype, self.c_count.dtype, self.c_sum.device, self.decay, self.eps,
                self.dead_code_threshold, reseed, self._n_updates, keys)

    def _initialise_from_sample(self) -> None:
        """The first-batch initialisation: the pending key sample replaces the random codebook (its statistics are
        discarded)."""
        self.c_sum.copy_(self.init_keys)
        self.c_count.fill_(1.0)
        self.initialized.fill_(1)
        self._init_done = True
        self.init_keys = None
        self.reset_stats()

    @torch.no_grad()
    def reseed_dead_codes(self, keys: Tensor, enabled: Tensor | None = None) -> None:
        """Move codes whose EMA count fell below threshold * mean count onto the given keys (H, n, d),
        deadest code first onto the worst-served key (`reseed_dead_codes_`). `enabled` (a 0-dim bool tensor)
        gates the whole change."""
        reseed_dead_codes_(self.c_sum[None], self.c_count[None], keys[None], self.dead_code_threshold,
                           None if enabled is None else enabled.reshape(1))

    @torch.no_grad()
    def split_dead_codes(self) -> None:
        """Re-seed codes whose EMA count fell below threshold * mean count by splitting the most used codes
        (`split_dead_codes_`), with the noise of update count `n_updates`."""
        split_dead_codes_(self.c_sum[None], self.c_count[None], self.dead_code_threshold, self.eps, self._n_updates)


@torch.no_grad()
def apply_updates(quantizers) -> None:
    """`VectorQuantizer.apply_update()` of every quantizer: one EMA k-means step from the accumulated (already
    all-reduced) statistics, dead-code re-seeding, and a reset of the statistics.

    Quantizers of the same shape, settings and update count (every layer of a model, normally) take the step
    together on their stacked buffers: a few dozen kernel launches per optimizer step instead of a few dozen per
    layer, which kept the host busy for longer than the device needed. Per layer the result is the same as a step
    of that layer alone (tests/model/test_quantizer_batched_update.py). Reads nothing back from the device."""
    quantizers = list(quantizers)
    groups: dict[tuple, list] = {}
    resets = []
    for vq in quantizers:
        key = vq._update_key()
        if key is not None:
            groups.setdefault(key, []).append(vq)
        elif vq._stats_pending:  # first-batch initialisation (once per run)
            vq._initialise_from_sample()
        else:  # no training forward this step: nothing to apply, no pending sample kept
            resets.append(vq)
    for group in groups.values():
        _ema_step(group)
        resets += group
    if resets:
        _reset_stats(resets)


def _reset_stats(quantizers: list) -> None:
    """VectorQuantizer.reset_stats of every quantizer (the statistics zeroed in one foreach call)."""
    torch._foreach_zero_([getattr(vq, name) for vq in quantizers for name in VectorQuantizer.stat_names])
    for vq in quantizers:
        vq.reseed_keys = vq.init_keys = None
        vq._stats_pending = False


def _ema_step(group: list) -> None:
    """The EMA step of quantizers that share `_update_key()`, on their stacked buffers (L, H, S, d)."""
    first = group[0]
    c_sum = torch.stack([vq.c_sum for vq in group])
    c_count = torch.stack([vq.c_count for vq in group])
    g = first.decay
    c_sum.mul_(g).add_(torch.stack([vq.stat_sum for vq in group]), alpha=1 - g)
    c_count.mul_(g).add_(torch.stack([vq.stat_count for vq in group]), alpha=1 - g)
    torch._foreach_add_([vq.n_updates for vq in group], 1)
    for vq in group:
        vq._n_updates += 1
    if first.dead_code_threshold > 0:
        if first.dead_code_reseed == "batch":
            if first.reseed_keys is not None:  # a non-finite sample (bad micro-batch) re-seeds nothing
                keys = torch.stack([vq.reseed_keys for vq in group])
                enabled = torch.isfinite(keys).flatten(1).all(-1)
                reseed_dead_codes_(c_sum, c_count, keys, first.dead_code_threshold, enabled)
        else:
            split_dead_codes_(c_sum, c_count, first.dead_code_threshold, first.eps, first._n_updates)
    torch._foreach_copy_([vq.c_sum for vq in group] + [vq.c_count for vq in group],
                         list(c_sum.unbind(0)) + list(c_count.unbind(0)))


def _dead_mask(c_count: Tensor, threshold: float) -> Tensor:
    """Codes whose EMA count is below threshold * the mean count of their head (the last dimension)."""
    return c_count < threshold * c_count.mean(-1, keepdim=True)


@torch.no_grad()
def reseed_dead_codes_(c_sum: Tensor, c_count: Tensor, keys: Tensor, threshold: float,
                       enabled: Tensor | None = None) -> None:
    """In place on L layers' sums (L, H, S, d) and counts (L, H, S): per head, move the codes whose count fell
    below threshold * the head's mean onto the keys (L, H, n, d), deadest code first onto the first (worst-served)
    key; each gets count threshold * mean, so a code that attracts no keys in the next step is moved again.
    `enabled` (L,) bool gates each layer's change. A pure function of its inputs: replicas stay identical."""
    L, H, S, d = c_sum.shape
    sums, counts = c_sum.view(L * H, S, d), c_count.view(L * H, S)
    keys = keys.to(c_sum).reshape(L * H, -1, d)[:, :S]
    floor = threshold * counts.mean(-1, keepdim=True)  # (LH, 1)
    order = counts.argsort(dim=-1, stable=True)  # deadest first; equal counts by code index
    count = counts.gather(1, order)
    move = (count < floor) & (torch.arange(S, device=order.device) < keys.shape[1])  # (LH, S), sorted order
    if enabled is not None:
        move &= enabled.repeat_interleave(H)[:, None]
    keys = F.pad(keys, (0, 0, 0, S - keys.shape[1]))
    rows = order[..., None].expand(L * H, S, d)
    counts.scatter_(1, order, torch.where(move, floor, count))
    sums.scatter_(1, rows, torch.where(move[..., None], keys * floor[..., None], sums.gather(1, rows)))


@functools.lru_cache(maxsize=4)
def split_noise(seed: int, codebook_size: int, dim: int, device: str) -> Tensor:
    """(S, dim) noise for the split re-seeding: row j perturbs the j-th dead code of every head (and its donor),
    rows of torch.randn((S, dim)) from a CPU generator seeded with `seed` (the update count), the same for every
    head and layer of a step. Drawn on the host, so replicas on any kind of device agree, copied to `device`
    without blocking the host, and nothing is read back from the device. Memoised: quantizers updated apart
    share the table of a step (a pure function of its arguments)."""
    table = torch.randn((codebook_size, dim), generator=torch.Generator(device="cpu").manual_seed(seed))
    if device == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def split_dead_codes_(c_sum: Tensor, c_count: Tensor, threshold: float, eps: float, seed: int) -> None:
    """In place on L layers' sums (L, H, S, d) and counts (L, H, S): re-seed the codes whose count fell below
    threshold * the head's mean by splitting the most used codes (LBG-style: a copy plus a small perturbation, the
    count shared between the two). Per head, the j-th dead code (by index) and the j-th most used code split the
    j-th most used code. A pure function of the buffers and `seed` (the update count): every data-parallel replica
    makes the same change without communicating."""
    L, H, S, d = c_sum.shape
    sums, counts = c_sum.view(L * H, S, d), c_count.view(L * H, S)
    dead = _dead_mask(counts, threshold)
    n_dead = dead.sum(-1)  # (LH,)
    listed = torch.arange(S, device=dead.device)[None] < n_dead[:, None]  # (LH, S) list positions in use
    dead_idx = (~dead).to(torch.uint8).argsort(dim=-1, stable=True)  # dead codes first, by index
    donors = counts.argsort(dim=-1, descending=True)
    count = counts.gather(1, donors)
    centers = sums.gather(1, donors[..., None].expand(L * H, S, d)) / count.clamp(min=eps)[..., None]
    scale = centers.pow(2).mean(-1, keepdim=True).sqrt()
    noise = split_noise(seed, S, d, str(sums.device)).to(centers) * 0.05 * scale  # (LH, S, d)
    half = count / 2
    # write through one spare slot (index S) that takes the unused list positions
    padded_count = F.pad(counts, (0, 1))
    padded_sum = F.pad(sums, (0, 0, 0, 1))
    for idx, word in ((donors, centers - noise), (dead_idx, centers + noise)):  # donors first: a code in
        idx = torch.where(listed, idx, S)  # both lists ends up as a dead code's copy
        padded_count.scatter_(1, idx, half)
        padded_sum.scatter_(1, idx[..., None].expand(L * H, S, d), word * half[..., None])
    counts.copy_(padded_count[:, :S])
    sums.copy_(padded_sum[:, :S])
