"""Quantizer: straight-through gradient, EMA k-means update semantics, dead-code splitting."""

import pytest
import torch

from lm.model.quantizer import VectorQuantizer


def test_straight_through_and_nearest_code():
    vq = VectorQuantizer(n_heads=2, codebook_size=5, dim=3).train()
    k = torch.randn(2, 7, 2, 3, requires_grad=True)
    k_hat, codes, commit, metrics = vq(k)
    cb = vq.codebook
    dist = ((k.detach()[..., None, :] - cb[None, None]) ** 2).sum(-1)
    assert torch.equal(codes, dist.argmin(-1))
    torch.testing.assert_close(k_hat.detach(), cb[torch.arange(2)[None, None], codes])
    (g,) = torch.autograd.grad((k_hat * 3.0).sum(), k)
    torch.testing.assert_close(g, torch.full_like(g, 3.0))  # identity Jacobian through the STE
    (gc,) = torch.autograd.grad(commit, k)
    assert gc.abs().sum() > 0
    assert "usage" not in metrics  # training reads step_metrics() instead
    vq.eval().batch_metrics = True
    _, _, _, eval_metrics = vq(k)
    assert 0 < float(eval_metrics["usage"]) <= 1 and float(eval_metrics["rel_error"]) > 0


def test_ema_update_moves_codes_to_assigned_means_and_resets_stats():
    vq = VectorQuantizer(n_heads=1, codebook_size=4, dim=2, decay=0.5, dead_code_threshold=0.0).train()
    before = vq.codebook.clone()
    k = torch.randn(1, 50, 1, 2)
    _, codes, _, _ = vq(k)
    assert float(vq.stat_count.sum()) == 50
    vq.apply_update()
    assert float(vq.stat_count.sum()) == 0 and float(vq.stat_sum.abs().sum()) == 0
    for s in codes.unique():
        mean = k[codes == s].mean(0)
        n = float((codes == s).sum())
        expected = (0.5 * before[0, s] * 1.0 + 0.5 * mean * n) / (0.5 * 1.0 + 0.5 * n)
        torch.testing.assert_close(vq.codebook[0, s], expected[0] if expected.ndim > 1 else expected)


def test_ema_update_weighs_old_codebook_by_decay_and_new_statistics_by_one_minus_decay():
    """c_sum <- g c_sum + (1 - g) sum_k, c_count <- g c_count + (1 - g) n with g = 0.9, on numbers worked by hand
    (at g = 0.5 the two weights are equal and a swap would go unnoticed)."""
    vq = VectorQuantizer(n_heads=1, codebook_size=2, dim=1, decay=0.9, dead_code_threshold=0.0).train()
    with torch.no_grad():
        vq.c_sum.copy_(torch.tensor([[[1.0], [-1.0]]]))  # codebook (1, -1), counts 1
        vq.c_count.fill_(1.0)
    _, codes, _, _ = vq(torch.tensor([2.0, 4.0, -3.0]).view(1, 3, 1, 1))
    assert codes.view(-1).tolist() == [0, 0, 1]
    vq.apply_update()
    # code 0: keys 2 and 4 -> c_sum 0.9 * 1 + 0.1 * 6 = 1.5, c_count 0.9 * 1 + 0.1 * 2 = 1.1
    # code 1: key -3      -> c_sum 0.9 * -1 + 0.1 * -3 = -1.2, c_count 0.9 * 1 + 0.1 * 1 = 1.0
    torch.testing.assert_close(vq.c_sum.view(-1), torch.tensor([1.5, -1.2]))
    torch.testing.assert_close(vq.c_count.view(-1), torch.tensor([1.1, 1.0]))
    torch.testing.assert_close(vq.codebook.view(-1), torch.tensor([1.5 / 1.1, -1.2]))


def test_eval_forward_does_not_accumulate():
    vq = VectorQuantizer(1, 4, 2).eval()
    vq(torch.randn(1, 5, 1, 2))
    assert float(vq.stat_count.sum()) == 0


def test_dead_codes_are_split_deterministically():
    def run():
        torch.manual_seed(0)
        vq = VectorQuantizer(n_heads=1, codebook_size=8, dim=4, decay=0.9, dead_code_threshold=0.1).train()
        k = torch.randn(1, 64, 1, 4) * 0.1 + 3.0  # all keys in one corner: most codes unused
        for _ in range(30):
            vq(k)
            vq.apply_update()
        _, codes, _, _ = vq(k)
        return vq, codes

    vq1, codes1 = run()
    vq2, _ = run()
    assert torch.equal(vq1.c_sum, vq2.c_sum)  # replicas doing the same updates stay bit-identical
    assert len(codes1.unique()) >= 4, "dead codes should have been re-seeded near the keys"


