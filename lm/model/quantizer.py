"""Per-layer key codebook: nearest-code assignment, straight-through estimator, EMA k-means updates.

The codebook is c_sum / c_count (buffers, never optimizer parameters; docs/model.md, "Codebook learning").
Training forwards accumulate per-code statistics (counts and key sums) in `stat_count` and `stat_sum`; the
trainer sums them over data-parallel ranks and calls `apply_update()` once per optimizer step, so gradient
accumulation and any number of replicas give the same codebook.

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


@functools.lru_cache(maxsize=4)
def _normal_rows(seed: int, rows: int, dim: int, device: str) -> Tensor:
    """torch.randn((rows, dim)) from a CPU generator seeded with `seed`, on `device` (copied without blocking
    the host). Memoised: every layer of a step draws the same table (a pure function of its arguments)."""
    table = torch.randn((rows, dim), generator=torch.Generator(device="cpu").manual_seed(seed))
    if device == "cpu":
        return table
    return table.pin_memory().to(device, non_blocking=True)


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
        for name in self.stat_names:
            getattr(self, name).zero_()
        self.reseed_keys = None
        self.init_keys = None
        self._stats_pending = False

    @torch.no_grad()
    def accumulate(self, k: Tensor, codes: Tensor, quant: Tensor) -> None:
        """Add a batch's statistics: k float32 (B, T, H, d), codes (B, T, H), quant = its code vectors."""
        self._stats_pending = self._stats_pending or k.numel() > 0
        accumulate_stats((self.stat_count, self.stat_sum, self.stat_err), k, codes, quant)

    @torch.no_grad()
    def step_metric_tensors(self) -> dict:
        """`step_metrics` as 0-dim device tensors (no host synchronisation)."""
        usage, perplexity = code_usage_perplexity(self.stat_count.float())
        dead = self.c_count < self.dead_code_threshold * self.c_count.mean(-1, keepdim=True)
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
        """One EMA k-means step from the accumulated (already all-reduced) statistics, then reset them.

        Whether there are statistics is the host's record of training forwards since the last reset (every
        replica of a data-parallel group runs the same forwards); nothing is read back from the device."""
        if not self._stats_pending:
            self.reset_stats()  # no training forward this step: nothing to apply, no pending sample kept
            return
        if self.init_keys is not None and self.needs_init():
            self.c_sum.copy_(self.init_keys)  # statistics of the random codebook are discarded
            self.c_count.fill_(1.0)
            self.initialized.fill_(1)
            self._init_done = True
            self.init_keys = None
            self.reset_stats()
            return
        g = self.decay
        self.c_sum.mul_(g).add_(self.stat_sum, alpha=1 - g)
        self.c_count.mul_(g).add_(self.stat_count, alpha=1 - g)
        reseed_keys = self.reseed_keys
        self.reset_stats()
        self.n_updates += 1
        self._n_updates += 1
        if self.dead_code_threshold > 0:
            if self.dead_code_reseed == "batch":
                if reseed_keys is not None:  # a non-finite sample (bad micro-batch) re-seeds nothing
                    self.reseed_dead_codes(reseed_keys, enabled=torch.isfinite(reseed_keys).all())
            else:
                self.split_dead_codes()

    def _dead(self) -> Tensor:
        """(H, S) codes whose EMA count is below threshold * the head's mean count."""
        return self.c_count < self.dead_code_threshold * self.c_count.mean(-1, keepdim=True)

    @torch.no_grad()
    def reseed_dead_codes(self, keys: Tensor, enabled: Tensor | None = None) -> None:
        """Move codes whose EMA count fell below threshold * mean count onto the given keys (H, n, d),
        deadest code first onto the worst-served key; each gets count threshold * mean, so a code that
        attracts no keys in the next step is moved again. A pure function of the (synchronised)
        buffers and keys: replicas stay identical. `enabled` (a 0-dim bool tensor) gates the whole change."""
        H, S, d = self.c_sum.shape
        keys = keys.to(self.c_sum)[:, :S]
        floor = self.dead_code_threshold * self.c_count.mean(-1, keepdim=True)  # (H, 1)
        order = self.c_count.argsort(dim=-1, stable=True)  # deadest first; equal counts by code index
        count = self.c_count.gather(1, order)
        move = (count < floor) & (torch.arange(S, device=order.device) < keys.shape[1])  # (H, S), sorted order
        if enabled is not None:
            move &= enabled
        keys = F.pad(keys, (0, 0, 0, S - keys.shape[1]))
        rows = order[..., None].expand(H, S, d)
        self.c_count.scatter_(1, order, torch.where(move, floor, count))
        self.c_sum.scatter_(1, rows, torch.where(move[..., None], keys * floor[..., None], self.c_sum.gather(1, rows)))

    def _split_noise(self, n_dead: Tensor) -> Tensor:
        """(H, S, d): row j of head h is the noise of that head's j-th dead code, i.e. row j of
        torch.randn((n_h, d)) drawn head after head (heads without dead codes draw nothing) from one CPU
        generator seeded with the update count. With d a multiple of 16 these draws are the consecutive rows of
        one (H S, d) draw (CPU randn fills blocks of 16 values), so the per-head counts stay on the device;
        other widths read them (a host synchronisation on CUDA)."""
        H, S, d = self.c_sum.shape
        dev = self.c_sum.device
        if d % 16 == 0:
            table = _normal_rows(self._n_updates, H * S, d, str(dev))
        else:
            gen = torch.Generator(device="cpu").manual_seed(self._n_updates)
            draws = [torch.randn((n, d), generator=gen) for n in n_dead.tolist() if n > 0]
            table = torch.cat(draws + [torch.zeros(H * S - sum(len(t) for t in draws), d)]).to(dev)
        first = torch.cumsum(n_dead, 0) - n_dead  # (H,) rows drawn by the heads before
        idx = (first[:, None] + torch.arange(S, device=dev)[None]).clamp(max=H * S - 1)
        return table[idx]

    @torch.no_grad()
    def split_dead_codes(self) -> None:
        """Re-seed codes whose EMA count fell below threshold * mean count by splitting the most used
        codes (LBG-style: a copy plus a small perturbation, the count shared between the two).
        A pure function of the synchronised buffers and the update counter, so every data-parallel
        replica makes the same change without communicating. Per head, the j-th dead code (by index) and the
        j-th most used code split the j-th most used code."""
        H, S, d = self.c_sum.shape
        dead = self._dead()
        n_dead = dead.sum(-1)  # (H,)
        listed = torch.arange(S, device=dead.device)[None] < n_dead[:, None]  # (H, S) list positions in use
        dead_idx = (~dead).to(torch.uint8).argsort(dim=-1, stable=True)  # dead codes first, by index
        donors = self.c_count.argsort(dim=-1, descending=True)
        count = self.c_count.gather(1, donors)
        centers = self.c_sum.gather(1, donors[..., None].expand(H, S, d)) / count.clamp(min=self.eps)[..., None]
        scale = centers.pow(2).mean(-1, keepdim=True).sqrt()
        noise = self._split_noise(n_dead).to(centers) * 0.05 * scale
        half = count / 2
        # write through one spare slot (index S) that takes the unused list positions
        c_count = F.pad(self.c_count, (0, 1))
        c_sum = F.pad(self.c_sum, (0, 0, 0, 1))
        for idx, word in ((donors, centers - noise), (dead_idx, centers + noise)):  # donors first: a code in
            idx = torch.where(listed, idx, S)  # both lists ends up as a dead code's copy
            c_count.scatter_(1, idx, half)
            c_sum.scatter_(1, idx[..., None].expand(H, S, d), word * half[..., None])
        self.c_count.copy_(c_count[:, :S])
        self.c_sum.copy_(c_sum[:, :S])
