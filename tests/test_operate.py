"""Operating a long run (docs/operating.md): the hang and straggler watchdog, the flight recorder's settings,
CUDA memory history and out-of-memory snapshots (mocked: no GPU here), peak resident memory per rank, the
profiler window."""
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.config import ConfigError, WatchdogSection, load_config
from distributed import job_store, run_ranks
from test_train import _train_rank, base_overrides, metrics

ROOT = Path(__file__).resolve().parents[1]


# -- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("logging.profile_steps=[3]", "logging.profile_steps"),
    ("logging.profile_steps=[4, 2]", "logging.profile_steps"),
    ("logging.profile_steps=[0, 2]", "logging.profile_steps"),
    ("logging.profile_steps=[5, 11]", "train.steps = 10"),
    ("logging.memory_history_steps=-1", "logging.memory_history_steps"),
    ("logging.flight_recorder=-5", "logging.flight_recorder"),
    ("watchdog.factor=1.0", "watchdog.factor"),
    ("watchdog.factor=-2", "watchdog.factor"),
    ("watchdog.window=0", "watchdog.window"),
    ("watchdog.min_seconds=-1", "watchdog.min_seconds"),
    ("watchdog.timeout=.nan", "watchdog.timeout"),
    ("watchdog.exit=true", "watchdog.exit"),
    ("watchdog.facter=3", "valid watchdog.* keys"),
])
def test_operating_keys_are_checked(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.steps=10", override])
    assert key in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_operating_keys_accept_good_values():
    cfg = load_config(None, ["train.steps=10", "logging.profile_steps=[2, 10]", "watchdog.factor=5",
                             "watchdog.exit=true", "logging.memory_history_steps=3"])
    assert cfg.logging.profile_steps == [2, 10] and cfg.watchdog.factor == 5.0 and cfg.watchdog.exit
    assert load_config(None, ["watchdog.timeout=600", "watchdog.exit=true"]).watchdog.timeout == 600.0


# -- flight recorder -------------------------------------------------------------------------------------
def test_flight_recorder_env_is_set_before_the_process_group(tmp_path, monkeypatch):
    """logging.flight_recorder sets the recorder's buffer, NCCL's dump on timeout and the dump's location in
    the run directory before the process group is created (torch reads them then), under torch 2.13's names
    (the deprecated ones, which would print a warning, are unset); 0 switches it off."""
    import torch.distributed as dist

    from pretrain import session
    from pretrain.operate import flight_recorder_env
    keys = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_DUMP_TEMP_FILE",
            "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
    for k in keys:
        monkeypatch.setenv(k, "before")   # restored after the test
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = {}
    real = dist.init_process_group

    def spy(*args, **kwargs):
        seen.update({k: os.environ.get(k) for k in keys})
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", spy)
    run_dir = tmp_path / "run"
    cfg = load_config(None, ["logging.flight_recorder=500", f"logging.run_dir={run_dir}", "logging.wandb=disabled"])
    assert not dist.is_initialized()
    try:
        session.open_run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    dump = str(run_dir.absolute() / "flight_recorder" / "nccl_trace_rank_")
    assert seen == {"TORCH_FR_BUFFER_SIZE": "500", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_FR_DUMP_TEMP_FILE": dump,
                    "TORCH_NCCL_TRACE_BUFFER_SIZE": None, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": None}
    assert flight_recorder_env(0, run_dir) == {"TORCH_FR_BUFFER_SIZE": "0", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
                                               "TORCH_NCCL_TRACE_BUFFER_SIZE": None,
                                               "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": None}


# -- memory ----------------------------------------------------------------------------------------------
def test_rss_by_rank():
    from pretrain.metrics import peak_rss_gib, rss_by_rank
    assert rss_by_rank([1.0, 3.0, 2.0]) == {
        "memory/rss_peak_gib_max": 3.0, "memory/rss_peak_max_rank": 1, "memory/rss_peak_gib_min": 1.0,
        "memory/rss_peak_gib/rank0": 1.0, "memory/rss_peak_gib/rank1": 3.0, "memory/rss_peak_gib/rank2": 2.0}
    big = rss_by_rank([float(r % 7) for r in range(100)], per_rank_up_to=64)
    assert big == {"memory/rss_peak_gib_max": 6.0, "memory/rss_peak_max_rank": 6, "memory/rss_peak_gib_min": 0.0}
    before = peak_rss_gib()
    ballast = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched: the high-water mark moves
    assert peak_rss_gib() >= before and peak_rss_gib() > ballast.numel() / (1 << 30)


def _tools_cfg(**logging):
    lg = dict(profile_steps=[], memory_history_steps=0, flight_recorder=0)
    lg.update(logging)
    return SimpleNamespace(logging=SimpleNamespace(**lg), watchdog=WatchdogSection())


class _FakeCudaMemory:
    """torch.cuda.memory's recorder and snapshot, as a CUDA machine would call them."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", self.record)
        monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", self.dump)

    def record(self, enabled="all", **kw):
        self.calls.append(("record", enabled, kw.get("max_entries")))

    def dump(self, filename):
        self.calls.append(("dump", Path(filename).name))
        Path(filename).write_bytes(b"snapshot")


def test_cuda_memory_history_then_snapshot_and_oom_snapshot(tmp_path, monkeypatch, capsys):
    """On CUDA (mocked): the history records from the start, a snapshot follows the first K steps and the
    history stops; an out-of-memory error in a later step dumps a snapshot and is raised on."""
    from pretrain.operate import MEMORY_HISTORY_ENTRIES, RunTools
    fake = _FakeCudaMemory(monkeypatch)
    tools = RunTools(_tools_cfg(memory_history_steps=2), tmp_path, rank=3, world=4, device=torch.device("cuda", 0))
    assert fake.calls == [("record", "all", MEMORY_HISTORY_ENTRIES)]
    for k in (5, 6):  # a resumed run: its first two steps are 5 and 6
        with tools.step(k):
            pass
    assert fake.calls[1:] == [("dump", "rank3.steps5-6.pickle"), ("record", None, None)]
    with pytest.raises(torch.OutOfMemoryError):
        with tools.step(7):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert fake.calls[3:] == [("dump", "rank3.oom.step7.pickle")]
    assert (tmp_path / "memory" / "rank3.oom.step7.pickle").read_bytes() == b"snapshot"
    err = capsys.readouterr().err
    assert "out of memory at step 7 on rank 3" in err and "pytorch.org/memory_viz" in err, err
    tools.close()
    assert len(fake.calls) == 4                       # nothing left to stop


def test_cuda_oom_while_recording_keeps_the_history(tmp_path, monkeypatch, capsys):
    from pretrain.operate import RunTools
    fake = _FakeCudaMemory(monkeypatch)
    tools = RunTools(_tools_cfg(memory_history_steps=10), tmp_path, rank=0, world=1, device=torch.device("cuda", 0))
    with pytest.raises(torch.OutOfMemoryError):
        with tools.step(1):
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert [c[:2] for c in fake.calls] == [("record", "all"), ("dump", "rank0.oom.step1.pickle"), ("record", None)]
    assert "with history" in capsys.readouterr().err


def test_memory_history_is_cuda_only(tmp_path, monkeypatch, capsys):
    """On CPU nothing of torch.cuda.memory is called (even with a GPU visible); the run says where to look."""
    from pretrain.operate import RunTools
    fake = _FakeCudaMemory(monkeypatch)
    tools = RunTools(_tools_cfg(memory_history_steps=2), tmp_path, rank=0, world=1, device=torch.device("cpu"))
    for k in (1, 2, 3):
        with tools.step(k):
            pass
    tools.close()
    assert fake.calls == [] and not (tmp_path / "memory").exists()
    assert "peak resident memory of every rank" in capsys.readouterr().out


# -- profiler window -------------------------------------------------------------------------------------
def test_profile_window_writes_a_chrome_trace_of_those_steps(tmp_path):
    from pretrain.operate import RunTools
    tools = RunTools(_tools_cfg(profile_steps=[2, 3]), tmp_path, rank=1, world=2, device=torch.device("cpu"))
    a = torch.randn(64, 64)
    for k in range(1, 6):
        with tools.step(k):
            (a @ a).sum()
    tools.close()
    trace = json.loads((tmp_path / "profile" / "rank1.steps2-3.json").read_text())
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = {e["name"]: e for e in events if e["name"].startswith("whaletron step")}
    assert sorted(steps) == ["whaletron step 2", "whaletron step 3"]
    for s in steps.values():  # each step's matmul lies inside it
        assert any(e["name"] == "aten::mm" and s["ts"] <= e["ts"] <= s["ts"] + s["dur"] for e in events), s


# -- the watchdog ------------------------------------------------------------------------------------------
def test_watchdog_reports_a_slow_step_from_its_own_thread(tmp_path):
    """One process: ordinary steps pass; a step that runs past factor x the median is reported while the main
    thread is still inside it, with every thread's stack; an absolute timeout applies before any median."""
    from pretrain.watchdog import Watchdog
    cfg = WatchdogSection(factor=3.0, window=10, warmup_steps=1, min_seconds=0.3)
    out = io.StringIO()
    w = Watchdog(cfg, tmp_path, rank=0, world=1, stream=out)
    for k in range(1, 6):
        w.begin(k)
        time.sleep(0.01)
        w.end()
    assert w.fired == []
    w.begin(6)
    t0 = time.monotonic()
    while not w.fired and time.monotonic() - t0 < 5:   # the main thread is "stuck" here
        time.sleep(0.01)
    w.end()
    w.close()
    assert w.fired == [6] and 0.3 <= time.monotonic() - t0 < 3
    dump = (tmp_path / "watchdog" / "step6" / "rank0.txt").read_text()
    assert "step 6 has run" in dump and "over 3 x the median step" in dump and "min_seconds" in dump
    assert "test_watchdog_reports_a_slow_step_from_its_own_thread" in dump   # the main thread's stack
    assert "main thread at" in dump and "## collectives" in dump
    assert "watchdog: rank 0 step 6 has run" in out.getvalue()

    w = Watchdog(WatchdogSection(timeout=0.2), tmp_path / "t", rank=0, world=1, stream=io.StringIO())
    w.begin(1)
    time.sleep(0.6)
    w.end()
    w.close()
    assert w.fired == [1] and "over watchdog.timeout = 0.2 s" in (tmp_path / "t/watchdog/step1/rank0.txt").read_text()


def test_watchdog_on_a_stalled_rank_dumps_every_rank_and_exits(corpus, tmp_path):
    """Two gloo ranks launched as torchrun would; rank 1 stalls at step 6 (the test hook) while rank 0 waits
    for it inside a collective. Both watchdogs fire from their monitor threads: each writes its stacks and
    the collectives in flight, rank 0 names rank 1 as the straggler, both exit with WATCHDOG_EXIT (what
    `torchrun --max-restarts` restarts from the last checkpoint). The same run writes a profiler trace of
    steps 1-2 per rank (warm-up steps, which the watchdog does not measure: the traces' export makes the
    next step's time uneven) and logs every rank's peak resident memory."""
    from pretrain.watchdog import STALL_ENV, WATCHDOG_EXIT
    args = base_overrides(corpus, tmp_path, **{
        "train.steps": 100, "checkpoint.every": 3, "logging.profile_steps": [1, 2], "watchdog.factor": 3.0,
        "watchdog.min_seconds": 2.0, "watchdog.warmup_steps": 2, "watchdog.window": 20, "watchdog.exit": True})
    cmd = [sys.executable, "-m", "pretrain", "--config", str(ROOT / "configs/pretrain/tiny_v3.yaml"),
           "parallel.pp=1", "parallel.ep=1", "train.batch_ramp=[]", "train.mtp_lambda=[]", "train.bias_gamma=[]",
           "train.ema_decay=0", *args]
    procs, logs = [], []
    t0 = time.time()
    with job_store() as store_env:
        for rank in (0, 1):
            env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                       **store_env, **{STALL_ENV: "1:6:300"})
            logs.append(open(tmp_path / f"rank{rank}.log", "w"))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for f in logs:
                f.close()
    took = time.time() - t0
    out = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert codes == [WATCHDOG_EXIT, WATCHDOG_EXIT], (codes, out)
    for r in (0, 1):
        assert f"watchdog: rank {r} step 6 has run" in out[r] and "exits with code 4" in out[r], out[r]
        assert "Traceback" not in out[r], out[r]
    d = tmp_path / "watchdog" / "step6"
    stalled, waiting = (d / "rank1.txt").read_text(), (d / "rank0.txt").read_text()
    assert "in begin" in stalled.splitlines()[1] and "time.sleep" in stalled  # the stall, in its stack
    assert "train_step" in waiting and "forward_backward" in waiting          # rank 0 is inside the step ...
    inflight = waiting.split("in flight:\n")[1].split("last entered:")[0]
    assert "gloo:" in inflight, waiting                                        # ... waiting in a collective
    assert "in flight:\n  none" in stalled                                     # rank 1 never entered it
    summary = (d / "summary.txt").read_text()
    assert "2 of 2 ranks reported" in summary and "likely stragglers" in summary, summary
    assert summary.split("likely stragglers")[1].splitlines()[0].endswith("ranks 1"), summary
    assert (d / "fr_trace_rank_0").stat().st_size > 0 and (d / "fr_trace_rank_1").stat().st_size > 0
    m = metrics(tmp_path)
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5]             # step 6 never finished
    assert all(x["memory/rss_peak_gib/rank0"] > 0.05 and x["memory/rss_peak_gib/rank1"] > 0.05 for x in m)
    assert (tmp_path / "checkpoints" / "step_00000003").is_dir()  # where a restart resumes
    for r in (0, 1):
        trace = (tmp_path / "profile" / f"rank{r}.steps1-2.json").read_text()
        assert "whaletron step 1" in trace and "whaletron step 2" in trace and "aten::mm" in trace
    print(f"stalled-rank run: {took:.1f} s")


