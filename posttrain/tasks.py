"""Verifiable tasks with graded difficulty, deterministic by seed, for the CPU demonstration of R1-Zero
style RL (rule-based rewards only, R1 §2.2.2): integer arithmetic and Countdown.

    tasks = generate_tasks("arithmetic", 100, seed=0, difficulty=[1, 2, 3])
    paths = write_task_splits("data/tasks", "countdown", n_train=1000, n_heldout=100, seed=0)
    tok = build_task_tokenizer("data/tasks/tok.model")   # tags and digits are one token each

A task is a dict: "prompt", "answer", "task" ("arithmetic" | "countdown"), "difficulty", "solution"
(worked steps), "response" (an SFT reply in the r1_zero format: `<think> steps </think> <answer>
answer </answer>`), and for Countdown "numbers" and "target" (its "answer" is one solution; any
expression that verifies is right, see the `countdown` reward).

Arithmetic level L: 2 + (L-1)//2 operands of up to 1 + L//2 digits (the first has exactly that
many), operators + and - up to level 2 and + - * from level 3: level 1 "3+5", level 2 "12+7",
level 3 "23*4-15", ... The answer is the exact integer value under Python's precedence.

Countdown level L: 3 + (L-1)//2 numbers from 1..{10, 20, 25, 50, 100}[min(L, 5) - 1]; the target is
the value of a random expression over all the numbers (+ - * and exact /), so every task is solvable.
The verifier parses the expression with `ast` and allows only integer literals, + - * / and
parentheses (no names, calls or attributes, so nothing like `__import__` can run).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
from collections import Counter
from fractions import Fraction
from typing import Iterable, Sequence

from posttrain.templates import ANSWER_CLOSE, ANSWER_OPEN, SPECIAL_TAGS, THINK_CLOSE, THINK_OPEN, get_template

__all__ = ["TASK_TYPES", "arithmetic_spec", "countdown_spec", "make_arithmetic", "make_countdown",
           "generate_tasks", "split_tasks", "write_task_splits", "evaluate_expression", "verify_countdown",
           "build_task_tokenizer", "task_text"]

TASK_TYPES = ("arithmetic", "countdown")
_MAX_EXPR_CHARS = 200


# ---------------------------------------------------------------------------------------------
# Safe expression evaluation
# ---------------------------------------------------------------------------------------------

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def evaluate_expression(expr: str, *, allow_div: bool = True) -> tuple[Fraction, list[int]]:
    """(exact value, integer literals in order) of an arithmetic expression, parsed with `ast`: only
    non-negative integer literals, binary + - * (and / when allow_div) and parentheses are allowed.
    Raises ValueError for anything else (names, calls, attributes, floats, unary minus, **, ...)
    and ZeroDivisionError for a division by zero."""
    if not isinstance(expr, str):
        raise ValueError(f"expression must be a string, got {type(expr).__name__}")
    if len(expr) > _MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {_MAX_EXPR_CHARS} characters")
    expr = expr.replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-").strip()
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an expression: {expr!r} ({type(e).__name__})") from None
    numbers: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            if isinstance(node.op, ast.Div) and not allow_div:
                raise ValueError("division is not allowed here")
            left, right = ev(node.left), ev(node.right)
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"not allowed in an expression: {type(node).__name__} in {expr!r}")

    return ev(tree), numbers


def verify_countdown(expr: str, numbers: Sequence[int], target: int, *, use_all: bool = False) -> bool:
    """Whether `expr` uses only the given numbers, each at most once (exactly once with use_all), and
    equals target. An optional trailing "= target" is accepted. Never evaluates arbitrary code."""
    if not isinstance(expr, str):
        return False
    if expr.count("=") == 1:
        expr, rhs = expr.split("=")
        if rhs.strip() != str(target):
            return False
    try:
        value, used = evaluate_expression(expr)
    except (ValueError, ZeroDivisionError):
        return False
    available, used_count = Counter(int(n) for n in numbers), Counter(used)
    if any(used_count[n] > available[n] for n in used_count):
        return False
    if use_all and used_count != available:
        return False
    return value == target


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------

def arithmetic_spec(level: int) -> tuple[int, int, str]:
    """(operands, max digits, operators) of arithmetic level `level` >= 1."""
    if level < 1:
        raise ValueError(f"difficulty levels start at 1, got {level}")
    return 2 + (level - 1) // 2, 1 + level // 2, "+-" if level <= 2 else "+-*"


def countdown_spec(level: int) -> tuple[int, int]:
    """(how many numbers, largest number) of Countdown level `level` >= 1."""
    if level < 1:
        raise ValueError(f"difficulty levels start at 1, got {level}")
    return 3 + (level - 1) // 2, (10, 20, 25, 50, 100)[min(level, 5) - 1]


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def _columns(a: int, op: str, b: int) -> list[str]:
    """Column steps of a + b or a - b (a, b >= 0), units first, with carries and borrows written out, then
    the whole step: "47+38" -> 7+8=15, 4+3+1=8, 47+38=85. Each column is a one-digit fact, so a small model
    can learn the method and apply it to numbers it has never seen (a left-to-right answer needs the carry
    before it is computed). a < b subtracts the other way round: "30-51" -> 30-51=-(51-30), 1-0=1, 5-3=2."""
    steps = []
    if op == "-" and a < b:
        steps.append(f"{a}-{b}=-({b}-{a})")
        x, y = b, a
    else:
        x, y = a, b
    n = max(len(str(x)), len(str(y)))
    if n > 1:
        carry = 0
        for i in range(n):
            dx, dy = x // 10 ** i % 10, y // 10 ** i % 10
            if op == "+":
                v = dx + dy + carry
                steps.append(f"{dx}+{dy}" + (f"+{carry}" if carry else "") + f"={v}")
                carry = v // 10
            else:
                top = dx - carry
                borrow = 1 if top < dy else 0
                steps.append((f"1{dx}" if borrow else f"{dx}") + (f"-{carry}" if carry else "")
                             + f"-{dy}={top + 10 * borrow - dy}")
                carry = borrow
    v = a + b if op == "+" else a - b
    return steps + [f"{a}{op}{b}={v}"]


def _steps(tokens: list) -> list[str]:
    """Worked steps of a flat + - * expression: products first, then left to right; + and - of
    non-negative numbers in columns (_columns)."""
    tokens, steps = list(tokens), []
    while "*" in tokens:
        i = tokens.index("*")
        a, b = tokens[i - 1], tokens[i + 1]
        steps.append(f"{a}*{b}={a * b}")
        tokens[i - 1:i + 2] = [a * b]
    while len(tokens) > 1:
        a, op, b = tokens[:3]
        v = a + b if op == "+" else a - b
        steps += _columns(a, op, b) if a >= 0 and b >= 0 else [f"{a}{op}{b}={v}"]
        tokens[:3] = [v]
    return steps


def _response(steps: str, answer: str) -> str:
    return f"{THINK_OPEN} {steps} {THINK_CLOSE} {ANSWER_OPEN} {answer} {ANSWER_CLOSE}"


def make_arithmetic(rng: random.Random, level: int) -> dict:
    n, digits, ops = arithmetic_spec(level)
    tokens: list = [_operand(rng, digits)]
    for _ in range(n - 1):
        tokens += [rng.choice(ops), _operand(rng, rng.randint(1, digits))]
    expr = "".join(str(t) for t in tokens)
    value, _ = evaluate_expression(expr, allow_div=False)
    answer = str(int(value))
    solution = ", ".join(_steps(tokens))
    return {"prompt": f"Compute {expr}", "answer": answer, "task": "arithmetic", "difficulty": level,
            "solution": solution, "response": _response(solution, answer)}


def make_countdown(rng: random.Random, level: int) -> dict:
    count, largest = countdown_spec(level)
    while True:
        numbers = [rng.randint(1, largest) for _ in range(count)]
        pool = [(Fraction(x), str(x)) for x in numbers]
        steps = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (a, ea), (b, eb) = pool[i], pool[j]
            op = rng.choice("+-*/")
            if op == "-" and a < b:
                (a, ea), (b, eb) = (b, eb), (a, ea)
            if op == "/" and (b == 0 or a % b != 0 or b == 1):
                op = "+"
            value = _OPS[{"+": ast.Add, "-": ast.Sub, "*": ast.Mult, "/": ast.Div}[op]](a, b)
            steps.append(f"{a}{op}{b}={value}")
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"({ea}{op}{eb})")]
        target, expr = pool[0]
        if target.denominator == 1 and 0 < target <= 1000 and target not in [Fraction(x) for x in numbers]:
            break
    expr = expr[1:-1] if expr.startswith("(") and expr.endswith(")") else expr
    assert verify_countdown(expr, numbers, int(target), use_all=True), expr
    solution = ", ".join(steps)
    return {"prompt": f"Using the numbers {numbers}, create an expression that equals {int(target)}. "
                      "You may use +, -, * and /, and each number at most once",
            "answer": expr, "task": "countdown", "difficulty": level, "numbers": numbers,
            "target": int(target), "solution": solution, "response": _response(solution, expr)}


_MAKERS = {"arithmetic": make_arithmetic, "countdown": make_countdown}


def _levels(difficulty: int | Iterable[int]) -> list[int]:
    levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    if not levels or any(not isinstance(x, int) or x < 1 for x in levels):
        raise ValueError(f"difficulty must be a level >= 1 or a list of them, got {difficulty!r}")
    return levels


def _stream(task: str, seed: int, difficulty):
    """An endless deterministic stream of distinct tasks (by prompt)."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASK_TYPES)}")
    levels = _levels(difficulty)
    rng = random.Random(f"{task}:{seed}")
    seen: set[str] = set()
    misses = 0
    while True:
        t = _MAKERS[task](rng, rng.choice(levels))
        if t["prompt"] in seen:
            misses += 1
            if misses > 10_000:
                raise ValueError(f"ran out of distinct {task} tasks at difficulty {levels} after {len(seen)}; "
                                 "ask for fewer or add harder levels")
            continue
        misses = 0
        seen.add(t["prompt"])
        yield t


