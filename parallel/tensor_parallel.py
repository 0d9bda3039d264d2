"""Tensor parallelism (Megatron-LM §3) with sequence parallelism (Korthikanti et al. 2022), applied
to a plain model from outside.

A model class declares what its children are in a `tp_plan` dict (child name -> style; "" is
the module itself), the way Hugging Face models declare `base_model_tp_plan`; this module
applies the styles and never looks at the network's math:

    colwise[:attr]  split the output features (rows of weight, and bias) over tp. With `:attr`
                    the split is in units of `module.attr` (e.g. KV heads); when tp exceeds the
                    unit count each unit is replicated on tp/units ranks (GQA with few KV heads).
    rowwise         split the input features (columns); output all-reduced, or reduce-scattered
                    along the sequence under sequence parallelism.
    region_input    the module's input enters a tp region: identity (backward all-reduce), or
                    all-gather along the sequence under sp (backward reduce-scatter). One entry per
                    module, so q, k and v (or w1 and w3) share one all-gather, as a fused QKV does.
    region_output   the module's output enters a tp region (MLA's down-projections: gather the
                    small latents, not the hidden states, as Megatron-core's MLA does).
    vocab_embed     vocab-parallel embedding (rows split, torch.chunk's uneven rule, no padding).
    vocab_head      vocab-parallel output layer; logits stay split; the model's `cross_entropy`
                    becomes the vocab-parallel one, and `restrict_vocab` masks the rank's slice.
    token_split     (MoE) the module works on its rank's share of the tokens: split along the
                    sequence before it and gathered after it when sp is off; its routing
                    statistics are summed over tp with `reduce_token_stats`.
    partial_grad    the parameters sit between a region entry and split consumers, so each rank
                    holds a partial gradient: summed over tp after backward.
A class may also name attributes to divide by tp in `tp_divide` (e.g. head counts).

Under sp every replicated parameter outside token_split sees only its rank's tokens, so all of
them are partial_grad; the set is computed here, not declared.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import comm
from .comm import Group
from .mesh import LayoutError


# -- layouts: how a local tensor relates to the global one (decision 4 of DESIGN.md) ---------------
@dataclass(frozen=True)
class Split:
    """The local tensor is chunk `rank // (group size / parts)` of `parts` along `dim`
    (torch.chunk's rule; parts < group size means each chunk is replicated)."""

    dim: int
    group: str
    parts: int


@dataclass(frozen=True)
class ParamLayout:
    global_shape: tuple[int, ...]
    splits: tuple[Split, ...] = ()
    grad_sum: tuple[str, ...] = ()   # groups over which the gradient must be summed after backward


def chunk_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of chunk `index` of `n` split in `parts` (torch.chunk / DTensor Shard)."""
    size = -(-n // parts)
    start = min(index * size, n)
    return start, min(start + size, n)


def chunk_sizes(n: int, parts: int) -> list[int]:
    return [e - s for s, e in (chunk_range(n, parts, i) for i in range(parts))]


def split_index(split: Split, group: Group) -> int:
    return group.rank // (group.size // split.parts)


def take_local(full: torch.Tensor, split: Split, group: Group) -> torch.Tensor:
    s, e = chunk_range(full.shape[split.dim], split.parts, split_index(split, group))
    return full.narrow(split.dim, s, e - s)


def gather_split(local: torch.Tensor, global_len: int, split: Split, group: Group) -> torch.Tensor:
    """Inverse of take_local: every rank gets the concatenation of the distinct chunks."""
    if group.size == 1:
        return local
    rep = group.size // split.parts
    sizes = [n for n in chunk_sizes(global_len, split.parts) for _ in range(rep)]
    full = comm.all_gather_uneven(local.contiguous(), split.dim, group, sizes)
    if rep == 1:
        return full
    parts = full.split(sizes, split.dim)
    return torch.cat(parts[::rep], split.dim)


# -- the layers -------------------------------------------------------------------------------------
def enter_region(x: torch.Tensor, group: Group, sp: bool) -> torch.Tensor:
    return comm.gather_from_sp(x, group, -2) if sp else comm.copy_to_region(x, group)


def exit_region(x: torch.Tensor, group: Group, sp: bool) -> torch.Tensor:
    return comm.reduce_scatter_to_sp(x, group, -2) if sp else comm.reduce_from_region(x, group)


class ColumnParallelLinear(nn.Linear):
    """Y_i = X A_i with A split by output features (Megatron / Transformer Engine layout: the
    local weight is a block of rows of the [out, in] weight). Input and output stay as they are:
    the region entry happens once at the module that owns this linear."""

    def __init__(self, in_features: int, out_local: int, bias: bool, device=None, dtype=None):
        super().__init__(in_features, out_local, bias=bias, device=device, dtype=dtype)


class RowParallelLinear(nn.Linear):
    """Y = sum_i X_i A_i with A split by input features; the partial products are all-reduced
    (or reduce-scattered along the sequence under sp); the bias is added once, after."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group: Group, sp: bool,
                 device=None, dtype=None):
        super().__init__(in_local, out_features, bias=bias, device=device, dtype=dtype)
        self.group, self.sp = group, sp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = exit_region(F.linear(x, self.weight), self.group, self.sp)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, end) of the embedding table; ids outside give zeros, summed over tp
    (all-reduce, or reduce-scatter along the sequence under sp)."""

    def __init__(self, vocab_start: int, rows: int, dim: int, group: Group, sp: bool, device=None, dtype=None):
        super().__init__(rows, dim, device=device, dtype=dtype)
        self.vocab_start, self.group, self.sp = vocab_start, group, sp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.num_embeddings)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return exit_region(out, self.group, self.sp)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split along the vocabulary (Megatron's
    `vocab_parallel_cross_entropy`): three all-reduces of [tokens] values (max, target logit,
    sum of exponentials); no rank ever holds [tokens, full vocab]."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group, ignore_index):
        n_local = logits.shape[-1]
        logits_max = logits.max(dim=-1).values
        comm.all_reduce(logits_max, group, op=torch.distributed.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)
        valid = target != ignore_index
        in_range = (target >= vocab_start) & (target < vocab_start + n_local) & valid
        local_t = (target - vocab_start).clamp(0, n_local - 1)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1) * in_range
        comm.all_reduce(target_logit, group)
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        comm.all_reduce(sum_exp, group)
        loss = (sum_exp.log() - target_logit) * valid
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, in_range, valid)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, in_range, valid = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local_t.unsqueeze(-1), -in_range.to(g.dtype).unsqueeze(-1))
        return g * (grad * valid).unsqueeze(-1), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, group: Group,
                                 ignore_index: int = -100, reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of logits [..., vocab/tp] (this rank's columns from vocab_start), summed or per
    token (`reduction="none"`, flattened, 0 at ignore_index)."""
    loss = _VocabParallelCrossEntropy.apply(logits.flatten(0, -2), labels.flatten(), vocab_start,
                                            group, ignore_index)
    return loss.sum() if reduction == "sum" else loss


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, group: Group) -> torch.Tensor:
    """Entropy per position (flattened) of logits split along the vocabulary: H = log Z - sum p z over
    max-shifted logits z, from three all-reduces of [tokens] values."""
    z = logits.flatten(0, -2)
    z_max = z.max(dim=-1).values
    comm.all_reduce(z_max, group, op=torch.distributed.ReduceOp.MAX)
    z = z - z_max.unsqueeze(-1)
    e = z.exp()
    sums = torch.stack([e.sum(-1), (e * z).sum(-1)])
    comm.all_reduce(sums, group)
    return sums[0].log() - sums[1] / sums[0]


