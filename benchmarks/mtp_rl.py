"""Does training the MTP module during GRPO keep the speculative drafter useful? (issue 23 §4, grpo.mtp_weight)

    python benchmarks/mtp_rl.py [--out benchmarks/results/mtp_rl_cpu.json] [--steps 80] [--weight 0.3]

The GRPO demonstration's recipe (configs/posttrain/r1_zero_tiny.yaml, from its SFT model, whose MTP module SFT
trained), run twice side by side from the same checkpoint and seed with MTP speculation in the rollouts
(rollout.draft_tokens=1, temperature 0.7): once as today (grpo.mtp_weight=0: the MTP module is frozen while
the policy moves) and once training it on the rollouts (grpo.mtp_weight=W, its inputs detached and its
gradient clipped apart, so the policy's update is the same function of the same rollouts). Per step:
rollout_acceptance (accepted drafts / drafted), the reward, and the MTP loss where it is trained. The SFT
stage and the data are the demo's (`python -m posttrain.demo` writes them to the same --work directory and
this reuses them).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from posttrain.config import load_config  # noqa: E402
from posttrain.demo import GRPO_CONFIG, SFT_CONFIG, _command, _metrics, _run_all, prepare_sft  # noqa: E402


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "r1_zero_tiny"), help="the demo's directory (data, sft)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mtp_rl_cpu.json"))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--weight", type=float, default=0.3, help="grpo.mtp_weight of the trained arm (V3 §4.2: 0.3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, help="train.lr of both arms (default: the demo's 2e-5); a larger one moves "
                                             "the policy further from what the frozen MTP module drafts")
    ap.add_argument("--tag", default="", help="suffix of the two run directories")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(args.work).resolve()
    paths, sft_dir = prepare_sft(work)
    arms = {"frozen": 0.0, "trained": args.weight}
    jobs, dirs = [], {}
    for name, weight in arms.items():
        run_dir = work / f"mtp_rl_{name}{args.tag}"
        dirs[name] = run_dir
        extra = [*paths, f"init.checkpoint={sft_dir / 'checkpoints'}", f"train.seed={args.seed}",
                 f"logging.run_dir={run_dir}", f"train.steps={args.steps}", "eval.every=0",
                 "rollout.draft_tokens=1", f"grpo.mtp_weight={weight}", "checkpoint.resume=none",
                 "checkpoint.overwrite=true", *([f"train.lr={args.lr}"] if args.lr else [])]
        jobs.append((name, _command("posttrain.grpo", GRPO_CONFIG, extra), work / "logs" / f"{run_dir.name}.log"))
    _run_all(jobs, 2)   # side by side, one thread each (the demo's arrangement)

    runs = {}
    for name, run_dir in dirs.items():
        rows = [r for r in _metrics(run_dir) if "rollout_acceptance" in r]
        acc = [r["rollout_acceptance"] for r in rows]
        q = max(len(acc) // 4, 1)
        runs[name] = {
            "grpo_mtp_weight": arms[name], "run_dir": str(run_dir.relative_to(ROOT)),
            "acceptance_first_quarter": mean(acc[:q]), "acceptance_last_quarter": mean(acc[-q:]),
            "reward_first_quarter": mean([r["reward_mean"] for r in rows[:q]]),
            "reward_last_quarter": mean([r["reward_mean"] for r in rows[-q:]]),
            "per_step": {"step": [r["step"] for r in rows], "rollout_acceptance": acc,
                         "reward_mean": [r["reward_mean"] for r in rows],
                         "grad_norm": [r.get("grad_norm") for r in rows],
                         **({"mtp_loss": [r.get("mtp_loss") for r in rows],
                             "grad_norm_mtp": [r.get("grad_norm_mtp") for r in rows]} if arms[name] else {})}}
    from pretrain.scaling.results import machine
    result = {
        "benchmark": "MTP draft acceptance during GRPO with and without training the MTP module (issue 23 §4)",
        "command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None
                                                                                 else sys.argv[1:])),
        "machine": machine(), "grpo_config": str(GRPO_CONFIG.relative_to(ROOT)),
        "sft_config": str(SFT_CONFIG.relative_to(ROOT)),
        "settings": {"steps": args.steps, "seed": args.seed, "rollout.draft_tokens": 1, "temperature": 0.7,
                     "train.lr": args.lr or load_config(GRPO_CONFIG, paths).train.lr},
        "runs": runs,
        "acceptance_last_quarter_gain": (runs["trained"]["acceptance_last_quarter"] or 0.0)
        - (runs["frozen"]["acceptance_last_quarter"] or 0.0),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, r in runs.items():
        print(f"{name} (grpo.mtp_weight={r['grpo_mtp_weight']}): acceptance {r['acceptance_first_quarter']:.3f} "
              f"(first quarter) -> {r['acceptance_last_quarter']:.3f} (last quarter)", flush=True)
    print(f"wrote {args.out} ({result['wall_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
