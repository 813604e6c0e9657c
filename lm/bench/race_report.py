"""Reports of the quality race: JSON-safe results, a markdown report with the targets marked, a plot (loss
against step, time and position, code usage), and merging finished runs into one report."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch

from lm.bench.report import pyplot, recipes_line, save_figure
from lm.config import ConfigError

ARCHS = ("longvq", "transformer")


def json_safe(obj):
    """JSON-safe: tensors to lists, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if torch.is_tensor(obj):
        return json_safe(obj.tolist())
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def summarize(runs: list[dict]) -> dict:
    """Per context: bpb of each arm, the ratio, and the race's targets."""
    out: dict = {}
    for ctx in sorted({r["context"] for r in runs}):
        rs = {r["arch"]: r for r in runs if r["context"] == ctx and r.get("eval")}
        s: dict = {"bpb": {a: r["eval"]["bpb"] for a, r in rs.items()}}
        if "longvq" in rs:
            lv = rs["longvq"]["eval"]
            s["longvq_falls_after_2C"] = lv["long_context"]["falls_after_2C"]
            s["longvq_drop_after_2C"] = lv["long_context"]["drop_after_2C"]
            usage = [c["usage"] for c in lv.get("codebook", [])]
            s["min_layer_code_usage"] = min(usage) if usage else None
            s["codes_ok"] = (min(usage) >= 0.5) if usage else None
        if "longvq" in rs and "transformer" in rs:
            b_lv, b_tf = s["bpb"]["longvq"], s["bpb"]["transformer"]
            s["bpb_ratio_longvq_over_transformer"] = b_lv / b_tf if b_tf else None
            s["longvq_le_transformer"] = bool(b_lv <= b_tf)
            s["longvq_within_2pct"] = bool(b_lv <= 1.02 * b_tf)
        out[str(ctx)] = s
    return out


def _f(x, spec=".4f") -> str:
    return "–" if x is None else format(x, spec)


