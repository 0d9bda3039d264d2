"""What compiled rollout steps give a GRPO run (issue 23, rollout.compile): the demo's recipe with eager and compiled
rollouts, one after the other, in one process each.

    python benchmarks/grpo_compile.py [--out benchmarks/results/grpo_compile_cpu.json] [--steps 20] [--repeats 1]

The GRPO demonstration's recipe (configs/posttrain/r1_zero_tiny.yaml: 16 prompts x 8 samples per step at
temperature 0.7, routing recorded for routing_mismatch) from its SFT model, run --steps steps with
rollout.compile=false, then =true, --repeats times in turn, through the real CLI (`python -m posttrain.grpo`, one
thread, as the demo runs it). Per run: the wall time, the rollout tokens/s of the first step (the compiled run
compiles its step programs in it) and of the rest, and the reward of each step. The SFT stage and the data are
the demo's (`python -m posttrain.demo` writes them to the same --work directory and this reuses them).
Compiled kernels round differently from eager ones, so the two runs' samples part after a while: compare speed,
not trajectories (tests/test_grpo.py shows the compiled steps equal to eager ones under dynamo's eager backend).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from statistics import fmean
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _machine import machine  # noqa: E402
from posttrain.demo import GRPO_CONFIG, SFT_CONFIG, _command, _metrics, _run_all, prepare_sft  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "r1_zero_tiny"), help="the demo's directory (data, sft)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo_compile_cpu.json"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 2 or args.repeats < 1:
        ap.error("--steps must be >= 2 (the first step compiles; the rest measure) and --repeats >= 1")
    t0 = time.perf_counter()
    work = Path(args.work).resolve()
    paths, sft_dir = prepare_sft(work)
    runs: dict[str, list[dict]] = {"eager": [], "compiled": []}
    for r in range(args.repeats):
        for name in runs:   # in turn, one at a time: the machine's two cores are not shared between the arms
            run_dir = work / f"grpo_compile_{name}{r}"
            extra = [*paths, f"init.checkpoint={sft_dir / 'checkpoints'}", f"train.seed={args.seed}",
                     f"logging.run_dir={run_dir}", f"train.steps={args.steps}", "eval.every=0",
                     f"rollout.compile={str(name == 'compiled').lower()}", "checkpoint.resume=none",
                     "checkpoint.overwrite=true"]
            t = time.perf_counter()
            _run_all([(name, _command("posttrain.grpo", GRPO_CONFIG, extra), work / "logs" / f"{run_dir.name}.log")],
                     1)
            wall = time.perf_counter() - t
            rows = [m for m in _metrics(run_dir) if "rollout_tokens_per_s" in m]
            rate = [m["rollout_tokens_per_s"] for m in rows]
            runs[name].append({"run_dir": str(run_dir.relative_to(ROOT)), "wall_seconds": round(wall, 1),
                               "rollout_tokens_per_s_first_step": round(rate[0]),
                               "rollout_tokens_per_s_after": round(fmean(rate[1:])),
                               "reward_mean": [round(m["reward_mean"], 4) for m in rows],
                               "routing_mismatch": fmean([m.get("routing_mismatch", 0.0) for m in rows])})
            print(name, runs[name][-1], flush=True)
    best = {name: max(x["rollout_tokens_per_s_after"] for x in rs) for name, rs in runs.items()}
    wall = {name: min(x["wall_seconds"] for x in rs) for name, rs in runs.items()}
    result = {
        "benchmark": "GRPO rollouts eager vs compiled (rollout.compile, issue 23)",
        "command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None
                                                                                 else sys.argv[1:])),
        "machine": machine(), "grpo_config": str(GRPO_CONFIG.relative_to(ROOT)),
        "sft_config": str(SFT_CONFIG.relative_to(ROOT)),
        "settings": {"steps": args.steps, "repeats": args.repeats, "seed": args.seed, "threads": 1,
                     "compiled": "torch.compile(dynamic=True, fullgraph=True), inductor C++ kernels and wrapper"},
        "runs": runs,
        "speedup_rollout_after_first_step": round(best["compiled"] / best["eager"], 2),
        "speedup_wall": round(wall["eager"] / wall["compiled"], 2),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"rollouts after the first step: {result['speedup_rollout_after_first_step']}x compiled over eager; "
          f"whole run: {result['speedup_wall']}x; wrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
