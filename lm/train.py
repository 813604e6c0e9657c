"""Training entry point.

    python -m lm.train CONFIG.yaml [MORE.yaml ...] [dotted.key=value ...] [--resume auto|PATH] [--dry-run]

Works as a plain process (one CPU or GPU), under torchrun/srun, and under the `deepspeed` launcher.
Topology: data parallel x pipeline (`parallel.pipeline_stages`), ZeRO stage `parallel.zero_stage`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from lm import checkpoint
from lm.config import ConfigError, RunConfig, dump_config, load_config
from lm.data import WindowSampler, load_stream
from lm.metrics import MetricsLogger, flops_per_token, peak_flops, summarize_codebooks
from lm.model import build_model
from lm.optim import param_groups, scheduler_factory
from lm.parallel.activation_checkpointing import apply_activation_checkpointing
from lm.parallel.deepspeed_config import build_deepspeed_config, use_bf16
from lm.parallel.dist import all_reduce_codebook_stats, ensure_launcher_env, init_distributed
from lm.parallel.topology import describe_topology

log = logging.getLogger("lm.train")


class NonFiniteLoss(RuntimeError):
    pass


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m lm.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="+", help="YAML recipes, then dotted key=value overrides")
    p.add_argument("--resume", default=None, help="'auto' (newest checkpoint in train.run_dir, if any) or a path")
    p.add_argument("--dry-run", action="store_true", help="print the resolved topology and memory estimate, then exit")
    p.add_argument("--world-size", type=int, default=None, help="--dry-run: GPUs to plan for (default: $WORLD_SIZE or 1)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_intermixed_args(argv)
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
        total += cross_entropy(model(x.to(device)).logits, y.to(device)).item()
        count += 1
    model.train(was_training)
    return total / max(count, 1)


def _sum_over_world(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t)
    return t.tolist()


def _codebook_metrics(quantizers, gather: bool) -> dict:
    """Per-layer codebook health from this step's (already data-parallel-summed) statistics."""
    local = {f"layer{i}/{k}": v for i, vq in quantizers for k, v in vq.step_metrics().items()}
    if gather and tdist.is_initialized() and tdist.get_world_size() > 1:  # pipeline: layers live on other ranks
        parts = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, local)
        local = {k: v for part in parts for k, v in part.items()}
    return local


