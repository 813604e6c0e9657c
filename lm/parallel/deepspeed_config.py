"""The DeepSpeed JSON, generated from the typed config: the one source of truth for batch sizes,
accumulation, precision, clipping and the ZeRO stage. Never hand-written. The optimizer is ours
(lm.optim.AdamW, handed to `deepspeed.initialize`), and the learning rate is set by the training loop."""

from __future__ import annotations

from lm.config import OptimConfig, ParallelConfig, TrainConfig


def build_deepspeed_config(train: TrainConfig, optim: OptimConfig, parallel: ParallelConfig,
                           dp_world_size: int, on_gpu: bool, precision: str) -> dict:
    """precision: the resolved mode (fp32 | bf16 | bf16-mixed); only `bf16` is DeepSpeed's own bf16 mode
    (bf16-mixed keeps fp32 weights in DeepSpeed and autocasts the forward)."""
    zero: dict = {"stage": parallel.zero_stage}
    if parallel.offload_optimizer:
        if parallel.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if parallel.zero_stage in (1, 2):
        # every parameter starts on a 16-byte boundary inside the flat buffers (compiled kernels assume it;
        # unaligned bf16 parameters made them fault with "misaligned address")
        zero["parameter_alignment"] = True
    if parallel.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = parallel.zero3_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * dp_world_size,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        # bf16-mixed: the forward under torch.autocast, applied by DeepSpeed's engine (an autocast around the
        # engine call is switched off inside it)
        "torch_autocast": {"enabled": precision == "bf16-mixed", "dtype": "bfloat16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # lm.optim.AdamW (torch's AdamW) under ZeRO
        "zero_force_ds_cpu_optimizer": False,  # the same optimizer with ZeRO-Offload
    }
