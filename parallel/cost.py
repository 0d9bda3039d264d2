"""Analytic communication volume of one training step: the formulas the byte accounting
(`comm.STATS`) is checked against and the cluster planner will use. One place for all of them.

Conventions are comm.py's (per rank): all-reduce = the tensor, all-gather = the gathered
output, reduce-scatter = the full input, all-to-all = rows sent to other ranks.

A tensor-parallel region costs, for an activation of `width` features over b x s tokens:
  enter: without sp an all-reduce in backward; with sp an all-gather forward and a
         reduce-scatter backward;
  exit:  without sp an all-reduce forward; with sp a reduce-scatter forward and an all-gather
         backward.
The model description comes from a config with the field names of `model.ModelConfig`.
"""
from __future__ import annotations

import math
from collections import Counter


def _add(out: Counter, op: str, group: str, nbytes: float) -> None:
    out[f"{op}/{group}"] += int(nbytes)


def tp_enter(out: Counter, tokens: int, width: int, sp: bool, e: int) -> None:
    if sp:
        _add(out, "all_gather", "tp", tokens * width * e)
        _add(out, "reduce_scatter", "tp", tokens * width * e)
    else:
        _add(out, "all_reduce", "tp", tokens * width * e)


def tp_exit(out: Counter, tokens: int, width: int, sp: bool, e: int) -> None:
    tp_enter(out, tokens, width, sp, e)  # the mirror image: same collectives, same sizes


def tensor_parallel_step(cfg, tp: int, sp: bool, batch: int, seq: int, e: int = 4,
                         loss_bytes: int = 4, stats_bytes: int = 4, ep: int = 1) -> Counter:
    """Bytes per rank of the tp (and sp) collectives of one forward + backward on [batch, seq]
    (this rank's micro-batch): attention and MLP regions, MoE token split and shared experts,
    routing statistics, vocab-parallel embedding, head and cross-entropy, MTP included."""
    out: Counter = Counter()
    if tp == 1:
        return out
    t = batch * seq
    D = cfg.dim
    n_blocks = cfg.n_layers + cfg.n_mtp
    calls = 1 + sum(seq > k for k in range(1, cfg.n_mtp + 1))  # embedding/head/CE calls
    for layer in range(n_blocks):
        if layer >= cfg.n_layers and layer - cfg.n_layers + 1 >= seq:
            continue  # MTP depth with no position left
        if cfg.attention == "mla":
            tp_enter(out, t, cfg.q_lora_rank or D, sp, e)
            tp_enter(out, t, cfg.kv_lora_rank + cfg.qk_rope_head_dim, sp, e)
        else:
            tp_enter(out, t, D, sp, e)
        tp_exit(out, t, D, sp, e)
        if cfg.is_moe_layer(layer):
            if not sp:  # tokens split before the MoE (backward all-gather), gathered after it
                _add(out, "all_gather", "tp", 2 * t * D * e)
            if cfg.n_shared_experts:  # inside the token split: sequence-parallel style
                tp_enter(out, t, D, True, e)
                tp_exit(out, t, D, True, e)
            if cfg.balance_alpha_expert or cfg.balance_alpha_device or cfg.balance_alpha_comm:
                groups = batch if cfg.balance_per_sequence else 1
                # token count, P_i sums (with the affinities' dtype), hits (fp32), f''_i sums
                n = stats_bytes * (1 + groups * cfg.n_routed_experts) + 4 * groups * cfg.n_routed_experts
                if cfg.balance_alpha_comm:
                    n += 4 * groups * ep  # tokens sent to each expert-parallel device
                _add(out, "all_reduce", "tp", n)
        else:
            tp_enter(out, t, D, sp, e)
            tp_exit(out, t, D, sp, e)
    for _ in range(calls):
        tp_exit(out, t, D, sp, e)                         # vocab-parallel embedding
        tp_enter(out, t, D, sp, e)                        # output head input
        _add(out, "all_reduce", "tp", 3 * t * loss_bytes)  # max, target logit, sum of exp
    return out


def grad_sync_step(layouts, local_numel: dict[str, int], tp: int, edp: int = 1,
                   fsdp_managed: frozenset = frozenset(), e: int = 4) -> Counter:
    """After backward: all-reduce over tp of every partial gradient, the KV-replica sums (a
    buffer of `parts` local chunks), and the sum over edp of expert gradients outside FSDP."""
    out: Counter = Counter()
    for name, lay in layouts.items():
        if "edp" in lay.grad_sum and edp > 1 and name not in fsdp_managed:
            _add(out, "all_reduce", "edp", local_numel[name] * e)
        if tp == 1:
            continue
        if "tp" in lay.grad_sum:
            _add(out, "all_reduce", "tp", local_numel[name] * e)
        if "tp_replicas" in lay.grad_sum:
            parts = [s.parts for s in lay.splits if s.group == "tp"][0]
            _add(out, "all_reduce", "tp", parts * local_numel[name] * e)
    return out


def expert_dispatch_step(pairs, rank: int, dim: int, topk: int, e: int = 4) -> Counter:
    """One MoE layer's all-to-alls for rank `rank` in one forward + backward, from the routing:
    pairs[src][dst] = tokens of src that have an expert on dst (each token travels once per
    destination). Token rows: dispatch and combine forward, both again in backward (=
    routed tokens x hidden x bytes, four times). Routing metadata: counts (int64), expert ids
    (int64, forward only), gate weights (fp32, forward and backward)."""
    out: Counter = Counter()
    n = len(pairs)
    if n == 1:
        return out
    sent = sum(pairs[rank][d] for d in range(n) if d != rank)
    received = sum(pairs[s][rank] for s in range(n) if s != rank)
    _add(out, "all_to_all", "ep", 2 * (sent + received) * dim * e)
    _add(out, "all_to_all_routing", "ep", (n - 1) * 8 + sent * topk * 8 + (sent + received) * topk * 4)
    return out


def fsdp_padded_shard(shape: tuple[int, ...], dim: int, ranks: int) -> int:
    """Elements of one rank's FSDP2 shard of a parameter split along `dim`, padded to equal size."""
    rows = shape[dim]
    return -(-rows // ranks) * (math.prod(shape) // rows if rows else 0)


def fsdp_step(units, param_bytes: int, reduce_bytes: int = 4, zero: int = 3) -> Counter:
    """FSDP2 per rank and step. units: (group name, group size, padded shard elements per rank)
    per fully_shard'ed module. Each unit all-gathers its parameters for forward and, under ZeRO-3,
    again for backward (the root too, as measured with reshard_after_forward=True), and
    reduce-scatters its gradients once."""
    out: Counter = Counter()
    for group, ranks, padded in units:
        if ranks == 1:
            continue
        gathers = 2 if zero == 3 else 1
        _add(out, "all_gather", group, gathers * ranks * padded * param_bytes)
        _add(out, "reduce_scatter", group, ranks * padded * reduce_bytes)
    return out
