"""Rule-based rewards (R1 §2.2.2: accuracy and format rewards, no neural reward model for reasoning;
R1 §2.3.2: a language-consistency reward summed with accuracy) behind a pluggable registry.

A reward function is `fn(completion: str, sample: dict, **options) -> float`: `sample` is the data
record (prompt, reference "answer", task fields such as "tests", "numbers", "target", "language"),
and `options` are keyword arguments set from the config. Register one by name:

    @register_reward("my_reward")
    def my_reward(completion, sample, *, bonus=0.0): ...

and compose rewards with weights from a config (a registered name or `module.path:function`):

    reward = build_reward({"accuracy": 1.0, "format": {"weight": 0.1, "style": "r1_zero"},
                           "mypkg.rewards:brevity": 0.05})
    reward(completion, sample)          # the weighted sum
    reward.score(completion, sample)    # {"accuracy": 1.0, "format": 0.0, ..., "reward": 1.0}

Built-ins: accuracy, format, language, code (posttrain.sandbox), countdown (posttrain.tasks).
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
import unicodedata
from fractions import Fraction
from typing import Any, Callable, Mapping

from posttrain.templates import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

__all__ = ["RewardFn", "register_reward", "get_reward", "reward_names", "Reward", "build_reward",
           "extract_boxed", "extract_answer_tag", "extract_answer", "normalize_answer", "parse_number",
           "answers_match", "format_ok", "extract_think", "split_words", "language_fraction",
           "accuracy_reward", "format_reward", "language_reward", "code_reward", "countdown_reward",
           "DEFAULT_EOS", "VERIFIERS", "verified"]

RewardFn = Callable[..., float]
_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn | None = None, *, replace: bool = False):
    """Register `fn` under `name` (usable as a decorator). A name already taken by another function
    is an error unless `replace=True`."""
    def deco(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise TypeError(f"reward {name!r} must be callable, got {type(f).__name__}")
        old = _REGISTRY.get(name)
        if old is not None and old is not f and not replace and \
                (old.__module__, old.__qualname__) != (f.__module__, f.__qualname__):
            raise ValueError(f"reward {name!r} is already registered ({old.__module__}.{old.__qualname__}); "
                             "pick another name or pass replace=True")
        _REGISTRY[name] = f
        return f
    return deco(fn) if fn is not None else deco


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(spec: str | RewardFn) -> RewardFn:
    """A registered reward by name, or a function given as `module.path:function`."""
    if callable(spec):
        return spec
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"reward {spec!r}: cannot import module {module!r}: {e}") from e
        fn = mod
        for part in attr.split("."):
            fn = getattr(fn, part, None)
            if fn is None:
                raise ValueError(f"reward {spec!r}: module {module!r} has no attribute {attr!r}")
        if not callable(fn):
            raise ValueError(f"reward {spec!r} is not callable")
        return fn
    raise ValueError(f"unknown reward {spec!r}; registered: {', '.join(reward_names())}; "
                     "or give a function as module.path:function")


class Reward:
    """Weighted sum of reward functions, built from `{name: weight}` or `{name: {"weight": w, **options}}`."""

    def __init__(self, config: Mapping[str, Any]):
        if not isinstance(config, Mapping) or not config:
            raise ValueError("a reward config is a non-empty mapping {name: weight} or "
                             "{name: {'weight': w, option: value}}, e.g. {'accuracy': 1.0, 'format': 0.1}")
        self.terms: list[tuple[str, float, RewardFn, dict]] = []
        for name, entry in config.items():
            options = {}
            if isinstance(entry, Mapping):
                options = dict(entry)
                if "weight" not in options:
                    raise ValueError(f"reward {name!r}: an option mapping needs 'weight'")
                weight = options.pop("weight")
            else:
                weight = entry
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
            fn = get_reward(name)
            _check_options(name, fn, options)
            if hasattr(fn, "check"):  # a reward that needs the machine's help checks it now, not mid-run
                fn.check(**options)
            self.terms.append((name, float(weight), fn, options))

    def components(self, completion: str, sample: Mapping) -> dict[str, float]:
        out = {}
        for name, _, fn, options in self.terms:
            try:
                value = float(fn(completion, sample, **options))
            except Exception as e:
                raise RuntimeError(f"reward {name!r} failed: {type(e).__name__}: {e}") from e
            out[name] = value
        return out

    def score(self, completion: str, sample: Mapping) -> dict[str, float]:
        """Every component and their weighted sum under "reward"."""
        parts = self.components(completion, sample)
        parts["reward"] = sum(w * parts[name] for name, w, _, _ in self.terms)
        return parts

    def __call__(self, completion: str, sample: Mapping) -> float:
        return self.score(completion, sample)["reward"]

    def __repr__(self) -> str:
        return "Reward(" + ", ".join(f"{n}={w}" for n, w, _, _ in self.terms) + ")"


def build_reward(config: Mapping[str, Any]) -> Reward:
    return Reward(config)


VERIFIERS = ("accuracy", "countdown", "code")


def verified(score: Mapping[str, float]) -> float:
    """The verifier's verdict in a `Reward.score()` dict (1.0 = correct): the first of the accuracy,
    countdown and code components it holds, else the whole reward (a custom reward that is its own
    verifier). Rejection sampling (R1 §2.3.3) keeps the samples whose verdict is 1."""
    for key in VERIFIERS:
        if key in score:
            return score[key]
    return score["reward"]


def _check_options(name: str, fn: RewardFn, options: dict) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind("completion", {}, **options)
    except TypeError:
        params = [p.name for p in list(sig.parameters.values())[2:]
                  if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = [k for k in options if k not in params]
        raise ValueError(f"reward {name!r} does not take option(s) {unknown or list(options)}; its options: "
                         f"{', '.join(params) or 'none'}") from None


# ---------------------------------------------------------------------------------------------
# Answer extraction and comparison
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")


def _braced(text: str, i: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[i] == '{' (nested braces), and the index after it."""
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif c == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[i + 1:j], j + 1
    return None


