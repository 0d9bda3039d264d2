"""The cluster planner: for a model, a GPU count and kind, the links between them and a batch, which
layouts (tp, pp, ep, dp, pipeline schedule, ZeRO stage, recomputation, precision) fit in memory, and
how fast each would train: step time, tokens/s and TFLOP/s per GPU, MFU, GPU-hours per trillion tokens.

    net = build_model(preset("deepseek-v3"), device="meta")       # allocates nothing
    shape = model_shape(net, seq_len=4096)
    plans = plan(shape, Cluster("H800", 2048), global_batch=15360, precision="fp8")
    best = plans[0]; best.tokens_per_s_per_gpu, best.memory["total"], best.time["step"]

`python -m launch.plan` is the command line. docs/planner.md gives every term with its formula and
source, the constants, and the published runs the model is checked against.

The model is read from outside, as parallel/ reads it: forward FLOPs per token of each layer from
`model.stage_costs(seq_len)` (what pipeline stages are cut by and pretrain.metrics' MFU counts),
parameter counts from the parameters (routed experts are the modules whose class declares
`ep_params`, as expert parallelism finds them), selectively recomputed submodules from the block
class's `recompute_selective`, activation shapes from its ModelConfig. The GPU table is hardware.py's.
Communication volumes come from cost.py, the formulas the runtime's byte accounting is tested
against; bubbles and activations in flight from the schedule table's rows (parallel/pp_schedules.py,
DeepSeek-V3 Table 2).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from model.config import ModelConfig
from parallel.mesh import LayoutError, ParallelConfig, ParallelDims
from parallel.pipeline import split_layers
from parallel.pp_schedules import (ALL_SCHEDULES, SCHEDULES, check_microbatches, chunks_per_rank,
                                   dualpipev_paired_share, stage_to_rank)

from . import cost
from .memory import MOMENT_BYTES, state_bytes
from .hardware import GPU, GPUS, PEAK_FLOPS  # noqa: F401  (PEAK_FLOPS: handed on, one table)

GB = 1e9


# -- efficiency constants: one set for every GPU, model and layout; docs/planner.md grounds each -----
GEMM_EFF = {"bf16": 0.80, "fp8": 0.55}  # of the peak: measured on H100 (benchmarks/results/fp8_gemm_h100.json)
ATTN_EFF = 0.50          # flash attention forward + backward, of the bf16 peak (assumed)
# NON_GEMM: all else (norms, SwiGLU, RoPE, casts, launches) per GEMM+attention second: Megatron's dense H100 run
NON_GEMM = 0.25
MOE_OVERHEAD = 0.57      # extra in MoE blocks (router, permutes, grouped GEMMs, syncs): Megatron's DeepSeek-V3 H100 run
COMM_SMS = 20            # SMs the all-to-all kernels hold while they overlap compute (V3 §3.2.2)
# Which expert all-to-all overlap a plan assumes (evaluate's ep_overlap):
#   runtime   what whaletron runs (parallel.overlap=ep, tp = 1 where experts are dispatched, cp = 1): at pp = 1
#             micro-batch pairing leaves EP_EXPOSED_RUNTIME of the all-to-all time exposed; under DualPipeV the
#             F&B pairs leave EP_EXPOSED_PAIRED of theirs, the lone warm-up forwards and cool-down backwards
#             EP_EXPOSED_ALONE, weighted by the share of chunks torch's order pairs (dualpipev_paired_share);
#             other pp schedules overlap nothing
#   dualpipe  DeepSeek's runtime (V3 §3.2.1-3.2.2): DualPipe's F&B pairs hide the all-to-all completely at pp > 1
#             (what the 180K GPU-hours calibration assumes; Megatron's EP overlap likewise)
#   none      no overlap
EP_OVERLAP = ("runtime", "dualpipe", "none")
EP_EXPOSED_RUNTIME = 0.15   # measured: benchmarks/overlap.py, 12-13% (ep2) and 14-15% (ep4) over three runs
EP_EXPOSED_PAIRED = 0.15    # measured: results/overlap_cpu.json, ep2_pp2's traced step, all-to-alls inside F&B pairs
EP_EXPOSED_ALONE = 0.30     # measured: the same, those of lone forwards / backwards (in token halves); W deferred
# BW_EFF: achieved / given bandwidth: the defaults are achieved rates (DeepEP: 153-158 of 160, 50-51 of 50)
BW_EFF = 1.0
FP8_BYTES = 1 + 4 / 128  # an FP8 element with its fp32 scale per 1x128 tile (V3 §3.3.2)
E5M6_BYTES = 1.5         # V3 §3.3.3: the attention output (input of the output projection) is cached in E5M6
# context parallelism is searched only while each rank keeps at least this many tokens of a sequence (assumed:
# below it the exchange's latency and small attention tiles dominate; every 4K layout stays cp = 1)
CP_MIN_TOKENS = 4096

PRECISIONS = ("bf16", "fp8")
RECOMPUTE = ("none", "selective", "full")
ZERO = (1, 3)
# every runtime schedule, plus DeepSeek's original two-copy DualPipe (V3 §3.2.1): planned, not runnable
SCHEDULE_NAMES = tuple(ALL_SCHEDULES)


class PlanError(ValueError):
    """Input the planner cannot work with; the message names the problem and the fix."""


# -- the model, read from outside --------------------------------------------------------------------
@dataclass
class Part:
    """What one pipeline item (the embedding, a block, the head, an MTP module) costs per token.

    flops_*: forward FLOPs per token. lin: GEMMs in the training precision; hp: GEMMs kept in high
    precision (the output head, V3 §3.3.1); attn: attention scores and values (bf16); rc: the GEMMs
    selective recomputation runs again. params / expert_params: all parameters / the routed experts'."""
    kind: str                 # "embed" | "block" | "head" | "mtp"
    layer: int                # global block index (MTP blocks follow the main ones); -1 otherwise
    flops_lin: float = 0.0
    flops_hp: float = 0.0
    flops_attn: float = 0.0
    flops_rc: float = 0.0
    params: int = 0
    expert_params: int = 0
    moe: bool = False

    @property
    def flops(self) -> float:
        return self.flops_lin + self.flops_hp + self.flops_attn


@dataclass
class ModelShape:
    cfg: ModelConfig
    seq_len: int
    pre: Part                 # on the first stage
    layers: list[Part]
    post: list[Part]          # on the last stage: the head, then the MTP modules

    @property
    def train_flops_per_token(self) -> float:
        """3 x forward FLOPs: pretrain.metrics.train_flops_per_token's convention and number."""
        return 3.0 * sum(p.flops for p in [self.pre, *self.layers, *self.post])


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


# model hooks read here (ep_count, ep_params, recompute_selective, stage_costs, layers, ...): parallel/protocols.py
def _expert_params(module) -> int:
    return sum(sum(getattr(m, n).numel() for n in type(m).ep_params)
               for m in module.modules() if getattr(type(m), "ep_count", None))