@pytest.mark.slow
def test_watchdog_without_exit_reports_and_the_run_goes_on(corpus, tmp_path, monkeypatch):
    """watchdog.exit = false: rank 0 stalls for 4 s at step 5 of a 2-rank run; both ranks report step 5 once,
    rank 0 is named the straggler, and the run finishes every step."""
    from pretrain.watchdog import STALL_ENV
    monkeypatch.setenv(STALL_ENV, "0:5:4")   # the spawned ranks inherit it
    run_ranks(2, _train_rank, base_overrides(corpus, tmp_path, **{
        "train.steps": 8, "watchdog.factor": 3.0, "watchdog.min_seconds": 1.0, "watchdog.warmup_steps": 2}))
    assert [x["step"] for x in metrics(tmp_path)] == list(range(1, 9))
    assert sorted(p.name for p in (tmp_path / "watchdog").iterdir()) == ["step5"]
    d = tmp_path / "watchdog" / "step5"
    assert sorted(p.name for p in d.iterdir()) == ["fr_trace_rank_0", "fr_trace_rank_1", "rank0.txt", "rank1.txt",
                                                   "summary.txt"]
    assert "in begin" in (d / "rank0.txt").read_text().splitlines()[1]
    summary = (d / "summary.txt").read_text()
    assert summary.split("likely stragglers")[1].splitlines()[0].endswith("ranks 0"), summary


