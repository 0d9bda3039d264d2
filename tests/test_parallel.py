"""Parallel I: every layout equals one process (gloo ranks on CPU, fp32).

Each rank builds the single-process reference itself (same seed, data and weights), runs the
parallel model on its share, and compares the loss, every gradient (gathered to global tensors)
and the parameters after 3 AdamW steps with gradient clipping and the expert-bias update.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model import build_model, preset
from model.transformer import IGNORE_INDEX
import parallel
from parallel import ParallelConfig, build_mesh, parallelize

BATCH, SEQ, STEPS = 4, 16, 3


def _data(cfg, step: int, batch: int = BATCH, seq: int = SEQ):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return tokens, labels


def _close(got, want, what: str, tol: float = 1e-5):
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def equivalence_rank(name: str, layout: dict, micro: int = 1, meta_init: bool = True):
    """fp32: loss and gradients of the first step. fp64: loss and gradients of every step and the
    parameters after 3 AdamW steps. (In fp32, Adam's g / (sqrt(v) + eps) turns the last-bit
    differences of a different summation order in near-zero gradients into visible parameter
    differences; in fp64 the same comparison is exact to ~1e-12, so it checks the logic.)"""
    mesh = build_mesh(ParallelConfig(**layout))
    _equivalence(name, mesh, torch.float32, 1, micro, meta_init)
    _equivalence(name, mesh, torch.float64, STEPS, micro, meta_init)


def _equivalence(name, mesh, dtype, steps, micro, meta_init):
    torch.manual_seed(0)
    cfg = preset(name)
    dims = mesh.dims
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    ref = build_model(cfg, seed=0, dtype=dtype).train()
    ref.set_expert_placement(dims.ep, dims.ep // dims.ep_nodes)
    if meta_init:  # built on meta, initialised shard by shard
        net = parallelize(build_model(cfg, device="meta", dtype=dtype).train(), mesh)
        parallel.init_parallel_weights(net, mesh, seed=0)
    else:  # a materialised model, sliced
        net = parallelize(build_model(cfg, seed=0, dtype=dtype).train(), mesh)
    params = parallel.full_state(net, mesh)
    for k, v in ref.state_dict().items():
        if k in params:
            assert torch.equal(params[k], v), f"initialisation differs: {k}"
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    d, n_dp = mesh.dims.coords(mesh.rank)["dp"], dims.dp
    for step in range(steps):
        tokens, labels = _data(cfg, step)
        ropt.zero_grad()
        rout = ref.loss(tokens, labels)
        rout["loss"].backward()
        opt.zero_grad()
        rows = tokens.shape[0] // n_dp
        mine = slice(d * rows, (d + 1) * rows)
        losses = []
        for m in range(micro):  # gradient accumulation over micro-batches of this rank's rows
            part = slice(mine.start + m * rows // micro, mine.start + (m + 1) * rows // micro)
            out = net.loss(tokens[part], labels[part])
            (out["loss"] / micro).backward()
            losses.append({k: v.detach() for k, v in out.items()})
        parallel.finish_grad_sync(net, mesh)
        if True:
            for key in rout:
                got = sum(l[key] for l in losses) / micro
                dist.all_reduce(got)
                _close(got / dims.world, rout[key].detach(), f"{key}", tol)
            grads = parallel.full_state(net, mesh, grads=True)
            for k, p in ref.named_parameters():
                assert grads[k] is not None, f"no gradient for {k}"
                _close(grads[k], p.grad, f"grad {k}", tol)
        rnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        norm = parallel.clip_grad_norm_(net, 1.0, mesh)
        _close(norm.to(rnorm.dtype), rnorm, "grad norm", tol)
        ropt.step()
        opt.step()
        ref.update_expert_bias()
        parallel.update_expert_bias(net, mesh)
    if dtype == torch.float64:
        params = parallel.full_state(net, mesh)
        for k, p in ref.named_parameters():
            _close(params[k], p.detach(), f"param after {steps} steps {k}", tol)
    for (k, b), (k2, b2) in zip(ref.named_buffers(), net.named_buffers()):
        if k.endswith("gate.bias"):
            assert k == k2 and torch.equal(b, b2), f"expert bias {k}"


LAYOUTS = {
    "tp2": (2, dict(tp=2)),
    "tp2_sp": (2, dict(tp=2, sp=True)),
    "ep2": (2, dict(ep=2)),
    "ep4": (4, dict(ep=4)),
    "dp2": (2, dict()),
    "tp2_ep2": (2, dict(tp=2, ep=2, sp=True)),
    "dp2_tp2_ep2": (8, dict(tp=2, ep=2, sp=True)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tiny_v3_equals_one_process(layout):
    world, kw = LAYOUTS[layout]
    run_ranks(world, equivalence_rank, "tiny-deepseek-v3", kw)


DENSE = {
    "llama_tp2": ("tiny-llama-3-8b", 2, dict(tp=2)),
    "llama_tp2_sp": ("tiny-llama-3-8b", 2, dict(tp=2, sp=True)),
    "llama_tp4_kv_replicated": ("tiny-llama-3-8b", 4, dict(tp=4)),   # 2 KV heads on 4 ranks
    "llama_dp2_tp2": ("tiny-llama-3-8b", 4, dict(tp=2, sp=True)),
    "qwen_tied_bias_tp4": ("tiny-qwen2.5-1.5b", 4, dict(tp=4, sp=True)),
    "qwen_dp2": ("tiny-qwen2.5-1.5b", 2, dict()),
}


@pytest.mark.parametrize("case", list(DENSE))
def test_dense_gqa_equals_one_process(case):
    name, world, kw = DENSE[case]
    run_ranks(world, equivalence_rank, name, kw)


def test_gradient_accumulation_and_sliced_init():
    """dp2 (FSDP2) with 2 micro-batches per rank, from a materialised model that is sliced."""
    run_ranks(2, equivalence_rank, "tiny-deepseek-v3", dict(), 2, False)
