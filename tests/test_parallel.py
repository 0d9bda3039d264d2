"""Parallel I: every layout equals one process (gloo ranks on CPU, fp32).

Each rank builds the single-process reference itself (same seed, data and weights), runs the
parallel model on its share, and compares the loss, every gradient (gathered to global tensors)
and the parameters after 3 AdamW steps with gradient clipping and the expert-bias update.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model import build_model, preset
from model.transformer import IGNORE_INDEX
import parallel
from parallel import ParallelConfig, build_mesh, parallelize

BATCH, SEQ, STEPS = 4, 16, 3


def _data(cfg, step: int, batch: int = BATCH, seq: int = SEQ):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return tokens, labels


def _close(got, want, what: str, tol: float = 1e-5):
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def equivalence_rank(name: str, layout: dict, micro: int = 1, meta_init: bool = True, overrides=None):
    """fp32: loss and gradients of the first step. fp64: loss and gradients of every step and the
    parameters after 3 AdamW steps. (In fp32, Adam's g / (sqrt(v) + eps) turns the last-bit
    differences of a different summation order in near-zero gradients into visible parameter
    differences; in fp64 the same comparison is exact to ~1e-12, so it checks the logic.)"""
    mesh = build_mesh(ParallelConfig(**layout))
    _equivalence(name, mesh, torch.float32, 1, micro, meta_init, overrides or {})
    _equivalence(name, mesh, torch.float64, STEPS, micro, meta_init, overrides or {})


def _equivalence(name, mesh, dtype, steps, micro, meta_init, overrides):
    torch.manual_seed(0)
    cfg = preset(name, **overrides)
    dims = mesh.dims
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    ref = build_model(cfg, seed=0, dtype=dtype).train()
    ref.set_expert_placement(dims.ep, dims.ep // dims.ep_nodes)
    if meta_init:  # built on meta, initialised shard by shard
        net = parallelize(build_model(cfg, device="meta", dtype=dtype).train(), mesh)
        parallel.init_parallel_weights(net, mesh, seed=0)
    else:  # a materialised model, sliced
        net = parallelize(build_model(cfg, seed=0, dtype=dtype).train(), mesh)
    params = parallel.full_state(net, mesh)
    for k, v in ref.state_dict().items():
        if k in params:
            assert torch.equal(params[k], v), f"initialisation differs: {k}"
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1, foreach=True)
    d, n_dp = mesh.dims.coords(mesh.rank)["dp"], dims.dp
    for step in range(steps):
        tokens, labels = _data(cfg, step)
        ropt.zero_grad()
        rout = ref.loss(tokens, labels)
        rout["loss"].backward()
        opt.zero_grad()
        rows = tokens.shape[0] // n_dp
        mine = slice(d * rows, (d + 1) * rows)
        losses = []
        for m in range(micro):  # gradient accumulation over micro-batches of this rank's rows
            parallel.set_gradient_sync(net, m == micro - 1)
            part = slice(mine.start + m * rows // micro, mine.start + (m + 1) * rows // micro)
            out = net.loss(tokens[part], labels[part])
            (out["loss"] / micro).backward()
            losses.append({k: v.detach() for k, v in out.items()})
        parallel.finish_grad_sync(net, mesh)
        if True:
            for key in rout:
                got = sum(mb[key] for mb in losses) / micro
                dist.all_reduce(got)
                _close(got / dims.world, rout[key].detach(), f"{key}", tol)
            grads = parallel.full_state(net, mesh, grads=True)
            for k, p in ref.named_parameters():
                assert grads[k] is not None, f"no gradient for {k}"
                _close(grads[k], p.grad, f"grad {k}", tol)
        rnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        norm = parallel.clip_grad_norm_(net, 1.0, mesh)
        _close(norm.to(rnorm.dtype), rnorm, "grad norm", tol)
        ropt.step()
        opt.step()
        ref.update_expert_bias()
        parallel.update_expert_bias(net, mesh)
    if dtype == torch.float64:
        params = parallel.full_state(net, mesh)
        for k, p in ref.named_parameters():
            _close(params[k], p.detach(), f"param after {steps} steps {k}", tol)
    for (k, b), (k2, b2) in zip(ref.named_buffers(), net.named_buffers()):
        if k.endswith("gate.bias"):
            assert k == k2 and torch.equal(b, b2), f"expert bias {k}"


LAYOUTS = {
    "tp2": (2, dict(tp=2)),
    "tp2_sp": (2, dict(tp=2, sp=True)),
    "ep2": (2, dict(ep=2)),
    "ep4": (4, dict(ep=4)),
    "dp2": (2, dict()),
    "tp2_ep2": (2, dict(tp=2, ep=2, sp=True)),
    "dp4_tp2_ep2": (8, dict(tp=2, ep=2, sp=True)),   # 8 ranks: dense dp 4; experts ep 2 x edp 4
    "dp4_tp2_ep4": (8, dict(tp=2, ep=4, sp=True)),   # an ep group spans two tp groups; edp 2
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tiny_v3_equals_one_process(layout):
    world, kw = LAYOUTS[layout]
    run_ranks(world, equivalence_rank, "tiny-deepseek-v3", kw)


DENSE = {
    "llama_tp2": ("tiny-llama-3-8b", 2, dict(tp=2)),
    "llama_tp2_sp": ("tiny-llama-3-8b", 2, dict(tp=2, sp=True)),
    "llama_tp4_kv_replicated": ("tiny-llama-3-8b", 4, dict(tp=4)),   # 2 KV heads on 4 ranks
    "llama_dp2_tp2": ("tiny-llama-3-8b", 4, dict(tp=2, sp=True)),
    "qwen_tied_bias_tp4": ("tiny-qwen2.5-1.5b", 4, dict(tp=4, sp=True)),
    "qwen_dp2": ("tiny-qwen2.5-1.5b", 2, dict()),
}


@pytest.mark.parametrize("case", list(DENSE))
def test_dense_gqa_equals_one_process(case):
    name, world, kw = DENSE[case]
    run_ranks(world, equivalence_rank, name, kw)


def test_gradient_accumulation_and_sliced_init():
    """dp2 (FSDP2) with 2 micro-batches per rank, from a materialised model that is sliced."""
    run_ranks(2, equivalence_rank, "tiny-deepseek-v3", dict(), 2, False)


# -- node-limited routing over 4 ep ranks posing as 2 nodes ------------------------------------------
def node_limited_rank(topk_nodes: int, results: str):
    """Hierarchical dispatch (node, then device) equals one process; the cross-node all-to-all
    bytes equal the count implied by the routing: each token crosses once per remote node that
    holds any of its experts (forward dispatch + forward combine), times dim x 4 bytes."""
    cfg = preset("tiny-deepseek-v3", topk_nodes=topk_nodes, n_expert_groups=1, n_limited_groups=1)
    mesh = build_mesh(ParallelConfig(ep=4, node_size=2))
    assert mesh.dims.ep_nodes == 2
    net = parallelize(build_model(cfg, device="meta").train(), mesh)
    parallel.init_parallel_weights(net, mesh, seed=0)
    ref = build_model(cfg, seed=0).train()
    ref.set_expert_placement(4, 2)
    routed = []
    for m in net.modules():
        if type(m).__name__ == "Gate":
            m.register_forward_hook(lambda mod, args, out: routed.append(out[1].detach()))
    tokens, labels = _data(cfg, 0)
    rank, dp = mesh.rank, mesh.dims.dp
    rows = slice(rank * BATCH // dp, (rank + 1) * BATCH // dp)
    parallel.STATS.reset()
    with torch.no_grad():
        out = net.loss(tokens[rows], labels[rows])
    measured = torch.tensor(float(parallel.STATS.records[("all_to_all", "ep_inter")]["cross_node_bytes"]))
    my_node = rank // 2
    expected = 0.0
    for idx in routed:  # [T, K] expert ids; experts 0-3 on node 0, 4-7 on node 1
        nodes = idx // 4
        if topk_nodes == 1:
            assert bool((nodes == nodes[:, :1]).all()), "a token's experts span two nodes under M = 1"
        remote = torch.zeros(idx.shape[0], 2, dtype=torch.bool).scatter_(1, nodes, True)
        remote[:, my_node] = False
        expected += 2 * remote.sum().item() * cfg.dim * 4   # dispatch + combine
    dist.all_reduce(measured)
    total_expected = torch.tensor(expected)
    dist.all_reduce(total_expected)
    assert measured.item() == total_expected.item(), (measured, total_expected)
    with torch.no_grad():
        rout = ref.loss(tokens, labels)
    got = out["lm_loss"].clone()
    dist.all_reduce(got)
    _close(got / dp, rout["lm_loss"], "lm_loss", 1e-5)
    if rank == 0:
        torch.save({"cross_node_bytes": measured.item(), "tokens": tokens.numel() * len(routed) // 4}, results)


def test_node_limited_routing_cuts_cross_node_bytes(tmp_path):
    free, limited = tmp_path / "free.pt", tmp_path / "limited.pt"
    run_ranks(4, node_limited_rank, 0, str(free))
    run_ranks(4, node_limited_rank, 1, str(limited))
    a, b = torch.load(free)["cross_node_bytes"], torch.load(limited)["cross_node_bytes"]
    # unrestricted top-2 of 8 experts on 2 nodes: a token needs the other node unless both experts
    # are local; with M = 1 only when its chosen node is remote
    assert b < a, (a, b)


# -- vocab-parallel cross-entropy -----------------------------------------------------------------
class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def vocab_ce_rank(vocab: int):
    from parallel.tensor_parallel import chunk_range, vocab_parallel_cross_entropy
    from parallel.comm import Group
    tp = Group("tp", dist.group.WORLD, tuple(range(dist.get_world_size())), 8)
    g = torch.Generator().manual_seed(0)
    n = 96
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = IGNORE_INDEX
    start, end = chunk_range(vocab, tp.size, tp.rank)
    local = logits[:, start:end].clone().requires_grad_()
    with _LargestTensor() as probe:
        loss = vocab_parallel_cross_entropy(local, labels, start, tp)
        loss.backward()
    full = logits.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(full, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(local.grad, full.grad[:, start:end], rtol=1e-12, atol=1e-15)
    assert probe.largest <= n * (end - start), f"a tensor of {probe.largest} elements > tokens x vocab/tp"


@pytest.mark.parametrize("world,vocab", [(2, 1000), (4, 1002)])  # 1002 / 4: uneven shards
def test_vocab_parallel_cross_entropy(world, vocab):
    run_ranks(world, vocab_ce_rank, vocab)


# -- bad layouts fail before any work, naming the constraint --------------------------------------
@pytest.mark.parametrize("kw,world,match", [
    (dict(tp=3), 6, "must divide parallel.node_size"),
    (dict(tp=2, pp=2), 6, "not divisible by parallel.pp x parallel.tp"),
    (dict(ep=3), 4, "parallel.ep = 3 must divide dp x tp"),
    (dict(ep=4, node_size=8, dp=2), 4, "!= world size"),
    (dict(ep=6, node_size=4), 12, "multiple of parallel.node_size"),
    (dict(sp=True), 2, "sp=true needs parallel.tp > 1"),
])
def test_bad_mesh_layouts(kw, world, match):
    with pytest.raises(parallel.LayoutError, match=match):
        parallel.ParallelDims.from_config(ParallelConfig(**kw), world)


def test_bad_config_values():
    with pytest.raises(parallel.LayoutError, match="parallel.tp must be an integer"):
        ParallelConfig(tp="2")
    with pytest.raises(parallel.LayoutError, match="parallel.zero must be 2 or 3"):
        ParallelConfig(zero=1)


@pytest.mark.parametrize("name,tp,ep,match", [
    ("tiny-deepseek-v3", 8, 1, r"attn.n_heads = 4 is not divisible by parallel.tp = 8"),
    ("tiny-llama-3-8b", 8, 1, r"n_heads = 4 is not divisible by parallel.tp = 8"),
    ("tiny-deepseek-v3", 1, 3, r"experts.n_experts = 8 routed experts cannot be split evenly over parallel.ep = 3"),
])
def test_bad_model_layouts(name, tp, ep, match):
    from parallel.expert_parallel import check_ep_plan
    from parallel.tensor_parallel import check_tp_plan
    net = build_model(preset(name), device="meta")
    with pytest.raises(parallel.LayoutError, match=match):
        check_tp_plan(net, tp)
        check_ep_plan(net, ep)


def test_kv_heads_neither_divisible_nor_replicable():
    from parallel.tensor_parallel import check_tp_plan
    net = build_model(preset("tiny-llama-3-8b", n_heads=6, n_kv_heads=3, head_dim=16), device="meta")
    with pytest.raises(parallel.LayoutError, match="n_kv_heads = 3 is not divisible by parallel.tp = 2"):
        check_tp_plan(net, 2)


def bad_runtime_rank():
    mesh = build_mesh(ParallelConfig(ep=2, node_size=1))  # 2 "nodes" of one rank
    net = build_model(preset("tiny-deepseek-v3", topk_nodes=1, n_activated_experts=6, n_expert_groups=1,
                             n_limited_groups=1), device="meta")
    with pytest.raises(parallel.LayoutError, match="node-limited routing to 1 nodes of 4 experts cannot select 6"):
        parallelize(net, mesh)
    mesh = build_mesh(ParallelConfig(tp=2, sp=True))
    net = parallelize(build_model(preset("tiny-deepseek-v3")).train(), mesh)
    tokens = torch.randint(0, 256, (2, 15))
    with pytest.raises(ValueError, match="make the sequence length a multiple of 2"):
        net.loss(tokens, tokens)


def test_bad_runtime_layouts():
    run_ranks(2, bad_runtime_rank)


# -- mixed precision ----------------------------------------------------------------------------------
def bf16_rank():
    """FSDP2 with bf16 compute: parameters and gradients stay fp32 (master weights, fp32 reduction),
    and the loss matches fp32 to bf16 accuracy."""
    cfg = preset("tiny-deepseek-v3")
    mesh = build_mesh(ParallelConfig(tp=2, sp=True, ep=2))
    net = parallelize(build_model(cfg, device="meta").train(), mesh, param_dtype=torch.bfloat16)
    parallel.init_parallel_weights(net, mesh, seed=0)
    ref = build_model(cfg, seed=0).train()
    tokens, labels = _data(cfg, 0)
    d = mesh.dims.coords(mesh.rank)["dp"]
    rows = slice(d * BATCH // mesh.dims.dp, (d + 1) * BATCH // mesh.dims.dp)
    out = net.loss(tokens[rows], labels[rows])
    out["loss"].backward()
    parallel.finish_grad_sync(net, mesh)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    got = out["lm_loss"].detach().float()
    dist.all_reduce(got)
    want = ref.loss(tokens, labels)["lm_loss"]
    assert abs(got.item() / mesh.dims.world - want.item()) < 2e-2 * want.item()


def test_fsdp_bf16_compute_fp32_master_weights():
    run_ranks(4, bf16_rank)


# -- communication accounting = the analytic formulas of plan.cost -----------------------------------
@pytest.mark.parametrize("layout", ["tp2", "tp2_ep2_sp", "dp2_zero2", "gqa_tp4_sp_kv_replicated"])
def test_comm_volume_matches_formulas(layout, tmp_path):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import comm_volume as bench  # spawned ranks import it by name, so it must be on sys.path
    name, world, kw = bench.LAYOUTS[layout]
    for r in bench.run(name, world, kw, str(tmp_path / "ranks.json")):
        for key, v in r["collectives"].items():
            assert v["measured_bytes"] == v["formula_bytes"], (layout, r["rank"], key, v)


def test_v2_device_limited_routing_and_balance_losses_ep4():
    """V2 §2.2: top-M device-limited routing (M = 3 of 4 devices) with the expert-, device- and
    communication-balance losses, over the runtime's real placement. (Token dropping is left out:
    its capacity is per device and its exempt sequences are drawn at random, so no single process
    computes the same thing.)"""
    run_ranks(4, equivalence_rank, "tiny-deepseek-v2", dict(ep=4), 1, True, dict(capacity_factor=0.0))


def test_zero2_keeps_parameters_gathered_and_matches():
    run_ranks(2, equivalence_rank, "tiny-deepseek-v3", dict(zero=2))


def test_hierarchical_dispatch_across_two_nodes_matches():
    """ep4 over 2 nodes of 2: node-then-device dispatch, node-limited to M = 1, with gradients."""
    run_ranks(4, equivalence_rank, "tiny-deepseek-v3", dict(ep=4, node_size=2), 1, True,
              dict(topk_nodes=1, n_expert_groups=1, n_limited_groups=1))


def decode_rank():
    """tp2 without sp: cached decoding one token at a time (the MoE runs whole tokens on every
    rank when they do not split) gives the single-process logits."""
    cfg = preset("tiny-deepseek-v3")
    mesh = build_mesh(ParallelConfig(tp=2))
    ref = build_model(cfg, seed=0).eval()
    net = parallelize(build_model(cfg, seed=0).eval(), mesh)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    caches = net.new_cache(2, 8)
    from parallel.tensor_parallel import chunk_sizes
    from parallel.comm import all_gather_uneven
    with torch.no_grad():
        want = ref(tokens)
        for i in range(tokens.shape[1]):
            local = net(tokens[:, i:i + 1], start_pos=i, caches=caches)
            got = all_gather_uneven(local, -1, mesh["tp"], chunk_sizes(cfg.vocab_size, 2))
            _close(got[:, 0], want[:, i], f"decode position {i}", 1e-4)


def test_tensor_parallel_cached_decoding():
    run_ranks(2, decode_rank)


def test_bad_config_sp_type():
    with pytest.raises(parallel.LayoutError, match="parallel.sp must be true or false"):
        ParallelConfig(tp=2, sp="yes")


def idle_experts_rank():
    """ep2 where the routing biases keep every token off rank 1's experts: that rank computes on
    zero rows, its experts get zero (not missing) gradients, and FSDP's reductions still line up."""
    cfg = preset("tiny-deepseek-v3")
    mesh = build_mesh(ParallelConfig(ep=2))
    ref = build_model(cfg, seed=0).train()
    net = parallelize(build_model(cfg, seed=0).train(), mesh)
    for model in (ref, net):
        for m in model.moe_layers():
            m.gate.bias[4:] = -10.0  # experts 4-7 live on ep rank 1
    tokens, labels = _data(cfg, 0)
    d = mesh.dims.coords(mesh.rank)["dp"]
    ref.loss(tokens, labels)["loss"].backward()
    net.loss(tokens[d * 2:(d + 1) * 2], labels[d * 2:(d + 1) * 2])["loss"].backward()
    parallel.finish_grad_sync(net, mesh)
    grads = parallel.full_state(net, mesh, grads=True)
    for k, p in ref.named_parameters():
        _close(grads[k], p.grad, f"grad {k}")
        if ".experts." in k:
            assert grads[k][4:].abs().max() == 0


