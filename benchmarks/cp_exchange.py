"""Context parallelism's exchange: MLA's latent against Megatron-core's per-head keys and values (issue 24).

    python benchmarks/cp_exchange.py            # writes benchmarks/results/cp_exchange.json

1. Per token and layer, for the V3 and V2-Lite shapes (model presets): the latent c^KV + k^R that whaletron's
   cp ranks all-gather (V2 §2.1.2-2.1.3: kv_lora_rank + qk_rope_head_dim = 576 elements) against the
   up-projected per-head K (d_nope + d_rope) and V (d_v) of every head that Megatron-core exchanges.
2. At 32K and 128K with cp 2/4/8, per rank and layer, one sequence in bf16: the bytes recorded (comm.py's
   convention: the gathered tensor forward, its gradient reduce-scattered backward) and put on the wire ((cp-1)/cp
   of each, a ring), and the estimated exposed time on H800 links (plan/hardware.py: NVLink 160 GB/s when the
   cp group sits in one node, as at tp 1 and cp <= 8; IB 50 GB/s when it spans nodes), next to the rank's
   attention compute for that layer (plan/planner.py: ATTN_EFF of the bf16 peak, forward + backward = 3x the
   causal forward). The exchange is assumed not overlapped: it sits before attention in forward and after it in
   backward (the runtime's all-gather, parallel/context_parallel.py), so its time is exposed.
3. Measured: 2 gloo ranks (cp 2) run one forward + backward of a tiny V3 with V3's latent widths (kv_lora_rank
   512, qk_rope_head_dim 64) and of tiny Llama (GQA) through the runtime; comm.STATS's cp_all_gather/cp and
   cp_reduce_scatter/cp bytes against plan.cost.context_parallel_step.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(here))
sys.path.insert(0, here)

from _machine import cpu_name  # noqa: E402

SHAPES = ("deepseek-v3", "deepseek-v2-lite")
SEQS = (32768, 131072)
CPS = (2, 4, 8)
E = 2                        # bf16
MEASURED = {  # name: (preset, overrides)
    "tiny-deepseek-v3 with V3's latent (512 + 64)": ("tiny-deepseek-v3", dict(kv_lora_rank=512, qk_rope_head_dim=64)),
    "tiny-llama-3-8b (GQA, 2 KV heads of 16)": ("tiny-llama-3-8b", {}),
}
BATCH, SEQ = 2, 64


def widths(cfg) -> dict:
    from plan import cost
    latent, head = cost.cp_kv_width(cfg), cost.cp_kv_width(cfg, per_head=True)
    return {"latent_elements": latent, "per_head_elements": head,
            "per_head_formula": f"{cfg.n_heads} heads x ({cfg.qk_nope_head_dim} + {cfg.qk_rope_head_dim} + "
                                f"{cfg.v_head_dim})",
            "latent_formula": f"kv_lora_rank {cfg.kv_lora_rank} + qk_rope_head_dim {cfg.qk_rope_head_dim}",
            "bytes_per_token_per_layer_bf16": {"latent": latent * E, "per_head": head * E},
            "ratio": head / latent}


def per_rank(cfg, seq: int, cp: int) -> dict:
    """One layer, one sequence of `seq` tokens over cp ranks, bf16, tp 1."""
    from collections import Counter

    from plan import cost
    from plan import planner as P
    cluster = P.Cluster("H800", 2048)
    nvl, ib = cluster.nvlink_gbps * 1e9, cluster.ib_gbps * 1e9
    peak = cluster.spec.peak["bf16"]
    # causal attention forward per token: 2 H (d_qk + d_v) S/2 (model.stage_costs); backward 2x (planner)
    attn_flops = 3 * 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq / 2 * (seq // cp)
    attn_s = attn_flops / (peak * P.ATTN_EFF)
    out = {"model": cfg.name, "seq": seq, "cp": cp, "tokens_per_rank": seq // cp,
           "attention_ms_per_rank": 1e3 * attn_s}
    for kind, per_head in (("latent", False), ("per_head", True)):
        c: Counter = Counter()
        cost.cp_layer_step(c, cfg, cp, 1, seq, E, 1, per_head)
        wire = cost.cp_wire_bytes_per_layer(cfg, cp, 1, seq, E, 1, per_head)
        out[kind] = {"recorded_bytes": dict(c), "wire_bytes_fwd_bwd": wire,
                     "exposed_ms_nvlink": 1e3 * wire / nvl, "exposed_ms_ib": 1e3 * wire / ib,
                     "exposed_share_of_attention_nvlink": wire / nvl / attn_s}
    return out


def _rank(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from model import build_model, preset
    from parallel import ParallelConfig, build_mesh, comm
    from parallel.engine import parallel_engine
    from plan import cost

    rows = {}
    for label, (name, over) in MEASURED.items():
        cfg = preset(name, **over)
        mesh = build_mesh(ParallelConfig(cp=world))
        engine = parallel_engine(build_model(cfg, device="meta").train(), mesh, micro_batch_size=BATCH, seq_len=SEQ)
        engine.init_weights(0)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
        comm.STATS.reset()
        engine.step(tokens, tokens.roll(-1, 1))
        snap = comm.STATS.snapshot()
        measured = {k: v["bytes"] for k, v in snap.items() if k.startswith("cp_")}
        formula = dict(cost.context_parallel_step(cfg, world, BATCH, SEQ, e=4))
        layers = cfg.n_layers + cfg.n_mtp
        rows[label] = {"preset": name, "overrides": over, "cp": world, "batch": BATCH, "seq": SEQ, "dtype": "fp32",
                       "exchange_points": layers, "width_elements": cost.cp_kv_width(cfg),
                       "measured_bytes": measured, "formula_bytes": formula, "agree": measured == formula,
                       "measured_bytes_per_token_per_layer": measured.get("cp_all_gather/cp", 0) / (BATCH * SEQ)
                       / layers,
                       "calls": {k: v["calls"] for k, v in snap.items() if k.startswith("cp_")}}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def measure(tmp: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, tmp), nprocs=2, start_method="spawn")
    with open(tmp) as f:
        rows = json.load(f)
    os.remove(tmp)
    return rows


def main():
    import argparse

    from model import preset
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "results", "cp_exchange.json"))
    ap.add_argument("--no-measure", action="store_true", help="the formulas only (no gloo ranks)")
    args = ap.parse_args()
    t0 = time.time()
    shapes = {name: widths(preset(name)) for name in SHAPES}
    for name, w in shapes.items():
        print(f"{name}: latent {w['latent_elements']} vs per-head K/V {w['per_head_elements']} elements per token per "
              f"layer ({w['per_head_formula']}): {w['ratio']:.1f}x")
    table = [per_rank(preset(name), seq, cp) for name in SHAPES for seq in SEQS for cp in CPS]
    print(f"\n{'model':18s} {'seq':>7s} {'cp':>3s} {'latent MB':>10s} {'ms NVL':>7s} {'per-head MB':>12s} "
          f"{'ms NVL':>7s} {'attn ms':>8s}")
    for r in table:
        lat, ph = r["latent"], r["per_head"]
        print(f"{r['model']:18s} {r['seq']:7d} {r['cp']:3d} {lat['wire_bytes_fwd_bwd'] / 1e6:10.1f} "
              f"{lat['exposed_ms_nvlink']:7.2f} {ph['wire_bytes_fwd_bwd'] / 1e6:12.1f} {ph['exposed_ms_nvlink']:7.2f} "
              f"{r['attention_ms_per_rank']:8.1f}")
    measured = None
    if not args.no_measure:
        measured = measure(os.path.join(os.path.dirname(args.out), ".cp_exchange_rank.json"))
        for label, m in measured.items():
            print(f"\nmeasured, {label}: {m['measured_bytes']} (formula {m['formula_bytes']}): "
                  f"{'agree' if m['agree'] else 'MISMATCH'}; {m['measured_bytes_per_token_per_layer']:.0f} B per token "
                  f"per layer = {m['width_elements']} fp32 elements")
    out = {
        "benchmark": "cp_exchange",
        "machine": {"cpu": cpu_name(), "uname": " ".join(platform.uname()), "cpu_count": os.cpu_count()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": "python benchmarks/cp_exchange.py" + (" --no-measure" if args.no_measure else ""),
        "assumptions": ("bf16; tp 1 (per-head K/V divide by tp, the latent does not); one sequence per micro-batch; "
                        "H800 links from plan/hardware.py (V3 §3.2.2: NVLink 160 GB/s, IB 50 GB/s per GPU and "
                        "direction), the cp group inside one node (NVLink) up to 8 ranks at tp 1; exposed = wire "
                        "bytes / bandwidth, forward all-gather + backward reduce-scatter, not overlapped (the "
                        "runtime's all-gather); attention at plan.planner.ATTN_EFF of the bf16 peak"),
        "shapes": shapes, "per_rank_per_layer": table, "measured_gloo_cp2": measured,
        "all_agree": None if measured is None else all(m["agree"] for m in measured.values()),
        "seconds": round(time.time() - t0, 1),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")
    if measured is not None and not out["all_agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
