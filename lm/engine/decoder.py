"""Autoregressive decoding with a fixed-shape state, one step captured in a CUDA graph and replayed.

    dec = Decoder(model, temperature=0.0, top_k=None, generator=None, autocast_dtype=torch.bfloat16)
    ids = dec.generate(prompt, max_new_tokens)            # (B, T + N): prompt and new tokens
    # or step by step (benchmarks): dec.start(prompt, max_new_tokens); dec.step(); ...; dec.new_tokens

`start` prefills the prompt with the model's parallel forward in pieces of `prefill_chunk` tokens carrying the
state (LongVQ: EMA state and VQ cache; Transformer: KV cache), converts the state to its fixed-shape form
(`LanguageModel.static_state`: LongVQ's current chunk in C fixed slots with a position counter on the device, the
Transformer's cache preallocated for prompt + new tokens with a length mask) and chooses the first new token from
the prompt's last logits. Each `step` then feeds the latest token through `LanguageModel.decode_step` and chooses
the next one, all on the device: the token, the position and the list of new tokens live in device buffers, so a
step reads nothing back to the host and no shape depends on the position.

On CUDA (cuda_graph=True) the first `warmup_steps` steps run eagerly on a side stream (kernel compilation,
autotuning, library workspaces), then one step is captured in a torch.cuda.CUDAGraph and every later step is
a replay of it: one launch per token instead of hundreds. When capture fails, the reason is logged once and
decoding continues eagerly; `cuda_graph` says whether replays are in use. On CPU every step runs eagerly (the
same code).

Token choice: temperature 0 is greedy (argmax). Otherwise sampling by the Gumbel-max rule: argmax of
logits / temperature (restricted to the top_k largest when top_k is given) plus Gumbel noise -log(-log U), which
draws exactly from softmax(logits / temperature) over the kept tokens. The uniform noise U (B, V) is drawn from
`generator` into a fixed buffer before each step, outside the graph, so the graph itself holds no random
number generator state, and graph replays and eager steps draw the same tokens for the same seed.

compile_step=True runs the step through torch.compile (compiled during the warm-up steps, then captured the
same way): its element-wise work is fused, so fewer kernels run per token.

Precision: `autocast_dtype` (e.g. torch.bfloat16) runs prefill and steps under autocast with its weight cache
disabled (cached casts made outside a graph must not be read by it); None runs in the model's dtype.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def check_sampling(temperature: float, top_k: Optional[int]) -> None:
    """ValueError for a negative or non-finite temperature or a top_k < 1."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (None = the whole vocabulary), got {top_k}")


def choose_next(logits: Tensor, temperature: float, top_k: Optional[int], uniform: Optional[Tensor]) -> Tensor:
    """Next token ids (B,) from logits (B, V): argmax when temperature is 0, else the Gumbel-max draw from
    softmax(logits / temperature) over the top_k largest with uniform noise `uniform` (B, V) in [0, 1).
    Fixed shapes, no host synchronisation (runs inside a CUDA graph)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform.float().clamp(min=torch.finfo(torch.float32).tiny)))
    return (z + gumbel).argmax(dim=-1)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V): `choose_next` with noise drawn from `generator`
    (on the logits' device). ValueError for a negative or non-finite temperature or top_k < 1."""
    check_sampling(temperature, top_k)
    uniform = None
    if temperature != 0:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    return choose_next(logits, temperature, top_k, uniform)


