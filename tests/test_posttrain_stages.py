"""The rejection-sampling, DPO and distillation stages, and the recipe configs.

Rejection sampling is checked against a verifier these tests control (`parity_reward`: a reply of
even length is "correct") on a tiny random V3, whose replies vary in length and script thanks to
stop strings: the output holds exactly the verified replies that pass the filters, the same under
dp2 and tp2 as in one process, and an existing output is never replaced. DPO: log 2 at step 0, learning,
tp2 and dp2 equal one process, exact resume. Distillation: a dense student trains on the teacher's jsonl.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def parity_reward(completion, sample):
    """The verifier under test control: even-length replies are correct."""
    return float(len(completion) % 2 == 0)


REWARD = f"{__name__}:parity_reward"


@pytest.fixture(scope="module")
def task_dir(task_dir, tmp_path_factory):
    """conftest's tasks and tokenizer, copied, plus the prompt files these stages read."""
    d = tmp_path_factory.mktemp("stage_tasks")
    for f in task_dir.iterdir():
        shutil.copy(f, d / f.name)
    tasks = [json.loads(x) for x in (d / "arithmetic_train.jsonl").read_text().splitlines()]
    with open(d / "prompts.jsonl", "w") as f:       # 10 prompts; two as conversations, two asking for Chinese
        for i, t in enumerate(tasks[:10]):
            if i in (3, 7):
                t = {"messages": [{"role": "user", "content": t.pop("prompt")}], **t}
            if i in (1, 5):
                t["language"] = "zh"
            f.write(json.dumps(t) + "\n")
    with open(d / "prompts24.jsonl", "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in tasks[10:34])
    for split, n in (("train", 64), ("heldout", 32)):   # toy preferences: worked answers over bare wrong ones
        rows = [json.loads(x) for x in (d / f"arithmetic_{split}.jsonl").read_text().splitlines()][:n]
        with open(d / f"pairs_{split}.jsonl", "w") as f:
            for t in rows:
                f.write(json.dumps({"prompt": t["prompt"], "chosen": t["response"],
                                    "rejected": f"<answer> {int(t['answer']) + 1} </answer>"}) + "\n")
    return d


def _load(lines):
    from posttrain.config import load_config
    return load_config(None, lines)


# -- rejection sampling ------------------------------------------------------------------------------
def _rejection_args(task_dir, out_dir):
    return ["model.preset=tiny-deepseek-v3", "model.vocab_size=256", f"init.tokenizer={task_dir}/tok.model",
            f"data.train_files=[{task_dir}/prompts.jsonl]", "data.template=chat", "rollout.max_new_tokens=10",
            "rollout.stop=['1', '2', 'a']", f"reward.weights={{{REWARD}: 1.0}}", "rejection.samples=6",
            "rejection.batch_prompts=4", "rejection.keep_per_prompt=1", "rejection.max_response_tokens=5",
            "rejection.min_language_consistency=0.5", f"rejection.output={out_dir}/sft.jsonl",
            f"rejection.pairs_output={out_dir}/pairs.jsonl", f"rejection.samples_output={out_dir}/samples.jsonl",
            "logging.wandb=disabled", f"logging.run_dir={out_dir}/run"]


def rejection_rank(task_dir, out_dir, extra):
    from posttrain.rejection import RejectionSampler
    assert RejectionSampler(_load(_rejection_args(task_dir, out_dir) + extra)).run() == 0


@pytest.fixture(scope="module")
def rejection_dir(task_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("rejection")
    run_ranks(1, rejection_rank, str(task_dir), str(d), [])
    return d


def _jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _prompt(r):
    return r["prompt"] if "prompt" in r else r["messages"][0]["content"]


def test_rejection_keeps_exactly_the_verified_completions(task_dir, rejection_dir):
    from posttrain.data import load_preference_pairs, load_sft_examples
    from posttrain.rewards import extract_think, language_fraction
    from pretrain.tokenizer import load_tokenizer
    samples = _jsonl(rejection_dir / "samples.jsonl")
    assert [(s["index"], s["sample"]) for s in samples] == [(i, j) for i in range(10) for j in range(6)]
    # the filters, written again here: verified, finished, <= 5 tokens, words of the record's language (else
    # Latin) >= 0.5 of the CoT, distinct, 1 per prompt
    expected, kept_by_prompt, wrong_by_prompt = [], {}, {}
    for s in samples:
        text = s["completion"]
        assert s["correct"] == (len(text) % 2 == 0)
        kept = kept_by_prompt.setdefault(s["index"], [])
        ok = (len(text) % 2 == 0 and text.strip() and s["finish"] != "length" and s["tokens"] <= 5
              and language_fraction(extract_think(text), s["record"].get("language", "en")) >= 0.5
              and text.strip() not in kept and not kept)
        if ok:
            kept.append(text.strip())
            expected.append((_prompt(s["record"]), text))
        elif len(text) % 2 and text.strip():
            wrong_by_prompt.setdefault(s["index"], []).append(text)
        assert (s["verdict"] == "kept") == bool(ok)
    sft = _jsonl(rejection_dir / "sft.jsonl")
    got = [(_prompt(r), r["response"] if "response" in r else r["messages"][-1]["content"]) for r in sft]
    assert got == expected and 0 < len(got) < 10
    assert all(r["source"] == "rejection" and "answer" in r for r in sft)
    convs = [r for r in sft if "messages" in r]
    assert all(r["messages"][-1]["role"] == "assistant" and len(r["messages"]) == 2 for r in convs)
    tok = load_tokenizer(str(task_dir / "tok.model"))
    assert len(load_sft_examples(rejection_dir / "sft.jsonl", tok, "chat")) == len(sft)
    m = _jsonl(rejection_dir / "run" / "metrics.jsonl")[-1]
    assert m["samples"] == 60 and m["kept"] == len(sft)
    assert m["pass_rate"] == sum(s["correct"] for s in samples) / 60
    for reason in ("incorrect", "unfinished", "too_long", "language", "excess"):     # every filter had work to do
        assert m[f"dropped_{reason}"] > 0, reason
    assert m["kept"] + sum(v for k, v in m.items() if k.startswith("dropped_")) == 60
    # DPO pairs: a kept reply against a wrong one of the same prompt
    pairs = [p for _, p in load_preference_pairs(rejection_dir / "pairs.jsonl")]
    by_prompt = {_prompt(s["record"]): s["index"] for s in samples}
    assert len(pairs) == sum(1 for i in kept_by_prompt if kept_by_prompt[i] and wrong_by_prompt.get(i)) > 0
    for p in pairs:
        i = by_prompt[_prompt(p)]
        assert p["chosen"].strip() in kept_by_prompt[i] and p["rejected"] == wrong_by_prompt[i][0]
        assert "response" not in p and p["source"] == "rejection"


def test_verdicts_order_dedup_and_keep():
    from posttrain.config import RejectionSection
    from posttrain.rejection import verdicts
    r = RejectionSection(keep_per_prompt=2, max_response_tokens=4, min_language_consistency=0.5)

    def s(text, correct=True, tokens=2, language=1.0, finish="eod"):
        return {"completion": text, "correct": correct, "tokens": tokens, "language_fraction": language,
                "finish": finish}
    got = verdicts([s("a", correct=False), s("  "), s("g", finish="length"), s("b", tokens=5), s("c", language=0.2),
                    s("d"), s(" d ", finish="stop"), s("e"), s("f")], r)
    assert got == ["incorrect", "empty", "unfinished", "too_long", "language", "kept", "duplicate", "kept", "excess"]


def test_verified_reads_the_verifier_component():
    from posttrain.rewards import verified
    assert verified({"accuracy": 0.0, "format": 1.0, "reward": 0.1}) == 0.0
    assert verified({"countdown": 1.0, "format": 0.0, "reward": 1.0}) == 1.0
    assert verified({"code": 0.5, "reward": 0.5}) == 0.5
    assert verified({f"{__name__}:parity_reward": 1.0, "reward": 1.0}) == 1.0


def rejection_two_ranks(task_dir, out_dir):
    import torch.distributed as dist
    from posttrain.rejection import RejectionSampler
    from pretrain.config import ConfigError
    rejection_rank(task_dir, f"{out_dir}/tp2", ["parallel.tp=2"])    # tp rank 1 holds copies: written once
    # a trainer's pp2 layout: sampling only, the stage generates in its rollout layout (here ep2, dp2)
    rejection_rank(task_dir, f"{out_dir}/pp2", ["parallel.pp=2", "rollout.ep=2"])
    rejection_rank(task_dir, out_dir, [])
    with pytest.raises(ConfigError, match="rollout.compile: rejection sampling generates with the policy itself"):
        RejectionSampler(_load(_rejection_args(task_dir, f"{out_dir}/compiled") + ["rollout.compile=true"]))
    before = (Path(out_dir) / "sft.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):        # every rank refuses, before any work
        RejectionSampler(_load(_rejection_args(task_dir, out_dir)))
    assert (Path(out_dir) / "sft.jsonl").read_bytes() == before
    dist.barrier()
    rejection_rank(task_dir, out_dir, ["rejection.overwrite=true"])   # replaced, with the same records
    assert (Path(out_dir) / "sft.jsonl").read_bytes() == before
    assert not [f for f in os.listdir(out_dir) if ".tmp" in f]


def test_rejection_under_dp2_and_tp2_writes_what_one_process_writes(task_dir, rejection_dir, tmp_path):
    run_ranks(2, rejection_two_ranks, str(task_dir), str(tmp_path))
    for name in ("sft.jsonl", "pairs.jsonl", "samples.jsonl"):
        for sub in (".", "tp2", "pp2"):
            assert (tmp_path / sub / name).read_text() == (rejection_dir / name).read_text(), (sub, name)


def rejection_compiled_rank(task_dir, out_dir):
    import posttrain.engine as engine
    import posttrain.generate as generate
    generate.COMPILE_BACKEND = "eager"   # traced by dynamo, eager kernels (inductor's C++ build takes minutes here)
    rejection_rank(task_dir, out_dir, ["rollout.compile=true"])
    assert engine.decode_step in generate._COMPILED


def test_compiled_rejection_writes_what_eager_writes(task_dir, rejection_dir, tmp_path):
    """rollout.compile in one process (fp32: the policy is a plain module) changes nothing but speed."""
    run_ranks(1, rejection_compiled_rank, str(task_dir), str(tmp_path))
    for name in ("sft.jsonl", "pairs.jsonl", "samples.jsonl"):
        assert (tmp_path / name).read_text() == (rejection_dir / name).read_text(), name


def test_rejection_cli_refuses_to_overwrite(task_dir, rejection_dir, tmp_path):
    before = (rejection_dir / "sft.jsonl").read_text()
    (tmp_path / "empty.yaml").write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "posttrain.rejection", "--config", str(tmp_path / "empty.yaml"),
                           *_rejection_args(task_dir, rejection_dir)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == 2, proc.stderr
    assert "already exists" in proc.stderr and "rejection.overwrite=true" in proc.stderr
    assert (rejection_dir / "sft.jsonl").read_text() == before


# -- DPO ---------------------------------------------------------------------------------------------
def _dpo_args(task_dir, run_dir):
    return ["model.preset=tiny-deepseek-v3", "model.vocab_size=256", f"init.tokenizer={task_dir}/tok.model",
            f"data.train_files=[{task_dir}/pairs_train.jsonl]", f"data.valid_files=[{task_dir}/pairs_heldout.jsonl]",
            "data.template=chat", "data.seq_len=64", "train.steps=6", "train.lr=1e-3", "train.lr_schedule=constant",
            "train.warmup_steps=0", "train.micro_batch_size=2", "train.global_batch_size=8", "eval.every=6",
            "dpo.beta=0.1", "logging.wandb=disabled", f"logging.run_dir={run_dir}"]


def _capture_first_update(tr, into: dict):
    """The synchronised gradients and metrics of the first optimizer step (before AdamW moves anything)."""
    import parallel
    step, sess = tr.session.optimizer_step, tr.session

    def capture(loss, **kw):
        if not into:
            grads = parallel.full_state(sess.policy, sess.mesh, grads=True)
            into["grads"] = {k: v.detach().clone() for k, v in grads.items() if v is not None}
            into["loss"] = loss
        return step(loss, **kw)
    sess.optimizer_step = capture


def dpo_rank(task_dir, run_dir, extra, out):
    import torch.distributed as dist
    import parallel
    from posttrain.dpo import DPOTrainer
    first = {}
    for phase in extra:                          # several phases in one process: stop, then resume
        tr = DPOTrainer(_load(_dpo_args(task_dir, run_dir) + phase))
        _capture_first_update(tr, first)
        tr.run()
    if dist.get_rank() == 0:
        params = parallel.full_state(tr.session.policy, tr.session.mesh)
        torch.save({"params": {k: v.detach().clone() for k, v in params.items()}, **first}, out)


@pytest.fixture(scope="module")
def dpo_run(task_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo")
    # with a profiler window: the operating tools wrap post-training steps too (pretrain.operate)
    run_ranks(1, dpo_rank, str(task_dir), str(d / "run"), [["logging.profile_steps=[2,2]"]], str(d / "a.pt"))
    return d


def test_dpo_starts_at_log2_and_learns(dpo_run):
    trace = json.loads((dpo_run / "run" / "profile" / "rank0.steps2-2.json").read_text())
    assert any(e.get("name") == "whaletron step 2" for e in trace["traceEvents"])
    rows = _jsonl(dpo_run / "run" / "metrics.jsonl")
    assert rows[0]["step"] == 0 and abs(rows[0]["val_loss"] - math.log(2)) < 1e-6
    train = [r for r in rows if "loss" in r]
    assert len(train) == 6 and abs(train[0]["loss"] - math.log(2)) < 1e-6     # policy == reference
    assert train[0]["reward_margin"] == 0 and train[0]["reward_accuracy"] == 0
    for key in ("reward_chosen", "reward_rejected", "lr", "grad_norm", "tokens_per_s"):
        assert key in train[0], key
    assert train[-1]["loss"] < math.log(2) - 0.2 and train[-1]["reward_accuracy"] == 1.0
    assert rows[-1]["val_loss"] < math.log(2) - 0.2 and rows[-1]["val_reward_accuracy"] > 0.9


def test_dpo_resumes_exactly(task_dir, dpo_run, tmp_path):
    run_ranks(1, dpo_rank, str(task_dir), str(tmp_path / "run"), [["train.exit_at_step=3"], []], str(tmp_path / "b.pt"))
    a, b = torch.load(dpo_run / "a.pt")["params"], torch.load(tmp_path / "b.pt")["params"]
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=0, msg=k)
    # the finished run (step 6) resumed with an exit step behind it: refused, not silently past it
    run_ranks(1, dpo_refused_rank, str(task_dir), str(tmp_path / "run"), ["train.exit_at_step=3"],
              str(tmp_path / "refused.txt"))
    msg = (tmp_path / "refused.txt").read_text()
    assert msg.startswith("train.exit_at_step = 3 lies before step 6") and "checkpoint.resume=PATH" in msg, msg


def dpo_refused_rank(task_dir, run_dir, extra, out):
    from posttrain.dpo import DPOTrainer
    from pretrain.config import ConfigError
    try:
        DPOTrainer(_load(_dpo_args(task_dir, run_dir) + extra))
        message = "not refused"
    except ConfigError as e:
        message = str(e)
    with open(out, "w") as f:
        f.write(message)


def dpo_update_rank(task_dir, run_dir, layout, out):
    import torch.distributed as dist
    from posttrain.dpo import DPOTrainer
    tr = DPOTrainer(_load(_dpo_args(task_dir, run_dir) + layout))
    first = {}
    _capture_first_update(tr, first)
    metrics = tr.train_step(next(tr.it)["pairs"])
    if dist.get_rank() == 0:
        torch.save({**first, "metrics": metrics}, out)


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.dp=2"]])
def test_dpo_update_under_tp2_and_dp2_equals_one_process(task_dir, dpo_run, tmp_path, layout):
    run_ranks(2, dpo_update_rank, str(task_dir), str(tmp_path / "run"), layout, str(tmp_path / "two.pt"))
    one, two = torch.load(dpo_run / "a.pt"), torch.load(tmp_path / "two.pt")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6) and abs(two["loss"] - math.log(2)) < 1e-6
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 20
    for k, v in one["grads"].items():
        scale = v.abs().max().item()
        torch.testing.assert_close(two["grads"][k], v, rtol=1e-5, atol=1e-5 * max(scale, 1e-12))


def dpo_pipeline_rank(task_dir, run_dir, layout, out):
    """The first update under a pipeline: every stage's synchronised gradients (gathered over tp/dp), per rank."""
    import torch.distributed as dist

    import parallel
    from posttrain.dpo import DPOTrainer
    tr = DPOTrainer(_load(_dpo_args(task_dir, run_dir) + layout))
    sess, first = tr.session, {}
    step = sess.optimizer_step

    def capture(loss, **kw):
        if not first:
            first["loss"], first["grads"] = loss, {}
            for stage in sess.engine.stages:
                for k, g in parallel.full_state(stage, sess.mesh, grads=True).items():
                    if g is not None:
                        first["grads"][k] = g.detach().clone()
        return step(loss, **kw)

    sess.optimizer_step = capture
    val = tr.evaluate()   # policy == reference: log 2 (through the pipeline's forward-only scoring)
    metrics = tr.train_step(next(tr.it)["pairs"])
    torch.save({**first, "metrics": metrics, "val": val}, f"{out}.{dist.get_rank()}")


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_dpo_update_under_pp2_equals_one_process(task_dir, dpo_run, tmp_path, schedule):
    """DPO under a pipeline (issue 22 §1): the reference scores through the stages, the DPO objective runs on
    the last; the first update's loss and gradients are one process's, and so is the validation."""
    run_ranks(2, dpo_pipeline_rank, str(task_dir), str(tmp_path / "run"),
              ["parallel.pp=2", f"parallel.pp_schedule={schedule}"], str(tmp_path / "pp"))
    one = torch.load(dpo_run / "a.pt")
    ranks = [torch.load(f"{tmp_path / 'pp'}.{r}") for r in range(2)]
    grads = {k: v for r in ranks for k, v in r["grads"].items()}
    assert ranks[0]["loss"] == ranks[1]["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert abs(ranks[0]["loss"] - math.log(2)) < 1e-6 and ranks[0]["val"]["val_loss"] == pytest.approx(math.log(2))
    assert grads.keys() == one["grads"].keys() and len(grads) > 20
    for k, v in one["grads"].items():
        scale = v.abs().max().item()
        torch.testing.assert_close(grads[k], v, rtol=1e-5, atol=1e-5 * max(scale, 1e-12), msg=k)


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "q", "chosen": "a"}', 'missing "rejected"'),
    ('{"prompt": "q", "chosen": 7, "rejected": "b"}', '"chosen" must be a string'),
    ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "same reply"),
    ('{"prompt": "q", "chosen": "a", "rejected": " "}', '"rejected" is empty'),
    ('{"prompt": "q", "response": "r", "chosen": "a", "rejected": "b"}', 'has "response"'),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}], '
     '"chosen": "a", "rejected": "b"}', "must end with the user"),
    ('{"prompt": "q", "chosen": {"role": "assistant"}, "rejected": "b"}', "not an assistant message"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b"', "invalid JSON"),
])
def test_bad_pair_files_name_file_and_line(tmp_path, line, problem):
    from posttrain.data import DataError, load_preference_pairs
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": {"role": "assistant", "content": "b"}}\n\n' + line + "\n")
    with pytest.raises(DataError) as e:
        load_preference_pairs(f)
    assert f"{f}:3: " in str(e.value) and problem in str(e.value), str(e.value)


