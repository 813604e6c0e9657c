"""Model architecture only (no DeepSpeed, IO or logging here)."""

from lm.config import ModelConfig
from lm.model.lm import LanguageModel, ModelOutput


def build_model(model_cfg: ModelConfig) -> LanguageModel:
    """Build the LM for `model.arch` (longvq | transformer); call it on (B, T) int64 token ids."""
    return LanguageModel(model_cfg)


__all__ = ["build_model", "LanguageModel", "ModelOutput"]
