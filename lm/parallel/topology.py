"""The DP x SP x PP process mesh (shape, rank coordinates, sequence-parallel groups), its description and a
per-GPU memory estimate (what `python -m lm.train --dry-run` prints)."""

from __future__ import annotations

import json

import torch

from lm.config import ConfigError, RunConfig
from lm.parallel.deepspeed_config import build_deepspeed_config


def mesh_shape(world: int, cfg: RunConfig) -> tuple[int, int, int]:
    """(DP, SP, PP) for `world` processes: world = DP x SP x PP. ConfigError naming the keys when
    parallel.sequence_parallel x parallel.pipeline_stages does not divide the world size."""
    sp, pp = cfg.parallel.sequence_parallel, cfg.parallel.pipeline_stages
    if world < 1:
        raise ConfigError(f"world size must be >= 1, got {world}")
    if world % (sp * pp):
        raise ConfigError(f"world size {world} is not divisible by parallel.sequence_parallel={sp} x "
                          f"parallel.pipeline_stages={pp} = {sp * pp}: launch a multiple of {sp * pp} processes "
                          f"or change those keys")
    return world // (sp * pp), sp, pp


def mesh_coordinates(rank: int, world: int, cfg: RunConfig) -> tuple[int, int, int]:
    """(dp_index, sp_index, pp_index) of a global rank. SP is the innermost (fastest) dimension: the SP ranks
    of one sequence are consecutive (one node, the fastest links), then DP, then pipeline stages, as in
    DeepSpeed's PipeDataParallelTopology: rank = (pp_index x DP + dp_index) x SP + sp_index."""
    dp, sp, pp = mesh_shape(world, cfg)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    return (rank // sp) % dp, rank % sp, rank // (sp * dp)


def sequence_parallel_groups(world: int, sp: int) -> list[list[int]]:
    """The global ranks of every sequence-parallel group (pipeline_stages = 1), in segment order."""
    if sp < 1 or world % sp:
        raise ConfigError(f"parallel.sequence_parallel={sp} does not divide world size {world}")
    return [list(range(start, start + sp)) for start in range(0, world, sp)]


def replicas(world: int, cfg: RunConfig) -> int:
    """Copies of each parameter that average their gradients (DeepSpeed's data-parallel world): DP x SP.
    The SP ranks of a sequence hold the same parameters, each with the gradient of its own segment."""
    dp, sp, _ = mesh_shape(world, cfg)
    return dp * sp


def describe_topology(cfg: RunConfig, world: int) -> str:
    dp, sp, pp = mesh_shape(world, cfg)
    t = cfg.train
    seq = cfg.data.seq_len
    segment = f" in {sp} segments of {seq // sp} tokens (one per SP rank)" if sp > 1 else ""
    return (f"world {world} = DP {dp} x SP {sp} x PP {pp}; ZeRO-{cfg.parallel.zero_stage}; micro-batch "
            f"{t.micro_batch_size} x accum {t.grad_accum_steps} x DP {dp} = global batch "
            f"{t.micro_batch_size * t.grad_accum_steps * dp} sequences of {seq} tokens{segment}")


def memory_estimate_gib(cfg: RunConfig, world: int, n_params: int, bf16: bool = True) -> dict:
    """Rough per-GPU memory: model states by ZeRO stage (partitioned over DP x SP replicas) plus an
    activation estimate for this rank's tokens (a segment of seq_len / SP per sequence)."""
    dp, sp, pp = mesh_shape(world, cfg)
    z = cfg.parallel.zero_stage
    shards = dp * sp
    p = n_params / pp
    w_bytes = 2 if bf16 else 4
    weights = p * w_bytes / (shards if z >= 3 else 1)
    grads = p * w_bytes / (shards if z >= 2 else 1)
    opt = p * ((4 if bf16 else 0) + 8) / (shards if z >= 1 else 1)
    if cfg.parallel.offload_optimizer:
        opt = 0.0
    m = cfg.model
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len // sp
    layers = m.n_layers / pp
    act_per_layer = tokens * m.d_model * 34 * w_bytes / 2  # Megatron's 34*s*b*h (bf16), no attention scores
    act_per_layer += m.mixer.attention_activation_bytes(tokens, m.d_model)
    acts = act_per_layer * (1 if cfg.parallel.activation_checkpointing else layers)
    if cfg.parallel.activation_checkpointing:
        acts += tokens * m.d_model * w_bytes * layers
    gib = 1024 ** 3
    parts = {"weights": weights / gib, "grads": grads / gib, "optimizer": opt / gib, "activations": acts / gib}
    parts["total"] = sum(parts.values())
    return parts


def dry_run_report(cfg: RunConfig, world: int) -> str:
    dp, sp, pp = mesh_shape(world, cfg)
    from lm.model import build_model
    from lm.parallel.sequence import exchange_bytes

    n_params = build_model(cfg.model).num_params()
    from lm.engine import GPU_DEFAULT_PRECISION

    bf16 = cfg.train.precision != "fp32"
    mem = memory_estimate_gib(cfg, world, n_params, bf16=bf16)
    precision = GPU_DEFAULT_PRECISION if cfg.train.precision == "auto" else cfg.train.precision
    ds = build_deepspeed_config(cfg.train, cfg.optim, cfg.parallel, dp * sp, on_gpu=True, precision=precision)
    lines = [
        f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}",
        f"topology: {describe_topology(cfg, world)}",
        f"precision (GPU): {precision}",
        "memory per GPU (rough, GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items()),
    ]
    if sp > 1:
        traffic = exchange_bytes(cfg.model, cfg.train.micro_batch_size, sp, cfg.data.seq_len,
                                 torch.bfloat16 if bf16 else torch.float32)
        parts = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in traffic["parts"].items())
        lines.append(f"sequence parallel exchange per rank per layer per micro-batch (forward + backward): "
                     f"{traffic['per_layer'] / 2**20:.2f} MiB ({parts})")
    lines.append(f"deepspeed config (GPU): {json.dumps(ds)}")
    return "\n".join(lines)
