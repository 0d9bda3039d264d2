"""The pipeline schedules by name, on torch.distributed.pipelining, and which stages each pp rank
holds under each. Kept apart from the stage cutting (pipeline.py) so that synthetic stages (the
bubble benchmark) and the model use the same table.

Each row also carries its schedule's bubble and activations in flight, as DeepSeek-V3 Table 2
(§3.2.1) lists them per method: the planner (plan/planner.py) and the bubble benchmark
(benchmarks/pp_schedules.py) read them from here. The closed forms count chunks (one stage, one
micro-batch): F forward, B = I + W full backward, W its weight-gradient part, F&B an overlapped
forward + backward pair; p is the number of pp ranks, m the micro-batches per step."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch.distributed.pipelining import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)


@dataclass(frozen=True)
class ScheduleSpec:
    cls: type | None    # the torch schedule; None: planned only (no runtime)
    style: str          # "loop": stage s on rank s % pp; "v": down then back up (V3 §3.2.1 DualPipeV);
                        # "dual": two model copies in opposite directions (planned only)
    fixed_chunks: int   # stages per rank the schedule requires; 0 = the vpp setting decides
    splits_backward: bool  # B is split into I (input grads) and W (weight grads)
    # (p, F, B, W[, F&B]) -> idle seconds per rank and step, costs per chunk; F&B omitted: no overlap,
    # F&B = F + B. Unclamped (the planner clamps at 0)
    bubble: Callable[..., float]
    # (p, m, vpp, rank) -> chunk activations held at the peak on that rank
    in_flight: Callable[[int, int, int, int], int]


# -- bubbles ----------------------------------------------------------------------------------------
def _bubble_1f1b(p, F, B, W, FB=None):
    # V3 Table 2, 1F1B; GPipe's too. Interleaved: Megatron's (p-1)(F+B)/v of a rank's whole-model
    # time per micro-batch (Narayanan et al. 2021), i.e. (p-1)(F+B) in chunks of 1/v of a rank's layers
    return (p - 1) * (F + B)


def _bubble_zb1p(p, F, B, W, FB=None):
    # V3 Table 2, ZB1P; ZB paper: (p-1)(F+I-W), I = B - W. Holds for W <= I (torch's order is checked
    # against it in tests/test_pp_schedules.py)
    return (p - 1) * (F + B - 2 * W)


def _bubble_zbv(p, F, B, W, FB=None):
    # Derived from torch's ScheduleZBVZeroBubble order (benchmarks/pp_schedules.py simulate()), for
    # F = I and m >= 2p: no synchronous step beats (p-1)F (rank p-1 gets its first input after (p-1)
    # forwards and every rank is equally busy); for W < I/2 the ZB-H1-like (p-1)(F+I-2W) = (p-1)(F+B-3W)
    # is larger. The ZB paper's "zero bubble" for F = I = W counts on the next iteration's warm-up
    # overlapping this one's tail (no optimizer synchronisation), which a step has not.
    return (p - 1) * max(F, F + B - 3 * W)


def _bubble_dualpipev(p, F, B, W, FB=None):
    # V3 Table 2, DualPipe on PP ranks: (PP/2-1)(F&B+B-3W). DualPipeV folds it onto p = PP/2 ranks with
    # 2 chunks each: (p-1)(F&B+B-3W) in chunk units. With no overlap (F&B = F+B) torch's order gives
    # exactly this for F = I > W (torch sends both outputs of a pair after it); for F != I it gives
    # (p-1)(2F+I-W) where this counts (p-1)(F+2I-W).
    return (p - 1) * ((F + 2 * B if FB is None else FB + B) - 3 * W)


def _bubble_dualpipe(p, F, B, W, FB=None):
    # V3 Table 2, DualPipe: p = PP ranks, each holding one stage of each of the two model copies
    return (p // 2 - 1) * ((F + 2 * B if FB is None else FB + B) - 3 * W)


# -- activations in flight, in one chunk's activation for one micro-batch ------------------------------
def _in_flight_gpipe(p, m, vpp, rank):
    return m                                   # every forward before the first backward


def _in_flight_1f1b(p, m, vpp, rank):
    return min(m, p - rank)                    # V3 Table 2: PP (rank 0); rank r starts p - r forwards


def _in_flight_zb1p(p, m, vpp, rank):
    return min(m, p)                           # V3 Table 2: PP; rank r defers its W by r ops, keeping them


def _in_flight_interleaved(p, m, vpp, rank):
    # Megatron's warm-up, (v-1)*round + 2(p-1-r) forwards, plus the one before the first backward;
    # torch's round is m // max(1, m // p) micro-batches
    rnd = m // max(1, m // p)
    return min(vpp * m, (vpp - 1) * rnd + 2 * (p - 1 - rank) + 1)


def _in_flight_zbv(p, m, vpp, rank):
    return 2 * p                               # ZB paper §6: 1F1B's peak at equal model size, p stages = 2p chunks


def _in_flight_dualpipev(p, m, vpp, rank):
    return 2 * p + 1                           # V3 Table 2's PP + 1 with PP = 2p chunks of half a DualPipe stage


def _in_flight_dualpipe(p, m, vpp, rank):
    return p + 1                               # V3 Table 2: PP + 1


SCHEDULES: dict[str, ScheduleSpec] = {
    "gpipe": ScheduleSpec(ScheduleGPipe, "loop", 1, False, _bubble_1f1b, _in_flight_gpipe),
    "1f1b": ScheduleSpec(Schedule1F1B, "loop", 1, False, _bubble_1f1b, _in_flight_1f1b),
    "interleaved_1f1b": ScheduleSpec(ScheduleInterleaved1F1B, "loop", 0, False, _bubble_1f1b, _in_flight_interleaved),
    # torch's interleaved zero-bubble with one stage per rank is ZB-H1 ("ZB1P" in V3 Table 2)
    "zb1p": ScheduleSpec(ScheduleInterleavedZeroBubble, "loop", 1, True, _bubble_zb1p, _in_flight_zb1p),
    "zbv": ScheduleSpec(ScheduleZBVZeroBubble, "v", 2, True, _bubble_zbv, _in_flight_zbv),
    "dualpipev": ScheduleSpec(ScheduleDualPipeV, "v", 2, True, _bubble_dualpipev, _in_flight_dualpipev),
}
# DeepSeek's own two-copy DualPipe (V3 §3.2.1, Figure 5): device i holds stage i of one copy and stage
# PP-1-i of the other. torch runs only its one-copy fold, DualPipeV, so this row is for planning.
PLANNED_ONLY: dict[str, ScheduleSpec] = {
    "dualpipe": ScheduleSpec(None, "dual", 2, True, _bubble_dualpipe, _in_flight_dualpipe),  # a stage of each copy
}
ALL_SCHEDULES: dict[str, ScheduleSpec] = {**SCHEDULES, **PLANNED_ONLY}


def schedule_spec(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; valid: {', '.join(SCHEDULES)} (parallel.pp_schedule)")
    return SCHEDULES[name]


def chunks_per_rank(name: str, vpp: int = 2) -> int:
    spec = schedule_spec(name)
    if spec.fixed_chunks:
        return spec.fixed_chunks
    if vpp < 2:
        raise ValueError(f"{name} needs at least 2 virtual stages per rank; got vpp={vpp}")
    return vpp


def n_stages(name: str, pp: int, vpp: int = 2) -> int:
    return pp * chunks_per_rank(name, vpp)


def stage_to_rank(name: str, pp: int, vpp: int = 2) -> list[int]:
    """rank_of[stage] for every global stage index."""
    total, style = n_stages(name, pp, vpp), schedule_spec(name).style
    if style == "loop":
        return [s % pp for s in range(total)]
    # V: 0..pp-1 down the ranks, pp..2pp-1 back up, so stage 0 and the last stage share rank 0
    return [s if s < pp else 2 * pp - 1 - s for s in range(total)]


def rank_stages(name: str, pp: int, rank: int, vpp: int = 2) -> list[int]:
    """The global stage indices pp rank `rank` holds, in increasing order."""
    return [s for s, r in enumerate(stage_to_rank(name, pp, vpp)) if r == rank]


def check_microbatches(name: str, pp: int, n_microbatches: int, vpp: int = 2) -> None:
    """The schedule's constraints on the micro-batch count, as an error that says what to change."""
    stages = n_stages(name, pp, vpp)
    if name in ("1f1b", "dualpipev") and n_microbatches < stages:
        raise ValueError(f"{name} with {stages} stages needs at least {stages} micro-batches per step; "
                         f"got {n_microbatches}: raise train.global_batch_size or lower train.micro_batch_size")
    if name in ("interleaved_1f1b", "zb1p"):
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ValueError(f"{name} needs the micro-batch count to be a multiple of "
                             f"max(1, n_microbatches // pp) = {rounds}; got {n_microbatches}")
    if name == "dualpipev" and n_microbatches % 2:
        raise ValueError(f"dualpipev needs an even number of micro-batches (V3 Table 2); got {n_microbatches}")


