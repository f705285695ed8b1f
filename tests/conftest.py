"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core box are ~20x slower with 2 spinning OpenMP threads; one thread also
    matches the OMP_NUM_THREADS=1 subprocesses some tests compare against."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
