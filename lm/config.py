"""Typed run configuration: dataclasses filled from layered YAML recipes plus dotted overrides.

Precedence: dataclass defaults < YAML files (left to right, each may name `_base_` files it
extends) < `key.path=value` overrides. Unknown keys and values of the wrong type fail before
anything starts, with a message naming the key and, for typos, the closest valid key.

Each component receives only its own slice: `lm.model.build_model(cfg.model)`, `lm.data.streams.load_stream(
cfg.data, split)`, `lm.optim.build_optimizer(model, cfg.optim)`. Only `lm.train` sees the whole `RunConfig`.

Derived sizes (`model.ffn_dim`, `model.longvq.hidden_dim`) are resolved once, when a `ModelConfig` is built:
a value left null takes the architecture's default, so the resolved config (what `dump_config` writes into
run directories and checkpoints) always holds the sizes the model was built with, and a file written with
`null` loads to the same config as one written with the resolved value. Each architecture's config class
(`LongVQConfig`, `TransformerConfig`) owns its own rules: defaults, validation, attention shape and the
FLOP and activation accounting (`ModelConfig.mixer` is the one of `model.arch`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class LongVQConfig:
    """The LongVQ token mixer: block equations, attention rule and codebook learning in docs/model.md."""

    attention_impl: Literal["dense", "chunked", "fused", "auto"] = "auto"
    """dense = O(T^2) oracle; chunked = pure PyTorch O(T(C+S)); fused = GPU kernel; auto picks."""
    ema_impl: Literal["fft", "scan", "auto"] = "auto"
    """EMA training path: fft = FFT convolution (fp32); scan = chunked scan (Triton kernel on CUDA, its PyTorch
    twin elsewhere); auto = the Triton scan where it runs (CUDA), else fft. Same result up to rounding."""
    chunk_size: int = 64
    """C: tokens per attention chunk; a query sees its own chunk and the previous one exactly."""
    codebook_size: int = 64
    """S: codewords per head in each layer's key codebook."""
    n_heads: int = 1
    """Attention heads; each head has its own codebook. MEGA/LongVQ use a single head."""
    z_dim: int = 64
    """d_z: width of the shared query/key representation z (split over heads)."""
    hidden_dim: Optional[int] = None
    """E: value / reset-gate width; null = 2 * model.d_model (resolved when the model config is built)."""
    ema_dim: int = 16
    """N: dimensions of the multi-dimensional damped EMA per channel."""
    commit_beta: float = 1e-4
    """Weight of the commitment loss ||k - sg(c_z)||^2 added to the LM loss."""
    codebook_decay: float = 0.99
    """gamma of the EMA k-means codebook update (applied once per optimizer step)."""
    codebook_init: Literal["random", "first_batch"] = "random"
    """first_batch: the first optimizer step sets the codebook to S keys of the first micro-batch
    (quickstart, 2026-11-29: test bpb 2.274 vs 2.259 with random init: no gain there; for collapse studies)."""
    dead_code_threshold: float = 0.1
    """Codes whose EMA count falls below this fraction of the mean are re-seeded (0 = off), as dead_code_reseed says."""
    dead_code_reseed: Literal["split", "batch"] = "split"
    """split: a dead code becomes a perturbed copy of a busy code (LBG splitting). batch: it moves onto one of
    the keys of the step's first micro-batch that the codebook serves worst (largest quantisation error;
    rank 0's keys under data parallelism), so codes follow where the keys are (issue 7: with splitting the
    copies sat next to busy codes and held-out keys still used 1-30 % of the codes)."""
    quantizer_impl: Literal["reference", "fused", "auto"] = "auto"
    """Nearest-code assignment: reference = PyTorch through a float32 (tokens, heads, S) score tensor; fused = one
    Triton kernel (CUDA; bf16 distance tiles for bf16 keys, no score tensor); auto = fused where it runs."""
    gate_impl: Literal["reference", "triton", "auto"] = "auto"
    """The block's element-wise gates around its GEMMs (lm/ops/gates.py): the split of the shared projection into
    u, r, q, k (sigmoid, SiLU, the q/k affine maps and their norms) and the gated residual SiLU(hx + y) with the
    update gate. reference = PyTorch's element-wise ops; triton = one Triton kernel per site, forward and
    backward (CUDA); auto = triton on CUDA in eager blocks, reference under torch.compile (Inductor fuses these
    ops itself) and on CPU; with model.dropout > 0 in training the residual site takes the reference."""
    normalize_keys: bool = True
    """RMS-normalise keys (no gain) before quantisation so the codebook sees a stable scale."""
    key_norm: Literal["rms", "center_rms"] = "rms"
    """How keys are normalised when normalize_keys is true. rms: RMS norm per head; center_rms: subtract the
    per-head mean over the head dim first (LayerNorm without gain), removing the common-mode direction that
    mostly-positive SiLU(z) gives all keys."""
    query_norm: bool = False
    """Also RMS-normalise q per head (no gain), as Transformer-VQ does."""
    query_temperature: bool = False
    """Learn a log-scale per head on the queries (init 0: the fixed 1/sqrt(d) scale). With RMS-normalised
    queries and keys the logits q.k/sqrt(d) are otherwise bounded by sqrt(d) (8 at head dim 64), so a query
    cannot single out one key among hundreds; this is QK-norm's learnable gain."""
    local_raw_keys: bool = False
    """Own and previous chunk attend with the exact (normalised, unquantised) keys; only the code cache
    uses codewords (docs/model.md). Still linear time; default off (Transformer-VQ: quantised everywhere)."""
    residual: Literal["gated", "add"] = "gated"
    """gated: MEGA's out = x + u * (h - x) (the update gate interpolates, so every layer scales the residual
    stream by 1 - u, about 0.5 at init: 0.5^12 through 12 layers). add: out = x + u * h, a plain pre-norm
    residual whose branch is gated by u; the identity path keeps weight 1 at any depth."""
    attention_dropout: float = 0.0
    """Dropout on the attention output (before the reset gate r). None of the attention implementations drops
    attention probabilities (the fused kernel has no dropout), so this is where attention is regularised."""
    hidden_dropout: float = 0.0
    """Dropout on the EMA output SiLU(EMA(x)) before the shared projection (MEGA's hidden dropout)."""

    ffn_kind: ClassVar[str] = "silu"
    """The FFN of a LongVQ block: MEGA's normalised FFN, W2 SiLU(W1 RMSNorm(x))."""
    FLOPS_FORMULA: ClassVar[str] = (
        "6*N + 6*L*H*K*(dk+dv), K = mean over positions of own-chunk (i mod C)+1 + previous chunk C "
        "(i >= C) + codebook S (i >= 2C) (~= (C+1)/2 + C + S)")

    def resolved(self, d_model: int) -> LongVQConfig:
        """This config with its derived sizes filled in (hidden_dim: 2 * d_model, MEGA's E); itself when set."""
        return self if self.hidden_dim is not None else dataclasses.replace(self, hidden_dim=2 * d_model)

    @staticmethod
    def default_ffn_dim(d_model: int) -> int:
        """model.ffn_dim when null: 2 * d_model (MEGA)."""
        return 2 * d_model

    def head_dims(self, d_model: int) -> tuple[int, int, int]:
        """(heads, dk, dv): keys are z split over the heads, values the hidden width E split over them."""
        H = self.n_heads
        return H, self.z_dim // H, self.resolved(d_model).hidden_dim // H

    def mean_keys_per_query(self, context: int) -> float:
        """K: keys and codewords one query scores, averaged over positions 0..context-1: its own chunk up to
        itself, the whole previous chunk (from the second chunk on) and the S codewords (from the third)."""
        T, C, S = context, self.chunk_size, self.codebook_size
        full, rem = divmod(T, C)
        own = full * C * (C + 1) / 2 + rem * (rem + 1) / 2  # sum over i of (i mod C) + 1
        prev = C * max(0, T - C)
        cache = S * max(0, T - 2 * C)
        return (own + prev + cache) / T

    def attention_activation_bytes(self, tokens: int, d_model: int) -> float:
        """Attention activations per layer beyond the Megatron estimate: the fp32 joint scores (2C + S per query)."""
        return tokens * self.n_heads * (2 * self.chunk_size + self.codebook_size) * 4

    def validate(self, d_model: int) -> None:
        _check(self.chunk_size >= 1, f"model.longvq.chunk_size must be >= 1, got {self.chunk_size}")
        _check(self.codebook_size >= 2, f"model.longvq.codebook_size must be >= 2, got {self.codebook_size}")
        _positive("model.longvq.n_heads", self.n_heads)
        _positive("model.longvq.z_dim", self.z_dim)
        _positive("model.longvq.ema_dim", self.ema_dim)
        hidden = self.resolved(d_model).hidden_dim
        _positive("model.longvq.hidden_dim", hidden)
        _check(self.z_dim % self.n_heads == 0,
               f"model.longvq.z_dim={self.z_dim} must be divisible by model.longvq.n_heads={self.n_heads}")
        _check(hidden % self.n_heads == 0,
               f"model.longvq.hidden_dim={hidden} must be divisible by model.longvq.n_heads={self.n_heads}")
        _check(0.0 < self.codebook_decay < 1.0, f"model.longvq.codebook_decay must be in (0, 1), got {self.codebook_decay}")
        _check(self.commit_beta >= 0, f"model.longvq.commit_beta must be >= 0, got {self.commit_beta}")
        _check(self.dead_code_threshold >= 0,
               f"model.longvq.dead_code_threshold must be >= 0 (0 = off), got {self.dead_code_threshold}")
        _probability("model.longvq.attention_dropout", self.attention_dropout)
        _probability("model.longvq.hidden_dropout", self.hidden_dropout)

    def validate_sequence_parallel(self, sp: int, seq_len: int) -> None:
        """Segments of seq_len / sp tokens hold whole chunks; the dense oracle keeps no constant-size state."""
        C, seq = self.chunk_size, seq_len
        _check(sp <= seq // C,
               f"parallel.sequence_parallel={sp} is larger than the {seq // C} chunks of a sequence (data.seq_len="
               f"{seq} / model.longvq.chunk_size={C}): every rank needs at least one chunk")
        _check(seq % sp == 0 and (seq // sp) % C == 0,
               f"the segment length data.seq_len / parallel.sequence_parallel = {seq} / {sp} must be a multiple of "
               f"model.longvq.chunk_size={C}: segments hold whole chunks")
        _check(self.attention_impl != "dense",
               "model.longvq.attention_impl=dense cannot run with parallel.sequence_parallel > 1 (the dense oracle "
               "keeps the whole history, not a constant-size state): use chunked, fused or auto")


@dataclass(kw_only=True)
class TransformerConfig:
    """Baseline pre-norm Transformer (RoPE, SwiGLU) attention settings."""

    n_heads: int = 4
    rope_base: float = 10000.0
    attn_backend: Literal["auto", "flash_attn4", "flash_attn", "cudnn", "flash", "efficient", "math"] = "auto"
    """auto: flash-attn 4 (flash_attn.cute, Hopper or newer) or flash-attn 2 when installed, else SDPA cuDNN, then
    flash (GPU) / flash, math (CPU); a backend that raises is skipped for that module from then on."""

    ffn_kind: ClassVar[str] = "swiglu"
    """The FFN of a Transformer block: SwiGLU."""
    FLOPS_FORMULA: ClassVar[str] = "6*N + 6*L*H*K*(dk+dv), K = (T+1)/2 causal keys per query (~= 6*N + 6*L*d*T)"

    @staticmethod
    def default_ffn_dim(d_model: int) -> int:
        """model.ffn_dim when null: 8/3 * d_model (SwiGLU's usual width), rounded down."""
        return int(8 * d_model / 3)

    def head_dims(self, d_model: int) -> tuple[int, int, int]:
        """(heads, dk, dv): d_model split over the heads."""
        H = self.n_heads
        return H, d_model // H, d_model // H

    @staticmethod
    def mean_keys_per_query(context: int) -> float:
        """K: causal keys per query averaged over positions 0..context-1."""
        return (context + 1) / 2

    @staticmethod
    def attention_activation_bytes(tokens: int, d_model: int) -> float:
        """Attention activations per layer beyond the Megatron estimate: flash/cuDNN keep O(T) statistics only."""
        return tokens * d_model * 4

    def validate(self, d_model: int) -> None:
        _positive("model.transformer.n_heads", self.n_heads)
        _check(d_model % self.n_heads == 0,
               f"model.d_model={d_model} must be divisible by model.transformer.n_heads={self.n_heads}")
        _check((d_model // self.n_heads) % 2 == 0, "RoPE needs an even head dim: change model.transformer.n_heads")
        _check(self.rope_base > 0, f"model.transformer.rope_base must be > 0, got {self.rope_base}")

    def validate_sequence_parallel(self, sp: int, seq_len: int) -> None:
        """Ulysses: every rank holds seq_len / sp tokens, then whole heads."""
        _check(seq_len % sp == 0, f"data.seq_len={seq_len} must be divisible by parallel.sequence_parallel={sp}")
        _check(self.n_heads % sp == 0,
               f"model.transformer.n_heads={self.n_heads} must be divisible by parallel.sequence_parallel="
               f"{sp}: Ulysses gives each rank whole heads")


ARCH_CONFIGS = {"longvq": LongVQConfig, "transformer": TransformerConfig}
"""model.arch -> the config class of its token mixer; each arch is also the ModelConfig field holding it."""


@dataclass(kw_only=True)
class ModelConfig:
    arch: Literal["longvq", "transformer"] = "longvq"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    ffn_dim: Optional[int] = None
    """FFN hidden width; null = the architecture's default (2 * d_model for LongVQ's NFFN, 8/3 * d_model for
    SwiGLU), resolved when the config is built."""
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    longvq: LongVQConfig = field(default_factory=LongVQConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self) -> None:
        """Resolve the derived sizes once (see the module docstring): after this, no size is null."""
        if self.arch not in ARCH_CONFIGS:
            raise ConfigError(f"model.arch: {self.arch!r} is not one of {', '.join(map(repr, ARCH_CONFIGS))}")
        self.longvq = self.longvq.resolved(self.d_model)
        if self.ffn_dim is None:
            self.ffn_dim = self.mixer.default_ffn_dim(self.d_model)

    @property
    def mixer(self) -> LongVQConfig | TransformerConfig:
        """The config of the token mixer `arch` selects (its FLOP accounting, validation and FFN kind)."""
        return getattr(self, self.arch)

    def head_dims(self) -> tuple[int, int, int]:
        """(heads, dk, dv) of the attention."""
        return self.mixer.head_dims(self.d_model)

    def flops_per_token(self, n_params: int, context: int) -> float:
        """Training FLOPs (forward + backward) per token at `context` tokens (the formula: mixer.FLOPS_FORMULA).
        N = all parameters (the tied embedding once, so the LM head matmul is included); attention: 2 FLOPs per
        key for q.k and 2 for p.v, x3 for forward + backward. Not counted: norms, activations, softmax, RoPE,
        key quantisation distances, the EMA and the codebook update."""
        H, dk, dv = self.head_dims()
        return 6.0 * n_params + 6.0 * self.n_layers * H * self.mixer.mean_keys_per_query(context) * (dk + dv)

    def validate(self) -> None:
        _positive("model.d_model", self.d_model)
        _positive("model.n_layers", self.n_layers)
        _check(self.vocab_size >= 2, f"model.vocab_size must be >= 2, got {self.vocab_size}")
        _positive("model.ffn_dim", self.ffn_dim)
        _probability("model.dropout", self.dropout)
        _check(not (self.arch == "longvq" and self.longvq.gate_impl == "triton" and self.dropout > 0),
               f"model.longvq.gate_impl=triton has no dropout but model.dropout={self.dropout}: use "
               "model.longvq.gate_impl=auto (the reference where dropout is on) or reference")
        _check(self.norm_eps > 0, f"model.norm_eps must be > 0, got {self.norm_eps}")
        _check(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}")
        self.mixer.validate(self.d_model)


@dataclass(kw_only=True)
class DataConfig:
    dataset: Literal["stdlib", "enwik8", "wikitext103", "tokens"] = "stdlib"
    """stdlib = built-in offline corpus: this Python's standard-library sources, byte level."""
    data_path: Optional[str] = None
    """Local file or folder for datasets that need one (docs/data.md says what each dataset expects)."""
    cache_dir: str = "~/.cache/longvq"
    """Where prepared token arrays are cached."""
    tokenizer: str = "byte"
    """byte = UTF-8 bytes (vocab 256), or the path of a sentencepiece .model (tokenizers/train_sentencepiece.py)."""
    seq_len: int = 256
    """Training context length in tokens."""
    max_train_bytes: Optional[int] = None
    """Cap on the training stream (None = all)."""


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclass(kw_only=True)
class TrainConfig:
    run_dir: str = "runs/default"
    """Where checkpoints, config.yaml and TensorBoard logs go."""
    overwrite: bool = False
    """Start a new run (no --resume) in a train.run_dir that already holds checkpoints: its checkpoints
    folder is deleted first. Without it such a run is refused, since its saves would replace the old
    run's checkpoints and repoint `latest`; use --resume auto to continue the old run instead."""
    max_steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per process per forward/backward."""
    grad_accum_steps: int = 1
    seed: int = 1234
    """Initialisation and data order (>= 0)."""
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed"] = "auto"
    """fp32; bf16 = bf16 weights and activations with fp32 master weights in the optimizer; bf16-mixed = fp32
    weights under bf16 autocast. auto = fp32 on CPU, the faster bf16 mode on GPU (lm.engine.GPU_DEFAULT_PRECISION)."""
    log_every: int = 10
    """Print and log the training scalars every N steps (>= 1)."""
    save_every: int = 0
    """Save a checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 3
    """Checkpoints to keep (older ones are deleted after a successful save; 0 = keep all)."""
    eval_every: int = 0
    """Held-out loss every N steps (0 = never during training)."""
    eval_batches: int = 8
    """Held-out batches (of micro_batch_size windows) per evaluation (>= 1)."""
    progress_bar: bool = True
    compile: bool = False
    """torch.compile each block (fuses the element-wise work; measure first with evals.throughput --compile)."""
    compile_backend: str = "inductor"
    """torch.compile backend ('eager' only traces: what the CPU tests use)."""
    tf32: bool = True
    """CUDA: float32 matmuls on TF32 tensor cores (the key-to-codebook distances; bf16 autocast covers the rest)."""
    loss_chunk_tokens: int = 0
    """LM head + cross-entropy this many tokens at a time, without the full logits (0 = full logits).
    Saves ~3 x tokens x vocab x 4 bytes per micro-batch (25 GiB at 131,072 tokens x 32K vocab)."""
    loss_impl: Literal["auto", "triton", "torch"] = "auto"
    """With loss_chunk_tokens > 0: what turns each chunk of logits into its losses and gradient (lm/ops/linear_ce.py).
    triton = one kernel that writes the gradient over the logits in their dtype (no float32 copy); torch = the
    PyTorch reference (a float32 copy of the chunk); auto = triton on CUDA when Triton imports, else torch."""
    on_nonfinite: Literal["halt", "skip", "rollback"] = "halt"
    """Loss NaN/inf: halt with a message; skip the step's update (the bad micro-batch gives no gradient);
    or rollback to the last checkpoint and continue past the bad data. Every event is logged and counted."""
    max_skipped_steps: int = 10
    """skip/rollback events allowed before the run halts anyway."""


@dataclass(kw_only=True)
class ParallelConfig:
    zero_stage: int = 0
    pipeline_stages: int = 1
    offload_optimizer: bool = False
    activation_checkpointing: bool = False
    activation_checkpointing_blocks: int = 0
    """With activation_checkpointing: recompute only the first N blocks (0 = all). Fewer blocks recompute
    less and keep more activations (Megatron's recompute_num_layers)."""
    sequence_parallel: int = 1
    """SP: split every training sequence into this many contiguous, chunk-aligned segments on as many ranks
    (context parallelism; world = DP x SP x PP, the SP ranks of a sequence consecutive). LongVQ passes only its
    constant-size state between segments; the Transformer uses DeepSpeed-Ulysses (n_heads divisible by SP).
    See docs/parallelism.md."""
    zero3_persistence_threshold: int = 100_000
    """ZeRO-3: parameters with fewer elements stay whole on every rank (DeepSpeed's default, 1e5); 0
    partitions every parameter (the tests use 0 so that tiny models really are partitioned)."""


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        """Every value range and cross-field rule; each message names the key, the value and the fix."""
        self.model.validate()
        _check(self.data.seq_len >= 1, f"data.seq_len must be >= 1, got {self.data.seq_len}")
        if self.data.max_train_bytes is not None:
            _positive("data.max_train_bytes", self.data.max_train_bytes)
        t = self.train
        _check(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
        _check(t.grad_accum_steps >= 1, f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
        _check(t.max_steps >= 0, f"train.max_steps must be >= 0, got {t.max_steps}")
        _check(t.seed >= 0, f"train.seed must be >= 0, got {t.seed}")
        _check(t.log_every >= 1, f"train.log_every must be >= 1 (log every N steps), got {t.log_every}")
        _check(t.save_every >= 0, f"train.save_every must be >= 0 (0 = save only at the end), got {t.save_every}")
        _check(t.keep_last >= 0, f"train.keep_last must be >= 0 (0 = keep every checkpoint), got {t.keep_last}")
        _check(t.eval_every >= 0, f"train.eval_every must be >= 0 (0 = no evaluation during training), got {t.eval_every}")
        _check(t.eval_batches >= 1, f"train.eval_batches must be >= 1 (set train.eval_every=0 to skip evaluation), got {t.eval_batches}")
        _check(t.max_skipped_steps >= 0, f"train.max_skipped_steps must be >= 0, got {t.max_skipped_steps}")
        _check(t.loss_chunk_tokens >= 0, f"train.loss_chunk_tokens must be >= 0 (0 = full logits), got {t.loss_chunk_tokens}")
        _check(t.loss_impl in ("auto", "triton", "torch"),
               f"train.loss_impl must be auto, triton or torch, got {t.loss_impl!r}")
        _check(t.run_dir.strip() != "", "train.run_dir is empty: give the folder for checkpoints and logs")
        _check(not (self.parallel.pipeline_stages > 1 and t.loss_chunk_tokens > 0),
               "train.loss_chunk_tokens works without pipeline stages only (the pipeline's last stage computes the "
               "loss from logits): set train.loss_chunk_tokens=0 or parallel.pipeline_stages=1")
        _check(self.parallel.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.parallel.zero_stage}")
        _check(0 <= self.parallel.activation_checkpointing_blocks <= self.model.n_layers,
               f"parallel.activation_checkpointing_blocks must be between 0 (all blocks) and model.n_layers "
               f"({self.model.n_layers}), got {self.parallel.activation_checkpointing_blocks}")
        _check(self.parallel.pipeline_stages >= 1, f"parallel.pipeline_stages must be >= 1, got {self.parallel.pipeline_stages}")
        _check(not (self.parallel.offload_optimizer and self.parallel.zero_stage == 0),
               "parallel.offload_optimizer=true needs parallel.zero_stage >= 1 (ZeRO-Offload keeps the partitioned "
               "optimizer state on the CPU): set parallel.zero_stage=1, 2 or 3, or parallel.offload_optimizer=false")
        _check(self.parallel.zero3_persistence_threshold >= 0,
               f"parallel.zero3_persistence_threshold must be >= 0, got {self.parallel.zero3_persistence_threshold}")
        _check(not (self.parallel.pipeline_stages > 1 and self.parallel.zero_stage > 1),
               "parallel.pipeline_stages > 1 works only with parallel.zero_stage 0 or 1: ZeRO-2/3 partition "
               "gradients, which the pipeline accumulates over micro-batches (DeepSpeed asserts on it). "
               "Use parallel.zero_stage=1 with pipelines, or pipeline_stages=1 with ZeRO-2/3.")
        _check(not (self.parallel.pipeline_stages > 1 and t.on_nonfinite == "skip"),
               "train.on_nonfinite=skip needs the loss before the update, which pipelines only report after it: "
               "use train.on_nonfinite=rollback (or halt) with parallel.pipeline_stages > 1")
        o = self.optim
        _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
        _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0 (0 = no warmup), got {o.warmup_steps}")
        _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        _check(0 <= o.beta1 < 1, f"optim.beta1 must be in [0, 1), got {o.beta1}")
        _check(0 <= o.beta2 < 1, f"optim.beta2 must be in [0, 1), got {o.beta2}")
        _check(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
        _check(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = no clipping), got {o.grad_clip}")
        self._validate_sequence_parallel()

    def _validate_sequence_parallel(self) -> None:
        sp = self.parallel.sequence_parallel
        _check(sp >= 1, f"parallel.sequence_parallel must be >= 1, got {sp}")
        if sp == 1:
            return
        _check(self.parallel.pipeline_stages == 1,
               f"parallel.sequence_parallel={sp} works with parallel.pipeline_stages=1 only (got "
               f"{self.parallel.pipeline_stages}): use sequence parallelism or pipeline stages, not both")
        self.model.mixer.validate_sequence_parallel(sp, self.data.seq_len)


def _positive(key: str, value: int) -> None:
    _check(value >= 1, f"{key} must be >= 1, got {value}")


def _probability(key: str, value: float) -> None:
    _check(0.0 <= value < 1.0, f"{key} is a dropout probability and must be in [0, 1), got {value}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_BASE_KEY = "_base_"


def load_config(*yaml_paths: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build the typed run config from YAML recipes (merged left to right) and dotted overrides."""
    merged: dict = {}
    for path in yaml_paths:
        _deep_merge(merged, _read_yaml_layers(Path(path), seen=()))
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(merged, key, value)
    cfg = from_dict(RunConfig, merged)
    cfg.validate()
    return cfg


def _read_yaml_layers(path: Path, seen: tuple) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{_BASE_KEY} cycle through {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and cmark is not None and mark is not None and cmark.line != mark.line:
            problem += f" ({context} that starts at line {cmark.line + 1})"
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the file there") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: give a YAML recipe") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop(_BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        _deep_merge(merged, _read_yaml_layers(path.parent / base, seen + (path.resolve(),)))
    _deep_merge(merged, data)
    return merged


def _deep_merge(dst: dict, src: dict) -> dict:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value)
        else:
            dst[key] = value
    return dst


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} must look like key.path=value (e.g. train.max_steps=100)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from None
    return key.strip(), value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Strictly convert a nested dict into dataclass `cls` (unknown keys and bad types raise)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return origin(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (it loads back to an equal RunConfig)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def config_from_dict(data: dict) -> RunConfig:
    cfg = from_dict(RunConfig, data)
    cfg.validate()
    return cfg
