"""The rollout engine's CUDA graphs (posttrain/engine.py StepGraphs): on a CUDA device, compiled, every decode,
speculation and first-draft step is padded to its batch and context bucket and replayed from a graph recorded on
the bucket's first use. Needs a GPU (skipped elsewhere; run on the lent H100/H200 by benchmarks/gpu_issue23.sh).

Traced by dynamo and run by eager kernels (the "eager" backend), as tests/test_rollout.py does on the CPU: the
graphs then hold eager kernels, and the benchmark (benchmarks/rollout.py --device cuda) checks inductor's."""
import pytest
import torch

from test_generate import _net
from test_rollout import _teach_mtp, graph_replays_equal_eager

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_cuda_graph_steps_equal_eager(traced, draft_tokens):
    """Replayed CUDA graphs give the eager engine's tokens, log-probs and finishes at T = 0 (with stops) and its
    seeded samples at T = 0.8 with top-p; a second call replays without recording, a smaller one reuses the kept
    pool, `release` frees them (`graph_replays_equal_eager`; buckets on by default: compiled, on CUDA)."""
    net, cfg = _net()
    _teach_mtp(net, cfg)
    graph_replays_equal_eager(net.cuda(), cfg, draft_tokens)
