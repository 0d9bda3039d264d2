"""Pipeline-schedule bubbles and activation memory, measured on a synthetic stage of controlled cost,
beside the closed forms of DeepSeek-V3 Table 2 (and of Megatron / Zero Bubble for the others).

Every stage (chunk) is the same `SyntheticStage`: its forward sleeps F, the backward of its input
path sleeps I and the backward of its weight path sleeps W (B = I + W is the full backward), so the
zero-bubble schedules' split of backward into input-grad and weight-grad really separates them, and
the 2 CPU cores of CI are never what limits the pipeline. An op's time runs from the moment torch
hands the stage the action, so torch's python inside the action is part of F, I, W (on a GPU it would
hide under the kernels); what stays idle is waiting for data, the schedule loop and the p2p calls
(about 1 ms an op here). Each forward also saves one activation of
`act_mib` MiB for backward, so the peak resident memory of a step, divided by that size, is the
number of micro-batch-chunk activations in flight. Runs gloo ranks on CPU:

    python benchmarks/pp_schedules.py                   # all schedules, pp=4, 8 micro-batches
    python benchmarks/pp_schedules.py --pp 2 --schedules 1f1b zb1p dualpipev
    torchrun --nproc-per-node 4 benchmarks/pp_schedules.py   # the same, ranks started by torchrun

and writes benchmarks/results/pp_schedules.json and benchmarks/results/pp_timeline.png.

Timestamps are time.perf_counter() (CLOCK_MONOTONIC on Linux), comparable between the processes of
one machine; a multi-node torchrun would need a clock offset per node, which this does not do.
There is no compute/communication overlap here (gloo, CPU, torch runs DualPipeV's overlapped F&B
pairs one after the other), so DualPipe's F&B is F + B in every formula below.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
sys.path.insert(0, here)

from parallel.memory import PeakMemory  # noqa: E402
from parallel.pp_schedules import SCHEDULES, build_schedule, chunks_per_rank, n_stages, rank_stages  # noqa: E402

MiB = 1 << 20


@dataclass
class Costs:
    """Seconds per chunk and micro-batch: forward, input-grad backward, weight-grad backward.

    F = I = 2W: W > 0 matters in every zero-bubble formula, F = I keeps V3's DualPipe formula exact for
    torch's order (it counts (p-1)(F+2I-W); torch's no-overlap order gives (p-1)(2F+I-W)), and the
    costs sit inside the region where ZB1P's (p-1)(F+B-2W) holds (it needs W < I). 100 ms per F keeps
    torch's ~1-2 ms runtime cost per op (python, gloo, a loaded 2-core machine) under 10% of the bubbles."""
    F: float = 0.10
    I: float = 0.10  # noqa: E741
    W: float = 0.05
    act_mib: float = 2.0   # activation one chunk keeps for backward, per micro-batch
    io_numel: int = 256    # elements of the tensor sent between stages (small: memory is the activation)

    @property
    def B(self) -> float:
        return self.I + self.W

    @property
    def act_numel(self) -> int:
        return int(self.act_mib * MiB) // 4


# -- the synthetic stage -------------------------------------------------------------------------------
_EVENTS: list[tuple] = []     # (kind, stage, microbatch, start, end) of this process
_SCALE = [1.0]                # multiplies every cost; the warm-up step runs with a small one
_CURSOR: list = [None]        # where the next op's time starts: set when torch hands the stage an action
_clock = time.perf_counter


def _hold(kind: str, stage: int, mb: int, seconds: float) -> None:
    """Let the op last `seconds` from the cursor (the action's start, or the end of the previous op
    of the same action: a full backward runs W then I), then record it and move the cursor."""
    t0 = _CURSOR[0] if _CURSOR[0] is not None else _clock()
    left = t0 + seconds * _SCALE[0] - _clock()
    if left > 0:
        time.sleep(left)
    t1 = _clock()
    _EVENTS.append((kind, stage, mb, t0, t1))
    _CURSOR[0] = t1


