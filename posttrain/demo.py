"""The CPU demonstration of R1-Zero-style RL (R1 §2.2): `python -m posttrain.demo [--out DIR]`.

    data    graded integer arithmetic (levels 1-2: two operands, + and -), train/held-out split by
            prompt hash, worked column-by-column solutions, a task tokenizer (posttrain.tasks)
    sft     the tiny DeepSeek-V3 (MLA, shared + routed experts, MTP) learns the format and the
            column method from worked solutions and stops while only partly competent
            (configs/posttrain/sft_tiny.yaml: 48% held out)
    grpo    rule-based accuracy + format rewards only (configs/posttrain/r1_zero_tiny.yaml), once per
            seed in one process and once more under expert parallelism (parallel.ep=2, 2 gloo ranks);
            with --pipeline-seeds also with the trainer under pp2 x ep2 and rollouts under ep4 (4 ranks,
            routing replay on)
    report  held-out accuracy before and after GRPO on the same N prompts (greedy, or pass@1 over
            eval.samples samples) with Wilson 95% intervals, the gain with its paired 95% interval, and
            the reward / accuracy / response-length curves as a PNG

Each stage is the real CLI (`python -m posttrain.sft`, `python -m posttrain.grpo`, torchrun for ep2)
in a subprocess with one intra-op thread: the tiny model is latency-bound, and on 2 cores two runs
side by side finish sooner than one run with two threads. A stage whose run directory already holds
its final checkpoint is not run again, so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .tasks import build_task_tokenizer, write_task_splits

ROOT = Path(__file__).resolve().parent.parent
SFT_CONFIG = ROOT / "configs" / "posttrain" / "sft_tiny.yaml"
GRPO_CONFIG = ROOT / "configs" / "posttrain" / "r1_zero_tiny.yaml"
DATA = dict(task="arithmetic", n_train=16000, n_heldout=512, seed=0, difficulty=[1, 2])


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% for z = 1.96)."""
    if n <= 0:
        raise ValueError("n must be positive")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_interval(before: list[float], after: list[float], z: float = 1.96) -> tuple[float, float]:
    """95% interval of mean(after - before) over the same prompts scored twice (each score a 0/1 verdict or
    a pass@1 over k samples). Pairing removes the prompts' own difficulty from the noise; for 0/1 scores
    this is the textbook Wald interval for two dependent proportions (Agresti, Categorical Data Analysis,
    §10.1: sqrt((b + c) - (b - c)^2 / n) / n with b, c the discordant counts)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired scores need the same, non-zero number of prompts; got {len(before)} and {len(after)}")
    n = len(before)
    d = [a - b for a, b in zip(after, before)]
    mean = sum(d) / n
    half = z * math.sqrt(max(sum(x * x for x in d) / n - mean * mean, 0.0) / n)
    return mean - half, mean + half


def _eval_scores(run_dir: Path, step: int) -> dict[int, float]:
    path = run_dir / "eval" / f"step_{step:08d}.jsonl"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: the per-prompt scores of the evaluation at step {step}")
    with open(path) as f:
        return {row["index"]: row["accuracy"] for row in map(json.loads, f)}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _command(module: str, config: Path, overrides: list[str], nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"] \
        if nproc > 1 else [sys.executable, "-m"]
    return launcher + [module, "--config", str(config), *overrides]


def _finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / "checkpoints" / f"step_{steps:08d}").is_dir()


def _run_all(jobs: list[tuple[str, list[str], Path]], parallel: int) -> None:
    """Run (name, command, log) jobs, at most `parallel` at a time; the first failure stops the demo."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            f = open(log, "w")
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            print(f"[demo] {name}: {shlex.join(cmd)}", flush=True)
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
            running.append((name, proc, f, log))
        time.sleep(0.5)
        for item in list(running):
            name, proc, f, log = item
            if proc.poll() is None:
                continue
            f.close()
            running.remove(item)
            if proc.returncode != 0:
                for _, p, g, _ in running:
                    p.terminate()
                    p.wait()
                    g.close()
                tail = "".join(open(log).readlines()[-20:])
                raise RuntimeError(f"demo stage {name} failed (exit {proc.returncode}); log {log}:\n{tail}")
            print(f"[demo] {name}: done", flush=True)


