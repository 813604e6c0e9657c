"""Sequence-parallel scaling of the trainer's step: tokens/s and memory per GPU when one long sequence is split
over N GPUs (`parallel.sequence_parallel: N`), against one GPU at 1/N of the context.

    arms = [Arm("launch/configs/longvq_125m_sp.yaml"), Arm("launch/configs/transformer_125m.yaml")]
    rows = run_sweep(arms, contexts=[262144, 524288], nproc=2, steps=3, warmup=2, work_dir=Path("runs/sp"))

Plan (`plan_rows`): for every arm (a training recipe: the LongVQ, or the Transformer, which runs
DeepSpeed-Ulysses under SP) and every context T, one row with SP = N on N GPUs (the whole world is one SP
group: DP = 1) and one with SP = 1 on one GPU at context T / N, the same tokens per GPU. The LongVQ arm runs
first, so that a time budget spends itself on the Transformer's long rows last.

Each row is one `torchrun --standalone --nproc_per_node K -m evals.sequence_parallel --worker SPEC` (`worker`):
it builds the engine lm.train builds (lm.engine.DeepSpeedEngine with the recipe's precision, ZeRO stage,
activation checkpointing and compile setting) and times lm.engine.TrainLoop steps on RandomTokens after
warm-up steps, each step between device synchronisations (lm.bench.throughput.train_row: the same step as
the trainer, with its one loss all-reduce, the codebook update and the optimizer step). Every row gets a
fresh process group: a rank that runs out of memory records its error and exits, torchrun then stops its
peers (which would otherwise wait forever in an exchange), the row becomes {"error": "OOM"} and the next row
starts on empty GPUs.

Row fields (`assemble_row`): arch, recipe, context, sequence_parallel, gpus, segment (tokens per GPU per
sequence), batch, tokens_per_s (the group's: batch x context over the median step time of the slowest rank),
tokens_per_s_per_gpu, peak_mem_gib (the largest over the ranks; peak_mem_gib_per_rank lists them; None on
CPU), exchange_bytes_per_layer_per_step with exchange_parts (lm.parallel.sequence.exchange_bytes: what one
middle rank receives per layer per optimizer step, forward + backward; 0 at SP = 1), efficiency (SP = N
rows: tokens/s per GPU over that of the SP = 1 row at context T / N; `add_efficiency`), flops_per_token and
mfu (per GPU, lm.metrics.flops_per_token at the row's context), precision, zero_stage,
activation_checkpointing, compile, backend, step_times_s, final_loss, device, seconds, error (absent when
the row ran; "OOM", "timeout after N s", "skipped: ..." or the failure's last error line).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from lm.config import ConfigError, RunConfig, load_config

LAUNCH_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
              "PYTHONUNBUFFERED": "1"}  # NVLink multicast off: not available on every lent machine


@dataclass
class Arm:
    """One compared model: a training recipe and key=value overrides (applied before the row's own)."""

    recipe: str
    overrides: list = field(default_factory=list)

    def config(self) -> RunConfig:
        return load_config(self.recipe, overrides=list(self.overrides))


def row_config(arm: Arm, context: int, sequence_parallel: int, batch: int = 1, steps: int = 5) -> RunConfig:
    """The arm's recipe for one row: `batch` sequences of `context` tokens split over `sequence_parallel`
    ranks, one micro-batch per step, no evaluation or checkpoints. ConfigError (naming the keys) when the
    context does not split into chunk-aligned segments or the heads do not divide SP."""
    return load_config(arm.recipe, overrides=list(arm.overrides) + [
        f"data.seq_len={context}", f"parallel.sequence_parallel={sequence_parallel}",
        f"train.micro_batch_size={batch}", "train.grad_accum_steps=1", f"train.max_steps={steps}",
        "train.eval_every=0", "train.save_every=0", "train.progress_bar=false"])


def plan_rows(arms: list[Arm], contexts: list[int], nproc: int, batch: int = 1) -> list[dict]:
    """Row specs, LongVQ arms first; each context T gives an SP = nproc row at T and an SP = 1 row at T / nproc.
    Every config is built here, so a bad combination is refused before anything runs."""
    if nproc < 2:
        raise ConfigError(f"--nproc must be >= 2 (the SP = N rows), got {nproc}")
    specs = []
    order = sorted(range(len(arms)), key=lambda i: arms[i].config().model.arch != "longvq")
    for i in order:
        arm = arms[i]
        arch = arm.config().model.arch
        for context in sorted(set(contexts)):
            if context % nproc:
                raise ConfigError(f"context {context} is not divisible by --nproc {nproc}")
            for sp, ctx in ((1, context // nproc), (nproc, context)):
                row_config(arm, ctx, sp, batch)  # validates
                spec = {"arm": i, "recipe": arm.recipe, "overrides": list(arm.overrides), "arch": arch,
                        "context": ctx, "sequence_parallel": sp, "batch": batch}
                if spec not in specs:
                    specs.append(spec)
    return specs


# --------------------------------------------------------------------------------------------
# One row, inside torchrun
# --------------------------------------------------------------------------------------------


def worker(spec_path: Path, exit_on_error: bool = True) -> int:
    """Run the row described by the JSON spec (written by run_sweep) on this torchrun process and write
    rank{R}.json next to it. A failed rank exits at once with status 1 (torchrun stops the others; with
    exit_on_error=False it returns 1 instead)."""
    from lm.bench import throughput as tp
    from lm.parallel.dist import init_distributed, shutdown_distributed

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec_path).parent
    init_distributed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if world != spec["sequence_parallel"]:
        raise ConfigError(f"row needs {spec['sequence_parallel']} processes, launched with {world}")
    arm = Arm(spec["recipe"], spec["overrides"])
    cfg = row_config(arm, spec["context"], spec["sequence_parallel"], spec["batch"], spec["warmup"] + spec["steps"])
    result = tp.measure(lambda: tp.train_row(cfg, spec["context"], tokens_per_step=spec["batch"] * spec["context"],
                                             engine="deepspeed", steps=spec["steps"], warmup=spec["warmup"]),
                        device, compiled=cfg.train.compile)
    result.update(rank=rank, device=tp.device_name(device), torch=torch.__version__)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if result.get("error"):
        if not exit_on_error:
            return 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # the peers may be waiting in an exchange that will never come: let torchrun stop them
    shutdown_distributed()
    return 0


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() or "exception" in ln.lower():
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]


def assemble_row(spec: dict, ranks: list[Optional[dict]], *, returncode: Optional[int], log_text: str = "",
                 timed_out: bool = False, seconds: Optional[float] = None, peak_flops: Optional[float] = None) -> dict:
    """One row from the per-rank results (None for a rank that wrote nothing) of a launch."""
    from lm.bench.throughput import count_params
    from lm.metrics import flops_per_token
    from lm.parallel.sequence import exchange_bytes

    sp, context, batch = spec["sequence_parallel"], spec["context"], spec["batch"]
    cfg = row_config(Arm(spec["recipe"], spec["overrides"]), context, sp, batch)
    row = {"arch": spec["arch"], "recipe": spec["recipe"], "overrides": spec["overrides"], "context": context,
           "sequence_parallel": sp, "gpus": sp, "segment": context // sp, "batch": batch,
           "zero_stage": cfg.parallel.zero_stage, "activation_checkpointing": cfg.parallel.activation_checkpointing,
           "compile": cfg.train.compile, "seconds": None if seconds is None else round(seconds, 1),
           "tokens_per_s": None, "tokens_per_s_per_gpu": None, "efficiency": None, "mfu": None}
    done = [r for r in ranks if r is not None]
    errors = [r["error"] for r in done if r.get("error")]
    peaks = [r.get("peak_mem_gib") for r in done]
    row["peak_mem_gib_per_rank"] = peaks
    row["peak_mem_gib"] = max((p for p in peaks if p is not None), default=None)
    if done:
        first = done[0]
        row.update(device=first.get("device"), torch=first.get("torch"), precision=first.get("precision"),
                   backend=first.get("backend"), final_loss=first.get("final_loss"))
    precision = row.get("precision") or "bf16"
    traffic = exchange_bytes(cfg.model, batch, sp, context, torch.float32 if precision == "fp32" else torch.bfloat16)
    row["exchange_bytes_per_layer_per_step"] = traffic["per_layer"] * cfg.train.grad_accum_steps
    row["exchange_parts"] = traffic["parts"]
    row["flops_per_token"] = flops_per_token(cfg.model, count_params(cfg), context)
    if errors:
        row["error"] = "OOM" if "OOM" in errors else errors[0]
        details = [r["error_detail"] for r in done if r.get("error_detail")]
        if details:
            row["error_detail"] = details[0]
    elif timed_out:
        row["error"] = f"timeout after {seconds:.0f} s"
    elif returncode != 0 or len(done) < sp:
        row["error"] = f"exit {returncode}: {_error_line(log_text)}"
    else:
        slowest = max(statistics.median(r["step_times_s"]) for r in done)
        row["step_times_s"] = [r["step_times_s"] for r in done]
        row["tokens_per_s"] = batch * context / slowest
        row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / sp
        if peak_flops:
            row["mfu"] = row["tokens_per_s_per_gpu"] * row["flops_per_token"] / peak_flops
    if row.get("error") and log_text:
        row["log_tail"] = log_text[-2000:]
    return row


def add_efficiency(rows: list[dict]) -> None:
    """efficiency of every SP = N row: its tokens/s per GPU over the SP = 1 row's of the same arch at context / N
    (None when either did not run)."""
    base = {(r["arch"], r["context"]): r for r in rows if r["sequence_parallel"] == 1}
    for r in rows:
        if r["sequence_parallel"] > 1:
            b = base.get((r["arch"], r["context"] // r["sequence_parallel"]))
            ok = b is not None and b.get("tokens_per_s_per_gpu") and r.get("tokens_per_s_per_gpu")
            r["efficiency"] = r["tokens_per_s_per_gpu"] / b["tokens_per_s_per_gpu"] if ok else None
            r["baseline_context"] = r["context"] // r["sequence_parallel"]


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def launch_command(spec_path: Path, nproc: int, python: str = sys.executable) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "evals.sequence_parallel", "--worker", str(spec_path)]


def run_row(spec: dict, row_dir: Path, *, steps: int, warmup: int, timeout: float, peak_flops: Optional[float] = None,
            python: str = sys.executable) -> dict:
    """Launch one row (torchrun with spec["sequence_parallel"] processes) and assemble its result."""
    row_dir.mkdir(parents=True, exist_ok=True)
    for old in row_dir.glob("rank*.json"):
        old.unlink()
    spec_path = row_dir / "spec.json"
    spec_path.write_text(json.dumps({**spec, "steps": steps, "warmup": warmup}))
    cmd = launch_command(spec_path, spec["sequence_parallel"], python)
    log = row_dir / "log.txt"
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **LAUNCH_ENV},
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, 9)  # torchrun and its workers (their own session)
            returncode = proc.wait()
    seconds = time.perf_counter() - t0
    ranks = []
    for r in range(spec["sequence_parallel"]):
        path = row_dir / f"rank{r}.json"
        ranks.append(json.loads(path.read_text()) if path.is_file() else None)
    row = assemble_row(spec, ranks, returncode=returncode, log_text=log.read_text(errors="replace"),
                       timed_out=timed_out, seconds=seconds, peak_flops=peak_flops)
    row["command"] = " ".join(cmd[1:])
    row["warmup"], row["steps"] = warmup, steps
    return row


