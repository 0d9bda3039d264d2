"""DeepSeek-V3.2's Keep Sampling Mask (grpo.keep_sampling_mask): the generators record each token's top-p / top-k
allowed set and its renormalised log-prob, token_logprobs computes log-probs on those sets (per vocab slice under
tp), and a GRPO update with the option equals one process under tp2."""
import pytest
import torch

from distributed import run_ranks
from model.transformer import IGNORE_INDEX
from posttrain.engine import Engine
from posttrain.generate import Completion, Generator, SamplingParams, sampling_distribution
from posttrain.grpo import GRPOTrainer, training_allowed, training_rows
from pretrain.config import ConfigError
from test_generate import ToyTokenizer, _net, _prompts
from test_grpo import _config, _fixed_batch

TRUNCATIONS = [dict(top_p=0.8), dict(top_k=12)]
GENERATORS = {"static": lambda net, tok: Generator(net, tok, pad_id=3),
              "paged": lambda net, tok: Engine(net, tok, pad_id=3, page_size=4),
              "speculative": lambda net, tok: Engine(net, tok, pad_id=3, page_size=4, draft_tokens=1)}


@pytest.fixture(scope="module")
def model():
    return _net("tiny-deepseek-v3")   # fp64, with an MTP module (the speculative engine drafts with it)


def _prompt_set(cfg):
    prompts = _prompts(cfg, (4, 6, 3, 5))
    prompts[2] = list(prompts[0])     # a shared prefix: the engine's children share the prefill's sampling step
    return prompts


def _generate(model, kind, **kw):
    net, cfg = model
    params = SamplingParams(max_new_tokens=8, temperature=0.9, **kw)
    return GENERATORS[kind](net, ToyTokenizer(cfg.vocab_size)).generate(_prompt_set(cfg), params, seed=5)


def _step_logits(net, c):
    """The logits that predicted each generated token, from one teacher-forced forward."""
    with torch.no_grad():
        return net(torch.tensor([c.prompt_ids + c.ids]))[0, len(c.prompt_ids) - 1:-1]


@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("trunc", TRUNCATIONS, ids=lambda t: next(f"{k}={v}" for k, v in t.items()))
def test_recorded_sets_are_the_truncation_and_logprobs_renormalised(model, kind, trunc):
    net, _ = model
    outs, stats = _generate(model, kind, keep_sampling_mask=True, **trunc)
    if kind == "speculative":
        assert stats["drafted"] > 0
    params = SamplingParams(temperature=0.9, **trunc)
    restricted_somewhere = False
    for c in outs:
        assert c.allowed is not None and len(c.allowed) == len(c.ids) == len(c.logprobs) > 0
        logits = _step_logits(net, c)
        logp, probs = sampling_distribution(logits, params)
        for j, token in enumerate(c.ids):
            keep = probs[j] > 0
            assert c.allowed[j].dtype == torch.int32
            assert c.allowed[j].tolist() == keep.nonzero()[:, 0].tolist()
            assert token in c.allowed[j].tolist()
            if "top_k" in trunc:
                assert len(c.allowed[j]) == trunc["top_k"]
            by_hand = (logits[j].float() / 0.9).masked_fill(~keep, float("-inf")).log_softmax(-1)[token]
            assert c.logprobs[j] == pytest.approx(float(by_hand), abs=2e-5)
            assert c.logprobs[j] >= float(logp[j, token]) - 1e-6   # the truncated mass is renormalised away
            restricted_somewhere |= bool(keep.sum() < keep.numel())
    assert restricted_somewhere


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_off_and_noop_leave_completions_unchanged(model, kind):
    net, _ = model
    off, _ = _generate(model, kind, top_p=0.8)
    explicit, _ = _generate(model, kind, top_p=0.8, keep_sampling_mask=False)
    on, _ = _generate(model, kind, top_p=0.8, keep_sampling_mask=True)
    for a, b, m in zip(off, explicit, on):
        assert a.allowed is None and (a.ids, a.logprobs) == (b.ids, b.logprobs)
        assert m.ids == a.ids                      # the mask changes the recorded log-prob, never the draw
        logp = (_step_logits(net, a).float() / 0.9).log_softmax(-1)
        torch.testing.assert_close(torch.tensor(a.logprobs), logp[range(len(a.ids)), a.ids], rtol=0, atol=2e-5)
    # nothing truncated (top_p = 1, top_k = 0) or greedy: the option records nothing, bit for bit
    for kw in (dict(), dict(temperature=0.0, top_p=0.8)):
        plain, _ = GENERATORS[kind](net, ToyTokenizer(model[1].vocab_size)).generate(
            _prompt_set(model[1]), SamplingParams(max_new_tokens=8, **{"temperature": 0.9, **kw}), seed=5)
        asked, _ = GENERATORS[kind](net, ToyTokenizer(model[1].vocab_size)).generate(
            _prompt_set(model[1]), SamplingParams(max_new_tokens=8, keep_sampling_mask=True,
                                                  **{"temperature": 0.9, **kw}), seed=5)
        for a, b in zip(plain, asked):
            assert b.allowed is None and (a.ids, a.logprobs) == (b.ids, b.logprobs)


