"""Engines: the small interface one training step is written against, and its two implementations.

    engine = build_engine(cfg, kind="deepspeed" | "torch")
    x, y = engine.local_segment(x), engine.local_segment(y)   # this rank's segment (sequence parallelism)
    out = engine.forward(x, y)          # ModelOutput with .loss (mean CE) and .aux_loss, under the precision
    engine.backward(out.loss + out.aux_loss)      # once per micro-batch
    engine.step(lr, skip=False)         # once per optimizer step: clip, update (or drop) the accumulated grads

`TorchEngine` is plain PyTorch on one process (no DeepSpeed import: it runs where DeepSpeed is not
installed). `DeepSpeedEngine` wraps `deepspeed.initialize` with the DeepSpeed JSON generated from the typed
config over the DP x SP x PP process mesh (lm.parallel.topology): data parallel x ZeRO 0-3, sequence
parallelism (each sequence split into `sp_size` segments, one per rank of an SP group; the engine holds
the group's SequenceContext and hands it to the model) or a pipeline. Both use the same optimizer
(lm.optim.AdamW, fused on CUDA), the same parameter groups, the same model preparation (compiled blocks,
activation checkpointing) and the same precision modes:

    fp32        fp32 weights, fp32 compute.
    bf16        bf16 weights and activations, fp32 master weights and optimizer state (DeepSpeed's bf16
                mode; TorchEngine keeps the fp32 master copy itself).
    bf16-mixed  fp32 weights and optimizer state, forward under bf16 autocast.

`auto` resolves to `fp32` on the CPU and to `GPU_DEFAULT_PRECISION` on CUDA (the faster of the two bf16
modes on an H200, docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch
import torch.distributed as tdist
from torch import nn

from lm.config import ConfigError, RunConfig
from lm.model import build_model
from lm.optim import AdamW, build_optimizer, param_groups
from lm.parallel.activation_checkpointing import apply_activation_checkpointing
from lm.parallel.compile import maybe_compile, set_tf32
from lm.parallel.sequence import build_sequence_context, segment
from lm.parallel.topology import mesh_coordinates, mesh_shape, replicas

log = logging.getLogger("lm.engine")

PRECISIONS = ("fp32", "bf16", "bf16-mixed")
GPU_DEFAULT_PRECISION = "bf16-mixed"
ALIGN_BYTES = 16  # what inductor's Triton kernels assume of every parameter they were compiled with


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision mode a run uses on this device; clear errors for modes the hardware lacks."""
    if requested == "auto":
        return GPU_DEFAULT_PRECISION if device.type == "cuda" else "fp32"
    if requested not in PRECISIONS:
        raise ConfigError(f"train.precision={requested!r} is not one of auto, {', '.join(PRECISIONS)}")
    if requested != "fp32" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision={requested} needs a GPU with bfloat16 support ({torch.cuda.get_device_name(device)} "
                          "has none): set train.precision=fp32")
    return requested


def check_hardware(cfg: RunConfig, device: torch.device) -> None:
    """Refuse, before anything is built, a recipe that cannot run on this hardware; the message names the key."""
    resolve_precision(cfg.train.precision, device)
    if cfg.model.arch == "longvq" and cfg.model.longvq.attention_impl == "fused" and device.type != "cuda":
        raise ConfigError("model.longvq.attention_impl=fused needs a CUDA GPU (none found): set "
                          "model.longvq.attention_impl=auto (fused on GPU, chunked on CPU) or chunked")
    if cfg.train.compile and cfg.train.compile_backend == "inductor":
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                raise ConfigError("train.compile=true with the inductor backend needs Triton on a GPU machine, which is "
                                  "not installed: `pip install triton`, or set train.compile=false") from None


