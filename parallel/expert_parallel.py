"""Expert parallelism: routed experts split over the ep ranks, tokens dispatched with all-to-alls of
variable splits.

A model's experts module declares `ep_params` (stacked [n_experts, ...] parameters) and
`ep_count` (its expert-count attribute), and computes `forward(x, indices, weights, partial)` =
sum_k weights[t, k] * FFN_{indices[t, k]}(x_t) for the experts it holds, treating an index
outside them as absent. Here each rank keeps its contiguous block of experts, and the module's
class is swapped for one whose forward dispatches (the way FSDP2 swaps classes; names and
state-dict keys do not change).

Dispatch (V3 §3.2.2): every token travels at most once to each destination that holds any of
its experts, with its expert ids and gate weights; the destination runs its experts and sends
back one gate-weighted sum per token, which the source adds up. When an ep group spans nodes the
dispatch is hierarchical: first across nodes (once per node, to the rank with the same in-node
index), then inside the node (once per device). Node-limited routing (M nodes per token) thus
bounds the cross-node payload to M copies of a token, which `comm.STATS` shows.
"""
from __future__ import annotations

import torch
from torch import nn

from . import comm
from .comm import Group
from .mesh import LayoutError
from .tensor_parallel import ParamLayout, Split, take_local


class ExpertParallel:
    """Mixin placed in front of the experts module's class."""

    ep_levels: tuple[Group, ...]   # the ep group, or its cross-node then in-node groups
    ep_total: int                  # experts in the whole ep group

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, partial: bool = True):
        return self._dispatch(x, indices, weights, 0, 0, self.ep_total)

    def _dispatch(self, x, indices, weights, level: int, base: int, span: int):
        if level == len(self.ep_levels):  # the experts held here
            local = indices - base
            local = local.masked_fill((local < 0) | (local >= span), span)
            return super().forward(x, local, weights, partial=True)
        group = self.ep_levels[level]
        n, per = group.size, span // group.size
        t = x.shape[0]
        present = (indices >= base) & (indices < base + span)
        part = torch.where(present, (indices - base) // per, n)                 # destination of each pair
        dest = torch.zeros(t, n + 1, dtype=torch.bool, device=x.device).scatter_(1, part, True)[:, :n]
        p_of, t_of = dest.t().nonzero(as_tuple=True)                          # (destination, token), by destination
        send = torch.bincount(p_of, minlength=n)
        recv = comm.all_to_all(send, [1] * n, [1] * n, group, label="all_to_all_routing")
        send, recv = send.tolist(), recv.tolist()
        mine = part[t_of] == p_of.unsqueeze(1)                                # pairs for that destination
        idx_s = torch.where(mine, indices[t_of], base + span)                  # others: absent
        x_r = comm.all_to_all_autograd(x[t_of], send, recv, group)
        idx_r = comm.all_to_all(idx_s, send, recv, group, label="all_to_all_routing")
        w_r = comm.all_to_all_autograd(weights[t_of] * mine, send, recv, group, "all_to_all_routing")
        b = base + group.rank * per
        y_r = self._dispatch(x_r, idx_r, w_r, level + 1, b, per)
        y_s = comm.all_to_all_autograd(y_r, recv, send, group)
        return x.new_zeros(t, y_s.shape[-1]).index_add(0, t_of, y_s.to(x.dtype))


# hooks read here (ep_count, ep_params, the expert group's forward): parallel/protocols.py
def check_ep_plan(model: nn.Module, ep: int) -> None:
    for path, module in model.named_modules():
        attr = getattr(type(module), "ep_count", None)
        if attr and getattr(module, attr) % ep:
            raise LayoutError(f"{path}.{attr} = {getattr(module, attr)} routed experts cannot be split evenly "
                              f"over parallel.ep = {ep}; choose ep dividing {getattr(module, attr)}")


def apply_ep(model: nn.Module, levels: tuple[Group, ...], ep_group: Group, layouts: dict[str, ParamLayout]) -> None:
    """Keep this rank's experts and make every experts module dispatch over `levels` (the ep group,
    or its cross-node then in-node groups)."""
    ep = ep_group.size
    for path, module in list(model.named_modules()):
        attr = getattr(type(module), "ep_count", None)
        if not attr:
            continue
        total = getattr(module, attr)
        split = Split(0, "ep", ep)
        for pname in type(module).ep_params:
            p = getattr(module, pname)
            layouts[f"{path}.{pname}"] = ParamLayout(tuple(p.shape), (split,), ("edp",))
            local = take_local(p, split, ep_group)
            setattr(module, pname, nn.Parameter(local.detach().clone(memory_format=torch.contiguous_format)))
        setattr(module, attr, total // ep)
        if ep > 1:
            cls = type(module)
            module.__class__ = type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})
            module.ep_levels, module.ep_total = levels, total
