"""The parallel runtime: the device mesh and process groups, collective autograd functions with
byte accounting, column/row/vocab-parallel layers, sequence parallelism, expert-parallel token
dispatch, data parallelism (FSDP2), and the layouts that relate each local shard to its global
tensor. It turns a plain network into a parallel one from outside, reading the plans that model
classes declare (`tp_plan`, `tp_divide`, `ep_count`/`ep_params`, `fsdp_unit`), and knows
nothing about DeepSeek beyond "a layer". Pipeline stages and schedules: `pipeline.py`.

    mesh = build_mesh(ParallelConfig(tp=2, ep=2, sp=True))
    net = parallelize(build_model(cfg, device="meta"), mesh)
    init_parallel_weights(net, mesh, seed=0)        # equals build_model(cfg, seed=0), sharded
    loss = net.loss(tokens, labels)["loss"]; loss.backward()
    finish_grad_sync(net, mesh); clip_grad_norm_(net, 1.0, mesh); opt.step()
    update_expert_bias(net, mesh)
"""
from __future__ import annotations

import torch
from torch import nn

from .comm import STATS, Group
from .data_parallel import apply_fsdp, clip_grad_norm_, finish_grad_sync, set_gradient_sync, sync_expert_load
from .expert_parallel import apply_ep, check_ep_plan
from .fp8 import Fp8Recipe, apply_fp8
from .mesh import LayoutError, Mesh, ParallelConfig, ParallelDims, build_mesh
from .state import full_state, full_tensor, init_parallel_weights, load_full_state_dict, materialize
from .tensor_parallel import ParamLayout, apply_tp, check_tp_plan

__all__ = ["STATS", "Group", "LayoutError", "Mesh", "ParallelConfig", "ParallelDims", "build_mesh",
           "parallelize", "init_parallel_weights", "load_full_state_dict", "materialize", "full_state",
           "full_tensor", "finish_grad_sync", "clip_grad_norm_", "set_gradient_sync", "sync_expert_load",
           "update_expert_bias", "Fp8Recipe", "apply_fp8", "Pipeline", "build_pipeline", "attach_schedule", "apply_recompute"]


def parallelize(model: nn.Module, mesh: Mesh, param_dtype: torch.dtype | None = None,
                zero: int | None = None, fp8: Fp8Recipe | None = None) -> nn.Module:
    """Apply tp (+sp), ep and FSDP2 to `model` in place, after checking every constraint.

    Works on a meta-device model (then call `init_parallel_weights` or `load_full_state_dict`)
    or on a materialised one, whose values are sliced. FSDP2 is applied when dp > 1 or when a
    compute dtype is given (it carries the mixed-precision policy: parameters stay in their own
    dtype, fp32 in training, and are cast to param_dtype for compute; gradients reduce in fp32).
    `zero` overrides the layout's ZeRO stage for this model (pipeline stages under zero-bubble
    schedules need 2). `fp8` puts the linear layers and expert GEMMs on an FP8 backend (fp8.py).
    """
    dims = mesh.dims
    check_tp_plan(model, dims.tp)
    check_ep_plan(model, dims.ep)
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
    for name, p in model.named_parameters():
        layouts.setdefault(name, ParamLayout(tuple(p.shape)))
    model.param_layouts = layouts
    if fp8 is not None:
        apply_fp8(model, fp8)
    if dims.dp > 1 or param_dtype is not None:
        apply_fsdp(model, mesh, param_dtype=param_dtype, zero=zero)
    return model


@torch.no_grad()
def update_expert_bias(model: nn.Module, mesh: Mesh, gamma: float | None = None) -> None:
    """The aux-loss-free bias step from the global expert load (identical on every rank)."""
    sync_expert_load(model, mesh)
    model.update_expert_bias(gamma)


from .pipeline import Pipeline, attach_schedule, build_pipeline  # noqa: E402 (uses parallelize)
from .recompute import apply_recompute  # noqa: E402
