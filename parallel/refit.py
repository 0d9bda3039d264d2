"""In-memory weight refresh from a training layout to a rollout layout on the same ranks (DESIGN.md
decision 10): shard to shard, with the box arithmetic of the resharding checkpoints.

Every local tensor of a parallel model is a box (offsets, sizes) of its global tensor: checkpoint.py's
`sharded_state` computes it (ep's expert range, tp's chunks, FSDP2's Shard(0)/Shard(1), only the
stage's layers at pp > 1, persistent buffers whole). A *side* (`Side`) is that table for every rank:
for each global name, which ranks hold which box. The refresh goes from the source side (the trainer's
stages) to the destination side (the rollout model):

1. Cells. For each destination box D (the ranks needing it: its needers), the cut points of every
   source box inside D split D into a grid of cells; each cell lies wholly inside or outside every
   source box, so its holders are exact.
2. Serving (`serve`). A needer that holds a cell copies it locally (no bytes). A needer on a node with
   holders is served by one of them (NVLink), by rotation on (needer rank + cell number), so replicas
   (tp-replicated norms, the embedding the first and last stage both hold, replicated buffers) share the
   load. A node without holders gets the cell over the network once: its leader (rotating with the cell)
   from a holder, then the node's other needers from the leader (hop 2, NVLink): a tensor that every rank
   needs (the replicated attention of an EP rollout) crosses the network once per node, not once per
   rank. Stateless, so `refit_bytes` states the bytes in closed form per cell without building transfers.
3. Buckets. Remote pieces larger than `bucket_bytes` are cut into sub-boxes; pieces are packed into
   rounds in which every rank sends at most `bucket_bytes` and receives at most `bucket_bytes`; the
   hop-2 rounds follow the hop-1 rounds (a leader forwards from its own rollout copy).
4. Transport: per round, one batched isend/irecv (`dist.batch_isend_irecv`) of one buffer per peer.
   Why not all_to_all_single over the world: the pattern is sparse (a rank exchanges with the few
   ranks whose boxes meet its own; at V3 scale an expert shard goes to 15 of 1024 ranks), and a rank
   with nothing in a round issues nothing, where an all-to-all synchronises every rank on every bucket
   and (NCCL) posts a send/recv for every peer. A buffer per peer also keeps each piece aligned for
   its dtype. Pieces are cast to the wire dtype when packed: the narrower of the two sides' dtypes
   (fp32 master -> bf16 rollout travels as bf16; rounding is elementwise, so casting before or after
   the wire gives the same bits).

Memory: no rank allocates a full tensor it does not own. Sources are read and destinations written
through views of the live local shards (FSDP2's sharded parameters in place: the rollout model keeps
its storage; it is resharded first so no gathered copy goes stale). Per round a rank holds its send
buffers (<= bucket_bytes) and receive buffers (<= bucket_bytes): peak extra memory 2 x bucket_bytes,
freed after the round. The plan itself is metadata (every rank's boxes, gathered once).

Bytes (`refit_bytes`, a pure function of the two sides): rank r receives
    recv_r = sum over tensors of e_wire x (|D_r| - |D_r n S_r|)
(what it needs minus what it holds, whoever serves it), and sends sum over cells c of e_wire x |c| x
(the needers `serve` assigns to it). `Refit.refresh` counts what it actually packs; the test checks both.

    refit = Refit(train_engine.stages, train_mesh, [rollout_net], rollout_mesh, bucket_bytes=64 << 20)
    stats = refit.refresh()          # after each optimizer step; collective over the world
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import comm

DEFAULT_BUCKET = 64 << 20


class RefitError(ValueError):
    """The two layouts cannot be refreshed one from the other; raised on every rank before any weight changes."""


# -- boxes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def __and__(self, other: "Box") -> "Box | None":
        offs, sizes = [], []
        for a, n, b, m in zip(self.offsets, self.sizes, other.offsets, other.sizes):
            lo, hi = max(a, b), min(a + n, b + m)
            if hi <= lo:
                return None
            offs.append(lo)
            sizes.append(hi - lo)
        return Box(tuple(offs), tuple(sizes))

    def contains(self, other: "Box") -> bool:
        return all(a <= b and b + m <= a + n
                   for a, n, b, m in zip(self.offsets, self.sizes, other.offsets, other.sizes))

    def relative_to(self, outer: "Box") -> tuple[slice, ...]:
        """Index of this box inside the local tensor that holds `outer`."""
        return tuple(slice(o - p, o - p + n) for o, p, n in zip(self.offsets, outer.offsets, self.sizes))


def split_box(box: Box, max_elems: int) -> list[Box]:
    """Sub-boxes of at most max_elems elements covering `box` (rows of the outermost dims first)."""
    if box.numel <= max_elems or not box.sizes:
        return [box]
    inner = math.prod(box.sizes[1:])
    o0, n0 = box.offsets[0], box.sizes[0]
    if inner <= max_elems:
        rows = max_elems // inner
        return [Box((o0 + a, *box.offsets[1:]), (min(rows, n0 - a), *box.sizes[1:])) for a in range(0, n0, rows)]
    out = []
    for a in range(n0):
        for sub in split_box(Box(box.offsets[1:], box.sizes[1:]), max_elems):
            out.append(Box((o0 + a, *sub.offsets), (1, *sub.sizes)))
    return out


# -- sides: every rank's boxes ---------------------------------------------------------------------------
@dataclass
class Tensor:
    """One global tensor on one side: its shape, dtype, and which ranks hold (or need) which box."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    boxes: dict[Box, tuple[int, ...]] = field(default_factory=dict)

    def box_of(self, rank: int) -> Box | None:
        for b, ranks in self.boxes.items():
            if rank in ranks:
                return b
        return None