def run_sweep(arms: list[Arm], contexts: list[int], nproc: int, *, work_dir: Path, batch: int = 1, steps: int = 3,
              warmup: int = 2, row_timeout: float = 600, time_budget: Optional[float] = None,
              peak_flops: Optional[float] = None, on_row: Optional[Callable[[list], None]] = None,
              python: str = sys.executable) -> list[dict]:
    """Every planned row, in order (see the module docstring). time_budget (seconds): rows that would start
    after it is spent are recorded as skipped, and a row's timeout never runs past it. on_row(rows) after
    each row (write the results as they come)."""
    specs = plan_rows(arms, contexts, nproc, batch)
    rows: list[dict] = []
    start = time.perf_counter()
    for i, spec in enumerate(specs):
        left = None if time_budget is None else time_budget - (time.perf_counter() - start)
        name = f"{i:02d}_{spec['arch']}_sp{spec['sequence_parallel']}_{spec['context']}"
        if left is not None and left < 10:
            row = assemble_row(spec, [None] * spec["sequence_parallel"], returncode=None)
            row["error"] = "skipped: time budget spent"
        else:
            timeout = row_timeout if left is None else min(row_timeout, left)
            row = run_row(spec, work_dir / name, steps=steps, warmup=warmup, timeout=timeout, peak_flops=peak_flops,
                          python=python)
        rows.append(row)
        add_efficiency(rows)
        if on_row is not None:
            on_row(rows)
    return rows
