"""Verifiable tasks: graded difficulty, determinism by seed, disjoint splits, the safe Countdown
verifier, and the tiny task tokenizer."""
import json
import re

import pytest

from posttrain.data import read_jsonl
from posttrain.rewards import get_reward
from posttrain.tasks import (arithmetic_spec, build_task_tokenizer, countdown_spec, evaluate_expression,
                             generate_tasks, main, split_tasks, verify_countdown, write_task_splits)
from posttrain.templates import SPECIAL_TAGS


def test_generation_is_deterministic_by_seed():
    for task in ("arithmetic", "countdown"):
        a = generate_tasks(task, 50, seed=3, difficulty=[1, 2, 3])
        assert a == generate_tasks(task, 50, seed=3, difficulty=[1, 2, 3])
        assert a != generate_tasks(task, 50, seed=4, difficulty=[1, 2, 3])
        assert len({t["prompt"] for t in a}) == 50  # distinct
        assert {t["difficulty"] for t in a} == {1, 2, 3}
        assert all(set(t) >= {"prompt", "answer", "task", "difficulty", "solution", "response"} for t in a)


def test_arithmetic_levels_and_exact_answers():
    assert arithmetic_spec(1) == (2, 1, "+-") and arithmetic_spec(2) == (2, 2, "+-")
    assert arithmetic_spec(3) == (3, 2, "+-*")
    shapes = {1: r"\d[+-]\d", 2: r"\d\d[+-]\d{1,2}", 3: r"\d\d[+*-]\d{1,2}[+*-]\d{1,2}",
              4: r"\d{3}([+*-]\d{1,3}){2}", 5: r"\d{3}([+*-]\d{1,3}){3}"}
    for level, shape in shapes.items():
        for t in generate_tasks("arithmetic", 30, seed=0, difficulty=level):
            expr = t["prompt"].removeprefix("Compute ")
            assert re.fullmatch(shape, expr), (level, expr)
            assert t["answer"] == str(eval(expr))  # the exact value under Python's precedence
            assert t["response"] == f"<think> {t['solution']} </think> <answer> {t['answer']} </answer>"
            assert t["solution"].endswith(f"={t['answer']}")
    acc = get_reward("accuracy")
    t = generate_tasks("arithmetic", 1, seed=0, difficulty=3)[0]
    assert acc(t["response"], t) == 1.0


def test_countdown_tasks_are_solvable():
    for level in (1, 2, 3, 4, 5):
        count, largest = countdown_spec(level)
        for t in generate_tasks("countdown", 20, seed=1, difficulty=level):
            assert len(t["numbers"]) == count and max(t["numbers"]) <= largest
            assert isinstance(t["target"], int) and t["target"] > 0
            assert verify_countdown(t["answer"], t["numbers"], t["target"], use_all=True)
            assert get_reward("countdown")(t["response"], t) == 1.0


@pytest.mark.parametrize("expr", [
    "4+4",                          # 4 used twice, only one 4 given
    "4*3",                          # 3 is not given
    "__import__('os').system('true')",
    "abs(8)", "x+8", "lambda: 8", "'8'", "[8][0]", "(8).real",
    "8.0+4", "-4+8*2", "2**3", "8//2", "8%3",
    "8/(4-4)",                      # division by zero
    "8+4; 1", "8 +", "", "1" * 300,
])
def test_countdown_verifier_rejects(expr):
    assert not verify_countdown(expr, [8, 4, 2], 12)


def test_countdown_verifier_accepts_and_counts_numbers():
    assert verify_countdown("8+4", [8, 4, 2], 12)
    assert verify_countdown("(8 - 2) * 2", [8, 2, 2], 12)  # two 2s given, two used
    assert verify_countdown("8 * 3 / 2", [8, 3, 2], 12)   # exact division
    assert verify_countdown("8+4 = 12", [8, 4, 2], 12) and not verify_countdown("8+4 = 13", [8, 4, 2], 12)
    assert not verify_countdown("8+4", [8, 4, 2], 12, use_all=True)
    assert verify_countdown("8+4-2+2", [8, 4, 2, 2], 12, use_all=True)
    assert verify_countdown("8\u00d73\u00f72", [8, 3, 2], 12)  # × and ÷
    with pytest.raises(ValueError, match="not allowed"):
        evaluate_expression("__import__('os')")
    assert evaluate_expression("(1+2)*3") == (9, [1, 2, 3])


def test_splits_are_disjoint_exact_and_stable(tmp_path):
    for task in ("arithmetic", "countdown"):
        train, held = split_tasks(task, 300, 60, seed=0)
        assert len(train) == 300 and len(held) == 60
        tp, hp = {t["prompt"] for t in train}, {t["prompt"] for t in held}
        assert len(tp) == 300 and len(hp) == 60 and not tp & hp
        # the split of a prompt depends only on its text: other seeds never leak across
        train2, held2 = split_tasks(task, 300, 60, seed=1)
        assert not tp & {t["prompt"] for t in held2} and not hp & {t["prompt"] for t in train2}
    paths = write_task_splits(str(tmp_path), "countdown", 40, 10, seed=2)
    again = write_task_splits(str(tmp_path / "again"), "countdown", 40, 10, seed=2)
    for name in ("train", "heldout"):
        with open(paths[name]) as a, open(again[name]) as b:
            assert a.read() == b.read()
    train, held = read_jsonl(paths["train"]), read_jsonl(paths["heldout"])  # valid prompt/answer records
    assert len(train) == 40 and len(held) == 10
    assert not {t["prompt"] for t in train} & {t["prompt"] for t in held}


def test_task_space_exhaustion_and_bad_input():
    with pytest.raises(ValueError, match="ran out of distinct arithmetic tasks"):
        generate_tasks("arithmetic", 1000, difficulty=1)  # 10 * 10 * 2 prompts exist
    with pytest.raises(ValueError, match="valid: arithmetic, countdown"):
        generate_tasks("sudoku", 1)
    with pytest.raises(ValueError, match="difficulty"):
        generate_tasks("arithmetic", 1, difficulty=0)


def test_task_tokenizer(tmp_path):
    tok = build_task_tokenizer(str(tmp_path / "task.model"))
    assert tok.vocab_size <= 256
    for tag in SPECIAL_TAGS:
        assert len(tok.encode(tag)) == 1
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]  # every digit its own token
    assert len(tok.encode("1234567890")) == 10
    for t in generate_tasks("countdown", 20, seed=9, difficulty=[1, 4]) + generate_tasks("arithmetic", 20, seed=9):
        for text in (t["prompt"], t["response"]):
            assert tok.decode(tok.encode(text)) == text
    odd = "Any ASCII: ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./ and\nnewlines"
    assert tok.decode(tok.encode(odd)) == odd


def test_cli_writes_splits(tmp_path, capsys):
    main(["--out", str(tmp_path), "--task", "arithmetic", "--train", "20", "--heldout", "5", "--difficulty", "2"])
    lines = (tmp_path / "arithmetic_train.jsonl").read_text().splitlines()
    assert len(lines) == 20 and json.loads(lines[0])["difficulty"] == 2
    assert "heldout" in capsys.readouterr().out
