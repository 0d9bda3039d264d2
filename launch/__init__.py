"""Launching: `torchrun` and Slurm scripts, sweep submission and the cluster planner CLI
(`python -m launch.plan`, `python -m launch.sweep`); Python logic that belongs in a
package does not live here. Not implemented yet: it arrives with issues 5 and 8.
"""
