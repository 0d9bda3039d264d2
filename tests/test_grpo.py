"""The GRPO stage: one update under tp2 and ep2 (dp2) against one process, the metrics a run writes,
exact resume, rows alignment, and the collapse guard."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from model.transformer import IGNORE_INDEX
from posttrain.generate import Completion
from posttrain.grpo import CollapseError, GRPOTrainer, training_rows


def _config(task_dir, run_dir, *extra):
    from posttrain.config import load_config
    return load_config(None, _args(task_dir, run_dir, *extra))


def _args(task_dir, run_dir, *extra):
    return [
        "model.preset=tiny-deepseek-v3", "model.vocab_size=256", f"init.tokenizer={task_dir}/tok.model",
        f"data.train_files=[{task_dir}/arithmetic_train.jsonl]",
        f"data.valid_files=[{task_dir}/arithmetic_heldout.jsonl]",
        "data.template=chat", "rollout.max_new_tokens=12", "rollout.stop=['</answer>']", "grpo.group_size=4",
        "grpo.prompts_per_step=4", "grpo.beta=0.04", "train.steps=2", "train.lr=1e-3", "train.lr_schedule=constant",
        "train.warmup_steps=0", "train.micro_batch_size=8", "reward.weights={accuracy: 1.0, format: 0.1}",
        "eval.every=2", "eval.prompts=8", "logging.wandb=disabled", f"logging.run_dir={run_dir}", *extra]


def test_training_rows_alignment():
    c = [Completion([5, 6], [7, 8, 2], "", [-0.1, -0.2, -0.3], "eod"), Completion([5], [9], "", [-0.5], "length")]
    tokens, targets, old = training_rows([[5, 6], [5]], c, multiple=4, pad=0)
    assert tokens.tolist() == [[5, 6, 7, 8, 2, 0, 0, 0], [5, 9, 0, 0, 0, 0, 0, 0]]
    ig = IGNORE_INDEX
    assert targets.tolist() == [[ig, 7, 8, 2, ig, ig, ig, ig], [9, ig, ig, ig, ig, ig, ig, ig]]
    torch.testing.assert_close(old[0, 1:4], torch.tensor([-0.1, -0.2, -0.3]))
    assert old[1, 0] == -0.5 and old[1, 1:].abs().sum() == 0


def _fixed_batch(trainer, n_prompts, G):
    """Deterministic prompts and completions (random tokens, their own old log-probs) and advantages."""
    g = torch.Generator().manual_seed(7)
    prompts, comps = [], []
    for r in trainer.train_records[:n_prompts]:
        p = trainer.encode(r)
        for _ in range(G):
            n = int(torch.randint(2, 9, (1,), generator=g))
            ids = torch.randint(3, 200, (n,), generator=g).tolist()
            lp = (-torch.rand(n, generator=g) * 3).tolist()
            prompts.append(p)
            comps.append(Completion(p, ids, "", lp, "length"))
    adv = torch.randn(len(prompts), generator=g, dtype=torch.float64)
    keep = torch.ones(len(prompts), dtype=torch.float64)
    keep[:G] = 0                                     # one dropped group
    return prompts, comps, adv, keep


def update_rank(task_dir, run_dir, layout, out):
    import torch.distributed as dist
    import parallel
    cfg = _config(task_dir, run_dir, *layout)
    tr = GRPOTrainer(cfg)
    prompts, comps, adv, keep = _fixed_batch(tr, 4, 4)
    dp, r = tr.session.dims.dp, tr.session.dp_rank
    n = len(prompts) // dp
    sl = slice(r * n, (r + 1) * n)
    grads = {}
    step = tr.session.optimizer_step

    def capture(loss, **kw):   # the synchronised gradients, before AdamW (whose first step is sign(g): in fp32 a
        # last-bit g ~ 0 flips it); copies: in one process full_state returns the .grad tensors, which clipping scales
        grads.update({k: None if g is None else g.clone()
                      for k, g in parallel.full_state(tr.session.policy, tr.session.mesh, grads=True).items()})
        return step(loss, **kw)

    tr.session.optimizer_step = capture
    stats = tr.update(prompts[sl], comps[sl], adv[sl], keep[sl])
    if dist.get_rank() == 0:
        torch.save({"grads": {k: v.detach().clone() for k, v in grads.items() if v is not None}, "stats": stats}, out)


@pytest.fixture(scope="module")
def one_process_update(task_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    run_ranks(1, update_rank, str(task_dir), str(d / "run"), [], str(d / "one.pt"))
    return torch.load(d / "one.pt")


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.ep=2"]])
def test_update_under_tp_and_ep_equals_one_process(task_dir, tmp_path, layout, one_process_update):
    run_ranks(2, update_rank, str(task_dir), str(tmp_path / "two"), layout, str(tmp_path / "two.pt"))
    one, two = one_process_update, torch.load(tmp_path / "two.pt")
    for key in ("loss", "kl", "clip_fraction", "entropy", "grad_norm", "logprob_mismatch"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-5, abs=1e-7), key
    assert one["stats"]["grad_norm"] > 0 and one["stats"]["kl"] == 0.0   # the reference equals the policy
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 20
    for k, v in one["grads"].items():
        scale = v.abs().max().item()
        torch.testing.assert_close(two["grads"][k], v, rtol=1e-5, atol=1e-5 * max(scale, 1e-12))


def correction_rank(task_dir, run_dir, extra, out):
    """One update with TIS and off-policy sequence masking on, and the same quantities from the formulas."""
    from parallel import sequence_multiple
    tr = GRPOTrainer(_config(task_dir, run_dir, "grpo.old_logprobs=recompute", "grpo.tis_cap=2", *extra))
    prompts, comps, adv, keep = _fixed_batch(tr, 4, 4)
    sess = tr.session
    multiple = sequence_multiple(sess.dims, sess.model_cfg.is_moe)
    tokens, targets, rollout = training_rows(prompts, comps, multiple, sess.tokenizer.eod_id)
    with torch.no_grad():
        old = torch.cat([sess.policy.token_logprobs(tokens[i:i + 8], targets[i:i + 8],
                                                    temperature=tr.sampling.temperature or 1.0)["logprobs"]
                         for i in range(0, len(prompts), 8)])
    mask = (targets != IGNORE_INDEX).float() * keep.float()[:, None]
    w = (old - rollout).exp().clamp(max=2)
    seq_kl = ((rollout - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    counted = mask.sum(-1) > 0
    negative = (adv < 0) & counted
    delta = float(seq_kl[negative].median())        # a threshold that masks some negatives, not all
    tr.cfg.grpo.offpolicy_mask = delta
    expected = {"mismatch_kl": float(((rollout - old) * mask).sum() / mask.sum()),
                "is_weight_mean": float((w * mask).sum() / mask.sum()), "is_weight_max": float((w * mask).max()),
                "offpolicy_masked_fraction": float((negative & (seq_kl > delta)).sum() / counted.sum())}
    stats = tr.update(prompts, comps, adv, keep)
    torch.save({"stats": stats, "expected": expected}, out)


def test_mismatch_correction_follows_its_formulas(task_dir, tmp_path):
    run_ranks(1, correction_rank, str(task_dir), str(tmp_path / "run"), [], str(tmp_path / "c.pt"))
    got = torch.load(tmp_path / "c.pt")
    for key, value in got["expected"].items():
        assert got["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert 0 < got["expected"]["offpolicy_masked_fraction"] < 0.5 and got["expected"]["is_weight_max"] <= 2


@pytest.mark.parametrize("extra, words", [
    (["grpo.tis_cap=2"], "grpo.old_logprobs=recompute"),
    (["grpo.tis_cap=0.5", "grpo.old_logprobs=recompute"], "grpo.tis_cap must be 0 (off) or a cap >= 1"),
    (["grpo.offpolicy_mask=-1"], "grpo.offpolicy_mask must be >= 0"),
])
def test_mismatch_correction_settings_are_checked(task_dir, tmp_path, extra, words):
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        _config(task_dir, tmp_path, *extra)


def run_rank(task_dir, run_dir, extra, out):
    import torch.distributed as dist
    import parallel
    tr = GRPOTrainer(_config(task_dir, run_dir, *extra))
    tr.run()
    state = parallel.full_state(tr.session.policy, tr.session.mesh)
    if dist.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in state.items()}, out)


def test_run_writes_metrics_and_resumes_exactly(task_dir, tmp_path):
    run_ranks(1, run_rank, str(task_dir), str(tmp_path / "a"), [], str(tmp_path / "a.pt"))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval_accuracy" in rows[0]
    for key in ("reward_mean", "reward_std", "accuracy", "format_rate", "kl", "clip_fraction", "entropy",
                "response_length_mean", "response_length_max", "rollout_tokens_per_s", "train_tokens_per_s",
                "dropped_fraction"):
        assert key in rows[1], key
    assert "eval_accuracy" in rows[-1] and rows[-1]["step"] == 2
    # stop after step 1, then resume: the same parameters as the uninterrupted run
    run_ranks(1, run_rank, str(task_dir), str(tmp_path / "b"), ["train.steps=1"], str(tmp_path / "b1.pt"))
    run_ranks(1, run_rank, str(task_dir), str(tmp_path / "b"), [], str(tmp_path / "b.pt"))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=k)


def eval_rank(task_dir, run_dir, extra):
    tr = GRPOTrainer(_config(task_dir, run_dir, "eval.prompts=8", *extra))
    try:
        metrics = tr.evaluate()
    finally:
        tr.session.close()
    if tr.session.rank == 0:
        (tr.session.run_dir / "metrics_eval.json").write_text(json.dumps(metrics))


@pytest.mark.parametrize("layout", [[], ["parallel.ep=2"]])
def test_evaluation_writes_every_prompts_score(task_dir, tmp_path, layout):
    """pass@1 over k samples per prompt (R1's protocol), one row per held-out prompt in order, whatever the
    data-parallel split; the rows' mean is the logged accuracy."""
    world = 2 if layout else 1
    run_ranks(world, eval_rank, str(task_dir), str(tmp_path / "r"),
              ["eval.samples=3", "eval.temperature=0.6", "eval.top_p=0.95", *layout])
    metrics = json.loads((tmp_path / "r" / "metrics_eval.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "r" / "eval" / "step_00000000.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(8)) and metrics["eval_samples"] == 3
    held = [json.loads(x) for x in (task_dir / "arithmetic_heldout.jsonl").read_text().splitlines()][:8]
    assert [r["prompt"] for r in rows] == [h["prompt"] for h in held]
    assert all(r["accuracy"] in (0, 1 / 3, 2 / 3, 1) for r in rows)
    assert metrics["eval_accuracy"] == pytest.approx(sum(r["accuracy"] for r in rows) / 8)
    assert metrics["eval_format"] == pytest.approx(sum(r["format"] for r in rows) / 8)


def test_eval_samples_need_a_temperature(task_dir, tmp_path):
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError, match="eval.samples = 4.*eval.temperature > 0"):
        _config(task_dir, tmp_path, "eval.samples=4")
    with pytest.raises(ConfigError, match="eval.top_p"):
        _config(task_dir, tmp_path, "eval.top_p=0")


def test_collapse_guard(task_dir, tmp_path):
    cfg = _config(task_dir, tmp_path / "c", "grpo.entropy_floor=0.5", "grpo.collapse_patience=2")
    guard = GRPOTrainer.guard
    fake = type("T", (), {"cfg": cfg, "low_streak": {"entropy": 0, "length": 0},
                          "session": type("S", (), {"ckpt_dir": tmp_path})()})()
    guard(fake, 0.4, 10.0)
    with pytest.raises(CollapseError, match="entropy collapsed"):
        guard(fake, 0.3, 10.0)
    guard(fake, 0.9, 10.0)          # recovered: the streak restarts
    assert fake.low_streak["entropy"] == 0


def sft_rank(task_dir, run_dir, extra, out):
    import torch.distributed as dist
    import parallel
    from posttrain.config import load_config
    from posttrain.sft import SFTTrainer
    cfg = load_config(None, [
        "model.preset=tiny-deepseek-v3", "model.vocab_size=256", f"init.tokenizer={task_dir}/tok.model",
        f"data.train_files=[{task_dir}/arithmetic_train.jsonl]",
        f"data.valid_files=[{task_dir}/arithmetic_heldout.jsonl]",
        "data.template=chat", "data.seq_len=64", "train.steps=4", "train.lr=3e-3", "train.warmup_steps=1",
        "train.micro_batch_size=4", "train.global_batch_size=8", "eval.every=4", "logging.wandb=disabled",
        f"logging.run_dir={run_dir}", *extra])
    tr = SFTTrainer(cfg)
    tr.run()
    if dist.get_rank() == 0:
        state = parallel.full_state(tr.session.policy, tr.session.mesh)
        torch.save({k: v.detach().clone() for k, v in state.items()}, out)


def test_sft_packed_rows_train_and_resume_exactly(task_dir, tmp_path):
    """The SFT stage on packed, document-masked rows: the loss falls, validation is logged, and
    2 steps + resume + 2 steps equal 4 steps (the iterator position is in the checkpoint)."""
    run_ranks(1, sft_rank, str(task_dir), str(tmp_path / "a"), [], str(tmp_path / "a.pt"))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 4 and train[-1]["loss"] < train[0]["loss"]
    assert "val_lm_loss" in rows[0] and "val_lm_loss" in rows[-1] and rows[-1]["val_lm_loss"] < rows[0]["val_lm_loss"]
    run_ranks(1, sft_rank, str(task_dir), str(tmp_path / "b"), ["train.steps=4", "train.exit_at_step=2"],
              str(tmp_path / "b1.pt"))
    run_ranks(1, sft_rank, str(task_dir), str(tmp_path / "b"), [], str(tmp_path / "b.pt"))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=k)


