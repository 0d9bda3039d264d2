"""Context parallelism's exchange: MLA's latent against Megatron-core's per-head keys and values (issue 24).

    python benchmarks/cp_exchange.py            # writes benchmarks/results/cp_exchange.json (~4 min here)
    python benchmarks/cp_exchange.py --ring     # only item 4, written into that JSON's ring_vs_allgather

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
4. Measured, ring against all-gather on this CPU (ring_vs_allgather): one rank's MLA attention forward (V3's head
   dims 128 + 64 and 128, 8 heads, 4096 tokens, cp 2 and 4, fp32, one thread) by the runtime's one masked call
   over all keys against a ring's cp partial attentions merged by log-sum-exp (as is, and skipping the halves the
   causal mask zeroes, as Megatron-core/Transformer Engine's ring does on this layout; the all-gather's
   counterpart, each query chunk against its visible key prefix, too), by explicit arithmetic (forward and, at
   the last cp, backward) and by torch's fused CPU flash kernel (forward), each checked equal to the one call;
   then on cp gloo ranks one all-gather of the 576-wide latent against cp-1 ring send/recv steps, as a share of
   that attention; the V3/H800 share from item 2 (modeled) next to it, and the choice.
"""
from __future__ import annotations

import functools
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
import torch.nn.functional as F

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


# -- ring against all-gather, measured on this CPU (--ring runs only this part) ------------------------------
RING_HEADS, RING_SEQ, RING_CPS = 8, 4096, (2, 4)
RING_DIMS = (128, 64, 128)   # V3's qk_nope_head_dim, qk_rope_head_dim, v_head_dim
RING_WIDTH = 576             # V3's latent: kv_lora_rank 512 + qk_rope_head_dim 64
RING_REPEATS, RING_BWD_REPEATS, COMM_REPEATS = 5, 3, 15


