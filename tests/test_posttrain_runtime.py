"""The post-training runtime honours parallel.recompute and train.fp8 as pretraining does, and a stage that
only samples (rejection) gets no optimizer.

One GRPO update (test_grpo's fixed batch) under each setting, all in one spawned process: recomputation
changes neither the loss nor a gradient; FP8 (the CPU emulation) trains and generates, close to the
high-precision update.
"""
import functools
import json

import pytest
import torch

from distributed import run_ranks
from test_grpo import _config, _fixed_batch

VARIANTS = {"none": [], "full": ["parallel.recompute=full"], "selective": ["parallel.recompute=selective"],
            "fp8": ["train.fp8=blockwise", "train.fp8_backend=emulate"]}


def _modes(net):
    """(mode, wrapped) of every recompute unit: apply_recompute gives a unit an instance `forward`."""
    from parallel.recompute import is_recompute_unit, recompute_mode
    return [(recompute_mode(m), "forward" in vars(m)) for m in net.modules() if is_recompute_unit(m)]


def _count_calls(net, name):
    """Runs of every `name` submodule of the recompute units, forward and recomputation alike (an instance
    `forward`: selective recomputation calls module.forward directly, past any hook)."""
    from parallel.recompute import is_recompute_unit
    calls = [0]

    def counted(forward, *args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)
    for unit in [m for m in net.modules() if is_recompute_unit(m)]:
        sub = unit.get_submodule(name)
        sub.forward = functools.partial(counted, sub.forward)
    return calls


def variants_rank(task_dir, run_dir, out):
    import parallel
    from parallel.fp8 import Fp8Linear
    from posttrain.generate import SamplingParams
    from posttrain.grpo import GRPOTrainer
    results = {}
    for name, extra in VARIANTS.items():
        tr = GRPOTrainer(_config(task_dir, f"{run_dir}/{name}", *extra))
        sess = tr.session
        prompts, comps, adv, keep = _fixed_batch(tr, 4, 4)
        grads, step = {}, sess.optimizer_step

        def capture(loss, **kw):   # the gradients before clipping and AdamW, as test_grpo's update_rank
            grads.update({k: None if g is None else g.clone()
                          for k, g in parallel.full_state(sess.policy, sess.mesh, grads=True).items()})
            return step(loss, **kw)

        sess.optimizer_step = capture
        norm_calls = _count_calls(sess.policy, "attn_norm")   # listed in recompute_selective: re-run by both modes
        mlp_calls = _count_calls(sess.policy, "ffn")          # re-run by full only
        stats = tr.update(prompts, comps, adv, keep)
        calls = (norm_calls[0], mlp_calls[0])              # before decoding adds its own
        # generation after the step: KV-cache decoding under no_grad, recompute wrappers in place
        outs, _ = tr.gen.generate(prompts[::4], SamplingParams(max_new_tokens=8, temperature=1.0), seed=3)
        results[name] = {
            "stats": stats, "grads": {k: v.detach().clone() for k, v in grads.items() if v is not None},
            "policy_modes": _modes(sess.policy), "ref_modes": _modes(tr.ref), "calls": calls,
            "fp8_policy": sum(isinstance(m, Fp8Linear) for m in sess.policy.modules()),
            "fp8_ref": sum(isinstance(m, Fp8Linear) for m in tr.ref.modules()),
            "generated": [(c.ids, c.logprobs, c.finish) for c in outs]}
        sess.close()
    torch.save(results, out)


