"""Distributed checkpoints (parallel/checkpoint.py): exact round trips, atomic saves, safety, resharding
between parallel layouts, asynchronous saves, and export to Hugging Face.

Resharding is checked against the global values the saving ranks gather (`parallel.full_state` and
`full_tensor` of the optimizer moments): every parameter, moment and EMA tensor loaded under another
layout, or in one process, must equal them exactly."""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from model import build_model, load_hf, preset
from model.transformer import IGNORE_INDEX
from parallel.checkpoint import (CheckpointError, CheckpointMismatch, latest_checkpoint, load_checkpoint,
                                 read_full_model_state, save_checkpoint, sharded_state)

SEQ = 8


# -- stand-ins for pretrain/optim.py's optimizer and EMA ------------------------------------------------
class AdamW(torch.optim.AdamW):
    """torch's AdamW with the trainer optimizer's extras: init_state() and a Python step_count."""

    def __init__(self, params, **kw):
        super().__init__(params, lr=1e-2, weight_decay=0.1, **kw)
        self.step_count = 0

    def init_state(self):
        for g in self.param_groups:
            for p in g["params"]:
                self.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                 "exp_avg_sq": torch.zeros_like(p)}

    def step(self, closure=None):
        out = super().step(closure)
        self.step_count += 1
        return out


class EMA:
    """{name: fp32 CPU tensor of the local shape}, live (a load writes into them)."""

    def __init__(self, modules, scale: float = 0.5):
        from parallel.checkpoint import _plain
        self.shadow = {n: _plain(p).float().cpu() * scale for m in modules for n, p in m.named_parameters()}

    def state(self):
        return self.shadow


def _data(cfg, batch: int, seed: int = 100):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, SEQ), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return tokens, labels


def _meta(cfg, step):
    return {"step": step, "model_config": cfg.to_dict(), "parallel": {}, "consumed_samples": 4 * step}


def _trained_model(cfg, seed=0):
    """A plain model after one AdamW step, with non-zero routing biases."""
    net = build_model(cfg, seed=seed).train()
    opt = AdamW(net.parameters())
    tokens, labels = _data(cfg, 2)
    net.loss(tokens, labels)["loss"].backward()
    opt.step()
    with torch.no_grad():
        for name, b in net.named_buffers():
            if name.endswith("gate.bias"):
                b.normal_(generator=torch.Generator().manual_seed(len(name)))
    return net, opt


