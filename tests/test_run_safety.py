"""A run never destroys another run's work, and fails at once on storage it cannot use (issue 20 §2):
a fresh start over existing checkpoints is refused (checkpoint.overwrite=true replaces that run), a
checkpoint past train.steps is refused, Ctrl-C saves and exits like SIGTERM, and an unwritable or too
small checkpoint directory stops the run before data or model are built.

Every run trains test_train's tiny V3 on the embedded corpus."""
import collections
import json
import os
import shutil
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from test_train import base_overrides, metrics


def _train(overrides) -> int:
    from pretrain.train import train
    return train(load_config(None, overrides))


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture(scope="module")
def done_run(corpus, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4; tests copy it."""
    d = tmp_path_factory.mktemp("done") / "run"
    assert _train(base_overrides(corpus, d, **{"train.steps": 4, "checkpoint.every": 2})) == 0
    return d


def _copy(done_run, tmp_path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(done_run, d)
    return d


# -- a fresh start where a run already is -----------------------------------------------------------------
def test_fresh_start_over_a_run_is_refused_and_overwrite_replaces_it(corpus, done_run, tmp_path, capsys):
    """checkpoint.resume=none over a run's checkpoints: a ConfigError naming the directory and the three ways
    out, with config.yaml, the checkpoints and metrics.jsonl untouched; checkpoint.overwrite=true says once
    what it replaces, and afterwards only the new run's checkpoint and steps are there."""
    d = _copy(done_run, tmp_path)
    before = {p: (d / p).read_bytes() for p in ("config.yaml", "metrics.jsonl")}
    ckpts = _listing(d / "checkpoints")
    fresh = {"train.steps": 2, "checkpoint.resume": "none"}
    with pytest.raises(ConfigError) as e:
        _train(base_overrides(corpus, d, **fresh))
    msg = str(e.value)
    assert "\n" not in msg and str(d / "checkpoints") in msg and "step_00000004" in msg, msg
    for way_out in ("checkpoint.resume=auto", "logging.run_dir", "checkpoint.overwrite=true"):
        assert way_out in msg, (way_out, msg)
    assert {p: (d / p).read_bytes() for p in before} == before   # config.yaml is not rewritten
    assert _listing(d / "checkpoints") == ckpts

    capsys.readouterr()
    assert _train(base_overrides(corpus, d, **fresh, **{"checkpoint.overwrite": True})) == 0
    out = capsys.readouterr().out
    assert out.count("checkpoint.overwrite=true: replacing the run in") == 1, out
    assert "2 checkpoint directories (latest step_00000004)" in out, out
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert [m["step"] for m in metrics(d)] == [1, 2]                   # the old run's lines are gone
    meta = json.loads((d / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["config"]["train"]["steps"] == 2                        # the new run's checkpoint


def test_fresh_start_with_its_own_checkpoint_dir_names_that_key(corpus, done_run, tmp_path):
    d = _copy(done_run, tmp_path)
    other = tmp_path / "other_run"
    with pytest.raises(ConfigError, match="a new checkpoint.dir to start elsewhere"):
        _train(base_overrides(corpus, other, **{"checkpoint.resume": "none", "checkpoint.dir": str(d / "checkpoints")}))
    assert not (other / "config.yaml").exists()


def _refuse_rank(corpus, run_dir):
    """Rank 1 sees no checkpoint (as on a lagging view of the filesystem): it must still refuse with rank 0."""
    from pretrain import session
    if os.environ["RANK"] == "1":
        session.latest_checkpoint = lambda root: None
    with pytest.raises(ConfigError, match="checkpoint.resume=none"):
        _train(base_overrides(corpus, run_dir, **{"train.steps": 2, "checkpoint.resume": "none"}))


def _entry(rank, world, env, fn, args):
    """tests/distributed.py's entry with a short collective timeout: a rank left waiting fails, not hangs."""
    import torch
    import torch.distributed as dist
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=180))
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_refusal_agrees_across_ranks(corpus, done_run, tmp_path):
    """Rank 0 decides and every rank raises the same ConfigError before any other collective."""
    import torch.multiprocessing as mp

    from distributed import job_store
    d = _copy(done_run, tmp_path)
    with job_store() as env:
        mp.start_processes(_entry, args=(2, env, _refuse_rank, (corpus, d)), nprocs=2, start_method="spawn")


def test_resume_past_the_last_step_is_refused(corpus, done_run, tmp_path):
    """A checkpoint at step 4 and train.steps = 2 (or train.exit_at_step = 2): one line naming both numbers
    and the ways out, instead of a run that silently does nothing."""
    d = _copy(done_run, tmp_path)
    with pytest.raises(ConfigError) as e:
        _train(base_overrides(corpus, d, **{"train.steps": 2}))
    msg = str(e.value)
    assert "\n" not in msg and "step 4" in msg and "last step 2 (train.steps)" in msg, msg
    assert "raise train.steps to reach at least step 4" in msg and "checkpoint.resume=PATH" in msg, msg
    with pytest.raises(ConfigError, match=r"train.exit_at_step = 2 lies before step 4.*checkpoint.resume=PATH"):
        _train(base_overrides(corpus, d, **{"train.steps": 8, "train.exit_at_step": 2}))
    assert [m["step"] for m in metrics(d)] == [1, 2, 3, 4]
    # the way out: an earlier checkpoint, named explicitly
    assert _train(base_overrides(corpus, d, **{"train.steps": 3,
                                               "checkpoint.resume": str(d / "checkpoints" / "step_00000002")})) == 0
    assert [m["step"] for m in metrics(d)] == [1, 2, 3]


def test_stage_refuses_a_fresh_start_but_a_sampling_job_is_not_checked(done_run, task_dir, tmp_path):
    """Post-training stages share open_run: a training stage refuses resume=none over checkpoints; a job that
    writes none (train=False, rejection sampling) is not refused and its checkpoint directory is left alone."""
    import torch.distributed as dist

    from posttrain.stage import StageSession
    from pretrain.session import open_run
    from test_grpo import _config
    d = tmp_path / "stage"
    shutil.copytree(done_run / "checkpoints", d / "checkpoints")
    ckpts = _listing(d / "checkpoints")
    try:
        with pytest.raises(ConfigError, match=r"already holds the checkpoints.*checkpoint.overwrite=true"):
            StageSession(_config(task_dir, d, "checkpoint.resume=none"), "grpo")
        assert not (d / "config.yaml").exists()
        open_run(_config(task_dir, d, "checkpoint.resume=none"), pp=1, train=False)
        assert (d / "config.yaml").exists() and _listing(d / "checkpoints") == ckpts
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -- signals ---------------------------------------------------------------------------------------------
def test_signal_handlers_come_back_after_a_run(corpus, tmp_path):
    """The loop installs its SIGTERM/SIGUSR1/SIGINT handlers for the run only (saving on a signal is
    tests/test_train.py's test_signal_saves_a_loadable_checkpoint, SIGINT included)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    assert _train(base_overrides(corpus, tmp_path, **{"train.steps": 2})) == 0
    assert {s: signal.getsignal(s) for s in handlers} == handlers


# -- storage ---------------------------------------------------------------------------------------------
def _no_data(monkeypatch):
    from pretrain import train as T

    def built(self):
        raise AssertionError("the data were built before the storage check")
    monkeypatch.setattr(T.Trainer, "_build_data", built)


def test_unwritable_checkpoint_dir_fails_before_anything_is_built(corpus, tmp_path, monkeypatch):
    """checkpoint.dir under a regular file (mkdir fails even for root); where the tests do not run as root,
    also a read-only directory."""
    _no_data(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = [blocker / "ckpts"]
    if os.geteuid() != 0:  # root writes through chmod 0o555
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        bad.append(ro / "ckpts")
    for i, ckpt in enumerate(bad):
        run_dir = tmp_path / f"run{i}"
        with pytest.raises(ConfigError) as e:
            _train(base_overrides(corpus, run_dir, **{"checkpoint.dir": str(ckpt)}))
        msg = str(e.value)
        assert "\n" not in msg and f"checkpoint.dir = {ckpt} is not writable" in msg, msg
        assert "point checkpoint.dir at a writable directory" in msg, msg
        assert not (run_dir / "config.yaml").exists()


def test_checkpoint_that_does_not_fit_is_refused(corpus, done_run, tmp_path, monkeypatch):
    """A checkpoint of the expected size (parameters x (4 + moments + EMA) bytes, which a real checkpoint
    matches) that does not fit in the free space: needed and free bytes and the path, before data are built."""
    from pretrain.session import check_storage, checkpoint_bytes
    cfg = load_config(None, base_overrides(corpus, tmp_path / "run"))
    need, how = checkpoint_bytes(cfg, cfg.model_config())
    real = sum(f.stat().st_size for f in (done_run / "checkpoints" / "step_00000004").rglob("*") if f.is_file())
    assert 0.9 < real / need < 1.2, (real, need, how)
    n = need // 12                                        # fp32 weights + two fp32 moments
    for extra, per in (({"train.ema_decay": 0.9}, 4 + 8 + 4), ({"train.moment_dtype": "bf16"}, 4 + 4)):
        other = load_config(None, base_overrides(corpus, tmp_path / "run", **extra))
        assert checkpoint_bytes(other, other.model_config())[0] == n * per, extra
    from posttrain.config import load_config as load_post
    for beta, per in ((0.0, 12), (0.04, 16)):  # GRPO's checkpoint holds its KL reference too
        grpo = load_post(None, [f"grpo.beta={beta}"])
        assert checkpoint_bytes(grpo, grpo.model_config())[0] == grpo.model_config().param_counts(
            include_mtp=True)["total"] * per, beta

    usage = collections.namedtuple("usage", "total used free")
    free = [need]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * need, 9 * need, free[0]))
    run_dir = tmp_path / "run"
    assert check_storage(cfg, run_dir, run_dir / "checkpoints") is None          # it just fits
    free[0] = need - 1
    msg = check_storage(cfg, run_dir, run_dir / "checkpoints")
    assert msg and "\n" not in msg and str(run_dir / "checkpoints") in msg and how in msg, msg
    _no_data(monkeypatch)
    free[0] = 1000
    with pytest.raises(ConfigError, match=r"checkpoints: a checkpoint of this run needs about [\d.]+ MiB .* but only "
                                          r"1,000 bytes is free there; free space, or point logging.run_dir at"):
        _train(base_overrides(corpus, tmp_path / "run2"))
    assert not (tmp_path / "run2" / "config.yaml").exists()