def _metrics(run_dir: Path) -> list[dict]:
    rows = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            m = json.loads(line)
            rows.setdefault(m["step"], {}).update(m)
    return [rows[s] for s in sorted(rows)]


def summarise(run_dir: Path) -> dict:
    """Before/after held-out accuracy of one GRPO run (the same prompts), with intervals, and its curves."""
    rows = _metrics(run_dir)
    evals = [(r["step"], r["eval_accuracy"], int(r["eval_prompts"]), int(r.get("eval_samples", 1)))
             for r in rows if "eval_accuracy" in r]
    if len(evals) < 2 or evals[0][0] != 0:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no evaluation at step 0 and after training")
    (_, p0, n, k), (last, p1, _, _) = evals[0], evals[-1]
    before, after = _eval_scores(run_dir, 0), _eval_scores(run_dir, last)
    if sorted(before) != sorted(after):
        raise RuntimeError(f"{run_dir}/eval: the evaluations at steps 0 and {last} scored different prompts")
    keys = sorted(before)
    train = [r for r in rows if "reward_mean" in r]
    routing = [r["routing_mismatch"] for r in train if "routing_mismatch" in r]
    extra = {"routing_mismatch_mean": sum(routing) / len(routing), "routing_mismatch_max": max(routing)} \
        if routing else {}
    return {"run_dir": str(run_dir), "prompts": n, "samples_per_prompt": k, "steps": last, **extra,
            "before": p0, "before_ci95": wilson(p0 * n, n), "after": p1, "after_ci95": wilson(p1 * n, n),
            "gain": p1 - p0, "gain_ci95": paired_interval([before[i] for i in keys], [after[i] for i in keys]),
            "curves": {"step": [r["step"] for r in train], "reward_mean": [r["reward_mean"] for r in train],
                       "accuracy": [r["accuracy"] for r in train],
                       "response_length_mean": [r["response_length_mean"] for r in train],
                       "eval_step": [e[0] for e in evals], "eval_accuracy": [e[1] for e in evals]}}


