"""Sequence parallelism on CPU processes (gloo, float64): N ranks, each holding one contiguous segment of every
sequence, give the loss, the gradients, the optimizer trajectory and the codebooks of one process on the
whole sequences; a wrong exchange does not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lm.config import ConfigError, LongVQConfig, ModelConfig, TransformerConfig, load_config
from lm.parallel.sequence import SequenceContext, exchange_bytes, segment
from lm.parallel.topology import mesh_coordinates, mesh_shape, sequence_parallel_groups
from tests.dist_harness import run_dist

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-10
STEPS = 5
QUICKSTART = ROOT / "launch/configs/quickstart.yaml"


def quickstart_model() -> tuple[ModelConfig, int]:
    """The quickstart recipe's model section and sequence length (256 tokens, chunks of 64)."""
    cfg = load_config(QUICKSTART, overrides=["model.longvq.attention_impl=chunked"])
    return cfg.model, cfg.data.seq_len


def three_layer_model() -> tuple[ModelConfig, int]:
    """3 layers, chunks of 4 tokens, 48-token sequences: 6 chunks per segment at SP=2, 3 at SP=4."""
    lv = LongVQConfig(attention_impl="chunked", chunk_size=4, codebook_size=8, n_heads=2, z_dim=16, ema_dim=4,
                      residual="add", dead_code_threshold=0.5)
    return ModelConfig(arch="longvq", vocab_size=32, d_model=32, n_layers=3, longvq=lv), 48


def three_layer_scan_model() -> tuple[ModelConfig, int]:
    """The 3-layer model with the EMA as the chunked scan (the GPU path; its PyTorch twin on CPU)."""
    model_cfg, seq_len = three_layer_model()
    model_cfg.longvq.ema_impl = "scan"
    return model_cfg, seq_len


def transformer_model() -> tuple[ModelConfig, int]:
    tc = TransformerConfig(n_heads=4, attn_backend="math")
    return ModelConfig(arch="transformer", vocab_size=32, d_model=32, n_layers=2, transformer=tc), 16


MODELS = {"quickstart": quickstart_model, "three_layer": three_layer_model, "three_layer_scan": three_layer_scan_model,
          "transformer": transformer_model}


def batches(model_cfg: ModelConfig, seq_len: int, steps: int) -> list[torch.Tensor]:
    """Random token batches: one sequence for the quickstart-sized model (time), two for the small ones."""
    batch = 1 if model_cfg.d_model >= 128 else 2
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, model_cfg.vocab_size, (batch, seq_len + 1), generator=g) for _ in range(steps)]


def build(model_cfg: ModelConfig, checkpointing: bool = False):
    from lm.model import build_model
    from lm.parallel.activation_checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    model = build_model(model_cfg).double()
    if checkpointing:
        apply_activation_checkpointing(model.blocks)
    return model


