"""Routing replay (R3, issue 22 §2): the generators record the trunk's experts per token, the training
forward replays them (through recomputation, under ep2), the router keeps its gradients, the load
counters count the replayed routing, and GRPO reports routing_mismatch."""
import pytest
import torch

from model import build_model, preset
from model.moe import expert_counts
import posttrain.engine as engine_mod
from posttrain.engine import Engine
from posttrain.generate import Generator, SamplingParams
from test_generate import ToyTokenizer, _net
from test_rollout import _mixed, _Replayed, _teach_mtp


def _full_routes(net, prompt, ids):
    """The routing of one uncached forward over prompt + completion (the last token never fed)."""
    seq = torch.tensor([prompt + ids[:-1]])
    net.record_routing()
    with torch.no_grad():
        net(seq)
    routes = net.recorded_routing()[-1][0]
    net.clear_routing()
    return routes


def test_engine_and_static_generator_record_the_same_routing():
    """Greedy: the paged engine (shared prefixes, with and without one MTP draft per step) and the static
    left-padded generator record the same experts, equal to an uncached forward's over the same tokens."""
    net, cfg = _net("tiny-deepseek-v3")
    _teach_mtp(net, cfg, steps=30)
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _mixed(cfg)[:7] + [list(_mixed(cfg)[1])] * 2   # shared prefixes: prompt 1 four times
    params = SamplingParams(max_new_tokens=10, temperature=0)
    ref, _ = Generator(net, tok, pad_id=3).generate(prompts, params, record_routing=True)
    n_moe, k = len(net.trunk_moe_layers()), cfg.n_activated_experts
    for q, c in zip(prompts, ref):
        assert c.routes.shape == (len(q) + len(c.ids) - 1, n_moe, k)
        assert torch.equal(c.routes, _full_routes(net, q, c.ids))
    for kw in ({}, dict(draft_tokens=1), dict(draft_tokens=1, max_batch=3, page_size=4)):
        outs, stats = Engine(net, tok, pad_id=3, **kw).generate(prompts, params, record_routing=True)
        if kw:
            assert stats["accepted"] > 0
        for r, o in zip(ref, outs):
            assert o.ids == r.ids and torch.equal(o.routes, r.routes)
    plain, _ = Engine(net, tok, pad_id=3).generate(prompts, params)
    assert all(c.routes is None for c in plain)
    assert all(not m.record_routes and m.routes == () for m in net.moe_layers())


@pytest.mark.parametrize("graphs", [False, True])
def test_compiled_steps_record_the_same_routing(monkeypatch, traced, graphs):
    """Recording keeps the steps compiled: the step programs return the trunk's experts (`step_routes`), so
    compiled steps (dynamo-traced) and steps replayed from graphs (`_Replayed`, which like a real replay sets no
    module attribute) record what the eager engine records, plain and speculating, call after call."""
    if graphs:
        monkeypatch.setattr(engine_mod, "StepGraphs", _Replayed)
        monkeypatch.setattr(Engine, "_graphed", lambda self: self.bucketed and self.compile)
    net, cfg = _net("tiny-deepseek-v3")
    _teach_mtp(net, cfg, steps=30)
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _mixed(cfg)[:7] + [list(_mixed(cfg)[1])] * 2
    params = SamplingParams(max_new_tokens=10, temperature=0)
    for kw in ({}, dict(draft_tokens=1)):
        ref, _ = Engine(net, tok, pad_id=3, **kw).generate(prompts, params, record_routing=True)
        engine = Engine(net, tok, pad_id=3, compile=True, buckets=graphs, **kw)
        for _ in range(2):   # with graphs the second call only replays
            outs, stats = engine.generate(prompts, params, record_routing=True)
            for r, o in zip(ref, outs):
                assert o.ids == r.ids and torch.equal(o.routes, r.routes)
            assert (stats.get("graph_replays", 0) > 0) == graphs
        step = engine_mod.speculation_step if kw else engine_mod.decode_step
        assert step in traced._COMPILED   # the steps ran compiled
    assert all(not m.record_routes and m.routes == () for m in net.moe_layers())


def _batch(cfg, seed=3, b=3, s=10):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, cfg.vocab_size, (b, s), generator=g)
    return tokens, tokens.roll(-1, 1)


