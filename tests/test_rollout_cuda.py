"""The rollout engine's CUDA graphs (posttrain/engine.py StepGraphs): on a CUDA device, compiled, every decode,
speculation and first-draft step is padded to its batch and context bucket and replayed from a graph recorded on
the bucket's first use. Needs a GPU (skipped elsewhere; run on the lent H100/H200 by benchmarks/gpu_issue23.sh).

Traced by dynamo and run by eager kernels (the "eager" backend), as tests/test_rollout.py does on the CPU: the
graphs then hold eager kernels, and the benchmark (benchmarks/rollout.py --device cuda) checks inductor's."""
import pytest
import torch

from posttrain.engine import Engine
from posttrain.generate import SamplingParams
from test_generate import ToyTokenizer, _net
from test_rollout import _assert_same, _mixed, _stop_params, _teach_mtp

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_cuda_graph_steps_equal_eager(traced, draft_tokens):
    """Replayed graphs give the eager engine's tokens, log-probs and finishes at T = 0 (with stops) and its seeded
    samples at T = 0.8 with top-p, sequences leaving and joining; a second call on the same engine reuses the
    kept pool and replays without recording; `release` frees them."""
    net, cfg = _net()
    _teach_mtp(net, cfg)
    net = net.cuda()
    tok = ToyTokenizer(cfg.vocab_size)
    prompts = _mixed(cfg)
    seeds = [100 + i for i in range(len(prompts))]
    for params in (_stop_params(net, cfg, prompts),
                   SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9)):
        ref, _ = Engine(net, tok, pad_id=3, draft_tokens=draft_tokens).generate(prompts, params, seeds=seeds)
        engine = Engine(net, tok, pad_id=3, draft_tokens=draft_tokens, compile=True)   # buckets: on, on CUDA
        outs, stats = engine.generate(prompts, params, seeds=seeds)
        _assert_same(ref, outs)
        assert 0 < stats["graphs"] < stats["graph_replays"]
        again, stats2 = engine.generate(prompts, params, seeds=seeds)
        _assert_same(ref, again)
        assert stats2["graphs"] == stats["graphs"] and stats2["graph_replays"] == 2 * stats["graph_replays"]
        engine.release()
        assert engine.kept is None
