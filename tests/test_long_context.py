"""Long-context extension (issue 24; V3 §4.3, V2 §3.1.4): pretraining from a checkpoint's weights
(`init.checkpoint`) with YaRN switched on at load, and the 32K/128K extension recipes.

- init.checkpoint loads exactly the saved weights (one process; and 2 ranks under another layout), while
  the optimizer, the step and the schedule start fresh; YaRN's frequencies change, the weights do not;
- a YaRN setting that cannot describe the checkpoint (original_seq_len other than its training length,
  another rope_theta, YaRN switched off again, another architecture) is a ConfigError naming key and fix;
- checkpoint.resume wins over init.checkpoint once the run has checkpoints of its own (a resumed
  extension continues, it does not restart);
- the recipes carry the paper's numbers, start from the previous phase's checkpoints and use a layout the
  planner says fits on H800 80 GB; their tiny twins extend a tiny 4K-style run on CPU.
The tiny runs train the tiny V3 preset (MLA, MoE, MTP) on the embedded corpus."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from pretrain.config import ConfigError, ParallelSection, load_config
from pretrain.session import check_init_model

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {n: ROOT / "configs/pretrain" / f"deepseek_v3_long_{n}.yaml" for n in ("32k", "128k")}
HAS_CP = "cp" in ParallelSection.__dataclass_fields__
needs_cp = pytest.mark.skipif(not HAS_CP, reason="parallel.cp is not in pretrain.config.ParallelSection yet")


def overrides(corpus, run_dir, **extra) -> list[str]:
    """A tiny V3 trained as the 4K recipe trains V3: YaRN off (rope_factor 1), max_seq_len = seq_len = 32."""
    o = {"model.preset": "tiny-deepseek-v3", "model.vocab_size": 512, "model.n_layers": 2, "model.dim": 32,
         "model.rope_factor": 1.0, "model.max_seq_len": 32, "data.embedded": True, "data.cache_dir": str(corpus),
         "data.vocab_size": 512, "data.corpus_bytes": 400_000, "data.seq_len": 32, "data.split": "90,10,0",
         "train.steps": 2, "train.lr": 3e-3, "train.warmup_steps": 1, "train.micro_batch_size": 2,
         "train.global_batch_size": 4, "train.eval_every": 0, "logging.wandb": "disabled",
         "logging.run_dir": str(run_dir), "checkpoint.keep": 5}
    o.update(extra)
    return [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}" for k, v in o.items()]


# the extension: 4x the length, YaRN on over the base's 32 tokens (V3 §4.3's s, alpha, beta at toy length)
def extension(base_ckpt, **extra) -> dict:
    return {"model.rope_factor": 4.0, "model.original_seq_len": 32, "model.beta_fast": 32.0, "model.beta_slow": 1.0,
            "model.max_seq_len": 128, "data.seq_len": 128, "train.lr": 7.3e-6, "train.lr_schedule": "constant",
            "train.warmup_steps": 0, "init.checkpoint": str(base_ckpt), **extra}


def _train(args):
    from pretrain.train import train
    assert train(load_config(None, args)) == 0


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """The checkpoints of a 2-step tiny run without YaRN (the 4K phase in miniature)."""
    d = tmp_path_factory.mktemp("base")
    _train(overrides(corpus, d))
    if dist.is_initialized():
        dist.destroy_process_group()
    return d / "checkpoints"


# -- loading exactly the saved weights, starting everything else afresh --------------------------------------
def _check_loaded(args, base_ckpt, yarn: bool):
    """Build the trainer (init.checkpoint loads in Session.resume) and compare this rank's shard of every saved
    weight with the checkpoint, box by box; the optimizer and counters are fresh."""
    from parallel.checkpoint import read_full_model_state, sharded_state
    from pretrain import train as T
    tr = T.Trainer(load_config(None, args))
    try:
        full, saved_cfg = read_full_model_state(base_ckpt)
        assert saved_cfg["rope_factor"] == 1.0
        n = 0
        for key, shard in sharded_state(tr.engine.stages, tr.mesh).items():
            if not key.startswith("model/"):
                continue
            want = full[key.removeprefix("model/")]
            for d, (o, size) in enumerate(zip(shard.offsets, shard.local.shape)):
                want = want.narrow(d, o, size)
            assert torch.equal(shard.local.detach().to(want.dtype), want), key
            n += 1
        assert n > 0
        s = tr.session
        assert (s.step, s.consumed, s.opt.step_count) == (0, 0, 0)
        assert all(not st["exp_avg"].any() and not st["exp_avg_sq"].any() for st in s.opt.state.values())
        assert tr.lr() == pytest.approx(7.3e-6)          # the new (constant) schedule at its step 0
        # YaRN's frequencies (non-persistent buffers, from the config) and softmax scale; the weights unchanged
        import dataclasses

        from model.layers import yarn_inv_freq
        plain = yarn_inv_freq(dataclasses.replace(tr.model_cfg, rope_factor=1.0))
        net = tr.engine.stages[0]
        rope = [m for m in net.modules() if type(m).__name__ == "RotaryEmbedding"]
        assert rope and all((not torch.allclose(m.inv_freq.cpu(), plain)) == yarn for m in rope)
        attn = [m for m in net.modules() if type(m).__name__ == "MLA"]
        qk = tr.model_cfg.qk_head_dim ** -0.5
        assert attn and all((m.softmax_scale != pytest.approx(qk)) == yarn for m in attn)
    finally:
        tr.session.close()


def test_init_checkpoint_loads_the_saved_weights_with_yarn(corpus, base, tmp_path, monkeypatch):
    """One process: the extension run's weights are the checkpoint's exactly, YaRN switched on (its mscale
    factor differs from 1), AdamW's moments zero, step 0, the constant 7.3e-6 schedule (V3 §4.3)."""
    from pretrain import train as T
    monkeypatch.setattr(T.Trainer, "_build_data", lambda self: SimpleNamespace(vocab_size=512))
    was = dist.is_initialized()
    try:
        _check_loaded(overrides(corpus, tmp_path / "ext", **extension(base)), base, yarn=True)
    finally:
        if not was and dist.is_initialized():
            dist.destroy_process_group()