def gather_vocab(logits: torch.Tensor, vocab: int, group: Group) -> torch.Tensor:
    """All-gather vocab-parallel logits [..., vocab/tp] into [..., vocab] (uneven shards allowed)."""
    return gather_split(logits, vocab, Split(logits.dim() - 1, "tp", group.size), group)


# -- applying a plan ----------------------------------------------------------------------------------
def _styles(v) -> tuple[str, ...]:
    return (v,) if isinstance(v, str) else tuple(v)


# hooks read here (tp_plan, tp_divide, ep_count) and seams set (cross_entropy, ...): parallel/protocols.py
def check_tp_plan(model: nn.Module, tp: int) -> None:
    """Every divisibility the plan needs, checked before anything is built."""
    if tp == 1:
        return
    for path, module in model.named_modules():
        for attr in getattr(type(module), "tp_divide", ()):
            n = getattr(module, attr)
            units_ok = n % tp == 0 or (attr in _replicable(module) and tp % n == 0)
            if not units_ok:
                fix = " or a divisor of tp" if attr in _replicable(module) else ""
                raise LayoutError(f"{_join(path, attr)} = {n} is not divisible by parallel.tp = {tp}: "
                                  f"choose tp dividing {n}{fix}")
        for child, styles in getattr(type(module), "tp_plan", {}).items():
            if child and getattr(module, child, None) is None:
                continue
            target = module.get_submodule(child) if child else module
            for style in _styles(styles):
                name, _, attr = style.partition(":")
                if name == "colwise" and not attr and target.weight.shape[0] % tp:
                    raise LayoutError(f"{_join(path, child)} has {target.weight.shape[0]} output features, "
                                      f"not divisible by parallel.tp = {tp}")
                if name == "rowwise" and target.weight.shape[1] % tp:
                    raise LayoutError(f"{_join(path, child)} has {target.weight.shape[1]} input features, "
                                      f"not divisible by parallel.tp = {tp}")
                if name in ("vocab_embed", "vocab_head") and target.weight.shape[0] < tp:
                    raise LayoutError(f"{_join(path, child)}: vocabulary {target.weight.shape[0]} "
                                      f"smaller than parallel.tp = {tp}")


