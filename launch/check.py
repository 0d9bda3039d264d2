"""python -m launch.check: build a recipe's real layout rank by rank on one machine, before launching it.

    python -m launch.check --config configs/pretrain/deepseek_v3.yaml
    python -m launch.check --config configs/pretrain/deepseek_v3.yaml --ranks 0,15,2047 [key=value ...] [--json]

For each asked rank: a fake process group of the recipe's world size (torch's "fake" backend: every
collective returns at once, no peer exists), the mesh, the model on the meta device, and then what a
run applies at that rank, through the function the trainer's `build_engine` calls (`parallel_engine`:
recompute, tp, ep, FP8, FSDP2, the pipeline cut under the recipe's schedule), stopping before the
weights are initialised, so nothing is allocated. It reports the rank's stages and layers, its experts
and the nodes of its expert group, every group it belongs to, and the bytes of parameters, gradients
and AdamW state it holds (plan.memory.state_bytes, the function the planner's memory terms use).
A layout that cannot be built fails here with the runtime's own error.

By default one rank of each kind is checked: the first rank of the first, a middle and the last
pipeline rank, the rank holding the last expert block of the first stage, and the last rank (the
last FSDP shard). One process checks them in turn: a fake group is destroyed and created again in
about 0.1 s, so no subprocess per rank is needed.

The world size is pp x dp x cp x tp: recipes set parallel.dp, or give --world.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

BF16 = {"fp32": None, "bf16": torch.bfloat16}   # train.dtype -> the compute dtype FSDP2 casts to (pretrain.session)


@dataclass
class StageReport:
    index: int
    layers: list[int]
    embed: bool
    head: bool
    mtp: int
    embed_copy: bool    # the last stage's copy of the embedding (MTP shares it; V3 §2.2)


@dataclass
class RankReport:
    rank: int
    world: int
    coords: dict
    node: int
    stages: list[StageReport]
    experts: dict             # {"first": a, "last": b, "of": E, "layers": n} of this rank; {} for a dense model
    expert_nodes: list[int]   # nodes of this rank's ep group, in ep order (expert block i lives on the i-th)
    groups: dict              # name -> {"size": n, "ranks": [...]}
    params: int               # elements held (FSDP2 shards), the embedding copy included
    shared: int               # of those, the copy of a parameter another stage holds
    weights: int              # bytes
    grads: int
    optimizer: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def world_size(cfg, world: int | None = None) -> int:
    p = cfg.parallel
    if world:
        return world
    if not p.dp:
        raise ValueError("parallel.dp = 0 (derived from the world size): give --world N, or set parallel.dp in the "
                         "recipe so that its world size (pp x dp x cp x tp) is known")
    return p.pp * p.dp * getattr(p, "cp", 1) * p.tp


def parallel_config(p):
    """The runtime's ParallelConfig of a recipe's parallel section (cp where the runtime has it)."""
    from parallel import ParallelConfig
    extra = {"cp": p.cp} if getattr(p, "cp", 1) != 1 else {}
    return ParallelConfig(tp=p.tp, pp=p.pp, dp=p.dp, ep=p.ep, sp=p.sp, node_size=p.node_size, zero=p.zero, **extra)


def default_ranks(dims) -> list[int]:
    """One rank of each kind: the first rank of the first, a middle and the last pipeline rank, the rank
    with the last expert block on the first stage, and the last rank."""
    stage = dims.dp * getattr(dims, "cp", 1) * dims.tp
    ranks = [0, (dims.pp // 2) * stage, (dims.pp - 1) * stage, dims.ep - 1, dims.world - 1]
    return sorted(set(ranks))


def _ranges(ranks) -> list:
    """[0, 1, 2, 3, 8] -> ["0-3", 8]: members in short form (a dp group of V3 has 128)."""
    out, ranks = [], list(ranks)
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(ranks[i] if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    if len(out) > 8:   # strided groups (pp over 2048 ranks): first, stride, last
        stride = ranks[1] - ranks[0]
        if all(b - a == stride for a, b in zip(ranks, ranks[1:])):
            return [f"{ranks[0]}-{ranks[-1]} step {stride}"]
    return out


def run_checks(cfg) -> None:
    """The trainer's checks of batch sizes and micro-batch counts (pretrain.train.Trainer), so that a
    recipe the trainer would refuse is refused here too, with the same message."""
    from parallel.pp_schedules import check_microbatches
    from pretrain.data import check_batch_sizes, ramp_batch_sizes
    from pretrain.schedules import check_lr_schedule, check_piecewise
    t, p = cfg.train, cfg.parallel
    check_batch_sizes(t.global_batch_size, t.micro_batch_size, p.dp, t.batch_ramp)
    check_lr_schedule(t.lr_schedule, t.warmup_steps, t.steps, t.min_lr_ratio, t.lr_milestones, t.lr_factors)
    for key in ("mtp_lambda", "bias_gamma"):
        if getattr(t, key):
            check_piecewise(getattr(t, key), f"train.{key}")
    if p.pp > 1:
        for gbs in ramp_batch_sizes(t.global_batch_size, t.batch_ramp):
            m = gbs // (t.micro_batch_size * p.dp)
            try:
                check_microbatches(p.pp_schedule, p.pp, m, p.vpp)
            except ValueError as e:
                raise ValueError(f"at a global batch of {gbs} sequences (train.batch_ramp = {t.batch_ramp}, {m} "
                                 f"micro-batches per dp rank): {e}") from None


def build_rank(cfg, world: int, rank: int):
    """(mesh, engine) of `rank` on a fake process group, the model on the meta device, parallelised as a
    run parallelises it. The caller destroys the process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from model import build_model
    from parallel import Fp8Recipe, build_mesh, parallel_engine

    p, t = cfg.parallel, cfg.train
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    mesh = build_mesh(parallel_config(p))
    from pretrain.data import global_batch_size_at
    n_micro = global_batch_size_at(0, t.global_batch_size, t.batch_ramp) // (t.micro_batch_size * mesh.dims.dp)
    fp8 = Fp8Recipe(t.fp8_backend) if t.fp8 == "blockwise" else None
    engine = parallel_engine(build_model(cfg.model_config(), device="meta"), mesh,
                             micro_batch_size=t.micro_batch_size, seq_len=cfg.data.seq_len,
                             param_dtype=BF16[t.dtype], fp8=fp8, recompute=p.recompute, schedule=p.pp_schedule,
                             n_microbatches=n_micro, vpp=p.vpp, layer_split=p.layer_split or None, overlap=p.overlap)
    return mesh, engine


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank holds of a parameter (its FSDP2 shard when it is a DTensor)."""
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def report_rank(cfg, mesh, engine, rank: int) -> RankReport:
    from plan.memory import rank_state_of
    from parallel.tensor_parallel import chunk_range

    dims = mesh.dims
    shared_names = set(getattr(engine, "shared_names", ()))
    stages, params, shared, experts = [], 0, 0, {}
    for s in engine.stages:
        is_first, is_last = getattr(s, "is_first", True), getattr(s, "is_last", True)
        copy = is_last and not is_first
        stages.append(StageReport(getattr(s, "stage_index", 0), sorted(int(i) for i in s.layers.keys()),
                                  s.embed is not None and is_first, s.head is not None,
                                  len(s.mtp) if s.mtp is not None else 0, s.embed is not None and copy))
        for name, q in s.named_parameters():
            n = local_numel(q)
            params += n
            shared += n if copy and name in shared_names else 0
        for name, layout in s.param_layouts.items():   # stacked expert tensors [E, ...], split over ep on dim 0
            if name.endswith(".w1") and any(sp.group == "ep" for sp in layout.splits):
                a, b = chunk_range(layout.global_shape[0], dims.ep, dims.coords(rank)["ep"])
                experts = {"first": a, "last": b - 1, "of": layout.global_shape[0],
                           "layers": experts.get("layers", 0) + 1}
    ep_ranks = mesh["ep"].ranks
    st = rank_state_of(params, shared, cfg.train.moment_dtype)
    groups = {n: {"size": g.size, "ranks": _ranges(g.ranks)} for n, g in sorted(mesh.groups.items())
              if n != "world"}
    return RankReport(rank, dims.world, dims.coords(rank), rank // dims.node_size, stages, experts,
                      sorted({r // dims.node_size for r in ep_ranks}) if experts else [], groups,
                      st.params, st.shared, st.weights, st.grads, st.optimizer)


def check_rank(cfg, world: int, rank: int) -> RankReport:
    """Build `rank` on a fake process group and report it; the group is destroyed afterwards."""
    if not 0 <= rank < world:
        raise ValueError(f"--ranks: rank {rank} does not exist in a world of {world} ranks (0..{world - 1})")
    t0 = time.perf_counter()
    try:
        mesh, engine = build_rank(cfg, world, rank)
        rep = report_rank(cfg, mesh, engine, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    rep.seconds = time.perf_counter() - t0
    return rep


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def format_report(r: RankReport) -> str:
    c = r.coords
    cp = f", cp {c['cp']}" if "cp" in c and "cp" in r.groups else ""
    lines = [f"rank {r.rank} of {r.world} (node {r.node}; pp {c['pp']}, dp {c['dp']}{cp}, tp {c['tp']}, ep {c['ep']}, "
             f"edp {c['edp']}), built in {r.seconds:.2f} s"]
    for s in r.stages:
        extra = [w for w, on in (("embedding", s.embed), ("embedding copy", s.embed_copy), ("norm + head", s.head),
                                 (f"{s.mtp} MTP module(s)", s.mtp)) if on]
        layers = (f"layers {s.layers[0]}-{s.layers[-1]}" if len(s.layers) > 1 else
                  f"layer {s.layers[0]}" if s.layers else "no decoder layer")
        lines.append(f"  stage {s.index}: {layers}" + (f" + {', '.join(extra)}" if extra else ""))
    if r.experts:
        e = r.experts
        lines.append(f"  experts {e['first']}-{e['last']} of {e['of']} in each of its {e['layers']} MoE layers, on "
                     f"node {r.node}; its ep group spans nodes {r.expert_nodes}")
    for name, g in r.groups.items():
        lines.append(f"  group {name:<9} size {g['size']:>5}: {', '.join(map(str, g['ranks']))}")
    lines.append(f"  holds {r.params:,} parameter elements ({r.shared:,} of them a shared copy): weights "
                 f"{_gib(r.weights)}, gradients {_gib(r.grads)}, optimizer {_gib(r.optimizer)} = "
                 f"{_gib(r.weights + r.grads + r.optimizer)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a training recipe, e.g. configs/pretrain/deepseek_v3.yaml")
    ap.add_argument("--ranks", default="", help="comma-separated ranks (default: one of each kind)")
    ap.add_argument("--world", type=int, default=0, help="world size (default: pp x dp x cp x tp of the recipe)")
    ap.add_argument("--json", action="store_true", help="one JSON object per rank, one per line")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, as python -m pretrain takes them")
    args = ap.parse_args(argv)

    from parallel import LayoutError, ParallelDims
    from pretrain.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
        world = world_size(cfg, args.world)
        p = cfg.parallel
        dims = ParallelDims.from_config(parallel_config(p), world)
        run_checks(cfg)
        try:
            ranks = [int(x) for x in args.ranks.split(",") if x.strip()] or default_ranks(dims)
        except ValueError:
            raise ValueError(f"--ranks {args.ranks!r} must be comma-separated integers, e.g. 0,15,2047") from None
        for rank in ranks:
            rep = check_rank(cfg, world, rank)
            print(json.dumps(asdict(rep)) if args.json else format_report(rep), flush=True)
    except (ConfigError, LayoutError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
