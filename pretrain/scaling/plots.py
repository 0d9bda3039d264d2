"""The plots of a sweep: IsoFLOP curves and the fitted M_opt(C), D_opt(C) against DeepSeek LLM's.
matplotlib is imported only when a plot is drawn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .fit import IsoFlopFit
from .laws import DEEPSEEK_LLM, ScalingLaws


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
