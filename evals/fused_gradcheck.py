"""Whole-model check of a fast attention path against its reference, at a real training shape.

    python -m evals.fused_gradcheck [--preset 40m] [--set ARCH.key=value ...] [--context 4096]
        [--train-steps 40] [--batch 16] [--check-batch 4] [--impls chunked fused] [--out FILE.json]

The kernel tests (tests/ops/) compare the fused kernel with the reference on random tensors at small
shapes. This trains the race's LongVQ model (evals/quality_race.py presets) for a few steps with the
second implementation, so that activations, codebooks and keys are those of real training, then computes
the loss and every parameter gradient on fresh training windows once with each implementation (bf16
autocast where the device has it, then fp32) and prints the relative error ||g_b - g_a|| / ||g_a|| in
total and for the worst parameters. Issue 7 used it to rule out a kernel bug as the cause of the quality
gap (evals/results/gradcheck_h200_2026-11-29_s4.json). On the CPU, `--impls chunked dense` checks the
chunked reference against the dense oracle the same way.
"""

from __future__ import annotations

import argparse
import sys

import torch

from evals import quality_race as qr
from evals import throughput as tp
from evals.common import pick_device, write_json
from lm.config import DataConfig
from lm.data import WindowSampler, load_stream
from lm.model import LanguageModel
from lm.parallel.compile import set_tf32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((b - a).norm() / a.norm().clamp(min=1e-30)).item()


def compare(model, x, y, impls, autocast: bool, device) -> dict:
    """Loss and gradients of one batch under each implementation: {loss_a, loss_b, total, worst}."""
    runs = []
    for impl in impls:
        for block in model.blocks:
            block.mixer.impl = impl
        model.zero_grad(set_to_none=True)
        for vq in model.quantizers():
            vq.reset_stats()
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            out = model(x, targets=y)
        out.loss.backward()
        runs.append((out.loss.item(), {n: p.grad.detach().float().clone()
                                       for n, p in model.named_parameters() if p.grad is not None}))
    for vq in model.quantizers():
        vq.reset_stats()
    (la, ga), (lb, gb) = runs
    errs = sorted(((n, rel_err(ga[n], gb[n])) for n in ga), key=lambda kv: -kv[1])
    num = sum((gb[n] - ga[n]).norm() ** 2 for n in ga) ** 0.5
    den = sum(ga[n].norm() ** 2 for n in ga) ** 0.5
    return {"loss_" + impls[0]: la, "loss_" + impls[1]: lb, "grad_rel_err_total": (num / den).item(),
            "worst": errs[:8]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="40m", choices=sorted(qr.PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ARCH.KEY=VALUE")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=40, help="AdamW steps with the second impl first")
    p.add_argument("--batch", type=int, default=16, help="sequences per training step")
    p.add_argument("--check-batch", type=int, default=4, help="sequences in the compared batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--impls", nargs=2, default=["chunked", "fused"], metavar=("REFERENCE", "FAST"))
    p.add_argument("--cache-dir", default="~/.cache/longvq")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if "fused" in args.impls and device.type != "cuda":
        print("error: --impls ... fused needs a CUDA GPU; on the CPU use --impls chunked dense", file=sys.stderr)
        return 2
    set_tf32(False)
    cfg = tp.model_configs(qr.PRESETS[args.preset], args.overrides)["longvq"]
    torch.manual_seed(args.seed)
    model = LanguageModel(cfg).to(device)
    sampler = WindowSampler(load_stream(DataConfig(dataset="stdlib", cache_dir=args.cache_dir), "train").tokens,
                            args.context, args.seed)
    consumed = 0

    def batch(n):
        nonlocal consumed
        x, y = sampler.samples(consumed, n)
        consumed += n
        return x.to(device), y.to(device)

    bf16 = device.type == "cuda"
    for block in model.blocks:
        block.mixer.impl = args.impls[1]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.1)
    log = []
    for step in range(1, args.train_steps + 1):
        x, y = batch(args.batch)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = model(x, targets=y)
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.apply_codebook_updates()
        log.append(round(out.loss.item(), 4))
        if step % 10 == 0 or step == args.train_steps:
            print(f"train step {step}: loss {log[-1]}", flush=True)
    x, y = batch(args.check_batch)
    result = {"argv": argv if argv is not None else sys.argv[1:], "device": tp.device_name(device),
              "torch": torch.__version__, "impls": args.impls, "train_loss": log}
    for name, autocast in (("bf16", True), ("fp32", False)):
        if autocast and not bf16:
            continue
        r = compare(model, x, y, args.impls, autocast, device)
        result[name] = r
        print(f"{name}: loss {args.impls[0]} {r['loss_' + args.impls[0]]:.6f}, {args.impls[1]} "
              f"{r['loss_' + args.impls[1]]:.6f}; gradients: total rel. error {r['grad_rel_err_total']:.2e}")
        for n, e in r["worst"][:4]:
            print(f"    {n}: {e:.2e}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
