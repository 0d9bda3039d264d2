"""DeepSeekMoE: fine-grained routed experts plus shared experts (DeepSeekMoE §3, V2 §2.2, V3 §2.1.2)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP, FP32Buffers, at_least_fp32


def _limit_groups(scores: torch.Tensor, n_groups: int, keep: int, k_per_group: int) -> torch.Tensor:
    """Mask (with -inf) every expert outside the `keep` best of `n_groups` contiguous expert groups.

    A group's score is its best expert's (k_per_group=1) or the sum of its k_per_group best.
    """
    t, e = scores.shape
    g = scores.view(t, n_groups, e // n_groups)
    group_scores = g.amax(-1) if k_per_group == 1 else g.topk(k_per_group, dim=-1).values.sum(-1)
    chosen = group_scores.topk(keep, dim=-1).indices
    drop = torch.ones(t, n_groups, dtype=torch.bool, device=scores.device).scatter_(1, chosen, False)
    return g.masked_fill(drop.unsqueeze(-1), float("-inf")).view(t, e)


class Gate(FP32Buffers, nn.Module):
    """Router: token-to-expert affinities, limited top-k selection, gate weights.

    Follows DeepSeek-V3 inference/model.py `Gate.forward`: softmax (DeepSeekMoE, V2) or sigmoid (V3)
    affinities s; the aux-loss-free bias b is added for selection only (V3 eq. 16); group-limited
    selection over n_expert_groups (group score = top-2 sum with a bias, else the max); gate weights
    from the unbiased s, normalised over the selected experts when norm_topk_prob (V3 eq. 13),
    times route_scale. On top, device-limited (V2 §2.2.1) and node-limited (V3 §2.1.2) routing over
    the expert placement that the parallel runtime sets with `set_placement` (one device by default).
    """

    fp32_buffers = ("bias",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.n_activated_experts
        self.score_func, self.norm_topk_prob, self.route_scale = cfg.score_func, cfg.norm_topk_prob, cfg.route_scale
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.topk_devices, self.topk_nodes = cfg.topk_devices, cfg.topk_nodes
        self.chosen: torch.Tensor | None = None   # under routing replay: the router's own pick of the last forward
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        if cfg.aux_free_bias:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None
        self.n_devices, self.devices_per_node = 1, 1

    def set_placement(self, n_devices: int, devices_per_node: int) -> None:
        """Experts are split in contiguous equal blocks over n_devices (expert e on device
        e // (n_experts / n_devices)); devices in contiguous blocks of devices_per_node per node."""
        if self.n_experts % n_devices:
            raise ValueError(f"{self.n_experts} experts cannot be split evenly over {n_devices} devices")
        if n_devices % devices_per_node:
            raise ValueError(f"{n_devices} devices do not fill nodes of {devices_per_node}")
        per_device = self.n_experts // n_devices
        if self.topk_devices and n_devices > self.topk_devices and self.topk_devices * per_device < self.topk:
            raise ValueError(f"device-limited routing to {self.topk_devices} devices of {per_device} experts "
                             f"cannot select {self.topk} experts; raise topk_devices or use fewer devices")
        n_nodes = n_devices // devices_per_node
        if (self.topk_nodes and n_nodes > self.topk_nodes
                and self.topk_nodes * per_device * devices_per_node < self.topk):
            raise ValueError(f"node-limited routing to {self.topk_nodes} nodes of {per_device * devices_per_node} "
                             f"experts cannot select {self.topk} experts; raise topk_nodes")
        self.n_devices, self.devices_per_node = n_devices, devices_per_node

    @property
    def n_nodes(self) -> int:
        return self.n_devices // self.devices_per_node

    def forward(self, x: torch.Tensor, forced: torch.Tensor | None = None):
        """x [T, dim] -> gate weights [T, K], expert indices [T, K], affinities s [T, E] (fp32). With `forced`
        (routing replay, `route`), `self.chosen` keeps the indices the router picked itself. One entry point,
        so that forward hooks on the gate see every routing decision (benchmarks, metrics)."""
        weights, indices, scores, chosen = self.route(x, forced)
        self.chosen = chosen if forced is not None else None
        return weights, indices, scores

    def route(self, x: torch.Tensor, forced: torch.Tensor | None = None):
        """forward's (weights, indices, scores) plus the indices the router chose itself [T, K]. With
        `forced` [T, K] (routing replay, R3: arXiv 2510.11370) every token whose row holds no -1 takes
        those experts instead: selection (groups, device/node limits, the aux-free bias) is overridden,
        the gate weights still come from this forward's scores, so the router keeps its gradients."""
        scores = F.linear(at_least_fp32(x), at_least_fp32(self.weight))
        scores = scores.softmax(dim=-1) if self.score_func == "softmax" else scores.sigmoid()
        select = scores if self.bias is None else scores + self.bias
        if self.n_groups > 1:
            select = _limit_groups(select, self.n_groups, self.topk_groups, 1 if self.bias is None else 2)
        if self.topk_devices and self.n_devices > self.topk_devices:
            # V2: the M devices holding the highest-affinity experts
            select = _limit_groups(select, self.n_devices, self.topk_devices, 1)
        if self.topk_nodes and self.n_nodes > self.topk_nodes:
            # V3: nodes ranked by the sum of their K_r/M highest affinities
            per_node = max(1, self.topk // self.topk_nodes)
            select = _limit_groups(select, self.n_nodes, self.topk_nodes, per_node)
        chosen = indices = select.topk(self.topk, dim=-1).indices
        if forced is not None:
            if forced.shape != indices.shape:
                raise ValueError(f"routing replay: forced routes of shape {tuple(forced.shape)} for a gate that sees "
                                 f"{tuple(indices.shape)} (tokens, top-k); replay the routes of this micro-batch")
            forced = forced.to(indices.device, indices.dtype)
            indices = torch.where((forced >= 0).all(-1, keepdim=True), forced, indices)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores, chosen

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float) -> None:
        """V3 §2.1.2: b_i -= gamma if expert i is overloaded, += gamma if underloaded."""
        if self.bias is not None:
            self.bias += gamma * torch.sign(load.float().mean() - load.float())


_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # torch >= 2.9


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert, counts[e] rows for expert e; returns x_e @ w[e]^T for each block.

    Uses torch's grouped GEMM when the strides allow it (16-byte aligned), else one matmul per
    expert: a loop over experts, never over tokens.
    """
    aligned = all((d * x.element_size()) % 16 == 0 for d in (x.shape[-1], w.shape[-2]))
    if _grouped_mm is not None and aligned and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        out = _grouped_mm(x, w.transpose(-2, -1), offs=offs)
        if out.requires_grad and not out.is_cuda:
            out.register_hook(lambda g: g.contiguous())  # the CPU kernel wants dense gradients
        return out
    chunks = x.split(counts.tolist())
    return torch.cat([c @ w[e].t() for e, c in enumerate(chunks)]) if chunks else x.new_zeros(0, w.shape[1])


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Pairs per expert in indices [T, K]; an index >= n_experts (absent) is not counted. A
    scatter-add, not bincount: no host sync on CUDA."""
    flat = indices.flatten().clamp(max=n_experts)
    counts = torch.zeros(n_experts + 1, dtype=torch.long, device=indices.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))[:n_experts]


