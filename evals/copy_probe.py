"""Copy probe: can a model retrieve an exact token from a given distance back?

    python -m evals.copy_probe --period 48 [--steps 400] [--variants transformer longvq longvq+local_raw_keys=true]
        [--context 128] [--chunk-size 16] [--codebook-size 32] [--json OUT]

Sequences of random tokens (vocabulary 32) that repeat with period P: every token after the first period
equals the one P positions back, so it can be predicted only by looking back exactly P tokens. A tiny
model of each variant (2 layers, d_model 64; `longvq+key=value` sets `model.longvq.key`) trains on fresh
sequences for --steps steps; then the mean loss on the repeated part of held-out sequences is reported
next to the loss on the first period (chance: ln 32 = 3.47). For LongVQ the distance P decides the path:
P < C reaches the token in the own chunk, C <= P < 2C mostly the previous chunk (exact keys), P >= 2C
only the code cache, where values are averaged over every key of a code. CPU, a minute per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from lm.config import DataConfig, LongVQConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, TransformerConfig
from lm.engine import TorchEngine, TrainLoop, eval_mode, token_nll
from lm.optim import StepSchedule

VOCAB = 32


def _batch(gen: torch.Generator, batch: int, context: int, period: int):
    base = torch.randint(0, VOCAB, (batch, period), generator=gen)
    x = base.repeat(1, context // period + 2)[:, :context + 1]
    return x[:, :-1], x[:, 1:]


def _config(variant: str, args) -> ModelConfig:
    arch, *sets = variant.split("+")
    if arch not in ("transformer", "longvq"):
        raise ValueError(f"variant {variant!r} must start with 'transformer' or 'longvq'")
    lv = LongVQConfig(attention_impl="chunked", chunk_size=args.chunk_size, codebook_size=args.codebook_size,
                      n_heads=2, z_dim=64, ema_dim=8)
    for item in sets:
        key, _, value = item.partition("=")
        if not hasattr(lv, key):
            raise ValueError(f"unknown model.longvq key {key!r} in variant {variant!r}")
        old = getattr(lv, key)
        setattr(lv, key, value == "true" if isinstance(old, bool) else type(old)(value))
    return ModelConfig(arch=arch, vocab_size=VOCAB, d_model=64, n_layers=2, longvq=lv,
                       transformer=TransformerConfig(n_heads=2))


class PeriodicTokens:
    """Sampler (lm.engine.TrainLoop's interface) of fresh period-P sequences, deterministic in the samples consumed."""

    def __init__(self, context: int, period: int, seed: int):
        self.context, self.period, self.seed = context, period, seed

    def micro_batch(self, consumed: int, micro: int, rank: int, dp: int, batch: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + consumed + (micro * dp + rank) * batch)
        return _batch(g, batch, self.context, self.period)


def probe(variant: str, args) -> dict:
    cfg = RunConfig(model=_config(variant, args),
                    optim=OptimConfig(lr=args.lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.01, grad_clip=0.0),
                    train=TrainConfig(seed=args.seed, micro_batch_size=args.batch, max_steps=args.steps, precision="fp32"),
                    data=DataConfig(seq_len=args.context))
    engine = TorchEngine(cfg, device=torch.device("cpu"))
    loop = TrainLoop(engine, PeriodicTokens(args.context, args.period, args.seed + 1), StepSchedule(cfg.optim, args.steps),
                     micro_batch_size=args.batch, max_steps=args.steps)
    t0 = time.perf_counter()
    engine.train()
    while not loop.done():
        loop.step()
    model = engine.module
    x, y = _batch(torch.Generator().manual_seed(10_000 + args.seed), 64, args.context, args.period)
    with eval_mode(model), torch.no_grad():
        nll = token_nll(model(x).logits, y)
    P = args.period
    return {"variant": variant, "period": P, "steps": args.steps, "first_period_loss": float(nll[:, :P - 1].mean()),
            "repeat_loss": float(nll[:, P:].mean()), "chance": math.log(VOCAB), "train_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.copy_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--period", type=int, required=True, help="copy distance P (tokens)")
    p.add_argument("--variants", nargs="+", default=["transformer", "longvq"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--codebook-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not 1 <= args.period < args.context:
        p.error("--period must be in [1, --context)")
    rows = []
    for variant in args.variants:
        try:
            row = probe(variant, args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        rows.append(row)
        print(f"{variant:36s} P={row['period']}: loss on the first period {row['first_period_loss']:.3f}, on repeats "
              f"{row['repeat_loss']:.3f} (chance {row['chance']:.3f}) [{row['train_s']:.0f}s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
