"""The trainer against the benchmark: does `python -m lm.train` reach the tokens/s a throughput row measured?

    row = trainer_row("launch/configs/longvq_125m.yaml", [], context=8192, tokens_per_step=65536)
    rows = compare(throughput_rows, {arch: recipe}, overrides, tokens_per_step=65536)

`trainer_row` trains the recipe at the row's context and batch (tokens_per_step // context sequences, one
micro-batch) for `steps` steps through `python -m lm.train` in a subprocess, one process, as a user launches
it, in a temporary run directory, and reads the run's summary.json: tokens_per_s there is the median over the
steps after warm-up (lm.train), peak memory and the final loss come with it. Recipes whose data is not on the
machine train on the built-in corpus, as the GPU smoke run does (lm.bench.smoke.run_overrides); the speed of
a step does not depend on the text. `compare` runs it for every training row of a throughput run and pairs
the two rates (`trainer_over_benchmark`).

The subprocess gets the parent's environment without the launcher variables (RANK, WORLD_SIZE, MASTER_PORT,
...), so its one-process group does not collide with the benchmark's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from lm.bench.smoke import error_line, run_overrides

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                "MASTER_PORT")


def trainer_row(recipe: str, overrides: list[str], context: int, tokens_per_step: int, *, steps: int = 12,
                backend: Optional[str] = None, timeout: float = 1200, python: str = sys.executable,
                workdir: Optional[str] = None) -> dict:
    """The trainer's steady tokens/s, peak memory and final loss for `recipe` (+ `overrides`) at `context`
    (backend: the Transformer's model.transformer.attn_backend), or trainer_error when the run fails."""
    batch = max(1, tokens_per_step // context)
    with tempfile.TemporaryDirectory(prefix="trainer_check_", dir=workdir) as tmp:
        run_dir = Path(tmp) / "run"
        items, replaced = run_overrides(recipe, steps, run_dir)
        items += list(overrides) + [f"data.seq_len={context}", f"train.micro_batch_size={batch}",
                                    "train.grad_accum_steps=1"]
        if backend is not None:
            items.append(f"model.transformer.attn_backend={backend}")
        cmd = [python, "-m", "lm.train", recipe, *items]
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
        row = {"trainer_command": " ".join(["python", "-m", "lm.train", recipe,
                                             *(i for i in items if not i.startswith("train.run_dir="))]),
               "trainer_data_override": replaced}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**row, "trainer_error": f"timed out after {timeout:.0f} s"}
        summary = run_dir / "summary.json"
        if proc.returncode != 0 or not summary.is_file():
            return {**row, "trainer_error": f"exit {proc.returncode}: {error_line(proc.stdout + proc.stderr)}"}
        s = json.loads(summary.read_text())
    return {**row, "trainer_tokens_per_s": s.get("tokens_per_s"), "trainer_peak_mem_gib": s.get("peak_mem_gib"),
            "trainer_final_loss": s.get("final_loss"), "trainer_steps": s.get("steps"),
            "trainer_precision": s.get("precision")}


def compare(rows: list[dict], recipes: dict[str, str], overrides: list[str], *, tokens_per_step: int,
            steps: int = 12, timeout: float = 1200, on_row=None) -> list[dict]:
    """One comparison per measured training row of a throughput run (rows without tokens/s are left out):
    the benchmark's tokens/s and peak memory beside `trainer_row`'s, and trainer_over_benchmark."""
    out = []
    for r in rows:
        if r.get("mode") != "train" or not r.get("tokens_per_s"):
            continue
        backend = r.get("backend") if r["arch"] == "transformer" else None
        t = trainer_row(recipes[r["arch"]], overrides, r["context"], tokens_per_step, steps=steps, backend=backend,
                        timeout=timeout)
        c = {"arch": r["arch"], "context": r["context"], "backend": r.get("backend"),
             "benchmark_tokens_per_s": r["tokens_per_s"], "benchmark_peak_mem_gib": r.get("peak_mem_gib"), **t}
        rate = t.get("trainer_tokens_per_s")
        c["trainer_over_benchmark"] = rate / r["tokens_per_s"] if rate else None
        out.append(c)
        if on_row is not None:
            on_row(c)
    return out


__all__ = ["trainer_row", "compare", "LAUNCHER_ENV"]