def _replicable(module) -> tuple[str, ...]:
    return tuple(s.partition(":")[2] for v in getattr(type(module), "tp_plan", {}).values()
                 for s in _styles(v) if s.startswith("colwise:"))


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def apply_tp(model: nn.Module, group: Group, sp: bool, layouts: dict[str, ParamLayout]) -> None:
    """Swap linears and embeddings for their parallel versions (slicing their current values,
    meta tensors included), install region hooks, divide attributes, and record every
    parameter's layout and gradient reduction in `layouts`."""
    tp = group.size
    tied = _tied_parameters(model)
    partial: set[str] = set()     # parameter names with partial gradients over tp
    token_split: list[str] = []   # module paths working on a share of the tokens
    for path, module in list(model.named_modules()):
        plan = getattr(type(module), "tp_plan", None)
        if not plan:
            continue
        inside = any(path == p or path.startswith(p + ".") for p in token_split)
        local_sp = sp or inside  # inside a token-split module the tokens are already split
        units = {attr: getattr(module, attr) for attr in _replicable(module)}
        for child, styles in plan.items():
            if child and getattr(module, child, None) is None:
                continue
            for style in _styles(styles):
                name, _, attr = style.partition(":")
                cpath = _join(path, child)
                if name == "colwise":
                    _swap_colwise(module, child, cpath, group, units.get(attr), layouts)
                elif name == "rowwise":
                    _swap_rowwise(module, child, cpath, group, local_sp, layouts)
                elif name == "region_input":
                    target = module.get_submodule(child) if child else module
                    target.register_forward_pre_hook(functools.partial(_enter_input, group=group, sp=local_sp))
                elif name == "region_output":
                    getattr(module, child).register_forward_hook(
                        functools.partial(_enter_output, group=group, sp=local_sp))
                elif name == "vocab_embed":
                    _swap_embedding(module, child, cpath, group, sp, layouts)
                elif name == "vocab_head":
                    _swap_colwise(module, child, cpath, group, None, layouts)
                    getattr(module, child).register_forward_pre_hook(
                        functools.partial(_enter_input, group=group, sp=sp))
                    vocab = layouts[_join(cpath, "weight")].global_shape[0]
                    start, _ = chunk_range(vocab, group.size, group.rank)
                    module.cross_entropy = functools.partial(vocab_parallel_cross_entropy, vocab_start=start,
                                                             group=group)
                    module.entropy = functools.partial(vocab_parallel_entropy, group=group)
                    module.restrict_vocab = functools.partial(module.restrict_vocab, vocab_start=start)
                    module.gather_logits = functools.partial(gather_vocab, vocab=vocab, group=group)
                elif name == "token_split":
                    token_split.append(path)
                    if not sp:
                        module.register_forward_pre_hook(functools.partial(_split_tokens, group=group))
                        module.register_forward_hook(functools.partial(_gather_tokens, group=group))
                    module.reduce_token_stats = functools.partial(comm.reduce_from_region, group=group)
                elif name == "partial_grad":
                    partial.update(_join(cpath, n) for n, _ in getattr(module, child).named_parameters())
                else:
                    raise ValueError(f"{type(module).__name__}.tp_plan: unknown style {style!r}")
        for attr in getattr(type(module), "tp_divide", ()):
            setattr(module, attr, max(1, getattr(module, attr) // tp))
    retie(model, tied)  # a tied output layer shares the split embedding (same rows, same Split)
    routed = {_join(path, n) for path, m in model.named_modules() if getattr(type(m), "ep_count", None)
              for n, _ in m.named_parameters()}  # summed over edp (which holds the tp ranks) instead
    for name, p in model.named_parameters():
        if name in routed or (name in layouts and any(s.group == "tp" for s in layouts[name].splits)):
            continue
        if sp or name in partial or any(name.startswith(t + ".") for t in token_split):
            lay = layouts.get(name, ParamLayout(tuple(p.shape)))
            layouts[name] = ParamLayout(lay.global_shape, lay.splits, lay.grad_sum + ("tp",))


def _tied_parameters(model: nn.Module) -> list[list[str]]:
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(name)
    return [names for names in seen.values() if len(names) > 1]


def retie(model: nn.Module, tied: list[list[str]]) -> None:
    """Point every name of a tied group at the first one's parameter (module swaps and
    `to_empty` create new parameters per module)."""
    for names in tied:
        first = model.get_parameter(names[0])
        for other in names[1:]:
            mod, _, attr = other.rpartition(".")
            setattr(model.get_submodule(mod), attr, first)


def _enter_input(module, args, group, sp):
    return (enter_region(args[0], group, sp), *args[1:])


def _enter_output(module, args, out, group, sp):
    return enter_region(out, group, sp)


def _split_tokens(module, args, group):
    # Without gradients (decoding one token at a time) a length that does not split runs whole on
    # every rank: the results are identical and nothing is gathered.
    module._tokens_split = module.training or torch.is_grad_enabled() or args[0].shape[-2] % group.size == 0
    return (comm.scatter_to_sp(args[0], group, -2), *args[1:]) if module._tokens_split else args


def _gather_tokens(module, args, out, group):
    return comm.gather_from_sp(out, group, -2, reduce_grad=False) if module._tokens_split else out


def _new_param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format), requires_grad=True)