def plot(results: dict[str, dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(xs, w=5):
        return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in results.items():
        c = r["curves"]
        axes[0].plot(c["step"], smooth(c["reward_mean"]), label=name)
        axes[1].plot(c["eval_step"], c["eval_accuracy"], marker="o", label=name)
        axes[2].plot(c["step"], smooth(c["response_length_mean"]), label=name)
    for ax, title in zip(axes, ("rollout reward (mean, 5-step average)",
                                "held-out accuracy", "response length (tokens, 5-step average)")):
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.suptitle("GRPO on the tiny DeepSeek-V3 after partial SFT: integer arithmetic, rule-based rewards")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def prepare_sft(out: Path, sft_overrides: list[str] = ()) -> tuple[list[str], Path]:
    """The demo's data, task tokenizer and SFT stage in `out` (each made only if missing): returns the data
    overrides every stage takes and the SFT run directory, whose checkpoints GRPO starts from."""
    data = out / "data"
    tokenizer = data / "tokenizer.model"
    if not tokenizer.exists():
        write_task_splits(str(data), DATA["task"], DATA["n_train"], DATA["n_heldout"], seed=DATA["seed"],
                          difficulty=DATA["difficulty"])
        build_task_tokenizer(str(tokenizer), seed=DATA["seed"])
    paths = [f"init.tokenizer={tokenizer}", f"data.train_files=[{data / 'arithmetic_train.jsonl'}]",
             f"data.valid_files=[{data / 'arithmetic_heldout.jsonl'}]"]
    from .config import load_config
    sft_dir = out / "sft"
    sft_args = [*paths, f"logging.run_dir={sft_dir}", *sft_overrides]
    if not _finished(sft_dir, load_config(SFT_CONFIG, sft_args).train.steps):
        _run_all([("sft", _command("posttrain.sft", SFT_CONFIG, sft_args), out / "logs" / "sft.log")], 1)
    return paths, sft_dir


# issue 22's layout row: the trainer under pp2 x ep2 (4 ranks), rollouts under ep4 (dp4, no pp) refreshed shard to
# shard after each update, routing replay on; rows padded to data.seq_len (the stages pass fixed shapes)
PIPELINE_LAYOUT = ("pp2 x ep2 -> ep4 rollouts, replay", 4,
                   ["parallel.pp=2", "parallel.ep=2", "rollout.ep=4", "grpo.routing_replay=rollout",
                    "data.seq_len=128"])


def run_demo(out: Path, seeds: list[int], ep: int = 2, parallel: int = 2, overrides: list[str] = (),
             sft_overrides: list[str] = (), png: Path | None = None, ep_seeds: list[int] | None = None,
             pipeline_seeds: list[int] = ()) -> dict:
    """SFT once, then GRPO once per seed in one process, once per ep_seeds seed (default: the first seed)
    under parallel.ep=ep (0 or 1: none) and once per pipeline_seeds seed under PIPELINE_LAYOUT; returns the
    report that it also writes."""
    out = out.resolve()
    paths, sft_dir = prepare_sft(out, sft_overrides)
    from .config import load_config
    grpo_cfg = load_config(GRPO_CONFIG, [*paths, *overrides])
    runs, jobs = {}, []
    ep_seeds = ([seeds[0]] if ep_seeds is None else list(ep_seeds)) if ep > 1 else []
    label, pp_ranks, pp_overrides = PIPELINE_LAYOUT
    # the multi-rank runs first: a collective per MoE layer and decode step makes them the slowest
    layouts = ([(f"seed {s}, {label}", s, pp_ranks, "_pp2ep2", pp_overrides) for s in pipeline_seeds]
               + [(f"seed {s}, ep{ep}", s, ep, f"_ep{ep}", [f"parallel.ep={ep}"]) for s in ep_seeds]
               + [(f"seed {s}", s, 1, "", []) for s in seeds])
    for name, seed, nproc, suffix, layout in layouts:
        run_dir = out / f"grpo_seed{seed}{suffix}"
        runs[name] = run_dir
        if _finished(run_dir, grpo_cfg.train.steps):
            continue
        extra = [*paths, f"init.checkpoint={sft_dir / 'checkpoints'}", f"train.seed={seed}",
                 f"logging.run_dir={run_dir}", *layout, *overrides]
        jobs.append((name, _command("posttrain.grpo", GRPO_CONFIG, extra, nproc), out / "logs" / f"{run_dir.name}.log"))
    _run_all(jobs, parallel)

    results = {name: summarise(d) for name, d in runs.items()}
    from pretrain.scaling.results import machine
    report = {"machine": machine(), "data": DATA, "sft_config": str(SFT_CONFIG.relative_to(ROOT)),
              "grpo_config": str(GRPO_CONFIG.relative_to(ROOT)), "overrides": list(overrides), "runs": results}
    (out / "demo_results.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, png or out / "demo.png")
    for name, r in results.items():
        lo, hi = r["gain_ci95"]
        print(f"[demo] {name}: held-out accuracy {r['before']:.3f} -> {r['after']:.3f} over {r['prompts']} prompts "
              f"(gain {r['gain']:+.3f}, 95% CI {lo:+.3f} .. {hi:+.3f})", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m posttrain.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/r1_zero_tiny", help="working directory (data, runs, logs, results)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ep", type=int, default=2, help="also run under expert parallelism of this size (0: skip)")
    ap.add_argument("--ep-seeds", type=int, nargs="+", help="the seeds run under ep (default: the first seed)")
    ap.add_argument("--pipeline-seeds", type=int, nargs="*", default=[],
                    help="seeds also run with the trainer under pp2 x ep2 and rollouts under ep4 (4 ranks)")
    ap.add_argument("--parallel", type=int, default=2, help="GRPO runs side by side")
    ap.add_argument("--png", help="curves PNG (default OUT/demo.png)")
    ap.add_argument("overrides", nargs="*", help="GRPO config overrides, e.g. train.steps=30")
    args = ap.parse_args(argv)
    try:
        run_demo(Path(args.out), args.seeds, args.ep, args.parallel, args.overrides,
                 png=Path(args.png) if args.png else None, ep_seeds=args.ep_seeds, pipeline_seeds=args.pipeline_seeds)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
