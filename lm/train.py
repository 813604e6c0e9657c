"""Training entry point.

    python -m lm.train CONFIG.yaml [MORE.yaml ...] [dotted.key=value ...] [--resume auto|PATH]

Works as a plain process (one CPU or GPU), under torchrun, and under the `deepspeed` launcher.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lm import checkpoint
from lm.config import ConfigError, RunConfig, dump_config, load_config
from lm.data import WindowSampler, load_stream
from lm.metrics import MetricsLogger, summarize_codebooks
from lm.model import build_model
from lm.optim import param_groups, scheduler_factory
from lm.parallel.deepspeed_config import build_deepspeed_config, use_bf16
from lm.parallel.dist import all_reduce_codebook_stats, ensure_launcher_env, init_distributed

log = logging.getLogger("lm.train")


class NonFiniteLoss(RuntimeError):
    pass


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lm.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="+", help="YAML recipes, then dotted key=value overrides")
    p.add_argument("--resume", default=None, help="'auto' (newest checkpoint in train.run_dir, if any) or a path")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)
    args.configs = [i for i in args.items if "=" not in i]
    args.overrides = [i for i in args.items if "=" in i]
    if not args.configs:
        p.error("give at least one YAML recipe, e.g. launch/configs/quickstart.yaml")
    return args


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def grad_norm_of(module: torch.nn.Module) -> float:
    grads = [p.grad.float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


@torch.no_grad()
def evaluate_loss(model, sampler: WindowSampler, batches: int, batch_size: int, device) -> float:
    """Mean held-out loss over the first `batches` fixed windows (cheap in-training signal)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(batches):
        start = b * batch_size
        if start + batch_size > sampler.n_windows:
            break
        x, y = sampler.samples(start, batch_size)
        out = model(x.to(device))
        total += cross_entropy(out.logits, y.to(device)).item()
        count += 1
    model.train(was_training)
    return total / max(count, 1)


def train(cfg: RunConfig, resume: str | None = None) -> dict:
    """Run training; returns a summary (final step, last losses) for scripts and tests."""
    ensure_launcher_env()
    deepspeed = init_distributed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    is_rank0 = rank == 0
    run_dir = Path(cfg.train.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    torch.manual_seed(cfg.train.seed)
    train_stream = load_stream(cfg.data, "train")
    if train_stream.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data has vocab {train_stream.vocab_size} but model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    sampler = WindowSampler(train_stream.tokens, cfg.data.seq_len, cfg.train.seed)
    valid_sampler = None
    if cfg.train.eval_every:
        valid_sampler = WindowSampler(load_stream(cfg.data, "valid").tokens, cfg.data.seq_len, seed=0)

    model = build_model(cfg.model)
    ds_config = build_deepspeed_config(cfg.train, cfg.optim, cfg.parallel, world, on_gpu)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config,
        lr_scheduler=scheduler_factory(cfg.optim, cfg.train.max_steps))
    for vq in model.quantizers():
        vq.keep_fp32()

    step, consumed = 0, 0
    if resume:
        if resume == "auto":
            found = (ckpt_root / "latest").is_file()
            target = (ckpt_root, None) if found else None
            if is_rank0:
                log.info("resume=auto: %s", f"continuing from {ckpt_root}" if found else "no checkpoint yet, starting fresh")
        else:
            target = checkpoint.resolve_checkpoint(resume)
        if target is not None:
            state = checkpoint.load(engine, target[0], target[1])
            step, consumed = state["step"], state["consumed_samples"]
            checkpoint.restore_rng(state)
            if is_rank0:
                log.info("resumed at step %d (%d samples consumed)", step, consumed)

    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    global_batch = micro * accum * world
    tokens_per_step = global_batch * cfg.data.seq_len
    metrics = MetricsLogger(run_dir, enabled=is_rank0, total_steps=cfg.train.max_steps, start_step=step,
                            progress_bar=cfg.train.progress_bar)
    metrics.text("config/deepspeed", str(ds_config))
    if is_rank0:
        n_params = model.num_params()
        log.info("model %s: %.2fM parameters; world %d; global batch %d x %d tokens; precision %s",
                 cfg.model.arch, n_params / 1e6, world, global_batch, cfg.data.seq_len,
                 "bf16" if use_bf16(cfg.train, on_gpu) else "fp32")

    # DeepSpeed records the global grad norm for ZeRO >= 1 and bf16; plain fp32 ZeRO-0 we measure ourselves.
    fallback_grad_norm = cfg.parallel.zero_stage == 0 and not use_bf16(cfg.train, on_gpu)
    pre_clip_norm = None
    losses = []
    engine.train()
    last_time = time.perf_counter()
    while step < cfg.train.max_steps:
        ce_sum, aux_sum, layer_metrics = 0.0, 0.0, {}
        for m in range(accum):
            x, y = sampler.micro_batch(consumed, m, rank, world, micro)
            out = engine(x.to(device))
            ce = cross_entropy(out.logits, y.to(device))
            loss = ce + out.aux_loss
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLoss(
                    f"non-finite loss {loss.item()} at step {step + 1} (micro-batch {m}); lower optim.lr or "
                    f"check the data; the last good checkpoint is under {ckpt_root}")
            engine.backward(loss)
            if m == accum - 1 and fallback_grad_norm:
                pre_clip_norm = grad_norm_of(engine.module)
            engine.step()
            ce_sum += ce.item() / accum
            aux_sum += float(out.aux_loss.detach()) / accum
            for k, v in out.metrics.items():
                layer_metrics[k] = layer_metrics.get(k, 0.0) + float(v) / accum
        all_reduce_codebook_stats(model.quantizers())
        model.apply_codebook_updates()
        step += 1
        consumed += global_batch
        losses.append(ce_sum)

        now = time.perf_counter()
        dt, last_time = now - last_time, now
        grad_norm = pre_clip_norm if fallback_grad_norm else engine.get_global_grad_norm()
        scalars = {"train/loss": ce_sum, "train/lr": scheduler.get_last_lr()[0],
                   "train/tokens_per_s": tokens_per_step / dt, "train/commit_loss": aux_sum,
                   "train/step_time_s": dt}
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        scalars.update(summarize_codebooks(layer_metrics))
        if valid_sampler is not None and step % cfg.train.eval_every == 0:
            scalars["valid/loss"] = evaluate_loss(engine.module, valid_sampler, cfg.train.eval_batches, micro, device)
            scalars["valid/bpb"] = scalars["valid/loss"] / math.log(2)
        metrics.step(step, scalars, log_scalars=(step % cfg.train.log_every == 0 or step == cfg.train.max_steps))

        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
            checkpoint.save(engine, cfg, ckpt_root, step, consumed, world, is_rank0, cfg.train.keep_last)

    if cfg.train.max_steps > 0:
        path = checkpoint.save(engine, cfg, ckpt_root, step, consumed, world, is_rank0, cfg.train.keep_last)
        if is_rank0:
            log.info("checkpoint: %s", path)
    metrics.close()
    return {"step": step, "consumed_samples": consumed, "losses": losses, "run_dir": str(run_dir)}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(*args.configs, overrides=args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg, resume=args.resume)
    except NonFiniteLoss as exc:
        print(f"training halted: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
