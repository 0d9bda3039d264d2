"""The cluster planner (plan/planner.py, `python -m launch.plan`): the two Megatron-Bridge runs (NeMo
DGX-H100 tables) its fitted constants come from (dense Llama-3 8B for NON_GEMM, DeepSeek-V3 on 1024 H100 for
MOE_OVERHEAD), the out-of-sample run it is validated against (DeepSeek-V3 on 2048 H800, DeepSeek's own report),
the FLOP count against Megatron's for a second MoE shape (Qwen3-30B-A3B), memory terms by hand, the bubbles and
activation counts of V3 Table 2, ranking, the command line, and the communication formulas it shares with
plan/cost.py.
No processes, no GPU: the models are built on the meta device."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

import model
from model import ModelConfig, build_model, preset
from plan import cost
from plan import planner as P

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def v3_net():
    return build_model(preset("deepseek-v3"), device="meta")


@pytest.fixture(scope="module")
def v3(v3_net):
    return P.model_shape(v3_net, 4096)


# DeepSeek-V3 §3.2 / §4.2: 2048 H800, PP16 (DualPipe, two model copies), EP64 over 8 nodes, ZeRO-1 DP,
# no TP, FP8 (§3.3), RMSNorm + MLA up-projections recomputed (§3.2.3), batch 15360 x 4096
V3_RUN = P.Layout(tp=1, pp=16, ep=64, dp=128, vpp=1, schedule="dualpipe", zero=1, recompute="selective",
                  precision="fp8", micro_batch=1)
# Megatron-Bridge performance summary (NeMo 25.09, DGX-H100): 1024 H100, TP2 PP8 VP4 EP64, GBS 8192,
# MBS 1, seq 4096, FP8, recompute mla_up_proj + mlp, DeepEP with EP overlap: 1297 tok/s/GPU, 338 TFLOP/s;
# pipeline layout "Et|(tt|)*30mL" (Megatron's DeepSeek-V3 guide): embedding + 1 layer, 30 stages of 2,
# then MTP and the head alone on the last of the 32 stages
MCORE_RUN = P.Layout(tp=2, pp=8, ep=64, dp=64, vpp=4, schedule="interleaved_1f1b", zero=1, recompute="selective",
                     precision="fp8", micro_batch=1)
MCORE_SPLIT = [1] + [2] * 30 + [0]


def _run(shape, gpu, n, layout, batch, **kw):
    cluster = P.Cluster(gpu, n)
    P.check_layout(shape, cluster, layout, batch)
    return P.evaluate(shape, cluster, layout, batch, **kw)


# -- validation: out of sample (H800, DeepSeek's DualPipe and FP8 recipe, no TP, its own batch) ----
def test_deepseek_v3_2048_h800_gpu_hours(v3):
    """V3 §1 / Table 1: 180K H800 GPU-hours per trillion tokens; memory within 80 GB. No constant is set
    on this run: the prediction must land within ±20%."""
    p = _run(v3, "H800", 2048, V3_RUN, 15360, ep_overlap="dualpipe")   # DeepSeek's runtime: DualPipe's overlap
    assert p.fits and p.memory["total"] < 80, p.memory
    assert 0.8 * 180e3 <= p.gpu_hours_per_trillion_tokens <= 1.2 * 180e3, p.gpu_hours_per_trillion_tokens
    assert p.n_microbatches == 120 and p.layer_split[0] + sum(p.layer_split[1:]) == 61


# -- calibration: each constant is set on one Megatron-Bridge row and reproduces it -----------------
def test_moe_calibration_megatron_v3_1024_h100(v3):
    """MOE_OVERHEAD is set from Megatron-Bridge's DeepSeek-V3 run (NeMo 25.09, 1024 H100): 338 TFLOP/s and
    1297 tokens/s per GPU, both reproduced within ±3% (which also meets the ±20% the run was first held to)."""
    p = _run(v3, "H100", 1024, MCORE_RUN, 8192, layer_split=MCORE_SPLIT, ep_overlap="dualpipe")   # EP overlap
    assert p.fits, p.memory
    assert p.tflops_per_gpu == pytest.approx(338, rel=0.03)
    assert p.tokens_per_s_per_gpu == pytest.approx(1297, rel=0.03)
    assert p.n_microbatches == 128 and p.layer_split == MCORE_SPLIT
    # the last rank holds 6 layers, MTP and the head: the planner's own cut of the same layout is faster
    own = _run(v3, "H100", 1024, MCORE_RUN, 8192, ep_overlap="dualpipe")
    assert own.tokens_per_s_per_gpu > 1.1 * p.tokens_per_s_per_gpu
    with pytest.raises(P.PlanError, match="32 stages holding the 61 layers"):
        _run(v3, "H100", 1024, MCORE_RUN, 8192, layer_split=[2] * 30)


def test_ep_overlap_describes_the_runtime(v3):
    """--ep-overlap runtime (the default) overlaps only where whaletron does: micro-batch pairing at pp = 1
    (tp = cp = 1), EP_EXPOSED_RUNTIME of the all-to-all left exposed; DualPipeV's F&B pairs at pp > 1, by the
    share of chunks torch's order pairs; nothing under DeepSeek's two-copy DualPipe, which whaletron only
    plans, while dualpipe hides it there completely (V3 §3.2.1)."""
    none, runtime, dualpipe = (_run(v3, "H800", 2048, V3_RUN, 15360, ep_overlap=m) for m in ("none", "runtime",
                                                                                          "dualpipe"))
    assert runtime.time == none.time and dualpipe.time["step"] < none.time["step"]
    v = dataclasses.replace(V3_RUN, pp=8, dp=256, vpp=2, schedule="dualpipev")   # the V fold: 16 stages on 8
    none, runtime, dualpipe = (_run(v3, "H800", 2048, v, 15360, ep_overlap=m).time for m in ("none", "runtime",
                                                                                          "dualpipe"))
    assert dualpipe["step"] < runtime["step"] < none["step"]
    m = 15360 // 256
    share = P.dualpipev_paired_share(8, m)
    assert 0.8 < share < 1
    x = share * P.EP_EXPOSED_PAIRED + (1 - share) * P.EP_EXPOSED_ALONE
    assert P._overlap_exposed("runtime", v, m) == pytest.approx(x)
    lite = P.model_shape(build_model(preset("deepseek-v2-lite"), device="meta"), 4096)
    pp1 = P.Layout(tp=1, pp=1, ep=8, dp=64, zero=1, recompute="selective", precision="bf16")
    t = {m: _run(lite, "H800", 64, pp1, 512, ep_overlap=m).time for m in P.EP_OVERLAP}
    assert t["dualpipe"] == t["none"] and t["runtime"]["step"] < t["none"]["step"]
    # compute-bound: the pairing trades (1 - x) of the all-to-all for the SMs the communication takes
    gain = (1 - P.EP_EXPOSED_RUNTIME) * t["none"]["ep_comm"] - (t["runtime"]["compute"] - t["none"]["compute"])
    assert t["none"]["step"] - t["runtime"]["step"] == pytest.approx(gain, rel=1e-9)
    with pytest.raises(P.PlanError, match="ep_overlap 'always'"):
        _run(lite, "H800", 64, pp1, 512, ep_overlap="always")


def test_dense_calibration_point():
    """NON_GEMM is set from Megatron-Bridge's dense Llama-3 8B run (NeMo 25.11, 8 H100, FP8, FSDP, MBS 1,
    GBS 128, seq 8192: 14451 tokens/s per GPU): the constants still reproduce it."""
    shape = P.model_shape(build_model(preset("llama-3-8b"), device="meta"), 8192)
    p = _run(shape, "H100", 8, P.Layout(dp=8, zero=3, precision="fp8"), 128)
    assert p.tokens_per_s_per_gpu == pytest.approx(14451, rel=0.05)


# Qwen3-30B-A3B (Hugging Face config.json of Qwen/Qwen3-30B-A3B): 48 layers, hidden 2048, GQA 32 heads of 128
# with 4 KV heads, every layer MoE with 128 routed experts of 768, top-8 (normalised), no shared expert,
# vocab 151936, untied head. (QK-norm is not modelled: a negligible cost.)
QWEN3_30B_A3B = ModelConfig(name="qwen3-30b-a3b", attention="gqa", rope_interleave=False, vocab_size=151936, dim=2048,
                            n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, inter_dim=6144, n_routed_experts=128,
                            n_shared_experts=0, n_activated_experts=8, moe_inter_dim=768, norm_topk_prob=True,
                            rope_theta=1e6, max_seq_len=4096)


def test_qwen3_30b_a3b_flops_match_megatron():
    """The model's FLOP count for a fine-grained MoE agrees with Megatron's: its Qwen3-30B-A3B row (NeMo 25.09,
    DGX-H100) gives 241 TFLOP/s / 10494 tok/s = 22.97 GFLOP/token. (That row's throughput is a known
    out-of-domain miss of the shape-free MOE_OVERHEAD: docs/planner.md.)"""
    shape = P.model_shape(build_model(QWEN3_30B_A3B, device="meta"), 4096)
    assert shape.train_flops_per_token == pytest.approx(241e12 / 10494, rel=0.01)


def test_flops_and_gpu_table_are_the_repository_s(v3, v3_net):
    from pretrain import metrics
    assert v3.train_flops_per_token == pytest.approx(metrics.train_flops_per_token(v3_net, 4096), rel=1e-12)
    assert v3.train_flops_per_token == pytest.approx(338e12 / 1297, rel=0.01)   # Megatron's own count
    assert metrics.PEAK_FLOPS is P.PEAK_FLOPS and metrics.PEAK_FLOPS["H800"]["bf16"] == 989.4e12


# -- memory -----------------------------------------------------------------------------------------
HAND = ModelConfig(name="hand", attention="gqa", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   inter_dim=128, max_seq_len=128)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_memory_terms_by_hand(recompute):
    """Dense GQA, D=64, 4 heads of 16, 2 KV heads, SwiGLU 128, vocab 256, 2 layers, 128 tokens, bf16,
    ZeRO-1 over dp=2. Per token and block (bytes): attention norm input 2D, its output 2D (q/k/v input),
    q, k, v 2*16*(4+2*2), output 2*4*16, log-sum-exp 4*4 = 656; MLP norm input and output 4D, w1/w3
    outputs and w2 input 2*3*128 = 1024; head 4D = 256. selective drops the two norm outputs (2 x 2D);
    full keeps each block's input (2D) plus one block's working set."""
    shape = P.model_shape(build_model(HAND, device="meta"), 128)
    n_params = HAND.param_counts()["total"]
    p = _run(shape, "H100", 2, P.Layout(dp=2, recompute=recompute), 4)
    block = {"none": 656 + 1024, "selective": 656 - 128 + 1024 - 128, "full": 128}[recompute]
    act = (2 * block + 256) * 128
    working = (656 + 1024) * 128 if recompute == "full" else 0
    m = p.memory
    assert m["weights"] * 1e9 == pytest.approx(2 * n_params)
    assert m["grads"] * 1e9 == pytest.approx(4 * n_params)
    assert m["optimizer"] * 1e9 == pytest.approx((4 + 8) * n_params / 2)    # fp32 master + moments, / dp
    assert m["activations"] * 1e9 == pytest.approx(act)
    assert m["logits_and_working"] * 1e9 == pytest.approx(128 * 256 * 4 + working)


def test_mla_moe_activation_terms_by_hand(v3):
    """V3's MLA per token (bf16): norm inputs 2(7168+1536+512), down/up-projection inputs the same,
    q, k, v 2*128*(192+192+128), output 2*128*128, lse 4*128. selective (V3 §3.2.3) keeps the norm
    inputs, the roped key k^R (2*64), output and lse. FP8 (V3 §3.3.3) caches the MoE's K dispatched
    copies and the SwiGLU inputs in FP8 (1 + 4/128 bytes), the attention output in E5M6."""
    cfg = v3.cfg
    assert P._attention_bytes(cfg, "none", False) == 18432 + 18432 + 131072 + 32768 + 512
    assert P._attention_bytes(cfg, "selective", False) == 18432 + 128 + 32768 + 512
    assert P._attention_bytes(cfg, "selective", True) == 18432 + 128 + 1.5 * 16384 + 512
    fp8 = P._ffn_bytes(cfg, True, "selective", True)
    assert fp8 == 2 * 7168 + 8 * 256 + (1 + 4 / 128) * (8 * 7168 + 9 * 2 * 2048)
    assert P._ffn_bytes(cfg, True, "none", False) == 4 * 7168 + 8 * 256 + 2 * (8 * 7168 + 9 * 3 * 2048 + 8 * 7168)


def test_zero3_and_recompute_trade_memory_for_time(v3):
    lay = dict(tp=1, pp=16, ep=64, dp=128, vpp=1, schedule="dualpipe", precision="fp8")
    z1 = _run(v3, "H800", 2048, P.Layout(**lay, zero=1, recompute="selective"), 15360)
    z3 = _run(v3, "H800", 2048, P.Layout(**lay, zero=3, recompute="selective"), 15360)
    full = _run(v3, "H800", 2048, P.Layout(**lay, zero=1, recompute="full"), 15360)
    none = _run(v3, "H800", 2048, P.Layout(**lay, zero=1, recompute="none"), 15360)
    assert z3.memory["weights"] + z3.memory["grads"] < 0.5 * (z1.memory["weights"] + z1.memory["grads"])
    assert none.memory["activations"] > z1.memory["activations"] > full.memory["activations"]
    assert none.time["compute"] < z1.time["compute"] < full.time["compute"]


# -- pipeline schedules: V3 Table 2 ------------------------------------------------------------------
def test_bubbles_and_activations_follow_v3_table2():
    PP, F, B, W = 16, 1.0, 2.0, 0.8
    FB = 2.6   # an overlapped forward + backward pair, shorter than F + B
    assert P.bubble("1f1b", PP, F, B, W, FB) == (PP - 1) * (F + B)
    assert P.bubble("zb1p", PP, F, B, W, FB) == pytest.approx((PP - 1) * (F + B - 2 * W))
    assert P.bubble("dualpipe", PP, F, B, W, FB) == pytest.approx((PP / 2 - 1) * (FB + B - 3 * W))
    # DualPipeV: DualPipe cut in half, PP/2 ranks of two half-size chunks
    assert P.bubble("dualpipev", PP // 2, F / 2, B / 2, W / 2, FB / 2) == pytest.approx(
        (PP / 2 - 1) * (FB + B - 3 * W) / 2)
    m = 64
    assert P.in_flight("1f1b", PP, m, 1, 0) == PP
    assert P.in_flight("zb1p", PP, m, 1, 5) == PP
    assert P.in_flight("dualpipe", PP, m, 1, 3) == PP + 1
    assert P.in_flight("dualpipev", PP // 2, m, 2, 3) == PP + 1        # chunks of half a DualPipe stage


def test_closed_forms_agree_with_the_schedule_benchmark():
    """benchmarks/pp_schedules.py's closed forms, which tests/test_pp_schedules.py checks against torch's
    real op order: the same bubbles and per-rank activation counts for every runtime schedule."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import pp_schedules as bench
    c = bench.Costs(F=0.1, I=0.1, W=0.05)
    for name in bench.SCHEDULES:
        for pp, m, vpp in ((4, 8, 2), (8, 32, 4)):
            want = bench.closed_form(name, pp, m, c, vpp)["bubble_s"]
            assert P.bubble(name, pp, c.F, c.B, c.W, c.F + c.B) == pytest.approx(want), name
            want_mem = bench.closed_form_memory(name, pp, m, vpp)
            assert [P.in_flight(name, pp, m, vpp, r) for r in range(pp)] == want_mem, name