def test_token_logprobs_on_allowed_sets_is_the_masked_log_softmax(model):
    net, cfg = model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.vocab_size, (2, 9), generator=g)
    targets = tokens.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    targets[0, :2] = IGNORE_INDEX
    sets = {}   # (row, position) -> allowed ids, each holding its target
    for b, t in [(0, 2), (0, 5), (1, 0), (1, 3), (1, 7)]:
        others = torch.randperm(cfg.vocab_size, generator=g)[:int(torch.randint(1, 20, (1,), generator=g))]
        sets[b, t] = sorted(set(others.tolist()) | {int(targets[b, t])})
    pos = torch.tensor([b * 9 + t for (b, t), ids in sets.items() for _ in ids])
    allowed = torch.stack([pos, torch.tensor([i for ids in sets.values() for i in ids])])
    T = 0.7
    plain = net.token_logprobs(tokens, targets, entropy=True, temperature=T)
    out = net.token_logprobs(tokens, targets, entropy=True, temperature=T, allowed=allowed)
    with torch.no_grad():
        logits = net(tokens) / T
    for b in range(2):
        for t in range(9):
            z = logits[b, t]
            if (b, t) in sets:
                keep = torch.zeros_like(z, dtype=torch.bool)
                keep[sets[b, t]] = True
                z = z.masked_fill(~keep, float("-inf"))
            logp = z.log_softmax(-1)
            p = logp.exp()
            entropy = -(p * logp.masked_fill(p == 0, 0)).sum()
            lp = 0.0 if targets[b, t] == IGNORE_INDEX else float(logp[targets[b, t]])
            assert float(out["logprobs"][b, t].detach()) == pytest.approx(lp, abs=1e-10)
            assert float(out["entropy"][b, t]) == pytest.approx(float(entropy), abs=1e-10)
            if (b, t) in sets:   # a sampled token's log-prob only grows when the tail is cut off
                assert out["logprobs"][b, t] > plain["logprobs"][b, t]
            else:
                assert out["logprobs"][b, t] == plain["logprobs"][b, t]
    out["logprobs"].sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
    net.zero_grad(set_to_none=True)


def test_training_allowed_alignment():
    c = [Completion([5, 6], [7, 8], "", [-0.1, -0.2], "length",
                    allowed=[torch.tensor([1, 7], dtype=torch.int32), torch.tensor([8], dtype=torch.int32)]),
         Completion([5], [9], "", [-0.5], "length"),
         Completion([4, 4, 4], [3], "", [-0.5], "length", allowed=[torch.tensor([2, 3, 250], dtype=torch.int32)])]
    allowed = training_allowed([[5, 6], [5], [4, 4, 4]], c, 8)
    assert allowed.dtype == torch.long
    assert allowed.tolist() == [[1, 1, 2, 16 + 2, 16 + 2, 16 + 2], [1, 7, 8, 2, 3, 250]]
    assert training_allowed([[5]], c[1:2], 8) is None


