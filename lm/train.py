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

from lm import checkpoint
from lm.config import ConfigError, RunConfig, dump_config, load_config
from lm.data import WindowSampler, load_stream
from lm.metrics import MetricsLogger, attention_mass_scalars, flops_per_token, peak_flops, summarize_codebooks
from lm.model import build_model
from lm.optim import param_groups, scheduler_factory
from lm.parallel.activation_checkpointing import apply_activation_checkpointing
from lm.parallel.compile import maybe_compile, set_tf32
from lm.parallel.deepspeed_config import build_deepspeed_config, use_bf16
from lm.parallel.dist import all_reduce_codebook_stats, ensure_launcher_env, init_distributed, shutdown_distributed
from lm.parallel.topology import describe_topology
from lm.preemption import PreemptionWatcher

log = logging.getLogger("lm.train")


class NonFiniteLoss(RuntimeError):
    pass


class CheckpointSaveFailed(RuntimeError):
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


@torch.no_grad()
def grad_norm_of(module: torch.nn.Module) -> float:
    grads = [p.grad.float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


@torch.no_grad()
def evaluate_loss(model, sampler: WindowSampler, batches: int, batch_size: int, device, loss_chunk_tokens: int = 0) -> float:
    """Mean held-out loss over the first `batches` fixed windows (cheap in-training signal)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(batches):
        start = b * batch_size
        if start + batch_size > sampler.n_windows:
            break
        x, y = sampler.samples(start, batch_size)
        total += model(x.to(device), targets=y.to(device), loss_chunk_tokens=loss_chunk_tokens).loss.item()
        count += 1
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def _attention_mass(model, sampler: WindowSampler, device) -> dict:
    """Share of attention mass on the code cache vs the local window, on one held-out window."""
    was_training = model.training
    model.eval()
    try:
        return attention_mass_scalars(model, sampler.samples(0, 1)[0].to(device))
    finally:
        model.train(was_training)


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

    def __init__(self, cfg: RunConfig, resume: str | None = None):
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
        self.ckpt_root = Path(cfg.train.run_dir) / "checkpoints"
        self.resume_plan = self._plan_resume(resume) if resume else None
        # A pipeline checkpoint keeps the pipeline layout (parameter names) even on one stage.
        self.pipelined = self.pp > 1 or bool(self.resume_plan and self.resume_plan["layout"] == "pipeline")

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model)
        self.n_params = model.num_params()
        maybe_compile(model, cfg.train.compile, cfg.train.compile_backend)
        set_tf32(cfg.train.tf32)
        if cfg.parallel.activation_checkpointing:
            apply_activation_checkpointing(model.blocks, cfg.parallel.activation_checkpointing_blocks)
        if self.pipelined:
            from lm.parallel.pipeline import PipelineLoss, build_pipeline, pipeline_quantizers

            self.loss_fn = PipelineLoss()
            net = build_pipeline(model, self.pp, self.loss_fn)
            self.quantizers = pipeline_quantizers(net)
        else:
            net, self.loss_fn = model, None
            self.quantizers = model.named_quantizers()
        self.ds_config = build_deepspeed_config(cfg.train, cfg.optim, cfg.parallel, self.dp, self.on_gpu)
        if self.resume_plan and self.resume_plan["universal"]:
            self.ds_config["checkpoint"] = {"load_universal": True}
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=net, model_parameters=param_groups(net, cfg.optim.weight_decay), config=self.ds_config,
            lr_scheduler=scheduler_factory(cfg.optim, cfg.train.max_steps))
        for _, vq in self.quantizers:
            vq.keep_fp32()
        if self.pipelined:
            grid = self.engine.grid
            self.dp_rank, self.dp_group = grid.get_data_parallel_rank(), grid.get_data_parallel_group()
        else:
            self.dp_rank, self.dp_group = self.rank, None
        self.step, self.consumed = 0, 0
        self.nonfinite_events = 0
        self.stop_requested = False  # set by SIGTERM/SIGUSR1: finish the step, save, exit 0
        self.last_saved = None  # (root, tag) of the newest checkpoint this run can roll back to
        if self.resume_plan:
            self._load(self.resume_plan)

    # -- checkpoints -----------------------------------------------------------------------
    def _plan_resume(self, resume: str) -> dict | None:
        """Find and verify the checkpoint on rank 0, decide how to load it, and tell every rank."""
        plan, error = None, None
        if self.rank == 0:
            try:
                plan = self._find_checkpoint(resume)
            except (checkpoint.CheckpointError, ConfigError) as exc:
                error = str(exc)
        box = [plan, error]
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.broadcast_object_list(box, src=0)
        plan, error = box
        if error:
            raise checkpoint.CheckpointError(error)
        if plan and plan["universal"] and self.rank == 0 and plan.get("convert"):
            checkpoint.to_universal(Path(plan["root"]), plan["tag"])
        if tdist.is_initialized():
            tdist.barrier()
        if plan and plan["universal"]:
            plan["load_root"] = str(Path(plan["root"]) / "universal")
        return plan

    def _find_checkpoint(self, resume: str) -> dict | None:
        if resume == "auto":
            root, tag = self.ckpt_root, checkpoint.newest_good(self.ckpt_root)
            if tag is None:
                log.info("resume=auto: no complete checkpoint in %s yet, starting fresh", self.ckpt_root)
                return None
        else:
            root, tag = checkpoint.resolve_checkpoint(resume)
            checkpoint.verify(root / tag)
        checkpoint.check_compatible(checkpoint.load_checkpoint_config(root, tag), self.cfg, root / tag)
        state = checkpoint.load_trainer_state(root, tag)
        saved = dict(state["topology"])
        saved.setdefault("layout", "pipeline" if saved["pipeline_stages"] > 1 else "plain")
        layout = "pipeline" if (self.pp > 1 or saved["layout"] == "pipeline") else "plain"
        now = {"world_size": self.world, "zero_stage": self.cfg.parallel.zero_stage, "pipeline_stages": self.pp,
               "layout": layout}
        if saved["layout"] == "plain" and layout == "pipeline":
            raise checkpoint.CheckpointError(
                f"{root / tag} was saved without pipeline parallelism; resume it with parallel.pipeline_stages=1, "
                f"or export it (`python -m lm.checkpoint export {root / tag} OUT`) and start the pipeline run from that")
        same = saved == now
        if not same and saved["zero_stage"] != now["zero_stage"]:
            raise checkpoint.CheckpointError(
                f"{root / tag} was saved with ZeRO-{saved['zero_stage']}; resume it with parallel.zero_stage="
                f"{saved['zero_stage']} (any number of processes), or export the weights with "
                f"`python -m lm.checkpoint export {root / tag} OUT` and start a new run from them")
        universal = not same and saved["zero_stage"] >= 1
        if not same and not universal and saved["pipeline_stages"] != self.pp:
            raise checkpoint.CheckpointError(
                f"{root / tag} is a ZeRO-0 pipeline checkpoint ({saved['pipeline_stages']} stages); DeepSpeed can "
                f"reshard pipelines only from ZeRO >= 1: resume with parallel.pipeline_stages={saved['pipeline_stages']}")
        log.info("resuming from %s (saved on %s, now %s%s)", root / tag, saved, now,
                 "; converting to a universal checkpoint" if universal else "")
        return {"root": str(root), "tag": tag, "load_root": str(root), "universal": universal, "convert": universal,
                "layout": layout}

    def _load(self, plan: dict) -> None:
        checkpoint.load(self.engine, Path(plan["load_root"]), plan["tag"])
        state = checkpoint.load_trainer_state(Path(plan["root"]), plan["tag"])
        self.step, self.consumed = state["step"], state["consumed_samples"]
        self.nonfinite_events = int(state.get("nonfinite_events", 0))
        checkpoint.restore_rng(state)
        self.last_saved = (Path(plan["root"]), plan["tag"])
        if self.rank == 0:
            log.info("resumed at step %d (%d samples consumed)", self.step, self.consumed)

    def save(self) -> Path:
        cfg = self.cfg
        path = checkpoint.save(self.engine, cfg, self.ckpt_root, self.step, self.consumed, self.world,
                               self.rank == 0, cfg.train.keep_last, extra={"nonfinite_events": self.nonfinite_events},
                               layout="pipeline" if self.pipelined else "plain")
        self.last_saved = (self.ckpt_root, path.name)
        return path

    def _nonfinite(self, where: str) -> None:
        """Count a non-finite loss; halt when the policy says so or the budget is spent."""
        policy = self.cfg.train.on_nonfinite
        self.nonfinite_events += 1
        if policy == "halt" or self.nonfinite_events > self.cfg.train.max_skipped_steps:
            why = "train.on_nonfinite=halt" if policy == "halt" else f"more than train.max_skipped_steps={self.cfg.train.max_skipped_steps} events"
            raise NonFiniteLoss(f"non-finite loss at step {self.step + 1} ({where}); stopping ({why})")
        if self.rank == 0:
            log.warning("non-finite loss at step %d (%s): %s (event %d of at most %d)", self.step + 1, where,
                        policy, self.nonfinite_events, self.cfg.train.max_skipped_steps)

    def _rollback(self) -> None:
        """Reload the last good checkpoint; keep going past the data consumed so far (the bad batch included)."""
        if self.last_saved is None:
            if self.rank == 0:
                log.warning("rollback requested but no checkpoint exists yet: the step was skipped instead")
            return
        root, tag = self.last_saved
        consumed = self.consumed
        events = self.nonfinite_events
        self._load({"root": str(root), "tag": tag, "load_root": str(root), "universal": False, "layout": None})
        self.consumed, self.nonfinite_events = consumed, events

    # -- one optimizer step ----------------------------------------------------------------
    def train_step(self, sampler: WindowSampler) -> dict:
        cfg, engine = self.cfg, self.engine
        micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
        batches = [sampler.micro_batch(self.consumed, m, self.dp_rank, self.dp, micro) for m in range(accum)]
        grad_norm = None
        bad = 0.0  # non-finite micro-batches seen by this rank
        if self.pipelined:
            engine.train_batch(data_iter=iter(batches))
            ce_sum, aux_sum, count = self.loss_fn.pop()  # non-zero on the last stage only
            bad = float(not math.isfinite(ce_sum + aux_sum))
        else:
            ce_sum, aux_sum, count = 0.0, 0.0, 0
            fallback_norm = cfg.parallel.zero_stage == 0 and not use_bf16(cfg.train, self.on_gpu)
            for m, (x, y) in enumerate(batches):
                out = engine(x.to(self.device), targets=y.to(self.device), loss_chunk_tokens=cfg.train.loss_chunk_tokens)
                ce = out.loss
                loss = ce + out.aux_loss
                if torch.isfinite(loss.detach()):
                    engine.backward(loss)
                    ce_sum += ce.item()
                    aux_sum += float(out.aux_loss.detach())
                    count += 1
                else:  # every rank learns of it through the all-reduce below, then all halt/skip together
                    bad += 1  # this micro-batch contributes an exact zero gradient
                    engine.backward(sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * 0.0)
                if m == accum - 1:
                    if fallback_norm:  # DeepSpeed records no grad norm for fp32 ZeRO-0
                        grad_norm = grad_norm_of(engine.module)
                    if _sum_over_world([bad], self.device)[0] > 0:
                        for group in engine.optimizer.param_groups:
                            group["lr"] = 0.0  # no parameter update this step (the scheduler restores the lr)
                engine.step()
        ce_sum, aux_sum, count, bad_total, stop = _sum_over_world([ce_sum, aux_sum, count, bad, float(self.stop_requested)], self.device)
        self.stop_requested = stop > 0
        all_reduce_codebook_stats([vq for _, vq in self.quantizers], self.dp_group)
        if bad_total > 0 or count == 0:
            for _, vq in self.quantizers:  # statistics of a skipped step are dropped with it
                vq.reset_stats()
            self._nonfinite(f"{int(bad_total)} non-finite micro-batch(es)")
            self.step += 1
            self.consumed += micro * accum * self.dp
            if cfg.train.on_nonfinite == "rollback":
                self._rollback()
            return {"train/nonfinite_events": float(self.nonfinite_events), "train/skipped": 1.0}
        loss = ce_sum / count
        scalars = {"train/loss": loss, "train/commit_loss": aux_sum / count, "train/lr": self.scheduler.get_last_lr()[0]}
        if self.quantizers or self.pipelined:
            scalars.update(summarize_codebooks(_codebook_metrics(self.quantizers, gather=self.pp > 1)))
        for _, vq in self.quantizers:
            vq.apply_update()
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        scalars["train/nonfinite_events"] = float(self.nonfinite_events)
        self.step += 1
        self.consumed += micro * accum * self.dp
        return scalars


def train(cfg: RunConfig, resume: str | None = None) -> dict:
    """Run training; returns a summary (final step, losses, codebooks) for scripts and tests."""
    run_dir = Path(cfg.train.run_dir)
    trainer = Trainer(cfg, resume=resume)
    rank, is_rank0 = trainer.rank, trainer.rank == 0
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

    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    tokens_per_step = micro * accum * trainer.dp * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, trainer.n_params, cfg.data.seq_len)
    peak = peak_flops(torch.cuda.get_device_name()) if trainer.on_gpu else None
    metrics = MetricsLogger(run_dir, enabled=is_rank0, total_steps=cfg.train.max_steps, start_step=trainer.step,
                            progress_bar=cfg.train.progress_bar)
    metrics.text("config/deepspeed", json.dumps(trainer.ds_config, indent=1))
    if is_rank0:
        log.info("model %s: %.2fM parameters; %s; precision %s", cfg.model.arch, trainer.n_params / 1e6,
                 describe_topology(cfg, trainer.world), "bf16" if use_bf16(cfg.train, trainer.on_gpu) else "fp32")
        log.info("deepspeed config: %s", json.dumps(trainer.ds_config))

    # SIGTERM / SIGUSR1 / SIGINT or RUN_DIR/SAVE_AND_EXIT: finish the step, save, exit 0 (lm/preemption.py)
    watcher = PreemptionWatcher(run_dir, owner=is_rank0)
    watcher.install()
    losses, preempted, saved_step = [], False, None
    trainer.engine.train()
    last_time = time.perf_counter()
    try:
        while trainer.step < cfg.train.max_steps:
            # read once per step: this rank's input to the step's all-reduce; the loop stops on the reduced value
            trainer.stop_requested = watcher.requested
            scalars = trainer.train_step(sampler)
            step = trainer.step
            now = time.perf_counter()
            dt, last_time = now - last_time, now
            if "train/loss" in scalars:
                losses.append(scalars["train/loss"])
                scalars["train/step_time_s"] = dt
                scalars["train/tokens_per_s"] = tokens_per_step / dt
                scalars["train/tokens_per_s_per_gpu"] = tokens_per_step / dt / trainer.world
                if peak:
                    scalars["train/mfu"] = fpt * tokens_per_step / dt / trainer.world / peak
                if valid_sampler is not None and step % cfg.train.eval_every == 0:
                    scalars["valid/loss"] = evaluate_loss(trainer.engine.module, valid_sampler, cfg.train.eval_batches,
                                                          micro, trainer.device, cfg.train.loss_chunk_tokens)
                    scalars["valid/bpb"] = scalars["valid/loss"] / math.log(2)
                    scalars.update(_attention_mass(trainer.engine.module, valid_sampler, trainer.device))
            metrics.step(step, scalars, log_scalars=(step % cfg.train.log_every == 0 or step == cfg.train.max_steps))
            if trainer.stop_requested:
                preempted = True
                break
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
                trainer.save()
                saved_step = step
        if cfg.train.max_steps > 0 and saved_step != trainer.step:
            path = trainer.save()
            if is_rank0:
                log.info("%scheckpoint: %s", "preempted; " if preempted else "", path)
    except OSError as exc:
        last = trainer.last_saved
        raise CheckpointSaveFailed(
            f"saving a checkpoint failed ({exc}); nothing was published as 'latest'"
            + (f"; the last good checkpoint is {last[0] / last[1]}" if last else "")) from exc
    finally:
        watcher.uninstall()
        metrics.close()
    return {"step": trainer.step, "consumed_samples": trainer.consumed, "losses": losses, "run_dir": str(run_dir),
            "rank": rank, "preempted": preempted, "nonfinite_events": trainer.nonfinite_events,
            "codebooks": {i: vq.c_sum.detach().cpu().clone() for i, vq in trainer.quantizers}}


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
        shutdown_distributed()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"training halted: {exc}; lower optim.lr or check the data, or set train.on_nonfinite=skip|rollback; "
              f"the last good checkpoint is under {Path(cfg.train.run_dir) / 'checkpoints'}", file=sys.stderr)
        return 3
    except (checkpoint.CheckpointError, CheckpointSaveFailed) as exc:
        print(f"checkpoint error: {exc}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
