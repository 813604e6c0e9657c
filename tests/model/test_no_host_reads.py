"""A LongVQ training forward and backward reads nothing back from the device: no `.item()`, `nonzero`,
boolean masks or `bincount` (each stalls the host until the GPU catches up, so the host can no longer queue
kernels ahead of it). On the CPU a dispatch mode (tests/host_reads.py) checks the cache tables of the fused and
the reference attention (the CPU's own input checks, e.g. one_hot's range check, read back where CUDA's do not,
so the whole model is checked on a GPU only, by CUDA's sync debug mode)."""

from __future__ import annotations

import pytest
import torch

from lm.model import build_model
from tests.host_reads import NoHostReads


def _train_step(model, tokens):
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    (out.loss + out.aux_loss).backward()
    return out


def test_the_mode_catches_bincount():
    with pytest.raises(AssertionError, match="host read"), NoHostReads():
        torch.bincount(torch.tensor([0, 2, 2]), minlength=4)


def test_fused_cache_tables_read_nothing_back():
    pytest.importorskip("triton")
    from lm.ops import vq_attention_fused as fz

    B, T, H, S, C, Dv = 2, 24, 3, 8, 8, 4
    codes = torch.randint(0, S, (B, T, H))
    v = torch.randn(B, T, H, Dv)
    with NoHostReads():
        cnt, sums = fz.cache_tables(codes, v, None, C, S, T // C)
    # chunk r sees chunks 0..r-2: the last entry counts the first T - 2 C tokens' codes
    want = torch.zeros(B, H, S)
    for b in range(B):
        for h in range(H):
            want[b, h] = torch.bincount(codes[b, : T - 2 * C, h], minlength=S).float()
    assert torch.equal(cnt[:, :, T // C - 1], want)


def test_reference_code_statistics_read_nothing_back():
    from lm.ops.vq_attention_ref import code_statistics

    codes = torch.randint(0, 8, (2, 24, 3))
    with NoHostReads():
        count, _ = code_statistics(codes, torch.randn(2, 24, 3, 4), 8)
    assert torch.equal(count[1, 2], torch.bincount(codes[1, :, 2], minlength=8).float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_training_step_does_not_synchronise_on_cuda(tiny_model_config):
    torch.manual_seed(0)
    cfg = tiny_model_config("longvq", "auto")
    cfg.longvq.chunk_size, cfg.longvq.codebook_size, cfg.longvq.z_dim = 64, 64, 128
    model = build_model(cfg).cuda().train()
    tokens = torch.randint(0, 32, (2, 257), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        _train_step(model, tokens)
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation below raises
        try:
            out = _train_step(model, tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # the step under the debug mode really ran the fused path to the end: a finite loss and gradients everywhere
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
