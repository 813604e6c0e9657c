"""Sample text from a checkpoint, carrying the model state from token to token.

    python -m evals.generate --checkpoint RUN_DIR_OR_CKPT --prompt "text" --max-new-tokens N
        [--temperature T] [--top-k K] [--seed S] [--device auto] [--precision auto|fp32|bf16] [--eager]

The prompt is encoded with the checkpoint's tokenizer (`data.tokenizer`: "byte" = UTF-8 bytes, vocab
256; otherwise the path of a sentencepiece model, read through `lm.data.tokenizer`). Decoding is
lm.engine.decoder.Decoder: the prompt runs through the model's parallel forward with `return_state=True`
(prefill), then tokens are drawn one at a time, each step feeding only the newest token and the carried
state, held in fixed-shape buffers so that on CUDA the step is captured once in a CUDA graph and replayed
(--eager: no graph):
  LongVQ       the state is the EMA hidden state plus the VQ attention cache (current chunk, previous
               chunk, per-code counts and value sums): constant memory however long the text grows.
  Transformer  the state is a KV cache of prompt + new tokens positions, filled one position per token.
Temperature 0 is greedy decoding (argmax); otherwise a Gumbel-max draw from softmax(logits / T) over the
top-k tokens, reproducible with --seed. The text goes to stdout; prefill and decode speed (and the peak GPU
memory on CUDA) go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from evals.common import load_for_eval, pick_device
from lm.engine.decoder import Decoder, sample_next

__all__ = ["generate", "greedy", "sample_next", "load_tokenizer", "main"]


def _as_batch(prompt_ids: Union[Tensor, Sequence[int]], device) -> tuple[Tensor, bool]:
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    squeeze = ids.dim() == 1
    if squeeze:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty (T,) or (B, T) sequence, got shape {tuple(ids.shape)}")
    return ids.to(device), squeeze


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             generator: Optional[torch.Generator] = None, timings: Optional[dict] = None,
             cuda_graph: bool = True, compile_step: bool = False) -> Tensor:
    """Prompt followed by `max_new_tokens` sampled ids, shaped like `prompt_ids` ((T,) or (B, T)).

    lm.engine.decoder.Decoder: a parallel prefill, then one token per step over a fixed-shape state (CUDA-graph
    replayed on CUDA unless cuda_graph=False; compile_step: the step through torch.compile, compiled during the
    first steps), under the caller's autocast dtype if autocast is on. `timings`,
    if given, receives prefill_s / decode_s (synchronised on CUDA), the token counts and `cuda_graph`."""
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    device = next(model.parameters()).device
    ids, squeeze = _as_batch(prompt_ids, device)
    vocab = model.cfg.vocab_size if hasattr(model, "cfg") else None
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"prompt has token id {int(ids.max())} but the model's vocabulary is {vocab}")
    dev = device.type
    amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    decoder = Decoder(model, temperature=temperature, top_k=top_k, generator=generator, autocast_dtype=amp,
                      cuda_graph=cuda_graph, compile_step=compile_step)
    result = decoder.generate(ids, max_new_tokens, timings)
    return result[0] if squeeze else result


def greedy(model, prompt_ids, max_new_tokens: int, timings: Optional[dict] = None) -> Tensor:
    """Deterministic argmax decoding (generate with temperature 0)."""
    return generate(model, prompt_ids, max_new_tokens, temperature=0.0, timings=timings)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class _Bytes:
    name, vocab_size = "byte", 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_tokenizer(spec: Optional[str]):
    """'byte' -> UTF-8 bytes; anything else -> a sentencepiece model through lm.data.tokenizer."""
    if spec in (None, "", "byte"):
        return _Bytes()
    try:
        from lm.data.tokenizer import load_tokenizer as _load
    except ImportError as exc:
        raise RuntimeError(f"the checkpoint uses data.tokenizer={spec!r} (a sentencepiece model), but "
                           f"lm.data.tokenizer cannot be imported ({exc}); only byte-level checkpoints "
                           "can be sampled without it") from None
    return _load(spec)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m evals.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or checkpoint tag dir")
    p.add_argument("--prompt", required=True, help="text to continue (must encode to at least one token)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--eager", action="store_true", help="decode without capturing the step in a CUDA graph")
    p.add_argument("--compile", action="store_true",
                   help="decode step through torch.compile: fewer kernels per token (docs/benchmarks.md); compiling "
                        "takes tens of seconds first, so it pays off for long generations")
    p.add_argument("--untrained", action="store_true", help="sample a freshly initialised model of the same config")
    args = p.parse_args(argv)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"argument --temperature: {args.temperature} is not a number >= 0 (0 = greedy decoding)")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"argument --top-k: {args.top_k} is not >= 1 (leave --top-k out to sample from the whole vocabulary)")
    if args.max_new_tokens < 0:
        p.error(f"argument --max-new-tokens: {args.max_new_tokens} is not >= 0")
    return args


def run(args) -> dict:
    device = pick_device(args.device)
    model, cfg, ckpt = load_for_eval(args.checkpoint, device, untrained=args.untrained)
    tok = load_tokenizer(cfg.data.tokenizer)
    ids = [int(i) for i in tok.encode(args.prompt)]
    if not ids:
        raise ValueError("--prompt encodes to no tokens: give at least one character")
    if max(ids) >= cfg.model.vocab_size:
        raise ValueError(f"the prompt's token id {max(ids)} is outside the model's vocabulary "
                         f"({cfg.model.vocab_size}); the checkpoint was trained with another tokenizer")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings: dict = {}
    with autocast:
        out = generate(model, torch.tensor(ids), args.max_new_tokens, args.temperature, args.top_k, gen, timings,
                       cuda_graph=not args.eager, compile_step=args.compile)
    new_ids = out[len(ids):].tolist()
    result = {
        "checkpoint": ckpt, "arch": cfg.model.arch, "device": str(device),
        "prompt": args.prompt, "text": tok.decode(ids + new_ids), "completion": tok.decode(new_ids),
        "ids": ids + new_ids, "prompt_tokens": len(ids), "new_tokens": len(new_ids),
        "prefill_tokens_per_s": len(ids) / max(timings["prefill_s"], 1e-9),
        "decode_tokens_per_s": len(new_ids) / max(timings["decode_s"], 1e-9),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "cuda_graph": timings["cuda_graph"],
    }
    return result


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        r = run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(r["text"])
    mem = f", peak memory {r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else ""
    print(f"[{r['arch']} on {r['device']}: prompt {r['prompt_tokens']} tokens at {r['prefill_tokens_per_s']:.1f} tok/s, "
          f"{r['new_tokens']} new tokens at {r['decode_tokens_per_s']:.1f} tok/s"
          f"{' (CUDA graph)' if r['cuda_graph'] else ''}{mem}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
