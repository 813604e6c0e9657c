"""apply_updates (every layer's codebook update in one batch, as the trainer runs it) equals each layer's update on
its own, bit for bit; it groups quantizers by shape, settings and state; it reads nothing back from the device; and
its number of device operations does not grow with the number of layers."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lm.model.quantizer import VectorQuantizer, apply_updates
from tests.host_reads import NoHostReads
from tests.model.test_quantizer_sync_free import inject_random_stats

BUFFERS = ("c_sum", "c_count", "n_updates", "initialized", "stat_count", "stat_sum", "stat_err")


def twins(layers: int, **kw):
    """Two identical lists of quantizers: one updated by apply_updates, one layer by layer."""
    torch.manual_seed(0)
    batched = [VectorQuantizer(**kw).train() for _ in range(layers)]
    alone = [VectorQuantizer(**kw).train() for _ in range(layers)]
    for a, b in zip(alone, batched):
        a.load_state_dict(b.state_dict())
    return batched, alone


def assert_same(batched, alone, where):
    for i, (a, b) in enumerate(zip(batched, alone)):
        for name in BUFFERS:
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(x, y), f"{where}, layer {i}: {name} differs (max {(x.double() - y.double()).abs().max():.3e})"
        assert a._n_updates == b._n_updates and a.needs_init() == b.needs_init(), f"{where}, layer {i}"
        assert a.reseed_keys is None and a.init_keys is None and not a._stats_pending


def forward_both(batched, alone, gen, H, dim, skip=()):
    """A training forward of every layer on random clustered keys (layers in `skip` see none this step)."""
    for i, (a, b) in enumerate(zip(batched, alone)):
        if i in skip:
            continue
        centres = torch.randn(3, H, dim, generator=gen) * (1.0 + i)
        k = centres[torch.randint(0, 3, (2, 11), generator=gen)] + 0.1 * torch.randn(2, 11, H, dim, generator=gen)
        for vq in (a, b):
            vq(k.clone().requires_grad_())


@pytest.mark.parametrize("reseed", ["split", "batch"])
@pytest.mark.parametrize("dim", [4, 16])
@pytest.mark.parametrize("init", ["random", "first_batch"])
def test_batched_update_equals_layer_by_layer(reseed, dim, init):
    H, S, L = 3, 24, 4
    batched, alone = twins(L, n_heads=H, codebook_size=S, dim=dim, decay=0.9, dead_code_threshold=0.3, init=init,
                           dead_code_reseed=reseed)
    gen = torch.Generator().manual_seed(2)
    moved = 0
    for step in range(12):
        skip = {1} if step % 4 == 2 else set()  # one layer without a forward: it only resets
        forward_both(batched, alone, gen, H, dim, skip)
        if step % 3 == 1:
            for pair in zip(batched, alone):  # many dead codes, different per layer
                inject_random_stats(pair, gen, H, S, dim)
        if step % 5 == 4 and batched[2].reseed_keys is not None:  # a non-finite sample in one layer only
            for vq in (batched[2], alone[2]):
                vq.reseed_keys = vq.reseed_keys.clone()
                vq.reseed_keys[0, 0, 0] = float("nan")
        before = [vq.c_count.clone() for vq in batched]
        apply_updates(batched)
        for vq in alone:
            vq.apply_update()
        assert_same(batched, alone, f"step {step}")
        moved += sum(int((b != a.c_count).any()) for a, b in zip(batched, before))
    assert moved > L * 6  # the updates really changed the codebooks
    assert len({vq._n_updates for vq in batched}) == 2  # the skipped layer fell one update behind


def test_groups_by_shape_and_settings():
    """Quantizers of different sizes and settings in one call: each gets its own update."""
    kws = [dict(n_heads=2, codebook_size=8, dim=16), dict(n_heads=2, codebook_size=8, dim=16),
           dict(n_heads=3, codebook_size=8, dim=16), dict(n_heads=2, codebook_size=8, dim=16, decay=0.5),
           dict(n_heads=2, codebook_size=8, dim=16, dead_code_reseed="batch")]
    torch.manual_seed(0)
    batched = [VectorQuantizer(dead_code_threshold=0.4, **kw).train() for kw in kws]
    torch.manual_seed(0)
    alone = [VectorQuantizer(dead_code_threshold=0.4, **kw).train() for kw in kws]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for a, b in zip(batched, alone):
            k = torch.randn(1, 9, a.n_heads, 16, generator=gen) * 0.1 + 1.0
            a(k)
            b(k)
        apply_updates(batched)
        for vq in alone:
            vq.apply_update()
        assert_same(batched, alone, "mixed")


def test_batched_update_reads_nothing_back():
    vqs = [VectorQuantizer(n_heads=2, codebook_size=16, dim=16, dead_code_threshold=0.5).train() for _ in range(3)]
    for _ in range(3):
        for vq in vqs:
            vq(torch.randn(1, 8, 2, 16) * 0.1 + 2.0)  # clustered keys: most codes die
        with NoHostReads():
            apply_updates(vqs)
    assert [int(vq.n_updates) for vq in vqs] == [3, 3, 3]


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in (torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.unbind,
                                       torch.ops.aten.select, torch.ops.aten.detach):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reseed", ["split", "batch"])
def test_device_work_does_not_grow_with_layers(reseed):
    """The update of 12 layers issues about as many operations as that of one (a per-layer loop: 12 times)."""
    counts = []
    for layers in (1, 12):
        vqs = [VectorQuantizer(n_heads=2, codebook_size=16, dim=16, dead_code_threshold=0.5,
                               dead_code_reseed=reseed).train() for _ in range(layers)]
        for vq in vqs:
            vq(torch.randn(1, 8, 2, 16) * 0.1 + 2.0)
        with CountOps() as ops:
            apply_updates(vqs)
        counts.append(ops.n)
    assert counts[1] <= 1.5 * counts[0], counts


def test_step_codebook_metrics_equal_each_layers_own():
    """lm.engine.step.codebook_metrics reads every layer's health in one host read: the same numbers as each
    quantizer's step_metrics()."""
    from lm.engine.step import codebook_metrics

    vqs = [(i, VectorQuantizer(n_heads=2, codebook_size=8, dim=4, dead_code_threshold=0.3).train()) for i in (0, 3)]
    for i, vq in vqs:
        vq(torch.randn(1, 20, 2, 4) * (1 + i))
    got = codebook_metrics(vqs, gather=False)
    want = {f"layer{i}/{k}": v for i, vq in vqs for k, v in vq.step_metrics().items()}
    assert got.keys() == want.keys() and len(got) == 8
    assert got == pytest.approx(want, rel=1e-6)
    assert codebook_metrics([], gather=False) == {}
