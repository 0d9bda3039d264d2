"""Rewards: the registry and composition, answer extraction and equivalence (with and without
math_verify), format, language consistency, Countdown, and the code sandbox's limits."""
import sys
import types

import pytest

from posttrain import rewards
from posttrain.rewards import (answers_match, build_reward, extract_answer, extract_boxed, extract_think,
                               format_ok, get_reward, language_fraction, parse_number, register_reward,
                               reward_names, split_words)
from posttrain.sandbox import extract_code_block

# ----------------------------------------------------------------------------------------------
# Registry and composition
# ----------------------------------------------------------------------------------------------


def test_builtins_registered():
    assert {"accuracy", "format", "language", "code", "countdown"} <= set(reward_names())


def test_compose_with_weights_and_options():
    reward = build_reward({"accuracy": 1.0, "format": 0.1, "language": {"weight": 0.5, "language": "en"}})
    good = "<think> three plus five is eight </think> <answer> 8 </answer>"
    assert reward.score(good, {"answer": "8"}) == {"accuracy": 1.0, "format": 1.0, "language": 1.0, "reward": 1.6}
    assert reward("<answer> 7 </answer>", {"answer": "8"}) == 0.0
    chat = build_reward({"format": {"weight": 2, "style": "chat"}})
    assert chat("<think>r</think> summary", {}) == 2.0


