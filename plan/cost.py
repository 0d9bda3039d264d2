"""Analytic communication volume of one training step: the formulas the runtime's byte accounting
(`parallel.comm.STATS`) is checked against and the cluster planner (planner.py) uses. One place for
all of them; they estimate, nothing here runs a collective.

Conventions are parallel/comm.py's (per rank): all-reduce = the tensor, all-gather = the gathered
output, reduce-scatter = the full input, all-to-all = rows sent to other ranks.

A tensor-parallel region costs, for an activation of `width` features over b x s tokens:
  enter: without sp an all-reduce in backward; with sp an all-gather forward and a
         reduce-scatter backward;
  exit:  without sp an all-reduce forward; with sp a reduce-scatter forward and an all-gather
         backward.
The model description is a `model.ModelConfig`.
"""
from __future__ import annotations

import math
from collections import Counter

from model.config import ModelConfig


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


def tp_layer_step(out: Counter, cfg: ModelConfig, layer: int, tp: int, sp: bool, batch: int, seq: int, e: int = 4,
                  stats_bytes: int = 4, ep: int = 1) -> None:
    """Add the tp (and sp) collectives of one block (global index `layer`; MTP blocks follow the
    n_layers main ones) for one forward + backward on [batch, seq] to `out`."""
    t = batch * seq
    D = cfg.dim
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


def tp_head_step(out: Counter, cfg: ModelConfig, sp: bool, batch: int, seq: int, e: int = 4,
                 loss_bytes: int = 4) -> None:
    """Add one embedding + output head + cross-entropy call (the main one, or one MTP depth's):
    vocab-parallel embedding, head input, and the loss's max, target logit and sum of exp."""
    t = batch * seq
    tp_exit(out, t, cfg.dim, sp, e)                   # vocab-parallel embedding
    tp_enter(out, t, cfg.dim, sp, e)                  # output head input
    _add(out, "all_reduce", "tp", 3 * t * loss_bytes)  # max, target logit, sum of exp


def tensor_parallel_step(cfg: ModelConfig, tp: int, sp: bool, batch: int, seq: int, e: int = 4,
                         loss_bytes: int = 4, stats_bytes: int = 4, ep: int = 1) -> Counter:
    """Bytes per rank of the tp (and sp) collectives of one forward + backward on [batch, seq]
    (this rank's micro-batch): attention and MLP regions, MoE token split and shared experts,
    routing statistics, vocab-parallel embedding, head and cross-entropy, MTP included."""
    out: Counter = Counter()
    if tp == 1:
        return out
    n_blocks = cfg.n_layers + cfg.n_mtp
    calls = 1 + sum(seq > k for k in range(1, cfg.n_mtp + 1))  # embedding/head/CE calls
    for layer in range(n_blocks):
        if layer >= cfg.n_layers and layer - cfg.n_layers + 1 >= seq:
            continue  # MTP depth with no position left
        tp_layer_step(out, cfg, layer, tp, sp, batch, seq, e, stats_bytes, ep)
    for _ in range(calls):
        tp_head_step(out, cfg, sp, batch, seq, e, loss_bytes)
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


def token_payload_bytes(sent: float, received: float, dim: int, e: float, e_combine: float | None = None) -> float:
    """Token rows one rank puts on the wire for one MoE layer's forward + backward: dispatch sends
    `sent` rows and combine sends back `received` in forward; backward sends both again (the
    combine's gradient travels the dispatch's way, the dispatch's gradient the combine's). With one
    element size that is 2 x (sent + received) x dim x e. V3 §3.3.3 dispatches in FP8 (the
    activation before the up-projections and the gradient before the down-projections) and keeps
    both combines in BF16: give the dispatch direction's `e` and `e_combine`."""
    e_c = e if e_combine is None else e_combine
    return 2 * (sent * e + received * e_c) * dim


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
    _add(out, "all_to_all", "ep", token_payload_bytes(sent, received, dim, e))
    _add(out, "all_to_all_routing", "ep", (n - 1) * 8 + sent * topk * 8 + (sent + received) * topk * 4)
    return out


def _miss(pool: int, held: int, k: int) -> float:
    """P(none of k experts drawn uniformly without replacement from `pool` is among `held` of them)."""
    if held >= pool:
        return 0.0
    return math.comb(pool - held, k) / math.comb(pool, k) if pool - held >= k else 0.0


def expected_dispatch_rows(n_experts: int, topk: int, ep: int, node_size: int, topk_nodes: int = 0,
                           topk_devices: int = 0) -> dict[str, float]:
    """Expected rows one token sends in one dispatch, under routing spread evenly over the experts
    (what the aux-loss-free balance aims at, V3 §2.1.2), with the runtime's placement: ep ranks
    hold contiguous blocks of experts; an ep group larger than a node covers whole nodes.

    Hierarchical dispatch (V3 §3.2.2, expert_parallel.py): a token crosses to each other node holding
    any of its experts once (IB, to the rank with its in-node index), then is forwarded inside each
    node once per further device (NVLink); inside its own node it goes straight to each device.
    Node-limited routing (V3 §2.1.2: at most M = topk_nodes nodes) or device-limited routing (V2
    §2.2.1: topk_devices) first picks that many nodes (devices); the top-k experts are then drawn
    among theirs. Returns {"inter": IB rows, "intra": NVLink rows, "total": both}."""
    if ep <= 1:
        return {"inter": 0.0, "intra": 0.0, "total": 0.0}
    nodes = ep // node_size if ep > node_size else 1
    per_node = ep // nodes
    per_dev = n_experts // ep
    if nodes > 1:
        m = topk_nodes if 0 < topk_nodes < nodes else nodes
        pool = m * per_node * per_dev
        node_hit = 1 - _miss(pool, per_node * per_dev, topk)
        dev_hit = 1 - _miss(pool, per_dev, topk)
        inter = m * node_hit * (nodes - 1) / nodes       # each chosen node is the token's own w.p. 1/nodes
        intra = m * (per_node - 1) * dev_hit             # devices beyond the one a token lands on
        return {"inter": inter, "intra": intra, "total": inter + intra}
    m = topk_devices if 0 < topk_devices < ep else ep
    pool = m * per_dev
    dev_hit = 1 - _miss(pool, per_dev, topk)
    intra = m * dev_hit * (ep - 1) / ep
    return {"inter": 0.0, "intra": intra, "total": intra}


