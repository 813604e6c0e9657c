"""Whole-model numerical checks of the fast paths against their references, at real training shapes.

    r = compare_impls(model, x, y, ["chunked", "fused"], autocast=True, device=dev)  # one batch, two attention impls
    r = fast_vs_reference(recipe, overrides, sampler, steps=40, batch=8)              # training curves, bf16 vs fp32

`compare_impls`: the loss and every parameter gradient of one batch under two attention implementations of
the same model (same weights, same codebooks), relative errors ||g_b - g_a|| / ||g_a|| in total and per
parameter.

`fast_vs_reference`: two copies of one model from the same seed, one on the fast path (bf16-mixed precision,
uncompiled, every kernel chosen by `auto`: fused VQ attention, EMA scan, fused quantizer, fused gates, fused
linear cross-entropy with the recipe's loss chunking) and one on the reference path (`REFERENCE_OVERRIDES`:
fp32 without TF32, the chunked PyTorch attention, the EMA by FFT, the PyTorch quantizer and gates,
full-logits cross-entropy), trained on the same batches through the trainer's step (lm.engine.TorchEngine +
TrainLoop). It reports the gradients of the first batch at equal weights and the two loss curves. Pass criteria (`BF16_TOLERANCE`):
  * every step's loss within 1e-2 relative of the reference's;
  * the first batch's gradients: total relative error <= 3e-2, every parameter <= 1e-1 (bf16 activations
    carry 8 bits of mantissa, about 4e-3 relative per element, compounded over the layers).
"""

from __future__ import annotations

from typing import Optional

import torch

from lm.config import RunConfig, load_config
from lm.engine import TorchEngine, TrainLoop
from lm.optim import StepSchedule

BF16_TOLERANCE = {"loss_rel": 1e-2, "grad_total_rel": 3e-2, "grad_param_rel": 1e-1}
"""The fast bf16 path against the fp32 reference path (see the module docstring)."""

REFERENCE_OVERRIDES = ["train.precision=fp32", "train.tf32=false", "train.loss_impl=torch", "train.loss_chunk_tokens=0",
                       "train.compile=false", "model.longvq.attention_impl=chunked", "model.longvq.ema_impl=fft",
                       "model.longvq.quantizer_impl=reference", "model.longvq.gate_impl=reference"]
FAST_OVERRIDES = ["train.precision=bf16-mixed", "train.tf32=false", "train.compile=false"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((b - a).norm() / a.norm().clamp(min=1e-30)).item()


def _grad_errors(ga: dict, gb: dict) -> dict:
    errs = sorted(((n, rel_err(ga[n], gb[n])) for n in ga), key=lambda kv: -kv[1])
    num = sum((gb[n] - ga[n]).norm() ** 2 for n in ga) ** 0.5
    den = sum(ga[n].norm() ** 2 for n in ga) ** 0.5
    return {"grad_rel_err_total": float(num / den), "worst": [(n, round(e, 6)) for n, e in errs[:8]],
            "grad_rel_err_max": errs[0][1] if errs else 0.0}


def _gradients(model, run) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    for vq in model.quantizers():
        vq.reset_stats()
    loss = run()
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    for vq in model.quantizers():
        vq.reset_stats()
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def compare_impls(model, x, y, impls, autocast: bool, device) -> dict:
    """Loss and gradients of one batch under each of two attention implementations:
    {loss_A, loss_B, grad_rel_err_total, grad_rel_err_max, worst}."""
    runs = []
    for impl in impls:
        for block in model.blocks:
            block.mixer.impl = impl

        def run():
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                return model(x, targets=y).loss
        runs.append(_gradients(model, run))
    (la, ga), (lb, gb) = runs
    return {"loss_" + impls[0]: la, "loss_" + impls[1]: lb, **_grad_errors(ga, gb)}


def path_configs(recipe: str, overrides: list, fast_extra: tuple = ()) -> tuple[RunConfig, RunConfig]:
    """(reference, fast) configs of a LongVQ recipe with key=value overrides (see the module docstring);
    fast_extra: overrides of the fast path only."""
    return (load_config(recipe, overrides=[*overrides, *REFERENCE_OVERRIDES]),
            load_config(recipe, overrides=[*overrides, *FAST_OVERRIDES, *fast_extra]))


def fast_vs_reference(recipe: str, overrides: list, sampler, *, steps: int = 40, batch: int = 8,
                      device: Optional[torch.device] = None, fast_extra: tuple = (), log=print) -> dict:
    """Train the reference and the fast path of a recipe side by side on the same batches (sampler: anything
    with micro_batch(consumed, micro, rank, dp, batch), e.g. lm.data.WindowSampler). Returns the first batch's
    gradient errors, both loss curves, the worst relative loss difference and `passed` (BF16_TOLERANCE)."""
    ref_cfg, fast_cfg = path_configs(recipe, overrides, fast_extra)
    arms = {}
    for name, c in (("reference", ref_cfg), ("fast", fast_cfg)):
        eng = TorchEngine(c, device=device)
        loop = TrainLoop(eng, sampler, StepSchedule(c.optim, steps), micro_batch_size=batch,
                         loss_chunk_tokens=c.train.loss_chunk_tokens, loss_impl=c.train.loss_impl, max_steps=steps)
        arms[name] = (eng, loop)
    ref_eng, fast_eng = arms["reference"][0], arms["fast"][0]
    with torch.no_grad():  # the same weights and codebooks (two prepare_model calls agree already; make sure)
        fast_eng.module.load_state_dict(ref_eng.module.state_dict())
    x, y = arms["reference"][1].batches()[0]
    x, y = x.to(ref_eng.device), y.to(ref_eng.device)
    grads = {}
    for name, (eng, loop) in arms.items():
        eng.train()
        grads[name] = _gradients(eng.module, lambda: eng.forward(x, y, loss_chunk_tokens=loop.loss_chunk_tokens,
                                                                 loss_impl=loop.loss_impl).loss)
    first = {"loss_reference": grads["reference"][0], "loss_fast": grads["fast"][0],
             **_grad_errors(grads["reference"][1], grads["fast"][1])}
    log(f"first batch: loss reference {first['loss_reference']:.6f}, fast {first['loss_fast']:.6f}; gradients: "
        f"total rel. error {first['grad_rel_err_total']:.2e}, worst {first['worst'][0][0]} {first['worst'][0][1]:.2e}")
    curves = {"reference": [], "fast": []}
    for s in range(steps):
        for name, (eng, loop) in arms.items():
            curves[name].append(loop.step().loss)
        if (s + 1) % 10 == 0 or s + 1 == steps:
            log(f"step {s + 1}: loss reference {curves['reference'][-1]:.5f}, fast {curves['fast'][-1]:.5f}")
    rel = [abs(f - r) / abs(r) for r, f in zip(curves["reference"], curves["fast"])]
    tol = BF16_TOLERANCE
    checks = {"loss": max(rel) <= tol["loss_rel"], "grad_total": first["grad_rel_err_total"] <= tol["grad_total_rel"],
              "grad_param": first["grad_rel_err_max"] <= tol["grad_param_rel"]}
    return {"steps": steps, "batch": batch, "context": ref_cfg.data.seq_len, "first_batch": first,
            "loss_reference": curves["reference"], "loss_fast": curves["fast"], "loss_rel_diff": rel,
            "loss_rel_diff_max": max(rel), "tolerance": tol, "checks": checks, "passed": all(checks.values()),
            "reference_overrides": REFERENCE_OVERRIDES, "fast_overrides": FAST_OVERRIDES,
            "fast_impls": {"precision": fast_eng.precision}}
