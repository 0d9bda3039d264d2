"""The device mesh: world = pp x dp x cp x tp, with expert parallelism carved out of dp x cp x tp.

Rank order (Megatron's "tp-cp-dp-pp"): tp varies fastest, then cp (context parallel), then dp, then pp,

    rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i.

cp ranks hold different chunks of the same rows (context_parallel.py), so for everything but attention
they are data-parallel ranks: FSDP2 shards over dp x cp (the flattened `dp_cp` group) and the MoE sees
their tokens like dp's. Within one pipeline stage the dp x cp x tp ranks are viewed a second way for the
routed experts, ep fastest (Megatron's "MoE parallel folding", torchtitan's expert view):

    (dp_i * cp + cp_i) * tp + tp_i = edp_i * ep + ep_i,      edp = dp * cp * tp / ep,

so an ep group is `ep` consecutive ranks: it holds whole tp groups when ep >= tp, and experts
are split over ep and replicated (or, with FSDP, sharded) over the edp "expert data parallel"
ranks. Nodes are `node_size` consecutive ranks; a tp group must fit in one node, and an ep group
either fits in one node or covers whole nodes (then the dispatch goes node first, V3 §3.2.2).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from .comm import Group


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the constraint and the fix."""


@dataclass
class ParallelConfig:
    tp: int = 1          # tensor parallel
    pp: int = 1          # pipeline parallel
    dp: int = 0          # data parallel; 0: derived as world / (pp * cp * tp)
    ep: int = 1          # expert parallel, carved out of dp x cp x tp
    sp: bool = False     # sequence parallel (needs tp > 1 to matter)
    node_size: int = 8   # ranks per node: tp and ep groups are placed with it
    zero: int = 3        # FSDP2: 3 reshards parameters after forward, 2 keeps them until backward
    cp: int = 1          # context parallel: each row's sequence split over cp ranks (context_parallel.py)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or isinstance(v, bool)):
                raise LayoutError(f"parallel.{f.name} must be an integer, got {v!r}")
            if f.type == "bool" and not isinstance(v, bool):
                raise LayoutError(f"parallel.{f.name} must be true or false, got {v!r}")
        for name in ("tp", "pp", "ep", "node_size", "cp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp < 0:
            raise LayoutError(f"parallel.dp must be >= 1 (or 0 to derive it), got {self.dp}")
        if self.zero not in (2, 3):
            raise LayoutError(f"parallel.zero must be 2 or 3, got {self.zero}")


@dataclass(frozen=True)
class ParallelDims:
    world: int
    pp: int
    dp: int
    tp: int
    ep: int
    sp: bool
    node_size: int
    zero: int = 3
    cp: int = 1

    @property
    def stage_size(self) -> int:
        """Ranks of one pipeline stage: dp x cp x tp (they all see distinct tokens or heads)."""
        return self.dp * self.cp * self.tp

    @property
    def edp(self) -> int:
        return self.stage_size // self.ep

    def rank_of(self, pp: int, dp: int, cp: int, tp: int) -> int:
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    @property
    def ep_nodes(self) -> int:
        """Nodes spanned by one ep group."""
        return max(1, self.ep // self.node_size)

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world: int) -> "ParallelDims":
        """Check every constraint of the layout itself (the model's come in `parallelize`)."""
        cp = cfg.cp
        if cp == 1:
            if world % (cfg.pp * cfg.tp):
                raise LayoutError(f"world size {world} is not divisible by parallel.pp x parallel.tp = "
                                  f"{cfg.pp} x {cfg.tp}; launch a multiple of {cfg.pp * cfg.tp} ranks")
        elif world % (cfg.pp * cp * cfg.tp):
            raise LayoutError(f"world size {world} is not divisible by parallel.pp x parallel.cp x parallel.tp = "
                              f"{cfg.pp} x {cp} x {cfg.tp}; launch a multiple of {cfg.pp * cp * cfg.tp} ranks "
                              "or lower parallel.cp")
        dp = cfg.dp or world // (cfg.pp * cp * cfg.tp)
        if cfg.pp * dp * cp * cfg.tp != world:
            what, dims = ("pp x dp x tp", f"{cfg.pp} x {dp} x {cfg.tp}") if cp == 1 else \
                ("pp x dp x cp x tp", f"{cfg.pp} x {dp} x {cp} x {cfg.tp}")
            raise LayoutError(f"parallel.{what} = {dims} = {cfg.pp * dp * cp * cfg.tp} "
                              f"!= world size {world}; set parallel.dp=0 to derive it")
        if (dp * cp * cfg.tp) % cfg.ep:
            what, dims = ("dp x tp", f"{dp} x {cfg.tp}") if cp == 1 else ("dp x cp x tp", f"{dp} x {cp} x {cfg.tp}")
            raise LayoutError(f"parallel.ep = {cfg.ep} must divide {what} = {dims}: experts are "
                              "split over ranks of one pipeline stage")
        if cfg.tp > cfg.node_size or cfg.node_size % cfg.tp:
            raise LayoutError(f"parallel.tp = {cfg.tp} must divide parallel.node_size = {cfg.node_size}: "
                              "a tensor-parallel group stays inside a node")
        if cfg.ep <= cfg.node_size and cfg.node_size % cfg.ep:
            raise LayoutError(f"parallel.ep = {cfg.ep} must divide parallel.node_size = {cfg.node_size} "
                              "so that no expert-parallel group straddles a node boundary")
        if cfg.ep > cfg.node_size and cfg.ep % cfg.node_size:
            raise LayoutError(f"parallel.ep = {cfg.ep} spans nodes, so it must be a multiple of "
                              f"parallel.node_size = {cfg.node_size}")
        if cfg.sp and cfg.tp == 1:
            raise LayoutError("parallel.sp=true needs parallel.tp > 1: sequence parallelism splits "
                              "the sequence over the tensor-parallel group")
        return cls(world, cfg.pp, dp, cfg.tp, cfg.ep, cfg.sp, cfg.node_size, cfg.zero, cp)

    def coords(self, rank: int) -> dict[str, int]:
        tp_i, rest = rank % self.tp, rank // self.tp
        cp_i, rest = rest % self.cp, rest // self.cp
        dp_i, pp_i = rest % self.dp, rest // self.dp
        r = (dp_i * self.cp + cp_i) * self.tp + tp_i
        return {"pp": pp_i, "dp": dp_i, "cp": cp_i, "tp": tp_i, "edp": r // self.ep, "ep": r % self.ep}


@dataclass
class Mesh:
    """Process groups of one rank and the DeviceMeshes FSDP2 wants."""

    dims: ParallelDims
    groups: dict[str, Group]   # pp, dp, tp, edp, ep, ep_inter, ep_intra, dp_tp, world; with cp > 1 also
    device_meshes: dict[str, object]   # cp, dp_cp (FSDP2's) and dp_cp_tp (the stage's ranks) instead of dp_tp
    device_type: str = "cpu"

    def __getitem__(self, name: str) -> Group:
        return self.groups[name]

    # At cp = 1 the cp groups are not created (the layout reports stay as they were): these name the
    # group to use either way.
    @property
    def fsdp_group(self) -> str:
        """The group FSDP2 shards the dense parameters over: dp, or dp x cp."""
        return "dp_cp" if self.dims.cp > 1 else "dp"

    @property
    def stage_group(self) -> str:
        """Every rank of this pipeline stage (dp x cp x tp): the expert load is summed over it."""
        return "dp_cp_tp" if self.dims.cp > 1 else "dp_tp"

    def cp_group(self) -> Group:
        from .comm import single_group
        return self.groups.get("cp") or single_group("cp")

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0


def build_mesh(cfg: ParallelConfig | ParallelDims, device_type: str | None = None) -> Mesh:
    """Check the layout, then create its process groups (every rank must call this)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    dims = cfg if isinstance(cfg, ParallelDims) else ParallelDims.from_config(cfg, world)
    if dims.world != world:
        raise LayoutError(f"layout is for {dims.world} ranks, but {world} are running")
    device_type = device_type or ("cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu")
    ranks = torch.arange(world)
    views = {  # name -> (shape, dim names); every view orders the same ranks (module docstring)
        "main": ((dims.pp, dims.dp, dims.tp), ("pp", "dp", "tp")),
        "expert": ((dims.pp, dims.edp, dims.ep_nodes, dims.ep // dims.ep_nodes),
                   ("pp", "edp", "ep_inter", "ep_intra")),
        "stage": ((dims.pp, dims.edp, dims.ep), ("pp", "edp", "ep")),
        "flat": ((dims.pp, dims.dp * dims.tp), ("pp", "dp_tp")),
    }
    if dims.cp > 1:
        views.update({
            "main": ((dims.pp, dims.dp, dims.cp, dims.tp), ("pp", "dp", "cp", "tp")),
            "fsdp": ((dims.pp, dims.dp * dims.cp, dims.tp), ("pp", "dp_cp", "tp")),
            "flat": ((dims.pp, dims.stage_size), ("pp", "dp_cp_tp")),
        })
    groups, meshes = {}, {}
    if not dist.is_initialized():
        from .comm import single_group
        for names in (v[1] for v in views.values()):
            for n in names:
                groups[n] = single_group(n)
        groups["world"] = single_group("world")
        return Mesh(dims, groups, meshes, device_type or "cpu")
    from torch.distributed.device_mesh import DeviceMesh
    for key, (shape, names) in views.items():
        dm = DeviceMesh(device_type, ranks.view(shape), mesh_dim_names=names)
        meshes[key] = dm
        for n in names:
            if n in groups:
                continue
            sub = dm[n]
            groups[n] = Group(n, sub.get_group(), tuple(sub.mesh.tolist()), dims.node_size)
    groups["world"] = Group("world", dist.group.WORLD, tuple(range(world)), dims.node_size)
    return Mesh(dims, groups, meshes, device_type)
