"""The pretraining recipes (configs/pretrain/deepseek_*.yaml) and `launch.check`, which builds a recipe's
real layout rank by rank on a fake process group: every recipe loads, validates against its world size
and builds; for V3, V2 and DeepSeekMoE the per-rank parameters summed over one replica give the model's
count exactly and each rank's bytes equal the planner's (plan.memory); a layout that does not divide
fails with the runtime's own error; each recipe's tiny twin trains end to end on CPU."""
import json
from pathlib import Path

import pytest
import torch.distributed as dist

from distributed import run_ranks
from launch import check
from model import build_model
from parallel import LayoutError, ParallelDims
from plan.memory import rank_state
from pretrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {name: ROOT / "configs/pretrain" / f"{name}.yaml" for name in
           ("deepseek_llm_7b", "deepseek_llm_67b", "deepseek_moe_16b", "deepseek_v2_lite", "deepseek_v2",
            "deepseek_v3", "deepseek_v3_long_32k", "deepseek_v3_long_128k")}
WORLD = {"deepseek_llm_7b": 512, "deepseek_llm_67b": 512, "deepseek_moe_16b": 512, "deepseek_v2_lite": 512,
         "deepseek_v2": 1024, "deepseek_v3": 2048, "deepseek_v3_long_32k": 2048, "deepseek_v3_long_128k": 2048}
# the long-context recipes (tests/test_long_context.py) set parallel.cp, which loads once the runtime has it
LONG = {"deepseek_v3_long_32k", "deepseek_v3_long_128k"}


def dims_of(cfg, world):
    return ParallelDims.from_config(check.parallel_config(cfg.parallel), world)


