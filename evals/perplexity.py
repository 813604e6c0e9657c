"""Perplexity / bits per byte of a checkpoint on a held-out split.

    python -m evals.perplexity --checkpoint RUN_DIR_OR_CKPT [--dataset stdlib] [--data-path PATH]
        --split test [--mode disjoint|sliding|carry] [--context-len N] [--stride S]
        [--max-tokens N] [--json OUT]

Modes (the evaluation protocol is part of the result, so it is printed and saved):
  disjoint  consecutive non-overlapping windows of N tokens; each token is scored with the context
            available inside its window.
  sliding   windows of N tokens advanced by S; only the last S targets of a window are scored (each
            target sees at least N - S tokens of context).
  carry     the stream is scored in segments of N tokens with the model state carried across them
            (LongVQ: EMA + VQ cache, unbounded context at constant memory; Transformer: a growing
            KV cache).
Totals are corpus-level: ppl = exp(sum NLL / tokens scored), never a mean of per-window perplexities.

Scored span (one convention for every unit): the stream's first token has no prediction (nothing comes
before it), so it is context only and the scored span is the text after it: tokens[1:n], every one
scored exactly once in every mode. nll_sum is summed over that span and each per-unit figure divides it
by the units of that same span:
  ppl      = exp(nll_sum / tokens),  tokens = n - 1
  bpb      = nll_sum / ln 2 / bytes, bytes  = bytes of the text after the first token
  word_ppl = exp(nll_sum / words),   words  = word count (lm.data.wikitext.count_words: whitespace-
             separated words + one end-of-line per line) of the text after the first token, i.e. the
             split's count minus the words and end-of-lines lying wholly inside the first token (a word the
             first token only begins is partly scored and stays counted).
For WikiText-103 raw this drops nothing: every split starts with the blank line " \n" and its first token
(the space, at byte level) holds no word, so the test split still has the 245,569 words fairseq reports.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import sys
from pathlib import Path

import torch

from evals.common import load_for_eval, pick_device, write_json
from lm.data import load_stream
from lm.engine import score
from lm.data.tokenizer import BYTE, load_tokenizer
from lm.data.wikitext import count_words


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m evals.perplexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or checkpoint tag dir")
    p.add_argument("--dataset", default=None, help="default: the dataset the checkpoint was trained on")
    p.add_argument("--data-path", default=None)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--mode", default="disjoint", choices=["disjoint", "sliding", "carry"])
    p.add_argument("--context-len", type=int, default=None, help="window/segment length (default: training seq_len)")
    p.add_argument("--stride", type=int, default=None, help="sliding mode: targets scored per window (default: context/2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N targets (quick checks)")
    p.add_argument("--device", default="auto")
    p.add_argument("--untrained", action="store_true", help="score a freshly initialised model of the same config")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed"],
                   help="fp32 (exact scoring) or bf16 autocast (faster on GPU)")
    p.add_argument("--json", default=None, help="write the result JSON here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("context_len", "stride", "batch_size", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def first_token_units(first: bytes, after: bytes) -> tuple[int, int]:
    """(bytes, words) of a text that lie wholly inside its first token, the one that is never scored.

    `first` is the first token's text and `after` the text that follows it (the start of the scored span;
    it may stop early, but is empty only if the scored span is), both UTF-8. Words are counted as
    lm.data.wikitext.count_words counts them, so `n_words - words` is the word count of the scored span:
    the first token's end-of-lines and the words ending inside it are dropped, while a word the first
    token only begins (it ends in `after`) is in the span and stays counted.
    """
    a, b = first.decode("utf-8", errors="replace"), after.decode("utf-8", errors="replace")
    if not b:  # the scored span holds no text
        return len(first), count_words(a)
    # count_words(a + b) - count_words(b) is the same for every non-empty `after` that starts like the real
    # remainder: the split words differ by the words ending inside `first`, the end-of-lines by
    # first.count("\n"), and the unterminated-last-line term cancels.
    return len(first), count_words(a + b) - count_words(b)


def _stream_tokenizer(data_cfg):
    """The tokenizer that made the stream (to read back the text of its first tokens), or None."""
    spec, fingerprint = getattr(data_cfg, "tokenizer", BYTE), None
    if data_cfg.dataset == "tokens":
        meta = json.loads((Path(data_cfg.data_path) / "meta.json").read_text())
        spec, fingerprint = meta.get("tokenizer", BYTE), meta.get("tokenizer_fingerprint")
    try:
        tokenizer = load_tokenizer(spec)
    except (FileNotFoundError, RuntimeError, ValueError):
        return None
    if fingerprint is not None and tokenizer.fingerprint != fingerprint:
        return None
    return tokenizer


def _first_token_units(tokens, tokenizer) -> tuple[int, int] | None:
    """first_token_units of a token stream (>= 2 tokens), or None when its text cannot be split there."""
    if tokenizer.name == BYTE:
        return first_token_units(bytes(tokens[:1].tolist()), bytes(tokens[1:].tolist()))
    first, k = tokenizer.decode(tokens[:1]), 2
    while True:
        head = tokenizer.decode(tokens[:k])
        if not head.startswith(first):  # a tokenizer whose decoding is not a plain concatenation
            return None
        if len(head) > len(first) or k >= len(tokens):
            return first_token_units(first.encode("utf-8"), head[len(first):].encode("utf-8"))
        k = min(len(tokens), 2 * k)


def evaluate(args) -> dict:
    device = pick_device(args.device)
    model, cfg, ckpt = load_for_eval(args.checkpoint, device, untrained=args.untrained)
    data_cfg = cfg.data
    if args.dataset is not None:
        data_cfg.dataset = args.dataset
    if args.data_path is not None:
        data_cfg.data_path = args.data_path
    stream = load_stream(data_cfg, args.split)
    n = len(stream.tokens) if args.max_tokens is None else min(len(stream.tokens), args.max_tokens + 1)
    if n < 2:
        raise ValueError(f"{stream.name} has {n} tokens: nothing to score")
    tokens = torch.from_numpy(stream.tokens[:n].astype("int64"))
    context = args.context_len if args.context_len is not None else cfg.data.seq_len
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16-mixed"
                else contextlib.nullcontext)
    nll = score(model, tokens, mode=args.mode, context=context, stride=args.stride, batch_size=args.batch_size,
                device=device, autocast=autocast, progress=not args.no_progress).nll_sum
    stride = args.stride or max(1, context // 2)
    scored = n - 1  # tokens[1:n]: the first token is context only (see the module docstring)
    first_units = None  # (bytes, words) of the text only the unscored first token holds
    whole = n == len(stream.tokens)  # the whole split is scored (no --max-tokens cut)
    if whole and (stream.vocab_size != 256 or stream.n_words):
        tokenizer = _stream_tokenizer(data_cfg)
        if tokenizer is not None:
            first_units = _first_token_units(stream.tokens[:min(len(stream.tokens), 64)], tokenizer)
    if stream.vocab_size == 256:
        n_bytes = scored
    elif whole and first_units is not None:
        n_bytes = stream.n_bytes - first_units[0]
    else:  # a prefix of the stream (or text that cannot be read back): its share of the bytes
        n_bytes = round(stream.n_bytes * scored / max(1, len(stream.tokens) - 1))
    result = {
        "dataset": data_cfg.dataset, "split": args.split, "mode": args.mode, "context_len": context,
        "stride": stride if args.mode == "sliding" else None,
        "tokens": scored, "nll_sum": nll, "ppl": math.exp(nll / scored), "loss": nll / scored,
        "bytes": n_bytes, "bpb": nll / math.log(2) / n_bytes,
        "precision": args.precision, "checkpoint": ckpt, "untrained": args.untrained, "arch": cfg.model.arch,
        "params": sum(p.numel() for p in model.parameters()), "device": str(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if stream.n_words and whole:
        if first_units is None:
            print(f"warning: no word_ppl: the text of {stream.name}'s first token cannot be read back (its "
                  f"tokenizer is missing or does not decode by concatenation), so the scored words are unknown",
                  file=sys.stderr)
        else:
            words = stream.n_words - first_units[1]  # words of the scored span, not of the whole split
            if words > 0:
                result["words"] = words
                result["word_ppl"] = math.exp(nll / words)
    return result


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label = "untrained" if args.untrained else "trained"
    print(f"{result['dataset']}/{result['split']} ({label}, {result['mode']}, context {result['context_len']}): "
          f"{result['tokens']} tokens, loss {result['loss']:.4f} nats, ppl {result['ppl']:.3f}, "
          f"bits/byte {result['bpb']:.4f}" + (f", word ppl {result['word_ppl']:.2f}" if "word_ppl" in result else ""))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
