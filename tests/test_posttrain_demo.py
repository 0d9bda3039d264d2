"""The post-training demonstration (posttrain.demo): the intervals it reports, its reading of a run's
metrics, and the demonstration itself end to end (GRPO's held-out gain over 3 seeds and under ep2)."""
import json

import pytest

from posttrain.demo import paired_interval, summarise, wilson


def test_wilson_interval_matches_the_textbook_values():
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)     # Wilson (1927); Newcombe (1998) table
    assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.4038, abs=1e-4)
    with pytest.raises(ValueError):
        wilson(1, 0)


def test_paired_interval_matches_the_textbook_values():
    # Agresti, Categorical Data Analysis (2002) §10.1.1: approval in two surveys of the same 1600 people,
    # (approve, approve) 794, (approve, not) 150, (not, approve) 86, (not, not) 570: -0.04, CI (-0.06, -0.02)
    before = [1] * 794 + [1] * 150 + [0] * 86 + [0] * 570
    after = [1] * 794 + [0] * 150 + [1] * 86 + [0] * 570
    lo, hi = paired_interval(before, after)
    assert (lo + hi) / 2 == pytest.approx(-0.04) and hi - lo == pytest.approx(2 * 1.96 * 0.0095, abs=2e-4)
    assert (lo, hi) == pytest.approx((-0.0587, -0.0213), abs=1e-4)
    with pytest.raises(ValueError, match="same, non-zero number"):
        paired_interval([1, 0], [1])


def test_summary_of_a_run(tmp_path):
    rows = [{"step": 0, "eval_accuracy": 0.25, "eval_format": 0.8, "eval_prompts": 8.0, "eval_samples": 2.0}]
    rows += [{"step": s, "reward_mean": 0.1 * s, "accuracy": 0.01 * s, "response_length_mean": 30.0}
             for s in range(1, 11)]
    rows += [{"step": 10, "eval_accuracy": 0.5, "eval_format": 0.9, "eval_prompts": 8.0, "eval_samples": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before, after = [0, 0.5, 0, 0.5, 0, 0, 1, 0], [0.5, 0.5, 0.5, 1, 0, 0.5, 1, 0]
    (tmp_path / "eval" / "step_00000000.jsonl").parent.mkdir()
    (tmp_path / "eval" / "step_00000000.jsonl").write_text("".join(json.dumps({"index": i, "accuracy": a}) + "\n"
                                                              for i, a in enumerate(before)))
    (tmp_path / "eval" / "step_00000010.jsonl").write_text("".join(json.dumps({"index": i, "accuracy": a}) + "\n"
                                                              for i, a in reversed(list(enumerate(after)))))
    r = summarise(tmp_path)
    assert (r["before"], r["after"], r["prompts"], r["samples_per_prompt"], r["steps"]) == (0.25, 0.5, 8, 2, 10)
    assert r["gain"] == pytest.approx(0.25) and r["gain_ci95"] == pytest.approx(paired_interval(before, after))
    assert r["curves"]["step"] == list(range(1, 11)) and r["curves"]["eval_accuracy"] == [0.25, 0.5]
    (tmp_path / "eval" / "step_00000010.jsonl").unlink()
    with pytest.raises(RuntimeError, match="step_00000010.jsonl is missing"):
        summarise(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(RuntimeError, match="no evaluation at step 0"):
        summarise(tmp_path)


@pytest.mark.slow
def test_demo_grpo_raises_held_out_accuracy(tmp_path):
    """The demonstration end to end, as `python -m posttrain.demo` runs it (the real CLIs): SFT leaves the
    tiny V3 partly competent, then GRPO with rule-based rewards raises its held-out accuracy on the same
    512 prompts, with the paired 95% interval of the gain above zero, in one process and under ep2.
    CI's 30 minutes allow one seed in each layout and 60 of the demo's 80 rollout batches; the committed
    run (docs/posttrain_demo.json: seeds 0, 1, 2, seed 0 under ep2 and under pp2 x ep2) has every interval above zero at
    batch 60 too (lower bounds +8.8 to +11.3 points)."""
    from posttrain.demo import run_demo
    report = run_demo(tmp_path, [0], ep=2, ep_seeds=[0], overrides=["train.steps=60"])
    assert sorted(report["runs"]) == ["seed 0", "seed 0, ep2"]
    for name, r in report["runs"].items():
        assert r["prompts"] == 512 and r["steps"] == 60, name
        assert 0.2 < r["before"] < 0.8, (name, r["before"])      # partly competent, as the demo claims
        assert r["gain_ci95"][0] > 0, (name, r["before"], r["after"], r["gain_ci95"])
    assert (tmp_path / "demo.png").stat().st_size > 10_000
