"""Full (global) tensors to and from the local shards of a parallel model, through the layouts
recorded by `parallelize`: initialisation equal to one process, loading a single-process state
dict, and gathering parameters or gradients for tests and export."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .mesh import Mesh
from .tensor_parallel import ParamLayout, _tied_parameters, chunk_range, gather_split, retie, split_index, take_local

# value_fn(name, global_shape, experts) -> the fp32 global tensor, or only `experts` rows of a
# stacked expert weight when experts is a range
ValueFn = Callable[[str, tuple, "range | None"], torch.Tensor]


def _local_value(name: str, layout: ParamLayout, mesh: Mesh, value_fn: ValueFn) -> torch.Tensor:
    experts = None
    splits = list(layout.splits)
    for s in splits:
        if s.group == "ep":
            a, b = chunk_range(layout.global_shape[0], s.parts, split_index(s, mesh[s.group]))
            experts = range(a, b)
    value = value_fn(name, layout.global_shape, experts)
    for s in splits:
        if s.group != "ep":
            value = take_local(value, s, mesh[s.group])
    return value


# hooks read here (param_layouts, init_value, init_buffers): parallel/protocols.py
@torch.no_grad()
def materialize(model: nn.Module, mesh: Mesh, value_fn: ValueFn, device=None) -> None:
    """Allocate a (possibly meta) parallel model on `device` and fill every local shard from the
    global values; each rank builds only the tensors it needs (its experts, not all of them)."""
    if any(p.is_meta for p in model.parameters()):
        tied = _tied_parameters(model)
        model.to_empty(device=device or "cpu")
        retie(model, tied)
    for name, p in model.named_parameters():
        value = _local_value(name, model.param_layouts[name], mesh, value_fn)
        if isinstance(p, DTensor):  # FSDP2 shard: this rank's rows of the tp/ep-local tensor
            value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(value)
        else:
            p.copy_(value)
    if hasattr(model, "init_buffers"):
        model.init_buffers()


def init_parallel_weights(model: nn.Module, mesh: Mesh, seed: int = 0, device=None) -> None:
    """The single-process initialisation for `seed`, produced shard by shard (uses the model's
    per-parameter `init_value`)."""
    materialize(model, mesh, lambda name, shape, experts: model.init_value(name, shape, seed, experts), device)


def load_full_state_dict(model: nn.Module, mesh: Mesh, state: dict[str, torch.Tensor], device=None) -> None:
    """Load a single-process state dict (e.g. from `model.load_hf`) into the parallel model."""
    missing = [n for n in model.param_layouts if n not in state]
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
    for name, layout in model.param_layouts.items():  # all checked before any weight changes
        if tuple(state[name].shape) != tuple(layout.global_shape):
            raise ValueError(f"{name}: state dict has shape {tuple(state[name].shape)}, "
                             f"the model {tuple(layout.global_shape)}")

    def value(name, shape, experts):
        t = state[name]
        return t[experts.start:experts.stop] if experts is not None else t
    materialize(model, mesh, value, device)


def full_tensor(local: torch.Tensor, layout: ParamLayout, mesh: Mesh) -> torch.Tensor:
    """The global tensor from this rank's shard (a collective over the shard's groups)."""
    t = local.full_tensor() if isinstance(local, DTensor) else local
    for s in reversed(layout.splits):
        t = gather_split(t, layout.global_shape[s.dim], s, mesh[s.group])
    return t


def full_state(model: nn.Module, mesh: Mesh, grads: bool = False) -> dict[str, torch.Tensor]:
    """{name: global parameter (or gradient)} on every rank; a missing gradient gives None."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is None:
            out[name] = None
            continue
        out[name] = full_tensor(t, model.param_layouts[name], mesh)
    return out
