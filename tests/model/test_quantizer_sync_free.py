"""The codebook update without host synchronisation is bit-for-bit the algorithm it replaced, and so is the
quantizer's reference forward (now lm/ops/vq_quantize.py).

`OldUpdate` below is a frozen copy of the old forward and the per-head update (host reads of the statistics, `nonzero`, per-head
loops). Both run from the same buffers through forwards on random keys, injected random statistics (dead codes
included), the first-batch initialisation, batch re-seeding (also with a non-finite sample) and steps without
statistics; every buffer must be equal bit for bit after every update. A dispatch mode shows that the new
update reads nothing back from the device (no `.item()` / `float()` / `bool()` / `nonzero`)."""

from __future__ import annotations

import pytest
import torch

from lm.model.quantizer import VectorQuantizer
from tests.host_reads import NoHostReads

BUFFERS = ("c_sum", "c_count", "n_updates", "initialized", "stat_count", "stat_sum", "stat_err")


class OldUpdate(VectorQuantizer):
    """The forward and the update as they were before the update became sync-free and the assignment moved to
    lm/ops/vq_quantize.py (frozen copy: edit only where the contract changed, as the split noise did)."""

    def forward(self, k):
        B, T, H, d = k.shape
        cb = self.codebook
        with torch.no_grad(), torch.autocast(k.device.type, enabled=False):
            kf = k.detach().float()
            scores = cb.pow(2).sum(-1)[None, None] - 2 * torch.einsum("bthd,hsd->bths", kf, cb)
            codes = scores.argmin(dim=-1)
        head = torch.arange(H, device=k.device)[None, None].expand(B, T, H)
        quant = cb[head, codes]
        k_hat = k + (quant.to(k.dtype) - k).detach()
        commit = (k.float() - quant).pow(2).sum(-1).mean()
        if self.training and torch.is_grad_enabled():
            with torch.autocast(k.device.type, enabled=False):
                self.old_accumulate(kf, codes, quant)
                if self.init_keys is None and self.needs_init():
                    self.init_keys = self._sample_keys(kf)
                if self.reseed_keys is None and self.dead_code_reseed == "batch" and self.dead_code_threshold > 0:
                    self.reseed_keys = self._worst_served_keys(kf, quant)
        return k_hat, codes, commit, {"commit": commit.detach()}

    @torch.no_grad()
    def old_accumulate(self, k, codes, quant):
        H = self.n_heads
        self.stat_err[0] += (k - quant).pow(2).sum().to(self.stat_err.dtype)
        self.stat_err[1] += k.pow(2).sum().to(self.stat_err.dtype)
        flat_codes = codes.reshape(-1, H).t()
        flat_k = k.reshape(-1, H, self.dim).transpose(0, 1)
        self.stat_count.scatter_add_(1, flat_codes, torch.ones_like(flat_codes, dtype=self.stat_count.dtype))
        self.stat_sum.scatter_add_(1, flat_codes[..., None].expand(-1, -1, self.dim), flat_k.to(self.stat_sum.dtype))

    @torch.no_grad()
    def apply_update(self) -> None:
        if float(self.stat_count.sum()) == 0.0:
            self.reset_stats()
            return
        if self.init_keys is not None and self.needs_init():
            self.c_sum.copy_(self.init_keys)
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
        if self.dead_code_threshold > 0:
            if self.dead_code_reseed == "batch":
                if reseed_keys is not None and bool(torch.isfinite(reseed_keys).all()):
                    self.reseed_dead_codes(reseed_keys)
            else:
                self.split_dead_codes()

    @torch.no_grad()
    def reseed_dead_codes(self, keys, enabled=None) -> None:
        keys = keys.to(self.c_sum)
        for h in range(self.n_heads):
            count = self.c_count[h]
            floor = self.dead_code_threshold * count.mean()
            dead = (count < floor).nonzero().flatten()
            dead = dead[count[dead].argsort(stable=True)][: keys.shape[1]]
            if dead.numel() == 0:
                continue
            self.c_count[h, dead] = floor
            self.c_sum[h, dead] = keys[h, : dead.numel()] * floor

    @torch.no_grad()
    def split_dead_codes(self) -> None:
        # the noise source is the current definition (row j of one (S, d) draw for every head's j-th dead code);
        # the loop, the host reads and the indexing are the old algorithm's
        table = torch.randn((self.codebook_size, self.dim), generator=torch.Generator().manual_seed(int(self.n_updates)))
        for h in range(self.n_heads):
            count = self.c_count[h]
            dead = (count < self.dead_code_threshold * count.mean()).nonzero().flatten()
            if dead.numel() == 0:
                continue
            donors = count.argsort(descending=True)[: dead.numel()]
            centers = self.c_sum[h, donors] / count[donors].clamp(min=self.eps)[:, None]
            scale = centers.pow(2).mean(-1, keepdim=True).sqrt()
            noise = table[: dead.numel()].to(centers) * 0.05 * scale
            half = count[donors] / 2
            self.c_count[h, donors] = half
            self.c_sum[h, donors] = (centers - noise) * half[:, None]
            self.c_count[h, dead] = half
            self.c_sum[h, dead] = (centers + noise) * half[:, None]


def pair(**kw):
    torch.manual_seed(0)
    new = VectorQuantizer(**kw).train()
    old = OldUpdate(**kw).train()
    old.load_state_dict(new.state_dict())
    return new, old