def _sets_for(comps, vocab, seed=3):
    """Random allowed sets holding each completion token: some spanning both halves of the vocabulary (both tp
    ranks' slices), some inside one half (a tp rank holds none of them)."""
    g = torch.Generator().manual_seed(seed)
    for c in comps:
        c.allowed = []
        for j, token in enumerate(c.ids):
            lo, hi = ((0, vocab), (0, vocab // 2), (vocab // 2, vocab))[j % 3]
            if not lo <= token < hi:
                lo, hi = 0, vocab
            others = torch.randint(lo, hi, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
            c.allowed.append(torch.tensor(sorted(set(others.tolist()) | {token}), dtype=torch.int32))


MASK_ARGS = ("grpo.keep_sampling_mask=true", "rollout.top_p=0.9", "grpo.old_logprobs=recompute")


def masked_update_rank(task_dir, run_dir, layout, out):
    import torch.distributed as dist
    import parallel
    tr = GRPOTrainer(_config(task_dir, run_dir, *MASK_ARGS, *layout))
    prompts, comps, adv, keep = _fixed_batch(tr, 4, 4)
    _sets_for(comps, tr.session.model_cfg.vocab_size)
    grads = {}
    step = tr.session.optimizer_step

    def capture(loss, **kw):   # the synchronised gradients, cloned now: in one process they are the .grad tensors,
        for stage in tr.session.engine.stages:                               # which the step clips in place
            full = parallel.full_state(stage, tr.session.mesh, grads=True)
            grads.update({k: v.detach().clone() for k, v in full.items() if v is not None})
        return step(loss, **kw)

    tr.session.optimizer_step = capture
    stats = tr.update(prompts, comps, adv, keep)
    plain = None
    if dist.get_world_size() == 1:   # the (stepped) policy's log-probs of the same rows with and without the sets
        net = tr.session.policy
        tokens, targets, _ = training_rows(prompts, comps, 1, tr.session.tokenizer.eod_id)
        with torch.no_grad():
            plain = (net.token_logprobs(tokens, targets)["logprobs"],
                     net.token_logprobs(tokens, targets,
                                        allowed=training_allowed(prompts, comps, tokens.shape[1]))["logprobs"],
                     targets)
    every = [None] * dist.get_world_size()   # under pp each rank holds its stages' gradients
    dist.all_gather_object(every, grads)
    if dist.get_rank() == 0:
        torch.save({"grads": {k: v for g in every for k, v in g.items()}, "stats": stats, "plain": plain}, out)


@pytest.fixture(scope="module")
def masked_one(task_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("masked_one")
    run_ranks(1, masked_update_rank, str(task_dir), str(d / "one"), [], str(d / "one.pt"))
    return torch.load(d / "one.pt")


@pytest.mark.parametrize("layout", [["parallel.tp=2"],
                                    ["parallel.pp=2", "data.seq_len=64", "train.micro_batch_size=4"]])
def test_masked_update_under_tp2_and_pp2_equals_one_process(task_dir, tmp_path, layout, masked_one):
    run_ranks(2, masked_update_rank, str(task_dir), str(tmp_path / "two"), layout, str(tmp_path / "two.pt"))
    one, two = masked_one, torch.load(tmp_path / "two.pt")
    for key in ("loss", "kl", "clip_fraction", "entropy", "grad_norm", "logprob_mismatch", "mismatch_kl"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-5, abs=1e-7), key
    assert one["stats"]["grad_norm"] > 0 and one["stats"]["kl"] == 0.0   # the reference (masked too) equals the policy
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 20
    for k, v in one["grads"].items():
        scale = v.abs().max().item()
        torch.testing.assert_close(two["grads"][k], v, rtol=1e-5, atol=1e-5 * max(scale, 1e-12))
    plain, masked, targets = one["plain"]   # on the sampled tokens the masked log-probs are the larger
    counted = targets != IGNORE_INDEX
    assert (masked[counted] >= plain[counted] - 1e-6).all() and (masked[counted] > plain[counted]).any()


def test_keep_sampling_mask_without_truncation_is_refused(task_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.top_p.*rollout\.top_k") as e:
        _config(task_dir, tmp_path / "run", "grpo.keep_sampling_mask=true")
    assert "grpo.keep_sampling_mask" in str(e.value)
    cfg = _config(task_dir, tmp_path / "run", "grpo.keep_sampling_mask=true", "rollout.top_k=20")
    assert cfg.grpo.keep_sampling_mask
    with pytest.raises(ConfigError, match=r"rollout\.temperature = 0 samples greedily"):
        _config(task_dir, tmp_path / "run", "grpo.keep_sampling_mask=true", "rollout.top_k=20", "rollout.temperature=0")