def test_every_recipe_is_tested():
    assert sorted(p.name for p in (ROOT / "configs/pretrain").glob("deepseek_*.yaml")) == \
        sorted(p.name for p in RECIPES.values())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_validates_against_its_world(name):
    cfg = load_config(str(RECIPES[name]))
    cfg.check()
    assert check.world_size(cfg) == WORLD[name]
    dims_of(cfg, WORLD[name])
    check.run_checks(cfg)       # the trainer's batch-size, lr-schedule and micro-batch checks
    with pytest.raises(LayoutError, match=f"!= world size {WORLD[name] // 2}"):
        dims_of(cfg, WORLD[name] // 2)


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_llm_7b"])
def test_placeholder_data_paths_fail_naming_the_key(name, monkeypatch):
    import pretrain.data as D
    cfg = load_config(str(RECIPES[name]))
    with pytest.raises(FileNotFoundError, match="data.tokenizer = '/path/to/"):
        D.PretrainData(cfg.data, seed=0, train_samples=8, valid_samples=8)
    monkeypatch.setattr(D, "load_tokenizer", lambda path: type("Tokenizer", (), {"vocab_size": 4})())
    with pytest.raises(FileNotFoundError, match=r"data file missing: /path/to/.*\(data.paths holds"):
        D.PretrainData(cfg.data, seed=0, train_samples=8, valid_samples=8)


def test_v3_recipe_numbers_follow_the_report():
    """V3 §4.2 and §3: what the recipe must say (the ramp's start is the documented exception)."""
    cfg = load_config(str(RECIPES["deepseek_v3"]))
    t, p = cfg.train, cfg.parallel
    assert (t.lr, t.lr_schedule, t.warmup_steps, t.global_batch_size) == (2.2e-4, "v3", 2000, 15360)
    assert t.batch_ramp[2] == 469_000_000_000 // 4096
    assert t.mtp_lambda == [[0.0, 0.3], [pytest.approx(10 / 14.8), 0.1]]
    assert t.bias_gamma == [[0.0, 0.001], [pytest.approx(14.3 / 14.8), 0.0]]
    assert (t.fp8, t.moment_dtype, p.pp, p.ep, p.tp, p.pp_schedule) == ("blockwise", "bf16", 16, 64, 1, "dualpipev")
    m = cfg.model_config()
    assert (m.topk_nodes, m.balance_alpha_expert, m.n_mtp) == (4, 0.0001, 1)
    from pretrain.data import samples_for_steps
    assert samples_for_steps(t.steps, t.global_batch_size, t.batch_ramp) * 4096 == pytest.approx(14.8e12, rel=1e-5)


# -- launch.check at real sizes --------------------------------------------------------------------------
def replica_count(cfg) -> tuple[int, int]:
    """(parameters summed over one replica, of which copies of a shared parameter): one real rank per
    pipeline rank; its dp and ep peers hold the other FSDP2 shards and expert blocks of the same tensors,
    whose sizes are checked rank by rank in test_rank_bytes_equal_the_planners."""
    world = check.world_size(cfg)
    total = copies = 0
    for pp_i in range(cfg.parallel.pp):
        rank = pp_i * cfg.parallel.dp * cfg.parallel.tp
        mesh, engine = check.build_rank(cfg, world, rank)
        try:
            for s in engine.stages:
                copy = s.is_last and not s.is_first
                for name, q in s.named_parameters():
                    assert q.is_meta, f"{name} was allocated"
                    splits = {sp.group: sp.parts for sp in s.param_layouts[name].splits}
                    n = q.numel() * splits.get("ep", 1)   # a DTensor's numel: all its dp (edp) shards
                    total += n
                    copies += n if copy and name in engine.shared_names else 0
        finally:
            dist.destroy_process_group()
    return total, copies


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2", "deepseek_moe_16b"])
def test_replica_holds_the_models_parameters_exactly(name):
    cfg = load_config(str(RECIPES[name]))
    total, copies = replica_count(cfg)
    want = cfg.model_config().param_counts(include_mtp=True)["total"]
    assert total - copies == want
    if name == "deepseek_v3":   # 671B + the MTP module (V3 §2.2; embedding and head shared)
        assert 671e9 < cfg.model_config().param_counts()["total"] < 672e9 and want > 680e9
        assert copies == 129280 * 7168       # the last stage's copy of the embedding, for MTP


@pytest.mark.parametrize("name", ["deepseek_moe_16b", "deepseek_v2",
                                  pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_planner_counts_over_every_rank_sum_to_the_model(name):
    """Every rank of the world, as plan.memory counts it (checked against built ranks below): FSDP2 shards
    the one replica over all of them, so the sum is the model's count, each shared copy taken out once."""
    from parallel.pipeline import split_layers
    from parallel.pp_schedules import n_stages
    cfg = load_config(str(RECIPES[name]))
    p, world = cfg.parallel, WORLD[name]
    dims, net = dims_of(cfg, world), build_model(cfg.model_config(), device="meta")
    split = split_layers(net.stage_costs(cfg.data.seq_len), n_stages(p.pp_schedule, p.pp, p.vpp))
    held = [rank_state(net, dims, r, schedule=p.pp_schedule, vpp=p.vpp, layer_split=split) for r in range(world)]
    assert sum(st.params - st.shared for st in held) == cfg.model_config().param_counts(include_mtp=True)["total"]


RANKS = {"deepseek_v3": [0, 63, 1024, 1983, 2047], "deepseek_v2": [0, 600, 1023], "deepseek_moe_16b": [0, 511]}


@pytest.mark.parametrize("name", RANKS)
def test_rank_bytes_equal_the_planners(name):
    """Each checked rank's elements and bytes are the planner's (plan.memory.rank_state): the same
    state_bytes function, and the runtime's placement counted both ways. The last ranks hold the short
    FSDP2 shards of tensors whose rows do not divide by dp."""
    cfg = load_config(str(RECIPES[name]))
    world = check.world_size(cfg)
    dims, p = dims_of(cfg, world), cfg.parallel
    net = build_model(cfg.model_config(), device="meta")
    seen = set()
    for rank in RANKS[name]:
        rep = check.check_rank(cfg, world, rank)
        plan = rank_state(net, dims, rank, schedule=p.pp_schedule, vpp=p.vpp, seq_len=cfg.data.seq_len,
                          moment_dtype=cfg.train.moment_dtype)
        assert (rep.params, rep.shared, rep.weights, rep.grads, rep.optimizer) == \
            (plan.params, plan.shared, plan.weights, plan.grads, plan.optimizer), rank
        seen.add(rep.params)
        assert rep.seconds < 5
    assert len(seen) > 1   # the ranks differ (stages, shards), so the comparison is not of one number


def test_v3_rank0_report():
    """V3's first rank: stage 0 with the embedding and the last stage with head, MTP and the embedding's
    copy (DualPipeV's V puts both on pp rank 0, V3 §3.2.3); experts 0-3 of 256; its ep group of 64 spans
    8 nodes (V3 §3.2)."""
    cfg = load_config(str(RECIPES["deepseek_v3"]))
    rep = check.check_rank(cfg, 2048, 0)
    first, last = rep.stages
    assert (first.index, first.embed, last.index, last.head, last.mtp, last.embed_copy) == (0, True, 31, True, 1, True)
    assert rep.experts["first"] == 0 and rep.experts["last"] == 3 and rep.experts["of"] == 256
    assert rep.expert_nodes == list(range(8))
    assert {k: g["size"] for k, g in rep.groups.items()} == \
        {"dp": 128, "dp_tp": 128, "edp": 2, "ep": 64, "ep_inter": 8, "ep_intra": 8, "pp": 16, "tp": 1}
    assert rep.groups["edp"]["ranks"] == [0, 64]
    layers = sorted(i for s in rep.stages for i in s.layers)
    assert layers == list(range(len(layers)))


@pytest.mark.parametrize("name", ["deepseek_llm_7b", "deepseek_llm_67b", "deepseek_v2_lite"])
def test_cli_builds_the_default_ranks(name, capsys):
    """The recipes the tests above do not build: the command's default ranks, as JSON; tp = 1 ranks hold
    what the planner counts (the 67B's tp 2 split is the model's plan, which plan.memory does not read)."""
    cfg = load_config(str(RECIPES[name]))
    dims, p = dims_of(cfg, WORLD[name]), cfg.parallel
    assert check.main(["--config", str(RECIPES[name]), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in out] == check.default_ranks(dims) == \
        sorted({0, WORLD[name] // 2, WORLD[name] - dims.dp * dims.tp, WORLD[name] - 1})
    assert out[0]["stages"][0]["index"] == 0 and out[0]["stages"][0]["embed"]
    last = [s for r in out for s in r["stages"] if s["head"]]
    assert last and all(s["index"] == last[0]["index"] for s in last)   # on pp rank 0 (V layouts) or the last
    net = build_model(cfg.model_config(), device="meta")
    for r in out:
        if p.tp == 1:
            plan = rank_state(net, dims, r["rank"], schedule=p.pp_schedule, vpp=p.vpp, seq_len=cfg.data.seq_len,
                              moment_dtype=cfg.train.moment_dtype)
            assert (r["params"], r["weights"], r["grads"], r["optimizer"]) == \
                (plan.params, plan.weights, plan.grads, plan.optimizer)
        else:
            assert r["groups"]["tp"]["size"] == 2 and r["params"] > 0


def test_layout_that_does_not_divide_fails_with_the_runtimes_error(capsys):
    """160 routed experts over ep = 64: parallelize's own LayoutError, before any weight is allocated."""
    cfg = load_config(str(RECIPES["deepseek_v2"]), ["parallel.ep=64"])
    with pytest.raises(LayoutError, match="160 routed experts cannot be split evenly over parallel.ep = 64"):
        check.check_rank(cfg, 1024, 0)
    assert not dist.is_initialized()
    assert check.main(["--config", str(RECIPES["deepseek_v3"]), "--world", "1024"]) == 2
    assert "!= world size 1024" in capsys.readouterr().err


# -- the tiny twins ----------------------------------------------------------------------------------------
# recipe -> (tiny preset, world, layout overrides): the recipe's schedule, precision, FP8 and schedules of lr,
# MTP weight and bias speed at toy size, on 2 ranks (pp 2); tp and ep at these sizes are parallel/'s tests'
TWINS = {
    "deepseek_llm_7b": ("tiny-deepseek-llm-7b", 2, {}),
    "deepseek_llm_67b": ("tiny-deepseek-llm-67b", 2, {"parallel.tp": 1, "parallel.sp": False}),
    "deepseek_moe_16b": ("tiny-deepseek-moe-16b", 2, {}),
    "deepseek_v2_lite": ("tiny-deepseek-v2-lite", 2, {}),
    "deepseek_v2": ("tiny-deepseek-v2", 2, {"parallel.ep": 1}),
    "deepseek_v3": ("tiny-deepseek-v3", 2, {"parallel.ep": 1}),
}


def twin_overrides(name, corpus, run_dir) -> list[str]:
    preset, world, layout = TWINS[name]
    o = {"model.preset": preset, "model.vocab_size": 512, "data.embedded": True, "data.paths": [],
         "data.tokenizer": "", "data.cache_dir": str(corpus), "data.vocab_size": 512, "data.corpus_bytes": 400_000,
         "data.seq_len": 32, "data.split": "90,10,0", "train.steps": 3, "train.warmup_steps": 1,
         "train.micro_batch_size": 1, "train.global_batch_size": 8, "train.batch_ramp": [],
         "logging.wandb": "disabled", "logging.run_dir": str(run_dir), "checkpoint.every": 0,
         "checkpoint.async_save": False, "parallel.pp": 2, "parallel.dp": 1, "parallel.vpp": 2,
         "parallel.node_size": 2, **layout}
    return [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}" for k, v in o.items()]


def _train_twin(path, overrides):
    from pretrain.train import train
    assert train(load_config(path, overrides)) == 0


# measured on 2 cores: 11-17 s each when the machine is idle, up to 27 s under load (V2, V3: MLA, MoE, FP8)
SLOW_TWINS = {"deepseek_v2", "deepseek_v3"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TWINS else n for n in TWINS])
def test_tiny_twin_trains(name, corpus, tmp_path):
    _, world, _ = TWINS[name]
    run_ranks(world, _train_twin, str(RECIPES[name]), twin_overrides(name, corpus, tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in steps)   # finite
    saved = load_config(str(tmp_path / "config.yaml"))
    recipe = load_config(str(RECIPES[name]))
    for key in ("lr", "lr_schedule", "fp8", "moment_dtype", "dtype", "mtp_lambda", "bias_gamma"):
        assert getattr(saved.train, key) == getattr(recipe.train, key), key
    assert saved.parallel.pp_schedule == recipe.parallel.pp_schedule
