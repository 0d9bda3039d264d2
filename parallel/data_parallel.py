"""Data parallelism with FSDP2 (`fully_shard`), the gradient reductions FSDP does not know about,
global gradient-norm clipping and the global expert load.

FSDP2 shards each block's parameters over dp (fp32 master weights, `param_dtype` compute,
fp32 reduction), over dp x cp under context parallelism. Routed experts are sharded over the
expert-data-parallel group instead, with the gradient divided by dp, not edp: every edp rank
contributes the tokens of its own share of the data, and the loss each rank backpropagates is the
mean over its dp shard. Under cp the dense gradients are divided by dp too, not dp x cp: a cp rank's
gradient is its part of its micro-batch's (context_parallel.py), so the cp parts are summed.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from . import comm
from .mesh import Mesh
from .tensor_parallel import ParamLayout


def _counted_comms(group):
    """FSDP2's default all-gather and reduce-scatter, recorded in comm.STATS under `group`'s name
    (FSDP issues its collectives itself; its custom-comm hooks are the way to see them)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    named = group

    class CountedAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            comm.STATS.add("all_gather", named, comm._nbytes(output_tensor))
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountedReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            comm.STATS.add("reduce_scatter", named, comm._nbytes(input_tensor))
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountedAllGather(), CountedReduceScatter()


def _count(module, group) -> None:
    gather, scatter = _counted_comms(group)
    module.set_custom_all_gather(gather)
    module.set_custom_reduce_scatter(scatter)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


