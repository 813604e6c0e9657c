"""The EMA's FFT convolution equals the step-by-step recurrence, with and without incoming state."""

import math

import pytest
import torch

from lm.model.ema import MultiDimEMA
from tests.tolerances import assert_close


def test_fft_convolution_equals_recurrence():
    torch.manual_seed(0)
    ema = MultiDimEMA(dim=6, ndim=4).double()
    x = torch.randn(3, 37, 6, dtype=torch.float64)
    y_fft, h_fft = ema(x, return_state=True)
    y_rec, h_rec = ema.step(x)
    assert_close(y_fft, y_rec, msg="outputs")
    assert_close(h_fft, h_rec, msg="final state")


def test_state_carry_equals_full_pass():
    torch.manual_seed(1)
    ema = MultiDimEMA(dim=5, ndim=3)
    x = torch.randn(2, 40, 5)
    full, _ = ema(x)
    y1, h = ema(x[:, :17], return_state=True)
    y2, _ = ema(x[:, 17:], state=h)
    assert_close(torch.cat([y1, y2], dim=1), full, msg="carry")
    # and the recurrence continued from the FFT state
    y3, _ = ema.step(x[:, 17:], state=h)
    assert_close(y3, y2, msg="step from carried state")


def test_fft_gradients_equal_recurrence_gradients():
    """The kernel is recomputed in backward (checkpointed); its gradients must still be exact."""
    torch.manual_seed(2)
    ema = MultiDimEMA(dim=4, ndim=3).double()
    x = torch.randn(2, 21, 4, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 21, 4, dtype=torch.float64)
    grads = []
    for fn in (lambda: ema(x)[0], lambda: ema.step(x)[0]):
        params = [x] + list(ema.parameters())
        grads.append(torch.autograd.grad((fn() * up).sum(), params))
    for a, b in zip(*grads):
        assert_close(a, b, msg="grad")


def test_blocked_final_state_and_state_contribution_equal_their_definitions():
    """final_state and state_contribution work in blocks of ~sqrt(T) positions (no (D, N, T) tensor);
    they equal the sums that define them, for lengths that are and are not whole blocks."""
    torch.manual_seed(3)
    ema = MultiDimEMA(dim=3, ndim=4).double()
    pb, q = ema.coefficients()
    gamma = ema.gamma * ema.scale
    for T in (1, 2, 9, 10, 50):
        x = torch.randn(2, 3, T, dtype=torch.float64)
        h0 = torch.randn(2, 3, 4, dtype=torch.float64)
        t = torch.arange(T, dtype=torch.float64)
        powers = q[..., None] ** (T - 1 - t)  # (D, N, T)
        assert_close(ema.final_state(x, pb, q), torch.einsum("dn,dnt,bdt->bdn", pb, powers, x), msg=f"h_T, T={T}")
        contribution = torch.einsum("dn,dnt,bdn->bdt", gamma, q[..., None] ** (t + 1), h0)
        assert_close(ema.state_contribution(h0, q, T), contribution, msg=f"state contribution, T={T}")


def _hand_ema(impl: str) -> MultiDimEMA:
    """D = 1 channel, N = 2 EMA dimensions with hand-computable coefficients:
    n = 0: p = sigmoid(0) = 1/2, a = sigmoid(0) = 1/2 -> q = 1 - p a = 3/4; beta = 2  -> p beta = 1
    n = 1: p = sigmoid(ln 3) = 3/4, a = 1/2          -> q = 5/8;           beta = -4 -> p beta = -3
    gamma = (1, 2), omega = 1/2, scale = sqrt(1/N) = 1/sqrt(2)."""
    ema = MultiDimEMA(dim=1, ndim=2, impl=impl).double()
    with torch.no_grad():
        ema.delta.copy_(torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64))
        ema.alpha.zero_()
        ema.beta.copy_(torch.tensor([[2.0, -4.0]]))
        ema.gamma.copy_(torch.tensor([[1.0, 2.0]]))
        ema.omega.fill_(0.5)
    return ema


@pytest.mark.parametrize("impl", ["fft", "scan", "recurrence"])
def test_ema_matches_its_closed_form_on_a_hand_computed_case(impl):
    """Impulse response: h_t = p beta q^t per dimension, so
    y_t = (1 * (3/4)^t + 2 * (-3) * (5/8)^t) / sqrt(2) + [t = 0] / 2; and an incoming state h_0 adds
    sum_n gamma_n q_n^(t+1) h_0[n] / sqrt(2). The values are written out, not computed by the code under test."""
    ema = _hand_ema("fft" if impl == "recurrence" else impl)
    run = (lambda x, h=None: ema.step(x, h)) if impl == "recurrence" else (lambda x, h=None: ema(x, h, return_state=True))
    r2 = math.sqrt(2.0)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64).view(1, 4, 1)
    y, h = run(x)
    expected = torch.tensor([0.5 - 5.0 / r2,  # 1 - 6 = -5
                             -3.0 / r2,  # 0.75 - 6 * 0.625
                             -1.78125 / r2,  # 0.5625 - 6 * 0.390625
                             -1.04296875 / r2], dtype=torch.float64)  # 0.421875 - 6 * 0.244140625
    torch.testing.assert_close(y.view(-1), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.view(-1), torch.tensor([0.75 ** 3, -3 * 0.625 ** 3], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    # zero input, incoming state h_0 = (2, 1): y_t = (2 * 0.75^(t+1) + 2 * 0.625^(t+1)) / sqrt(2)
    y0, h0 = run(torch.zeros(1, 3, 1, dtype=torch.float64), torch.tensor([[[2.0, 1.0]]], dtype=torch.float64))
    torch.testing.assert_close(y0.view(-1), torch.tensor([2.75, 1.90625, 1.33203125], dtype=torch.float64) / r2,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h0.view(-1), torch.tensor([2 * 0.75 ** 3, 0.625 ** 3], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