def _swap_colwise(module, child, path, group, units, layouts):
    lin = getattr(module, child)
    out = lin.weight.shape[0]
    parts = group.size if units is None or units >= group.size else units
    split = Split(0, "tp", parts)
    w = take_local(lin.weight, split, group)
    new = ColumnParallelLinear(lin.in_features, w.shape[0], lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight = _new_param(w)
    sums = ("tp_replicas",) if parts < group.size else ()
    layouts[_join(path, "weight")] = ParamLayout((out, lin.in_features), (split,), sums)
    if lin.bias is not None:
        new.bias = _new_param(take_local(lin.bias, split, group))
        layouts[_join(path, "bias")] = ParamLayout((out,), (split,), sums)
    setattr(module, child, new)


def _swap_rowwise(module, child, path, group, sp, layouts):
    lin = getattr(module, child)
    split = Split(1, "tp", group.size)
    w = take_local(lin.weight, split, group)
    new = RowParallelLinear(w.shape[1], lin.out_features, lin.bias is not None, group, sp,
                            device=w.device, dtype=w.dtype)
    new.weight = _new_param(w)
    layouts[_join(path, "weight")] = ParamLayout(tuple(lin.weight.shape), (split,))
    if lin.bias is not None:
        new.bias = _new_param(lin.bias)
    setattr(module, child, new)


def _swap_embedding(module, child, path, group, sp, layouts):
    emb = getattr(module, child)
    split = Split(0, "tp", group.size)
    start, _ = chunk_range(emb.num_embeddings, group.size, group.rank)
    w = take_local(emb.weight, split, group)
    new = VocabParallelEmbedding(start, w.shape[0], emb.embedding_dim, group, sp, device=w.device, dtype=w.dtype)
    new.weight = _new_param(w)
    layouts[_join(path, "weight")] = ParamLayout(tuple(emb.weight.shape), (split,))
    setattr(module, child, new)


def is_partial(layout: ParamLayout) -> bool:
    return "tp" in layout.grad_sum

