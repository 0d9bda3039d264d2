"""The rollout engine (posttrain/engine.py): continuous batching over a paged cache against the static
Generator, per-sequence sampling streams, shared prefixes with copy on write, bad input, and MTP
speculative decoding (greedy equality, the distribution by a chi-square test that catches always-accept)."""
import itertools

import pytest
import torch
import torch.distributed as dist

from model import build_model, preset
from model.transformer import IGNORE_INDEX
import posttrain.engine as engine_mod
from posttrain.engine import (TOO_LONG, Engine, StepGraphs, batch_bucket, decode_step, first_draft_step, frame,
                              keys_bucket, speculation_step, stream_uniforms)
from posttrain.generate import Generator, SamplingParams
from distributed import run_ranks
from test_generate import ToyTokenizer, _net, _prompts

LENGTHS = (7, 3, 5, 1, 12, 3, 30, 2, 9, 3)   # long-tailed, and prompt 5 repeats prompt 1 (a shared prefix)


def _mixed(cfg):
    prompts = _prompts(cfg, LENGTHS)
    prompts[5] = list(prompts[1])
    return prompts


def _stop_params(net, cfg, prompts):
    """Greedy params whose stop strings, read off the greedy completions, end some completions early: a
    long-tailed mix of lengths."""
    tok = ToyTokenizer(cfg.vocab_size)
    free, _ = Generator(net, tok, pad_id=3).generate(prompts, SamplingParams(max_new_tokens=16, temperature=0))
    stop = [tok.decode(free[3].ids[1:3]), tok.decode(free[2].ids[6:8]), tok.decode(free[8].ids[3:5])]
    return SamplingParams(max_new_tokens=16, temperature=0, stop=stop)