def model_shape(model, seq_len: int) -> ModelShape:
    """Read a model (on the meta device) into per-item FLOPs and parameter counts."""
    cfg = model.cfg
    pre_cost, layer_costs, post_cost = model.stage_costs(seq_len)
    share = cfg.n_activated_experts / cfg.n_routed_experts if cfg.n_routed_experts else 0.0

    def block_part(block, fwd: float, layer: int, extra: float = 0.0) -> Part:
        total, experts = _numel(block), _expert_params(block)
        lin = 2.0 * (total - experts + experts * share)           # 2 FLOPs per active weight
        mods = dict(block.named_modules())
        rc = 2.0 * sum(_numel(mods[n]) for n in getattr(type(block), "recompute_selective", ()) or () if n in mods)
        return Part("block", layer, flops_lin=lin + extra, flops_attn=fwd - lin, flops_rc=rc,
                    params=total, expert_params=experts, moe=bool(experts))

    layers = [block_part(b, c, i) for (i, b), c in zip(enumerate(model.layers.values()), layer_costs)]
    head = 2.0 * model.head.weight.numel()
    post = [Part("head", -1, flops_hp=head, params=_numel(model.head) + _numel(model.norm))]
    for k, m in enumerate(model.mtp):
        fwd = (post_cost - head) / len(model.mtp) - head          # the module without its head call
        rest = _numel(m) - _numel(m.block)                          # eh_proj (M_k) and the norms
        p = block_part(m.block, fwd - 2.0 * rest, cfg.n_layers + k, extra=2.0 * rest)
        post.append(dataclasses.replace(p, kind="mtp", flops_hp=head, params=_numel(m)))
    return ModelShape(cfg, seq_len, Part("embed", -1, flops_lin=pre_cost, params=_numel(model.embed)), layers, post)


# -- activations kept for backward, bytes per token before the split over tp -----------------------
def _lin(fp8: bool) -> float:
    return FP8_BYTES if fp8 else 2.0


def _attention_bytes(cfg: ModelConfig, recompute: str, fp8: bool) -> float:
    """One block's attention (Korthikanti et al. 2022's counting, for MLA and GQA): RMSNorm inputs,
    linear-layer inputs (FP8 under fp8, V3 §3.3.3), flash attention's q, k, v, output and log-sum-exp.
    selective recomputes every RMSNorm and MLA's up-projections (V3 §3.2.3): no norm outputs and no
    q, k, v are kept, only the latents they come from."""
    D, H = cfg.dim, cfg.n_heads
    mla = cfg.attention == "mla"
    out = (E5M6_BYTES if fp8 else 2.0) * H * (cfg.v_head_dim if mla else cfg.gqa_head_dim)
    lse = 4.0 * H
    if mla:
        ql, kl = cfg.q_lora_rank, cfg.kv_lora_rank
        norms = 2.0 * (D + ql + kl)
        if recompute == "selective":
            return norms + 2.0 * cfg.qk_rope_head_dim + out + lse          # + the roped shared key k^R
        qkv = 2.0 * H * (2 * cfg.qk_head_dim + cfg.v_head_dim)
        return norms + _lin(fp8) * (D + ql + kl) + qkv + out + lse        # wq_a/wkv_a, wq_b, wkv_b inputs
    qkv = 2.0 * cfg.gqa_head_dim * (H + 2 * cfg.kv_heads)
    return 2.0 * D + (0.0 if recompute == "selective" else _lin(fp8) * D) + qkv + out + lse


def _ffn_bytes(cfg: ModelConfig, moe: bool, recompute: str, fp8: bool) -> float:
    """One block's FFN. Dense SwiGLU: norm input and output, w1/w3 outputs, w2's input. MoE: the K
    dispatched copies of the token (w1/w3 input), per routed and shared expert the SwiGLU inputs and
    w2's input, router scores, and the K expert outputs the gate-weight gradient needs. fp8 follows V3
    §3.3.3: dispatched inputs and SwiGLU inputs cached in FP8, the SwiGLU output recomputed, no expert
    outputs kept (gate weights applied before w2)."""
    D = cfg.dim
    norm = 2.0 * D + (0.0 if recompute == "selective" else _lin(fp8) * D)
    if not moe:
        return norm + _lin(fp8) * 3 * cfg.inter_dim
    K, inter = cfg.n_activated_experts, cfg.moe_inter_dim
    experts = K + cfg.n_shared_experts
    router = 4.0 * 2 * cfg.n_routed_experts
    if fp8:
        return norm + router + FP8_BYTES * (K * D + experts * 2 * inter)
    return norm + router + 2.0 * (K * D + experts * 3 * inter + K * D)


def part_activation_bytes(cfg: ModelConfig, part: Part, recompute: str, fp8: bool) -> float:
    """Bytes per token one micro-batch keeps for backward in `part`. Under full recomputation a block
    keeps only its input (its working set comes back one block at a time)."""
    D = cfg.dim
    if part.kind == "embed":
        return 0.0
    if part.kind == "head":
        return 4.0 * D                                   # final norm input, head input (bf16)
    if recompute == "full":
        block = 2.0 * D
    else:
        block = _attention_bytes(cfg, recompute, fp8) + _ffn_bytes(cfg, part.moe, recompute, fp8)
    if part.kind == "mtp":   # V3 eq. 21: the two norms' inputs, M_k's input, the norm and head inputs
        return block + 4.0 * D + _lin(fp8) * 2 * D + 4.0 * D
    return block


def cp_up_flops(cfg: ModelConfig, part: Part) -> float:
    """Forward FLOPs per token of MLA's key/value up-projection (W^UK, W^UV: V2 §2.1.2 eq. 10-11) in an
    attention part: under cp every rank also runs it on the other ranks' gathered latents, (cp - 1) x its
    own tokens. 0 for GQA (keys and values arrive projected) and for parts without attention."""
    if cfg.attention != "mla" or part.kind not in ("block", "mtp"):
        return 0.0
    return 2.0 * cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)


def cp_remote_bytes(cfg: ModelConfig, part: Part, recompute: str, cp: int, remote_tokens: float, tp: int) -> float:
    """Bytes one attention part keeps for backward, per rank, for the `remote_tokens` of the sequence that the
    other cp ranks hold ((cp - 1)/cp of it): what context parallelism adds to part_activation_bytes's local
    tokens. MLA: the gathered latent c^KV + k^R in bf16 (V2 §2.1.2-2.1.3: the input selective recomputation
    re-runs the up-projections from, V3 §3.2.3), and without recomputation also the up-projected keys and
    values of this tp rank's heads, H/tp x (d_qk + d_v) per token, which flash attention saves. GQA: the
    gathered key and value heads. Full recomputation keeps only the block's (local) input."""
    if cp == 1 or part.kind not in ("block", "mtp") or recompute == "full":
        return 0.0
    if cfg.attention == "mla":
        per = 2.0 * cost.cp_kv_width(cfg, tp)
        if recompute == "none":
            per += 2.0 * cost.cp_kv_width(cfg, tp, per_head=True)
        return per * remote_tokens
    return 2.0 * cost.cp_kv_width(cfg, tp) * remote_tokens


def cp_working_bytes(cfg: ModelConfig, recompute: str, cp: int, seq_tokens: float, tp: int) -> float:
    """The working set of one MLA layer's backward under cp: the gradients of the up-projected keys and values
    of the whole sequence for this tp rank's heads, in bf16, and under selective recomputation (V3 §3.2.3)
    the keys and values themselves, rebuilt from the gathered latent (without recomputation they are kept,
    cp_remote_bytes; under full recomputation they are the recomputed block's working set). Counted at
    cp > 1 only: the planner's cp = 1 terms (calibrated at 4K) leave transient working sets out
    (docs/planner.md, "Context parallelism")."""
    if cp == 1 or cfg.attention != "mla":
        return 0.0
    return (2 if recompute == "selective" else 1) * 2.0 * cost.cp_kv_width(cfg, tp, per_head=True) * seq_tokens