def _check_loaded_rank(args, base_ckpt):
    from pretrain import train as T
    T.Trainer._build_data = lambda self: SimpleNamespace(vocab_size=512)
    _check_loaded(args, base_ckpt, yarn=True)


def test_init_checkpoint_loads_under_another_layout(corpus, base, tmp_path):
    """2 ranks (cp 2 where the runtime has it, else ep 2 with FSDP2 over the experts): every rank's shard of
    every weight is the one-process checkpoint's."""
    layout = {"parallel.cp": 2} if HAS_CP else {"parallel.ep": 2}
    run_ranks(2, _check_loaded_rank, overrides(corpus, tmp_path / "ext2", **extension(base, **layout)), str(base))


# -- YaRN settings that cannot describe the checkpoint -------------------------------------------------------
def _saved(**kw) -> dict:
    from model import preset
    return preset("tiny-deepseek-v3", **{"rope_factor": 1.0, "max_seq_len": 32, **kw}).to_dict()


def _run(**kw):
    from model import preset
    return preset("tiny-deepseek-v3", **{"rope_factor": 4.0, "original_seq_len": 32, "max_seq_len": 128, **kw})


def test_yarn_matching_the_checkpoint_is_accepted():
    check_init_model(_saved(), 32, _run())                                   # 4K -> 32K: original = trained length
    check_init_model(_saved(), None, _run())                                 # no data.seq_len: its max_seq_len
    check_init_model(_run(max_seq_len=128).to_dict(), 128, _run(max_seq_len=512))   # 32K -> 128K: same YaRN
    check_init_model(_saved(), 32, _run(rope_factor=1.0, max_seq_len=128))  # longer without YaRN (a control run)
    check_init_model(_saved(), 32, _run(mtp_lambda=0.1, bias_update_gamma=0.0, balance_alpha_expert=0.0))


