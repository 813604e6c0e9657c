"""The kernel benchmarks' command lines (python -m evals.bench_kernels, evals.bench_vq_attention): bad arguments
are usage errors naming the flag; without a GPU they refuse in one line (exit 2, no traceback)."""

import pytest
import torch

from evals import bench_kernels, bench_vq_attention


@pytest.mark.parametrize("cli, argv, message", [
    (bench_kernels, ["--kernels", "ema,attention"], "--kernels 'attention': choose from ema, quantize, gates, update"),
    (bench_kernels, ["--contexts", "8k"], "argument --contexts: '8k' is not a comma-separated list of integers"),
    (bench_kernels, ["--contexts", "8192,0"], "argument --contexts: '8192,0': every value must be >= 1"),
    (bench_kernels, ["--tokens", "0"], "--tokens must be >= 1"),
    (bench_vq_attention, ["--chunks", "512,x"], "argument --chunks: '512,x' is not a comma-separated list"),
    (bench_vq_attention, ["--heads", "0"], "--tokens, --heads, --dk, --dv, --codebook and --sweep-context must be >= 1"),
], ids=lambda x: x.__name__.split(".")[-1] if hasattr(x, "__name__") else None)
def test_bad_arguments_are_usage_errors(cli, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("cli", [bench_kernels, bench_vq_attention], ids=["bench_kernels", "bench_vq_attention"])
def test_defaults_parse(cli):
    args = cli.parse_args([])
    assert args.contexts[0] >= 2048 and args.tokens == 65536


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU refusal")
@pytest.mark.parametrize("cli", [bench_kernels, bench_vq_attention], ids=["bench_kernels", "bench_vq_attention"])
def test_without_a_gpu_they_refuse_in_one_line(cli, capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA GPU (none found)" in err
