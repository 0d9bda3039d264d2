"""Planning: the cluster planner (planner.py), the analytic cost formulas (cost.py: bytes per
collective), what a rank holds between steps (memory.py, shared with `launch.check`) and the GPU table
(hardware.py). It estimates and never runs anything: the runtime
(parallel/) and `launch.check` measure. It reads `model.config` and `parallel` (the schedule table,
the mesh's rules, the stage cut); only `launch` and pretrain.metrics' GPU table read it.
`python -m launch.plan` is the command line."""
from .hardware import GPU, GPUS, PEAK_FLOPS
from .planner import Cluster, Layout, Plan, PlanError, check_layout, evaluate, model_shape, plan

__all__ = ["GPU", "GPUS", "PEAK_FLOPS", "Cluster", "Layout", "Plan", "PlanError", "check_layout", "evaluate",
           "model_shape", "plan"]
