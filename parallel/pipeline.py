"""Pipeline parallelism: cut a model into stages, run them under a schedule of
torch.distributed.pipelining, and do what that library does not know about.

torch's PipelineStage runs any module and its schedules (GPipe, 1F1B, interleaved 1F1B, ZB1P, ZBV,
DualPipeV; `pp_schedules.py`) send one activation tensor from stage to stage. Three things of a
DeepSeek-V3 model do not fit that and are written here:

- Inputs every stage needs. Token ids (positions under sequence parallelism, MTP's shifted
  embeddings), labels and document ids go to every stage as keyword arguments, which torch's
  schedules chunk and hand to all stages; only the hidden states travel between stages (under
  context parallelism those of the rank's chunks, whose positions each stage holds: `cp_positions`).
- Losses that arise before the last stage. Each stage's MoE balance losses are attached to the
  hidden states it sends on (`AttachAuxLoss`, the idea of Megatron's MoEAuxLossAutoScaler): the
  forward value is untouched, and backward gives the loss its gradient, so a stage needs no scalar
  output of its own. The last stage returns lm + MTP + its own balance losses.
- Parameters two stages hold. MTP (and a tied output head) needs the embedding on the last stage.
  That stage keeps a copy, initialised identically, and after backward the copies' gradients are
  summed (Megatron's shared-embedding group; in the V layouts both stages sit on rank 0 and the
  sum is local), so they take identical optimizer steps (V3 §3.2 keeps them on one PP rank).

The objective of one step is the mean over micro-batches of each micro-batch's `loss()`, exactly
what one process computes with gradient accumulation over the same micro-batches.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage

from . import comm
from .apply import parallelize
from .context_parallel import check_sequence, cp_inputs
from .data_parallel import _local, clip_grad_norm_, finish_grad_sync, prime_unsharded, reshard, sync_expert_load
from .mesh import LayoutError, Mesh
from .overlap import FBRunner, check_overlap
from .pp_schedules import build_schedule, n_stages, rank_stages, schedule_spec, stage_to_rank
from .recompute import apply_recompute
from .state import init_parallel_weights

METRIC_KEYS = ("lm_loss", "mtp_loss", "balance_expert", "balance_device", "balance_comm")


class AttachAuxLoss(torch.autograd.Function):
    """Identity on the activations; in backward the auxiliary loss receives gradient `scale` (the
    weight of its micro-batch in the objective), so its graph is back-propagated with the stage's."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, scale: float):
        ctx.scale, ctx.aux_meta = scale, (aux.dtype, aux.device)
        return h.clone(memory_format=torch.contiguous_format)  # see _sendable

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.aux_meta
        return grad, torch.full((), ctx.scale, dtype=dtype, device=device), None