def build_schedule(name: str, stages: list, n_microbatches: int, loss_fn, vpp: int = 2, scale_grads: bool = False):
    """A torch schedule over this rank's `stages` (PipelineStage objects, in increasing stage index).

    The objective's division by the micro-batch count is left to `loss_fn` (scale_grads=False), so that
    auxiliary losses attached to activations can be scaled the same way."""
    spec = schedule_spec(name)
    pp = stages[0].group_size
    check_microbatches(name, pp, n_microbatches, vpp)
    if len(stages) != chunks_per_rank(name, vpp):
        raise ValueError(f"{name} expects {chunks_per_rank(name, vpp)} stages per rank, got {len(stages)}")
    if spec.fixed_chunks == 1 and spec.cls in (ScheduleGPipe, Schedule1F1B):
        return spec.cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    return spec.cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)


@functools.lru_cache(maxsize=256)
def dualpipev_paired_share(pp: int, n_microbatches: int) -> float:
    """The share of a rank's chunk computations (forwards and backwards) that torch's DualPipeV order runs
    inside OVERLAP_F_B pairs, mean over ranks: the rest (warm-up forwards, cool-down backwards) have no
    partner to hide their all-to-alls under (the planner's exposed term for parallel.overlap=ep at pp > 1)."""
    from torch.distributed.pipelining.schedules import OVERLAP_F_B
    m = n_microbatches
    order = ScheduleDualPipeV.__new__(ScheduleDualPipeV)   # the order alone: no stages needed
    order._n_microbatches, order.pp_group_size = m, pp
    shares = []
    for rank in range(pp):
        acts = [a for a in order._calculate_single_rank_operations(rank) if a is not None]
        paired = sum(2 for a in acts if a.computation_type == OVERLAP_F_B)
        shares.append(paired / (4 * m))   # 2 chunks x (F + B) x m micro-batches
    return sum(shares) / len(shares)
