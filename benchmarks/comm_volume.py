"""Bytes per training step per collective, measured by the accounting layer (`parallel.comm.STATS`)
beside the analytic formulas of `plan.cost`, for each layout; they must agree exactly.

One step = forward + backward of this rank's micro-batch, the gradient reductions FSDP does not
do, global clipping and the expert-bias update. Runs gloo ranks on CPU:

    python benchmarks/comm_volume.py            # writes benchmarks/results/comm_volume.json

FSDP2's parameter all-gathers and gradient reduce-scatters are counted through its custom
collective hooks and checked against `cost.fsdp_step` like the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
sys.path.insert(0, here)

from _machine import cpu_name  # noqa: E402

BATCH, SEQ = 8, 32
LAYOUTS = {  # name: (model preset, world, parallel config)
    "tp2": ("tiny-deepseek-v3", 2, dict(tp=2)),
    "tp2_sp": ("tiny-deepseek-v3", 2, dict(tp=2, sp=True)),
    "dp2": ("tiny-deepseek-v3", 2, dict()),
    "dp2_zero2": ("tiny-deepseek-v3", 2, dict(zero=2)),
    "ep2": ("tiny-deepseek-v3", 2, dict(ep=2)),
    "ep4": ("tiny-deepseek-v3", 4, dict(ep=4)),
    "tp2_ep2_sp": ("tiny-deepseek-v3", 2, dict(tp=2, ep=2, sp=True)),
    "dp4_tp2_ep2_sp": ("tiny-deepseek-v3", 8, dict(tp=2, ep=2, sp=True)),
    "gqa_tp2": ("tiny-llama-3-8b", 2, dict(tp=2)),
    "gqa_tp4_sp_kv_replicated": ("tiny-llama-3-8b", 4, dict(tp=4, sp=True)),
}


def _rank(rank, world, port, name, layout, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import parallel
    from model import build_model, preset
    from parallel import ParallelConfig, build_mesh, parallelize
    from plan import cost

    cfg = preset(name)
    mesh = build_mesh(ParallelConfig(**layout))
    dims = mesh.dims
    net = parallelize(build_model(cfg, device="meta").train(), mesh)
    parallel.init_parallel_weights(net, mesh, seed=0)
    routes = []
    for m in net.modules():
        if type(m).__name__ == "Gate":
            m.register_forward_hook(lambda mod, args, out: routes.append(out[1].detach()))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
    d = dims.coords(rank)["dp"]
    rows = slice(d * BATCH // dims.dp, (d + 1) * BATCH // dims.dp)
    tokens = tokens[rows]
    parallel.STATS.reset()
    out = net.loss(tokens, tokens.roll(-1, 1))
    out["loss"].backward()
    parallel.finish_grad_sync(net, mesh)
    parallel.clip_grad_norm_(net, 1.0, mesh)
    parallel.update_expert_bias(net, mesh)
    measured = parallel.STATS.snapshot()

    b = tokens.shape[0]
    formula = Counter()
    formula.update(cost.tensor_parallel_step(cfg, dims.tp, dims.sp, b, SEQ, ep=dims.ep))
    DT = torch.distributed.tensor.DTensor
    local = {n: (p.to_local() if isinstance(p, DT) else p).numel() for n, p in net.named_parameters()}
    fsdp_names = frozenset(n for n, p in net.named_parameters() if isinstance(p, torch.distributed.tensor.DTensor))
    formula.update(cost.grad_sync_step(net.param_layouts, local, dims.tp, dims.edp, fsdp_names))
    ep_group = mesh["ep"]
    for idx in routes:  # one MoE layer: tokens of each rank with an expert on each ep device
        per_dev = cfg.n_routed_experts // dims.ep
        hit = torch.zeros(idx.shape[0], dims.ep, dtype=torch.bool).scatter_(1, idx // per_dev, True)
        counts = hit.sum(0)
        gathered = [torch.zeros_like(counts) for _ in range(dims.ep)]
        if dims.ep > 1:
            dist.all_gather(gathered, counts, group=ep_group.pg)
        pairs = [c.tolist() for c in gathered]
        formula.update(cost.expert_dispatch_step(pairs, ep_group.rank, cfg.dim, cfg.n_activated_experts))
    if dims.world > 1:
        formula["all_reduce/world"] += 8                          # clipping: one float64
    if dims.dp * dims.tp > 1 and routes:
        formula["all_reduce/dp_tp"] += 4 * cfg.n_routed_experts * len(routes)  # expert load, fp32
    from torch.distributed.fsdp import FSDPModule
    units = []
    for m in net.modules():
        if isinstance(m, FSDPModule):
            for pg in m._get_fsdp_state()._fsdp_param_groups:
                ranks = pg.mesh_info.shard_mesh_size
                padded = sum(cost.fsdp_padded_shard(tuple(fp.sharded_param.shape), fp.sharded_param.placements[0].dim,
                                                    ranks) for fp in pg.fsdp_params)
                units.append(("edp" if getattr(type(m), "ep_count", None) else "dp", ranks, padded))
    formula.update(cost.fsdp_step(units, 4, 4, dims.zero))
    rec = {"rank": rank, "tokens": b * SEQ,
           "collectives": {k: {"measured_bytes": measured.get(k, {}).get("bytes", 0),
                               "formula_bytes": formula.get(k, 0),
                               "calls": measured.get(k, {}).get("calls", 0)}
                           for k in sorted(set(measured) | set(formula))}}
    gathered = [None] * world
    dist.all_gather_object(gathered, rec)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def run(name, world, layout, tmp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(world, port, name, layout, tmp), nprocs=world, start_method="spawn")
    with open(tmp) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "results", "comm_volume.json"))
    ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    args = ap.parse_args()
    results, ok = {}, True
    tmp = os.path.join(os.path.dirname(args.out), ".comm_volume_rank.json")
    for key in args.layouts:
        name, world, layout = LAYOUTS[key]
        t0 = time.time()
        ranks = run(name, world, layout, tmp)
        r0 = ranks[0]
        print(f"\n{key}: {name}, {world} ranks, {layout}, {r0['tokens']} tokens per rank ({time.time() - t0:.1f} s)")
        print(f"  {'collective':28s} {'rank':>4s} {'measured B':>12s} {'formula B':>12s}")
        for r in ranks:
            for k, v in r["collectives"].items():
                agree = v["measured_bytes"] == v["formula_bytes"]
                ok &= agree
                if r["rank"] == 0 or k.startswith("all_to_all"):
                    print(f"  {k:28s} {r['rank']:4d} {v['measured_bytes']:12d} {v['formula_bytes']:12d}"
                          f"{'' if agree else '   MISMATCH'}")
        results[key] = {"model": name, "world": world, "layout": layout, "ranks": ranks}
    os.remove(tmp)
    out = {
        "benchmark": "comm_volume", "batch": BATCH, "seq": SEQ, "dtype": "fp32", "all_agree": ok,
        "machine": {"cpu": cpu_name(), "uname": " ".join(platform.uname()), "cpu_count": os.cpu_count()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": "python benchmarks/comm_volume.py", "layouts": results,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nall measured == formula: {ok}; wrote {args.out}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
