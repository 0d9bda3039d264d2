"""Shared pytest setup: CPU-only, no network; multi-rank tests spawn gloo processes."""

import os

import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: slow convergence/benchmark-style tests; still run in CI"
    )
    # CI has 2 cores; respect an explicit thread count from the environment.
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(2)