def test_pairs_the_template_cannot_render_name_file_and_line(task_dir, tmp_path):
    from posttrain.data import DataError, load_preference_pairs
    from posttrain.dpo import encode_pairs
    from pretrain.tokenizer import load_tokenizer
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"messages": [{"role": "system", "content": "s"}, '
                 '{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}\n')
    tok = load_tokenizer(str(task_dir / "tok.model"))
    assert len(encode_pairs(load_preference_pairs(f), tok, "chat", 64)[0]) == 2
    with pytest.raises(DataError, match=f"{f}:2: the r1_zero template has its own fixed instruction"):
        encode_pairs(load_preference_pairs(f), tok, "r1_zero", 64)


def test_pair_rows_mask_the_prompt():
    from model.transformer import IGNORE_INDEX as I
    from posttrain.data import Example
    from posttrain.dpo import pair_rows
    pairs = [(Example([5, 6, 7, 2], [0, 0, 1, 1]), Example([5, 6, 8, 9, 2], [0, 0, 1, 1, 1]))]
    tokens, targets = pair_rows(pairs, multiple=2, pad=0)
    assert tokens.tolist() == [[5, 6, 7, 2, 0, 0], [5, 6, 8, 9, 2, 0]]
    assert targets.tolist() == [[I, 7, 2, I, I, I], [I, 8, 9, 2, I, I]]


