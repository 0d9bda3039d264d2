"""Overlap at pp = 1 (parallel/overlap.py): F(k+1) interleaved with B(k) part by part gives the serial step's
loss terms and gradients bit for bit (same layout), and one process's (fp32, 1e-5); with recomputation
(selective, full), FSDP2, MTP and the balance losses on; ep2 and ep4 over two nodes with node-limited routing.
The simulated link records exposed <= link time, and the overlap exposes less than the serial loop."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model import build_model, preset
from model.transformer import IGNORE_INDEX
import parallel
from parallel import ParallelConfig, build_mesh, comm, parallelize
from parallel.engine import SingleStage
from parallel.mesh import LayoutError, ParallelDims
from parallel.overlap import check_overlap, overlapped_losses
from parallel.recompute import apply_recompute

ROWS, SEQ = 8, 16           # the global batch; every layout runs it in micro-batches of one row
# used by the embedding part and by MTP in the loss part: in micro-batches whose backward runs part by part
# its gradient is added to the running sum twice, (G + g_mtp) + g_emb, where the serial step adds G + (g_emb +
# g_mtp) (FSDP2 accumulates the unsharded gradient at each part's end the same way)
TWO_PARTS = {"embed.weight"}
NODE_LIMITED = dict(topk_nodes=1, n_expert_groups=1, n_limited_groups=1)


def _data(cfg):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (ROWS, SEQ), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return tokens, labels


def _reference(cfg, mesh):
    """One process: the mean loss over all rows in micro-batches of one, and its gradients."""
    ref = build_model(cfg, seed=0).train()
    ref.set_expert_placement(mesh.dims.ep, mesh.dims.ep // mesh.dims.ep_nodes)
    tokens, labels = _data(cfg)
    sums = {}
    for i in range(ROWS):
        out = ref.loss(tokens[i:i + 1], labels[i:i + 1])
        (out["loss"] / ROWS).backward()
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v.detach().double() / ROWS
    return sums, {k: p.grad for k, p in ref.named_parameters()}


def _run(cfg, layout: dict, recompute: str, overlap: bool, link=None):
    mesh = build_mesh(ParallelConfig(**layout))
    model = build_model(cfg, device="meta").train()
    if recompute != "none":
        apply_recompute(model, recompute)
    net = parallelize(model, mesh)
    parallel.init_parallel_weights(net, mesh, seed=0)
    tokens, labels = _data(cfg)
    d, rows = mesh.dims.coords(mesh.rank)["dp"], ROWS // mesh.dims.dp
    mine = slice(d * rows, (d + 1) * rows)
    comm.LINK.reset()
    with comm.simulate_link(*link) if link else contextlib.nullcontext():
        if overlap:
            out = overlapped_losses(net, mesh, 1, tokens[mine], labels[mine])
        else:
            out = SingleStage(net, mesh, 1)._losses(tokens[mine], labels[mine], {}, backward=True)
    return out, parallel.full_state(net, mesh, grads=True), comm.LINK.snapshot()


def _close(got, want, what):
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def _check(cfg, layout, recompute, reference):
    """overlapped == serial (bit for bit) == one process (1e-5), loss terms and gradients."""
    serial, sgrads, _ = _run(cfg, layout, recompute, overlap=False)
    got, grads, _ = _run(cfg, layout, recompute, overlap=True)
    where = f"{layout} recompute={recompute}"
    assert set(got) == set(serial) and {"mtp_loss", "balance_expert", "aux_loss"} <= set(got), where
    for k in got:
        assert got[k] == serial[k], f"{where}: {k} {got[k]!r} != serial {serial[k]!r}"
    ref_losses, ref_grads = reference
    for k, v in ref_losses.items():
        _close(torch.tensor(got[k], dtype=torch.float64), v, f"{where}: {k} vs one process")
    for k, g in ref_grads.items():
        assert grads[k] is not None, f"{where}: no gradient for {k}"
        if k in TWO_PARTS:  # its micro-batch gradient meets the running sum in two parts: 1e-5, not bits
            _close(grads[k], sgrads[k], f"{where}: grad {k} vs the serial step")
        else:
            assert torch.equal(grads[k], sgrads[k]), f"{where}: grad {k} differs from the serial step"
        _close(grads[k], g, f"{where}: grad {k} vs one process")


def _issue_wait_equals_forward(cfg):
    """ExpertParallel's dispatch cut into issue and wait (what DualPipeV's F&B chunks can reuse), through
    autograd: the serial forward's output and input gradients, bit for bit."""
    mesh = build_mesh(ParallelConfig(ep=2))
    experts = parallelize(build_model(cfg, seed=0).train(), mesh).layers["1"].ffn.experts
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(12, cfg.dim, generator=g)
    indices = torch.rand(12, cfg.n_routed_experts, generator=g).topk(cfg.n_activated_experts).indices
    weights = torch.rand(12, cfg.n_activated_experts, generator=g)
    got = []
    for cut in (False, True):
        xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
        if cut:
            d = experts.dispatch_issue(xg, indices, wg)
            x_r, idx_r, w_r = d.wait()
            experts.unshard()  # an FSDP2 unit (dp2): its forward would gather its parameters
            y_r = experts.ep_local(x_r, idx_r, w_r, d.route.child_base, d.route.per)
            y = experts.finish_combine(experts.combine_issue(y_r, d).wait(), d, xg)
        else:
            y = experts(xg, indices, wg)
        y.pow(2).sum().backward()
        got.append((y.detach(), xg.grad, wg.grad))
    for a, b in zip(*got):
        assert torch.equal(a, b)


