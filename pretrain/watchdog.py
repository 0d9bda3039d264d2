"""Hang and straggler detection: a monitor thread per rank that times each training step.

A step that runs longer than its limit,

    limit = min(max(watchdog.min_seconds, watchdog.factor x median of the last `window` step times),
                watchdog.timeout)                                  (either term left out when it is 0)

is reported by the rank that sees it: that rank writes every thread's Python stack and the collectives
in flight (the flight recorder's entries: gloo and NCCL record every collective into it, see
`logging.flight_recorder`) to RUN_DIR/watchdog/step<k>/rank<r>.txt, the raw flight-recorder entries to
fr_trace_rank_<r> beside it (`torchfrtrace RUN_DIR/watchdog/step<k> -p fr_trace_rank_` reads them), prints one
line, and posts a summary to the job's store; rank 0 collects the summaries into summary.txt there, naming
the ranks that were not inside a collective (the stragglers: the others wait for them). With watchdog.exit
every rank then exits with WATCHDOG_EXIT, once every rank has written its dump (or a grace period has
passed), so that `torchrun --max-restarts` restarts the job from its last checkpoint.

The check runs on its own thread, so it fires while the main thread is blocked inside a collective (gloo
and NCCL waits release the GIL). In synchronous training every rank waits for a stalled one at the next
collective, so every rank's step passes its limit and every rank dumps its own stacks. The main thread's
cost is `begin` and `end` around a step: a lock and a notify, microseconds (docs/operating.md).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from pathlib import Path

import torch.distributed as dist

WATCHDOG_EXIT = 4               # the exit code after a watchdog dump with watchdog.exit (pretrain/__main__.py)
STALL_ENV = "WHALETRON_TEST_STALL"   # tests only: "RANK:STEP:SECONDS" sleeps that rank at that step (in
                                     # torchrun's first round only: a restarted job runs on)
_KEY = "whaletron/watchdog"


def _stall_from_env() -> tuple[int, int, float] | None:
    """The test hook's (rank, step, seconds), or None; a malformed value is an error, not ignored."""
    value = os.environ.get(STALL_ENV)
    if not value or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    try:
        rank, step, seconds = value.split(":")
        return int(rank), int(step), float(seconds)
    except ValueError:
        raise ValueError(f"{STALL_ENV}={value!r} must be RANK:STEP:SECONDS (a test hook)") from None


# -- what a dump holds ---------------------------------------------------------------------------------
def flight_recorder_entries() -> list[dict] | None:
    """The flight recorder's collective entries of this process, oldest first (an entry not `retired` is in
    flight: its work has not completed); None when this torch has no recorder to read. Filtered here, not
    with onlyActive, which gloo's entries do not honour in torch 2.13."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json
        raw = _dump_fr_trace_json(includeCollectives=True, onlyActive=False)
    except (ImportError, AttributeError, RuntimeError):
        return None
    return json.loads(raw).get("entries", [])


def flight_recorder_pickle() -> bytes | None:
    """The flight recorder's dump in torch's own format (what NCCL writes on a timeout), or None."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace
        return _dump_fr_trace(includeCollectives=True, includeStackTraces=False, onlyActive=False)
    except (ImportError, AttributeError, RuntimeError):
        return None