def engines_rank(task_dir, run_dir, out):
    from posttrain.engine import Engine, rollout_engine
    from posttrain.generate import Generator
    tr = GRPOTrainer(_config(task_dir, run_dir, "rollout.temperature=0", "rollout.draft_tokens=1"))
    assert isinstance(tr.gen, Engine) and tr.gen.draft_tokens == 1
    prompts = [tr.encode(r) for r in tr.train_records[:3] for _ in range(2)]
    static = rollout_engine(tr.session.policy, tr.session.tokenizer, tr.cfg.rollout.__class__(engine="static"))
    assert isinstance(static, Generator)
    runs = [g.generate(prompts, tr.sampling, seed=0)[0] for g in (tr.gen, static)]
    torch.save([[c.ids for c in run] for run in runs], out)


def test_rollouts_come_from_the_configured_engine(task_dir, tmp_path):
    """The paged engine with MTP drafts samples, at temperature 0, the static generator's greedy tokens."""
    run_ranks(1, engines_rank, str(task_dir), str(tmp_path / "run"), str(tmp_path / "ids.pt"))
    paged, static = torch.load(tmp_path / "ids.pt")
    assert paged == static and any(len(ids) > 1 for ids in paged)


def test_bf16_update_with_mtp_modules_runs(task_dir, tmp_path):
    """The policy's forward skips the MTP blocks; under bf16 (FSDP2 mixed precision) their units must still
    pass FSDP2's end-of-backward post-processing (which failed with "no attribute '_unsharded_param'")."""
    run_ranks(1, run_rank, str(task_dir), str(tmp_path / "a"), ["train.steps=1", "eval.every=0", "train.dtype=bf16"],
              str(tmp_path / "a.pt"))
    row = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and row["loss"] == row["loss"]