def test_register_custom_and_module_path(tmp_path, monkeypatch):
    @register_reward("test_length")
    def length(completion, sample, *, scale=1.0):
        return scale * len(completion)

    try:
        assert get_reward("test_length") is length
        assert build_reward({"test_length": {"weight": 1.0, "scale": 0.5}})("abcd", {}) == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_length", lambda c, s: 0.0)
    finally:
        rewards._REGISTRY.pop("test_length", None)

    (tmp_path / "my_rewards.py").write_text("def brevity(completion, sample):\n"
                                            "    return 1.0 / (1 + len(completion))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_reward({"my_rewards:brevity": 2.0})("a", {}) == 1.0


@pytest.mark.parametrize("config, problem", [
    ({}, "non-empty mapping"),
    ({"acuracy": 1.0}, "unknown reward 'acuracy'; registered: accuracy, code"),
    ({"format": {"weight": 1.0, "stlye": "chat"}}, r"does not take option\(s\) \['stlye'\]; its options: style"),
    ({"format": {"style": "chat"}}, "needs 'weight'"),
    ({"format": "high"}, "weight must be a finite number"),
    ({"no_such_module_xyz:f": 1.0}, "cannot import module"),
    ({"posttrain.rewards:nope": 1.0}, "has no attribute"),
])
def test_bad_reward_config(config, problem):
    with pytest.raises(ValueError, match=problem):
        build_reward(config)


def test_failing_reward_names_itself():
    with pytest.raises(RuntimeError, match="reward 'accuracy' failed: KeyError"):
        build_reward({"accuracy": 1.0})("\\boxed{1}", {"prompt": "no answer key"})


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------

def test_extract_boxed_edge_cases():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{\{a, b\}}") == r"\{a, b\}"
    assert extract_boxed(r"\boxed{3} and finally \boxed{4}") == "4"
    assert extract_boxed(r"\boxed{3} and a cut-off \boxed{4") == "3"  # the last complete one
    assert extract_boxed(r"\boxed 5 is it") == "5"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed("no box") is None


def test_extract_answer_prefers_the_final_one():
    assert extract_answer("<think> \\boxed{2} </think> <answer> 3 </answer>") == "3"
    assert extract_answer("<answer> the answer is \\boxed{42} </answer>") == "42"
    assert extract_answer("<answer>1</answer> on reflection \\boxed{2}") == "2"
    assert extract_answer("<answer>1</answer> <answer> 5 </answer>") == "5"
    assert extract_answer("<answer> 5") is None and extract_answer("nothing") is None


@pytest.mark.parametrize("pred, ref", [
    ("1,000", "1000"), ("+5", "5"), ("5.0", "5"), ("5.", "5"), ("0.75", "3/4"), (r"\frac{3}{4}", "0.75"),
    (r"\dfrac{3}{4}", "3/4"), (r"\frac34", ".75"), (r"-\frac{1}{2}", "-0.5"), (r"\frac{-1}{2}", "-1/2"),
    (r"50\%", "50"), ("50%", "50"), ("1e3", "1000"), ("$42$", "42"), (r"\text{Paris}", "paris"),
    ("x = 5", "5"), (r"90^\circ", "90"), (r"\left( 1, 2 \right)", "(1,2)"), ("1,234,567.5", "1234567.5"),
    (" 12 ", "12"), ("\u22123", "-3"), (r"\boxed{7}", "7"), ("7", r"so the answer is \boxed{7}"),
])
def test_equivalent_answers(pred, ref):
    assert answers_match(pred, ref)


@pytest.mark.parametrize("pred, ref", [
    ("3/4", "0.7"), ("1,2", "12"), ("5", "-5"), (r"\sqrt{4}", "2"), ("", "0"), (None, "1"), ("1/0", "1"),
    ("paris", "london"), ("2", "20%"),
])
def test_different_answers(pred, ref):
    assert not answers_match(pred, ref)


def test_parse_number():
    assert parse_number("3/4") == parse_number(r"\frac{3}{4}") == parse_number("0.75")
    assert parse_number("abc") is None and parse_number(r"\frac{1}{0}") is None
    assert parse_number("1e999999999") is None and parse_number("1e999999999/2") is None  # no giant integers
    assert parse_number("1e3") == 1000


def test_accuracy_reward():
    acc = get_reward("accuracy")
    assert acc(r"... so \boxed{\frac{1}{2}}", {"answer": "0.5"}) == 1.0
    assert acc("<think>x</think> <answer> 1,000 </answer>", {"answer": 1000}) == 1.0
    assert acc(r"\boxed{3} no wait \boxed{4}", {"answer": "3"}) == 0.0  # the last box counts
    assert acc("I think it is 8", {"answer": "8"}) == 0.0  # no extractable answer
    with pytest.raises(KeyError, match="answer"):
        acc(r"\boxed{1}", {})


def test_math_verify_is_used_when_importable(monkeypatch):
    calls = []
    fake = types.ModuleType("math_verify")
    fake.parse = lambda s: calls.append(s) or [s]
    fake.verify = lambda gold, pred: gold == [r"\boxed{2}"] and pred == [r"\boxed{\sqrt{4}}"]
    assert not answers_match(r"\sqrt{4}", "2")  # the built-in comparison cannot tell
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    assert answers_match(r"\sqrt{4}", "2")
    assert calls == [r"\boxed{2}", r"\boxed{\sqrt{4}}"]
    assert get_reward("accuracy")(r"\boxed{\sqrt{4}}", {"answer": "2"}) == 1.0
    assert get_reward("accuracy")(r"\boxed{\sqrt{4}}", {"answer": "2"}, use_math_verify=False) == 0.0
    assert answers_match("0.5", "1/2")  # the built-in verdict still counts

    def broken(*a):
        raise RuntimeError("parser crashed")
    fake.verify = broken
    assert not answers_match(r"\sqrt{4}", "2")  # an error in math_verify is a mismatch, not a crash


# ----------------------------------------------------------------------------------------------
# Format
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "<think> 3+5=8 </think> <answer> 8 </answer>",
    " <think>a\nb</think>\n<answer>8</answer>\n",
    "<think> r </think> <answer> 8 </answer></s>",
    "<think> r </think> <answer> 8 </answer> <｜end▁of▁sentence｜> ",
])
def test_format_positive(text):
    assert format_ok(text)
    assert get_reward("format")(text, {}) == 1.0


@pytest.mark.parametrize("text", [
    "<answer> 8 </answer>",                                                   # no think
    "<think> r </think>",                                                     # no answer
    "<answer> 8 </answer> <think> r </think>",                                # wrong order
    "<think> a </think> <think> b </think> <answer> 8 </answer>",             # think twice
    "<think> r </think> <answer> 8 </answer> <answer> 9 </answer>",           # answer twice
    "<think> r </think> <answer> 8 </answer> and more",                       # text after the answer
    "preamble <think> r </think> <answer> 8 </answer>",                       # text before
    "<think> r </think> between <answer> 8 </answer>",                        # text between
    "<think>  </think> <answer> 8 </answer>",                                 # empty reasoning
    "<think> r <answer> 8 </answer> </think>",                                # nested
    "<think> r </think> <answer> 8",                                          # unclosed
])
def test_format_negative(text):
    assert not format_ok(text)


