"""The model/runtime contract (parallel/protocols.py): every preset's model conforms, the table lists every
hook the runtime's code reads, each row's readers exist and name it, and a broken model is reported."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from model import build_model, preset, preset_names
from parallel import protocols
from parallel.protocols import HOOK_NAMES, HOOKS, NOT_HOOKS, TP_STYLES, check_model

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("parallel", "pretrain", "posttrain", "plan")   # the code that reads models from outside
# the names a model (or stage, or module of one) goes by in parallel/, and in the loops and the planner
RECEIVERS = {"model", "module", "m", "net", "stage", "s", "unit", "modules", "policy"}
LOOP_RECEIVERS = {"model", "module", "m", "net", "stage", "policy"}
LOADED = {"model", "net", "policy"}  # ... whose plain attribute reads count too, in parallel/ (which must not guess)
MODULE_ATTRS = set(dir(nn.Linear(1, 1)))                   # nn.Module's (and nn.Linear's) own names


def _sources():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            if where != "parallel/protocols.py":   # the checker itself
                yield where, ast.parse(path.read_text())


def _literal(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _mixins(tree) -> set[str]:
    """Classes put in front of a model's class: type(name, (Mixin, cls), {})."""
    out = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type"
                and len(node.args) == 3 and isinstance(node.args[1], ast.Tuple) and node.args[1].elts
                and isinstance(node.args[1].elts[0], ast.Name)):
            out.add(node.args[1].elts[0].id)
    return out


def hooks_read() -> dict[str, set[str]]:
    """{name: {"file:line"}} of every attribute the scanned code reads or writes on a model from outside:
    getattr(type(x), "name"), hasattr(x, "name"), getattr(<model>, "name"), <model>.name = ..., plain
    <model>.name reads, and self.name inside a mixin class the runtime puts in front of a model's class."""
    found: dict[str, set[str]] = {}

    def add(name, where, node):
        found.setdefault(name, set()).add(f"{where}:{node.lineno}")

    for where, tree in _sources():
        mixins = _mixins(tree)
        receivers = RECEIVERS if where.startswith("parallel/") else LOOP_RECEIVERS
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2:
                obj, name = node.args[0], _literal(node.args[1])
                if name is None:
                    continue
                of_type = isinstance(obj, ast.Call) and isinstance(obj.func, ast.Name) and obj.func.id == "type"
                if node.func.id == "hasattr" or (node.func.id == "getattr" and (
                        of_type or (isinstance(obj, ast.Name) and obj.id in receivers))):
                    add(name, where, node)
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                        if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id in receivers:
                            add(e.attr, where, node)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and where.startswith("parallel/")
                  and isinstance(node.value, ast.Name) and node.value.id in LOADED and node.attr not in MODULE_ATTRS):
                add(node.attr, where, node)
            elif isinstance(node, ast.ClassDef) and node.name in mixins:
                own = set()  # what the mixin defines itself: its methods and class-level names
                for n in node.body:
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        own.add(n.name)
                    targets = (n.targets if isinstance(n, ast.Assign)
                               else [n.target] if isinstance(n, ast.AnnAssign) else [])
                    for t in targets:
                        names = t.elts if isinstance(t, ast.Tuple) else [t]
                        own.update(e.id for e in names if isinstance(e, ast.Name))
                for sub in ast.walk(node):
                    if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self"
                            and sub.attr not in own and sub.attr not in MODULE_ATTRS):
                        add(sub.attr, where, sub)
    return found


@functools.lru_cache(maxsize=None)
def _parsed(path: str) -> tuple[str, ast.Module]:
    text = (ROOT / path).read_text()
    return text, ast.parse(text)


def _function_source(path: str, qualname: str) -> str | None:
    text, tree = _parsed(path)
    body = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return ast.get_source_segment(text, node)


# -- (a) every preset's model conforms ------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("tiny-")])
def test_presets_conform(name):
    assert check_model(build_model(preset(name), device="meta")) == []


# -- (b) the table is complete and true -----------------------------------------------------------------
def test_every_hook_read_has_a_row():
    found = hooks_read()
    missing = {n: sorted(w) for n, w in found.items() if n not in HOOK_NAMES and n not in NOT_HOOKS}
    assert not missing, f"hooks read from models with no row in parallel/protocols.py HOOKS: {missing}"
    stale = sorted(set(NOT_HOOKS) - set(found))
    assert not stale, f"NOT_HOOKS lists names no code reads any more: {stale}"


def test_every_row_names_real_readers():
    wrong = []
    for h in HOOKS:
        assert h.kind in protocols.KINDS and h.role in protocols.ROLES, h
        assert h.used_by and h.contract, h.name
        for ref in h.used_by:
            path, _, qualname = ref.partition(":")
            src = _function_source(path, qualname) if (ROOT / path).is_file() else None
            if src is None:
                wrong.append(f"{h.name}: {ref} does not exist")
            elif h.name not in src:
                wrong.append(f"{h.name}: {ref} does not mention it")
    assert not wrong, wrong