def permute(indices: torch.Tensor, n_experts: int):
    """Sort the (token, slot) pairs of indices [T, K] by expert (absent pairs sort last); returns
    the order and the per-expert counts."""
    return indices.flatten().argsort(stable=True), expert_counts(indices, n_experts)


class Experts(nn.Module):
    """The routed experts' SwiGLU weights stacked [n_experts, out, in] (one grouped GEMM per matrix).

    `forward(x, indices, weights)` is the whole routed path for the experts held here:
    y_t = sum_k weights[t, k] * FFN_{indices[t, k]}(x_t), where an index >= n_experts means
    "not here" (a dropped pair, or an expert on another device). The expert-parallel runtime
    wraps this module and calls it on the tokens it receives.
    """

    # runtime hooks (ep_count, ep_params, grouped_gemm, forward): parallel/protocols.py
    ep_count, ep_params = "n_experts", ("w1", "w2", "w3")  # expert parallelism splits these on dim 0
    grouped_gemm = staticmethod(grouped_mm)  # a GEMM backend (FP8) may replace it from outside
    # inference on at most this many (token, expert) products runs every expert densely (`_dense`): on a decode
    # step of a few tokens the per-expert GEMMs' fixed cost exceeds the unchosen experts' products. Compiled
    # inference always does (the CPU grouped GEMM does not trace in fp32; posttrain/generate.py `compiled`)
    dense_products = 1024

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def ffn(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of x sorted by expert, counts[e] rows for expert e."""
        gemm = self.grouped_gemm
        return gemm(F.silu(gemm(x, self.w1, counts)) * gemm(x, self.w3, counts), self.w2, counts)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                partial: bool = True) -> torch.Tensor:
        """partial=False promises every pair is present: no host sync on the count."""
        t, k = indices.shape
        dense = torch.compiler.is_compiling() or t * self.n_experts <= self.dense_products   # no size guard traced
        if dense and not torch.is_grad_enabled() and type(x) is torch.Tensor and "grouped_gemm" not in self.__dict__:
            return self._dense(x, indices, weights)
        order, counts = permute(indices, self.n_experts)
        if partial:
            order = order[: int(counts.sum())]
        out = self.ffn(x[order // k], counts)
        # unpermute into [T, K, dim] slots (an absent pair's slot stays zero) and take the
        # gate-weighted sum over K: a permutation and a reduction, no scatter-add with atomics
        dim = self.w2.shape[1]
        slots = out.new_zeros(t * k, dim) if partial else torch.empty_like(out)
        slots = slots.index_copy(0, order, out).view(t, k, dim)
        return (slots * weights.to(x.dtype).unsqueeze(-1)).sum(1)

    def _dense(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """forward for a few tokens without gradients (a decode step): every expert held here on every token,
        one GEMM per matrix over the experts side by side, the gate weights (0 for an unchosen or absent
        expert) applied between the two halves of each FFN. The same sum as forward's to rounding; cheaper
        while sorting the pairs and one GEMM per expert cost more than the extra products (a few tokens)."""
        t, (e, inter, dim) = x.shape[0], self.w1.shape
        gate = x.new_zeros(t, e + 1).scatter_add_(1, indices.clamp(max=e), weights.to(x.dtype))[:, :e]
        h = F.silu(x @ self.w1.view(e * inter, dim).t()) * (x @ self.w3.view(e * inter, dim).t())
        return (h.view(t, e, inter) * gate[:, :, None]).view(t, e * inter) @ self.w2.transpose(1, 2).reshape(
            e * inter, dim)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class MoE(FP32Buffers, nn.Module):
    """sum_j FFN^(s)_j(u) + sum_i g_i FFN^(r)_i(u): V3 eq. 12 without the residual.

    In training it also records its balance losses (`aux_losses`) and accumulates the per-expert
    token load (`tokens_per_expert`) that the aux-loss-free bias update consumes.
    """

    fp32_buffers = ("tokens_per_expert",)
    # runtime hooks (token_split, reduce_token_stats, tokens_per_expert): parallel/protocols.py
    tp_plan = {"": "token_split"}  # under tp each rank routes its share of the tokens

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.topk = cfg.n_routed_experts, cfg.n_activated_experts
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_losses: dict[str, torch.Tensor] = {}
        # Sums per-sequence routing statistics over the ranks that hold other tokens of the same
        # sequences (sequence parallelism sets it); identity in one process.
        self.reduce_token_stats = _identity
        # Routing replay (R3), set from outside (Transformer.record_routing / replay_routing / clear_routing):
        # forced_routes [T, K] (-1: route normally) stays set until cleared, so that activation recomputation
        # in backward forces the same experts; with record_routes each forward appends (chosen, used)
        # indices [*, K] to `routes`, a new tuple each time (recomputation's restore drops its own record).
        self.forced_routes: torch.Tensor | None = None
        self.record_routes = False
        self.routes: tuple = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, dim] (or [tokens, dim]: one sequence)."""
        x, weights, routed, partial, stats = self.route(x)
        return self.merge(x, self.experts(x, routed, weights, partial=partial), stats)

    # runtime hook (moe phases): forward = route, the routed experts, merge; the overlap runtime runs the
    # experts' token dispatch between the two (parallel/overlap.py, parallel/protocols.py)
    def route(self, x: torch.Tensor):
        """The router: x [batch, seq, dim] (or [tokens, dim]) -> (x [T, dim], gate weights [T, K], routed
        indices [T, K], partial (pairs may be dropped), stats for `merge`)."""
        shape = x.shape
        n_seqs = shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(x, self.forced_routes)
        chosen = indices if self.gate.chosen is None else self.gate.chosen
        if self.record_routes:
            lead = shape[:-1]
            self.routes = self.routes + ((chosen.detach().view(*lead, -1), indices.detach().view(*lead, -1)),)
        dropping = self.training and self.cfg.capacity_factor > 0 and self.gate.n_devices > 1
        routed = indices
        if dropping:
            weights, routed = self._drop_tokens(weights, indices, scores, n_seqs)
        return x, weights, routed, dropping, (shape, scores, indices, routed, n_seqs)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts on x [T, dim] (None without them)."""
        return None if self.shared_experts is None else self.shared_experts(x)

    def merge(self, x: torch.Tensor, y: torch.Tensor, stats, shared: torch.Tensor | None = None) -> torch.Tensor:
        """The routed experts' output y [T, dim] plus the shared experts on x [T, dim] (`shared`: that output
        when computed already), in the input's shape; in training also this forward's load count and
        balance losses."""
        shape, scores, indices, routed, n_seqs = stats
        if self.shared_experts is not None:
            y = y + (self.shared_experts(x) if shared is None else shared)
        self.aux_losses = {}
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(routed, self.n_experts).to(self.tokens_per_expert.dtype)
            self.aux_losses = self._balance_losses(scores, indices, n_seqs)
        return y.view(shape)

    def _balance_losses(self, scores, indices, batch: int) -> dict[str, torch.Tensor]:
        """Expert-level (V2 eq. 23-25 = V3 sequence-wise eq. 17-20), device-level (eq. 26-28) and
        communication (eq. 29-31) balance losses; T is one sequence's tokens when balance_per_sequence."""
        cfg, e, k = self.cfg, self.n_experts, self.topk
        losses = {}
        if not (cfg.balance_alpha_expert or cfg.balance_alpha_device or cfg.balance_alpha_comm):
            return losses
        groups = batch if cfg.balance_per_sequence else 1
        t = scores.shape[0] // groups
        if self.gate.score_func == "sigmoid":
            scores = scores / scores.sum(dim=-1, keepdim=True)  # s' (V3 eq. 19)
        reduce = self.reduce_token_stats
        n = reduce(scores.new_full((1,), float(t)))                                  # T
        p = reduce(scores.view(groups, t, e).sum(1)) / n                             # P_i
        hits = torch.zeros(groups, e, device=scores.device).scatter_add_(
            1, indices.view(groups, t * k), torch.ones(groups, t * k, device=scores.device))
        f = reduce(hits) * e / (k * n)                                               # f_i
        if cfg.balance_alpha_expert:
            losses["balance_expert"] = cfg.balance_alpha_expert * (f * p).sum(-1).mean()
        d = self.gate.n_devices
        p_dev = p.view(groups, d, e // d).sum(-1)                                    # P'_i = P''_i
        if cfg.balance_alpha_device:
            f_dev = f.view(groups, d, e // d).mean(-1)                               # f'_i
            losses["balance_device"] = cfg.balance_alpha_device * (f_dev * p_dev).sum(-1).mean()
        if cfg.balance_alpha_comm:
            m = min(cfg.topk_devices or k, d)
            sent = torch.zeros(scores.shape[0], d, device=scores.device).scatter_(1, indices // (e // d), 1.0)
            f_comm = reduce(sent.view(groups, t, d).sum(1)) * d / (m * n)            # f''_i
            losses["balance_comm"] = cfg.balance_alpha_comm * (f_comm * p_dev).sum(-1).mean()
        return losses

    def _drop_tokens(self, weights, indices, scores, batch: int):
        """V2 §2.2.4: per device, keep the highest-affinity (token, expert) pairs up to
        capacity_factor x the average load; pairs of ~drop_exempt_fraction of sequences are never dropped."""
        cfg, e, d = self.cfg, self.n_experts, self.gate.n_devices
        t, k = indices.shape
        capacity = math.ceil(cfg.capacity_factor * t * k / d)
        device = indices // (e // d)
        priority = scores.gather(1, indices).detach()
        exempt = (torch.rand(batch, device=indices.device) < cfg.drop_exempt_fraction)
        exempt = exempt.repeat_interleave(t // batch)[:, None].expand(t, k)
        priority = priority + exempt.float() * 2.0  # affinities lie in [0, 1]
        order = priority.flatten().argsort(descending=True, stable=True)
        order = order[device.flatten()[order].argsort(stable=True)]          # by device, then priority
        dev_sorted = device.flatten()[order]
        first = torch.searchsorted(dev_sorted, torch.arange(d, device=dev_sorted.device))
        rank = torch.arange(order.numel(), device=order.device) - first[dev_sorted]
        keep = torch.empty_like(rank, dtype=torch.bool).scatter_(0, order, rank < capacity)
        keep = keep.view(t, k) | exempt
        return weights * keep, torch.where(keep, indices, torch.full_like(indices, e))