def partial_attention(q, k, v, bias=None, scale=None):
    """softmax(q k^T * scale + bias) v and its log-sum-exp per query row, [b, h, s, d] in; a row that sees no
    key (bias all -inf) gives output 0 and log-sum-exp log(tiny) ~ -87 (so it drops out of `merge`). The same arithmetic
    serves the one-call attention (all keys) and each ring step (one key block), so the two are compared fairly:
    torch's CPU flash kernel returns the log-sum-exp but wants q/k and v of one head size (MLA: 192 and 128)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)   # no 0/0, no log(0) in the backward
    return torch.matmul(p, v) / den, m + den.log()


def flash_partial(q, k, v, bias=None, valid=None):
    """partial_attention by torch's fused CPU flash kernel, which returns the log-sum-exp; it wants one head size,
    so v comes padded to q's (the caller pads it once, outside the timing; the output is cut back). A row that
    sees no key gets log-sum-exp 0 from the kernel: `valid` [s, 1] (which rows see a key) sets it to -inf.
    Forward only: the kernel's backward ignores a gradient on the log-sum-exp, so a merge cannot be
    differentiated through it (a real ring has its own backward)."""
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)
    lse = lse.unsqueeze(-1)
    if valid is not None:
        lse = lse.masked_fill(~valid, float("-inf"))
    return o, lse


def merge(o, lse, o2, lse2):
    """The log-sum-exp combination of two partial attentions over disjoint key sets."""
    lse_new = torch.logaddexp(lse, lse2)
    lse_new_safe = torch.where(torch.isfinite(lse_new), lse_new, torch.zeros_like(lse_new))
    return o * torch.exp(lse - lse_new_safe) + o2 * torch.exp(lse2 - lse_new_safe), lse_new


def ring_inputs(heads: int, seq: int, cp: int, rank: int = 0, dims=RING_DIMS, seed: int = 0, grad: bool = False):
    """Rank `rank`'s queries [1, h, S/cp, d_qk] (its positions, local_positions order) and all keys and values
    [1, h, S, .] in global order 0..S-1 (what the all-gather and the local up-projection give), plus the
    positions; scaled so the softmax is neither flat nor one-hot."""
    from parallel.context_parallel import local_positions
    g = torch.Generator().manual_seed(seed)
    dqk, dv = dims[0] + dims[1], dims[2]
    qpos = local_positions(seq, cp, rank)
    q = torch.randn(1, heads, seq // cp, dqk, generator=g)
    k = torch.randn(1, heads, seq, dqk, generator=g)
    v = torch.randn(1, heads, seq, dv, generator=g)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, qpos


def _bias(allowed):
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def attention_plans(seq: int, cp: int, rank: int, qpos) -> dict:
    """The masks/slices each variant needs, built outside the timed region:
    one_call: the runtime's way: this rank's queries against all S keys, mask q_pos >= k_pos.
    ring: cp partial attentions, one per arriving key block (rank j's positions), each with its piece of the
      same mask, merged by log-sum-exp; the same multiply-adds as one_call plus the split and the merges.
    ring_skip: the ring as Megatron-core/Transformer Engine run it on this layout: the own block causal,
      an earlier rank's block: all queries against its early chunk only; a later rank's block: only the late
      query chunk, against the whole block (the halves the causal mask zeroes are not computed).
    all_gather_skip: after the same one all-gather, each of this rank's two query chunks against the key
      prefix it may see (two calls, no merge): the all-gather's counterpart of ring_skip."""
    from parallel.context_parallel import local_positions
    c = seq // (2 * cp)
    kall = torch.arange(seq)
    blocks = [local_positions(seq, cp, j) for j in range(cp)]
    ring = [(kp, _bias(qpos[:, None] >= kp[None, :]), (qpos[:, None] >= kp[None, :]).any(-1, keepdim=True))
            for kp in blocks]
    skip = []
    for j, kp in enumerate(blocks):
        if j == rank:
            skip.append(("all", kp, _bias(qpos[:, None] >= kp[None, :])))
        elif j < rank:
            skip.append(("all", kp[:c], None))
        else:
            skip.append(("late", kp, None))
    early, late = qpos[:c], qpos[c:]
    ends = (int(early[-1]) + 1, int(late[-1]) + 1)
    prefix = [(slice(0, c), ends[0], _bias(early[:, None] >= kall[None, :ends[0]])),
              (slice(c, 2 * c), ends[1], _bias(late[:, None] >= kall[None, :ends[1]]))]
    return {"one_call": _bias(qpos[:, None] >= kall[None, :]), "ring": ring, "ring_skip": skip,
            "all_gather_skip": prefix, "c": c}


def run_variant(name: str, q, k, v, plans: dict):
    """Output [1, h, S/cp, d_v] of one variant (see attention_plans). "flash_*": the same by torch's fused CPU
    flash kernel (flash_partial; v padded to q's head size, `plans["dv"]` the real one)."""
    fused = name.startswith("flash_")
    base = name[len("flash_"):] if fused else name
    part = flash_partial if fused else (lambda q_, k_, v_, b, valid=None: partial_attention(q_, k_, v_, b))
    if base == "one_call":
        o = part(q, k, v, plans["one_call"])[0]
    elif base == "sdpa":      # the runtime's actual call (torch SDPA, boolean mask), for reference
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.isfinite(plans["one_call"]))
    elif base == "ring":
        o = lse = None
        for kp, bias, valid in plans["ring"]:
            o2, l2 = part(q, k[:, :, kp], v[:, :, kp], bias, valid)
            o, lse = (o2, l2) if o is None else merge(o, lse, o2, l2)
    elif base == "ring_skip":
        c = plans["c"]
        o = lse = None
        for rows, kp, bias in plans["ring_skip"]:
            qs = q if rows == "all" else q[:, :, c:]
            o2, l2 = part(qs, k[:, :, kp], v[:, :, kp], bias)
            if o is None:       # the first step is always the own block (all rows)
                o, lse = o2, l2
            elif rows == "all":
                o, lse = merge(o, lse, o2, l2)
            else:
                ol, ll = merge(o[:, :, c:], lse[:, :, c:], o2, l2)
                o, lse = torch.cat([o[:, :, :c], ol], 2), torch.cat([lse[:, :, :c], ll], 2)
    elif base == "all_gather_skip":
        o = torch.cat([part(q[:, :, rows], k[:, :, :end], v[:, :, :end], bias)[0]
                       for rows, end, bias in plans["all_gather_skip"]], 2)
    else:
        raise ValueError(name)
    return o[..., :plans["dv"]] if fused else o


