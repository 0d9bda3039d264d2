"""The in-memory weight refresh (parallel/refit.py): training layout -> rollout layout on the same ranks.

Each spawned run trains one step under the training layout, refreshes the rollout model, and checks, on
every rank: the rollout model's full weights and routing biases (gathered here, in the test only) equal the
trainer's cast to the rollout dtype bit for bit; the bytes each rank sent and received equal `refit_bytes`
and the receive closed form; every round stayed within the bucket; then once more after an optimizer step
(the values follow). The sides are also rebuilt from the layouts alone (`analytic_side`, what the V3
estimate uses) and must equal the gathered ones."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model import build_model, preset
from model.transformer import IGNORE_INDEX
from parallel.refit import (Box, RefitError, Tensor, plan_rounds, recv_bytes_closed_form, refit_bytes, serve,
                            split_box)

SEQ = 8


# -- pure functions ----------------------------------------------------------------------------------------
def test_split_box_covers_exactly_within_the_bound():
    box = Box((2, 0, 5), (5, 3, 7))
    for limit in (1, 4, 7, 20, 21, 22, 105, 1000):
        parts = split_box(box, limit)
        assert all(p.numel <= limit for p in parts)
        seen = torch.zeros(10, 3, 12, dtype=torch.int64)
        for p in parts:
            assert box.contains(p)
            seen[tuple(slice(o, o + n) for o, n in zip(p.offsets, p.sizes))] += 1
        inside = seen[2:7, 0:3, 5:12]
        assert bool((inside == 1).all()) and int(seen.sum()) == box.numel


def test_serving_prefers_self_then_node_and_balances():
    # a cell held by ranks 0, 1 (node 0) and 8 (node 1), needed by everyone on two nodes of 8
    served = serve(list(range(16)), (0, 1, 8), salt=0, node_size=8)
    assert 0 not in served and 1 not in served and 8 not in served   # holders copy locally
    assert all(served[n] in ((0, 1), (1, 1)) for n in range(2, 8))   # same node first
    assert all(served[n] == (8, 1) for n in range(9, 16))
    loads = [sum(1 for h in served.values() if h[0] == x) for x in (0, 1)]
    assert abs(loads[0] - loads[1]) <= 1


def test_nodes_without_holders_get_the_cell_once_then_relay():
    # held on node 0 only (ranks 0, 1), needed by all 24 ranks of three nodes: nodes 1 and 2 get it once each
    for salt in range(5):
        served = serve(list(range(24)), (0, 1), salt=salt, node_size=8)
        for node in (1, 2):
            ranks = range(8 * node, 8 * node + 8)
            leaders = [n for n in ranks if served[n][1] == 1]
            assert len(leaders) == 1 and served[leaders[0]][0] in (0, 1)
            assert all(served[n] == (leaders[0], 2) for n in ranks if n != leaders[0])


def test_vectorised_serving_equals_serve():
    """refit_bytes serves many needers at once (_serve_counts); the plan serves one by one (serve): the same
    choices, with and without relaying."""
    from parallel.refit import _serve_counts
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        world = int(torch.randint(2, 40, (1,), generator=g))
        node = int(torch.randint(1, 9, (1,), generator=g))
        perm = torch.randperm(world, generator=g).tolist()
        holders = tuple(sorted(perm[:int(torch.randint(1, 4, (1,), generator=g))]))
        needers = sorted(torch.randperm(world, generator=g)[:int(torch.randint(1, world + 1, (1,), generator=g))]
                         .tolist())
        salt = int(torch.randint(0, 100, (1,), generator=g))
        for relay in (True, False):
            want = serve(needers, holders, salt, node, relay)
            remote, chosen, local = _serve_counts(torch.tensor(needers), holders, salt, node, relay)
            assert dict(zip(remote.tolist(), chosen.tolist())) == {n: h for n, (h, _) in want.items()}
            assert set(local.tolist()) == set(needers) - set(want)
            assert relay or all(hop == 1 for _, hop in want.values())


@pytest.mark.parametrize("node_size", [8, 1, 2])
def test_rounds_respect_the_bucket_and_bytes_match_the_formula(node_size):
    """Four ranks, a tensor row-split 3 ways in the source, column-split 2 ways and replicated in the
    destination (rank 2 needs everything), fp32 -> bf16; a bias held by rank 0 only, needed by all (with nodes
    of 2 the node of ranks 2 and 3 gets it once and relays it; with nodes of 1 every rank is its own node)."""
    src = {"w": Tensor((6, 4), torch.float32, {Box((0, 0), (2, 4)): (0,), Box((2, 0), (2, 4)): (1,),
                                                Box((4, 0), (2, 4)): (2,)}),
           "b": Tensor((5,), torch.float32, {Box((0,), (5,)): (0,)})}
    dst = {"w": Tensor((6, 4), torch.bfloat16, {Box((0, 0), (6, 2)): (0, 2), Box((0, 2), (6, 2)): (1, 2)}),
           "b": Tensor((5,), torch.float32, {Box((0,), (5,)): (0, 1, 2, 3)})}
    for bucket in (8, 12, 64, 1 << 20):
        local, rounds = plan_rounds(src, dst, node_size=node_size, bucket_bytes=bucket)
        sent, recv = [0] * 4, [0] * 4
        for rnd in rounds:
            per_src, per_dst = [0] * 4, [0] * 4
            for p in rnd:
                per_src[p.src] += p.nbytes
                per_dst[p.dst] += p.nbytes
                sent[p.src] += p.nbytes
                recv[p.dst] += p.nbytes
            assert max(per_src) <= bucket and max(per_dst) <= bucket
        want = refit_bytes(src, dst, 4, node_size)
        assert sent == want["send"] and recv == want["recv"] == recv_bytes_closed_form(src, dst, 4)
        assert recv == [2 * (12 - 4), 2 * (12 - 4) + 20, 2 * (24 - 8) + 20, 20]
        assert sum(p.box.numel * p.wire.itemsize for p in local) == sum(want["local"]) == 2 * (4 + 4 + 8) + 20
        relayed = [p for rnd in rounds for p in rnd if p.relay]
        assert {(p.src, p.dst) for p in relayed} <= {(2, 3), (3, 2)}
        assert len({(p.src, p.dst) for p in relayed}) == (1 if node_size == 2 else 0)
        if relayed:
            first = min(i for i, rnd in enumerate(rounds) if any(p.relay for p in rnd))
            assert all(not p.relay for rnd in rounds[:first] for p in rnd)
            assert all(p.relay for rnd in rounds[first:] for p in rnd)


# -- spawned runs ------------------------------------------------------------------------------------------
def _data(cfg, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, SEQ), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return tokens, labels


def _trainer(cfg, layout: dict):
    """(mesh, engine, optimizer) of the training layout, seed 0."""
    from parallel import ParallelConfig, build_engine, build_mesh
    mesh = build_mesh(ParallelConfig(**layout))
    n_micro = max(2, mesh.dims.pp) if mesh.dims.pp > 1 else 1
    engine = build_engine(build_model(cfg, device="meta").train(), mesh, micro_batch_size=1, seq_len=SEQ, seed=0,
                          n_microbatches=n_micro, schedule="1f1b")
    return mesh, engine, torch.optim.AdamW(list(engine.parameters()), lr=1e-2)


def _train_step(cfg, mesh, engine, opt, seed: int):
    dims = mesh.dims
    n = max(2, dims.pp) if dims.pp > 1 else 1
    tokens, labels = _data(cfg, n * dims.dp, seed)
    d = dims.coords(mesh.rank)["dp"]
    engine.step(tokens[d * n:(d + 1) * n], labels[d * n:(d + 1) * n])
    opt.step()
    opt.zero_grad()
    engine.update_expert_bias()


def _rollout(cfg, layout: dict, dtype, replicated: bool):
    """The rollout model: parallelised under its layout (FSDP2 over dp as the runtime does), or replicated over
    dp (tp/ep only): the runtime shards every dp > 1 model, so the replicas are made by hiding dp from
    parallelize (a hook the runtime lacks: parallelize(..., fsdp=False))."""
    from parallel import ParallelConfig, build_mesh, init_parallel_weights, parallelize
    mesh = build_mesh(ParallelConfig(**layout))
    view = dataclasses.replace(mesh, dims=dataclasses.replace(mesh.dims, dp=1)) if replicated else mesh
    net = parallelize(build_model(cfg, device="meta").eval(), view)
    init_parallel_weights(net, view, seed=7)  # other values: the refresh must overwrite every one
    if dtype != torch.float32:
        net.to(dtype)
    return mesh, net


def _gathered(modules, mesh) -> dict[str, torch.Tensor]:
    """Every global tensor of this rank's modules, then merged over the world (test only)."""
    import parallel
    mine = {}
    for m in modules:
        mine.update({k: v.clone() for k, v in parallel.full_state(m, mesh).items()})
        mine.update({k: v.clone() for k, v in m.state_dict().items() if k.endswith("gate.bias")})
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    out = {}
    for d in every:
        out.update(d)
    return out


