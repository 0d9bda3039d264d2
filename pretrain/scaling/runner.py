"""Running a sweep's points: locally one after another, or as a Slurm array (one task per point).

    run_local(sweep)                      # every unfinished point, in manifest order
    run_local(sweep, indices=[3])         # one point (what each Slurm array task does)
    submit_slurm(sweep, script, dry_run=True)

A point is finished when its metrics.jsonl reaches the last step with the final validation loss
(`results.point_state`); finished points are skipped and nothing of theirs is touched. A point that
started but did not finish is launched again with the same config: `checkpoint.resume=auto` (the
generated default) continues from its latest checkpoint, and the trainer drops the metrics lines
after that checkpoint. If it died before its first checkpoint, its metrics.jsonl is renamed
(`metrics.jsonl.stale-N`, never deleted) and it starts over. Each attempt's wall time and exit code
go to RUN_DIR/sweep_point.json and its output to RUN_DIR/sweep.log.

The launcher is injectable (`launcher(cmd, log_path) -> exit code`) so tests check which points run
without training anything.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from .laws import SweepError
from .results import point_record, point_state
from .sweep import Point, Sweep, validate_points

Launcher = Callable[[list, Path], int]
_STOP = {"signal": 0}   # set when a signal reached the runner during a point: run no further points


def point_command(sweep: Sweep, point: Point, *, python: str = sys.executable, nproc: int = 1,
                  runs_dir: str | None = None, overrides: Sequence[str] = ()) -> list[str]:
    """`python -m pretrain --config POINT.yaml [logging.run_dir=...] [overrides]` (torchrun when nproc > 1)."""
    if nproc > 1:
        cmd = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pretrain"]
    else:
        cmd = [python, "-m", "pretrain"]
    cmd += ["--config", str(sweep.config_path(point))]
    if runs_dir:
        cmd.append(f"logging.run_dir={sweep.run_dir(point, runs_dir)}")
    return cmd + list(overrides)


def subprocess_launcher(cmd: list, log_path: Path) -> int:
    """Run cmd with its output appended to log_path; SIGTERM/SIGUSR1/SIGINT are passed on to it, so a
    preempted point saves a checkpoint and exits (the trainer handles them)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shlex.join(map(str, cmd))}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        forward = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

        def _pass_on(signum, frame):
            _STOP["signal"] = signum
            proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

        for s in forward:
            signal.signal(s, _pass_on)
        try:
            return proc.wait()
        finally:
            for s, h in forward.items():
                signal.signal(s, h)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _select(sweep: Sweep, indices: Sequence[int] | None) -> list[Point]:
    if indices is None:
        return list(sweep.points)
    bad = [i for i in indices if not 0 <= i < len(sweep.points)]
    if bad:
        raise SweepError(f"point index {bad[0]} is out of range: {sweep.path} has {len(sweep.points)} points "
                         f"(0..{len(sweep.points) - 1}); see python -m launch.sweep status {sweep.path}")
    return [sweep.points[i] for i in indices]


def _set_aside_stale(run_dir: Path) -> Path | None:
    """A point that died before its first checkpoint restarts at step 0: move its metrics aside (the
    trainer would append to them otherwise)."""
    m = run_dir / "metrics.jsonl"
    if not m.exists():
        return None
    n = 1
    while (run_dir / f"metrics.jsonl.stale-{n}").exists():
        n += 1
    dst = run_dir / f"metrics.jsonl.stale-{n}"
    os.replace(m, dst)
    return dst