def test_tp_styles_are_those_apply_tp_knows():
    src = _function_source("parallel/tensor_parallel.py", "apply_tp")
    applied = set(re.findall(r'name == "(\w+)"', src))
    assert applied == set(TP_STYLES)


def test_docstring_and_docs_show_the_table():
    doc = protocols.__doc__
    table = doc[doc.index("The hooks"):doc.index("Not in this contract")]
    rows = [line.split()[0] for line in table.splitlines()[3:] if line.startswith("    ")]  # after the header
    assert rows == [h.name for h in HOOKS]
    text = (ROOT / "docs" / "contract.md").read_text()
    begin, end = "<!-- begin: python -m parallel.protocols -->\n", "<!-- end: python -m parallel.protocols -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == protocols.render_markdown(), \
        "docs/contract.md is out of date: paste `python -m parallel.protocols` between its markers"


# -- (c) a broken model is reported ---------------------------------------------------------------------
class _Toy(nn.Module):
    tp_plan = {"": "region_input", "up": "colwise", "down": "rowwise"}

    def __init__(self, optional: bool = False):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.down = nn.Linear(8, 4)
        if optional:
            self.extra = nn.Linear(4, 4)


def test_a_conforming_toy_has_no_problem():
    class WithOptional(_Toy):
        tp_plan = {**_Toy.tp_plan, "extra": "colwise"}   # absent on this instance: a configuration without it
    assert check_model(_Toy(), top_level=False) == []
    assert check_model(WithOptional(), top_level=False) == []


def test_tp_plan_naming_a_missing_child_is_reported():
    class Broken(_Toy):
        tp_plan = {**_Toy.tp_plan, "proj": "colwise"}
    problems = check_model(Broken(), top_level=False)
    assert len(problems) == 1 and "'proj'" in problems[0] and "never assigns" in problems[0], problems


class _Experts(nn.Module):
    ep_count, ep_params = "n_experts", ("w1",)

    def __init__(self):
        super().__init__()
        self.n_experts = 4
        self.w1 = nn.Parameter(torch.zeros(4, 2, 2))
        self.scale = 1.0

    @staticmethod
    def grouped_gemm(x, w, counts):
        return x

    def forward(self, x, indices, weights, partial=True):
        return x


@pytest.mark.parametrize("body, expect", [
    (dict(tp_plan={"": "colwise"}), "needs a child"),
    (dict(tp_plan={"up": "splitwise"}), "unknown style 'splitwise'"),
    (dict(tp_plan={"up": "colwise:heads"}), "not a positive int attribute"),
    (dict(tp_plan={"up": "token_split"}), "use the key \"\""),
    (dict(tp_plan={"up": "vocab_embed"}), "needs an nn.Embedding"),
    (dict(tp_divide=("n_heads",)), "'n_heads', which is not a positive int attribute"),
    (dict(fsdp_unit=True, recompute_selective=("up", "missing")), None),          # a missing path is skipped
    (dict(fsdp_unit=True, recompute_selective=("nothing",)), "would recompute nothing"),
    (dict(recompute_selective=("up",)), "no fsdp_unit"),
    (dict(param_layouts={}), "which the runtime writes"),
    (dict(fsdp_forward_methods=("loss",)), "top-level model only"),
])
def test_broken_declarations_are_reported(body, expect):
    cls = type("Broken", (_Toy,), body)
    problems = check_model(nn.Sequential(cls()), top_level=False)
    if expect is None:
        assert problems == []
    else:
        assert any(expect in p for p in problems), problems


@pytest.mark.parametrize("body, expect", [
    ({}, None),
    (dict(ep_params=("w1", "scale")), "'scale', which is not a parameter"),
    (dict(ep_count="size"), "'size', which is not a positive int attribute"),
    (dict(grouped_gemm=None), "grouped_gemm must be callable"),
    (dict(forward=lambda self, x: x), "does not accept (x, indices, weights, partial=True)"),
])
def test_expert_groups_are_checked(body, expect):
    problems = check_model(type("Group", (_Experts,), body)(), top_level=False)
    assert problems == [] if expect is None else any(expect in p for p in problems), problems


def test_top_level_model_is_checked():
    net = build_model(preset("tiny-deepseek-v3"), device="meta")
    net.layers = nn.ModuleDict({"1": net.layers["1"], "0": net.layers["0"]})
    problems = check_model(net)
    assert any("are not \"0\", \"1\", ... in order" in p for p in problems), problems
    assert any("lacks" in p for p in check_model(_Toy())), "a toy is no top-level model"