def _assert_same(net_a, opt_a, net_b, opt_b):
    sa, sb = net_a.state_dict(), net_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for (n, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        for k, v in opt_a.state[pa].items():
            assert torch.equal(v, opt_b.state[pb][k]), f"{n} {k}"
    assert opt_a.step_count == opt_b.step_count


# -- one process ---------------------------------------------------------------------------------------
def test_roundtrip_prune_latest_and_partial(tmp_path):
    cfg = preset("tiny-deepseek-v3", n_layers=2)
    net, opt = _trained_model(cfg)
    ema = EMA([net])
    state = sharded_state(net, None, opt, ema)
    assert "model/layers.1.ffn.gate.bias" in state and "optim/step_count" in state
    assert not any(k.endswith("tokens_per_expert") or k.endswith("inv_freq") for k in state)  # not persistent
    root = tmp_path / "ckpt"
    for step in (1, 2, 3, 4):
        path = save_checkpoint(root, step, state, _meta(cfg, step), keep=2)
    assert path == root / "step_00000004"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000004"
    # a crash during the next save leaves a partial directory: ignored by latest and load
    crashed = root / "step_00000005.partial"
    crashed.mkdir()
    (crashed / "__0_0.distcp").write_bytes(b"\0" * 10)
    assert latest_checkpoint(root) == path
    (root / "latest").unlink()  # even without the pointer
    assert latest_checkpoint(root) == path
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(crashed, state)

    net2 = build_model(cfg, seed=1)
    opt2 = AdamW(net2.parameters())
    ema2 = EMA([net2], 0.25)
    meta = load_checkpoint(root, sharded_state(net2, None, opt2, ema2), model_config=cfg.to_dict())
    assert meta["step"] == 4 and meta["consumed_samples"] == 16 and meta["format_version"] == 1
    assert "optim/embed.weight/exp_avg" in meta["keys"]
    _assert_same(net, opt, net2, opt2)
    for k, v in ema.state().items():
        assert torch.equal(v, ema2.state()[k]), k

    # another model is refused before any tensor changes, naming the fields
    other = preset("tiny-deepseek-v3", n_layers=3, dim=32)
    net3 = build_model(other, seed=1)
    before = {k: v.clone() for k, v in net3.state_dict().items()}
    with pytest.raises(CheckpointMismatch) as e:
        load_checkpoint(path, sharded_state(net3), model_config=other.to_dict())
    msg = str(e.value)
    assert "n_layers: checkpoint 2, this run 3" in msg and "dim: checkpoint 64, this run 32" in msg
    assert "fresh run directory" in msg
    assert all(torch.equal(v, before[k]) for k, v in net3.state_dict().items())
    # keys the checkpoint lacks (an optimizer it was saved without)
    model_only = tmp_path / "model_only"
    save_checkpoint(model_only, 1, sharded_state(net), _meta(cfg, 1))
    with pytest.raises(CheckpointError, match=r"lacks 1\d\d of the .* e\.g\. \['optim/"):
        load_checkpoint(model_only, sharded_state(net2, None, opt2))
    load_checkpoint(model_only, sharded_state(net2, None, opt2), strict_keys=False)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nowhere", state)
    # the same step saved again replaces it; the crashed partial of another step is left alone
    save_checkpoint(root, 4, state, _meta(cfg, 4), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004",
                                                      "step_00000005.partial"]
    assert latest_checkpoint(root) == path and load_checkpoint(path, state)["step"] == 4


class _Evil:
    def __reduce__(self):
        return os.system, (f"touch {_Evil.marker}",)


def test_malicious_metadata_is_refused(tmp_path):
    cfg = preset("tiny-deepseek-v3", n_layers=1)
    net = build_model(cfg, seed=0)
    path = save_checkpoint(tmp_path, 1, sharded_state(net), _meta(cfg, 1))
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    for fn in (lambda: load_checkpoint(path, sharded_state(net)), lambda: read_full_model_state(path)):
        with pytest.raises(CheckpointError, match=r"refusing to load .*: it references (posix|os|nt)\.system"):
            fn()
    assert not marker.exists()
    (path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, sharded_state(net))


def test_async_save_one_process(tmp_path):
    cfg = preset("tiny-deepseek-v3", n_layers=1)
    net, opt = _trained_model(cfg)
    state = sharded_state(net, None, opt)
    h = save_checkpoint(tmp_path, 7, state, _meta(cfg, 7), async_save=True)
    want = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():  # training goes on: the staged copy is what gets written
        for p in net.parameters():
            p.add_(1.0)
    assert h.wait() == tmp_path / "step_00000007" and latest_checkpoint(tmp_path) == h.path
    got, model_config = read_full_model_state(tmp_path)
    assert model_config == cfg.to_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_export_to_hf(tmp_path):
    from model.convert import main
    from model.hf import SafetensorsDir, save_hf

    cfg = preset("tiny-deepseek-v3", n_layers=2)
    net, opt = _trained_model(cfg)
    save_checkpoint(tmp_path / "ckpt", 3, sharded_state(net, None, opt), _meta(cfg, 3))
    assert main(["checkpoint-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    net.eval()
    tokens, _ = _data(cfg, 2)
    hf = load_hf(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(hf(tokens), net(tokens))
    # the same files as exporting the live model (which test_hf checks against transformers)
    save_hf(net, tmp_path / "direct")
    with SafetensorsDir(tmp_path / "hf") as a, SafetensorsDir(tmp_path / "direct") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    assert main(["checkpoint-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert main(["checkpoint-to-hf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2


def test_boxes_match_take_local():
    """The box of every parameter equals what parallelize slices, for every simulated rank (no processes):
    tp4 with KV heads replicated on two ranks each (GQA, 2 KV heads), and tp4 x ep4 experts (MLA, MoE)."""
    from parallel import parallelize
    from parallel.comm import Group
    from parallel.mesh import Mesh, ParallelDims

    for name in ("tiny-llama-3-8b", "tiny-deepseek-v3"):
        cfg = preset(name, n_layers=2)
        full = build_model(cfg, seed=0).state_dict()
        ep = 4 if cfg.is_moe else 1
        for r in range(4):
            dims = ParallelDims(world=4, pp=1, dp=1, tp=4, ep=ep, sp=False, node_size=8)
            groups = {}
            for g in ("pp", "dp", "tp", "edp", "ep", "ep_inter", "ep_intra", "dp_tp", "world"):
                size = {"tp": 4, "ep": ep, "ep_intra": ep, "dp_tp": 4, "world": 4}.get(g, 1)
                groups[g] = Group(g, None, tuple(range(size)), 8)
                groups[g].__dict__["rank"] = r if size > 1 else 0
            mesh = Mesh(dims, groups, {})
            net = parallelize(build_model(cfg, seed=0), mesh)
            state = sharded_state(net, mesh)
            replicated = 0
            for key, g in state.items():
                want = full[key.removeprefix("model/")]
                assert g.shape == want.shape, key
                box = want[tuple(slice(o, o + n) for o, n in zip(g.offsets, g.local.shape))]
                assert torch.equal(g.local, box), f"{name} rank {r} {key}"
                replicated += key.endswith("attn.wk.weight") and g.local.shape[0] * 2 == want.shape[0]
            if name == "tiny-llama-3-8b":
                assert replicated == cfg.n_layers  # chunk r // 2 of 2: two ranks hold each KV head


# -- several ranks ---------------------------------------------------------------------------------------
def _moments(modules, opt, mesh):
    from parallel import full_tensor
    out = {}
    for s in modules:
        for name, p in s.named_parameters():
            lay = s.param_layouts[name]
            for k in ("exp_avg", "exp_avg_sq"):
                out[f"{name}/{k}"] = full_tensor(opt.state[p][k], lay, mesh)
            out[f"{name}/step"] = opt.state[p]["step"]
    return out


def _full(modules, opt, ema, mesh):
    """Global values of this rank's parameters, buffers, moments and EMA tensors."""
    import parallel
    from torch.distributed.tensor import DTensor
    model, buffers = {}, {}
    for s in modules:
        model.update(parallel.full_state(s, mesh))
        buffers.update({k: v.clone() for k, v in s.state_dict().items() if k.endswith("gate.bias")})
    ema_full = {}
    if ema is not None:
        for s in modules:
            for name, p in s.named_parameters():
                t = ema.state()[name]
                if isinstance(p, DTensor):  # the EMA holds this rank's FSDP shard
                    t = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                ema_full[name] = parallel.full_tensor(t, s.param_layouts[name], mesh)
    return {"model": model, "buffers": buffers, "moments": _moments(modules, opt, mesh), "ema": ema_full}


def _merge(root: Path) -> dict:
    out = {"model": {}, "buffers": {}, "moments": {}, "ema": {}}
    for f in sorted(root.glob("ref_*.pt")):
        for k, v in torch.load(f).items():
            out[k].update(v)
    return out


def _check(got: dict, want: dict, what: str, parts=("model", "buffers", "moments", "ema")):
    for part in parts:
        assert got[part].keys() == want[part].keys(), (what, part, sorted(set(got[part]) ^ set(want[part]))[:5])
        for k, v in want[part].items():
            assert torch.equal(got[part][k], v), f"{what}: {part} {k}"


def _build_pipeline(cfg, mesh, schedule, n_micro, seed):
    from parallel.pipeline import attach_schedule, build_pipeline
    pipe = build_pipeline(build_model(cfg, device="meta").train(), mesh, schedule, n_micro, seq_len=SEQ)
    pipe.init_weights(seed=seed)
    attach_schedule(pipe, 1, SEQ)
    return pipe


def pipeline_save_rank(root: str, layout: dict, schedule: str, n_micro: int, n_layers: int):
    """Train one step under the layout, save, record the global values; then load back into a fresh
    pipeline of the same layout (the V schedules' shared embedding lives twice on a rank)."""
    from parallel import ParallelConfig, build_mesh
    root = Path(root)
    cfg = preset("tiny-deepseek-v3", n_layers=n_layers)
    mesh = build_mesh(ParallelConfig(**layout))
    dims = mesh.dims
    pipe = _build_pipeline(cfg, mesh, schedule, n_micro, seed=0)
    opt = AdamW(list(pipe.parameters()))
    tokens, labels = _data(cfg, n_micro * dims.dp)
    d = dims.coords(mesh.rank)["dp"]
    pipe.step(tokens[d * n_micro:(d + 1) * n_micro], labels[d * n_micro:(d + 1) * n_micro])
    opt.step()
    pipe.update_expert_bias()
    ema = EMA(pipe.stages)
    ref = _full(pipe.stages, opt, ema, mesh)
    torch.save(ref, root / f"ref_{mesh.rank}.pt")
    save_checkpoint(root / "ckpt", 1, sharded_state(pipe, mesh, opt, ema), _meta(cfg, 1))

    again = _build_pipeline(cfg, mesh, schedule, n_micro, seed=1)
    opt2 = AdamW(list(again.parameters()))
    ema2 = EMA(again.stages, 0.25)
    load_checkpoint(root / "ckpt", sharded_state(again, mesh, opt2, ema2), model_config=cfg.to_dict())
    _check(_full(again.stages, opt2, ema2, mesh), ref, f"rank {mesh.rank} reload")
    assert opt2.step_count == 1
    # both copies of the shared embedding on this rank were filled (the dicts above keep one per name)
    mirrored = 0
    for name in again.shared_names:
        copies = [s.get_parameter(name) for s in again.stages if name in dict(s.named_parameters())]
        for a in copies[1:]:
            assert torch.equal(a.detach(), copies[0].detach()), name
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt2.state[a][k], opt2.state[copies[0]][k]), (name, k)
            mirrored += 1
    assert mirrored == (len(again.shared_names) if schedule == "dualpipev" and dims.coords(mesh.rank)["pp"] == 0
                        else 0)


def parallel_load_rank(root: str, layout: dict, n_layers: int):
    """Load into a model parallelized with `layout` (no pipeline) and compare with the saved global values."""
    from parallel import ParallelConfig, build_mesh, init_parallel_weights, parallelize
    root = Path(root)
    cfg = preset("tiny-deepseek-v3", n_layers=n_layers)
    mesh = build_mesh(ParallelConfig(**layout))
    net = parallelize(build_model(cfg, device="meta").train(), mesh)
    init_parallel_weights(net, mesh, seed=3)
    opt = AdamW(net.parameters())
    ema = EMA([net], 0.25)
    load_checkpoint(root / "ckpt", sharded_state(net, mesh, opt, ema), model_config=cfg.to_dict())
    _check(_full([net], opt, ema, mesh), _merge(root), f"rank {mesh.rank} under {layout}")


def _load_one_process(root: Path, n_layers: int, with_ema: bool = True):
    cfg = preset("tiny-deepseek-v3", n_layers=n_layers)
    net = build_model(cfg, seed=5)
    opt = AdamW(net.parameters())
    ema = EMA([net], 0.25) if with_ema else None
    meta = load_checkpoint(root / "ckpt", sharded_state(net, None, opt, ema), model_config=cfg.to_dict())
    got = {"model": dict(net.named_parameters()), "moments": _moments([_Plain(net)], opt, None),
           "buffers": {k: v for k, v in net.state_dict().items() if k.endswith("gate.bias")},
           "ema": ema.state() if ema else {}}
    got["model"] = {k: v.detach() for k, v in got["model"].items()}
    _check(got, _merge(root), "one process", ("model", "buffers", "moments", "ema") if with_ema
           else ("model", "buffers", "moments"))
    return meta


class _Plain:
    """A plain model seen with trivial layouts (for `_moments` in one process)."""

    def __init__(self, net):
        from parallel.tensor_parallel import ParamLayout
        self.net = net
        self.param_layouts = {n: ParamLayout(tuple(p.shape)) for n, p in net.named_parameters()}

    def named_parameters(self):
        return self.net.named_parameters()


def test_reshard_pp2_tp2_to_one_process(tmp_path):
    """4 ranks, pp2 x tp2 with sp under DualPipeV (both ends of the pipeline on pp rank 0, so the
    embedding is held twice on one rank) -> the same layout again -> one process."""
    run_ranks(4, pipeline_save_rank, str(tmp_path), dict(pp=2, tp=2, sp=True), "dualpipev", 4, 2)
    _load_one_process(tmp_path, 2)


@pytest.mark.slow
def test_reshard_pp2_tp2_ep2_to_ep4_and_one_process(tmp_path):
    """8 ranks pp2 x tp2 x ep2 (sp, 1F1B) -> 4 ranks ep4 (dp 4: FSDP2 over dp, experts over ep) -> one process."""
    run_ranks(8, pipeline_save_rank, str(tmp_path), dict(pp=2, tp=2, ep=2, sp=True), "1f1b", 2, 4)
    run_ranks(4, parallel_load_rank, str(tmp_path), dict(ep=4), 4)
    _load_one_process(tmp_path, 4)


def fsdp_save_rank(root: str, n_layers: int):
    """dp2 with FSDP2 (zero=3, experts sharded over edp=2): a synchronous save after one step, an
    asynchronous one after the next (training continues while it is written)."""
    from parallel import ParallelConfig, build_mesh, finish_grad_sync, init_parallel_weights, parallelize
    root = Path(root)
    cfg = preset("tiny-deepseek-v3", n_layers=n_layers)
    mesh = build_mesh(ParallelConfig(zero=3))
    net = parallelize(build_model(cfg, device="meta").train(), mesh)
    init_parallel_weights(net, mesh, seed=0)
    opt = AdamW(net.parameters())
    tokens, labels = _data(cfg, 4)
    handle = None
    for step in (1, 2):
        d = mesh.rank
        net.loss(tokens[2 * d:2 * d + 2], labels[2 * d:2 * d + 2])["loss"].backward()
        finish_grad_sync(net, mesh)
        opt.step()
        opt.zero_grad()
        sub = root / f"s{step}"
        sub.mkdir(exist_ok=True)
        torch.save(_full([net], opt, None, mesh), sub / f"ref_{mesh.rank}.pt")
        state = sharded_state(net, mesh, opt)
        if step == 1:
            path = save_checkpoint(sub / "ckpt", step, state, _meta(cfg, step))
            assert path.name == "step_00000001" and (path / "meta.json").is_file()
        else:
            handle = save_checkpoint(sub / "ckpt", step, state, _meta(cfg, step), async_save=True)
            with torch.no_grad():
                for p in net.parameters():
                    p.to_local().mul_(0.0)  # must not reach the checkpoint: it was staged
            dist.barrier()
    assert handle.wait().name == "step_00000002"
    dist.barrier()
    assert latest_checkpoint(root / "s2" / "ckpt") == root / "s2" / "ckpt" / "step_00000002"


def test_fsdp_save_sync_and_async_to_one_process(tmp_path):
    run_ranks(2, fsdp_save_rank, str(tmp_path), 2)
    for step in (1, 2):
        meta = _load_one_process(tmp_path / f"s{step}", 2, with_ema=False)
        assert meta["step"] == step


# -- integrity and full disks ------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> str:
    """Damage a checkpoint step directory; returns the file named in the expected message."""
    shard = path / "__0_0.distcp"
    if how == "flip":  # one flipped bit in the middle of the tensor data
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    elif how == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif how == "delete":
        shard.unlink()
    elif how == "manifest":  # the manifest alone lost: not mistaken for a checkpoint saved before manifests
        (path / "manifest.json").unlink()
        return "manifest.json"
    return "__0_0.distcp"


@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "manifest"])
def test_corrupt_latest_falls_back_to_the_newest_verified_one(tmp_path, capsys, how):
    cfg = preset("tiny-deepseek-v3", n_layers=1)
    net = build_model(cfg, seed=0)
    root = tmp_path / "ckpt"
    for step in (1, 2):
        with torch.no_grad():
            net.embed.weight.fill_(step)
        save_checkpoint(root, step, sharded_state(net), _meta(cfg, step), keep=None)
    manifest = (root / "step_00000002" / "manifest.json").read_text()
    assert all(f'"{f}"' in manifest for f in ("__0_0.distcp", ".metadata", "meta.json"))
    capsys.readouterr()
    name = _damage(root / "step_00000002", how)
    wanted = {"flip": r"crc32 expected [0-9a-f]{8}, found [0-9a-f]{8}",
              "truncate": r"truncated: expected \d+ bytes, found \d+", "delete": r"missing \(expected \d+ bytes\)",
              "manifest": r"missing \(expected: meta.json records"}[how]

    assert latest_checkpoint(root) == root / "step_00000001"
    err = capsys.readouterr().err
    assert f"step_00000002/{name}" in err and re.search(wanted, err), err
    assert "using step_00000001 instead" in err and err.count("\n") == 1
    assert latest_checkpoint(root) == root / "step_00000001" and capsys.readouterr().err == ""  # said once
    net2 = build_model(cfg, seed=1)
    assert load_checkpoint(root, sharded_state(net2))["step"] == 1  # the root: its newest verified checkpoint
    assert torch.all(net2.embed.weight == 1)
    for fn in (lambda: load_checkpoint(root / "step_00000002", sharded_state(net2)),
               lambda: read_full_model_state(root / "step_00000002")):
        with pytest.raises(CheckpointError, match=rf"step_00000002/{re.escape(name)} .*{wanted}.*named explicitly"):
            fn()
    _damage(root / "step_00000001", "flip")  # nothing verifies: an error, never a silent fresh start
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies: step_00000002 .* step_00000001"):
        latest_checkpoint(root)


def test_checkpoint_saved_before_manifests_loads_unverified(tmp_path, capsys):
    cfg = preset("tiny-deepseek-v3", n_layers=1)
    net = build_model(cfg, seed=0)
    path = save_checkpoint(tmp_path, 1, sharded_state(net), _meta(cfg, 1))
    (path / "manifest.json").unlink(missing_ok=True)  # what an older save_checkpoint wrote: no manifest, ...
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("manifest", None)  # ... and no record of one
    (path / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert latest_checkpoint(tmp_path) == path
    assert load_checkpoint(path, sharded_state(build_model(cfg, seed=1)))["step"] == 1
    assert read_full_model_state(tmp_path)[1] == cfg.to_dict()
    err = capsys.readouterr().err
    assert err.count("has no manifest.json (saved before checkpoints recorded checksums): loading it without "
                     "verification") == 1, err


def manifest_rank(root: str):
    """Each of 2 ranks writes its own shard file; the manifest covers both. A flipped byte in rank 1's file
    of the newest checkpoint: every rank falls back to the previous one (collectively they agree, although
    only one rank reads that file), and naming it explicitly fails on every rank."""
    from parallel.checkpoint import GlobalShard
    root = Path(root)
    rank = dist.get_rank()
    local = torch.full((1, 300), float(rank))
    state = {"w": GlobalShard(local, (2, 300), (rank, 0))}
    save_checkpoint(root, 1, state, {"step": 1}, keep=None)
    local.add_(10)
    save_checkpoint(root, 2, state, {"step": 2}, keep=None, async_save=True).wait()
    local.add_(10)
    save_checkpoint(root, 3, state, {"step": 3}, keep=None)
    dist.barrier()
    if rank == 0:
        shard = root / "step_00000003" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[-40] ^= 0x01
        shard.write_bytes(bytes(data))
    dist.barrier()
    assert latest_checkpoint(root, collective=True) == root / "step_00000002"  # only rank 1 read the bad file
    assert latest_checkpoint(root) == root / "step_00000002"  # local: safe on one rank, each reads every file
    local.zero_()
    assert load_checkpoint(root, state)["step"] == 2 and torch.all(local == rank + 10)
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is corrupt: crc32 expected .* named explicitly"):
        load_checkpoint(root / "step_00000003", state)


def test_multi_rank_manifest_covers_every_rank(tmp_path):
    run_ranks(2, manifest_rank, str(tmp_path))
    for step in (1, 2, 3):  # sync, async, sync
        d = tmp_path / f"step_{step:08d}"
        files = json.loads((d / "manifest.json").read_text())["files"]
        assert sorted(files) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"], files
        assert sorted(p.name for p in d.iterdir()) == sorted([*files, "manifest.json"])  # parts merged, removed


@pytest.mark.parametrize("where", ["data", "async", "meta"])
def test_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    """ENOSPC while DCP writes a shard (synchronous or asynchronous save), or while meta.json is written:
    one error naming ENOSPC and the path; the partial directory is removed, nothing is pruned (keep=1), and
    the previous checkpoint stays the latest and loads."""
    from contextlib import contextmanager

    import parallel.checkpoint as ckpt
    from torch.distributed.checkpoint.filesystem import FileSystem

    cfg = preset("tiny-deepseek-v3", n_layers=1)
    net = build_model(cfg, seed=0)
    state = sharded_state(net)
    first = save_checkpoint(tmp_path, 1, state, _meta(cfg, 1), keep=1)
    partial = tmp_path / "step_00000002.partial"

    def no_space(path):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if where == "meta":
        real_write = ckpt._write_atomic

        def write(path, text):
            if path.name == "meta.json":
                raise no_space(path.with_name(".meta.json.tmp"))
            real_write(path, text)
        monkeypatch.setattr(ckpt, "_write_atomic", write)
    else:
        real_stream = FileSystem.create_stream

        @contextmanager
        def full_disk(self, path, mode):
            with real_stream(self, path, mode) as stream:
                if "w" in mode and str(path).endswith(".distcp"):
                    stream.write(b"\0" * 100)  # the disk fills up midway through the shard
                    raise no_space(path)
                yield stream
        monkeypatch.setattr(FileSystem, "create_stream", full_disk)

    with pytest.raises(CheckpointError) as e:
        out = save_checkpoint(tmp_path, 2, state, _meta(cfg, 2), keep=1, async_save=where == "async")
        if where == "async":
            out.wait()
    msg = str(e.value)
    assert "ENOSPC" in msg and "No space left on device" in msg and str(partial) in msg, msg
    assert str(first) in msg and "\n" not in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]  # no partial, no temp
    assert latest_checkpoint(tmp_path) == first and load_checkpoint(tmp_path, state)["step"] == 1
    monkeypatch.undo()  # space again: the next save works and only then prunes
    assert save_checkpoint(tmp_path, 2, state, _meta(cfg, 2), keep=1) == tmp_path / "step_00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]
