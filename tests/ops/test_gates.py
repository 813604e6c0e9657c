"""The LongVQ block's element-wise gates (lm/ops/gates.py): the references equal the block's original
expressions bit for bit (whole mixer, outputs and gradients), and the Triton kernels (lm/ops/gates_fused.py)
match the references in outputs and in the gradients of every input, for every option.

The Triton tests carry the `gpu` + `triton_interpret` markers: on a GPU they run on CUDA (fp32 and bf16), on the
CPU tests/ops/test_fused_interpreter.py runs them under Triton's interpreter (fp32).

Tolerances (declared once here):
  * reference vs the original expressions: exact (the same PyTorch ops);
  * Triton fp32 vs the fp32 reference: tests/tolerances.py ELEMENTWISE[float32] per element (fp32 math in
    another order; measured ~1e-7 relative under the interpreter);
  * Triton bf16 vs the reference on the same bf16 inputs: relative error ||a - b|| / ||b|| <= 1e-2 per tensor
    (both round at the same points; the kernel's fp32 intermediates may differ by one bf16 step).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from lm.config import ConfigError, RunConfig, from_dict
from lm.model.common import rms_normalize
from lm.model.longvq import LongVQMixer
from lm.ops.gates import (gate_split, gate_split_reference, gated_residual, gated_residual_reference,
                          resolve_impl)
from tests.fused_kernels import DEVICE, INTERPRET, gpu_only
from tests.tolerances import assert_close

TOL_BF16 = 1e-2
SPLIT_NAMES = ("u", "q", "k", "r", "hx", "d_mx", "d_scale", "d_shift")
RESIDUAL_NAMES = ("out", "d_hx", "d_y", "d_u", "d_x")
KEY_NORMS = (None, "rms", "center_rms")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


# --------------------------------------------------------------------------------------------
# The reference is the block's original code
# --------------------------------------------------------------------------------------------


def _original_forward(self: LongVQMixer, x):
    """LongVQMixer.forward as written before the gates moved to lm/ops/gates.py (no state, no sequence
    parallelism): the executable record of what the block computes."""
    from lm.ops import vq_attention

    B, T, D = x.shape
    H, E, dz = self.n_heads, self.hidden, self.z_dim
    xn = self.norm(x)
    v = F.silu(self.v_proj(xn))
    ema_out, _ = self.ema(xn, None, False, silu=True)
    m = self.hidden_dropout(ema_out)
    u, zr, hx = self.mx_proj(m).split([D, dz + E, D], dim=-1)
    u = torch.sigmoid(u)
    z, r = F.silu(zr).split([dz, E], dim=-1)
    dt = v.dtype
    q = (z * self.qk_scale[0] + self.qk_shift[0]).to(dt).view(B, T, H, dz // H)
    k = (z * self.qk_scale[1] + self.qk_shift[1]).to(dt).view(B, T, H, dz // H)
    if self.query_norm:
        q = rms_normalize(q)
    if self.log_q_scale is not None:
        q = q * self.log_q_scale.exp().to(dt)[:, None]
    if self.normalize_keys:
        k = F.layer_norm(k, (k.shape[-1],), eps=1e-6) if self.key_norm == "center_rms" else rms_normalize(k)
    k_hat, codes, commit, _ = self.quantizer(k)
    keys = k if self.local_raw_keys else k_hat
    attn, _ = vq_attention(q, keys, v.view(B, T, H, E // H), codes, self.quantizer.codebook.to(q.dtype),
                           chunk_size=self.chunk_size, bias=self.bias, return_state=False, impl=self.impl, state=None)
    h = F.silu(hx + self.h_proj(self.attention_dropout(attn.reshape(B, T, E)) * r))
    h = self.dropout(h)
    out = x + u * h if self.residual == "add" else x + u * (h - x)
    return out, self.commit_beta * commit


MIXER_OPTIONS = [
    dict(),
    dict(residual="add", query_norm=True),
    dict(key_norm="center_rms", query_temperature=True),
    dict(normalize_keys=False, residual="add"),
    dict(key_norm="center_rms", query_norm=True, residual="add", local_raw_keys=True),
]


def _mixer_pair(tiny_model_config, gate_impl="reference", dropout=0.0, **opts):
    cfg = tiny_model_config("longvq", "chunked", dropout=dropout)
    cfg = dataclasses.replace(cfg, longvq=dataclasses.replace(cfg.longvq, gate_impl=gate_impl, **opts))
    torch.manual_seed(0)
    mixer = LongVQMixer(cfg).double()
    with torch.no_grad():  # non-trivial q/k affine and temperature
        mixer.qk_scale.normal_(1.0, 0.5)
        mixer.qk_shift.normal_(0.0, 0.5)
        if mixer.log_q_scale is not None:
            mixer.log_q_scale.normal_(0.0, 0.3)
    twin = LongVQMixer(cfg).double()
    twin.load_state_dict(mixer.state_dict())
    return mixer, twin


def _run_mixer(fn, mixer, x, seed=0):
    """(out, commit, gradients of x and of every parameter) of fn(mixer, x) in training mode."""
    mixer.train()
    xl = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # dropout masks
    out, commit = fn(mixer, xl)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)).to(out.device)
    grads = torch.autograd.grad((out * g).sum() + commit, [xl] + list(mixer.parameters()), allow_unused=True)
    return [out.detach(), commit.detach()] + [t for t in grads if t is not None]


@pytest.mark.parametrize("opts", MIXER_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_reference_gates_are_the_original_block_bit_for_bit(tiny_model_config, opts):
    mixer, twin = _mixer_pair(tiny_model_config, **opts)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    want = _run_mixer(_original_forward, twin, x)
    got = _run_mixer(lambda m, x: (lambda r: (r[0], r[2]))(m(x)), mixer, x)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("residual", ["add", "gated"])
def test_reference_with_dropout_is_the_original_block(tiny_model_config, residual):
    """model.dropout in training: the same mask as nn.Dropout drew (same RNG use), bit for bit; auto takes the
    reference there."""
    mixer, twin = _mixer_pair(tiny_model_config, gate_impl="auto", dropout=0.3, residual=residual)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    want = _run_mixer(_original_forward, twin, x, seed=5)
    got = _run_mixer(lambda m, x: (lambda r: (r[0], r[2]))(m(x)), mixer, x, seed=5)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not torch.equal(got[0], _run_mixer(_original_forward, twin, x, seed=6)[0])  # the mask matters


def test_dispatch_on_cpu_and_bad_settings():
    x = torch.randn(3, 4)
    assert resolve_impl("auto", "gate_split", x) == "reference"
    mx, scale, shift = torch.randn(5, 2 * 4 + 6 + 8), torch.randn(2, 6), torch.randn(2, 6)
    kw = dict(sizes=(4, 6, 8), heads=2, query_norm=True, key_norm="center_rms")
    for a, b in zip(gate_split(mx, scale, shift, impl="auto", **kw), gate_split_reference(mx, scale, shift, **kw)):
        assert torch.equal(a, b)
    assert resolve_impl("triton", "gate_split", x) == "triton"
    with pytest.raises(ValueError, match=r"model\.longvq\.gate_impl 'fast' is not one of"):
        resolve_impl("fast", "gate_split", x)
    t = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="gate_impl=triton has no dropout"):
        gated_residual(t, t, t, t, dropout=0.1, impl="triton")
    with pytest.raises(ValueError, match="key_norm 'l2'"):
        gate_split_reference(torch.randn(2, 2 * 4 + 6 + 8), torch.ones(2, 6), torch.zeros(2, 6), sizes=(4, 6, 8),
                             heads=2, key_norm="l2")


def test_config_refuses_triton_gates_with_dropout_and_unknown_values():
    cfg = RunConfig()
    cfg.model.dropout, cfg.model.longvq.gate_impl = 0.1, "triton"
    with pytest.raises(ConfigError, match=r"model\.longvq\.gate_impl=triton has no dropout"):
        cfg.validate()
    cfg.model.longvq.gate_impl = "auto"
    cfg.validate()
    with pytest.raises(ConfigError, match=r"model\.longvq\.gate_impl"):
        from_dict(RunConfig, {"model": {"longvq": {"gate_impl": "fused"}}})


def test_auto_takes_the_reference_under_compile_without_a_graph_break():
    def f(x):
        return x + 1 if resolve_impl("auto", "gate_split", x) == "reference" else x - 1

    torch._dynamo.reset()
    x = torch.randn(4, 8)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), x + 1)


# --------------------------------------------------------------------------------------------
# Triton against the reference
# --------------------------------------------------------------------------------------------


def _fused():
    if not (torch.cuda.is_available() or INTERPRET):
        pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1)")
    pytest.importorskip("triton")
    from lm.ops import gates_fused

    return gates_fused


def _small(fz):
    return fz.KernelConfig(block_m=8, block_n=16, warps=2)  # several row blocks and column tiles at test sizes


SPLIT_SHAPES = [
    # lead dims, D, dz, E, H
    ((3, 7), 40, 18, 24, 3),  # 21 rows (not a multiple of the row block), head dim 6 (not a power of two)
    ((1, 1), 8, 16, 16, 1),  # a single row, one head
    ((17,), 20, 32, 48, 4),  # one lead dim, D and E not multiples of the column tile
]


def _split_args(shape, dtype, seed=0, wide=0):
    lead, D, dz, E, H = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    W = 2 * D + dz + E
    buf = torch.randn(*lead, W + wide, device=DEVICE, generator=g) * 2
    mx = buf[..., :W].to(dtype)  # wide > 0: rows with a stride larger than W
    scale = torch.randn(2, dz, device=DEVICE, generator=g) * 0.5 + 1  # fp32 parameters, as under autocast
    shift = torch.randn(2, dz, device=DEVICE, generator=g) * 0.5
    return mx, scale, shift, (D, dz, E), H


def _run_split(fn, mx, scale, shift, sizes, heads, upstream, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (mx, scale, shift)]
    outs = fn(*leaves, sizes=sizes, heads=heads, **kw)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, upstream) if g is not None)
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs] + [g.detach() for g in grads]


def _upstream(outs_shapes, seed, skip=()):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [None if i in skip else torch.randn(s, dtype=torch.float64, device=DEVICE, generator=g)
            for i, s in enumerate(outs_shapes)]


def _compare_split(shape, query_norm, key_norm, dtype=torch.float32, skip=(), wide=0, config=None, fn=None):
    fz = _fused()
    mx, scale, shift, sizes, H = _split_args(shape, dtype, wide=wide)
    kw = dict(query_norm=query_norm, key_norm=key_norm)
    shapes = [o.shape for o in gate_split_reference(mx, scale, shift, sizes=sizes, heads=H, **kw)]
    up = _upstream(shapes, 1, skip)
    want = _run_split(gate_split_reference, mx, scale, shift, sizes, H, up, dtype=dtype, **kw)
    impl = fn or (lambda *a, **k: fz.gate_split_triton(*a, config=config or _small(fz), **k))
    got = _run_split(impl, mx, scale, shift, sizes, H, up, **kw)
    return got, want


def _check_fp32(got, want, names):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, msg=name)


@pytest.mark.parametrize("key_norm", KEY_NORMS, ids=str)
@pytest.mark.parametrize("query_norm", [False, True], ids=["q", "qnorm"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: f"{'x'.join(map(str, s[0]))}-H{s[-1]}")
@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_gate_split_triton_matches_reference(shape, query_norm, key_norm):
    got, want = _compare_split(shape, query_norm, key_norm)
    _check_fp32(got, want, SPLIT_NAMES)
    fz = _fused()
    mx, scale, shift, sizes, H = _split_args(shape, torch.float32)
    hx = fz.gate_split_triton(mx, scale, shift, sizes=sizes, heads=H)[4]
    assert hx.untyped_storage().data_ptr() == mx.untyped_storage().data_ptr()  # a view of mx, as in the reference


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_gate_split_strided_rows_unused_outputs_and_default_config():
    """mx rows strided past their width; no gradient reaches hx or q (the kernel treats them as zero); the
    default launch config (one row block, one column tile)."""
    fz = _fused()
    got, want = _compare_split(SPLIT_SHAPES[0], True, "center_rms", skip=(1, 4), wide=5)
    _check_fp32(got, want, SPLIT_NAMES)
    got, want = _compare_split(SPLIT_SHAPES[2], False, "rms", config=fz.CONFIG)
    _check_fp32(got, want, SPLIT_NAMES)


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_a_wrong_gate_split_fails_the_check():
    """The check is not vacuous: the kernel with the q and k affine maps swapped fails it."""
    fz = _fused()
    swapped = lambda mx, s, b, **k: fz.gate_split_triton(mx, s.flip(0), b.flip(0), config=_small(fz), **k)  # noqa: E731
    got, want = _compare_split(SPLIT_SHAPES[0], False, "rms", fn=swapped)
    with pytest.raises(AssertionError, match=r"^q: "):
        _check_fp32(got, want, SPLIT_NAMES)


def _residual_args(lead, D, dtypes, seed=0, hx_stride=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    hx_buf = torch.randn(*lead, D + hx_stride, device=DEVICE, generator=g)
    hx = hx_buf[..., :D].to(dtypes[0])  # a column slice, like the block's hx
    y, u, x = (torch.randn(*lead, D, device=DEVICE, generator=g) for _ in range(3))
    u = torch.sigmoid(u)
    return hx, y.to(dtypes[0]), u.to(dtypes[0]), x.to(dtypes[1])


def _run_residual(fn, hx, y, u, x, up, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hx, y, u, x)]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad((out.double() * up).sum(), leaves)
    return [out.detach()] + [g.detach() for g in grads]


def _compare_residual(lead, D, residual, dtypes=(torch.float32, torch.float32), hx_stride=0, fn=None):
    fz = _fused()
    args = _residual_args(lead, D, dtypes, hx_stride=hx_stride)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    up = torch.randn(*lead, D, dtype=torch.float64, device=DEVICE, generator=g)
    want = _run_residual(gated_residual_reference, *args, up, residual=residual)
    impl = fn or (lambda *a, **k: fz.gated_residual_triton(*a, config=_small(fz), **k))
    got = _run_residual(impl, *args, up, residual=residual)
    return got, want


@pytest.mark.parametrize("residual", ["add", "gated"])
@pytest.mark.parametrize("lead, D", [((3, 7), 40), ((1, 1), 8), ((13,), 16)], ids=["21x40", "1x8", "13x16"])
@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_gated_residual_triton_matches_reference(lead, D, residual):
    got, want = _compare_residual(lead, D, residual, hx_stride=3)
    _check_fp32(got, want, RESIDUAL_NAMES)


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_a_wrong_gated_residual_fails_the_check():
    """The check is not vacuous: the add rule where the gated rule is asked for fails it."""
    fz = _fused()
    wrong = lambda *a, residual, **k: fz.gated_residual_triton(*a, residual="add", config=_small(fz))  # noqa: E731
    got, want = _compare_residual((3, 7), 40, "gated", fn=wrong)
    with pytest.raises(AssertionError, match=r"^out: "):
        _check_fp32(got, want, RESIDUAL_NAMES)


@pytest.mark.parametrize("opts", MIXER_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_mixer_with_triton_gates_matches_reference(tiny_model_config, opts):
    """The whole mixer (fp32) with gate_impl=triton against gate_impl=reference: outputs and all gradients."""
    _fused()
    ref, tri = (_mixer_pair(tiny_model_config, gate_impl=g, **opts)[0].float().to(DEVICE)
                for g in ("reference", "triton"))
    x = torch.randn(2, 11, 32, device=DEVICE)
    fwd = lambda m, x: (lambda r: (r[0], r[2]))(m(x))  # noqa: E731
    want, got = _run_mixer(fwd, ref, x), _run_mixer(fwd, tri, x)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel(a, b) <= 1e-5, i


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_checkpointed_model_with_triton_gates_matches_reference(tiny_model_config):
    """The whole model under activation checkpointing (the forward recomputed in backward): logits and every
    parameter's gradient with gate_impl=triton against gate_impl=reference."""
    _fused()
    from lm.model import build_model
    from lm.parallel.activation_checkpointing import apply_activation_checkpointing

    results = []
    for gate_impl in ("reference", "triton"):
        cfg = tiny_model_config()
        cfg.longvq.gate_impl = gate_impl
        torch.manual_seed(0)
        model = build_model(cfg).to(DEVICE).train()
        apply_activation_checkpointing(model.blocks)
        out = model(torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(0)).to(DEVICE))
        (out.logits.pow(2).mean() + out.aux_loss).backward()
        results.append((out.logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert rel(results[1][0], results[0][0]) <= 1e-5
    assert rel(results[1][1], results[0][1]) <= 1e-5


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("query_norm, key_norm", list(itertools.product([False, True], KEY_NORMS)))
def test_gate_split_triton_bf16(query_norm, key_norm):
    got, want = _compare_split(((4, 333), 768, 64, 1536, 1), query_norm, key_norm, dtype=torch.bfloat16,
                               config=_fused().CONFIG)
    for name, a, b in zip(SPLIT_NAMES, got, want):
        assert a.dtype == b.dtype == (torch.float32 if name in ("d_scale", "d_shift") else torch.bfloat16), name
        assert rel(a, b) <= TOL_BF16, name


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("residual", ["add", "gated"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gated_residual_triton_bf16(residual, x_dtype):
    """bf16 activations with a bf16 or an fp32 residual stream (bf16-mixed keeps x in fp32)."""
    fz = _fused()
    args = _residual_args((4, 333), 768, (torch.bfloat16, x_dtype), hx_stride=64 + 1536 + 768)
    up = torch.randn(4, 333, 768, dtype=torch.float64, device=DEVICE)
    want = _run_residual(gated_residual_reference, *args, up, residual=residual)
    got = _run_residual(fz.gated_residual_triton, *args, up, residual=residual)
    for name, a, b in zip(RESIDUAL_NAMES, got, want):
        assert a.dtype == b.dtype, name
        assert rel(a, b) <= TOL_BF16, name


@gpu_only
@pytest.mark.gpu
def test_auto_picks_triton_on_cuda_and_the_mixer_agrees_in_bf16(tiny_model_config):
    x = torch.randn(2, 5, 8, device="cuda")
    assert resolve_impl("auto", "gate_split", x) == "triton"
    assert resolve_impl("auto", "gate_split", x.cpu()) == "reference"
    ref, tri = (_mixer_pair(tiny_model_config, gate_impl=g)[0].float().cuda() for g in ("reference", "auto"))
    xs = torch.randn(2, 200, 32, device="cuda")
    fwd = lambda m, x: (lambda r: (r[0], r[2]))(m(x))  # noqa: E731
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = _run_mixer(fwd, ref, xs), _run_mixer(fwd, tri, xs)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel(a, b) <= 3e-2, i