# hooks read here (ep_count, fsdp_unit, fsdp_forward_methods, tokens_per_expert): parallel/protocols.py
def apply_fsdp(model: nn.Module, mesh: Mesh, param_dtype=None,
               reduce_dtype=None, zero: int | None = None) -> None:
    """fully_shard every experts module (over edp), every module whose class sets `fsdp_unit`
    (the blocks, over dp), then the root. zero=3 reshards parameters after forward; zero=2 keeps
    the gathered parameters until backward (ZeRO-2-like: optimizer state and gradients sharded)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    dims = mesh.dims
    if param_dtype is not None and reduce_dtype is None:
        reduce_dtype = torch.float32  # bf16 compute, fp32 gradient reduction
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    reshard = (zero or dims.zero) == 3
    cp = dims.cp > 1
    dp_mesh = mesh.device_meshes["fsdp"]["dp_cp"] if cp else mesh.device_meshes["main"]["dp"]
    edp_mesh = mesh.device_meshes["stage"]["edp"]
    dense = mesh[mesh.fsdp_group]

    def sum_cp(module):  # the cp ranks' gradients are parts of one micro-batch's: summed, divided by dp only
        if cp:
            module.set_gradient_divide_factor(float(dims.dp))
            if mesh.device_type == "cpu":
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM: sum, then divide

    def place(p):  # shard experts along the expert dim when it divides, else along rows
        from torch.distributed.tensor import Shard
        return Shard(0) if p.shape[0] % edp_mesh.size() == 0 else Shard(1)

    for module in model.modules():
        if getattr(type(module), "ep_count", None):
            fully_shard(module, mesh=edp_mesh, mp_policy=mp, reshard_after_forward=reshard, shard_placement_fn=place)
            _count(module, mesh["edp"])
            # With edp = 1 FSDP only carries the dtype policy (and keeps every parameter a DTensor
            # for the optimizer's foreach kernels); finish_grad_sync divides by dp there, because
            # torch 2.13's FSDP2 applies a divide factor twice on a one-rank mesh for dtypes other
            # than fp32/bf16 (_fsdp_collectives.foreach_reduce, world_size == 1 branch).
            if edp_mesh.size() > 1:
                module.set_gradient_divide_factor(float(dims.dp))
                if dims.dp != edp_mesh.size() and mesh.device_type == "cpu":
                    module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM: sum, then divide
    for module in model.modules():
        if getattr(type(module), "fsdp_unit", False):
            fully_shard(module, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
            _count(module, dense)
            sum_cp(module)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    _count(model, dense)
    sum_cp(model)
    for method in getattr(type(model), "fsdp_forward_methods", ()):
        register_fsdp_forward_method(model, method)
    model._fsdp = True


@torch.no_grad()
def finish_grad_sync(model: nn.Module, mesh: Mesh) -> None:
    """After the last micro-batch's backward: sum the partial gradients FSDP does not reduce.

    tp: parameters replicated over tp that saw only their rank's tokens or heads.
    tp_replicas: a KV head kept on several tp ranks (each holds part of its gradient).
    edp: routed experts outside FSDP: their replicas saw different tokens; the sum is divided by
    dp because each rank's loss is the mean over its own share of the data (FSDP divides
    when it shards them over edp > 1).
    """
    layouts: dict[str, ParamLayout] = model.param_layouts
    for name, p in model.named_parameters():
        if p.grad is None or name not in layouts:
            continue
        g = _local(p.grad)
        for group in layouts[name].grad_sum:
            if group == "tp":
                comm.all_reduce(g, mesh["tp"])
            elif group == "edp":
                fsdp = isinstance(p, DTensor)
                if not fsdp:
                    comm.all_reduce(g, mesh["edp"])
                if (not fsdp or mesh["edp"].size == 1) and mesh.dims.dp > 1:
                    g.div_(mesh.dims.dp)
            elif group == "tp_replicas":
                _sum_over_replicas(g, layouts[name], mesh)


def _sum_over_replicas(g: torch.Tensor, layout: ParamLayout, mesh: Mesh) -> None:
    """Ranks holding the same chunk add their gradients: place each in a full-size buffer, all-reduce."""
    (split,) = [s for s in layout.splits if s.group == "tp"]
    tp = mesh["tp"]
    buf = g.new_zeros((split.parts, *g.shape))
    buf[tp.rank // (tp.size // split.parts)] = g
    comm.all_reduce(buf, tp)
    g.copy_(buf[tp.rank // (tp.size // split.parts)])


def _distinct_copies(layout: ParamLayout, is_dtensor: bool, p, mesh: Mesh) -> int:
    """How many ranks of a pipeline stage hold an identical copy of this local shard."""
    dims = mesh.dims
    shards = math.prod(s.parts for s in layout.splits)
    if is_dtensor:
        shards *= p.device_mesh.size()
    return dims.stage_size // shards


@torch.no_grad()
def clip_grad_norm_(model: nn.Module | list[nn.Module], max_norm: float, mesh: Mesh,
                    apart: str = "") -> torch.Tensor:
    """Global L2 norm of all gradients, each parameter counted once across tp, ep, dp and pp
    (a replicated shard contributes 1/copies from each holder; a pipeline stage's copy of another
    stage's parameter, listed in its `grad_norm_skip`, not at all), then scale by max_norm / norm.
    `model` may be this rank's list of pipeline stages. `apart`: a parameter-name prefix whose parameters
    form their own group, with its own norm and its own clipping (MTP modules trained on detached inputs,
    whose gradients must not change the rest's step); then the result is [norm of the rest, norm apart]."""
    total = torch.zeros(2 if apart else 1, dtype=torch.float64, device=mesh.device_type)  # on the device: no syncs
    grads: list[list[torch.Tensor]] = [[], []]
    for m in model if isinstance(model, (list, tuple)) else [model]:
        layouts, skip = m.param_layouts, getattr(m, "grad_norm_skip", ())
        for name, p in m.named_parameters():
            if p.grad is None:
                continue
            g = _local(p.grad)
            group = int(bool(apart) and name.startswith(apart))
            grads[group].append(g)
            if name in skip:
                continue
            lay = layouts.get(name, ParamLayout(tuple(p.shape)))
            copies = _distinct_copies(lay, isinstance(p.grad, DTensor), p, mesh)
            total[group] += g.double().pow(2).sum().to(total.device) / copies
    comm.all_reduce(total, mesh["world"])
    norms = total.sqrt()
    if max_norm and max_norm > 0:
        for group, norm in zip(grads, norms):
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in group:
                g.mul_(scale.to(g.dtype))
    dtype = next((g.dtype for group in grads for g in group), torch.float32)
    return (norms if apart else norms[0]).to(dtype)


def is_fsdp(model: nn.Module) -> bool:
    """Whether FSDP2 wraps any part of the model (its parameters are then gathered by hooks around forwards)."""
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters FSDP2 keeps after a forward without backward (evaluation under
    ZeRO-2 keeps them), so that the module holds its sharded parameters again (the ones the optimizer
    and the checkpoint know)."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def prime_unsharded(model: nn.Module) -> None:
    """Gather and free every FSDP2 unit once, so that each holds its (storage-less) unsharded parameters.
    torch 2.13's FSDP2 runs post-backward at the end of every backward for every unit, also one whose
    forward never ran, and under mixed precision that reads the unsharded parameter it creates at its
    first all-gather: a unit the step skips (the MTP blocks in a post-training forward) would fail with
    "'FSDPParam' object has no attribute '_unsharded_param'". One unit at a time, so the peak is one unit."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
            m.reshard()


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Gradient accumulation: skip FSDP2's reduce-scatter on all but the last micro-batch (the
    unsharded gradients accumulate locally; ZeRO-3 then holds them until the last one)."""
    for m in model.modules():
        if hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(enabled, recurse=False)


@torch.no_grad()
def sync_expert_load(model: nn.Module, mesh: Mesh) -> None:
    """Sum every MoE layer's token counts over the ranks of the stage that saw distinct tokens
    (dp x cp x tp), so that the aux-loss-free bias update (V3 §2.1.2) is the same on every rank."""
    for m in model.modules():
        load = getattr(m, "tokens_per_expert", None)
        if isinstance(load, torch.Tensor):
            comm.all_reduce(load, mesh[mesh.stage_group])