def compiled_rank(task_dir, run_dir, extra, out):
    """run_rank with rollout.compile: the steps traced by dynamo and run by eager kernels (the "eager" backend:
    inductor's C++ build takes minutes here), checking that they ran compiled and what generated."""
    import posttrain.engine as engine
    import posttrain.generate as generate
    from parallel.data_parallel import is_fsdp
    generate.COMPILE_BACKEND = "eager"
    tr = GRPOTrainer(_config(task_dir, run_dir, "rollout.compile=true", *extra))
    tr.run()
    assert tr.gen.compile and not is_fsdp(tr.gen_model)   # a plain model generates
    assert (tr.gen_model is tr.session.policy) == (not is_fsdp(tr.session.policy))   # a copy only of an FSDP2 one
    assert {engine.decode_step, engine.speculation_step} & set(generate._COMPILED)
    tr.session.close()
    import parallel
    torch.save({k: v.detach().clone() for k, v in parallel.full_state(tr.session.policy, tr.session.mesh).items()},
               out)


@pytest.mark.parametrize("extra", [[], ["train.dtype=bf16", "rollout.draft_tokens=1"]])
def test_compiled_rollouts_give_the_eager_run(task_dir, tmp_path, extra):
    """rollout.compile (one process) changes nothing but speed: the same metrics (routing recorded as the rollout
    goes, for routing_mismatch) and parameters as the eager run. In fp32 the policy generates; in bf16 the policy is
    an FSDP2 module, so a plain bf16 copy of it generates, refreshed after each update."""
    extra = ["train.steps=2", "eval.every=0", *extra]
    run_ranks(1, run_rank, str(task_dir), str(tmp_path / "a"), extra, str(tmp_path / "a.pt"))
    run_ranks(1, compiled_rank, str(task_dir), str(tmp_path / "b"), extra, str(tmp_path / "b.pt"))
    rows = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    for eager, comp in zip(*rows):
        timed = [k for k in eager if "per_s" in k or "seconds" in k or k.startswith(("time", "mem"))]
        assert {k: v for k, v in comp.items() if k not in timed} == {k: v for k, v in eager.items() if k not in timed}
    assert len(rows[0]) == len(rows[1]) == 2 and "routing_mismatch" in rows[0][-1]
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=k)


