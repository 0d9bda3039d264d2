"""Collecting a sweep's results: each point's state (finished, partial, not started) from its run
directory, one row per point (shape, M, D, C, final losses, wall time), RESULTS.json and RESULTS.csv.
"""
from __future__ import annotations

import csv
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .laws import SweepError
from .sweep import Sweep


def read_metrics(path: str | Path) -> dict[int, dict]:
    """metrics.jsonl as {step: merged row}; a later line for a step wins, a cut-off line is skipped."""
    rows: dict[int, dict] = {}
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[row["step"]] = row
    return rows


@dataclass
class PointState:
    status: str              # "finished" | "partial" | "not started"
    last_step: int           # last logged training step (0 when none)
    has_checkpoint: bool

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def point_state(run_dir: str | Path, steps: int) -> PointState:
    """Finished: metrics.jsonl reaches the last step with its final validation loss. Partial: it
    started (metrics, checkpoints) but did not finish. Not started: nothing there."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_steps = [s for s, r in rows.items() if "loss" in r or "lm_loss" in r]
    last = max(train_steps, default=0)
    ckpt = run_dir / "checkpoints"
    has_ckpt = ckpt.is_dir() and any(ckpt.glob("step_*"))
    final = rows.get(steps, {})
    if last >= steps and "val_lm_loss" in final and ("loss" in final or "lm_loss" in final):
        return PointState("finished", last, has_ckpt)
    if rows or has_ckpt or (run_dir / "config.yaml").is_file():
        return PointState("partial", last, has_ckpt)
    return PointState("not started", 0, False)


def point_record(run_dir: str | Path) -> dict:
    """The runner's record RUN_DIR/sweep_point.json: attempts with their wall time and exit code."""
    p = Path(run_dir) / "sweep_point.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {"attempts": []}
    except json.JSONDecodeError:
        return {"attempts": []}


def non_embedding_params(n_layers: int, dim: int, inter_dim: int) -> int:
    """Weights of the dense MHA decoder blocks (q, k, v, o, the three SwiGLU matrices, two norms)."""
    return n_layers * (4 * dim * dim + 3 * dim * inter_dim + 2 * dim)


def machine() -> dict:
    """Where the numbers were measured (no torch import)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version
        torch_version = version("torch")
    except Exception:  # noqa: BLE001 - not installed, or metadata unreadable
        torch_version = "?"
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch_version, "system": f"{platform.system()} {platform.release()}"}


RESULT_COLUMNS = ("name", "budget", "status", "n_layers", "dim", "n_heads", "inter_dim", "params_non_embedding",
                  "m", "steps", "global_batch_size", "lr", "tokens", "flops", "last_step", "final_train_loss",
                  "final_val_loss", "initial_val_loss", "wall_s", "train_s")


def collect(sweep: Sweep, runs_dir: str | None = None) -> list[dict]:
    """One row per point: its shape, M, D, C, the final train and validation losses, the tokens and
    FLOPs actually trained, and the wall time (from the runner's record; None when it has none)."""
    out = []
    for p in sweep.points:
        rd = sweep.run_dir(p, runs_dir)
        state = point_state(rd, p.steps)
        rows = read_metrics(rd / "metrics.jsonl")
        train = [rows[s] for s in sorted(rows) if "loss" in rows[s] or "lm_loss" in rows[s]]
        last = train[-1] if train else {}
        final = rows.get(p.steps, {}) if state.finished else {}
        consumed = last.get("consumed_samples")
        tokens = int(consumed * sweep.seq_len) if consumed is not None else None
        attempts = point_record(rd).get("attempts", [])
        every = max(1, (train[1]["step"] - train[0]["step"]) if len(train) > 1 else 1)
        out.append({
            "name": p.name, "budget": p.budget, "status": state.status, "n_layers": p.n_layers, "dim": p.dim,
            "n_heads": p.n_heads, "inter_dim": p.inter_dim,
            "params_non_embedding": non_embedding_params(p.n_layers, p.dim, p.inter_dim),
            "m": p.m, "steps": p.steps, "global_batch_size": p.global_batch_size, "lr": p.lr,
            "tokens": tokens, "flops": float(p.m * tokens) if tokens is not None else None,
            "last_step": state.last_step,
            "final_train_loss": final.get("lm_loss", final.get("loss")) if final else None,
            "final_val_loss": final.get("val_lm_loss") if final else None,
            "initial_val_loss": rows.get(0, {}).get("val_lm_loss"),
            "wall_s": round(sum(a.get("wall_s", 0.0) for a in attempts), 2) if attempts else None,
            # logged step times x the logging interval: the time spent in training steps
            "train_s": round(sum(r.get("step_time", 0.0) for r in train) * every, 2) if train else None,
        })
    return out


def write_results(rows: list[dict], path: str | Path, sweep: Sweep | None = None) -> tuple[Path, Path]:
    """RESULTS.json (rows + sweep + machine) and RESULTS.csv (the rows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"sweep": sweep.name if sweep else None, "manifest": str(sweep.path) if sweep else None,
           "laws": sweep.laws.to_dict() if sweep else None, "seq_len": sweep.seq_len if sweep else None,
           "machine": machine(), "points": rows}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    csv_path = path.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(RESULT_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path, csv_path


def load_results(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"results file {p} does not exist; make it with python -m launch.sweep collect SWEEP")
    try:
        doc = json.loads(p.read_text())
        doc["points"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SweepError(f"{p} is not a results file of python -m launch.sweep collect ({e})") from None
    return doc
