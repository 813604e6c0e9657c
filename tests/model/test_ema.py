"""The EMA's FFT convolution equals the step-by-step recurrence, with and without incoming state."""

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
