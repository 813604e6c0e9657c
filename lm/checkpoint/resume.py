"""Starting and resuming a run: the run-dir check, which config changes a resume may apply, and the resume
plan (which checkpoint, which parameter layout, whether it loads through the universal format)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lm.checkpoint.common import CheckpointError, list_tags
from lm.checkpoint.store import load_checkpoint_config, load_trainer_state, newest_good, resolve_checkpoint, verify
from lm.config import ConfigError, RunConfig, to_dict

log = logging.getLogger("lm.checkpoint")


def check_compatible(saved: RunConfig, current: RunConfig, where: Path) -> None:
    """The model must be the same architecture and shape; name every key that differs (the model keys
    RESUME_RULES marks as changeable on resume are not compared)."""
    a, b = to_dict(saved.model), to_dict(current.model)
    diffs = []

    def walk(x, y, prefix):
        for k in sorted(set(x) | set(y)):
            if isinstance(x.get(k), dict) and isinstance(y.get(k), dict):
                walk(x[k], y[k], f"{prefix}{k}.")
            elif x.get(k) != y.get(k) and _resume_rule(f"model.{prefix}{k}")[0] != APPLY:
                diffs.append(f"model.{prefix}{k}: checkpoint {x.get(k)!r} vs run {y.get(k)!r}")

    walk(a, b, "")
    if diffs:
        raise CheckpointError(f"checkpoint {where} was trained with a different model: " + "; ".join(diffs[:8]))


def check_run_dir(run_dir: str | os.PathLike, resume: Optional[str], overwrite: bool) -> bool:
    """Check train.run_dir before anything is written there (rank 0, before training starts).

    Raises ConfigError when the run dir is a file or not writable (or `resume` is an empty string), and
    CheckpointError when it already holds checkpoints, `resume` is None and `overwrite` is false: saving
    would replace another run's `global_stepN` and repoint `latest`. Returns True when the run dir holds
    checkpoints that `overwrite` says to discard: the caller then calls `clear_checkpoints(run_dir)`."""
    p = Path(run_dir)
    if resume is not None and not str(resume).strip():
        raise ConfigError("--resume was given an empty value: use --resume auto (newest checkpoint in train.run_dir) "
                          "or --resume PATH")
    if p.exists() and not p.is_dir():
        raise ConfigError(f"train.run_dir={p} is a file, not a folder: choose another train.run_dir")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"train.run_dir={p} cannot be created: {existing} is a file; choose another train.run_dir")
    why = _unwritable(existing)
    if why:
        raise ConfigError(f"train.run_dir={p} is not writable ({existing}: {why}): choose another train.run_dir or "
                          "fix its permissions")
    ckpt_root = p / "checkpoints"
    if ckpt_root.exists():
        why = "not a folder" if not ckpt_root.is_dir() else _unwritable(ckpt_root)
        if why:
            raise ConfigError(f"{ckpt_root} cannot hold checkpoints ({why}): choose another train.run_dir or fix it")
    tags = list_tags(ckpt_root)
    if not tags or resume is not None:
        return False
    if overwrite:
        return True
    raise CheckpointError(
        f"train.run_dir={p} already holds checkpoints ({', '.join(tags[-3:])}); training there without --resume "
        f"would overwrite them. Continue that run with --resume auto, choose another train.run_dir, or pass "
        f"train.overwrite=true to delete them and start a new run there")


def _unwritable(folder: Path) -> Optional[str]:
    """Why no file can be created in `folder` (None when one can): a real probe, since permission bits
    say nothing for root or on read-only mounts."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(probe)
    return None


def clear_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete RUN_DIR/checkpoints (what train.overwrite=true asks for; rank 0 only)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if ckpt_root.is_dir():
        shutil.rmtree(ckpt_root)


APPLY, REFUSE = "apply", "refuse"


_SAME_DATA = ("the run's position in its data (samples consumed) indexes windows of this exact token stream; "
              "another stream would silently repeat or skip data")


_SAME_FUNCTION = "the trained weights were learned for this setting; changing it changes what they compute"


_SHAPE = "the checkpoint's weights have the shape this sets"