def train(model_cfg: ModelConfig, seq_len: int, steps: int, ctx=None, checkpointing: bool = False) -> dict:
    """`steps` AdamW steps as the trainer takes them: forward/backward on this rank's tokens, gradients
    averaged over the replicas (DeepSpeed's data-parallel average over DP x SP), codebook statistics summed
    over them, then the codebook update and the optimizer step. Returns what each step saw."""
    from lm.parallel.dist import all_reduce_codebook_stats

    model = build(model_cfg, checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    out = {"losses": [], "grads": None}
    for tokens in batches(model_cfg, seq_len, steps):
        x, y = tokens[:, :-1], tokens[:, 1:]
        if ctx is not None:
            x, y = segment(x, ctx.rank, ctx.size), segment(y, ctx.rank, ctx.size)
        result = model(x, targets=y, sp=ctx)
        (result.loss + result.aux_loss).backward()
        loss = result.loss.detach().clone()
        if ctx is not None:
            torch.distributed.all_reduce(loss, group=ctx.group)
            loss /= ctx.size
            for p in model.parameters():
                torch.distributed.all_reduce(p.grad, group=ctx.group)
                p.grad /= ctx.size
            all_reduce_codebook_stats(model.quantizers(), ctx.group)
        out["losses"].append(float(loss))
        if out["grads"] is None:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.apply_codebook_updates()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["codebooks"] = [(vq.c_sum.clone(), vq.c_count.clone()) for vq in model.quantizers()]
    return out


def _sp_worker(model: str, steps: int, variant=None, checkpointing: bool = False) -> dict:
    from lm.parallel.dist import init_distributed
    from lm.parallel.sequence import build_sequence_context

    init_distributed()
    ctx = build_sequence_context(torch.distributed.get_world_size())
    if variant is not None:
        ctx = variant(group=ctx.group, rank=ctx.rank, size=ctx.size, ranks=ctx.ranks)
    model_cfg, seq_len = MODELS[model]()
    return train(model_cfg, seq_len, steps, ctx, checkpointing)


_references: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The machine is shared: one thread keeps these small float64 ops fast under contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference(model: str, steps: int) -> dict:
    if (model, steps) not in _references:
        _references[model, steps] = train(*MODELS[model](), steps)
    return _references[model, steps]


def run_sp(model: str, world: int, steps: int, **kwargs) -> list[dict]:
    t = time.perf_counter()
    results = run_dist(_sp_worker, world_size=world, model=model, steps=steps, **kwargs)
    print(f"{model} SP={world}: {time.perf_counter() - t:.1f}s")
    return results


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    return max((float((a[k] - b[k]).abs().max()), k) for k in b)


def assert_matches(result: dict, ref: dict, steps: int) -> None:
    assert len(result["losses"]) == steps
    torch.testing.assert_close(result["losses"], ref["losses"], atol=TOL, rtol=0)
    diff, name = max_diff(result["grads"], ref["grads"])
    assert diff <= TOL, f"gradient of {name} differs by {diff:.3g}"
    diff, name = max_diff(result["params"], ref["params"])
    assert diff <= TOL, f"parameter {name} differs by {diff:.3g} after {steps} steps"
    for (s, c), (rs, rc) in zip(result["codebooks"], ref["codebooks"]):
        torch.testing.assert_close(s, rs, atol=TOL, rtol=0)
        torch.testing.assert_close(c, rc, atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, world", [("quickstart", 2), ("quickstart", 4), ("three_layer", 2), ("three_layer", 4),
                                          ("three_layer_scan", 2)])
def test_longvq_sequence_parallel_equals_one_process(model, world):
    """Same loss and gradient of every parameter at step 1, same losses, parameters and codebooks after
    5 AdamW steps (within 1e-10); codebooks bit-identical on every rank."""
    results = run_sp(model, world, STEPS)
    ref = reference(model, STEPS)
    for r in results:
        assert_matches(r, ref, STEPS)
        for (s, c), (s0, c0) in zip(r["codebooks"], results[0]["codebooks"]):
            assert torch.equal(s, s0) and torch.equal(c, c0)
    initial = [vq.c_sum for vq in build(MODELS[model]()[0]).quantizers()]
    assert all(not torch.equal(s, s0) for (s, _), s0 in zip(ref["codebooks"], initial)), "a codebook never moved"


def test_activation_checkpointing_with_sequence_parallel():
    """Recomputation in backward runs the forward exchanges again, on every rank in the same order."""
    (r, _) = run_sp("three_layer", 2, 2, checkpointing=True)
    assert_matches(r, reference("three_layer", 2), 2)


def test_transformer_ulysses_equals_one_process():
    """DeepSpeed-Ulysses (heads all-to-all) with RoPE at the segments' global positions."""
    results = run_sp("transformer", 2, 2)
    for r in results:
        assert_matches(r, reference("transformer", 2), 2)


# --------------------------------------------------------------------------------------------
# A wrong exchange fails
# --------------------------------------------------------------------------------------------


class DetachedPreviousChunk(SequenceContext):
    """The previous chunk arrives, but its gradients never go back: the forward is exact, training is not."""

    def previous_chunk(self, k_last, v_last, codes_last):
        return tuple(t.detach() for t in super().previous_chunk(k_last, v_last, codes_last))


