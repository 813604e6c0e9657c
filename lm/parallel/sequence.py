"""Sequence (context) parallelism: every training sequence split into N contiguous, chunk-aligned segments,
one per rank of a sequence-parallel (SP) group.

    ctx = build_sequence_context(sp)                     # every rank, once, after init_process_group
    x, y = segment(x, ctx.rank, ctx.size), segment(y, ctx.rank, ctx.size)
    out = model(x, targets=y, sp=ctx)                     # out.loss: mean NLL over this rank's segment

The model never imports torch.distributed: it receives the context object (None on one process) and calls
its exchanges. What a LongVQ layer on rank s needs from the tokens before its segment, and how it arrives:

    EMA state        (B, D, N) fp32             h_0(s) = sum_{j<s} q^(T (s-1-j)) h_T(j): the earlier segments'
                                                final states from zero, in closed form (decay q^T per segment)
    previous chunk   (B, H, C) keys, values,    rank s-1's last chunk, point-to-point to rank s
                     codes
    code cache       (B, H, S) counts,          exclusive prefix sum over the earlier ranks; each rank
                     (B, H, S, Dv) value sums   contributes the chunk it received plus its own chunks but the
                                                last (the last is the next rank's previous chunk, which enters
                                                the cache one chunk later)

Both sums are exclusive scans along a chain of point-to-point messages (rank s receives the sum of the
ranks before it, adds its own part and passes it on), so each rank sends and receives one state-sized
message per scan, whatever the group size. With that state the local attention (lm.ops.vq_attention)
computes exactly what one pass over the whole sequence computes for these queries. Backward runs the
adjoint of each exchange: the scans in reverse (rank s+1 sends rank s the gradient of everything rank s
passed on), the previous chunk's gradients from rank s back to rank s-1. Nothing is detached that one
process does not detach: the previous chunk's keys get their exact-key gradient, its values the
local-window and cache-mean gradients, the cached value sums theirs; code counts carry none (as in one
process). The bytes exchanged per layer depend neither on the sequence length nor on the group size
(`exchange_bytes`).

Invariants the exchanges keep (a collective that one rank skips hangs the others):
  * every rank calls every exchange of every layer in the same order, whatever its position;
  * every exchange's output reaches the loss on every rank (rank 0 receives zeros and uses them with zero
    weight), so autograd runs every backward collective on every rank too.

Loss: with equal segments, the mean of the ranks' segment means is the sequence mean, so each rank
backpropagates its own `out.loss` and the data-parallel gradient average over DP x SP replicas (DeepSpeed's,
with the SP ranks inside its data-parallel group) gives exactly the one-process gradient.

Transformer baseline: DeepSpeed-Ulysses (`head_parallel_attention`): all-to-all from sequence-sharded to
head-sharded q, k, v, full causal attention over H / N heads, all-to-all back; RoPE uses the segment's
global positions (`position_offset`). Its traffic grows with the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lm.ops import vq_attention
from lm.ops.vq_attention import resolve_impl
from lm.ops.vq_attention_ref import VQAttentionState, code_statistics


# --------------------------------------------------------------------------------------------
# Differentiable exchanges
# --------------------------------------------------------------------------------------------


def _exchange(sends: list[Tensor], recvs: list[Tensor], to_rank: Optional[int], from_rank: Optional[int], group) -> None:
    ops = []
    if to_rank is not None:
        ops += [dist.P2POp(dist.isend, t.contiguous(), to_rank, group) for t in sends]
    if from_rank is not None:
        ops += [dist.P2POp(dist.irecv, t, from_rank, group) for t in recvs]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _ChainScan(torch.autograd.Function):
    """Exclusive scan along the group by a chain of point-to-point messages:
        out(0) = 0,   out(s + 1) = decay * out(s) + x(s)
    so out(s) = sum_{j<s} decay^(s-1-j) x(j) (no decay: the exclusive prefix sum). Rank s receives out(s)
    from rank s-1 and sends decay * out(s) + x(s) to rank s+1: one message of x's size in and one out per
    rank, whatever the group size. Backward runs the chain in reverse with G(s) = g(s) + decay * G(s+1)
    (G: the whole gradient of out(s)): grad x(s) = G(s+1), grad decay(s) = sum over the batch of
    G(s+1) * out(s), and rank s sends G(s) to rank s-1. decay (broadcast over x's first dimension) is the
    same on every rank (replicated parameters); each rank returns its own part of its gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, decay: Optional[Tensor], ranks: tuple, rank: int, group):
        nxt = ranks[rank + 1] if rank + 1 < len(ranks) else None
        prv = ranks[rank - 1] if rank > 0 else None
        incoming = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        _exchange([], [incoming], None, prv, group)
        if nxt is not None:
            outgoing = (incoming * decay if decay is not None else incoming) + x
            _exchange([outgoing], [], nxt, None, group)
        ctx.nxt, ctx.prv, ctx.group = nxt, prv, group
        ctx.save_for_backward(decay, incoming)
        return incoming

    @staticmethod
    def backward(ctx, g: Tensor):
        decay, incoming = ctx.saved_tensors
        later = torch.zeros(g.shape, dtype=g.dtype, device=g.device)  # G(s+1): zero on the last rank
        _exchange([], [later], None, ctx.nxt, ctx.group)
        if ctx.prv is not None:
            _exchange([g + (later * decay if decay is not None else later)], [], ctx.prv, None, ctx.group)
        decay_grad = (later * incoming).sum(0) if decay is not None and ctx.needs_input_grad[1] else None
        return later, decay_grad, None, None, None


