"""torch.compile per block: LongVQ traces as one graph shared by all layers (no graph break, no per-layer
recompilation, no device sync inside the block), and `eager_blocks` runs the original forwards."""

import pytest
import torch
from torch._dynamo.utils import counters

from lm.config import ModelConfig
from lm.model import build_model
from lm.parallel.compile import compile_blocks, eager_blocks


def _cfg(arch):
    cfg = ModelConfig(arch=arch, vocab_size=64, d_model=32, n_layers=4, ffn_dim=64)
    cfg.longvq.z_dim, cfg.longvq.hidden_dim, cfg.longvq.n_heads = 16, 32, 2
    cfg.longvq.chunk_size, cfg.longvq.codebook_size, cfg.longvq.ema_dim = 8, 8, 4
    cfg.longvq.attention_impl = "chunked"
    cfg.transformer.n_heads = 2
    return cfg


def test_longvq_block_compiles_to_one_graph_for_all_layers():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model(_cfg("longvq")).train()
    x = torch.randint(0, 64, (2, 24))
    ref = model(x).logits.detach()
    compile_blocks(model.blocks, backend="eager")
    for _ in range(2):
        out = model(x)
        (out.logits.float().mean() + out.aux_loss).backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # stats accumulated in the compiled forward still reach the quantizers
    assert all(float(vq.stat_count.sum()) > 0 for vq in model.quantizers())
    torch.testing.assert_close(model(x).logits.detach(), ref)


def test_transformer_block_compiles_without_graph_breaks():
    """The backend log line of lm.ops.sdpa is skipped while Dynamo traces (logging is a graph break)."""
    torch._dynamo.reset()
    counters.clear()
    model = build_model(_cfg("transformer"))
    compile_blocks(model.blocks, backend="eager")
    x = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        model(x).logits.float().mean().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert all(b.mixer.attention.last_backend == "flash" for b in model.blocks)  # still recorded, per module


def test_compiling_and_checkpointing_keep_parameter_names_and_eager_blocks_does_not_recompile():
    """compile_blocks (module.compile) and activation checkpointing (torch's composable checkpoint) leave the
    module tree and the state-dict keys as they were; inside eager_blocks the compiled blocks run their
    Python forward (no tracing, no recompilation for new shapes) and the checkpointing stays in effect."""
    from lm.parallel.activation_checkpointing import apply_activation_checkpointing, is_checkpointed

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model(_cfg("longvq")).train()
    names = list(model.state_dict())
    x = torch.randint(0, 64, (2, 24))
    model(x)  # the implementation choices are logged once, before compiling
    compile_blocks(model.blocks, backend="eager")
    apply_activation_checkpointing(model.blocks)
    assert list(model.state_dict()) == names and [n for n, _ in model.named_parameters()] == [
        n for n, _ in build_model(_cfg("longvq")).named_parameters()]
    assert all(is_checkpointed(b) for b in model.blocks)
    compiling = []
    for b in model.blocks:
        b.ffn.register_forward_hook(lambda *_: compiling.append(torch.compiler.is_compiling()))
    model(x).logits.float().sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and any(compiling)
    compiling.clear()
    with eager_blocks(model):
        model(torch.randint(0, 64, (3, 16))).logits.float().sum().backward()  # another shape
    assert compiling and not any(compiling)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing was compiled for the evaluation shape
    plain = build_model(_cfg("transformer"))
    with eager_blocks(plain):  # never compiled: runs as always
        plain(torch.randint(0, 64, (2, 16)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fused kernel + inductor codegen)")
def test_compiled_longvq_matches_eager_on_gpu():
    """Inductor-compiled blocks around the fused kernel (an opaque call) give eager's logits and gradients."""
    cfg = _cfg("longvq")
    cfg.d_model, cfg.ffn_dim = 128, 256
    cfg.longvq.z_dim, cfg.longvq.hidden_dim, cfg.longvq.n_heads = 128, 256, 2  # head dims 64 / 128
    cfg.longvq.chunk_size, cfg.longvq.codebook_size, cfg.longvq.attention_impl = 64, 64, "fused"
    torch.manual_seed(0)
    eager = build_model(cfg).cuda().train()
    compiled = build_model(cfg).cuda().train()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled.blocks)
    x = torch.randint(0, 64, (2, 200), device="cuda")
    grads, logits = [], []
    for model in (eager, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        (out.logits.float().pow(2).mean() + out.aux_loss).backward()
        logits.append(out.logits.float())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(logits[1], logits[0], rtol=2e-2, atol=2e-2)  # bf16: different fusion/rounding
    assert (grads[1] - grads[0]).norm() <= 3e-2 * grads[0].norm()