class Decoder:
    """Prefill, then one token per step over a fixed-shape state, CUDA-graph replayed on CUDA (module docstring).

    model: a LanguageModel in eval mode. The Decoder holds the buffers of one batch of sequences at a time
    (`start` replaces them)."""

    def __init__(self, model, *, temperature: float = 0.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, autocast_dtype: Optional[torch.dtype] = None,
                 cuda_graph: bool = True, prefill_chunk: int = 8192, warmup_steps: int = 2, compile_step: bool = False):
        check_sampling(temperature, top_k)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if model.training:
            raise ValueError("the model is in training mode: call model.eval() before decoding")
        self.model = model
        self.temperature, self.top_k, self.generator = temperature, top_k, generator
        self.autocast_dtype = autocast_dtype
        self.device = next(model.parameters()).device
        self.want_graph = cuda_graph and self.device.type == "cuda"
        self.prefill_chunk, self.warmup_steps = prefill_chunk, max(1, warmup_steps)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.graph_failed: Optional[str] = None  # why capture failed (decoding then stays eager)
        self.state: Optional[list] = None
        # compile_step: the step through torch.compile (fuses its element-wise work: fewer kernels per token),
        # compiled during the warm-up steps, then captured like the eager step
        self.compile_step = compile_step
        self.step_fn = torch.compile(model.decode_step, dynamic=False) if compile_step else model.decode_step

    @property
    def cuda_graph(self) -> bool:
        """Whether steps are CUDA graph replays (after the warm-up steps)."""
        return self.graph is not None

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    @torch.no_grad()
    def start(self, prompt: Tensor, max_new_tokens: int) -> Tensor:
        """Prefill `prompt` (B, T) int64 and choose the first new token; room for `max_new_tokens` >= 1 new
        tokens in all. Returns the prompt's last-position logits (B, V)."""
        if prompt.dim() != 2 or prompt.shape[1] == 0 or prompt.dtype != torch.long:
            raise ValueError(f"prompt must be a non-empty (B, T) int64 tensor, got {tuple(prompt.shape)} {prompt.dtype}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B, T = prompt.shape
        prompt = prompt.to(self.device)
        self.graph = None
        self.state = None  # drop the previous batch's buffers before allocating new ones
        with self._autocast():
            state, out = None, None
            for s in range(0, T, self.prefill_chunk):
                out = self.model(prompt[:, s:s + self.prefill_chunk], state=state, return_state=True)
                state = out.state
            last = out.logits[:, -1].clone()  # not a view: the prompt's full logits are freed here
            del out
            self.state = self.model.static_state(state, T + max_new_tokens)
        del state
        V = last.shape[-1]
        self.capacity = max_new_tokens
        self.new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=self.device)
        self.token = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self.index = torch.zeros((), dtype=torch.long, device=self.device)
        self.uniform = (torch.empty(B, V, dtype=torch.float32, device=self.device) if self.temperature != 0
                        else None)
        self.count = 0  # new tokens so far (host mirror of `index`)
        self.eager_steps = 0
        self._draw_noise()
        self._emit(last)
        self.count = 1
        return last

    @property
    def new_tokens(self) -> Tensor:
        """(B, n) the tokens chosen so far after the prompt."""
        return self.new[:, : self.count]

    def _draw_noise(self) -> None:
        if self.uniform is not None:
            self.uniform.uniform_(0.0, 1.0, generator=self.generator)

    def _emit(self, logits: Tensor) -> None:
        nxt = choose_next(logits, self.temperature, self.top_k, self.uniform)[:, None]  # (B, 1)
        self.token.copy_(nxt)
        self.new.index_copy_(1, self.index.reshape(1), nxt)
        self.index.add_(1)

    def _advance(self) -> None:
        """One step on the device: the latest token through the model, the next token chosen and recorded."""
        with self._autocast():
            logits = self.step_fn(self.token, self.state)
        self._emit(logits)

    @torch.no_grad()
    def step(self) -> None:
        """Decode one more token (a graph replay once captured)."""
        if self.state is None:
            raise RuntimeError("call start(prompt, max_new_tokens) before step()")
        if self.count >= self.capacity:
            raise RuntimeError(f"all {self.capacity} new tokens given to start() are decoded")
        self._draw_noise()
        if self.want_graph and self.graph is None and self.graph_failed is None and self.eager_steps >= self.warmup_steps:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        elif self.want_graph:  # warm-up (or after a failed capture): eager, on a side stream
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._advance()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.eager_steps += 1
        else:
            self._advance()
            self.eager_steps += 1
        self.count += 1

    def _capture(self) -> None:
        """Record one `_advance` in a CUDA graph (its kernels do not run while recording)."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._advance()
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager decoding
            self.graph_failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", self.graph_failed)
            torch.cuda.synchronize(self.device)
            return
        self.graph = graph

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, timings: Optional[dict] = None) -> Tensor:
        """prompt (B, T) followed by `max_new_tokens` new tokens: (B, T + max_new_tokens). `timings`, if given,
        receives prefill_s and decode_s (synchronised on CUDA), the token counts and whether graphs ran."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        if max_new_tokens == 0:
            ids = prompt.to(self.device)
            t1 = t2 = t0
        else:
            self.start(prompt, max_new_tokens)
            sync()
            t1 = time.perf_counter()
            for _ in range(max_new_tokens - 1):  # the logits after the final token are never needed
                self.step()
            sync()
            t2 = time.perf_counter()
            ids = torch.cat([prompt.to(self.device), self.new_tokens], dim=1)
        if timings is not None:
            timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, prompt_tokens=prompt.shape[1],
                           new_tokens=max_new_tokens, batch=prompt.shape[0], cuda_graph=self.cuda_graph)
        return ids


__all__ = ["Decoder", "choose_next", "sample_next", "check_sampling"]
