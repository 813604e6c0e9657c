"""The DeepSpeed JSON, generated from the typed config: the one source of truth for batch sizes,
accumulation, precision, clipping, ZeRO stage and the optimizer. Never hand-written."""

from __future__ import annotations

from lm.config import OptimConfig, ParallelConfig, TrainConfig


def use_bf16(train: TrainConfig, on_gpu: bool) -> bool:
    return train.precision == "bf16" or (train.precision == "auto" and on_gpu)


def build_deepspeed_config(train: TrainConfig, optim: OptimConfig, parallel: ParallelConfig,
                           dp_world_size: int, on_gpu: bool) -> dict:
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.offload_optimizer:
        if parallel.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if parallel.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = parallel.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * dp_world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,  # torch.optim.AdamW: no JIT-built op on any machine
                **({"fused": True} if on_gpu else {}),
            },
        },
        "bf16": {"enabled": use_bf16(train, on_gpu)},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
