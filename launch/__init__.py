"""Launching: `torchrun` and Slurm scripts, scaling-law sweep submission (`python -m launch.sweep`)
and the cluster planner (`python -m launch.plan`). These are thin command lines: the planner's model
lives in `plan/planner.py`, the sweeps' laws, fits and runner in `pretrain/scaling/`.
"""
