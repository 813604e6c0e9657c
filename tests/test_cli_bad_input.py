"""Bad input across every command-line entry point, one row per input.

Each row runs one CLI (lm.train, lm.checkpoint, evals.perplexity, evals.generate, the tokenizers/ scripts,
launch/*.sh) with one bad input and asserts: a non-zero exit; a line on stderr matching the row's pattern,
which names the input; no Python traceback; and no change to an existing checkpoint (its folder is hashed
before and after). Python CLIs run in-process (lm.train in a forked child, since it may start
torch.distributed); shell scripts run as subprocesses. Rows marked xfail(strict=True) are inputs whose
refusal is wired in lm/train.py or evals/perplexity.py; the mark comes off once they are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.dist_harness import run_dist
from tests.test_train import ROOT, data_cache, tiny_cfg  # noqa: F401  (data_cache: a fixture)

LEAD = "wired by the lead in lm/train.py / evals/perplexity.py"


@dataclass
class Row:
    id: str
    cli: str  # train | checkpoint | perplexity | generate | encode_corpus | train_sentencepiece | sh
    argv: list
    expect: str  # regex one stderr line must match (it names the input)
    env: dict = field(default_factory=dict)
    setup: object = None  # callable(paths) run before the checkpoint is hashed
    xfail: str = ""


TINY = ["data.seq_len=32", "model.d_model=32", "model.n_layers=2", "model.longvq.chunk_size=8",
        "model.longvq.codebook_size=16", "model.longvq.z_dim=16", "model.longvq.ema_dim=4", "train.micro_batch_size=4",
        "train.progress_bar=false", "train.eval_every=0", "train.max_steps=2"]
Q = "launch/configs/quickstart.yaml"


def T(id, *items, expect, xfail="", setup=None, new_run=True):
    """An lm.train row: the quickstart recipe shrunk, into a fresh run dir unless the row names one."""
    argv = [Q, *TINY, "data.cache_dir={cache}", *(["train.run_dir={tmp}/newrun"] if new_run else []), *items]
    return Row(id, "train", argv, expect, xfail=xfail, setup=setup)


def _corrupt_latest(p):
    (p["run"] / "checkpoints/latest").write_text("../../etc")


ROWS = [
    # -- lm.train: model sizes out of range ------------------------------------------------------
    T("n_heads=0", "model.longvq.n_heads=0", expect=r"model\.longvq\.n_heads must be >= 1, got 0"),
    T("z_dim=0", "model.longvq.z_dim=0", expect=r"model\.longvq\.z_dim must be >= 1, got 0"),
    T("ema_dim=-2", "model.longvq.ema_dim=-2", expect=r"model\.longvq\.ema_dim must be >= 1, got -2"),
    T("transformer n_heads=0", "model.arch=transformer", "model.transformer.n_heads=0",
      expect=r"model\.transformer\.n_heads must be >= 1, got 0"),
    T("d_model=0", "model.d_model=0", expect=r"model\.d_model must be >= 1, got 0"),
    T("chunk_size=0", "model.longvq.chunk_size=0", expect=r"model\.longvq\.chunk_size must be >= 1, got 0"),
    # -- lm.train: cadence and probabilities -------------------------------------------------------
    T("log_every=0", "train.log_every=0", expect=r"train\.log_every must be >= 1 .*got 0"),
    T("dropout=1.0", "model.dropout=1.0", expect=r"model\.dropout is a dropout probability and must be in \[0, 1\), got 1\.0"),
    T("attention_dropout=-0.1", "model.longvq.attention_dropout=-0.1",
      expect=r"model\.longvq\.attention_dropout .* must be in \[0, 1\), got -0\.1"),
    T("eval_batches=0", "train.eval_batches=0", expect=r"train\.eval_batches must be >= 1"),
    # -- lm.train: silent coercions ---------------------------------------------------------------
    T("warmup_steps=-5", "optim.warmup_steps=-5", expect=r"optim\.warmup_steps must be >= 0 .*got -5"),
    T("save_every=-1", "train.save_every=-1", expect=r"train\.save_every must be >= 0 .*got -1"),
    T("keep_last=-2", "train.keep_last=-2", expect=r"train\.keep_last must be >= 0 .*got -2"),
    T("beta2=1", "optim.beta2=1.0", expect=r"optim\.beta2 must be in \[0, 1\), got 1\.0"),
    # -- lm.train: config files and overrides ------------------------------------------------------
    Row("yaml syntax error", "train", ["{bad_yaml}", "train.run_dir={tmp}/newrun"],
        r"bad\.yaml:4:\d+: YAML syntax error: .*\(while parsing a flow sequence that starts at line 3\)"),
    Row("yaml not a mapping", "train", ["{list_yaml}", "train.run_dir={tmp}/newrun"], r"list\.yaml: top level must be a mapping"),
    Row("missing recipe", "train", ["{tmp}/nope.yaml"], r"config file not found: .*nope\.yaml"),
    T("unparsable override", "train.max_steps=[1", expect=r"override 'train\.max_steps=\[1': cannot parse value"),
    T("misspelt key", "train.max_step=3", expect=r"unknown config key 'train\.max_step'; did you mean train\.max_steps"),
    Row("no recipe", "train", ["train.max_steps=3"], r"give at least one YAML recipe"),
    # -- lm.train: data ----------------------------------------------------------------------------
    T("data folder without metadata", "data.dataset=tokens", "data.data_path={empty_dir}",
      expect=r"meta\.json not found: data\.data_path=.*empty has no metadata"),
    T("data path is a file", "data.dataset=tokens", "data.data_path={file}", expect=r"data\.data_path=.*file is not a folder"),
    T("data shorter than a window", "data.dataset=tokens", "data.data_path={tiny_tokens}",
      expect=r"has 10 tokens, fewer than one window of data\.seq_len \+ 1 = 33"),
    T("max_train_bytes below a window", "data.max_train_bytes=20",
      expect=r"has 20 tokens, fewer than one window of data\.seq_len \+ 1 = 33"),
    T("corrupt data metadata", "data.dataset=tokens", "data.data_path={bad_meta}",
      expect=r"meta\.json is not valid token-shard metadata"),
    # -- lm.train: resume and run dirs -----------------------------------------------------------
    T("resume missing path", "--resume", "{tmp}/missing", expect=r"no checkpoint at .*missing: the path does not exist"),
    T("resume a plain file", "--resume", "{file}", expect=r"no checkpoint at .*file"),
    T("resume empty", "--resume", "", expect=r"--resume"),
    T("world size negative", "--dry-run", "--world-size", "-8", expect=r"--world-size"),
    T("world size zero", "--dry-run", "--world-size", "0", expect=r"--world-size"),
    T("world size not a number", "--dry-run", "--world-size", "abc", expect=r"argument --world-size: invalid int value: 'abc'"),
    T("run dir holds checkpoints", "train.run_dir={run}", new_run=False, expect=r"already holds checkpoints.*--resume auto"),
    T("run dir is a file", "train.run_dir={file}", new_run=False, expect=r"train\.run_dir=.*file is a file"),
    T("run dir unwritable", "train.run_dir=/proc/longvq-run", new_run=False, expect=r"train\.run_dir=/proc/longvq-run"),
    T("valid split shorter than one window", "data.dataset=tokens", "data.data_path={short_valid}", "train.eval_every=1",
      expect=r"validation split has 20 tokens, fewer than one window of data\.seq_len \+ 1 = 33.*train\.eval_every=0"),
    # -- lm.checkpoint -------------------------------------------------------------------------------
    Row("verify missing", "checkpoint", ["verify", "{tmp}/missing"], r"no checkpoint at .*missing: the path does not exist"),
    Row("verify a folder that is no checkpoint", "checkpoint", ["verify", "{empty_dir}"], r"no checkpoint at .*empty"),
    Row("verify corrupt latest", "checkpoint", ["verify", "{run}"], r"latest holds '\.\./\.\./etc', not a checkpoint tag",
        setup=_corrupt_latest),
    Row("export to a file", "checkpoint", ["export", "{run}", "{file}"], r"export destination .*file is a file"),
    Row("export under a file", "checkpoint", ["export", "{run}", "{file}/sub"], r"cannot access .*file/sub: Not a directory"),
    Row("universal of ZeRO-0", "checkpoint", ["universal", "{run}"], r"is a ZeRO-0 checkpoint: it has no ZeRO optimizer shards"),
    Row("unknown subcommand", "checkpoint", ["inspect", "{run}"], r"invalid choice: 'inspect'"),
    # -- evals.perplexity ---------------------------------------------------------------------------
    Row("ppl missing checkpoint", "perplexity", ["--checkpoint", "{tmp}/missing"], r"no checkpoint at .*missing"),
    Row("ppl --device cuda", "perplexity", ["--checkpoint", "{run}", "--device", "cuda"],
        r"--device cuda: CUDA is not available on this machine"),
    Row("ppl --device tpu", "perplexity", ["--checkpoint", "{run}", "--device", "tpu"], r"--device 'tpu' is not a device"),
    Row("ppl --split", "perplexity", ["--checkpoint", "{run}", "--split", "dev"], r"argument --split: invalid choice: 'dev'"),
    Row("ppl --context-len abc", "perplexity", ["--checkpoint", "{run}", "--context-len", "abc"],
        r"argument --context-len: invalid int value"),
    Row("ppl --context-len -5", "perplexity", ["--checkpoint", "{run}", "--context-len", "-5", "--max-tokens", "200"],
        r"--context-len"),
    Row("ppl --batch-size 0", "perplexity", ["--checkpoint", "{run}", "--batch-size", "0", "--max-tokens", "200"],
        r"--batch-size"),
    Row("ppl --stride 0", "perplexity", ["--checkpoint", "{run}", "--mode", "sliding", "--stride", "0", "--max-tokens", "200"],
        r"--stride"),
    Row("ppl --max-tokens 0", "perplexity", ["--checkpoint", "{run}", "--max-tokens", "0"], r"--max-tokens"),
    # -- evals.generate -----------------------------------------------------------------------------
    Row("gen --temperature -1", "generate", ["--checkpoint", "{run}", "--prompt", "x", "--temperature", "-1"],
        r"argument --temperature: -1\.0 is not a number >= 0"),
    Row("gen --temperature nan", "generate", ["--checkpoint", "{run}", "--prompt", "x", "--temperature", "nan"],
        r"argument --temperature: nan is not a number >= 0"),
    Row("gen --top-k 0", "generate", ["--checkpoint", "{run}", "--prompt", "x", "--top-k", "0"], r"argument --top-k: 0 is not >= 1"),
    Row("gen --top-k -5", "generate", ["--checkpoint", "{run}", "--prompt", "x", "--top-k", "-5"], r"argument --top-k: -5 is not >= 1"),
    Row("gen --max-new-tokens -1", "generate", ["--checkpoint", "{run}", "--prompt", "x", "--max-new-tokens", "-1"],
        r"argument --max-new-tokens: -1 is not >= 0"),
    Row("gen --device cuda", "generate", ["--checkpoint", "{run}", "--prompt", "x", "--device", "cuda:0"],
        r"--device cuda:0: CUDA is not available"),
    Row("gen empty prompt", "generate", ["--checkpoint", "{run}", "--prompt", ""], r"--prompt encodes to no tokens"),
    Row("gen checkpoint is a file", "generate", ["--checkpoint", "{file}", "--prompt", "x"], r"no checkpoint at .*file"),
    # -- tokenizers/encode_corpus.py ------------------------------------------------------------------
    Row("encode missing text", "encode_corpus", ["--text", "train={tmp}/missing.txt", "--out", "{tmp}/enc"], r"missing\.txt"),
    Row("encode --text without split", "encode_corpus", ["--text", "{text}", "--out", "{tmp}/enc"], r"expected SPLIT=FILE"),
    Row("encode --workers 0", "encode_corpus", ["--text", "train={text}", "--out", "{tmp}/enc", "--workers", "0"],
        r"argument --workers: 0 is not >= 1"),
    Row("encode --chunk-chars -1", "encode_corpus", ["--text", "train={text}", "--out", "{tmp}/enc", "--chunk-chars", "-1"],
        r"argument --chunk-chars: -1 is not >= 1"),
    Row("encode --out is a file", "encode_corpus", ["--text", "train={text}", "--out", "{file}"], r"argument --out: .*file is a file"),
    Row("encode missing tokenizer", "encode_corpus", ["--text", "train={text}", "--out", "{tmp}/enc", "--tokenizer",
                                                      "{tmp}/nope.model"], r"nope\.model not found"),
    Row("encode corrupt meta in --out", "encode_corpus", ["--text", "train={text}", "--out", "{bad_meta}"],
        r"meta\.json is not valid JSON"),
    # -- tokenizers/train_sentencepiece.py ------------------------------------------------------------
    Row("spm --vocab-size 0", "train_sentencepiece", ["--text", "{text}", "--out", "{tmp}/spm", "--vocab-size", "0"],
        r"argument --vocab-size: 0 is not >= 1"),
    Row("spm --character-coverage 1.5", "train_sentencepiece", ["--text", "{text}", "--out", "{tmp}/spm",
                                                                "--character-coverage", "1.5"],
        r"argument --character-coverage: 1\.5 is not in \(0, 1\]"),
    Row("spm --max-sentences -1", "train_sentencepiece", ["--text", "{text}", "--out", "{tmp}/spm", "--max-sentences", "-1"],
        r"argument --max-sentences: -1 is not >= 0"),
    Row("spm missing text", "train_sentencepiece", ["--text", "{tmp}/missing.txt", "--out", "{tmp}/spm"], r"missing\.txt"),
    Row("spm --out is a folder", "train_sentencepiece", ["--text", "{text}", "--out", "{empty_dir}"],
        r"argument --out: .*empty is a folder"),
    Row("spm no input", "train_sentencepiece", ["--out", "{tmp}/spm"], r"give exactly one of --dataset or --text"),
    # -- launch/*.sh -------------------------------------------------------------------------------------
    Row("run_local NPROC=0", "sh", ["launch/run_local.sh", Q], r"NPROC=0: give a positive whole number", env={"NPROC": "0"}),
    Row("run_local NPROC=abc", "sh", ["launch/run_local.sh", Q], r"NPROC=abc: give a positive whole number", env={"NPROC": "abc"}),
    Row("run_local NPROC=-4", "sh", ["launch/run_local.sh", Q], r"NPROC=-4: give a positive whole number", env={"NPROC": "-4"}),
    Row("run_local LAUNCHER=mpirun", "sh", ["launch/run_local.sh", Q], r"LAUNCHER=mpirun: must be deepspeed or torchrun",
        env={"LAUNCHER": "mpirun"}),
    Row("run_local MASTER_PORT=99999", "sh", ["launch/run_local.sh", Q], r"MASTER_PORT=99999: give a TCP port number",
        env={"MASTER_PORT": "99999"}),
    Row("run_torchrun NPROC=0", "sh", ["launch/run_torchrun.sh", Q], r"NPROC=0: give a positive whole number", env={"NPROC": "0"}),
    Row("run_torchrun NNODES=two", "sh", ["launch/run_torchrun.sh", Q], r"NNODES=two: give a positive whole number",
        env={"NNODES": "two"}),
    Row("run_multinode missing hostfile", "sh", ["launch/run_multinode.sh", Q], r"HOSTFILE=.*nohosts not found",
        env={"HOSTFILE": "{tmp}/nohosts"}),
    Row("slurm.sbatch outside Slurm", "sh", ["launch/slurm.sbatch", Q], r"submit it with sbatch", env={"SLURM_JOB_ID": ""}),
]


# --------------------------------------------------------------------------------------------
# Inputs the rows refer to
# --------------------------------------------------------------------------------------------


def _train_fn(cfg):
    from lm.train import train

    return train(cfg)


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory, data_cache):  # noqa: F811
    run = tmp_path_factory.mktemp("bad_input") / "run"
    run_dist(_train_fn, 1, cfg=tiny_cfg(run, data_cache, "train.max_steps=2"))
    return run


def _tokens(folder: Path, splits: dict) -> Path:
    folder.mkdir(parents=True)
    for split, n in splits.items():
        (folder / f"{split}.bin").write_bytes(np.arange(n, dtype=np.uint8).tobytes())
    meta = {"dtype": "uint8", "vocab_size": 256, "splits": {s: {"tokens": n, "bytes": n} for s, n in splits.items()}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def paths(tmp_path, pristine_run, data_cache):  # noqa: F811
    p = {"tmp": tmp_path, "cache": data_cache, "run": tmp_path / "run"}
    shutil.copytree(pristine_run, p["run"])
    p["file"] = tmp_path / "file"
    p["file"].write_text("not a folder\n")
    p["empty_dir"] = tmp_path / "empty"
    p["empty_dir"].mkdir()
    p["bad_yaml"] = tmp_path / "bad.yaml"
    p["bad_yaml"].write_text("model:\n  d_model: 32\n  n_layers: [2\ntrain:\n  max_steps: 3\n")
    p["list_yaml"] = tmp_path / "list.yaml"
    p["list_yaml"].write_text("- model\n- train\n")
    p["tiny_tokens"] = _tokens(tmp_path / "tiny_tokens", {"train": 10})
    p["short_valid"] = _tokens(tmp_path / "short_valid", {"train": 5000, "valid": 20})
    p["bad_meta"] = tmp_path / "bad_meta"
    p["bad_meta"].mkdir()
    (p["bad_meta"] / "meta.json").write_text("{not json")
    p["text"] = tmp_path / "corpus.txt"
    p["text"].write_text("hello world\nsome text\n" * 50)
    return p


def _hash_tree(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        h.update(str(f.relative_to(folder)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Running one CLI
# --------------------------------------------------------------------------------------------


def _call(main, argv) -> tuple[int, str, str]:
    """main(argv) with stdout/stderr captured; an escaping exception is reported as the traceback it would print."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - what the user would see
            traceback.print_exc()
            rc = 1
    return rc, out.getvalue(), err.getvalue()


