import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """CPU tests share the machine: one thread keeps these small ops fast under contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