def _teach_mtp(net, cfg, steps=60):
    """Fit the MTP module to the model's own greedy continuations (self-distillation), so that a random
    model's drafts are accepted often enough to exercise multi-token verify steps."""
    prompts = _prompts(cfg, [4] * 16, seed=7)
    outs, _ = Engine(net, ToyTokenizer(cfg.vocab_size), pad_id=3).generate(
        prompts, SamplingParams(max_new_tokens=40, temperature=0))
    n = min(len(q) + len(c.ids) for q, c in zip(prompts, outs))
    seqs = torch.tensor([(q + c.ids)[:n] for q, c in zip(prompts, outs)])
    labels = seqs.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    mtp = {id(p) for p in net.mtp.parameters()}
    for p in net.parameters():
        p.requires_grad_(id(p) in mtp)
    opt = torch.optim.Adam(net.mtp.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        net.loss(seqs, labels)["mtp_loss"].backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(True)
    return net.eval()


def _assert_same(ref, outs):
    for r, o in zip(ref, outs):
        assert (o.ids, o.finish, o.text) == (r.ids, r.finish, r.text)
        # the static engine rounds fp64 logits to fp32 before log_softmax, as the engine does
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(r.logprobs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-deepseek-llm-7b"])
def test_continuous_batching_equals_static_engine(name):
    """Tokens, log-probs, finishes and texts equal the static engine's at T = 0, with sequences leaving and
    waiting prompts joining (max_batch 3), pages of 4 (a prompt spans several), prefixes shared or not."""
    net, cfg = _net(name)
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _mixed(cfg)
    params = _stop_params(net, cfg, prompts)
    ref, _ = Generator(net, tok, pad_id=3).generate(prompts, params)
    assert {c.finish for c in ref} == {"stop", "length"} and len({len(c.ids) for c in ref}) > 3
    for kw in (dict(), dict(max_batch=3, page_size=4), dict(max_batch=4, page_size=3, share_prefix=False)):
        outs, stats = Engine(net, tok, pad_id=3, **kw).generate(prompts, params)
        _assert_same(ref, outs)
        assert stats["tokens"] == sum(len(c.ids) for c in ref) and stats["skipped"] == 0


def test_sampled_tokens_do_not_depend_on_the_batch():
    """With per-sequence seeds, a sequence samples the same tokens alone, in a full batch, or in a small
    batch that it joins late; and its recorded log-probs are the training path's."""
    net, cfg = _net()
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _mixed(cfg)
    seeds = [100 + i for i in range(len(prompts))]
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50)
    full, _ = Engine(net, tok, pad_id=3).generate(prompts, params, seeds=seeds)
    small, _ = Engine(net, tok, pad_id=3, max_batch=2, page_size=4).generate(prompts[::-1], params, seeds=seeds[::-1])
    assert [c.ids for c in small[::-1]] == [c.ids for c in full]
    for i in (0, 6, 9):
        alone, _ = Engine(net, tok, pad_id=3).generate([prompts[i]], params, seeds=[seeds[i]])
        assert alone[0].ids == full[i].ids
    assert full[1].ids != full[5].ids   # the same prompt, its own stream
    c = full[6]
    seq = torch.tensor([c.prompt_ids + c.ids])
    targets = seq.roll(-1, 1)
    targets[0, -1] = IGNORE_INDEX
    lp = net.token_logprobs(seq, targets, temperature=0.9)["logprobs"][0, len(c.prompt_ids) - 1:-1]
    torch.testing.assert_close(lp, torch.tensor(c.logprobs, dtype=lp.dtype), rtol=1e-6, atol=1e-6)


def test_speculative_samples_do_not_depend_on_the_batch():
    """With drafts too (two per step, T > 0): a sequence samples the same alone or in any batch, with
    sequences leaving and joining (their batch slots, block-table rows and pending hidden states reused), pages
    of 4 (a verify step spans two), and the last steps drafting less than draft_tokens."""
    net, cfg = _net()
    _teach_mtp(net, cfg)
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _mixed(cfg)
    seeds = [100 + i for i in range(len(prompts))]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, stop=["A", "B"])
    kw = dict(pad_id=3, draft_tokens=2)
    full, stats = Engine(net, tok, **kw).generate(prompts, params, seeds=seeds)
    assert 0 < stats["acceptance"] < 1 and len({len(c.ids) for c in full}) > 2
    small, _ = Engine(net, tok, max_batch=3, page_size=4, **kw).generate(prompts[::-1], params, seeds=seeds[::-1])
    assert [c.ids for c in small[::-1]] == [c.ids for c in full]
    for i in (0, 6):
        alone, _ = Engine(net, tok, **kw).generate([prompts[i]], params, seeds=[seeds[i]])
        assert alone[0].ids == full[i].ids


def test_shared_prefix_prefills_once_and_copies_on_write():
    """A group of G samples prefills its prompt once; the children diverge in private copies of the
    prompt's last page, so each gets what it would alone (a missing copy would let siblings overwrite
    each other's slots)."""
    net, cfg = _net()
    tok = ToyTokenizer(cfg.vocab_size)
    prompt = _prompts(cfg, (10,))[0]           # pages of 4: two full pages and a shared partial one
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    seeds = [7, 8, 9, 10]
    shared, s1 = Engine(net, tok, page_size=4).generate([prompt] * 4, params, seeds=seeds)
    alone, s2 = Engine(net, tok, page_size=4, share_prefix=False).generate([prompt] * 4, params, seeds=seeds)
    assert [c.ids for c in shared] == [c.ids for c in alone]
    assert len({tuple(c.ids) for c in shared}) == 4
    assert s1["prefill_tokens"] == 10 and s2["prefill_tokens"] == 40
    # a pool that holds the shared prefix and 4 children but not 4 whole sequences (21): the group fits
    pages = 1 + 3 + 4 * 2 + 3    # scratch, the prompt's 3, 2 fresh per child, and 3 children copy the 3rd
    outs, _ = Engine(net, tok, page_size=4, n_pages=pages).generate([prompt] * 4, params, seeds=seeds)
    assert [c.ids for c in outs] == [c.ids for c in alone]
    # one page short: the group is split, and its last child prefills again later; the same samples
    outs, s3 = Engine(net, tok, page_size=4, n_pages=pages - 1).generate([prompt] * 4, params, seeds=seeds)
    assert [c.ids for c in outs] == [c.ids for c in alone] and s3["prefill_tokens"] == 20