def test_format_chat_style_and_options():
    assert format_ok("<think>reasoning</think> The answer is 8.", "chat")
    assert not format_ok("<think>reasoning</think>   ", "chat")
    assert not format_ok("The answer is 8.", "chat")
    assert format_ok("<think> </think> <answer> 8 </answer>", require_nonempty=False)
    assert format_ok("<think> r </think> <answer> 8 </answer>[EOS]", eos="[EOS]")
    with pytest.raises(ValueError, match="valid: r1_zero, chat"):
        format_ok("x", "xml")


# ----------------------------------------------------------------------------------------------
# Language consistency
# ----------------------------------------------------------------------------------------------

def test_words_and_language_fractions():
    assert split_words("Let x be 3. 我们计算") == [("Let", "latin"), ("x", "latin"), ("be", "latin"),
                                                    ("我", "cjk"), ("们", "cjk"), ("计", "cjk"), ("算", "cjk")]
    assert language_fraction("We add three and five.", "en") == 1.0
    assert language_fraction("我们先计算", "zh") == 1.0
    mixed = "我们 compute 这个"  # 4 CJK characters (each a word) and 1 English word
    assert language_fraction(mixed, "zh") == pytest.approx(0.8)
    assert language_fraction(mixed, "en") == pytest.approx(0.2)
    assert language_fraction(r"设 $x^2 = y$, 则 \(a\) 与 \frac{1}{2}", "zh") == 1.0  # math is no language
    assert language_fraction("naïve café", "en") == 1.0  # Latin script with diacritics
    assert language_fraction("Привет world", "en") == 0.5  # other scripts count against
    assert language_fraction("1 + 2 = 3", "en") == 0.0  # no words
    with pytest.raises(ValueError, match="unknown language"):
        language_fraction("x", "klingon")


def test_language_reward_scores_the_chain_of_thought():
    lang = get_reward("language")
    text = "<think> 我们 compute 这个 </think> <answer> all English here </answer>"
    assert extract_think(text) == " 我们 compute 这个 "
    assert lang(text, {}) == pytest.approx(0.2)
    assert lang(text, {"language": "zh"}) == pytest.approx(0.8)  # the sample picks the target
    assert lang(text, {}, language="zh") == pytest.approx(0.8)
    assert extract_think("prefilled thoughts </think> answer") == "prefilled thoughts "
    assert extract_think("no tags") == "no tags"


# ----------------------------------------------------------------------------------------------
# Countdown
# ----------------------------------------------------------------------------------------------

def test_countdown_reward():
    cd = get_reward("countdown")
    sample = {"numbers": [3, 5, 2], "target": 16}
    assert cd("<think> 3+5=8, 8*2=16 </think> <answer> (3+5)*2 </answer>", sample) == 1.0
    assert cd("<answer> (3+5)*2 = 16 </answer>", sample) == 1.0
    assert cd("<answer> (3+5)*2 = 17 </answer>", sample) == 0.0
    assert cd("<answer> 3*5+2 </answer>", sample) == 0.0          # wrong value
    assert cd("<answer> (5+5+3+3)/2*2 </answer>", sample) == 0.0  # numbers reused
    assert cd("<answer> __import__('os').system('true') </answer>", sample) == 0.0
    assert cd("(3+5)*2", sample) == 0.0                            # no answer tag
    assert cd("<answer> 8*2 </answer>", {"numbers": [8, 2, 9], "target": 16}) == 1.0
    assert cd("<answer> 8*2 </answer>", {"numbers": [8, 2, 9], "target": 16}, use_all=True) == 0.0


# ----------------------------------------------------------------------------------------------
# Code: the sandbox (each run is a fresh interpreter, ~50 ms; timeouts here are 1-2 s)
# ----------------------------------------------------------------------------------------------

ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(2, 0) == 2", "assert add('a', 'b') == 'ab'"]


def test_extract_code_block():
    text = "<think>```python\nx = 0\n```</think> Here:\n```python\ndef f():\n    return 1\n```\n```\nplain\n```"
    assert extract_code_block(text) == "def f():\n    return 1\n"
    assert extract_code_block("```\nplain\n```") == "plain\n"
    assert extract_code_block("no code") is None


def test_code_reward_fraction_and_all_pass():
    code = get_reward("code")
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    assert code(f"```python\n{ADD}```", {"tests": TESTS}, timeout_s=2) == 1.0
    assert code(wrong, {"tests": TESTS}, timeout_s=2) == pytest.approx(1 / 3)
    assert code(wrong, {"tests": TESTS}, all_pass=True, timeout_s=2) == 0.0
    assert code("no code here", {"tests": TESTS}) == 0.0
