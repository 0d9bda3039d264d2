"""Activation recomputation (V3 §3.2.3): "full" and "selective" give the loss, every gradient and the
MoE load counts of no recomputation, keep less memory, keep parameter names, and compose with FSDP2
and tensor parallelism (gloo ranks against one process)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model import build_model, preset
from model.transformer import IGNORE_INDEX
import parallel
from parallel import ParallelConfig, build_mesh, parallelize
from parallel.memory import PeakMemory
from parallel.recompute import apply_recompute, recompute_mode

MODES = ("none", "full", "selective")


def _data(cfg, batch: int = 4, seq: int = 16, seed: int = 100):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return tokens, labels


def _step(net, tokens, labels):
    """Loss, gradients, load counts and balance losses after one forward + backward."""
    out = net.loss(tokens, labels)
    out["loss"].backward()
    return ({k: v.detach() for k, v in out.items()},
            {k: p.grad for k, p in net.named_parameters()},
            [m.tokens_per_expert.clone() for m in net.moe_layers()],
            [{k: v.detach() for k, v in m.aux_losses.items()} for m in net.moe_layers()])


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-llama-3-8b"])
def test_recompute_equals_none(name):
    """MLA with q_lora, MoE and MTP (and a dense GQA model, where the MLA names are absent): two
    micro-batches accumulated; everything bitwise equal to no recomputation."""
    cfg = preset(name)
    batches = [_data(cfg, seed=s) for s in (1, 2)]
    results, names = {}, {}
    for mode in MODES:
        net = build_model(cfg, seed=0).train()
        before = list(net.state_dict())
        apply_recompute(net, mode)
        assert list(net.state_dict()) == before
        names[mode] = [n for n, _ in net.named_parameters()]
        for tokens, labels in batches:
            results[mode] = _step(net, tokens, labels)
        if mode != "none":
            blocks = [m for m in net.modules() if type(m).__name__ == "Block"]
            assert len(blocks) == cfg.n_layers + cfg.n_mtp and all(recompute_mode(b) == mode for b in blocks)
    loss0, grads0, counts0, aux0 = results["none"]
    for mode in ("full", "selective"):
        loss, grads, counts, aux = results[mode]
        assert names[mode] == names["none"]
        for k in loss0:
            assert torch.equal(loss[k], loss0[k]), (mode, k)
        for k in grads0:
            assert torch.equal(grads[k], grads0[k]), (mode, k, (grads[k] - grads0[k]).abs().max())
        # the MoE counts its load once per forward, not again when recomputing
        assert all(torch.equal(a, b) for a, b in zip(counts, counts0)), mode
        assert sum(c.sum().item() for c in counts) == (2 * 4 * 16 * cfg.n_activated_experts
                                                       * len(counts) if counts else 0)
        for a, b in zip(aux, aux0):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), mode


def test_modes_switch_and_validate():
    cfg = preset("tiny-deepseek-v3")
    net = build_model(cfg, seed=0).train()
    with pytest.raises(ValueError, match="recompute mode 'selctive' is not one of none, full, selective"):
        apply_recompute(net, "selctive")
    tokens, labels = _data(cfg)
    want = net.loss(tokens, labels)["loss"].detach()
    for mode in ("full", "selective", "none"):  # re-applying replaces the mode
        apply_recompute(net, mode)
        assert torch.equal(net.loss(tokens, labels)["loss"].detach(), want)
    assert all("forward" not in vars(m) for m in net.modules())
    # a pipeline stage: embed/norm/head absent, a subset of layers, its own mode
    stage = build_model(cfg, seed=0).train()
    stage.embed = stage.norm = stage.head = None
    del stage.layers["0"]
    apply_recompute(stage, "full")
    assert [recompute_mode(stage.layers[k]) for k in stage.layers] == ["full", "full"]
    h, rope = torch.randn(2, 8, cfg.dim), stage.rope(torch.arange(8))

    def run():
        x = h
        for layer in stage.layers.values():
            x = layer(x, rope)
        return x
    with torch.no_grad():  # inference runs the plain forward (KV-cache decoding included)
        apply_recompute(stage, "none")
        plain = run()
        for mode in ("full", "selective"):
            apply_recompute(stage, mode)
            assert torch.equal(run(), plain)


def test_selective_needs_a_list():
    class Unit(torch.nn.Linear):
        fsdp_unit = True

    with pytest.raises(ValueError, match="needs the class Unit to name its submodules"):
        apply_recompute(torch.nn.Sequential(Unit(4, 4)), "selective")
    apply_recompute(torch.nn.Sequential(Unit(4, 4)), "full")


# Activations of ~15 MiB: tiny V3 at width 256, 128 tokens, 3 layers + MTP.
MEMORY_CFG = dict(dim=256, inter_dim=512, moe_inter_dim=128, q_lora_rank=128, kv_lora_rank=128, n_heads=8,
                  qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def _trim():
    """Return the heap's free pages to the system: otherwise some new tensors reuse memory freed
    earlier but kept resident by glibc, and the resident set undercounts them (~1 MiB here)."""
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def test_memory_full_lt_selective_lt_none(capsys):
    """Memory held after the forward (the saved activations), measured after a warm-up step."""
    cfg = preset("tiny-deepseek-v3", **MEMORY_CFG)
    net = build_model(cfg, seed=0).train()
    tokens, labels = _data(cfg, batch=1, seq=128)
    held = {}
    for mode in MODES:
        apply_recompute(net, mode)
        for _ in range(2):  # warm-up, then measure
            _trim()
            with PeakMemory() as m:
                loss = net.loss(tokens, labels)["loss"]
                held[mode] = m.now()
                loss.backward()  # frees the saved activations (the MoE's aux_losses keep the graph)
            net.zero_grad()
    mib = {k: round(v / 2**20, 1) for k, v in held.items()}
    with capsys.disabled():
        print(f"\nactivation memory held after forward (MiB): {mib}")
    assert held["full"] + 2**20 < held["selective"] < held["none"] - 2**20, mib


# -- parallel: FSDP2 (dp 2), expert and tensor parallelism, against one process ----------------------
def _close(got, want, what, tol=1e-5):
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(scale, 1e-12), msg=lambda m: f"{what}: {m}")


def parallel_rank(layouts: list[dict]):
    cfg = preset("tiny-deepseek-v3")
    tokens, labels = _data(cfg)
    for layout in layouts:
        mesh = build_mesh(ParallelConfig(**layout))
        dims = mesh.dims
        ref = build_model(cfg, seed=0).train()
        ref.set_expert_placement(dims.ep, dims.ep // dims.ep_nodes)
        rloss, _, rcounts, _ = _step(ref, tokens, labels)
        d = dims.coords(mesh.rank)["dp"]
        rows = slice(d * 4 // dims.dp, (d + 1) * 4 // dims.dp)
        got = {}
        for i, mode in enumerate(MODES):
            net = build_model(cfg, device="meta").train()
            if i % 2:  # recomputation first, FSDP2 around it (torchtitan's order) ...
                parallelize(apply_recompute(net, mode), mesh)
            else:      # ... or after parallelize: either way it runs inside the FSDP unit
                apply_recompute(parallelize(net, mesh), mode)
            parallel.init_parallel_weights(net, mesh, seed=0)
            parallel.STATS.reset()
            out = net.loss(tokens[rows], labels[rows])
            out["loss"].backward()
            parallel.finish_grad_sync(net, mesh)
            comm = {k: v["calls"] for k, v in parallel.STATS.snapshot().items()}
            loss = out["loss"].detach().clone()
            dist.all_reduce(loss)
            _close(loss / dims.world, rloss["loss"], f"{layout} {mode} loss")
            grads = parallel.full_state(net, mesh, grads=True)
            for k, p in ref.named_parameters():
                _close(grads[k], p.grad, f"{layout} {mode} grad {k}")
            parallel.sync_expert_load(net, mesh)
            counts = [m.tokens_per_expert for m in net.moe_layers()]
            assert all(torch.equal(a, b) for a, b in zip(counts, rcounts)), (layout, mode, "tokens_per_expert")
            got[mode] = grads, comm
        for mode in ("full", "selective"):  # and bitwise the parallel run without recomputation
            for k, g in got["none"][0].items():
                assert torch.equal(got[mode][0][k], g), (layout, mode, k)
        none, full, sel = (got[m][1] for m in MODES)
        # selective repeats no collective. full repeats the forward's tensor- and expert-parallel
        # ones, but FSDP2 gathers nothing again: the block's and its experts' parameters are already
        # gathered for backward when the recomputation runs.
        assert sel == none, (layout, sel, none)
        def fsdp(calls):
            return {k: v for k, v in calls.items() if k.endswith(("/dp", "/edp"))}
        assert fsdp(full) == fsdp(none), (layout, full, none)
        more = {"tp": "reduce_scatter/tp" if dims.sp else "all_reduce/tp", "ep": "all_to_all/ep"}
        for group, key in more.items():
            if getattr(dims, group) > 1:
                assert full[key] > none[key], (layout, key, full, none)


def test_fsdp_ep_tp_equal_one_process():
    """dp 2 (FSDP2 over the blocks and the experts), ep 2, tp 2 and tp 2 + sp, on 2 gloo ranks."""
    run_ranks(2, parallel_rank, [dict(), dict(ep=2), dict(tp=2), dict(tp=2, sp=True)])
