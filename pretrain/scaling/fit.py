"""Fits (DeepSeek LLM §3.2): power laws y = k·x^a and IsoFLOP parabolas of the loss in ln M, with
bootstrap confidence intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .laws import DEEPSEEK_LLM, PowerLaw, ScalingLaws, SweepError, budget_label


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