def _last_boxed(text: str) -> tuple[str, int] | None:
    """(content, start) of the last complete \\boxed{...} (or `\\boxed 5`)."""
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            got = _braced(text, i)
            if got is not None:
                return got[0], m.start()
        elif i > m.end():  # "\boxed 5": up to whitespace or $
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                return word.group(0), m.start()
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (nested braces kept), or None."""
    got = _last_boxed(text)
    return got[0] if got else None


_ANSWER_TAG = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)


def extract_answer_tag(text: str) -> str | None:
    """The stripped content of the last `<answer>...</answer>`, or None."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def extract_answer(text: str) -> str | None:
    """The final answer: the last `\\boxed{}` or the last `<answer>` block, whichever comes later; a
    `\\boxed{}` inside that answer block is unwrapped. None when there is neither."""
    tags = list(_ANSWER_TAG.finditer(text))
    boxed = _last_boxed(text)
    if tags and (boxed is None or boxed[1] < tags[-1].end()):
        inner = tags[-1].group(1)
        box = extract_boxed(inner)
        return (box if box is not None else inner).strip()
    return boxed[0].strip() if boxed else None


_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{")


def _unwrap(s: str) -> str:
    """`\\text{abc}` -> `abc` (and similar wrappers), nested braces respected."""
    while True:
        m = _TEXT_WRAPPERS.search(s)
        if not m:
            return s
        got = _braced(s, m.end() - 1)
        if got is None:
            return s[:m.start()] + s[m.end():]
        s = s[:m.start()] + got[0] + s[got[1]:]


def normalize_answer(s: Any) -> str:
    """A canonical string for comparison: no `$`/`\\(`, text wrappers unwrapped, no `\\left`/`\\right`,
    LaTeX spacing, degree signs or whitespace, `\\dfrac`/`\\tfrac` as `\\frac`, `\\%` as `%`, lower case,
    no trailing period, and a leading `x =` dropped."""
    s = str(s).strip()
    s = s.replace("\u2212", "-").replace("\\$", "").replace("$", "")
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s.strip())
    s = _unwrap(s)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |~", "", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
    s = re.sub(r"\s+", "", s).lower()
    s = s.rstrip(".")
    m = re.match(r"^[a-z]=(.+)$", s)  # "x=5" -> "5"
    if m:
        s = m.group(1)
    return s


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def parse_number(s: Any) -> Fraction | None:
    """The exact value of an answer that is a number, or None: ints, decimals, `1,000`, leading `+`,
    `3/4`, `\\frac{3}{4}` (also `\\frac34`, `-\\frac{3}{4}`), scientific `1e3`, and a trailing `%`
    (dropped: "50%" is 50)."""
    s = normalize_answer(s)
    if not s or len(s) > 100:
        return None
    if any(abs(int(e)) > 400 for e in re.findall(r"e([-+]?\d+)", s)):  # Fraction("1e999999999") never ends
        return None
    if s.endswith("%"):
        s = s[:-1]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    sign = 1
    if s[:1] in "+-" and s[1:2] == "\\":
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    m = re.fullmatch(r"\\frac\{([^{}]+)\}\{([^{}]+)\}|\\frac(\d)(\d)", s)
    if m:
        num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        a, b = parse_number(num), parse_number(den)
        if a is None or b is None or b == 0:
            return None
        return sign * a / b
    if sign != 1:
        return None
    if "/" in s:
        num, _, den = s.partition("/")
        if _NUMBER.fullmatch(num) and _NUMBER.fullmatch(den):
            b = Fraction(den)
            return Fraction(num) / b if b != 0 else None
        return None
    if _NUMBER.fullmatch(s):
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError):
            return None
    return None