def test_dualpipe_keeps_two_copies_dualpipev_one(v3):
    """V3 Table 2: DualPipe's parameters per device are 2x 1F1B's on the same PP; DualPipeV's 1x."""
    peak = P.GPUS["H800"].peak

    def per_device(schedule, vpp):
        pl = P._placement(v3, schedule, 16, vpp, peak, "fp8", {})
        held = [sum(p.params for p in parts if p.kind != "embed") for parts in pl.slot_parts]
        return sum(held) / len(held)

    one = per_device("1f1b", 1)
    assert per_device("dualpipe", 1) == pytest.approx(2 * one, rel=1e-9)
    assert per_device("dualpipev", 2) == pytest.approx(one, rel=1e-9)


def test_v_layout_balances_ranks_not_stages(v3):
    """In a V layout the first and the last stage (head, MTP) share rank 0: the runtime's per-stage cut
    leaves that rank far behind; the planner's cut balances ranks."""
    from parallel.pipeline import split_layers
    from parallel.pp_schedules import stage_to_rank
    costs = (v3.pre.flops, [p.flops for p in v3.layers], sum(p.flops for p in v3.post))
    ranks = stage_to_rank("dualpipev", 16)

    def worst(edges):
        load = [0.0] * 16
        for s in range(32):
            load[ranks[s]] += (sum(costs[1][edges[s]:edges[s + 1]]) + (costs[0] if s == 0 else 0)
                               + (costs[2] if s == 31 else 0))
        return max(load)

    runtime = [0]
    for s in split_layers(costs, 32):
        runtime.append(runtime[-1] + len(s))
    planned = P.balance_stages(costs, 32, ranks)
    mean = sum(costs[1]) / 16 + (costs[0] + costs[2]) / 16
    assert worst(runtime) > 1.45 * mean                      # rank 0: stage 0 + head + MTP
    assert worst(planned) < 1.22 * mean                      # 61 layers + 3.9 layers of tail on 16 ranks
    assert sorted(planned) == planned and planned[0] == 0 and planned[-1] == 61