# hooks read here (loss, hidden, balance_losses, layers/embed/norm/head/mtp, cfg, stage_costs): parallel/protocols.py
class StageModel:
    """Mixin swapped onto a stage's copy of the model (as FSDP2 swaps classes; names unchanged).

    forward(h, *, tokens, labels): the first stage embeds `tokens` (no `h`); the last returns the
    micro-batch's loss; the others return hidden states carrying their balance losses."""

    fsdp_forward_methods = ()  # only forward is called on a stage; `loss`/`hidden` run inside it

    def forward(self, h: torch.Tensor | None = None, *, tokens: torch.Tensor, labels: torch.Tensor,
                doc_ids: torch.Tensor | None = None, routes: torch.Tensor | None = None,
                route_pairs: torch.Tensor | None = None, **inputs: torch.Tensor):
        """`routes` [rows, seq, trunk MoE layers, k]: routing replay (R3) through the pipeline. The routes of
        this micro-batch are forced on this stage's MoE layers for this forward only (when `route_replay`),
        so a schedule may interleave micro-batches (full recomputation re-runs a block with the attributes
        its forward had: recompute.py). With `route_pairs` [rows, seq] (bool: the
        pairs to compare) the router's own choices are compared with `routes` into `route_counts`."""
        cols = routes[..., self.moe_columns, :] if routes is not None and self.moe_columns else None
        if cols is None:
            return self._forward(h, tokens, labels, doc_ids, inputs)
        if self.route_replay:
            self.replay_routing(cols)
        if route_pairs is not None:
            self.record_routing()
        try:
            out = self._forward(h, tokens, labels, doc_ids, inputs)
            if route_pairs is not None:   # (token, layer) pairs whose top-k set differs, of the pairs compared
                chosen = self.recorded_routing(forced=False)[-1].view(cols.shape)
                pairs = route_pairs[..., None] & (cols >= 0).all(-1)
                differ = (chosen.sort(-1).values != cols.sort(-1).values).any(-1)
                self.route_counts += torch.stack([(differ & pairs).sum(), pairs.sum()]).double().cpu()
            return out
        finally:
            self.clear_routing()

    def _forward(self, h, tokens, labels, doc_ids, inputs: dict):
        # under cp the stage computes (and passes on) its chunks of the whole rows (context_parallel.py)
        extra = {} if self.cp_positions is None else {"positions": self.cp_positions}
        if doc_ids is not None:  # packed documents: every stage's attention masks by them
            extra["doc_ids"] = doc_ids
        if self.is_last:
            if self.objective is not None:   # a post-training objective (Pipeline.step's `objective`)
                out = self.objective(self, h, tokens, labels, **extra, **inputs)
                self.objective_terms.append({k: v.detach() for k, v in out.items()})
            else:
                out = self.loss(tokens, labels, h=h, **extra)
                self.record(out)
            return torch.stack([out["loss"]])  # torch's schedules concatenate these; not a view (FSDP2 warns)
        h = self.hidden(tokens, h=h, **extra)
        # a custom objective is the whole objective: post-training's (token_logprobs) has no balance losses
        terms = self.balance_losses() if self.objective is None else {}
        self.record(terms)
        if terms and torch.is_grad_enabled():
            return AttachAuxLoss.apply(h, sum(terms.values()), self.aux_scale)
        return _sendable(h)

    def record(self, out: dict) -> None:
        self.stage_metrics.append({k: v.detach() for k, v in out.items() if k in METRIC_KEYS})


def _sendable(h: torch.Tensor) -> torch.Tensor:
    """Stage outputs must be contiguous (they are sent as they are) and not views (torch's
    zero-bubble backward detaches them in place); sequence-parallel scatters and collectives can
    return either, and then a copy is made."""
    return h if h.is_contiguous() and h._base is None else h.clone(memory_format=torch.contiguous_format)


def _stage_class(cls: type) -> type:
    return type(f"Stage{cls.__name__}", (StageModel, cls), {})


# -- cutting ---------------------------------------------------------------------------------------
def split_layers(costs: tuple[float, list[float], float], n: int) -> list[list[int]]:
    """Contiguous layers for n stages minimising the most expensive stage (the pipeline runs at the
    pace of its slowest stage). The first stage also pays `pre`, the last `post` (head, MTP). Middle
    stages get at least one layer; the first and the last may get none when their extra work
    outweighs a layer."""
    pre, layer, post = costs
    L = len(layer)
    if L < n - 2 or (L < n and n <= 2):
        raise LayoutError(f"{n} pipeline stages need at least {max(n - 2, 1)} layers; the model has {L}: "
                          f"lower parallel.pp (or the virtual stages per rank)")
    prefix = [0.0]
    for c in layer:
        prefix.append(prefix[-1] + c)

    def cost(s: int, a: int, b: int) -> float:  # stage s holding layers a..b-1
        return prefix[b] - prefix[a] + (pre if s == 0 else 0.0) + (post if s == n - 1 else 0.0)

    inf = float("inf")
    # best[s][b]: the smallest max-cost over stages 0..s holding layers 0..b-1
    best = [[inf] * (L + 1) for _ in range(n)]
    cut = [[0] * (L + 1) for _ in range(n)]
    for b in range(L + 1):
        best[0][b] = cost(0, 0, b)
    for s in range(1, n):
        for b in range(L + 1):
            for a in range(b + 1):
                if a == b and 0 < s < n - 1:
                    continue  # a middle stage must hold a layer
                v = max(best[s - 1][a], cost(s, a, b))
                if v < best[s][b]:
                    best[s][b], cut[s][b] = v, a
    edges = _edges_from_cuts(cut, n, L)
    return [list(range(edges[s], edges[s + 1])) for s in range(n)]