class Trainer:
    """Builds the engine for the configured topology and runs optimizer steps."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        ensure_launcher_env()
        deepspeed = init_distributed()
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.pp = cfg.parallel.pipeline_stages
        if self.world % self.pp:
            raise ConfigError(f"parallel.pipeline_stages={self.pp} does not divide the {self.world} processes")
        self.dp = self.world // self.pp

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        self.n_params = model.num_params()
        if cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model.blocks)
        if self.pp > 1:
            from lm.parallel.pipeline import PipelineLoss, build_pipeline, pipeline_quantizers

            self.loss_fn = PipelineLoss()
            net = build_pipeline(model, self.pp, self.loss_fn)
            self.quantizers = pipeline_quantizers(net)
        else:
            net, self.loss_fn = model, None
            self.quantizers = model.named_quantizers()
        self.ds_config = build_deepspeed_config(cfg.train, cfg.optim, cfg.parallel, self.dp, self.on_gpu)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=net, model_parameters=param_groups(net, cfg.optim.weight_decay), config=self.ds_config,
            lr_scheduler=scheduler_factory(cfg.optim, cfg.train.max_steps))
        for _, vq in self.quantizers:
            vq.keep_fp32()
        if self.pp > 1:
            grid = self.engine.grid
            self.dp_rank, self.dp_group = grid.get_data_parallel_rank(), grid.get_data_parallel_group()
        else:
            self.dp_rank, self.dp_group = self.rank, None
        self.step, self.consumed = 0, 0

    # -- state -----------------------------------------------------------------------------
    def resume(self, resume: str, ckpt_root: Path) -> None:
        if resume == "auto":
            if not (ckpt_root / "latest").is_file():
                if self.rank == 0:
                    log.info("resume=auto: no checkpoint in %s yet, starting fresh", ckpt_root)
                return
            target = (ckpt_root, None)
        else:
            target = checkpoint.resolve_checkpoint(resume)
        state = checkpoint.load(self.engine, target[0], target[1])
        self.step, self.consumed = state["step"], state["consumed_samples"]
        checkpoint.restore_rng(state)
        if self.rank == 0:
            log.info("resumed at step %d (%d samples consumed)", self.step, self.consumed)

    # -- one optimizer step ----------------------------------------------------------------
    def train_step(self, sampler: WindowSampler) -> dict:
        cfg, engine = self.cfg, self.engine
        micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
        batches = [sampler.micro_batch(self.consumed, m, self.dp_rank, self.dp, micro) for m in range(accum)]
        grad_norm = None
        if self.pp > 1:
            engine.train_batch(data_iter=iter(batches))
            ce_sum, aux_sum, count = self.loss_fn.pop()  # non-zero on the last stage only
        else:
            ce_sum, aux_sum, count = 0.0, 0.0, 0
            fallback_norm = cfg.parallel.zero_stage == 0 and not use_bf16(cfg.train, self.on_gpu)
            for m, (x, y) in enumerate(batches):
                out = engine(x.to(self.device))
                ce = cross_entropy(out.logits, y.to(self.device))
                loss = ce + out.aux_loss
                if not torch.isfinite(loss.detach()):
                    raise NonFiniteLoss(f"non-finite loss {loss.item()} at step {self.step + 1} (micro-batch {m})")
                engine.backward(loss)
                if m == accum - 1 and fallback_norm:  # DeepSpeed records no grad norm for fp32 ZeRO-0
                    grad_norm = grad_norm_of(engine.module)
                engine.step()
                ce_sum += ce.item()
                aux_sum += float(out.aux_loss.detach())
                count += 1
        ce_sum, aux_sum, count = _sum_over_world([ce_sum, aux_sum, count], self.device)
        loss = ce_sum / count
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss {loss} at step {self.step + 1}")
        all_reduce_codebook_stats([vq for _, vq in self.quantizers], self.dp_group)
        scalars = {"train/loss": loss, "train/commit_loss": aux_sum / count, "train/lr": self.scheduler.get_last_lr()[0]}
        if self.quantizers or self.pp > 1:
            scalars.update(summarize_codebooks(_codebook_metrics(self.quantizers, gather=self.pp > 1)))
        for _, vq in self.quantizers:
            vq.apply_update()
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        self.step += 1
        self.consumed += micro * accum * self.dp
        return scalars


def train(cfg: RunConfig, resume: str | None = None) -> dict:
    """Run training; returns a summary (final step, losses, codebooks) for scripts and tests."""
    trainer = Trainer(cfg)
    rank, is_rank0 = trainer.rank, trainer.rank == 0
    run_dir = Path(cfg.train.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    train_stream = load_stream(cfg.data, "train")
    if train_stream.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data has vocab {train_stream.vocab_size} but model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    sampler = WindowSampler(train_stream.tokens, cfg.data.seq_len, cfg.train.seed)
    valid_sampler = None
    if cfg.train.eval_every and trainer.pp == 1:
        valid_sampler = WindowSampler(load_stream(cfg.data, "valid").tokens, cfg.data.seq_len, seed=0)
    if resume:
        trainer.resume(resume, ckpt_root)

    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    tokens_per_step = micro * accum * trainer.dp * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len, trainer.n_params)
    peak = peak_flops(torch.cuda.get_device_name()) if trainer.on_gpu else None
    metrics = MetricsLogger(run_dir, enabled=is_rank0, total_steps=cfg.train.max_steps, start_step=trainer.step,
                            progress_bar=cfg.train.progress_bar)
    metrics.text("config/deepspeed", json.dumps(trainer.ds_config, indent=1))
    if is_rank0:
        log.info("model %s: %.2fM parameters; %s; precision %s", cfg.model.arch, trainer.n_params / 1e6,
                 describe_topology(cfg, trainer.world), "bf16" if use_bf16(cfg.train, trainer.on_gpu) else "fp32")
        log.info("deepspeed config: %s", json.dumps(trainer.ds_config))

    losses = []
    trainer.engine.train()
    last_time = time.perf_counter()
    while trainer.step < cfg.train.max_steps:
        scalars = trainer.train_step(sampler)
        step = trainer.step
        losses.append(scalars["train/loss"])
        now = time.perf_counter()
        dt, last_time = now - last_time, now
        scalars["train/step_time_s"] = dt
        scalars["train/tokens_per_s"] = tokens_per_step / dt
        scalars["train/tokens_per_s_per_gpu"] = tokens_per_step / dt / trainer.world
        if peak:
            scalars["train/mfu"] = fpt * tokens_per_step / dt / trainer.world / peak
        if valid_sampler is not None and step % cfg.train.eval_every == 0:
            scalars["valid/loss"] = evaluate_loss(trainer.engine.module, valid_sampler, cfg.train.eval_batches, micro, trainer.device)
            scalars["valid/bpb"] = scalars["valid/loss"] / math.log(2)
        metrics.step(step, scalars, log_scalars=(step % cfg.train.log_every == 0 or step == cfg.train.max_steps))
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
            checkpoint.save(trainer.engine, cfg, ckpt_root, step, trainer.consumed, trainer.world, is_rank0, cfg.train.keep_last)

    if cfg.train.max_steps > 0:
        path = checkpoint.save(trainer.engine, cfg, ckpt_root, trainer.step, trainer.consumed, trainer.world,
                               is_rank0, cfg.train.keep_last)
        if is_rank0:
            log.info("checkpoint: %s", path)
    metrics.close()
    return {"step": trainer.step, "consumed_samples": trainer.consumed, "losses": losses, "run_dir": str(run_dir),
            "rank": rank, "codebooks": {i: vq.c_sum.detach().cpu().clone() for i, vq in trainer.quantizers}}


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(*args.configs, overrides=args.overrides)
        if args.dry_run:
            from lm.parallel.topology import dry_run_report

            print(dry_run_report(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1"))))
            return 0
        train(cfg, resume=args.resume)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"training halted: {exc}; lower optim.lr or check the data; the last good checkpoint is under "
              f"{Path(cfg.train.run_dir) / 'checkpoints'}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
