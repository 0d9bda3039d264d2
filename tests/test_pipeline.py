"""Parallel II: pipeline stages and schedules equal one process (gloo ranks on CPU).

The reference is one process running the same micro-batches with gradient accumulation: the
objective is the mean over micro-batches of `loss()`. Each rank builds that reference itself and
compares the loss terms, the gradients of the parameters its stages hold (gathered over tp/ep/dp),
and, in fp64, the parameters after AdamW steps with clipping and the expert-bias update."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import check_params, check_step, run_ranks
from model import build_model, preset
from model.transformer import IGNORE_INDEX
from parallel import ParallelConfig, build_mesh
from parallel.pipeline import attach_schedule, build_pipeline

SEQ = 16


def _data(cfg, step: int, batch: int):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, cfg.vocab_size, (batch, SEQ), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return tokens, labels



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
        check_step(ref, pipe, mesh, rterms, got, tol, f"step {step}")
        ropt.step()
        opt.step()
        ref.update_expert_bias()
        pipe.update_expert_bias()
    if steps > 1:
        check_params(ref, pipe, mesh, tol, f"param after {steps} steps")
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


def test_pp_recompute_per_stage():
    """Full recomputation on one stage and selective on the other change nothing numerically."""
    run_ranks(2, pipeline_rank, "tiny-deepseek-v3", dict(pp=2), "1f1b", 4, dict(n_layers=4), "float32", 1, 2,
              ["full", "selective"])


# -- cutting by cost (no processes) -------------------------------------------------------------------
def _stage_costs(costs, split):
    pre, layer, post = costs
    return [sum(layer[i] for i in s) + (pre if k == 0 else 0) + (post if k == len(split) - 1 else 0)
            for k, s in enumerate(split)]


def test_v3_split_by_cost_beats_equal_counts():
    """V3: 3 dense + 58 MoE layers, head and MTP on the last stage (V3 §3.2): PP16 x 2 chunks
    (DualPipeV's 32 stages) cut by cost has a cheaper slowest stage than equal layer counts."""
    from parallel.pipeline import split_layers
    net = build_model(preset("deepseek-v3"), device="meta")
    costs = net.stage_costs(4096)
    assert costs[2] > 3 * costs[1][3], "the head and MTP after the last layer must weigh several layers"
    split = split_layers(costs, 32)
    assert [i for s in split for i in s] == list(range(61))
    by_cost = max(_stage_costs(costs, split))
    equal = [list(range(61))[k * 61 // 32:(k + 1) * 61 // 32] for k in range(32)]
    by_count = max(_stage_costs(costs, equal))
    assert by_cost < 0.8 * by_count, (by_cost, by_count)
    # the optimum: no stage is cheaper to make slower than its neighbour (exhaustive check on a small case)
    small = (1.0, [3.0, 1.0, 1.0, 1.0, 2.0, 2.0], 4.0)
    got = max(_stage_costs(small, split_layers(small, 3)))
    import itertools
    best = min(max(_stage_costs(small, [list(range(0, a)), list(range(a, b)), list(range(b, 6))]))
               for a, b in itertools.combinations(range(0, 7), 2) if b > a)
    assert got == best


def test_bad_pipeline_input_is_refused():
    from parallel.mesh import LayoutError
    from parallel.pipeline import check_layer_split, split_layers
    from parallel.pp_schedules import check_microbatches, schedule_spec
    with pytest.raises(ValueError, match="unknown pipeline schedule 'dualpipe'.*dualpipev"):
        schedule_spec("dualpipe")
    with pytest.raises(ValueError, match="at least 4 micro-batches"):
        check_microbatches("dualpipev", 2, 2)
    with pytest.raises(ValueError, match="even number"):
        check_microbatches("dualpipev", 2, 5)
    with pytest.raises(LayoutError, match="once each, in order"):
        check_layer_split([[0, 2], [1, 3]], 4, 2)
    with pytest.raises(LayoutError, match="stage 1 of the layer split has no layer"):
        check_layer_split([[0], [], [1]], 2, 3)
    with pytest.raises(LayoutError, match="the schedule needs 3"):
        check_layer_split([[0], [1]], 2, 3)
    with pytest.raises(LayoutError, match="lower parallel.pp"):
        split_layers((0.0, [1.0, 1.0], 1.0), 8)