Side = dict[str, Tensor]   # global name -> Tensor


def side_from_rank_entries(entries: list[list[tuple]]) -> Side:
    """entries[rank] = [(name, shape, dtype, offsets, sizes), ...] -> a Side (empty boxes dropped)."""
    side: Side = {}
    acc: dict[str, dict[Box, list[int]]] = {}
    for rank, rows in enumerate(entries):
        for name, shape, dtype, offs, sizes in rows:
            t = side.setdefault(name, Tensor(tuple(shape), dtype))
            if t.shape != tuple(shape) or t.dtype != dtype:
                raise RefitError(f"{name} has global shape {t.shape} ({t.dtype}) on one rank and {tuple(shape)} "
                                 f"({dtype}) on rank {rank} of the same layout")
            box = Box(tuple(offs), tuple(sizes))
            if box.numel:
                ranks = acc.setdefault(name, {}).setdefault(box, [])
                if not ranks or ranks[-1] != rank:  # ranks come in order: a repeat is this rank's mirror
                    ranks.append(rank)
    for name, t in side.items():
        t.boxes = {b: tuple(sorted(r)) for b, r in sorted(acc.get(name, {}).items(), key=lambda kv: kv[0].offsets)}
    return side


def local_state(modules, mesh) -> dict:
    """This rank's views of its live tensors by global name (`checkpoint.sharded_state`'s model/* entries)."""
    from .checkpoint import sharded_state
    return {k.removeprefix("model/"): g for k, g in sharded_state(modules, mesh).items() if k.startswith("model/")}


def _entries(state: dict) -> list[tuple]:
    return [(name, tuple(g.shape), g.local.dtype, tuple(g.offsets), tuple(g.local.shape)) for name, g in state.items()]


def wire_dtype(src: torch.dtype, dst: torch.dtype) -> torch.dtype:
    """The narrower of the two (fp32 master -> bf16 rollout travels as bf16): the cast is elementwise."""
    return dst if dst.itemsize < src.itemsize else src


