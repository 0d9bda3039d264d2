"""Memory per rank of a post-training stage (GRPO, DPO, SFT; rejection sampling) under its training layout
and, for GRPO, its rollout layout: what `python -m launch.plan --posttrain CONFIG --gpus N` prints.

    cfg = posttrain.config.load_config("configs/posttrain/recipes/r1_zero.yaml")
    m = posttrain_memory(cfg, "grpo", n_gpus=512, gpu="H800")
    m.parts["kv_cache"] / GIB, m.total / GIB, m.fits

Nothing is re-derived here: the policy's training terms are the planner's (`planner.evaluate` on the
training layout as the runtime runs it: FSDP2 = the planner's ZeRO-3, the runtime's stage cut, the
activation model under parallel.recompute), its state is `memory.state_bytes` of the planner's shard with
train.moment_dtype. What post-training adds, as the runtime builds it (posttrain/stage.py, grpo.py,
engine.py, parallel/refit.py; docs/posttrain.md "Training and rollout layouts"):
- sft: pretraining's terms;
- dpo: + a frozen reference in the training layout (a micro-batch is 2 rows per pair);
- grpo: + the frozen reference when grpo.beta > 0, + under pp > 1 (or a rollout.tp / rollout.ep that
  differs from training's) a frozen rollout copy in the rollout layout (tp = rollout.tp, ep = rollout.ep,
  dp = world / tp, pp = 1, FSDP2 over its dp; with rollout.compile in one process and a compute dtype, a plain
  copy), + the paged engine's latent cache, + the refresh's buffers;
- rejection (pp = 1, no training): the frozen policy, its gathered units while generating, the cache.

The reference and the policy's own cache are held in fp32: FSDP2 keeps a module's parameters in their own
dtype (fp32 as built) and casts them to train.dtype for compute (parallel/apply.py), and the engine allocates
its pages in the parameters' dtype (model.new_cache). The rollout copy, which only generates, is converted
to train.dtype after it is built (posttrain/grpo.py), and so are its pages. Two phases share the rest of
the memory: the update (activations, logits, the policy's gathered units) and generation (the rollout
copy's gathered units); the peak is the larger. The worst rank is the pp rank where the planner's training
memory peaks; `bound` also covers every other pp rank (each rank's own state and reference, with at most
the planner's peak training memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import planner as P
from .memory import MOMENT_BYTES, PARAM_BYTES, state_bytes

GIB = 1024 ** 3
STAGES = ("grpo", "dpo", "sft", "rejection")
FROZEN_BYTES = PARAM_BYTES        # a frozen copy keeps FSDP2's fp32 storage; train.dtype is the compute cast
CACHE_BYTES = PARAM_BYTES         # the engine's pages take the rollout model's parameter dtype (fp32)
REFIT_BUFFERS = 2 * (64 << 20)    # parallel/refit.py: a send and a receive bucket of DEFAULT_BUCKET per round


class PosttrainPlanError(P.PlanError):
    """A config or layout the model cannot be built for; the message names the key."""


@dataclass
class PosttrainMemory:
    stage: str
    gpu: str
    n_gpus: int
    capacity: float                  # bytes: the GPU table's hbm_gb (1e9 B, as the planner compares)
    training: str                    # the training layout's label
    rollout: str                     # the rollout layout ("" when the policy generates itself or no rollout)
    rank: int                        # the pp rank reported (where the planner's training memory peaks)
    parts: dict[str, float]          # bytes per component on that rank
    total: float                     # bytes at that rank's peak phase
    bound: float                     # bytes, an upper bound over every pp rank
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.bound <= self.capacity

    def as_dict(self) -> dict:
        return dict(stage=self.stage, gpu=self.gpu, gpus=self.n_gpus, training_layout=self.training,
                    rollout_layout=self.rollout, pp_rank=self.rank,
                    gib={k: v / GIB for k, v in self.parts.items()}, total_gib=self.total / GIB,
                    bound_gib=self.bound / GIB, capacity_gib=self.capacity / GIB, fits=self.fits, notes=self.notes)


def _err(msg: str) -> PosttrainPlanError:
    return PosttrainPlanError(msg)


def _shards(pl, tp: int, ep: int, dp: int) -> list[float]:
    """Elements each pp rank's FSDP2 shard holds: dense parameters / tp / dp, routed experts / ep / edp
    (edp = dp x tp / ep): planner.evaluate's per-rank shard, from the same placement."""
    edp = dp * tp // ep
    return [sum(p.params - p.expert_params for p in parts) / tp / dp + sum(p.expert_params for p in parts) / ep / edp
            for parts in pl.slot_parts]