class NoCachePrefix(SequenceContext):
    """The code cache of the earlier segments is lost (the exchange still runs, its result is dropped)."""

    def cache_prefix(self, packed):
        return super().cache_prefix(packed) * 0


class NoEmaState(SequenceContext):
    """Each segment's EMA starts from zero."""

    def ema_initial_state(self, local_final, decay):
        return super().ema_initial_state(local_final, decay) * 0


class CountingExchanges(SequenceContext):
    """Records the bytes each exchange hands this rank in the forward (the backward returns one gradient of
    the same size for every floating-point message)."""

    received: list = []

    def _count(self, tensors):
        type(self).received.append(sum(t.numel() * t.element_size() * (2 if t.is_floating_point() else 1)
                                       for t in tensors))
        return tensors

    def ema_initial_state(self, local_final, decay):
        return self._count([super().ema_initial_state(local_final, decay)])[0]

    def previous_chunk(self, k_last, v_last, codes_last):
        return tuple(self._count(list(super().previous_chunk(k_last, v_last, codes_last))))

    def cache_prefix(self, packed):
        return self._count([super().cache_prefix(packed)])[0]


def _counting_worker() -> list:
    _sp_worker("three_layer", 1, variant=CountingExchanges)
    return CountingExchanges.received


def test_exchange_bytes_count_what_the_exchanges_carry():
    model_cfg, seq_len = three_layer_model()
    received = run_dist(_counting_worker, world_size=4)[1]  # rank 1: a middle rank, messages both ways
    assert len(received) == 3 * model_cfg.n_layers  # EMA, previous chunk, cache per layer
    expected = exchange_bytes(model_cfg, 2, 4, seq_len, torch.float64)["per_layer"]
    assert sum(received) == model_cfg.n_layers * expected


@pytest.mark.parametrize("variant", [DetachedPreviousChunk, NoCachePrefix, NoEmaState])
def test_a_wrong_exchange_fails_the_comparison(variant):
    (r, _) = run_sp("three_layer", 2, 1, variant=variant)
    ref = reference("three_layer", 1)
    with pytest.raises(AssertionError):
        assert_matches(r, ref, 1)
    grad_diff, _ = max_diff(r["grads"], ref["grads"])
    assert grad_diff > 1e-6, "the wrong exchange left the gradients intact"
    if variant is not DetachedPreviousChunk:  # a detached chunk changes gradients only
        assert abs(r["losses"][0] - ref["losses"][0]) > 1e-6


# --------------------------------------------------------------------------------------------
# Against the carried-state evaluation (what `evals.perplexity --mode carry` computes)
# --------------------------------------------------------------------------------------------


def long_case() -> tuple[ModelConfig, torch.Tensor]:
    model_cfg, _ = three_layer_model()
    tokens = torch.randint(0, model_cfg.vocab_size, (1, 385), generator=torch.Generator().manual_seed(3))
    return model_cfg, tokens  # 384 scored tokens: 96 chunks, 24 per rank at SP=4


def _nll_worker() -> float:
    from lm.parallel.dist import init_distributed
    from lm.parallel.sequence import build_sequence_context

    init_distributed()
    ctx = build_sequence_context(torch.distributed.get_world_size())
    model_cfg, tokens = long_case()
    model = build(model_cfg).eval()
    x, y = segment(tokens[:, :-1], ctx.rank, ctx.size), segment(tokens[:, 1:], ctx.rank, ctx.size)
    with torch.no_grad():
        nll = model(x, targets=y, sp=ctx).loss * y.numel()
    torch.distributed.all_reduce(nll, group=ctx.group)
    return float(nll)


