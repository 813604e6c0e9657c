"""Training and evaluation, written once: the engines (plain PyTorch, DeepSpeed), the optimizer step,
the training loop and held-out scoring. lm.train, evals.throughput, evals.quality_race and
evals.perplexity all run these, so what is benchmarked is what trains."""

from lm.engine.engines import (
    GPU_DEFAULT_PRECISION,
    PRECISIONS,
    DeepSpeedEngine,
    Engine,
    TorchEngine,
    build_engine,
    check_hardware,
    misaligned_parameters,
    prepare_model,
    resolve_precision,
)
from lm.engine.evaluate import Score, eval_mode, score, token_nll, windows_nll
from lm.engine.loop import LoopState, RandomTokens, TrainLoop
from lm.engine.step import StepResult, codebook_metrics, train_step, warmup_step

__all__ = [
    "Engine", "TorchEngine", "DeepSpeedEngine", "build_engine", "prepare_model", "check_hardware",
    "resolve_precision", "misaligned_parameters", "PRECISIONS", "GPU_DEFAULT_PRECISION",
    "train_step", "warmup_step", "StepResult", "codebook_metrics", "TrainLoop", "LoopState", "RandomTokens",
    "score", "windows_nll", "token_nll", "Score", "eval_mode",
]
