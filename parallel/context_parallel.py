"""Context parallelism (cp): each row's sequence split over the cp ranks, applied to a plain model from outside.

Layout. A row of S tokens is cut into 2·cp chunks of S/(2·cp); cp rank r keeps chunks r and 2·cp-1-r, an
early and a late one, so that under the causal mask every rank does the same attention work (the
load-balanced split of Megatron-core/Transformer Engine). The engine hands the model whole rows on every
cp rank (the cp ranks of one dp rank read the same rows) together with `positions`, the global positions of
this rank's tokens (`local_positions`); the model embeds, rotates (RoPE) and predicts only those, and reads
tokens, labels and document ids at any global position: MTP's t_{i+k} and its label may lie in another
rank's chunk, the attention mask is built from global query and key positions (causal, packed documents,
left padding as a document of its own), and the loss is normalised by the token count of the whole rows.

Exchange. Keys and values are the only thing attention needs from other ranks. A model declares where its
attention modules exchange them in `cp_plan` (child name -> "gather_sequence"): the child is an identity
module in one process; here it becomes `SequenceExchange`, which all-gathers its tensors [b, s_local, ...]
over cp and returns every position's [b, S, ...] in global order 0..S-1 (backward: the gradient
reduce-scattered back to the ranks that own the positions). MLA exchanges its latent c^KV (after kv_norm)
and the rotated k^R, kv_lora_rank + qk_rope_head_dim = 576 elements per token per layer for V3, and
up-projects all of them locally (wkv_b); dense/GQA attention exchanges its (local) key and value heads.

Why an all-gather and not a ring (reasoned from the sizes, not measured on a cluster): the ring's total wire
bytes are the same, (cp-1)/cp of the gathered tensor; what it buys is overlap of each step's transfer with
attention over the chunk already received, paid for with cp partial attentions and log-sum-exp merges, in
the backward too. MLA's latent is 71x smaller than per-head K/V (V3: 576 against 128 x (192 + 128) = 40,960
elements per token), so the exchange is small next to the attention it feeds (V3 at 32K tokens, cp 8, bf16:
37.7 MB gathered per layer against ~2.7 TFLOP of attention per rank), and one all-gather keeps a single exact
attention call with an explicit mask and a single reduce-scatter in backward. A ring is the change to make
if a profile shows the gather exposed.

Loss and gradients. The model sums its token losses over this rank's tokens and passes the sums through its
`reduce_sequence_stats` seam, which becomes an all-reduce over cp whose backward is the identity (as tp's
`reduce_from_region`): every cp rank holds the micro-batch's loss terms, and backpropagating them gives each
rank the gradient of its own tokens. The MoE's per-sequence routing statistics (V3 eq. 17-20 are per
sequence) are summed over cp the same way (`reduce_token_stats`, after tp's sum). FSDP2 shards the dense
parameters over dp x cp and sums their gradients there, dividing by dp only (data_parallel.apply_fsdp):
the cp ranks' gradients are parts of one micro-batch's, the dp ranks' are means over different rows.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import comm
from .comm import Group
from .mesh import LayoutError, ParallelDims

STYLES = ("gather_sequence",)


def local_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions [seq_len / cp] of cp rank `rank`'s tokens: chunks rank and 2·cp-1-rank of 2·cp."""
    if seq_len % (2 * cp):
        raise LayoutError(f"sequence length {seq_len} is not divisible by 2 x parallel.cp = {2 * cp}: "
                          f"context parallelism cuts every row into 2·cp equal chunks; make data.seq_len a "
                          f"multiple of {2 * cp} or lower parallel.cp")
    c = seq_len // (2 * cp)
    early = torch.arange(rank * c, (rank + 1) * c, device=device)
    late = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([early, late])


def sequence_multiple(dims: ParallelDims, has_experts: bool) -> int:
    """What a sequence length must be a multiple of: under tp, sequence parallelism (and the token split in
    front of routed experts) splits the sequence over the tp ranks; under cp each row is first cut into
    2·cp chunks, and each rank's pair of chunks is split over tp again: 2·cp·tp."""
    tp = dims.tp if dims.tp > 1 and (dims.sp or has_experts) else 1
    return (2 * dims.cp if dims.cp > 1 else 1) * tp


def check_sequence(seq_len: int, dims: ParallelDims, has_experts: bool) -> None:
    """A LayoutError naming the keys when seq_len cannot be cut for this layout."""
    m = sequence_multiple(dims, has_experts)
    if dims.cp > 1 and seq_len % m:
        tp = m // (2 * dims.cp)
        how = f"2 x parallel.cp = {2 * dims.cp}" if tp == 1 else \
            f"2 x parallel.cp x parallel.tp = 2 x {dims.cp} x {dims.tp} = {m} (" + \
            ("sequence parallelism" if dims.sp else "the token split before the routed experts") + \
            " splits each rank's chunks over tp)"
        raise LayoutError(f"data.seq_len = {seq_len} is not divisible by {how}: make data.seq_len a multiple "
                          f"of {m}, or change parallel.cp")


def cp_inputs(mesh, seq_len: int, has_experts: bool, device) -> dict[str, torch.Tensor]:
    """{"positions": this cp rank's global positions} under cp (the model cuts its whole rows by them), else {}."""
    dims = mesh.dims
    if dims.cp == 1:
        return {}
    check_sequence(seq_len, dims, has_experts)
    return {"positions": local_positions(seq_len, dims.cp, dims.coords(mesh.rank)["cp"], device)}


