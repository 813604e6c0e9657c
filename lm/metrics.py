"""Training metrics: one TensorBoard writer (rank 0) and a live progress bar (step, loss, tokens/s, ETA)."""

from __future__ import annotations

import logging
from pathlib import Path

from lm.config import ARCH_CONFIGS, ModelConfig

log = logging.getLogger("lm.train")


PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of one GPU, by name (None when unknown, e.g. on CPU: no MFU is reported)."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def mean_keys_per_query(cfg: ModelConfig, context: int) -> float:
    """K: keys (or codewords) one query attends to, averaged over positions 0..context-1 (the arch's own rule)."""
    return cfg.mixer.mean_keys_per_query(context)


def head_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(heads, dk, dv) of the attention."""
    return cfg.head_dims()


FLOPS_FORMULA = {arch: cls.FLOPS_FORMULA for arch, cls in ARCH_CONFIGS.items()}
"""The declared FLOPs-per-token formula of each arch (its config class's FLOPS_FORMULA)."""


def flops_per_token(cfg: ModelConfig, n_params: int, context: int) -> float:
    """Training FLOPs (forward + backward) per token (ModelConfig.flops_per_token; one declared formula per
    arch, FLOPS_FORMULA), shared by the trainer's MFU and the throughput benchmark."""
    return cfg.flops_per_token(n_params, context)


def capture_attention_inputs(model, tokens) -> list[tuple[int, int, dict]]:
    """(layer, chunk size, attention inputs) of every LongVQ layer for one forward over `tokens`
    (no carried state); the model's own forward runs, the mixers only keep what they computed."""
    mixers = [(i, b.mixer) for i, b in enumerate(model.blocks) if hasattr(b.mixer, "capture")]
    for _, m in mixers:
        m.capture = True
    try:
        model(tokens)
        return [(i, m.chunk_size, m.__dict__.pop("captured")) for i, m in mixers]
    finally:
        for _, m in mixers:
            m.capture = False
            m.__dict__.pop("captured", None)


def attention_mass_scalars(model, tokens) -> dict:
    """TensorBoard scalars: share of softmax mass on the code cache / previous chunk / own chunk."""
    import torch

    from lm.ops.vq_diagnostics import attention_mass_split

    out, caches = {}, []
    with torch.no_grad():
        for i, C, cap in capture_attention_inputs(model, tokens):
            split = attention_mass_split(**cap, chunk_size=C)
            for region in ("cache", "prev", "own"):
                out[f"attention/{region}_share/layer{i}"] = split[region]
            caches.append(split["cache"])
    if caches:
        out["attention/cache_share"] = sum(caches) / len(caches)
    return out


def summarize_codebooks(layer_metrics: dict) -> dict:
    """Per-layer codebook diagnostics ("layer3/usage") -> averages and per-layer TensorBoard tags."""
    out, groups = {}, {}
    for key, value in layer_metrics.items():
        layer, name = key.split("/", 1)
        out[f"codebook/{name}/{layer}"] = value
        groups.setdefault(name, []).append(value)
    for name, values in groups.items():
        out[f"codebook/{name}"] = sum(values) / len(values)
    return out


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0, progress_bar: bool = True):
        self.enabled = enabled
        self.writer = self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def text(self, tag: str, value: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value)

    def step(self, step: int, scalars: dict, log_scalars: bool) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        if "train/loss" not in scalars:  # a skipped step (non-finite loss)
            msg = f"step {step} skipped: non-finite loss (events so far: {scalars.get('train/nonfinite_events', 0):.0f})"
            self.bar.write(msg) if self.bar is not None else log.warning(msg)
            return
        short = {"loss": f"{scalars['train/loss']:.4f}", "tok/s": f"{scalars['train/tokens_per_s']:.0f}"}
        if "codebook/usage" in scalars:
            short["codes"] = f"{scalars['codebook/usage']:.2f}"
        if self.bar is not None:
            self.bar.set_postfix(short, refresh=False)
        if log_scalars:
            extra = f" valid_bpb {scalars['valid/bpb']:.3f}" if "valid/bpb" in scalars else ""
            rate = scalars.get("train/tokens_per_s_interval", scalars["train/tokens_per_s"])
            msg = f"step {step} loss {scalars['train/loss']:.4f} lr {scalars['train/lr']:.2e} tok/s {rate:.0f}{extra}"
            if self.bar is not None:
                self.bar.write(msg)
            else:
                log.info(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
