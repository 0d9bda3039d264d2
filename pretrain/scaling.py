"""Scaling laws (DeepSeek LLM §3): the laws as data, IsoFLOP sweep generation, result collection,
power-law and IsoFLOP fits with bootstrap confidence intervals, and the plots.

    M = 72·n_layer·d² + 12·n_layer·d·l_seq    non-embedding FLOPs per token (attention included)
    C = M·D                                   compute budget of D training tokens
    B_opt = 0.2920·C^0.3271 (tokens)   η_opt = 0.3118·C^-0.1250
    M_opt = 0.1715·C^0.5243            D_opt = 5.8316·C^0.4757

A sweep is a directory `configs/sweeps/NAME/`: `sweep.yaml` (the manifest: the laws used, the
budgets and one entry per point) and `points/POINT.yaml`, one complete pretrain config per point
(`python -m pretrain --config configs/sweeps/NAME/points/POINT.yaml` runs it by hand). Each point
trains to `logging.run_dir = RUNS_DIR/POINT` and evaluates on held-out data at its last step.
Running the points (locally, one after another, or as a Slurm array) is `pretrain/sweep.py`; the
CLI is `python -m launch.sweep`.

Only numpy and yaml are imported at module level (the CLI must start fast); validating a point
config imports the model (torch) and plotting imports matplotlib, each only when it is needed.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import yaml


class SweepError(ValueError):
    """A sweep problem (bad budget, missing manifest, bad point config, ...); the message names the
    problem and the fix."""


# -- the laws --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLaw:
    """y = k · x^a."""

    k: float
    a: float

    def __call__(self, x):
        return self.k * np.asarray(x, dtype=float) ** self.a if np.ndim(x) else self.k * float(x) ** self.a

    def to_dict(self) -> dict:
        return {"k": self.k, "a": self.a}

    @classmethod
    def from_dict(cls, d: dict) -> "PowerLaw":
        return cls(k=float(d["k"]), a=float(d["a"]))


@dataclass(frozen=True)
class ScalingLaws:
    """Compute-optimal hyperparameters and allocation as power laws of the compute budget C."""

    batch: PowerLaw        # B_opt(C), tokens per step
    lr: PowerLaw           # η_opt(C), peak learning rate
    model: PowerLaw        # M_opt(C), non-embedding FLOPs per token
    data: PowerLaw         # D_opt(C), tokens
    name: str = "custom"

    def to_dict(self) -> dict:
        return {"name": self.name, **{k: getattr(self, k).to_dict() for k in ("batch", "lr", "model", "data")}}

    @classmethod
    def from_dict(cls, d: dict) -> "ScalingLaws":
        return cls(name=d.get("name", "custom"),
                   **{k: PowerLaw.from_dict(d[k]) for k in ("batch", "lr", "model", "data")})


DEEPSEEK_LLM = ScalingLaws(
    batch=PowerLaw(0.2920, 0.3271),    # DeepSeek LLM §3.1: B_opt = 0.2920·C^0.3271
    lr=PowerLaw(0.3118, -0.1250),      # DeepSeek LLM §3.1: η_opt = 0.3118·C^-0.1250
    model=PowerLaw(0.1715, 0.5243),    # DeepSeek LLM §3.2: M_opt = 0.1715·C^0.5243
    data=PowerLaw(5.8316, 0.4757),     # DeepSeek LLM §3.2: D_opt = 5.8316·C^0.4757
    name="deepseek-llm")


def model_scale(n_layers: int, dim: int, seq_len: int) -> int:
    """M, the non-embedding FLOPs per token of a dense decoder (attention included, vocabulary not)."""
    return 72 * n_layers * dim * dim + 12 * n_layers * dim * seq_len  # DeepSeek LLM §3.2, M


def compute_budget(m: float, tokens: float) -> float:
    return m * tokens  # DeepSeek LLM §3.2: C = M·D


# -- budgets ---------------------------------------------------------------------------------------
_BUDGET_HELP = ("write budgets in FLOPs as comma-separated numbers (--budgets 1e11,3e11,1e12) or as "
                "a log-spaced range START:STOP:N (--budgets 1e11:1e12:3)")


def _number(text: str, what: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise SweepError(f"budget {text!r} in {what!r} is not a number; {_BUDGET_HELP}") from None
    if not math.isfinite(x) or x <= 0:
        raise SweepError(f"budget {text!r} in {what!r} must be a positive finite number of FLOPs; {_BUDGET_HELP}")
    return x


def parse_budgets(text: str | Sequence) -> list[float]:
    """'1e11,3e11,1e12' or '1e11:1e12:3' (log-spaced) or a list of numbers -> sorted unique budgets."""
    if not isinstance(text, str):
        items = [str(x) for x in text]
        out = [_number(x, ",".join(items)) for x in items]
    elif ":" in text:
        parts = text.split(":")
        if len(parts) != 3 or not parts[2].strip().isdigit() or int(parts[2]) < 1:
            raise SweepError(f"budget range {text!r} must be START:STOP:N with N a positive integer; {_BUDGET_HELP}")
        lo, hi, n = _number(parts[0].strip(), text), _number(parts[1].strip(), text), int(parts[2])
        if hi < lo:
            raise SweepError(f"budget range {text!r}: STOP must be >= START; {_BUDGET_HELP}")
        out = list(np.geomspace(lo, hi, n)) if n > 1 else [lo]
        out = [float(f"{x:.4g}") for x in out]
    else:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise SweepError(f"no budgets in {text!r}; {_BUDGET_HELP}")
        out = [_number(x, text) for x in items]
    if len(set(out)) != len(out):
        raise SweepError(f"budgets {text!r} repeat a value; give each budget once")
    return sorted(out)


def budget_label(c: float) -> str:
    """1e11 -> '1e11', 3e11 -> '3e11', 1.5e12 -> '1.5e12' (file-name friendly)."""
    mant, exp = f"{c:.3e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


# -- shapes ----------------------------------------------------------------------------------------
def head_dim_for(dim: int) -> int:
    """Head size for a width: 16 for toy widths, growing to DeepSeek LLM's 128 (7B: 4096 = 32 x 128)."""
    return 16 if dim < 256 else 32 if dim < 512 else 64 if dim < 2048 else 128