class _InputPath(torch.autograd.Function):
    """Forward: F, and an activation of act_numel floats saved for backward. Backward: I."""

    @staticmethod
    def forward(ctx, x, stage):
        mb = int(x[0, 0].item())
        act = torch.full((stage.costs.act_numel,), 1.0)  # touched, so resident
        ctx.save_for_backward(act)
        ctx.stage, ctx.mb = stage, mb
        _hold("F", stage.index, mb, stage.costs.F)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        ctx.saved_tensors  # noqa: B018  (the activation is needed here, as a real backward would)
        _hold("I", ctx.stage.index, ctx.mb, ctx.stage.costs.I)
        return g, None


class _WeightPath(torch.autograd.Function):
    """Forward: free (F is charged to the input path). Backward: W, on the weight-only branch."""

    @staticmethod
    def forward(ctx, w, stage, mb):
        ctx.stage, ctx.mb = stage, mb
        return w.clone()

    @staticmethod
    def backward(ctx, g):
        _hold("W", ctx.stage.index, ctx.mb, ctx.stage.costs.W)
        return g, None, None


def _timed(method):
    def run(self, *args, **kwargs):
        _CURSOR[0] = _clock()
        try:
            return method(self, *args, **kwargs)
        finally:
            _CURSOR[0] = None
    return run


def _timed_stage_class():
    """PipelineStage whose compute actions start the op clock when torch hands them over, so torch's
    per-op python work inside the action (autograd graph walks of the split backward, bookkeeping)
    is part of F, I, W, as it would be hidden under GPU kernels; what is left as idle is waiting for
    data, the schedule loop and the p2p calls."""
    from torch.distributed.pipelining import PipelineStage

    class TimedStage(PipelineStage):
        forward_one_chunk = _timed(PipelineStage.forward_one_chunk)
        backward_one_chunk = _timed(PipelineStage.backward_one_chunk)
        backward_weight_one_chunk = _timed(PipelineStage.backward_weight_one_chunk)

    return TimedStage


class SyntheticStage(nn.Module):
    """y = InputPath(x) * WeightPath(w) with w = 1: y carries x's values (its first element is the
    micro-batch index, so every op knows which micro-batch it serves), the input gradient runs only
    through InputPath (I) and the weight gradient only through WeightPath (W)."""

    def __init__(self, index: int, costs: Costs):
        super().__init__()
        self.index, self.costs = index, costs
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        if not x.requires_grad:
            # The first stage's input needs no gradient; make it a leaf that does, so that stage has
            # the same F + I + W as every other (a real first stage, the embedding, has no I).
            x = x.detach().requires_grad_()
        mb = int(x[0, 0].item())
        return _InputPath.apply(x, self) * _WeightPath.apply(self.w, self, mb)


# -- closed forms ------------------------------------------------------------------------------------
# The formulas are the schedule table's (parallel/pp_schedules.py, one row per schedule, as V3 Table 2);
# these are the labels this benchmark's results carry for them.
FORMULAS = {
    "gpipe": "(p-1)(F+B) [GPipe; V3 Table 2, 1F1B]",
    "1f1b": "(p-1)(F+B) [GPipe; V3 Table 2, 1F1B]",
    "interleaved_1f1b": "(p-1)(F+B) beside v*m*(F+B) busy, i.e. fraction (p-1)/(v*m+p-1) [Megatron]",
    "zb1p": "(p-1)(F+B-2W) [V3 Table 2, ZB1P]",
    "dualpipev": "(p-1)(F&B+B-3W), F&B=F+B [V3 Table 2, DualPipe folded to p=PP/2 ranks]",
    "zbv": "(p-1)max(F, F+B-3W) for F = I, m >= 2p [derived here from torch's ZBV order]",
}


def closed_form(name: str, pp: int, m: int, c: Costs, vpp: int = 2) -> dict:
    """Per-device busy time, bubble time and bubble fraction = bubble / (busy + bubble) of one step,
    with F, B = I + W, W the costs of one chunk (stage) and one micro-batch. A rank runs its chunks'
    F and B for every micro-batch; no overlap here, so DualPipe's F&B is F + B."""
    if name not in SCHEDULES:
        raise ValueError(name)
    F, B, W = c.F, c.B, c.W
    busy = chunks_per_rank(name, vpp) * m * (F + B)
    bubble = SCHEDULES[name].bubble(pp, F, B, W)  # no F&B: no overlap
    return {"busy_s": busy, "bubble_s": bubble, "fraction": bubble / (busy + bubble), "formula": FORMULAS[name]}