_math_verify_missing = False


def _math_verify():
    """The `math_verify` module when importable (looked up on every call, so tests can monkeypatch it)."""
    global _math_verify_missing
    mod = sys.modules.get("math_verify")
    if mod is not None:
        return mod
    if _math_verify_missing:
        return None
    try:
        return importlib.import_module("math_verify")  # optional dependency
    except ImportError:
        _math_verify_missing = True
        return None


def answers_match(predicted: Any, reference: Any, *, use_math_verify: bool = True) -> bool:
    """Whether two final answers agree: numerically (exact, up to 1e-9 relative) when both are numbers,
    else as normalized strings; math_verify's verdict also counts when it is installed."""
    if predicted is None or reference is None:
        return False
    ref, pred = str(reference), str(predicted)
    ref = extract_boxed(ref) or ref  # written as a full solution: take its boxed answer
    pred = extract_boxed(pred) or pred
    a, b = parse_number(pred), parse_number(ref)
    if a is not None and b is not None:
        if a == b or abs(a - b) <= Fraction(1, 10 ** 9) * max(1, abs(b)):
            return True
    elif normalize_answer(pred) and normalize_answer(pred) == normalize_answer(ref):
        return True
    mv = _math_verify() if use_math_verify else None
    if mv is not None:
        try:
            return bool(mv.verify(mv.parse("\\boxed{" + ref + "}"), mv.parse("\\boxed{" + pred + "}")))
        except Exception:
            return False
    return False


@register_reward("accuracy")
def accuracy_reward(completion: str, sample: Mapping, *, use_math_verify: bool = True) -> float:
    """1.0 when the completion's final answer (last \\boxed{} or <answer>) matches sample["answer"]."""
    if "answer" not in sample:
        raise KeyError('the accuracy reward needs the reference answer in sample["answer"]')
    return float(answers_match(extract_answer(completion), sample["answer"], use_math_verify=use_math_verify))


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------

DEFAULT_EOS = ("</s>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<|end_of_text|>", "<eos>")
_R1_ZERO_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_CHAT_FORMAT = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)


def format_ok(completion: str, style: str = "r1_zero", *, eos=DEFAULT_EOS, require_nonempty: bool = True) -> bool:
    """R1-Zero's format (R1 §2.2.2): `<think> ... </think> <answer> ... </answer>`, each tag exactly once,
    in order, nothing after the answer but whitespace and EOS strings. style="chat" checks the chat
    template's `<think> ... </think> summary` instead (no <answer> needed). With require_nonempty the
    reasoning and the answer/summary must not be blank."""
    if style not in ("r1_zero", "chat"):
        raise ValueError(f"unknown format style {style!r}; valid: r1_zero, chat")
    text = completion
    eos = (eos,) if isinstance(eos, str) else tuple(eos or ())
    stripped = True
    while stripped:  # trailing EOS strings and whitespace
        stripped = False
        text = text.rstrip()
        for e in eos:
            if e and text.endswith(e):
                text, stripped = text[:-len(e)], True
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return False
    if style == "r1_zero":
        if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
            return False
        m = _R1_ZERO_FORMAT.fullmatch(text)
    else:
        m = _CHAT_FORMAT.fullmatch(text)
    if m is None:
        return False
    return not require_nonempty or all(g.strip() for g in m.groups())


@register_reward("format")
def format_reward(completion: str, sample: Mapping, *, style: str = "r1_zero", eos=DEFAULT_EOS,
                  require_nonempty: bool = True) -> float:
    return float(format_ok(completion, style, eos=eos, require_nonempty=require_nonempty))


# ---------------------------------------------------------------------------------------------
# Language consistency
# ---------------------------------------------------------------------------------------------

# Language -> the script its words are written in.
_LANGUAGE_SCRIPT = {"en": "latin", "latin": "latin", "zh": "cjk", "ja": "cjk", "ko": "cjk", "cjk": "cjk"}
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F),  # Han
               (0x3040, 0x30FF), (0x31F0, 0x31FF),  # Hiragana, Katakana
               (0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF))  # Hangul


def _script(c: str) -> str | None:
    """"latin", "cjk", "other" (letters of any other script) or None (not a letter)."""
    o = ord(c)
    if o < 128:
        return "latin" if c.isalpha() else None
    if any(lo <= o <= hi for lo, hi in _CJK_RANGES):
        return "cjk"
    if not c.isalpha():
        return None
    return "latin" if unicodedata.name(c, "").startswith("LATIN") else "other"