def test_bad_input_is_reported():
    net, cfg = _net()
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _prompts(cfg, (5, cfg.max_seq_len - 3, 4))
    params = SamplingParams(max_new_tokens=6, temperature=0)
    outs, stats = Engine(net, tok, pad_id=3).generate(prompts, params)
    assert outs[1].finish == TOO_LONG and outs[1].ids == [] and outs[1].prompt_ids == prompts[1]
    assert stats["skipped"] == 1
    ref, _ = Generator(net, tok, pad_id=3).generate([prompts[0], prompts[2]], params)
    _assert_same(ref, [outs[0], outs[2]])
    with pytest.raises(ValueError, match="page budget of 2 pages .* needs 3 pages; raise n_pages to at least 4"):
        Engine(net, tok, page_size=4, n_pages=2).generate([prompts[0]], params)
    dense, dcfg = _net("tiny-deepseek-llm-7b")
    with pytest.raises(ValueError, match="no MTP module"):
        Engine(dense, ToyTokenizer(dcfg.vocab_size), draft_tokens=1)
    with pytest.raises(ValueError, match="no MTP module"):
        dense.draft(torch.zeros(1, 1, dcfg.dim), torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 1), None, None)
    with pytest.raises(ValueError, match="at least one token"):
        Engine(net, tok).generate([[1], []], params)


@pytest.mark.parametrize("name,kw", [("tiny-deepseek-v3", {}), ("tiny-deepseek-llm-7b", dict(n_mtp=1))])
def test_speculative_greedy_equals_plain_decoding(name, kw):
    """At T = 0 speculation emits the model's greedy tokens, whatever the drafts: one draft per step and a
    chain of three, sequences joining and leaving, stops inside an accepted run."""
    net, cfg = _net(name, **kw)
    _teach_mtp(net, cfg)
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _mixed(cfg)
    params = _stop_params(net, cfg, prompts)
    ref, _ = Generator(net, tok, pad_id=3).generate(prompts, params)
    for ekw in (dict(draft_tokens=1), dict(draft_tokens=3, max_batch=3, page_size=4)):
        outs, stats = Engine(net, tok, pad_id=3, **ekw).generate(prompts, params)
        _assert_same(ref, outs)
        # drafts accepted and rejected at every position (chance would be 1/256): runs of all three accepted
        assert 0.1 < stats["acceptance"] < 1 and len(stats["acceptance_per_position"]) == ekw["draft_tokens"]
        assert all(a > 0 for a in stats["acceptance_per_position"])


class _NoEod:
    eod_id, bos_id = 99, None   # never sampled: every sample is exactly max_new_tokens long

    def decode(self, ids):
        return "".join(chr(65 + i) for i in ids)


def _chi_square_pvalue(outs, joint: torch.Tensor, vocab: int) -> float:
    """P-value of the first three tokens' counts against the model's joint distribution (cells with
    fewer than 5 expected pooled)."""
    idx = torch.tensor([(c.ids[0] * vocab + c.ids[1]) * vocab + c.ids[2] for c in outs])
    obs = torch.bincount(idx, minlength=vocab ** 3).double()
    exp = joint * len(outs)
    big = exp >= 5
    o = torch.cat([obs[big], obs[~big].sum()[None]])
    e = torch.cat([exp[big], exp[~big].sum()[None]])
    stat = ((o - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((len(o) - 1) / 2, dtype=torch.float64), stat / 2))