# -- the cluster and the layout -----------------------------------------------------------------------
@dataclass
class Cluster:
    gpu: str
    n_gpus: int
    gpus_per_node: int = 8
    nvlink_gbps: float | None = None   # None: the GPU's default
    ib_gbps: float | None = None

    def __post_init__(self):
        key = str(self.gpu).upper()
        if key not in GPUS:
            raise PlanError(f"unknown GPU {self.gpu!r}: use one of {', '.join(GPUS)} (--gpu)")
        self.gpu = key
        if self.n_gpus < 1 or self.gpus_per_node < 1:
            raise PlanError(f"--gpus and --gpus-per-node must be >= 1, got {self.n_gpus} and {self.gpus_per_node}")
        if self.n_gpus > self.gpus_per_node and self.n_gpus % self.gpus_per_node:
            raise PlanError(f"{self.n_gpus} GPUs are not whole nodes of {self.gpus_per_node}: use a multiple of "
                            f"{self.gpus_per_node} (or set --gpus-per-node)")
        spec = GPUS[key]
        self.nvlink_gbps = spec.nvlink_gbps if self.nvlink_gbps is None else self.nvlink_gbps
        self.ib_gbps = spec.ib_gbps if self.ib_gbps is None else self.ib_gbps
        if self.nvlink_gbps <= 0 or self.ib_gbps <= 0:
            raise PlanError(f"--nvlink-gbps and --ib-gbps must be positive, got {self.nvlink_gbps} and {self.ib_gbps}")

    @property
    def spec(self) -> GPU:
        return GPUS[self.gpu]


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    vpp: int = 1                  # stages per rank: interleaved_1f1b's setting; 2 under zbv / dualpipev
    schedule: str = "-"           # "-": no pipeline (pp = 1)
    zero: int = 1                 # 1: optimizer states sharded over dp (ZeRO-1); 3: FSDP
    recompute: str = "none"
    precision: str = "bf16"
    micro_batch: int = 1
    cp: int = 1                   # context parallel: each sequence split over cp ranks (parallel.cp)

    def label(self) -> str:
        sched = self.schedule + (f" vpp{self.vpp}" if self.schedule == "interleaved_1f1b" else "")
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        return (f"tp{self.tp}{cp} pp{self.pp} ep{self.ep} dp{self.dp} {sched} zero{self.zero} "
                f"rc={self.recompute} mb{self.micro_batch} {self.precision}")


@dataclass
class Plan:
    layout: Layout
    fits: bool
    memory: dict            # GB on the rank that needs most, by term, and which rank
    time: dict              # seconds per step, by term
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float   # model FLOPs (pretrain.metrics' count), not hardware FLOPs
    mfu: float              # over the bf16 peak (Megatron's convention, also for FP8 runs)
    mfu_fp8_peak: float | None
    gpu_hours_per_trillion_tokens: float
    n_microbatches: int
    layer_split: list = field(default_factory=list)   # layers per stage: build_pipeline(layer_split=...)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["memory_gb"] = self.memory["total"]
        return d


# -- pipeline placement ------------------------------------------------------------------------------
@dataclass
class _Placement:
    edges: list                # first layer of each stage, then the layer count
    stage_parts: list          # parts per stage
    slot_parts: list           # parts per rank
    copies: int                # DualPipe's two model copies: a micro-batch runs one of a device's stages
    stages_per_rank: int


