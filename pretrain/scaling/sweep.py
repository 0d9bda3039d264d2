"""IsoFLOP sweep generation (DeepSeek LLM §3.2): dense shapes for a target M, the points of each budget,
the manifest `configs/sweeps/NAME/sweep.yaml` and its `points/POINT.yaml` configs.

Validating a point config imports the model (torch), only when it is asked for.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import yaml

from .laws import DEEPSEEK_LLM, ScalingLaws, SweepError, budget_label, model_scale, parse_budgets


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
    from ..config import load_config  # imports the model (torch): only when validating
    from ..schedules import check_lr_schedule
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
        from ..config import parse_override
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
    header = ("# IsoFLOP sweep manifest (pretrain/scaling/sweep.py). One entry per point; `config` is the point's\n"
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