@pytest.mark.slow
def test_watchdog_exit_under_torchrun_restarts_from_the_last_checkpoint(corpus, tmp_path):
    """`torchrun --max-restarts 1`: rank 1 stalls at step 6 in the first round, the watchdog stops both ranks
    with WATCHDOG_EXIT, torchrun restarts them, they resume from the step-3 checkpoint and finish."""
    from pretrain.watchdog import STALL_ENV
    args = base_overrides(corpus, tmp_path, **{
        "train.steps": 8, "checkpoint.every": 3, "watchdog.factor": 3.0, "watchdog.min_seconds": 2.0,
        "watchdog.warmup_steps": 2, "watchdog.exit": True})
    env = dict(os.environ, MAX_RESTARTS="1", PY=sys.executable, OMP_NUM_THREADS="1", **{STALL_ENV: "1:6:300"})
    log = open(tmp_path / "torchrun.log", "w")
    p = subprocess.Popen(["launch/torchrun.sh", "2", "--config", str(ROOT / "configs/pretrain/tiny_v3.yaml"),
                          "parallel.pp=1", "parallel.ep=1", "train.batch_ramp=[]", "train.mtp_lambda=[]",
                          "train.bias_gamma=[]", "train.ema_decay=0", *args],
                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        p.wait(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
        log.close()
    out = (tmp_path / "torchrun.log").read_text()
    assert p.returncode == 0, out[-4000:]
    assert "exits with code 4" in out and "resumed from" in out and "step_00000003" in out, out[-4000:]
    assert (tmp_path / "watchdog" / "step6" / "summary.txt").exists()
    steps = [x["step"] for x in metrics(tmp_path)]
    assert steps == list(range(1, 9)), steps   # steps 4-5 of the first round were dropped on resume
