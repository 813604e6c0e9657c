"""launch/slurm.sbatch against a real Slurm: the time-limit warning makes the job save, requeue itself and
continue with --resume auto, with the losses of an uninterrupted run.

Needs a Slurm controller this machine can submit to (CI: `.ci/slurm_localhost.sh` sets up a one-node
Slurm on localhost); skipped when `sbatch` is absent or no controller answers. The warning signal is sent
with `scancel --batch --signal=USR1`, which is what `#SBATCH --signal=B:USR1@300` makes Slurm send to the
batch shell before the time limit, but at a moment the test chooses. A requeued job becomes eligible
again only after Slurm's requeue delay (about two minutes); the test moves its start time to now.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lm import checkpoint
from lm.config import load_config
from lm.parallel.dist import free_port
from tests.dist_harness import run_dist
from tests.test_train import ROOT, data_cache  # noqa: F401  (data_cache: a fixture)


def _controller_answers() -> bool:
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs Slurm's sbatch (CI: .ci/slurm_localhost.sh)"),
    pytest.mark.skipif(shutil.which("sbatch") is not None and not _controller_answers(),
                       reason="sbatch is installed but no Slurm controller answers `scontrol ping`"),
]

STEPS = {1: 300, 2: 150}  # ~8 s of training (40 steps/s on 1 process, 15 on 2): still running when the warning
# comes at step 3 (it reached the ranks by step 40-70 in trials)
RECIPE = ["launch/configs/quickstart.yaml", "data.seq_len=32", "model.d_model=32", "model.n_layers=2",
          "model.longvq.chunk_size=8", "model.longvq.codebook_size=16", "model.longvq.z_dim=16",
          "model.longvq.ema_dim=4", "train.micro_batch_size=4", "train.progress_bar=false", "train.eval_every=0",
          "optim.warmup_steps=2", "train.log_every=1", "train.save_every=0"]


def _job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(predicate, timeout: float, what: str, log: Path):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log.is_file() else "(no job output yet)"
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job output:\n{tail}")


def _tb_losses(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def _train(cfg):
    from lm.train import train

    return train(cfg)


@pytest.mark.parametrize("nproc", [1, 2])
def test_time_limit_warning_saves_requeues_and_resumes_exactly(tmp_path, data_cache, nproc):  # noqa: F811
    """nproc 2: two ranks (ZeRO-2) under one torchrun agent; every rank sees the save request."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    steps = STEPS[nproc]
    recipe = RECIPE + [f"data.cache_dir={data_cache}", f"train.max_steps={steps}"] + (["parallel.zero_stage=2"] if nproc > 1 else [])
    # the uninterrupted run, in this process tree
    run_dist(_train, nproc, cfg=load_config(ROOT / recipe[0], overrides=recipe[1:] + [f"train.run_dir={ref}"]))
    expected = _tb_losses(ref)
    assert sorted(expected) == list(range(1, steps + 1))

    log = tmp_path / "slurm.out"
    env = dict(os.environ, PYTHON=sys.executable, NPROC=str(nproc), MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    submit = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", f"--cpus-per-task={nproc}", "--time=20",
                             "--job-name=longvq-requeue-test", f"--output={log}", "launch/slurm.sbatch", *recipe,
                             f"train.run_dir={run}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        _wait(lambda: log.is_file() and "step 3 loss" in log.read_text(), 180, "the job to train 3 steps", log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)  # the time-limit warning
        _wait(lambda: int(_job(job).get("Restarts", 0)) >= 1, 180, "the job to requeue itself", log)
        # skip the requeue delay, but not into the second in which the old run's credential was revoked: slurmd
        # refuses a credential created in that second ("Job credential revoked") and the job ends FAILED
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        final = _wait(lambda: (lambda j: j if j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                               else None)(_job(job)), 300, "the requeued job to finish", log)
    finally:
        if _job(job).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", None):
            subprocess.run(["scancel", job])
    out = log.read_text()
    assert final["JobState"] == "COMPLETED", out[-4000:]
    assert int(final["Restarts"]) >= 1
    assert "time-limit warning (USR1): asking the trainer to save" in out
    assert "requeueing job" in out and "Traceback" not in out, out[-4000:]
    resumed_at = [int(s) for s in re.findall(r"resumed at step (\d+)", out)]
    assert resumed_at and 3 <= resumed_at[0] < steps, out[-4000:]
    assert checkpoint.read_latest(run / "checkpoints") == f"global_step{steps}"
    assert checkpoint.load_trainer_state(run / "checkpoints", f"global_step{steps}")["step"] == steps
    got = _tb_losses(run)
    assert sorted(got) == list(range(1, steps + 1))  # every step trained once, none twice
    after = range(resumed_at[0] + 1, steps + 1)
    assert [got[s] for s in after] == [expected[s] for s in after]  # the requeued run continues exactly
    assert not (run / "SAVE_AND_EXIT").exists()
