"""End-to-end launcher smoke tests: the real launch scripts start 2 CPU processes that train."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm.parallel.dist import free_port
from tests.test_train import ROOT

ARGS = ["launch/configs/quickstart.yaml", "train.max_steps=2", "data.seq_len=32", "model.d_model=32",
        "model.n_layers=2", "model.longvq.chunk_size=8", "model.longvq.codebook_size=16", "model.longvq.z_dim=16",
        "train.micro_batch_size=2", "train.progress_bar=false", "train.eval_every=0", "train.save_every=0",
        "parallel.zero_stage=2"]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_run_local_trains_with_two_processes(tmp_path, launcher):
    env = dict(os.environ, NPROC="2", LAUNCHER=launcher, PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    args = ARGS + [f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(["bash", "launch/run_local.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 = DP 2 x SP 1 x PP 1; ZeRO-2" in proc.stdout + proc.stderr
    ckpt = tmp_path / "run/checkpoints/global_step2"
    assert (ckpt / "config.yaml").is_file()
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2  # one ZeRO shard per rank
