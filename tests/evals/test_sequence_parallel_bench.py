"""evals.sequence_parallel on CPU (gloo) with the tiny recipes: the plan, rows measured by the trainer's
engine under SP = 2 for both arms, failures (OOM on one rank, a timeout, a crash) as error rows, and the
command end to end through torchrun (JSON, table, plot)."""

import json
import statistics
from pathlib import Path

import pytest

from lm.bench import sequence_parallel as spb
from lm.config import ConfigError
from tests.dist_harness import run_dist

ROOT = Path(__file__).resolve().parents[2]
LONGVQ = str(ROOT / "launch/configs/longvq_tiny.yaml")  # chunks of 16
TRANSFORMER = str(ROOT / "launch/configs/transformer_tiny.yaml")  # 2 heads


def test_plan_pairs_every_sp_row_with_one_gpu_at_the_segment_length():
    specs = spb.plan_rows([spb.Arm(TRANSFORMER), spb.Arm(LONGVQ)], [128, 64], nproc=2)
    assert [(s["arch"], s["sequence_parallel"], s["context"]) for s in specs] == [
        ("longvq", 1, 32), ("longvq", 2, 64), ("longvq", 1, 64), ("longvq", 2, 128),
        ("transformer", 1, 32), ("transformer", 2, 64), ("transformer", 1, 64), ("transformer", 2, 128)]
    with pytest.raises(ConfigError, match="model.longvq.chunk_size"):  # segments of 24 tokens, chunks of 16
        spb.plan_rows([spb.Arm(LONGVQ)], [48], nproc=2)
    with pytest.raises(ConfigError, match="model.transformer.n_heads"):  # Ulysses: 2 heads over 4 ranks
        spb.plan_rows([spb.Arm(TRANSFORMER)], [128], nproc=4)
    with pytest.raises(ConfigError, match="--nproc"):
        spb.plan_rows([spb.Arm(LONGVQ)], [65], nproc=2)


def _worker(spec_path):
    return spb.worker(Path(spec_path), exit_on_error=False)


def measure(tmp_path, arm: spb.Arm, context: int, sp: int) -> dict:
    spec = spb.plan_rows([arm], [context * (2 if sp == 1 else 1)], nproc=2)[0 if sp == 1 else 1]
    spec_path = tmp_path / f"{spec['arch']}_{sp}" / "spec.json"
    spec_path.parent.mkdir()
    spec_path.write_text(json.dumps({**spec, "steps": 2, "warmup": 1}))
    codes = run_dist(_worker, world_size=sp, spec_path=str(spec_path))
    ranks = [json.loads((spec_path.parent / f"rank{r}.json").read_text()) for r in range(sp)]
    return spb.assemble_row(spec, ranks, returncode=max(codes), seconds=1.0, peak_flops=1e12)


@pytest.mark.parametrize("recipe", [LONGVQ, TRANSFORMER])
def test_rows_time_the_trainers_step_under_sequence_parallelism(tmp_path, recipe):
    row = measure(tmp_path, spb.Arm(recipe), 64, 2)
    assert "error" not in row, row
    assert (row["sequence_parallel"], row["gpus"], row["segment"], row["context"]) == (2, 2, 32, 64)
    assert len(row["step_times_s"]) == 2 and all(len(t) == 2 for t in row["step_times_s"])  # 2 ranks x 2 steps
    assert row["tokens_per_s"] == pytest.approx(64 / max(statistics.median(t) for t in row["step_times_s"]))  # slowest rank
    assert row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / 2)
    assert row["mfu"] == pytest.approx(row["tokens_per_s_per_gpu"] * row["flops_per_token"] / 1e12)
    assert row["precision"] == "fp32" and row["final_loss"] > 0 and row["peak_mem_gib"] is None
    assert row["exchange_bytes_per_layer_per_step"] == sum(row["exchange_parts"].values()) > 0
    if row["arch"] == "longvq":
        assert set(row["exchange_parts"]) == {"ema_state", "code_cache", "previous_chunk"}
    else:
        assert set(row["exchange_parts"]) == {"ulysses_all_to_all"}
    base = measure(tmp_path, spb.Arm(recipe), 32, 1)
    assert "error" not in base and base["exchange_bytes_per_layer_per_step"] == 0
    rows = [base, row]
    spb.add_efficiency(rows)
    assert row["baseline_context"] == 32
    assert row["efficiency"] == pytest.approx(row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"])


def test_a_failing_rank_writes_its_error(tmp_path):
    """A failure inside the row (here the fused kernel asked for on a CPU) is recorded per rank."""
    row = measure(tmp_path, spb.Arm(LONGVQ, ["model.longvq.attention_impl=fused"]), 64, 2)
    assert row["error"].startswith("ConfigError: model.longvq.attention_impl=fused needs a CUDA GPU")
    assert row["tokens_per_s"] is None and row["efficiency"] is None


def test_oom_on_one_rank_timeouts_and_crashes_become_error_rows():
    spec = spb.plan_rows([spb.Arm(LONGVQ)], [64], nproc=2)[1]
    oom = spb.assemble_row(spec, [None, {"error": "OOM", "error_detail": "CUDA out of memory at x.py:1",
                                         "peak_mem_gib": 139.0}], returncode=1, log_text="...")
    assert oom["error"] == "OOM" and oom["peak_mem_gib"] == 139.0 and oom["error_detail"]
    late = spb.assemble_row(spec, [None, None], returncode=-9, timed_out=True, seconds=300.0)
    assert late["error"] == "timeout after 300 s"
    crash = spb.assemble_row(spec, [None, None], returncode=1, log_text="x\nRuntimeError: NCCL failed\nmore")
    assert crash["error"] == "exit 1: RuntimeError: NCCL failed"
    for row in (oom, late, crash):  # still the row's traffic, and no throughput
        assert row["tokens_per_s"] is None and row["exchange_bytes_per_layer_per_step"] > 0


def test_the_command_end_to_end(tmp_path):
    """Through torchrun: the SP = 2 row and its one-process baseline, then the JSON, the table and the plot."""
    from evals.sequence_parallel import main

    rc = main(["--recipe", LONGVQ, "--contexts", "64", "--nproc", "2", "--steps", "1", "--warmup", "1",
               "--out-dir", str(tmp_path), "--tag", "unit", "--row-timeout", "300"])
    assert rc == 0
    report = json.loads((tmp_path / "sequence_parallel_unit.json").read_text())
    rows = report["rows"]
    assert [(r["sequence_parallel"], r["context"]) for r in rows] == [(1, 32), (2, 64)]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows), rows
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["tokens_per_s_per_gpu"] / rows[0]["tokens_per_s_per_gpu"])
    assert report["header"]["nproc"] == 2
    assert (tmp_path / "sequence_parallel_unit.png").stat().st_size > 0
    assert "| longvq | 64 | 2 | 32 |" in (tmp_path / "sequence_parallel_unit.md").read_text()
    assert main(["--recipe", LONGVQ, "--contexts", "48", "--out-dir", str(tmp_path)]) == 2  # refused before launching