def _gathered(pl, r: int, tp: int, ep: int) -> float:
    """Elements of pp rank r's parameters unsharded (dense / tp, experts / ep): what FSDP2 with
    reshard_after_forward=False (parallel.zero 2, which split-backward schedules force) keeps gathered."""
    return sum((p.params - p.expert_params) / tp + p.expert_params / ep for p in pl.slot_parts[r])


def cache_bytes_per_token(cfg, mtp: bool = False, element: int = CACHE_BYTES) -> int:
    """The paged cache's bytes per token over all layers (+ the MTP block when drafting). MLA caches only the
    latent c^KV and the rotated key k^R (V2 §2.1.3): kv_lora_rank + qk_rope_head_dim = 576 elements per token
    per layer for V3, whole on every tp rank (all heads share them); GQA caches keys and values of its
    kv heads."""
    per = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) if cfg.attention == "mla" else 2 * cfg.kv_heads * cfg.gqa_head_dim
    return (cfg.n_layers + (1 if mtp else 0)) * per * element


def pool_pages(max_batch: int, tokens: int, page_size: int) -> int:
    """posttrain/engine.py's pool: room for max_batch worst-case sequences (prompt + max_new_tokens), plus
    the scratch page, whatever the number of prompts."""
    return max_batch * math.ceil(tokens / page_size) + 1


def _layout(cfg, net, n: int, rows_per_item: int, items: int, items_key: str, seq_len: int):
    """(planner Layout, global batch in rows, the runtime's stage cut) of cfg's training layout, after the
    runtime's own checks (mesh.py, stage._build), each naming its key."""
    from parallel.mesh import LayoutError, ParallelConfig, ParallelDims
    from parallel.pipeline import split_layers
    from parallel.pp_schedules import check_microbatches, n_stages

    p, t = cfg.parallel, cfg.train
    if p.cp != 1:
        raise _err("parallel.cp must be 1 in post-training (whole sequences), got %d" % p.cp)
    try:
        dims = ParallelDims.from_config(ParallelConfig(tp=p.tp, pp=p.pp, dp=p.dp, ep=p.ep, sp=p.sp,
                                                       node_size=p.node_size, zero=p.zero), n)
    except LayoutError as e:
        raise _err(f"{e} (--gpus {n})") from None
    mbs = t.micro_batch_size
    items = dims.dp * mbs if items is None else items        # a stage that does not train: one micro-batch a rank
    if items % (dims.dp * mbs):
        raise _err(f"{items_key} = {items} must be a multiple of train.micro_batch_size ({mbs}) x the "
                   f"data-parallel size ({dims.dp}) (whole micro-batches per rank)")
    m = items // (dims.dp * mbs)
    schedule, vpp, split = "-", 1, []
    if p.pp > 1:
        try:
            check_microbatches(p.pp_schedule, p.pp, m, p.vpp)
        except ValueError as e:
            raise _err(f"{items_key} = {items} gives {m} micro-batches per dp rank: {e}") from None
        schedule = p.pp_schedule
        vpp = P._fixed_vpp(schedule) or p.vpp
        try:
            cut = p.layer_split or split_layers(net.stage_costs(seq_len), n_stages(schedule, p.pp, p.vpp))
        except (LayoutError, ValueError) as e:
            raise _err(str(e)) from None
        split = [len(s) for s in cut]
    precision = "fp8" if t.fp8 == "blockwise" else "bf16"
    lay = P.Layout(tp=p.tp, pp=p.pp, ep=p.ep, dp=dims.dp, vpp=vpp, schedule=schedule, zero=3,
                   recompute=p.recompute, precision=precision, micro_batch=mbs * rows_per_item)
    return lay, items * rows_per_item, split, dims


