"""evals.generate: stateful decoding equals the parallel forward, LongVQ's state stays constant-size,
greedy decoding is deterministic, and the CLI samples from a checkpoint on disk."""

import pytest
import torch
import torch.nn.functional as F

from evals import generate as gen
from lm.config import LongVQConfig, ModelConfig, RunConfig, TrainConfig, dump_config
from lm.model import build_model
from tests.tolerances import assert_close


def tiny(arch: str, vocab: int = 32) -> ModelConfig:
    lv = LongVQConfig(attention_impl="chunked", chunk_size=4, codebook_size=8, n_heads=2, z_dim=16, ema_dim=4)
    cfg = ModelConfig(arch=arch, vocab_size=vocab, d_model=32, n_layers=2, longvq=lv)
    cfg.transformer.n_heads = 2
    return cfg


def _model(arch: str, vocab: int = 32):
    torch.manual_seed(0)
    return build_model(tiny(arch, vocab)).double().eval()


@pytest.mark.parametrize("arch", ["longvq", "transformer"])
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_stateful_decode_matches_parallel_forward(arch, prompt_len):
    """Prefill `prompt_len` tokens in parallel, then feed the rest one by one with the state (3+ chunks)."""
    model = _model(arch)
    tokens = torch.randint(0, 32, (2, 15))  # chunk_size 4: decoding crosses 3 chunk boundaries
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens[:, :prompt_len], return_state=True)
        logits, state = [out.logits], out.state
        for t in range(prompt_len, tokens.shape[1]):
            out = model(tokens[:, t:t + 1], state=state, return_state=True)
            logits.append(out.logits)
            state = out.state
    assert_close(torch.cat(logits, dim=1), full, torch.float64, msg=f"{arch} decode vs parallel")


def test_generate_uses_the_same_logits_as_a_parallel_forward():
    """Greedy tokens from generate() are the argmax of a parallel forward over the generated text."""
    for arch in ("longvq", "transformer"):
        model = _model(arch)
        prompt = torch.randint(0, 32, (5,))
        out = gen.greedy(model, prompt, 12)
        assert out.shape == (17,) and torch.equal(out[:5], prompt)
        with torch.no_grad():
            logits = model(out[None, :-1]).logits[0]
        assert torch.equal(logits[4:].argmax(-1), out[5:]), arch


def _state_numel(state) -> int:
    total = 0
    for layer in state:
        for t in (layer.ema, layer.attn.cur_k, layer.attn.cur_v, layer.attn.cur_codes, layer.attn.prev_k,
                  layer.attn.prev_v, layer.attn.prev_codes, layer.attn.cache_count, layer.attn.cache_sum):
            total += 0 if t is None else t.numel()
    return total


def test_longvq_state_does_not_grow_with_generated_length():
    model = _model("longvq")
    sizes = []
    with torch.no_grad():
        out = model(torch.randint(0, 32, (1, 6)), return_state=True)
        state = out.state
        for _ in range(41):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(nxt, state=state, return_state=True)
            state = out.state
            sizes.append(_state_numel(state))
    C = 4
    assert max(sizes) == max(sizes[:C]), "state grew after the first chunk completed"
    assert sizes[C:] == sizes[:-C], "state size is not periodic in the chunk phase"
    kv = _model("transformer")(torch.randint(0, 32, (1, 9)), return_state=True).state
    assert kv[0].k.shape[2] == 9  # the baseline's KV cache, by contrast, holds every position


def test_greedy_is_deterministic_and_sampling_follows_the_seed():
    model = _model("longvq")
    prompt = torch.randint(0, 32, (2, 7))
    a, b = gen.greedy(model, prompt, 10), gen.greedy(model, prompt, 10)
    assert a.shape == (2, 17) and torch.equal(a, b)
    s1 = gen.generate(model, prompt, 10, 1.0, 5, torch.Generator().manual_seed(3))
    s2 = gen.generate(model, prompt, 10, 1.0, 5, torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)
    with pytest.raises(ValueError):
        gen.generate(model, torch.tensor([40]), 3)  # outside the vocabulary


