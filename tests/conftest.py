"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Runs a test on one intra-op thread: for small tensors more threads only add synchronisation
    (ten times slower on a loaded 2-core machine). Tolerances do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