def describe_collective(e: dict, now_ns: int | None = None) -> str:
    """One flight-recorder entry as a line: `gloo:all_reduce on pg 0 (default_pg) seq 37, scheduled,
    in [[4]] float, entered 3.2 s ago`."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    pg = e.get("process_group", ["?", "?"])
    seq = e.get("p2p_seq_id") if e.get("is_p2p") else e.get("collective_seq_id")
    age = (now_ns - e["time_created_ns"]) / 1e9 if e.get("time_created_ns") else None
    dtypes = ",".join(sorted(set(e.get("input_dtypes", [])))).lower()
    return (f"{e.get('profiling_name', '?')} on pg {pg[0]} ({pg[1]}) seq {seq}, {e.get('state', '?')}"
            f"{', completed' if e.get('retired') else ''}, in {e.get('input_sizes')} {dtypes}"
            + (f", entered {age:.1f} s ago" if age is not None else ""))


def _frame_where(frame) -> str:
    """The innermost frame of a thread as `path:line in function`."""
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


_ROOT = str(Path(__file__).resolve().parents[1]) + os.sep


def _main_where(frame) -> str:
    """The main thread's innermost frame and, when that lies outside whaletron (in torch, say), the innermost
    frame of ours that called it."""
    where, f = _frame_where(frame), frame
    while f is not None and not f.f_code.co_filename.startswith(_ROOT):
        f = f.f_back
    if f is not None and f is not frame:
        where += f", called from {_frame_where(f)}"
    return where


def python_stacks() -> tuple[str, str]:
    """(every thread's Python stack as text, where the main thread is: `_main_where`)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main_ident = threading.main_thread().ident
    parts, where = [], "?"
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue  # the watchdog itself
        parts.append(f"--- thread {names.get(ident, '?')} ({ident}){' (main)' if ident == main_ident else ''}\n"
                     + "".join(traceback.format_stack(frame)))
        if ident == main_ident:
            where = _main_where(frame)
    return "\n".join(parts), where


# -- the watchdog ------------------------------------------------------------------------------------
class Watchdog:
    """Times the steps between `begin(step)` and `end()`; a monitor thread reports a step that passes its
    limit (module docstring). cfg: the `watchdog` config section."""

    def __init__(self, cfg, run_dir: Path, *, rank: int, world: int, store=None, stream=None):
        self.cfg, self.dir, self.rank, self.world = cfg, Path(run_dir) / "watchdog", rank, world
        self.store = store
        self.stream = stream or sys.stderr
        self.times: deque[float] = deque(maxlen=cfg.window)
        self.steps_seen = 0
        self.stall = _stall_from_env()
        self.fired: list[int] = []          # the steps reported, in order (read by tests)
        self._cond = threading.Condition()
        self._step: int | None = None
        self._start = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._monitor, name="whaletron-watchdog", daemon=True)
        self._thread.start()

    # -- the main thread's side: a lock and a notify per step --
    def begin(self, step: int) -> None:
        with self._cond:
            self._step, self._start = step, time.monotonic()
            self._cond.notify()
        if self.stall and self.stall[:2] == (self.rank, step):  # tests only (STALL_ENV)
            time.sleep(self.stall[2])

    def end(self) -> None:
        with self._cond:
            if self._step is not None:
                self.steps_seen += 1
                if self.steps_seen > self.cfg.warmup_steps:
                    self.times.append(time.monotonic() - self._start)
            self._step = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def limit(self) -> tuple[float, str] | None:
        """(seconds the current step may take, why), or None while no limit applies. Called under the lock."""
        c, out = self.cfg, []
        if c.factor and self.times:
            median = statistics.median(self.times)
            out.append((max(c.min_seconds, c.factor * median),
                        f"over {c.factor:g} x the median step {median:.3f} s of the last {len(self.times)} steps"
                        + (f" (floor watchdog.min_seconds = {c.min_seconds:g} s)" if c.factor * median < c.min_seconds
                           else "")))
        if c.timeout:
            out.append((c.timeout, f"over watchdog.timeout = {c.timeout:g} s"))
        return min(out) if out else None

    # -- the monitor thread --
    def _monitor(self) -> None:
        with self._cond:
            while not self._closed:
                step = self._step
                lim = self.limit() if step is not None and step not in self.fired else None
                if lim is None:
                    self._cond.wait()
                    continue
                left = self._start + lim[0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self.fired.append(step)
                elapsed = time.monotonic() - self._start
                self._cond.release()   # the main thread goes on (or stays stuck) while we dump
                try:
                    self._report(step, elapsed, lim)
                finally:
                    self._cond.acquire()

    def _report(self, step: int, elapsed: float, lim: tuple[float, str]) -> None:
        """Write this rank's dump, say so, share a summary; with watchdog.exit, exit once all ranks dumped."""
        summary = None
        try:
            summary = self._dump(step, elapsed, lim)
        except Exception as e:  # a watchdog that fails must say why, not die silently
            self._say(f"watchdog: rank {self.rank}: the dump of step {step} failed: {type(e).__name__}: {e}")
        if summary is not None and self.world > 1 and self.store is not None:
            try:
                self._share(step, summary)
            except Exception as e:  # the store's host (rank 0 or the agent) may be gone already
                self._say(f"watchdog: rank {self.rank}: could not share the summary of step {step} through the "
                          f"store ({type(e).__name__}: {e}); this rank's dump is written")
        if self.cfg.exit:
            self._say(f"watchdog: rank {self.rank} exits with code {WATCHDOG_EXIT} (watchdog.exit = true); "
                      f"with torchrun --max-restarts the job restarts from its last checkpoint")
            os._exit(WATCHDOG_EXIT)  # the main thread may be inside a collective: nothing else stops it

    def _say(self, line: str) -> None:
        try:
            print(line, file=self.stream, flush=True)
        except (OSError, ValueError):
            pass

    def _dump(self, step: int, elapsed: float, lim: tuple[float, str]) -> dict:
        stacks, where = python_stacks()
        now = time.time_ns()
        everything = flight_recorder_entries()
        active = None if everything is None else [e for e in everything if not e.get("retired")]
        last = everything[-1] if everything else None
        if everything is None:
            coll = "the flight recorder cannot be read in this torch"
        elif not everything:
            coll = "none recorded (logging.flight_recorder = 0?)"
        else:
            coll = "\n".join(["in flight:", *(f"  {describe_collective(e, now)}" for e in active or [])]
                             + ([] if active else ["  none"])
                             + ["last entered:", f"  {describe_collective(last, now)}"])
        out = self.dir / f"step{step}"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank{self.rank}.txt"
        raw = flight_recorder_pickle()
        if raw:
            (out / f"fr_trace_rank_{self.rank}").write_bytes(raw)
        head = (f"rank {self.rank} of {self.world} (host {os.uname().nodename}, pid {os.getpid()}): step {step} has "
                f"run {elapsed:.1f} s, {lim[1]} (limit {lim[0]:.1f} s)\nmain thread at {where}\n")
        path.write_text(f"{head}\n## collectives (flight recorder)\n{coll}\n\n## Python stacks\n{stacks}")
        brief_last = describe_collective(last, now) if last else "none"
        self._say(f"watchdog: rank {self.rank} step {step} has run {elapsed:.1f} s, {lim[1]}; main thread at {where}; "
                  f"{len(active or [])} collective(s) in flight, last entered {brief_last}; stacks -> {path}")
        return {"rank": self.rank, "elapsed": elapsed, "where": where, "in_flight": len(active or []),
                "last": brief_last, "file": str(path)}

    def _share(self, step: int, summary: dict) -> None:
        """Post this rank's summary to the store; wait (up to a grace period) for every rank's, rank 0 writing
        them into step<k>.summary.txt. Only with watchdog.exit do the other ranks wait too."""
        base = f"{_KEY}/step{step}"
        self.store.set(f"{base}/rank{self.rank}", json.dumps(summary))
        if self.rank != 0 and not self.cfg.exit:
            return
        keys = [f"{base}/rank{r}" for r in range(self.world)]
        grace = min(max(5.0, summary["elapsed"]), 120.0)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self.store.check(keys):
            time.sleep(0.1)
        if self.rank != 0:
            return
        got = {}
        for r in range(self.world):
            if self.store.check([keys[r]]):
                got[r] = json.loads(self.store.get(keys[r]))
        waiting = [r for r, s in got.items() if s["in_flight"]]
        outside = [r for r, s in got.items() if not s["in_flight"]]
        silent = [r for r in range(self.world) if r not in got]
        lines = [f"step {step}: {len(got)} of {self.world} ranks reported within {grace:.0f} s"]
        if outside and waiting:
            lines.append(f"likely stragglers (not inside a collective while ranks {_ranks(waiting)} wait in one): "
                         f"ranks {_ranks(outside)}")
        if silent:
            lines.append(f"no report from ranks {_ranks(silent)} (their step did not pass its limit, or they hang "
                         f"with the GIL held: see their stderr)")
        lines += [f"rank {r}: {s['elapsed']:.1f} s, main thread at {s['where']}; {s['in_flight']} in flight, "
                  f"last entered {s['last']}" for r, s in sorted(got.items())]
        out = self.dir / f"step{step}" / "summary.txt"
        out.write_text("\n".join(lines) + "\n")
        self._say(f"watchdog: {lines[1] if len(lines) > 1 and not lines[1].startswith('rank ') else lines[0]}; "
                  f"summary -> {out}")


def _ranks(rs: list[int]) -> str:
    return ", ".join(map(str, rs[:16])) + (f" (+{len(rs) - 16} more)" if len(rs) > 16 else "")


def default_store():
    """The job's key-value store (the one init_distributed created), or None in a world of one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None
