"""Training and decoding throughput of recipes, measured through the trainer's own code path.

A training row builds the engine the trainer builds (lm.engine.build_engine: `deepspeed` = DeepSpeed with the
recipe's ZeRO stage and precision, as `lm.train` runs it; `torch` = the same step without DeepSpeed) for
`batch = tokens_per_step // context` sequences of `context` tokens, runs `warmup` untimed steps of
lm.engine.TrainLoop (compilation and autotuning happen there), then times `steps` steps, each between device
synchronisations: tokens_per_s = batch * context / median step time. A step is exactly the trainer's:
forward, chunked or full LM head + CE, commitment loss, backward, the one loss all-reduce, the codebook
update, clipping and the AdamW update.

A decode row prefills a random prompt in pieces carrying the model state (LongVQ: EMA state + VQ cache,
constant memory; Transformer: KV cache), then times greedy decoding one token per step through
lm.engine.decoder.Decoder: a fixed-shape state, the step captured in a CUDA graph and replayed on CUDA
(`cuda_graph` in the row says whether the timed steps were replays).

FLOPs and MFU follow lm.metrics.flops_per_token (one declared formula per arch, FLOPS_FORMULA). Rows that
run out of memory are recorded with "error": "OOM"; other failures with their message.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from lm.config import ConfigError, RunConfig
from lm.bench.profile_breakdown import breakdown, breakdown_markdown, device_kernels
from lm.engine import RandomTokens, TrainLoop, build_engine, prepare_model, resolve_precision
from lm.engine.decoder import Decoder
from lm.model.quantizer import apply_updates
from lm.metrics import FLOPS_FORMULA, PEAK_BF16_FLOPS, flops_per_token, head_dims
from lm.ops import sdpa
from lm.ops.vq_attention import resolve_impl
from lm.optim import StepSchedule

CONTRACT_FIELDS = ("arch", "context", "mode", "tokens_per_s", "peak_mem_gib", "mfu", "params", "backend",
                   "device", "date")
DEFAULT_PEAK = PEAK_BF16_FLOPS["H200"]


class ParamMismatchError(ValueError):
    """The compared recipes are not of matched size."""


def count_params(cfg: RunConfig) -> int:
    """Parameters of the built model (tied embedding counted once), without allocating memory."""
    from lm.model import build_model

    with torch.device("meta"):
        return build_model(cfg.model).num_params()


def check_param_match(params: dict[str, int], tolerance: float = 0.10) -> float:
    """The longvq / transformer parameter ratio (largest / smallest for other sets); ParamMismatchError when
    the largest and smallest count differ by more than `tolerance`."""
    hi, lo = max(params.values()), min(params.values())
    if hi / lo - 1.0 > tolerance:
        raise ParamMismatchError(
            "parameter counts are not matched: " + ", ".join(f"{k} {v:,}" for k, v in params.items())
            + f" (ratio {hi / lo:.3f}, allowed 1 +- {tolerance:g}); change a recipe (e.g. model.ffn_dim or "
            "model.longvq.z_dim)")
    return params["longvq"] / params["transformer"] if {"longvq", "transformer"} <= set(params) else hi / lo


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def row_config(cfg: RunConfig, context: int, tokens_per_step: int, steps: int) -> RunConfig:
    """The recipe at one context: batch = tokens_per_step // context sequences (one micro-batch)."""
    c = copy.deepcopy(cfg)
    c.data.seq_len = context
    c.train.micro_batch_size = max(1, tokens_per_step // context)
    c.train.grad_accum_steps = 1
    c.train.max_steps = steps
    c.validate()
    return c


def backend_name(cfg: RunConfig, device: torch.device, precision: str) -> str:
    """The attention implementation the recipe runs on this device, resolved from small probe tensors without
    running anything: the VQ attention implementation (lm.ops.vq_attention.resolve_impl) for LongVQ, the
    SDPA/flash backend (lm.ops.sdpa.resolve_backend) for the Transformer."""
    H, dk, dv = head_dims(cfg.model)
    dtype = torch.bfloat16 if precision != "fp32" and device.type == "cuda" else torch.float32
    if cfg.model.arch == "transformer":
        probe = torch.empty(1, H, 16, dk, device=device, dtype=dtype)
        return sdpa.resolve_backend(cfg.model.transformer.attn_backend, probe)
    probe_q = torch.empty(1, 1, H, dk, device=device, dtype=dtype)
    probe_v = torch.empty(1, 1, H, dv, device=device, dtype=dtype)
    return resolve_impl(cfg.model.longvq.attention_impl, probe_q, probe_v, cfg.model.longvq.chunk_size)


def _peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_row(cfg: RunConfig, context: int, *, tokens_per_step: int, engine: str = "deepspeed", steps: int = 5,
              warmup: int = 2, device: Optional[torch.device] = None) -> dict:
    """One training row (see the module docstring)."""
    c = row_config(cfg, context, tokens_per_step, warmup + steps)
    eng = build_engine(c, engine, device=device) if engine == "torch" else build_engine(c, engine)
    loop = TrainLoop(eng, RandomTokens(c.model.vocab_size, context, seed=0), StepSchedule(c.optim, c.train.max_steps),
                     micro_batch_size=c.train.micro_batch_size, loss_chunk_tokens=c.train.loss_chunk_tokens,
                     loss_impl=c.train.loss_impl, max_steps=c.train.max_steps, sync_timing=True)
    eng.train()
    times = []
    while not loop.done():
        result = loop.step()
        if loop.state.step > warmup:
            times.append(result.step_time_s)
    batch = c.train.micro_batch_size
    row = {"batch": batch, "tokens": batch * context, "step_times_s": times,
           "tokens_per_s": batch * context / statistics.median(times), "backend": backend_name(c, eng.device, eng.precision),
           "peak_mem_gib": _peak_gib(eng.device), "engine": engine, "precision": eng.precision,
           "zero_stage": c.parallel.zero_stage if engine == "deepspeed" else None, "compile": c.train.compile,
           "activation_checkpointing": c.parallel.activation_checkpointing,
           "checkpoint_blocks": c.parallel.activation_checkpointing_blocks if c.parallel.activation_checkpointing else None,
           "loss_chunk_tokens": c.train.loss_chunk_tokens,
           "loss_impl": c.train.loss_impl if c.train.loss_chunk_tokens else None, "tf32": c.train.tf32,
           "final_loss": result.loss}
    del eng, loop
    return row


@torch.no_grad()
def decode_row(cfg: RunConfig, prompt_len: int, *, decode_tokens: int = 128, decode_warmup: int = 2, batch: int = 1,
               prefill_chunk: int = 8192, device: Optional[torch.device] = None, cuda_graph: bool = True,
               compile_step: bool = False) -> dict:
    """One decode row: prefill `prompt_len` tokens in pieces, then time greedy decoding through
    lm.engine.decoder.Decoder (fixed-shape state; on CUDA the step is a CUDA graph replay unless cuda_graph=False:
    `decode_warmup` eager steps and the capture run untimed; compile_step: the step through torch.compile).
    `cuda_graph` in the row: whether the timed steps were graph replays."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = copy.deepcopy(cfg)
    c.train.compile = False  # decoding runs one token at a time; compiled training graphs do not apply
    c.parallel.activation_checkpointing = False
    precision = resolve_precision(c.train.precision, device)
    model = prepare_model(c).to(device).eval()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    decoder = Decoder(model, autocast_dtype=torch.bfloat16 if precision == "bf16-mixed" else None,
                      cuda_graph=cuda_graph, prefill_chunk=prefill_chunk, warmup_steps=decode_warmup,
                      compile_step=compile_step)
    untimed = decoder.warmup_steps + 1  # eager warm-up steps, then the step that captures (and replays) the graph
    prompt = torch.randint(0, c.model.vocab_size, (batch, prompt_len), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    decoder.start(prompt, 1 + untimed + decode_tokens)
    sync()
    prefill_s = time.perf_counter() - t0
    for _ in range(untimed):
        decoder.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        decoder.step()
    sync()
    decode_s = time.perf_counter() - t0
    row = {"batch": batch, "decode_tokens": decode_tokens, "decode_s": decode_s,
           "tokens_per_s": batch * decode_tokens / max(decode_s, 1e-12),
           "ms_per_token": 1000 * decode_s / max(decode_tokens, 1),
           "prefill_tokens_per_s": batch * prompt_len / max(prefill_s, 1e-12),
           "state_gib": tensor_bytes(decoder.state) / 2**30, "backend": backend_name(c, device, precision),
           "peak_mem_gib": _peak_gib(device), "precision": precision, "cuda_graph": decoder.cuda_graph,
           "compile_step": compile_step}
    if decoder.graph_failed:
        row["cuda_graph_error"] = decoder.graph_failed
    return row


def tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    if dataclasses.is_dataclass(obj):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


def measure(fn: Callable[[], dict], device: torch.device, compiled: bool, raise_errors: bool = False) -> dict:
    """Run one row; OOM and other failures become {"error": ...} instead of ending the sweep."""
    if compiled:  # each row compiles its own model: without a reset, Dynamo's per-function recompile limit
        torch._dynamo.reset()  # is reached after a few rows and later rows silently run eager
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        error = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if error != "OOM" and raise_errors:
            raise
        result = {"tokens_per_s": None, "peak_mem_gib": _peak_gib(device), "error": error}
        if error == "OOM":  # which allocation failed, and where (the innermost frames of this project)
            frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_tb(exc.__traceback__)
                      if "/lm/" in f.filename or "/evals/" in f.filename]
            result["error_detail"] = f"{str(exc).splitlines()[0][:160] if str(exc) else ''} at {' < '.join(frames[::-1][:4])}"
    free_memory(device)
    return result


def add_flops(row: dict, cfg: RunConfig, params: int, peak: Optional[float]) -> None:
    """flops_per_token, formula and MFU of a training row (decode rows get None)."""
    if row["mode"] != "train":
        row.update(flops_per_token=None, flops_formula=None, mfu=None)
        return
    row["flops_per_token"] = flops_per_token(cfg.model, params, row["context"])
    row["flops_formula"] = FLOPS_FORMULA[cfg.model.arch]
    row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak if peak and row["tokens_per_s"] else None


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


def transformer_backends(cfg: RunConfig, device: torch.device) -> list[str]:
    """Attention backends the Transformer recipe gets a row for: the recipe's own, or every fast one on CUDA
    when the recipe says auto."""
    if cfg.model.transformer.attn_backend != "auto" or device.type != "cuda":
        return [cfg.model.transformer.attn_backend]
    return sdpa.installed_flash_backends() + ["cudnn", "flash"]


def with_backend(cfg: RunConfig, backend: str) -> RunConfig:
    c = copy.deepcopy(cfg)
    c.model.transformer.attn_backend = backend
    return c


def arms_by_arch(recipes: dict[str, RunConfig]) -> dict[str, RunConfig]:
    """{arch: config} of the compared recipes, one per arch."""
    out: dict[str, RunConfig] = {}
    for name, cfg in recipes.items():
        if cfg.model.arch in out:
            raise ConfigError(f"two recipes for model.arch={cfg.model.arch} ({name} and another): give one per arch")
        out[cfg.model.arch] = cfg
    return out


def _mark(marks: list, sync) -> None:
    """When the host got here, then when the device had finished what was queued."""
    marks.append(time.perf_counter())
    sync()
    marks.append(time.perf_counter())


def step_phases(cfg: RunConfig, context: int, *, tokens_per_step: int, engine: str = "deepspeed",
                device: Optional[torch.device] = None, steps: int = 5, warmup: int = 3) -> dict:
    """Host and device time of the phases of a training step: forward (with the loss), backward, and the
    update (optimizer step and codebook updates), the calls lm.engine.train_step makes, with a device
    synchronisation after each phase. Per phase, `*_host_ms` is how long the host took to queue it (until the
    call returned) and `*_ms` how long until the device had finished it; where the two are about equal the
    phase is host-bound (the device waits for kernels to be queued). Medians over `steps` steps after
    `warmup`. The step total is longer than a benchmark step by the device idle time the syncs add."""
    c = row_config(cfg, context, tokens_per_step, warmup + steps)
    eng = build_engine(c, engine, device=device) if engine == "torch" else build_engine(c, engine)
    eng.train()
    x, y = RandomTokens(c.model.vocab_size, context).micro_batch(0, 0, 0, 1, c.train.micro_batch_size)
    x, y = x.to(eng.device), y.to(eng.device)

    def sync():
        if eng.device.type == "cuda":
            torch.cuda.synchronize(eng.device)

    names = ("forward", "backward", "update")
    times: dict[str, list[float]] = {k: [] for n in names for k in (f"{n}_host_ms", f"{n}_ms")}
    times["step_ms"] = []
    for i in range(warmup + steps):
        marks = []
        sync()
        t0 = time.perf_counter()
        out = eng.forward(x, y, c.train.loss_chunk_tokens, c.train.loss_impl)
        _mark(marks, sync)
        eng.backward(out.loss + out.aux_loss)
        _mark(marks, sync)
        eng.step(c.optim.lr, skip=False)
        apply_updates([vq for _, vq in eng.quantizers])
        _mark(marks, sync)
        if i < warmup:
            continue
        start = t0
        for n, (queued, done) in zip(names, zip(marks[0::2], marks[1::2])):
            times[f"{n}_host_ms"].append((queued - start) * 1e3)
            times[f"{n}_ms"].append((done - start) * 1e3)
            start = done
        times["step_ms"].append((marks[-1] - t0) * 1e3)
    row = {k: statistics.median(v) for k, v in times.items()}
    row.update(arch=c.model.arch, context=context, batch=c.train.micro_batch_size, engine=engine,
               steps=steps, warmup=warmup, tokens_per_s=c.train.micro_batch_size * context / row["step_ms"] * 1e3)
    dev = eng.device
    del eng, out
    free_memory(dev)
    return row


def phases_line(row: dict) -> str:
    """One line for a step_phases row: host / device milliseconds per phase."""
    if row.get("error"):
        return f"[phases] {row['arch']} ctx {row['context']}: ERROR {row['error']}"
    parts = [f"{n} {row[n + '_host_ms']:.1f} / {row[n + '_ms']:.1f}" for n in ("forward", "backward", "update")]
    return (f"[phases] {row['arch']} ctx {row['context']} (host / device ms): " + ", ".join(parts)
            + f"; step {row['step_ms']:.1f} ms, {row['tokens_per_s']:,.0f} tok/s")


def profile_step(cfg: RunConfig, context: int, *, tokens_per_step: int, engine: str = "deepspeed",
                 device: Optional[torch.device] = None, rows: int = 80) -> str:
    """torch.profiler tables (device time: top kernels, by input shape, by Python stack) of one training
    step of the trainer's path after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    c = row_config(cfg, context, tokens_per_step, 3)
    eng = build_engine(c, engine, device=device) if engine == "torch" else build_engine(c, engine)
    loop = TrainLoop(eng, RandomTokens(c.model.vocab_size, context), StepSchedule(c.optim, 3),
                     micro_batch_size=c.train.micro_batch_size, loss_chunk_tokens=c.train.loss_chunk_tokens,
                     loss_impl=c.train.loss_impl, max_steps=3, sync_timing=True)
    eng.train()
    loop.step()
    loop.step()
    cuda = eng.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        loop.step()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    by_op = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by=key, row_limit=rows // 2, max_name_column_width=40, max_shapes_column_width=90)
    by_stack = prof.key_averages(group_by_stack_n=4).table(
        sort_by=key, row_limit=rows // 2, max_name_column_width=40, max_src_column_width=110)
    parts = [by_op, f"By input shape:\n{by_shape}", f"By Python stack (4 frames):\n{by_stack}"]
    if cuda:
        parts.insert(0, "Device time by kind of kernel (lm.bench.profile_breakdown):\n"
                        + breakdown_markdown(breakdown(device_kernels(prof))))
    return "\n\n".join(parts)
