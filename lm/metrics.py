"""Training metrics: one TensorBoard writer (rank 0) and a live progress bar (step, loss, tokens/s, ETA)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("lm.train")


PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of one GPU, by name (None when unknown, e.g. on CPU: no MFU is reported)."""
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def flops_per_token(model_cfg, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token (forward + backward), one declared formula per arch:
      both:        6 * n_params                       (all weights incl. the tied embedding/head)
      transformer: + 6 * L * d * T                    (causal attention: 2 matmuls over T/2 keys, x3 fwd+bwd)
      longvq:      + 6 * L * (C/2 + C + S) * (d_z + E) (own chunk, previous chunk, S codes; x3 fwd+bwd)
                   + 2 * L * S * d_z                  (nearest-code search, forward only)
    The EMA's FFT convolution (O(T log T) per channel) and element-wise work are not counted."""
    L = model_cfg.n_layers
    base = 6.0 * n_params
    if model_cfg.arch == "transformer":
        return base + 6.0 * L * model_cfg.d_model * seq_len
    lv = model_cfg.longvq
    C, S = lv.chunk_size, lv.codebook_size
    E = lv.hidden_dim or 2 * model_cfg.d_model
    keys = min(C / 2 + C, seq_len / 2) + S
    return base + 6.0 * L * keys * (lv.z_dim + E) + 2.0 * L * S * lv.z_dim


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
            msg = f"step {step} loss {scalars['train/loss']:.4f} lr {scalars['train/lr']:.2e} tok/s {scalars['train/tokens_per_s']:.0f}{extra}"
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