def _check_refresh(refit, cfg, src_mesh, engine, dst_mesh, net, dtype, what):
    stats = refit.refresh()
    want = _gathered(engine.stages, src_mesh)
    got = _gathered([net], dst_mesh)
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want))[:5])
    for k, v in got.items():  # the routing biases stay fp32 in a bf16 model (the model's fp32_buffers)
        assert v.dtype == (torch.float32 if k.endswith("gate.bias") else dtype), (what, k, v.dtype)
        assert torch.equal(v, want[k].to(v.dtype)), f"{what}: {k}"
    r, exp = refit.rank, refit.expected
    assert stats["sent"] == exp["send"][r] and stats["received"] == exp["recv"][r], (what, stats, r)
    assert stats["received"] == recv_bytes_closed_form(refit.src, refit.dst, refit.world)[r]
    assert stats["local"] == exp["local"][r]
    assert stats["sent_cross_node"] == exp["send_cross_node"][r]
    assert stats["peak_buffer_bytes"] <= 2 * refit.bucket_bytes
    return stats


def _check_analytic(refit, cfg, src_layout, src_engine, dst_mesh, net, fsdp_dst):
    """The sides from layouts alone equal the gathered ones (the V3 estimate's path)."""
    from parallel.refit import analytic_side, model_tensors
    dims = refit.src_meta_dims
    pp_rank = dims.coords(refit.rank)["pp"]
    mine = {}
    for s in src_engine.stages:
        mine.update(model_tensors(s, fsdp=dims.dp > 1))  # build_engine in fp32: FSDP2 exactly when dp > 1
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (pp_rank, mine))
    by_pp = {p: t for p, t in every}
    assert analytic_side(lambda p: by_pp[p], dims) == refit.src
    dst_t = model_tensors(net, fsdp=fsdp_dst)
    assert analytic_side(lambda p: dst_t, dst_mesh.dims) == refit.dst