def test_speculative_sampling_keeps_the_model_distribution():
    """Chi-square, fixed seeds: 3000 speculative samples (two drafts per step, T = 1) of a 5-token vocabulary
    follow the model's exact joint distribution of three tokens; replacing the acceptance rule by
    always-accept (the drafts' distribution) fails the same test."""
    vocab = 5
    net = build_model(preset("tiny-deepseek-v3", vocab_size=vocab), dtype=torch.float64, seed=0).eval()
    with torch.no_grad():   # peaked distributions, and a draft that disagrees with the model
        net.head.weight.mul_(40)
        net.mtp[0].norm.weight.mul_(-1)
    prompt = [1, 2, 3]
    seqs = torch.tensor([prompt + list(c) for c in itertools.product(range(vocab), repeat=3)])
    with torch.no_grad():
        lp = net(seqs).log_softmax(-1)
    joint = sum(lp[:, 2 + j].gather(1, seqs[:, 3 + j:4 + j])[:, 0] for j in range(3)).exp()
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    engine = Engine(net, _NoEod(), pad_id=1, draft_tokens=2, max_batch=3000)
    outs, stats = engine.generate([prompt] * 3000, params, seed=0)
    assert _chi_square_pvalue(outs, joint, vocab) > 0.01
    assert 0.05 < stats["acceptance_per_position"][0] < 0.95      # the rule both accepts and rejects
    engine.accept = lambda p, q, u: torch.ones_like(p, dtype=torch.bool)
    outs, stats = engine.generate([prompt] * 3000, params, seed=0)
    assert _chi_square_pvalue(outs, joint, vocab) < 1e-6 and stats["acceptance"] == 1


def parallel_rollout_rank(kw: dict, expect: list, params: SamplingParams, seeds: list[int]):
    import parallel
    cfg = preset("tiny-deepseek-v3")
    mesh = parallel.build_mesh(parallel.ParallelConfig(**kw), "cpu")
    net = parallel.parallelize(build_model(cfg, device="meta", dtype=torch.float64), mesh)
    parallel.init_parallel_weights(net, mesh, seed=0)
    prompts, r = _mixed(cfg), dist.get_rank()
    if "ep" in kw:   # each rank its own prompts: different schedules, every forward still entered by both
        prompts, seeds, expect = prompts[:6] if r == 0 else prompts[6:], seeds[:6] if r == 0 else seeds[6:], \
            expect[:6] if r == 0 else expect[6:]
    outs, _ = Engine(net, ToyTokenizer(cfg.vocab_size), pad_id=3, max_batch=3, page_size=4,
                     draft_tokens=2).generate(prompts, params, seeds=seeds)
    assert [c.ids for c in outs] == expect


@pytest.mark.parametrize("kw", [dict(tp=2), dict(ep=2)])
def test_rollout_under_tp_and_ep_equals_one_process(kw):
    """tp2: every rank runs the same schedule (heads and vocabulary split, logits gathered). ep2: the ranks
    hold different prompts (6 and 4, lengths and stops differing) and so different schedules, and a rank with
    nothing to run feeds a scratch token into every forward the other needs. Both sample what one process
    samples, speculation and shared prefixes included."""
    net, cfg = _net()
    prompts = _mixed(cfg)
    params = SamplingParams(max_new_tokens=16, temperature=0.8, stop=["A", "B", "C"])   # ~5% of tokens stop
    seeds = list(range(len(LENGTHS)))
    engine = Engine(net, ToyTokenizer(cfg.vocab_size), pad_id=3, max_batch=3, page_size=4, draft_tokens=2)
    if "ep" in kw:
        ref = engine.generate(prompts[:6], params, seeds=seeds[:6])[0] + engine.generate(prompts[6:], params,
                                                                                          seeds=seeds[6:])[0]
    else:
        ref = engine.generate(prompts, params, seeds=seeds)[0]
    assert len({len(c.ids) for c in ref}) > 2
    run_ranks(2, parallel_rollout_rank, kw, [c.ids for c in ref], params, seeds)


