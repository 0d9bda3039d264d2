"""Collectives with byte accounting, and the autograd functions that move activations between
parallel regions (Megatron-LM's `tensor_parallel/mappings.py` contracts, on any backend).

Every collective the runtime issues goes through this module, which records, per step, the
calls and bytes of each (operation, group) pair in `STATS`. Byte conventions (per rank):
all-reduce: the tensor; all-gather: the gathered output; reduce-scatter: the full input;
all-to-all: the rows sent to *other* ranks, with the share that leaves the node counted again
as `cross_node_bytes`. FSDP2's all-gathers and reduce-scatters are recorded too, through its
custom-collective hooks (`data_parallel._counted_comms`).
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """A process group with a name (for the accounting) and the node of every member."""

    name: str
    pg: dist.ProcessGroup | None  # None: a group of one, every collective is a no-op
    ranks: tuple[int, ...]        # global ranks, in group order
    node_size: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    @functools.cached_property
    def rank(self) -> int:
        return self.ranks.index(dist.get_rank()) if self.pg is not None else 0

    def node_of(self, member: int) -> int:
        return self.ranks[member] // self.node_size


def single_group(name: str) -> Group:
    return Group(name, None, (dist.get_rank() if dist.is_initialized() else 0,), 1)


class CommStats:
    """Calls and bytes per (op, group) since the last `reset()`."""

    def __init__(self):
        self.enabled = True
        self.records: dict[tuple[str, str], dict[str, int]] = defaultdict(
            lambda: {"calls": 0, "bytes": 0, "cross_node_bytes": 0})

    def add(self, op: str, group: Group, nbytes: int, cross_node: int = 0) -> None:
        if self.enabled:
            r = self.records[(op, group.name)]
            r["calls"] += 1
            r["bytes"] += int(nbytes)
            r["cross_node_bytes"] += int(cross_node)

    def reset(self) -> None:
        self.records.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{"all_gather/tp": {"calls", "bytes", "cross_node_bytes"}, ...}"""
        return {f"{op}/{g}": dict(v) for (op, g), v in sorted(self.records.items())}


STATS = CommStats()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# -- plain collectives (recorded) ------------------------------------------------------------------
def all_sum(values: dict, group: Group, device="cpu") -> dict[str, float]:
    """Each named number (float or 0-d tensor) summed over `group` in float64, in one all-reduce: counts,
    totals and loss terms reduced by name rather than by position."""
    if not values:
        return {}
    vec = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values.values()])
    all_reduce(vec, group)
    return dict(zip(values, vec.tolist()))


def all_reduce(t: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group.size > 1:
        STATS.add("all_reduce", group, _nbytes(t))
        dist.all_reduce(t, op=op, group=group.pg)
    return t


def all_gather(t: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every member's t along dim (equal shapes)."""
    if group.size == 1:
        return t
    t = t.movedim(dim, 0).contiguous()
    out = t.new_empty((group.size * t.shape[0], *t.shape[1:]))
    STATS.add("all_gather", group, _nbytes(out))
    dist.all_gather_single(out, t, group=group.pg)
    return out.movedim(0, dim)


def all_gather_uneven(t: torch.Tensor, dim: int, group: Group, sizes: list[int]) -> torch.Tensor:
    """All-gather where member i holds sizes[i] along dim (torch.chunk's uneven split): pad, gather, trim."""
    if group.size == 1:
        return t
    pad = max(sizes) - t.shape[dim]
    if pad:
        t = torch.cat([t, t.new_zeros((*t.shape[:dim], pad, *t.shape[dim + 1:]))], dim)
    parts = all_gather(t, dim, group).split(max(sizes), dim)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim)


def reduce_scatter(t: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum over members, each keeps its 1/size chunk along dim."""
    if group.size == 1:
        return t
    if t.shape[dim] % group.size:
        raise ValueError(f"reduce-scatter over {group.name} ({group.size} ranks) needs dim {dim} of "
                         f"{tuple(t.shape)} divisible by {group.size}: under sequence parallelism make the "
                         f"sequence length a multiple of {group.size}")
    t = t.movedim(dim, 0).contiguous()
    out = t.new_empty((t.shape[0] // group.size, *t.shape[1:]))
    STATS.add("reduce_scatter", group, _nbytes(t))
    dist.reduce_scatter_single(out, t, group=group.pg)
    return out.movedim(0, dim)


def all_to_all(t: torch.Tensor, send: list[int], recv: list[int], group: Group, label: str = "all_to_all"
               ) -> torch.Tensor:
    """Rows [send[0] | send[1] | ...] of t go to members 0, 1, ...; returns the rows received.
    `label` names the record (token payloads and routing metadata are counted apart)."""
    if group.size == 1:
        return t
    row = t.element_size() * math.prod(t.shape[1:])
    me, my_node = group.rank, group.node_of(group.rank)
    STATS.add(label, group,
              row * sum(n for j, n in enumerate(send) if j != me),
              row * sum(n for j, n in enumerate(send) if group.node_of(j) != my_node))
    out = t.new_empty((sum(recv), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv, send, group=group.pg)
    return out


# -- autograd region functions (Megatron's mappings) -----------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    """Enter a tensor-parallel region with a replicated input: identity; backward all-reduce."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g.contiguous(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """Leave a tensor-parallel region (row-parallel output): all-reduce; backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToSP(torch.autograd.Function):
    """Keep this rank's chunk along dim; backward all-gather."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        if x.shape[dim] % group.size:
            raise ValueError(f"the sequence (dim {dim} of {tuple(x.shape)}) is split over the {group.size} "
                             f"{group.name} ranks (sequence parallelism, or the MoE's token split under "
                             f"tensor parallelism): make the sequence length a multiple of {group.size}")
        return x.chunk(group.size, dim)[group.rank].contiguous()

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.dim, ctx.group), None, None


class _GatherFromSP(torch.autograd.Function):
    """All-gather along dim. Backward: reduce-scatter when the consumers hold partial gradients
    (a tensor-parallel region follows), else keep this rank's chunk (the consumers are replicated)."""

    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad):
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        if ctx.reduce_grad:
            return reduce_scatter(g, ctx.dim, ctx.group), None, None, None
        return g.chunk(ctx.group.size, ctx.dim)[ctx.group.rank].contiguous(), None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Leave a tensor-parallel region into sequence-parallel: reduce-scatter; backward all-gather."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.dim, ctx.group), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group, label):
        ctx.send, ctx.recv, ctx.group, ctx.label = send, recv, group, label
        return all_to_all(x, send, recv, group, label)

    @staticmethod
    def backward(ctx, g):
        return all_to_all(g, ctx.recv, ctx.send, ctx.group, ctx.label), None, None, None, None


def copy_to_region(x, group: Group):
    return _CopyToRegion.apply(x, group) if group.size > 1 else x


def reduce_from_region(x, group: Group):
    return _ReduceFromRegion.apply(x, group) if group.size > 1 else x


def scatter_to_sp(x, group: Group, dim: int = -2):
    return _ScatterToSP.apply(x, group, dim) if group.size > 1 else x


def gather_from_sp(x, group: Group, dim: int = -2, reduce_grad: bool = True):
    return _GatherFromSP.apply(x, group, dim, reduce_grad) if group.size > 1 else x


def reduce_scatter_to_sp(x, group: Group, dim: int = -2):
    return _ReduceScatterToSP.apply(x, group, dim) if group.size > 1 else x


def all_to_all_autograd(x, send: list[int], recv: list[int], group: Group, label: str = "all_to_all"):
    return _AllToAll.apply(x, send, recv, group, label) if group.size > 1 else x