# -- ranking --------------------------------------------------------------------------------------------
def test_ranking_puts_fitting_layouts_first(v3):
    fast_unfit = P.Plan(P.Layout(pp=2), False, {"total": 90.0}, {}, 2000, 0, 0, None, 0, 1)
    slow_fit = P.Plan(P.Layout(pp=4), True, {"total": 50.0}, {}, 1000, 0, 0, None, 0, 1)
    mid_fit = P.Plan(P.Layout(pp=8), True, {"total": 70.0}, {}, 1500, 0, 0, None, 0, 1)
    assert P.rank([fast_unfit, slow_fit, mid_fit]) == [mid_fit, slow_fit, fast_unfit]
    # for real: without recomputation DeepSeek's layout is faster but does not fit; the planner takes
    # the fitting variant of the same layout
    cluster = P.Cluster("H800", 2048)
    pin = dict(tp=1, pp=16, ep=64, schedule="dualpipe", zero=1)
    best = P.plan(v3, cluster, 15360, precision="fp8", pin=pin)[0]
    faster = P.evaluate(v3, cluster, dataclass_replace(best.layout, recompute="none"), 15360)
    assert best.fits and best.layout.recompute == "selective"
    assert not faster.fits and faster.tokens_per_s_per_gpu > best.tokens_per_s_per_gpu


