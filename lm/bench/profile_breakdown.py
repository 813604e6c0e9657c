"""Device time of one profiled step by kind of kernel: where a training step's GPU time goes.

    rows = breakdown([(kernel_name, microseconds), ...])   # [(category, ms, share), ...], largest first
    print(breakdown_markdown(rows))

Kernels are matched by name, first rule wins (CATEGORIES). Names come from the device-side events of
torch.profiler (`device_kernels(prof)`), so an operator and the kernels it launched are not counted twice.
"""

from __future__ import annotations

import re
from typing import Iterable

CATEGORIES: list[tuple[str, str]] = [
    ("VQ attention (fused kernels)", r"^_(fwd|bwd_dq|bwd_dkdv|bwd_cache|bwd_dcache|bwd_delta|bwd_cache_suffix)_kernel"),
    ("EMA (scan kernels or FFT)", r"^_(chunk_state|state_pass|chunk_scan|bwd_chunk_fwd|bwd_state_pass|bwd_chunk_rev)_kernel"
                                  r"|fft"),
    ("quantizer", r"^_(quantize|commit_grad)_kernel"),
    ("softmax attention", r"flash|fmha|cudnn|FlashAttn|attention"),
    ("loss (softmax / cross-entropy)", r"[Ss]oft[Mm]ax|cross_entropy|nll_loss|_ce_"),
    ("GEMM", r"nvjet|gemm|xmma|cublas|cutlass|splitK"),
    ("copies and fills", r"copy|Copy|fill|Fill|memcpy|Memcpy|memset|Memset|CatArray"),
    ("element-wise, compiled (inductor)", r"^triton_"),
    ("optimizer and communication", r"multi_tensor|[Aa]dam|nccl|[Aa]ll[Rr]educe|reduce_scatter"),
    ("element-wise and reductions, eager", r"elementwise|reduce_kernel|[Rr]eduction"),
]


def categorize(name: str) -> str:
    for category, pattern in CATEGORIES:
        if re.search(pattern, name):
            return category
    return "other"


def breakdown(kernels: Iterable[tuple[str, float]]) -> list[tuple[str, float, float]]:
    """(name, device microseconds) pairs -> [(category, milliseconds, share of the total)], largest first."""
    totals: dict[str, float] = {}
    for name, us in kernels:
        cat = categorize(name)
        totals[cat] = totals.get(cat, 0.0) + us / 1e3
    whole = sum(totals.values()) or 1.0
    return sorted(((c, ms, ms / whole) for c, ms in totals.items()), key=lambda r: -r[1])


def device_kernels(prof) -> list[tuple[str, float]]:
    """(kernel name, self device microseconds) of every device-side kernel of a torch.profiler run. Ranges
    that annotate the device timeline ("## Call CompiledFxGraph ..."), which span kernels already counted, are
    left out."""
    from torch.autograd import DeviceType

    return [(e.key, e.self_device_time_total) for e in prof.key_averages()
            if e.device_type != DeviceType.CPU and e.self_device_time_total > 0 and not is_annotation(e.key)]


def is_annotation(name: str) -> bool:
    return name.startswith("## ")


def breakdown_markdown(rows: list[tuple[str, float, float]]) -> str:
    total = sum(ms for _, ms, _ in rows)
    lines = ["| category | ms per step | share |", "|---|---|---|"]
    lines += [f"| {c} | {ms:.1f} | {share:.1%} |" for c, ms, share in rows]
    lines.append(f"| total device time | {total:.1f} | |")
    return "\n".join(lines)
