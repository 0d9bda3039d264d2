"""torch.compile of each block from outside (parallel/compile.py) on the tiny V3, on CPU.

The "aot_eager" backend traces every block through dynamo and AOTAutograd (forward and backward graphs)
and runs the traced graphs with eager kernels: it checks that the blocks trace and that the traced
program computes what the eager one does, without inductor's C++ build (minutes per block on 2 cores).
Tolerance: aot_eager runs the same aten ops in the same order, so loss and gradients agree to 1e-6
relative (they come out bit-identical here); inductor, which fuses and reorders, runs on the GPU
(benchmarks/gpu_proxy.py)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model import build_model, preset
from parallel.compile import CompileError, apply_compile
from parallel.fp8 import Fp8Recipe, apply_fp8
from parallel.recompute import apply_recompute

CFG = dict(vocab_size=512, n_layers=2, dim=128, init_std=0.02)
TOL = 1e-6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(n)


def _batch(cfg, batch=2, seq=32):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = tokens.roll(-1, 1)
    labels[:, -1] = -100
    return tokens, labels


def _run(compiled: bool, fp8: bool, recompute: str):
    cfg = preset("tiny-deepseek-v3", **CFG)
    net = build_model(cfg, seed=0).train()
    if fp8:
        apply_fp8(net, Fp8Recipe("emulate"))
    if recompute != "none":
        apply_recompute(net, recompute)
    names = list(dict(net.named_parameters()))
    paths = apply_compile(net, backend="aot_eager") if compiled else []
    assert list(dict(net.named_parameters())) == names   # nothing renamed
    out = net.loss(*_batch(cfg))
    out["loss"].backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    return out["loss"].detach(), grads, paths


@pytest.mark.parametrize("fp8,recompute", [(False, "none"), (True, "full")], ids=["bf16_path", "fp8_recompute"])
def test_compiled_blocks_match_eager(fp8, recompute):
    """Every block (the MTP module's too) compiled; same loss and gradients as the eager model, with the
    emulated FP8 recipe and full recomputation composed."""
    l0, g0, _ = _run(False, fp8, recompute)
    l1, g1, paths = _run(True, fp8, recompute)
    assert paths == ["layers.0", "layers.1", "mtp.0.block"]
    assert abs(l1 - l0).item() <= TOL * abs(l0).item()
    assert ((g1 - g0).norm() / g0.norm()).item() <= TOL


def test_refusals_name_the_fix():
    cfg = preset("tiny-deepseek-v3", **CFG)
    net = apply_recompute(build_model(cfg, seed=0), "selective")
    with pytest.raises(CompileError, match="recompute=full or none"):
        apply_compile(net)
    with pytest.raises(CompileError, match="no block"):
        apply_compile(torch.nn.Linear(4, 4))
    with pytest.raises(CompileError, match="compile mode 'fast'"):
        apply_compile(build_model(cfg, seed=0), mode="fast")


def _fsdp_rank(ref_loss: float):
    from parallel import ParallelConfig, build_mesh, init_parallel_weights, parallelize
    torch._dynamo.reset()
    cfg = preset("tiny-deepseek-v3", **CFG)
    mesh = build_mesh(ParallelConfig())
    net = parallelize(build_model(cfg, device="meta").train(), mesh, fp8=Fp8Recipe("emulate"))
    init_parallel_weights(net, mesh, seed=0)
    apply_compile(net, backend="aot_eager")
    tokens, labels = _batch(cfg)
    rank = dist.get_rank()
    out = net.loss(tokens[rank:rank + 1], labels[rank:rank + 1])
    out["loss"].backward()
    loss = out["loss"].detach().clone()
    dist.all_reduce(loss)
    loss /= dist.get_world_size()
    assert abs(loss.item() - ref_loss) <= 1e-5 * abs(ref_loss), (loss.item(), ref_loss)


@pytest.mark.slow
def test_compile_composes_with_fsdp2():
    """FSDP2 over 2 gloo ranks (dp 2), FP8 emulated, every block compiled after sharding: the mean of the
    ranks' losses equals the one-process loss of the same batch (each rank one sequence; 1e-5: the
    mean over ranks differs from the mean over the batch by fp32 rounding)."""
    cfg = preset("tiny-deepseek-v3", **CFG)
    net = build_model(cfg, seed=0).train()
    apply_fp8(net, Fp8Recipe("emulate"))
    tokens, labels = _batch(cfg)
    ref = sum(net.loss(tokens[i:i + 1], labels[i:i + 1])["loss"].item() for i in range(2)) / 2
    run_ranks(2, _fsdp_rank, ref)
