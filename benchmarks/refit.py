"""The in-memory weight refresh (parallel/refit.py): measured on CPU for the tiny models, estimated for V3.

1. Tiny (preset tiny-deepseek-v3, 4 gloo ranks on this CPU): for each training -> rollout layout pair of
   the tests, the seconds per refresh (median of `--repeats`, slowest rank) and the bytes every rank sent and
   received, measured (what `Refit.refresh` packed) beside `refit_bytes` (the formula).
2. V3 (preset deepseek-v3), never built: the parameter layouts of one meta-device model parallelised on
   a fake mesh (no process group, nothing allocated) give every rank's boxes by `analytic_side`; the
   training layout is the planner's best at PP16 x EP64 on 1024 H100s (its tp, dp, schedule and layer
   split); the rollout EP64 on the same 1024 GPUs as SGLang runs it (attention and dense layers replicated,
   DP-attention; routed experts over 64 ranks, 16 replicas). `refit_bytes` gives each rank's bytes within
   and across nodes; the planner's link model (plan.hardware: NVLink and InfiniBand per GPU and direction,
   both at once, as the planner times V3's dispatch) turns the busiest rank's bytes into seconds.

    python benchmarks/refit.py [--repeats 5] [--skip-v3] [--skip-tiny]

Writes benchmarks/results/refit.json (machine, torch version, command)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import cpu_name  # noqa: E402

from model import build_model, preset  # noqa: E402

SEQ = 8
CASES = [  # (training layout, rollout layout, rollout replicated over dp, rollout dtype)
    (dict(pp=2, ep=2), dict(ep=4), False, "bfloat16"),
    (dict(pp=2, tp=2, node_size=2), dict(tp=2, node_size=2), True, "bfloat16"),  # nodes of 2: relayed
    (dict(tp=2, ep=2), dict(ep=4), False, "bfloat16"),
    (dict(pp=4), dict(), False, "bfloat16"),
]


# -- 1. tiny, measured ---------------------------------------------------------------------------------
def _tiny_rank(rank: int, world: int, port: int, case: int, repeats: int, n_layers: int, bucket: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from parallel import ParallelConfig, build_engine, build_mesh, init_parallel_weights, parallelize
        from parallel.refit import Refit
        train, roll, replicated, dtype_name = CASES[case]
        cfg = preset("tiny-deepseek-v3", n_layers=n_layers)
        src_mesh = build_mesh(ParallelConfig(**train))
        n_micro = max(2, src_mesh.dims.pp) if src_mesh.dims.pp > 1 else 1
        engine = build_engine(build_model(cfg, device="meta").train(), src_mesh, micro_batch_size=1, seq_len=SEQ,
                              n_microbatches=n_micro)
        dst_mesh = build_mesh(ParallelConfig(**roll))
        # replicas over dp: parallelize shards every dp > 1 model, so dp is hidden from it (tests/test_refit.py)
        view = dataclasses.replace(dst_mesh, dims=dataclasses.replace(dst_mesh.dims, dp=1)) if replicated else dst_mesh
        net = parallelize(build_model(cfg, device="meta").eval(), view)
        init_parallel_weights(net, view, seed=7)
        net.to(getattr(torch, dtype_name))
        t0 = time.perf_counter()
        refit = Refit(engine.stages, src_mesh, [net], dst_mesh, bucket_bytes=bucket)
        plan_s = time.perf_counter() - t0
        runs = [refit.refresh() for _ in range(repeats)]
        seconds = torch.tensor([statistics.median(r["seconds"] for r in runs)], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        mine = {k: runs[-1][k] for k in ("sent", "received", "local", "rounds", "peak_buffer_bytes")}
        every = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            exp = refit.expected
            row = {"training": train, "rollout": roll, "rollout_replicated_over_dp": replicated,
                   "rollout_dtype": dtype_name, "bucket_bytes": bucket, "plan_seconds_rank0": round(plan_s, 4),
                   "refresh_seconds_median_slowest_rank": round(float(seconds), 5),
                   "sent_bytes": [e["sent"] for e in every], "sent_bytes_formula": exp["send"],
                   "received_bytes": [e["received"] for e in every], "received_bytes_formula": exp["recv"],
                   "local_bytes": [e["local"] for e in every], "rounds": [e["rounds"] for e in every],
                   "peak_buffer_bytes": [e["peak_buffer_bytes"] for e in every],
                   "rollout_bytes_per_rank": [sum(t.box_of(r).numel * t.dtype.itemsize for t in refit.dst.values()
                                                  if t.box_of(r) is not None) for r in range(world)]}
            row["measured_equals_formula"] = (row["sent_bytes"] == exp["send"] and row["received_bytes"] == exp["recv"]
                                              and row["local_bytes"] == exp["local"])
            Path(out).write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def tiny(repeats: int, n_layers: int, bucket: int) -> list[dict]:
    rows = []
    for case in range(len(CASES)):
        with tempfile.TemporaryDirectory() as d, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            out = str(Path(d) / "row.json")
            mp.start_processes(_tiny_rank, args=(4, port, case, repeats, n_layers, bucket, out), nprocs=4,
                               start_method="spawn")
            rows.append(json.loads(Path(out).read_text()))
            print(json.dumps(rows[-1]), flush=True)
    return rows


# -- 2. V3, estimated ------------------------------------------------------------------------------------
def fake_mesh(dims):
    """A Mesh of groups without process groups, at rank 0 (test_checkpoint's trick): parallelize then only
    records layouts and slices meta tensors; every rank's box comes from the layouts (`layout_box`)."""
    from parallel.comm import Group
    from parallel.mesh import Mesh
    sizes = {"pp": dims.pp, "dp": dims.dp, "tp": dims.tp, "edp": dims.edp, "ep": dims.ep,
             "ep_inter": dims.ep_nodes, "ep_intra": dims.ep // dims.ep_nodes, "dp_tp": dims.dp * dims.tp,
             "world": dims.world}
    groups = {}
    for g, n in sizes.items():
        groups[g] = Group(g, None, tuple(range(n)), dims.node_size)
        groups[g].__dict__["rank"] = 0
    return Mesh(dims, groups, {})


def v3_estimate(gpus: int, gpu: str, global_batch: int, seq_len: int) -> dict:
    from parallel import parallelize
    from parallel.mesh import ParallelDims
    from parallel.pp_schedules import rank_stages
    from parallel.refit import analytic_side, model_tensors, refit_bytes
    from plan.planner import GB, Cluster, model_shape, plan

    t0 = time.perf_counter()
    cfg = preset("deepseek-v3")
    cluster = Cluster(gpu, gpus)
    best = plan(model_shape(build_model(cfg, device="meta"), seq_len), cluster, global_batch,
                pin={"pp": 16, "ep": 64})[0]
    lay = best.layout
    node = cluster.gpus_per_node
    src_dims = ParallelDims(world=gpus, pp=lay.pp, dp=lay.dp, tp=lay.tp, ep=lay.ep, sp=lay.tp > 1, node_size=node)
    dst_dims = ParallelDims(world=gpus, pp=1, dp=gpus, tp=1, ep=64, sp=False, node_size=node)

    # the trainer: fp32 master weights, FSDP2 over dp (the runtime shards every dp > 1 model); stages cut as
    # the planner cut them (best.layer_split: layers per global stage), held by pp ranks as the schedule says
    src_net = parallelize(build_model(cfg, device="meta"), fake_mesh(dataclasses.replace(src_dims, dp=1)))
    every = model_tensors(src_net, torch.float32, fsdp=True)
    edges = [0]
    for n in best.layer_split:
        edges.append(edges[-1] + n)
    n_stages = len(best.layer_split)
    vpp = n_stages // lay.pp

    def stage_names(sid: int) -> set:
        names = {n for n in every if n.startswith("layers.") and edges[sid] <= int(n.split(".")[1]) < edges[sid + 1]}
        if sid == 0:
            names |= {n for n in every if n.startswith("embed.")}
        if sid == n_stages - 1:  # head, final norm, MTP and its copy of the embedding (V3 §2.2)
            names |= {n for n in every if n.startswith(("norm.", "head.", "mtp.", "embed."))}
        return names

    def src_of(pp_i: int) -> dict:
        names = set().union(*(stage_names(s) for s in rank_stages(lay.schedule, lay.pp, pp_i, vpp)))
        return {n: every[n] for n in names}
    src = analytic_side(src_of, src_dims)

    # the rollout: bf16, tp1 x ep64, dense replicated on every rank, experts replicated over the 16 edp groups
    dst_net = parallelize(build_model(cfg, device="meta"), fake_mesh(dataclasses.replace(dst_dims, dp=1)))
    dst_t = {n: (lay_, torch.float32 if n.endswith("gate.bias") else torch.bfloat16, None)
             for n, (lay_, _, _) in model_tensors(dst_net).items()}
    dst = analytic_side(lambda pp_i: dst_t, dst_dims)
    built = time.perf_counter() - t0
    nvl, ib = cluster.nvlink_gbps * GB, cluster.ib_gbps * GB

    def seconds(b: dict, r: int) -> float:
        intra_s, intra_r = b["send"][r] - b["send_cross_node"][r], b["recv"][r] - b["recv_cross_node"][r]
        return max(b["send_cross_node"][r] / ib, b["recv_cross_node"][r] / ib, intra_s / nvl, intra_r / nvl)
    one_hop = refit_bytes(src, dst, gpus, node, relay=False)
    one_hop_s = max(seconds(one_hop, r) for r in range(gpus))
    b = refit_bytes(src, dst, gpus, node)
    per_rank = [seconds(b, r) for r in range(gpus)]
    worst = max(range(gpus), key=lambda r: per_rank[r])
    roll_bytes = [0] * gpus
    for t in dst.values():
        for box, ranks in t.boxes.items():
            for r in ranks:
                roll_bytes[r] += box.numel * t.dtype.itemsize

    def stats(xs):
        return {"min": min(xs), "max": max(xs), "mean": sum(xs) / len(xs)}
    return {
        "model": "deepseek-v3", "gpus": gpus, "gpu": gpu, "nvlink_gbps": cluster.nvlink_gbps,
        "ib_gbps": cluster.ib_gbps, "gpus_per_node": node,
        "training": {"layout": lay.label(), "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep,
                     "schedule": lay.schedule, "layers_per_stage": best.layer_split,
                     "weights": "fp32 master, FSDP2 over dp (experts over edp)",
                     "planner_tokens_per_s_per_gpu": round(best.tokens_per_s_per_gpu, 1)},
        "rollout": {"tp": 1, "ep": 64, "dp": gpus, "dtype": "bf16",
                    "weights": "attention, dense FFNs, shared experts, embedding, head replicated on every rank "
                               "(SGLang DP-attention); routed experts 4 per rank over ep64, 16 replicas",
                    "bytes_per_rank_gb": round(max(roll_bytes) / GB, 2)},
        "bytes_gb": {k: {s: round(v / GB, 3) for s, v in stats(b[k]).items()} for k in b},
        "slowest_rank": worst,
        "slowest_rank_bytes_gb": {k: round(b[k][worst] / GB, 3) for k in b},
        "estimate_seconds": round(per_rank[worst], 3),
        "estimate_seconds_without_relay": round(one_hop_s, 3),
        "without_relay_bytes_gb": {k: round(max(v) / GB, 3) for k, v in one_hop.items()},
        "link_model": "per rank max(IB bytes sent or received / ib_gbps, NVLink bytes / nvlink_gbps), both links at "
                      "once (planner's model of V3 §3.2.2); the slowest rank sets the time; no latency, cast or "
                      "bucket-synchronisation terms",
        "nemo_rl_reference_seconds": [2.39, 2.83],
        "nemo_rl_reference": "NeMo-RL nccl_reshard refit, DSV3 PP16xEP16 -> TP32xDP8 on H100 (measured; "
                             "reference/peers/features-2026.md)",
        "analysis_seconds": round(time.perf_counter() - t0, 1), "build_seconds": round(built, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bucket-bytes", type=int, default=64 << 20)
    ap.add_argument("--gpus", type=int, default=1024)
    ap.add_argument("--gpu", default="H100")
    ap.add_argument("--global-batch", type=int, default=15360)   # V3 §4.2: 15360 sequences of 4K
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-v3", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "refit.json"))
    args = ap.parse_args()
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
              "torch": torch.__version__, "command": " ".join(["python", *sys.argv])}
    if not args.skip_tiny:
        result["tiny"] = {"model": "tiny-deepseek-v3", "n_layers": args.layers, "ranks": 4, "backend": "gloo",
                          "cases": tiny(args.repeats, args.layers, args.bucket_bytes)}
    if not args.skip_v3:
        result["v3"] = v3_estimate(args.gpus, args.gpu, args.global_batch, args.seq_len)
        print(json.dumps(result["v3"], indent=2), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
