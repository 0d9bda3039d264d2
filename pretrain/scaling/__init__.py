"""Scaling laws (DeepSeek LLM §3): the laws as data, IsoFLOP sweep generation, running the points, result
collection, power-law and IsoFLOP fits with bootstrap confidence intervals, and the plots.

    laws.py     the laws (B_opt, η_opt, M_opt, D_opt as power laws of C), M, C, compute budgets
    sweep.py    dense shapes, IsoFLOP points, the manifest: generate_sweep, load_sweep
    runner.py   running the points locally or as a Slurm array: run_local, submit_slurm
    results.py  each point's state and final losses: collect, write_results, load_results
    fit.py      fit_power_law, fit_isoflop
    plots.py    plot_isoflop, plot_laws

A sweep is a directory `configs/sweeps/NAME/`: `sweep.yaml` (the manifest: the laws used, the
budgets and one entry per point) and `points/POINT.yaml`, one complete pretrain config per point
(`python -m pretrain --config configs/sweeps/NAME/points/POINT.yaml` runs it by hand). Each point
trains to `logging.run_dir = RUNS_DIR/POINT` and evaluates on held-out data at its last step.
The CLI is `python -m launch.sweep`.

Only numpy and yaml are imported at module level (the CLI must start fast); validating a point
config imports the model (torch) and plotting imports matplotlib, each only when it is needed.
This file only hands the modules' names on, so that `from pretrain.scaling import X` keeps working.
"""
from .fit import IsoFlopFit, Parabola, PowerLawFit, fit_isoflop, fit_parabola, fit_power_law
from .laws import (DEEPSEEK_LLM, PowerLaw, ScalingLaws, SweepError, budget_label, compute_budget, model_scale,
                   parse_budgets)
from .plots import plot_isoflop, plot_laws
from .results import (RESULT_COLUMNS, PointState, collect, load_results, machine, non_embedding_params,
                      point_record, point_state, read_metrics, write_results)
from .runner import Launcher, array_spec, point_command, run_local, submit_slurm, subprocess_launcher
from .sweep import (DEFAULT_BASE, Point, Shape, Sweep, dense_shape, ffn_dim, generate_sweep, head_dim_for,
                    load_sweep, validate_points, write_manifest)

__all__ = [
    "DEEPSEEK_LLM", "DEFAULT_BASE", "RESULT_COLUMNS", "IsoFlopFit", "Launcher", "Parabola", "Point", "PointState",
    "PowerLaw", "PowerLawFit", "ScalingLaws", "Shape", "Sweep", "SweepError", "array_spec", "budget_label", "collect",
    "compute_budget", "dense_shape", "ffn_dim", "fit_isoflop", "fit_parabola", "fit_power_law", "generate_sweep",
    "head_dim_for", "load_results", "load_sweep", "machine", "model_scale", "non_embedding_params", "parse_budgets",
    "plot_isoflop", "plot_laws", "point_command", "point_record", "point_state", "read_metrics", "run_local",
    "submit_slurm", "subprocess_launcher", "validate_points", "write_manifest", "write_results",
]