def test_compiled_steps_equal_eager(traced):
    """Engine(compile=True) and Generator(compile=True) (benchmarks/rollout.py): the decode, speculation-step
    and draft forwards trace (paged caches, the dense MoE inference path, symbolic batch and context) and give
    the eager tokens at T = 0, and at T = 0.8 with top-p the eager samples, with sequences leaving and joining.
    Traced by dynamo and run by eager kernels here (the "eager" backend): inductor's C++ build takes minutes on a
    small CPU, and the benchmark checks its tokens against the eager static engine's."""
    net, cfg = _net()
    _teach_mtp(net, cfg)
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _mixed(cfg)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    ref, _ = Generator(net, tok, pad_id=3).generate(prompts, params)
    outs, _ = Generator(net, tok, pad_id=3, compile=True).generate(prompts, params)
    _assert_same(ref, outs)
    for kw in (dict(max_batch=4, page_size=4), dict(max_batch=4, draft_tokens=2)):
        outs, stats = Engine(net, tok, pad_id=3, compile=True, **kw).generate(prompts, params)
        _assert_same(ref, outs)
    # sampled decode and speculation steps (uniforms drawn up front; acceptance and draws inside the program)
    sampled, seeds = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9), list(range(len(prompts)))
    for kw in (dict(pad_id=3, max_batch=4), dict(pad_id=3, max_batch=4, draft_tokens=2)):
        ref, _ = Engine(net, tok, **kw).generate(prompts, sampled, seeds=seeds)
        outs, stats = Engine(net, tok, compile=True, **kw).generate(prompts, sampled, seeds=seeds)
        _assert_same(ref, outs)
    assert 0 < stats["acceptance"] < 1
    assert set(traced._COMPILED) == {type(net).forward, type(net).decode, type(net).draft, decode_step,
                                     speculation_step, first_draft_step}


def test_buckets():
    assert [batch_bucket(n, 128) for n in (1, 2, 3, 5, 8, 9, 16, 17, 33, 120, 128)] == [1, 2, 4, 8, 8, 16, 16, 32,
                                                                                        48, 128, 128]
    assert batch_bucket(9, 12) == 12 and batch_bucket(3, 3) == 3
    assert [keys_bucket(n, 16, 256) for n in (1, 16, 17, 100, 200, 256)] == [16, 16, 32, 128, 256, 256]
    assert keys_bucket(300, 16, 300) == 300


def test_bucketed_steps_equal_unpadded(monkeypatch, traced):
    """Engine(buckets=True), the shapes CUDA graphs are recorded for: every step padded with zero rows to its batch
    bucket and its keys to a power of two pages. Padding rows write only the scratch page and are cut off, padded
    keys are masked, so the tokens, log-probs and finishes equal the unpadded engine's: at T = 0 with stops,
    at T = 0.8 with top-p (per-sequence streams), plain and speculating (first drafts, verify, chained drafts),
    batches of 10 prompts leaving and joining (buckets 1 to 16), and traced by dynamo (symbolic shapes)."""
    net, cfg = _net()
    _teach_mtp(net, cfg)
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _mixed(cfg)
    seeds = [100 + i for i in range(len(prompts))]
    greedy = _stop_params(net, cfg, prompts)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9)
    padded = []
    launch = Engine._launch

    def spy(self, fn, rows, keys, **fixed):   # the padding actually happens: batch and keys both grow
        out = launch(self, fn, rows, keys, **fixed)
        b = rows["tokens"].shape[0]
        padded.append((batch_bucket(b, self.max_batch) > b, keys_bucket(keys, self.page_size, self.max_seq_len) > keys))
        return out

    monkeypatch.setattr(Engine, "_launch", spy)
    for params in (greedy, sampled):
        for kw in (dict(), dict(draft_tokens=2), dict(draft_tokens=3, max_batch=5, page_size=4)):
            ref, _ = Engine(net, tok, pad_id=3, **kw).generate(prompts, params, seeds=seeds)
            outs, stats = Engine(net, tok, pad_id=3, buckets=True, **kw).generate(prompts, params, seeds=seeds)
            _assert_same(ref, outs)
            assert "graphs" not in stats   # no CUDA device: padded, not replayed
    assert any(b for b, _ in padded) and any(k for _, k in padded)
    ref, _ = Engine(net, tok, pad_id=3, draft_tokens=2).generate(prompts, sampled, seeds=seeds)
    outs, _ = Engine(net, tok, pad_id=3, draft_tokens=2, compile=True, buckets=True).generate(prompts, sampled,
                                                                                             seeds=seeds)
    _assert_same(ref, outs)


