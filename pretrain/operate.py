"""The tools for operating a long run, hooked into the training loop from one place:

    tools = RunTools(cfg, run_dir, rank=rank, world=world, device=device)   # once the trainer is set up
    while ...:
        with tools.step(k):          # watchdog timer, profiler window, CUDA memory history, OOM snapshot
            metrics = train_step()
    tools.close()

- the watchdog (`watchdog.*`, pretrain/watchdog.py): hang and straggler detection -> RUN_DIR/watchdog/;
- the flight recorder (`logging.flight_recorder`): `flight_recorder_env`, set by pretrain.session's
  init_distributed before the process group exists; NCCL dumps it on a timeout -> RUN_DIR/flight_recorder/;
- the profiler window (`logging.profile_steps: [a, b]`): a chrome trace of steps a..b per rank ->
  RUN_DIR/profile/rank<r>.steps<a>-<b>.json (chrome://tracing, https://ui.perfetto.dev);
- CUDA memory (`logging.memory_history_steps: K`): the allocator's history over the first K steps of the
  process, then a snapshot, and a snapshot on an out-of-memory error -> RUN_DIR/memory/*.pickle, the format
  https://pytorch.org/memory_viz reads. The peak resident memory of every rank is in metrics.jsonl
  (pretrain/metrics.py `rss_by_rank`).
Each is documented in docs/operating.md, "Operating a long run", with its cost per step.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from .watchdog import Watchdog, default_store

FR_DIR = "flight_recorder"
FR_PREFIX = "nccl_trace_rank_"      # torch appends the global rank
MEMORY_HISTORY_ENTRIES = 100_000    # allocator events kept (the oldest are dropped past this)


def flight_recorder_env(entries: int, run_dir) -> dict[str, str | None]:
    """The environment that turns the collective flight recorder on (`entries` > 0) or off (0); None: unset.
    Read by torch when a process group is created: pretrain.session.init_distributed sets it before that.
    torch 2.13's names: TORCH_FR_BUFFER_SIZE (every backend, gloo included) and TORCH_FR_DUMP_TEMP_FILE; it
    still reads the older TORCH_NCCL_TRACE_BUFFER_SIZE and TORCH_NCCL_DEBUG_INFO_TEMP_FILE but warns on
    stderr, so those are unset. On a collective timeout NCCL writes each rank's entries to
    RUN_DIR/flight_recorder/nccl_trace_rank_<rank>."""
    old = {"TORCH_NCCL_TRACE_BUFFER_SIZE": None, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": None}
    if entries == 0:
        return {"TORCH_FR_BUFFER_SIZE": "0", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0", **old}
    prefix = str((Path(run_dir) / FR_DIR).absolute() / FR_PREFIX)
    return {"TORCH_FR_BUFFER_SIZE": str(entries), "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_FR_DUMP_TEMP_FILE": prefix,
            **old}


class ProfileWindow:
    """torch.profiler over steps [first, last] (those of them this process runs), one chrome trace per rank.
    Each step is a `whaletron step <k>` range in the trace."""

    def __init__(self, first: int, last: int, run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = first, last
        self.path = Path(run_dir) / "profile" / f"rank{rank}.steps{first}-{last}.json"
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = None
        self.done = False

    @contextmanager
    def step(self, k: int):
        if self.done or not self.first <= k <= self.last:
            yield
            return
        if self.prof is None:
            self.prof = torch.profiler.profile(activities=self.activities)
            self.prof.__enter__()
        with torch.profiler.record_function(f"whaletron step {k}"):
            yield
        if k == self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends or fails inside the window)."""
        if self.prof is None or self.done:
            return
        self.done = True
        self.prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.path))
        print(f"profile: steps {self.first}-{self.last} -> {self.path}", flush=True)


class CudaMemory:
    """On CUDA: the caching allocator's history (every alloc/free with its Python stack) from construction
    until `history_steps` steps have run, then a snapshot; and a snapshot whenever a step runs out of
    memory (with the history while it is still recorded). Files: RUN_DIR/memory/rank<r>.*.pickle, for
    https://pytorch.org/memory_viz. Nothing of this runs unless torch.cuda.is_available()."""

    def __init__(self, history_steps: int, run_dir: Path, rank: int):
        self.steps, self.dir, self.rank = history_steps, Path(run_dir) / "memory", rank
        self.recording = False
        self.first: int | None = None
        if history_steps and torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                                     max_entries=MEMORY_HISTORY_ENTRIES)
            self.recording = True

    def snapshot(self, name: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank{self.rank}.{name}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def stop(self) -> None:
        if self.recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False

    @contextmanager
    def step(self, k: int):
        if self.first is None:
            self.first = k
        try:
            yield
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                path = self.snapshot(f"oom.step{k}")
                print(f"out of memory at step {k} on rank {self.rank}: allocator snapshot"
                      f"{' with history' if self.recording else ''} -> {path} (open it at "
                      f"https://pytorch.org/memory_viz)", file=sys.stderr, flush=True)
                self.stop()
            raise
        if self.recording and k - self.first + 1 >= self.steps:
            path = self.snapshot(f"steps{self.first}-{k}")
            self.stop()
            if self.rank == 0:
                print(f"memory: allocator history of steps {self.first}-{k} -> {path} (https://pytorch.org/memory_viz)",
                      flush=True)


class RunTools:
    """The operating tools of one training process, around each step (module docstring). Built last in the
    trainer's setup, so that a failing setup leaves no thread behind; close it at the end."""

    def __init__(self, cfg, run_dir, *, rank: int, world: int, device: torch.device):
        lg, w = cfg.logging, cfg.watchdog
        self.watchdog = (Watchdog(w, run_dir, rank=rank, world=world, store=default_store())
                         if w.factor or w.timeout else None)
        self.profile = ProfileWindow(*lg.profile_steps, run_dir, rank, device) if lg.profile_steps else None
        self.memory = CudaMemory(lg.memory_history_steps, run_dir, rank) if device.type == "cuda" else None
        if lg.memory_history_steps and device.type != "cuda" and rank == 0:
            print(f"logging.memory_history_steps = {lg.memory_history_steps}: the allocator history is CUDA's; "
                  f"this run is on {device.type}, where the peak resident memory of every rank is logged instead",
                  flush=True)

    @contextmanager
    def step(self, k: int):
        """Step k, timed by the watchdog, inside the profiler window and the memory history when they apply."""
        with self._memory(k), self._profile(k):
            if self.watchdog is not None:
                self.watchdog.begin(k)
            try:
                yield
            finally:
                if self.watchdog is not None:
                    self.watchdog.end()

    def _memory(self, k: int):
        return self.memory.step(k) if self.memory is not None else _nothing()

    def _profile(self, k: int):
        return self.profile.step(k) if self.profile is not None else _nothing()

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
        if self.profile is not None:
            self.profile.close()
        if self.memory is not None:
            self.memory.stop()


@contextmanager
def _nothing():
    yield
