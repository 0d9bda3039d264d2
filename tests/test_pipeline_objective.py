"""Post-training objectives through the engines (issue 22 §1): `engine.step(..., objective=)` runs a
custom last-stage objective in place of the model's loss, and `engine.score` a forward-only per-token pass,
under pp2 (1F1B, DualPipeV) and pp2 x ep2 exactly as one process computes them with gradient accumulation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distributed import check_step, run_ranks
from model import build_model, preset
from model.transformer import IGNORE_INDEX
from parallel import ParallelConfig, build_mesh
from parallel.pipeline import attach_schedule, build_pipeline

SEQ, MBS = 16, 4   # a micro-batch: 2 pairs (chosen rows first, then rejected)


class PairObjective:
    """A DPO-shaped objective: summed log-probs per row, compared pairwise against given reference sums."""
    terms = ("loss", "margin")

    def __call__(self, model, h, tokens, labels, ref):
        logp = model.token_logprobs(tokens, labels, h=h)["logprobs"].sum(-1)
        k = tokens.shape[0] // 2
        margin = (logp[:k] - ref[:k]) - (logp[k:] - ref[k:])
        return {"loss": -F.logsigmoid(0.5 * margin).mean(), "margin": margin.detach().mean()}


def token_logprobs(model, h, tokens, labels):
    return model.token_logprobs(tokens, labels, h=h)["logprobs"]


def _data(cfg, batch: int):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(1, cfg.vocab_size, (batch, SEQ), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[:, :3] = IGNORE_INDEX   # a prompt: not scored
    return tokens, labels


def objective_rank(layout: dict, schedule: str, n_micro: int):
    torch.manual_seed(0)
    cfg = preset("tiny-deepseek-v3")
    mesh = build_mesh(ParallelConfig(**layout))
    dims = mesh.dims
    ref = build_model(cfg, seed=0).train()
    ref.set_expert_placement(dims.ep, dims.ep // dims.ep_nodes)
    pipe = build_pipeline(build_model(cfg, device="meta").train(), mesh, schedule, n_micro, seq_len=SEQ)
    pipe.init_weights(seed=0)
    attach_schedule(pipe, MBS, SEQ)
    batch = n_micro * dims.dp * MBS
    tokens, labels = _data(cfg, batch)
    rows = batch // dims.dp
    mine = slice(dims.coords(mesh.rank)["dp"] * rows, (dims.coords(mesh.rank)["dp"] + 1) * rows)

    # forward-only scoring: every rank gets the last stage's per-token values for its rows
    with torch.no_grad():
        want = torch.cat([ref.token_logprobs(tokens[i:i + MBS], labels[i:i + MBS])["logprobs"]
                          for i in range(0, batch, MBS)])
    got = pipe.score(tokens[mine], labels[mine], token_logprobs)
    torch.testing.assert_close(got, want[mine], rtol=1e-5, atol=1e-5)

    # a step of the custom objective, against one process accumulating the same micro-batches
    refsum = (want.sum(-1) - 0.25).detach()   # a reference other than the policy, so the margin is not 0
    objective, n_all = PairObjective(), n_micro * dims.dp
    rterms = {}
    for i in range(0, batch, MBS):
        out = objective(ref, None, tokens[i:i + MBS], labels[i:i + MBS], ref=refsum[i:i + MBS])
        (out["loss"] / n_all).backward()
        for k in objective.terms:
            rterms[k] = rterms.get(k, 0.0) + float(out[k].detach()) / n_all
    terms = pipe.step(tokens[mine], labels[mine], objective=objective, ref=refsum[mine])
    assert set(terms) == set(objective.terms)
    check_step(ref, pipe, mesh, rterms, terms, 1e-5, f"{schedule} {layout}")
    # the model's own loss still runs after an objective step (the objective is not left installed)
    assert all(s.objective is None for s in pipe.stages)


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_objective_and_score_under_pp2(schedule):
    run_ranks(2, objective_rank, dict(pp=2), schedule, 4)


@pytest.mark.slow
def test_objective_and_score_under_pp2_ep2():
    run_ranks(4, objective_rank, dict(pp=2, dp=2, ep=2), "1f1b", 2)


def single_rank():
    """pp = 1: SingleStage takes the same objective and scoring functions."""
    from parallel import build_engine
    cfg = preset("tiny-deepseek-v3")
    mesh = build_mesh(ParallelConfig())
    ref = build_model(cfg, seed=0).train()
    eng = build_engine(build_model(cfg, device="meta").train(), mesh, micro_batch_size=MBS, seq_len=SEQ, seed=0)
    tokens, labels = _data(cfg, 2 * MBS)
    with torch.no_grad():
        want = ref.token_logprobs(tokens, labels)["logprobs"]
    torch.testing.assert_close(eng.score(tokens, labels, token_logprobs), want, rtol=1e-6, atol=1e-6)
    objective, rterms = PairObjective(), {}
    refsum = want.sum(-1) - 0.25
    for i in (0, MBS):
        out = objective(ref, None, tokens[i:i + MBS], labels[i:i + MBS], ref=refsum[i:i + MBS])
        (out["loss"] / 2).backward()
        for k in objective.terms:
            rterms[k] = rterms.get(k, 0.0) + float(out[k].detach()) / 2
    terms = eng.step(tokens, labels, objective=objective, ref=refsum)
    check_step(ref, eng, mesh, rterms, terms, 1e-5, "pp1")


def test_objective_and_score_in_one_process():
    run_ranks(1, single_rank)
