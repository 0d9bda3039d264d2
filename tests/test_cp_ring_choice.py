"""benchmarks/cp_exchange.py's ring-against-all-gather measurement computes the right thing (tiny shapes, CPU).

A ring's partial attentions (one per arriving key block, merged by log-sum-exp), with and without the
skipping of causally masked halves (Megatron-core/Transformer Engine's ring on the load-balanced layout),
and the all-gather's two prefix calls equal the runtime's one masked call over all keys, forward (by the
explicit arithmetic and by torch's fused CPU flash kernel) and in the gradients, for every rank of cp 2-4;
and the ring of cp-1 send/recv steps delivers exactly what one all-gather does (2 gloo ranks).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from parallel.context_parallel import local_positions

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import cp_exchange as X  # noqa: E402  (spawned gloo ranks import it by this name too)

HEADS, DIMS = 2, (8, 4, 6)   # small stand-ins for V3's 128 + 64 and 128


def _case(cp: int, rank: int, grad: bool = False):
    seq = 8 * cp
    q, k, v, qpos = X.ring_inputs(HEADS, seq, cp, rank, dims=DIMS, grad=grad)
    plans = dict(X.ring_order(X.attention_plans(seq, cp, rank, qpos), rank, cp), dv=DIMS[2])
    return q, k, v, plans


def test_merge_of_disjoint_key_sets_is_the_whole():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, d, generator=g) for n, d in ((5, 8), (12, 8), (12, 3)))
    whole = X.partial_attention(q, k, v)
    idx = torch.randperm(12, generator=g)
    a, b = idx[:7], idx[7:]
    o, lse = X.merge(*X.partial_attention(q, k[:, :, a], v[:, :, a]), *X.partial_attention(q, k[:, :, b], v[:, :, b]))
    torch.testing.assert_close(o, whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, whole[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole[0], torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_every_variant_equals_the_one_call(cp):
    for rank in range(cp):
        q, k, v, plans = _case(cp, rank)
        vpad = torch.nn.functional.pad(v, (0, q.shape[-1] - v.shape[-1]))
        ref = X.run_variant("one_call", q, k, v, plans)
        # the runtime's mask: the query at global position p sees keys 0..p
        assert torch.equal(plans["one_call"].isfinite().sum(-1), local_positions(8 * cp, cp, rank) + 1)
        for name in X.VARIANTS[1:] + X.FLASH:
            got = X.run_variant(name, q, k, vpad if name.startswith("flash_") else v, plans)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} cp{cp} r{rank}: {m}")


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_gradients_equal_the_one_call(cp):
    for rank in (0, cp - 1):
        q, k, v, plans = _case(cp, rank, grad=True)
        dout = torch.randn(1, HEADS, q.shape[2], DIMS[2], generator=torch.Generator().manual_seed(1))
        want = torch.autograd.grad(X.run_variant("one_call", q, k, v, plans), (q, k, v), dout)
        for name in ("ring", "ring_skip", "all_gather_skip"):
            got = torch.autograd.grad(X.run_variant(name, q, k, v, plans), (q, k, v), dout)
            for g, w, what in zip(got, want, "qkv"):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} d{what}: {m}")


def test_ring_skip_computes_only_the_visible_pairs_and_the_own_blocks_upper_triangle():
    c = 8
    for cp in (2, 3, 4):
        seq = 2 * cp * c
        for rank in range(cp):
            qpos = local_positions(seq, cp, rank)
            plans = X.attention_plans(seq, cp, rank, qpos)
            visible = int((qpos[:, None] >= torch.arange(seq)[None, :]).sum())
            pairs = sum((2 * c if rows == "all" else c) * len(kp) for rows, kp, _ in plans["ring_skip"])
            assert pairs - visible == 2 * c * (2 * c - 1) // 2, (cp, rank)


def test_ring_of_send_recv_delivers_the_all_gather(tmp_path):
    rows = X.measure_comm(2, (16,), 1, str(tmp_path / "rank.json"))   # asserts equality on every rank
    assert rows[0]["wire_bytes_per_rank"] == 8 * X.RING_WIDTH * 4
