"""Activation recomputation (V3 §3.2.3), applied from outside to a model's recompute units: the
modules whose class sets `fsdp_unit` (the transformer blocks, the MTP modules' blocks included).

    apply_recompute(stage, "selective")   # once per pipeline stage, each with its own mode

Modes
  none       autograd keeps what it saves.
  full       each unit keeps only its inputs and re-runs its whole forward in backward
             (`torch.utils.checkpoint`, non-reentrant).
  selective  everything is kept as usual except the submodules the unit's class names in
             `recompute_selective` (V3: every RMSNorm and the MLA up-projections): neither their
             outputs nor what autograd saves inside them is kept. Each one's forward call records
             its inputs; in backward, the first saved tensor of that call that is needed re-runs it
             once from those inputs (themselves recomputed when they are another listed
             submodule's output, e.g. wq_b's input q_norm(c^Q)), and every saved tensor of the
             call, or view of its output, is taken from the re-run.

Why not a selective-checkpoint policy (`create_selective_checkpoint_contexts`) around the block:
it caches the output of every op the policy does not recompute, including the many that autograd
never saves (the attention and expert outputs, their sums, ...), so on this model "selective" kept
more than "none". Here, outside the listed submodules, autograd's own choice stands.

The mechanism is applied from outside without renaming anything (no checkpoint_wrapper prefix):
the unit's instance gets a `forward` that wraps its class's; FSDP2's `fully_shard`, applied before
or after, keeps it (FSDP2 swaps the class and adds hooks, so recomputation runs inside the FSDP
unit, as in torchtitan: the unit's parameters are gathered for backward before it recomputes).
Listed submodules are found by name at every forward, so tensor parallelism may swap them (for
column-parallel linears) before or after this is applied.

Side effects: recomputation must not repeat them. "full" re-runs the whole forward, so each
recomputation restores the unit's buffers (values and identity) and public attributes as they were
before it: the MoE's `tokens_per_expert` is counted once and `aux_losses` stays the forward's. It also
runs with the public attributes the forward had (restored after): under a pipeline schedule other
micro-batches' forwards run in between and may set per-micro-batch steering, such as routing replay's
`forced_routes`, which the recomputation must see as its own forward did.
"selective" re-runs only the listed submodules, which must be deterministic, RNG-free, and must
not mutate their inputs or other state (RMSNorm and linear layers are); the number, shapes and
dtypes of the tensors a re-run saves are checked against the forward's, and an input changed in
place after the forward raises instead of silently recomputing something else.

Communication. full: every collective of the unit's forward runs again in backward, in the same
order on every rank (autograd's order is deterministic), so it is correct but repeats the
forward's traffic: under tp the row-parallel all-reduces (or sp's all-gather + reduce-scatter
pairs) and the MoE's token split/gather, under ep the dispatch and combine all-to-alls with their
routing exchange: +50% of a block's tp/ep communication (forward, backward, forward again), which
V3 avoids by recomputing selectively. FSDP2 gathers nothing again (measured on torch 2.13: the
block's parameters, and by backward prefetch those of its experts, a nested FSDP unit, are already
gathered when the recomputation runs). selective: none. The listed submodules compute on local
data (the latents enter the tensor-parallel region at the down-projections' outputs, before
q_norm/kv_norm; the up-projections are column-parallel without collectives). A listed submodule
that did communicate would have its collectives replayed in backward, on every rank alike.
tests/test_recompute.py checks both claims with comm.STATS.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_map

MODES = ("none", "full", "selective")


# hooks read here (fsdp_unit, recompute_selective): parallel/protocols.py
def is_recompute_unit(module: nn.Module) -> bool:
    return bool(getattr(type(module), "fsdp_unit", False))


def apply_recompute(module: nn.Module, mode: str) -> nn.Module:
    """Set the recomputation `mode` ("none" | "full" | "selective") of every recompute unit in
    `module` (a model or a pipeline stage; embed/norm/head may be None there). Calling it again
    replaces the mode. Parameter and state-dict names do not change. Returns `module`."""
    if mode not in MODES:
        raise ValueError(f"recompute mode {mode!r} is not one of {', '.join(MODES)}")
    units = []
    for path, m in module.named_modules():
        if is_recompute_unit(m) and not any(path.startswith(p + ".") for p, _ in units):  # outermost only
            units.append((path, m))
    if mode == "selective":
        for path, m in units:
            if getattr(type(m), "recompute_selective", None) is None:
                raise ValueError(f"{path or type(m).__name__}: selective recomputation needs the class "
                                 f"{type(m).__name__} to name its submodules to recompute in "
                                 "`recompute_selective`; use mode 'full' or 'none' for it")
    for _, m in units:
        if getattr(m, "_recompute_mode", "none") != "none":
            vars(m).pop("forward", None)  # the instance attribute set below; the class's forward shows again
        m._recompute_mode = mode
        if mode == "full":
            m.forward = functools.partial(_full_forward, m)
        elif mode == "selective":
            m.forward = functools.partial(_selective_forward, m)
    return module


def recompute_mode(module: nn.Module) -> str:
    return getattr(module, "_recompute_mode", "none")


# -- full ---------------------------------------------------------------------------------------------
def _full_forward(unit: nn.Module, *args, **kwargs):
    forward = functools.partial(type(unit).forward, unit)
    if not torch.is_grad_enabled():  # inference (and KV-cache decoding): nothing to recompute
        return forward(*args, **kwargs)
    runs = []

    def run(*a, **k):
        if not runs:   # the forward: its public attributes are kept for the recomputation
            runs.append(_attributes(unit))
            return forward(*a, **k)
        state = _snapshot(unit)
        try:  # the recomputation may also stop early (checkpoint's early stop raises through here)
            # in the state of the forward it recomputes: a pipeline runs other micro-batches' forwards in
            # between, which may have set other steering (routing replay's forced experts, per micro-batch)
            _set_attributes(runs[0])
            return forward(*a, **k)
        finally:
            _restore(unit, state)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def _snapshot(unit: nn.Module):
    state = []
    for m in unit.modules():
        buffers = {n: (b, b.clone()) for n, b in m._buffers.items() if b is not None}
        attrs = {k: v for k, v in vars(m).items() if not k.startswith("_")}
        state.append((m, buffers, attrs))
    return state


def _attributes(unit: nn.Module):
    return [(m, {k: v for k, v in vars(m).items() if not k.startswith("_")}) for m in unit.modules()]


def _set_attributes(attributes) -> None:
    for m, attrs in attributes:
        for k, v in attrs.items():
            if vars(m).get(k) is not v:
                setattr(m, k, v)


@torch.no_grad()
def _restore(unit: nn.Module, state) -> None:
    for m, buffers, attrs in state:
        for name, (obj, value) in buffers.items():
            m._buffers[name] = obj
            obj.copy_(value)
        for k, v in attrs.items():
            if vars(m).get(k) is not v:
                setattr(m, k, v)


# -- selective ----------------------------------------------------------------------------------------
def _selective_forward(unit: nn.Module, *args, **kwargs):
    forward = functools.partial(type(unit).forward, unit)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    rec = _Recorder()
    handles = []
    for name in type(unit).recompute_selective:
        sub = _find(unit, name)
        if sub is None:  # e.g. no q_norm without query compression; GQA blocks have none of MLA's
            continue
        # registered now, after every persistent hook: the pre-hook runs last and the post-hook
        # first, so a call records exactly what its forward sees and returns
        handles.append(sub.register_forward_pre_hook(functools.partial(rec.pre, name), with_kwargs=True))
        handles.append(sub.register_forward_hook(rec.post, with_kwargs=True, prepend=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, _unpack):
            return forward(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        rec.close()


def _find(unit: nn.Module, path: str) -> nn.Module | None:
    m = unit
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    if not isinstance(m, nn.Module):
        raise TypeError(f"{type(unit).__name__}.recompute_selective names {path!r}, which is a "
                        f"{type(m).__name__}, not a submodule")
    return m


class _Recorder:
    """One forward of one unit: the listed submodules' calls, and which storages are their outputs."""

    def __init__(self):
        self.current: _Call | None = None
        # storage -> (call, output position, its version then); weak: never keeps an output alive
        self.outputs: dict[StorageWeakRef, tuple[_Call, int, int]] = {}

    def pre(self, name, module, args, kwargs):
        if self.current is None:  # a listed submodule inside another belongs to the outer call
            args, kwargs = self._pack_inputs(args), self._pack_inputs(kwargs)
            self.current = _Call(name, module, args, kwargs, _device_types((args, kwargs)))

    def post(self, module, args, kwargs, out):
        call = self.current
        if call is None or call.module is not module:
            return
        self.current = None
        flat, _ = tree_flatten(out)
        call.out_spec = [isinstance(t, torch.Tensor) for t in flat]
        for pos, t in enumerate(flat):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                self.outputs.setdefault(StorageWeakRef(t.untyped_storage()), (call, pos, t._version))

    def _lookup(self, t: torch.Tensor):
        if not self.outputs or not t.untyped_storage().nbytes():
            return None
        hit = self.outputs.get(StorageWeakRef(t.untyped_storage()))
        if hit is None:
            return None
        call, pos, version = hit
        if t._version != version:  # changed in place since: the re-run would not give it, keep it
            return None
        return _Output(call, pos, t)

    def _pack_inputs(self, tree):
        def pack(x):
            if not isinstance(x, torch.Tensor):
                return x
            return self._lookup(x) or _Input(x)
        return tree_map(pack, tree)

    def pack(self, t: torch.Tensor):
        call = self.current
        if call is not None:  # saved inside a listed call: replayed by index from its re-run
            call.saved_meta.append((t.shape, t.dtype))
            return _Saved(call, len(call.saved_meta) - 1)
        return self._lookup(t) or t

    def close(self):
        self.current = None
        self.outputs.clear()


