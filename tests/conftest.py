"""Shared pytest setup: CPU-only, no network; multi-rank tests spawn gloo processes."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """A test that drives a job in-process and stops it with an exception (Trainer.run raising) leaves the
    world-of-one process group behind; the next test to create one would fail on an unrelated error."""
    yield
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def one_thread():
    """2 shared cores: one intra-op thread avoids OpenMP barrier stalls under load (10x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def traced(monkeypatch):
    """Compiled steps traced by dynamo and run by eager kernels (the "eager" backend): inductor's C++ build takes
    minutes on a small CPU, and the benchmarks check its kernels (tests/test_rollout.py). Yields
    posttrain.generate, its programs fresh."""
    import posttrain.generate as generate
    monkeypatch.setattr(generate, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(generate, "_COMPILED", {})
    torch._dynamo.reset()
    yield generate
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The embedded corpus at a small size (vocabulary 512, 400 KB), built once per session."""
    from pretrain.corpus import ensure_embedded_corpus
    cache = tmp_path_factory.mktemp("corpus")
    ensure_embedded_corpus(str(cache), vocab_size=512, max_bytes=400_000)
    return cache


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """Graded arithmetic tasks (300 train, 32 held out, levels 1-2) and their tokenizer, built once per session."""
    from posttrain.tasks import build_task_tokenizer, write_task_splits
    d = tmp_path_factory.mktemp("tasks")
    write_task_splits(str(d), "arithmetic", 300, 32, seed=0, difficulty=[1, 2])
    build_task_tokenizer(str(d / "tok.model"), n_per_level=20)
    return d


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: slow convergence/benchmark-style tests; still run in CI"
    )
    # CI has 2 cores; respect an explicit thread count from the environment.
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(2)
