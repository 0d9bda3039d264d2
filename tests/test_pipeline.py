"""Parallel II: pipeline stages and schedules equal one process (gloo ranks on CPU).

The reference is one process running the same micro-batches with gradient accumulation: the
objective is the mean over micro-batches of `loss()`. Each rank builds that reference itself and
compares the loss terms, the gradients of the parameters its stages hold (gathered over tp/ep/dp),
and, in fp64, the parameters after AdamW steps with clipping and the expert-bias update."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model import build_model, preset
from model.transformer import IGNORE_INDEX
import parallel
from parallel import ParallelConfig, build_mesh
from parallel.pipeline import attach_schedule, build_pipeline

SEQ = 16


def _data(cfg, step: int, batch: int):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, cfg.vocab_size, (batch, SEQ), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return tokens, labels


def _close(got, want, what: str, tol: float):
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def pipeline_rank(name: str, layout: dict, schedule: str, n_micro: int, overrides: dict, dtype_name: str = "float32",
                  steps: int = 1, vpp: int = 2, recompute="none"):
    dtype = getattr(torch, dtype_name)
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    torch.manual_seed(0)
    cfg = preset(name, **overrides)
    mesh = build_mesh(ParallelConfig(**layout))
    dims = mesh.dims
    ref = build_model(cfg, seed=0, dtype=dtype).train()
    ref.set_expert_placement(dims.ep, dims.ep // dims.ep_nodes)
    pipe = build_pipeline(build_model(cfg, device="meta", dtype=dtype).train(), mesh, schedule, n_micro,
                          vpp=vpp, seq_len=SEQ, recompute=recompute)
    pipe.init_weights(seed=0)
    attach_schedule(pipe, 2, SEQ)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    opt = torch.optim.AdamW(list(pipe.parameters()), lr=1e-3, weight_decay=0.1, foreach=True)
    batch = n_micro * dims.dp * 2
    d = dims.coords(mesh.rank)["dp"]
    for step in range(steps):
        tokens, labels = _data(cfg, step, batch)
        ropt.zero_grad()
        rterms = {}
        for mb in range(n_micro * dims.dp):  # the same micro-batches, accumulated
            part = slice(mb * 2, mb * 2 + 2)
            out = ref.loss(tokens[part], labels[part])
            (out["loss"] / (n_micro * dims.dp)).backward()
            for k, v in out.items():
                rterms[k] = rterms.get(k, 0.0) + float(v.detach()) / (n_micro * dims.dp)
        opt.zero_grad()
        rows = batch // dims.dp
        mine = slice(d * rows, (d + 1) * rows)
        got = pipe.step(tokens[mine], labels[mine])
        for k, v in rterms.items():
            assert k in got, f"{k} missing from the pipeline's metrics {sorted(got)}"
            _close(torch.tensor(got[k], dtype=torch.float64), torch.tensor(v, dtype=torch.float64), k, tol)
        rgrads = dict(ref.named_parameters())
        for s in pipe.stages:
            grads = parallel.full_state(s, mesh, grads=True)
            for k, g in grads.items():
                assert g is not None, f"stage {s.stage_index}: no gradient for {k}"
                _close(g, rgrads[k].grad, f"stage {s.stage_index} grad {k}", tol)
        rnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        norm = pipe.clip_grad_norm_(1.0)
        _close(norm.to(rnorm.dtype), rnorm, "grad norm", tol)
        ropt.step()
        opt.step()
        ref.update_expert_bias()
        pipe.update_expert_bias()
    if steps > 1:
        rparams = dict(ref.named_parameters())
        for s in pipe.stages:
            for k, v in parallel.full_state(s, mesh).items():
                _close(v, rparams[k].detach(), f"stage {s.stage_index} param after {steps} steps {k}", tol)
    # together the ranks' stages hold every parameter of the model, each layer on one stage
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, sorted({k for s in pipe.stages for k, _ in s.named_parameters()}))
    assert set().union(*map(set, held)) == set(dict(ref.named_parameters())), "parameters lost in the cut"


SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "zb1p", "zbv", "dualpipev"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_every_schedule(schedule):
    run_ranks(2, pipeline_rank, "tiny-deepseek-v3", dict(pp=2), schedule, 4, dict(n_layers=4))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp4_every_schedule(schedule):
    run_ranks(4, pipeline_rank, "tiny-deepseek-v3", dict(pp=4), schedule, 8, dict(n_layers=8))


COMPOSED = {
    "pp2_tp2_sp_1f1b": (4, dict(pp=2, tp=2, sp=True), "1f1b"),
    "pp2_ep2_dualpipev": (4, dict(pp=2, ep=2), "dualpipev"),
    "pp2_dp2_zbv": (4, dict(pp=2), "zbv"),                       # dp = 2, FSDP2 per stage
    "pp2_dp2_interleaved": (4, dict(pp=2), "interleaved_1f1b"),
    "pp2_tp2_ep2_dualpipev": (8, dict(pp=2, tp=2, ep=2, sp=True), "dualpipev"),
}


@pytest.mark.parametrize("case", list(COMPOSED))
def test_pp_composes_with_tp_ep_dp(case):
    world, layout, schedule = COMPOSED[case]
    run_ranks(world, pipeline_rank, "tiny-deepseek-v3", layout, schedule, 4, dict(n_layers=4))


@pytest.mark.parametrize("schedule,layout", [("dualpipev", dict(pp=2)), ("1f1b", dict(pp=2, tp=2, sp=True))])
def test_pp_adamw_steps_fp64(schedule, layout):
    """Parameters after 3 AdamW steps with clipping and the bias update (fp64: exact logic check)."""
    run_ranks(2 * layout.get("tp", 1), pipeline_rank, "tiny-deepseek-v3", layout, schedule, 4, dict(n_layers=4),
              "float64", 3)
