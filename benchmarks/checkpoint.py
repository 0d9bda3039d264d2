"""Checkpoint cost: how long training stalls for a synchronous save vs an asynchronous one (which
only stages to CPU before returning), how long the background write takes, the integrity check of a
checkpoint (every file's size and CRC-32 against its manifest, the page cache warm as right after a
save) and the load time after it, for a model with its AdamW moments, in one process (a world of one,
as the trainer runs it). Saves include recording the checksums.

    python benchmarks/checkpoint.py [--dim 512 --layers 8 --repeats 3]
    python benchmarks/checkpoint.py --dim 128 --layers 2 --out /tmp/ckpt100mb.json   # a ~110 MB checkpoint

Writes benchmarks/results/checkpoint.json (machine, torch version, command)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import cpu_name  # noqa: E402

from model import build_model, preset  # noqa: E402
from parallel import ParallelConfig, build_mesh, init_parallel_weights, parallelize  # noqa: E402
import parallel.checkpoint as ckpt  # noqa: E402
from parallel.checkpoint import finalize_pending, load_checkpoint, save_checkpoint, sharded_state  # noqa: E402
from pretrain.optim import AdamW, param_groups  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpoint.json"))
    args = ap.parse_args()

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = dataclasses.replace(preset("tiny-deepseek-v3"), dim=args.dim, n_layers=args.layers, vocab_size=32000,
                              inter_dim=4 * args.dim, moe_inter_dim=args.dim, n_heads=8)
    mesh = build_mesh(ParallelConfig())
    net = parallelize(build_model(cfg, device="meta"), mesh)
    init_parallel_weights(net, mesh, seed=0)
    opt = AdamW(param_groups(net.named_parameters(), 0.1), lr=1e-3)
    opt.init_state()
    state = sharded_state(net, mesh, opt)
    n_params = sum(p.numel() for p in net.parameters())
    root = Path(tempfile.mkdtemp(prefix="whaletron-ckpt-bench-"))
    sync_s, stall_s, async_total_s, verify_s, load_s = [], [], [], [], []
    try:
        meta = {"model_config": cfg.to_dict()}
        for i in range(args.repeats):
            t0 = time.perf_counter()
            save_checkpoint(root, 2 * i, state, meta, keep=2)
            sync_s.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            handle = save_checkpoint(root, 2 * i + 1, state, meta, keep=2, async_save=True)
            stall_s.append(time.perf_counter() - t0)      # training could resume here
            handle.wait()
            async_total_s.append(time.perf_counter() - t0)

            path = root / f"step_{2 * i + 1:08d}"
            ckpt._VERIFIED.clear()  # forget earlier verifications: read and checksum every file
            t0 = time.perf_counter()
            problem = ckpt._problem(path)
            verify_s.append(time.perf_counter() - t0)
            assert problem is None, problem

            t0 = time.perf_counter()  # the files verified above are not read twice for the check
            load_checkpoint(path, state, model_config=cfg.to_dict())
            load_s.append(time.perf_counter() - t0)
        finalize_pending()
        size = sum(f.stat().st_size for f in (root / f"step_{2 * args.repeats - 1:08d}").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()

    med = statistics.median
    result = {
        "machine": {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {"dim": args.dim, "layers": args.layers, "parameters": n_params},
        "checkpoint_bytes": size,
        "sync_save_s": med(sync_s), "async_stall_s": med(stall_s), "async_total_s": med(async_total_s),
        "verify_s": med(verify_s), "verify_gb_per_s": size / med(verify_s) / 1e9,
        "load_s": med(load_s),
        "async_stall_over_sync_save": med(stall_s) / med(sync_s),
        "write_gb_per_s": size / med(sync_s) / 1e9,
        "repeats": args.repeats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
