"""DualPipeV's F&B overlap (parallel/overlap.py `FBRunner`, issue 19 §1): every forward and backward of a rank's
stages runs part by part, the OVERLAP_F_B pairs interleaved at each all-to-all. The overlapped step gives the
same layout's serial step bit for bit (loss terms and every gradient) and one process's (fp32 1e-5; fp64
parameters after 3 AdamW steps 1e-9), with packed documents, MTP and the balance losses on, with each part's
backward whole (`defer_weights` "none") and with its weight gradients deferred into the all-to-alls' flight
(every part's, the runner's default "all", or only the routed experts' parts', "experts"). With the
chunks that run alone split in token halves (`split_lone`, the default), the experts' GEMMs see half the rows
and their weight gradients are summed in two parts: equal to the serial step at 1e-5 (fp32) / 1e-9 (fp64),
not in bits. Layouts:
pp2 x ep2 (FSDP2 dp2) with no, selective and full recomputation and with FP8 (dispatch in FP8),
pp2 x tp2 with sequence parallelism, and pp4 on 4 ranks. Layouts of one world share a spawn."""
from __future__ import annotations

import functools

import pytest
import torch

from distributed import check_params, check_step, packed_rows, run_ranks
from model import build_model, preset
import parallel
from parallel import ParallelConfig, build_mesh
from parallel.engine import parallel_engine
from parallel.mesh import LayoutError

BATCH, SEQ, STEPS = 8, 16, 3


def _data(cfg, step: int):
    return packed_rows(cfg.vocab_size, BATCH, SEQ, 200 + step)