def _ep2_rank():
    torch.manual_seed(0)
    cfg = preset("tiny-deepseek-v3")
    _issue_wait_equals_forward(cfg)
    layout = dict(ep=2)                                    # dp2 (FSDP2 over both ranks) x ep2
    reference = _reference(cfg, build_mesh(ParallelConfig(**layout)))
    for recompute in ("none", "selective", "full"):
        _check(cfg, layout, recompute, reference)
    # the simulated link: 3 ms per all-to-all (about a part's compute here)
    link = (3e-3, 1e12)
    _, _, serial = _run(cfg, layout, "none", overlap=False, link=link)
    _, _, over = _run(cfg, layout, "none", overlap=True, link=link)
    for snap in (serial, over):
        assert snap["calls"] > 0 and 0 < snap["exposed_s"] <= snap["link_s"], snap
    assert serial["exposed_fraction"] > 0.9, serial           # blocking: all exposed
    exposed = torch.tensor([over["exposed_s"] / serial["exposed_s"]])
    dist.all_reduce(exposed, op=dist.ReduceOp.MAX)
    assert exposed.item() < 0.85, (serial, over)              # the overlap hides part of it


def test_overlap_ep2_fsdp_recompute_matches_serial_and_one_process():
    run_ranks(2, _ep2_rank)


def _ep4_rank():
    torch.manual_seed(0)
    cfg = preset("tiny-deepseek-v3", **NODE_LIMITED)
    layout = dict(ep=4, node_size=2)                       # two nodes: node-then-device dispatch, M = 1
    _check(cfg, layout, "full", _reference(cfg, build_mesh(ParallelConfig(**layout))))
    cfg = preset("tiny-deepseek-v3")
    layout = dict(ep=2)                                    # dp4 x ep2: experts FSDP-sharded over edp 2
    _check(cfg, layout, "selective", _reference(cfg, build_mesh(ParallelConfig(**layout))))


@pytest.mark.slow
def test_overlap_ep4_two_nodes_and_edp2_match_serial_and_one_process():
    run_ranks(4, _ep4_rank)


@pytest.mark.parametrize("mode,kw,match", [
    ("ep", dict(ep=1), "needs parallel.ep > 1"),
    ("ep", dict(ep=2, tp=2), "with tp = 1 where experts are dispatched"),
    ("sideways", dict(ep=2), "not one of none, ep"),
])
def test_bad_overlap_settings_name_the_key(mode, kw, match):
    pp, tp = kw.get("pp", 1), kw.get("tp", 1)
    dims = ParallelDims(world=4, pp=pp, dp=4 // (tp * pp), tp=tp, ep=kw["ep"], sp=False, node_size=8)
    with pytest.raises(LayoutError, match=match) as e:
        check_overlap(mode, dims)
    assert "parallel.overlap" in str(e.value)
    check_overlap("none", dims)


def _late_peer() -> None:
    """Rank 1 joins the all-to-all 0.2 s after rank 0: rank 0's wait is exposed, and that time is counted as
    waiting on the peer (`peer_s`), not as the link. Rank 0 joining last instead (its peer already there),
    only the simulated 50 ms transfer is exposed."""
    import time
    group = comm.Group("ep", dist.group.WORLD, (0, 1), 2)
    x = torch.ones(4, 8)
    with comm.simulate_link(0.05, 1e12):
        for late_rank in (1, 0):
            dist.barrier()
            comm.LINK.reset()
            if dist.get_rank() == late_rank:
                time.sleep(0.2)
            comm.all_to_all_async(x, [2, 2], [2, 2], group).wait()
            snap = comm.LINK.snapshot()
            assert 0.0 <= snap["peer_s"] <= snap["exposed_s"] <= snap["link_s"] + 1e-3, snap
            if dist.get_rank() == 0 and late_rank == 1:
                assert snap["peer_s"] > 0.15 and snap["exposed_s"] > 0.15, snap
            if dist.get_rank() == 0 and late_rank == 0:
                assert snap["exposed_s"] >= 0.045 and snap["peer_s"] < 0.03, snap


def test_link_counts_waiting_on_a_late_peer_apart():
    run_ranks(2, _late_peer)
