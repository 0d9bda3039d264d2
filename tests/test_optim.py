"""Optimizer, EMA and schedules: AdamW equals torch's, BF16 moments stay on its trajectory, the
FSDP2-sharded step equals one process, the EMA is asynchronous and exact, and the lr/lambda/gamma
schedules hit the papers' numbers."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed import run_ranks
from pretrain.optim import EMA, AdamW, param_groups
from pretrain.schedules import (V3_BIAS_GAMMA, V3_MTP_LAMBDA, check_lr_schedule, check_piecewise,
                                lr_at, piecewise)

LRS = [1e-3, 3e-3, 2e-3, 5e-4, 1e-3]  # a different lr every step, as the trainer sets it


def _net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 15), nn.LayerNorm(15), nn.GELU(), nn.Linear(15, 4)).to(dtype)


def _batch(step: int, dtype=torch.float32, rows: int = 8):
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(rows, 16, generator=g, dtype=dtype), torch.randn(rows, 4, generator=g, dtype=dtype)


def _train(net, opt, steps=len(LRS), dtype=torch.float32, rows=slice(None)):
    for step in range(steps):
        x, y = _batch(step, dtype)
        opt.zero_grad()
        nn.functional.mse_loss(net(x[rows]), y[rows]).backward()
        for g in opt.param_groups:
            g["lr"] = LRS[step]
        opt.step()


def test_param_groups_megatron_convention():
    groups = param_groups(_net().named_parameters(), 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and decay["param_names"] == ["0.weight", "3.weight"]
    assert no_decay["weight_decay"] == 0.0
    assert no_decay["param_names"] == ["0.bias", "1.weight", "1.bias", "3.bias"]


def test_adamw_equals_torch():
    ref, net = _net(), _net()
    ropt = torch.optim.AdamW(param_groups(ref.named_parameters(), 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    opt = AdamW(param_groups(net.named_parameters(), 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    _train(ref, ropt)
    _train(net, opt)
    assert opt.step_count == len(LRS)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6 * q.abs().max().item(), msg=name)
        state = opt.state[p]
        assert set(state) == {"exp_avg", "exp_avg_sq"} and state["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(state["exp_avg_sq"], ropt.state[q]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_adamw_bf16_moments():
    ref, net = _net(), _net()
    ropt = AdamW(param_groups(ref.named_parameters(), 0.1), lr=1e-3)
    opt = AdamW(param_groups(net.named_parameters(), 0.1), lr=1e-3, moment_dtype=torch.bfloat16)
    opt._CHUNK = 64  # several foreach chunks (the widened temporaries are bounded per chunk)
    _train(ref, ropt, steps=1)
    _train(net, opt, steps=1)
    for p, q in zip(net.parameters(), ref.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):  # step 1: the fp32 moments, rounded to bf16 on store
            assert opt.state[p][k].dtype == torch.bfloat16
            assert torch.equal(opt.state[p][k], ropt.state[q][k].to(torch.bfloat16))
    ref, net = _net(), _net()
    ropt = AdamW(param_groups(ref.named_parameters(), 0.1), lr=1e-3)
    opt = AdamW(param_groups(net.named_parameters(), 0.1), lr=1e-3, moment_dtype=torch.bfloat16)
    _train(ref, ropt)
    _train(net, opt)
    # bf16 keeps 8 significant bits (relative rounding <= 2^-9), so m / sqrt(v) moves by < ~1% and
    # each step's update (at most ~lr in size) by < 1% of lr: after n steps |diff| <= 0.01 * sum(lr).
    tol = 0.01 * sum(LRS)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert (p - q).abs().max().item() <= tol, name
        assert (p - _net().state_dict()[name]).abs().max().item() > 10 * tol  # the params did move


def test_adamw_state_api():
    net = _net()
    opt = AdamW(param_groups(net.named_parameters(), 0.1), lr=1e-3, moment_dtype=torch.bfloat16)
    opt.init_state()  # zero moments before the first step, for a checkpoint to load into
    for p in net.parameters():
        assert set(opt.state[p]) == {"exp_avg", "exp_avg_sq"}
        assert opt.state[p]["exp_avg"].shape == p.shape and not opt.state[p]["exp_avg"].any()
    frozen = net[3].bias
    _train(net, opt, steps=2)
    before = frozen.detach().clone()
    opt.zero_grad()
    nn.functional.mse_loss(net(_batch(9)[0]), _batch(9)[1]).backward()
    frozen.grad = None  # a parameter without a gradient is skipped
    opt.step()
    assert torch.equal(frozen, before) and opt.step_count == 3
    sd = opt.state_dict()  # torch's Optimizer API still works, with the shared step count
    other = AdamW(param_groups(_net().named_parameters(), 0.1), lr=1e-3, moment_dtype=torch.bfloat16)
    other.load_state_dict(sd)
    assert other.step_count == 3
    for p in other.state:
        assert other.state[p]["exp_avg"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="betas"):
        AdamW(net.parameters(), lr=1e-3, betas=(0.9, 1.0))


def _fsdp_rank(dtype_name: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dtype = getattr(torch, dtype_name)
    ref = _net(torch.float64)
    net = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (2,))
    for layer in net:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    # fp64 makes the comparison exact to rounding (in fp32, Adam's g / sqrt(v) magnifies the last
    # bits of a different gradient summation order); moments in the parameters' dtype.
    ropt = AdamW(param_groups(ref.named_parameters(), 0.1), lr=1e-3, moment_dtype=dtype)
    opt = AdamW(param_groups(net.named_parameters(), 0.1), lr=1e-3, moment_dtype=dtype)
    rank = dist.get_rank()
    _train(ref, ropt, dtype=torch.float64)
    _train(net, opt, dtype=torch.float64, rows=slice(4 * rank, 4 * rank + 4))  # each rank its half
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        assert isinstance(p, DTensor)
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-10, atol=1e-12, msg=name)
        assert opt.state[p]["exp_avg"].shape == p.to_local().shape  # local shards (15 rows: 8 + 7)
        assert opt.state[p]["exp_avg"].dtype == dtype
    ema = EMA(net.named_parameters(), decay=0.5)  # the EMA keeps local shards too
    ema.update()
    for name, p in net.named_parameters():
        assert torch.equal(ema.state()[name], p.to_local().float())
    ema.close()


def test_adamw_fsdp2_equals_one_process():
    run_ranks(2, _fsdp_rank, "float64")


def test_ema_matches_reference_and_is_asynchronous():
    net = _net()
    ema = EMA(net.named_parameters(), decay=0.9)
    with pytest.raises(ValueError, match="decay"):
        EMA(net.named_parameters(), decay=1.0)
    opt = AdamW(param_groups(net.named_parameters(), 0.1), lr=1e-2)
    ref = None
    for step in range(4):
        _train(net, opt, steps=1)
        params = {n: p.detach().clone() for n, p in net.named_parameters()}
        ref = params if ref is None else {n: 0.9 * ref[n] + 0.1 * params[n] for n in ref}
        ema.update()
    state = ema.state()
    for name, t in state.items():
        assert t.device.type == "cpu" and t.dtype == torch.float32
        torch.testing.assert_close(t, ref[name], rtol=1e-6, atol=1e-7)

    # update() only snapshots and hands the math to the worker: hold the worker and it returns.
    gate = threading.Event()
    ema._pool.submit(gate.wait)
    future = ema.update()
    assert not future.done()
    snapshot = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():  # the next optimizer step changes the parameters in place
            p.add_(1.0)
    gate.set()
    ema.wait()
    assert future.done()
    for name, t in ema.state().items():  # folded in the snapshot, not the later values
        torch.testing.assert_close(t, 0.9 * ref[name] + 0.1 * snapshot[name], rtol=1e-6, atol=1e-7)

    fresh = _net()
    ema.copy_to(fresh.named_parameters())
    for name, p in fresh.named_parameters():
        assert torch.equal(p.detach(), ema.state()[name])
    ema.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_moments_and_ema():
    net = _net().cuda()
    opt = AdamW(param_groups(net.named_parameters(), 0.1), lr=1e-3, moment_dtype=torch.bfloat16)
    ema = EMA(net.named_parameters(), decay=0.9)
    assert all(t.is_pinned() for t in ema._snap)
    ref = None
    for step in range(3):
        x, y = (t.cuda() for t in _batch(step))
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        ema.update()  # non-blocking device-to-host copies; the worker waits on the event
        params = {n: p.detach().cpu() for n, p in net.named_parameters()}
        ref = params if ref is None else {n: 0.9 * ref[n] + 0.1 * params[n] for n in ref}
    for name, t in ema.state().items():
        assert t.device.type == "cpu"
        torch.testing.assert_close(t, ref[name], rtol=1e-6, atol=1e-7)
    assert all(s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg"].is_cuda for s in opt.state.values())
    ema.close()


def test_ema_loaded_state_is_continued():
    net = _net()
    ema = EMA(net.named_parameters(), decay=0.5)
    for t in ema.state().values():  # a checkpoint loads by copying into state()
        t.fill_(2.0)
    ema.update()
    for name, p in net.named_parameters():
        torch.testing.assert_close(ema.state()[name], 0.5 * 2.0 + 0.5 * p.detach())
    ema.close()


V3 = dict(peak=2.2e-4, schedule="v3", warmup_steps=2000, min_ratio=0.0, milestones=[], factors=[])


def test_warmup_is_linear_and_first():
    kw = dict(V3, warmup_steps=10)
    lrs = [lr_at(s, 0.0, **kw) for s in range(12)]
    assert lrs[0] == pytest.approx(2.2e-5) and lrs[9] == pytest.approx(2.2e-4) and lrs[11] == lrs[9]
    assert all(b - a == pytest.approx(2.2e-5) for a, b in zip(lrs[:10], lrs[1:10]))
    assert lr_at(0, 0.0, **dict(kw, warmup_steps=0)) == pytest.approx(2.2e-4)


def test_v3_schedule_numbers():
    # V3 §4.2: 2.2e-4 until 10T, cosine to 2.2e-5 by 14.3T, 2.2e-5 for 333B, 7.3e-6 for 167B (of 14.8T)
    lr = lambda tokens: lr_at(10_000, tokens / 14.8e12, **V3)  # noqa: E731
    assert lr(0.5 * 14.8e12) == pytest.approx(2.2e-4)
    assert lr(9.99e12) == pytest.approx(2.2e-4)
    assert lr(12.15e12) == pytest.approx((2.2e-4 + 2.2e-5) / 2)  # half-way down the cosine
    assert lr(14.3e12) == pytest.approx(2.2e-5)
    assert lr(14.5e12) == pytest.approx(2.2e-5)
    assert lr(14.63e12) == pytest.approx(2.2e-5)
    assert lr(14.64e12) == pytest.approx(7.3e-6)
    assert lr_at(10_000, 1.0, **V3) == pytest.approx(7.3e-6)
    assert lr_at(1000, 0.0, **V3) == pytest.approx(2.2e-4 * 1001 / 2000)  # 2K warmup steps


def test_multistep_wsd_cosine_constant():
    kw = dict(peak=1.0, warmup_steps=0, min_ratio=0.1, milestones=[], factors=[])
    ms = dict(kw, schedule="multistep")  # DeepSeek LLM §2.3
    assert [lr_at(0, p, **ms) for p in (0.0, 0.79, 0.8, 0.89, 0.9, 1.0)] == [1, 1, 0.316, 0.316, 0.1, 0.1]
    v2 = dict(ms, milestones=[0.6, 0.9], factors=[0.316, 0.316 ** 2])  # V2 §3.1.2
    assert lr_at(0, 0.7, **v2) == pytest.approx(0.316) and lr_at(0, 0.95, **v2) == pytest.approx(0.0999, abs=1e-4)
    wsd = dict(kw, schedule="wsd")
    assert lr_at(0, 0.5, **wsd) == 1.0 and lr_at(0, 0.8, **wsd) == 1.0
    assert lr_at(0, 0.9, **wsd) == pytest.approx(0.55) and lr_at(0, 1.0, **wsd) == pytest.approx(0.1)
    cos = dict(kw, schedule="cosine")
    assert lr_at(0, 0.0, **cos) == 1.0 and lr_at(0, 1.0, **cos) == pytest.approx(0.1)
    assert lr_at(0, 0.5, **cos) == pytest.approx(0.55)
    assert lr_at(3, 0.7, **dict(kw, schedule="constant")) == 1.0


@pytest.mark.parametrize("args, keys", [
    (("linear", 0, 10, 0.1, [], []), ["train.lr_schedule", "cosine"]),
    (("cosine", 20, 10, 0.1, [], []), ["train.warmup_steps", "train.steps"]),
    (("cosine", 2, 10, 1.5, [], []), ["train.min_lr_ratio"]),
    (("cosine", 2, 10, 0.1, [0.5], []), ["train.lr_milestones"]),
    (("v3", 2, 10, 0.1, [0.5, 0.9], []), ["train.lr_milestones", "3"]),
    (("v3", 2, 10, 0.1, [], [0.1]), ["train.lr_factors", "3"]),
    (("multistep", 2, 10, 0.1, [0.9, 0.8], [0.3, 0.1]), ["train.lr_milestones", "increasing"]),
    (("multistep", 2, 10, 0.1, [0.8, 0.9], [0.3]), ["train.lr_factors", "one factor per milestone"]),
    (("multistep", 2, 10, 0.1, [0.8], [-1.0]), ["train.lr_factors"]),
])
def test_bad_lr_config_names_keys(args, keys):
    with pytest.raises(ValueError) as e:
        check_lr_schedule(*args)
    for key in keys:
        assert key in str(e.value)


def test_good_lr_configs_pass():
    for s in ("constant", "cosine", "wsd", "multistep", "v3"):
        check_lr_schedule(s, 2, 10, 0.1, [], [])
    check_lr_schedule("multistep", 2000, 10_000, 0.0, [0.6, 0.9], [0.316, 0.0999])


def test_piecewise_v3_lambda_and_gamma():
    t = lambda tokens: tokens / 14.8e12  # noqa: E731
    assert [piecewise(t(x), V3_MTP_LAMBDA) for x in (0, 5e12, 9.99e12, 10e12, 14.8e12)] == [0.3, 0.3, 0.3, 0.1, 0.1]
    assert [piecewise(t(x), V3_BIAS_GAMMA) for x in (0, 10e12, 14.29e12, 14.3e12, 14.8e12)] == [
        0.001, 0.001, 0.001, 0.0, 0.0]
    for bad in ([], [[0.5, 1.0]], [[0.0, 1.0], [0.5, 2.0], [0.4, 3.0]], [[0.0, 1.0, 2.0]]):
        with pytest.raises(ValueError, match="train.mtp_lambda"):
            check_piecewise(bad, "train.mtp_lambda")
    check_piecewise(V3_MTP_LAMBDA, "train.mtp_lambda")