_NOT_WORDS = re.compile(r"\$\$.*?\$\$|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]"  # inline/display math
                        r"|\\[A-Za-z]+|</?(?:think|answer)>", re.DOTALL)


def split_words(text: str) -> list[tuple[str, str]]:
    """(word, script) pairs. A word is a maximal run of letters of one script, except that every CJK
    character (Han, kana, Hangul) is a word of its own; digits, punctuation, LaTeX math (`$...$`,
    `\\(...\\)`, `\\[...\\]`) and commands (`\\frac`), and the think/answer tags are not words (math
    belongs to no language)."""
    text = _NOT_WORDS.sub(" ", text)
    words, cur, cur_script = [], [], None
    for c in text:
        s = _script(c)
        if s == "cjk" or s != cur_script:
            if cur:
                words.append(("".join(cur), cur_script))
            cur, cur_script = [], None
        if s == "cjk":
            words.append((c, s))
        elif s is not None:
            cur.append(c)
            cur_script = s
    if cur:
        words.append(("".join(cur), cur_script))
    return words


def language_fraction(text: str, language: str = "en") -> float:
    """The fraction of words of `text` written in the target language's script (R1 §2.3.2: "the
    proportion of target language words in the CoT"); "en" counts Latin-script words, "zh"/"ja"/"ko"
    CJK characters. 0.0 when there are no words."""
    if language not in _LANGUAGE_SCRIPT:
        raise ValueError(f"unknown language {language!r}; valid: {', '.join(sorted(_LANGUAGE_SCRIPT))}")
    words = split_words(text)
    if not words:
        return 0.0
    target = _LANGUAGE_SCRIPT[language]
    return sum(s == target for _, s in words) / len(words)


def extract_think(completion: str) -> str:
    """The chain of thought: inside the first `<think>` (to its `</think>` or the end); before `</think>`
    when the opening tag was in the prompt; the whole completion when there is no tag."""
    if THINK_OPEN in completion:
        body = completion.split(THINK_OPEN, 1)[1]
        return body.split(THINK_CLOSE, 1)[0]
    if THINK_CLOSE in completion:
        return completion.split(THINK_CLOSE, 1)[0]
    return completion


@register_reward("language")
def language_reward(completion: str, sample: Mapping, *, language: str = "en") -> float:
    """Language consistency of the CoT (R1 §2.3.2); sample["language"] overrides the option."""
    return language_fraction(extract_think(completion), sample.get("language") or language)


# ---------------------------------------------------------------------------------------------
# Code and Countdown
# ---------------------------------------------------------------------------------------------

@register_reward("code")
def code_reward(completion: str, sample: Mapping, *, all_pass: bool = False, timeout_s: float = 5.0,
                memory_mb: int = 1024, unsafe_local: bool = False) -> float:
    """The fraction of sample["tests"] the completion's last ```python block passes in the sandbox
    (all_pass: 1.0 only when every test passes). No code block: 0.0. unsafe_local: run candidate code
    without kernel isolation where the kernel refuses it (warned on every call; see posttrain.sandbox)."""
    from posttrain.sandbox import extract_code_block, run_python

    if "tests" not in sample:
        raise KeyError('the code reward needs the tests in sample["tests"] (a list of Python snippets)')
    code = extract_code_block(completion)
    if code is None:
        return 0.0
    result = run_python(code, sample["tests"], timeout_s=sample.get("timeout_s", timeout_s), memory_mb=memory_mb,
                        unsafe_local=unsafe_local)
    return float(result.all_passed) if all_pass else result.fraction


def _check_code_sandbox(*, unsafe_local: bool = False, **_) -> None:
    """Fail closed at build time: SandboxUnavailable names the fix when the kernel refuses isolation."""
    from posttrain.sandbox import check_isolation
    check_isolation(bool(unsafe_local))


code_reward.check = _check_code_sandbox


@register_reward("countdown")
def countdown_reward(completion: str, sample: Mapping, *, use_all: bool = False) -> float:
    """1.0 when the expression in the last <answer> uses sample["numbers"] (each at most once; all of
    them with use_all) and equals sample["target"]."""
    from posttrain.tasks import verify_countdown

    for key in ("numbers", "target"):
        if key not in sample:
            raise KeyError(f'the countdown reward needs sample["{key}"]')
    expr = extract_answer_tag(completion)
    if expr is None:
        return 0.0
    return float(verify_countdown(expr, sample["numbers"], sample["target"], use_all=use_all))
