"""The pipeline schedules by name, on torch.distributed.pipelining, and which stages each pp rank
holds under each. Kept apart from the stage cutting (pipeline.py) so that synthetic stages (the
bubble benchmark) and the model use the same table."""
from __future__ import annotations

from dataclasses import dataclass

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
    cls: type
    style: str          # "loop": stage s on rank s % pp; "v": down then back up (V3 §3.2.1 DualPipeV)
    fixed_chunks: int   # stages per rank the schedule requires; 0 = the vpp setting decides
    splits_backward: bool  # B is split into I (input grads) and W (weight grads)


SCHEDULES: dict[str, ScheduleSpec] = {
    "gpipe": ScheduleSpec(ScheduleGPipe, "loop", 1, False),
    "1f1b": ScheduleSpec(Schedule1F1B, "loop", 1, False),
    "interleaved_1f1b": ScheduleSpec(ScheduleInterleaved1F1B, "loop", 0, False),
    # torch's interleaved zero-bubble with one stage per rank is ZB-H1 ("ZB1P" in V3 Table 2)
    "zb1p": ScheduleSpec(ScheduleInterleavedZeroBubble, "loop", 1, True),
    "zbv": ScheduleSpec(ScheduleZBVZeroBubble, "v", 2, True),
    "dualpipev": ScheduleSpec(ScheduleDualPipeV, "v", 2, True),
}


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
