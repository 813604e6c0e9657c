"""Test defaults: CPU, deterministic, TF32 off; `gpu` tests skip themselves without CUDA.

The repository root is importable through pytest's `pythonpath` setting (pyproject.toml) or an installed
package (`pip install -e .`); nothing here edits sys.path."""

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped otherwise)")
    config.addinivalue_line("markers", "triton_interpret: a gpu test that also runs on the CPU with TRITON_INTERPRET=1")
    config.addinivalue_line("markers", "slow: longer end-to-end tests")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not (interpret and "triton_interpret" in item.keywords):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    # the fork harness (tests/dist_harness.py) needs a pytest process without a process group: a test that
    # calls lm.train.main in-process must not leave one behind
    assert not torch.distributed.is_initialized(), "this test left a torch.distributed process group in pytest"


@pytest.fixture
def tiny_model_config():
    from lm.config import ModelConfig, LongVQConfig, TransformerConfig

    def make(arch="longvq", impl="chunked", **kw):
        lv = LongVQConfig(attention_impl=impl, chunk_size=4, codebook_size=8, n_heads=2, z_dim=16, ema_dim=4)
        return ModelConfig(arch=arch, vocab_size=32, d_model=32, n_layers=2, longvq=lv,
                           transformer=TransformerConfig(n_heads=2), **kw)

    return make