def closed_form_memory(name: str, pp: int, m: int, vpp: int = 2) -> list[int]:
    """Micro-batch-chunk activations in flight per rank, in units of one chunk's activation for one
    micro-batch (a 1F1B stage is one chunk): the schedule table's counts."""
    if name not in SCHEDULES:
        raise ValueError(name)
    return [SCHEDULES[name].in_flight(pp, m, vpp, r) for r in range(pp)]


# -- torch's own schedule, simulated -------------------------------------------------------------------
def _single_stage_actions(name: str, pp: int, m: int) -> dict[int, list[tuple[str, int, int]]]:
    """The op order ScheduleGPipe / Schedule1F1B._step_microbatches run. (Their pipeline_order is
    for display only, and Schedule1F1B's is off by one micro-batch on the last rank in torch 2.13:
    it forwards micro-batches 1..m there.)"""
    out = {}
    for r in range(pp):
        if name == "gpipe":
            out[r] = [("F", r, i) for i in range(m)] + [("B", r, i) for i in range(m)]
            continue
        warm = min(m, pp - r)  # 1F1B: p - r forwards before the first backward
        acts = [("F", r, i) for i in range(warm)]
        for i in range(m):
            acts.append(("B", r, i))
            if warm + i < m:
                acts.append(("F", r, warm + i))
        out[r] = acts
    return out


def _actions(sched) -> dict[int, list[tuple[str, int, int]]]:
    """torch's pipeline_order as (kind, stage, microbatch) per rank, overlapped pairs expanded."""
    if not hasattr(sched, "pipeline_order_with_comms"):  # GPipe, 1F1B: single stage, own loop
        return _single_stage_actions("gpipe" if type(sched).__name__ == "ScheduleGPipe" else "1f1b",
                                     sched._num_stages, sched._n_microbatches)
    out = {}
    for rank, acts in sched.pipeline_order.items():
        flat = []
        for a in acts:
            if a is None:
                continue
            subs = a.sub_actions or (a,)
            for s in subs:
                kind = s.computation_type.value
                if kind in ("F", "B", "I", "W"):
                    # the forward of an OVERLAP_F_B pair is marked, for simulate()'s `pairs` models
                    flat.append((kind, s.stage_index, s.microbatch_index, int(len(subs) > 1 and kind == "F")))
        out[rank] = flat
    return out