def test_replay_forces_the_experts_keeps_router_gradients_and_counts_the_replayed_load():
    cfg = preset("tiny-deepseek-v3")
    net = build_model(cfg, dtype=torch.float64, seed=0).train()
    tokens, labels = _batch(cfg)
    n_moe, k = len(net.trunk_moe_layers()), cfg.n_activated_experts
    g = torch.Generator().manual_seed(5)
    routes = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:k]
                          for _ in range(tokens.numel() * n_moe)]).view(*tokens.shape, n_moe, k)
    routes[0, 2] = -1                      # one token routes normally
    net.init_buffers()
    net.replay_routing(routes)
    net.record_routing()
    net.loss(tokens, labels)["loss"].backward()
    (chosen,), (used,) = net.recorded_routing(forced=False), net.recorded_routing()
    expect = torch.where(routes == -1, chosen, routes)
    assert torch.equal(used, expect) and not torch.equal(chosen, used)
    for i, m in enumerate(net.trunk_moe_layers()):
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
        assert torch.equal(m.tokens_per_expert.long(), expert_counts(expect[:, :, i].reshape(-1, k),
                                                                     cfg.n_routed_experts))
    net.clear_routing()
    assert all(m.forced_routes is None for m in net.moe_layers())
    with pytest.raises(ValueError, match="MoE layers"):
        net.replay_routing(routes[..., :1, :])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recomputation_in_backward_replays_the_forced_routes(mode):
    """The recomputed forward in backward forces the same experts: gradients equal the replayed run
    without recomputation (and differ from an unforced run, so the forcing is what they show)."""
    from parallel.recompute import apply_recompute
    cfg = preset("tiny-deepseek-v3")
    tokens, labels = _batch(cfg, seed=4)
    g = torch.Generator().manual_seed(6)
    n_moe, k = cfg.n_layers - cfg.n_dense_layers, cfg.n_activated_experts
    routes = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:k]
                          for _ in range(tokens.numel() * n_moe)]).view(*tokens.shape, n_moe, k)

    def grads(recompute: str, replay: bool):
        net = build_model(cfg, dtype=torch.float64, seed=0).train()
        if recompute != "none":
            apply_recompute(net, recompute)
        if replay:
            net.replay_routing(routes)
        net.loss(tokens, labels)["loss"].backward()
        net.clear_routing()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, \
            [m.tokens_per_expert.clone() for m in net.trunk_moe_layers()]

    (ref, ref_load), (got, got_load) = grads("none", True), grads(mode, True)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    for a, b in zip(ref_load, got_load):   # recomputation counts no load twice
        assert torch.equal(a, b)
    free, _ = grads(mode, False)
    assert any(not torch.allclose(free[n], ref[n]) for n in ref)