def _edges_from_cuts(cut, n: int, L: int) -> list[int]:
    edges, b = [L], L
    for s in range(n - 1, 0, -1):
        b = cut[s][b]
        edges.append(b)
    edges.append(0)
    return edges[::-1]


def check_layer_split(split: list[list[int]], n_layers: int, n: int) -> None:
    if len(split) != n:
        raise LayoutError(f"the layer split has {len(split)} stages; the schedule needs {n}")
    flat = [i for stage in split for i in stage]
    if flat != list(range(n_layers)):
        raise LayoutError(f"the layer split must list layers 0..{n_layers - 1} once each, in order, "
                          f"as consecutive runs per stage; got {split}")
    for s, stage in enumerate(split):
        if not stage and 0 < s < n - 1:
            raise LayoutError(f"stage {s} of the layer split has no layer; only the first and last may be empty")


def cut_stage(model: nn.Module, layers: list[int], first: bool, last: bool, keep_embed: bool) -> nn.Module:
    """A copy of (meta) `model` holding only `layers` and, on the first stage, the embedding; on the
    last the final norm, head and MTP modules (plus a copy of the embedding when `keep_embed`)."""
    stage = copy.deepcopy(model)
    stage.layers = nn.ModuleDict({str(i): stage.layers[str(i)] for i in layers})
    if not (first or (last and keep_embed)):
        stage.embed = None
    if not last:
        stage.norm, stage.head, stage.mtp = None, None, nn.ModuleList()
    stage.__class__ = _stage_class(type(model))
    stage.is_first, stage.is_last = first, last
    stage.stage_metrics, stage.aux_scale, stage.cp_positions = [], 1.0, None
    stage.objective, stage.objective_terms = None, []
    # routing replay: this stage's trunk MoE layers as columns of the whole model's (StageModel.forward)
    trunk = {id(m) for m in model.trunk_moe_layers()}
    moe = [int(i) for i, b in model.layers.items() if id(getattr(b, "ffn", None)) in trunk]
    stage.moe_columns = [moe.index(i) for i in layers if i in moe]
    stage.route_replay, stage.route_counts = False, torch.zeros(2, dtype=torch.float64)
    return stage


def _needs_embed_on_last(model: nn.Module) -> bool:
    """MTP embeds shifted tokens, and a tied head is the embedding."""
    return len(getattr(model, "mtp", ())) > 0 or model.head.weight is model.embed.weight