def simulate(actions: dict, c: Costs, total_stages: int, pairs: str = "torch",
             first_stage_skips_i: bool = True) -> dict:
    """Run torch's per-rank action order with the costs and no communication time: each op starts
    when its rank is free and its inputs are there. torch's stage 0 skips I (its input needs no grad)
    and does the whole backward in W; that is modelled (first_stage_skips_i=False: stage 0 like the
    others; no span here changes with it). DualPipeV's OVERLAP_F_B pairs (F of one chunk,
    B of the other), by `pairs`:
      "torch":  torch runs the pair's F then its B; the F starts as soon as its own input is there, but
                both outputs are sent after the pair (torch's _add_send_recv puts the pair's sends after it);
      "atomic": the pair starts when both inputs are there and both outputs leave at its end, i.e. an
                overlapped F&B that here lasts F + B (V3 Table 2's model);
      "split":  F and B are independent ops (outputs leave when each ends).
    Returns per-rank ops, span, bubble fractions and the activations in flight (F adds one; B, or W
    after I, frees it)."""
    dur = {"F": c.F, "B": c.B, "I": c.I, "W": c.W}
    done: dict[tuple, float] = {}
    pos = {r: 0 for r in actions}
    free = {r: 0.0 for r in actions}
    ops = {r: [] for r in actions}
    held: dict[int, tuple] = {}  # rank -> the pair's F, whose output leaves with the pair's B

    def deps_of(kind, s, mb):
        if kind == "F":
            return [("F", s - 1, mb)] if s > 0 else []
        if kind in ("B", "I"):
            return [("F", s, mb)] + ([("BI", s + 1, mb)] if s < total_stages - 1 else [])
        return [("BI", s, mb)]

    while any(pos[r] < len(actions[r]) for r in actions):
        progressed = False
        for r in actions:
            while pos[r] < len(actions[r]):
                kind, s, mb, *flag = actions[r][pos[r]]
                pair_f = bool(flag and flag[0]) and pairs != "split"
                deps = deps_of(kind, s, mb)
                if pair_f and pairs == "atomic":
                    deps += [d for d in deps_of(*actions[r][pos[r] + 1][:3]) if d != ("F", s, mb)]
                if any(d not in done for d in deps):
                    break
                t = max([free[r]] + [done[d] for d in deps])
                d = dur[kind]
                if s == 0 and kind == "I" and first_stage_skips_i:
                    d = 0.0
                elif s == 0 and kind == "W" and first_stage_skips_i:
                    d = c.B
                ops[r].append((kind, s, mb, t, t + d))
                free[r] = t + d
                key = ("BI" if kind in ("B", "I") else kind, s, mb)
                if pair_f:
                    held[r] = key
                else:
                    done[key] = t + d
                    if r in held:  # the pair's B has ended: its F's output is sent now
                        done[held.pop(r)] = t + d
                pos[r] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocks under simulation")
    span = max(free.values())
    frac = {r: 1 - sum(e - b for *_, b, e in ops[r]) / span for r in ops}
    inflight = {}
    for r, acts in actions.items():
        n = peak = 0
        for kind, s, mb, *_ in acts:
            n += {"F": 1, "B": -1, "I": 0, "W": -1}[kind]
            peak = max(peak, n)
        inflight[r] = peak
    return {"span_s": span, "fraction": frac, "inflight": inflight, "ops": ops}


# -- one rank ----------------------------------------------------------------------------------------
def _loss(out, target):
    return out.mean()


def _build(name: str, pp: int, m: int, c: Costs, vpp: int, rank: int):
    """This rank's synthetic PipelineStages (static shapes, so no inference pass) and the schedule."""
    TimedStage = _timed_stage_class()
    total = n_stages(name, pp, vpp)
    example = torch.zeros(1, c.io_numel)
    stages = [TimedStage(SyntheticStage(s, c), s, total, torch.device("cpu"),
                            input_args=(example.clone().requires_grad_(s > 0),),
                            output_args=(example.clone().requires_grad_(True),))
              for s in rank_stages(name, pp, rank, vpp)]
    return stages, build_schedule(name, stages, m, _loss, vpp)


def schedule_actions(name: str, pp: int, m: int, vpp: int = 2) -> dict[int, list[tuple]]:
    """torch's op order on every rank, built in this process on a fake process group of pp ranks
    (nothing runs), for simulate()."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("schedule_actions needs a process without a default process group")
    dist.init_process_group("fake", rank=0, world_size=pp, store=FakeStore())
    try:
        return _actions(_build(name, pp, m, Costs(act_mib=0.0), vpp, 0)[1])
    finally:
        dist.destroy_process_group()


def run_schedule(name: str, pp: int, m: int, c: Costs, vpp: int = 2, repeats: int = 1,
                 warm_scale: float = 0.05) -> dict:
    """Build `name` over this rank's synthetic stages, run one warm-up step (costs scaled by
    warm_scale) and `repeats` measured steps; returns this rank's record (per step: events and peak
    memory; rank 0 also torch's op order)."""
    rank = dist.get_rank()
    stages, sched = _build(name, pp, m, c, vpp, rank)
    x = torch.arange(m, dtype=torch.float32)[:, None].expand(m, c.io_numel).contiguous()
    first = any(st.is_first for st in stages)
    last = any(st.is_last for st in stages)

    def step():
        args = (x,) if first else ()
        kw = {"target": torch.zeros(m), "losses": []} if last else {}
        sched.step(*args, **kw)

    with PeakMemory("cpu"):  # fixes glibc's mmap threshold before the activations are first allocated
        _SCALE[0] = warm_scale
        step()
    _SCALE[0] = 1.0
    steps = []
    for _ in range(repeats):
        _EVENTS.clear()
        dist.barrier()
        with PeakMemory("cpu") as mem:
            step()
        steps.append({"events": list(_EVENTS), "peak_bytes": mem.peak, "end_bytes": mem.end})
    dist.barrier()
    return {"rank": rank, "stages": rank_stages(name, pp, rank, vpp), "steps": steps,
            "act_bytes": c.act_numel * 4, "actions": _actions(sched) if rank == 0 else None}


