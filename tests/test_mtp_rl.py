"""Training the MTP modules during GRPO (issue 23 §4, grpo.mtp_weight): the MTP cross-entropy on the main
model's detached outputs is pretraining's MTP term, its gradient reaches the MTP modules only, and their own
clipping keeps the policy's update bit for bit what it is without it (one process, tp2, ep2)."""
import dataclasses

import pytest
import torch

from distributed import run_ranks
from model.config import preset
from model.transformer import IGNORE_INDEX, Transformer
from test_grpo import _config, _fixed_batch


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-llama-3-8b"])
def test_detached_mtp_ce_is_the_mtp_term_and_reaches_only_the_mtp_modules(name):
    cfg = dataclasses.replace(preset(name), n_mtp=2)
    net = Transformer(cfg)
    net.init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = torch.roll(tokens, -1, 1)
    labels[:, :5] = IGNORE_INDEX
    n = (labels != IGNORE_INDEX).sum()
    with torch.no_grad():
        want = net.loss(tokens, labels, mtp_lambda=1.0)["mtp_loss"]
    out = net.token_logprobs(tokens, labels, mtp=True)
    torch.testing.assert_close(out["mtp_ce"] / n, want, rtol=1e-6, atol=0)   # V3 eq. 25 with lambda = 1
    out["mtp_ce"].backward()
    touched = {k for k, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(k.startswith("mtp.") for k in touched), sorted(k for k in touched if "mtp." not in k)
    assert touched == {k for k, _ in net.named_parameters() if k.startswith("mtp.")} - {
        k for k, p in net.named_parameters() if k.startswith("mtp.") and k.endswith("gate.bias")}
    # the policy's gradient is the same with the MTP term in the objective
    net.zero_grad()
    out = net.token_logprobs(tokens, labels)
    out["logprobs"].sum().backward()
    alone = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    out = net.token_logprobs(tokens, labels, mtp=True)
    (out["logprobs"].sum() + 3.0 * out["mtp_ce"]).backward()
    for k, g in alone.items():
        assert torch.equal(net.get_parameter(k).grad, g), k


def mtp_update_rank(task_dir, run_dir, extra, out):
    import torch.distributed as dist

    import parallel
    from posttrain.grpo import GRPOTrainer
    tr = GRPOTrainer(_config(task_dir, run_dir, "train.grad_clip=0.01", "grpo.inner_steps=2", *extra))
    prompts, comps, adv, keep = _fixed_batch(tr, 4, 4)
    dp, r = tr.session.dims.dp, tr.session.dp_rank
    n = len(prompts) // dp
    sl = slice(r * n, (r + 1) * n)
    grads, step = {}, tr.session.optimizer_step

    def capture(loss, **kw):   # the first inner step's synchronised gradients, before clipping and AdamW
        if not grads:   # (copies: in one process full_state returns the .grad tensors, which clipping scales)
            for stage in tr.session.engine.stages:
                grads.update({k: None if g is None else g.clone()
                              for k, g in parallel.full_state(stage, tr.session.mesh, grads=True).items()})
        return step(loss, **kw)

    tr.session.optimizer_step = capture
    stats = tr.update(prompts[sl], comps[sl], adv[sl], keep[sl])
    state = {}
    for stage in tr.session.engine.stages:
        state.update({k: v.detach().clone() for k, v in parallel.full_state(stage, tr.session.mesh).items()})
    every = [None] * dist.get_world_size()   # under pp each rank holds its stages' share
    dist.all_gather_object(every, (state, {k: v for k, v in grads.items() if v is not None}))
    if dist.get_rank() == 0:
        torch.save({"params": {k: v for s, _ in every for k, v in s.items()}, "stats": stats,
                    "grads": {k: v for _, g in every for k, v in g.items()}}, out)


@pytest.fixture(scope="module")
def updates(task_dir, tmp_path_factory):
    """One process's update without and with the MTP modules trained (clipping active: grad_clip 0.01)."""
    d = tmp_path_factory.mktemp("mtp_rl")
    out = {}
    for weight in ("0", "0.5"):
        run_ranks(1, mtp_update_rank, str(task_dir), str(d / weight), [f"grpo.mtp_weight={weight}"],
                  str(d / f"{weight}.pt"))
        out[weight] = torch.load(d / f"{weight}.pt")
    return out


def test_training_mtp_leaves_the_policys_update_unchanged(updates):
    off, on = updates["0"], updates["0.5"]
    assert on["stats"]["grad_norm"] == off["stats"]["grad_norm"] > 0.01          # the policy's norm, clipped
    assert on["stats"]["grad_norm_mtp"] > 0 and "grad_norm_mtp" not in off["stats"]
    assert on["stats"]["mtp_loss"] > 0 and "mtp_loss" not in off["stats"]
    for key in ("loss", "kl", "clip_fraction", "entropy"):
        assert on["stats"][key] == off["stats"][key], key
    moved = 0
    for k, v in off["params"].items():
        if k.startswith("mtp."):
            moved += not torch.equal(on["params"][k], v)
        else:
            assert torch.equal(on["params"][k], v), k
    assert moved > 10


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.ep=2"],
                                    ["parallel.pp=2", "data.seq_len=64", "train.micro_batch_size=4"]])
def test_mtp_training_under_tp_and_ep_equals_one_process(task_dir, tmp_path, layout, updates):
    run_ranks(2, mtp_update_rank, str(task_dir), str(tmp_path / "two"), ["grpo.mtp_weight=0.5", *layout],
              str(tmp_path / "two.pt"))
    one, two = updates["0.5"], torch.load(tmp_path / "two.pt")
    for key in ("mtp_loss", "grad_norm_mtp", "grad_norm", "loss"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-5), key
    # gradients, not parameters: AdamW's first step is sign(g), which a last-bit difference of a g ~ 0 flips
    assert one["grads"].keys() == two["grads"].keys() and sum(k.startswith("mtp.") for k in one["grads"]) > 10
    for k, v in one["grads"].items():
        scale = v.abs().max().item()
        torch.testing.assert_close(two["grads"][k], v, rtol=1e-5, atol=1e-5 * max(scale, 1e-12), msg=k)


@pytest.mark.parametrize("extra, words", [
    (["grpo.mtp_weight=-1"], "grpo.mtp_weight must be >= 0"),
    (["grpo.mtp_weight=0.3", "model.n_mtp=0"], "model.n_mtp = 0"),
])
def test_mtp_weight_is_checked(task_dir, tmp_path, extra, words):
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        _config(task_dir, tmp_path, *extra)