def generate_tasks(task: str, n: int, *, seed: int = 0, difficulty: int | Iterable[int] = 1) -> list[dict]:
    """`n` distinct tasks of one type, levels drawn uniformly from `difficulty`; the same for the same seed."""
    stream = _stream(task, seed, difficulty)
    return [next(stream) for _ in range(n)]


def _heldout_bucket(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:4], "big") % 1000


def split_tasks(task: str, n_train: int, n_heldout: int, *, seed: int = 0,
                difficulty: int | Iterable[int] = (1, 2, 3)) -> tuple[list[dict], list[dict]]:
    """Disjoint (train, held-out) task lists. A prompt's split is decided by a hash of its text
    (held-out iff hash % 1000 < 1000 * n_heldout / (n_train + n_heldout)), so no prompt lands in both,
    whatever the seed; the stream fills both quotas."""
    if n_train < 0 or n_heldout < 0:
        raise ValueError("split sizes must be >= 0")
    total = n_train + n_heldout
    cut = 0 if n_heldout == 0 else max(1, round(1000 * n_heldout / total)) if total else 0
    train, heldout = [], []
    stream = _stream(task, seed, difficulty)
    while len(train) < n_train or len(heldout) < n_heldout:
        t = next(stream)
        side = heldout if _heldout_bucket(t["prompt"]) < cut else train
        if len(side) < (n_heldout if side is heldout else n_train):
            side.append(t)
    return train, heldout