def _microbatches(m, name: str) -> int:
    return m[name] if isinstance(m, dict) else m


def _rank_main(names, pp, m, costs, vpp, repeats, out_path):
    torch.set_num_threads(1)
    records = {}
    for name in names:
        rec = run_schedule(name, pp, _microbatches(m, name), costs, vpp, repeats)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rec)
        records[name] = gathered
    if dist.get_rank() == 0 and out_path:
        with open(out_path, "w") as f:
            json.dump(records, f)
    return records


def _spawned(rank, world, port, names, m, costs, vpp, repeats, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _rank_main(names, world, m, costs, vpp, repeats, out_path)
    finally:
        dist.destroy_process_group()


def run(names, pp: int = 4, m: int | dict = 8, costs: Costs | None = None, vpp: int = 2,
        repeats: int = 1) -> dict:
    """Spawn pp gloo ranks and run each schedule of `names` (m: micro-batches, or {name: m});
    returns {name: [record per rank]}."""
    costs = costs or Costs()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        mp.start_processes(_spawned, args=(pp, port, list(names), m, costs, vpp, repeats, tmp), nprocs=pp,
                           start_method="spawn")
        with open(tmp) as f:
            return json.load(f)
    finally:
        os.remove(tmp)


# -- analysis ----------------------------------------------------------------------------------------
def analyze(name: str, ranks: list[dict], pp: int, m: int, c: Costs, vpp: int = 2) -> dict:
    """Measured bubble fraction and in-flight activations per rank, beside the closed forms and
    torch's own op order simulated with the same costs. Of several measured steps the one with the
    shortest span is used (load on a shared machine only ever adds time); all spans are kept.

    fraction = 1 - busy / span, span from the step's first op to its last over all ranks, busy the
    rank's own op time: the closed forms are per device, and here every rank does the same work."""
    spans = []
    for k in range(len(ranks[0]["steps"])):
        ev = [e for r in ranks for e in r["steps"][k]["events"]]
        spans.append((max(e[4] for e in ev) - min(e[3] for e in ev), k))
    span, best = min(spans)
    ranks = [{**r, "events": r["steps"][best]["events"], "peak_bytes": r["steps"][best]["peak_bytes"]}
             for r in ranks]
    t0 = min(e[3] for r in ranks for e in r["events"])
    cf = closed_form(name, pp, m, c, vpp)
    mem_cf = closed_form_memory(name, pp, m, vpp)
    actions = {int(k): [tuple(a) for a in v] for k, v in ranks[0]["actions"].items()}
    total = n_stages(name, pp, vpp)
    sim = simulate(actions, c, total)
    # the op costs as they ran (sleep overshoot, load), in the closed form
    kinds = {}
    for r in ranks:
        for e in r["events"]:
            kinds.setdefault(e[0], []).append(e[4] - e[3])
    mean_op = {k: sum(v) / len(v) for k, v in sorted(kinds.items())}
    ran = Costs(F=mean_op["F"], I=mean_op["I"], W=mean_op["W"], act_mib=c.act_mib, io_numel=c.io_numel)
    per_rank = []
    for r in ranks:
        busy = sum(e[4] - e[3] for e in r["events"])
        per_rank.append({
            "rank": r["rank"], "stages": r["stages"],
            "busy_s": busy, "bubble_s": span - busy, "fraction": 1 - busy / span,
            "fraction_closed_form": cf["fraction"],
            "fraction_rel_err": (1 - busy / span - cf["fraction"]) / cf["fraction"],
            "fraction_simulated": sim["fraction"][r["rank"]],
            "op_counts": {k: sum(1 for e in r["events"] if e[0] == k) for k in "FIW"},
            "inflight_measured": r["peak_bytes"] / r["act_bytes"],
            "inflight_measured_all_steps": [st["peak_bytes"] / r["act_bytes"] for st in r["steps"]],
            "inflight_closed_form": mem_cf[r["rank"]],
            "inflight_torch_order": sim["inflight"][r["rank"]],
        })
    mean = sum(p["fraction"] for p in per_rank) / len(per_rank)
    out = {
        "schedule": name, "torch_class": SCHEDULES[name].cls.__name__, "microbatches": m, "stages": total,
        "span_s": span, "spans_all_steps_s": [x for x, _ in spans],
        "span_closed_form_s": cf["busy_s"] + cf["bubble_s"], "span_simulated_s": sim["span_s"],
        "runtime_overhead_s": span - simulate(actions, ran, total)["span_s"],
        "fraction_mean": mean, "fraction_closed_form": cf["fraction"], "formula": cf["formula"],
        "fraction_rel_err": (mean - cf["fraction"]) / cf["fraction"],
        "fraction_closed_form_at_measured_op_costs": closed_form(name, pp, m, ran, vpp)["fraction"],
        "mean_op_s": mean_op,
        "ranks": per_rank,
        "timeline": [{"rank": r["rank"], "events": [(k, s, mb, a - t0, b - t0) for k, s, mb, a, b in r["events"]]}
                     for r in ranks],
    }
    if name == "dualpipev":
        early = simulate(actions, c, total, pairs="split")
        out["fraction_simulated_if_pair_forward_sent_at_once"] = early["fraction"][0]
        out["fraction_simulated_atomic_pairs"] = simulate(actions, c, total, pairs="atomic")["fraction"][0]
    return out


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"F": "#4C72B0", "I": "#DD8452", "W": "#55A868"}
    rows = sum(len(r["timeline"]) for r in results) + len(results)
    fig, ax = plt.subplots(figsize=(16, 0.3 * rows + 1.5))
    y, ticks, labels = 0, [], []
    for res in results:
        for tl in res["timeline"]:
            first_stage = min(e[1] for e in tl["events"])
            for kind, s, mb, a, b in tl["events"]:
                ax.barh(y, b - a, left=a, height=0.8, color=colors[kind], edgecolor="black", linewidth=0.3,
                        hatch="//" if s != first_stage else None)
                ax.text((a + b) / 2, y, str(mb), ha="center", va="center", fontsize=4.5, color="white")
            ticks.append(y)
            labels.append(f"{res['schedule']} r{tl['rank']}")
            y += 1
        ax.text(res["span_s"], y - 1 - len(res["timeline"]) / 2,
                f"  bubble {res['fraction_mean']:.3f}\n  closed form {res['fraction_closed_form']:.3f}",
                va="center", fontsize=7)
        y += 1
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(r["span_s"] for r in results) * 1.12)
    ax.set_xlabel("seconds from the step's first op; number = micro-batch; hatched = the rank's second chunk")
    ax.legend(handles=[Patch(color=colors["F"], label="F forward"), Patch(color=colors["I"], label="I input-grad"),
                       Patch(color=colors["W"], label="W weight-grad (full B = W then I in one autograd call)")],
              loc="upper right", fontsize=7)
    ax.set_title("torch pipeline schedules on synthetic stages (gloo, CPU); one measured step each")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(results: list[dict]) -> None:
    print(f"{'schedule':17s} {'m':>3s} {'measured':>8s} {'closed':>8s} {'torch sim':>9s} {'rel err':>8s} "
          f"{'overhead':>8s}   in flight per rank: measured (closed form)")
    for r in results:
        sim_mean = sum(p["fraction_simulated"] for p in r["ranks"]) / len(r["ranks"])
        mem = " ".join(f"{p['inflight_measured']:.2f}({p['inflight_closed_form']})" for p in r["ranks"])
        print(f"{r['schedule']:17s} {r['microbatches']:3d} {r['fraction_mean']:8.3f} {r['fraction_closed_form']:8.3f} "
              f"{sim_mean:9.3f} {r['fraction_rel_err']:+8.1%} {r['runtime_overhead_s'] * 1e3:6.0f}ms   {mem}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--vpp", type=int, default=2, help="chunks per rank for interleaved_1f1b")
    ap.add_argument("--F", type=float, default=Costs.F, help="forward seconds per chunk and micro-batch")
    ap.add_argument("--I", type=float, default=Costs.I, help="input-grad backward seconds")
    ap.add_argument("--W", type=float, default=Costs.W, help="weight-grad backward seconds")
    ap.add_argument("--act-mib", type=float, default=Costs.act_mib)
    ap.add_argument("--repeats", type=int, default=2, help="measured steps per schedule; the shortest is used")
    ap.add_argument("--schedules", nargs="*", default=list(SCHEDULES))
    ap.add_argument("--out", default=os.path.join(here, "results", "pp_schedules.json"))
    ap.add_argument("--png", default=os.path.join(here, "results", "pp_timeline.png"))
    args = ap.parse_args()
    costs = Costs(F=args.F, I=args.I, W=args.W, act_mib=args.act_mib)
    t_start = time.time()
    if "LOCAL_RANK" in os.environ:  # under torchrun
        if int(os.environ["WORLD_SIZE"]) != args.pp:
            raise SystemExit(f"torchrun started {os.environ['WORLD_SIZE']} ranks; --pp is {args.pp}")
        dist.init_process_group("gloo")
        try:
            raw = _rank_main(args.schedules, args.pp, args.microbatches, costs, args.vpp, args.repeats, None)
        finally:
            dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return
    else:
        raw = run(args.schedules, args.pp, args.microbatches, costs, args.vpp, args.repeats)
    results = [analyze(n, raw[n], args.pp, args.microbatches, costs, args.vpp) for n in args.schedules]
    report(results)
    from _machine import cpu_name
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    out = {
        "benchmark": "pp_schedules",
        "parameters": {"pp": args.pp, "microbatches": args.microbatches, "vpp": args.vpp, "repeats": args.repeats,
                       **asdict(costs), "B": costs.B},
        "notes": [
            "F, I, W: seconds one chunk (stage) spends per micro-batch in forward, input-grad and weight-grad "
            "backward; B = I + W is the full backward. No compute/communication overlap: F&B = F + B.",
            "fraction = 1 - busy/span; span = first op to last op of the step over all ranks, busy = the rank's "
            "own op time; the measured step is the shortest of `repeats`.",
            "closed forms: V3 Table 2 (1F1B, ZB1P, DualPipe folded to p = PP/2 ranks for DualPipeV), GPipe, "
            "Megatron (interleaved); zbv derived here from torch's order (see formula).",
            "torch sim: torch's own op order run with the nominal costs and no runtime cost; runtime_overhead_s: "
            "measured span minus that order run with the measured op costs (python, gloo, load of the machine).",
            "inflight = peak RSS above the step's start / one chunk's activation for one micro-batch "
            "(parallel.memory.PeakMemory, after a warm-up step).",
            "torch's first stage skips I in split-backward schedules and does the whole backward in its W op.",
            "torch sends both outputs of DualPipeV's OVERLAP_F_B pair after the pair: that is what makes its "
            "no-overlap bubble V3's (p-1)(F&B+B-3W); sending the F's output at once would give "
            "fraction_simulated_if_pair_forward_sent_at_once.",
        ],
        "machine": {"cpu": cpu_name(), "uname": " ".join(platform.uname()), "cpu_count": os.cpu_count(),
                    "load_average_at_end": load},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": " ".join(["python benchmarks/pp_schedules.py", *sys.argv[1:]]),
        "wall_s": time.time() - t_start,
        "schedules": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    plot(results, args.png)
    print(f"wrote {args.out} and {args.png} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