def _stages_and_slots(schedule: str, pp: int, vpp: int) -> tuple[int, list[int], int]:
    """(stages, the rank of each stage, model copies). DualPipe (V3 §3.2.1) keeps two copies of a
    PP-stage split: device i holds stage i of one and stage PP-1-i of the other; devices i and PP-1-i
    hold the same two stages, so one rank index stands for both."""
    if pp == 1:
        return 1, [0], 1
    if schedule == "dualpipe":
        return pp, stage_to_rank("dualpipev", pp // 2), 2
    return pp * chunks_per_rank(schedule, vpp), stage_to_rank(schedule, pp, vpp), 1


def balance_stages(costs: tuple[float, list[float], float], n: int, ranks: list[int]) -> list[int]:
    """Stage edges (n + 1 layer indices) balancing what each *rank* computes. Starts from the runtime's
    cut (pipeline.split_layers, which balances stages) and, while the largest rank load (then the sum
    of squares) drops, moves one boundary, or hands one layer between a stage of the busiest rank and
    any other stage (the boundaries between them shift by one; the stages between keep their counts):
    in the V layouts the first and the last stage share a rank, and in the interleaved ones a rank's
    stages are pp apart, so the best cut per stage can leave one rank far behind."""
    pre, layer, post = costs
    L = len(layer)
    if n == 1:
        return [0, L]
    edges = [0]
    for s in split_layers(costs, n):
        edges.append(edges[-1] + len(s))
    prefix = [0.0]
    for c in layer:
        prefix.append(prefix[-1] + c)
    n_ranks = max(ranks) + 1

    def loads(e):
        ld = [0.0] * n_ranks
        for s in range(n):
            ld[ranks[s]] += prefix[e[s + 1]] - prefix[e[s]] + (pre if s == 0 else 0.0) + (post if s == n - 1 else 0.0)
        return ld

    def score(e):
        ld = loads(e)
        return round(max(ld), 9), sum(x * x for x in ld)

    def valid(e):
        return all(e[s] <= e[s + 1] for s in range(n)) and all(e[s + 1] > e[s] for s in range(1, n - 1))

    best = score(edges)
    while True:
        ld = loads(edges)
        busiest = max(range(n_ranks), key=ld.__getitem__)
        moves = [(k, k + 1) for k in range(1, n)]                  # one boundary
        mine = [s for s in range(n) if ranks[s] == busiest]
        moves += [(min(a, b) + 1, max(a, b) + 1) for a in mine for b in range(n) if b != a and abs(a - b) > 1]
        cand = None
        for lo, hi in moves:                                        # shift boundaries lo..hi-1
            for d in (-1, 1):
                e = list(edges)
                for k in range(lo, hi):
                    e[k] += d
                if not valid(e):
                    continue
                sc = score(e)
                if sc < best and (cand is None or sc < cand[0]):
                    cand = (sc, e)
        if cand is None:
            return edges
        best, edges = cand


def part_seconds(part: Part, peak: dict, precision: str) -> float:
    """Forward + backward compute seconds per token of one part on one GPU (no communication, no
    recomputation): what the stage balance equalises."""
    over = 1.0 + NON_GEMM + (MOE_OVERHEAD if part.moe else 0.0)
    gemm = part.flops_lin / (peak[precision] * GEMM_EFF[precision]) + part.flops_hp / (peak["bf16"] * GEMM_EFF["bf16"])
    return over * 3.0 * (gemm + part.flops_attn / (peak["bf16"] * ATTN_EFF))


def _placement(shape: ModelShape, schedule: str, pp: int, vpp: int, peak: dict, precision: str,
               cache: dict, layer_split: list[int] | None = None) -> _Placement:
    key = ("placement", schedule, pp, vpp, precision, tuple(layer_split or ()))
    if key in cache:
        return cache[key]
    n, ranks, copies = _stages_and_slots(schedule, pp, vpp)
    if layer_split:
        L = len(shape.layers)
        if len(layer_split) != n or sum(layer_split) != L or min(layer_split) < 0 or \
                any(c == 0 for c in layer_split[1:-1]):
            raise PlanError(f"layer split {layer_split}: give {n} stages holding the {L} layers in order, every "
                            f"middle stage at least one")
        edges = [0]
        for c in layer_split:
            edges.append(edges[-1] + c)
    else:
        sec = lambda p: part_seconds(p, peak, precision)  # noqa: E731
        edges = balance_stages((sec(shape.pre), [sec(p) for p in shape.layers], sum(sec(p) for p in shape.post)),
                               n, ranks)
    stage_parts = []
    for s in range(n):
        parts = list(shape.layers[edges[s]:edges[s + 1]])
        if s == 0:
            parts.insert(0, shape.pre)
        if s == n - 1:
            parts.extend(shape.post)
            if n > 1 and ranks[-1] != ranks[0] and any(p.kind == "mtp" for p in shape.post):
                # MTP needs the embedding on the last stage: a copy (pipeline.py), unless that stage
                # shares the first one's rank (V layouts: V3 §3.2.3's physical sharing)
                parts.append(Part("embed", -1, params=shape.pre.params))
        stage_parts.append(parts)
    slot_parts = [[] for _ in range(max(ranks) + 1)]
    for s in range(n):
        slot_parts[ranks[s]].extend(stage_parts[s])
    cache[key] = _Placement(edges, stage_parts, slot_parts, copies, n // len(slot_parts))
    return cache[key]


def in_flight(schedule: str, pp: int, m: int, vpp: int, rank: int) -> int:
    """Micro-batch chunk activations held at the peak on `rank`, in units of one chunk's activation
    for one micro-batch: the schedule's row of parallel/pp_schedules.py (V3 Table 2 for 1F1B, ZB1P and
    DualPipe; checked against torch's real op order by tests/test_pp_schedules.py)."""
    if pp == 1:
        return 1
    if schedule not in ALL_SCHEDULES:
        raise PlanError(f"unknown pipeline schedule {schedule!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    return ALL_SCHEDULES[schedule].in_flight(pp, m, vpp, rank)


def bubble(schedule: str, pp: int, F: float, B: float, W: float, FB: float) -> float:
    """Idle time per device and step from one chunk's forward F, full backward B, its weight-gradient
    part W and an overlapped forward + backward pair F&B (a chunk: one micro-batch on one stage): the
    schedule's row of parallel/pp_schedules.py (V3 Table 2 for 1F1B, ZB1P and DualPipe), never negative."""
    if pp == 1:
        return 0.0
    if schedule not in ALL_SCHEDULES:
        raise PlanError(f"unknown pipeline schedule {schedule!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    return max(0.0, ALL_SCHEDULES[schedule].bubble(pp, F, B, W, FB))


# -- communication, from cost.py ---------------------------------------------------------------------
def tp_bytes(shape: ModelShape, parts: list[Part], tp: int, micro_batch: int, e: int = 2,
             seq: int | None = None) -> Counter:
    """cost.py's tp collectives (sequence parallel) of `parts` for one micro-batch, forward + backward.
    seq: the tokens of a sequence this rank holds (shape.seq_len / cp under context parallelism)."""
    out: Counter = Counter()
    if tp == 1:
        return out
    seq = shape.seq_len if seq is None else seq
    for p in parts:
        if p.kind in ("block", "mtp"):
            cost.tp_layer_step(out, shape.cfg, p.layer, tp, True, micro_batch, seq, e)
        if p.kind in ("head", "mtp"):
            cost.tp_head_step(out, shape.cfg, True, micro_batch, seq, e)
    return out


def cp_bytes(shape: ModelShape, parts: list[Part], cp: int, tp: int, micro_batch: int, e: int = 2) -> Counter:
    """cost.py's context-parallel exchanges of `parts` for one micro-batch, forward + backward: one per
    attention part (cost.cp_layer_step), in bf16 (attention stays in high precision under FP8, V3 §3.3.1)."""
    out: Counter = Counter()
    for p in parts:
        if p.kind in ("block", "mtp"):
            cost.cp_layer_step(out, shape.cfg, cp, micro_batch, shape.seq_len, e, tp)
    return out


def ep_bytes(cfg: ModelConfig, tokens: float, ep: int, node_size: int, fp8: bool) -> dict[str, float]:
    """Bytes one GPU sends over IB ("inter") and NVLink ("intra") for one MoE layer, forward + backward,
    for `tokens` of its own: cost.expected_dispatch_rows x cost.token_payload_bytes (FP8 dispatch and
    BF16 combine under fp8, V3 §3.3.3)."""
    rows = cost.expected_dispatch_rows(cfg.n_routed_experts, cfg.n_activated_experts, ep, node_size,
                                       cfg.topk_nodes, cfg.topk_devices)
    e, e_c = (FP8_BYTES, 2.0) if fp8 else (2.0, 2.0)
    return {lvl: cost.token_payload_bytes(tokens * rows[lvl], tokens * rows[lvl], cfg.dim, e, e_c)
            for lvl in ("inter", "intra")}


def _link(cluster: Cluster, stride: int, group: int) -> float:
    """Bandwidth (B/s) for `group` ranks `stride` apart (rank = ((pp_i*dp + dp_i)*cp + cp_i)*tp + tp_i: mesh.py's
    order with cp between tp and dp, Megatron's tp-cp-dp-pp): NVLink when they all sit in one node, else IB."""
    inside = stride * group <= cluster.gpus_per_node
    return (cluster.nvlink_gbps if inside else cluster.ib_gbps) * GB * BW_EFF


# -- one layout --------------------------------------------------------------------------------------
def _overlap_exposed(mode: str, lay: "Layout", m: int) -> float | None:
    """The share of the expert all-to-all time a layout leaves exposed under `mode` (EP_OVERLAP) with m
    micro-batches per step, or None when nothing overlaps it."""
    if mode not in EP_OVERLAP:
        raise PlanError(f"ep_overlap {mode!r}: use one of {', '.join(EP_OVERLAP)}")
    if lay.ep == 1 or mode == "none":
        return None
    if mode == "dualpipe":
        return 0.0 if lay.pp > 1 and lay.schedule != "gpipe" else None
    if lay.tp > 1 or lay.cp > 1:
        return None
    if lay.pp == 1:
        return EP_EXPOSED_RUNTIME
    if lay.schedule != "dualpipev":
        return None
    paired = dualpipev_paired_share(lay.pp, m)
    return paired * EP_EXPOSED_PAIRED + (1 - paired) * EP_EXPOSED_ALONE


def evaluate(shape: ModelShape, cluster: Cluster, layout: Layout, global_batch: int, *, ep_overlap: str = "runtime",
             cache: dict | None = None, layer_split: list[int] | None = None) -> Plan:
    """Memory and step time of one layout (`check_layout` it first).

    Per micro-batch on every rank: compute (GEMMs at GEMM_EFF of their precision's peak, attention at
    ATTN_EFF of bf16's, each part raised by NON_GEMM and MoE blocks by MOE_OVERHEAD), expert all-to-all
    over IB and NVLink, tp collectives, FSDP's gathers. Where ep_overlap (EP_OVERLAP: what the runtime
    overlaps) hides it, the all-to-all runs under the compute, which loses COMM_SMS SMs, and only its exposed
    share adds to the time;
    FSDP's traffic always does (prefetch); tp collectives stay exposed. The slowest rank sets the
    pace: step = micro-batches x its time + the schedule's bubble + ZeRO-1's gradient reduce-scatter
    and parameter all-gather + the optimizer. Memory: the rank that needs most. layer_split: layers
    per stage (counts, in stage order) instead of the planner's rank-balanced cut.

    Context parallelism (cp > 1): each rank holds S/cp tokens of every sequence of a micro-batch (2·cp
    load-balanced chunks, so 1/cp of the causal attention work too); MLA ranks also up-project the others'
    gathered latents (cp_up_flops); each attention part exchanges cost.cp_layer_step's bytes over the cp
    group's link, exposed like tp's (the exchange sits before attention in forward and after it in
    backward; no overlap is assumed); dense parameters and optimizer state are sharded over dp x cp
    (FSDP2 over both), experts over edp = dp·cp·tp/ep; activations add cp_remote_bytes per attention part
    and one layer's cp_working_bytes."""
    cache = {} if cache is None else cache
    cfg, S, gpu, lay = shape.cfg, shape.seq_len, cluster.spec, layout
    tp, pp, ep, dp, mb, cp = lay.tp, lay.pp, lay.ep, lay.dp, lay.micro_batch, lay.cp
    edp = dp * cp * tp // ep
    fp8 = lay.precision == "fp8"
    m = global_batch // (dp * mb)                        # micro-batches per step through each pipeline
    tok = mb * S // cp                                   # tokens of one micro-batch on one cp rank
    remote = mb * S - tok                                # the other cp ranks' tokens of it
    peak = gpu.peak
    pl = _placement(shape, lay.schedule, pp, lay.vpp, peak, lay.precision, cache, layer_split)
    chunks = pl.stages_per_rank // pl.copies             # chunks one micro-batch passes on a rank
    r_lin = peak[lay.precision] * GEMM_EFF[lay.precision]
    r_hp = peak["bf16"] * GEMM_EFF["bf16"]
    r_attn = peak["bf16"] * ATTN_EFF
    nvl, ib = cluster.nvlink_gbps * GB * BW_EFF, cluster.ib_gbps * GB * BW_EFF
    exposed_share = _overlap_exposed(ep_overlap, lay, m)
    overlap = exposed_share is not None
    sm_share = 1.0 - COMM_SMS / gpu.sms if overlap else 1.0
    again = 1.5 if lay.recompute == "full" else 1.0    # full recompute replays the forward's collectives
    link_cp = _link(cluster, tp, cp)                     # cp ranks: tp apart
    epb = ep_bytes(cfg, tok / tp, ep, cluster.gpus_per_node, fp8)
    # V3 §3.2.2: IB sends and NVLink forwarding run at the same time; the busier link decides
    ep_layer = max(epb["inter"] / ib, epb["intra"] / nvl) if ep > cluster.gpus_per_node else epb["intra"] / nvl

    def part_times(p: Part) -> tuple[float, float, float, float, float]:
        """(forward, input-gradient, weight-gradient, tp collectives, cp exchange) seconds for one micro-batch."""
        g = tok / tp * (1.0 + NON_GEMM + (MOE_OVERHEAD if p.moe else 0.0))   # a GPU does 1/tp of it
        up = cp_up_flops(cfg, p) * (cp - 1)              # the others' latents, up-projected here (0 at cp 1)
        gemm = (p.flops_lin + up) / r_lin + p.flops_hp / r_hp
        attn = p.flops_attn / r_attn
        rc = 0.0
        if lay.recompute == "selective":
            rc = (p.flops_rc + up) / r_lin
        elif lay.recompute == "full" and p.kind in ("block", "mtp"):
            rc = (p.flops_lin + up) / r_lin + attn
        tp_s = sum(cost.wire_bytes(k, v, tp) for k, v in tp_bytes(shape, [p], tp, mb, seq=S // cp).items()) \
            / nvl * again
        cp_s = sum(cost.wire_bytes(k, v, cp) for k, v in cp_bytes(shape, [p], cp, tp, mb).items()) / link_cp * again
        # backward = an input-gradient and a weight-gradient GEMM per forward GEMM, 2x the attention
        return g * (gemm + attn), g * (gemm + 2 * attn + rc), g * gemm, tp_s, cp_s

    dense = [sum(p.params - p.expert_params for p in parts) / tp for parts in pl.slot_parts]
    experts = [sum(p.expert_params for p in parts) / ep for parts in pl.slot_parts]

    def dp_seconds(r: int, zero: int) -> float:
        """cost.fsdp_step's data-parallel traffic of rank r: ZeRO-1 reduce-scatters the fp32 gradients
        (V3 §3.3.3) and all-gathers the bf16 parameters once; FSDP gathers twice and reduce-scatters
        (per micro-batch). Dense parameters over dp (x cp: FSDP2's dp_cp group), routed experts over edp."""
        units = [("dp", dp * cp, dense[r] / (dp * cp)), ("edp", edp, experts[r] / edp)]   # FSDP2 over dp x cp
        links = {"dp": (_link(cluster, tp, dp * cp), dp * cp), "edp": (_link(cluster, ep, edp), edp)}
        total = 0.0
        for k, v in cost.fsdp_step(units, 2, 4, zero).items():
            op, group = k.split("/")
            total += cost.wire_bytes(op, v, links[group][1]) / links[group][0]
        return total

    per_rank = []
    for r, parts in enumerate(pl.slot_parts):
        w = 1.0 / pl.copies                               # DualPipe: each micro-batch runs one of two stages
        f = inp = wgt = tp_t = cp_t = 0.0
        for p in parts:
            pf, pi, pw, pt, pc = _cached(cache, ("times", id(p), cluster.gpu, cluster.nvlink_gbps, lay.precision,
                                                 lay.recompute, tp, mb, cp, link_cp),
                                         lambda p=p: part_times(p))
            f, inp, wgt, tp_t, cp_t = f + pf * w, inp + pi * w, wgt + pw * w, tp_t + pt * w, cp_t + pc * w
        ep_t = sum(p.moe for p in parts) * w * ep_layer * again
        compute = (f + inp + wgt) / sm_share
        ep_exposed = ep_t * exposed_share if overlap else ep_t
        hidden = (ep_t - ep_exposed) + (dp_seconds(r, 3) if lay.zero == 3 else 0.0)  # shared links
        pair = max(compute, hidden) + ep_exposed + tp_t + cp_t
        per_rank.append(dict(f=f, b=inp + wgt, w=wgt, compute=compute, ep=ep_t, ep_exposed=ep_exposed, tp=tp_t,
                             cp=cp_t, pair=pair))
    slow = max(range(len(per_rank)), key=lambda i: per_rank[i]["pair"])
    rk = per_rank[slow]
    exposed = rk["ep_exposed"] / 2 + rk["tp"] / 2 + rk["cp"] / 2   # per direction
    F, B, W, FB = (rk["f"] + exposed) / chunks, (rk["b"] + exposed) / chunks, rk["w"] / chunks, rk["pair"] / chunks
    p2p = cost.pipeline_p2p_bytes(tok, cfg.dim, tp, tp > 1, 2) / _link(cluster, dp * cp * tp, 2) if pp > 1 else 0.0
    t_bubble = bubble(lay.schedule, pp, F, B, W, FB) + 2 * (pp - 1) * p2p   # + the fill's and drain's sends
    t_dp = dp_seconds(slow, 1) if lay.zero == 1 else 0.0
    moment_dtype = "bf16" if fp8 else "fp32"           # V3 §3.3.3: BF16 AdamW moments in its FP8 recipe
    moments = 2 * MOMENT_BYTES[moment_dtype]
    shard = dense[slow] / (dp * cp) + experts[slow] / edp
    # AdamW reads gradient, master weight, moments, writes master, moments and the bf16 weight
    t_opt = shard * (4 + 4 + moments + 4 + moments + 2) / (gpu.hbm_tbps * 1e12)
    step = m * rk["pair"] + t_bubble + t_dp + t_opt

    mem = []
    for r, parts in enumerate(pl.slot_parts):
        shard_r = dense[r] / (dp * cp) + experts[r] / edp
        # the fp32 shard, its gradient and AdamW's moments: memory.state_bytes, launch.check's function
        st = state_bytes(shard_r, moment_dtype)
        if lay.zero == 3:   # FSDP2 as the runtime runs it, + the gathered bf16 unit in use and the prefetched
            unit = max(((p.params - p.expert_params) / tp + p.expert_params / ep for p in parts), default=0)
            weights, grads, opt = st["weights"] + 2 * 2 * unit, st["grads"] + 4 * unit, st["optimizer"]
        else:               # bf16 weights, fp32 gradients (V3 §3.3.3), both whole on every dp rank; the fp32
            whole = state_bytes(dense[r] + experts[r], moment_dtype, param_bytes=2)   # master sharded with the moments
            weights, grads, opt = whole["weights"], whole["grads"], st["weights"] + st["optimizer"]
        per_tok = sum(_cached(cache, ("act", id(p), lay.recompute, fp8),
                              lambda p=p: part_activation_bytes(cfg, p, lay.recompute, fp8)) for p in parts)
        act = in_flight(lay.schedule, pp, m, lay.vpp, r) * per_tok / pl.stages_per_rank * tok / tp
        blocks = [p for p in parts if p.kind in ("block", "mtp")]
        if cp > 1:   # the other cp ranks' keys, per attention part (V2 §2.1.2-2.1.3: the latent under MLA)
            act += in_flight(lay.schedule, pp, m, lay.vpp, r) * sum(
                cp_remote_bytes(cfg, p, lay.recompute, cp, remote, tp) for p in parts) / pl.stages_per_rank
        # fp32 logits of each head call (main + MTP) until the loss's backward
        extra = sum(p.kind in ("head", "mtp") for p in parts) * tok * cfg.vocab_size / tp * 4.0
        if lay.recompute == "full" and blocks:   # the block being recomputed holds its whole working set
            extra += max(part_activation_bytes(cfg, p, "none", fp8) * tok / tp
                         + cp_remote_bytes(cfg, p, "none", cp, remote, tp) for p in blocks)
        if cp > 1 and blocks:   # one layer's whole-sequence keys and values (and gradients) while it runs
            extra += cp_working_bytes(cfg, lay.recompute, cp, mb * S, tp)
        mem.append(dict(weights=weights / GB, grads=grads / GB, optimizer=opt / GB, activations=act / GB,
                        logits_and_working=extra / GB, total=(weights + grads + opt + act + extra) / GB, rank=r))
    worst = max(mem, key=lambda d: d["total"])

    tps = global_batch * S / step / cluster.n_gpus
    tflops = tps * shape.train_flops_per_token / 1e12
    time = dict(step=step, compute=m * rk["compute"], exposed_comm=m * (rk["pair"] - rk["compute"]) + t_dp,
                bubble=t_bubble, optimizer=t_opt, ep_comm=m * rk["ep"], tp_comm=m * rk["tp"],
                dp_comm=t_dp if lay.zero == 1 else m * dp_seconds(slow, 3), slowest_rank=slow, cp_comm=m * rk["cp"])
    return Plan(layout, worst["total"] <= gpu.hbm_gb, worst, time, tps, tflops, tflops * 1e12 / peak["bf16"],
                tflops * 1e12 / peak["fp8"] if fp8 else None, 1e12 / tps / 3600.0, m,
                [pl.edges[s + 1] - pl.edges[s] for s in range(len(pl.stage_parts))])


def _cached(cache: dict, key, fn):
    if key not in cache:
        cache[key] = fn()
    return cache[key]


# -- checking, enumerating and ranking layouts -----------------------------------------------------
def _fixed_vpp(schedule: str) -> int | None:
    """The stages per rank a schedule fixes (None: interleaved_1f1b, where vpp decides)."""
    if schedule in ("-", "dualpipe"):
        return 1
    if schedule in SCHEDULES:
        return SCHEDULES[schedule].fixed_chunks or None
    return None


def check_layout(shape: ModelShape, cluster: Cluster, layout: Layout, global_batch: int) -> None:
    """Every constraint of the runtime (mesh.py's, pp_schedules.py's) and of the model, as a PlanError
    that names the problem and the fix."""
    cfg, lay, N = shape.cfg, layout, cluster.n_gpus
    if lay.precision not in PRECISIONS:
        raise PlanError(f"precision {lay.precision!r}: use one of {', '.join(PRECISIONS)}")
    if lay.precision not in cluster.spec.peak:
        raise PlanError(f"{cluster.gpu} has no {lay.precision} tensor cores: use --precision bf16")
    if lay.recompute not in RECOMPUTE:
        raise PlanError(f"recompute {lay.recompute!r}: use one of {', '.join(RECOMPUTE)}")
    if lay.zero not in ZERO:
        raise PlanError(f"zero {lay.zero}: use 1 (ZeRO-1, optimizer states sharded over dp) or 3 (FSDP)")
    for k in ("tp", "pp", "ep", "vpp", "micro_batch", "cp"):
        if getattr(lay, k) < 1:
            raise PlanError(f"{k}={getattr(lay, k)} must be >= 1")
    if lay.cp > 1:
        _check_cp(shape, N, lay)
    elif N % (lay.tp * lay.pp):
        raise PlanError(f"{N} GPUs are not divisible by tp x pp = {lay.tp} x {lay.pp}: pick tp and pp whose "
                        f"product divides {N}")
    if lay.tp * lay.pp * lay.dp * lay.cp != N:
        if lay.cp > 1:
            raise PlanError(f"tp x cp x pp x dp = {lay.tp} x {lay.cp} x {lay.pp} x {lay.dp} != {N} GPUs: leave dp "
                            f"out to derive it (dp = {N // (lay.tp * lay.cp * lay.pp)})")
        raise PlanError(f"tp x pp x dp = {lay.tp} x {lay.pp} x {lay.dp} != {N} GPUs: leave dp out to derive it "
                        f"(dp = {N // (lay.tp * lay.pp)})")
    if lay.ep > 1 and not cfg.n_routed_experts:
        raise PlanError(f"ep={lay.ep}, but {cfg.name} has no routed experts: use ep=1")
    if cfg.n_routed_experts and cfg.n_routed_experts % lay.ep:
        raise PlanError(f"ep={lay.ep} does not divide the {cfg.n_routed_experts} routed experts of {cfg.name}: "
                        f"use an ep that divides {cfg.n_routed_experts}")
    if cfg.n_heads % lay.tp:
        raise PlanError(f"tp={lay.tp} does not divide the {cfg.n_heads} attention heads of {cfg.name}: "
                        f"use a divisor of {cfg.n_heads}")
    try:   # the runtime's own rules: tp inside a node, ep dividing dp x tp (x cp) and whole nodes
        ParallelDims.from_config(_parallel_config(lay, cluster.gpus_per_node), N)
    except LayoutError as e:
        raise PlanError(f"{lay.label()}: {e}") from None
    if shape.seq_len % lay.tp:
        raise PlanError(f"sequence length {shape.seq_len} is not divisible by tp={lay.tp} (sequence parallel)")
    if (shape.seq_len // lay.cp) % lay.tp:
        raise PlanError(f"the {shape.seq_len // lay.cp} tokens a cp rank holds (sequence length {shape.seq_len} / "
                        f"cp={lay.cp}) are not divisible by tp={lay.tp} (sequence parallel): change cp or tp")
    if global_batch % (lay.dp * lay.micro_batch):
        raise PlanError(f"global batch {global_batch} is not divisible by dp x micro-batch = {lay.dp} x "
                        f"{lay.micro_batch}: change --global-batch or --micro-batch")
    m = global_batch // (lay.dp * lay.micro_batch)
    if lay.pp == 1:
        if lay.schedule != "-":
            raise PlanError(f"schedule {lay.schedule} needs pp >= 2 (the layout has pp=1)")
        return
    if lay.schedule not in SCHEDULE_NAMES:
        raise PlanError(f"unknown pipeline schedule {lay.schedule!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    fixed = _fixed_vpp(lay.schedule)
    if fixed is not None and lay.vpp != fixed:
        raise PlanError(f"{lay.schedule} holds {fixed} stage(s) per rank; vpp={lay.vpp} applies to "
                        f"interleaved_1f1b only: drop vpp or use --schedule interleaved_1f1b")
    if lay.schedule == "interleaved_1f1b" and lay.vpp < 2:
        raise PlanError("interleaved_1f1b needs vpp >= 2 stages per rank: add vpp=2 (or more) to --layout")
    if lay.schedule == "dualpipe":
        if lay.pp % 2 or m % 2 or m < lay.pp:
            raise PlanError(f"dualpipe needs an even pp and an even number of micro-batches, at least pp "
                            f"(V3 Table 2); got pp={lay.pp} and {m}: change --global-batch or --micro-batch")
    else:
        try:
            check_microbatches(lay.schedule, lay.pp, m, lay.vpp)
        except ValueError as e:
            raise PlanError(f"{lay.label()}: {e} (planner: --global-batch / --micro-batch)") from None
    stages = _stages_and_slots(lay.schedule, lay.pp, lay.vpp)[0]
    if len(shape.layers) < max(1, stages - 2):
        raise PlanError(f"{lay.label()}: {stages} pipeline stages need at least {max(1, stages - 2)} layers; "
                        f"{cfg.name} has {len(shape.layers)}: lower pp or vpp")


def _parallel_config(lay: Layout, node_size: int) -> ParallelConfig:
    """The runtime's ParallelConfig of a layout (mesh.py checks its rules)."""
    return ParallelConfig(tp=lay.tp, pp=lay.pp, dp=lay.dp, ep=lay.ep, sp=lay.tp > 1, node_size=node_size, cp=lay.cp)


def _check_cp(shape: ModelShape, n_gpus: int, lay: Layout) -> None:
    """Context parallelism's own rules (issue 24): the sequence is cut into 2·cp chunks (each rank one early
    and one late chunk, load-balanced causal attention), and cp divides the GPUs left by tp x pp."""
    S = shape.seq_len
    if n_gpus % (lay.tp * lay.pp * lay.cp):
        raise PlanError(f"{n_gpus} GPUs are not divisible by tp x cp x pp = {lay.tp} x {lay.cp} x {lay.pp}: pick "
                        f"tp, cp and pp whose product divides {n_gpus}")
    if S % (2 * lay.cp):
        raise PlanError(f"sequence length {S} is not divisible by 2 x cp = {2 * lay.cp}: context parallelism cuts "
                        f"each sequence into 2·cp chunks (load-balanced causal attention); use a cp dividing {S // 2}")


def cp_choices(shape: ModelShape, n: int) -> list[int]:
    """The cp values the search tries on n GPUs (what tp x pp leaves): 1, and every divisor of n that the
    sequence supports (2·cp chunks) while a rank keeps at least CP_MIN_TOKENS of it."""
    S = shape.seq_len
    return [1] + [c for c in _divisors(n) if c > 1 and S % (2 * c) == 0 and S // c >= CP_MIN_TOKENS]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


PIN_KEYS = ("tp", "pp", "ep", "dp", "vpp", "schedule", "zero", "recompute", "micro_batch", "cp")


def candidate_layouts(shape: ModelShape, cluster: Cluster, *, precision: str = "bf16",
                      pin: dict | None = None) -> list[list[Layout]]:
    """Groups of layouts: one group per (tp, cp, pp, ep, schedule, vpp, micro-batch), holding its ZeRO and
    recompute variants. `pin` fixes any of PIN_KEYS; a pinned value is kept even when it breaks a
    rule, so that check_layout can say which. cp: cp_choices unless pinned (1 for sequences up to
    2 x CP_MIN_TOKENS)."""
    pin = dict(pin or {})
    unknown = set(pin) - set(PIN_KEYS)
    if unknown:
        raise PlanError(f"unknown layout keys {sorted(unknown)}: use {', '.join(PIN_KEYS)}")
    cfg, N = shape.cfg, cluster.n_gpus
    tps = [pin["tp"]] if "tp" in pin else [t for t in _divisors(cluster.gpus_per_node) if cfg.n_heads % t == 0]
    groups = []
    for tp in tps:
        pps = [pin["pp"]] if "pp" in pin else [p for p in _divisors(max(1, N // tp)) if p <= len(shape.layers)]
        for pp, cp in [(pp, cp) for pp in pps for cp in
                       ([pin["cp"]] if "cp" in pin else cp_choices(shape, max(1, N // (tp * pp))))]:
            if N % (tp * pp) and not ("tp" in pin or "pp" in pin):
                continue
            if cp > 1 and "dp" in pin and "cp" not in pin and tp * cp * pp * pin["dp"] != N:
                continue   # a pinned dp leaves one cp
            dp = pin.get("dp", N // (tp * pp * cp))
            if "ep" in pin:
                eps = [pin["ep"]]
            elif cfg.n_routed_experts:
                eps = [e for e in _divisors(max(1, dp * cp * tp)) if cfg.n_routed_experts % e == 0]
            else:
                eps = [1]
            if "schedule" in pin:
                scheds = [pin["schedule"]]
            elif pp == 1:
                scheds = ["-"]
            elif pin.get("vpp", 1) > 1:   # a pinned vpp means a schedule with several stages per rank
                scheds = ["interleaved_1f1b"] + (["zbv", "dualpipev"] if pin["vpp"] == 2 else [])
            else:
                scheds = list(SCHEDULE_NAMES)
            for ep in eps:
                for sched in scheds:
                    if "vpp" in pin:
                        vpps = [pin["vpp"]]
                    else:
                        vpps = [_fixed_vpp(sched)] if _fixed_vpp(sched) else [2, 4, 8]
                    for vpp in vpps:
                        groups.append([Layout(tp, pp, ep, dp, vpp, sched, z, rc, precision,
                                              pin.get("micro_batch", 1), cp)
                                       for rc in ([pin["recompute"]] if "recompute" in pin else RECOMPUTE)
                                       for z in ([pin["zero"]] if "zero" in pin else ZERO)])
    return groups


def rank(plans: list[Plan]) -> list[Plan]:
    """Layouts that fit first, fastest first; then the others, smallest memory first."""
    return sorted(plans, key=lambda p: (not p.fits, -p.tokens_per_s_per_gpu if p.fits else p.memory["total"]))


def plan(shape: ModelShape, cluster: Cluster, global_batch: int, *, precision: str = "bf16",
         pin: dict | None = None, ep_overlap: str = "runtime", keep_unfit: bool = False) -> list[Plan]:
    """Evaluate every candidate layout that passes check_layout and keep, per (tp, pp, ep, schedule,
    vpp), the fastest ZeRO/recompute variant that fits (or the smallest if none does). Returns those
    that fit, ranked (with keep_unfit, then the others). Raises PlanError when no candidate is valid
    (with the reason) or none fits (with the smallest and what to change)."""
    if precision not in PRECISIONS:
        raise PlanError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision not in cluster.spec.peak:
        raise PlanError(f"{cluster.gpu} has no {precision} tensor cores: use --precision bf16")
    if global_batch < 1:
        raise PlanError(f"--global-batch must be >= 1, got {global_batch}")
    cache: dict = {}
    out, errors = [], []
    for group in candidate_layouts(shape, cluster, precision=precision, pin=pin):
        try:
            check_layout(shape, cluster, group[0], global_batch)
        except PlanError as e:
            errors.append(str(e))
            continue   # ZeRO and recompute do not change any constraint
        plans = [evaluate(shape, cluster, lay, global_batch, ep_overlap=ep_overlap, cache=cache) for lay in group]
        fitting = [p for p in plans if p.fits]
        out.append(max(fitting, key=lambda p: p.tokens_per_s_per_gpu) if fitting
                   else min(plans, key=lambda p: p.memory["total"]))
    if not out:
        pinned = ", ".join(f"{k}={v}" for k, v in (pin or {}).items()) or "no pins"
        why = errors[0] if len(set(errors)) == 1 else "; ".join(sorted(set(errors))[:3])
        raise PlanError(f"no valid layout for {cluster.n_gpus} {cluster.gpu} ({pinned}): {why}")
    out = rank(out)
    if not out[0].fits:
        lay = out[0].layout
        fixes = ["more GPUs", "larger pp or ep" if pin else "fewer pins"]
        fixes += ["--zero 3"] * (lay.zero != 3) + ["--recompute full"] * (lay.recompute != "full")
        fixes += ["--micro-batch 1"] * (lay.micro_batch > 1)
        fixes += ["--fp8"] * (lay.precision != "fp8" and "fp8" in cluster.spec.peak)
        fixes += ["a larger cp (--layout cp=N)"] * (shape.seq_len >= 2 * CP_MIN_TOKENS and "cp" in (pin or {}))
        raise PlanError(f"no layout fits in {cluster.spec.hbm_gb:g} GB per {cluster.gpu}: the smallest, {lay.label()}, "
                        f"needs {out[0].memory['total']:.1f} GB on pp rank {out[0].memory['rank']}. Try "
                        f"{', '.join(fixes)}, or a GPU with more memory (--gpu H200)")
    return out if keep_unfit else [p for p in out if p.fits]


# -- input and output for the command line (launch/plan.py) -----------------------------------------
LAYOUT_KEYS = ("tp", "pp", "ep", "dp", "vpp", "cp")


def parse_layout(text: str) -> dict[str, int]:
    """"pp=16,ep=64,tp=1" -> {"pp": 16, "ep": 64, "tp": 1} (keys tp, pp, ep, dp, vpp, cp)."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in LAYOUT_KEYS:
            raise PlanError(f"--layout {text!r}: {item!r} is not KEY=N with KEY one of {', '.join(LAYOUT_KEYS)} "
                            f"(e.g. --layout pp=16,ep=64,tp=1)")
        try:
            out[key] = int(value)
        except ValueError:
            raise PlanError(f"--layout {text!r}: {key}={value!r} is not an integer") from None
        if out[key] < 1:
            raise PlanError(f"--layout {text!r}: {key} must be >= 1")
    return out


def constants() -> dict:
    return dict(GEMM_EFF=dict(GEMM_EFF), ATTN_EFF=ATTN_EFF, NON_GEMM=NON_GEMM, MOE_OVERHEAD=MOE_OVERHEAD,
                COMM_SMS=COMM_SMS, BW_EFF=BW_EFF, EP_EXPOSED_RUNTIME=EP_EXPOSED_RUNTIME,
                EP_EXPOSED_PAIRED=EP_EXPOSED_PAIRED, EP_EXPOSED_ALONE=EP_EXPOSED_ALONE)


def report(plans: list[Plan], shape: ModelShape, cluster: Cluster, global_batch: int, top: int = 10,
           ep_overlap: str = "runtime") -> str:
    """The ranked table of the first `top` plans and the memory and time breakdown of the first."""
    cfg = shape.cfg
    lines = [f"{cfg.name} on {cluster.n_gpus} x {cluster.gpu} ({cluster.gpus_per_node} per node, NVLink "
             f"{cluster.nvlink_gbps:g} GB/s, IB {cluster.ib_gbps:g} GB/s), global batch {global_batch} x "
             f"{shape.seq_len} tokens, {shape.train_flops_per_token / 1e9:.1f} GFLOP/token",
             f"{len(plans)} layouts fit (each the best ZeRO/recompute variant of its tp, pp, ep, schedule); "
             f"the best {min(top, len(plans))}:", ""]
    width = max(len(p.layout.label()) for p in plans[:top])
    head = (f"{'#':>3}  {'layout':<{width}} {'tok/s/GPU':>9} {'TFLOP/s':>8} {'MFU':>6} "
            f"{'GPU-h/1T tok':>12} {'mem GB':>7}")
    lines += [head, "-" * len(head)]
    for i, p in enumerate(plans[:top], 1):
        lines.append(f"{i:>3}  {p.layout.label():<{width}} {p.tokens_per_s_per_gpu:>9.0f} {p.tflops_per_gpu:>8.1f} "
                     f"{100 * p.mfu:>5.1f}% {p.gpu_hours_per_trillion_tokens:>12,.0f} {p.memory['total']:>7.1f}")
    b = plans[0]
    mem, t = b.memory, b.time
    lines += ["", f"best: {b.layout.label()}",
              f"  memory on rank {mem['rank']} (GB): weights {mem['weights']:.1f}, gradients {mem['grads']:.1f}, "
              f"optimizer {mem['optimizer']:.1f}, activations {mem['activations']:.1f}, logits/working "
              f"{mem['logits_and_working']:.1f} = {mem['total']:.1f} of {cluster.spec.hbm_gb:g}",
              f"  step {t['step']:.2f} s over {b.n_microbatches} micro-batches: compute {t['compute']:.2f}, exposed "
              f"communication {t['exposed_comm']:.2f}, bubble {t['bubble']:.2f}, optimizer {t['optimizer']:.3f} "
              f"(slowest pp rank {t['slowest_rank']})",
              f"  traffic time per step (hidden or not): expert all-to-all {t['ep_comm']:.2f} s, "
              f"tp {t['tp_comm']:.2f} s, data parallel {t['dp_comm']:.2f} s"
              + (f", context parallel {t['cp_comm']:.2f} s (exposed: no overlap assumed)" if b.layout.cp > 1 else ""),
              f"  layers per stage: {b.layer_split}",
              {"runtime": f"  --ep-overlap runtime: the all-to-all overlaps compute only where whaletron's runtime "
                          f"overlaps it (parallel.overlap=ep, tp = cp = 1: pp = 1 pairing, {EP_EXPOSED_RUNTIME:.0%} "
                          f"left exposed; DualPipeV's F&B pairs, {EP_EXPOSED_PAIRED:.0%} of theirs and "
                          f"{EP_EXPOSED_ALONE:.0%} of lone chunks', as measured); --ep-overlap dualpipe models "
                          "DeepSeek's DualPipe",
               "dualpipe": "  --ep-overlap dualpipe: the all-to-all hides under compute at pp > 1 completely "
                           "(DeepSeek's DualPipe, Megatron's EP overlap), more than whaletron's runtime measures",
               "none": "  --ep-overlap none: no all-to-all/compute overlap"}[ep_overlap],
              f"  constants (docs/planner.md): {constants()}"]
    return "\n".join(lines)
