"""Checkpoints you can trust: DeepSpeed's sharded layout, written atomically, verified on load.

Layout:
    RUN_DIR/checkpoints/latest                 names the newest complete checkpoint (written last)
    RUN_DIR/checkpoints/global_stepN/          DeepSpeed's model/optimizer shards, plus
        config.yaml                            the resolved run config
        trainer_state.pt                       step, samples consumed, RNG states, topology (tensors
                                               and plain types only: loads with weights_only=True)
        manifest.json                          every file with its size and sha256 (written last)
    RUN_DIR/checkpoints/universal/global_stepN DeepSpeed universal checkpoint, made on demand when a
                                               run resumes on another topology

Saving writes everything under `.staging-global_stepN/`, fsyncs it, renames the tag folder into
place and only then replaces `latest`: a crash or a full disk mid-save never changes what `latest`
points to. Loading verifies the manifest (every shard present, sizes and hashes match) and that the
checkpoint's model config equals the run's, before anything is unpickled.

Trust boundary: nothing in a checkpoint is unpickled beyond tensors, plain containers and the three
DeepSpeed classes DeepSpeed itself stores (ALLOWED_GLOBALS). Every `.pt` file loads with
`torch.load(weights_only=True)` under that allow-list: ours directly, DeepSpeed's through the
SafeCheckpointEngine handed to the engine for the duration of a load. Where DeepSpeed opens files with
its own `torch.load(weights_only=False)` (universal checkpoints, ZeRO-3 consolidation), every file it can
open is first loaded the same safe way and a file that fails is refused before DeepSpeed sees it. The
universal conversion runs in a child process in which torch is forced to weights_only loading
(TORCH_FORCE_WEIGHTS_ONLY_LOAD=1) with the same allow-list. `verify` checks the manifest (sizes, sha256,
no unlisted files) and also loads every file the safe way, so a tampered checkpoint whose manifest was
re-hashed still fails verification. YAML loads with `safe_load`.

Modules: common (names, CheckpointError), safety (the trust boundary), store (save, find, verify, load),
resume (run-dir check, config changes on resume, ResumePlan), universal (conversion), export (weights on one
process, per-layout adapters), cli (`python -m lm.checkpoint`).
"""

from lm.checkpoint.common import (CONFIG, FORMAT, MANIFEST, STATE_FILE, TAG_RE, CheckpointError, list_tags,
                                  sha256_file, tag_for)
from lm.checkpoint.safety import ALLOWED_GLOBALS, SafeCheckpointEngine, allowed_globals, check_loadable, safe_load
from lm.checkpoint.store import (align_optimizer_steps, load, load_checkpoint_config, load_trainer_state, newest_good,
                                 prune, read_latest, read_manifest, resolve_checkpoint, restore_buffers, restore_rng,
                                 save, saved_module_state, trainer_state, verify)
from lm.checkpoint.resume import (APPLY, REFUSE, RESUME_RULES, ResumePlan, check_compatible, check_run_dir,
                                  clear_checkpoints, plan_resume, resume_config_changes)
from lm.checkpoint.universal import to_universal
from lm.checkpoint.export import export, load_module_state
from lm.checkpoint.cli import main

__all__ = [
    "CONFIG", "FORMAT", "MANIFEST", "STATE_FILE", "TAG_RE", "CheckpointError", "list_tags", "sha256_file", "tag_for",
    "ALLOWED_GLOBALS", "SafeCheckpointEngine", "allowed_globals", "check_loadable", "safe_load",
    "align_optimizer_steps", "load", "load_checkpoint_config", "load_trainer_state", "newest_good", "prune",
    "read_latest", "read_manifest", "resolve_checkpoint", "restore_buffers", "restore_rng", "saved_module_state", "save", "trainer_state", "verify",
    "APPLY", "REFUSE", "RESUME_RULES", "ResumePlan", "check_compatible", "check_run_dir", "clear_checkpoints",
    "plan_resume", "resume_config_changes", "to_universal", "export", "load_module_state", "main",
]