# -- distillation ------------------------------------------------------------------------------------
def distill_rank(task_dir, out_dir, out):
    import torch.distributed as dist
    from posttrain.distill import distill
    teacher = _load(_rejection_args(task_dir, out_dir) + [
        f"data.train_files=[{task_dir}/prompts24.jsonl]", "rejection.keep_per_prompt=4",
        "rejection.max_response_tokens=0", "rejection.min_language_consistency=0", "rejection.pairs_output=",
        "rejection.samples_output=", f"logging.run_dir={out_dir}/teacher"])
    student = _load_file(ROOT / "configs/posttrain/distill_tiny.yaml", [
        f"init.tokenizer={task_dir}/tok.model", "data.train_files=[]", "data.valid_files=[]", "data.epochs=0",
        "train.steps=8", "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=1",
        "eval.every=0", f"logging.run_dir={out_dir}/student"])
    assert distill(teacher, student) == 0
    if dist.get_rank() == 0:
        json.dump({"train_files": student.data.train_files, "model": student.model_config().name}, open(out, "w"))


def _load_file(path, lines):
    from posttrain.config import load_config
    return load_config(path, lines)


def test_distill_student_trains_on_the_teachers_jsonl(task_dir, tmp_path):
    run_ranks(1, distill_rank, str(task_dir), str(tmp_path), str(tmp_path / "info.json"))
    info = json.loads((tmp_path / "info.json").read_text())
    assert info == {"train_files": [f"{tmp_path}/sft.jsonl"], "model": "tiny-qwen2.5-1.5b"}
    teacher_rows = _jsonl(tmp_path / "sft.jsonl")
    assert len(teacher_rows) >= 16 and all(r["source"] == "rejection" for r in teacher_rows)
    assert _jsonl(tmp_path / "teacher" / "metrics.jsonl")[-1]["kept"] == len(teacher_rows)
    loss = [r["loss"] for r in _jsonl(tmp_path / "student" / "metrics.jsonl") if "loss" in r]
    assert len(loss) == 8 and loss[-1] < loss[0] - 0.3, loss


