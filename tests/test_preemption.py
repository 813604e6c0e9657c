"""Save requests: SIGTERM / SIGUSR1 / SIGINT and the stop file make a run finish its step, save and exit 0;
a second Ctrl-C stops at once; the previous signal handlers come back afterwards."""

import os
import signal
import threading
import time

import pytest

from lm import checkpoint
from lm.preemption import STOP_FILE, PreemptionWatcher, main as preemption_main, stop_file
from tests.test_checkpoint import TRAIN_ARGS, _python
from tests.test_train import ROOT, data_cache, tiny_cfg  # noqa: F401  (data_cache: a fixture)


def _wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_requests_a_save_and_handlers_are_restored(tmp_path, sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    reasons = []
    with PreemptionWatcher(tmp_path, reasons.append, poll_s=0) as w:
        assert not w.requested
        os.kill(os.getpid(), sig)
        assert _wait_for(lambda: w.requested)
        assert reasons == [f"received {signal.Signals(sig).name}"]
    assert {s: signal.getsignal(s) for s in before} == before


def test_first_ctrl_c_requests_a_save_the_second_is_left_to_the_default_action(tmp_path, capfd):
    previous = signal.getsignal(signal.SIGINT)
    w = PreemptionWatcher(tmp_path, poll_s=0).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: w.requested) and w.reason == "received SIGINT"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a second Ctrl-C kills the process at once
        assert "press Ctrl-C again to stop at once without saving" in capfd.readouterr().err
    finally:
        w.uninstall()
    assert signal.getsignal(signal.SIGINT) is previous


def test_stop_file_requests_a_save_and_is_removed_once_honoured(tmp_path):
    reasons = []
    with PreemptionWatcher(tmp_path, reasons.append, poll_s=0.05) as w:
        time.sleep(0.2)
        assert not w.requested
        stop_file(tmp_path).touch()
        assert _wait_for(lambda: w.requested)
        assert reasons == [f"found {tmp_path / STOP_FILE}"]
    assert not stop_file(tmp_path).exists()


def test_stale_stop_file_is_removed_by_the_owner_only(tmp_path):
    stop_file(tmp_path).touch()
    with PreemptionWatcher(tmp_path, poll_s=0.05, owner=False) as w:  # another rank: leaves it to rank 0
        assert _wait_for(lambda: w.requested)
    assert stop_file(tmp_path).exists()
    with PreemptionWatcher(tmp_path, poll_s=0.05) as w:  # rank 0 starting: a leftover of an earlier run
        time.sleep(0.2)
        assert not w.requested and not stop_file(tmp_path).exists()


def test_outside_the_main_thread_signals_are_left_alone(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def body():
        with PreemptionWatcher(tmp_path, poll_s=0.05) as w:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            stop_file(tmp_path).touch()
            seen["requested"] = _wait_for(lambda: w.requested)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"handler": before, "requested": True}


def test_cli_names_and_creates_the_stop_file(tmp_path, capsys):
    args = [str(ROOT / "launch/configs/quickstart.yaml"), f"train.run_dir={tmp_path / 'run'}", "--resume", "auto"]
    assert preemption_main(["path", *args]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "run" / STOP_FILE)
    assert preemption_main(["request", *args]) == 0
    assert (tmp_path / "run" / STOP_FILE).is_file()
    assert preemption_main(["path", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# End to end: a training process
# --------------------------------------------------------------------------------------------


def _start(run, cache, *extra):
    args = TRAIN_ARGS + [f"train.run_dir={run}", f"data.cache_dir={cache}", "train.max_steps=100000", *extra]
    return _python(f"from lm.train import main\nimport sys\nsys.exit(main({args!r}))")


def _read_until(proc, text):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            break
    return lines


def test_ctrl_c_saves_and_exits_cleanly_then_resumes(tmp_path, data_cache):
    from tests.dist_harness import run_dist
    from tests.test_checkpoint import _train

    run = tmp_path / "run"
    proc = _start(run, data_cache)
    lines = _read_until(proc, "step 3 loss")
    proc.send_signal(signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGINT: will save a checkpoint" in out and "preempted; checkpoint" in out
    tag = checkpoint.read_latest(run / "checkpoints")
    stopped_at = int(tag.removeprefix("global_step"))
    checkpoint.verify(run / "checkpoints" / tag)
    (resumed,) = run_dist(_train, 1, cfg=tiny_cfg(run, data_cache, f"train.max_steps={stopped_at + 2}"), resume="auto")
    assert resumed["step"] == stopped_at + 2 and len(resumed["losses"]) == 2


def test_second_ctrl_c_stops_at_once(tmp_path, data_cache):
    run = tmp_path / "run"
    proc = _start(run, data_cache, "train.save_every=2")
    lines = _read_until(proc, "step 3 loss")
    proc.send_signal(signal.SIGINT)
    lines += _read_until(proc, "press Ctrl-C again")
    proc.send_signal(signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGINT, out[-3000:]
    tag = checkpoint.read_latest(run / "checkpoints")  # whatever was published is whole
    checkpoint.verify(run / "checkpoints" / tag)


def test_stop_file_saves_and_exits_cleanly(tmp_path, data_cache):
    run = tmp_path / "run"
    proc = _start(run, data_cache)
    lines = _read_until(proc, "step 3 loss")
    assert preemption_main(["request", str(ROOT / "launch/configs/quickstart.yaml"), f"train.run_dir={run}"]) == 0
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"found {run / STOP_FILE}" in out and "preempted; checkpoint" in out
    assert not (run / STOP_FILE).exists()  # honoured, then removed: a requeued run does not stop at once
    checkpoint.verify(run / "checkpoints" / checkpoint.read_latest(run / "checkpoints"))
