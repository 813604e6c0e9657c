"""Run a function in N forked processes that form a gloo process group (CPU DeepSpeed tests).

Forking after the heavy imports makes a 1-2 process DeepSpeed job cost about a second instead of
~10 s for a fresh `torchrun`. Never initialise torch.distributed in the pytest process itself.
"""

from __future__ import annotations

import importlib
import io
import multiprocessing as mp
import os
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from lm.parallel.dist import free_port, import_deepspeed  # noqa: E402

deepspeed = import_deepspeed()
import torch._dynamo  # noqa: E402,F401  (deepspeed.initialize imports it lazily: pay once, before forking)

importlib.import_module("deepspeed.runtime.zero.stage_1_and_2")
importlib.import_module("deepspeed.runtime.zero.stage3")


def _worker(fn, rank, world_size, port, queue, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        buf = io.BytesIO()  # plain bytes: torch's fd-sharing pickler races with os._exit below
        torch.save(fn(**kwargs), buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "err", traceback.format_exc()))
    finally:
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        os._exit(0)


def run_dist(fn, world_size: int = 2, timeout: float = 180, **kwargs) -> list:
    """Results of fn(**kwargs) per rank; raises with the failing rank's traceback."""
    from multiprocessing.connection import wait

    if torch.distributed.is_initialized():  # forked children would inherit this process's group (a world of 1)
        raise RuntimeError("torch.distributed is initialised in the pytest process (by an earlier test): every "
                           "distributed test would silently run its ranks as separate one-process worlds")

    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()  # synchronous: mp.Queue's feeder thread dies with os._exit
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, kwargs)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            if not wait([queue._reader], timeout):
                errors.append(f"timeout after {timeout}s; alive={[p.is_alive() for p in procs]}")
                break
            rank, status, payload = queue.get()
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
