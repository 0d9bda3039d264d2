"""python -m launch.sweep: scaling-law sweeps (DeepSeek LLM §3). The logic lives in
pretrain/scaling/ (laws, generation, running, collection, fits, plots).

    python -m launch.sweep generate --name micro --budgets 1e11,3e11,1e12      # -> configs/sweeps/micro/
    python -m launch.sweep status   configs/sweeps/micro
    python -m launch.sweep run      configs/sweeps/micro                        # local, resumable
    python -m launch.sweep run      configs/sweeps/micro --slurm [--dry-run]    # one array task per point
    python -m launch.sweep collect  configs/sweeps/micro                        # -> RUNS/results.json + .csv
    python -m launch.sweep fit      runs/sweeps/micro/results.json              # -> RUNS/fit.json
    python -m launch.sweep plot     runs/sweeps/micro/results.json --out-dir docs
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

SBATCH_SCRIPT = Path(__file__).resolve().parent / "slurm" / "sweep.sbatch"


def _generate(a) -> int:
    import yaml

    from pretrain.scaling.laws import SweepError
    from pretrain.scaling.sweep import generate_sweep
    base = None
    if a.base:
        if not Path(a.base).is_file():
            raise SweepError(f"--base {a.base} does not exist; "
                             "give a pretrain YAML (e.g. configs/pretrain/tiny_v3.yaml)")
        base = yaml.safe_load(Path(a.base).read_text()) or {}
        if not isinstance(base, dict):
            raise SweepError(f"--base {a.base}: the top level must be a mapping of sections (model, train, ...)")
    command = "python -m launch.sweep " + shlex.join(sys.argv[1:])
    sw = generate_sweep(a.name, a.budgets, a.out, seq_len=a.seq_len, n_points=a.points, span=a.span,
                        aspect=a.aspect, min_dim=a.min_dim, base=base, sets=a.set, runs_dir=a.runs_dir,
                        warmup_fraction=a.warmup_fraction, eval_tokens=a.eval_tokens,
                        micro_batch_size=a.micro_batch_size, command=command, overwrite=a.force)
    print(f"{'point':<22} {'L':>3} {'d':>5} {'heads':>5} {'M':>10} {'D (tokens)':>12} "
          f"{'steps':>6} {'batch':>5} {'lr':>8}")
    for p in sw.points:
        print(f"{p.name:<22} {p.n_layers:>3} {p.dim:>5} {p.n_heads:>5} {p.m:>10.3g} {p.tokens:>12,} {p.steps:>6} "
              f"{p.global_batch_size:>5} {p.lr:>8.3g}")
    total = sum(p.tokens for p in sw.points)
    print(f"wrote {sw.path} and {len(sw.points)} point configs under {sw.root / 'points'}; "
          f"{total:,} tokens in all; runs go to {sw.runs_dir}/POINT")
    return 0


def _status(a) -> int:
    from pretrain.scaling.results import point_state
    from pretrain.scaling.sweep import load_sweep
    sw = load_sweep(a.sweep)
    n_done = 0
    for p in sw.points:
        st = point_state(sw.run_dir(p, a.runs_dir), p.steps)
        n_done += st.finished
        extra = f" at step {st.last_step}/{p.steps}" + (", has a checkpoint" if st.has_checkpoint else "") \
            if st.status == "partial" else ""
        print(f"[{p.index:>3}] {p.name:<24} {st.status}{extra}")
    print(f"{n_done}/{len(sw.points)} finished")
    return 0


def _run(a) -> int:
    from pretrain.scaling.runner import run_local, submit_slurm
    from pretrain.scaling.sweep import load_sweep
    sw = load_sweep(a.sweep)
    if a.slurm:
        submit_slurm(sw, a.script, runs_dir=a.runs_dir, overrides=a.set, nproc=a.nproc, max_parallel=a.max_parallel,
                     sbatch_args=a.sbatch_arg, dry_run=a.dry_run)
        return 0
    res = run_local(sw, indices=a.index, runs_dir=a.runs_dir, overrides=a.set, nproc=a.nproc, dry_run=a.dry_run)
    if res["failed"]:
        print(f"{len(res['failed'])} point(s) did not finish: {', '.join(res['failed'])}", file=sys.stderr)
        return 1
    if not a.dry_run:
        print(f"{len(res['ran'])} point(s) ran, {len(res['skipped'])} were already finished")
    return 0


def _collect(a) -> int:
    from pretrain.scaling.results import collect, write_results
    from pretrain.scaling.sweep import load_sweep
    sw = load_sweep(a.sweep)
    rows = collect(sw, a.runs_dir)
    out = Path(a.out) if a.out else Path(a.runs_dir or sw.runs_dir) / "results.json"
    js, cs = write_results(rows, out, sw)
    print(f"{'point':<24} {'status':<12} {'M':>9} {'tokens':>11} {'C':>9} {'train':>7} {'val':>7} {'wall s':>7}")
    for r in rows:
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        print(f"{r['name']:<24} {r['status']:<12} {r['m']:>9.3g} {f(r['tokens'], ',d'):>11} {f(r['flops'], '.3g'):>9} "
              f"{f(r['final_train_loss'], '.4f'):>7} {f(r['final_val_loss'], '.4f'):>7} {f(r['wall_s'], '.1f'):>7}")
    done = sum(r["status"] == "finished" for r in rows)
    print(f"{done}/{len(rows)} finished; wrote {js} and {cs}")
    return 0


def _fit(a) -> int:
    from pretrain.scaling.fit import fit_isoflop
    from pretrain.scaling.laws import DEEPSEEK_LLM
    from pretrain.scaling.results import load_results
    doc = load_results(a.results)
    fit = fit_isoflop(doc["points"], n_boot=a.boot, seed=a.seed)
    res = {"results": str(a.results), "sweep": doc.get("sweep"), "machine": doc.get("machine"),
           "isoflop": fit.to_dict(), "reference": DEEPSEEK_LLM.to_dict()}
    out = Path(a.out) if a.out else Path(a.results).with_name("fit.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    for c, m, ci, ok in zip(fit.budgets, fit.m_opt, fit.m_opt_ci, fit.in_range):
        print(f"C = {c:.3g}: M_opt = {m:.4g} (95% CI {ci[0]:.3g}..{ci[1]:.3g}), D_opt = {c / m:.4g}"
              + ("" if ok else "  [minimum outside the sampled sizes: extrapolated]"))
    for what, f, ref in (("M_opt", fit.model, DEEPSEEK_LLM.model), ("D_opt", fit.data, DEEPSEEK_LLM.data)):
        print(f"{what} = {f.law.k:.4g}·C^{f.law.a:.4f}  exponent 95% CI [{f.a_ci[0]:.4f}, {f.a_ci[1]:.4f}]  "
              f"(DeepSeek LLM: {ref.k}·C^{ref.a})")
    print(f"bootstrap: {fit.model.n_boot} replicates used, {fit.n_boot_failed} dropped (non-convex); wrote {out}")
    return 0


def _plot(a) -> int:
    from pretrain.scaling.fit import fit_isoflop
    from pretrain.scaling.plots import plot_isoflop, plot_laws
    from pretrain.scaling.results import load_results
    doc = load_results(a.results)
    fit = fit_isoflop(doc["points"], n_boot=a.boot, seed=a.seed)
    out = Path(a.out_dir) if a.out_dir else Path(a.results).parent
    p1 = plot_isoflop(doc["points"], fit, out / f"{a.prefix}_isoflop.png",
                      title=f"IsoFLOP curves, sweep {doc.get('sweep')}")
    p2 = plot_laws(fit, out / f"{a.prefix}_laws.png", title=f"Compute-optimal allocation, sweep {doc.get('sweep')}")
    print(f"wrote {p1} and {p2}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="budgets -> IsoFLOP sweep configs (configs/sweeps/NAME/)")
    g.add_argument("--name", required=True, help="sweep name: configs/sweeps/NAME/, runs/sweeps/NAME/")
    g.add_argument("--budgets", required=True, help="FLOPs: 1e11,3e11,1e12 or a log range 1e11:1e12:3")
    g.add_argument("--out", default="configs/sweeps", help="parent directory of the sweep (default configs/sweeps)")
    g.add_argument("--points", type=int, default=4, help="model sizes per budget (default 4)")
    g.add_argument("--span", type=float, default=3.0, help="sizes from M_opt/span to M_opt*span (default 3)")
    g.add_argument("--seq-len", type=int, default=128, help="l_seq (default 128)")
    g.add_argument("--aspect", type=float, default=32.0, help="target d_model / n_layers (default 32)")
    g.add_argument("--min-dim", type=int, default=32, help="smallest d_model (default 32)")
    g.add_argument("--base", help="a pretrain YAML merged over the built-in base (data, model.preset, ...)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in every point")
    g.add_argument("--runs-dir", help="where the points' run dirs go (default runs/sweeps/NAME)")
    g.add_argument("--warmup-fraction", type=float, default=0.05, help="warmup steps / steps (default 0.05)")
    g.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens per evaluation (default 32768)")
    g.add_argument("--micro-batch-size", type=int, default=0, help="cap on the micro-batch (default: whole batch)")
    g.add_argument("--force", action="store_true", help="replace an existing sweep of that name (runs are kept)")
    g.set_defaults(func=_generate)

    s = sub.add_parser("status", help="which points are finished, partial or not started")
    s.add_argument("sweep", help="configs/sweeps/NAME (or its sweep.yaml)")
    s.add_argument("--runs-dir", help="the run root, if not the manifest's")
    s.set_defaults(func=_status)

    r = sub.add_parser("run", help="run the unfinished points (locally, or --slurm as an array job)")
    r.add_argument("sweep", help="configs/sweeps/NAME (or its sweep.yaml)")
    r.add_argument("--index", type=int, action="append", help="only this point (repeatable); Slurm tasks use it")
    r.add_argument("--runs-dir", help="the run root, if not the manifest's")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra pretrain override")
    r.add_argument("--nproc", type=int, default=0, help="processes per point (torchrun when > 1)")
    r.add_argument("--dry-run", action="store_true", help="print the commands (or the sbatch call), run nothing")
    r.add_argument("--slurm", action="store_true", help="submit one sbatch array job, a task per unfinished point")
    r.add_argument("--script", default=str(SBATCH_SCRIPT), help="the array script (default launch/slurm/sweep.sbatch)")
    r.add_argument("--max-parallel", type=int, default=0, help="Slurm: at most N tasks at once (--array=...%%N)")
    r.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="passed to sbatch, e.g. --sbatch-arg=--partition=gpu")
    r.set_defaults(func=_run)

    c = sub.add_parser("collect", help="every point's final losses, tokens, FLOPs, wall time -> JSON + CSV")
    c.add_argument("sweep", help="configs/sweeps/NAME (or its sweep.yaml)")
    c.add_argument("--runs-dir", help="the run root, if not the manifest's")
    c.add_argument("--out", help="results JSON (default RUNS_DIR/results.json; the CSV goes beside it)")
    c.set_defaults(func=_collect)

    for name, fn, hlp in (("fit", _fit, "IsoFLOP fit: M_opt(C), D_opt(C) with bootstrap CIs"),
                          ("plot", _plot, "PNGs: IsoFLOP curves, fitted M_opt(C) and D_opt(C) vs DeepSeek LLM")):
        f = sub.add_parser(name, help=hlp)
        f.add_argument("results", help="results.json from collect")
        f.add_argument("--boot", type=int, default=2000, help="bootstrap replicates (default 2000)")
        f.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
        if name == "fit":
            f.add_argument("--out", help="fit JSON (default: fit.json beside the results)")
        else:
            f.add_argument("--out-dir", help="where the PNGs go (default: beside the results)")
            f.add_argument("--prefix", default="scaling", help="file names PREFIX_isoflop.png, PREFIX_laws.png")
        f.set_defaults(func=fn)

    a = ap.parse_args(argv)
    from pretrain.scaling.laws import SweepError
    try:
        return a.func(a)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
