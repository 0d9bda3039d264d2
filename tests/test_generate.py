"""The generation engine: cached batched decoding against recomputing every step without a cache,
the sampler's truncations and distribution, stop conditions, recorded log-probs against the training
path, and tp2 / ep2 against one process."""
import math

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model import build_model, preset
from model.transformer import IGNORE_INDEX
from posttrain.generate import Generator, SamplingParams, sample_tokens


class ToyTokenizer:
    """Token i decodes to chr(65 + i % 58); end-of-document is id 0."""
    eod_id = 0
    bos_id = None

    def __init__(self, vocab):
        self.vocab_size = vocab

    def encode(self, text):
        return [ord(c) - 65 for c in text]

    def decode(self, ids):
        return "".join(chr(65 + i % 58) for i in ids)


def _net(name="tiny-deepseek-v3", dtype=torch.float64, **kw):
    cfg = preset(name, **kw)
    return build_model(cfg, dtype=dtype, seed=0).eval(), cfg


def _prompts(cfg, lens=(7, 3, 5, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-deepseek-llm-7b"])
def test_greedy_cached_batch_equals_uncached_loop(name):
    net, cfg = _net(name)
    prompts = _prompts(cfg)
    outs, stats = Generator(net, ToyTokenizer(cfg.vocab_size), pad_id=3).generate(
        prompts, SamplingParams(max_new_tokens=6, temperature=0), seed=0)
    for q, c in zip(prompts, outs):
        seq = list(q)
        with torch.no_grad():
            for _ in range(len(c.ids)):
                seq.append(int(net(torch.tensor([seq]))[0, -1].argmax()))
                if seq[-1] == 0:
                    break
        assert c.ids == seq[len(q):], (c.ids, seq[len(q):])
        assert c.finish == ("eod" if c.ids[-1] == 0 else "length")
    assert stats["tokens"] == sum(len(c.ids) for c in outs) and stats["tokens_per_s"] > 0


def test_recorded_logprobs_equal_training_path():
    net, cfg = _net()
    prompts = _prompts(cfg, (4, 6))
    p = SamplingParams(max_new_tokens=5, temperature=0.7, top_k=20)
    outs, _ = Generator(net, ToyTokenizer(cfg.vocab_size)).generate(prompts, p, seed=3)
    for c in outs:
        seq = torch.tensor([c.prompt_ids + c.ids])
        targets = seq.roll(-1, 1)
        targets[0, :len(c.prompt_ids) - 1] = IGNORE_INDEX
        targets[0, -1] = IGNORE_INDEX
        lp = net.token_logprobs(seq, targets, temperature=0.7)["logprobs"][0, len(c.prompt_ids) - 1:-1]
        torch.testing.assert_close(lp, torch.tensor(c.logprobs, dtype=lp.dtype), rtol=1e-6, atol=1e-6)


def test_sampler_truncations_and_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    g = torch.Generator().manual_seed(0)
    n = 20000

    def draw(**kw):
        return sample_tokens(logits.expand(n, -1), SamplingParams(**kw), g)[0]

    freq = torch.bincount(draw(), minlength=4).double() / n
    want = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    assert (freq - want).abs().max() < 4 * math.sqrt(0.25 / n), freq          # 4 sigma
    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert set(draw(top_p=0.7).tolist()) == {0, 1}        # 0.5 < 0.7 <= 0.75: the first two
    assert set(draw(top_p=0.5).tolist()) == {0}
    assert set(draw(top_p=0.8).tolist()) == {0, 1, 2}
    assert set(draw(temperature=0).tolist()) == {0}
    hot = torch.bincount(draw(temperature=2.0), minlength=4).double() / n   # flatter: p^(1/2) normalised
    t2 = want.sqrt() / want.sqrt().sum()
    assert (hot - t2).abs().max() < 4 * math.sqrt(0.25 / n), hot
    ids, lp = sample_tokens(logits, SamplingParams(top_k=1), g)
    assert ids.item() == 0 and lp.item() == pytest.approx(math.log(0.5))   # log-prob before truncation


def test_stop_strings_and_lengths():
    net, cfg = _net()
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _prompts(cfg, (3, 3, 3))
    free, _ = Generator(net, tok).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    # stop on the 2-character string that the first completion produces at its 3rd/4th token
    stop = tok.decode(free[0].ids[2:4])
    outs, _ = Generator(net, tok).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, stop=[stop]))
    assert outs[0].finish == "stop" and outs[0].text.endswith(stop) and len(outs[0].ids) <= 4
    assert outs[0].text == tok.decode(free[0].ids)[:outs[0].text.find(stop) + len(stop)]
    excl, _ = Generator(net, tok).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0, stop=[stop],
                                                                   include_stop=False))
    assert not excl[0].text.endswith(stop) and outs[0].text.startswith(excl[0].text)
    long_, _ = Generator(net, tok).generate(prompts, SamplingParams(max_new_tokens=2, temperature=0))
    assert all(len(c.ids) <= 2 for c in long_)
    with pytest.raises(ValueError, match="max_seq_len"):
        Generator(net, tok).generate(prompts, SamplingParams(max_new_tokens=cfg.max_seq_len))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="at least one token"):
        Generator(net, tok).generate([[]], SamplingParams())


def _params(cfg, rank: int, first_ids: list[int] | None):
    # under ep, rank 1 stops at its first token's text: it finishes steps before rank 0 and must keep
    # stepping (padding) while rank 0 still runs, or the MoE all-to-alls would hang
    stop = [ToyTokenizer(cfg.vocab_size).decode([first_ids[0]])] if first_ids else []
    return SamplingParams(max_new_tokens=6, temperature=0.8, stop=stop)


def parallel_generate_rank(kw: dict, expect: list, per_rank: bool):
    import parallel
    cfg = preset("tiny-deepseek-v3")
    mesh = parallel.build_mesh(parallel.ParallelConfig(**kw), "cpu")
    net = parallel.parallelize(build_model(cfg, device="meta", dtype=torch.float64), mesh)
    parallel.init_parallel_weights(net, mesh, seed=0)
    prompts = _prompts(cfg)
    r = dist.get_rank()
    if per_rank:   # ep: each rank its own prompts
        prompts, expect = prompts[r::2], expect[r::2]
    params = _params(cfg, r, expect[0] if per_rank and r == 1 else None)
    outs, _ = Generator(net, ToyTokenizer(cfg.vocab_size)).generate(prompts, params, seed=5)
    assert [c.ids for c in outs] == expect
    if per_rank and r == 1:
        assert outs[0].finish == "stop" and len(outs[0].ids) == 1


@pytest.mark.parametrize("kw,per_rank", [(dict(tp=2), False), (dict(ep=2), True)])
def test_generation_under_tp_and_ep_equals_one_process(kw, per_rank):
    """The same samples as one process from the same seed (under ep: the same per-rank batches)."""
    net, cfg = _net()
    prompts = _prompts(cfg)
    gen = Generator(net, ToyTokenizer(cfg.vocab_size))
    if per_rank:
        ref = [None] * len(prompts)
        first = gen.generate(prompts[1::2], _params(cfg, 0, None), seed=5)[0][0].ids
        for r in range(2):
            outs, _ = gen.generate(prompts[r::2], _params(cfg, r, first if r == 1 else None), seed=5)
            ref[r::2] = [c.ids for c in outs]
    else:
        ref = [c.ids for c in gen.generate(prompts, _params(cfg, 0, None), seed=5)[0]]
    run_ranks(2, parallel_generate_rank, kw, ref, per_rank)
