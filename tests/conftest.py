import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from bissl_fast._alloc import poison_outputs  # noqa: E402


@pytest.fixture(autouse=True)
def _poisoned_outputs_and_seed():
    """Every kernel output starts as NaN (unwritten elements fail the test); fixed seed per test."""
    torch.manual_seed(0)
    with poison_outputs():
        yield


@pytest.fixture
def one_intra_op_thread():
    """For tests of tiny problems: intra-op threads only add synchronization there (10x slower on
    a busy 2-core machine). Restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh there)"))
        if "triton" in item.keywords and not (interpret or torch.cuda.is_available()):
            item.add_marker(pytest.mark.skip(reason="Triton tests run with TRITON_INTERPRET=1 (second pytest pass) or on a GPU"))