# -- sides from layouts alone (no process, no tensor: for estimates at scale) -------------------------------
def layout_box(layout, dims, rank: int, fsdp: str | None) -> Box:
    """The box rank `rank` holds of a tensor with ParamLayout `layout` under ParallelDims `dims`: ep's expert
    range, then the other splits (checkpoint._layout_box's order), then FSDP2's shard when `fsdp` names its
    group: "dp" (Shard(0) over dp x cp) or "edp" (Shard(0) when the local expert count divides, else Shard(1);
    data_parallel.apply_fsdp's rule). The arithmetic of the runtime, without its groups."""
    from .tensor_parallel import chunk_range
    c = dims.coords(rank)
    size = {"tp": dims.tp, "ep": dims.ep}
    sizes, offs = list(layout.global_shape), [0] * len(layout.global_shape)
    ordered = [s for s in layout.splits if s.group == "ep"] + [s for s in layout.splits if s.group != "ep"]
    for s in ordered:
        a, b = chunk_range(sizes[s.dim], s.parts, c[s.group] // (size[s.group] // s.parts))
        offs[s.dim] += a
        sizes[s.dim] = b - a
    if fsdp is not None and sizes:
        cp = getattr(dims, "cp", 1)  # FSDP2 shards the dense weights over dp x cp (mesh.fsdp_group)
        n, i = (dims.dp * cp, c["dp"] * cp + c.get("cp", 0)) if fsdp == "dp" else (dims.edp, c["edp"])
        d = 0 if fsdp == "dp" or sizes[0] % n == 0 else 1
        a, b = chunk_range(sizes[d], n, i)
        offs[d] += a
        sizes[d] = b - a
    return Box(tuple(offs), tuple(sizes))


def analytic_side(tensors_of_pp, dims) -> Side:
    """A Side from layouts alone. tensors_of_pp(pp index) -> {name: (ParamLayout, dtype, fsdp group or None)}
    for the stages that pipeline rank holds (every rank at pp = 1)."""
    entries = []
    cache: dict[int, dict] = {}
    for r in range(dims.world):
        pp = dims.coords(r)["pp"]
        if pp not in cache:
            cache[pp] = tensors_of_pp(pp)
        rows = []
        for name, (layout, dtype, fsdp) in cache[pp].items():
            b = layout_box(layout, dims, r, fsdp)
            rows.append((name, tuple(layout.global_shape), dtype, b.offsets, b.sizes))
        entries.append(rows)
    return side_from_rank_entries(entries)


def model_tensors(module, dtype: torch.dtype | None = None, fsdp: bool = False) -> dict:
    """{name: (ParamLayout, dtype, fsdp group)} of a parallelised module (its `param_layouts`) and its
    persistent buffers (whole, unsharded), as `analytic_side` wants them. fsdp: FSDP2 applies (dp > 1 or a
    compute dtype): routed experts (gradients summed over edp) over edp, the rest over dp."""
    from .tensor_parallel import ParamLayout
    out = {}
    for name, p in module.named_parameters():
        lay = module.param_layouts.get(name, ParamLayout(tuple(p.shape)))
        group = ("edp" if "edp" in lay.grad_sum else "dp") if fsdp else None
        out[name] = (lay, dtype or p.dtype, group)
    for mname, mod in module.named_modules():
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = (ParamLayout(tuple(b.shape)), b.dtype, None)
    return out


# -- cells and serving (shared by the plan and the bytes formula) ------------------------------------------
def _cells(dbox: Box, src: Tensor) -> list[tuple[Box, tuple[int, ...]]]:
    """The grid of `dbox` cut by every source box inside it, with each cell's holders."""
    inside = [(b & dbox, ranks) for b, ranks in src.boxes.items()]
    inside = [(b, r) for b, r in inside if b is not None]
    cuts = []
    for d in range(len(dbox.sizes)):
        pts = {dbox.offsets[d], dbox.offsets[d] + dbox.sizes[d]}
        for b, _ in inside:
            pts.update((b.offsets[d], b.offsets[d] + b.sizes[d]))
        cuts.append(sorted(pts))
    out = []

    def walk(d, offs, sizes):
        if d == len(cuts):
            cell = Box(tuple(offs), tuple(sizes))
            holders = sorted({r for b, ranks in inside if b.contains(cell) for r in ranks})
            out.append((cell, tuple(holders)))
            return
        for a, z in zip(cuts[d], cuts[d][1:]):
            walk(d + 1, offs + [a], sizes + [z - a])
    walk(0, [], [])
    return out


def serve(needers, holders, salt: int, node_size: int, relay: bool = True) -> dict[int, tuple[int, int]]:
    """{remote needer: (the rank that sends it the cell, hop)}; needers that hold it copy locally (absent).

    hop 1, from a holder: a needer on a node with holders gets it from one of them (NVLink), by rotation on
    (needer + salt). A node without holders gets it once over the network: its leader (its needers'
    [salt % count]) from holders[(leader + salt) % len]; hop 2: the node's other needers from the leader
    (NVLink). A tensor every rank needs (the replicated dense weights of an EP rollout) then crosses the
    network once per node, not once per rank. relay=False: every needer from a holder (one hop; for comparison)."""
    hold = set(holders)
    by_node: dict[int, list[int]] = {}
    for h in holders:
        by_node.setdefault(h // node_size, []).append(h)
    remote: dict[int, list[int]] = {}
    for n in needers:
        if n not in hold:
            remote.setdefault(n // node_size, []).append(n)
    out = {}
    for node, ns in remote.items():
        cands = by_node.get(node)
        if cands:
            for n in ns:
                out[n] = (cands[(n + salt) % len(cands)], 1)
            continue
        leader = ns[salt % len(ns)]
        for n in ns:
            out[n] = (holders[(n + salt) % len(holders)], 1) if n == leader or not relay else (leader, 2)
    return out


def _check(src: Side, dst: Side, src_name: str, dst_name: str) -> None:
    """Every destination tensor exists in the source with the same global shape, and every element a
    destination rank needs is held by some source rank."""
    missing = sorted(set(dst) - set(src))
    if missing:
        raise RefitError(f"the rollout layout ({dst_name}) needs {len(missing)} tensors the training layout "
                         f"({src_name}) does not hold, e.g. {missing[:3]}: build both from the same model")
    for name, t in dst.items():
        s = src[name]
        if s.shape != t.shape:
            raise RefitError(f"{name}: global shape {s.shape} under the training layout ({src_name}), {t.shape} "
                             f"under the rollout layout ({dst_name}); nothing was changed")
        for dbox in t.boxes:
            for cell, holders in _cells(dbox, s):
                if not holders:
                    raise RefitError(f"{name}: no rank of the training layout ({src_name}) holds {cell} that the "
                                     f"rollout layout ({dst_name}) needs; nothing was changed")


def _walk(src: Side, dst: Side):
    """Yield (name, wire dtype, cell, holders, needers as a tensor, salt) in a fixed order: the same on every
    rank and in the formula."""
    salt = 0
    for name in sorted(dst):
        t, s = dst[name], src[name]
        wire = wire_dtype(s.dtype, t.dtype)
        for dbox, needers in t.boxes.items():
            nt = torch.tensor(needers, dtype=torch.int64)
            for cell, holders in _cells(dbox, s):
                yield name, wire, cell, holders, nt, salt
                salt += 1


def _serve_counts(needers: torch.Tensor, holders: tuple[int, ...], salt: int, node_size: int, relay: bool = True):
    """`serve` for many needers at once: (remote needers, the ranks that send to them, local needers)."""
    hold = torch.tensor(holders, dtype=torch.int64)
    local = torch.isin(needers, hold)
    remote = needers[~local]  # sorted: needers are, and the mask keeps the order
    nodes = remote // node_size
    hnode = hold // node_size
    chosen = torch.empty_like(remote)
    covered = torch.isin(nodes, hnode)
    for k in torch.unique(hnode).tolist():  # nodes with holders: one of theirs, by rotation
        on = nodes == k
        cands = hold[hnode == k]
        chosen[on] = cands[(remote[on] + salt) % len(cands)]
    bare = remote[~covered]
    if len(bare):  # nodes without: a leader each from the holders, the rest from their leader
        _, counts = torch.unique_consecutive(bare // node_size, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        leaders = bare[starts + salt % counts]
        via = leaders.repeat_interleave(counts)
        is_leader = (bare == via) | (not relay)
        via[is_leader] = hold[(bare[is_leader] + salt) % len(holders)]
        chosen[~covered] = via
    return remote, chosen, needers[local]


def refit_bytes(src: Side, dst: Side, world: int, node_size: int = 8, relay: bool = True) -> dict[str, list[int]]:
    """Bytes each rank sends and receives in a refresh, and copies locally (a pure function of the two sides).

    recv[r] = sum over tensors of e x (|D_r| - |D_r n S_r|); send[q] = sum over cells of e x |cell| x (needers
    `serve` gives to q); e: the wire dtype's size. *_cross_node: of those, to or from another node.
    relay=False: as if every needer were served by a holder (one hop), for comparison.
    Vectorised over the needers of a cell (V3 scale: a replicated tensor has a thousand)."""
    out = {k: torch.zeros(world, dtype=torch.int64) for k in ("send", "recv", "local", "send_cross_node",
                                                              "recv_cross_node")}
    for _name, wire, cell, holders, needers, salt in _walk(src, dst):
        nbytes = cell.numel * wire.itemsize
        remote, chosen, local = _serve_counts(needers, holders, salt, node_size, relay)
        out["local"].index_add_(0, local, torch.full_like(local, nbytes))
        w = torch.full_like(remote, nbytes)
        out["send"].index_add_(0, chosen, w)
        out["recv"].index_add_(0, remote, w)
        cross = remote // node_size != chosen // node_size
        out["send_cross_node"].index_add_(0, chosen[cross], w[cross])
        out["recv_cross_node"].index_add_(0, remote[cross], w[cross])
    return {k: v.tolist() for k, v in out.items()}


def recv_bytes_closed_form(src: Side, dst: Side, world: int) -> list[int]:
    """recv[r] = sum e x (|D_r| - |D_r n S_r|), from the boxes alone (whoever serves)."""
    recv = [0] * world
    for name, t in dst.items():
        s = src[name]
        e = wire_dtype(s.dtype, t.dtype).itemsize
        held = {r: b for b, ranks in s.boxes.items() for r in ranks}
        for dbox, needers in t.boxes.items():
            for r in needers:
                inter = (held[r] & dbox) if r in held else None
                recv[r] += e * (dbox.numel - (inter.numel if inter else 0))
    return recv


# -- the plan ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    name: str
    box: Box               # global coordinates
    src: int
    dst: int
    wire: torch.dtype
    relay: bool = False    # sent from the sender's rollout copy, filled by an earlier round (hop 2)

    @property
    def nbytes(self) -> int:
        return self.box.numel * self.wire.itemsize


def _first_fit(pieces: list[Piece], bucket_bytes: int) -> list[list[Piece]]:
    """Largest first, then first fit: few rounds, and every rank's pieces spread over them."""
    pieces = sorted(pieces, key=lambda p: (-p.nbytes, p.src, p.dst, p.name, p.box.offsets))
    rounds: list[list[Piece]] = []
    sent: list[dict[int, int]] = []
    recvd: list[dict[int, int]] = []
    for p in pieces:
        for i in range(len(rounds)):
            if sent[i].get(p.src, 0) + p.nbytes <= bucket_bytes and recvd[i].get(p.dst, 0) + p.nbytes <= bucket_bytes:
                break
        else:
            rounds.append([])
            sent.append({})
            recvd.append({})
            i = len(rounds) - 1
        rounds[i].append(p)
        sent[i][p.src] = sent[i].get(p.src, 0) + p.nbytes
        recvd[i][p.dst] = recvd[i].get(p.dst, 0) + p.nbytes
    return rounds


def plan_rounds(src: Side, dst: Side, node_size: int, bucket_bytes: int) -> tuple[list[Piece], list[list[Piece]]]:
    """(local pieces, rounds of remote pieces): every piece at most bucket_bytes, and in every round each
    rank sends at most bucket_bytes and receives at most bucket_bytes. Hop-2 pieces (forwarded by a node's
    leader) come in rounds after every hop-1 piece, so the leader holds them by then."""
    local, hops = [], {1: [], 2: []}
    for name, wire, cell, holders, needers, salt in _walk(src, dst):
        served = serve(needers.tolist(), holders, salt, node_size)
        for n in needers.tolist():
            if n not in served:
                local.append(Piece(name, cell, n, n, wire))
                continue
            by, hop = served[n]
            for sub in split_box(cell, max(1, bucket_bytes // wire.itemsize)):
                hops[hop].append(Piece(name, sub, by, n, wire, hop == 2))
    return local, _first_fit(hops[1], bucket_bytes) + _first_fit(hops[2], bucket_bytes)


# -- the refresh ----------------------------------------------------------------------------------------
def _describe(mesh) -> str:
    if mesh is None:
        return "one process"
    d = mesh.dims
    return f"pp{d.pp} x dp{d.dp} x tp{d.tp}, ep{d.ep}"


class Refit:
    """The plan of one (training layout -> rollout layout) pair, made once (collective: every rank's boxes
    are gathered), and its `refresh`, run after each update. Both sides are this rank's modules of the same
    model with global names: `src_modules` the trainer's stages (an engine's `.stages`, a `Pipeline`, or
    one model), `dst_modules` the rollout model(s), each with its mesh on the same world."""

    def __init__(self, src_modules, src_mesh, dst_modules, dst_mesh, bucket_bytes: int = DEFAULT_BUCKET):
        if bucket_bytes < 8:
            raise RefitError(f"bucket_bytes must hold one element of any dtype (>= 8), got {bucket_bytes}")
        self.src_modules, self.dst_modules = src_modules, dst_modules
        self.bucket_bytes = bucket_bytes
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        mesh = src_mesh or dst_mesh
        self.node_size = mesh.dims.node_size if mesh is not None else 8
        self.world_group = mesh["world"] if mesh is not None else comm.single_group("world")
        self.src_state = local_state(src_modules, src_mesh)
        self.dst_state = local_state(dst_modules, dst_mesh)
        mine = (_entries(self.src_state), _entries(self.dst_state))
        if dist.is_initialized():
            every = [None] * self.world
            dist.all_gather_object(every, mine)
        else:
            every = [mine]
        self.src = side_from_rank_entries([e[0] for e in every])
        self.dst = side_from_rank_entries([e[1] for e in every])
        _check(self.src, self.dst, _describe(src_mesh), _describe(dst_mesh))  # same answer on every rank
        local, rounds = plan_rounds(self.src, self.dst, self.node_size, bucket_bytes)
        r = self.rank
        self.local = [p for p in local if p.dst == r]
        self.rounds = [[p for p in rnd if r in (p.src, p.dst)] for rnd in rounds]  # every rank runs every round
        self.expected = refit_bytes(self.src, self.dst, self.world, self.node_size)

    def _src_view(self, p: Piece) -> torch.Tensor:
        g = (self.dst_state if p.relay else self.src_state)[p.name]
        return g.local[p.box.relative_to(Box(tuple(g.offsets), tuple(g.local.shape)))]

    def _dst_views(self, p: Piece) -> list[torch.Tensor]:
        g = self.dst_state[p.name]
        idx = p.box.relative_to(Box(tuple(g.offsets), tuple(g.local.shape)))
        return [t[idx] for t in [g.local, *g.mirrors]]

    @torch.no_grad()
    def refresh(self) -> dict:
        """Copy the training weights into the rollout model's shards in place; returns this rank's bytes
        sent / received / copied locally (and to or from other nodes), rounds, the largest buffer bytes held
        at once, and seconds. Collective over the world."""
        from .data_parallel import reshard
        t0 = time.perf_counter()
        for m in (self.dst_modules if isinstance(self.dst_modules, (list, tuple)) else [self.dst_modules]):
            reshard(m)  # a gathered FSDP2 copy would go stale: write into the sharded storage
        stats = {"sent": 0, "received": 0, "local": 0, "sent_cross_node": 0, "received_cross_node": 0,
                 "rounds": len(self.rounds), "peak_buffer_bytes": 0}
        for p in self.local:
            for v in self._dst_views(p):
                v.copy_(self._src_view(p))
            stats["local"] += p.nbytes
        me, node = self.rank, self.rank // self.node_size
        for rnd in self.rounds:
            sends: dict[int, list[Piece]] = {}
            recvs: dict[int, list[Piece]] = {}
            for p in rnd:
                if p.src == me:
                    sends.setdefault(p.dst, []).append(p)
                if p.dst == me:
                    recvs.setdefault(p.src, []).append(p)
            ops, inbox, held = [], [], 0
            for peer, pieces in sorted(sends.items()):
                buf = self._pack(pieces)
                held += buf.numel()
                stats["sent"] += buf.numel()
                if peer // self.node_size != node:
                    stats["sent_cross_node"] += buf.numel()
                ops.append(dist.P2POp(dist.isend, buf, peer))
            for peer, pieces in sorted(recvs.items()):
                pieces = _packing_order(pieces)
                buf = torch.empty(sum(p.nbytes for p in pieces), dtype=torch.uint8, device=self._device())
                held += buf.numel()
                stats["received"] += buf.numel()
                if peer // self.node_size != node:
                    stats["received_cross_node"] += buf.numel()
                ops.append(dist.P2POp(dist.irecv, buf, peer))
                inbox.append((buf, pieces))
            stats["peak_buffer_bytes"] = max(stats["peak_buffer_bytes"], held)
            if ops:
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            for buf, pieces in inbox:
                at = 0
                for p in pieces:
                    part = buf[at:at + p.nbytes].view(p.wire).view(p.box.sizes)
                    for v in self._dst_views(p):
                        v.copy_(part)
                    at += p.nbytes
        n_cross = stats["sent_cross_node"]
        comm.STATS.add("refit_send", self.world_group, stats["sent"], n_cross)
        stats["seconds"] = time.perf_counter() - t0
        return stats

    def _device(self):
        for g in [*self.src_state.values(), *self.dst_state.values()]:
            return g.local.device
        return torch.device("cpu")

    def _pack(self, pieces: list[Piece]) -> torch.Tensor:
        pieces = _packing_order(pieces)
        buf = torch.empty(sum(p.nbytes for p in pieces), dtype=torch.uint8, device=self._device())
        at = 0
        for p in pieces:
            buf[at:at + p.nbytes].view(p.wire).view(p.box.sizes).copy_(self._src_view(p))
            at += p.nbytes
        return buf


def _packing_order(pieces: list[Piece]) -> list[Piece]:
    """Widest dtype first, so every piece starts aligned for its dtype inside the byte buffer; the sender
    and the receiver sort the same pieces the same way."""
    return sorted(pieces, key=lambda p: (-p.wire.itemsize, p.name, p.box.offsets))


__all__ = ["Refit", "RefitError", "Box", "Tensor", "Side", "Piece", "DEFAULT_BUCKET", "refit_bytes",
           "recv_bytes_closed_form", "plan_rounds", "serve", "split_box", "side_from_rank_entries", "local_state",
           "wire_dtype", "layout_box", "analytic_side", "model_tensors"]