class _Input:
    """A kept input of a listed call, with its version to detect in-place changes."""

    __slots__ = ("tensor", "version", "requires_grad")

    def __init__(self, t: torch.Tensor):
        self.tensor, self.version, self.requires_grad = t.detach(), t._version, t.requires_grad


class _Call:
    __slots__ = ("name", "module", "args", "kwargs", "saved_meta", "out_spec", "grad", "autocast", "saved", "out")

    def __init__(self, name, module, args, kwargs, devices):
        self.name, self.module, self.args, self.kwargs = name, module, args, kwargs
        self.saved_meta: list = []
        self.out_spec: list = []
        self.saved = self.out = None
        self.grad = torch.is_grad_enabled()
        self.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices}

    def recompute(self) -> None:
        if self.saved is not None:
            return

        def materialize(x):
            if isinstance(x, _Input):
                if x.tensor._version != x.version:
                    raise RuntimeError(f"selective recomputation of {self.name}: its input was modified in "
                                       "place after the forward; recompute it with mode 'full' or do not "
                                       "modify it in place")
                return x.tensor.detach().requires_grad_(x.requires_grad)
            if isinstance(x, _Output):
                return x.get().detach().requires_grad_(x.requires_grad)
            return x
        args, kwargs = tree_map(materialize, (self.args, self.kwargs))
        saved = []

        def keep(t):
            saved.append(t)
            return len(saved) - 1
        with contextlib.ExitStack() as stack:
            for d, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(d, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.set_grad_enabled(self.grad))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, _never))
            out = self.module.forward(*args, **kwargs)
        flat, _ = tree_flatten(out)
        got = [(t.shape, t.dtype) for t in saved]
        if got != self.saved_meta or [isinstance(t, torch.Tensor) for t in flat] != self.out_spec:
            raise RuntimeError(f"selective recomputation of {self.name} saved {len(got)} tensors where its "
                               f"forward saved {len(self.saved_meta)} (or of other shapes): a listed submodule "
                               "must compute the same way in backward (deterministic, no RNG, no state)")
        self.saved = [t.detach() for t in saved]
        self.out = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat]