@pytest.mark.parametrize("saved, seq, run, match", [
    (_saved(), 32, dict(original_seq_len=4096),
     r"model\.original_seq_len = 4096, but YaRN's original length must be 32, the sequence length it was trained "
     r"at .* set model\.original_seq_len=32"),
    (_saved(), None, dict(original_seq_len=64), r"must be 32, its model\.max_seq_len .* model\.original_seq_len=32"),
    (_saved(original_seq_len=64, rope_factor=4.0, max_seq_len=256), 256, dict(original_seq_len=256),
     r"must be 64, the checkpoint's own YaRN original_seq_len"),
    (_saved(), 32, dict(rope_theta=1e6), r"model\.rope_theta = 1000000\.0, but .* rope_theta 10000\.0.* set "
                                         r"model\.rope_theta=10000\.0"),
    (_saved(), 32, dict(n_layers=4), r"another architecture \(model\.n_layers: checkpoint 3, this run 4\).* set "
                                     r"model\.n_layers=3"),
    (_saved(), 32, dict(kv_lora_rank=16, qk_rope_head_dim=4), r"model\.kv_lora_rank: .*model\.qk_rope_head_dim"),
    (_saved(rope_factor=4.0, original_seq_len=32), 128, dict(rope_factor=1.0),
     r"trained with YaRN \(rope_factor 4\.0, original_seq_len 32\), but model\.rope_factor = 1\.0 switches it off"),
])
def test_yarn_mismatch_is_a_config_error(saved, seq, run, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_init_model(saved, seq, _run(**run), path="runs/x/checkpoints")
    assert str(e.value).startswith("init.checkpoint = runs/x/checkpoints")


def test_yarn_mismatch_stops_the_run_before_training(corpus, base, tmp_path):
    """Through the real path: the trainer refuses, with the key and the fix, before any step."""
    args = overrides(corpus, tmp_path / "bad", **extension(base, **{"model.original_seq_len": 4096}))
    with pytest.raises(ConfigError, match=r"set model\.original_seq_len=32"):
        _train(args)
    if dist.is_initialized():
        dist.destroy_process_group()
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


# -- resume wins over init ------------------------------------------------------------------------------------
def test_resume_wins_over_init_checkpoint(corpus, base, tmp_path):
    """An extension run stopped at step 2 (train.exit_at_step) and started again continues from its own step-2
    checkpoint: its losses at steps 3-4 equal an uninterrupted run's (a restart from init.checkpoint would not
    even log steps 1-2 twice)."""
    common = extension(base, **{"train.steps": 4, "train.lr": 1e-3})
    _train(overrides(corpus, tmp_path / "full", **common))
    _train(overrides(corpus, tmp_path / "split", **common, **{"train.exit_at_step": 2}))
    _train(overrides(corpus, tmp_path / "split", **common))
    if dist.is_initialized():
        dist.destroy_process_group()
    full = {m["step"]: m["loss"] for m in _metrics(tmp_path / "full") if "loss" in m}
    split = [m for m in _metrics(tmp_path / "split") if "loss" in m]
    assert [m["step"] for m in split] == [1, 2, 3, 4]
    for m in split:
        assert m["loss"] == pytest.approx(full[m["step"]], rel=1e-6), m["step"]
    assert full[4] != full[1]


# -- the recipes ----------------------------------------------------------------------------------------------
@needs_cp
@pytest.mark.parametrize("phase", ["32k", "128k"])
def test_recipe_follows_the_report(phase):
    """V3 §4.3: 1000 steps at 32K (batch 1920), then 1000 at 128K (batch 480), LR 7.3e-6 constant, YaRN s = 40,
    alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1 (mscale 1 = mscale_all_dim, the released config); the 4K
    recipe's model and optimizer otherwise; init.checkpoint = the previous phase's checkpoints."""
    cfg = load_config(str(RECIPES[phase]))
    base = load_config(str(ROOT / "configs/pretrain/deepseek_v3.yaml"))
    seq, batch = {"32k": (32768, 1920), "128k": (131072, 480)}[phase]
    t, m = cfg.train, cfg.model_config()
    assert (cfg.data.seq_len, t.global_batch_size, t.steps, t.lr, t.lr_schedule, t.warmup_steps, t.batch_ramp) == \
        (seq, batch, 1000, 7.3e-6, "constant", 0, [])
    assert (m.rope_factor, m.beta_slow, m.beta_fast, m.original_seq_len, m.mscale, m.mscale_all_dim) == \
        (40.0, 1.0, 32.0, 4096, 1.0, 1.0)
    from model.config import yarn_mscale
    assert yarn_mscale(m.rope_factor, m.mscale_all_dim) == pytest.approx(0.1 * math.log(40) + 1)
    assert m.max_seq_len >= seq
    prev = {"32k": base, "128k": load_config(str(RECIPES["32k"]))}[phase]
    assert Path(cfg.init.checkpoint) == Path(prev.logging.run_dir) / "checkpoints"
    assert cfg.logging.run_dir != prev.logging.run_dir
    for key in ("fp8", "moment_dtype", "dtype", "adam_beta1", "adam_beta2", "weight_decay", "grad_clip"):
        assert getattr(t, key) == getattr(base.train, key), key
    # the architecture is the 4K run's: everything but YaRN's keys and max_seq_len
    check_init_model(base.model_config().to_dict(), base.data.seq_len, m)
    # and the last phase's MTP weight and bias speed (V3 §4.2's values at the end of pretraining)
    assert t.mtp_lambda == [[0.0, 0.1]] and t.bias_gamma == [[0.0, 0.0]]


@needs_cp
@pytest.mark.parametrize("phase", ["32k", "128k"])
def test_recipe_layout_fits_per_the_planner(phase):
    """The recipe's layout on 2048 H800 (V3 §3.1), as the planner evaluates it (ZeRO-1 standing for the runtime's
    zero 2, as for the 4K recipe), fits in 80 GB; the memory the recipe's comment records is the planner's."""
    from model import build_model
    from plan import planner as P
    cfg = load_config(str(RECIPES[phase]))
    p, t = cfg.parallel, cfg.train
    world = p.pp * p.dp * p.cp * p.tp
    assert world == 2048 and p.cp > 1
    shape = P.model_shape(build_model(cfg.model_config(), device="meta"), cfg.data.seq_len)
    lay = P.Layout(tp=p.tp, pp=p.pp, ep=p.ep, dp=p.dp, vpp=2, schedule=p.pp_schedule, zero=1, recompute=p.recompute,
                   precision="fp8" if t.fp8 == "blockwise" else "bf16", micro_batch=t.micro_batch_size, cp=p.cp)
    cluster = P.Cluster("H800", world)
    P.check_layout(shape, cluster, lay, t.global_batch_size)
    plan = P.evaluate(shape, cluster, lay, t.global_batch_size)
    assert plan.fits and plan.memory["total"] < 80
    text = RECIPES[phase].read_text()
    assert f"{plan.memory['total']:.1f} GB" in text, plan.memory


@needs_cp
@pytest.mark.parametrize("phase", ["32k", "128k"])
def test_recipe_loads_and_checks_its_world(phase):
    from launch import check
    from parallel import LayoutError, ParallelDims
    cfg = load_config(str(RECIPES[phase]))
    world = check.world_size(cfg)
    assert world == 2048
    ParallelDims.from_config(check.parallel_config(cfg.parallel), world)
    check.run_checks(cfg)
    with pytest.raises(LayoutError, match="!= world size 1024"):
        ParallelDims.from_config(check.parallel_config(cfg.parallel), 1024)


def twin(phase, corpus, run_dir, init) -> list[str]:
    """The recipe at toy size on 2 CPU ranks: the 4K twin's tiny V3 (seq 32) extended to 4x (32K twin) and 16x
    (128K twin) under cp 2, YaRN's original_seq_len set to the tiny base's length; pp 1, ep 1."""
    seq = {"32k": 128, "128k": 512}[phase]
    o = {"model.preset": "tiny-deepseek-v3", "model.vocab_size": 512, "model.original_seq_len": 32,
         "model.max_seq_len": seq, "data.embedded": True, "data.paths": [], "data.tokenizer": "",
         "data.cache_dir": str(corpus), "data.vocab_size": 512, "data.corpus_bytes": 400_000, "data.seq_len": seq,
         "data.split": "90,10,0", "train.steps": 2, "train.micro_batch_size": 1, "train.global_batch_size": 2,
         "logging.wandb": "disabled", "logging.run_dir": str(run_dir), "checkpoint.every": 0,
         "checkpoint.async_save": False, "init.checkpoint": str(init), "parallel.pp": 1, "parallel.dp": 1,
         "parallel.ep": 1, "parallel.cp": 2, "parallel.node_size": 2, "train.eval_every": 0}
    return [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}" for k, v in o.items()]


def _train_recipes(runs):
    """Several runs in turn on the same ranks (one spawn): [(recipe path, overrides), ...]."""
    from pretrain.train import train
    for path, args in runs:
        assert train(load_config(path, args)) == 0


@needs_cp
@pytest.mark.slow
def test_tiny_twins_extend_a_tiny_base(corpus, tmp_path):
    """The 4K recipe's tiny twin (seq 32, YaRN off), then the 32K twin from its checkpoints, then the 128K twin
    from the 32K twin's, each on 2 ranks under cp 2: the recipes' schedule, YaRN and FP8 keys at toy size."""
    from test_launch_check import twin_overrides
    v3 = str(ROOT / "configs/pretrain/deepseek_v3.yaml")
    runs = [(v3, twin_overrides("deepseek_v3", corpus, tmp_path / "4k") + ["model.max_seq_len=32", "train.steps=2"])]
    init = tmp_path / "4k" / "checkpoints"
    for phase in ("32k", "128k"):
        runs.append((str(RECIPES[phase]), twin(phase, corpus, tmp_path / phase, init)))
        init = tmp_path / phase / "checkpoints"
    run_ranks(2, _train_recipes, runs)
    for phase in ("32k", "128k"):
        rows = [r for r in _metrics(tmp_path / phase) if "loss" in r]
        assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
        assert rows[0]["lr"] == pytest.approx(7.3e-6)
        saved = load_config(str(tmp_path / phase / "config.yaml"))
        assert (saved.parallel.cp, saved.model["rope_factor"], saved.init.checkpoint) == \
            (2, 40.0, str(tmp_path / ("4k" if phase == "32k" else "32k") / "checkpoints"))


@needs_cp
def test_cp_rank_bytes_equal_the_planners():
    """launch.check builds ranks of the 32K recipe (cp 8: FSDP2 over dp x cp = 128) on a fake process group; each
    rank's elements and bytes are plan.memory.rank_state's, which shards the dense parameters over dp x cp."""
    from launch import check
    from model import build_model
    from parallel import ParallelDims
    from plan.memory import rank_state
    cfg = load_config(str(RECIPES["32k"]))
    p = cfg.parallel
    dims = ParallelDims.from_config(check.parallel_config(p), 2048)
    net = build_model(cfg.model_config(), device="meta")
    seen = set()
    for rank in (0, 5, 127, 2047):
        rep = check.check_rank(cfg, 2048, rank)
        plan = rank_state(net, dims, rank, schedule=p.pp_schedule, vpp=p.vpp, seq_len=cfg.data.seq_len,
                          moment_dtype=cfg.train.moment_dtype)
        assert (rep.params, rep.shared, rep.weights, rep.grads, rep.optimizer) == \
            (plan.params, plan.shared, plan.weights, plan.grads, plan.optimizer), rank
        assert rep.groups["dp_cp"]["size"] == 128 and rep.groups["cp"]["size"] == 8
        seen.add(rep.params)
    assert len(seen) > 1
