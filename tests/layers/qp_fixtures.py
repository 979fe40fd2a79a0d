"""Fixtures shared by the QP tests (import them into a test module to use them)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run the module with one torch thread: tiny batched factorizations are much slower with
    two threads on a contended 2-core machine. The previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
