"""Whole-model checks of the fast paths against their references, at a real training shape.

    python -m evals.fused_gradcheck [--recipe launch/configs/longvq_40m.yaml] [key=value ...] [--context 4096]
        [--train-steps 40] [--batch 16] [--check-batch 4] [--impls chunked fused] [--out FILE.json]
    python -m evals.fused_gradcheck --bf16-vs-fp32 [--recipe launch/configs/longvq_125m.yaml] [--context 4096]
        [--train-steps 40] [--batch 8] [--out FILE.json]

Default mode: the kernel tests (tests/ops/) compare each fused kernel with its reference on random tensors
at small shapes. This trains a LongVQ recipe (default: the quality race's 40m) for a few steps with the second
implementation through the trainer's step (lm.engine, plain-torch engine, bf16 autocast on GPU), so that
activations, codebooks and keys are those of real training, then computes the loss and every parameter
gradient on fresh training windows once with each implementation (bf16 autocast where the device has it,
then fp32) and prints the relative error ||g_b - g_a|| / ||g_a|| in total and for the worst parameters. On
the CPU, `--impls chunked dense` checks the chunked reference against the dense oracle the same way.

--bf16-vs-fp32: the whole fast path (bf16-mixed, every fused kernel) against the fp32 reference path, trained
side by side from the same weights on the same batches (lm.bench.gradcheck.fast_vs_reference, which declares
the tolerances): the first batch's gradients and every step's loss. Exit status 1 when a check fails.
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
from lm.bench.gradcheck import compare_impls, fast_vs_reference


DEFAULT_RECIPE, DEFAULT_BATCH = "launch/configs/longvq_40m.yaml", 16


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides of the recipe")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"default {DEFAULT_RECIPE} (--bf16-vs-fp32: longvq_125m)")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=40, help="AdamW steps with the second impl first")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="sequences per training step (--bf16-vs-fp32: 8)")
    p.add_argument("--check-batch", type=int, default=4, help="sequences in the compared batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--impls", nargs=2, default=["chunked", "fused"], metavar=("REFERENCE", "FAST"))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    p.add_argument("--bf16-vs-fp32", action="store_true",
                   help="train the fast bf16 path and the fp32 reference path side by side (see above)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.bf16_vs_fp32:
        return bf16_vs_fp32(args, argv, device)
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
        r = compare_impls(model, x, y, args.impls, autocast, device)
        result[name] = r
        print(f"{name}: loss {args.impls[0]} {r['loss_' + args.impls[0]]:.6f}, {args.impls[1]} "
              f"{r['loss_' + args.impls[1]]:.6f}; gradients: total rel. error {r['grad_rel_err_total']:.2e}")
        for n, e in r["worst"][:4]:
            print(f"    {n}: {e:.2e}")
    if args.out:
        write_json(args.out, result)
    return 0


def bf16_vs_fp32(args, argv, device) -> int:
    recipe = args.recipe if args.recipe != DEFAULT_RECIPE else "launch/configs/longvq_125m.yaml"
    batch = args.batch if args.batch != DEFAULT_BATCH else 8
    overrides = [*args.overrides, f"data.seq_len={args.context}", f"train.micro_batch_size={batch}",
                 "train.grad_accum_steps=1", f"optim.lr={args.lr}", f"train.seed={args.seed}"]
    try:
        cfg = load_config(recipe, overrides=overrides)
        if cfg.model.arch != "longvq":
            raise ConfigError(f"{recipe} is a {cfg.model.arch} recipe; give a LongVQ recipe")
        sampler = WindowSampler(load_stream(cfg.data, "train").tokens, args.context, args.seed)
        result = fast_vs_reference(recipe, overrides, sampler, steps=args.train_steps, batch=batch, device=device)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"argv": argv if argv is not None else sys.argv[1:], "device": device_name(device),
              "torch": torch.__version__, "recipe": recipe, **result}
    print(f"loss: worst relative difference over {args.train_steps} steps {result['loss_rel_diff_max']:.2e}; "
          f"checks {result['checks']}: {'passed' if result['passed'] else 'FAILED'}")
    if args.out:
        write_json(args.out, result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