class _SendToNext(torch.autograd.Function):
    """Rank s sends its tensors to rank s+1 and receives rank s-1's (zeros on rank 0). Integer tensors
    (codes) travel along without gradient. Backward: the gradients go from rank s+1 back to rank s."""

    @staticmethod
    def forward(ctx, ranks: tuple, rank: int, group, *tensors: Tensor):
        nxt = ranks[rank + 1] if rank + 1 < len(ranks) else None
        prv = ranks[rank - 1] if rank > 0 else None
        received = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        _exchange(list(tensors), received, nxt, prv, group)
        ctx.nxt, ctx.prv, ctx.group = nxt, prv, group
        ctx.float_mask = [t.is_floating_point() for t in tensors]
        ctx.mark_non_differentiable(*[r for r in received if not r.is_floating_point()])
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        floats = [g for g, f in zip(grads, ctx.float_mask) if f]
        back = [torch.zeros(g.shape, dtype=g.dtype, device=g.device) for g in floats]
        _exchange(floats, back, ctx.prv, ctx.nxt, ctx.group)  # reverse direction: to s-1, from s+1
        it = iter(back)
        return (None, None, None) + tuple(next(it) if f else None for f in ctx.float_mask)


# --------------------------------------------------------------------------------------------
# The context handed to the model
# --------------------------------------------------------------------------------------------