def dataclass_replace(layout, **kw):
    import dataclasses
    return dataclasses.replace(layout, **kw)


# -- communication: the formulas of plan/cost.py -------------------------------------------------------
@pytest.mark.parametrize("name", ["deepseek-v3", "tiny-llama-3-8b", "tiny-deepseek-v2"])
def test_tp_bytes_are_cost_tensor_parallel_step(name, v3):
    """The planner's tp traffic of all a model's parts (one stage) is cost.tensor_parallel_step, the
    formula the runtime's measured bytes are checked against (tests/test_parallel.py)."""
    shape = v3 if name == "deepseek-v3" else P.model_shape(build_model(preset(name), device="meta"), 64)
    parts = [shape.pre, *shape.layers, *shape.post]
    for tp in (2, 4):
        got = P.tp_bytes(shape, parts, tp, 2)
        assert got == cost.tensor_parallel_step(shape.cfg, tp, True, 2, shape.seq_len, e=2)


def test_ep_bytes_are_cost_expert_dispatch_step(v3):
    """Inside a node: the planner's expected all-to-all bytes are cost.expert_dispatch_step's token
    bytes for the routing those expectations describe."""
    cfg, ep, tokens = v3.cfg, 8, 4096
    rows = cost.expected_dispatch_rows(cfg.n_routed_experts, cfg.n_activated_experts, ep, 8)
    per_dest = tokens * rows["intra"] / (ep - 1)
    pairs = [[0.0 if s == d else per_dest for d in range(ep)] for s in range(ep)]
    want = cost.expert_dispatch_step(pairs, 3, cfg.dim, cfg.n_activated_experts, e=2)["all_to_all/ep"]
    assert P.ep_bytes(cfg, tokens, ep, 8, fp8=False)["intra"] == pytest.approx(want, abs=1)
    assert rows["inter"] == 0