def test_long_sequence_nll_equals_carried_state_evaluation():
    model_cfg, tokens = long_case()
    model = build(model_cfg).eval()
    carried, state, segment_len = 0.0, None, 50  # segments that are not chunk-aligned: a second mechanism
    with torch.no_grad():
        for s in range(0, tokens.shape[1] - 1, segment_len):
            e = min(s + segment_len, tokens.shape[1] - 1)
            out = model(tokens[:, s:e], state=state, return_state=True)
            state = out.state
            carried += float(F.cross_entropy(out.logits[0], tokens[0, s + 1:e + 1], reduction="sum"))
    nll = run_dist(_nll_worker, world_size=4)
    assert all(n == nll[0] for n in nll)
    n_tokens = tokens.shape[1] - 1
    assert abs(nll[0] - carried) / n_tokens <= TOL, (nll[0], carried)


# --------------------------------------------------------------------------------------------
# Configuration, mesh, traffic (no processes)
# --------------------------------------------------------------------------------------------


def _load(*overrides):
    return load_config(QUICKSTART, overrides=list(overrides))


@pytest.mark.parametrize("overrides, keys", [
    (["parallel.sequence_parallel=3"], ["data.seq_len", "parallel.sequence_parallel", "model.longvq.chunk_size"]),
    (["parallel.sequence_parallel=2", "data.seq_len=192"], ["data.seq_len", "model.longvq.chunk_size"]),
    (["parallel.sequence_parallel=8"], ["parallel.sequence_parallel", "chunks", "model.longvq.chunk_size"]),
    (["parallel.sequence_parallel=2", "parallel.pipeline_stages=2", "parallel.zero_stage=1"],
     ["parallel.sequence_parallel", "parallel.pipeline_stages"]),
    (["parallel.sequence_parallel=2", "model.longvq.attention_impl=dense"], ["model.longvq.attention_impl"]),
    (["parallel.sequence_parallel=0"], ["parallel.sequence_parallel"]),
    (["parallel.sequence_parallel=4", "model.arch=transformer", "model.transformer.n_heads=2", "model.d_model=128"],
     ["model.transformer.n_heads", "parallel.sequence_parallel"]),
])
def test_bad_sequence_parallel_configs_name_their_keys(overrides, keys):
    with pytest.raises(ConfigError) as err:
        _load(*overrides)
    for key in keys:
        assert key in str(err.value)


def test_mesh_and_segments():
    cfg = _load("parallel.sequence_parallel=2")
    assert mesh_shape(8, cfg) == (4, 2, 1)
    assert [mesh_coordinates(r, 8, cfg) for r in (0, 1, 2, 7)] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (3, 1, 0)]
    assert sequence_parallel_groups(6, 2) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ConfigError, match="parallel.sequence_parallel=2 x parallel.pipeline_stages=1"):
        mesh_shape(7, cfg)
    pipe = _load("parallel.pipeline_stages=2", "parallel.zero_stage=1")
    assert mesh_shape(8, pipe) == (4, 1, 2) and mesh_coordinates(5, 8, pipe) == (1, 0, 1)
    x = torch.arange(24).view(2, 12)
    assert torch.equal(torch.cat([segment(x, r, 3) for r in range(3)], dim=1), x)


def test_exchanged_bytes_do_not_grow_with_the_context():
    cfg = load_config(ROOT / "launch/configs/longvq_125m_sp.yaml")
    per_layer = [exchange_bytes(cfg.model, 1, sp, ctx)["per_layer"] for sp in (2, 8) for ctx in (2**18, 2**20)]
    assert len(set(per_layer)) == 1 and 0 < per_layer[0] < 64 * 2**20
    tf = ModelConfig(arch="transformer", d_model=768, n_layers=12, transformer=TransformerConfig(n_heads=12))
    assert exchange_bytes(tf, 1, 2, 2**19)["per_layer"] == 2 * exchange_bytes(tf, 1, 2, 2**18)["per_layer"]


def test_the_1m_context_recipe_passes_the_dry_run(capsys):
    from lm.train import main

    assert main([str(ROOT / "launch/configs/longvq_125m_sp.yaml"), "--dry-run", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "world 8 = DP 1 x SP 8 x PP 1" in out and "sequences of 1048576 tokens" in out
    assert "segments of 131072 tokens" in out and "sequence parallel exchange" in out
    assert main([str(ROOT / "launch/configs/longvq_125m_sp.yaml"), "--dry-run", "--world-size", "12"]) == 2
