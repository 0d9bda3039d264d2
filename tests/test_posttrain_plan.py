"""plan/posttrain.py: the memory per rank of the post-training stages, and `python -m launch.plan --posttrain`.

The terms against numbers computed by hand or by the runtime's own placement rules (plan/memory.rank_state),
the components of each stage, the V3 recipes fitting on the GPUs their headers state (and an oversized
variant not fitting), and the command line's one-line errors."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from launch.plan import main as plan_main
from plan import posttrain as PT
from posttrain.config import load_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configs/posttrain/recipes"
# a tiny V3 (3 layers, MLA with kv_lora_rank 32 + qk_rope_head_dim 8, 8 routed experts, one MTP module)
TINY = ["model.preset=tiny-deepseek-v3", "parallel.pp=2", "parallel.ep=2", "data.seq_len=64",
        "rollout.max_new_tokens=24", "rollout.max_batch=2", "rollout.page_size=16", "rollout.ep=4",
        "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.beta=0.04", "train.micro_batch_size=1",
        "train.global_batch_size=8", "train.moment_dtype=bf16", "eval.every=0"]


def _tiny(stage: str, extra=(), n=4):
    return PT.posttrain_memory(load_config(None, TINY + list(extra)), stage, n, "H800")


def test_the_latent_cache_is_576_elements_per_token_per_layer_for_v3():
    from model import preset
    # V2 §2.1.3: (d_c + d_h^R) l elements; V3: 512 + 64, 61 layers, held in fp32 (4 B)
    assert PT.cache_bytes_per_token(preset("deepseek-v3")) == 61 * 576 * 4 == 140_544
    assert PT.cache_bytes_per_token(preset("deepseek-v3"), mtp=True) == 62 * 576 * 4
    assert PT.pool_pages(max_batch=3, tokens=100, page_size=16) == 3 * 7 + 1


def test_grpo_terms_equal_hand_and_runtime_counts():
    from model import build_model, preset
    from parallel.mesh import ParallelConfig, ParallelDims
    from plan.memory import rank_state

    m = _tiny("grpo")
    p = m.parts
    # the engine's pool: 2 sequences x ceil((40 + 24) / 16) = 4 pages, + scratch; 3 layers x (32 + 8) x 4 B
    assert p["kv_cache"] == (2 * 4 + 1) * 16 * 3 * 40 * 4 == 69_120
    assert p["refit_buffers"] == 2 * 64 * 2 ** 20
    # the policy's shard on the reported pp rank, as the runtime places it (dp rank 0, ep rank 0)
    net = build_model(preset("tiny-deepseek-v3"), device="meta")
    dims = ParallelDims.from_config(ParallelConfig(pp=2, ep=2), 4)
    rank = next(r for r in range(4) if dims.coords(r)["pp"] == m.rank and dims.coords(r)["dp"] == 0)
    st = rank_state(net, dims, rank, schedule="1f1b", seq_len=64, moment_dtype="bf16")
    assert (p["policy_weights"], p["policy_grads"], p["policy_optimizer"]) == (st.weights, st.grads, st.optimizer)
    assert st.optimizer == st.params * 2 * 2 and st.weights == st.params * 4
    assert p["reference"] == st.params * 4                      # frozen: the fp32 shard, no gradient or moments
    total = sum(q.numel() for q in net.parameters())
    assert p["rollout_copy"] == total * 4 / 4                    # pp = 1, FSDP2 over all 4 ranks
    static = sum(p[k] for k in ("policy_weights", "policy_grads", "policy_optimizer", "reference", "rollout_copy",
                                "refit_buffers", "kv_cache"))
    train = p["policy_gathered"] + p["activations"] + p["logits_and_working"]
    assert m.total == pytest.approx(static + max(train, p["rollout_gathered"]))
    assert m.bound >= m.total and m.fits


def test_compiled_rollouts_plan_one_process_and_a_plain_copy():
    """rollout.compile runs in one process; GRPO with a compute dtype then generates with a plain bf16 copy of every
    weight (nothing gathered while generating), as posttrain/grpo.py builds it."""
    from model import build_model, preset
    one = ["parallel.pp=1", "parallel.ep=1", "rollout.ep=1", "rollout.compile=true"]
    m = _tiny("grpo", [*one, "train.dtype=bf16"], n=1)
    total = sum(q.numel() for q in build_model(preset("tiny-deepseek-v3"), device="meta").parameters())
    assert m.parts["rollout_copy"] == 2 * total and m.parts["rollout_gathered"] == 0.0
    assert "plain copy, compiled" in m.rollout
    assert "rollout_copy" not in _tiny("grpo", one, n=1).parts   # fp32: the policy, a plain module, generates
    for stage, extra, n in (("grpo", one, 4), ("rejection", [*one, "train.dtype=bf16"], 1)):
        with pytest.raises(ValueError, match="rollout.compile runs the rollout's steps through torch.compile in one"):
            _tiny(stage, extra, n=n)


def test_policy_training_terms_are_the_planners():
    from model import build_model, preset
    from plan import planner as P

    m = _tiny("sft", ["parallel.pp=1", "parallel.ep=4", "train.moment_dtype=fp32"])
    net = build_model(preset("tiny-deepseek-v3"), device="meta")
    plan = P.evaluate(P.model_shape(net, 64), P.Cluster("H800", 4), P.Layout(ep=4, dp=4, zero=3), 8)
    gb = {k: v * P.GB for k, v in plan.memory.items() if k != "rank"}
    assert m.parts["policy_weights"] + m.parts["policy_grads"] + m.parts["policy_gathered"] == pytest.approx(
        gb["weights"] + gb["grads"])
    assert m.parts["policy_optimizer"] == pytest.approx(gb["optimizer"])
    assert m.parts["activations"] == pytest.approx(gb["activations"])
    assert m.total == pytest.approx(gb["total"]) and m.bound == m.total


def test_each_stage_has_its_components():
    policy = {"policy_weights", "policy_grads", "policy_optimizer", "policy_gathered", "activations",
              "logits_and_working"}
    rollout = {"rollout_copy", "refit_buffers", "kv_cache", "rollout_gathered"}
    assert set(_tiny("sft").parts) == policy
    assert set(_tiny("dpo").parts) == policy | {"reference"}
    assert set(_tiny("grpo").parts) == policy | {"reference"} | rollout
    assert set(_tiny("grpo", ["grpo.beta=0"]).parts) == policy | rollout
    # pp = 1 in the rollout layout's own tp and ep: the policy generates, no copy and no refresh
    same = _tiny("grpo", ["parallel.pp=1", "parallel.ep=4", "data.seq_len=256"], n=4).parts
    assert set(same) == policy | {"reference", "kv_cache", "rollout_gathered"}
    assert set(_tiny("rejection", ["parallel.pp=1"]).parts) == {"policy_weights", "kv_cache", "rollout_gathered"}


def test_a_dpo_micro_batch_is_two_rows():
    sft = _tiny("sft", ["parallel.pp=1", "parallel.ep=4"])
    dpo = _tiny("dpo", ["parallel.pp=1", "parallel.ep=4"])
    assert dpo.parts["activations"] == pytest.approx(2 * sft.parts["activations"])
    assert dpo.parts["reference"] == sft.parts["policy_weights"]


def _header_check(path: Path) -> list[str]:
    """The `python -m launch.plan --posttrain ...` line of a recipe's header, as arguments."""
    text = path.read_text()
    found = re.search(r"^#\s+python -m launch\.plan (--posttrain .*)$", text, re.M)
    assert found, f"{path}: no `python -m launch.plan --posttrain` line in the header"
    return shlex.split(found.group(1))