# -- the pipeline ----------------------------------------------------------------------------------
@dataclass
class Pipeline:
    """This rank's stages of a model and the schedule that drives them.

        pipe = build_pipeline(build_model(cfg, device="meta"), mesh, "dualpipev", n_microbatches=8)
        pipe.init_weights(seed=0); attach_schedule(pipe, micro_batch_size=1, seq_len=4096)
        metrics = pipe.step(tokens, labels)        # forward + backward of every micro-batch
        pipe.clip_grad_norm_(1.0); opt.step(); pipe.update_expert_bias()

    The interface of `engine.SingleStage` (pp = 1), so that a training loop serves both.
    """

    stages: list[nn.Module]            # this rank's stage models, by increasing stage index
    stage_ids: list[int]
    n_stages: int
    layer_split: list[list[int]]
    schedule_name: str
    n_microbatches: int
    mesh: Mesh
    shared_names: tuple[str, ...]      # parameters the first and the last stage both hold
    pp_stages: list[PipelineStage] = field(default_factory=list)
    schedule: object = None
    hidden_shape: tuple = ()           # one micro-batch's activations between stages (attach_schedule)
    act_dtype: torch.dtype = torch.float32
    seq_len: int = 0                   # as attach_schedule was given them, to rebuild the schedule
    device: object = None
    overlap: str = "none"              # "ep": DualPipeV's F&B chunks part by part (overlap.FBRunner)
    fb_runner: object = None           # that runner, once attach_schedule built the schedule
    _shared_group: object = None

    def parameters(self):
        for s in self.stages:
            yield from s.parameters()

    def init_weights(self, seed: int = 0, device=None) -> None:
        for s in self.stages:
            init_parallel_weights(s, self.mesh, seed, device)
            prime_unsharded(s)   # a post-training objective's forward skips units (the MTP blocks)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, objective=None,
             **inputs: torch.Tensor) -> dict[str, float]:
        """Run the schedule on this data-parallel rank's batch; gradients end synchronised over tp,
        dp, ep and the shared embedding, the expert load over the stage's ranks. Returns the
        objective's terms (mean over micro-batches, mean over dp) and each stage's, identical on every
        rank. A batch of another micro-batch count (a batch-size ramp) gets its schedule rebuilt.

        `objective` (post-training; `engine.SingleStage.step` takes the same): the last stage computes
        objective(stage, h, tokens, labels, **inputs) -> {term: scalar} in place of the model's `loss`,
        "loss" being what is back-propagated (mean over micro-batches) and every name of `objective.terms`
        reported; no balance losses are attached. `inputs` are per-row tensors, chunked like the tokens and
        given to every stage (only the last reads what the objective needs)."""
        n_micro = tokens.shape[0] // self.hidden_shape[0]
        if n_micro != self.n_microbatches:
            self.n_microbatches = n_micro
            attach_schedule(self, self.hidden_shape[0], self.seq_len, dtype=self.act_dtype, device=self.device)
        self._set_positions(tokens)
        for s in self.stages:
            s.stage_metrics.clear()
            s.objective_terms.clear()
            s.aux_scale = 1.0 / self.n_microbatches
            s.objective = objective
        kwargs = dict(tokens=tokens, labels=labels, **inputs)  # inputs: more per-row tensors (doc_ids)
        try:
            if any(s.is_last for s in self.stages):
                self.schedule.step(target=labels, **kwargs)
            else:
                self.schedule.step(**kwargs)
        finally:
            for s in self.stages:
                s.objective = None
        for s in self.stages:
            finish_grad_sync(s, self.mesh)
            sync_expert_load(s, self.mesh)  # the step's global load, for the stats and the bias step
        self._sum_shared_grads()
        if objective is not None:
            return self._objective_metrics(objective.terms, self.n_microbatches)
        return self._metrics(self.n_microbatches)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, labels: torch.Tensor, fn, **inputs: torch.Tensor) -> torch.Tensor:
        """Forward only, in the stages' current mode: per position values [rows, seq] (fp32) that the last
        stage computes as fn(stage, h, tokens, labels, **inputs) per micro-batch (e.g. a frozen reference's
        token log-probabilities), on every rank: the last stage's rank sends them along the pp group."""
        out: list[torch.Tensor] = []

        def record(stage, h, tok, lab, **more):   # run inside the stage's forward (FSDP2 gathers there)
            out.append(fn(stage, h, tok, lab, **more).float())
            return {"loss": h.new_zeros(())}

        def last(stage, h, tok, lab, more):
            stage.objective = record
            try:
                stage(h, tokens=tok, labels=lab, **more)
            finally:
                stage.objective = None
                stage.objective_terms.clear()

        self._walk(tokens, labels, inputs, last)
        owner = stage_to_rank(self.schedule_name, self.mesh.dims.pp, self.n_stages // self.mesh.dims.pp)
        dims, me = self.mesh.dims, self.mesh.rank
        values = torch.cat(out) if out else torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
        src = me + (owner[self.n_stages - 1] - dims.coords(me)["pp"]) * dims.stage_size
        dist.broadcast(values, src, group=self.mesh["pp"].pg)
        return values

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor, labels: torch.Tensor, **inputs: torch.Tensor) -> dict[str, float]:
        """Forward only, the stages in eval mode (no balance losses, no load counting); the same
        metrics as `step`."""
        for s in self.stages:
            s.stage_metrics.clear()
            s.eval()
        try:
            self._walk(tokens, labels, inputs, lambda net, h, tok, lab, more: net(h, tokens=tok, labels=lab, **more))
        finally:
            for s in self.stages:
                s.train()
        return self._metrics(-(-tokens.shape[0] // self.hidden_shape[0]))

    def _walk(self, tokens: torch.Tensor, labels: torch.Tensor, inputs: dict, last) -> None:
        """A forward-only pass, written here rather than with the schedules' own `eval`, which torch 2.13
        cannot run for the split-backward schedules (ZBV, DualPipeV assert on their B actions): each
        micro-batch walks the stages in order, the hidden states going point to point to the rank
        holding the next stage (same dp/tp coordinates); the last stage runs last(stage, h, tokens,
        labels, inputs) instead of passing on. Validation and scoring need no overlap."""
        dims, me = self.mesh.dims, self.mesh.rank
        owner = stage_to_rank(self.schedule_name, dims.pp, self.n_stages // dims.pp)
        pp_i = dims.coords(me)["pp"]
        mine = dict(zip(self.stage_ids, self.stages))
        self._set_positions(tokens)
        try:
            mbs = self.hidden_shape[0]  # the micro-batch size the stages were given (attach_schedule)
            for i, (tok, lab) in enumerate(zip(tokens.split(mbs), labels.split(mbs))):
                more = {k: v[i * mbs:(i + 1) * mbs] for k, v in inputs.items()}
                h = None
                for sid in range(self.n_stages):
                    if sid in mine:
                        if h is None and sid > 0:  # sent by the previous stage's rank
                            h = torch.empty(self.hidden_shape, dtype=self.act_dtype, device=tok.device)
                            dist.recv(h, me + (owner[sid - 1] - pp_i) * dims.stage_size)
                        if sid == self.n_stages - 1:
                            last(mine[sid], h, tok, lab, more)
                            break
                        h = mine[sid](h, tokens=tok, labels=lab, **more)
                        nxt = owner[sid + 1]
                        if nxt != pp_i:
                            dist.send(h.contiguous(), me + (nxt - pp_i) * dims.stage_size)
                            h = None
                    else:
                        h = None
        finally:
            for s in self.stages:
                reshard(s)   # a forward without backward leaves FSDP2's root gathered

    def _set_positions(self, tokens: torch.Tensor) -> None:
        positions = cp_inputs(self.mesh, tokens.shape[1], self.stages[0].cfg.is_moe, tokens.device).get("positions")
        for s in self.stages:
            s.cp_positions = positions

    def _sum_shared_grads(self) -> None:
        """Megatron's embedding-group all-reduce: the first stage's embedding and the last stage's
        copy get the sum of both gradients (and stay equal after the optimizer step)."""
        holders = [s for s in self.stages if s.is_first or s.is_last]
        for name in self.shared_names:
            for s in holders:   # an objective without MTP leaves the last stage's copy without a gradient
                p = s.get_parameter(name)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [_local(s.get_parameter(name).grad) for s in holders]
            if len(holders) == 2:  # V layouts: both on this rank
                total = grads[0] + grads[1]
                for g in grads:
                    g.copy_(total)
            elif holders and self._shared_group is not None:
                comm.all_reduce(grads[0], self._shared_group)

    def _metrics(self, n_micro: int) -> dict[str, float]:
        dims = self.mesh.dims
        vec = torch.zeros(self.n_stages, len(METRIC_KEYS), dtype=torch.float64)
        for sid, s in zip(self.stage_ids, self.stages):
            for rec in s.stage_metrics:
                for k, v in rec.items():
                    vec[sid, METRIC_KEYS.index(k)] += float(v) / n_micro
        comm.all_reduce(vec, self.mesh["world"])
        vec /= dims.stage_size  # tp and cp ranks hold the same values (the cp sums are in them); dp ranks are averaged
        total = vec.sum(0)
        out = {k: float(total[METRIC_KEYS.index(k)]) for k in ("lm_loss", "mtp_loss")}
        aux = {k: float(total[j]) for j, k in enumerate(METRIC_KEYS) if k.startswith("balance") and total[j] != 0}
        out.update(aux)
        if aux:
            out["aux_loss"] = sum(aux.values())
        if not self.stages[0].cfg.n_mtp:
            out.pop("mtp_loss", None)
        out["loss"] = out["lm_loss"] + out.get("mtp_loss", 0.0) + out.get("aux_loss", 0.0)
        for sid in range(self.n_stages):
            aux_s = float(vec[sid, 2:].sum())  # METRIC_KEYS[2:] are the balance losses
            if aux_s:
                out[f"stage{sid}/aux_loss"] = aux_s
        return out

    def _objective_metrics(self, terms: tuple[str, ...], n_micro: int) -> dict[str, float]:
        """A custom objective's terms (recorded on the last stage): mean over micro-batches and dp ranks."""
        vec = torch.zeros(len(terms), dtype=torch.float64)
        for s in self.stages:
            for rec in s.objective_terms:
                for j, k in enumerate(terms):
                    vec[j] += float(rec[k]) / n_micro
        comm.all_reduce(vec, self.mesh["world"])
        vec /= self.mesh.dims.stage_size   # one last stage per (dp, cp, tp) rank: tp and cp copies, dp averaged
        return {k: float(v) for k, v in zip(terms, vec)}

    def clip_grad_norm_(self, max_norm: float, apart: str = "") -> torch.Tensor:
        """Global norm over every stage of every rank, each shared parameter counted once (`apart`:
        data_parallel.clip_grad_norm_'s separately clipped group)."""
        return clip_grad_norm_(self.stages, max_norm, self.mesh, apart)

    @torch.no_grad()
    def update_expert_bias(self, gamma: float | None = None) -> None:
        """The aux-loss-free bias step from the load `step` synchronised (identical on every rank)."""
        for s in self.stages:
            s.update_expert_bias(gamma)


def build_pipeline(model: nn.Module, mesh: Mesh, schedule: str = "1f1b", n_microbatches: int = 0, *,
                   vpp: int = 2, layer_split: list[list[int]] | None = None, seq_len: int | None = None,
                   recompute: str | list[str] = "none", param_dtype: torch.dtype | None = None,
                   fp8=None, overlap: str = "none") -> Pipeline:
    """Cut `model` (best on the meta device: each rank allocates only its stages) into the stages of
    `schedule`, apply tp/ep/FSDP2 to each (`parallelize`) and build the schedule.

    layer_split: explicit layers per stage (global stage order); otherwise split by
    `model.stage_costs(seq_len)` so that the slowest stage is as fast as possible. recompute: one mode
    ("none" | "selective" | "full") or one per global stage. fp8: an `Fp8Recipe` for every stage.
    overlap: "ep" runs DualPipeV's F&B chunks part by part, each all-to-all under the other chunk's compute."""
    dims = mesh.dims
    check_overlap(overlap, dims, schedule)
    pp = dims.pp
    total = n_stages(schedule, pp, vpp)
    if total < 2:
        raise LayoutError(f"pipeline schedule {schedule} with pp={pp} has {total} stage; use parallel.pp >= 2")
    n_layers = len(model.layers)
    if layer_split is None:
        layer_split = split_layers(model.stage_costs(seq_len or model.cfg.max_seq_len), total)
    check_layer_split(layer_split, n_layers, total)
    modes = [recompute] * total if isinstance(recompute, str) else list(recompute)
    if len(modes) != total:
        raise LayoutError(f"recompute lists {len(modes)} modes; the schedule has {total} stages")
    # Zero-bubble schedules run a micro-batch's weight gradients (W) apart from its input gradients
    # (I). With FSDP2 resharding parameters after forward, torch 2.13's runtime then loses the last
    # stage's gradients (measured: all None at pp2 x dp2 under zbv and zb1p, wrong embedding
    # gradients under dualpipev). Keeping the gathered parameters until backward (ZeRO-2) is
    # correct, and DeepSeek-V3 pairs DualPipe with ZeRO-1, which shards less still.
    zero = 2 if schedule_spec(schedule).splits_backward and dims.dp * dims.cp > 1 else None
    keep_embed = _needs_embed_on_last(model)
    pp_rank = dims.coords(mesh.rank)["pp"]
    ids = rank_stages(schedule, pp, pp_rank, vpp)
    stages = []
    for sid in ids:
        s = cut_stage(model, layer_split[sid], sid == 0, sid == total - 1, keep_embed)
        s.stage_index = sid
        if modes[sid] != "none":
            apply_recompute(s, modes[sid])
        stages.append(parallelize(s, mesh, param_dtype=param_dtype, zero=zero, fp8=fp8))
    first_names = {n for n, _ in cut_stage(model, layer_split[0], True, False, keep_embed).named_parameters()}
    last_names = {n for n, _ in cut_stage(model, layer_split[-1], False, True, keep_embed).named_parameters()}
    shared = tuple(sorted(first_names & last_names))
    for s in stages:  # the last stage's copies are not counted again in the gradient norm
        s.grad_norm_skip = set(shared) if (s.is_last and not s.is_first) else set()
    pipe = Pipeline(stages, ids, total, layer_split, schedule, n_microbatches, mesh, shared, overlap=overlap)
    pipe._shared_group = _shared_embedding_group(mesh, schedule, vpp) if shared else None
    return pipe


def _shared_embedding_group(mesh: Mesh, schedule: str, vpp: int):
    """The ranks holding the first and the last stage with this rank's dp/tp coordinates (every rank
    takes part in creating every group, as torch.distributed requires). None in V layouts, where
    they are one rank."""
    dims = mesh.dims
    if schedule_spec(schedule).style == "v":
        return None
    first_pp, last_pp = 0, (n_stages(schedule, dims.pp, vpp) - 1) % dims.pp
    if first_pp == last_pp:
        return None
    mine = None
    for dp_i in range(dims.dp):
        for cp_i in range(dims.cp):
            for tp_i in range(dims.tp):
                ranks = [dims.rank_of(p, dp_i, cp_i, tp_i) for p in (first_pp, last_pp)]
                pg = dist.new_group(ranks)
                if mesh.rank in ranks:
                    mine = comm.Group("pp_shared", pg, tuple(ranks), dims.node_size)
    return mine


def attach_schedule(pipe: Pipeline, micro_batch_size: int, seq_len: int, dtype: torch.dtype | None = None,
                    device=None) -> Pipeline:
    """Wrap the (materialised) stages in PipelineStage objects and build the schedule. Separate from
    `build_pipeline` because the stages must hold real tensors first (`init_weights` or a load).

    The stages are given their input and output shapes (torch's "static" mode). Left to infer them,
    torch runs each stage once on uninitialised tensors, and a forward has side effects here: the
    MoE load counters behind the aux-loss-free bias would count that phantom batch."""
    mesh = pipe.mesh
    dims = mesh.dims
    device = torch.device(device or mesh.device_type)
    ref = next(pipe.stages[0].parameters())
    dtype = dtype or ref.dtype
    if dims.sp and seq_len % dims.tp:
        raise LayoutError(f"sequence length {seq_len} is not divisible by tp={dims.tp} under sequence parallelism")
    check_sequence(seq_len, dims, pipe.stages[0].cfg.is_moe)
    local = seq_len // dims.cp  # a stage passes on its cp chunks' hidden states
    hidden = (micro_batch_size, local // dims.tp if dims.sp else local, pipe.stages[0].cfg.dim)
    loss_dtype = torch.promote_types(dtype, torch.float32)
    pipe.hidden_shape, pipe.act_dtype, pipe.seq_len, pipe.device = hidden, dtype, seq_len, device
    n = pipe.n_microbatches

    def loss_fn(out, target):  # the objective: the mean over micro-batches
        return out.sum() / n

    def meta(shape, dt):
        return torch.empty(shape, dtype=dt, device="meta", requires_grad=True)

    pipe.pp_stages = []
    for s, sid in zip(pipe.stages, pipe.stage_ids):
        inputs = () if s.is_first else (meta(hidden, dtype),)
        outputs = (meta((1,), loss_dtype),) if s.is_last else (meta(hidden, dtype),)
        pipe.pp_stages.append(PipelineStage(s, sid, pipe.n_stages, device, input_args=inputs,
                                            output_args=outputs, group=mesh["pp"].pg))
    pipe.schedule = build_schedule(pipe.schedule_name, pipe.pp_stages, n, loss_fn)
    if pipe.overlap == "ep":
        pipe.fb_runner = FBRunner(pipe.schedule, pipe.pp_stages)
    return pipe