def prepare_model(cfg: RunConfig) -> nn.Module:
    """The model as every engine trains it: built from the seed, blocks compiled and activation-checkpointed
    as the config says (applied from outside: parameter names unchanged)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    maybe_compile(model, cfg.train.compile, cfg.train.compile_backend)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model.blocks, cfg.parallel.activation_checkpointing_blocks)
    return model


def misaligned_parameters(module: nn.Module, alignment: int = ALIGN_BYTES) -> list[str]:
    """Names of parameters whose data does not start on an `alignment`-byte boundary (DeepSpeed packs
    parameters into flat buffers; compiled kernels assume aligned parameters and fault otherwise)."""
    bad = []
    for name, p in module.named_parameters():
        if p.numel() and p.data_ptr() % alignment:
            bad.append(f"{name} (address % {alignment} = {p.data_ptr() % alignment})")
    return bad


class Engine:
    """What one training step needs of an engine. Subclasses set module, device, precision, optimizer.

    The mesh: `dp_size` data-parallel indices (different sequences), `sp_size` ranks per sequence (sequence
    parallelism: rank `sp_rank` of the group holds segment `sp_rank` of every sequence; `sp` is the group's
    lm.parallel.sequence.SequenceContext, None without SP). The sampler serves whole sequences to each DP
    index; `local_segment` cuts this rank's segment out of them."""

    module: nn.Module  # the trained model (a LanguageModel, or a PipelineModule for pipelines)
    device: torch.device
    precision: str
    optimizer: AdamW  # the real optimizer (inside any wrapper); its param_groups carry the lr
    dp_rank: int = 0
    dp_size: int = 1  # data-parallel indices: sequences of one global batch are split over these
    dp_group = None  # the ranks that hold the same layers (codebook statistics); None = the default (world) group
    sp = None  # SequenceContext of this rank's sequence-parallel group (None: one rank per sequence)
    sp_rank: int = 0
    sp_size: int = 1
    pipelined: bool = False
    quantizers: list  # (layer index, VectorQuantizer) living on this process

    def autocast(self):
        """The context a direct call of `module` (evaluation) runs under: bf16 autocast for bf16-mixed."""
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def apply_optim_config(self, optim) -> None:
        """Betas, eps and weight decay of `optim` (an OptimConfig) into the optimizer, e.g. after a resume loaded
        the saved ones. The groups are lm.optim.param_groups': decayed matrices first, then the rest."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["betas"], group["eps"] = (optim.beta1, optim.beta2), optim.eps
            group["weight_decay"] = optim.weight_decay if i == 0 else 0.0

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def local_segment(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's part of a (B, T) batch of whole sequences (tokens or targets): the contiguous segment
        [sp_rank T / sp_size, (sp_rank + 1) T / sp_size) under sequence parallelism, else the batch itself."""
        return batch if self.sp is None else segment(batch, self.sp_rank, self.sp_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_chunk_tokens: int = 0, loss_impl: str = "auto"):
        """The model on this rank's tokens (x, targets y: its segment under SP), under the precision mode;
        loss_chunk_tokens and loss_impl as in LanguageModel.forward."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def skips_on_device(self) -> bool:
        """Whether `step` takes `skip` as a 0-dim bool tensor on the device: the update is queued before the host
        knows whether it applies (the fused optimizer; not pipelines, whose schedule runs the update itself)."""
        return not self.pipelined and self.optimizer.skips_on_device

    def step(self, lr: float, skip=False):
        """Apply the accumulated gradients at learning rate `lr` (clipped as configured), or drop them with
        every parameter and optimizer state unchanged (skip: a bool, or where `skips_on_device`, a 0-dim bool
        tensor that decides on the device). Returns the global gradient norm (a float or a 0-dim tensor; None
        when skipped on the host or unknown; meaningless when skipped on the device)."""
        raise NotImplementedError


class TorchEngine(Engine):
    """Plain PyTorch on one process: no DeepSpeed, no process group."""

    def __init__(self, cfg: RunConfig, device: Optional[torch.device] = None, model: Optional[nn.Module] = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        check_hardware(cfg, self.device)
        if cfg.parallel.pipeline_stages > 1:
            raise ConfigError("parallel.pipeline_stages > 1 needs the DeepSpeed engine (lm.train / --engine deepspeed)")
        if cfg.parallel.sequence_parallel > 1:
            raise ConfigError(f"parallel.sequence_parallel={cfg.parallel.sequence_parallel} needs the DeepSpeed engine on "
                              f"that many processes (torchrun ... -m lm.train, or --engine deepspeed); the torch "
                              f"engine runs one process: set parallel.sequence_parallel=1")
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.grad_clip = cfg.optim.grad_clip
        set_tf32(cfg.train.tf32)
        model = model if model is not None else prepare_model(cfg)
        if self.precision == "bf16":
            model = model.to(self.device, dtype=torch.bfloat16)
            for _, vq in model.named_quantizers():
                vq.keep_fp32()
            # fp32 master weights: the optimizer updates these, the bf16 model gets a rounded copy
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
            index = {id(p): i for i, p in enumerate(self.params)}
            groups = [{**g, "params": [self.master[index[id(p)]] for p in g["params"]]}
                      for g in param_groups(model, cfg.optim.weight_decay)]
            o = cfg.optim
            self.optimizer = AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        else:
            model = model.to(self.device)
            self.params = self.master = None
            self.optimizer = build_optimizer(model, cfg.optim, fused=True)
        self.module = model
        self.quantizers = model.named_quantizers()

    def forward(self, x, y, loss_chunk_tokens: int = 0, loss_impl: str = "auto"):
        with self.autocast():
            return self.module(x, targets=y, loss_chunk_tokens=loss_chunk_tokens, loss_impl=loss_impl, sp=self.sp)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @torch.no_grad()
    def step(self, lr: float, skip=False):
        trained = self.master if self.master is not None else [p for g in self.optimizer.param_groups for p in g["params"]]
        on_device = isinstance(skip, torch.Tensor)
        if not on_device and skip:
            for p in self.params or trained:
                p.grad = None
            return None
        if self.master is not None:
            for p, m in zip(self.params, self.master):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        norm = None
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_([p for p in trained if p.grad is not None], self.grad_clip)
        self.set_lr(lr)
        with self.optimizer.skipping(skip):  # here False or a device tensor
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            for p, m in zip(self.params, self.master):
                p.copy_(m)
        return norm


class DeepSpeedEngine(Engine):
    """`deepspeed.initialize` over the prepared model (or its pipeline) with the generated DeepSpeed config.
    Needs an initialised process group (lm.parallel.dist.init_distributed)."""

    def __init__(self, cfg: RunConfig, world_size: int, pipelined: bool = False, load_universal: bool = False):
        from lm.parallel.deepspeed_config import build_deepspeed_config
        from lm.parallel.dist import init_distributed

        deepspeed = init_distributed()  # the process group (idempotent): every rank must know its rank below
        if tdist.get_world_size() != world_size:
            raise ConfigError(f"the engine was asked for {world_size} processes but the process group has "
                              f"{tdist.get_world_size()}: launch with as many processes as world_size")
        on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        check_hardware(cfg, self.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        dp, sp, pp = mesh_shape(world_size, cfg)  # ConfigError naming the keys when it does not divide
        self.dp_size, self.sp_size = dp, sp
        self.pipelined = pp > 1 or pipelined
        if self.pipelined and sp > 1:
            raise ConfigError(f"parallel.sequence_parallel={sp} cannot run a pipeline-layout model (a checkpoint saved "
                              f"with parallel.pipeline_stages > 1): set parallel.sequence_parallel=1, or export the "
                              f"checkpoint (`python -m lm.checkpoint export`) and start the SP run from that")
        rank = tdist.get_rank()
        if not self.pipelined:
            self.dp_rank, self.sp_rank, _ = mesh_coordinates(rank, world_size, cfg)
        # every rank builds every SP group, in the same order, before DeepSpeed builds its own groups
        self.sp = build_sequence_context(sp)
        model = prepare_model(cfg)
        self.n_params = model.num_params()
        set_tf32(cfg.train.tf32)
        if self.pipelined:
            from lm.parallel.pipeline import PipelineLoss, build_pipeline, pipeline_quantizers

            self.loss_fn = PipelineLoss()
            net = build_pipeline(model, pp, self.loss_fn)
            self.quantizers = pipeline_quantizers(net)
        else:
            net, self.loss_fn = model, None
            self.quantizers = model.named_quantizers()
        # DeepSpeed's data-parallel world is every replica of the parameters, DP x SP (the SP ranks of a
        # sequence average their segment gradients like data-parallel ranks): its train_batch_size counts
        # segments, the sampler's global batch (micro x accum x DP) whole sequences.
        self.ds_config = build_deepspeed_config(cfg.train, cfg.optim, cfg.parallel, replicas(world_size, cfg), on_gpu,
                                                self.precision)
        if load_universal:
            self.ds_config["checkpoint"] = {"load_universal": True}
        offload = cfg.parallel.offload_optimizer
        self.optimizer = build_optimizer(net, cfg.optim, fused=not offload)
        self.ds, _, _, _ = deepspeed.initialize(model=net, optimizer=self.optimizer, config=self.ds_config)
        for _, vq in self.quantizers:
            vq.keep_fp32()
        self.module = self.ds.module
        self.grad_clip = cfg.optim.grad_clip
        self.accum = cfg.train.grad_accum_steps
        self._micro = 0
        if self.pipelined:
            grid = self.ds.grid
            self.dp_rank, self.dp_group = grid.get_data_parallel_rank(), grid.get_data_parallel_group()
        if cfg.train.compile and on_gpu and cfg.parallel.zero_stage < 3:
            bad = misaligned_parameters(self.module)
            if bad:
                raise ConfigError(
                    f"{len(bad)} parameter(s) are not {ALIGN_BYTES}-byte aligned in DeepSpeed's flat buffer (first: "
                    f"{bad[0]}); compiled kernels would fault on them. Use sizes whose parameters hold a multiple of "
                    f"8 elements, or parallel.zero_stage=1|2 (aligned per parameter), or train.compile=false")

    def forward(self, x, y, loss_chunk_tokens: int = 0, loss_impl: str = "auto"):
        # bf16-mixed: DeepSpeed's own torch_autocast section (its engine switches an outer autocast off)
        return self.ds(x, targets=y, loss_chunk_tokens=loss_chunk_tokens, loss_impl=loss_impl, sp=self.sp)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)
        self._micro += 1
        if self._micro < self.accum:
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-batch

    def step(self, lr: float, skip=False):
        on_device = isinstance(skip, torch.Tensor)
        fallback = None
        if (on_device or not skip) and self.precision == "fp32" and not self.ds.zero_optimization():
            fallback = _grad_norm([p for p in self.module.parameters() if p.grad is not None])  # DeepSpeed keeps none here
        self.set_lr(lr)
        try:
            with self.optimizer.skipping(skip):
                self.ds.step()
        finally:
            self._micro = 0
        if not on_device and skip:
            return None
        norm = self.ds.get_global_grad_norm()
        return fallback if norm is None else norm

    def train_batch(self, batches: list, lr: float):
        """Pipelines: forward/backward over every micro-batch and the update, in DeepSpeed's schedule."""
        self.set_lr(lr)
        self.ds.train_batch(data_iter=iter(batches))
        return self.ds.get_global_grad_norm()


@torch.no_grad()
def _grad_norm(params: list) -> Optional[torch.Tensor]:
    if not params:
        return None
    return torch.stack([p.grad.float().norm() for p in params]).norm()


def build_engine(cfg: RunConfig, kind: str = "deepspeed", *, world_size: Optional[int] = None,
                 device: Optional[torch.device] = None, **kwargs) -> Engine:
    """`deepspeed`: DeepSpeedEngine over the current process group (world_size defaults to $WORLD_SIZE or 1);
    `torch`: TorchEngine on `device` (one process)."""
    if kind == "torch":
        return TorchEngine(cfg, device=device, **kwargs)
    if kind == "deepspeed":
        return DeepSpeedEngine(cfg, world_size or int(os.environ.get("WORLD_SIZE", "1")), **kwargs)
    raise ConfigError(f"engine {kind!r} is not 'deepspeed' or 'torch'")
