"""Chunked LM-head cross-entropy (lm/ops/linear_ce.py) against its reference twin (full logits), values and
gradients, with ignored targets, uneven chunks and under bf16 autocast; the per-chunk PyTorch twin
`ce_grad_inplace_reference` against autograd; the impl choice; and the model's `targets` path. The Triton
kernel is compared in tests/ops/test_linear_ce_fused.py."""

import pytest
import torch

from lm.config import ModelConfig
from lm.model import build_model
from lm.ops.linear_ce import (IGNORE_INDEX, ce_grad_inplace, ce_grad_inplace_reference, linear_cross_entropy,
                              resolve_impl)
from tests.tolerances import assert_close


def _inputs(dtype, N=37, d=16, V=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, d, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[::5] = IGNORE_INDEX
    return h, w, t


def _value_and_grads(fn):
    h, w, t = _inputs(torch.float64)
    loss = fn(h, w, t)
    (2.5 * loss).backward()  # a non-unit upstream gradient
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("impl", ["torch", "auto"])
@pytest.mark.parametrize("chunk", [1, 8, 36, 37, 100])
def test_chunked_equals_reference_float64(chunk, impl):
    ref = _value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, 0))
    out = _value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk, impl=impl))
    for a, b, name in zip(out, ref, ("loss", "dh", "dw")):
        assert_close(a.to(b.dtype), b, msg=f"{name}, chunk {chunk}")


def test_matches_plain_cross_entropy_and_eval_mode_builds_no_grads():
    h, w, t = _inputs(torch.float32)
    expected = torch.nn.functional.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX)
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t, 8)
    assert_close(got, expected.detach())


def test_bf16_autocast_rounds_like_the_reference():
    h, w, t = _inputs(torch.float32, N=64, d=32, V=97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = linear_cross_entropy(h, w, t, 0, torch.bfloat16)
        out = linear_cross_entropy(h, w, t, 16, torch.bfloat16)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)  # same bf16 logits; fp32 softmax


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ce_grad_inplace_reference_is_the_gradient_of_the_summed_loss(dtype):
    """Per-row losses as F.cross_entropy's, and the in-place gradient scale * d(sum of losses)/d logits."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 23, generator=g, dtype=dtype) * 3
    t = torch.randint(0, 23, (9,), generator=g)
    t[[2, 7]] = IGNORE_INDEX
    leaf = x.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(leaf, t, ignore_index=IGNORE_INDEX, reduction="none")
    (0.3 * expected.sum()).backward()
    logits = x.clone()
    out = torch.empty(9, dtype=dtype)
    loss = ce_grad_inplace_reference(logits, t, 0.3, out=out)
    assert loss.data_ptr() == out.data_ptr()
    assert_close(loss, expected.detach())
    assert_close(logits, leaf.grad)
    assert (logits[[2, 7]] == 0).all()


def test_ce_grad_inplace_reference_keeps_low_precision_logits_and_returns_float32():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 40, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, 40, (6,), generator=g)
    logits = x.clone()
    loss = ce_grad_inplace_reference(logits, t, 1.0)
    assert loss.dtype == torch.float32 and logits.dtype == torch.bfloat16
    xf = x.float()
    expected = torch.softmax(xf, -1) - torch.nn.functional.one_hot(t, 40).float()
    torch.testing.assert_close(logits.float(), expected, atol=1e-6, rtol=2.0 ** -8)  # one bf16 rounding
    assert_close(loss, torch.nn.functional.cross_entropy(xf, t, reduction="none"))


def test_impl_choice_on_the_cpu():
    x = torch.randn(3, 5)
    assert resolve_impl("auto", x) == "torch" and resolve_impl("torch", x) == "torch"
    assert resolve_impl("triton", x) == "triton"
    with pytest.raises(ValueError, match="loss_impl"):
        resolve_impl("cuda", x)
    _, used = ce_grad_inplace(x, torch.tensor([0, 1, IGNORE_INDEX]), 1.0, "auto")
    assert used == "torch"
    h, w, t = _inputs(torch.float32)
    with pytest.raises(ValueError, match="loss_impl"):
        linear_cross_entropy(h, w, t, 8, impl="fast")


def test_bad_arguments_are_named():
    h, w, t = _inputs(torch.float32)
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(h, w, t, -1)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:-1], 4)


@pytest.mark.parametrize("arch", ["longvq", "transformer"])
def test_model_targets_path_equals_logits_path(arch):
    cfg = ModelConfig(arch=arch, vocab_size=61, d_model=32, n_layers=2, ffn_dim=64)
    cfg.longvq.z_dim, cfg.longvq.hidden_dim, cfg.longvq.n_heads = 16, 32, 2
    cfg.longvq.chunk_size, cfg.longvq.codebook_size, cfg.longvq.attention_impl = 8, 8, "chunked"
    cfg.transformer.n_heads = 2
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()  # eval: codebook statistics are not touched by either pass
    x = torch.randint(0, 61, (2, 20))
    y = torch.randint(0, 61, (2, 20))
    grads = []
    for chunk in (0, 7):
        model.zero_grad()
        out = model(x, targets=y, loss_chunk_tokens=chunk, loss_impl="torch")
        assert (out.logits is None) == (chunk > 0)
        out.loss.backward()
        grads.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    with pytest.raises(ValueError, match="loss_impl"):  # the choice reaches the head
        model(x, targets=y, loss_chunk_tokens=7, loss_impl="fast")
    ref_loss = torch.nn.functional.cross_entropy(model(x).logits.reshape(-1, 61), y.reshape(-1))
    assert_close(grads[0][0], ref_loss.detach())
    assert_close(grads[1][0], grads[0][0])
    assert_close(grads[1][1], grads[0][1])  # the tied embedding gets both of its gradients