class _Replayed(StepGraphs):
    """StepGraphs with the CUDA capture replaced by running the program again into the first run's output
    tensors, as a replayed graph writes them: on a CPU it checks everything around the capture (the static inputs
    refilled and padded every step, one entry per shape, every output read before its graph replays again, the
    pool and its graphs kept between calls, nothing read from a module attribute the program sets)."""

    def record(self, fn, static: dict, fixed: dict):
        out = fn(**static, **fixed)
        moe = fixed["model"].trunk_moe_layers()

        def replay():
            kept = [m.routes for m in moe]
            for o, new in zip(out, fn(**static, **fixed)):
                if o is not None:
                    o.copy_(new)
            for m, routes in zip(moe, kept):   # a replay runs no Python: it sets no module attribute
                m.routes = routes
        return replay, out


def graph_replays_equal_eager(net, cfg, draft_tokens: int, **kw):
    """An engine replaying step graphs gives the eager engine's tokens, log-probs and finishes at T = 0 (with
    stops) and its seeded samples at T = 0.8 with top-p, sequences leaving and joining; a second call on the same
    engine replays without recording, a smaller one reuses the kept pool, and `release` frees them."""
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _mixed(cfg)
    seeds = [100 + i for i in range(len(prompts))]
    for params in (_stop_params(net, cfg, prompts), SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9)):
        ref, _ = Engine(net, tok, pad_id=3, draft_tokens=draft_tokens).generate(prompts, params, seeds=seeds)
        engine = Engine(net, tok, pad_id=3, draft_tokens=draft_tokens, compile=True, **kw)
        outs, stats = engine.generate(prompts, params, seeds=seeds)
        _assert_same(ref, outs)
        assert 0 < stats["graphs"] < stats["graph_replays"]
        pool = engine.kept[0]
        again, stats2 = engine.generate(prompts, params, seeds=seeds)
        _assert_same(ref, again)
        assert stats2["graphs"] == stats["graphs"] and stats2["graph_replays"] == 2 * stats["graph_replays"]
        few, _ = engine.generate(prompts[:3], params, seeds=seeds[:3])
        _assert_same(ref[:3], few)
        assert engine.kept[0] is pool
        engine.release()
        assert engine.kept is None


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_graph_replay_around_the_capture(monkeypatch, traced, draft_tokens):
    """What the engine does around a CUDA graph capture, on a CPU (`_Replayed`; tests/test_rollout_cuda.py runs
    the same check with real graphs on a GPU)."""
    monkeypatch.setattr(engine_mod, "StepGraphs", _Replayed)
    monkeypatch.setattr(Engine, "_graphed", lambda self: self.bucketed and self.compile)
    net, cfg = _net()
    _teach_mtp(net, cfg)
    graph_replays_equal_eager(net, cfg, draft_tokens, buckets=True)   # on a CPU buckets default to off


def fsdp_compile_rank():
    from parallel import ParallelConfig, build_mesh, parallelize
    cfg = preset("tiny-deepseek-v3")
    net = parallelize(build_model(cfg), build_mesh(ParallelConfig()), param_dtype=torch.bfloat16)   # FSDP2 at 1 rank
    with pytest.raises(ValueError, match="this model is an FSDP2 module, whose hooks do not trace"):
        Engine(net, ToyTokenizer(cfg.vocab_size), compile=True)
    Engine(net, ToyTokenizer(cfg.vocab_size))   # eager: fine


def test_compiled_steps_refuse_an_fsdp2_module():
    """A compiled step traces the model whole, and FSDP2's hooks do not trace: a clear error up front, not a
    dynamo failure in the first step."""
    run_ranks(1, fsdp_compile_rank)