def test_rank_with_no_routed_tokens():
    run_ranks(2, idle_experts_rank)


def load_state_rank():
    """A single-process state dict (what load_hf returns) loads into a tp2 x ep2 + sp model
    (a tied head included for Qwen), and the parallel loss equals the single-process one."""
    for name in ("tiny-deepseek-v3", "tiny-qwen2.5-1.5b"):
        cfg = preset(name)
        mesh = build_mesh(ParallelConfig(tp=2, ep=2 if cfg.n_routed_experts else 1, sp=True))
        ref = build_model(cfg, seed=7).train()
        net = parallelize(build_model(cfg, device="meta").train(), mesh)
        parallel.load_full_state_dict(net, mesh, ref.state_dict())
        got = parallel.full_state(net, mesh)
        assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items() if k in got)
        tokens, labels = _data(cfg, 0)
        _close(net.loss(tokens, labels)["loss"].detach(), ref.loss(tokens, labels)["loss"].detach(), name)
        bad = dict(ref.state_dict())
        bad["norm.weight"] = torch.ones(3)
        before = parallel.full_state(net, mesh)
        with pytest.raises(ValueError, match=r"norm.weight: state dict has shape \(3,\), the model \(64,\)"):
            parallel.load_full_state_dict(net, mesh, bad)
        after = parallel.full_state(net, mesh)
        assert all(torch.equal(before[k], after[k]) for k in before), "a failed load changed weights"


def test_load_single_process_state_dict():
    run_ranks(2, load_state_rank)
