"""`parallelize`: tp (+sp), ep, FP8 and FSDP2 applied to a plain model from outside, after every
constraint is checked; and the rules a parallelised model imposes on its callers.

A module of its own (not `parallel/__init__.py`) so that `pipeline.py` and `engine.py` import it
without a cycle; named `apply` rather than `parallelize` so that the function `parallel.parallelize`
never shadows a submodule of the same name.
"""
from __future__ import annotations

import torch
from torch import nn

from .context_parallel import apply_cp, check_cp_plan, sequence_multiple  # noqa: F401 (re-exported)
from .data_parallel import apply_fsdp, sync_expert_load
from .expert_parallel import apply_ep, check_ep_plan
from .fp8 import Fp8Recipe, apply_fp8
from .mesh import LayoutError, Mesh
from .tensor_parallel import ParamLayout, apply_tp, check_tp_plan


# hooks read here (set_expert_placement, update_expert_bias) and written (param_layouts): parallel/protocols.py
def parallelize(model: nn.Module, mesh: Mesh, param_dtype: torch.dtype | None = None,
                zero: int | None = None, fp8: Fp8Recipe | None = None) -> nn.Module:
    """Apply tp (+sp), ep, cp and FSDP2 to `model` in place, after checking every constraint.

    Works on a meta-device model (then call `init_parallel_weights` or `load_full_state_dict`)
    or on a materialised one, whose values are sliced. FSDP2 is applied when dp x cp > 1 or when a
    compute dtype is given (it carries the mixed-precision policy: parameters stay in their own
    dtype, fp32 in training, and are cast to param_dtype for compute; gradients reduce in fp32).
    `zero` overrides the layout's ZeRO stage for this model (pipeline stages under zero-bubble
    schedules need 2). `fp8` puts the linear layers and expert GEMMs on an FP8 backend (fp8.py).
    """
    dims = mesh.dims
    check_tp_plan(model, dims.tp)
    check_ep_plan(model, dims.ep)
    check_cp_plan(model, dims.cp)
    if hasattr(model, "set_expert_placement"):  # routers limit devices/nodes over this placement
        try:
            model.set_expert_placement(dims.ep, dims.ep // dims.ep_nodes)
        except ValueError as e:
            raise LayoutError(f"parallel.ep = {dims.ep}, node_size = {dims.node_size}: {e}") from None
    layouts: dict[str, ParamLayout] = {}
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], dims.sp, layouts)
    levels = (mesh["ep_inter"], mesh["ep_intra"]) if dims.ep_nodes > 1 else (mesh["ep"],)
    apply_ep(model, levels, mesh["ep"], layouts)
    apply_cp(model, mesh.cp_group())  # after tp: wraps the tp sum of the MoE's routing statistics
    for name, p in model.named_parameters():
        layouts.setdefault(name, ParamLayout(tuple(p.shape)))
    model.param_layouts = layouts
    if fp8 is not None:
        apply_fp8(model, fp8)
    if dims.dp * dims.cp > 1 or param_dtype is not None:
        apply_fsdp(model, mesh, param_dtype=param_dtype, zero=zero)
    return model


@torch.no_grad()
def update_expert_bias(model: nn.Module, mesh: Mesh, gamma: float | None = None) -> None:
    """The aux-loss-free bias step from the global expert load (identical on every rank)."""
    sync_expert_load(model, mesh)
    model.update_expert_bias(gamma)