def test_first_batch_init_uses_keys_of_the_first_batch():
    vq = VectorQuantizer(n_heads=2, codebook_size=4, dim=3, init="first_batch").train()
    k = torch.randn(1, 8, 2, 3) + 5.0  # far from the random initial codebook
    vq(k)
    vq(torch.randn(1, 8, 2, 3))  # a second micro-batch of the same step does not replace the sample
    vq.apply_update()
    assert int(vq.initialized) == 1 and float(vq.stat_count.sum()) == 0
    flat = k.reshape(-1, 2, 3)
    torch.testing.assert_close(vq.codebook, flat[torch.tensor([0, 2, 5, 7])].transpose(0, 1))
    vq(k)
    vq.apply_update()  # from now on: ordinary EMA updates
    assert int(vq.n_updates) == 1


def test_batch_reseeding_moves_dead_codes_onto_the_worst_served_keys_of_the_first_micro_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_heads=2, codebook_size=6, dim=3, decay=0.9, dead_code_threshold=0.1,
                         dead_code_reseed="batch").train()
    with torch.no_grad():  # codes 0-2 alive near the origin, codes 3-5 dead (counts 0.05, 0.04, 0.03)
        vq.c_count.copy_(torch.tensor([[10.0, 10.0, 10.0, 0.05, 0.04, 0.03]]).expand(2, -1))
        words = torch.randn(2, 6, 3) * 0.1
        words[:, 3:] += 100.0  # dead codes far away: no key is assigned to them
        vq.c_sum.copy_(words * vq.c_count[..., None])
    k1 = torch.randn(1, 16, 2, 3)
    k1[0, 5, 0] = torch.tensor([9.0, 0.0, 0.0])  # head 0: far from every code, so the worst served
    k1[0, 11, 0] = torch.tensor([0.0, -7.0, 0.0])  # second worst
    cb = vq.codebook.clone()
    vq(k1)
    vq(torch.randn(1, 16, 2, 3) * 20)  # second micro-batch of the step: not sampled
    counts_before = vq.c_count * vq.decay + vq.stat_count * (1 - vq.decay)
    vq.apply_update()
    err = (k1[0, :, :, None, :] - cb[None]).pow(2).sum(-1).min(-1).values  # (T, H) error against the old codebook
    for h in range(2):
        worst = k1[0, err[:, h].argsort(descending=True), h]
        dead = counts_before[h].argsort()  # deadest first
        dead = dead[counts_before[h, dead] < 0.1 * counts_before[h].mean()]
        assert dead.numel() >= 3
        torch.testing.assert_close(vq.codebook[h, dead], worst[: dead.numel()])
    torch.testing.assert_close(vq.codebook[0, 5], torch.tensor([9.0, 0.0, 0.0]))  # deadest -> worst key
    assert vq.reseed_keys is None and float(vq.stat_count.sum()) == 0
    _, codes, _, _ = vq.eval()(k1)
    assert int(codes[0, 5, 0]) == 5  # the far key now has its own code


def test_batch_reseeding_keeps_the_codes_in_use_on_clustered_keys():
    """Random initial codebook, keys in 8 tight clusters: with dead codes moved onto badly served keys every
    code ends up in use and the quantisation error is as low as with splitting."""
    def run(mode):
        torch.manual_seed(0)
        vq = VectorQuantizer(n_heads=1, codebook_size=16, dim=4, decay=0.9, dead_code_threshold=0.1,
                             dead_code_reseed=mode).train()
        centers = torch.randn(8, 4) * 3.0
        for step in range(40):
            g = torch.Generator().manual_seed(step)
            k = centers[torch.randint(0, 8, (256,), generator=g)] + 0.3 * torch.randn(256, 4, generator=g)
            vq(k.view(1, 256, 1, 4))
            vq.apply_update()
        _, codes, _, _ = vq.eval()(k.view(1, 256, 1, 4))
        err = (k - vq.codebook[0, codes[0, :, 0]]).pow(2).sum(-1).mean()
        return len(codes.unique()), float(err)

    (used, err), (_, err_split) = run("batch"), run("split")
    assert used >= 14
    assert err <= 1.5 * err_split and err < 0.5  # cluster spread: 4 x 0.3^2 = 0.36


def test_reset_stats_drops_a_pending_reseed_sample():
    vq = VectorQuantizer(n_heads=1, codebook_size=4, dim=2, dead_code_reseed="batch").train()
    vq(torch.randn(1, 8, 1, 2))
    assert vq.reseed_keys is not None and vq.reseed_keys.shape == (1, 4, 2)
    vq.reset_stats()
    assert vq.reseed_keys is None and float(vq.stat_count.sum()) == 0
    first = VectorQuantizer(n_heads=1, codebook_size=4, dim=2, init="first_batch").train()
    first(torch.full((1, 8, 1, 2), float("nan")))  # e.g. a non-finite micro-batch, dropped by the trainer
    first.reset_stats()
    assert first.init_keys is None and first.needs_init()  # the next step samples again
    with pytest.raises(ValueError, match="dead_code_reseed"):
        VectorQuantizer(n_heads=1, codebook_size=4, dim=2, dead_code_reseed="random")
