"""Context parallelism (parallel/context_parallel.py) equals one process (gloo ranks on CPU).

Every layout runs the engine on whole rows (the cp ranks of a dp rank get the same rows, the engine cuts
them) with packed documents, a left-padded row and MTP on, for tiny V3 (MLA, MoE) and tiny Llama (GQA), and
compares with one process over the same micro-batches: the loss terms and every gradient in fp32 (1e-5),
and in fp64 the parameters after 3 AdamW steps with clipping and the expert-bias update (1e-9). Layouts of
one world size share a spawn (each builds its own mesh) to keep the file quick. Also: the exchange's bytes
as comm.STATS measures them equal `cp_exchange_bytes` (and recomputation changes no number), a checkpoint
saved at cp2 resumes in one process and the reverse, and bad layouts and sequence lengths are refused.
"""
from __future__ import annotations

import pytest
import torch

from distributed import check_params, check_step, close, packed_rows, run_ranks
from model import build_model, preset
import parallel
from parallel import ParallelConfig, build_mesh, comm
from parallel.context_parallel import cp_exchange_bytes, local_positions
from parallel.engine import parallel_engine

BATCH, SEQ, STEPS = 4, 16, 3
MODELS = {"mla": "tiny-deepseek-v3", "gqa": "tiny-llama-3-8b"}


def _data(cfg, step: int, batch: int = BATCH, seq: int = SEQ):
    return packed_rows(cfg.vocab_size, batch, seq, 100 + step)


