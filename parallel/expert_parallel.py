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

Under train.fp8=blockwise the rows travel as their 1x128 E4M3 tiles and fp32 scales (V3 §3.3.3: 1 + 4/128
bytes per element, `plan.planner.FP8_BYTES`), quantized once at the source; the experts' FP8 GEMM takes
the tiles as they arrive (`fp8.Fp8Rows`), bit for bit what it would make of the BF16 rows. Combine and
every backward all-to-all stay in the activations' dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from . import comm
from .comm import Group
from .fp8 import TILE, Fp8Rows, Fp8Tensor, dequantize, row_tiles
from .mesh import LayoutError
from .tensor_parallel import ParamLayout, Split, take_local


class Route:
    """One level of the dispatch: which rows of [T, ...] go to which member of `group`, and how many.

    Built locally from the indices (`route_local`), then `exchange()` swaps the split sizes with the
    members: that all-to-all of counts and its `.tolist()` are the dispatch's one host synchronisation
    (the payload's buffers are sized by them), so it is issued first, before anything else of the
    dispatch, and the token payload can be in flight while other work runs."""

    def __init__(self, group: Group, indices: torch.Tensor, base: int, span: int):
        self.group, self.base, self.span = group, base, span
        n = group.size
        self.per = span // n
        self.n_tokens = indices.shape[0]
        present = (indices >= base) & (indices < base + span)
        part = torch.where(present, (indices - base) // self.per, n)              # destination of each pair
        dest = torch.zeros(self.n_tokens, n + 1, dtype=torch.bool, device=indices.device).scatter_(1, part, True)
        p_of, self.t_of = dest[:, :n].t().nonzero(as_tuple=True)                 # (destination, token), by dest
        self.counts = torch.bincount(p_of, minlength=n)
        self.mine = part[self.t_of] == p_of.unsqueeze(1)                         # pairs for that destination
        self.idx_s = torch.where(self.mine, indices[self.t_of], base + span)     # others: absent
        self.send = self.recv = None
        self._counts = comm.all_to_all_counts_async(self.counts, group)          # issued at once

    def exchange(self) -> "Route":
        """Wait for the split sizes (the host synchronisation); idempotent."""
        if self.send is None:
            recv = self._counts.wait()
            self.send, self.recv = self.counts.tolist(), recv.tolist()
        return self

    @property
    def child_base(self) -> int:
        """The first expert of this rank's share at the next level."""
        return self.base + self.group.rank * self.per

    def gather(self, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows to send, by destination: tokens and their gate weights (other destinations' pairs zeroed)."""
        return x[self.t_of], weights[self.t_of] * self.mine

    def scatter_add(self, y_s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The source's side of combine: each token's returned partial sums added up [T, dim]."""
        return like.new_zeros(self.n_tokens, y_s.shape[-1]).index_add(0, self.t_of, y_s.to(like.dtype))


class Dispatch:
    """An issued dispatch (one level): `wait()` -> (x_r, idx_r, w_r), the rows this rank received; autograd
    flows through x_r and w_r (their backward all-to-alls are synchronous in autograd; the overlap executor,
    parallel/overlap.py, runs them asynchronously itself)."""

    def __init__(self, route: Route, works: tuple, rows=None):
        self.route, self._works, self._rows = route, works, rows

    def wait(self):
        if self._rows is None:
            return tuple(w.wait() for w in self._works)
        return (self._rows(), *(w.wait() for w in self._works))


class _Fp8Arrival(torch.autograd.Function):
    """The rows an FP8 dispatch delivered, as a differentiable function of the rows sent: forward, their
    dequantized values (the tiles arrived apart); backward, the gradient goes back in x's dtype (BF16: V3
    §3.3.3 keeps the backward's combine-like all-to-all in BF16), as the BF16 dispatch's backward does."""

    @staticmethod
    def forward(ctx, x_s, q_r, s_r, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return dequantize(q_r, s_r, TILE).to(x_s.dtype)

    @staticmethod
    def backward(ctx, g):
        return comm.all_to_all(g.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None, None, None


def fp8_rows_issue(x_s: torch.Tensor, send: list[int], recv: list[int], group: Group, recipe):
    """FP8 dispatch of the rows x_s (V3 §3.3.3), issued: their 1x128 E4M3 tiles (1 byte per element) and fp32
    scales (4 bytes per 128 elements) travel instead of BF16, quantized once at the first level (a second
    level forwards the tiles it received). Returns (the two Works, finish) where finish() gives the arrived
    rows as `Fp8Rows`, whose tiles the experts' FP8 GEMM consumes without quantizing again."""
    tiles = row_tiles(x_s, recipe)
    q = comm.all_to_all_async(tiles.data.view(torch.uint8), send, recv, group, "all_to_all")
    sc = comm.all_to_all_async(tiles.scale, send, recv, group, "all_to_all_scales")

    def finish():
        q_r, s_r = q.wait().view(tiles.data.dtype), sc.wait()
        return Fp8Rows.wrap(_Fp8Arrival.apply(x_s, q_r, s_r, send, recv, group), Fp8Tensor(q_r, s_r, TILE))
    return finish


class _IssuedAllToAll(torch.autograd.Function):
    """all_to_all_autograd whose forward only issues: it returns the receive buffer, which its Work fills
    (call the Work's wait() before reading it). Backward: the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, send, recv, group, label, works: list):
        ctx.send, ctx.recv, ctx.group, ctx.label = send, recv, group, label
        work = comm.all_to_all_async(x, send, recv, group, label)
        works.append(work)
        return work._result

    @staticmethod
    def backward(ctx, g):
        return comm.all_to_all(g.contiguous(), ctx.recv, ctx.send, ctx.group, ctx.label), None, None, None, None, None


def issue_all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: Group,
                     label: str = "all_to_all") -> comm.Work:
    """An asynchronous all-to-all; differentiable when x requires grad (its gradient goes back at once)."""
    if group.size == 1:
        return comm.done(x)
    if x.requires_grad and torch.is_grad_enabled():
        works: list = []
        out = _IssuedAllToAll.apply(x, send, recv, group, label, works)
        works[0]._result = out  # autograd's output (the buffer the transfer fills)
        return works[0]
    return comm.all_to_all_async(x, send, recv, group, label)


class ExpertParallel:
    """Mixin placed in front of the experts module's class."""

    ep_levels: tuple[Group, ...]   # the ep group, or its cross-node then in-node groups
    ep_total: int                  # experts in the whole ep group

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, partial: bool = True):
        return self._dispatch(x, indices, weights, 0, 0, self.ep_total)

    def _dispatch(self, x, indices, weights, level: int, base: int, span: int):
        if level == len(self.ep_levels):  # the experts held here
            return self.ep_local(x, indices, weights, base, span)
        route = Route(self.ep_levels[level], indices, base, span).exchange()
        group, send, recv = route.group, route.send, route.recv
        x_s, w_s = route.gather(x, weights)
        recipe = getattr(self, "fp8_dispatch", None)   # train.fp8=blockwise: the rows travel as FP8 tiles
        x_r = comm.all_to_all_autograd(x_s, send, recv, group) if recipe is None or group.size == 1 \
            else fp8_rows_issue(x_s, send, recv, group, recipe)()
        idx_r = comm.all_to_all(route.idx_s, send, recv, group, label="all_to_all_routing")
        w_r = comm.all_to_all_autograd(w_s, send, recv, group, "all_to_all_routing")
        y_r = self._dispatch(x_r, idx_r, w_r, level + 1, route.child_base, route.per)
        y_s = comm.all_to_all_autograd(y_r, recv, send, group)
        return route.scatter_add(y_s, x)

    # -- the dispatch cut into issue and wait (parallel/overlap.py; DualPipeV's F&B chunks can use the same) --
    def ep_local(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, base: int, span: int,
                 tiles: Fp8Tensor | None = None):
        """The experts held here on the rows received: [rows, dim] gate-weighted partial sums. `tiles`: the
        rows' FP8 tiles when they came apart from x (the overlap executor enters here through FSDP2's forward
        hooks, whose autograd wrapper returns plain tensors)."""
        if tiles is not None:
            x = Fp8Rows.wrap(x, tiles)
        local = indices - base
        local = local.masked_fill((local < 0) | (local >= span), span)
        return super().forward(x, local, weights, partial=True)

    def dispatch_issue(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, level: int = 0,
                       base: int = 0, span: int | None = None) -> Dispatch:
        """Level `level` of the dispatch, issued: the split-size exchange first (the host synchronisation),
        then the token rows, their expert ids and gate weights in flight. `wait()` gives what arrived;
        then the next level (or `ep_local` at the last), and `combine_issue` back."""
        route = Route(self.ep_levels[level], indices, base, self.ep_total if span is None else span).exchange()
        x_s, w_s = route.gather(x, weights)
        g, send, recv = route.group, route.send, route.recv
        recipe = getattr(self, "fp8_dispatch", None)
        rows = fp8_rows_issue(x_s, send, recv, g, recipe) if recipe is not None and g.size > 1 else None
        works = (comm.all_to_all_async(route.idx_s, send, recv, g, "all_to_all_routing"),
                 issue_all_to_all(w_s, send, recv, g, "all_to_all_routing"))
        return Dispatch(route, works if rows else (issue_all_to_all(x_s, send, recv, g), *works), rows)

    @staticmethod
    def combine_issue(y_r: torch.Tensor, dispatch: Dispatch) -> comm.Work:
        """The partial sums back to their sources, issued; `finish_combine(work.wait(), dispatch, x)` adds them."""
        r = dispatch.route
        return issue_all_to_all(y_r, r.recv, r.send, r.group)

    @staticmethod
    def finish_combine(y_s: torch.Tensor, dispatch: Dispatch, like: torch.Tensor) -> torch.Tensor:
        return dispatch.route.scatter_add(y_s, like)


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
