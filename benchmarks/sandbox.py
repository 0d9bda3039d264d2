"""Throughput of the code-reward sandbox: benign checks per second, the kernel-isolated sandbox
(posttrain/sandbox.py) beside the audit-hook sandbox it replaced (read from git at --baseline-rev),
measured in one run on the same programs, serially and with --threads concurrent calls (a GRPO step
scores a group's completions concurrently).

The programs: a correct MBPP-style solution with 3 asserts, a wrong one, and one that raises; each
call starts fresh processes, so the time is mostly interpreter start-up plus, for the new sandbox,
the namespaces and the read-only view.

Usage: python benchmarks/sandbox.py [--calls 60] [--threads 2] [--baseline-rev 3a8889e] [--out PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _machine import cpu_name  # noqa: E402

from posttrain import sandbox  # noqa: E402

TESTS = ["assert add(1, 2) == 3", "assert add(2, 0) == 2", "assert add('a', 'b') == 'ab'"]
PROGRAMS = [
    ("def add(a, b):\n    return a + b\n", TESTS),
    ("def add(a, b):\n    return a - b\n", TESTS),
    ("def add(a, b):\n    raise ValueError(a)\n", TESTS[:1]),
]
EXPECTED = [[True, True, True], [False, True, False], [False]]


def baseline_module(rev: str):
    """The sandbox module as it was at `rev` (the audit-hook version), loaded from git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:posttrain/sandbox.py"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "sandbox_baseline.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("sandbox_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def calls_per_s(run_python, calls: int, threads: int) -> float:
    def one(i):
        code, tests = PROGRAMS[i % len(PROGRAMS)]
        r = run_python(code, tests, timeout_s=10)
        assert r.passed == EXPECTED[i % len(PROGRAMS)], r  # a fast wrong answer is no throughput
    for i in range(3):
        one(i)  # warm the page cache
    start = time.perf_counter()
    if threads == 1:
        for i in range(calls):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(calls)))
    return calls / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-rev", default="3a8889e")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sandbox.json"))
    a = ap.parse_args()
    old = baseline_module(a.baseline_rev)
    isolation = sandbox.check_isolation()
    rows = {}
    for name, fn in (("audit_hook_baseline", old.run_python), ("namespaces", sandbox.run_python)):
        rows[name] = {f"threads_{t}": round(calls_per_s(fn, a.calls, t), 2) for t in (1, a.threads)}
        print(name, rows[name], flush=True)
    out = {
        "benchmark": "sandbox",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "python": sys.version.split()[0], "isolation": isolation, "baseline_rev": a.baseline_rev,
        "calls": a.calls, "calls_per_s": rows,
        "ratio_serial": round(rows["namespaces"]["threads_1"] / rows["audit_hook_baseline"]["threads_1"], 3),
        f"ratio_threads_{a.threads}": round(rows["namespaces"][f"threads_{a.threads}"]
                                            / rows["audit_hook_baseline"][f"threads_{a.threads}"], 3),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": "python benchmarks/sandbox.py " + " ".join(sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
