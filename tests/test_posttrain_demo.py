"""The statistics of the post-training demonstration (posttrain.demo): the intervals it reports and
its reading of a run's metrics. (The end-to-end demo test joins when the demo shows its gain; see
docs/posttrain.md.)"""
import json

import pytest

from posttrain.demo import gain_interval, summarise, wilson


def test_wilson_interval_matches_the_textbook_values():
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)     # Wilson (1927); Newcombe (1998) table
    assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.4038, abs=1e-4)
    with pytest.raises(ValueError):
        wilson(1, 0)


def test_gain_interval_and_summary_of_a_run(tmp_path):
    lo, hi = gain_interval(0.2, 0.3, 500)
    assert lo == pytest.approx(0.1 - 1.96 * (0.2 * 0.8 / 500 + 0.3 * 0.7 / 500) ** 0.5) and hi > lo
    rows = [{"step": 0, "eval_accuracy": 0.25, "eval_format": 0.8, "eval_prompts": 512.0}]
    rows += [{"step": s, "reward_mean": 0.1 * s, "accuracy": 0.01 * s, "response_length_mean": 30.0} for s in range(1, 11)]
    rows += [{"step": 10, "eval_accuracy": 0.375, "eval_format": 0.9, "eval_prompts": 512.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = summarise(tmp_path)
    assert (r["before"], r["after"], r["prompts"], r["steps"]) == (0.25, 0.375, 512, 10)
    assert r["gain"] == pytest.approx(0.125) and r["gain_ci95"] == pytest.approx(gain_interval(0.25, 0.375, 512))
    assert r["curves"]["step"] == list(range(1, 11)) and r["curves"]["eval_accuracy"] == [0.25, 0.375]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(RuntimeError, match="no evaluation at step 0"):
        summarise(tmp_path)