# -- configs -----------------------------------------------------------------------------------------
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs/posttrain").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS)
def test_every_posttrain_config_loads(path):
    cfg = _load_file(ROOT / path, [])
    # the tiny configs run in one process; the V3 recipes train pipelined (their fit: tests/test_posttrain_plan.py)
    assert cfg.parallel.pp == 1 or "/recipes/" in path
    if "/recipes/" in path:
        assert cfg.model["preset"] in ("deepseek-v3", "qwen2.5-1.5b", "llama-3-8b"), path


def test_recipes_carry_the_papers_numbers():
    load = lambda name: _load_file(ROOT / "configs/posttrain/recipes" / name, [])   # noqa: E731
    z = load("r1_zero.yaml")
    assert (z.train.lr, z.grpo.beta, z.rollout.temperature, z.grpo.group_size, z.grpo.prompts_per_step,
            z.grpo.ref_update_every, z.rollout.max_new_tokens) == (3e-6, 0.001, 1.0, 16, 32, 400, 32768)
    assert z.data.template == "r1_zero" and set(z.reward.weights) == {"accuracy", "format"}
    assert z.model["preset"] == "deepseek-v3" and not z.init.checkpoint.startswith("runs/")
    stages = sorted((ROOT / "configs/posttrain/recipes/r1").glob("[0-9]_*.yaml"))
    assert [p.name for p in stages] == ["1_cold_start_sft.yaml", "2_reasoning_grpo.yaml", "3_rejection.yaml",
                                        "4_sft.yaml", "5_grpo_all.yaml"]
    s = [load(f"r1/{p.name}") for p in stages]
    assert "language" in s[1].reward.weights and s[1].init.checkpoint == s[0].logging.run_dir + "/checkpoints"
    assert s[2].init.checkpoint == s[1].logging.run_dir + "/checkpoints" and s[2].rejection.output
    assert s[3].data.epochs == 2 and s[2].rejection.output in s[3].data.train_files
    assert s[4].init.checkpoint == s[3].logging.run_dir + "/checkpoints"


