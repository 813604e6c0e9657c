"""Process setup for DeepSpeed: launcher-less single-process defaults, the backend, and the
data-parallel all-reduce of codebook statistics (one bucketed collective per optimizer step)."""

from __future__ import annotations

import functools
import contextlib
import importlib
import os
import socket

import torch
import torch.distributed as tdist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_launcher_env() -> None:
    """`python -m lm.train` without torchrun/deepspeed: behave as a 1-process launch."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))


def import_deepspeed():
    """Import DeepSpeed quietly; skip the 55 s g++ build of its inference-only shm op on CPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    comm_torch = importlib.import_module("deepspeed.comm.torch")
    if os.environ.get("LONGVQ_BUILD_SHM", "0") != "1":
        comm_torch.build_shm_op = lambda: None
    return deepspeed


def init_distributed():
    deepspeed = import_deepspeed()
    if not tdist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return deepspeed


@contextlib.contextmanager
def distributed():
    """The process group for the duration of the block (launcher-less: a one-process group); a one-process
    group created here is torn down afterwards, also after an error."""
    created = not tdist.is_initialized()
    ensure_launcher_env()
    init_distributed()
    try:
        yield
    finally:
        if created and tdist.is_initialized() and tdist.get_world_size() == 1:
            tdist.destroy_process_group()


def shutdown_distributed() -> None:
    """After a finished run: wait for every rank, then tear the process group down. Left to exit-time
    destructors, with ranks exiting at different moments, a 2-process CPU run sometimes ended in
    std::terminate after its last checkpoint (exit status 250 / SIGABRT; tests/test_launch.py, about 1 run in
    10 before, none in 20 after)."""
    if tdist.is_initialized():
        tdist.barrier()  # no rank tears its connections down while a peer still uses them
        tdist.destroy_process_group()


def all_reduce_codebook_stats(quantizers, group=None) -> None:
    """Sum every layer's statistics (counts, key sums, error sums) over the group of replicas in one
    collective, in the statistics' own dtype; pending key samples (first-batch initialisation, dead-code
    re-seeding) are taken from the group's first rank. The group is every rank that holds the same layers:
    data parallel x sequence parallel (each SP rank saw its segment of the sequences)."""
    if not quantizers or not tdist.is_initialized() or tdist.get_world_size(group) == 1:
        return
    pending = [(vq, name) for vq in quantizers for name in ("init_keys", "reseed_keys") if getattr(vq, name, None) is not None]
    if pending:
        flat = torch.cat([getattr(vq, name).reshape(-1) for vq, name in pending])
        src = 0 if group is None else tdist.get_global_rank(group, 0)
        tdist.broadcast(flat, src=src, group=group)
        offset = 0
        for vq, name in pending:
            sample = getattr(vq, name)
            setattr(vq, name, flat[offset: offset + sample.numel()].view_as(sample))
            offset += sample.numel()
    tensors = [getattr(vq, name) for vq in quantizers for name in vq.stat_names]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, group=group)
    torch._foreach_copy_(tensors, [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)])