def refit_rank(layout: dict, rollout: dict, n_layers: int, dtype_name: str, replicated: bool, bucket: int,
               checks: tuple[str, ...]):
    from parallel.refit import Refit
    dtype = getattr(torch, dtype_name)
    cfg = preset("tiny-deepseek-v3", n_layers=n_layers)
    src_mesh, engine, opt = _trainer(cfg, layout)
    _train_step(cfg, src_mesh, engine, opt, seed=1)
    dst_mesh, net = _rollout(cfg, rollout, dtype, replicated)
    what = f"{layout} -> {rollout}{' replicated' if replicated else ''} ({dtype_name})"
    if "mismatch" in checks:  # a rollout model of another width: refused by name, before any weight changes
        _, other = _rollout(preset("tiny-deepseek-v3", n_layers=n_layers, dim=32), rollout, dtype, replicated)
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(RefitError, match=r"embed\.weight: global shape \(256, 64\) under the training layout "
                                             r"\(pp\d x dp\d x tp\d, ep\d\), \(256, 32\) under the rollout"):
            Refit(engine.stages, src_mesh, [other], dst_mesh, bucket_bytes=bucket)
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    refit = Refit(engine.stages, src_mesh, [net], dst_mesh, bucket_bytes=bucket)
    first = _check_refresh(refit, cfg, src_mesh, engine, dst_mesh, net, dtype, what)
    assert first["rounds"] >= 1
    if "analytic" in checks:
        refit.src_meta_dims = src_mesh.dims
        _check_analytic(refit, cfg, layout, engine, dst_mesh, net, fsdp_dst=not replicated and dst_mesh.dims.dp > 1)
    _train_step(cfg, src_mesh, engine, opt, seed=2)  # the weights and routing biases change
    second = _check_refresh(refit, cfg, src_mesh, engine, dst_mesh, net, dtype, what + " after a step")
    assert second["sent"] == first["sent"] and second["received"] == first["received"]
    total = torch.tensor([first["sent"], first["received"]])
    dist.all_reduce(total)
    assert total[0] == total[1] > 0


def test_refit_pp2_ep2_to_ep4():
    """pp2 x ep2 (dp2, FSDP2) -> ep4 (dp4, FSDP2) in bf16, small buckets (many rounds, split pieces); the sides
    rebuilt from layouts alone; a rollout model of another width refused by name."""
    run_ranks(4, refit_rank, dict(pp=2, ep=2), dict(ep=4), 4, "bfloat16", False, 4096, ("mismatch", "analytic"))


@pytest.mark.slow
def test_refit_pp2_tp2_to_tp2_dp2_replicas():
    """pp2 x tp2 -> tp2 with two replicas over dp (no FSDP): replicated destinations each get their data,
    tp-replicated source parameters serve them in turn. Nodes of two ranks: each stage's tensors reach the
    other node once and are relayed there (hop 2)."""
    run_ranks(4, refit_rank, dict(pp=2, tp=2, node_size=2), dict(tp=2, node_size=2), 2, "float32", True, 1 << 20,
              ("analytic",))


@pytest.mark.slow
def test_refit_dp2_tp2_ep2_fsdp_to_ep4_and_pp4_to_dp4():
    """dp2 x tp2 x ep2 (FSDP2, experts over edp2) -> ep4; pp4 -> dp4 (FSDP2) in bf16."""
    run_ranks(4, refit_rank, dict(tp=2, ep=2), dict(ep=4), 2, "float32", False, 1 << 20, ("analytic",))
    run_ranks(4, refit_rank, dict(pp=4), dict(), 4, "bfloat16", False, 1 << 20, ())