def assert_same(new, old, where):
    for name in BUFFERS:
        a, b = getattr(new, name), getattr(old, name)
        assert torch.isfinite(a.float()).all(), f"{where}: {name} not finite"
        assert torch.equal(a, b), f"{where}: {name} differs (max {(a.double() - b.double()).abs().max():.3e})"
    assert new.needs_init() == old.needs_init(), where


def inject_random_stats(vqs, gen, H, S, d):
    """Random statistics after a forward: many zero counts (dead codes), a few heavy ones."""
    count = torch.randint(0, 6, (H, S), generator=gen).float() * (torch.rand(H, S, generator=gen) < 0.4)
    count[:, 0] += 50.0
    total = torch.randn(H, S, d, generator=gen) * count[..., None]
    for vq in vqs:
        vq.stat_count.copy_(count)
        vq.stat_sum.copy_(total)


@pytest.mark.parametrize("reseed", ["split", "batch"])
@pytest.mark.parametrize("dim", [4, 16])
@pytest.mark.parametrize("init", ["random", "first_batch"])
def test_update_is_bit_identical_to_the_old_algorithm(reseed, dim, init):
    H, S = 3, 24
    new, old = pair(n_heads=H, codebook_size=S, dim=dim, decay=0.9, dead_code_threshold=0.3, init=init,
                    dead_code_reseed=reseed)
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(4, H, dim, generator=gen) * 3.0
    reseeded = 0
    for step in range(20):
        kind = step % 5
        if kind == 3:  # a step without any training forward: nothing changes
            pass
        else:
            for micro in range(2):
                k = centres[torch.randint(0, 4, (2, 9), generator=gen)] + 0.2 * torch.randn(2, 9, H, dim, generator=gen)
                outs = []
                for vq in (new, old):
                    leaf = k.clone().requires_grad_()
                    k_hat, codes, commit, _ = vq(leaf)
                    (grad,) = torch.autograd.grad((k_hat * k).sum() + commit, leaf)
                    outs.append((k_hat, codes, commit, grad))
                for name, a, b in zip(("k_hat", "codes", "commit", "grad"), *outs):
                    assert torch.equal(a, b), f"step {step}: forward {name} differs"
            if kind == 1:
                inject_random_stats((new, old), gen, H, S, dim)
            if kind == 4 and new.reseed_keys is not None:  # a non-finite re-seeding sample: nothing is re-seeded
                for vq in (new, old):
                    vq.reseed_keys = vq.reseed_keys.clone()
                    vq.reseed_keys[0, 0, 0] = float("nan")
        if kind != 3 and not new.needs_init():  # counts after this EMA step: the codes about to be re-seeded
            ema_count = new.c_count * new.decay + new.stat_count * (1 - new.decay)
            reseeded += int((ema_count < 0.3 * ema_count.mean(-1, keepdim=True)).any())
        new.apply_update()
        old.apply_update()
        assert_same(new, old, f"step {step}")
    assert reseeded >= 4  # the dead-code paths really ran
    assert int(new.n_updates) > 5
    assert int(new.initialized) == 1 and not new.needs_init()
    assert new._n_updates == int(new.n_updates)


@pytest.mark.parametrize("dim", [4, 16])
def test_split_and_reseed_many_dead_codes_bit_identical(dim):
    """Direct calls on random buffers where most codes are dead (more dead codes than live ones: a code can be a
    donor and dead at once) and equal counts (ties in the sorts)."""
    H, S = 4, 32
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        new, old = pair(n_heads=H, codebook_size=S, dim=dim, dead_code_threshold=0.6)
        count = torch.rand(H, S, generator=gen) * (torch.rand(H, S, generator=gen) < 0.3) * 10
        count[:, 5:9] = 2.5  # ties
        words = torch.randn(H, S, dim, generator=gen)
        keys = torch.randn(H, S // 2 + seed, dim, generator=gen)
        for vq in (new, old):
            vq.c_count.copy_(count)
            vq.c_sum.copy_(words * count[..., None])
            vq.n_updates.fill_(seed + 3)
            vq._n_updates = seed + 3
        new.split_dead_codes()
        old.split_dead_codes()
        assert_same(new, old, f"split, seed {seed}")
        new.reseed_dead_codes(keys)
        old.reseed_dead_codes(keys)
        assert_same(new, old, f"reseed, seed {seed}")


@pytest.mark.parametrize("reseed", ["split", "batch"])
@pytest.mark.parametrize("dim", [4, 16])
def test_update_reads_nothing_back(reseed, dim):
    vq = VectorQuantizer(n_heads=2, codebook_size=16, dim=dim, dead_code_threshold=0.5, dead_code_reseed=reseed,
                         init="first_batch").train()
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        float(vq.c_count.sum())  # the mode does catch a host read
    for _ in range(3):
        vq(torch.randn(1, 8, 2, dim) * 0.1 + 2.0)  # clustered keys: most codes die
        with NoHostReads():
            vq.apply_update()
    with NoHostReads():
        vq.apply_update()  # no statistics
        vq.step_metric_tensors()
    assert int(vq.n_updates) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reseed", ["split", "batch"])
def test_update_does_not_synchronise_on_cuda(reseed):
    vq = VectorQuantizer(n_heads=12, codebook_size=512, dim=64, dead_code_threshold=0.1,
                         dead_code_reseed=reseed).cuda().train()
    k = torch.randn(2, 512, 12, 64, device="cuda") * 0.1 + 1.0
    vq(k)
    torch.cuda.synchronize()
    before = vq.codebook.clone()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation below raises
    try:
        vq.apply_update()
        vq.step_metric_tensors()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.equal(vq.codebook, before), "the update ran without changing the codebook"
