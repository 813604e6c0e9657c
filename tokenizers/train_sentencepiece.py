"""Train a sentencepiece tokenizer (unigram or BPE, byte fallback) on a dataset's train split or text files.

    python tokenizers/train_sentencepiece.py --dataset wikitext103 --data-path DATA/wikitext-103-raw \\
        --vocab-size 32000 --model-type unigram --out tokenizers/wt103_32k
    python tokenizers/train_sentencepiece.py --text corpus.txt [more.txt ...] --vocab-size 8000 --out my_spm

Writes OUT.model and OUT.vocab. Each line of the text is one training sentence. The model keeps text
exactly: identity normalisation, no whitespace folding, no dummy prefix, "\\n" as its own piece and
byte fallback for anything unseen, so decode(encode(text)) == text and byte counts stay meaningful.
Use the model for training/evaluation with `data.tokenizer=OUT.model`, or pre-encode the corpus with
tokenizers/encode_corpus.py.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # runnable as `python tokenizers/train_sentencepiece.py` from anywhere
    sys.path.insert(0, str(_ROOT))

# This folder is deliberately not a package (it would shadow Hugging Face's `tokenizers`); make sure the
# script's own folder on sys.path[0] cannot shadow it either.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python tokenizers/train_sentencepiece.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (one of)")
    src.add_argument("--dataset", choices=["wikitext103", "enwik8", "stdlib"], help="train on this dataset's train split")
    src.add_argument("--text", nargs="+", help="plain UTF-8 text file(s), one sentence per line")
    p.add_argument("--data-path", default=None, help="dataset location (as data.data_path)")
    p.add_argument("--cache-dir", default="~/.cache/longvq", help="as data.cache_dir")
    p.add_argument("--split", default="train", choices=["train", "valid", "test"])
    p.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--character-coverage", type=float, default=0.9999,
                   help="fraction of characters covered by pieces; the rest fall back to bytes")
    p.add_argument("--no-byte-fallback", action="store_true", help="unknown characters become <unk> instead of bytes")
    p.add_argument("--max-sentences", type=int, default=4_000_000,
                   help="sample at most this many lines (0 = all); WikiText-103 train has 1.8M")
    p.add_argument("--max-sentence-length", type=int, default=1 << 16, help="longer lines (bytes) are skipped")
    p.add_argument("--soft-vocab-limit", action="store_true", help="allow a smaller vocabulary on tiny corpora")
    p.add_argument("--threads", type=int, default=0, help="sentencepiece threads (0 = all cores)")
    p.add_argument("--seed", type=int, default=0, help="line sampling seed")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    args = p.parse_args(argv)
    if (args.dataset is None) == (args.text is None):
        p.error("give exactly one of --dataset or --text")
    if args.vocab_size < 1:
        p.error(f"argument --vocab-size: {args.vocab_size} is not >= 1")
    if not 0 < args.character_coverage <= 1:
        p.error(f"argument --character-coverage: {args.character_coverage} is not in (0, 1]")
    if args.max_sentences < 0:
        p.error(f"argument --max-sentences: {args.max_sentences} is not >= 0 (0 = all)")
    if args.max_sentence_length < 1:
        p.error(f"argument --max-sentence-length: {args.max_sentence_length} is not >= 1")
    if args.threads < 0:
        p.error(f"argument --threads: {args.threads} is not >= 0 (0 = all cores)")
    if Path(args.out).is_dir():
        p.error(f"argument --out: {args.out} is a folder; give a file prefix (writes PREFIX.model and PREFIX.vocab)")
    return args


def load_lines(args) -> list[str]:
    """Training sentences: the non-blank lines of the chosen text."""
    if args.text:
        text = "".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in args.text)
    else:
        from lm.config import DataConfig
        from lm.data.streams import read_split

        cfg = DataConfig(dataset=args.dataset, data_path=args.data_path, cache_dir=args.cache_dir)
        text = read_split(cfg, args.split).text()
    lines = [line for line in text.split("\n") if line.strip()]
    if args.max_sentences and len(lines) > args.max_sentences:
        rng = random.Random(args.seed)
        lines = [lines[i] for i in sorted(rng.sample(range(len(lines)), args.max_sentences))]
    return lines


def train(args) -> Path:
    import os

    import sentencepiece as spm
    from tqdm import tqdm

    t0 = time.time()
    lines = load_lines(args)
    if not lines:
        raise ValueError("no training text (all lines blank)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(lines, desc="sentencepiece input", unit="line", unit_scale=True, disable=args.no_progress,
               dynamic_ncols=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(bar),
        model_prefix=str(out),
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        byte_fallback=not args.no_byte_fallback,
        # keep the text exactly as it is (round trip, honest byte counts)
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=["\n"],
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=args.max_sentence_length,
        hard_vocab_limit=not args.soft_vocab_limit,
        num_threads=args.threads or os.cpu_count() or 1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=0 if args.verbose else 2,
    )
    bar.close()
    sp = spm.SentencePieceProcessor(model_file=str(out) + ".model")
    print(f"wrote {out}.model and {out}.vocab: {args.model_type}, vocab {sp.vocab_size()}, "
          f"{len(lines):,} training lines, {time.time() - t0:.1f}s")
    return Path(str(out) + ".model")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