@pytest.fixture(scope="module")
def variants(task_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("variants")
    run_ranks(1, variants_rank, str(task_dir), str(d), str(d / "out.pt"))
    return torch.load(d / "out.pt")


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_gives_the_same_update(variants, mode):
    base, got = variants["none"], variants[mode]
    # really applied: every block (MTP's included) of the policy recomputes, the frozen reference never does
    assert len(base["policy_modes"]) == 4 and set(base["policy_modes"]) == {("none", False)}
    assert len(got["policy_modes"]) == 4 and set(got["policy_modes"]) == {(mode, True)}
    assert len(got["ref_modes"]) == 4 and set(got["ref_modes"]) == {("none", False)}
    # and it ran: a listed norm twice per forward under both modes, the MLP/MoE twice under full only
    norm, ffn = base["calls"]
    assert norm > 0 and got["calls"] == ((2 * norm, 2 * ffn) if mode == "full" else (2 * norm, ffn))
    for key in ("loss", "kl", "entropy", "grad_norm", "clip_fraction"):
        assert got["stats"][key] == pytest.approx(base["stats"][key], rel=1e-6, abs=1e-9), key
    assert base["grads"].keys() == got["grads"].keys() and len(base["grads"]) > 20
    for k, v in base["grads"].items():
        torch.testing.assert_close(got["grads"][k], v, rtol=1e-6, atol=1e-6 * max(v.abs().max().item(), 1e-12))
    assert got["generated"] == base["generated"]   # the wrappers step aside under no_grad (KV-cache decoding)


def test_fp8_policy_trains_and_generates(variants):
    base, got = variants["none"], variants["fp8"]
    assert base["fp8_policy"] == base["fp8_ref"] == 0
    assert got["fp8_policy"] > 0 and got["fp8_ref"] == got["fp8_policy"]   # the reference on the same recipe,
    assert got["stats"]["kl"] == 0.0                                        # so it equals the policy at step 0
    assert all(torch.isfinite(torch.tensor(v)) for v in got["stats"].values())
    # Measured on this batch: the loss moves by 3e-6 (relative; at this near-uniform init most tokens' ratios
    # are clipped, so the loss barely sees the log-probs), the whole gradient by 1.6% and grad_norm by 4e-4:
    # E4M3 keeps 3 mantissa bits (up to 6% rounding per element) and the dot products average much of it out.
    # Bounds at ~5-30x those: a broken scale or a missing dequantization gives O(1) errors; the lower bound
    # says FP8 really ran (the high-precision path would give exactly 0).
    assert got["stats"]["loss"] == pytest.approx(base["stats"]["loss"], rel=1e-4)
    assert got["stats"]["grad_norm"] == pytest.approx(base["stats"]["grad_norm"], rel=1e-2)
    g, g8 = base["grads"], got["grads"]
    assert g.keys() == g8.keys()
    err = sum((g8[k] - v).pow(2).sum() for k, v in g.items()).sqrt() / sum(v.pow(2).sum() for v in g.values()).sqrt()
    assert 1e-3 < err.item() < 0.08
    # KV-cache decoding on the FP8 linears: 4 prompts, up to 8 tokens each, finite log-probs
    assert len(got["generated"]) == 4 and all(0 < len(ids) == len(lp) <= 8 for ids, lp, _ in got["generated"])
    assert all(torch.isfinite(torch.tensor(lp)).all() for _, lp, _ in got["generated"])


def bad_backend_rank(task_dir, run_dir):
    from posttrain.grpo import GRPOTrainer
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError, match=r"train\.fp8_backend = torch: .*needs a CUDA device"):
        GRPOTrainer(_config(task_dir, run_dir, "train.fp8=blockwise", "train.fp8_backend=torch", "train.device=cpu"))


def test_fp8_backend_the_device_lacks_is_a_config_error(task_dir, tmp_path):
    run_ranks(1, bad_backend_rank, str(task_dir), str(tmp_path / "run"))


def rejection_rank(task_dir, out_dir):
    from posttrain.config import load_config
    from posttrain.rejection import RejectionSampler
    from pretrain.config import ConfigError
    cfg = load_config(None, [
        "model.preset=tiny-deepseek-v3", "model.vocab_size=256", f"init.tokenizer={task_dir}/tok.model",
        f"data.train_files=[{task_dir}/arithmetic_heldout.jsonl]", "data.template=chat", "rollout.max_new_tokens=8",
        "reward.weights={accuracy: 1.0}", "rejection.samples=2", "rejection.batch_prompts=16",
        f"rejection.output={out_dir}/sft.jsonl", f"rejection.samples_output={out_dir}/samples.jsonl",
        "logging.wandb=disabled", f"logging.run_dir={out_dir}/run"])
    rs = RejectionSampler(cfg)
    sess = rs.session
    assert sess.opt is None and not any(q.requires_grad for q in sess.policy.parameters())
    for call in (lambda: sess.optimizer_step(0.0), lambda: sess.save({})):
        with pytest.raises(RuntimeError, match="train=False"):
            call()
    sess.cfg.checkpoint.resume = f"{out_dir}/some_checkpoint"   # no run state to restore: said, not half-loaded
    with pytest.raises(ConfigError, match="checkpoint.resume = .*set checkpoint.resume=none"):
        sess.resume()
    sess.cfg.checkpoint.resume = "none"
    assert rs.run() == 0


def test_rejection_runtime_has_no_optimizer(task_dir, tmp_path):
    run_ranks(1, rejection_rank, str(task_dir), str(tmp_path))
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 64 and (tmp_path / "sft.jsonl").exists()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["samples"] == 64
