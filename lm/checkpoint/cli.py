"""`python -m lm.checkpoint {verify,export,universal} CHECKPOINT`: checkpoint tools."""

from __future__ import annotations

from pathlib import Path

from lm.checkpoint.common import CheckpointError
from lm.checkpoint.export import export
from lm.checkpoint.store import resolve_checkpoint, verify
from lm.checkpoint.universal import to_universal, universal_worker


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m lm.checkpoint", description="Checkpoint tools.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{export,verify,universal}")
    e = sub.add_parser("export", help="consolidated fp32 safetensors + config for one-process eval/generation")
    e.add_argument("checkpoint")
    e.add_argument("out_dir")
    v = sub.add_parser("verify", help="check a checkpoint: manifest (sizes, sha256) and safe loading of every file")
    v.add_argument("checkpoint")
    u = sub.add_parser("universal", help="convert to DeepSpeed's universal format (what resume does itself)")
    u.add_argument("checkpoint")
    w = sub.add_parser("universal-worker")  # the child process of to_universal; not for direct use
    w.add_argument("src")
    w.add_argument("dst")
    args = p.parse_args(argv)
    try:
        if args.cmd == "export":
            print(f"exported to {export(args.checkpoint, args.out_dir)}")
        elif args.cmd == "verify":
            root, tag = resolve_checkpoint(args.checkpoint)
            m = verify(root / tag)
            print(f"{root / tag}: OK ({len(m['files'])} files, topology {m.get('topology')})")
        elif args.cmd == "universal-worker":
            universal_worker(Path(args.src), Path(args.dst))
        else:
            root, tag = resolve_checkpoint(args.checkpoint)
            verify(root / tag)
            print(f"universal checkpoint: {to_universal(root, tag) / tag}")
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
