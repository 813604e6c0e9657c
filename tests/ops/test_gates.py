"""The LongVQ block's element-wise gates (lm/ops/gates.py): the references equal the block's original
expressions bit for bit (whole mixer, outputs and gradients), and the Triton kernels (lm/ops/gates_fused.py)
match the references in outputs and in the gradients of every input, for every option. The gated residual
fused with the feed-forward's RMS norm: its reference is the two ops the block ran before, the block computes
the same with and without the fused kernel.

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
from lm.model.common import RMSNorm
from lm.model.lm import Block
from lm.ops.gates import (gate_split, gate_split_reference, gated_residual, gated_residual_norm,
                          gated_residual_norm_reference, gated_residual_reference, resolve_impl)
from tests.fused_kernels import DEVICE, INTERPRET, gpu_only
from tests.tolerances import assert_close

TOL_BF16 = 1e-2
SPLIT_NAMES = ("u", "q", "k", "r", "hx", "d_mx", "d_scale", "d_shift")
RESIDUAL_NAMES = ("out", "d_hx", "d_y", "d_u", "d_x")
NORM_NAMES = ("out", "normed", "d_hx", "d_y", "d_u", "d_x", "d_weight")
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


@pytest.mark.parametrize("residual", ["add", "gated"])
def test_residual_norm_reference_is_the_residual_then_the_block_norm(residual):
    """The fused op's reference is gated_residual_reference followed by the FFN's RMSNorm module, bit for bit
    (outputs and gradients), also with a bf16 activation and an fp32 residual stream; auto is it on the CPU."""
    norm = RMSNorm(40, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    for dtypes in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        hx, y, u, x = (t.cpu() for t in _residual_args((3, 7), 40, dtypes))  # auto = the reference on the CPU
        results = []
        for fn in ("two", "reference", "auto"):
            leaves = [t.detach().clone().requires_grad_() for t in (hx, y, u, x, norm.weight)]
            if fn == "two":
                out = gated_residual_reference(*leaves[:4], residual=residual)
                normed = F.rms_norm(out, (40,), leaves[4].to(out.dtype), norm.eps)
                assert torch.equal(normed, norm(out))
            elif fn == "reference":
                out, normed = gated_residual_norm_reference(*leaves, eps=norm.eps, residual=residual)
            else:
                out, normed = gated_residual_norm(*leaves, eps=norm.eps, residual=residual, impl="auto")
            g = torch.Generator().manual_seed(2)
            loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + (
                normed.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
            results.append([out, normed, *torch.autograd.grad(loss, leaves)])
        for got in results[1:]:
            for name, a, b in zip(NORM_NAMES, got, results[0]):
                assert a.dtype == b.dtype and torch.equal(a, b), name
    t = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="gate_impl=triton has no dropout"):
        gated_residual_norm(t, t, t, t, torch.ones(8), eps=1e-5, dropout=0.1, impl="triton")


def _block_pair(tiny_model_config, gate_impls=("reference", "reference"), dropout=0.0, **opts):
    cfg = tiny_model_config("longvq", "chunked", dropout=dropout)
    blocks = []
    for gate_impl in gate_impls:
        c = dataclasses.replace(cfg, longvq=dataclasses.replace(cfg.longvq, gate_impl=gate_impl, **opts))
        torch.manual_seed(0)
        blocks.append(Block(c))
    with torch.no_grad():
        blocks[0].ffn.norm.weight.normal_(1.0, 0.3)
        blocks[0].mixer.qk_scale.normal_(1.0, 0.5)
    blocks[1].load_state_dict(blocks[0].state_dict())
    return blocks


def _original_block(block: Block, x):
    """Block.forward as written before the mixer could fuse the FFN's norm."""
    out, _, aux, _ = block.mixer(x)
    return block.ffn(out), aux


def _run_block(fn, block, x, seed=0):
    """(output, aux, gradients of x and of every parameter) of fn(block, x) in training mode."""
    block.train()
    xl = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out, aux = fn(block, xl)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)).to(out.device)
    grads = torch.autograd.grad((out * g).sum() + aux, [xl] + list(block.parameters()), allow_unused=True)
    return [out.detach(), aux.detach()] + [t for t in grads if t is not None]


@pytest.mark.parametrize("residual, dropout", [("gated", 0.0), ("add", 0.0), ("gated", 0.2)])
def test_block_on_the_cpu_computes_what_it_computed_before(tiny_model_config, residual, dropout):
    """gate_impl=auto on the CPU (and with dropout): the mixer returns no normed and the block is the mixer
    then the FFN, bit for bit."""
    new, old = _block_pair(tiny_model_config, ("auto", "auto"), dropout=dropout, residual=residual)
    x = torch.randn(2, 11, 32)
    (_, normed), *_ = new.mixer(x, norm=new.ffn.norm)
    assert normed is None
    want = _run_block(_original_block, old, x, seed=3)
    got = _run_block(lambda b, x: (lambda r: (r[0], r[2]))(b(x)), new, x, seed=3)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


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
    # several row blocks and column tiles at test sizes
    return fz.KernelConfig(block_m=8, block_n=16, warps=2, norm_block_m=4, norm_warps=2)


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


def _norm_args(lead, D, dtypes, seed=0, hx_stride=0):
    hx, y, u, x = _residual_args(lead, D, dtypes, seed=seed, hx_stride=hx_stride)
    w = torch.randn(D, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(seed + 7)) * 0.3 + 1
    return hx, y, u, x, w  # w: an fp32 parameter