def _equivalence(name: str, layout: dict, dtype, steps: int, overrides: dict, schedule: str = "1f1b"):
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    torch.manual_seed(0)
    cfg = preset(name, **overrides)
    mesh = build_mesh(ParallelConfig(**layout))
    dims = mesh.dims
    ref = build_model(cfg, seed=0, dtype=dtype).train()
    ref.set_expert_placement(dims.ep, dims.ep // dims.ep_nodes)
    rows = BATCH // dims.dp
    n_micro = 1 if dims.pp == 1 else 4 if schedule == "dualpipev" else 2   # DualPipeV: >= its 4 stages
    engine = parallel_engine(build_model(cfg, device="meta", dtype=dtype).train(), mesh,
                             micro_batch_size=rows // n_micro, seq_len=SEQ, schedule=schedule,
                             n_microbatches=n_micro)
    engine.init_weights(0)
    if dims.pp > 1:
        parallel.attach_schedule(engine, rows // n_micro, SEQ)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    opt = torch.optim.AdamW(list(engine.parameters()), lr=1e-3, weight_decay=0.1, foreach=True)
    d = dims.coords(mesh.rank)["dp"]
    mb = rows // n_micro
    for step in range(steps):
        tokens, labels, doc_ids = _data(cfg, step)
        ropt.zero_grad()
        rterms: dict[str, float] = {}
        n = BATCH // mb
        for i in range(n):  # the same micro-batches, accumulated in one process
            part = slice(i * mb, (i + 1) * mb)
            out = ref.loss(tokens[part], labels[part], doc_ids=doc_ids[part])
            (out["loss"] / n).backward()
            for k, v in out.items():
                rterms[k] = rterms.get(k, 0.0) + float(v.detach()) / n
        opt.zero_grad()
        mine = slice(d * rows, (d + 1) * rows)
        got = engine.step(tokens[mine], labels[mine], doc_ids=doc_ids[mine])
        check_step(ref, engine, mesh, rterms, got, tol, f"{name} {layout} step {step}")
        ropt.step()
        opt.step()
        ref.update_expert_bias()
        engine.update_expert_bias()
    if steps > 1:
        check_params(ref, engine, mesh, tol, f"{name} {layout} param after {steps} steps")


def equivalence_rank(cases: list):
    """cases: (model key, layout, overrides[, schedule]) run in order on these ranks, fp32 then fp64."""
    for case in cases:
        key, layout, overrides, *schedule = case
        _equivalence(MODELS[key], layout, torch.float32, 1, overrides, *schedule)
        _equivalence(MODELS[key], layout, torch.float64, STEPS, overrides, *schedule)


def test_cp2_equals_one_process():
    """cp2 for MLA (the latent exchanged) and GQA (key/value heads), and cp2 x ep2 (experts over cp)."""
    run_ranks(2, equivalence_rank, [("mla", dict(cp=2), {}), ("gqa", dict(cp=2), {}),
                                    ("mla", dict(cp=2, ep=2), {})])


def test_cp4_equals_one_process():
    run_ranks(4, equivalence_rank, [("mla", dict(cp=4), {}), ("gqa", dict(cp=4), {})])


def test_cp2_with_fsdp_dp2_and_tp2_sp():
    """cp2 x FSDP2 dp2 (parameters sharded over dp x cp), and cp2 x tp2 with sequence parallelism."""
    run_ranks(4, equivalence_rank, [("mla", dict(cp=2), {}), ("gqa", dict(cp=2), {}),
                                    ("mla", dict(cp=2, tp=2, sp=True), {}),
                                    ("gqa", dict(cp=2, tp=2, sp=True), {})])


@pytest.mark.slow
def test_cp2_with_pp2():
    """cp2 x pp2 (stages pass their chunks' hidden states) under 1f1b and dualpipev (both V ends on a rank)."""
    run_ranks(4, equivalence_rank, [("mla", dict(cp=2, pp=2), dict(n_layers=4), "1f1b"),
                                    ("mla", dict(cp=2, pp=2), dict(n_layers=4), "dualpipev"),
                                    ("gqa", dict(cp=2, pp=2), {}, "1f1b")])


# -- the exchange's bytes, and recomputation ---------------------------------------------------------------
def exchange_rank():
    """What comm.STATS measures for the cp exchange equals cp_exchange_bytes, for MLA (the latent: d_c + d_h^R
    per token) and GQA (k and v heads), without recomputation and with each mode; full recomputation repeats
    the forward's all-gather. Every mode gives the same loss and gradients."""
    for key, recompute in (("mla", "none"), ("mla", "selective"), ("mla", "full"), ("gqa", "none")):
        cfg = preset(MODELS[key])
        mesh = build_mesh(ParallelConfig(cp=2))
        engine = parallel_engine(build_model(cfg, device="meta").train(), mesh, micro_batch_size=BATCH,
                                 seq_len=SEQ, recompute=recompute)
        engine.init_weights(0)
        tokens, labels, doc_ids = _data(cfg, 0)
        comm.STATS.reset()
        got = engine.step(tokens, labels, doc_ids=doc_ids)
        rec = comm.STATS.snapshot()
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim if key == "mla" else 2 * cfg.kv_heads * cfg.gqa_head_dim
        points = cfg.n_layers + cfg.n_mtp                     # every attention layer, MTP blocks included
        want = cp_exchange_bytes(BATCH * SEQ, width, 4, 2, recompute=recompute == "full")
        for op in ("cp_all_gather", "cp_reduce_scatter"):
            assert rec[f"{op}/cp"]["bytes"] == points * want[op], (key, recompute, op, rec[f"{op}/cp"], want)
        grads = parallel.full_state(engine.stages[0], mesh, grads=True)
        if recompute == "none":
            base, base_grads = got, grads
            continue
        for k, v in base.items():
            close(torch.tensor(got[k]), torch.tensor(v), f"{key} {recompute} {k}", 1e-6)
        for k, g in base_grads.items():
            close(grads[k], g, f"{key} {recompute} grad {k}", 1e-6)
    # a cp model called on whole rows without its positions refuses (keys of every rank, queries of all)
    with pytest.raises(ValueError, match="queries against 32 keys without a mask: call the model with"):
        engine.stages[0].loss(tokens, labels)


def test_exchange_bytes_equal_formula_and_recompute():
    run_ranks(2, exchange_rank)


# -- checkpoints are cp-agnostic ----------------------------------------------------------------------------
def resume_rank(root: str, layout: dict, phase: str):
    """phase "save": one step under `layout`, then a checkpoint (model, AdamW moments, step count). phase
    "load": a differently initialised model under `layout` loads it, takes the second step, and its parameters
    equal one process's after both steps (fp64, 1e-9)."""
    from parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, sharded_state
    from pretrain.optim import AdamW

    dtype = torch.float64
    cfg = preset(MODELS["mla"])
    mesh = build_mesh(ParallelConfig(**layout))
    rows = BATCH // mesh.dims.dp
    engine = parallel_engine(build_model(cfg, device="meta", dtype=dtype).train(), mesh, micro_batch_size=rows,
                             seq_len=SEQ)
    engine.init_weights(0 if phase == "save" else 1)
    opt = AdamW(list(engine.parameters()), lr=1e-3)
    d = mesh.dims.coords(mesh.rank)["dp"]

    def step(k):
        tokens, labels, doc_ids = _data(cfg, k)
        opt.zero_grad()
        mine = slice(d * rows, (d + 1) * rows)
        engine.step(tokens[mine], labels[mine], doc_ids=doc_ids[mine])
        engine.clip_grad_norm_(1.0)
        opt.step()
        engine.update_expert_bias()

    if phase == "save":
        step(0)
        save_checkpoint(root, 1, sharded_state(engine.stages, mesh, optimizer=opt), {"step": 1})
        return
    load_checkpoint(latest_checkpoint(root), sharded_state(engine.stages, mesh, optimizer=opt))
    step(1)
    ref = build_model(cfg, seed=0, dtype=dtype).train()
    ropt = AdamW(list(ref.parameters()), lr=1e-3)
    for k in range(2):
        tokens, labels, doc_ids = _data(cfg, k)
        ropt.zero_grad()
        ref.loss(tokens, labels, doc_ids=doc_ids)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ropt.step()
        ref.update_expert_bias()
    got = parallel.full_state(engine.stages[0], mesh)
    for k, p in ref.named_parameters():
        close(got[k], p.detach(), f"{layout} after resume: {k}", 1e-9)
    for (k, b), (k2, b2) in zip(ref.named_buffers(), engine.stages[0].named_buffers()):
        if k.endswith("gate.bias"):
            assert k == k2 and torch.equal(b, b2), f"expert bias {k}"


@pytest.mark.parametrize("first,then", [(dict(cp=2), dict()),
                                        pytest.param(dict(), dict(cp=2), marks=pytest.mark.slow)])
def test_checkpoint_resumes_across_cp(tmp_path, first, then):
    """Saved at cp2 (parameters FSDP-sharded over the cp ranks), resumed in one process, and the reverse."""
    run_ranks(2 if first else 1, resume_rank, str(tmp_path), first, "save")
    run_ranks(2 if then else 1, resume_rank, str(tmp_path), then, "load")


# -- pure functions -------------------------------------------------------------------------------------
def test_local_positions_balance_causal_work():
    for cp in (1, 2, 4):
        parts = [local_positions(16, cp, r) for r in range(cp)]
        assert sorted(torch.cat(parts).tolist()) == list(range(16))
        work = [int((p + 1).sum()) for p in parts]  # keys each rank's queries see under the causal mask
        assert len(set(work)) == 1, work
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]


def test_exchange_bytes_formula():
    assert cp_exchange_bytes(4096, 576, 2, 1) == {"cp_all_gather": 0, "cp_reduce_scatter": 0}
    assert cp_exchange_bytes(4096, 576, 2, 8) == {"cp_all_gather": 4096 * 576 * 2, "cp_reduce_scatter": 4096 * 576 * 2}
    assert cp_exchange_bytes(10, 8, 4, 2, recompute=True)["cp_all_gather"] == 2 * 10 * 8 * 4


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (["parallel.cp=3", "data.seq_len=16"],
     r"data.seq_len = 16 is not divisible by 2 x parallel.cp = 6: .*multiple of 6"),
    (["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "data.seq_len=12"],
     r"data.seq_len = 12 is not divisible by 2 x parallel.cp x parallel.tp = 8 \(parallel.sp splits"),
    (["parallel.cp=0"], r"parallel.cp must be >= 1"),
])
def test_bad_cp_config(args, match):
    from pretrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=match):
        load_config(None, args)