def test_speculative_rollouts_log_their_acceptance(task_dir, tmp_path):
    run_ranks(1, run_rank, str(task_dir), str(tmp_path / "a"), ["train.steps=1", "eval.every=0",
                                                               "rollout.draft_tokens=2"], str(tmp_path / "a.pt"))
    row = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= row["rollout_acceptance"] <= 1.0 and row["step"] == 1


@pytest.mark.parametrize("extra, words", [
    (["rollout.engine=vllm"], "rollout.engine"),
    (["rollout.draft_tokens=-1"], "rollout.draft_tokens must be >= 0"),
    (["rollout.engine=static", "rollout.draft_tokens=1"], "needs rollout.engine=paged"),
    (["model.n_mtp=0", "rollout.draft_tokens=1"], "model.n_mtp is 0"),
    (["rollout.page_size=0"], "rollout.page_size must be >= 1"),
    (["parallel.cp=2"], "post-training runs with parallel.cp = 1"),
])
def test_rollout_engine_settings_are_checked(task_dir, tmp_path, extra, words):
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        _config(task_dir, tmp_path, *extra)


# -- bad data stops the run at load, in one line ------------------------------------------------------
def _main(tmp_path, task_dir, *extra) -> int:
    from posttrain.grpo import main
    (tmp_path / "empty.yaml").write_text("{}\n")
    return main(["--config", str(tmp_path / "empty.yaml"), *_args(task_dir, tmp_path / "run", *extra)])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_prompt_stream_refuses_no_records():
    from posttrain.grpo import PromptStream
    with pytest.raises(ValueError, match="at least one prompt record"):
        PromptStream([], seed=0)


