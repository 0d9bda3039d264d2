"""Shared pytest setup: CPU-only, no network; multi-rank tests spawn gloo processes."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: slow convergence/benchmark-style tests; still run in CI"
    )
    # CI has 2 cores; respect an explicit thread count from the environment.
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(2)