@pytest.mark.parametrize("kw,world,match", [
    (dict(cp=2, tp=2), 6, r"not divisible by parallel.pp x parallel.cp x parallel.tp = 1 x 2 x 2.*lower parallel.cp"),
    (dict(cp=2, ep=4, dp=1), 2, r"parallel.ep = 4 must divide dp x cp x tp = 1 x 2 x 1"),
    (dict(cp=2, dp=2), 2, r"parallel.pp x dp x cp x tp = 1 x 2 x 2 x 1 = 4 != world size 2"),
])
def test_bad_cp_layouts(kw, world, match):
    with pytest.raises(parallel.LayoutError, match=match):
        parallel.ParallelDims.from_config(ParallelConfig(**kw), world)


def test_bad_cp_values_and_sequences():
    from parallel.context_parallel import check_cp_plan, check_sequence
    with pytest.raises(parallel.LayoutError, match="parallel.cp must be >= 1"):
        ParallelConfig(cp=0)
    with pytest.raises(parallel.LayoutError, match="sequence length 10 is not divisible by 2 x parallel.cp = 4"):
        local_positions(10, 2, 0)
    dims = parallel.ParallelDims.from_config(ParallelConfig(cp=2, tp=2, sp=True), 4)
    with pytest.raises(parallel.LayoutError, match=r"data.seq_len = 12 is not divisible by 2 x parallel.cp x "
                                                   r"parallel.tp = 2 x 2 x 2 = 8 \(sequence parallelism"):
        check_sequence(12, dims, has_experts=False)
    check_sequence(16, dims, has_experts=False)
    with pytest.raises(parallel.LayoutError, match="declares no cp_plan exchange point.*set parallel.cp=1"):
        check_cp_plan(torch.nn.Linear(2, 2), 2)