def test_chain_cache_sees_what_a_page_write_would():
    """Chained drafts inside the speculation step's program (`speculation_step`) put their keys into a gathered copy
    (`ChainCache`) instead of the pages: each chained position must read exactly what writing the pages and
    gathering them again reads, the earlier chained positions' values included."""
    from posttrain.engine import ChainCache, PagedCache

    class Pages(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("kv", torch.randn(6, 4, 3))   # 6 pages of 4 positions, width 3
            self.register_buffer("pe", torch.randn(6, 4, 2))

    torch.manual_seed(0)
    pages, P = Pages(), 4
    table = torch.tensor([[2, 5, 0], [1, 3, 4]])              # two sequences' block tables (0: scratch)
    keys = 11
    gather = (table[:, :, None] * P + torch.arange(P)).flatten(1)[:, :keys]
    chain = ChainCache(PagedCache(dict(pages.named_buffers()), torch.zeros(2, 1, dtype=torch.long), gather))
    written, before = Pages(), {k: v.clone() for k, v in pages.state_dict().items()}
    written.load_state_dict(pages.state_dict())
    for pos in ([5, 9], [6, 10], [6, 10]):                     # the last: clamped to the limit, rewritten
        pos = torch.tensor(pos)
        slots = (table.gather(1, (pos // P)[:, None]) * P + (pos % P)[:, None])
        ref = PagedCache(dict(written.named_buffers()), slots, gather)
        for name, width in (("kv", 3), ("pe", 2)):
            value = torch.randn(2, 1, width)
            chain.pos = pos
            torch.testing.assert_close(chain.write(name, 0, value), ref.write(name, 0, value), rtol=0, atol=0)
    assert torch.equal(pages.kv, before["kv"]) and torch.equal(pages.pe, before["pe"])   # no page written


def test_stream_uniforms_are_per_sequence_uniform_and_independent():
    """The engine's counter-based streams: a row's uniforms depend on its seed and draw count alone (the same
    alone, in a batch, or drawn in pieces), lie in [0, 1), are uniform (chi-square over 64 bins), and
    neighbouring seeds and consecutive draws are uncorrelated; a hash that let seed and counter collide
    (u = (seed + count) mod 1) would fail the correlation check."""
    seeds = torch.tensor([0, 1, 2, 1_000_003, 2 ** 62 + 5, 7 * 1_000_003 + 3])
    rng = torch.stack([seeds, torch.zeros_like(seeds)], 1)
    u = stream_uniforms(rng, 4000)
    assert u.dtype == torch.float32 and u.shape == (6, 4000) and 0 <= u.min() and u.max() < 1
    for i in range(6):   # alone and in pieces: the same draws
        alone = stream_uniforms(rng[i:i + 1], 4000)[0]
        pieces = torch.cat([stream_uniforms(torch.tensor([[int(seeds[i]), c]]), 1000)[0] for c in (0, 1000, 2000,
                                                                                                     3000)])
        assert torch.equal(alone, u[i]) and torch.equal(pieces, u[i])
    counts = torch.histc(u.double().flatten(), bins=64, min=0, max=1)
    stat = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert float(torch.special.gammaincc(torch.tensor(63 / 2, dtype=torch.float64), stat / 2)) > 1e-3
    def worst_correlation(v):   # neighbouring seeds at the same and the next draw; one seed's consecutive draws
        x = (v - v.mean()) / v.std()
        return max(float((x[:-1] * x[1:]).mean(1).abs().max()), float((x[:-1, 1:] * x[1:, :-1]).mean(1).abs().max()),
                   float((x[:, :-1] * x[:, 1:]).mean(1).abs().max()))
    assert worst_correlation(u) < 0.05
    # seed s's draw c + 1 equals seed s + 1's draw c in a stream that adds seed and counter: the check sees it
    assert worst_correlation(((seeds[:, None] + torch.arange(4000)) * 0.618034) % 1.0) > 0.5


def test_frame_indices_equal_a_loop_over_positions():
    """`frame`, which the decode and speculation programs build their cache indices with: for chunks of s tokens
    at each row's start (rows right-padded to lens), the write slot of position p is page table[p // P] at p % P,
    padding writes go to the scratch slot 0, the gather of key t reads table[t // P] at t % P, and the mask lets
    a real query see keys up to its own position (padding: key 0 only). A row whose table is shorter than the
    keys (the scratch row of an idle rank, drafting past a page) reads its last page instead of failing."""
    P, cols = 4, 6
    g = torch.Generator().manual_seed(0)
    table = torch.randint(1, 50, (3, cols), generator=g)
    start, lens, s, keys = torch.tensor([0, 5, 9]), torch.tensor([3, 1, 2]), 3, 13
    pages = [{"kv": torch.zeros(50, P, 2)}]
    pos, mask, (cache,) = frame(table, start, s, keys, pages, lens)
    slots, gather = cache.slots.view(3, s), cache.gather.view(3, keys)
    for b in range(3):
        for j in range(s):
            p = int(start[b]) + j
            real = j < int(lens[b])
            assert int(pos[b, j]) == p
            assert int(slots[b, j]) == (int(table[b, p // P]) * P + p % P if real else 0)
            assert mask[b, j].tolist() == [(t <= p) if real else t == 0 for t in range(keys)]
        assert gather[b].tolist() == [int(table[b, t // P]) * P + t % P for t in range(keys)]
    short = torch.tensor([[0]])
    _, _, (cache,) = frame(short, torch.tensor([0]), 1, 2 * P + 1, pages)
    assert cache.gather.tolist() == [t % P for t in range(2 * P + 1)]


def test_step_benchmark_replays_captured_steps(traced, tmp_path):
    """benchmarks/rollout_steps.py on a small run (dynamo traced, eager kernels): it captures real decode and
    speculation steps of the engine, replays them through the compiled programs and writes its rows."""
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import rollout_steps
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "steps.json"
        rollout_steps.main(["--train-steps", "20", "--prompts", "2", "--group", "4", "--max-len", "12",
                            "--batches", "4", "8", "--repeats", "1", "--calls", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["equal_to_static"] and result["rows"] and 1 <= result["tokens_per_verify_step"] <= 4
    for want, row in result["rows"].items():
        assert int(want) // 2 < row["batch_decode"] <= int(want) and row["ms_speculation_step"] > 0
        # a 3-draft step runs the trunk over 4 tokens a row: at least twice a decode step's matmul FLOPs a row
        spec = row["gflop_speculation_step"] / row["batch_speculation"]
        assert spec > 2 * row["gflop_decode_step"] / row["batch_decode"] > 0
    roof = result["roofline"]
    assert roof["gemm_tflops"] > 0 and roof["memory_tb_per_s"] > 0 and roof["weight_bytes"] > 0


def test_rollout_benchmark_runs_its_sections(tmp_path):
    """benchmarks/rollout.py on a small run (eager), the sections the GPU run uses: its rows, each engine's T = 0
    tokens asserted equal to the static engine's inside, and the JSON's headline fields."""
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import rollout
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "rollout.json"
        rollout.main(["--train-steps", "20", "--prompts", "2", "--group", "4", "--max-len", "12", "--repeats", "1",
                      "--no-compile", "--sections", "greedy", "small", "--draft-tokens", "1", "2", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    rows = result["temperature_0"]["rows"]
    assert set(rows) == {"static", "continuous", "shared_prefix", "speculative_k1", "speculative_k2"}
    assert all(row["equal_to_static"] == 1 for name, row in rows.items() if name != "static")
    assert result["speculative_draft_tokens"] in (1, 2) and 0 <= result["acceptance"] <= 1
    assert "speedup_speculative_small_batch" in result and "memory_bound_temperature_0" not in result
    assert result["device"] == "cpu" and result["model"]["dim"] == 128 and "partial" not in result   # finished
