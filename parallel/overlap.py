"""Overlap at pp = 1: the forward of micro-batch k+1 interleaved with the backward of micro-batch k, part by
part, so that each expert all-to-all of one runs while the other computes (Megatron-core's combined 1F1B,
`overlap_moe_expert_parallel_comm`, with pp = 1; DESIGN.md decision 8).

    losses = overlapped_losses(model, mesh, micro_batch_size, tokens, labels)   # = SingleStage._losses

The parts. The model declares where a MoE block may be cut (`Block.moe_pre` = attention + router,
`Block.moe_shared` = shared experts, `Block.moe_post` = residual; parallel/protocols.py "moe phases"); the
runtime adds its own pieces between them, so each MoE block runs as

    pre (attention, router) | gather | dispatch a2a (per level) | shared experts, routed experts |
    combine a2a (per level) | scatter-add | post (residual)

(the shared experts, `Block.moe_shared`, need no dispatch: they run while the payload flies, and their
backward beside the experts', so that the compute between two all-to-alls is more even)

and the model's ends as two more parts: the embedding (`model.hidden` with the layer loop skipped) and the
loss (`model.loss(h=...)` with the layer loop skipped: final norm, head, MTP, the balance losses of every
layer, summed in the model's own order). Dense blocks are one part. The last micro-batch, whose backward
runs alone, is one connected graph instead (its forward's all-to-alls still issued and waited apart) and
its backward one `backward()`, as SingleStage's: FSDP2 reduces each gradient once, whole. Every other
part is its own autograd sub-graph: its inputs are detached leaves, its outputs are kept, and its backward is
`torch.autograd.backward(outputs, output grads)`, which leaves the input grads on the leaves for the part
before. An all-to-all part is not autograd's: the runtime sends the gradient back itself (the reverse
all-to-all), asynchronously, as it sent the activations.

The order. Each micro-batch's forward and backward are Python generators that yield right after issuing an
all-to-all (before waiting on it); one thread drives two of them in turn,

    F0 | F1 + B0 | F2 + B1 | ... | B(n-1)

so that while F(k+1) waits on its dispatch, B(k) has run its next compute part (the experts' backward, an
attention backward), and vice versa. Every rank runs the same deterministic order, so collectives match.
The arithmetic is the serial one: the same operations on the same values; only where a tensor's gradient
is a sum of three or more contributions that now meet in another order (the embedding weight, used by the
embedding and MTP; a router input) may a last bit differ (tests/test_overlap.py).

Composes with: recomputation (each part of a block runs in the block's mode: "full" checkpoints each
compute part, so the all-to-alls are never replayed, unlike the serial full mode; the kept activations are
the parts' inputs), FSDP2 (each part enters its FSDP unit through `register_fsdp_forward_method`; gradients
are reduced only in the last micro-batch's backward, which runs alone), MTP and the balance losses (inside
the loss part; MTP's own dispatch runs there, blocking). Not yet: tp > 1 (the MoE's token split sits around
MoE.forward, which the parts bypass), cp > 1, and overlap of the MTP block's dispatch.

Host synchronisation: each dispatch level first exchanges its split sizes (an all-to-all of [ep] counts,
then `.tolist()`); the payload's buffers are sized by them. Only after that does the payload go in flight.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch
from torch import nn
from torch.distributed.pipelining._backward import _get_grad_fn_or_grad_acc, construct_reverse_graph, get_param_groups
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import comm
from .data_parallel import finish_grad_sync, set_gradient_sync
from .expert_parallel import ExpertParallel, Route, _Fp8Arrival, issue_all_to_all
from .fp8 import TILE, Fp8Rows, Fp8Tensor, dequantize, row_tiles
from .mesh import LayoutError, ParallelDims
from .recompute import _find, _Recorder, _restore, _snapshot, _unpack, recompute_mode

MODES = ("none", "ep")


def check_overlap(mode: str, dims: ParallelDims, schedule: str | None = None) -> None:
    """`parallel.overlap` against the layout: a LayoutError naming the key and where it applies. At pp = 1 it
    pairs micro-batches (ep > 1); at pp > 1 it runs DualPipeV's F&B chunks part by part (`FBRunner`)."""
    if mode not in MODES:
        raise LayoutError(f"parallel.overlap = {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return
    if dims.pp > 1 and schedule is not None and schedule != "dualpipev":
        raise LayoutError(f"parallel.overlap = ep at pp > 1 overlaps DualPipeV's F&B chunks; parallel.pp_schedule is "
                          f"{schedule!r}: set parallel.pp_schedule=dualpipev or parallel.overlap=none")
    if dims.pp == 1 and dims.ep == 1:
        raise LayoutError("parallel.overlap = ep overlaps the expert all-to-alls, so it needs parallel.ep > 1; "
                          "set parallel.overlap=none for this layout")
    if dims.cp > 1 or (dims.tp > 1 and (dims.ep > 1 or dims.pp == 1)):
        raise LayoutError(f"parallel.overlap = ep runs with cp = 1, and with tp = 1 where experts are dispatched "
                          f"(got tp = {dims.tp}, ep = {dims.ep}, cp = {dims.cp}): the MoE's tp token split and the "
                          f"cp exchange sit outside the parts; set parallel.overlap=none or parallel.tp=1, "
                          f"parallel.cp=1")


# -- the parts ------------------------------------------------------------------------------------------------
class _Step:
    """One part of a micro-batch's forward: `outputs` (what it produced, with their graph), the leaves the
    later parts consumed in their place (`leaves`, same order), and the leaves it consumed (`inputs`).
    An all-to-all step, recorded where it was waited for, keeps per tensor sent (sent leaf, received leaf,
    send, recv, group, label). `experts`: the part is the routed experts' GEMMs (their W may be deferred alone)."""

    __slots__ = ("outputs", "leaves", "inputs", "a2a", "experts")

    def __init__(self, outputs=(), leaves=(), inputs=(), a2a=None):
        self.outputs, self.leaves, self.inputs, self.a2a = list(outputs), list(leaves), list(inputs), a2a
        self.experts = False


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _differentiable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _run_in_unit(unit: nn.Module, mode: str, fn, *args):
    """fn(*args) under `unit`'s recomputation mode (parallel/recompute.py, applied to one part)."""
    if not torch.is_grad_enabled() or mode == "none":
        return fn(*args)
    if mode == "full":
        runs = []

        def run(*a):
            if not runs:
                runs.append(True)
                return fn(*a)
            state = _snapshot(unit)  # the recomputation must not repeat the part's side effects
            if _fsdp_state(unit) is not None:  # e.g. reached through a balance loss, before the unit's backward
                unit.unshard()
            try:
                return fn(*a)
            finally:
                _restore(unit, state)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
    rec, handles = _Recorder(), []
    for name in getattr(type(unit), "recompute_selective", None) or ():
        sub = _find(unit, name)
        if sub is not None:
            handles.append(sub.register_forward_pre_hook(functools.partial(rec.pre, name), with_kwargs=True))
            handles.append(sub.register_forward_hook(rec.post, with_kwargs=True, prepend=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, _unpack):
            return fn(*args)
    finally:
        for h in handles:
            h.remove()
        rec.close()


def _entry(unit: nn.Module):
    """unit._overlap_entry(mode, fn, *args): a part run inside `unit`'s FSDP2 unit (its parameters gathered,
    its backward hooks registered) when it is one, in the given recomputation mode."""
    entry = vars(unit).get("_overlap_entry")
    if entry is None:
        from torch.distributed.fsdp import register_fsdp_forward_method
        unit._overlap_entry = functools.partial(_run_in_unit, unit)
        register_fsdp_forward_method(unit, "_overlap_entry")  # a no-op unless unit is an FSDP module
        entry = vars(unit)["_overlap_entry"]
    return entry


@contextlib.contextmanager
def _layers_skipped(model: nn.Module, seen: list | None = None):
    """The model's layer loop (`_blocks`, a seam) replaced by one that returns its input (and records its
    arguments in `seen`): `hidden` then gives the embedding, `loss(h=...)` the loss from the last layer's output."""
    def skip(h, *args, **kwargs):
        if seen is not None:
            seen.append((args, kwargs))
        return h
    model._blocks = skip
    try:
        yield
    finally:
        del model._blocks


class _MicroBatch:
    """One micro-batch's forward (a generator of parts) and, after it, its backward (another)."""

    def __init__(self, model: nn.Module, tokens, labels, inputs: dict, n: int, connected: bool = False):
        self.model, self.tokens, self.labels, self.inputs, self.n = model, tokens, labels, inputs, n
        # connected: one autograd graph (the last micro-batch, whose backward runs alone: one
        # `backward()`, as SingleStage's, so FSDP2 reduces each gradient once, whole)
        self.connected = connected
        self.steps: list[_Step] = []
        self.out: dict[str, torch.Tensor] = {}
        # weights: {gradient accumulator: parameter} whose gradients a part's backward may defer (DualPipe's W,
        # V3 Figure 4): each part then computes its input gradients first and keeps what its weight gradients need
        self.weights: dict | None = None
        self.experts_only = False   # defer only the routed experts' parts' W (`FBRunner.defer_weights` "experts")
        self.deferred: list = []
        self.n_deferred = 0
        # halves: the routed experts in two token halves hiding each other's all-to-alls (`_routed_halves`)
        self.halves = False
        # paired: this forward runs beside another micro-batch's backward (`_routed`: the shared experts first)
        self.paired = False
        self.n_halved = 0   # MoE blocks run in halves
        # shared_late: the backward runs the shared experts under the combine's reverse rather than the dispatch's
        # (where the deferred weight gradients of the experts then run: `FBRunner.defer_weights`)
        self.shared_late = False

    # -- forward ------------------------------------------------------------------------------------------
    def _compute(self, fn, inputs: list, *args):
        """Run fn(*inputs, *args) as a part: every differentiable output gets a leaf for the later parts."""
        out = fn(*inputs, *args)
        if self.connected:
            return out
        flat, spec = tree_flatten(out)
        outputs, leaves = [], []
        for i, t in enumerate(flat):
            if _differentiable(t):
                leaf = _leaf(t)
                outputs.append(t)
                leaves.append(leaf)
                flat[i] = leaf
        self.steps.append(_Step(outputs, leaves, [x for x in inputs if _differentiable(x)]))
        return tree_unflatten(flat, spec)

    @staticmethod
    def _fp8_sends(sends: list, fp8):
        """`fp8` = (rows sent, their tiles): FP8 dispatch (V3 §3.3.3); the rows' send becomes the tiles' E4M3
        bytes and their scales."""
        if fp8 is None:
            return sends
        _x_s, tiles = fp8
        s, r, g = sends[0][1:4]
        return [(tiles.data.view(torch.uint8), s, r, g, "all_to_all"), (tiles.scale, s, r, g, "all_to_all_scales"),
                *sends[1:]]

    def _issue(self, sends: list, fp8=None):
        """Issue [(tensor, send, recv, group, label)] asynchronously; `_receive` waits for them."""
        sends = self._fp8_sends(sends, fp8)
        return sends, [comm.all_to_all_async(t.detach(), s, r, g, label) for t, s, r, g, label in sends], fp8

    def _receive(self, issued) -> list:
        """Wait for an issued all-to-all: the received leaves. Its step is recorded here, after the parts that
        ran while it flew, so that the backward sends its gradients back before their backward, which then
        runs while those fly (the backward waits only where a part needs them: `backward`). With `fp8` the
        first two sends (tiles, scales) arrive as one `Fp8Rows`, whose gradient goes back to the rows in their
        dtype, like a BF16 payload's."""
        sends, works, fp8 = issued
        got, record = [], []
        for (t, s, r, g, label), w in zip(sends, works):
            y = w.wait()
            if _differentiable(t):
                y = y.requires_grad_()
                record.append((t, y, s, r, g, label))
            got.append(y)
        if fp8 is not None:   # a leaf of the rows' values, its gradient sent back like a BF16 payload's
            x_s, tiles = fp8
            s, r, g = sends[0][1:4]
            q_r, s_r = got[0].view(tiles.data.dtype), got[1]
            y = dequantize(q_r, s_r, TILE).to(x_s.dtype).requires_grad_()
            record.insert(0, (x_s, y, s, r, g, "all_to_all"))
            got = [Fp8Rows.wrap(y, Fp8Tensor(q_r, s_r, TILE)), *got[2:]]
        self.steps.append(_Step(a2a=record))
        return got

    def _all_to_all(self, sends: list, meanwhile=None, fp8=None):
        """Issue [(tensor, send, recv, group, label)], yield while they fly, run `meanwhile()` (parts that do
        not need them), then wait: (the received leaves, what meanwhile returned)."""
        if self.connected:  # autograd's all-to-alls, issued now, waited below; their backward is blocking
            works = [issue_all_to_all(t, s, r, g, label) for t, s, r, g, label in self._fp8_sends(sends, fp8)]
            yield
            extra = meanwhile() if meanwhile is not None else None
            got = [w.wait() for w in works]
            if fp8 is not None:
                x_s, tiles = fp8
                s, r, g = sends[0][1:4]
                q_r, s_r = got[0].view(tiles.data.dtype), got[1]
                got = [Fp8Rows.wrap(_Fp8Arrival.apply(x_s, q_r, s_r, s, r, g), Fp8Tensor(q_r, s_r, TILE)), *got[2:]]
            return got, extra
        issued = self._issue(sends, fp8)
        yield
        extra = meanwhile() if meanwhile is not None else None
        return self._receive(issued), extra

    def forward(self):
        model = self.model
        seen: list = []
        with _layers_skipped(model, seen):
            h = self._compute(lambda: model.hidden(self.tokens, **self.inputs), [])
        h = yield from self._trunk(h, *_seen_args(*seen[0]))
        with _layers_skipped(model):
            self.out = model.loss(self.tokens, self.labels, h=h, **self.inputs)
        self.steps.append(_Step([self.out["loss"] / self.n]))  # the seed of the backward, as SingleStage's

    def _trunk(self, h, rope, start_pos, _caches, mask):
        """The layer loop, part by part: a MoE block under expert parallelism in its parts, any other as one."""
        for block in self.model.layers.values():
            if isinstance(getattr(getattr(block, "ffn", None), "experts", None), ExpertParallel):
                h = yield from self._moe_block(block, h, rope, start_pos, mask)
            else:
                h = self._whole(block, h, rope, start_pos, mask)
        return h

    def _whole(self, block: nn.Module, h, rope, start_pos, mask):
        """A block as one part. A MoE block's balance losses (kept on the module until the stage's end sums
        them) are outputs of the part too, so that their graph is cut at its end like the hidden states'."""
        ffn = getattr(block, "ffn", None)

        def run(x):
            return block(x, rope, start_pos, None, mask), dict(getattr(ffn, "aux_losses", None) or {})
        h, aux = self._compute(run, [h])
        if aux:
            ffn.aux_losses = aux
        return h

    def _moe_block(self, block: nn.Module, x, rope, start_pos, mask):
        mode, experts = recompute_mode(block), block.ffn.experts
        fsdp = _fsdp_state(block) if self.connected else None
        if fsdp is not None:  # the whole block inside its FSDP2 unit, as its forward would be
            (x,), _ = fsdp._pre_forward(block, (x,), {})
            entry = functools.partial(_gathered, block)
        else:
            entry = _entry(block)
        h, u, w, routed, partial, stats = self._compute(
            lambda x_: entry(mode, block.moe_pre, x_, rope, start_pos, None, mask), [x])
        shared = functools.partial(self._compute, lambda u_: entry(mode, block.moe_shared, u_), [u])
        # not under FP8: its weight-gradient GEMM quantizes along the tokens, so halves would change the tiles
        if (self.halves and len(experts.ep_levels) == 1 and not self.connected and routed.shape[0] > 1
                and getattr(experts, "fp8_dispatch", None) is None):
            y, shared = yield from self._routed_halves(experts, mode, u, w, routed, shared)
        else:
            y, shared = yield from self._routed(experts, mode, u, w, routed, shared)
        out = self._compute(lambda h_, u_, y_, s_, st: entry(mode, block.moe_post, h_, u_, y_, st, s_),
                            [h, u, y, shared], stats)
        return out if fsdp is None else fsdp._post_forward(block, (x,), out)

    def _routed(self, experts, mode: str, u, w, routed, shared):
        """The routed experts' output for u [T, dim] (dispatch level by level, the experts, combine back) and the
        shared experts' (`shared()`: they need no dispatch). Alone, they run while the last level's payload
        flies; in a pair (`paired`), before it is issued: the partner's compute hides that payload, and the
        shared experts then hide the split sizes' exchange and lengthen what the partner's reverse combine,
        issued before, flies under."""
        xs, idx, ws, base, span = u, routed, w, 0, experts.ep_total
        routes, out, held = [], None, []
        levels = experts.ep_levels
        recipe = getattr(experts, "fp8_dispatch", None)   # the rows as FP8 tiles (expert_parallel.py)

        def shared_part(hold: bool):
            y_shared = shared()
            if hold:   # its step recorded later (below)
                held.append(self.steps.pop())
            return y_shared

        for i, group in enumerate(levels):        # dispatch, level by level (across nodes, then inside)
            last = i == len(levels) - 1
            route = Route(group, idx, base, span)   # issues the split sizes' exchange
            # (not in one autograd graph: there the order the parts are built in orders u's gradient sum)
            early = last and self.paired and not self.connected
            if early:   # the shared experts before the dispatch: they hide the split sizes' exchange (below)
                out = shared_part(True)
            route.exchange()                        # the split sizes: the host synchronisation
            x_s, w_s = self._compute(route.gather, [xs, ws])
            if early and not self.shared_late:
                # recorded after the gather, as in the other order: the backward adds u's gradients in the
                # serial step's order, and runs the shared experts' part under the dispatch's reverse
                self.steps += held
                held.clear()
            meanwhile = functools.partial(shared_part, self.shared_late and not self.connected)
            (xs, idx, ws), got = yield from self._all_to_all(
                _dispatch_sends(route, x_s, w_s), meanwhile if last and not early else None,
                fp8=(x_s, row_tiles(x_s, recipe)) if recipe is not None and group.size > 1 else None)
            out = got if last and not early else out
            routes.append(route)
            base, span = route.child_base, route.per
        y = self._experts(experts, mode, xs, idx, ws, base, span)
        # with `shared_late`, the shared experts' step recorded after the experts': the backward runs them while the
        # combine's reverse flies (the experts' backward needs its gradient), still between the post part's and
        # the gather's gradients for u, the serial step's order
        self.steps += held
        for route in reversed(routes):           # combine, level by level back
            (y_s,), _ = yield from self._all_to_all([(y, route.recv, route.send, route.group, "all_to_all")])
            y = self._compute(lambda t: route.scatter_add(t, u), [y_s])
        return y, out

    def _routed_halves(self, experts, mode: str, u, w, routed, shared):
        """`_routed` (one dispatch level) with the tokens in two halves, each half's all-to-alls flying while
        the other half computes: for a chunk with no partner to hide them (DualPipeV's warm-up forwards and
        cool-down backwards). Dispatch A flies under B's gather and the shared experts, dispatch B under the
        experts on A, combine A under the experts on B; only combine B has nothing under it (and, backward,
        the reverse of combine B). Each token's rows and the order they are summed in are the whole
        dispatch's; only the experts' GEMMs see fewer rows at once (not under FP8, whose weight-gradient tiles
        run along the tokens: `_moe_block` keeps those chunks whole)."""
        self.n_halved += 1
        group, span = experts.ep_levels[0], experts.ep_total
        first = (torch.arange(routed.shape[0], device=routed.device) < (routed.shape[0] + 1) // 2).unsqueeze(1)
        # a token's pairs outside its half point past the experts (span): absent from that half's route
        routes = [Route(group, torch.where(first, routed, span), 0, span),
                  Route(group, torch.where(first, span, routed), 0, span)]   # both split-size exchanges issued
        dispatches = []
        for route in routes:
            route.exchange()
            x_s, w_s = self._compute(route.gather, [u, w])
            dispatches.append(self._issue(_dispatch_sends(route, x_s, w_s)))
            yield
        out = shared()
        combines = []
        for route, issued in zip(routes, dispatches):
            xs, idx, ws = self._receive(issued)
            y = self._experts(experts, mode, xs, idx, ws, route.child_base, route.per)
            combines.append(self._issue([(y, route.recv, route.send, group, "all_to_all")]))
            yield
        ys = [self._receive(issued)[0] for issued in combines]
        y = self._compute(lambda a, b: routes[0].scatter_add(a, u) + routes[1].scatter_add(b, u), ys)
        return y, out

    def _experts(self, experts, mode: str, xs, idx, ws, base: int, span: int):
        """This rank's experts on the rows it received (FP8 tiles, when dispatched so, passed apart: FSDP2's
        entry returns plain tensors)."""
        tiles = xs.fp8 if isinstance(xs, Fp8Rows) else None
        y = self._compute(lambda x_, w_: _entry(experts)(mode, experts.ep_local, x_, idx, w_, base, span, tiles),
                          [xs, ws])
        if not self.connected:
            self.steps[-1].experts = True
        return y

    # -- backward -----------------------------------------------------------------------------------------
    def backward(self, outputs=None, grads=None):
        """The parts' backward in reverse order; yields after issuing each reverse all-to-all. The seed is the
        last step's outputs, or `outputs` with their `grads` (a pipeline stage's output and its gradient)."""
        steps, self.steps = self.steps, []
        seed = steps.pop()
        torch.autograd.backward(seed.outputs if outputs is None else outputs, grads)
        if self.connected:
            return
        flying: list = []   # reverse all-to-alls issued, not yet waited for: (their record, works)
        while steps:
            step = steps.pop()
            if step.a2a is not None:
                flying.append((step.a2a, [comm.all_to_all_async(got.grad if got.grad is not None else
                                                                torch.zeros_like(got), r, s, g, label)
                                          for _sent, got, s, r, g, label in step.a2a]))
                yield
                self.weight_grads()   # deferred weight gradients run while the all-to-alls fly
                continue
            self._land(flying, step.leaves)   # only the gradients this part needs
            self._part_backward(step)
        self._land(flying, None)

    @staticmethod
    def _land(flying: list, leaves) -> None:
        """Wait for the reverse all-to-alls whose gradients go to one of `leaves` (all: None) and add them."""
        for item in list(flying):
            record, works = item
            if leaves is None or any(sent is leaf for sent, *_ in record for leaf in leaves):
                for (sent, *_), work in zip(record, works):
                    _accumulate(sent, work.wait())
                flying.remove(item)

    def _part_backward(self, step: _Step) -> None:
        """One compute part's backward from its outputs' gradients; its weight gradients deferred if `weights`."""
        pairs = [(o, leaf.grad) for o, leaf in zip(step.outputs, step.leaves) if leaf.grad is not None]
        if pairs:
            outs, grads_ = [o for o, _ in pairs], [g for _, g in pairs]
            defer = self.weights and step.inputs and (step.experts or not self.experts_only)
            later = _input_grads(outs, grads_, step.inputs, self.weights) if defer else None
            if later is None:
                torch.autograd.backward(outs, grads_)
            else:
                self.deferred.append(later)
                self.n_deferred += 1

    def weight_grads(self) -> None:
        """The weight gradients the parts' backward deferred (`weights` set), in the order they were deferred."""
        while self.deferred:
            _weight_grads(self.deferred.pop(0))


def _dispatch_sends(route: Route, x_s: torch.Tensor, w_s: torch.Tensor) -> list:
    """A dispatch level's sends, [(tensor, send, recv, group, label)]: the rows, their expert indices, their
    gate weights."""
    s, r, g = route.send, route.recv, route.group
    return [(x_s, s, r, g, "all_to_all"), (route.idx_s, s, r, g, "all_to_all_routing"),
            (w_s, s, r, g, "all_to_all_routing")]


def _input_grads(outputs: list, grads: list, inputs: list, weights: dict):
    """A part's input gradients (accumulated on its input leaves) with the gradients at the nodes where its
    weights join recorded for `_weight_grads` (torch.distributed.pipelining's I/W split, per part). None (do
    the whole backward) when some weight of the part would not be reached that way."""
    if any(isinstance(x, Fp8Rows) for x in inputs):
        return None   # an FP8-dispatched payload (a tensor subclass): split, its experts' gradients came out wrong
                      # (tests/test_overlap_pipeline.py's FP8 case), so that part's backward stays whole
    reverse = construct_reverse_graph([o.grad_fn for o in outputs if o.grad_fn is not None])
    accs = {acc: w for acc, w in weights.items() if acc in reverse}   # this part's weights
    if not accs:
        return None
    groups = get_param_groups([_get_grad_fn_or_grad_acc(x) for x in inputs], list(accs), reverse)
    if set().union(*(g["params"] for g in groups)) != set(accs):
        return None
    handles = []
    for group in groups:
        group["intermediates"] = list(group["intermediates"])
        group["grads"] = [None] * len(group["intermediates"])
        for i, node in enumerate(group["intermediates"]):
            def keep(grad_outputs, group=group, i=i):
                group["grads"][i] = grad_outputs
            handles.append(node.register_prehook(keep))
    try:
        dinputs = torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for x, g in zip(inputs, dinputs):
        if g is not None:
            _accumulate(x, g)
    return groups, accs


def _weight_grads(later) -> None:
    """W of one part: its weight gradients from the gradients `_input_grads` kept at the nodes where they join,
    one autograd call per parameter group: a call given every group's nodes would also run, from a node
    high in the graph, the input-gradient path down to the lower groups' nodes (the I pass again)."""
    from torch.autograd.graph import GradientEdge
    groups, accs = later
    for group in groups:
        edges, outs, kept = [], [], []
        for grads, node in zip(group["grads"], group["intermediates"]):
            if grads is None:
                continue
            kept.append((node, grads))
            for i, g in enumerate(grads):
                if g is not None:
                    edges.append(GradientEdge(node, i))
                    outs.append(g)
        if not edges:
            continue
        params = list(group["params"])
        # a kept node below another of the group gets its kept gradient, not that plus what flows into it again
        clamps = ([node.register_prehook(lambda _g, grads=grads: grads) for node, grads in kept]
                  if len(kept) > 1 else [])
        try:
            dws = torch.autograd.grad(edges, [GradientEdge(a, 0) for a in params], outs, allow_unused=True)
        finally:
            for h in clamps:
                h.remove()
        for acc, dw in zip(params, dws):
            if dw is not None:
                _accumulate_weight(accs[acc], dw)


def _fsdp_state(module: nn.Module):
    """The module's FSDP2 state when it is an FSDP unit (what register_fsdp_forward_method calls), else None."""
    from torch.distributed.fsdp import FSDPModule
    return module._get_fsdp_state() if isinstance(module, FSDPModule) else None


def _gathered(unit: nn.Module, *args):
    """_run_in_unit with the unit's parameters gathered first: the other micro-batch's backward parts, run in
    between, end with FSDP2's final callback, which reshards every unit not in backward."""
    unit.unshard()
    return _run_in_unit(unit, *args)


def _accumulate(leaf: torch.Tensor, g: torch.Tensor) -> None:
    leaf.grad = g if leaf.grad is None else leaf.grad + g


def _accumulate_weight(param: torch.Tensor, g: torch.Tensor) -> None:
    """`_accumulate` for a parameter over micro-batches: in place once its gradient is a sum this function made
    (a gradient autograd returned may alias another's, so the first one is never written into)."""
    if param.grad is None:
        param.grad = g
    elif getattr(param.grad, "_summed_here", False):
        param.grad.add_(g)
    else:
        total = param.grad + g
        total._summed_here = True
        param.grad = total


def _seen_args(args, kwargs):
    """The arguments after h that the layer loop `_blocks(h, rope, start_pos=0, caches=None, mask=None)` got."""
    def bind(rope, start_pos=0, caches=None, mask=None):
        return rope, start_pos, caches, mask
    return bind(*args, **kwargs)


def _interleave(*gens) -> None:
    """Drive generators in turn, each up to its next yield (an all-to-all issued), until all are done."""
    live = [g for g in gens if g is not None]
    while live:
        for g in list(live):
            try:
                next(g)
            except StopIteration:
                live.remove(g)


def overlapped_losses(model: nn.Module, mesh, micro_batch_size: int, tokens: torch.Tensor, labels: torch.Tensor,
                      inputs: dict | None = None) -> dict[str, float]:
    """Forward + backward of this rank's rows in micro-batches of `micro_batch_size`, F(k+1) interleaved with
    B(k): the gradients and returned loss terms of `SingleStage._losses(..., backward=True)` (the mean over
    micro-batches and dp), FSDP2 reducing once, in the last backward."""
    inputs = inputs or {}
    n = tokens.shape[0] // micro_batch_size
    mbs = []
    for i in range(n):
        rows = slice(i * micro_batch_size, (i + 1) * micro_batch_size)
        mbs.append(_MicroBatch(model, tokens[rows], labels[rows], {k: v[rows] for k, v in inputs.items()}, n,
                               connected=i == n - 1))
        mbs[-1].paired = i > 0   # beside the backward of micro-batch i - 1
    sums: dict[str, torch.Tensor] = {}
    set_gradient_sync(model, n == 1)
    prev = None
    for i, mb in enumerate(mbs):
        # the backward leads, as in DualPipeV's pairs: its reverse combine flies while the forward runs
        # attention, the router and the shared experts (measured: 13% exposed against 15-19% forward first)
        _interleave(prev.backward() if prev is not None else None, mb.forward())
        for k, v in mb.out.items():
            sums[k] = sums.get(k, 0.0) + v.detach().double() / n  # fp64, as SingleStage sums
        prev = mb
    set_gradient_sync(model, True)
    _interleave(prev.backward())
    finish_grad_sync(model, mesh)
    total = comm.all_sum({k: sums[k] for k in sorted(sums)}, mesh["dp"], mesh.device_type)
    return {k: v / mesh.dims.dp for k, v in total.items()}


# -- DualPipeV's F&B chunks (pp > 1; V3 §3.2.1, Figure 4) -------------------------------------------------------
class _StagePass(_MicroBatch):
    """One micro-batch through one pipeline stage, part by part: forward from the stage's input `h_in` (None on
    the first stage) to its output (the hidden states it sends, carrying its balance losses; the [1] loss on the
    last stage), what `StageModel._forward` computes; backward from that output and its gradient."""

    def __init__(self, stage: nn.Module, h_in, kwargs: dict):
        kw = dict(kwargs)
        if kw.pop("routes", None) is not None:
            raise LayoutError("routing replay (grpo.routing_replay) is not built into the pipeline's F&B overlap: "
                              "set parallel.overlap=none for this layout")
        kw.pop("route_pairs", None)
        tokens, labels = kw.pop("tokens"), kw.pop("labels")
        super().__init__(stage, tokens, labels, kw, n=1)
        self.h_in, self.output = h_in, None

    def forward(self):
        stage = self.model
        doc_ids = self.inputs.get("doc_ids")
        rest = {k: v for k, v in self.inputs.items() if k != "doc_ids"}
        frame = {} if doc_ids is None else {"doc_ids": doc_ids}
        entry = _entry(stage)   # the stage's own parameters (embedding, norm, head, MTP) in its FSDP2 unit
        seen: list = []
        with _layers_skipped(stage, seen):
            if self.h_in is None:
                h = self._compute(lambda: entry("none", lambda: stage.hidden(self.tokens, **frame)), [])
            else:
                h = self._compute(lambda x: entry("none", lambda x_: stage.hidden(self.tokens, h=x_, **frame), x),
                                  [self.h_in])
        h = yield from self._trunk(h, *_seen_args(*seen[0]))
        with _layers_skipped(stage):   # the balance losses attached, or the loss (objective) of the last stage
            self.output = entry("none", lambda h_: stage._forward(h_, self.tokens, self.labels, doc_ids, rest), h)
        self.steps.append(_Step([self.output]))


class FBRunner:
    """Runs every forward and backward of this rank's stages under torch's DualPipeV runtime part by part, and
    its OVERLAP_F_B actions (the forward of one micro-batch on one stage, the backward of another on the other
    stage) interleaved, so that each all-to-all of one runs while the other computes (V3 §3.2.1, Figure 4).
    Registered for FORWARD, FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT and OVERLAP_F_B
    (`register_custom_function`), doing what the runtime's own handlers do around the compute: wait for the
    received activations or gradients, cache the output for the send, compute the loss, hand over locally
    between the two stages of the V on this rank.

    With `defer_weights` ("all", the default: DualPipe's W, V3 Figure 4) each part's backward, without
    recomputation, first computes its input gradients only (torch.distributed.pipelining's I/W split, applied
    per part) and keeps what its weight gradients need; they run after the backward issues its next
    all-to-all, hiding it (and, in a pair, the forward's), the rest at the backward's end or at the
    BACKWARD_WEIGHT action after a BACKWARD_INPUT (the zero-bubble deferral kept); the shared experts' backward
    then runs under the combine's reverse (`_MicroBatch.shared_late`). "experts": the routed experts' parts
    only; "none": a part's backward computes its weight gradients with its input gradients (BACKWARD_INPUT
    runs the whole backward, BACKWARD_WEIGHT finds nothing left). Under recomputation, and for an
    FP8-dispatched payload's experts, a part's backward runs whole either way."""

    def __init__(self, schedule, stages: list):
        from torch.distributed.pipelining.schedules import (BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, FULL_BACKWARD,
                                                            OVERLAP_F_B)
        self.stages = {s.stage_index: s for s in stages}
        self.passes: dict[tuple[int, int], _StagePass] = {}
        self.waiting_w: dict[tuple[int, int], _StagePass] = {}   # after BACKWARD_INPUT, before BACKWARD_WEIGHT
        self.trace: list | None = None   # a list: each action appends (kind, [(stage, micro-batch)], start, end)
        # W deferred into the all-to-alls' flight: "all" (every part's), "experts" (the routed experts' parts only)
        # or "none" (each part's backward whole); measured in benchmarks/overlap.py
        self.defer_weights = "all"
        # the (stage, micro-batch) whose forward or backward runs alone (warm-up, cool-down): their routed
        # experts go in token halves that hide each other's all-to-alls (`_MicroBatch._routed_halves`)
        lone = (FORWARD, FULL_BACKWARD, BACKWARD_INPUT)
        order = [a for a in schedule.pipeline_order[schedule.rank] if a is not None]
        self.lone = {(a.stage_index, a.microbatch_index) for a in order if a.computation_type in lone}
        self.paired = {(f.stage_index, f.microbatch_index) for a in order if a.computation_type == OVERLAP_F_B
                       for f in a.sub_actions if f.computation_type == FORWARD}
        self.split_lone = True
        self.halved_blocks = 0           # MoE blocks run in halves, since construction (tests read it)
        self.deferred_parts = 0          # parts whose W was deferred, since construction (tests read it)
        schedule.register_custom_function(FORWARD, self._timed("F", lambda a, ctx: (self._forward(a, ctx),)))
        schedule.register_custom_function(FULL_BACKWARD, self._timed("B", lambda a, ctx: (self._backward(a, ctx),)))
        schedule.register_custom_function(BACKWARD_INPUT, self._timed("I", lambda a, ctx: (
            self._backward(a, ctx, input_only=True),)))
        schedule.register_custom_function(BACKWARD_WEIGHT, self._timed("W", lambda a, ctx: (self._weights(a),)))
        # the backward leads (V3 Figure 4): its combine's gradient flies under the forward's attention, the
        # forward's dispatch under the backward's experts, and so on, each all-to-all under the other's compute
        schedule.register_custom_function(OVERLAP_F_B, self._timed("F&B", lambda a, ctx: (
            self._backward(a.sub_actions[1], ctx), self._forward(a.sub_actions[0], ctx))))

    def _timed(self, kind: str, generators):
        def run(action, ctx):
            t0 = time.perf_counter()
            _interleave(*generators(action, ctx))
            if self.trace is not None:
                subs = action.sub_actions or (action,)
                self.trace.append((kind, [(a.stage_index, a.microbatch_index) for a in subs], t0,
                                   time.perf_counter()))
        return run

    def _forward(self, action, ctx):
        from torch.distributed.pipelining.schedules import _wait_batch_p2p
        sched, idx, mb = ctx.schedule_ref, action.stage_index, action.microbatch_index
        stage = self.stages[idx]
        sched._assert_unsharded(stage)
        if not stage.is_first and idx - 1 not in self.stages:   # received (else handed over on this rank)
            _wait_batch_p2p(sched.fwd_recv_ops.pop((idx, mb)))
        h_in = None if stage.is_first else stage._retrieve_recv_activations(mb)[0]
        part = self.passes[(idx, mb)] = _StagePass(stage.submod, h_in, ctx.kwarg_mbs[mb])
        part.halves = self.split_lone and (idx, mb) in self.lone
        part.paired = (idx, mb) in self.paired
        part.shared_late = self._defers(stage)
        yield from part.forward()
        self.halved_blocks += part.n_halved
        out = part.output
        stage.fwd_cache[mb] = ((out,), [] if h_in is None else [h_in])   # what the SEND_F action sends
        if stage.is_last:
            stage.output_chunks.append(out)
        sched._maybe_compute_loss(stage, out, ctx.target_mbs, mb)
        if idx + 1 in self.stages:
            self.stages[idx + 1].set_local_fwd_input(out, mb)

    def _defers(self, stage) -> bool:
        """Whether this stage's backward parts defer their weight gradients (not under recomputation)."""
        if self.defer_weights not in ("none", "experts", "all"):
            raise ValueError(f"FBRunner.defer_weights={self.defer_weights!r}: valid values are none, experts, all")
        return self.defer_weights != "none" and all(recompute_mode(b) == "none" for b in stage.submod.layers.values())

    def _weights(self, action):
        self.waiting_w.pop((action.stage_index, action.microbatch_index)).weight_grads()
        yield from ()

    def _backward(self, action, ctx, input_only: bool = False):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.pipelining.schedules import _wait_batch_p2p
        sched, idx, mb = ctx.schedule_ref, action.stage_index, action.microbatch_index
        stage = self.stages[idx]
        sched._assert_unsharded(stage)
        if not stage.is_last and idx + 1 not in self.stages:
            _wait_batch_p2p(sched.bwd_recv_ops.pop((idx, mb)))
        part = self.passes.pop((idx, mb))
        stage.fwd_cache.pop(mb)
        if stage.is_last:
            outputs, grads = [sched._maybe_get_loss(stage, mb)], None
        else:
            outputs, grads = [part.output], [stage._retrieve_recv_grads(mb)[0]]
        if isinstance(stage.submod, FSDPModule):   # as the runtime's backward: reduce once, in REDUCE_GRAD
            stage.submod.set_is_last_backward(False)
            stage.submod.set_reshard_after_backward(False)
            stage.submod.set_requires_gradient_sync(False)
        if self._defers(stage):
            # DualPipe's W (V3 Figure 4): each part's weight gradients wait for an all-to-all to hide under
            part.weights = {_get_grad_fn_or_grad_acc(p): p for p in stage.submod.parameters() if p.requires_grad}
            part.experts_only = self.defer_weights == "experts"
        yield from part.backward(outputs, grads)
        self.deferred_parts += part.n_deferred
        if input_only:
            self.waiting_w[(idx, mb)] = part
        else:
            part.weight_grads()
        grad_in = ()
        if part.h_in is not None:
            grad_in, part.h_in.grad = (part.h_in.grad,), None
        stage.bwd_cache[mb] = grad_in                    # what the SEND_B action sends
        if idx - 1 in self.stages:
            self.stages[idx - 1].set_local_bwd_input(stage.get_local_bwd_output(mb), mb)