def ffn_dim(dim: int, multiple: int = 8) -> int:
    """SwiGLU hidden size with 3·d·h = 8·d² (so a block is 12·d², the 72 = 6 x 12 of M), rounded."""
    return max(multiple, int(round(8 * dim / 3 / multiple)) * multiple)


@dataclass(frozen=True)
class Shape:
    n_layers: int
    dim: int
    n_heads: int
    inter_dim: int

    def m(self, seq_len: int) -> int:
        return model_scale(self.n_layers, self.dim, seq_len)


def dense_shape(target_m: float, seq_len: int, aspect: float = 32.0, min_dim: int = 32,
                max_layers: int = 128) -> Shape:
    """The dense shape whose M is closest to target_m with width/depth near `aspect`.

    For each depth, the width solving 72·L·d² + 12·L·d·l = M is rounded down and up to a multiple of
    the head size (at least min_dim); among the candidates with d/L within [aspect/4, 4·aspect] (all of
    them if none is), the one minimising |ln(M/target)| + 0.25·|ln((d/L)/aspect)| wins.
    """
    cands = []
    for n_layers in range(1, max_layers + 1):
        a, b = 72.0 * n_layers, 12.0 * n_layers * seq_len
        d = (-b + math.sqrt(b * b + 4 * a * target_m)) / (2 * a)
        g = head_dim_for(max(int(d), 1))
        for dim in sorted({max(min_dim, g * math.floor(d / g)), max(min_dim, g * math.ceil(d / g))}):
            hd = head_dim_for(dim)
            if dim % hd:
                continue
            m = model_scale(n_layers, dim, seq_len)
            off = abs(math.log(dim / n_layers / aspect))
            cands.append((abs(math.log(m / target_m)) + 0.25 * off, off <= math.log(4.0),
                          Shape(n_layers, dim, dim // hd, ffn_dim(dim))))
    pool = [c for c in cands if c[1]] or cands
    return min(pool, key=lambda c: c[0])[2]


# -- sweep generation ------------------------------------------------------------------------------
DEFAULT_BASE = {
    # a dense DeepSeek-LLM block (pre-norm RMSNorm, SwiGLU, RoPE, MHA); widths are set per point
    "model": {"preset": "tiny-deepseek-llm-7b"},
    "parallel": {"tp": 1, "pp": 1, "ep": 1, "dp": 0},
    "train": {"seed": 0, "lr_schedule": "multistep",  # DeepSeek LLM §2.3: x0.316 at 80%, x0.1 at 90%
              "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95, "grad_clip": 1.0, "dtype": "fp32"},
    "data": {"embedded": True, "vocab_size": 512},
    "checkpoint": {"keep": 1, "resume": "auto"},
    "logging": {"wandb": "disabled", "every": 10},
}


@dataclass
class Point:
    """One run of a sweep; `config` is relative to the manifest's directory."""

    name: str
    index: int
    budget: float
    config: str
    n_layers: int
    dim: int
    n_heads: int
    inter_dim: int
    m: int                   # M, FLOPs per token
    tokens: int              # D = steps x global batch x seq_len
    flops: float             # C = M·D (equals budget within one step's rounding)
    steps: int
    global_batch_size: int
    lr: float
    run_dir: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Sweep:
    name: str
    path: Path               # the manifest
    laws: ScalingLaws
    seq_len: int
    budgets: list[float]
    runs_dir: str
    points: list[Point] = field(default_factory=list)
    command: str = ""

    @property
    def root(self) -> Path:
        return self.path.parent

    def config_path(self, p: Point) -> Path:
        return self.root / p.config

    def run_dir(self, p: Point, runs_dir: str | None = None) -> Path:
        return Path(runs_dir) / p.name if runs_dir else Path(p.run_dir)


def _deep_merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _set_dotted(d: dict, dotted: str, value) -> None:
    section, _, key = dotted.partition(".")
    if not key:
        raise SweepError(f"--set {dotted}=...: keys are SECTION.KEY, e.g. --set data.vocab_size=1024")
    d.setdefault(section, {})[key] = value


def _validate(path: Path, overrides: Sequence[str] = ()):
    """load_config on a point file; a failure names the file and the fix."""
    from .config import load_config  # imports the model (torch): only when validating
    from .schedules import check_lr_schedule
    try:
        cfg = load_config(path, list(overrides))
        t = cfg.train
        check_lr_schedule(t.lr_schedule, t.warmup_steps, t.steps, t.min_lr_ratio, t.lr_milestones, t.lr_factors)
        return cfg
    except ValueError as e:  # ConfigError, or the schedule check (which the trainer would raise later)
        raise SweepError(f"point config {path} does not load: {e}. Fix that key: in the generator's --base/--set "
                         f"options, then regenerate (python -m launch.sweep generate ... --force); in run's --set; "
                         f"or by editing {path}") from None


def generate_sweep(name: str, budgets: Sequence[float], out_dir: str | Path = "configs/sweeps", *,
                   laws: ScalingLaws = DEEPSEEK_LLM, seq_len: int = 128, n_points: int = 4, span: float = 3.0,
                   aspect: float = 32.0, min_dim: int = 32, base: dict | None = None, sets: Sequence[str] = (),
                   runs_dir: str | None = None, warmup_fraction: float = 0.05, eval_tokens: int = 32768,
                   checkpoints_per_run: int = 4, micro_batch_size: int = 0, command: str = "",
                   validate: bool = True, overwrite: bool = False) -> Sweep:
    """Write an IsoFLOP sweep: for each budget C, n_points dense shapes with M from M_opt(C)/span to
    M_opt(C)·span (log-spaced), each trained on D = C/M tokens with the batch B_opt(C) and peak LR
    η_opt(C). Returns the Sweep; the manifest is OUT_DIR/NAME/sweep.yaml. An existing sweep is only
    replaced with `overwrite` (its run directories are never touched)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SweepError(f"sweep name {name!r} must be letters, digits, '_', '-' or '.' (it names a directory)")
    if n_points < 3:
        raise SweepError(f"--points {n_points}: an IsoFLOP parabola needs at least 3 points per budget")
    if span <= 1:
        raise SweepError(f"--span {span}: the shapes span M_opt/span .. M_opt·span, so span must be > 1")
    budgets = parse_budgets(budgets)
    cfg = _deep_merge(DEFAULT_BASE, base or {})
    for s in sets:
        from .config import parse_override
        key, value = parse_override(s)
        _set_dotted(cfg, key, value)
    cfg.setdefault("data", {})["seq_len"] = seq_len
    vocab = cfg["data"].get("vocab_size", 4096)
    cfg["model"].setdefault("vocab_size", vocab)
    cfg["model"]["max_seq_len"] = max(seq_len, int(cfg["model"].get("max_seq_len", 0)))
    runs_dir = runs_dir or f"runs/sweeps/{name}"
    root = Path(out_dir) / name
    if (root / "sweep.yaml").exists() and not overwrite:
        raise SweepError(f"sweep {root} already exists; pass --force to regenerate it (its runs are kept; give a "
                         f"new --runs-dir if points change, so that no run resumes under another config)")
    pts_dir = root / "points"
    pts_dir.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(name=name, path=root / "sweep.yaml", laws=laws, seq_len=seq_len, budgets=budgets,
                  runs_dir=runs_dir, command=command)
    for c in budgets:
        gbs = max(1, round(laws.batch(c) / seq_len))   # DeepSeek LLM §3.1: B_opt in tokens -> sequences
        lr = float(f"{laws.lr(c):.4g}")                # DeepSeek LLM §3.1: η_opt
        m_opt = laws.model(c)
        targets = m_opt * span ** np.linspace(-1.0, 1.0, n_points)
        shapes = []
        for t in targets:
            s = dense_shape(float(t), seq_len, aspect, min_dim)
            if s not in shapes:
                shapes.append(s)
        if len(shapes) < 3:
            raise SweepError(f"budget {budget_label(c)}: only {len(shapes)} distinct shapes between "
                             f"M_opt/{span:g} and M_opt·{span:g} (M_opt = {m_opt:.3g}); raise the budget, "
                             f"--span or --points, or lower --min-dim")
        for s in sorted(shapes, key=lambda s: s.m(seq_len)):
            m = s.m(seq_len)
            steps = max(1, round(c / m / (gbs * seq_len)))   # D = C/M, in whole steps
            mbs = gbs if micro_batch_size <= 0 else max(d for d in range(1, min(gbs, micro_batch_size) + 1)
                                                         if gbs % d == 0)
            pname = f"C{budget_label(c)}_L{s.n_layers}_d{s.dim}"
            point_cfg = _deep_merge(cfg, {
                "model": {"n_layers": s.n_layers, "dim": s.dim, "n_heads": s.n_heads, "n_kv_heads": s.n_heads,
                          "inter_dim": s.inter_dim},
                "train": {"steps": steps, "lr": lr, "global_batch_size": gbs, "micro_batch_size": mbs,
                          "warmup_steps": max(1, min(2000, round(warmup_fraction * steps))),
                          "eval_every": steps,   # held-out evaluation at step 0 and at the last step
                          "eval_batches": max(2, math.ceil(eval_tokens / (gbs * seq_len)))},
                "checkpoint": {"every": max(1, math.ceil(steps / checkpoints_per_run))},
                "logging": {"run_dir": f"{runs_dir}/{pname}"},
            })
            point = Point(name=pname, index=len(sweep.points), budget=c, config=f"points/{pname}.yaml",
                          n_layers=s.n_layers, dim=s.dim, n_heads=s.n_heads, inter_dim=s.inter_dim, m=m,
                          tokens=steps * gbs * seq_len, flops=float(m * steps * gbs * seq_len), steps=steps,
                          global_batch_size=gbs, lr=lr, run_dir=f"{runs_dir}/{pname}")
            header = (f"# IsoFLOP point {pname} of sweep {name} (generated by python -m launch.sweep generate; "
                      f"DeepSeek LLM §3)\n# C = {c:.4g} FLOPs, M = {m:,} FLOPs/token, D = {point.tokens:,} tokens "
                      f"({steps} steps x {gbs} x {seq_len}), B_opt and eta_opt from the {laws.name} laws\n")
            if any(q.name == pname for q in sweep.points):
                raise SweepError(f"budgets {budget_label(c)} and another one give the same point name {pname}; "
                                 f"make the budgets differ in their first 4 significant digits")
            path = pts_dir / f"{pname}.yaml"
            path.write_text(header + yaml.safe_dump(point_cfg, sort_keys=False))
            if validate:
                mc = _validate(path).model_config()
                if mc.attention != "gqa" or mc.is_moe or mc.gqa_head_dim * mc.n_heads != mc.dim:
                    raise SweepError(f"{path}: model.preset {mc.name!r} is not a dense GQA/MHA model with "
                                     f"head_dim = dim / n_heads, which M = 72·L·d² + 12·L·d·l_seq describes; use "
                                     f"--set model.preset=tiny-deepseek-llm-7b (or deepseek-llm-7b)")
            sweep.points.append(point)
    keep = {Path(p.config).name for p in sweep.points}
    for stale in pts_dir.glob("*.yaml"):       # configs of an earlier generation (configs only, never runs)
        if stale.name not in keep:
            stale.unlink()
    write_manifest(sweep)
    return sweep


def write_manifest(sweep: Sweep) -> Path:
    doc = {"name": sweep.name, "command": sweep.command, "laws": sweep.laws.to_dict(), "seq_len": sweep.seq_len,
           "budgets": [float(c) for c in sweep.budgets], "runs_dir": sweep.runs_dir,
           "points": [p.to_dict() for p in sweep.points]}
    header = ("# IsoFLOP sweep manifest (pretrain/scaling.py). One entry per point; `config` is the point's\n"
              "# pretrain config, relative to this file. Run: python -m launch.sweep run " + str(sweep.path) + "\n")
    sweep.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sweep.path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(sweep.path)
    return sweep.path


def load_sweep(path: str | Path) -> Sweep:
    """The manifest at PATH (or PATH/sweep.yaml for a sweep directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "sweep.yaml"
    if not p.is_file():
        raise SweepError(f"sweep manifest {p} does not exist; create it with "
                         f"python -m launch.sweep generate --name NAME --budgets 1e11,3e11,1e12 "
                         f"(it writes configs/sweeps/NAME/sweep.yaml)")
    try:
        doc = yaml.safe_load(p.read_text())
        laws = ScalingLaws.from_dict(doc["laws"])
        points = [Point(**{k: e[k] for k in (f.name for f in dataclasses.fields(Point))}) for e in doc["points"]]
        sweep = Sweep(name=doc["name"], path=p, laws=laws, seq_len=int(doc["seq_len"]),
                      budgets=[float(c) for c in doc["budgets"]], runs_dir=doc["runs_dir"], points=points,
                      command=doc.get("command", ""))
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise SweepError(f"{p} is not a sweep manifest ({type(e).__name__}: {e}); regenerate it with "
                         f"python -m launch.sweep generate") from None
    for pt in sweep.points:
        if not sweep.config_path(pt).is_file():
            raise SweepError(f"{p}: point {pt.name}'s config {sweep.config_path(pt)} is missing; regenerate the "
                             f"sweep with python -m launch.sweep generate")
    return sweep


def validate_points(sweep: Sweep, points: Iterable[Point], overrides: Sequence[str] = ()) -> None:
    for p in points:
        _validate(sweep.config_path(p), overrides)


# -- results ---------------------------------------------------------------------------------------
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


# -- fitting ---------------------------------------------------------------------------------------
@dataclass
class PowerLawFit:
    law: PowerLaw
    k_ci: tuple[float, float]
    a_ci: tuple[float, float]
    n: int                   # data points
    n_boot: int              # bootstrap fits that succeeded
    confidence: float
    samples: np.ndarray = field(default=None, repr=False)   # [n_boot, 2] (k, a)

    def to_dict(self) -> dict:
        return {"k": self.law.k, "a": self.law.a, "k_ci": list(self.k_ci), "a_ci": list(self.a_ci), "n": self.n,
                "n_boot": self.n_boot, "confidence": self.confidence}


def _loglog(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    a, logk = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(logk)), float(a)


def _ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


def fit_power_law(x: Sequence[float], y: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                  confidence: float = 0.95) -> PowerLawFit:
    """y = k·x^a by least squares on (ln x, ln y); percentile CIs from a pairs bootstrap (resample the
    points with replacement, refit; resamples with fewer than 2 distinct x are redrawn)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise SweepError(f"a power-law fit needs at least 2 (x, y) pairs of equal length, got {len(x)} and {len(y)}")
    if np.any(x <= 0) or np.any(y <= 0):
        raise SweepError("a power-law fit needs positive x and y (it fits in log-log space)")
    if len(np.unique(x)) < 2:
        raise SweepError("a power-law fit needs at least 2 distinct x values")
    k, a = _loglog(x, y)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        for _try in range(100):
            idx = rng.integers(0, len(x), len(x))
            if len(np.unique(x[idx])) >= 2:
                samples.append(_loglog(x[idx], y[idx]))
                break
    s = np.array(samples) if samples else np.empty((0, 2))
    k_ci = _ci(s[:, 0], confidence) if len(s) else (k, k)
    a_ci = _ci(s[:, 1], confidence) if len(s) else (a, a)
    return PowerLawFit(PowerLaw(k, a), k_ci, a_ci, len(x), len(s), confidence, s)


@dataclass
class Parabola:
    """loss = c0 + c1·u + c2·u², u = ln M; the IsoFLOP curve of one budget."""

    coeffs: tuple[float, float, float]

    @property
    def convex(self) -> bool:
        return self.coeffs[2] > 0

    @property
    def m_opt(self) -> float:
        c0, c1, c2 = self.coeffs
        return math.exp(-c1 / (2 * c2))

    @property
    def loss_min(self) -> float:
        c0, c1, c2 = self.coeffs
        return c0 - c1 * c1 / (4 * c2)

    def __call__(self, m):
        u = np.log(np.asarray(m, float))
        c0, c1, c2 = self.coeffs
        return c0 + c1 * u + c2 * u * u


def fit_parabola(m: Sequence[float], loss: Sequence[float]) -> Parabola:
    """Least-squares parabola of loss in ln M (DeepSeek LLM §3.2 IsoFLOP; Chinchilla approach 2)."""
    m, loss = np.asarray(m, float), np.asarray(loss, float)
    if len(np.unique(m)) < 3:
        raise SweepError(f"an IsoFLOP parabola needs at least 3 distinct model sizes, got {len(np.unique(m))}")
    c2, c1, c0 = np.polyfit(np.log(m), loss, 2)
    return Parabola((float(c0), float(c1), float(c2)))


@dataclass
class IsoFlopFit:
    budgets: list[float]
    parabolas: list[Parabola]
    m_opt: list[float]
    m_opt_ci: list[tuple[float, float]]
    in_range: list[bool]           # the minimum lies within the sampled sizes
    model: PowerLawFit             # M_opt = k·C^a
    data: PowerLawFit              # D_opt = C / M_opt = (1/k)·C^(1-a)
    n_boot: int
    n_boot_failed: int             # replicates dropped for a non-convex parabola
    seed: int

    def to_dict(self) -> dict:
        return {"method": "IsoFLOP: per budget a least-squares parabola of final val loss in ln M, its minimum "
                          "M_opt(C); then ln M_opt = ln k + a ln C (DeepSeek LLM §3.2). CIs: percentile, "
                          "bootstrap resampling each budget's points with replacement",
                "budgets": [{"C": c, "parabola_c0_c1_c2": list(p.coeffs), "m_opt": m, "d_opt": c / m,
                             "m_opt_ci": list(ci), "loss_min": p.loss_min, "minimum_in_sampled_range": r}
                            for c, p, m, ci, r in zip(self.budgets, self.parabolas, self.m_opt, self.m_opt_ci,
                                                      self.in_range)],
                "model": self.model.to_dict(), "data": self.data.to_dict(),
                "n_boot": self.n_boot, "n_boot_failed": self.n_boot_failed, "seed": self.seed}

    def laws(self, like: ScalingLaws = DEEPSEEK_LLM) -> ScalingLaws:
        """The fitted allocation laws with `like`'s batch and LR laws (this fit does not estimate those)."""
        return ScalingLaws(batch=like.batch, lr=like.lr, model=self.model.law, data=self.data.law, name="fitted")


def fit_isoflop(points: Sequence[dict], *, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95,
                loss_key: str = "final_val_loss") -> IsoFlopFit:
    """From result rows (budget, m, final_val_loss): per-budget parabola minima, then M_opt(C) and
    D_opt(C) power laws, with a bootstrap that resamples each budget's points (at least 3 distinct
    sizes per resample) and refits everything; replicates with a non-convex parabola are dropped and
    counted."""
    by_c: dict[float, list[tuple[float, float]]] = {}
    for r in points:
        if r.get(loss_key) is None:
            continue
        by_c.setdefault(float(r["budget"]), []).append((float(r["m"]), float(r[loss_key])))
    budgets = sorted(by_c)
    if len(budgets) < 2:
        raise SweepError(f"an IsoFLOP fit needs finished points of at least 2 budgets, got {len(budgets)}; "
                         f"run the remaining points (python -m launch.sweep run SWEEP) and collect again")
    data = {c: np.array(by_c[c]) for c in budgets}
    parabolas = []
    for c in budgets:
        par = fit_parabola(data[c][:, 0], data[c][:, 1])
        if not par.convex:
            raise SweepError(f"budget {budget_label(c)}: the loss is not convex in ln M over the sampled sizes "
                             f"(no minimum); widen the span of sizes (--span) or add points")
        parabolas.append(par)
    m_opt = np.array([p.m_opt for p in parabolas])
    in_range = [bool(data[c][:, 0].min() <= m <= data[c][:, 0].max()) for c, m in zip(budgets, m_opt)]
    cs = np.array(budgets)
    model = fit_power_law(cs, m_opt, n_boot=0)
    rng = np.random.default_rng(seed)
    boot, boot_m, failed = [], [], 0
    for _ in range(n_boot):
        ms = []
        for c in budgets:
            pts = data[c]
            while True:
                idx = rng.integers(0, len(pts), len(pts))
                if len(np.unique(pts[idx, 0])) >= 3:
                    break
            par = fit_parabola(pts[idx, 0], pts[idx, 1])
            if not par.convex:
                break
            ms.append(par.m_opt)
        if len(ms) < len(budgets):
            failed += 1
            continue
        boot_m.append(ms)
        boot.append(_loglog(cs, np.array(ms)))
    s = np.array(boot) if boot else np.empty((0, 2))
    bm = np.array(boot_m) if boot_m else np.empty((0, len(budgets)))
    k_ci = _ci(s[:, 0], confidence) if len(s) else (model.law.k,) * 2
    a_ci = _ci(s[:, 1], confidence) if len(s) else (model.law.a,) * 2
    model = PowerLawFit(model.law, k_ci, a_ci, len(budgets), len(s), confidence, s)
    # D_opt = C / M_opt: k_D = 1/k_M, a_D = 1 - a_M (the same bootstrap replicates)
    ds = np.column_stack([1.0 / s[:, 0], 1.0 - s[:, 1]]) if len(s) else s
    dlaw = PowerLaw(1.0 / model.law.k, 1.0 - model.law.a)
    data_fit = PowerLawFit(dlaw, _ci(ds[:, 0], confidence) if len(ds) else (dlaw.k,) * 2,
                           _ci(ds[:, 1], confidence) if len(ds) else (dlaw.a,) * 2,
                           len(budgets), len(ds), confidence, ds)
    m_ci = [_ci(bm[:, i], confidence) if len(bm) else (m_opt[i],) * 2 for i in range(len(budgets))]
    return IsoFlopFit(budgets, parabolas, [float(m) for m in m_opt], m_ci, in_range, model, data_fit,
                      n_boot, failed, seed)


# -- plots -----------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_isoflop(points: Sequence[dict], fit: IsoFlopFit, path: str | Path, title: str = "") -> Path:
    """Final validation loss vs M, one curve per budget, the fitted parabolas and their minima."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(fit.budgets)))
    for c, par, m, col in zip(fit.budgets, fit.parabolas, fit.m_opt, colors):
        pts = sorted((r["m"], r["final_val_loss"]) for r in points
                     if float(r["budget"]) == c and r.get("final_val_loss") is not None)
        xs = np.array([p[0] for p in pts])
        ax.plot(xs, [p[1] for p in pts], "o", color=col, label=f"C = {c:.2g} FLOPs")
        grid = np.geomspace(min(xs.min(), m) / 1.3, max(xs.max(), m) * 1.3, 200)
        ax.plot(grid, par(grid), "-", color=col, lw=1.2)
        ax.plot([m], [par.loss_min], "*", color=col, ms=14, mec="k", mew=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("M (non-embedding FLOPs / token)")
    ax.set_ylabel("final validation loss (nats / token)")
    ax.set_title(title or "IsoFLOP curves (stars: parabola minima M_opt)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_laws(fit: IsoFlopFit, path: str | Path, reference: ScalingLaws = DEEPSEEK_LLM, title: str = "") -> Path:
    """M_opt(C) and D_opt(C): the IsoFLOP minima, the fitted laws with their bootstrap band, and the
    reference (DeepSeek LLM) laws."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    cs = np.array(fit.budgets)
    grid = np.geomspace(cs.min() / 2, cs.max() * 2, 100)
    for ax, law_fit, ref, ys, what in ((axes[0], fit.model, reference.model, np.array(fit.m_opt), "M_opt"),
                                       (axes[1], fit.data, reference.data, cs / np.array(fit.m_opt), "D_opt")):
        if law_fit.samples is not None and len(law_fit.samples):
            curves = law_fit.samples[:, 0:1] * grid[None, :] ** law_fit.samples[:, 1:2]
            lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
            ax.fill_between(grid, lo, hi, color="C0", alpha=0.2, label="95% bootstrap band")
        if what == "M_opt":
            err = np.array(fit.m_opt_ci).T
            ax.errorbar(cs, ys, yerr=[np.maximum(ys - err[0], 0), np.maximum(err[1] - ys, 0)], fmt="o", color="C0",
                        capsize=3, label="IsoFLOP minima")
        else:
            ax.plot(cs, ys, "o", color="C0", label="IsoFLOP minima (C / M_opt)")
        a_lo, a_hi = law_fit.a_ci
        ax.plot(grid, law_fit.law(grid), "-", color="C0",
                label=f"fit: {law_fit.law.k:.3g}·C^{law_fit.law.a:.3f} (a in [{a_lo:.2f}, {a_hi:.2f}])")
        ax.plot(grid, ref(grid), "--", color="C3", label=f"DeepSeek LLM: {ref.k:g}·C^{ref.a:g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("C (FLOPs)")
        ax.set_ylabel(f"{what} ({'FLOPs / token' if what == 'M_opt' else 'tokens'})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Compute-optimal allocation")
    return _save(plt, fig, path)