def test_expected_dispatch_rows_match_node_limited_routing():
    """cost.expected_dispatch_rows against sampled routing: 64 devices in 8 nodes of 8, 4 experts each,
    top-8 among the experts of M = 4 nodes (V3 §2.1.2); hierarchical dispatch (V3 §3.2.2)."""
    g = torch.Generator().manual_seed(0)
    T, E, K, M, nodes, per_node, per_dev = 20000, 256, 8, 4, 8, 8, 4
    chosen = torch.rand(T, nodes, generator=g).argsort(1)[:, :M]                       # M nodes per token
    pool = (chosen.unsqueeze(-1) * per_node * per_dev + torch.arange(per_node * per_dev)).flatten(1)
    experts = pool.gather(1, torch.rand(T, pool.shape[1], generator=g).argsort(1)[:, :K])
    dev, node = experts // per_dev, experts // (per_node * per_dev)
    src = torch.randint(0, nodes * per_node, (T,), generator=g)
    src_node, src_local = src // per_node, src % per_node
    hit_nodes = torch.zeros(T, nodes, dtype=torch.bool).scatter_(1, node, True)
    hit_devs = torch.zeros(T, nodes * per_node, dtype=torch.bool).scatter_(1, dev, True)
    inter = (hit_nodes.sum(1) - hit_nodes[torch.arange(T), src_node].long()).float().mean().item()
    landing = torch.arange(nodes).unsqueeze(0) * per_node + src_local.unsqueeze(1)   # where a token lands per node
    intra = (hit_devs.sum(1) - hit_devs.gather(1, landing).logical_and(hit_nodes).sum(1)).float().mean().item()
    want = cost.expected_dispatch_rows(E, K, nodes * per_node, per_node, topk_nodes=M)
    assert want["inter"] == pytest.approx(inter, rel=0.02)
    assert want["intra"] == pytest.approx(intra, rel=0.02)


def test_wire_bytes_ring_factors():
    assert cost.wire_bytes("all_reduce", 100, 4) == 150
    assert cost.wire_bytes("all_gather", 100, 4) == 75
    assert cost.wire_bytes("reduce_scatter", 100, 4) == 75
    assert cost.wire_bytes("all_to_all", 100, 4) == 100
    assert cost.wire_bytes("all_reduce", 100, 1) == 0


# -- the command line ------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch, v3_net, capsys):
    """launch.plan.main with the V3 meta model built once for the module."""
    real = model.build_model
    monkeypatch.setattr(model, "build_model",
                        lambda cfg, device=None, **kw: v3_net if cfg.name == "deepseek-v3" else real(cfg, device, **kw))
    from launch.plan import main

    def run(*argv):
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


V3_ARGS = ("--model", "deepseek-v3", "--gpus", 2048, "--gpu", "h800", "--global-batch", 15360, "--seq-len", 4096,
           "--fp8")


def test_cli_json_pinned_layout(cli):
    rc, out, err = cli(*V3_ARGS, "--layout", "pp=16,ep=64,tp=1", "--schedule", "dualpipe", "--zero", 1,
                       "--recompute", "selective", "--json")
    assert rc == 0, err
    d = json.loads(out)
    for key in ("gpu_hours_per_trillion_tokens", "mfu", "tokens_per_s_per_gpu", "tflops_per_gpu", "memory_gb"):
        assert isinstance(d[key], float) and math.isfinite(d[key]), key
    assert {k: d["layout"][k] for k in ("tp", "pp", "ep", "dp", "schedule", "zero", "recompute", "precision")} == \
        dict(tp=1, pp=16, ep=64, dp=128, schedule="dualpipe", zero=1, recompute="selective", precision="fp8")
    assert set(d["memory"]) >= {"weights", "grads", "optimizer", "activations", "total"}
    assert set(d["time"]) >= {"step", "compute", "exposed_comm", "bubble"}
    assert d["memory_gb"] == d["memory"]["total"] < 80
    assert 144e3 <= d["gpu_hours_per_trillion_tokens"] <= 216e3


