"""Training metrics: one TensorBoard writer (rank 0) and a live progress bar (step, loss, tokens/s, ETA)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("lm.train")


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
        short = {"loss": f"{scalars['train/loss']:.4f}", "tok/s": f"{scalars['train/tokens_per_s']:.0f}"}
        if "codebook/usage" in scalars:
            short["codes"] = f"{scalars['codebook/usage']:.2f}"
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
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
