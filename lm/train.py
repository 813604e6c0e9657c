"""Training entry point.

    python -m lm.train CONFIG.yaml [MORE.yaml ...] [dotted.key=value ...] [--resume auto|PATH] [--dry-run]

Works as a plain process (one CPU or GPU), under torchrun/srun, and under the `deepspeed` launcher.
Topology: the mesh world = DP x SP x PP (lm.parallel.topology): data parallel, sequence parallel
(`parallel.sequence_parallel`: each sequence split into that many segments on consecutive ranks) and
pipeline (`parallel.pipeline_stages`), ZeRO stage `parallel.zero_stage` over the DP x SP replicas.
The step itself is lm.engine's (the same code the benchmark times): this module builds the engine, plans
resumes, runs the loop with its checkpoints, evaluations, preemption and non-finite-loss policy, and logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from lm import checkpoint
from lm.config import ConfigError, RunConfig, dump_config, load_config
from lm.data import WindowSampler, load_stream
from lm.engine import DeepSpeedEngine, LoopState, TrainLoop, eval_mode, score
from lm.metrics import MetricsLogger, attention_mass_scalars, flops_per_token, peak_flops, summarize_codebooks
from lm.optim import StepSchedule
from lm.parallel.compile import eager_blocks
from lm.parallel.dist import ensure_launcher_env, init_distributed, shutdown_distributed
from lm.parallel.sequence import exchange_bytes
from lm.parallel.topology import describe_topology, mesh_shape
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
    if args.world_size is not None and args.world_size < 1:
        p.error(f"--world-size must be >= 1, got {args.world_size}")
    return args


class Trainer:
    """Builds the engine for the configured topology, plans resumes and saves checkpoints."""

    def __init__(self, cfg: RunConfig, resume: str | None = None):
        self.cfg = cfg
        ensure_launcher_env()
        init_distributed()
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.dp, self.sp, self.pp = mesh_shape(self.world, cfg)  # ConfigError naming the keys if it does not divide
        self.ckpt_root = Path(cfg.train.run_dir) / "checkpoints"
        self._check_run_dir(resume)
        self.resume_plan = self._plan_resume(resume) if resume else None
        # A pipeline checkpoint keeps the pipeline layout (parameter names) even on one stage.
        pipelined = self.pp > 1 or bool(self.resume_plan and self.resume_plan.layout == "pipeline")
        self.engine = DeepSpeedEngine(cfg, self.world, pipelined=pipelined,
                                      load_universal=bool(self.resume_plan and self.resume_plan.universal))
        self.device = self.engine.device
        self.state = LoopState()
        self.nonfinite_events = 0
        self.last_saved = None  # (root, tag) of the newest checkpoint this run can roll back to
        if self.resume_plan:
            self._load(self.resume_plan)

    @property
    def step(self) -> int:
        return self.state.step

    # -- checkpoints -----------------------------------------------------------------------
    def _on_rank0(self, fn):
        """Run fn on rank 0; its ConfigError/CheckpointError is raised on every rank (none waits in a collective)."""
        box = [None, None]
        if self.rank == 0:
            try:
                box[0] = fn()
            except (checkpoint.CheckpointError, ConfigError) as exc:
                box[1] = (type(exc).__name__, str(exc))
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.broadcast_object_list(box, src=0)
        if box[1]:
            kind, message = box[1]
            raise (ConfigError if kind == "ConfigError" else checkpoint.CheckpointError)(message)
        return box[0]

    def _check_run_dir(self, resume: str | None) -> None:
        """Refuse a run dir that is a file, unwritable, or holds another run's checkpoints (unless --resume or
        train.overwrite=true, which deletes them first)."""
        def check():
            if checkpoint.check_run_dir(self.cfg.train.run_dir, resume, self.cfg.train.overwrite):
                log.warning("train.overwrite=true: deleting the checkpoints in %s", self.ckpt_root)
                checkpoint.clear_checkpoints(self.cfg.train.run_dir)
        self._on_rank0(check)
        if tdist.is_initialized():
            tdist.barrier()

    def _plan_resume(self, resume: str) -> checkpoint.ResumePlan | None:
        """Plan the resume on rank 0 (lm.checkpoint.plan_resume), convert to the universal format there if the
        plan says so, and give every rank the plan."""
        plan = self._on_rank0(lambda: checkpoint.plan_resume(self.cfg, resume, self.world))
        if plan and plan.universal and self.rank == 0:
            checkpoint.to_universal(plan.root, plan.tag)
        if tdist.is_initialized():
            tdist.barrier()
        return plan

    def _load(self, plan: checkpoint.ResumePlan) -> None:
        # a universal checkpoint restores no module buffers (the codebooks): they come from the original folder
        checkpoint.load(self.engine.ds, plan.load_root, plan.tag, buffers_from=plan.root / plan.tag if plan.universal else None)
        self.engine.apply_optim_config(self.cfg.optim)  # the loaded optimizer state holds the saved hyperparameters
        state = checkpoint.load_trainer_state(plan.root, plan.tag)
        s = self.state  # mutated in place: the training loop holds the same object
        s.step, s.consumed = state["step"], state["consumed_samples"]
        s.updates, s.elapsed = int(state.get("updates", state["step"])), float(state.get("elapsed_s", 0.0))
        self.nonfinite_events = int(state.get("nonfinite_events", 0))
        checkpoint.restore_rng(state)
        self.last_saved = (plan.root, plan.tag)
        if self.rank == 0:
            log.info("resumed at step %d (%d samples consumed)", s.step, s.consumed)

    def save(self) -> Path:
        cfg, s = self.cfg, self.state
        path = checkpoint.save(self.engine.ds, cfg, self.ckpt_root, s.step, s.consumed, self.world, self.rank == 0,
                               cfg.train.keep_last, layout="pipeline" if self.engine.pipelined else "plain",
                               extra={"nonfinite_events": self.nonfinite_events, "updates": s.updates, "elapsed_s": s.elapsed})
        self.last_saved = (self.ckpt_root, path.name)
        return path

    def handle_nonfinite(self, events: int) -> None:
        """Count a step with non-finite losses; halt when the policy says so or the budget is spent;
        rollback reloads the last checkpoint and keeps going past the data consumed so far."""
        policy = self.cfg.train.on_nonfinite
        self.nonfinite_events += 1
        where = f"{events} non-finite micro-batch(es)"
        if policy == "halt" or self.nonfinite_events > self.cfg.train.max_skipped_steps:
            why = "train.on_nonfinite=halt" if policy == "halt" else f"more than train.max_skipped_steps={self.cfg.train.max_skipped_steps} events"
            raise NonFiniteLoss(f"non-finite loss at step {self.state.step} ({where}); stopping ({why})")
        if self.rank == 0:
            log.warning("non-finite loss at step %d (%s): %s (event %d of at most %d)", self.state.step, where,
                        policy, self.nonfinite_events, self.cfg.train.max_skipped_steps)
        if policy == "rollback":
            if self.last_saved is None:
                if self.rank == 0:
                    log.warning("rollback requested but no checkpoint exists yet: the step was skipped instead")
                return
            root, tag = self.last_saved
            consumed, events_so_far = self.state.consumed, self.nonfinite_events
            self._load(checkpoint.ResumePlan(root=root, tag=tag, layout="pipeline" if self.engine.pipelined else "plain"))
            self.state.consumed, self.nonfinite_events = consumed, events_so_far


def heldout_tokens(cfg: RunConfig, batches: int) -> torch.Tensor:
    """The first `batches` x micro-batch windows of the validation split (plus one token), for the
    in-training evaluation."""
    valid = load_stream(cfg.data, "valid").tokens
    if len(valid) < cfg.data.seq_len + 1:
        raise ConfigError(f"the validation split has {len(valid)} tokens, fewer than one window of data.seq_len + 1 = "
                          f"{cfg.data.seq_len + 1}: give more validation data or set train.eval_every=0")
    n = min(len(valid), batches * cfg.train.micro_batch_size * cfg.data.seq_len + 1)
    return torch.from_numpy(np.asarray(valid[:n]).astype(np.int64))


def evaluate_heldout(engine, cfg: RunConfig, tokens: torch.Tensor) -> dict:
    """valid/loss and valid/bpb (disjoint windows of data.seq_len; under sequence parallelism split over the SP
    group as in training), plus the attention-mass split (one process per sequence only: it needs the whole
    window's attention inputs on one rank)."""
    model = engine.module
    with eval_mode(model), eager_blocks(model):  # evaluation shapes must not trigger recompiles
        result = score(model, tokens, mode="disjoint", context=cfg.data.seq_len, batch_size=cfg.train.micro_batch_size,
                       device=engine.device, autocast=engine.autocast, sp=engine.sp)
        scalars = {"valid/loss": result.loss, "valid/bpb": result.loss / math.log(2)}
        if engine.sp is None:
            with torch.no_grad(), engine.autocast():
                scalars.update(attention_mass_scalars(model, tokens[: cfg.data.seq_len][None].to(engine.device)))
    return scalars


def codebook_digests(quantizers) -> list[str] | None:
    """sha256 of this process's codebook buffers, gathered from every process (data-parallel replicas must be
    bit-identical; pipeline stages hold different layers). None without codebooks."""
    import hashlib

    digest = None
    if quantizers:
        h = hashlib.sha256()
        for i, vq in quantizers:
            for buf in (vq.c_sum, vq.c_count):
                h.update(f"{i}:".encode())
                h.update(buf.detach().float().cpu().numpy().tobytes())
        digest = h.hexdigest()
    parts = [digest]
    if tdist.is_initialized() and tdist.get_world_size() > 1:  # collective: every process takes part
        parts = [None] * tdist.get_world_size()
        tdist.all_gather_object(parts, digest)
    return parts if any(parts) else None


def _steady_rate(rates: list[float]) -> float | None:
    """Median tokens/s after warm-up (the first fifth of the steps, at least two, are compilation)."""
    if not rates:
        return None
    skip = min(len(rates) - 1, max(2, len(rates) // 5))
    return statistics.median(rates[skip:])


def train(cfg: RunConfig, resume: str | None = None) -> dict:
    """Run training; returns a summary (final step, losses, codebooks) for scripts and tests."""
    run_dir = Path(cfg.train.run_dir)
    trainer = Trainer(cfg, resume=resume)
    engine = trainer.engine
    rank, is_rank0 = trainer.rank, trainer.rank == 0
    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    train_stream = load_stream(cfg.data, "train")
    if train_stream.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data has vocab {train_stream.vocab_size} but model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    sampler = WindowSampler(train_stream.tokens, cfg.data.seq_len, cfg.train.seed)
    valid_tokens = heldout_tokens(cfg, cfg.train.eval_batches) if cfg.train.eval_every and not engine.pipelined else None

    t = cfg.train
    loop = TrainLoop(engine, sampler, StepSchedule(cfg.optim, t.max_steps), micro_batch_size=t.micro_batch_size,
                     grad_accum_steps=t.grad_accum_steps, loss_chunk_tokens=t.loss_chunk_tokens,
                     loss_impl=t.loss_impl, max_steps=t.max_steps, state=trainer.state)
    tokens_per_step = loop.tokens_per_step(cfg.data.seq_len)  # the whole mesh's, each token once
    fpt = flops_per_token(cfg.model, engine.n_params, cfg.data.seq_len)
    peak = peak_flops(torch.cuda.get_device_name()) if engine.device.type == "cuda" else None
    metrics = MetricsLogger(run_dir, enabled=is_rank0, total_steps=t.max_steps, start_step=trainer.step,
                            progress_bar=t.progress_bar)
    metrics.text("config/deepspeed", json.dumps(engine.ds_config, indent=1))
    exchange = None
    if trainer.sp > 1:  # what one SP rank receives per layer per optimizer step (forward + backward)
        act = torch.float32 if engine.precision == "fp32" else torch.bfloat16
        exchange = exchange_bytes(cfg.model, t.micro_batch_size, trainer.sp, cfg.data.seq_len, act)
        exchange = {"per_layer_per_step": exchange["per_layer"] * t.grad_accum_steps,
                    "parts_per_micro_batch": exchange["parts"]}
    if is_rank0:
        log.info("model %s: %.2fM parameters; %s; precision %s", cfg.model.arch, engine.n_params / 1e6,
                 describe_topology(cfg, trainer.world), engine.precision)
        if exchange:
            log.info("sequence parallel: %d segments of %d tokens per sequence; each rank receives %.2f MiB per layer "
                     "per step (%s per micro-batch)", trainer.sp, cfg.data.seq_len // trainer.sp,
                     exchange["per_layer_per_step"] / 2**20,
                     ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in exchange["parts_per_micro_batch"].items()))
        log.info("deepspeed config: %s", json.dumps(engine.ds_config))

    # SIGTERM / SIGUSR1 / SIGINT or RUN_DIR/SAVE_AND_EXIT: finish the step, save, exit 0 (lm/preemption.py)
    watcher = PreemptionWatcher(run_dir, owner=is_rank0)
    watcher.install()
    losses, rates, preempted, saved_step = [], [], False, None
    window = [0, 0.0]  # tokens and step seconds since the last logged step
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    engine.train()
    try:
        while not loop.done():
            step = trainer.step + 1
            log_now = step % t.log_every == 0 or step == t.max_steps
            # this process's request goes into the step's all-reduce; every process stops on the reduced value
            result = loop.step(stop=watcher.requested, codebook_stats=log_now)
            if result.skipped:
                trainer.handle_nonfinite(result.nonfinite)
                scalars = {"train/nonfinite_events": float(trainer.nonfinite_events), "train/skipped": 1.0}
            else:
                losses.append(result.loss)
                dt = result.step_time_s
                rates.append(tokens_per_step / dt)
                window[0] += tokens_per_step
                window[1] += dt
                scalars = {"train/loss": result.loss, "train/commit_loss": result.aux_loss, "train/lr": result.lr,
                           "train/step_time_s": dt, "train/tokens_per_s": tokens_per_step / dt,
                           "train/tokens_per_s_per_gpu": tokens_per_step / dt / trainer.world,
                           "train/nonfinite_events": float(trainer.nonfinite_events)}
                if peak:
                    scalars["train/mfu"] = fpt * tokens_per_step / dt / trainer.world / peak
                if log_now:
                    # the logged rate: every step since the previous log (a logging step alone also gathers the
                    # codebook statistics, so its own rate understates the run's)
                    scalars["train/tokens_per_s_interval"] = window[0] / window[1]
                    window = [0, 0.0]
                    if result.grad_norm is not None:
                        scalars["train/grad_norm"] = result.grad_norm_value()
                    scalars.update(summarize_codebooks(result.codebook))
                if valid_tokens is not None and step % t.eval_every == 0:
                    scalars.update(evaluate_heldout(engine, cfg, valid_tokens))
            metrics.step(step, scalars, log_scalars=log_now)
            if result.stop:
                preempted = True
                break
            if t.save_every and step % t.save_every == 0 and step < t.max_steps:
                trainer.save()
                saved_step = step
        if t.max_steps > 0 and saved_step != trainer.step:
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
    summary = {"step": trainer.step, "consumed_samples": trainer.state.consumed, "losses": losses,
               "run_dir": str(run_dir), "rank": rank, "preempted": preempted, "nonfinite_events": trainer.nonfinite_events,
               "codebooks": {i: vq.c_sum.detach().cpu().clone() for i, vq in engine.quantizers}}
    report = {"world_size": trainer.world, "data_parallel": trainer.dp, "sequence_parallel": trainer.sp,
              "pipeline_stages": trainer.pp, "exchange_bytes_per_layer_per_step": exchange and exchange["per_layer_per_step"],
              "steps": trainer.step, "tokens_per_step": tokens_per_step,
              "tokens_per_s": _steady_rate(rates), "tokens_per_s_per_gpu": (_steady_rate(rates) or 0) / trainer.world or None,
              "peak_mem_gib": torch.cuda.max_memory_allocated(engine.device) / 2**30 if engine.device.type == "cuda" else None,
              "final_loss": losses[-1] if losses else None, "precision": engine.precision, "params": engine.n_params,
              "preempted": preempted}
    report["codebook_sha256_per_rank"] = codebook_digests(engine.quantizers)
    summary["report"] = report
    if is_rank0:
        (run_dir / "summary.json").write_text(json.dumps(report, indent=1))
    return summary


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
    finally:
        # a one-process run leaves no process group behind, also after an error (several processes skip this on
        # errors: a barrier there could wait for a rank that already failed)
        if tdist.is_initialized() and tdist.get_world_size() == 1:
            tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