ALL = sorted(RECIPES.rglob("*.yaml"))


def test_every_recipe_is_checked():
    assert {p.relative_to(RECIPES).as_posix() for p in ALL} == {
        "r1_zero.yaml", "r1/1_cold_start_sft.yaml", "r1/2_reasoning_grpo.yaml", "r1/3_rejection.yaml",
        "r1/4_sft.yaml", "r1/5_grpo_all.yaml", "r1/distill_qwen2.5-1.5b.yaml"}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_recipes_fit_on_their_stated_gpus(path, capsys):
    args = _header_check(path)
    assert args[1] == path.relative_to(ROOT).as_posix() and "--gpus" in args and "--gpu" in args
    cfg = load_config(path)
    if PT.stage_of(path) in ("grpo", "sft") and cfg.model["preset"] == "deepseek-v3":
        assert cfg.parallel.pp > 1                                # V3's training layouts are pipelined
    if PT.stage_of(path) == "grpo":
        assert cfg.rollout.ep > 1 and cfg.rollout.tp >= 1
    assert plan_main([*args[:1], str(ROOT / args[1]), *args[2:]]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out, out


@pytest.mark.parametrize("name, change", [
    ("r1_zero.yaml", ["--gpus", "128", "parallel.ep=8"]),           # the header's "do not fit" claim
    ("r1_zero.yaml", ["rollout.max_batch=64"]),                     # a cache for 64 full-length sequences
    ("r1/1_cold_start_sft.yaml", ["parallel.recompute=none"]),      # 32k-token rows without recomputation
])
def test_oversized_variants_do_not_fit(name, change, capsys):
    args = _header_check(RECIPES / name)
    args = [*args[:1], str(ROOT / args[1]), *args[2:]]
    if change[0] == "--gpus":
        args[args.index("--gpus") + 1] = change[1]
        change = change[2:]
    assert plan_main(args + change) == 1
    assert "fits: no" in capsys.readouterr().out


@pytest.mark.parametrize("change, words", [
    ("rollout.ep=3", ["rollout.ep = 3", "256 routed experts"]),
    ("rollout.tp=3", ["rollout.tp = 3", "512 GPUs"]),
    ("parallel.pp=7", ["parallel.pp x parallel.tp = 7 x 8"]),
    ("parallel.ep=64", ["parallel.ep = 64", "dp x tp = 4 x 8"]),
    ("grpo.prompts_per_step=4 grpo.group_size=8", ["grpo.prompts_per_step x grpo.group_size = 32", "1f1b",
                                                   "8 micro-batches"]),
    ("data.seq_len=32800", ["data.seq_len = 32800", "data.seq_len >= 33792"]),
    ("eval.samples=1", ["eval.prompts x eval.samples = 256", "512 data-parallel ranks"]),
])
def test_a_layout_that_cannot_be_built_is_one_line_naming_the_key(change, words, capsys):
    rc = plan_main(["--posttrain", str(RECIPES / "r1_zero.yaml"), "--gpus", "512", *change.split(),
                    "--prompt-tokens", "1024"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


def test_the_pretraining_planner_is_unchanged(capsys):
    assert plan_main(["--model", "tiny-deepseek-v3", "--gpus", "8", "--global-batch", "16", "--seq-len", "64",
                      "--top", "1"]) == 0
    assert "layouts fit" in capsys.readouterr().out