def _prompt_tokens(cfg, stage: str, prompt_tokens: int | None, model_cfg) -> int:
    """The longest prompt a sampling stage draws: prompt_tokens, else data.seq_len - rollout.max_new_tokens (the
    most a GRPO training row holds under pp > 1)."""
    new, seq_len = cfg.rollout.max_new_tokens, cfg.data.seq_len
    prompt = prompt_tokens if prompt_tokens is not None else seq_len - new
    if prompt < 1:
        raise _err(f"data.seq_len = {seq_len} leaves no prompt beside rollout.max_new_tokens = {new}: set "
                   f"data.seq_len to the longest prompt + {new} (or give --prompt-tokens)")
    if stage == "grpo" and cfg.parallel.pp > 1 and prompt + new > seq_len:
        raise _err(f"under parallel.pp > 1 GRPO pads rows to data.seq_len = {seq_len}, and a {prompt}-token prompt "
                   f"+ rollout.max_new_tokens = {new} does not fit; set data.seq_len >= {prompt + new}")
    if prompt + new > model_cfg.max_seq_len:
        raise _err(f"a {prompt}-token prompt + rollout.max_new_tokens = {new} exceeds model.max_seq_len = "
                   f"{model_cfg.max_seq_len}")
    return prompt


def _cache(cfg, model_cfg, tokens: int, per_call: int, element: int = CACHE_BYTES) -> float:
    """Bytes of the generator's cache on one rank for sequences of `tokens`: the paged engine's pool (sized
    by rollout.max_batch), or the static generator's one cache for the `per_call` sequences of a call;
    `element`: the generating model's parameter bytes (the pages take its dtype)."""
    r = cfg.rollout
    if r.engine == "paged":
        return pool_pages(r.max_batch, tokens, r.page_size) * r.page_size * cache_bytes_per_token(
            model_cfg, r.draft_tokens > 0, element)
    return per_call * tokens * cache_bytes_per_token(model_cfg, element=element)