@pytest.mark.parametrize("arg, words", [
    ("rejection.samplez=3", ["rejection.samplez", "samples"]),
    ("dpo.betta=0.1", ["dpo.betta", "beta"]),
    ("rejection.samples=0", ["rejection.samples", ">= 1"]),
    ("rejection.keep_per_prompt=0", ["rejection.keep_per_prompt"]),
    ("rejection.batch_prompts=0", ["rejection.batch_prompts"]),
    ("rejection.max_response_tokens=-1", ["rejection.max_response_tokens"]),
    ("rejection.min_language_consistency=1.5", ["rejection.min_language_consistency", "[0, 1]"]),
    ("rejection.language=xx", ["rejection.language", "en"]),
    ("dpo.beta=0", ["dpo.beta", "> 0"]),
    ("dpo.label_smoothing=0.5", ["dpo.label_smoothing", "[0, 0.5)"]),
])
def test_bad_stage_keys_are_named(arg, words):
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError) as e:
        _load([arg])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# -- bad data stops every stage at load, in one line -------------------------------------------------
def _run_main(module, tmp_path, args) -> int:
    import importlib
    (tmp_path / "empty.yaml").write_text("{}\n")
    return importlib.import_module(f"posttrain.{module}").main(["--config", str(tmp_path / "empty.yaml"), *args])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _sft_args(task_dir, run_dir):
    return ["model.preset=tiny-deepseek-v3", "model.vocab_size=256", f"init.tokenizer={task_dir}/tok.model",
            f"data.train_files=[{task_dir}/arithmetic_train.jsonl]",
            f"data.valid_files=[{task_dir}/arithmetic_heldout.jsonl]", "data.template=chat", "data.seq_len=64",
            "train.steps=1", "train.warmup_steps=0", "train.micro_batch_size=4", "train.global_batch_size=8",
            "eval.every=1", "logging.wandb=disabled", f"logging.run_dir={run_dir}"]


