"""Exposed expert communication with and without overlap (parallel/overlap.py), on gloo ranks on CPU with the
simulated link of `parallel.comm` (DESIGN.md decision 8):

    python benchmarks/overlap.py            # writes benchmarks/results/overlap_cpu.json and the timeline PNG

Cases `epE_ppP`: ep2 and ep4 at pp = 1 (micro-batch pairing, `overlapped_losses`; dp = ep, so FSDP2 shards the
dense weights) and ep2 x pp2 under DualPipeV (its F&B pairs, `FBRunner`; dp2, FSDP2 ZeRO-2, each of the 4
stage chunks holding two MoE layers, as V3's 61 layers over DualPipe's 32 chunks). A V3-shaped model wide
enough that compute is not noise (dim 512, MoE in every layer, no MTP, whose own dispatch runs blocking in the
loss part), `--micro` micro-batches per step on each rank. First the serial step without a link measures the
compute time and the all-to-all bytes per step; the bandwidth is then set so that the link time of a step
equals that compute time (latency `--latency`). Then, under the link, the serial step and the overlapped step
each `--steps` times: the step time (median) and, per rank and step, the time blocked in all-to-all waits
(exposed) over the time they were in flight (link), max over ranks, and the part of it spent before the
peers had joined the collective (`*_peer_wait_s`, `*_exposed_link_only_fraction` without it: with 4 ranks on
2 cores a peer is often not running). `overlap_compute_step_s`: the overlapped
step without the link (what cutting the step into parts costs). For DualPipeV the overlapped step runs the
default runner (weight gradients deferred, `FBRunner.defer_weights` "all") and also, as rows `overlap_w_experts`
and `overlap_w_none`, with only the routed experts' W deferred and with none. One more overlapped step is
traced (every rank's actions and all-to-alls: `timeline`, and the PNG), and its exposure split into the
all-to-alls issued inside F&B pairs and those of lone warm-up forwards and cool-down backwards, which have no
partner (the planner's DualPipeV term, plan/planner.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
sys.path.insert(0, here)

from _machine import cpu_name  # noqa: E402

MODEL = dict(dim=512, n_layers=4, n_dense_layers=0, n_heads=8, q_lora_rank=128, kv_lora_rank=64,
             qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, moe_inter_dim=256, n_routed_experts=8,
             n_activated_experts=2, n_expert_groups=1, n_limited_groups=1, n_mtp=0, vocab_size=2048)


def _rank(rank, world, port, args, out_path, pp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _measure(args, world, pp)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _measure(args, world: int, pp: int) -> dict:
    import parallel
    from model import build_model, preset
    from model.transformer import IGNORE_INDEX
    from parallel import ParallelConfig, build_mesh, comm, parallelize
    from parallel.engine import SingleStage, build_engine
    from parallel.overlap import overlapped_losses

    ep = world // pp
    # at pp > 1 two layers per stage chunk, as V3's 61 layers over DualPipe's 32 chunks (PP16 x 2)
    cfg = preset("tiny-deepseek-v3", **{**MODEL, "n_layers": MODEL["n_layers"] if pp == 1 else 4 * pp},
                 max_seq_len=args.seq)
    mesh = build_mesh(ParallelConfig(ep=ep, pp=pp, node_size=world))
    rows = args.micro * args.mbs   # this rank's rows: --micro micro-batches through its engine per step
    if pp == 1:
        net = parallelize(build_model(cfg, device="meta").train(), mesh)
        parallel.init_parallel_weights(net, mesh, seed=0)
        engine = SingleStage(net, mesh, args.mbs)
        nets = [net]
    else:   # DualPipeV: the same global batch over dp = ep ranks per stage, one engine per mode; every stage
        # holds MoE layers (the cost-balanced split would leave the last stage, with the head, none: its chunks
        # would have no all-to-all to pair, and the F&B pairs of its rank nothing to hide)
        per = cfg.n_layers // (2 * pp)
        split = [list(range(i * per, (i + 1) * per)) for i in range(2 * pp)]
        pipes = {mode: build_engine(build_model(cfg, device="meta").train(), mesh, micro_batch_size=args.mbs,
                                    seq_len=args.seq, schedule="dualpipev", n_microbatches=rows // args.mbs,
                                    layer_split=split, overlap=mode) for mode in ("none", "ep")}
        nets = [s for p in pipes.values() for s in p.stages]
    g = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, cfg.vocab_size, (rows, args.seq), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX

    def step(overlap: bool):
        for n in nets:
            n.zero_grad(set_to_none=True)
        comm.STATS.reset()
        comm.LINK.reset()
        dist.barrier()
        t0 = time.perf_counter()
        if pp > 1:
            pipes["ep" if overlap else "none"].step(tokens, labels)
        elif overlap:
            overlapped_losses(net, mesh, args.mbs, tokens, labels)
        else:
            engine._losses(tokens, labels, {}, backward=True)
        dt = time.perf_counter() - t0
        snap = comm.LINK.snapshot()
        stats = comm.STATS.snapshot()
        nbytes = sum(v["bytes"] for k, v in stats.items() if k.split("/")[0] in comm.LINK.labels)
        calls = sum(v["calls"] for k, v in stats.items() if k.split("/")[0] in comm.LINK.labels)
        return dt, snap, nbytes, calls

    def worst(x: float, op=dist.ReduceOp.MAX) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return t.item()

    step(False)  # warm-up
    base = [step(False) for _ in range(args.steps)]
    compute_s = worst(statistics.median(b[0] for b in base))
    step(True)
    parts_s = worst(statistics.median(step(True)[0] for _ in range(args.steps)))  # the parts' own cost, no link
    nbytes, calls = base[0][2], base[0][3]
    # link time of a step = compute time of a step: latency per call + bytes / bandwidth (max over ranks)
    bw = worst(nbytes / max(compute_s - calls * args.latency, 1e-3 * compute_s))
    bw = worst(bw, dist.ReduceOp.MIN)
    out = {"ep": ep, "pp": pp, "n_layers": cfg.n_layers, "schedule": "dualpipev" if pp > 1 else None, "world": world,
           "micro_batches": args.micro, "micro_batch_size": args.mbs, "seq": args.seq,
           "compute_step_s": compute_s, "overlap_compute_step_s": parts_s, "a2a_bytes_per_step": nbytes,
           "a2a_calls_per_step": calls,
           "latency_s": args.latency, "bytes_per_s": bw}
    modes = [("serial", False, None), ("overlap", True, None)]
    if pp > 1:   # the default runner's weight gradients deferred into the all-to-alls' flight (FBRunner.defer_weights
        # "all"); also with the routed experts' parts' only deferred, and with none (each part's backward whole)
        default = pipes["ep"].fb_runner.defer_weights
        modes += [(f"overlap_w_{d}", True, d) for d in ("experts", "none") if d != default]
    with comm.simulate_link(args.latency, bw):
        for name, overlap, defer in modes:
            if pp > 1:
                pipes["ep"].fb_runner.defer_weights = defer or default
            step(overlap)  # warm-up under the link
            runs = [step(overlap) for _ in range(args.steps)]
            out[f"{name}_step_s"] = worst(statistics.median(r[0] for r in runs))
            out[f"{name}_link_s"] = worst(statistics.median(r[1]["link_s"] for r in runs))
            out[f"{name}_exposed_s"] = worst(statistics.median(r[1]["exposed_s"] for r in runs))
            out[f"{name}_exposed_fraction"] = worst(statistics.median(r[1]["exposed_fraction"] for r in runs))
            # of the exposed time, blocked before the peers joined (a late or descheduled peer, not the link)
            out[f"{name}_peer_wait_s"] = worst(statistics.median(r[1]["peer_s"] for r in runs))
            out[f"{name}_exposed_link_only_fraction"] = worst(statistics.median(
                (r[1]["exposed_s"] - r[1]["peer_s"]) / r[1]["link_s"] for r in runs))
        if pp > 1:   # one more overlapped step (the default runner), traced: every rank's actions and all-to-alls
            pipe = pipes["ep"]
            pipe.fb_runner.defer_weights = default
            pipe.fb_runner.trace, comm.LINK.events = [], []
            dist.barrier()
            t0 = time.perf_counter()
            step(True)
            mine = {"rank": dist.get_rank(), "pp": mesh.dims.coords(mesh.rank)["pp"],
                    "actions": [(k, subs, a - t0, b - t0) for k, subs, a, b in pipe.fb_runner.trace],
                    "a2a": [tuple(x - t0 for x in e) for e in comm.LINK.events]}
            pipe.fb_runner.trace, comm.LINK.events = None, None
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            out["timeline"] = ranks
            # the traced step's all-to-alls split by where they were issued: inside an F&B pair or in a lone
            # forward / backward (warm-up, cool-down), over every rank: what the planner's DualPipeV term uses
            sums = {"pair": [0.0, 0.0], "alone": [0.0, 0.0]}
            for r in ranks:
                pairs = [(a, b) for k, _, a, b in r["actions"] if k == "F&B"]
                for issued, done, w0, w1 in r["a2a"]:
                    where = "pair" if any(a <= issued <= b for a, b in pairs) else "alone"
                    sums[where][0] += done - issued
                    sums[where][1] += w1 - w0
            link = sum(v[0] for v in sums.values())
            out["traced_link_share_in_pairs"] = sums["pair"][0] / link
            out["traced_exposed_fraction_in_pairs"] = sums["pair"][1] / sums["pair"][0]
            out["traced_exposed_fraction_alone"] = sums["alone"][1] / sums["alone"][0]
            out["traced_exposed_fraction"] = (sums["pair"][1] + sums["alone"][1]) / link
    out["exposed_fraction"] = out["overlap_exposed_fraction"]
    out["speedup"] = out["serial_step_s"] / out["overlap_step_s"]
    if pp > 1:
        out["defer_weights"] = default
        for name, _, defer in modes[2:]:
            out[f"speedup_w_{defer}"] = out["serial_step_s"] / out[f"{name}_step_s"]
    return out


def plot(case: str, c: dict, path: str) -> None:
    """One overlapped DualPipeV step: per rank, the actions (F, B, F&B pairs) on the compute thread and, below
    them, each all-to-all from issue to completion with the time the compute thread waited on it in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"F": "#4C72B0", "B": "#DD8452", "I": "#DD8452", "W": "#937860", "F&B": "#8172B2", "a2a": "#55A868",
              "exposed": "#C44E52"}
    ranks = sorted(c["timeline"], key=lambda r: (r["pp"], r["rank"]))
    fig, ax = plt.subplots(figsize=(16, 1.0 * len(ranks) + 1.6))
    ticks, labels = [], []
    for i, r in enumerate(ranks):
        y = 2 * i
        for kind, subs, a, b in r["actions"]:
            ax.barh(y, b - a, left=a, height=0.8, color=colors[kind], edgecolor="black", linewidth=0.3)
            ax.text((a + b) / 2, y, ";".join(f"{s}.{m}" for s, m in subs), ha="center", va="center", fontsize=4,
                    color="white", rotation=90 if b - a < 0.08 else 0)
        for k, (issued, done, w0, w1) in enumerate(r["a2a"]):
            lane = y + 0.75 + 0.22 * (k % 2)   # alternate sub-lanes so that back-to-back transfers stay apart
            ax.barh(lane, done - issued, left=issued, height=0.2, color=colors["a2a"], linewidth=0)
            if w1 - w0 > 1e-4:
                ax.barh(lane, w1 - w0, left=w0, height=0.2, color=colors["exposed"], linewidth=0)
        ticks += [y, y + 0.86]
        labels += [f"rank {r['rank']} (pp {r['pp']}) compute", "all-to-all"]
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the step's start; label = stage.micro-batch (an F&B pair: forward;backward)")
    ax.legend(handles=[Patch(color=colors[k], label=t) for k, t in (
        ("F", "forward"), ("B", "backward (I: input gradients)"), ("W", "deferred weight gradients"),
        ("F&B", "overlapped forward + backward pair"),
        ("a2a", "all-to-all in flight (simulated link)"), ("exposed", "compute thread waiting on it"))],
        loc="upper right", fontsize=7, ncols=5)
    ax.set_title(f"{case}: one overlapped DualPipeV step (gloo, CPU, simulated link); exposed "
                 f"{c['overlap_exposed_fraction']:.0%} of link time (serial {c['serial_exposed_fraction']:.0%})")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["ep2_pp1", "ep4_pp1", "ep2_pp2"],
                    help="epE_ppP: ep E at pp P (P > 1: DualPipeV with its F&B overlap; world E x P)")
    ap.add_argument("--micro", type=int, default=16, help="micro-batches per step on each rank (each pipeline)")
    ap.add_argument("--mbs", type=int, default=1, help="rows per micro-batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--latency", type=float, default=50e-6, help="simulated latency per collective, seconds")
    ap.add_argument("--out", default=os.path.join(here, "results", "overlap_cpu.json"))
    args = ap.parse_args()
    cases = {}
    for case in args.cases:
        ep, pp = (int(x) for x in case.removeprefix("ep").split("_pp"))
        path = f"{args.out}.{case}.tmp"
        mp.start_processes(_rank, args=(ep * pp, _port(), args, path, pp), nprocs=ep * pp, start_method="spawn")
        with open(path) as f:
            cases[case] = json.load(f)
        os.remove(path)
        c = cases[case]
        for defer in ("experts", "none"):
            if f"speedup_w_{defer}" in c:
                print(f"{case}: defer_weights={defer}: overlap {c[f'overlap_w_{defer}_step_s']:.3f} s (exposed "
                      f"{c[f'overlap_w_{defer}_exposed_fraction']:.0%}), x{c[f'speedup_w_{defer}']:.2f}")
        print(f"{case}: compute {c['compute_step_s']:.3f} s/step; serial {c['serial_step_s']:.3f} s "
              f"(exposed {c['serial_exposed_fraction']:.0%}), overlap {c['overlap_step_s']:.3f} s "
              f"(exposed {c['overlap_exposed_fraction']:.0%}, {c['overlap_exposed_link_only_fraction']:.0%} without "
              f"waiting on peers), x{c['speedup']:.2f}", flush=True)
    for case, c in cases.items():
        if "timeline" in c:
            png = os.path.join(os.path.dirname(args.out), f"overlap_timeline_{case}.png")
            plot(case, c, png)
            print("wrote", png)
    result = {"command": "python " + " ".join([os.path.relpath(__file__, os.path.dirname(here))] + sys.argv[1:]),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "threads_per_rank": 1},
              "model": {**MODEL, "preset": "tiny-deepseek-v3"},
              "link": "parallel.comm.simulate_link: completion >= issue + latency + bytes / bandwidth, "
                      "bandwidth set so that link time per step = the serial step's compute time",
              "target_exposed_fraction": 0.2, "cases": cases}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
