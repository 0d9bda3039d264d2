"""SFT under pipeline parallelism (issue 22 §1: post-training in the pretraining layout): the SFT step is
pretraining's, so under pp2 (1F1B and DualPipeV) it gives one process's loss terms and gradients on packed,
document-masked rows with MTP on; a checkpoint written under pp2 resumes in one process. Rejection sampling, which
only generates, refuses pp > 1 with the key to change (DPO and GRPO under pp: test_posttrain_stages, test_grpo)."""
import json

import pytest
import torch

from distributed import run_ranks

BASE = ["data.seq_len=64", "train.steps=2", "train.lr=3e-3", "train.warmup_steps=1", "train.micro_batch_size=4",
        "train.global_batch_size=16", "eval.every=0", "logging.wandb=disabled", "checkpoint.every=1"]


def _cfg(task_dir, run_dir, extra):
    from posttrain.config import load_config
    return load_config(None, [
        "model.preset=tiny-deepseek-v3", "model.vocab_size=256", f"init.tokenizer={task_dir}/tok.model",
        f"data.train_files=[{task_dir}/arithmetic_train.jsonl]", "data.template=chat",
        f"logging.run_dir={run_dir}", *BASE, *extra])


def sft_grads_rank(task_dir, run_dir, extra, out):
    """The first step's synchronised gradients of every stage this rank holds (gathered over tp/dp), saved
    per rank, and the run's metrics."""
    import torch.distributed as dist

    import parallel
    from posttrain.sft import SFTTrainer
    tr = SFTTrainer(_cfg(task_dir, run_dir, extra))
    sess, grads = tr.session, {}
    step = sess.optimizer_step

    def capture(loss, **kw):
        if not grads:
            for stage in sess.engine.stages:
                for k, g in parallel.full_state(stage, sess.mesh, grads=True).items():
                    if g is not None:
                        grads[k] = g.detach().clone()
        return step(loss, **kw)

    sess.optimizer_step = capture
    tr.run()
    torch.save(grads, f"{out}.{dist.get_rank()}")


def _grads(out, world):
    merged = {}
    for r in range(world):
        merged.update(torch.load(f"{out}.{r}"))
    return merged


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.fixture(scope="module")
def one_process(task_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_one")
    run_ranks(1, sft_grads_rank, str(task_dir), str(d / "run"), [], str(d / "g"))
    return _grads(d / "g", 1), _metrics(d / "run")


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_sft_under_pp2_equals_one_process(task_dir, tmp_path, schedule, one_process):
    run_ranks(2, sft_grads_rank, str(task_dir), str(tmp_path / "run"),
              ["parallel.pp=2", f"parallel.pp_schedule={schedule}"], str(tmp_path / "g"))
    grads, rows = _grads(tmp_path / "g", 2), _metrics(tmp_path / "run")
    one_grads, one_rows = one_process
    assert len(rows) == len(one_rows) == 2
    for a, b in zip(rows, one_rows):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a[key], b[key])
    assert grads.keys() == one_grads.keys() and len(grads) > 20
    for k, v in one_grads.items():
        scale = v.abs().max().item()
        torch.testing.assert_close(grads[k], v, rtol=1e-5, atol=1e-5 * max(scale, 1e-12), msg=k)


def sft_state_rank(task_dir, run_dir, extra, out):
    """Run, then save the parameters of every stage this rank holds, per rank."""
    import torch.distributed as dist

    import parallel
    from posttrain.sft import SFTTrainer
    tr = SFTTrainer(_cfg(task_dir, run_dir, extra))
    tr.run()
    state = {}
    for stage in tr.session.engine.stages:
        state.update({k: v.detach().clone() for k, v in parallel.full_state(stage, tr.session.mesh).items()})
    torch.save(state, f"{out}.{dist.get_rank()}")


def test_a_pp2_checkpoint_loads_and_resumes_in_one_process(task_dir, tmp_path):
    """Checkpoints are layout-free: the weights a pp2 run saved at step 1 are what one process loads, bit for
    bit, and one process resumes that run to step 2."""
    from posttrain.generate import load_for_sampling
    run = tmp_path / "run"
    run_ranks(2, sft_state_rank, str(task_dir), str(run), ["parallel.pp=2", "train.exit_at_step=1"],
              str(tmp_path / "s"))
    saved = _grads(tmp_path / "s", 2)
    net, _, info = load_for_sampling(str(run / "checkpoints"))
    assert info["step"] == 1
    loaded = dict(net.named_parameters())
    assert saved.keys() == loaded.keys()
    for k, v in saved.items():
        assert torch.equal(loaded[k].detach(), v), k
    run_ranks(1, sft_state_rank, str(task_dir), str(run), [], str(tmp_path / "t"))
    assert [r["step"] for r in _metrics(run)] == [1, 2]


def test_the_sampling_stage_refuses_pp(task_dir, tmp_path):
    """Rejection sampling only generates: a pipeline would serialise its decoding, so pp > 1 is refused by name."""
    from posttrain.stage import StageSession
    from pretrain.config import ConfigError
    from test_grpo import _config
    with pytest.raises(ConfigError, match=r"the rejection stage runs with parallel\.pp = 1.*set parallel\.pp=1"):
        StageSession(_config(task_dir, tmp_path / "g", "parallel.pp=2"), "rejection", train=False)