STAGE_ARGS = {"sft": _sft_args, "dpo": _dpo_args,
              "rejection": lambda task_dir, out_dir: _rejection_args(task_dir, out_dir) + ["rejection.samples=2"]}


@pytest.mark.parametrize("stage, key, what", [
    ("sft", "data.train_files", "SFT records"), ("sft", "data.valid_files", "SFT records"),
    ("dpo", "data.train_files", "preference pairs"), ("dpo", "data.valid_files", "preference pairs"),
    ("rejection", "data.train_files", "prompt records"),
])
def test_an_empty_data_file_stops_the_stage_at_load(task_dir, tmp_path, capsys, stage, key, what):
    """`FILE: no records`, one line, exit 2, before the model is built. It used to be "0 packed rows" (SFT
    train), "0 usable pairs" (DPO train), a traceback from max() (rejection), or silence (SFT's and DPO's
    evaluation skipped)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    assert _run_main(stage, tmp_path, STAGE_ARGS[stage](task_dir, tmp_path / "out") + [f"{key}=[{empty}]"]) == 2
    err = _error_line(capsys)
    assert err.startswith(f"error: {key}: {empty}: no records (the file is empty or holds only blank lines); "
                          f"write {what}"), err
    assert not (tmp_path / "out").exists()


def test_rejection_names_a_prompt_too_long_for_its_reply(task_dir, tmp_path, capsys):
    """The longest prompt, encoded with the template as the generator receives it, + rollout.max_new_tokens must
    fit model.max_seq_len: named by file:line with the numbers and the fixes (it used to say neither)."""
    from posttrain.data import encode_prompt
    from pretrain.tokenizer import load_tokenizer
    long = {"prompt": "Compute " + " + ".join(["12"] * 16) + ".", "answer": "192"}
    n = len(encode_prompt("chat", load_tokenizer(str(task_dir / "tok.model")), long))
    lines = (task_dir / "prompts.jsonl").read_text().splitlines()
    f = tmp_path / "long.jsonl"
    f.write_text("\n".join(lines[:1] + [json.dumps(long)] + lines[1:3]) + "\n")
    args = STAGE_ARGS["rejection"](task_dir, tmp_path / "out") + [f"data.train_files=[{f}]",
                                                                  f"model.max_seq_len={n + 9}"]
    assert _run_main("rejection", tmp_path, args) == 2          # rollout.max_new_tokens = 10
    err = _error_line(capsys)
    assert err.startswith(f"error: data.train_files: {f}:2: this prompt is {n} tokens with the chat template, and "
                          f"{n} + rollout.max_new_tokens (10) = {n + 10} exceeds model.max_seq_len = {n + 9}"), err
    for fix in (f"raise model.max_seq_len to {n + 10}", "lower rollout.max_new_tokens to 9", "drop or shorten"):
        assert fix in err, fix
    assert not (tmp_path / "out" / "sft.jsonl").exists()


def test_distill_says_the_teacher_kept_nothing(task_dir, tmp_path, capsys):
    """An empty teacher output (rejection sampling kept no reply) is named as such, not as "0 packed rows"."""
    from posttrain.distill import main
    from pretrain.config import save_config
    (tmp_path / "sft.jsonl").write_text("")             # the teacher's output, reused (rejection.overwrite false)
    save_config(_load(_rejection_args(task_dir, tmp_path) + ["rejection.pairs_output=", "rejection.samples_output=",
                                                            f"logging.run_dir={tmp_path}/teacher"]),
                tmp_path / "teacher.yaml")
    student = str(ROOT / "configs/posttrain/distill_tiny.yaml")
    assert main(["--teacher", str(tmp_path / "teacher.yaml"), "--config", student,
                 f"init.tokenizer={task_dir}/tok.model", "data.train_files=[]", "data.valid_files=[]",
                 "eval.every=0", f"logging.run_dir={tmp_path}/student"]) == 2
    err = _error_line(capsys)
    assert err.startswith(f"error: {tmp_path}/sft.jsonl: no records: the teacher's rejection sampling kept no "
                          "verified reply"), err
    assert "rejection.overwrite=true" in err
