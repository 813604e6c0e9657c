"""Topology description and a per-GPU memory estimate (what `python -m lm.train --dry-run` prints)."""

from __future__ import annotations

import json

from lm.config import ConfigError, RunConfig
from lm.parallel.deepspeed_config import build_deepspeed_config


def describe_topology(cfg: RunConfig, world: int) -> str:
    pp = cfg.parallel.pipeline_stages
    dp = world // pp
    t = cfg.train
    return (f"world {world} = DP {dp} x PP {pp}; ZeRO-{cfg.parallel.zero_stage}; micro-batch {t.micro_batch_size} x "
            f"accum {t.grad_accum_steps} x DP {dp} = global batch {t.micro_batch_size * t.grad_accum_steps * dp} "
            f"sequences of {cfg.data.seq_len} tokens")


def memory_estimate_gib(cfg: RunConfig, world: int, n_params: int, bf16: bool = True) -> dict:
    """Rough per-GPU memory: model states by ZeRO stage plus an activation estimate."""
    pp = cfg.parallel.pipeline_stages
    dp = world // pp
    z = cfg.parallel.zero_stage
    p = n_params / pp
    w_bytes = 2 if bf16 else 4
    weights = p * w_bytes / (dp if z >= 3 else 1)
    grads = p * w_bytes / (dp if z >= 2 else 1)
    opt = p * ((4 if bf16 else 0) + 8) / (dp if z >= 1 else 1)
    if cfg.parallel.offload_optimizer:
        opt = 0.0
    m = cfg.model
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    layers = m.n_layers / pp
    act_per_layer = tokens * m.d_model * 34 * w_bytes / 2  # Megatron's 34*s*b*h (bf16), no attention scores
    if m.arch == "longvq":
        lv = m.longvq
        act_per_layer += tokens * lv.n_heads * (2 * lv.chunk_size + lv.codebook_size) * 4  # fp32 joint scores
    else:
        act_per_layer += tokens * m.d_model * 4  # flash/cuDNN attention keeps O(T) statistics only
    acts = act_per_layer * (1 if cfg.parallel.activation_checkpointing else layers)
    if cfg.parallel.activation_checkpointing:
        acts += tokens * m.d_model * w_bytes * layers
    gib = 1024 ** 3
    parts = {"weights": weights / gib, "grads": grads / gib, "optimizer": opt / gib, "activations": acts / gib}
    parts["total"] = sum(parts.values())
    return parts


def dry_run_report(cfg: RunConfig, world: int) -> str:
    pp = cfg.parallel.pipeline_stages
    if world % pp:
        raise ConfigError(f"parallel.pipeline_stages={pp} does not divide world size {world}")
    from lm.model import build_model

    n_params = build_model(cfg.model).num_params()
    mem = memory_estimate_gib(cfg, world, n_params, bf16=cfg.train.precision != "fp32")
    from lm.engine import GPU_DEFAULT_PRECISION

    precision = GPU_DEFAULT_PRECISION if cfg.train.precision == "auto" else cfg.train.precision
    ds = build_deepspeed_config(cfg.train, cfg.optim, cfg.parallel, world // pp, on_gpu=True, precision=precision)
    lines = [
        f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, d_model {cfg.model.d_model}",
        f"topology: {describe_topology(cfg, world)}",
        f"precision (GPU): {precision}",
        "memory per GPU (rough, GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items()),
        f"deepspeed config (GPU): {json.dumps(ds)}",
    ]
    return "\n".join(lines)