def _mark(ok) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def race_markdown(result: dict, path: Path) -> None:
    meta, runs, summary = result["meta"], result["runs"], result["summary"]
    cmds = meta.get("commands") or [meta["command"]]
    L = [f"# Quality race: {meta['tag']}", "",
         f"Device {meta['device']}, torch {meta['torch']}, {meta['date']}, engine {meta['engine']}, "
         f"precision {meta['precision']}, budget {meta['budget_minutes']:g} min of training time per arm and context, "
         f"{meta['tokens_per_step']} tokens per optimizer step, seed {meta['seed']}.", "",
         "Command(s):", "", "```", *cmds, "```", "",
         recipes_line(meta["recipes"], meta.get("overrides")), "",
         "Parameters: " + ", ".join(f"{a} {n:,}" for a, n in meta["params"].items())
         + f" (ratio longvq/transformer {meta['param_ratio']:.3f}).", "",
         f"Data: {meta['corpus'].get('dataset')} corpus of Python {meta['corpus'].get('python')} (bytes per split: "
         + ", ".join(f"{k} {v:,}" for k, v in (meta['corpus'].get('bytes') or {}).items())
         + f"), byte level; held-out split `{meta['eval_split']}` ({meta['eval_tokens']:,} tokens scored), disjoint "
         "windows of the training context.", "",
         f"Schedule: {meta['schedule']}; warmup {meta['warmup_frac']:g} of the budget; optimizer "
         + "; ".join(f"{a}: lr {o['lr']:g}, min ratio {o['min_lr_ratio']:g}, wd {o['weight_decay']:g}, clip {o['grad_clip']:g}"
                     for a, o in meta["optim"].items()) + "."
         + (" Merged from several runs: each run's own peak lr is in the table." if meta.get("merged_from") else ""), ""]
    if meta["device"].startswith("cpu"):
        L += ["> CPU run: a smoke test of the script, not a quality result.", ""]
    L += ["## Held-out bits per byte and training", "",
          "| context | arch | peak lr | steps | tokens seen | tokens/s | train loss (end) | valid loss (end) | test bpb | peak GiB |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["context"], r["arch"])):
        ev = r.get("eval") or {}
        vc = r.get("val_curve", {}).get("loss") or [None]
        lr = (r.get("optim") or meta["optim"][r["arch"]])["lr"]
        L.append(f"| {r['context']} | {r['arch']} | {lr:g} | {r['steps']} | {r['tokens_seen']:,} | {_f(r['tokens_per_s'], ',.0f')} | "
                 f"{_f(r['final_train_loss'])} | {_f(vc[-1])} | {_f(ev.get('bpb'))} | {_f(r['peak_mem_gib'], '.1f')} |"
                 + (f" diverged at step {r['diverged_at_step']}" if r.get("diverged_at_step") is not None else ""))
    L += ["", "## Loss by position (nats, buckets of the LongVQ chunk size C)", ""]
    for ctx in sorted({r["context"] for r in runs}):
        rs = sorted((r for r in runs if r["context"] == ctx and r.get("eval")), key=lambda r: r["arch"])
        if not rs:
            continue
        pc0 = rs[0]["eval"]["per_position"]["chunk"]
        C = rs[0]["eval"]["chunk_bucket_width"]
        cols = [f"[{a},{b})" for a, b in zip(pc0["edges"][:-1], pc0["edges"][1:])]
        L += [f"Context {ctx} (C = {C}; buckets from {2 * C} on are reached only through the code cache):", "",
              "| arch | " + " | ".join(cols) + " | drop after 2C |", "|---|" + "---|" * (len(cols) + 1)]
        for r in rs:
            ev = r["eval"]
            L.append(f"| {r['arch']} | " + " | ".join(_f(x, ".3f") for x in ev["per_position"]["chunk"]["loss"])
                     + f" | {_f(ev['long_context']['drop_after_2C'], '.4f')} |")
        L.append("")
    L += ["## Codebook health and attention mass (LongVQ, held-out)", "",
          "| context | layer | codes used (mean / min head) | code perplexity (of S) | rel. quant. error | dead (EMA) | "
          "mass own / prev / cache (all queries) | cache share, queries >= 2C | attention entropy / flat (nats) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r["context"]):
        ev = r.get("eval") or {}
        if r["arch"] != "longvq" or not ev:
            continue
        mass = {m["layer"]: m for m in ev.get("attention_mass", [])}
        for c in ev.get("codebook", []):
            m = mass.get(c["layer"], {})
            late = (m.get("beyond_2C") or {}).get("cache")
            L.append(f"| {r['context']} | {c['layer']} | {c['usage']:.3f} / {c['usage_min_head']:.3f} | "
                     f"{c['perplexity']:.1f} ({c['codebook_size']}) | {c['rel_error']:.3f} | {_f(c['dead_codes_ema'], '.3f')} | "
                     f"{_f(m.get('own'), '.3f')} / {_f(m.get('prev'), '.3f')} / {_f(m.get('cache'), '.3f')} | {_f(late, '.3f')} | "
                     f"{_f(m.get('entropy'), '.2f')} / {_f(m.get('entropy_flat'), '.2f')} |")
    L += ["", "## Targets", ""]
    for ctx, s in summary.items():
        ratio = s.get("bpb_ratio_longvq_over_transformer")
        parts = [f"- Context {ctx}: bpb " + ", ".join(f"{a} {_f(b)}" for a, b in s["bpb"].items())
                 + (f", ratio {ratio:.4f}" if ratio is not None else "")]
        if ratio is not None:
            if int(ctx) >= 16384:
                parts.append(f"  LongVQ <= Transformer (target at 16K): {_mark(s['longvq_le_transformer'])}.")
            elif int(ctx) == 4096:
                parts.append(f"  LongVQ within 2% (target at 4K): {_mark(s['longvq_within_2pct'])}.")
            else:
                parts.append(f"  (no target at this context; <=: {s['longvq_le_transformer']}, within 2%: {s['longvq_within_2pct']})")
        if "longvq_falls_after_2C" in s:
            parts.append(f"  LongVQ loss keeps falling after 2C: {_mark(s['longvq_falls_after_2C'])} "
                         f"(drop {_f(s['longvq_drop_after_2C'])} nats).")
            parts.append(f"  Every layer uses >= 50% of its codes: {_mark(s['codes_ok'])} "
                         f"(lowest layer {_f(s['min_layer_code_usage'], '.3f')}).")
        L += parts
    L += ["", f"Raw data: `{path.with_suffix('.json').name}`; plot: `{path.with_suffix('.png').name}`.", ""]
    path.write_text("\n".join(L))


def _smooth(y: list, frac: float = 0.02) -> np.ndarray:
    y = np.asarray([np.nan if v is None else v for v in y], dtype=float)
    if len(y) < 5:
        return y
    a = 1.0 / max(1.0, frac * len(y))
    out, acc = np.empty_like(y), y[0]
    for i, v in enumerate(y):
        acc = a * v + (1 - a) * acc
        out[i] = acc
    return out


def race_plot(result: dict, path: Path) -> None:
    runs = result["runs"]
    contexts = sorted({r["context"] for r in runs})
    fig, axes = pyplot().subplots(len(contexts), 4, figsize=(20, 4.2 * len(contexts)), squeeze=False)
    colors = {"longvq": "tab:blue", "transformer": "tab:orange"}
    for row, ctx in zip(axes, contexts):
        rs = sorted((r for r in runs if r["context"] == ctx), key=lambda r: r["arch"])
        for r in rs:
            c, lg, vc = colors.get(r["arch"]), r["log"], r["val_curve"]
            row[0].plot(lg["step"], _smooth(lg["loss"]), color=c, label=f"{r['arch']} train")
            row[0].plot(vc["step"], vc["loss"], "o--", color=c, ms=3, label=f"{r['arch']} valid")
            row[1].plot(lg["time_s"], _smooth(lg["loss"]), color=c, label=f"{r['arch']} train")
            row[1].plot(vc["time_s"], vc["loss"], "o--", color=c, ms=3, label=f"{r['arch']} valid")
            ev = r.get("eval")
            if ev:
                fine = ev["per_position"]["fine"]
                mid = [(a + b) / 2 for a, b in zip(fine["edges"][:-1], fine["edges"][1:])]
                row[2].plot(mid, [np.nan if v is None else v for v in fine["loss"]], color=c, alpha=0.35, lw=0.8)
                pc = ev["per_position"]["chunk"]
                row[2].plot([(a + b) / 2 for a, b in zip(pc["edges"][:-1], pc["edges"][1:])],
                            [np.nan if v is None else v for v in pc["loss"]], "s-", color=c, ms=4,
                            label=f"{r['arch']} (bpb {ev['bpb']:.3f}; squares: chunk buckets)")
                C = ev["chunk_bucket_width"]
            cl = r.get("codebook_log", {})
            for k in sorted(k for k in cl if k.endswith("/usage")):
                row[3].plot(cl["step"], cl[k], label=k.split("/")[0], alpha=0.8)
        for ax, xl, title in ((row[0], "optimizer step", "loss vs step"), (row[1], "training time (s)", "loss vs time"),
                              (row[2], "position in window", "held-out loss vs position"),
                              (row[3], "optimizer step", "LongVQ: fraction of codes used")):
            ax.set_xlabel(xl)
            ax.set_title(f"context {ctx}: {title}")
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, ncol=2 if ax is row[3] else 1)
        row[0].set_ylabel("loss (nats)")
        if any(r.get("eval") for r in rs):
            row[2].set_xscale("symlog", linthresh=max(1, C // 4))
            for x, name in ((C, "C"), (2 * C, "2C")):
                row[2].axvline(x, color="gray", ls=":", lw=1)
                row[2].text(x, 1.0, name, transform=row[2].get_xaxis_transform(), va="top", fontsize=8)
        row[3].set_ylim(0, 1.05)
    save_figure(fig, path, f"Quality race {result['meta']['tag']} ({result['meta']['device']}, "
                f"{result['meta']['budget_minutes']:g} min per arm)", dpi=100)


def merge(paths: list[str], tag: str) -> dict:
    """One result from several finished ones. A path may end in ":ARCH@CONTEXT[,ARCH@CONTEXT...]" to take
    only those runs (e.g. each arm's run at its best learning rate). Every run keeps the optimizer settings
    and command of its own file; files with different budgets, recipes or batch sizes are refused."""
    results, selected = [], []
    for item in paths:
        path, sel = item, None
        head, _, tail = item.rpartition(":")
        if head and "@" in tail:
            path, sel = head, {tuple(x.split("@", 1)) for x in tail.split(",")}
            bad = {a for a, _ in sel if a not in ARCHS}
            if bad:
                raise ConfigError(f"--merge {item!r}: {sorted(bad)} not longvq or transformer")
        res = json.loads(Path(path).read_text())
        runs = [r for r in res["runs"] if sel is None or (r["arch"], str(r["context"])) in sel]
        if sel is not None and len(runs) != len(sel):
            have = sorted(f"{r['arch']}@{r['context']}" for r in res["runs"])
            raise ConfigError(f"--merge {item!r}: {path} has the runs {have}")
        for r in runs:
            r.setdefault("optim", res["meta"]["optim"][r["arch"]])
            r.setdefault("command", res["meta"]["command"])
        results.append(res)
        selected += runs
    for key in ("budget_minutes", "recipes", "tokens_per_step"):
        values = {json.dumps(r["meta"].get(key)) for r in results}
        if len(values) > 1:
            raise ConfigError(f"--merge: the files differ in {key} ({', '.join(sorted(values))}): not one comparison")
    meta = copy.deepcopy(results[0]["meta"])
    meta.update(tag=tag, commands=[r["meta"]["command"] for r in results], merged_from=list(paths))
    return {"meta": meta, "runs": selected}


def write_outputs(result: dict, out_dir: Path, tag: str) -> dict:
    """quality_TAG.json (everything), .md (the report) and .png; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result["summary"] = summarize(result["runs"])
    paths = {ext: out_dir / f"quality_{tag}.{ext}" for ext in ("json", "md", "png")}
    clean = json_safe(result)
    paths["json"].write_text(json.dumps(clean, indent=1))
    race_markdown(clean, paths["md"])
    try:
        race_plot(clean, paths["png"])
    except ImportError:
        del paths["png"]
    return paths