def _train_main_in_child(argv):
    from lm.train import main

    return _call(main, argv)


def _script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", ROOT / "tokenizers" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_row(row: Row, p: dict) -> tuple[int, str, str]:
    argv = [a.format(**p) for a in row.argv]
    if row.cli == "train":
        cwd = os.getcwd()
        os.chdir(ROOT)  # the recipes are named relative to the repository, as in the README
        try:
            ((rc, out, err),) = run_dist(_train_main_in_child, 1, timeout=120, argv=argv)
        finally:
            os.chdir(cwd)
        return rc, out, err
    if row.cli == "sh":
        env = dict(os.environ, PYTHON=sys.executable, **{k: v.format(**p) for k, v in row.env.items()})
        proc = subprocess.run(["bash", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        return proc.returncode, proc.stdout, proc.stderr
    if row.cli == "checkpoint":
        from lm.checkpoint import main
    elif row.cli == "perplexity":
        from evals.perplexity import main
    elif row.cli == "generate":
        from evals.generate import main
    else:
        main = _script_main(row.cli)
    return _call(main, argv)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)]
                                              if r.xfail else []) for r in ROWS])
def test_bad_input_is_refused_with_one_clear_message(row, paths):
    if row.setup is not None:
        row.setup(paths)
    before = _hash_tree(paths["run"])
    rc, out, err = run_row(row, paths)
    assert "Traceback" not in err + out, err[-3000:]
    assert rc != 0, f"exit status 0 for {row.id}; stdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}"
    matching = [line for line in err.splitlines() if re.search(row.expect, line)]
    assert matching, f"no stderr line matches {row.expect!r}:\n{err[-3000:]}"
    assert _hash_tree(paths["run"]) == before, "the existing checkpoint changed"


def test_every_cli_and_launch_script_has_rows():
    clis = {r.cli for r in ROWS}
    assert clis == {"train", "checkpoint", "perplexity", "generate", "encode_corpus", "train_sentencepiece", "sh"}
    scripts = {r.argv[0] for r in ROWS if r.cli == "sh"}
    assert scripts >= {f"launch/{f.name}" for f in (ROOT / "launch").glob("run_*.sh")} | {"launch/slurm.sbatch"}
