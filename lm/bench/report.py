"""Reports of the throughput benchmark: a markdown table and a plot of tokens/s and peak memory against
context (the JSON rows are the result; these are views of it)."""

from __future__ import annotations

from pathlib import Path

from lm.metrics import FLOPS_FORMULA


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def throughput_markdown(rows: list[dict], path: Path, header: dict) -> None:
    lines = [f"# Throughput: {header['tag']}", "",
             f"Device {header['device']}, torch {header['torch']}, {header['date']}, engine {header['engine']}, "
             f"{header['tokens_per_step']} tokens per training step, median of {header['steps']} steps after "
             f"{header['warmup']} warm-ups.", "",
             "Recipes: " + ", ".join(f"{a}: `{r}`" for a, r in header["recipes"].items())
             + (f"; overrides `{' '.join(header['overrides'])}`" if header["overrides"] else "") + ".", "",
             "Parameters: " + ", ".join(f"{a} {n:,}" for a, n in header["params"].items())
             + f" (ratio longvq/transformer {header['param_ratio']:.3f}).", "",
             "FLOPs per token: " + "; ".join(f"{a}: {f}" for a, f in FLOPS_FORMULA.items())
             + (f". Peak {header['peak_flops']:.4g} FLOP/s." if header["peak_flops"] else ". No MFU (no peak given for this device)."), "",
             "| mode | arch | context | batch | precision | backend | tokens/s | ms/token | peak GiB | MFU | vs best baseline | best baseline | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["mode"] != "train", r["context"], r["arch"], str(r["backend"]))):
        lines.append(
            f"| {r['mode']} | {r['arch']} | {r['context']} | {r.get('batch', '')} | {r.get('precision') or ''} | "
            f"{r['backend'] or ''} | {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r.get('ms_per_token'), '.2f')} | "
            f"{_fmt(r['peak_mem_gib'], '.2f')} | {_fmt(r['mfu'], '.3f')} | {_fmt(r.get('speedup_vs_best_baseline'), '.2f')} | "
            f"{'yes' if r.get('best_baseline') else ''} | {r.get('error', '')} |")
    path.write_text("\n".join(lines) + "\n")


def throughput_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("train", "decode") if any(r["mode"] == m for r in rows)] or ["train"]
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 4.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        series: dict = {}
        for r in rows:
            if r["mode"] == mode:
                series.setdefault(f"{r['arch']} ({r['backend'] or '?'})", []).append(r)
        for j, (key, unit) in enumerate((("tokens_per_s", "tokens/s"), ("peak_mem_gib", "peak memory (GiB)"))):
            ax = axes[i][j]
            plotted = False
            for label, rs in sorted(series.items()):
                pts = sorted((r["context"], r[key]) for r in rs if r.get(key) is not None)
                if pts:
                    plotted = True
                    ax.plot(*zip(*pts), marker="o", label=label,
                            linestyle="-" if label.startswith("longvq") else "--")
                for r in rs:
                    if r.get("error") == "OOM":
                        ax.axvline(r["context"], color="red", alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt length" if mode == "decode" else "context (tokens)")
            ax.set_ylabel(unit)
            ax.set_title(f"{mode}: {unit}")
            ax.grid(True, which="both", alpha=0.3)
            if plotted:
                ax.legend(fontsize=8)
                if key == "tokens_per_s":
                    ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, "not measured on this device" if key == "peak_mem_gib" else "no data",
                        ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