def _order(seq_len: int, cp: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gathered, inverse): the global position of each gathered (rank-major) token, and where each global
    position sits in the gathered order."""
    gathered = torch.cat([local_positions(seq_len, cp, r, device) for r in range(cp)])
    return gathered, torch.argsort(gathered)


class _GatherSequence(torch.autograd.Function):
    """All-gather [b, s_local, w] over cp into [b, S, w] in global order; backward: the gradient put back in
    rank order and reduce-scattered (every rank's queries attended to every key)."""

    @staticmethod
    def forward(ctx, x, group: Group):
        full = comm.all_gather(x, 1, group, label="cp_all_gather")
        gathered, inverse = _order(full.shape[1], group.size, x.device)
        ctx.group, ctx.gathered = group, gathered
        return full.index_select(1, inverse)

    @staticmethod
    def backward(ctx, g):
        g = g.index_select(1, ctx.gathered)
        return comm.reduce_scatter(g, 1, ctx.group, label="cp_reduce_scatter"), None


class SequenceExchange(nn.Module):
    """What a `cp_plan` "gather_sequence" child becomes: forward(*xs) with xs [b, s_local, ...] (this rank's
    positions, `local_positions` order) returns each as [b, S, ...] at positions 0..S-1. Several tensors go
    in one all-gather (MLA's c^KV and k^R, GQA's k and v)."""

    def __init__(self, group: Group):
        super().__init__()
        self.group = group

    def forward(self, *xs: torch.Tensor):
        b, s = xs[0].shape[:2]
        flat = [x.reshape(b, s, -1) for x in xs]
        widths = [f.shape[-1] for f in flat]
        full = _GatherSequence.apply(torch.cat(flat, -1) if len(flat) > 1 else flat[0], self.group)
        n = full.shape[1]
        outs = tuple(p.reshape(b, n, *x.shape[2:]) for p, x in zip(full.split(widths, -1), xs))
        return outs[0] if len(outs) == 1 else outs

    def extra_repr(self) -> str:
        return f"cp={self.group.size}"


def cp_exchange_bytes(tokens: int, width: int, element_size: int, cp: int, recompute: bool = False) -> dict[str, int]:
    """Bytes comm.STATS records on each rank for ONE exchange point (one attention layer, MTP blocks included)
    and one micro-batch, forward and backward, under comm.py's conventions (all-gather: the gathered output;
    reduce-scatter: the full input):

        cp_all_gather      = tokens x width x element_size     (x 2 when full recomputation re-runs the forward)
        cp_reduce_scatter  = tokens x width x element_size

    tokens: the micro-batch's whole rows, batch x seq_len (every cp rank's tokens together); width: elements
    exchanged per token, kv_lora_rank + qk_rope_head_dim for MLA (576 for V3), 2 x local KV heads x head_dim
    for GQA (KV heads / tp, at least one, under tp); element_size: bytes of the compute dtype. What crosses
    the wire per rank is (cp - 1) / cp of each (plan.cost.wire_bytes). Zero at cp = 1.

    Besides the exchange, cp adds small all-reduces over cp (recorded as all_reduce/cp, forward only): one fp32
    scalar per token loss (lm, and each MTP depth) and, per MoE layer with a balance loss, the routing
    statistics (1 + 2 x g x n_experts fp32 values, + g x ep with balance_comm; g = batch rows, 1 when not per
    sequence)."""
    if cp <= 1:
        return {"cp_all_gather": 0, "cp_reduce_scatter": 0}
    one = tokens * width * element_size
    return {"cp_all_gather": one * (2 if recompute else 1), "cp_reduce_scatter": one}


# hooks read here (cp_plan, tp_plan token_split, reduce_token_stats, reduce_sequence_stats): parallel/protocols.py
def check_cp_plan(model: nn.Module, cp: int) -> None:
    """cp > 1 needs a model that declares where its attention exchanges keys."""
    if cp == 1:
        return
    found = 0
    for path, module in model.named_modules():
        for child, style in getattr(type(module), "cp_plan", {}).items():
            if style not in STYLES:
                raise LayoutError(f"{type(module).__name__}.cp_plan[{child!r}]: unknown style {style!r}; "
                                  f"known: {', '.join(STYLES)}")
            if not isinstance(getattr(module, child, None), nn.Module):
                raise LayoutError(f"{path}.{child}: cp_plan names a child module the instance lacks")
            found += 1
    if not found:
        raise LayoutError(f"parallel.cp = {cp}, but {type(model).__name__} declares no cp_plan exchange point in "
                          "its attention: set parallel.cp=1 for this model")
    if not callable(getattr(model, "reduce_sequence_stats", None)):
        raise LayoutError(f"parallel.cp = {cp}, but {type(model).__name__} has no reduce_sequence_stats seam "
                          "to sum its loss over the cp ranks: set parallel.cp=1 for this model")


def _then_cp(t: torch.Tensor, first, group: Group) -> torch.Tensor:
    return comm.reduce_from_region(first(t), group)


def apply_cp(model: nn.Module, group: Group) -> None:
    """Replace every cp_plan exchange point with a `SequenceExchange` over `group`, and make the model's
    per-rank sums (the loss's `reduce_sequence_stats`, the MoE's `reduce_token_stats`) sums over cp."""
    if group.size == 1:
        return
    for _, module in list(model.named_modules()):
        for child in getattr(type(module), "cp_plan", {}):
            setattr(module, child, SequenceExchange(group))
        if "token_split" in getattr(type(module), "tp_plan", {}).values():
            module.reduce_token_stats = functools.partial(_then_cp, first=module.reduce_token_stats, group=group)
    model.reduce_sequence_stats = functools.partial(comm.reduce_from_region, group=group)