def test_empty_prompt_file_stops_at_load(task_dir, tmp_path):
    """It used to spin forever at 100% CPU (PromptStream.take on no records): run in a process with a timeout."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    (tmp_path / "empty.yaml").write_text("{}\n")
    args = _args(task_dir, tmp_path / "run", f"data.train_files=[{empty}]", "eval.every=0")
    proc = subprocess.run([sys.executable, "-m", "posttrain.grpo", "--config", str(tmp_path / "empty.yaml"), *args],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: data.train_files: {empty}: no records (the file is empty or holds only "
                                   "blank lines); write prompt records ({\"prompt\": ...} or {\"messages\": [...]}) "
                                   "into it, one JSON object per line, or take it out of the file list")


def test_empty_validation_file_stops_at_load(task_dir, tmp_path, capsys):
    """It used to be silent: evaluate() returned {} and no eval_accuracy was ever logged."""
    empty = tmp_path / "heldout.jsonl"
    empty.write_text("")
    assert _main(tmp_path, task_dir, f"data.valid_files=[{empty}]", "train.steps=1") == 2
    assert _one_error_line(capsys).startswith(f"error: data.valid_files: {empty}: no records")
    assert not (tmp_path / "run").exists()          # stopped before the run directory or the model


@pytest.mark.parametrize("extra, words", [
    (["data.valid_files=[]"], ["eval.every = 2 but data.valid_files is empty", "eval.every=0"]),
    (["eval.prompts=0"], ["eval.prompts = 0 with 32 held-out prompts", "eval.every=0"]),
])
def test_evaluation_that_would_score_nothing_stops_at_load(task_dir, tmp_path, capsys, extra, words):
    assert _main(tmp_path, task_dir, "train.steps=1", *extra) == 2
    err = _one_error_line(capsys)
    for w in words:
        assert w in err, (w, err)


LONG = {"prompt": "Compute " + " + ".join(["12"] * 16) + ".", "answer": "192"}


@pytest.mark.parametrize("split", ["train", "valid"])
def test_a_prompt_too_long_for_its_reply_is_named_at_load(task_dir, tmp_path, capsys, split):
    """The longest prompt (encoded with the template, as the generator receives it) + the reply budget must fit
    model.max_seq_len; it used to crash (ValueError in generate) on the batch that first drew it."""
    from posttrain.data import encode_prompt
    from pretrain.tokenizer import load_tokenizer
    n = len(encode_prompt("chat", load_tokenizer(str(task_dir / "tok.model")), LONG))
    lines = (task_dir / f"arithmetic_{'train' if split == 'train' else 'heldout'}.jsonl").read_text().splitlines()
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(lines[:2] + [json.dumps(LONG)] + lines[2:4]) + "\n")
    key = "data.train_files" if split == "train" else "data.valid_files"
    budget = ["rollout.max_new_tokens=12"] if split == "train" else ["eval.max_new_tokens=20"]
    name = "rollout.max_new_tokens (12)" if split == "train" else "eval.max_new_tokens (20)"
    new = 12 if split == "train" else 20
    common = [f"{key}=[{f}]", "train.steps=1", "eval.every=0" if split == "train" else "eval.every=1", *budget]
    assert _main(tmp_path, task_dir, *common, f"model.max_seq_len={n + new - 1}") == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"error: {key}: {f}:3: this prompt is {n} tokens with the chat template, and {n} + {name} = "
                          f"{n + new} exceeds model.max_seq_len = {n + new - 1}"), err
    assert f"raise model.max_seq_len to {n + new}" in err and f"lower {name.split()[0]} to {new - 1}" in err
    # one token more and it fits: the check counts exactly what the generator allocates
    tr = GRPOTrainer(_config(task_dir, tmp_path / "fits", *common, f"model.max_seq_len={n + new}"))
    try:
        params = tr.sampling if split == "train" else None
        if params is None:
            from posttrain.generate import SamplingParams
            params = SamplingParams(max_new_tokens=new, temperature=0.0)
        out, _ = tr.gen.generate([tr.encode(LONG)], params)
        assert len(out[0].ids) <= new
    finally:
        tr.session.close()
        import torch.distributed as dist
        if dist.is_initialized():  # the trainer joined a one-rank group in this process: leave none behind
            dist.destroy_process_group()


# -- GRPO under a pipeline, generating under its own layout (issue 22 §1) ----------------------------------------
PP = ["data.seq_len=64", "train.micro_batch_size=4"]


def update_pipeline_rank(task_dir, run_dir, layout, out):
    """update_rank under a pipeline: every stage's synchronised gradients, per rank."""
    import torch.distributed as dist
    import parallel
    tr = GRPOTrainer(_config(task_dir, run_dir, *PP, *layout))
    prompts, comps, adv, keep = _fixed_batch(tr, 4, 4)
    sess = tr.session
    n = len(prompts) // sess.dims.dp
    sl = slice(sess.dp_rank * n, (sess.dp_rank + 1) * n)
    grads, step = {}, sess.optimizer_step

    def capture(loss, **kw):
        for stage in sess.engine.stages:
            grads.update({k: g.detach().clone() for k, g in parallel.full_state(stage, sess.mesh, grads=True).items()
                          if g is not None})
        return step(loss, **kw)

    sess.optimizer_step = capture
    stats = tr.update(prompts[sl], comps[sl], adv[sl], keep[sl])
    torch.save({"grads": grads, "stats": stats}, f"{out}.{dist.get_rank()}")