def ring_order(plans: dict, rank: int, cp: int) -> dict:
    """ring_skip's steps in arrival order (own block first, then rank-1, rank-2, ... as a ring delivers them)."""
    order = [(rank - i) % cp for i in range(cp)]
    return dict(plans, ring=[plans["ring"][j] for j in order], ring_skip=[plans["ring_skip"][j] for j in order])


VARIANTS = ("one_call", "sdpa", "ring", "all_gather_skip", "ring_skip")
FLASH = ("flash_one_call", "flash_ring", "flash_all_gather_skip", "flash_ring_skip")


def _medians_s(fns: dict, repeats: int) -> dict:
    """{name: (median seconds, all seconds)}, the variants interleaved within each repeat so that a change of
    load (this machine is shared) hits them alike; one warm-up call each first."""
    for fn in fns.values():
        fn()
    ts = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t)
    return {name: (statistics.median(v), [round(x, 4) for x in v]) for name, v in ts.items()}


def attention_compute(heads: int, seq: int, cp: int, rank: int, repeats: int, bwd_repeats: int) -> dict:
    """Item 1: one rank's attention forward (and forward + backward) by each variant; the outputs checked
    against one_call (fp32, 1e-5 relative to the largest element)."""
    q, k, v, qpos = ring_inputs(heads, seq, cp, rank)
    plans = dict(ring_order(attention_plans(seq, cp, rank, qpos), rank, cp), dv=v.shape[-1])
    vpad = torch.nn.functional.pad(v, (0, q.shape[-1] - v.shape[-1]))
    args = {n: (q, k, vpad if n.startswith("flash_") else v, plans) for n in VARIANTS + FLASH}
    with torch.no_grad():
        ref = run_variant("one_call", *args["one_call"])
        err = {}
        for name in VARIANTS[1:] + FLASH:
            got = run_variant(name, *args[name])
            err[name] = ((got - ref).abs().max() / ref.abs().max()).item()
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        fwd = _medians_s({n: functools.partial(run_variant, n, *a) for n, a in args.items()}, repeats)
    bwd = {}
    if bwd_repeats:
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))

        def step(name):
            qg.grad = kg.grad = vg.grad = None
            run_variant(name, qg, kg, vg, plans).backward(dout)
        bwd = _medians_s({n: functools.partial(step, n) for n in ("one_call", "ring", "all_gather_skip", "ring_skip")},
                         bwd_repeats)
    dqk, dv = RING_DIMS[0] + RING_DIMS[1], RING_DIMS[2]
    c = seq // (2 * cp)
    macs = {"one_call": 2 * c * seq, "ring": 2 * c * seq, "sdpa": 2 * c * seq,
            "all_gather_skip": c * (c * (rank + 1)) + c * (c * (2 * cp - rank)),
            "ring_skip": (2 * c) ** 2 + (cp - 1) * 2 * c * c}   # query-key pairs computed (masked ones included)
    out = {"seq": seq, "cp": cp, "rank": rank, "heads": heads, "tokens_per_rank": seq // cp,
           "query_key_pairs": macs,
           "gflop_fwd": {n: 2 * heads * p * (dqk + dv) / 1e9 for n, p in macs.items()},
           "max_rel_err_vs_one_call": err,
           "fwd_median_ms": {n: 1e3 * m for n, (m, _) in fwd.items()},
           "fwd_all_s": {n: ts for n, (_, ts) in fwd.items()},
           "fwd_bwd_median_ms": {n: 1e3 * m for n, (m, _) in bwd.items()},
           "fwd_bwd_all_s": {n: ts for n, (_, ts) in bwd.items()}}
    out["fwd_min_ms"] = {n: 1e3 * min(ts) for n, (_, ts) in fwd.items()}
    out["ratios_fwd"] = _ratios(out["fwd_median_ms"])
    out["ratios_fwd_by_min"] = _ratios(out["fwd_min_ms"])   # the least disturbed repeat (shared machine)
    if bwd:
        b = out["fwd_bwd_median_ms"]
        out["ratios_fwd_bwd"] = {"ring / one_call": b["ring"] / b["one_call"],
                                 "ring_skip / all_gather_skip": b["ring_skip"] / b["all_gather_skip"],
                                 "ring_skip / one_call": b["ring_skip"] / b["one_call"]}
    return out