def _run_norm(fn, args, ups, **kw):
    """(out, normed, gradients of hx, y, u, x, weight) of fn with the cotangents ups (None: that output unused)."""
    leaves = [t.detach().clone().requires_grad_() for t in args]
    outs = fn(*leaves, **kw)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, ups) if g is not None)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)  # out only: no weight's
    return [o.detach() for o in outs] + [g.detach() for g in grads]


def _compare_norm(lead, D, residual, dtypes=(torch.float32, torch.float32), hx_stride=0, skip=(), fn=None,
                  eps=1e-5):
    fz = _fused()
    args = _norm_args(lead, D, dtypes, hx_stride=hx_stride)
    ups = _upstream([args[3].shape] * 2, 4, skip)
    want = _run_norm(gated_residual_norm_reference, args, ups, eps=eps, residual=residual)
    impl = fn or (lambda *a, **k: fz.gated_residual_norm_triton(*a, config=_small(fz), **k))
    got = _run_norm(impl, args, ups, eps=eps, residual=residual)
    return got, want


NORM_SHAPES = [((3, 7), 40), ((1, 1), 8), ((13,), 24), ((2, 5), 100)]  # rows 21, 1, 13, 10: not multiples of 4


@pytest.mark.parametrize("residual", ["add", "gated"])
@pytest.mark.parametrize("lead, D", NORM_SHAPES, ids=[f"{'x'.join(map(str, lead))}-D{D}" for lead, D in NORM_SHAPES])
@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_gated_residual_norm_triton_matches_reference(lead, D, residual):
    got, want = _compare_norm(lead, D, residual, hx_stride=3)
    _check_fp32(got, want, NORM_NAMES)


@pytest.mark.parametrize("skip", [(0,), (1,)], ids=["normed-only", "out-only"])
@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_gated_residual_norm_with_one_output_used_and_default_config(skip):
    """A cotangent on one output only (the other's gradient is None in backward); the default launch config."""
    fz = _fused()
    got, want = _compare_norm((3, 7), 40, "gated", skip=skip)
    _check_fp32(got, want, NORM_NAMES)
    got, want = _compare_norm((3, 7), 40, "add", skip=skip, fn=fz.gated_residual_norm_triton)
    _check_fp32(got, want, NORM_NAMES)


def _uncentred_norm(fz):
    """The fused op with a wrong norm backward: normed's gradient reaches out as rstd * w * d normed, without
    the term along the normalised row (and the weight's gradient as before)."""
    def fn(hx, y, u, x, w, *, eps, residual):
        out, normed = fz.gated_residual_norm_triton(hx, y, u, x, w.detach(), eps=eps, residual=residual,
                                                    config=_small(fz))
        rstd = torch.rsqrt(out.detach().pow(2).mean(-1, keepdim=True) + eps)
        wrong = out * rstd * w.detach() + out.detach() * rstd * w
        return out, normed.detach() + wrong - wrong.detach()

    return fn


@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_a_wrong_norm_backward_fails_the_check():
    """The check is not vacuous: a norm backward without its centring term fails it, in x's gradient first."""
    fz = _fused()
    got, want = _compare_norm((3, 7), 40, "gated", fn=_uncentred_norm(fz))
    _check_fp32(got[:2], want[:2], NORM_NAMES[:2])  # the forward is the kernel's
    with pytest.raises(AssertionError, match=r"^d_hx: "):
        _check_fp32(got, want, NORM_NAMES)


@pytest.mark.parametrize("residual", ["gated", "add"])
@pytest.mark.gpu
@pytest.mark.triton_interpret
def test_block_with_triton_gates_matches_reference(tiny_model_config, residual):
    """The whole Block (fp32): gate_impl=triton runs the fused residual + norm (the mixer returns normed) and
    equals gate_impl=reference in outputs and every gradient."""
    _fused()
    ref, tri = (b.to(DEVICE) for b in _block_pair(tiny_model_config, ("reference", "triton"), residual=residual))
    x = torch.randn(2, 11, 32, device=DEVICE)
    (out, normed), *_ = tri.mixer(x, norm=tri.ffn.norm)
    assert normed is not None and torch.equal(out, tri.mixer(x)[0])
    assert ref.mixer(x, norm=ref.ffn.norm)[0][1] is None
    fwd = lambda b, x: (lambda r: (r[0], r[2]))(b(x))  # noqa: E731
    want, got = _run_block(fwd, ref, x), _run_block(fwd, tri, x)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel(a, b) <= 1e-5, i


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


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("residual", ["add", "gated"])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_gated_residual_norm_triton_bf16(residual, x_dtype, autocast):
    """bf16 activations with a bf16 or an fp32 residual stream; under CUDA autocast normed is fp32 (F.rms_norm is
    an fp32 op there), as in the reference."""
    fz = _fused()
    args = _norm_args((4, 333), 768, (torch.bfloat16, x_dtype), hx_stride=64 + 1536 + 768)
    ups = _upstream([args[3].shape] * 2, 4)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        want = _run_norm(gated_residual_norm_reference, args, ups, eps=1e-5, residual=residual)
        got = _run_norm(fz.gated_residual_norm_triton, args, ups, eps=1e-5, residual=residual)
    for name, a, b in zip(NORM_NAMES, got, want):
        assert a.dtype == b.dtype, name
        assert rel(a, b) <= TOL_BF16, name
