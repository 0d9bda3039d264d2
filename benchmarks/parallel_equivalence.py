"""One process vs a parallel layout, on any backend: the check of tests/test_parallel.py in a form
that runs under torchrun on GPUs (NCCL) as well as on CPUs (gloo).

    torchrun --nproc-per-node 4 benchmarks/parallel_equivalence.py --tp 2 --ep 2 --sp
    torchrun --nproc-per-node 8 benchmarks/parallel_equivalence.py --tp 2 --ep 4 --sp --dtype fp64

Every rank builds the single-process model too (tiny presets), runs `--steps` AdamW steps of
both, and reports the largest relative difference of the loss and of every gathered gradient
(each step) and of the parameters at the end. Rank 0 writes JSON naming the device.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
import torch.distributed as dist

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
sys.path.insert(0, here)

import parallel  # noqa: E402
from _machine import cpu_name  # noqa: E402
from model import build_model, preset  # noqa: E402
from model.transformer import IGNORE_INDEX  # noqa: E402
from parallel import ParallelConfig, build_mesh, parallelize  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny-deepseek-v3")
    for k in ("tp", "ep", "node_size"):
        ap.add_argument(f"--{k}", type=int, default=8 if k == "node_size" else 1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--dtype", choices=("fp32", "fp64"), default="fp32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # the comparison is of fp32 arithmetic
        torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float64 if args.dtype == "fp64" else torch.float32
    mesh = build_mesh(ParallelConfig(tp=args.tp, ep=args.ep, sp=args.sp, node_size=args.node_size))
    dims, rank = mesh.dims, dist.get_rank()
    cfg = preset(args.preset)
    ref = build_model(cfg, device=device, dtype=dtype, seed=0).train()
    ref.set_expert_placement(dims.ep, dims.ep // dims.ep_nodes)
    net = parallelize(build_model(cfg, device="meta", dtype=dtype).train(), mesh)
    parallel.init_parallel_weights(net, mesh, seed=0, device=device)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    d = dims.coords(rank)["dp"]
    rows = slice(d * args.batch // dims.dp, (d + 1) * args.batch // dims.dp)
    report = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
        labels = tokens.roll(-1, 1)
        labels[:, -1] = IGNORE_INDEX
        ropt.zero_grad()
        opt.zero_grad()
        rloss = ref.loss(tokens, labels)["loss"]
        rloss.backward()
        parallel.STATS.reset()
        loss = net.loss(tokens[rows], labels[rows])["loss"]
        loss.backward()
        parallel.finish_grad_sync(net, mesh)
        got = loss.detach().clone()
        dist.all_reduce(got)
        grads = parallel.full_state(net, mesh, grads=True)
        worst = max(((rel(grads[k], p.grad), k) for k, p in ref.named_parameters()), default=(0.0, ""))
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        parallel.clip_grad_norm_(net, 1.0, mesh)
        ropt.step()
        opt.step()
        ref.update_expert_bias()
        parallel.update_expert_bias(net, mesh)
        report.append({"step": step, "loss": rloss.item(), "loss_rel_diff": rel(got / dims.world, rloss.detach()),
                       "grad_max_rel_diff": worst[0], "grad_worst": worst[1],
                       "comm_bytes": {k: v["bytes"] for k, v in parallel.STATS.snapshot().items()}})
    params = parallel.full_state(net, mesh)
    pworst = max((rel(params[k], p.detach()), k) for k, p in ref.named_parameters())
    if rank == 0:
        result = {"benchmark": "parallel_equivalence", "preset": args.preset, "dtype": args.dtype,
                  "layout": {"world": dims.world, "tp": dims.tp, "dp": dims.dp, "ep": dims.ep, "sp": dims.sp,
                             "node_size": dims.node_size},
                  "device": torch.cuda.get_device_name(device) if cuda else cpu_name(),
                  "backend": dist.get_backend(), "torch": torch.__version__, "python": platform.python_version(),
                  "command": " ".join(sys.argv), "steps": report,
                  "param_max_rel_diff_after_steps": pworst[0], "param_worst": pworst[1]}
        for r in report:
            print(f"step {r['step']}: loss {r['loss']:.6f} rel diff {r['loss_rel_diff']:.2e}, "
                  f"largest gradient rel diff {r['grad_max_rel_diff']:.2e} ({r['grad_worst']})")
        print(f"parameters after {args.steps} steps: largest rel diff {pworst[0]:.2e} ({pworst[1]})")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