def direct_response(task: dict) -> str:
    """The reply that skips the work: the problem and its answer in one step, no worked solution."""
    expr = task["prompt"].removeprefix("Compute ")
    return _response(f"{expr}={task['answer']}", task["answer"])


def write_task_splits(out_dir: str, task: str, n_train: int, n_heldout: int, *, seed: int = 0,
                      difficulty: int | Iterable[int] = (1, 2, 3), direct_fraction: float = 0.0) -> dict[str, str]:
    """Write `{task}_train.jsonl` and `{task}_heldout.jsonl` under out_dir; returns their paths.

    direct_fraction: the share of arithmetic training rows whose "response" states the answer without the
    worked solution (`direct_response`, "style": "direct"; the others are "worked"). A model fine-tuned on
    the mix sometimes reasons and sometimes guesses, as a base model does; outcome rewards then teach it
    that the worked replies are the ones that score (R1-Zero's growing length, R1 §2.2.4)."""
    if not 0.0 <= direct_fraction <= 1.0:
        raise ValueError(f"direct_fraction must lie in [0, 1], got {direct_fraction}")
    if direct_fraction and task != "arithmetic":
        raise ValueError("direct_fraction applies to arithmetic tasks only")
    train, heldout = split_tasks(task, n_train, n_heldout, seed=seed, difficulty=difficulty)
    if direct_fraction:
        rng = random.Random(f"direct:{seed}")
        for t in train:
            direct = rng.random() < direct_fraction
            t["style"] = "direct" if direct else "worked"
            if direct:
                t["response"] = direct_response(t)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, rows in (("train", train), ("heldout", heldout)):
        path = os.path.join(out_dir, f"{task}_{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[name] = path
    return paths


# ---------------------------------------------------------------------------------------------
# A tokenizer for the task demo
# ---------------------------------------------------------------------------------------------

def task_text(n_per_level: int = 100, *, seed: int = 0, levels: Sequence[int] = (1, 2, 3, 4, 5)) -> list[str]:
    """Text a task tokenizer should cover: tasks of every type and level through the templates."""
    r1, chat = get_template("r1_zero"), get_template("chat")
    lines = []
    for task in TASK_TYPES:
        for level in levels:
            for t in generate_tasks(task, n_per_level, seed=seed, difficulty=level):
                lines.append(r1.text([{"role": "user", "content": t["prompt"]},
                                      {"role": "assistant", "content": t["response"]}]))
                lines.append(chat.text([{"role": "user", "content": t["prompt"]},
                                        {"role": "assistant", "content": t["answer"], "reasoning": t["solution"]}]))
    return lines


def build_task_tokenizer(path: str, *, vocab_size: int = 256, seed: int = 0, n_per_level: int = 60):
    """Train a tiny SentencePiece BPE on task text and the templates; returns the loaded tokenizer.

    The think/answer tags and chat role markers are user-defined symbols (one token each), digits
    are split (one token each), every printable ASCII character and the newline are in the
    vocabulary (no byte fallback: 256 byte pieces would not fit), so any ASCII text round-trips.
    `vocab_size` is an upper bound (a small corpus may support fewer pieces). Checks that every tag
    encodes to one id and that decode(encode(x)) == x on the training text.
    """
    from pretrain.tokenizer import SentencePieceTokenizer, train_sentencepiece

    prefix = path[:-len(".model")] if path.endswith(".model") else path
    lines = task_text(n_per_level, seed=seed)
    ascii_chars = "".join(chr(c) for c in range(32, 127))
    lines.append(ascii_chars)
    model = train_sentencepiece(lines, prefix, vocab_size, byte_fallback=False, hard_vocab_limit=False,
                                user_defined_symbols=list(SPECIAL_TAGS) + ["\n"], required_chars=ascii_chars[1:],
                                split_digits=True)
    tok = SentencePieceTokenizer(model)
    for tag in SPECIAL_TAGS:
        ids = tok.encode(tag)
        if len(ids) != 1:
            raise RuntimeError(f"task tokenizer {model}: {tag!r} encodes to {len(ids)} ids {ids}, expected one")
    for line in lines + ["0123456789", "a\nb"]:
        if tok.decode(tok.encode(line)) != line:
            raise RuntimeError(f"task tokenizer {model} does not round-trip {line[:80]!r}")
    return tok


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m posttrain.tasks",
                                description="Write train/held-out jsonl splits of verifiable tasks.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--task", choices=TASK_TYPES, default="arithmetic")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--direct-fraction", type=float, default=0.0,
                   help="share of arithmetic training rows answered without the worked solution")
    p.add_argument("--tokenizer", help="also train a task tokenizer at this .model path")
    args = p.parse_args(argv)
    paths = write_task_splits(args.out, args.task, args.train, args.heldout, seed=args.seed,
                              difficulty=args.difficulty, direct_fraction=args.direct_fraction)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.tokenizer:
        print(f"tokenizer: {build_task_tokenizer(args.tokenizer, seed=args.seed)!r}")


if __name__ == "__main__":
    main()