def _engine(cfg, mesh, dtype, overlap: str, recompute: str, fp8, n_micro: int):
    rows = BATCH // mesh.dims.dp
    engine = parallel_engine(build_model(cfg, device="meta", dtype=dtype).train(), mesh,
                             micro_batch_size=rows // n_micro, seq_len=SEQ, schedule="dualpipev",
                             n_microbatches=n_micro, recompute=recompute, fp8=fp8, overlap=overlap)
    engine.init_weights(0)
    parallel.attach_schedule(engine, rows // n_micro, SEQ)
    return engine


def _same(serial: dict, got: dict, engines, mesh, what: str, tol: float | None = None) -> None:
    """The overlapped step is the serial step: every loss term and every gradient, bit for bit (tol None) or
    within tol (relative to the largest entry)."""
    if tol is None:
        assert got == serial, f"{what}: {got} != serial {serial}"
    else:
        assert set(got) == set(serial), what
        for k in got:
            assert abs(got[k] - serial[k]) <= tol * max(abs(serial[k]), 1.0), f"{what}: {k} {got[k]} != {serial[k]}"
    for s1, s2 in zip(*(e.stages for e in engines)):
        g1, g2 = (parallel.full_state(s, mesh, grads=True) for s in (s1, s2))
        for k, g in g1.items():
            assert (g is None) == (g2[k] is None), f"{what}: gradient of {k} present in one run only"
            if g is None:
                continue
            if tol is None:
                assert torch.equal(g, g2[k]), f"{what}: grad {k} differs from the serial step"
            else:
                scale = max(g.abs().max().item(), 1e-12)
                torch.testing.assert_close(g2[k], g, rtol=tol, atol=tol * scale,
                                           msg=lambda m, k=k: f"{what}: grad {k} vs the serial step: {m}")


def _case(name: str, layout: dict, overrides: dict, dtype, steps: int, recompute: str = "none", fp8: bool = False,
          defer: str = "none", halves: bool = True):
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    what = f"{layout} {overrides} recompute={recompute} fp8={fp8} defer={defer} halves={halves} {dtype}"
    torch.manual_seed(0)
    cfg = preset(name, **overrides)
    mesh = build_mesh(ParallelConfig(**layout))
    dims = mesh.dims
    recipe = None
    if fp8:
        from parallel.fp8 import Fp8Recipe
        recipe = Fp8Recipe(backend="emulate")
    n_micro = 2 * dims.pp                                   # DualPipeV: at least its 2pp stages
    engines = [_engine(cfg, mesh, dtype, mode, recompute, recipe, n_micro) for mode in ("none", "ep")]
    engines[1].fb_runner.defer_weights = defer
    engines[1].fb_runner.split_lone = halves
    # the lone chunks in halves change the experts' GEMM shapes: the serial step within tol, else in bits
    # (FP8 keeps its chunks whole: its weight-gradient tiles run along the tokens)
    split = halves and dims.ep > 1 and not fp8
    same = functools.partial(_same, tol=tol if split else None)
    ref = build_model(cfg, seed=0, dtype=dtype).train()
    ref.set_expert_placement(dims.ep, dims.ep // dims.ep_nodes)
    opts = [torch.optim.AdamW(list(e.parameters()), lr=1e-3, weight_decay=0.1, foreach=True) for e in engines]
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    rows = BATCH // dims.dp
    mb = rows // n_micro
    d = dims.coords(mesh.rank)["dp"]
    mine = slice(d * rows, (d + 1) * rows)
    for step in range(steps):
        tokens, labels, doc_ids = _data(cfg, step)
        outs = []
        for e, opt in zip(engines, opts):
            opt.zero_grad()
            outs.append(e.step(tokens[mine], labels[mine], doc_ids=doc_ids[mine]))
        same(outs[0], outs[1], engines, mesh, f"{what} step {step}")
        # with defer_weights, W deferred into the all-to-alls' flight where nothing is recomputed
        # ("experts": where blocks run in parts, under expert parallelism; summed over the ranks: some hold no MoE)
        deferred = torch.tensor([engines[1].fb_runner.deferred_parts])
        torch.distributed.all_reduce(deferred)
        deferred = deferred.item()
        assert (deferred > 0) == (defer != "none" and recompute == "none" and (defer == "all" or dims.ep > 1)), (
            what, deferred)
        halved = torch.tensor([engines[1].fb_runner.halved_blocks])   # over the ranks: some hold no MoE block
        torch.distributed.all_reduce(halved)
        assert (halved.item() > 0) == split, (what, halved)
        if not fp8:   # FP8 against one process's full precision is not a 1e-5 comparison; against serial it is bits
            ropt.zero_grad()
            rterms: dict[str, float] = {}
            n = BATCH // mb
            for i in range(n):
                part = slice(i * mb, (i + 1) * mb)
                out = ref.loss(tokens[part], labels[part], doc_ids=doc_ids[part])
                (out["loss"] / n).backward()
                for k, v in out.items():
                    rterms[k] = rterms.get(k, 0.0) + float(v.detach()) / n
            check_step(ref, engines[1], mesh, rterms, outs[1], tol, f"{what} step {step}")
            engines[0].clip_grad_norm_(1.0)
            ropt.step()
            ref.update_expert_bias()
        for e, opt in zip(engines, opts):
            opt.step()
            e.update_expert_bias()
    if steps > 1:
        check_params(ref, engines[1], mesh, tol, f"{what} parameters after {steps} steps")
        same(outs[0], outs[1], engines, mesh, f"{what} last step")


def _ranks(cases: list) -> None:
    """Each case in fp32 for a step, without the halves (bits) and with them, and where nothing is recomputed
    with the weight gradients deferred too and in fp64 for 3 steps (no W deferred, every W deferred, and under
    expert parallelism the experts' W only)."""
    for name, layout, overrides, kw in cases:
        if layout.get("ep", 1) > 1 and not kw.get("fp8"):
            _case(name, layout, overrides, torch.float32, 1, **kw, halves=False)
            if kw.get("recompute", "none") == "none":   # the runner's default: W deferred, in bits too
                _case(name, layout, overrides, torch.float32, 1, **kw, halves=False, defer="all")
        _case(name, layout, overrides, torch.float32, 1, **kw)
        if kw.get("recompute", "none") == "none":
            _case(name, layout, overrides, torch.float32, 1, **kw, defer="all")
            if not kw.get("fp8"):
                _case(name, layout, overrides, torch.float64, STEPS, **kw)
                _case(name, layout, overrides, torch.float64, STEPS, **kw, defer="all")
                if layout.get("ep", 1) > 1:
                    _case(name, layout, overrides, torch.float64, STEPS, **kw, defer="experts")


V3 = "tiny-deepseek-v3"


def test_dualpipev_overlap_pp2_ep2_fsdp_recompute():
    """pp2 x ep2 over dp2 (FSDP2 ZeRO-2): the F&B pairs' dispatch and combine all-to-alls interleaved."""
    run_ranks(4, _ranks, [(V3, dict(pp=2, ep=2), dict(n_layers=4), {}),
                          (V3, dict(pp=2, ep=2), dict(n_layers=4), dict(recompute="selective")),
                          (V3, dict(pp=2, ep=2), dict(n_layers=4), dict(recompute="full"))])


@pytest.mark.slow
def test_dualpipev_overlap_fp8_tp2_sp_and_pp4():
    """FP8 (blockwise, emulated; the dispatch carries E4M3 tiles) under pp2 x ep2; pp2 x tp2 with sequence
    parallelism (no expert all-to-all: the pairs run whole blocks); pp4 with 8 stages over 4 ranks."""
    fp8_widths = dict(n_layers=4, dim=256, inter_dim=256, moe_inter_dim=128, vocab_size=256)   # 128-wide tiles
    run_ranks(4, _ranks, [(V3, dict(pp=2, ep=2), fp8_widths, dict(fp8=True)),
                          (V3, dict(pp=2, tp=2, sp=True), dict(n_layers=4), {}),
                          (V3, dict(pp=4), dict(n_layers=8), {})])


@pytest.mark.parametrize("kw,schedule,match", [
    (dict(pp=2, ep=2), "1f1b", "set parallel.pp_schedule=dualpipev"),
    (dict(pp=2, ep=2, tp=2), "dualpipev", "tp = 1 where experts are dispatched"),
    (dict(pp=2, cp=2), "dualpipev", "cp = 1"),
])
def test_bad_pipeline_overlap_names_the_key(kw, schedule, match):
    from parallel.mesh import ParallelDims
    from parallel.overlap import check_overlap
    tp, pp, cp = kw.get("tp", 1), kw["pp"], kw.get("cp", 1)
    dims = ParallelDims(world=8, pp=pp, dp=8 // (tp * pp * cp), tp=tp, cp=cp, ep=kw.get("ep", 1), sp=False,
                        node_size=8)
    with pytest.raises(LayoutError, match=match) as e:
        check_overlap("ep", dims, schedule)
    assert "parallel.overlap" in str(e.value)
