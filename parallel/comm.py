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


def all_gather(t: torch.Tensor, dim: int, group: Group, label: str = "all_gather") -> torch.Tensor:
    """Concatenate every member's t along dim (equal shapes). `label` names the record."""
    if group.size == 1:
        return t
    t = t.movedim(dim, 0).contiguous()
    out = t.new_empty((group.size * t.shape[0], *t.shape[1:]))
    STATS.add(label, group, _nbytes(out))
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


def reduce_scatter(t: torch.Tensor, dim: int, group: Group, label: str = "reduce_scatter") -> torch.Tensor:
    """Sum over members, each keeps its 1/size chunk along dim. `label` names the record."""
    if group.size == 1:
        return t
    if t.shape[dim] % group.size:
        raise ValueError(f"reduce-scatter over {group.name} ({group.size} ranks) needs dim {dim} of "
                         f"{tuple(t.shape)} divisible by {group.size}: under sequence parallelism make the "
                         f"sequence length a multiple of {group.size}")
    t = t.movedim(dim, 0).contiguous()
    out = t.new_empty((t.shape[0] // group.size, *t.shape[1:]))
    STATS.add(label, group, _nbytes(t))
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
    if LINK.simulated and label in LINK.labels:  # blocking, on the simulated link: its whole duration is exposed
        return _issue_a2a(t, send, recv, group, label).wait(blocking=True)
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


# -- asynchronous collectives and the simulated link (overlap, DESIGN.md decision 8) -------------------------
# An asynchronous collective returns a `Work` handle at once; `wait()` gives its result. On gloo the transfer
# runs on gloo's own threads (`async_op=True`); on CUDA on NCCL's stream. The compute thread is blocked only
# inside `wait()`, and that blocked time is what `LINK` records as *exposed* communication.
#
# The simulated link (for benchmarks and tests on one CPU machine, where gloo copies in memory at once):
# under `simulate_link(latency_s, bytes_per_s)` a collective completes no earlier than its issue time +
# latency + bytes / bandwidth (bytes: what STATS counts for it, the rows that leave this rank), and a wait
# sleeps until then (no CPU spent). A blocking collective of the simulated kinds waits in full: all exposed.
# Per rank (each rank is a process) and per step (`LINK.reset()` at its start): `exposed_s`, the compute
# thread's time blocked in waits; `link_s`, the time the collectives were in flight (each one's simulated
# duration, or longer when the real transfer was still running when waited on), overlapped or not, so
# that exposed <= link op by op; `calls`; `peer_s`, the part of exposed_s spent inside gloo's own wait, before
# the peers had joined the collective (a peer still computing or, with more ranks than cores, not running):
# waiting on a peer, not on the link.
import contextlib as _contextlib  # noqa: E402
import time as _time  # noqa: E402


class LinkStats:
    """Exposed and total link time of this rank since `reset()`; the simulated link's setting."""

    def __init__(self):
        self.latency_s: float | None = None     # None: no simulation (real transfer times only)
        self.bytes_per_s: float = math.inf
        self.labels: tuple[str, ...] = ("all_to_all", "all_to_all_routing")  # the collectives it simulates
        self.events: list | None = None         # a list: each wait appends (issued, done_at, wait_from, wait_to)
        self.reset()

    @property
    def simulated(self) -> bool:
        return self.latency_s is not None

    def reset(self) -> None:
        self.exposed_s = 0.0
        self.peer_s = 0.0
        self.link_s = 0.0
        self.calls = 0

    def duration(self, nbytes: int) -> float:
        return 0.0 if not self.simulated else self.latency_s + nbytes / self.bytes_per_s

    def snapshot(self) -> dict[str, float]:
        """{"exposed_s", "peer_s", "link_s", "calls", "exposed_fraction"} (fraction: exposed / link, 0 with no link
        time)."""
        frac = min(1.0, self.exposed_s / self.link_s) if self.link_s > 0 else 0.0
        return {"exposed_s": self.exposed_s, "peer_s": self.peer_s, "link_s": self.link_s, "calls": self.calls,
                "exposed_fraction": frac}


LINK = LinkStats()


@_contextlib.contextmanager
def simulate_link(latency_s: float, bytes_per_s: float):
    """Within the block, every all-to-all (token payloads and routing metadata) completes no earlier than
    latency_s + bytes / bytes_per_s after it was issued (module comment above)."""
    if latency_s < 0 or bytes_per_s <= 0:
        raise ValueError(f"simulate_link needs latency_s >= 0 and bytes_per_s > 0, got {latency_s}, {bytes_per_s}")
    saved = LINK.latency_s, LINK.bytes_per_s
    LINK.latency_s, LINK.bytes_per_s = float(latency_s), float(bytes_per_s)
    try:
        yield LINK
    finally:
        LINK.latency_s, LINK.bytes_per_s = saved


class Work:
    """An issued collective: `wait()` blocks until it is complete (and, under the simulated link, until its
    simulated completion time), records the blocked time as exposed, and returns the result. Idempotent."""

    __slots__ = ("_work", "_result", "_done_at", "_waited", "_issued")

    def __init__(self, work, result, nbytes: int = 0, issued_at: float | None = None):
        self._work, self._result, self._waited = work, result, False
        issued_at = _time.perf_counter() if issued_at is None else issued_at
        self._issued = issued_at
        duration = LINK.duration(nbytes)
        self._done_at = issued_at + duration
        LINK.link_s += duration
        LINK.calls += 1

    def is_completed(self) -> bool:
        return self._waited or ((self._work is None or self._work.is_completed())
                                and _time.perf_counter() >= self._done_at)

    def wait(self, blocking: bool = False):
        """blocking: the caller did nothing since the issue, so the whole time since it is exposed (the issue
        call itself included, which a loaded machine can stretch)."""
        if not self._waited:
            t0 = self._issued if blocking else _time.perf_counter()
            if self._work is not None:
                self._work.wait()
                LINK.peer_s += _time.perf_counter() - t0
            left = self._done_at - _time.perf_counter()
            if left > 0:
                _time.sleep(left)
            end = _time.perf_counter()
            if LINK.events is not None:   # a timeline (benchmarks/overlap.py)
                LINK.events.append((self._issued, end if end - t0 > 1e-4 else self._done_at, t0, end))
            LINK.exposed_s += end - t0
            LINK.link_s += max(0.0, end - max(self._done_at, t0))  # done later than simulated: in flight till now
            self._waited, self._work = True, None
        return self._result


def done(result) -> Work:
    """A Work that is already complete (a group of one: nothing moves)."""
    w = Work.__new__(Work)
    w._work, w._result, w._done_at, w._waited = None, result, 0.0, True
    return w


def _a2a_bytes(t: torch.Tensor, send: list[int], group: Group) -> tuple[int, int]:
    row = t.element_size() * math.prod(t.shape[1:])
    me, my_node = group.rank, group.node_of(group.rank)
    return (row * sum(n for j, n in enumerate(send) if j != me),
            row * sum(n for j, n in enumerate(send) if group.node_of(j) != my_node))


def all_to_all_async(t: torch.Tensor, send: list[int], recv: list[int], group: Group,
                     label: str = "all_to_all") -> Work:
    """`all_to_all` issued without waiting: `.wait()` returns the rows received. Recorded in STATS like it."""
    if group.size == 1:
        return done(t)
    STATS.add(label, group, *_a2a_bytes(t, send, group))
    return _issue_a2a(t, send, recv, group, label)


def _issue_a2a(t: torch.Tensor, send: list[int], recv: list[int], group: Group, label: str) -> Work:
    out = t.new_empty((sum(recv), *t.shape[1:]))
    issued = _time.perf_counter()
    work = dist.all_to_all_single(out, t.contiguous(), recv, send, group=group.pg, async_op=True)
    return Work(work, out, _a2a_bytes(t, send, group)[0] if label in LINK.labels else 0, issued)


def all_to_all_counts_async(counts: torch.Tensor, group: Group) -> Work:
    """The routing-metadata exchange: counts [size] (rows this rank sends to each member) -> the rows each
    member sends here. `.wait()` gives the tensor; turning it into Python ints (`.tolist()`) is the
    dispatch's one host synchronisation."""
    return all_to_all_async(counts, [1] * group.size, [1] * group.size, group, label="all_to_all_routing")