RESUME_RULES: dict[str, tuple[str, str]] = {
    # model: shapes and the function the weights compute cannot change; regularisation, implementation
    # choices and codebook-update hyperparameters can
    "model.arch": (REFUSE, _SHAPE), "model.vocab_size": (REFUSE, _SHAPE), "model.d_model": (REFUSE, _SHAPE),
    "model.n_layers": (REFUSE, _SHAPE), "model.ffn_dim": (REFUSE, _SHAPE), "model.tie_embeddings": (REFUSE, _SHAPE),
    "model.norm_eps": (REFUSE, _SAME_FUNCTION), "model.init_std": (APPLY, "initialisation only: no effect on a resumed run"),
    "model.dropout": (APPLY, "regularisation"),
    "model.longvq.attention_impl": (APPLY, "the same attention computed another way"),
    "model.longvq.ema_impl": (APPLY, "the same EMA computed another way"),
    "model.longvq.quantizer_impl": (APPLY, "the same quantizer computed another way"),
    "model.longvq.gate_impl": (APPLY, "the same gates computed another way"),
    "model.longvq.chunk_size": (REFUSE, _SAME_FUNCTION), "model.longvq.codebook_size": (REFUSE, _SHAPE),
    "model.longvq.n_heads": (REFUSE, _SHAPE), "model.longvq.z_dim": (REFUSE, _SHAPE),
    "model.longvq.hidden_dim": (REFUSE, _SHAPE), "model.longvq.ema_dim": (REFUSE, _SHAPE),
    "model.longvq.commit_beta": (APPLY, "a loss weight"), "model.longvq.codebook_decay": (APPLY, "a codebook-update rate"),
    "model.longvq.codebook_init": (APPLY, "initialisation only: no effect on a resumed run"),
    "model.longvq.dead_code_threshold": (APPLY, "a codebook-update rule"),
    "model.longvq.dead_code_reseed": (APPLY, "a codebook-update rule"),
    "model.longvq.normalize_keys": (REFUSE, _SAME_FUNCTION), "model.longvq.key_norm": (REFUSE, _SAME_FUNCTION),
    "model.longvq.query_norm": (REFUSE, _SAME_FUNCTION), "model.longvq.query_temperature": (REFUSE, _SHAPE),
    "model.longvq.local_raw_keys": (REFUSE, _SAME_FUNCTION), "model.longvq.residual": (REFUSE, _SAME_FUNCTION),
    "model.longvq.attention_dropout": (APPLY, "regularisation"), "model.longvq.hidden_dropout": (APPLY, "regularisation"),
    "model.transformer.n_heads": (REFUSE, _SAME_FUNCTION), "model.transformer.rope_base": (REFUSE, _SAME_FUNCTION),
    "model.transformer.attn_backend": (APPLY, "the same attention computed another way"),
    # data: the stream and its windows must stay; where it is read from may move
    "data.dataset": (REFUSE, _SAME_DATA), "data.tokenizer": (REFUSE, _SAME_DATA),
    "data.max_train_bytes": (REFUSE, _SAME_DATA),
    "data.seq_len": (REFUSE, "a training sample is a window of data.seq_len + 1 tokens: another length re-cuts the "
                             "stream, so the run's position in it (samples consumed) no longer means anything"),
    "data.data_path": (APPLY, "where the data is read from (it must hold the same data)"),
    "data.cache_dir": (APPLY, "where prepared data is cached"),
    # optimizer hyperparameters and the schedule apply from the next step
    "optim.lr": (APPLY, "schedule"), "optim.min_lr_ratio": (APPLY, "schedule"), "optim.warmup_steps": (APPLY, "schedule"),
    "optim.weight_decay": (APPLY, "optimizer hyperparameter"), "optim.beta1": (APPLY, "optimizer hyperparameter"),
    "optim.beta2": (APPLY, "optimizer hyperparameter"), "optim.eps": (APPLY, "optimizer hyperparameter"),
    "optim.grad_clip": (APPLY, "optimizer hyperparameter"),
    # train: the run's length, cadence and policies apply; the data order and the precision cannot change
    "train.run_dir": (APPLY, "where the run writes"), "train.overwrite": (APPLY, "only read when a run starts"),
    "train.max_steps": (APPLY, "the run's length (the cosine schedule stretches to the new length)"),
    "train.micro_batch_size": (APPLY, "split of the global batch (the global batch itself is checked separately)"),
    "train.grad_accum_steps": (APPLY, "split of the global batch (the global batch itself is checked separately)"),
    "train.seed": (REFUSE, "the seed sets the order in which the run visits its data; another seed would repeat "
                           "some samples and skip others"),
    "train.precision": (REFUSE, "bf16 runs keep bf16 weights with fp32 master copies in the optimizer, fp32 and "
                                "bf16-mixed runs fp32 weights: the checkpoints are laid out differently"),
    "train.log_every": (APPLY, "cadence"), "train.save_every": (APPLY, "cadence"), "train.keep_last": (APPLY, "cadence"),
    "train.eval_every": (APPLY, "cadence"), "train.eval_batches": (APPLY, "cadence"),
    "train.progress_bar": (APPLY, "display"), "train.compile": (APPLY, "implementation"),
    "train.compile_backend": (APPLY, "implementation"), "train.tf32": (APPLY, "implementation"),
    "train.loss_chunk_tokens": (APPLY, "implementation"), "train.loss_impl": (APPLY, "implementation"),
    "train.on_nonfinite": (APPLY, "policy"),
    "train.max_skipped_steps": (APPLY, "policy"),
    # parallel: the topology is judged by the resume planner (universal conversion, or a refusal with the fix)
    "parallel.zero_stage": (APPLY, "topology (checked when the checkpoint is planned for loading)"),
    "parallel.pipeline_stages": (APPLY, "topology (checked when the checkpoint is planned for loading)"),
    "parallel.offload_optimizer": (APPLY, "where optimizer state lives, not what it holds"),
    "parallel.activation_checkpointing": (APPLY, "memory/compute trade-off"),
    "parallel.activation_checkpointing_blocks": (APPLY, "memory/compute trade-off"),
    "parallel.zero3_persistence_threshold": (APPLY, "how ZeRO-3 partitions parameters (refused for ZeRO-3 checkpoints)"),
    "parallel.sequence_parallel": (APPLY, "topology: each sequence is split over more or fewer ranks, the weights "
                                          "and the data order are the same"),
}
"""How each config key may differ between a checkpoint's config and the resumed run's (see
resume_config_changes). Every key of RunConfig is listed (tests/test_checkpoint.py checks it)."""


