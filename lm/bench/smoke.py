"""The GPU smoke run: every recipe trained for a few steps through `python -m lm.train` (the command users
launch; torchrun for several processes), compiled where the recipe says so, one row per run.

A recipe whose data is not on the machine (enwik8, WikiText-103, pre-tokenised shards) runs on the built-in
corpus instead (`data_override` in the row says so): the model, precision, compile and parallel settings
are the recipe's. Each run ends with a checkpoint save, as a real run does. Single-process runs can be
spread over several GPUs and run a few at a time (they only need to start, compile and step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lm.config import load_config

ROW_FIELDS = ("recipe", "world_size", "tokens_per_s", "peak_mem_gib", "final_loss", "status")
LOCAL_DATASETS = ("stdlib",)


@dataclass
class SmokeRun:
    recipe: str
    world_size: int = 1
    overrides: tuple = ()


def run_overrides(recipe: str, steps: int, run_dir: Path) -> tuple[list[str], bool]:
    """Overrides that make `recipe` a short smoke run in `run_dir`; the flag says the data was replaced."""
    cfg = load_config(recipe)
    items = [f"train.run_dir={run_dir}", f"train.max_steps={steps}", "train.save_every=0", "train.eval_every=0",
             "train.keep_last=1", "train.progress_bar=false", f"train.log_every={max(1, steps // 2)}",
             f"optim.warmup_steps={min(cfg.optim.warmup_steps, steps)}"]
    replaced = cfg.data.dataset not in LOCAL_DATASETS
    if replaced:
        items += ["data.dataset=stdlib", "data.tokenizer=byte", "data.data_path=null"]
    return items, replaced


def error_line(text: str) -> str:
    """The last line of a log that names an error (else its last line), at most 400 characters."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        low = ln.lower()
        if "error" in low or "exception" in low or "halted" in low:
            return ln[:400]
    return (lines[-1] if lines else "no output")[:400]


def launch(run: SmokeRun, steps: int, root: Path, env: dict, timeout: float, python: str = sys.executable):
    """Start one run; returns (process, run dir, data_override, log path)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{Path(run.recipe).stem}_w{run.world_size}_", dir=root))
    items, replaced = run_overrides(run.recipe, steps, run_dir)
    items += list(run.overrides)
    if run.world_size > 1:
        cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(run.world_size),
               "-m", "lm.train", run.recipe, *items]
    else:
        cmd = [python, "-m", "lm.train", run.recipe, *items]
    log = run_dir / "smoke.log"
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
    proc.started, proc.timeout, proc.cmd, proc.log_handle = time.time(), timeout, cmd, handle
    return proc, run_dir, replaced, log


def row_of(run: SmokeRun, proc, run_dir: Path, replaced: bool, log: Path) -> dict:
    proc.log_handle.close()
    text = log.read_text(errors="replace") if log.is_file() else ""
    summary = run_dir / "summary.json"
    row = {"recipe": run.recipe, "world_size": run.world_size, "overrides": list(run.overrides),
           "data_override": replaced, "seconds": round(time.time() - proc.started, 1),
           "command": " ".join(proc.cmd[proc.cmd.index(run.recipe):])}
    cfg = load_config(run.recipe, overrides=list(run.overrides))
    row.update(compile=cfg.train.compile, zero_stage=cfg.parallel.zero_stage, arch=cfg.model.arch)
    if proc.returncode == 0 and summary.is_file():
        s = json.loads(summary.read_text())
        row.update(tokens_per_s=s.get("tokens_per_s"), peak_mem_gib=s.get("peak_mem_gib"), final_loss=s.get("final_loss"),
                   precision=s.get("precision"), params=s.get("params"), steps=s.get("steps"), status="ok")
    else:
        row.update(tokens_per_s=None, peak_mem_gib=None, final_loss=None,
                   status=f"exit {proc.returncode}: {error_line(text)}")
        row["log_tail"] = text[-3000:]
    return row


def run_all(runs: list[SmokeRun], *, steps: int, parallel: int = 1, gpus: int = 1, timeout: float = 900,
            workdir: Optional[Path] = None, on_row=None) -> list[dict]:
    """Run every smoke run (at most `parallel` at once; single-process runs round-robin over `gpus` GPUs;
    multi-process runs run alone on all of them). Returns the rows in the order of `runs`."""
    root = Path(workdir or tempfile.mkdtemp(prefix="smoke_"))
    root.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
                    PYTHONUNBUFFERED="1")
    rows: dict[int, dict] = {}
    pending = list(enumerate(runs))
    active: list = []
    next_gpu = 0
    for i, run in list(pending):
        cfg = load_config(run.recipe, overrides=list(run.overrides))
        need = cfg.parallel.sequence_parallel * cfg.parallel.pipeline_stages
        if need > run.world_size:  # not runnable at this size: say so instead of failing
            pending.remove((i, run))
            rows[i] = {"recipe": run.recipe, "world_size": run.world_size, "overrides": list(run.overrides),
                       "data_override": False, "compile": cfg.train.compile, "zero_stage": cfg.parallel.zero_stage,
                       "arch": cfg.model.arch, "tokens_per_s": None, "peak_mem_gib": None, "final_loss": None,
                       "status": f"skipped: needs {need} processes (parallel.sequence_parallel x pipeline_stages)"}
            if on_row is not None:
                on_row(rows[i])
    while pending or active:
        while pending and len(active) < parallel:
            i, run = pending[0]
            if run.world_size > 1 and active:
                break  # a multi-GPU run waits for the GPUs to be free
            pending.pop(0)
            env = dict(base_env)
            if run.world_size == 1 and gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(next_gpu % gpus)
                next_gpu += 1
            active.append((i, run, *launch(run, steps, root, env, timeout)))
            if run.world_size > 1:
                break
        time.sleep(1.0)
        for item in list(active):
            i, run, proc, run_dir, replaced, log = item
            if proc.poll() is None and time.time() - proc.started > proc.timeout:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                active.remove(item)
                rows[i] = row_of(run, proc, run_dir, replaced, log)
                if on_row is not None:
                    on_row(rows[i])
    return [rows[i] for i in range(len(runs))]


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| recipe | world | ZeRO | compile | precision | data | tokens/s | peak GiB | final loss | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {Path(r['recipe']).name} {' '.join(r['overrides'])} | {r['world_size']} | {r['zero_stage']} | "
                     f"{r['compile']} | {r.get('precision') or ''} | {'stdlib (replaced)' if r['data_override'] else 'recipe'} | "
                     f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['peak_mem_gib'], '.1f')} | {fmt(r['final_loss'], '.3f')} | "
                     f"{r['status']} |")
    return "\n".join(lines) + "\n"
