"""Exposed expert communication with and without the pp = 1 overlap (parallel/overlap.py), on gloo ranks on CPU
with the simulated link of `parallel.comm` (DESIGN.md decision 8):

    python benchmarks/overlap.py            # writes benchmarks/results/overlap_cpu.json

Per case (ep2, ep4 at pp = 1; dp = ep, so FSDP2 shards the dense weights): a V3-shaped model wide enough that
compute is not noise (dim 512, MoE in every layer, no MTP, whose own dispatch runs blocking in the loss part),
gradient accumulation over `--micro` micro-batches. First the serial step without a link measures the compute
time and the all-to-all bytes per step; the bandwidth is then set so that the link time of a step equals that
compute time (latency `--latency`). Then, under the link, the serial step (SingleStage's loop) and the
overlapped step (`overlapped_losses`) each `--steps` times: the step time (median) and, per rank and step,
the time blocked in all-to-all waits (exposed) over the time they were in flight (link), max over ranks.
`overlap_compute_step_s`: the overlapped step without the link (what cutting the step into parts costs:
more autograd calls, and FSDP2 gathering a block's parameters again for each part, since the other
micro-batch's backward parts end with FSDP2's callback that reshards every unit).
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


def _rank(rank, world, port, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _measure(args, world)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _measure(args, ep: int) -> dict:
    import parallel
    from model import build_model, preset
    from model.transformer import IGNORE_INDEX
    from parallel import ParallelConfig, build_mesh, comm, parallelize
    from parallel.engine import SingleStage
    from parallel.overlap import overlapped_losses

    cfg = preset("tiny-deepseek-v3", **MODEL, max_seq_len=args.seq)
    mesh = build_mesh(ParallelConfig(ep=ep, node_size=ep))
    net = parallelize(build_model(cfg, device="meta").train(), mesh)
    parallel.init_parallel_weights(net, mesh, seed=0)
    engine = SingleStage(net, mesh, args.mbs)
    g = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, cfg.vocab_size, (args.micro * args.mbs, args.seq), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX

    def step(overlap: bool):
        net.zero_grad(set_to_none=True)
        comm.STATS.reset()
        comm.LINK.reset()
        dist.barrier()
        t0 = time.perf_counter()
        if overlap:
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
    out = {"ep": ep, "world": ep, "micro_batches": args.micro, "micro_batch_size": args.mbs, "seq": args.seq,
           "compute_step_s": compute_s, "overlap_compute_step_s": parts_s, "a2a_bytes_per_step": nbytes,
           "a2a_calls_per_step": calls,
           "latency_s": args.latency, "bytes_per_s": bw}
    with comm.simulate_link(args.latency, bw):
        for name, overlap in (("serial", False), ("overlap", True)):
            step(overlap)  # warm-up under the link
            runs = [step(overlap) for _ in range(args.steps)]
            out[f"{name}_step_s"] = worst(statistics.median(r[0] for r in runs))
            out[f"{name}_link_s"] = worst(statistics.median(r[1]["link_s"] for r in runs))
            out[f"{name}_exposed_s"] = worst(statistics.median(r[1]["exposed_s"] for r in runs))
            out[f"{name}_exposed_fraction"] = worst(statistics.median(r[1]["exposed_fraction"] for r in runs))
    out["exposed_fraction"] = out["overlap_exposed_fraction"]
    out["speedup"] = out["serial_step_s"] / out["overlap_step_s"]
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, default=16, help="micro-batches per step")
    ap.add_argument("--mbs", type=int, default=1, help="rows per micro-batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--latency", type=float, default=50e-6, help="simulated latency per collective, seconds")
    ap.add_argument("--out", default=os.path.join(here, "results", "overlap_cpu.json"))
    args = ap.parse_args()
    cases = {}
    for ep in args.ep:
        path = f"{args.out}.ep{ep}.tmp"
        mp.start_processes(_rank, args=(ep, _port(), args, path), nprocs=ep, start_method="spawn")
        with open(path) as f:
            cases[f"ep{ep}_pp1"] = json.load(f)
        os.remove(path)
        c = cases[f"ep{ep}_pp1"]
        print(f"ep{ep}: compute {c['compute_step_s']:.3f} s/step; serial {c['serial_step_s']:.3f} s "
              f"(exposed {c['serial_exposed_fraction']:.0%}), overlap {c['overlap_step_s']:.3f} s "
              f"(exposed {c['overlap_exposed_fraction']:.0%}), x{c['speedup']:.2f}", flush=True)
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
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