def run_local(sweep: Sweep, *, indices: Sequence[int] | None = None, launcher: Launcher | None = None,
              runs_dir: str | None = None, overrides: Sequence[str] = (), nproc: int = 1,
              python: str = sys.executable, dry_run: bool = False, validate: bool = True,
              out: Callable[[str], None] = print) -> dict:
    """Run the unfinished points among `indices` (all by default) one after another. Returns
    {"skipped": [names], "ran": [names], "failed": [names]}."""
    launcher = launcher or subprocess_launcher
    todo, skipped = [], []
    for p in _select(sweep, indices):
        st = point_state(sweep.run_dir(p, runs_dir), p.steps)
        if st.finished:
            skipped.append(p.name)
            out(f"[{p.index}] {p.name}: finished ({p.steps} steps), skipped")
        else:
            todo.append((p, st))
    if validate and todo:  # every config loads before anything runs (a typo must not surface hours later)
        validate_points(sweep, [p for p, _ in todo], overrides)
    ran, failed = [], []
    _STOP["signal"] = 0
    for n, (p, st) in enumerate(todo):
        rd = sweep.run_dir(p, runs_dir)
        cmd = point_command(sweep, p, python=python, nproc=nproc, runs_dir=runs_dir, overrides=overrides)
        how = ("resuming from its checkpoint at step " + str(st.last_step) if st.status == "partial"
               and st.has_checkpoint else "starting over (no checkpoint)" if st.status == "partial" else "starting")
        out(f"[{p.index}] {p.name}: {how}; {p.steps} steps, C = {p.flops:.3g} ({n + 1}/{len(todo)})"
            + ("" if dry_run else f"; log {rd / 'sweep.log'}"))
        if dry_run:
            out("    " + shlex.join(map(str, cmd)))
            continue
        if st.status == "partial" and not st.has_checkpoint:
            stale = _set_aside_stale(rd)
            if stale:
                out(f"    its metrics without a checkpoint moved to {stale}")
        rd.mkdir(parents=True, exist_ok=True)
        t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S")
        rc = launcher(cmd, rd / "sweep.log")
        wall = time.perf_counter() - t0
        rec = point_record(rd)
        rec.setdefault("attempts", []).append({"started": started, "wall_s": round(wall, 2), "rc": rc,
                                                "start_step": st.last_step if st.has_checkpoint else 0,
                                                "host": os.uname().nodename,
                                                "slurm_job": os.environ.get("SLURM_JOB_ID")})
        rec["point"] = p.name
        tmp = rd / "sweep_point.json.tmp"
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(rd / "sweep_point.json")
        after = point_state(rd, p.steps)
        if rc == 0 and after.finished:
            ran.append(p.name)
            out(f"[{p.index}] {p.name}: finished in {wall:.1f} s")
        else:
            failed.append(p.name)
            why = f"exit code {rc}" if rc else f"exited at step {after.last_step} of {p.steps} (stopped by a signal?)"
            out(f"[{p.index}] {p.name}: NOT finished ({why}); rerun the same command to resume. "
                f"Last lines of {rd / 'sweep.log'}:\n{_tail(rd / 'sweep.log')}")
        if _STOP["signal"]:
            out(f"stopped by signal {_STOP['signal']}; {len(todo) - n - 1} point(s) not started. "
                f"Rerun the same command to resume")
            failed += [q.name for q, _ in todo[n + 1:]]
            break
    return {"skipped": skipped, "ran": ran, "failed": failed}


def array_spec(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sbatch --array)."""
    parts, idx = [], sorted(indices)
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(parts)


def submit_slurm(sweep: Sweep, script: str | Path, *, runs_dir: str | None = None, overrides: Sequence[str] = (),
                 nproc: int = 0, max_parallel: int = 0, sbatch_args: Sequence[str] = (), dry_run: bool = False,
                 validate: bool = True, runner: Callable = subprocess.run,
                 out: Callable[[str], None] = print) -> dict:
    """One sbatch array job over the unfinished points; array task i runs point i of the manifest
    (`python -m launch.sweep run MANIFEST --index i`, via `script`). Returns {"cmd", "indices"}."""
    todo = [p for p in sweep.points if not point_state(sweep.run_dir(p, runs_dir), p.steps).finished]
    if not todo:
        out(f"all {len(sweep.points)} points of {sweep.name} are finished; nothing to submit")
        return {"cmd": None, "indices": []}
    if validate:
        validate_points(sweep, todo, overrides)
    indices = [p.index for p in todo]
    array = array_spec(indices) + (f"%{max_parallel}" if max_parallel > 0 else "")
    cmd = ["sbatch", f"--array={array}", f"--job-name=sweep-{sweep.name}", *sbatch_args, str(script), str(sweep.path)]
    if runs_dir:
        cmd += ["--runs-dir", runs_dir]
    for o in overrides:
        cmd += ["--set", o]
    if nproc > 0:
        cmd = cmd[:1] + [f"--export=ALL,NPROC={nproc}"] + cmd[1:]
    out(f"{len(todo)} of {len(sweep.points)} points unfinished: " + ", ".join(f"{p.index}={p.name}" for p in todo))
    if dry_run:
        out("dry run; would submit:\n  " + shlex.join(cmd))
        return {"cmd": cmd, "indices": indices}
    try:
        res = runner(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SweepError("sbatch is not on PATH: submit from a Slurm login node, or run the points here with "
                         f"python -m launch.sweep run {sweep.path} (without --slurm)") from None
    if res.returncode != 0:
        raise SweepError(f"sbatch failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    out(res.stdout.strip())
    return {"cmd": cmd, "indices": indices}
