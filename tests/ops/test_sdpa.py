"""lm.ops.sdpa: the Transformer's causal attention. Every backend gives the causal softmax; the backend
choice is pure (resolve_backend) and each module keeps its own record of backends that failed."""

import pytest
import torch

from lm.ops import sdpa


def _reference(q, k, v):
    T, S = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    keep = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["auto", "flash", "math"])
@pytest.mark.parametrize("T,S", [(9, 9), (4, 9), (1, 9)])
def test_every_cpu_backend_is_causal_softmax_attention(backend, T, S):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, T, 8), torch.randn(2, 3, S, 8), torch.randn(2, 3, S, 8)
    attend = sdpa.CausalAttention(backend)
    torch.testing.assert_close(attend(q, k, v), _reference(q, k, v), rtol=1e-5, atol=1e-5)
    assert attend.last_backend == ("flash" if backend == "auto" else backend) == attend.resolve(q, k, v)


def test_resolve_backend_is_pure_and_follows_the_preference_list():
    q = torch.randn(1, 2, 5, 8)
    assert sdpa.resolve_backend("auto", q) == "flash"  # CPU: PyTorch's flash kernel first
    assert sdpa.resolve_backend("math", q) == "math"
    assert sdpa.resolve_backend("auto", q, skip={("flash", "cpu", torch.float32)}) == "math"
    with pytest.raises(ValueError, match="not one of"):
        sdpa.resolve_backend("fastest", q)


def test_a_failing_backend_is_recorded_per_module(monkeypatch):
    """auto falls through to the next backend when one raises, and remembers that on this module only."""
    monkeypatch.setattr(sdpa, "candidates", lambda requested, q: ["cudnn", "math"] if requested == "auto" else [requested])
    q = torch.randn(1, 2, 6, 8)
    first, second = sdpa.CausalAttention("auto"), sdpa.CausalAttention("auto")
    out = first(q, q, q)  # cuDNN has no CPU kernel: it raises, math runs
    torch.testing.assert_close(out, _reference(q, q, q), rtol=1e-5, atol=1e-5)
    assert first.last_backend == "math" and first.failed == {("cudnn", "cpu", torch.float32)}
    assert second.failed == set() and second.last_backend is None  # no process-wide record
    assert first.resolve(q) == "math"
    with pytest.raises(RuntimeError, match="attn_backend=auto"):
        sdpa.CausalAttention("cudnn")(q, q, q)  # an explicit choice that cannot run is an error


@pytest.mark.skipif(not sdpa.flash_attn4_available(), reason="needs flash-attn 4 (flash_attn.cute) and a Hopper GPU")
@pytest.mark.parametrize("T,S", [(1024, 1024), (256, 1024), (1, 1024)])
def test_flash_attn4_matches_sdpa_in_outputs_and_gradients(T, S):
    """bf16 on the GPU: flash-attn 4 against the causal softmax computed in fp32 from the same bf16 inputs (a
    KV cache, S > T, aligns the mask to the last query). Tolerance 2e-2 absolute and relative: bf16 outputs and
    gradients of O(1) values."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 4, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 4, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    attend = sdpa.CausalAttention("flash_attn4")
    out = attend(q, k, v)
    assert attend.last_backend == "flash_attn4" and out.dtype == torch.bfloat16
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = _reference(*leaves)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for got, want in zip((q.grad, k.grad, v.grad), (t.grad for t in leaves)):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