def test_top_k_restricts_the_support():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(gen.sample_next(logits, 1.0, 2, g)) for _ in range(50)}
    assert draws <= {1, 2} and len(draws) == 2
    assert int(gen.sample_next(logits, 0.0)) == 1


def _write_checkpoint(run_dir, arch: str, steps: int = 3):
    """A checkpoint in lm.train's layout, written by hand after a few plain optimizer steps."""
    cfg = RunConfig(model=tiny(arch, vocab=256), train=TrainConfig(run_dir=str(run_dir), seed=1))
    cfg.validate()
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.tensor([list(b"hello world, hello LongVQ!")] * 2)
    for _ in range(steps):
        out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.reshape(-1, 256), x[:, 1:].reshape(-1)) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.apply_codebook_updates()
    tag = f"global_step{steps}"
    folder = run_dir / "checkpoints" / tag
    folder.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, folder / "mp_rank_00_model_states.pt")
    dump_config(cfg, folder / "config.yaml")
    (run_dir / "checkpoints" / "latest").write_text(tag)
    return model.eval()


@pytest.mark.parametrize("arch", ["longvq", "transformer"])
def test_cli_end_to_end_on_a_checkpoint(tmp_path, capsys, arch):
    model = _write_checkpoint(tmp_path / "run", arch)
    prompt = "hello"
    rc = gen.main(["--checkpoint", str(tmp_path / "run"), "--prompt", prompt, "--max-new-tokens", "12",
                   "--temperature", "0", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    expected = gen.greedy(model, torch.tensor(list(prompt.encode())), 12)
    text = bytes(expected.tolist()).decode("utf-8", errors="replace")
    assert captured.out.rstrip("\n") == text
    assert "tok/s" in captured.err
    # sampling with a seed is reproducible through the CLI too
    argv = ["--checkpoint", str(tmp_path / "run"), "--prompt", prompt, "--max-new-tokens", "8",
            "--temperature", "0.8", "--top-k", "20", "--seed", "5", "--device", "cpu"]
    assert gen.main(argv) == 0
    first = capsys.readouterr().out
    assert gen.main(argv) == 0
    assert capsys.readouterr().out == first


def test_cli_reports_errors(tmp_path, capsys):
    _write_checkpoint(tmp_path / "run", "longvq", steps=1)
    assert gen.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "", "--max-new-tokens", "2"]) == 2
    assert "prompt" in capsys.readouterr().err
    assert gen.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2


def test_cli_eager_flag_gives_the_same_text(tmp_path, capsys):
    """--eager (no CUDA graph) decodes the same tokens; on CPU both run the same eager step."""
    _write_checkpoint(tmp_path / "run", "longvq", steps=1)
    argv = ["--checkpoint", str(tmp_path / "run"), "--prompt", "abc", "--max-new-tokens", "6", "--temperature", "0",
            "--device", "cpu"]
    assert gen.main(argv) == 0
    first = capsys.readouterr().out
    assert gen.main(argv + ["--eager"]) == 0
    assert capsys.readouterr().out == first


def test_cli_compile_flag_reaches_the_decoder(tmp_path, capsys, monkeypatch):
    """--compile asks the Decoder for the compiled step (the compiled decode itself is checked against the eager
    one on CUDA in tests/engine/test_decoder.py); without it the step stays eager."""
    _write_checkpoint(tmp_path / "run", "longvq", steps=1)
    seen = []

    class Spy(gen.Decoder):
        def __init__(self, *a, compile_step=False, **k):
            seen.append(compile_step)
            super().__init__(*a, compile_step=False, **k)  # keep the CPU test fast: the eager step

    monkeypatch.setattr(gen, "Decoder", Spy)
    argv = ["--checkpoint", str(tmp_path / "run"), "--prompt", "abc", "--max-new-tokens", "3", "--temperature", "0",
            "--device", "cpu"]
    assert gen.main(argv + ["--compile"]) == 0 and gen.main(argv) == 0
    assert seen == [True, False]
