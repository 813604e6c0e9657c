"""Save requests: turn signals and a stop file into "finish the step, save a checkpoint, exit 0".

    watcher = PreemptionWatcher(run_dir, owner=(rank == 0)).install()   # or: with PreemptionWatcher(...) as w:
    while training:
        agreed = step(stop=watcher.requested)   # this rank's request, combined over ranks inside the step
        if agreed.stop: save(); break           # every rank stops at the same step
    watcher.uninstall()                          # previous signal handlers back; the honoured stop file removed

A save is requested by
  SIGTERM    what schedulers and `kill` send before killing a job;
  SIGUSR1    the warning signal of `#SBATCH --signal=USR1@SECONDS` when it reaches the ranks;
  SIGINT     Ctrl-C. A second Ctrl-C stops the process at once without saving (the default action
             of SIGINT is restored after the first, so it works even while a rank waits in a collective);
  the stop file RUN_DIR/SAVE_AND_EXIT (`touch` it, or `python -m lm.preemption request CONFIG...`) for
             schedulers and launchers that cannot signal the Python ranks themselves, e.g. a batch
             script whose ranks are children of torchrun agents under srun (launch/slurm.sbatch).
             Every rank polls it from a background thread every `poll_s` seconds.

`requested` turns true asynchronously (in a signal handler or the polling thread), at different moments
on different ranks. Read it once per step, as the rank's input to a collective (a sum or max over ranks),
and decide on the collective's result only: a rank that looked at the flag again after the collective
could stop alone and leave the others waiting. `on_request(reason)`, if given, is called when a request
arrives (from the handler or the thread): for logging, never for that decision. The owner (rank 0)
deletes a stop file left over from an earlier run when it starts watching and deletes the stop file it
honoured when it stops watching.

    python -m lm.preemption path    CONFIG.yaml [key=value ...]   print the stop file of that run
    python -m lm.preemption request CONFIG.yaml [key=value ...]   create it (ask the run to save and exit)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("lm.preemption")

STOP_FILE = "SAVE_AND_EXIT"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def stop_file(run_dir: str | os.PathLike) -> Path:
    """The file whose existence asks the run in `run_dir` to save and exit."""
    return Path(run_dir) / STOP_FILE


class PreemptionWatcher:
    """Signal handlers and stop-file polling that request "finish the step, save, exit 0"."""

    def __init__(self, run_dir: str | os.PathLike, on_request: Optional[Callable[[str], None]] = None, *,
                 owner: bool = True, poll_s: float = 2.0, signals: tuple = SIGNALS):
        self.path = stop_file(run_dir)
        self.on_request = on_request
        self.owner = owner
        self.poll_s = poll_s
        self.signals = signals
        self.reason: Optional[str] = None
        self._previous: dict = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    # -- install / uninstall --------------------------------------------------------------
    def install(self) -> "PreemptionWatcher":
        if self.owner and self.path.exists():
            log.warning("removing %s left over from an earlier run", self.path)
            self._remove_file()
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        else:  # an embedding application's worker thread: signals stay with the application
            log.info("not in the main thread: signal handlers left alone (the stop file %s still works)", self.path)
        if self.poll_s > 0:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll, name="lm.preemption", daemon=True)
            self._thread.start()
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.owner and self.requested:  # honoured (or about to be): a later run must not see it
            self._remove_file()

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # -- requests -------------------------------------------------------------------------
    def request(self, reason: str) -> None:
        """Record a save request (first reason wins) and tell the caller through on_request."""
        first = self.reason is None
        if first:
            self.reason = reason
        if self.on_request is not None:
            self.on_request(reason)
        if first:
            log.warning("%s: will save a checkpoint and exit after the current step", reason)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # the second Ctrl-C must work even when Python code does not run (a rank stuck in a collective)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.write(2, b"\ninterrupted: saving a checkpoint after the current step, then exiting; "
                        b"press Ctrl-C again to stop at once without saving\n")
        self.request(f"received {name}")

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                present = self.path.exists()
            except OSError:
                continue
            if present:
                self.request(f"found {self.path}")
                return

    def _remove_file(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", self.path, exc)


# --------------------------------------------------------------------------------------------
# CLI: where the stop file of a run is, and asking that run to save and exit
# --------------------------------------------------------------------------------------------


def _run_dir_of(items: list[str]) -> Path:
    from lm.config import load_config

    configs = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    if not configs:
        raise ValueError("give the run's YAML recipe(s) and overrides, as for lm.train")
    return Path(load_config(*configs, overrides=overrides).train.run_dir)


def main(argv=None) -> int:
    import argparse

    from lm.config import ConfigError

    p = argparse.ArgumentParser(prog="python -m lm.preemption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["path", "request"])
    p.add_argument("items", nargs="+", help="the run's YAML recipes and dotted key=value overrides (as for lm.train)")
    # lm.train's own options may come along with the items: accepted and ignored
    p.add_argument("--resume", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--world-size", default=None, help=argparse.SUPPRESS)
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        path = stop_file(_run_dir_of(args.items))
        if args.cmd == "request":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
