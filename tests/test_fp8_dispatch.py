"""FP8 dispatch (issue 19 §4, V3 §3.3.3): under train.fp8=blockwise the dispatch all-to-all carries the rows'
1x128 E4M3 tiles and fp32 scales, which the experts' FP8 GEMM consumes as they arrive. Quantizing a row needs
only that row, so the run is bit for bit the BF16-dispatch run (the destination would make the same tiles):
loss and every gradient equal exactly, for one-level ep, the hierarchical (cross-node then in-node) dispatch
that forwards the tiles it received, and the overlapped executor's issued dispatch; the payload bytes are
1 + 4/128 per element (plan.planner.FP8_BYTES), the planner's formula, against the activations' own width."""
from __future__ import annotations

import pytest
import torch

from distributed import run_ranks
from model import build_model, preset
from model.transformer import IGNORE_INDEX

CFG = dict(vocab_size=256, n_layers=2, dim=256, inter_dim=256, moe_inter_dim=128, n_shared_experts=1,
           n_routed_experts=8, n_activated_experts=2, n_dense_layers=1, n_mtp=0)
BATCH, SEQ = 4, 32


def _run(net, mesh, tokens, labels, overlap: bool):
    """(loss, gradients, dispatch payload bytes by label) of one step on this rank's rows."""
    import parallel
    from parallel.comm import STATS
    from parallel.engine import SingleStage
    for p in net.parameters():
        p.grad = None
    STATS.reset()
    engine = SingleStage(net, mesh, micro_batch_size=tokens.shape[0] // 2, overlap="ep" if overlap else "none")
    out = engine.step(tokens, labels)
    sent = {op: sum(r["bytes"] for (o, _), r in STATS.records.items() if o == op)
            for op in ("all_to_all", "all_to_all_scales")}
    grads = {k: g.clone() for k, g in parallel.full_state(net, mesh, grads=True).items() if g is not None}
    return out["loss"], grads, sent


def dispatch_rank(layout: dict, overlap: bool):
    import parallel
    from parallel import ParallelConfig, build_mesh, parallelize
    from parallel.fp8 import Fp8Recipe
    from plan.planner import FP8_BYTES
    torch.manual_seed(0)
    cfg = preset("tiny-deepseek-v3", **CFG)
    mesh = build_mesh(ParallelConfig(**layout))
    net = parallelize(build_model(cfg, device="meta").train(), mesh, fp8=Fp8Recipe(backend="emulate"))
    parallel.init_parallel_weights(net, mesh, seed=0)
    experts = [m for m in net.modules() if getattr(m, "fp8_dispatch", None) is not None]
    assert experts and all(hasattr(m, "ep_levels") for m in experts)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, cfg.vocab_size, (BATCH * mesh.dims.dp, SEQ), generator=g)
    labels = tokens.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    d, rows = mesh.dims.coords(mesh.rank)["dp"], BATCH
    mine = slice(d * rows, (d + 1) * rows)
    loss8, grads8, sent8 = _run(net, mesh, tokens[mine], labels[mine], overlap)
    for m in experts:
        m.fp8_dispatch = None
    loss, grads, sent = _run(net, mesh, tokens[mine], labels[mine], overlap)
    assert loss8 == loss, (loss8, loss)
    assert grads8.keys() == grads.keys() and len(grads) > 10
    bad = {k: float((grads8[k] - v).abs().max() / v.abs().max().clamp(min=1e-30)) for k, v in grads.items()
           if not torch.equal(grads8[k], v)}
    assert not bad, bad
    # the payload: E dispatched elements cost 1 byte each plus a 4-byte scale per 128 (dim = 256: exactly
    # FP8_BYTES per element) instead of the activations' width (fp32 on this CPU run, 2 bytes under bf16);
    # "all_to_all" also counts the combine and the backward all-to-alls, which do not change
    width = 4
    elements = sent8["all_to_all_scales"] / 4 * 128
    assert elements > 0 and sent["all_to_all_scales"] == 0
    assert sent["all_to_all"] - sent8["all_to_all"] == elements * (width - 1)
    assert (elements + sent8["all_to_all_scales"]) / elements == pytest.approx(FP8_BYTES)


@pytest.mark.parametrize("layout, world", [(dict(ep=2), 2), (dict(ep=2, node_size=1), 2)], ids=["ep2", "ep2_nodes"])
def test_fp8_dispatch_is_the_bf16_dispatch_bit_for_bit(layout, world):
    run_ranks(world, dispatch_rank, layout, False)


@pytest.mark.slow
def test_fp8_dispatch_hierarchical_and_overlapped():
    """ep4 over two 2-rank nodes: the in-node level forwards the tiles the cross-node level delivered; and the
    overlapped executor's issued dispatch (parallel.overlap=ep)."""
    run_ranks(4, dispatch_rank, dict(ep=4, node_size=2), False)
    run_ranks(2, dispatch_rank, dict(ep=2), True)
