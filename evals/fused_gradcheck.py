"""Whole-model check of a fast attention path against its reference, at a real training shape.

    python -m evals.fused_gradcheck [--recipe launch/configs/longvq_40m.yaml] [key=value ...] [--context 4096]
        [--train-steps 40] [--batch 16] [--check-batch 4] [--impls chunked fused] [--out FILE.json]

The kernel tests (tests/ops/) compare the fused kernel with the reference on random tensors at small
shapes. This trains a LongVQ recipe (default: the quality race's 40m) for a few steps with the second
implementation through the trainer's step (lm.engine, plain-torch engine, bf16 autocast on GPU), so that activations, codebooks and keys are those of real training, then computes
the loss and every parameter gradient on fresh training windows once with each implementation (bf16
autocast where the device has it, then fp32) and prints the relative error ||g_b - g_a|| / ||g_a|| in
total and for the worst parameters. Issue 7 used it to rule out a kernel bug as the cause of the quality
gap. On the CPU, `--impls chunked dense` checks the
chunked reference against the dense oracle the same way.
"""

from __future__ import annotations

import argparse
import sys

import torch

from evals.common import pick_device, write_json
from lm.bench.throughput import device_name
from lm.config import ConfigError, load_config
from lm.data import WindowSampler, load_stream
from lm.engine import TorchEngine, TrainLoop
from lm.optim import StepSchedule
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
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides of the recipe")
    p.add_argument("--recipe", default="launch/configs/longvq_40m.yaml")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=40, help="AdamW steps with the second impl first")
    p.add_argument("--batch", type=int, default=16, help="sequences per training step")
    p.add_argument("--check-batch", type=int, default=4, help="sequences in the compared batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--impls", nargs=2, default=["chunked", "fused"], metavar=("REFERENCE", "FAST"))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if "fused" in args.impls and device.type != "cuda":
        print("error: --impls ... fused needs a CUDA GPU; on the CPU use --impls chunked dense", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.recipe, overrides=[*args.overrides, f"data.seq_len={args.context}",
                                                  f"train.micro_batch_size={args.batch}", "train.grad_accum_steps=1",
                                                  f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
                                                  "train.compile=false", f"train.seed={args.seed}",
                                                  f"train.precision={'bf16-mixed' if device.type == 'cuda' else 'fp32'}",
                                                  f"model.longvq.attention_impl={args.impls[1]}"])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.model.arch != "longvq":
        print(f"error: {args.recipe} is a {cfg.model.arch} recipe; give a LongVQ recipe", file=sys.stderr)
        return 2
    engine = TorchEngine(cfg, device=device)
    set_tf32(False)
    model = engine.module
    sampler = WindowSampler(load_stream(cfg.data, "train").tokens, args.context, args.seed)
    loop = TrainLoop(engine, sampler, StepSchedule(cfg.optim, args.train_steps), micro_batch_size=args.batch,
                     max_steps=args.train_steps)
    log = []
    engine.train()
    while not loop.done():
        log.append(round(loop.step().loss, 4))
        if loop.state.step % 10 == 0 or loop.done():
            print(f"train step {loop.state.step}: loss {log[-1]}", flush=True)
    x, y = sampler.samples(loop.state.consumed, args.check_batch)
    x, y = x.to(device), y.to(device)
    result = {"argv": argv if argv is not None else sys.argv[1:], "device": device_name(device),
              "torch": torch.__version__, "recipe": args.recipe, "impls": args.impls, "train_loss": log}
    for name, autocast in (("bf16", True), ("fp32", False)):
        if autocast and device.type != "cuda":
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
