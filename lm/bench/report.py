"""Reports of the throughput benchmark: a markdown table and a plot of tokens/s and peak memory against
context (the JSON rows are the result; these are views of it)."""

from __future__ import annotations

from pathlib import Path

from lm.metrics import FLOPS_FORMULA


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown_table(columns: list[str], rows: list[list]) -> list[str]:
    """The lines of a markdown table: a header of `columns`, then one line per row of cells (str() of each)."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def recipes_line(recipes: dict | list, overrides: list) -> str:
    """'Recipes: ...; overrides `...`.' for a report's header: recipes as {arch: path} or a list of paths."""
    named = [f"{a}: `{r}`" for a, r in recipes.items()] if isinstance(recipes, dict) else [f"`{r}`" for r in recipes]
    return "Recipes: " + ", ".join(named) + (f"; overrides `{' '.join(overrides)}`" if overrides else "") + "."


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (ImportError when matplotlib is not installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str, dpi: int = 110) -> None:
    """Title, lay out, write and close a report figure."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def finish_context_axis(ax, *, xlabel: str, ylabel: str, plotted: bool, log_y: bool) -> None:
    """Axis styling shared by the context sweeps: log2 context axis, grid, legend, log y when asked and data was
    plotted; an empty panel says why (memory is not measured off CUDA)."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if plotted and log_y:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if not plotted:
        ax.text(0.5, 0.5, "not measured on this device" if "memory" in ylabel else "no data",
                ha="center", va="center", transform=ax.transAxes)


def throughput_markdown(rows: list[dict], path: Path, header: dict) -> None:
    """The throughput benchmark (lm.bench.throughput) as a table, with the header's setting above it."""
    lines = [f"# Throughput: {header['tag']}", "",
             f"Device {header['device']}, torch {header['torch']}, {header['date']}, engine {header['engine']}, "
             f"{header['tokens_per_step']} tokens per training step, median of {header['steps']} steps after "
             f"{header['warmup']} warm-ups.", "",
             recipes_line(header["recipes"], header["overrides"]), "",
             "Parameters: " + ", ".join(f"{a} {n:,}" for a, n in header["params"].items())
             + f" (ratio longvq/transformer {header['param_ratio']:.3f}).", "",
             "FLOPs per token: " + "; ".join(f"{a}: {f}" for a, f in FLOPS_FORMULA.items())
             + (f". Peak {header['peak_flops']:.4g} FLOP/s." if header["peak_flops"] else ". No MFU (no peak given for this device)."), ""]
    columns = ["mode", "arch", "context", "batch", "precision", "backend", "tokens/s", "ms/token", "peak GiB", "MFU",
               "vs best baseline", "best baseline", "note"]
    cells = [[r["mode"], r["arch"], r["context"], r.get("batch", ""), r.get("precision") or "", r["backend"] or "",
              _fmt(r["tokens_per_s"], ",.0f"), _fmt(r.get("ms_per_token"), ".2f"), _fmt(r["peak_mem_gib"], ".2f"),
              _fmt(r["mfu"], ".3f"), _fmt(r.get("speedup_vs_best_baseline"), ".2f"),
              "yes" if r.get("best_baseline") else "", r.get("error", "")]
             for r in sorted(rows, key=lambda r: (r["mode"] != "train", r["context"], r["arch"], str(r["backend"])))]
    path.write_text("\n".join(lines + markdown_table(columns, cells)) + "\n")


def throughput_plot(rows: list[dict], path: Path, title: str) -> None:
    """Tokens/s (log scale) and peak memory against context, one panel row per mode (train, decode), one line per
    (arch, backend); a context where a row ran out of memory is shaded red."""
    plt = pyplot()
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
            ax.set_title(f"{mode}: {unit}")
            finish_context_axis(ax, xlabel="prompt length" if mode == "decode" else "context (tokens)", ylabel=unit,
                                plotted=plotted, log_y=key == "tokens_per_s")
    save_figure(fig, path, title)


def sequence_parallel_markdown(rows: list[dict], path: Path, header: dict) -> None:
    """The sequence-parallel sweep (lm.bench.sequence_parallel) as a table."""
    lines = [f"# Sequence parallelism: {header['tag']}", "",
             f"Device {header.get('device') or '?'}, torch {header['torch']}, {header['date']}; SP = {header['nproc']} "
             f"against one GPU at 1/{header['nproc']} of the context; {header['batch']} sequence(s) per step, median "
             f"of {header['steps']} steps after {header['warmup']} warm-ups (the slowest rank).", "",
             recipes_line(header["recipes"], header["overrides"]), "",
             "Exchange: bytes one middle rank receives per layer per optimizer step, forward + backward "
             "(lm.parallel.sequence.exchange_bytes). Efficiency: tokens/s per GPU over the SP = 1 row's at "
             "context / SP.", ""]
    columns = ["arch", "context", "SP", "tokens/GPU", "precision", "tokens/s", "tokens/s/GPU", "efficiency",
               "peak GiB/GPU", "exchange MiB/layer/step", "MFU", "note"]
    cells = [[r["arch"], r["context"], r["sequence_parallel"], r["segment"], r.get("precision") or "",
              _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["tokens_per_s_per_gpu"], ",.0f"), _fmt(r["efficiency"], ".3f"),
              _fmt(r["peak_mem_gib"], ".2f"), _fmt(r["exchange_bytes_per_layer_per_step"] / 2**20, ".2f"),
              _fmt(r["mfu"], ".3f"), r.get("error", "")]
             for r in sorted(rows, key=lambda r: (r["arch"], r["sequence_parallel"], r["context"]))]
    path.write_text("\n".join(lines + markdown_table(columns, cells)) + "\n")


def sequence_parallel_plot(rows: list[dict], path: Path, title: str) -> None:
    """Tokens/s per GPU (log scale) and peak memory per GPU against context, one line per (arch, SP); a failed
    row (OOM) is a red cross at its context at the bottom of both panels."""
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    series: dict = {}
    for r in rows:
        series.setdefault((r["arch"], r["sequence_parallel"]), []).append(r)
    for j, (key, unit) in enumerate((("tokens_per_s_per_gpu", "tokens/s per GPU"), ("peak_mem_gib", "peak memory per GPU (GiB)"))):
        ax = axes[0][j]
        plotted = False
        for (arch, sp), rs in sorted(series.items()):
            pts = sorted((r["context"], r[key]) for r in rs if r.get(key) is not None and not r.get("error"))
            label = f"{arch}, SP={sp}" + (" (Ulysses)" if arch == "transformer" and sp > 1 else "")
            style = {"linestyle": "-" if arch == "longvq" else "--", "marker": "o" if sp == 1 else "s"}
            if pts:
                plotted = True
                ax.plot(*zip(*pts), label=label, **style)
            failed = [r for r in rs if r.get("error")]
            if failed:
                errors = sorted({r["error"][:40] for r in failed})
                ax.scatter([r["context"] for r in failed], [0.03] * len(failed), marker="x", color="red", zorder=5,
                           transform=ax.get_xaxis_transform(), label=f"{label}: {', '.join(errors)}")
        finish_context_axis(ax, xlabel="context (tokens per sequence)", ylabel=unit, plotted=plotted,
                            log_y=key == "tokens_per_s_per_gpu")
    save_figure(fig, path, title)
