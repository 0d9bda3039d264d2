"""The packages depend one way (DESIGN.md, "Layout"): launch -> posttrain -> pretrain -> model -> parallel,
with plan beside them (plan -> model, parallel; of the rest only launch and the metrics' GPU table read it).
Read from the source's import statements, so a wrong-way import fails here before it tangles the tree."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("launch", "posttrain", "pretrain", "model", "parallel", "plan")
ALLOWED = {
    "parallel": set(),
    "model": {"parallel"},
    "plan": {"model", "parallel"},
    "pretrain": {"model", "parallel", "plan"},
    "posttrain": {"pretrain", "model", "parallel"},
    "launch": {"posttrain", "pretrain", "model", "parallel", "plan"},
}
PLAN_READERS = {"launch", "pretrain/metrics.py"}   # who may import plan, and from pretrain only the GPU table


def imports(path: Path) -> list[str]:
    """Every absolute module name `path` imports (at any depth, function-local imports included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", OURS)
def test_imports_point_one_way(package):
    assert (ROOT / package).is_dir(), f"{package}/ is missing: DESIGN.md's layout names it"
    wrong = []
    for path in sources(package):
        for name in imports(path):
            top = name.split(".")[0]
            if top in OURS and top != package and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "imports against the one-way rule (DESIGN.md):\n" + "\n".join(wrong)


def test_plan_is_read_only_by_launch_and_the_gpu_table():
    wrong = []
    for package in ("pretrain", "posttrain", "model", "parallel"):
        for path in sources(package):
            rel = path.relative_to(ROOT).as_posix()
            for name in imports(path):
                if name.split(".")[0] != "plan":
                    continue
                if rel not in PLAN_READERS or name != "plan.hardware":
                    wrong.append(f"{rel} imports {name}")
    assert not wrong, "\n".join(wrong)