def wire_bytes(op: str, nbytes: float, n: int) -> float:
    """Bytes one rank sends for a collective recorded as `nbytes` (comm.py's convention), with ring
    algorithms (NCCL's for these sizes): all-reduce 2(n-1)/n of the tensor, all-gather (n-1)/n of the
    gathered output, reduce-scatter (n-1)/n of the full input; all-to-all rows are already what is sent."""
    if n <= 1:
        return 0.0
    op = op.removeprefix("cp_")   # context parallelism's labelled all-gather and reduce-scatter
    if op.startswith("all_reduce"):
        return 2 * (n - 1) / n * nbytes
    if op.startswith(("all_gather", "reduce_scatter")):
        return (n - 1) / n * nbytes
    return nbytes


def pipeline_p2p_bytes(tokens: int, dim: int, tp: int, sp: bool, e: int = 4) -> float:
    """Bytes one rank sends across one stage boundary per micro-batch and direction: the hidden states
    forward, their gradient backward (split over tp under sequence parallelism)."""
    return tokens * dim * e / (tp if sp else 1)


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


# -- context parallelism (parallel.cp) ----------------------------------------------------------------
def cp_kv_width(cfg: ModelConfig, tp: int = 1, per_head: bool = False) -> int:
    """Elements per token and layer that context-parallel ranks exchange so that each can attend its queries
    to the whole sequence. MLA (V2 §2.1.2-2.1.3, eq. 9 and 15): the compressed latent c^KV and the decoupled
    shared key k^R, kv_lora_rank + qk_rope_head_dim (576 for V3), the same on every tp rank (the latent is
    not split by heads). per_head=True: Megatron-core's exchange, the up-projected keys and values of this
    tp rank's heads, H/tp x (d_qk + d_v) (V3: 128 x (192 + 128) = 40,960 at tp 1). GQA: this tp rank's key
    and value heads, 2 x max(1, H_kv/tp) x d_h (fewer KV heads than tp ranks are replicated, one per rank)."""
    if cfg.attention == "mla":
        if per_head:
            return cfg.n_heads // tp * (cfg.qk_head_dim + cfg.v_head_dim)
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * max(1, cfg.kv_heads // tp) * cfg.gqa_head_dim


def cp_layer_step(out: Counter, cfg: ModelConfig, cp: int, batch: int, seq: int, e: int = 2, tp: int = 1,
                  per_head: bool = False, recompute_full: bool = False) -> None:
    """Add one attention layer's context-parallel exchange for one forward + backward on [batch, seq] (whole
    rows: every cp rank's tokens together) to `out`, in comm.py's per-rank convention and under the labels
    parallel/context_parallel.py records: forward, an all-gather whose gathered output is every token's
    exchanged width (cp_kv_width), again when full recomputation re-runs the forward; backward, the
    reduce-scatter of its gradient, the same size. Each rank sends and receives (cp - 1)/cp of each
    (wire_bytes, a ring)."""
    if cp == 1:
        return
    n = batch * seq * cp_kv_width(cfg, tp, per_head) * e
    _add(out, "cp_all_gather", "cp", n * (2 if recompute_full else 1))
    _add(out, "cp_reduce_scatter", "cp", n)


def context_parallel_step(cfg: ModelConfig, cp: int, batch: int, seq: int, e: int = 2, tp: int = 1,
                          per_head: bool = False, recompute_full: bool = False) -> Counter:
    """Bytes per rank of the cp exchanges of one forward + backward on [batch, seq]: one per attention layer,
    the MTP modules' blocks included (an MTP block with no position left is skipped, as tensor_parallel_step
    skips it)."""
    out: Counter = Counter()
    for layer in range(cfg.n_layers + cfg.n_mtp):
        if layer >= cfg.n_layers and layer - cfg.n_layers + 1 >= seq:
            continue
        cp_layer_step(out, cfg, cp, batch, seq, e, tp, per_head, recompute_full)
    return out


def cp_wire_bytes_per_layer(cfg: ModelConfig, cp: int, batch: int, seq: int, e: int = 2, tp: int = 1,
                            per_head: bool = False) -> float:
    """Bytes one rank puts on the wire for one layer's exchange, forward + backward, on a ring of cp ranks:
    (cp - 1)/cp of the gathered tensor each way."""
    c: Counter = Counter()
    cp_layer_step(c, cfg, cp, batch, seq, e, tp, per_head)
    return sum(wire_bytes(k.split("/")[0], v, cp) for k, v in c.items())