def _device_types(tree) -> set[str]:
    flat, _ = tree_flatten(tree)
    return {"cpu"} | {x.tensor.device.type if isinstance(x, _Input) else x.device_type
                      for x in flat if isinstance(x, (_Input, _Output))}


class _Saved:
    __slots__ = ("call", "index")

    def __init__(self, call: _Call, index: int):
        self.call, self.index = call, index


class _Output:
    """A tensor saved outside a listed call that is (a view of) one of its outputs."""

    __slots__ = ("call", "pos", "dtype", "size", "stride", "offset", "requires_grad", "device_type")

    def __init__(self, call: _Call, pos: int, t: torch.Tensor):
        self.call, self.pos = call, pos
        self.dtype, self.size, self.stride, self.offset = t.dtype, t.size(), t.stride(), t.storage_offset()
        self.requires_grad, self.device_type = t.requires_grad, t.device.type

    def get(self) -> torch.Tensor:
        self.call.recompute()
        base = self.call.out[self.pos]
        if (base.dtype, base.size(), base.stride(), base.storage_offset()) == (
                self.dtype, self.size, self.stride, self.offset):
            return base
        with torch.no_grad():  # the same view (or dtype view, e.g. view_as_complex) of the re-run's storage
            return torch.empty(0, dtype=self.dtype, device=base.device).set_(
                base.untyped_storage(), self.offset, self.size, self.stride)


def _unpack(x):
    if isinstance(x, _Saved):
        x.call.recompute()
        return x.call.saved[x.index]
    if isinstance(x, _Output):
        return x.get()
    return x


def _never(x):
    raise RuntimeError("internal: the recomputation's own graph is never differentiated")