def _resume_rule(key: str) -> tuple[str, str]:
    return RESUME_RULES.get(key, (REFUSE, "this key is not known to be safe to change on resume"))


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_config_changes(saved: RunConfig, current: RunConfig, saved_world: Optional[int] = None,
                          current_world: Optional[int] = None) -> dict[str, tuple]:
    """The config keys that differ between a checkpoint (`saved`) and the run resuming it (`current`)
    and that the resumed run applies, as {key: (saved value, new value)}.

    Raises CheckpointError naming every change that cannot be applied, with the reason and the fix
    (RESUME_RULES): the model's shape and the function its weights compute, the data stream, its window
    length and order (data.*, train.seed), the precision, and the global batch. The global batch is
    micro_batch_size x grad_accum_steps x data-parallel ranks (ranks = world / pipeline_stages; pass the
    saved and current world sizes to include them, else they are taken as equal): it may be split
    differently (e.g. more accumulation on fewer processes) but not changed, since the run's position in
    its data and its learning-rate schedule are counted in global batches."""
    a, b = _leaves(to_dict(saved)), _leaves(to_dict(current))
    applied, refused = {}, []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key), b.get(key)
        if old == new:
            continue
        verdict, why = _resume_rule(key)
        if key == "parallel.zero3_persistence_threshold" and saved.parallel.zero_stage == 3:
            verdict, why = REFUSE, "a ZeRO-3 checkpoint's parameters are partitioned by this threshold"
        if key == "train.precision" and "bf16" not in (old, new):
            verdict = APPLY  # fp32, bf16-mixed and auto (one of the two) all keep fp32 weights and optimizer state
        if verdict == APPLY:
            applied[key] = (old, new)
        else:
            refused.append(f"{key} {old!r} -> {new!r} ({why}; keep {key}={old})")

    def global_batch(cfg: RunConfig, world: Optional[int]) -> int:
        dp = 1 if world is None else max(1, world // (cfg.parallel.pipeline_stages * cfg.parallel.sequence_parallel))
        return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp

    worlds_known = saved_world is not None and current_world is not None
    g_old = global_batch(saved, saved_world if worlds_known else None)
    g_new = global_batch(current, current_world if worlds_known else None)
    if g_old != g_new:
        refused.append(
            f"the global batch {g_old} -> {g_new} (train.micro_batch_size x train.grad_accum_steps"
            + (" x data-parallel processes" if worlds_known else "") + "; the run's position in its data and its "
            f"schedule are counted in global batches of {g_old}: choose train.micro_batch_size and "
            f"train.grad_accum_steps whose product" + (" times the data-parallel processes" if worlds_known else "")
            + f" is {g_old})")
    if refused:
        raise CheckpointError("cannot resume with these config changes: " + "; ".join(refused)
                              + ". To change them, start a new run (another train.run_dir, or train.overwrite=true)")
    return applied


@dataclass
class ResumePlan:
    """Which checkpoint a run resumes from and how to load it (made on rank 0, sent to every rank)."""

    root: Path  # the checkpoints folder that holds `tag`
    tag: str  # global_stepN
    layout: str  # parameter names of the model to build: "plain" or "pipeline" (a pipeline checkpoint keeps them)
    universal: bool = False  # the topology changed (ZeRO >= 1): load through DeepSpeed's universal format
    changes: dict = field(default_factory=dict)  # config keys the resumed run applies: {key: (saved, new)}

    @property
    def load_root(self) -> Path:
        """Where the engine loads `tag` from: the universal conversion, or the checkpoint itself."""
        return self.root / "universal" if self.universal else self.root


def plan_resume(cfg: RunConfig, resume: str, world_size: int) -> Optional[ResumePlan]:
    """The checkpoint `resume` names ("auto": the newest one in train.run_dir that verifies, None when there is
    none yet) checked against the run: the same model, config changes applied or refused (resume_config_changes),
    and the topology: the same one loads directly; another ZeRO >= 1 one through the universal format; a changed
    ZeRO stage, a plain checkpoint into a pipeline, or a resharded ZeRO-0 pipeline are refused with the fix."""
    pp = cfg.parallel.pipeline_stages
    if resume == "auto":
        root, tag = Path(cfg.train.run_dir) / "checkpoints", None
        tag = newest_good(root)
        if tag is None:
            log.info("resume=auto: no complete checkpoint in %s yet, starting fresh", root)
            return None
    else:
        root, tag = resolve_checkpoint(resume)
        verify(root / tag)
    where = root / tag
    saved_cfg = load_checkpoint_config(root, tag)
    check_compatible(saved_cfg, cfg, where)
    state = load_trainer_state(root, tag)
    changes = resume_config_changes(saved_cfg, cfg, state["topology"]["world_size"], world_size)
    saved = dict(state["topology"])
    saved.setdefault("layout", "pipeline" if saved["pipeline_stages"] > 1 else "plain")
    saved.setdefault("sequence_parallel", 1)
    layout = "pipeline" if (pp > 1 or saved["layout"] == "pipeline") else "plain"
    now = {"world_size": world_size, "zero_stage": cfg.parallel.zero_stage, "pipeline_stages": pp,
           "sequence_parallel": cfg.parallel.sequence_parallel, "layout": layout}
    if saved["layout"] == "plain" and layout == "pipeline":
        raise CheckpointError(
            f"{where} was saved without pipeline parallelism; resume it with parallel.pipeline_stages=1, "
            f"or export it (`python -m lm.checkpoint export {where} OUT`) and start the pipeline run from that")
    same = all(saved.get(k) == v for k, v in now.items())
    if not same and saved["zero_stage"] != now["zero_stage"]:
        raise CheckpointError(
            f"{where} was saved with ZeRO-{saved['zero_stage']}; resume it with parallel.zero_stage="
            f"{saved['zero_stage']} (any number of processes), or export the weights with "
            f"`python -m lm.checkpoint export {where} OUT` and start a new run from them")
    universal = not same and saved["zero_stage"] >= 1
    if not same and not universal and saved["pipeline_stages"] != pp:
        raise CheckpointError(
            f"{where} is a ZeRO-0 pipeline checkpoint ({saved['pipeline_stages']} stages); DeepSpeed can "
            f"reshard pipelines only from ZeRO >= 1: resume with parallel.pipeline_stages={saved['pipeline_stages']}")
    for key, (old, new) in changes.items():
        log.info("resume: %s %r -> %r (applied)", key, old, new)
    log.info("resuming from %s (saved on %s, now %s%s)", where, saved, now,
             "; converting to a universal checkpoint" if universal else "")
    return ResumePlan(root=root, tag=tag, layout=layout, universal=universal, changes=changes)
