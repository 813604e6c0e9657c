"""Encode a dataset's splits into memory-mapped token shards for `data.dataset=tokens`.

    python tokenizers/encode_corpus.py --dataset wikitext103 --data-path DATA/wikitext-103-raw \\
        --tokenizer tokenizers/wt103_32k.model --out data/wt103_32k [--workers 16]
    python tokenizers/encode_corpus.py --text train=a.txt --text test=b.txt --tokenizer byte --out data/mine

Writes OUT/{split}.bin (one flat array of token ids, uint8/uint16/uint32 by vocabulary size) and
OUT/meta.json = {dtype, vocab_size, tokenizer, tokenizer_fingerprint,
                 splits: {split: {tokens, bytes, words}}}
which `load_stream(DataConfig(dataset="tokens", data_path=OUT), split)` reads (bytes = UTF-8 bytes of
the original text, for bits per byte; words = WikiText word count, for word-level perplexity).

Text is cut after newlines into chunks of --chunk-chars characters and encoded over --workers
processes; the tokens do not depend on the worker count. Resumable: a split already listed in
meta.json with a complete .bin is skipped; each split is written under a temporary name, renamed when
complete, then recorded in meta.json (also written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # runnable as `python tokenizers/encode_corpus.py` from anywhere
    sys.path.insert(0, str(_ROOT))
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

import numpy as np  # noqa: E402

from lm.data.tokenizer import (BYTE, default_workers, dtype_for_vocab, encode_chunks,  # noqa: E402
                               iter_line_chunks, load_tokenizer)
from lm.fileio import atomic_write_bytes  # noqa: E402

SPLITS = ("train", "valid", "test")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python tokenizers/encode_corpus.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (one of)")
    src.add_argument("--dataset", choices=["wikitext103", "enwik8", "stdlib"])
    src.add_argument("--text", action="append", metavar="SPLIT=FILE",
                     help="a UTF-8 text file for one split (repeat for several splits)")
    p.add_argument("--data-path", default=None, help="dataset location (as data.data_path)")
    p.add_argument("--cache-dir", default="~/.cache/longvq", help="as data.cache_dir")
    p.add_argument("--tokenizer", default=BYTE, help="'byte' or a sentencepiece .model path")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--splits", nargs="+", default=None, choices=SPLITS, help="default: all available")
    p.add_argument("--count-words", action="store_true",
                   help="record WikiText-style word counts for --text inputs (always on for wikitext103)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: cores - 1, max 16)")
    p.add_argument("--chunk-chars", type=int, default=1 << 20, help="characters per encoding task")
    p.add_argument("--overwrite", action="store_true", help="re-encode splits that are already complete")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if (args.dataset is None) == (args.text is None):
        p.error("give exactly one of --dataset or --text")
    if args.workers is not None and args.workers < 1:
        p.error(f"argument --workers: {args.workers} is not >= 1 (leave it out for cores - 1)")
    if args.chunk_chars < 1:
        p.error(f"argument --chunk-chars: {args.chunk_chars} is not >= 1")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"argument --out: {args.out} is a file; give a folder (created if missing)")
    if args.text:
        pairs = {}
        for item in args.text:
            split, sep, path = item.partition("=")
            if not sep or split not in SPLITS:
                p.error(f"--text {item!r}: expected SPLIT=FILE with SPLIT one of {', '.join(SPLITS)}")
            pairs[split] = path
        args.text = pairs
    return args


def _read(args, split: str):
    """(original bytes, text, words or None) of one split."""
    from lm.data import wikitext

    if args.text:
        data = Path(args.text[split]).read_bytes()
        text = data.decode("utf-8", errors="replace")
        return data, text, wikitext.count_words(text) if args.count_words else None
    from lm.config import DataConfig
    from lm.data.streams import read_split

    cfg = DataConfig(dataset=args.dataset, data_path=args.data_path, cache_dir=args.cache_dir)
    sd = read_split(cfg, split)
    return sd.data, sd.text(), sd.n_words


def _complete(out: Path, meta: dict, split: str) -> bool:
    info = meta.get("splits", {}).get(split)
    path = out / f"{split}.bin"
    return bool(info) and path.is_file() and path.stat().st_size == info["tokens"] * np.dtype(meta["dtype"]).itemsize


def encode_split(args, tokenizer, out: Path, split: str, dtype: np.dtype) -> dict:
    from tqdm import tqdm

    data, text, words = _read(args, split)
    final = out / f"{split}.bin"
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    n_tokens = 0
    with open(tmp, "wb") as f:
        if tokenizer.name == BYTE:
            f.write(data)  # byte level: the original bytes are the tokens
            n_tokens = len(data)
        else:
            workers = args.workers or default_workers()
            with tqdm(total=len(text), desc=f"encode {split}", unit="char", unit_scale=True,
                      disable=args.no_progress, dynamic_ncols=True) as bar:
                chunks = list(iter_line_chunks(text, args.chunk_chars))
                for chunk, ids in zip(chunks, encode_chunks(chunks, tokenizer, workers)):
                    ids = np.asarray(ids, dtype=dtype)
                    f.write(ids.tobytes())
                    n_tokens += len(ids)
                    bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return {"tokens": n_tokens, "bytes": len(data), "words": words}


def run(args) -> dict:
    t0 = time.time()
    tokenizer = load_tokenizer(args.tokenizer)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    header = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name,
              "tokenizer_fingerprint": tokenizer.fingerprint}
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except ValueError as exc:
        raise ValueError(f"{meta_path} is not valid JSON ({exc}): remove it, or use another --out") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} is not token-shard metadata: remove it, or use another --out")
    if meta and not args.overwrite:
        old = {k: meta.get(k) for k in ("dtype", "vocab_size", "tokenizer_fingerprint")}
        new = {k: header[k] for k in old}
        if old != new:
            raise ValueError(f"{out} holds shards made with another tokenizer ({old} vs {new}): use another "
                             f"--out or --overwrite")
    if args.overwrite:
        meta = {}
    meta = {**meta, **header, "splits": dict(meta.get("splits", {}))}
    source = f"text:{args.text}" if args.text else f"{args.dataset}:{args.data_path or 'default'}"
    meta["source"] = source
    splits = args.splits or (list(args.text) if args.text else list(SPLITS))
    for split in splits:
        if args.text and split not in args.text:
            raise ValueError(f"no --text {split}=FILE given")
        if _complete(out, meta, split) and not args.overwrite:
            print(f"{split}: already complete ({meta['splits'][split]['tokens']:,} tokens), skipped")
            continue
        try:
            info = encode_split(args, tokenizer, out, split, dtype)
        except FileNotFoundError as exc:
            if args.splits or args.text:
                raise
            print(f"{split}: not available ({exc}), skipped")
            continue
        meta["splits"][split] = info
        atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
        ratio = info["bytes"] / max(1, info["tokens"])
        words = f", {info['words']:,} words" if info["words"] is not None else ""
        print(f"{split}: {info['tokens']:,} tokens from {info['bytes']:,} bytes ({ratio:.2f} bytes/token){words}")
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    print(f"wrote {out} ({time.time() - t0:.1f}s)")
    return meta


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