# -- GRPO ------------------------------------------------------------------------------------------------
def replay_rank(task_dir, run_dir, extra, out, perturb=0.0):
    import torch.distributed as dist
    from posttrain.grpo import GRPOTrainer, routing_disagreement, training_routes
    from test_grpo import _config
    tr = GRPOTrainer(_config(task_dir, run_dir, "grpo.beta=0", "eval.every=0", "rollout.temperature=1.0", *extra))
    net = tr.session.policy
    prompts, comps, _, _, adv, keep, _ = tr.rollout()
    seen = []
    forward = net.token_logprobs

    def spy(*a, **kw):   # the training forward's own choices and the experts it used
        res = forward(*a, **kw)
        if net.trunk_moe_layers()[0].record_routes:
            seen.append((net.recorded_routing(forced=False)[-1].cpu(), net.recorded_routing()[-1].cpu()))
        return res

    net.token_logprobs = spy
    if perturb:   # the routers move between rollout and update (as a policy drifts): their choices change
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for m in net.trunk_moe_layers():
                m.gate.weight.add_(perturb * torch.randn(m.gate.weight.shape, generator=g))
    keep = torch.ones_like(keep)
    stats = tr.update(prompts, comps, adv, keep)
    mbs = tr.cfg.train.micro_batch_size
    after = before = pairs = 0.0
    for m, (chosen, used) in enumerate(seen):
        sl = slice(m * mbs, (m + 1) * mbs)
        routes = training_routes(comps[sl], used.shape[1], used.shape[2], used.shape[3])
        recorded = (routes >= 0).all(-1, keepdim=True)
        if tr.cfg.grpo.routing_replay == "rollout":   # every recorded token took the rollout's experts
            assert torch.equal(torch.where(recorded, used, routes), routes)
        d_after, p = routing_disagreement(used, routes, prompts[sl], comps[sl])
        d_before, _ = routing_disagreement(chosen, routes, prompts[sl], comps[sl])
        after, before, pairs = after + d_after, before + d_before, pairs + p
    assert len(seen) == -(-len(prompts) // mbs) and pairs > 0
    totals = tr.session.all_sum({"after": after, "before": before, "pairs": pairs})
    assert stats["routing_mismatch"] == pytest.approx(totals["before"] / totals["pairs"])
    if dist.get_rank() == 0:
        torch.save({"stats": stats, "after": totals["after"] / totals["pairs"]}, out)


@pytest.mark.parametrize("layout,perturb", [([], 0.05), (["parallel.ep=2"], 0.0),
                                            (["parallel.recompute=full", "grpo.old_logprobs=recompute"], 0.05)])
def test_grpo_update_replays_the_rollout_routing(task_dir, tmp_path, layout, perturb):
    """The update's forwards use exactly the rollout's experts (routing_mismatch after forcing: 0), in one
    process and under ep2; with routers moved after the rollout their own choices differ (> 0)."""
    from distributed import run_ranks
    world = 2 if "parallel.ep=2" in layout else 1
    run_ranks(world, replay_rank, str(task_dir), str(tmp_path / "r"), ["grpo.routing_replay=rollout", *layout],
              str(tmp_path / "r.pt"), perturb)
    res = torch.load(tmp_path / "r.pt")
    assert res["after"] == 0.0 and 0.0 <= res["stats"]["routing_mismatch"] <= 1.0
    if perturb:
        assert res["stats"]["routing_mismatch"] > 0


def test_grpo_reports_routing_mismatch_without_replay(task_dir, tmp_path):
    from distributed import run_ranks
    run_ranks(1, replay_rank, str(task_dir), str(tmp_path / "n"), [], str(tmp_path / "n.pt"))
    res = torch.load(tmp_path / "n.pt")
    print("routing_mismatch without replay:", res["stats"]["routing_mismatch"])
    assert 0.0 <= res["stats"]["routing_mismatch"] <= 1.0
    assert res["after"] == res["stats"]["routing_mismatch"]   # nothing forced: used = chosen


@pytest.mark.parametrize("extra,words", [
    (["grpo.routing_replay=always"], "grpo.routing_replay"),
    (["grpo.routing_replay=rollout", "parallel.tp=2"], "needs parallel.tp = 1"),
    (["grpo.routing_replay=rollout", "model.preset=tiny-deepseek-llm-7b"], "no MoE layer"),
])
def test_routing_replay_settings_are_checked(task_dir, tmp_path, extra, words):
    from pretrain.config import ConfigError
    from test_grpo import _config
    with pytest.raises(ConfigError, match=words):
        _config(task_dir, tmp_path, *extra)


def pipeline_replay_rank(task_dir, run_dir, extra, out):
    """GRPO under a pipeline, rollouts under the rollout layout (recording the routes), the training routers then
    moved: each stage's gates, spied on, must use the rollout's experts wherever a route was recorded."""
    import torch.distributed as dist
    from posttrain.grpo import GRPOTrainer
    from test_grpo import PP, _config
    tr = GRPOTrainer(_config(task_dir, run_dir, *PP, "grpo.beta=0", "eval.every=0", "rollout.temperature=1.0",
                             *extra))
    prompts, comps, _, _, adv, keep, _ = tr.rollout()
    assert all(c.routes is not None for c in comps)
    seen = []
    for stage in tr.session.engine.stages:
        for m in stage.trunk_moe_layers():
            forward = m.gate.forward

            def spy(x, forced=None, forward=forward):
                out = forward(x, forced)
                seen.append((out[1].detach().cpu(), None if forced is None else forced.detach().cpu()))
                return out
            m.gate.forward = spy
            with torch.no_grad():
                m.gate.weight.add_(0.05 * torch.randn_like(m.gate.weight))
    stats = tr.update(prompts, comps, adv, torch.ones_like(keep))
    # every gate call of the update forced (beta = 0: no reference; old log-probs from the rollout), the
    # recomputations in backward included
    assert seen and all(f is not None for _, f in seen), sum(f is None for _, f in seen)
    forced = [(used, f) for used, f in seen if f is not None]
    hit = sum(int((f >= 0).all(-1).sum()) for _, f in forced)
    for used, f in forced:
        rec = (f >= 0).all(-1, keepdim=True)
        assert torch.equal(torch.where(rec, used, f), f)
    torch.save({"stats": stats, "forced_forwards": len(forced), "forced_tokens": hit}, f"{out}.{dist.get_rank()}")


@pytest.mark.parametrize("layout", [["parallel.pp=2"], ["parallel.pp=2", "parallel.recompute=full"],
                                    ["parallel.pp=2", "parallel.recompute=selective"],
                                    pytest.param(["parallel.pp=2", "parallel.ep=2", "rollout.ep=4"],
                                                 marks=pytest.mark.slow)])
def test_grpo_under_pp_replays_the_rollout_routing_on_every_stage(task_dir, tmp_path, layout):
    """Routing replay through the pipeline (issue 22 §2): every stage's MoE layers take the rollout's experts
    (recorded by the rollout copy in its own layout), while the moved routers' own choices differ
    (routing_mismatch > 0); under full recomputation the re-run forwards in backward, which 1F1B runs after
    the next micro-batch's forward, force the same experts (each spied gate call counts)."""
    from distributed import run_ranks
    world = 4 if "parallel.ep=2" in layout else 2
    run_ranks(world, pipeline_replay_rank, str(task_dir), str(tmp_path / "r"),
              ["grpo.routing_replay=rollout", *layout], str(tmp_path / "r.pt"))
    for r in range(world):
        res = torch.load(f"{tmp_path / 'r.pt'}.{r}")
        assert res["forced_forwards"] > 0 and res["forced_tokens"] > 0
        assert 0.0 < res["stats"]["routing_mismatch"] <= 1.0