def test_cli_table(cli):
    rc, out, err = cli(*V3_ARGS, "--layout", "pp=16,ep=64", "--zero", 1, "--top", 3)
    assert rc == 0, err
    assert "tok/s/GPU" in out and "GPU-h/1T tok" in out and "best: tp" in out and "memory on rank" in out
    rows = [line for line in out.splitlines() if line.strip()[:2] in ("1 ", "2 ", "3 ")]
    assert len(rows) == 3 and all("pp16 ep64" in r for r in rows)


@pytest.mark.parametrize("argv, message", [
    (("--model", "deepseek-v9", "--gpus", 8, "--global-batch", 8), "unknown model preset 'deepseek-v9'"),
    (("--model", "deepseek-v3", "--gpus", 2047, "--gpu", "h800", "--global-batch", 15360), "not whole nodes of 8"),
    (("--model", "deepseek-v3", "--gpus", 2048, "--gpu", "b200", "--global-batch", 15360), "unknown GPU 'b200'"),
    (V3_ARGS + ("--layout", "pp=16,ep=512"), "ep=512 does not divide the 256 routed experts"),
    (V3_ARGS + ("--layout", "pp=3,tp=1"), "not divisible by tp x pp = 1 x 3"),
    (V3_ARGS + ("--layout", "pp=16,tp=1,dp=64"), "leave dp out to derive it (dp = 128)"),
    (V3_ARGS + ("--layout", "pp=16,q=3"), "KEY one of tp, pp, ep, dp, vpp"),
    (("--model", "deepseek-v3", "--gpus", 64, "--gpu", "h100", "--global-batch", 1024, "--layout", "pp=1,tp=1,ep=64"),
     "no layout fits in 80 GB per H100"),
    (("--model", "deepseek-v3", "--gpus", 64, "--gpu", "a100", "--global-batch", 1024, "--fp8"), "A100 has no fp8"),
    (V3_ARGS + ("--top", 0), "--top must be >= 1 (rows of the table), got 0"),
    (V3_ARGS + ("--top", -3), "--top must be >= 1 (rows of the table), got -3"),
])
def test_cli_bad_input_is_a_clean_error(cli, argv, message):
    rc, out, err = cli(*argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_cli_process_exit_code():
    r = subprocess.run([sys.executable, "-m", "launch.plan", "--model", "deepseek-v3", "--gpus", "12", "--gpu", "h800",
                        "--global-batch", "16"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: 12 GPUs are not whole nodes of 8: use a multiple of 8 (or set --gpus-per-node)"


# -- context parallelism (issue 24): cost.cp_*, the planner's cp terms and its search --------------------
def test_cp_exchange_widths_latent_against_per_head():
    """MLA exchanges its latent c^KV + k^R (V2 §2.1.2-2.1.3): 512 + 64 = 576 elements per token and layer for
    V3 and V2-Lite, on every tp rank; Megatron-core exchanges the up-projected per-head keys and values,
    H x (192 + 128): 40,960 for V3 (71x), 16 x 320 = 5,120 for V2-Lite (8.9x). GQA: this tp rank's KV heads."""
    v3, lite, llama = preset("deepseek-v3"), preset("deepseek-v2-lite"), preset("tiny-llama-3-8b")
    assert cost.cp_kv_width(v3) == cost.cp_kv_width(v3, tp=8) == cost.cp_kv_width(lite) == 576
    assert cost.cp_kv_width(v3, per_head=True) == 40960 and cost.cp_kv_width(v3, 8, per_head=True) == 5120
    assert cost.cp_kv_width(lite, per_head=True) == 5120
    assert cost.cp_kv_width(v3, per_head=True) / cost.cp_kv_width(v3) == pytest.approx(71.1, abs=0.05)
    assert [cost.cp_kv_width(llama, tp) for tp in (1, 2, 4)] == [2 * 2 * 16, 2 * 16, 2 * 16]   # 2 KV heads of 16


def test_cp_layer_bytes_follow_comm_conventions():
    """One layer, one micro-batch of V3 at 32K over cp 8, bf16: the forward all-gather records the gathered
    output, 32768 x 576 x 2 B = 37.7 MB, and the backward reduce-scatter its gradient, the same; full
    recomputation gathers twice. On the wire each rank moves (cp - 1)/cp of each."""
    v3 = preset("deepseek-v3")
    c = Counter()
    cost.cp_layer_step(c, v3, 8, 1, 32768, e=2)
    assert c == {"cp_all_gather/cp": 32768 * 576 * 2, "cp_reduce_scatter/cp": 32768 * 576 * 2}
    assert cost.cp_wire_bytes_per_layer(v3, 8, 1, 32768) == 2 * 7 / 8 * 32768 * 576 * 2
    full = Counter()
    cost.cp_layer_step(full, v3, 8, 1, 32768, recompute_full=True)
    assert full["cp_all_gather/cp"] == 2 * c["cp_all_gather/cp"]
    step = cost.context_parallel_step(v3, 8, 1, 32768)
    assert step["cp_all_gather/cp"] == (61 + 1) * c["cp_all_gather/cp"]            # every layer and the MTP block
    assert cost.context_parallel_step(v3, 1, 1, 32768) == Counter()


def test_cp_formula_agrees_with_the_runtime():
    """plan.cost's exchange bytes are parallel.context_parallel.cp_exchange_bytes's, which
    tests/test_context_parallel.py checks against the bytes comm.STATS measures on gloo ranks."""
    from parallel import context_parallel as cp_mod
    for name in ("deepseek-v3", "deepseek-v2-lite", "tiny-llama-3-8b", "tiny-deepseek-v3"):
        cfg = preset(name)
        for tp, cp, full in ((1, 2, False), (2, 4, True), (4, 8, False)):
            c = Counter()
            cost.cp_layer_step(c, cfg, cp, 2, 512, e=2, tp=tp, recompute_full=full)
            want = cp_mod.cp_exchange_bytes(2 * 512, cost.cp_kv_width(cfg, tp), 2, cp, recompute=full)
            assert dict(c) == {f"{k}/cp": v for k, v in want.items()}, (name, tp, cp)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_cp_memory_and_exchange_by_hand(recompute):
    """HAND (dense GQA) at 128 tokens over cp 2 on 2 GPUs: each rank keeps test_memory_terms_by_hand's
    terms for its 64 tokens, plus per attention layer the other rank's 64 keys and values (2 KV heads of 16,
    K and V, bf16: 64 x 2 x 64 B) except under full recomputation (then one block's working set holds them);
    its optimizer state is sharded over dp x cp = 2; each layer's exchange puts (cp - 1)/cp of the gathered
    keys and values on NVLink, forward and backward, exposed."""
    shape = P.model_shape(build_model(HAND, device="meta"), 128)
    n_params = HAND.param_counts()["total"]
    p = _run(shape, "H100", 2, P.Layout(cp=2, recompute=recompute), 4)
    block = {"none": 656 + 1024, "selective": 656 - 128 + 1024 - 128, "full": 128}[recompute]
    remote = 64 * 2 * 64
    act = (2 * block + 256) * 64 + (0 if recompute == "full" else 2 * remote)
    working = (656 + 1024) * 64 + remote if recompute == "full" else 0
    m = p.memory
    assert m["weights"] * 1e9 == pytest.approx(2 * n_params)
    assert m["optimizer"] * 1e9 == pytest.approx((4 + 8) * n_params / 2)
    assert m["activations"] * 1e9 == pytest.approx(act)
    assert m["logits_and_working"] * 1e9 == pytest.approx(64 * 256 * 4 + working)
    again = 1.5 if recompute == "full" else 1.0
    assert p.time["cp_comm"] == pytest.approx(4 * 2 * (2 * 0.5 * 128 * 64 * 2) / 360e9 * again)
    assert p.layout.label().startswith("tp1 cp2 pp1") and P.Layout().label().startswith("tp1 pp1")


def test_cp_mla_terms_by_hand(v3):
    """V3 under cp (per rank, for the other ranks' `remote` tokens of a micro-batch): selective keeps the gathered
    latent c^KV + k^R (2 x 576 B a token; the up-projections are recomputed from it, V3 §3.2.3), none also the
    per-head keys and values of its heads (2 x 40,960 B), full nothing; one layer's backward holds the whole
    sequence's keys and values and their gradients (selective) or the gradients alone."""
    cfg, block, remote, S = v3.cfg, v3.layers[5], 28672, 32768
    assert P.cp_remote_bytes(cfg, block, "selective", 8, remote, 1) == 2 * 576 * remote
    assert P.cp_remote_bytes(cfg, block, "none", 8, remote, 1) == 2 * (576 + 40960) * remote
    assert P.cp_remote_bytes(cfg, block, "none", 8, remote, 8) == 2 * (576 + 5120) * remote
    assert P.cp_remote_bytes(cfg, block, "full", 8, remote, 1) == 0 == P.cp_remote_bytes(cfg, v3.post[0], "none", 8,
                                                                                           remote, 1)
    assert P.cp_working_bytes(cfg, "selective", 8, S, 1) == 2 * 2 * 40960 * S
    assert P.cp_working_bytes(cfg, "none", 8, S, 1) == 2 * 40960 * S == P.cp_working_bytes(cfg, "full", 8, S, 1)
    assert P.cp_working_bytes(cfg, "selective", 1, S, 1) == 0
    assert P.cp_up_flops(cfg, block) == 2 * 512 * 128 * 256


def test_cp_splits_the_sequence_work(v3_net):
    """At 32K on 256 H800 without a pipeline, going from cp 4 to cp 8 (dp 64 -> 32): each rank holds half the
    tokens of every micro-batch, so its activations halve but for the gathered latents (which grow from 3/4 to
    7/8 of the sequence); it runs twice the micro-batches; the exchange grows; time per token within 10%."""
    shape = P.model_shape(v3_net, 32768)
    lay = dict(tp=1, pp=1, ep=64, zero=3, recompute="selective", precision="fp8")
    a = _run(shape, "H800", 256, P.Layout(**lay, dp=64, cp=4), 1920)
    b = _run(shape, "H800", 256, P.Layout(**lay, dp=32, cp=8), 1920)
    assert b.n_microbatches == 2 * a.n_microbatches == 60
    gathered = [62 * 2 * 576 * r / 1e9 for r in (24576, 28672)]     # 61 layers + the MTP block
    local = [a.memory["activations"] - gathered[0], b.memory["activations"] - gathered[1]]
    assert local[1] == pytest.approx(local[0] / 2, rel=1e-9)
    assert b.time["cp_comm"] > a.time["cp_comm"] > 0
    assert b.tokens_per_s_per_gpu == pytest.approx(a.tokens_per_s_per_gpu, rel=0.1)


def test_cp_search_long_sequences_only(v3, v3_net):
    """The search tries cp where a rank keeps >= CP_MIN_TOKENS of a sequence (so every 4K search is the one
    it was), and at 32K recommends a cp layout for V3's own pipeline on 2048 H800 (V3 §4.3: batch 1920)."""
    assert P.cp_choices(v3, 2048) == [1]
    long = P.model_shape(v3_net, 32768)
    assert P.cp_choices(long, 128) == [1, 2, 4, 8]
    plans = P.plan(long, P.Cluster("H800", 2048), 1920, precision="fp8",
                   pin=dict(tp=1, pp=16, ep=64, schedule="dualpipev", zero=1))
    best = plans[0]
    assert best.layout.cp == 8 and best.layout.dp == 16 and best.fits and best.memory["total"] < 80
    assert all(p.layout.cp > 1 for p in plans)      # cp 1 and 2 leave too few micro-batches or do not fit


def test_cp_layout_errors():
    shape = P.model_shape(build_model(HAND, device="meta"), 128)
    with pytest.raises(P.PlanError, match="not divisible by 2 x cp = 6"):
        _run(shape, "H100", 3, P.Layout(cp=3), 3)
    with pytest.raises(P.PlanError, match=r"tp x cp x pp x dp = 1 x 2 x 1 x 2 != 2 GPUs: leave dp out"):
        _run(shape, "H100", 2, P.Layout(cp=2, dp=2), 4)
    short = P.model_shape(build_model(HAND, device="meta"), 12)
    with pytest.raises(P.PlanError, match=r"the 6 tokens a cp rank holds .* not divisible by tp=4"):
        _run(short, "H100", 8, P.Layout(tp=4, cp=2), 4)
    with pytest.raises(P.PlanError, match="cp=0 must be >= 1"):
        _run(shape, "H100", 2, P.Layout(cp=0, dp=2), 4)


def test_cli_cp_layout(cli):
    """--seq-len 32768 with cp pinned: the JSON names cp and the exchange's time; the table says it is exposed."""
    args = ("--model", "deepseek-v3", "--gpus", 2048, "--gpu", "h800", "--global-batch", 1920, "--seq-len", 32768,
            "--fp8", "--layout", "pp=16,ep=64,tp=1,cp=8", "--schedule", "dualpipev", "--zero", 1,
            "--recompute", "selective")
    rc, out, err = cli(*args, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert (d["layout"]["cp"], d["layout"]["dp"]) == (8, 16) and d["time"]["cp_comm"] > 0 and d["memory_gb"] < 80
    rc, out, err = cli(*args, "--top", 1)
    assert rc == 0 and "context parallel" in out and "cp8" in out, err


def test_dualpipev_exposed_term_matches_the_measurement():
    """The planner's DualPipeV term against benchmarks/overlap.py's ep2 x pp2 run: the share of chunks torch's
    order pairs is the share of the link time the traced step spent in F&B pairs, the constants are that
    step's exposed fractions in and out of pairs, and together they give the step's measured exposure."""
    with open(os.path.join(ROOT, "benchmarks", "results", "overlap_cpu.json")) as f:
        c = json.load(f)["cases"]["ep2_pp2"]
    lay = P.Layout(tp=1, pp=c["pp"], ep=c["ep"], dp=c["world"] // c["pp"], schedule="dualpipev", zero=1,
                   recompute="none", precision="bf16")
    m = c["micro_batches"]
    assert P.dualpipev_paired_share(c["pp"], m) == pytest.approx(c["traced_link_share_in_pairs"], abs=0.03)
    assert P.EP_EXPOSED_PAIRED == pytest.approx(c["traced_exposed_fraction_in_pairs"], abs=0.01)
    assert P.EP_EXPOSED_ALONE == pytest.approx(c["traced_exposed_fraction_alone"], abs=0.01)
    assert P._overlap_exposed("runtime", lay, m) == pytest.approx(c["traced_exposed_fraction"], abs=0.02)
    assert P._overlap_exposed("runtime", lay, m) == pytest.approx(c["overlap_exposed_fraction"], abs=0.05)