def _check_update_equal(one, ranks):
    grads = {k: v for r in ranks for k, v in r["grads"].items()}
    for r in ranks:
        for key in ("loss", "kl", "clip_fraction", "entropy", "grad_norm", "logprob_mismatch"):
            assert r["stats"][key] == pytest.approx(one["stats"][key], rel=1e-5, abs=1e-7), key
    assert grads.keys() == one["grads"].keys() and len(grads) > 20
    for k, v in one["grads"].items():
        scale = v.abs().max().item()
        torch.testing.assert_close(grads[k], v, rtol=1e-5, atol=1e-5 * max(scale, 1e-12), msg=k)


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_update_under_pp2_equals_one_process(task_dir, tmp_path, schedule, one_process_update):
    """The GRPO step through a pipeline (the objective on the last stage, the reference scored through the
    stages, rows padded to data.seq_len) gives one process's loss terms and gradients."""
    run_ranks(2, update_pipeline_rank, str(task_dir), str(tmp_path / "run"),
              ["parallel.pp=2", f"parallel.pp_schedule={schedule}"], str(tmp_path / "pp"))
    _check_update_equal(one_process_update, [torch.load(f"{tmp_path / 'pp'}.{r}") for r in range(2)])


@pytest.mark.slow
def test_update_under_pp2_ep2_equals_one_process(task_dir, tmp_path, one_process_update):
    run_ranks(4, update_pipeline_rank, str(task_dir), str(tmp_path / "run"), ["parallel.pp=2", "parallel.ep=2"],
              str(tmp_path / "pp"))
    _check_update_equal(one_process_update, [torch.load(f"{tmp_path / 'pp'}.{r}") for r in range(4)])