def _ratios(f: dict) -> dict:
    return {"ring / one_call (same mask work: split + merges)": f["ring"] / f["one_call"],
                         "ring_skip / all_gather_skip (both skip masked halves)":
                             f["ring_skip"] / f["all_gather_skip"],
                         "ring_skip / one_call (runtime as is)": f["ring_skip"] / f["one_call"],
                         "all_gather_skip / one_call": f["all_gather_skip"] / f["one_call"],
                         "flash_ring / flash_one_call (fused kernel, same mask work)":
                             f["flash_ring"] / f["flash_one_call"],
                         "flash_ring_skip / flash_all_gather_skip (fused kernel, both skip)":
                             f["flash_ring_skip"] / f["flash_all_gather_skip"]}


def _comm_rank(rank, world, port, seqs, repeats, out_path):
    """Item 2: one all-gather of [S/cp, 576] per rank against a ring of cp-1 send/recv steps, same bytes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for seq in seqs:
        x = torch.randn(1, seq // world, RING_WIDTH)
        bufs = [torch.empty_like(x) for _ in range(world)]
        nxt, prv = (rank + 1) % world, (rank - 1) % world

        def all_gather():
            dist.all_gather(bufs, x)
            return torch.cat(bufs, 1)

        def ring():
            out, send = [None] * world, x
            out[rank] = x
            for i in range(1, world):
                recv = torch.empty_like(x)
                reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv, prv)])
                for r in reqs:
                    r.wait()
                out[(rank - i) % world] = send = recv
            return torch.cat(out, 1)

        assert torch.equal(all_gather(), ring())
        fns = {"all_gather": all_gather, "ring_p2p": ring}
        ts = {name: [] for name in fns}
        for _ in range(repeats):            # interleaved, so a change of load hits both alike
            for name, fn in fns.items():
                dist.barrier()
                t = time.perf_counter()
                fn()
                ts[name].append(time.perf_counter() - t)
        res = {}
        for name, v in ts.items():
            tt = torch.tensor(v, dtype=torch.float64)
            dist.all_reduce(tt, op=dist.ReduceOp.MAX)      # a collective ends when its slowest rank does
            res[name] = tt.tolist()
        rows.append({"seq": seq, "cp": world, "dtype": "fp32", "width": RING_WIDTH,
                     "gathered_bytes": seq * RING_WIDTH * 4, "wire_bytes_per_rank": (world - 1) * x.numel() * 4,
                     "repeats": repeats,
                     "median_ms": {n: 1e3 * statistics.median(v) for n, v in res.items()},
                     "all_ms_slowest_rank": {n: [round(1e3 * t, 3) for t in v] for n, v in res.items()}})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def measure_comm(world: int, seqs, repeats: int, tmp: str) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_comm_rank, args=(world, port, seqs, repeats, tmp), nprocs=world, start_method="spawn")
    with open(tmp) as f:
        rows = json.load(f)
    os.remove(tmp)
    return rows


def ring_vs_allgather(tmp_dir: str, table: list) -> dict:
    """Items 1-3: the ring's compute and communication against the one all-gather, measured here; the share at
    V3's real shapes modeled from `table` (per_rank)."""
    t0 = time.time()
    load0 = os.getloadavg()
    torch.set_num_threads(1)   # the machine is shared: one thread is steadier than two contending ones
    compute = []
    for cp in RING_CPS:
        r = attention_compute(RING_HEADS, RING_SEQ, cp, 0, RING_REPEATS, RING_BWD_REPEATS if cp == RING_CPS[-1] else 0)
        compute.append(r)
        print(f"ring vs one call, cp {cp}, S {RING_SEQ}, {RING_HEADS} heads, fwd ms: "
              + ", ".join(f"{n} {m:.0f}" for n, m in r["fwd_median_ms"].items())
              + ("; fwd+bwd ms: " + ", ".join(f"{n} {m:.0f}" for n, m in r["fwd_bwd_median_ms"].items())
                 if r["fwd_bwd_median_ms"] else ""))
    comm_rows = []
    for cp in RING_CPS:
        comm_rows += measure_comm(cp, (RING_SEQ, 8 * RING_SEQ), COMM_REPEATS,
                                  os.path.join(tmp_dir, ".cp_ring_rank.json"))
    by_cp = {r["cp"]: r for r in compute}
    for row in comm_rows:
        m = row["median_ms"]
        row["ring_p2p / all_gather"] = m["ring_p2p"] / m["all_gather"]
        print(f"exchange, cp {row['cp']}, S {row['seq']}: all-gather {m['all_gather']:.2f} ms, ring of "
              f"{row['cp'] - 1} send/recv {m['ring_p2p']:.2f} ms")
        if row["seq"] == RING_SEQ:
            f = by_cp[row["cp"]]["fwd_median_ms"]
            fastest = min(f, key=f.get)
            row["attention_fwd_ms"] = {"one_call": f["one_call"], "sdpa (the runtime's call)": f["sdpa"],
                                       f"fastest ({fastest})": f[fastest]}
            for name in ("all_gather", "ring_p2p"):
                row[f"{name}_share_of_attention_fwd"] = {n: m[name] / t for n, t in row["attention_fwd_ms"].items()}
    modeled = [{"model": r["model"], "seq": r["seq"], "cp": r["cp"],
                "attention_ms_per_rank": r["attention_ms_per_rank"],
                "latent_exposed_ms_nvlink": r["latent"]["exposed_ms_nvlink"],
                "latent_exposed_ms_ib": r["latent"]["exposed_ms_ib"],
                "latent_share_of_attention_nvlink": r["latent"]["exposed_share_of_attention_nvlink"],
                "latent_share_of_attention_ib": r["latent"]["exposed_ms_ib"] / r["attention_ms_per_rank"]}
               for r in table if r["model"] == "deepseek-v3"]

    def spread(key, by="ratios_fwd"):
        v = [c[by][key] - 1 for c in compute]
        return f"{100 * min(v):+.0f}..{100 * max(v):+.0f}%"
    fused = spread("flash_ring / flash_one_call (fused kernel, same mask work)")
    fused_skip = spread("flash_ring_skip / flash_all_gather_skip (fused kernel, both skip)")
    share = max(r["all_gather_share_of_attention_fwd"][k] for r in comm_rows if r["seq"] == RING_SEQ
                for k in r["all_gather_share_of_attention_fwd"] if k.startswith("fastest"))
    nvl = max(r["latent_share_of_attention_nvlink"] for r in modeled)
    ib = max(r["latent_share_of_attention_ib"] for r in modeled)
    pick = "all-gather" if max(share, ib) < 0.1 else "a ring (the exchange is a large share: profile it)"
    choice = (f"{pick}: with the fused kernel a ring's cp partial attentions and log-sum-exp merges took "
              f"{fused} against one call over the same keys ({fused_skip} against the all-gather's two prefix calls "
              f"when both skip the masked halves; medians, cp {'/'.join(map(str, RING_CPS))}), while the all-gather a "
              f"ring could hide was at most {100 * share:.1f}% of this rank's fastest attention forward here "
              f"(measured, gloo on this CPU) and is at most {100 * nvl:.1f}% on NVLink / {100 * ib:.1f}% on IB at V3's "
              f"shapes (modeled, H800): the most a ring can win back is that share, not worth a second attention "
              f"path with its own backward")
    print(choice)
    return {
        "what": "item 1: one rank's MLA attention (V3 head dims, fewer heads) by one call against a ring's partial "
                "attentions + log-sum-exp merges; item 2: one all-gather of the 576-wide latent against cp-1 "
                "ring send/recv steps on gloo; item 3: the choice",
        "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_before": [round(x, 2) for x in load0],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": "python benchmarks/cp_exchange.py --ring (also part of the default run)",
        "shapes": {"batch": 1, "seq": RING_SEQ, "cps": list(RING_CPS), "heads": RING_HEADS,
                   "qk_nope_head_dim": RING_DIMS[0], "qk_rope_head_dim": RING_DIMS[1], "v_head_dim": RING_DIMS[2],
                   "latent_width": RING_WIDTH, "dtype": "fp32", "rank_measured": 0,
                   "layout": "load-balanced: 2·cp chunks, rank r keeps chunks r and 2·cp-1-r (local_positions)"},
        "repeats": {"attention_fwd": RING_REPEATS, "attention_fwd_bwd": RING_BWD_REPEATS,
                    "attention_fwd_bwd_at_cp": RING_CPS[-1], "exchange": COMM_REPEATS},
        "method": "explicit matmul/softmax for every variant (partial_attention: the same arithmetic, returning the "
                  "log-sum-exp; torch's CPU flash kernel returns it but wants one head size for q/k and v, MLA has "
                  "192 and 128); 'sdpa' is torch SDPA with the boolean mask, the runtime's call, for reference; every "
                  "variant's output checked against one_call (rtol 1e-5); medians of wall time after one warm-up; "
                  "exchange times are the slowest rank's per repeat after a barrier",
        "attention_compute": compute,
        "exchange_measured": comm_rows,
        "modeled_v3_h800": {"note": "MODELED, not measured: from per_rank_per_layer (bf16, wire bytes forward + "
                                    "backward over plan/hardware.py's H800 NVLink 160 / IB 50 GB/s, attention at "
                                    "plan.planner.ATTN_EFF of the bf16 peak)", "rows": modeled},
        "choice": choice,
        "seconds": round(time.time() - t0, 1),
    }


def main():
    import argparse

    from model import preset
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "results", "cp_exchange.json"))
    ap.add_argument("--no-measure", action="store_true", help="the formulas only (no gloo ranks)")
    ap.add_argument("--ring", action="store_true", help="only the measured ring-against-all-gather section "
                    "(ring_vs_allgather), written into the existing JSON")
    args = ap.parse_args()
    t0 = time.time()
    if args.ring:
        table = [per_rank(preset(name), seq, cp) for name in SHAPES for seq in SEQS for cp in CPS]
        with open(args.out) as f:
            out = json.load(f)
        out["ring_vs_allgather"] = ring_vs_allgather(os.path.dirname(args.out), table)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote ring_vs_allgather into {args.out}")
        return
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
        "ring_vs_allgather": None if args.no_measure else ring_vs_allgather(os.path.dirname(args.out), table),
        "seconds": round(time.time() - t0, 1),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")
    if measured is not None and not out["all_agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
