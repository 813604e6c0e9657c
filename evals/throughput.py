"""Training and decoding throughput / memory of LongVQ against a matched Transformer baseline.

    python -m evals.throughput [--arch longvq transformer] [--contexts 2048 4096 ... 131072]
        [--tokens-per-step 65536] [--preset 125m|40m|tiny] [--preset-file FILE.yaml] [--set ARCH.key=value]
        [--decode-prompts 4096 65536] [--decode-tokens 128] [--out-dir evals/results] [--tag NAME]
        [--attention-impl auto] [--attn-backends cudnn flash] [--peak-flops 989e12]

Plain PyTorch, one process, one device: no DeepSpeed (it is never imported, so this runs on a GPU box
that lacks it). Both arms use the same code path; only `model.arch` differs.

Models (presets; `--preset-file` gives the same structure in YAML, `--set ARCH.key.path=value` edits one
arm, ARCH = longvq | transformer | all, e.g. `--set longvq.longvq.chunk_size=256`):
  125m         both: 12 layers, d_model 768, vocab 32000, tied embeddings.
               Transformer: 12 heads x 64 (RoPE, SwiGLU FFN 2048): 109,529,856 parameters, the model of
               research/h200_baseline_probe.md.
               LongVQ: chunk C = 512, codebook S = 512, 12 heads, z_dim 768 (so q/k head dim 64),
               hidden E = 2 d_model = 1536 (value head dim 128), EMA dim 16, NFFN 2 d_model:
               117,391,248 parameters (ratio 1.072). The paper's defaults (E = 2 d, FFN 2 d) are kept
               rather than shrunk to hit 1.00: the LongVQ arm is the larger one, so the comparison is
               conservative for it. 12 heads give head dims 64 (q/k) and 128 (v), inside the 64-128
               range the fused kernel and SDPA are tuned for.
  40m          the quality race's models (evals/quality_race.py, docs/quality.md): 12 layers, d_model 512,
               vocab 256; LongVQ C = S = 512, 8 heads, z_dim 512, residual=add, local_raw_keys, query_norm,
               dead_code_reseed=batch (41,560,672); Transformer 8 x 64, SwiGLU 1536 (41,038,336).
  tiny         CPU smoke test: 2 layers, d_model 64, vocab 256; LongVQ C = S = 16, 2 heads.
The parameter counts of both arms are printed with their ratio; the run stops (exit 2) when they differ
by more than --param-tolerance (default 10 %).

Training row (mode "train"): batch = max(1, tokens_per_step // context) sequences of `context` tokens.
One step = forward + cross-entropy + aux (commitment) loss + backward + AdamW step (fused on CUDA) +
`model.apply_codebook_updates()`. bf16 autocast on CUDA (fp32 weights), fp32 on CPU. `--warmup` steps
(default 2) are run untimed, then `--steps` (default 5) are timed one by one (synchronised); the row
reports the median: tokens_per_s = batch * context / median step time.

FLOPs (one declared formula per arch; `flops_per_token` and `flops_formula` are written in each row):
  N = all parameters (tied embedding counted once, so the LM head matmul is included).
  Attention per layer, per head, per token, forward + backward = 3 x forward, forward = 2 FLOPs per
  key for q.k and 2 per key for p.v: 6 * K * (dk + dv), K = keys one query really attends to,
  averaged over the positions 0..T-1 of a training sequence.
    Transformer  K = (T + 1) / 2 (causal)             -> 6 N + 6 L H (T+1)/2 (2 d/H) ~= 6 N + 6 L d T
    LongVQ       K = own chunk (i mod C) + 1, plus C if i >= C (previous chunk), plus S if i >= 2C
                 (codebook scores)                    -> ~= 6 N + 6 L H ((C+1)/2 + C + S) (dk + dv)
  Not counted (both arms): norms, activations, softmax, RoPE, the key quantisation distances
  (2 S dk per token per head, forward only), the EMA's FFT convolution (O(d log T) per token) and the
  codebook update. MFU = tokens_per_s * flops_per_token / peak_flops, peak 989e12 (dense bf16 H100/H200)
  on CUDA; on CPU MFU is null unless --peak-flops is given.

Transformer baseline: every backend in --attn-backends gets its own row (default on CUDA: flash_attn if
installed, then cuDNN and flash SDPA; on CPU: auto); `backend` is the SDPA backend that actually ran
(`lm.ops.sdpa.last_backend`). Per context, the fastest error-free Transformer row gets
`best_baseline: true`, and LongVQ rows get `speedup_vs_best_baseline`. For LongVQ, `backend` is the
VQ attention implementation that ran (fused | chunked | dense), resolved from --attention-impl.

Decode row (mode "decode", context = prompt length): batch --decode-batch (default 1). The prompt is
prefilled in pieces of --prefill-chunk tokens carrying the state (LongVQ: EMA state + VQ cache, constant
memory; Transformer: KV cache), then --decode-warmup greedy steps untimed and --decode-tokens timed
greedy steps, one token per forward: tokens_per_s = batch * decode_tokens / time. `state_gib` is the
carried state's size at the end; mfu is null for decode rows.

Memory: `peak_mem_gib` = torch.cuda.max_memory_allocated, reset before each row; null on CPU.
A row that runs out of memory is recorded with "error": "OOM" (other failures with their message) and
the sweep continues. Outputs, rewritten after every row: OUT_DIR/throughput_TAG.json (the list of rows),
throughput_TAG.md (a table) and throughput_TAG.png (tokens/s and peak memory against context, log x).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import torch
import yaml

from evals.common import pick_device
from lm.config import ConfigError, ModelConfig, RunConfig, from_dict
from lm.model import build_model
from lm.parallel.activation_checkpointing import apply_activation_checkpointing
from lm.parallel.compile import eager_blocks, maybe_compile, set_tf32
from lm.metrics import PEAK_BF16_FLOPS, FLOPS_FORMULA, flops_per_token
from lm.ops import sdpa
from lm.ops.vq_attention import resolve_impl

ARCHS = ("longvq", "transformer")
H200_PEAK_BF16 = PEAK_BF16_FLOPS["H200"]  # one table of GPU peaks: lm/metrics.py
CONTRACT_FIELDS = ("arch", "context", "mode", "tokens_per_s", "peak_mem_gib", "mfu", "params", "backend",
                   "device", "date")

PRESETS: dict[str, dict] = {
    "125m": {
        "common": {"vocab_size": 32000, "d_model": 768, "n_layers": 12, "tie_embeddings": True},
        "longvq": {"longvq": {"chunk_size": 512, "codebook_size": 512, "n_heads": 12, "z_dim": 768,
                              "ema_dim": 16}},
        "transformer": {"transformer": {"n_heads": 12}},
    },
    # The quality race's models (evals/quality_race.py, issue 7): bytes, d_model 512, about 41M parameters each.
    # LongVQ with the options the H200 race sweeps chose (docs/quality.md, 2026-11-29): a plain residual (MEGA's
    # gated one halves the residual stream in each of the 12 layers: 2.01 -> 1.57 bpb at 4K), exact local keys
    # and RMS-normalised queries (2.34 -> 2.01), dead codes re-seeded from the batch (every layer >= 50 % of its
    # codes, same bpb). --set longvq.longvq.residual=gated etc. gives MEGA's block back.
    "40m": {
        "common": {"vocab_size": 256, "d_model": 512, "n_layers": 12, "tie_embeddings": True},
        "longvq": {"longvq": {"chunk_size": 512, "codebook_size": 512, "n_heads": 8, "z_dim": 512, "ema_dim": 16,
                              "residual": "add", "local_raw_keys": True, "query_norm": True,
                              "dead_code_reseed": "batch"}},
        "transformer": {"ffn_dim": 1536, "transformer": {"n_heads": 8}},
    },
    "tiny": {
        "common": {"vocab_size": 256, "d_model": 64, "n_layers": 2, "tie_embeddings": True},
        "longvq": {"longvq": {"chunk_size": 16, "codebook_size": 16, "n_heads": 2, "z_dim": 32, "ema_dim": 4}},
        "transformer": {"transformer": {"n_heads": 2}},
    },
}


class ParamMismatchError(ValueError):
    """The two arms are not of matched size."""


# --------------------------------------------------------------------------------------------
# Models and FLOPs
# --------------------------------------------------------------------------------------------


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def model_configs(preset: dict, overrides=(), attention_impl: Optional[str] = None) -> dict[str, ModelConfig]:
    """{arch: ModelConfig} from a preset {"common": {...}, "longvq": {...}, "transformer": {...}} and
    overrides "ARCH.key.path=value" (ARCH = longvq | transformer | all)."""
    trees = {a: _merge(_merge({"arch": a}, preset.get("common", {})), preset.get(a, {})) for a in ARCHS}
    if attention_impl is not None:
        _merge(trees["longvq"], {"longvq": {"attention_impl": attention_impl}})
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r} must look like ARCH.key.path=value, ARCH in longvq|transformer|all")
        key, raw = item.split("=", 1)
        target, path = key.split(".", 1)
        if target not in ARCHS + ("all",):
            raise ConfigError(f"--set {item!r}: {target!r} is not longvq, transformer or all")
        value = yaml.safe_load(raw)
        for arch in (ARCHS if target == "all" else (target,)):
            node = trees[arch]
            *parents, leaf = path.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    out = {}
    for arch, tree in trees.items():
        cfg = from_dict(ModelConfig, tree)
        RunConfig(model=cfg).validate()
        out[arch] = cfg
    return out


def count_params(cfg: ModelConfig) -> int:
    """Parameters of the built model (tied embedding counted once), without allocating memory."""
    with torch.device("meta"):
        return build_model(cfg).num_params()


def check_param_match(params: dict[str, int], tolerance: float = 0.10) -> float:
    """longvq / transformer parameter ratio; ParamMismatchError when it is outside 1 +- tolerance."""
    ratio = params["longvq"] / params["transformer"]
    if abs(ratio - 1.0) > tolerance:
        raise ParamMismatchError(
            f"parameter counts are not matched: longvq {params['longvq']:,} vs transformer "
            f"{params['transformer']:,} (ratio {ratio:.3f}, allowed 1 +- {tolerance:g}); change the preset "
            "(e.g. --set longvq.ffn_dim=... or --set longvq.longvq.z_dim=...)")
    return ratio


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _record_vq_impl(seen: set):
    """Record which VQ attention implementation the LongVQ mixers really run (for `backend`)."""
    import lm.model.longvq as longvq_mod

    orig = longvq_mod.vq_attention

    def wrapped(q, k_hat, v, codes, codebook, *, chunk_size, state=None, impl="auto", **kw):
        seen.add(resolve_impl(impl, q, v, chunk_size, state))
        return orig(q, k_hat, v, codes, codebook, chunk_size=chunk_size, state=state, impl=impl, **kw)

    longvq_mod.vq_attention = wrapped
    try:
        yield
    finally:
        longvq_mod.vq_attention = orig


def _backend_name(arch: str, seen: set) -> Optional[str]:
    if arch == "transformer":
        return sdpa.last_backend
    return "+".join(sorted(seen)) if seen else None


def _peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x) for x in obj.values())
    if dataclasses.is_dataclass(obj):
        return sum(_tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def _train_step_fn(cfg: ModelConfig, context: int, args, device: torch.device):
    """(batch, step function) for one training step of a fresh model at this context."""
    batch = max(1, args.tokens_per_step // context)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    maybe_compile(model, args.compile is not None, args.compile or "inductor")
    set_tf32(not args.no_tf32)
    if args.activation_checkpointing:  # both arms alike; recomputation does not re-count codebook stats
        apply_activation_checkpointing(model.blocks, args.checkpoint_blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = torch.randint(0, cfg.vocab_size, (batch, context + 1), device=device)
    inputs, targets = data[:, :-1], data[:, 1:]

    def step():
        with _autocast(device):
            out = model(inputs, targets=targets, loss_chunk_tokens=args.loss_chunk_tokens)
            loss = out.loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.apply_codebook_updates()

    return batch, step, model


def profile_step(cfg: ModelConfig, context: int, args, device: torch.device, rows: int = 80) -> str:
    """torch.profiler table (device time, top kernels) of one training step after two warm-ups."""
    from torch.profiler import ProfilerActivity, profile

    _, step, _ = _train_step_fn(cfg, context, args, device)
    step()
    step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    by_op = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    # where the eager copies and element-wise ops come from: the same events by input shape and by the
    # Python stack that issued them (ops inside compiled graphs show the graph's frame)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by=key, row_limit=rows // 2, max_name_column_width=40, max_shapes_column_width=90)
    by_stack = prof.key_averages(group_by_stack_n=4).table(
        sort_by=key, row_limit=rows // 2, max_name_column_width=40, max_src_column_width=110)
    return f"{by_op}\n\nBy input shape:\n{by_shape}\n\nBy Python stack (4 frames):\n{by_stack}"


def train_row(cfg: ModelConfig, context: int, args, device: torch.device) -> dict:
    batch, step, model = _train_step_fn(cfg, context, args, device)
    seen: set = set()
    sdpa.last_backend = None

    with _record_vq_impl(seen), eager_blocks(model):  # eager: the recording wrapper must not enter a compiled graph
        step()  # first warm-up step also records the attention implementation
    for _ in range(max(0, args.warmup - 1)):
        step()
    times = []
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"batch": batch, "tokens": batch * context, "step_times_s": times,
            "activation_checkpointing": args.activation_checkpointing,
            "checkpoint_blocks": args.checkpoint_blocks if args.activation_checkpointing else None, "compile": args.compile, "tf32": not args.no_tf32,
            "loss_chunk_tokens": args.loss_chunk_tokens,
            "tokens_per_s": batch * context / median, "backend": _backend_name(cfg.arch, seen),
            "peak_mem_gib": _peak_gib(device)}


@torch.no_grad()
def decode_row(cfg: ModelConfig, prompt_len: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    B = args.decode_batch
    prompt = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=device)
    seen: set = set()
    sdpa.last_backend = None
    with _autocast(device):
        _sync(device)
        t0 = time.perf_counter()
        state, out = None, None
        for s in range(0, prompt_len, args.prefill_chunk):
            out = model(prompt[:, s:s + args.prefill_chunk], state=state, return_state=True)
            state = out.state
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        with _record_vq_impl(seen):
            out = model(nxt, state=state, return_state=True)
        state, nxt = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(max(0, args.decode_warmup - 1)):
            out = model(nxt, state=state, return_state=True)
            state, nxt = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens):
            out = model(nxt, state=state, return_state=True)
            state, nxt = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        decode_s = time.perf_counter() - t0
    return {"batch": B, "decode_tokens": args.decode_tokens, "decode_s": decode_s,
            "tokens_per_s": B * args.decode_tokens / max(decode_s, 1e-12),
            "prefill_tokens_per_s": B * prompt_len / max(prefill_s, 1e-12),
            "state_gib": _tensor_bytes(state) / 2**30, "backend": _backend_name(cfg.arch, seen),
            "peak_mem_gib": _peak_gib(device)}


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(fn, cfg, context, args, device) -> dict:
    """Run one row; OOM and other failures become {"error": ...} instead of ending the sweep."""
    if args.compile:  # each row compiles its own model: without a reset, Dynamo's per-function recompile limit
        torch._dynamo.reset()  # (8) is reached after a few (arch, context) rows and later rows silently run eager
    if device.type == "cuda":
        _free(device)
        torch.cuda.reset_peak_memory_stats(device)
    error = None
    try:
        result = fn(cfg, context, args, device)
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        error = "OOM" if _is_oom(exc) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if error != "OOM" and args.raise_errors:
            raise
        ran = sdpa.last_backend if cfg.arch == "transformer" else None
        requested = cfg.transformer.attn_backend if cfg.arch == "transformer" else cfg.longvq.attention_impl
        result = {"tokens_per_s": None, "backend": ran or requested, "peak_mem_gib": _peak_gib(device), "error": error}
        if error == "OOM":  # which allocation failed, and where (the innermost frames of this project)
            frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)
                      if "/lm/" in f.filename or "/evals/" in f.filename]
            result["error_detail"] = f"{str(exc).splitlines()[0][:160] if str(exc) else ''} at {' < '.join(frames[::-1][:4])}"
    _free(device)  # the traceback's frames are gone here, so their tensors can be released
    return result


# --------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------


def default_backends(device: torch.device, requested: list[str]) -> list[str]:
    if requested != ["auto"] or device.type != "cuda":
        return requested
    return (["flash_attn"] if sdpa.flash_attn_available() else []) + ["cudnn", "flash"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def mark_best(rows: list[dict]) -> None:
    """best_baseline per (mode, context) among error-free Transformer rows; LongVQ speedups against it."""
    for r in rows:
        r["best_baseline"] = False
    groups: dict = {}
    for r in rows:
        if r["arch"] == "transformer" and r.get("tokens_per_s"):
            key = (r["mode"], r["context"])
            if key not in groups or r["tokens_per_s"] > groups[key]["tokens_per_s"]:
                groups[key] = r
    for best in groups.values():
        best["best_baseline"] = True
    for r in rows:
        best = groups.get((r["mode"], r["context"]))
        if r["arch"] == "longvq":
            r["speedup_vs_best_baseline"] = (r["tokens_per_s"] / best["tokens_per_s"]
                                             if best and r.get("tokens_per_s") else None)


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def write_markdown(rows: list[dict], path: Path, header: dict) -> None:
    lines = [f"# Throughput: {header['tag']}", "",
             f"Device {header['device']}, torch {header['torch']}, {header['date']}, preset {header['preset']}, "
             f"precision {header['precision']}, {header['tokens_per_step']} tokens per training step, "
             f"median of {header['steps']} steps after {header['warmup']} warm-ups.", "",
             "Parameters: " + ", ".join(f"{a} {n:,}" for a, n in header["params"].items())
             + f" (ratio longvq/transformer {header['param_ratio']:.3f}).", "",
             "FLOPs per token: " + "; ".join(f"{a}: {f}" for a, f in FLOPS_FORMULA.items())
             + (f". Peak {header['peak_flops']:.4g} FLOP/s." if header["peak_flops"] else ". No MFU (no peak given for this device)."), "",
             "| mode | arch | context | batch | backend | tokens/s | peak GiB | MFU | vs best baseline | best baseline | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["mode"] != "train", r["context"], r["arch"], str(r["backend"]))):
        lines.append(
            f"| {r['mode']} | {r['arch']} | {r['context']} | {r.get('batch', '')} | {r['backend'] or ''} | "
            f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['peak_mem_gib'], '.2f')} | {_fmt(r['mfu'], '.3f')} | "
            f"{_fmt(r.get('speedup_vs_best_baseline'), '.2f')} | {'yes' if r.get('best_baseline') else ''} | "
            f"{r.get('error', '')} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path, title: str) -> None:
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


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m evals.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--contexts", nargs="*", type=int,
                   default=[2048, 4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--preset", default="125m", choices=sorted(PRESETS))
    p.add_argument("--preset-file", default=None, help="YAML {common: {...}, longvq: {...}, transformer: {...}}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ARCH.KEY=VALUE",
                   help="edit one arm's ModelConfig (ARCH = longvq | transformer | all); repeatable")
    p.add_argument("--param-tolerance", type=float, default=0.10)
    p.add_argument("--attention-impl", default="auto", choices=["auto", "dense", "chunked", "fused"])
    p.add_argument("--attn-backends", nargs="+", default=["auto"],
                   choices=list(sdpa.BACKENDS), help="Transformer backends, one row each")
    p.add_argument("--decode-prompts", nargs="*", type=int, default=[4096, 65536])
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-warmup", type=int, default=2)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--decode-attn-backend", default="auto", choices=list(sdpa.BACKENDS))
    p.add_argument("--prefill-chunk", type=int, default=8192, help="prompt tokens per prefill forward")
    p.add_argument("--profile-context", type=int, default=None,
                   help="also profile one training step per arch at this context (top kernels -> OUT_DIR/*_profile_ARCH.txt)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile each block (both arms; default backend inductor)")
    p.add_argument("--loss-chunk-tokens", type=int, default=0, metavar="N",
                   help="LM head + cross-entropy N tokens at a time, without the full logits (both arms; 0 = full)")
    p.add_argument("--no-tf32", action="store_true", help="keep float32 matmuls in full fp32 (default: TF32 on CUDA)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block in backward (both arms; for contexts whose activations do not fit)")
    p.add_argument("--checkpoint-blocks", type=int, default=0, metavar="N",
                   help="with --activation-checkpointing: only the first N blocks (0 = all)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-flops", type=float, default=None, help="default 989e12 on CUDA; CPU: no MFU")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", default="evals/results")
    p.add_argument("--tag", default=None, help="name of the output files (default PRESET_DEVICE)")
    p.add_argument("--raise-errors", action="store_true", help="re-raise non-OOM failures (debugging)")
    args = p.parse_args(argv)
    if args.compile and args.warmup < 2:
        p.error("--compile needs --warmup >= 2 (the first warm-up step runs eager, the second compiles)")
    if args.loss_chunk_tokens < 0:
        p.error("--loss-chunk-tokens must be >= 0 (0 = full logits)")
    if args.checkpoint_blocks < 0:
        p.error("--checkpoint-blocks must be >= 0 (0 = all blocks)")
    if args.steps < 1 or args.warmup < 1 or args.tokens_per_step < 1 or args.prefill_chunk < 1:
        p.error("--steps, --warmup, --tokens-per-step and --prefill-chunk must be >= 1")
    return args


def run_benchmark(args) -> list[dict]:
    device = pick_device(args.device)
    preset = PRESETS[args.preset]
    if args.preset_file:
        preset = yaml.safe_load(Path(args.preset_file).read_text()) or {}
    cfgs = model_configs(preset, args.overrides, args.attention_impl)
    params = {a: count_params(c) for a, c in cfgs.items()}
    print("parameters: " + ", ".join(f"{a} {n:,}" for a, n in params.items())
          + f" (longvq/transformer {params['longvq'] / params['transformer']:.3f})", flush=True)
    ratio = check_param_match(params, args.param_tolerance)
    peak = args.peak_flops or (H200_PEAK_BF16 if device.type == "cuda" else None)
    tag = args.tag or f"{args.preset}_{device.type}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    header = {"tag": tag, "device": device_name(device), "torch": torch.__version__, "date": date,
              "preset": args.preset_file or args.preset, "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
              "tokens_per_step": args.tokens_per_step, "steps": args.steps, "warmup": args.warmup,
              "params": params, "param_ratio": ratio, "peak_flops": peak}
    base = {"device": header["device"], "date": date, "precision": header["precision"], "torch": torch.__version__,
            "preset": header["preset"], "tag": tag, "param_ratio": ratio, "peak_flops": peak}

    plan = []
    for context in args.contexts:
        for arch in args.arch:
            if arch == "longvq":
                plan.append(("train", arch, context, None))
            else:
                plan += [("train", arch, context, b) for b in default_backends(device, args.attn_backends)]
    plan += [("decode", arch, p, None) for p in args.decode_prompts for arch in args.arch]

    rows: list[dict] = []
    paths = {ext: out_dir / f"throughput_{tag}.{ext}" for ext in ("json", "md", "png")}
    for i, (mode, arch, context, backend) in enumerate(plan, 1):
        cfg = copy.deepcopy(cfgs[arch])
        if arch == "transformer":
            cfg.transformer.attn_backend = backend if mode == "train" else args.decode_attn_backend
            getattr(sdpa, "_failed", set()).clear()  # an earlier row's failure must not hide a backend
        fn = train_row if mode == "train" else decode_row
        t0 = time.perf_counter()
        res = measure(fn, cfg, context, args, device)
        row = {"arch": arch, "context": context, "mode": mode, **res, "params": params[arch], **base,
               "requested_backend": cfg.transformer.attn_backend if arch == "transformer" else args.attention_impl}
        if mode == "train":
            row["tokens_per_step"] = args.tokens_per_step
            row["flops_per_token"] = flops_per_token(cfg, params[arch], context)
            row["flops_formula"] = FLOPS_FORMULA[arch]
            row["mfu"] = (row["tokens_per_s"] * row["flops_per_token"] / peak
                          if peak and row["tokens_per_s"] else None)
        else:
            row["flops_per_token"], row["flops_formula"], row["mfu"] = None, None, None
        if arch == "longvq":
            lv = cfg.longvq
            row.update(chunk_size=lv.chunk_size, codebook_size=lv.codebook_size, n_heads=lv.n_heads)
        rows.append(row)
        mark_best(rows)
        tps = "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f} tok/s"
        mem = "" if row["peak_mem_gib"] is None else f", {row['peak_mem_gib']:.2f} GiB"
        mfu = "" if row["mfu"] is None else f", MFU {row['mfu']:.3f}"
        err = f"  ERROR {row['error']}" if row.get("error") else ""
        print(f"[{i}/{len(plan)}] {mode:6s} {arch:11s} ctx {context:>6} batch {row.get('batch', '-')} "
              f"backend {row['backend']}: {tps}{mem}{mfu} ({time.perf_counter() - t0:.1f}s){err}", flush=True)
        paths["json"].write_text(json.dumps(rows, indent=1))
        write_markdown(rows, paths["md"], header)
    try:
        write_plot(rows, paths["png"], f"{tag}: {header['device']}")
    except ImportError as exc:  # the JSON and the table are the results; the plot is a convenience
        print(f"warning: no plot ({exc}); install matplotlib for {paths['png'].name}", flush=True)
        del paths["png"]
    if args.profile_context:
        for arch in args.arch:
            cfg = copy.deepcopy(cfgs[arch])
            if arch == "transformer":
                cfg.transformer.attn_backend = default_backends(device, args.attn_backends)[0]
            path = out_dir / f"throughput_{tag}_profile_{arch}.txt"
            try:
                table = profile_step(cfg, args.profile_context, args, device)
            except Exception as exc:  # noqa: BLE001 - a profile must not lose the rows above
                table = f"profile failed: {exc!r}"
            path.write_text(f"{arch}, context {args.profile_context}, one training step\n{table}\n")
            paths[f"profile_{arch}"] = path
            _free(device)
    print("wrote " + ", ".join(str(p) for p in paths.values()), flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rows = run_benchmark(args)
    except (ParamMismatchError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.get("error") and r["error"] != "OOM"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