def pipeline_run_rank(task_dir, run_dir, extra, out):
    """A greedy GRPO run (its rollouts and evaluations then depend on the weights alone, not on how the
    sequences are seeded or split), with the generating model's weights after the last refresh."""
    import torch.distributed as dist
    import parallel
    tr = GRPOTrainer(_config(task_dir, run_dir, *PP, "rollout.temperature=0", "eval.every=1", *extra))
    tr.run()
    tr.sample([tr.encode(tr.train_records[0])] * 2, tr.sampling, 0)   # refreshes after the last update
    state = parallel.full_state(tr.gen_model, tr.gen_mesh)
    if dist.get_rank() == 0:
        torch.save({k: v.detach().clone() for k, v in state.items()}, out)


def test_pp2_run_generates_under_its_rollout_layout(task_dir, tmp_path):
    """pp2 training with rollouts under ep2 (dp2): after each update the rollout copy is refreshed shard to shard,
    and the run logs one process's rollouts, evaluations and updates (greedy sampling, so the sequences do not
    depend on the generating rank's seed)."""
    run_ranks(1, pipeline_run_rank, str(task_dir), str(tmp_path / "one"), [], str(tmp_path / "one.pt"))
    run_ranks(2, pipeline_run_rank, str(task_dir), str(tmp_path / "pp"), ["parallel.pp=2", "rollout.ep=2"],
              str(tmp_path / "pp.pt"))
    rows = {}
    for name in ("one", "pp"):
        rows[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows["pp"]] == [r["step"] for r in rows["one"]] == [0, 1, 2]
    for a, b in zip(rows["pp"], rows["one"]):
        for key in ("eval_accuracy", "eval_format", "reward_mean", "response_length_mean", "accuracy", "loss", "kl",
                    "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    one, pp = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "pp.pt")
    assert one.keys() == pp.keys()
    for k, v in one.items():
        torch.testing.assert_close(pp[k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("extra, words", [
    (["rollout.tp=3"], "rollout.tp = 3"),
    (["rollout.ep=-1"], "rollout.ep must be >= 1"),
    (["rollout.ep=3"], "rollout.ep = 3"),
    (["data.seq_len=16"], "set data.seq_len >= "),
    (["rollout.compile=true"], "rollout.compile runs the rollout's steps through torch.compile in one process"),
])
def test_pipelined_grpo_settings_are_checked(task_dir, tmp_path, extra, words):
    run_ranks(2, refused_rank, str(task_dir), str(tmp_path / "r"), ["parallel.pp=2", *PP, *extra],
              str(tmp_path / "msg.txt"))
    msg = (tmp_path / "msg.txt").read_text()
    assert words in msg, msg


def refused_rank(task_dir, run_dir, extra, out):
    import torch.distributed as dist
    from pretrain.config import ConfigError
    try:
        GRPOTrainer(_config(task_dir, run_dir, *extra))
        message = "not refused"
    except ConfigError as e:
        message = str(e)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            f.write(message)


def bf16_copy_rank(task_dir, run_dir, out):
    import torch.distributed as dist
    import parallel
    tr = GRPOTrainer(_config(task_dir, run_dir, *PP, "parallel.pp=2", "rollout.ep=2", "train.dtype=bf16",
                             "train.steps=1", "eval.every=0"))
    tr.run()
    tr.sample([tr.encode(tr.train_records[0])] * 2, tr.sampling, 0)   # refreshes after the update
    copy = parallel.full_state(tr.gen_model, tr.gen_mesh)
    policy = {}
    for stage in tr.session.engine.stages:
        policy.update(parallel.full_state(stage, tr.session.mesh))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, policy)
    if dist.get_rank() == 0:
        torch.save({"copy": copy, "policy": {k: v for p in every for k, v in p.items()}}, out)


def test_pp2_bf16_rollout_copy_is_the_policy_in_bf16(task_dir, tmp_path):
    """Under train.dtype=bf16 the rollout copy (it only generates) is held in bf16: after an update it is the
    fp32 policy rounded to bf16, element for element (the routing biases stay fp32)."""
    run_ranks(2, bf16_copy_rank, str(task_dir), str(tmp_path / "run"), str(tmp_path / "w.pt"))
    got = torch.load(tmp_path / "w.pt")
    assert got["copy"].keys() == got["policy"].keys()
    for k, v in got["copy"].items():
        want = got["policy"][k]
        assert v.dtype == (torch.float32 if k.endswith("gate.bias") else torch.bfloat16), (k, v.dtype)
        assert torch.equal(v, want.to(v.dtype)), k