def posttrain_memory(cfg, stage: str, n_gpus: int, gpu: str = "H800", *, prompt_tokens: int | None = None,
                     gpus_per_node: int | None = None) -> PosttrainMemory:
    """Per-rank memory of `stage` (grpo | dpo | sft | rejection) of PosttrainConfig `cfg` on `n_gpus` GPUs of
    kind `gpu`. prompt_tokens: the longest prompt GRPO and rejection sampling draw (default: data.seq_len -
    rollout.max_new_tokens, the most a GRPO training row holds under pp > 1)."""
    from model import build_model

    if stage not in STAGES:
        raise _err(f"stage {stage!r}: the memory model covers {', '.join(STAGES)} (--stage)")
    t, p, r, g, e = cfg.train, cfg.parallel, cfg.rollout, cfg.grpo, cfg.eval
    if t.moment_dtype not in MOMENT_BYTES:
        raise _err(f"train.moment_dtype {t.moment_dtype!r}: use one of {', '.join(MOMENT_BYTES)}")
    if stage == "rejection" and p.pp != 1:
        raise _err(f"parallel.pp = {p.pp}: rejection sampling runs with parallel.pp = 1 (posttrain.stage.PIPELINED)")
    if stage in ("grpo", "rejection") and r.compile and (n_gpus > 1 or (stage == "rejection" and t.dtype != "fp32")):
        fp32 = stage == "rejection"   # rejection sampling compiles the policy itself: no FSDP2, so no compute dtype
        raise _err("rollout.compile runs the rollout's steps through torch.compile in one process"
                   + (" with train.dtype=fp32 for rejection sampling (it compiles the policy itself)" if fp32 else "")
                   + f" (here {n_gpus} GPU(s), train.dtype={t.dtype}); plan it with --gpus 1"
                   + (" and train.dtype=fp32" if fp32 else "") + ", or set rollout.compile=false")
    cluster = P.Cluster(gpu, n_gpus, gpus_per_node or p.node_size)
    model_cfg = cfg.model_config()
    notes: list[str] = []
    if p.tp > 1 and not p.sp and stage != "rejection":
        notes.append("parallel.sp = false: activations are counted as the planner counts them, under sequence "
                     "parallelism (set parallel.sp=true for that to hold)")

    # -- rows: what one training micro-batch holds -------------------------------------------------------
    prompt = new = 0
    if stage in ("grpo", "rejection"):
        prompt, new = _prompt_tokens(cfg, stage, prompt_tokens, model_cfg), r.max_new_tokens
    if stage == "grpo":
        seq = cfg.data.seq_len if p.pp > 1 else prompt + new   # pp > 1: rows padded to data.seq_len
        items, key, rows = g.prompts_per_step * g.group_size, "grpo.prompts_per_step x grpo.group_size", 1
    elif stage == "rejection":
        seq, items, key, rows = prompt + new, None, "", 1      # no training: only the generation terms count
    else:
        seq, items, key = cfg.data.seq_len, t.global_batch_size, "train.global_batch_size"
        rows = 2 if stage == "dpo" else 1                      # a DPO item is a pair: chosen and rejected rows
    net = build_model(model_cfg, device="meta")
    lay, batch, split, dims = _layout(cfg, net, n_gpus, rows, items, key, seq)
    if stage == "grpo" and g.prompts_per_step % dims.dp:
        raise _err(f"grpo.prompts_per_step = {g.prompts_per_step} must be a multiple of the data-parallel size "
                   f"{dims.dp}")

    # -- the policy: the planner's training terms ----------------------------------------------------------
    shape = P.model_shape(net, seq)
    try:
        P.check_layout(shape, cluster, lay, batch)
    except P.PlanError as err:
        raise _err(f"parallel: {err}") from None
    cache: dict = {}
    ev = P.evaluate(shape, cluster, lay, batch, cache=cache, layer_split=split or None)
    mem = {k: v * P.GB for k, v in ev.memory.items() if k != "rank"}
    rk = ev.memory["rank"]
    pl = P._placement(shape, lay.schedule, lay.pp, lay.vpp, cluster.spec.peak, lay.precision, cache, split or None)
    shards = _shards(pl, lay.tp, lay.ep, lay.dp)
    planned_md = "bf16" if lay.precision == "fp8" else "fp32"  # the moments planner.evaluate assumes
    planned = state_bytes(shards[rk], planned_md)
    # FSDP2's gathered bf16 units (in use + prefetched) and their fp32 gradients: the planner's ZeRO-3 terms
    gathered = mem["weights"] + mem["grads"] - planned["weights"] - planned["grads"]
    if stage == "rejection":   # a frozen policy that generates: its shard, its gathered units, the cache
        parts = {"policy_weights": FROZEN_BYTES * shards[0],
                 "kv_cache": _cache(cfg, model_cfg, prompt + new, cfg.rejection.batch_prompts * cfg.rejection.samples),
                 "rollout_gathered": mem["weights"] - planned["weights"]}
        total = sum(parts.values())
        here = f"tp{lay.tp} ep{lay.ep} dp{lay.dp} pp1"
        return PosttrainMemory(stage, cluster.gpu, n_gpus, cluster.spec.hbm_gb * P.GB,
                               f"none (a frozen policy, {here})", f"{here} (the policy itself)", 0, parts, total,
                               total, notes)
    state = state_bytes(shards[rk], t.moment_dtype)           # fp32 master, fp32 gradient, AdamW moments
    parts = {"policy_weights": state["weights"], "policy_grads": state["grads"],
             "policy_optimizer": state["optimizer"], "policy_gathered": gathered}
    if lay.pp > 1 and lay.dp > 1 and _splits_backward(lay.schedule):
        # split-backward schedules run FSDP2 with parallel.zero 2: the rank's stages stay gathered (bf16)
        parts["policy_gathered"] += 2 * _gathered(pl, rk, lay.tp, lay.ep)
        notes.append(f"{lay.schedule} splits backward, so FSDP2 keeps every stage of a rank gathered (zero 2)")
    parts["activations"] = mem["activations"]                 # the chunks in flight (the schedule's row)
    parts["logits_and_working"] = mem["logits_and_working"]   # fp32 logits per head call; the recomputed block

    # -- frozen copies and the rollout engine ------------------------------------------------------------
    # per pp rank: the policy's state and, below, its reference (the rank's own shard)
    held = [sum(state_bytes(s, t.moment_dtype).values()) for s in shards]
    if stage == "dpo" or (stage == "grpo" and g.beta > 0):
        parts["reference"] = FROZEN_BYTES * shards[rk]        # the policy's shard, frozen: weights only
        held = [h + FROZEN_BYTES * s for h, s in zip(held, shards)]
    rollout_label, rollout_working = "", 0.0
    if stage == "grpo":
        rtp, rep = r.tp or p.tp, r.ep or p.ep
        # rollout.compile (one process) generates with a plain copy, without FSDP2, when the policy carries a
        # compute dtype (FSDP2 then wraps it, and its hooks do not trace): the whole model in bf16, nothing gathered
        plain = r.compile and t.dtype == "bf16"
        copy = p.pp > 1 or (rtp, rep) != (p.tp, p.ep) or plain
        gdp, gen = _rollout(cfg, n_gpus, rtp, rep, copy, shape, cluster, dims, notes)
        if plain:
            gen["gathered"] = 0.0
        whose = " (a plain copy, compiled)" if plain else "" if copy else " (the policy itself)"
        rollout_label = f"tp{rtp} ep{rep} dp{gdp} pp1{whose}"
        # the rollout copy is held in train.dtype (posttrain/grpo.py: it only generates), and so are its pages
        element = (2 if t.dtype == "bf16" else PARAM_BYTES) if copy else CACHE_BYTES
        if copy:
            parts["rollout_copy"] = element * gen["shard"]   # every weight once more, sharded over all ranks
            parts["refit_buffers"] = REFIT_BUFFERS
        tokens = prompt + max(new, e.max_new_tokens if e.every else 0)
        parts["kv_cache"] = _cache(cfg, model_cfg, tokens, g.prompts_per_step * g.group_size // gdp, element)
        # generation gathers the copy's units, or the policy's own (its gradients' share is not needed then)
        rollout_working = gen["gathered"] if copy else mem["weights"] - planned["weights"]
        parts["rollout_gathered"] = rollout_working
    working = ("policy_gathered", "activations", "logits_and_working", "rollout_gathered")
    static = sum(v for k, v in parts.items() if k not in working)
    train_working = parts["policy_gathered"] + parts["activations"] + parts["logits_and_working"]
    total = static + max(train_working, rollout_working)      # the update and generation do not overlap
    # any pp rank r: its training working set is at most the planner's peak (rk's total) less its planned state,
    # the rest (rollout copy, cache, buffers) is the same on every rank
    shared = static - held[rk]
    peak = mem["total"]
    bound = max(h + shared + max(peak - sum(state_bytes(s, planned_md).values()), rollout_working)
                for h, s in zip(held, shards))
    return PosttrainMemory(stage, cluster.gpu, n_gpus, cluster.spec.hbm_gb * P.GB, lay.label(), rollout_label, rk,
                           parts, total, max(bound, total), notes)


def _splits_backward(schedule: str) -> bool:
    from parallel.pp_schedules import SCHEDULES
    return schedule in SCHEDULES and SCHEDULES[schedule].splits_backward


def _rollout(cfg, n: int, rtp: int, rep: int, copy: bool, shape, cluster, dims, notes):
    """(rollout dp, {"shard": elements of the rollout copy per rank, "gathered": bytes of its FSDP2 units while
    generating}) after the runtime's checks of the rollout layout (grpo._rollout_layout), each naming its key."""
    from parallel.mesh import LayoutError, ParallelConfig, ParallelDims

    mc, g, e = shape.cfg, cfg.grpo, cfg.eval
    what = f"the rollout layout rollout.tp = {rtp}, rollout.ep = {rep}"
    if n % rtp:
        raise _err(f"{what}: rollout.tp = {rtp} does not divide the {n} GPUs")
    if mc.n_heads % rtp:
        raise _err(f"{what}: rollout.tp = {rtp} does not divide the {mc.n_heads} attention heads")
    if mc.n_routed_experts and mc.n_routed_experts % rep:
        raise _err(f"{what}: rollout.ep = {rep} does not divide the {mc.n_routed_experts} routed experts")
    gdp = n // rtp
    try:
        ParallelDims.from_config(ParallelConfig(tp=rtp, ep=rep, dp=gdp, node_size=cfg.parallel.node_size), n)
    except LayoutError as err:
        raise _err(f"{what} (dp = {gdp}): {err}".replace("parallel.tp", "rollout.tp").replace("parallel.ep",
                                                                                              "rollout.ep")) from None
    n_eval = (e.prompts // dims.dp * dims.dp) * e.samples if e.every else 0   # assuming the file holds eval.prompts
    for count, key in ((g.prompts_per_step * g.group_size, "grpo.prompts_per_step x grpo.group_size"),
                       (n_eval, "eval.prompts x eval.samples")):
        if count % gdp:
            raise _err(f"{key} = {count} sequences must split evenly over the rollout layout's {gdp} data-parallel "
                       f"ranks ({what})")
    per_rank = g.prompts_per_step * g.group_size // gdp
    if cfg.rollout.max_batch > per_rank and cfg.rollout.engine == "paged":
        notes.append(f"rollout.max_batch = {cfg.rollout.max_batch} > the {per_rank} sequences a rollout rank "
                     f"decodes: the engine sizes its pool for max_batch all the same")
    lay = P.Layout(tp=rtp, pp=1, ep=rep, dp=gdp, zero=3, recompute="none", micro_batch=1)
    if not copy:
        return gdp, {"shard": 0.0, "gathered": 0.0}
    # the copy's FSDP2 shard, and its gathered units while generating: the planner's ZeRO-3 weights term at pp = 1
    cache: dict = {}
    ev = P.evaluate(shape, cluster, lay, gdp, cache=cache)
    pl = P._placement(shape, "-", 1, 1, cluster.spec.peak, "bf16", cache)
    shard = _shards(pl, rtp, rep, gdp)[0]
    gathered = ev.memory["weights"] * P.GB - state_bytes(shard)["weights"]
    return gdp, {"shard": shard, "gathered": gathered}


def stage_of(path: str) -> str:
    """The stage a post-training YAML configures, from its sections: grpo, dpo, rejection, else sft."""
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    for name in ("grpo", "dpo", "rejection"):
        if name in raw:
            return name
    return "sft"


def report(m: PosttrainMemory) -> str:
    """The per-component table of the reported rank, in GiB."""
    lines = [f"{m.stage} on {m.n_gpus} x {m.gpu}: training {m.training}"
             + (f"; rollout {m.rollout}" if m.rollout else ""),
             f"memory on pp rank {m.rank} (GiB):"]
    width = max(len(k) for k in m.parts)
    for k, v in m.parts.items():
        lines.append(f"  {k:<{width}} {v / GIB:8.2f}")
    lines.append(f"  {'total':<{width}} {m.total / GIB:8.2f}  (the larger phase: update or generation)")
    if m.bound > m.total:
        lines.append(f"  {'any pp rank <=':<{width}} {m.bound / GIB:8.2f}")
    lines.append(f"  {'capacity':<{width}} {m.capacity / GIB:8.2f}  ({m.gpu}: {m.capacity / P.GB:g} GB)")
    lines.append(f"fits: {'yes' if m.fits else 'no'}")
    lines += [f"note: {n}" for n in m.notes]
    return "\n".join(lines)