class _UlyssesLocal(nn.Module):
    """DeepSpeed-Ulysses' local attention: (B, T, H/N, hd) head-sharded q, k, v -> the same layout."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attend) -> Tensor:
        return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@dataclass(eq=False)
class SequenceContext:
    """This rank's place in its sequence-parallel group; passed to `LanguageModel.forward(..., sp=ctx)`.

    group: the SP process group; rank: this rank's segment index (0 = the sequence's first segment);
    size: segments per sequence; ranks: global ranks of the group in segment order."""

    group: object
    rank: int
    size: int
    ranks: tuple
    _ulysses: Optional[nn.Module] = field(default=None, repr=False)

    def position_offset(self, local_len: int) -> int:
        """Global position of this segment's first token (segments are equal)."""
        return self.rank * local_len

    # -- exchanges (public so that a test can replace one with a wrong one and see it fail) --------

    @torch.compiler.disable
    def ema_initial_state(self, local_final: Tensor, decay: Tensor) -> Tensor:
        """The true EMA state at this segment's start, (B, D, N): the earlier segments' final states from
        zero (local_final on each rank), combined with decay = q^T (D, N) per segment of T tokens."""
        return _ChainScan.apply(local_final, decay, self.ranks, self.rank, self.group)

    @torch.compiler.disable
    def previous_chunk(self, k_last: Tensor, v_last: Tensor, codes_last: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Send this segment's last chunk (B, H, C, .) to the next rank; return the previous rank's (zeros
        on rank 0)."""
        return _SendToNext.apply(self.ranks, self.rank, self.group, k_last, v_last, codes_last)

    @torch.compiler.disable
    def cache_prefix(self, packed: Tensor) -> Tensor:
        """Exclusive prefix sum over the group of each rank's cache contribution (B, H, S, 1 + Dv):
        counts in [..., 0], value sums in [..., 1:]."""
        return _ChainScan.apply(packed, None, self.ranks, self.rank, self.group)

    # -- what the mixers call ---------------------------------------------------------------------

    def vq_attention(self, q: Tensor, k: Tensor, v: Tensor, codes: Tensor, codebook: Tensor, *, chunk_size: int,
                     bias: Optional[Tensor] = None, scale: Optional[float] = None, impl: str = "auto",
                     return_state: bool = False):
        """lm.ops.vq_attention for this segment, with the state of the tokens before it taken from the
        earlier ranks (differentiably). Shapes as lm.ops.vq_attention; T must be a multiple of chunk_size."""
        B, T, H, _ = q.shape
        C, S = chunk_size, codebook.shape[1]
        if T % C:
            raise ValueError(f"sequence parallelism needs segments of whole chunks: segment length {T} is not "
                             f"a multiple of chunk_size {C}")
        last = slice(T - C, T)
        kt, vt, zt = (t[:, last].transpose(1, 2) for t in (k, v, codes))  # (B, H, C, .)
        prev_k, prev_v, prev_codes = self.previous_chunk(kt, vt, zt)
        # This rank's contribution to the later ranks' caches: the chunk it received (rank 0 received none:
        # zero weight, which still carries the exchange's gradient path) and its own chunks but the last.
        valid = 1.0 if self.rank > 0 else 0.0
        c_prev, s_prev = code_statistics(prev_codes.transpose(1, 2), prev_v.transpose(1, 2), S)
        c_own, s_own = code_statistics(codes[:, : T - C], v[:, : T - C], S)
        packed = torch.cat([(c_prev * valid + c_own)[..., None], s_prev * valid + s_own], dim=-1)
        prefix = self.cache_prefix(packed)
        has_prev = self.rank > 0
        state = VQAttentionState(
            pos=self.rank * T, cur_k=k.new_zeros(B, H, 0, k.shape[-1]), cur_v=v.new_zeros(B, H, 0, v.shape[-1]),
            cur_codes=codes.new_zeros(B, H, 0), prev_k=prev_k if has_prev else None,
            prev_v=prev_v if has_prev else None, prev_codes=prev_codes if has_prev else None,
            cache_count=prefix[..., 0].detach(), cache_sum=prefix[..., 1:])
        impl = self.attention_impl(impl, q, v, C, state)
        return vq_attention(q, k, v, codes, codebook, chunk_size=C, bias=bias, scale=scale, state=state,
                            return_state=return_state, impl=impl)

    @staticmethod
    def attention_impl(impl: str, q: Tensor, v: Tensor, chunk_size: int, state: VQAttentionState) -> str:
        """The implementation that runs this segment: chunked or fused (both take an incoming state that
        carries autograd and return its gradients); the dense oracle keeps the whole history, not a state."""
        if impl == "dense":
            raise ValueError("model.longvq.attention_impl=dense cannot run with parallel.sequence_parallel > 1 "
                             "(it keeps the whole history); use chunked, fused or auto")
        return resolve_impl(impl, q, v, chunk_size, state)

    @torch.compiler.disable
    def head_parallel_attention(self, q: Tensor, k: Tensor, v: Tensor, attend) -> Tensor:
        """DeepSpeed-Ulysses: q, k, v (B, H, T_local, hd) of this segment -> attention output, same layout.
        attend(q, k, v) is the causal attention on (B, H/N, T, hd) over the whole sequence."""
        H = q.shape[1]
        if H % self.size:
            raise ValueError(f"model.transformer.n_heads={H} must be divisible by parallel.sequence_parallel="
                             f"{self.size} (Ulysses gives each rank H / N whole heads)")
        if self._ulysses is None:
            from deepspeed.sequence.layer import DistributedAttention

            self._ulysses = DistributedAttention(_UlyssesLocal(), self.group, scatter_idx=2, gather_idx=1)
        out = self._ulysses(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, attend)
        return out.transpose(1, 2)


def segment(batch: Tensor, rank: int, size: int) -> Tensor:
    """This SP rank's contiguous segment (B, T / size) of a (B, T) batch of tokens or targets."""
    B, T = batch.shape[:2]
    if T % size:
        raise ValueError(f"sequence length {T} is not divisible by parallel.sequence_parallel={size}")
    L = T // size
    return batch[:, rank * L:(rank + 1) * L]


def build_sequence_context(sequence_parallel: int) -> Optional[SequenceContext]:
    """Create every SP group of the world (consecutive ranks; all ranks must call this, in the same order)
    and return this rank's context; None when sequence_parallel == 1."""
    from lm.parallel.topology import sequence_parallel_groups

    if sequence_parallel == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for ranks in sequence_parallel_groups(world, sequence_parallel):
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = SequenceContext(group=group, rank=ranks.index(rank), size=len(ranks), ranks=tuple(ranks))
    # One collective over the whole group first: NCCL builds the group's communicator in a call that every
    # member joins, before the point-to-point messages (where each rank talks to its neighbours only).
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    dist.all_reduce(torch.zeros(1, device=device), group=mine.group)
    return mine


# --------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------


def exchange_bytes(model_cfg, micro_batch: int, sequence_parallel: int, seq_len: int,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes one rank receives per layer per micro-batch, forward + backward, under sequence parallelism
    (a middle rank; the first and last receive less), with activations in `dtype`.
    Returns {"per_layer": total, "parts": {name: bytes}}.

    LongVQ: the EMA state and the code cache (counts and value sums) arrive once forward in the state
    precision (float32 at least) and their gradients once backward; the previous chunk's keys and values
    (activation dtype) and codes (int64) forward, the keys' and values' gradients backward. Nothing depends
    on seq_len or on the group size. Transformer (Ulysses): four all-to-alls forward (q, k, v, out) and four
    backward, each bringing (N - 1) / N of the local (B, T / N, D) activations: grows with seq_len."""
    N, B = sequence_parallel, micro_batch
    if N == 1:
        return {"per_layer": 0, "parts": {}}
    act = dtype.itemsize
    state = torch.promote_types(dtype, torch.float32).itemsize
    m = model_cfg
    if m.arch == "transformer":
        a2a = B * (seq_len // N) * m.d_model * act * (N - 1) // N
        parts = {"ulysses_all_to_all": 8 * a2a}
    else:
        lv = m.longvq
        H, C, S = lv.n_heads, lv.chunk_size, lv.codebook_size
        _, dk, dv = m.head_dims()
        parts = {"ema_state": 2 * B * m.d_model * lv.ema_dim * state,
                 "code_cache": 2 * B * H * S * (1 + dv) * state,
                 "previous_chunk": B * H * C * ((dk + dv) * act + 8) + B * H * C * (dk + dv) * act}
    return {"per_layer": sum(parts.values()), "parts": parts}
