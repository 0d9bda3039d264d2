"""Scaling-law sweeps (DeepSeek LLM §3): the laws, sweep generation, fits, the resumable runner, the
Slurm array submission, and one real two-point sweep through `python -m launch.sweep run`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pretrain.config import load_config
from pretrain.scaling.fit import fit_isoflop, fit_parabola, fit_power_law
from pretrain.scaling.laws import DEEPSEEK_LLM, PowerLaw, ScalingLaws, SweepError, model_scale, parse_budgets
from pretrain.scaling.plots import plot_isoflop, plot_laws
from pretrain.scaling.results import collect, point_state
from pretrain.scaling.runner import array_spec, run_local, submit_slurm
from pretrain.scaling.sweep import dense_shape, generate_sweep, load_sweep, write_manifest

ROOT = Path(__file__).resolve().parents[1]


# -- the laws ----------------------------------------------------------------------------------------
def test_model_scale_deepseek_llm_shapes():
    # 7B: 30 layers, d 4096, l_seq 4096: 72*30*4096^2 + 12*30*4096*4096 = 2520 * 4096^2
    assert model_scale(30, 4096, 4096) == 2520 * 16_777_216 == 42_278_584_320
    # 67B: 95 layers, d 8192: 72*95*8192^2 + 12*95*8192*4096
    assert model_scale(95, 8192, 4096) == 459_024_629_760 + 38_252_052_480


def test_deepseek_laws_hand_values():
    c = 1e20  # C^0.3271 = 10^6.542, C^-0.125 = 10^-2.5, C^0.5243 = 10^10.486, C^0.4757 = 10^9.514
    assert DEEPSEEK_LLM.batch(c) == pytest.approx(0.2920 * 10 ** 6.542, rel=1e-9)
    assert DEEPSEEK_LLM.batch(c) == pytest.approx(1.0171e6, rel=1e-4)
    assert DEEPSEEK_LLM.lr(c) == pytest.approx(0.3118 * 0.0031623, rel=1e-4)
    assert DEEPSEEK_LLM.model(c) == pytest.approx(5.2513e9, rel=1e-4)
    assert DEEPSEEK_LLM.data(c) == pytest.approx(1.9045e10, rel=1e-4)
    # M_opt * D_opt = 0.1715 * 5.8316 * C = 1.0001 C
    assert DEEPSEEK_LLM.model(c) * DEEPSEEK_LLM.data(c) == pytest.approx(c, rel=2e-4)
    assert ScalingLaws.from_dict(DEEPSEEK_LLM.to_dict()) == DEEPSEEK_LLM


def test_parse_budgets():
    assert parse_budgets("3e11, 1e11,1e12") == [1e11, 3e11, 1e12]
    assert parse_budgets("1e11:1e13:3") == [1e11, 1e12, 1e13]
    assert parse_budgets([1e12, 2e12]) == [1e12, 2e12]
    for bad, word in (("1e11,abc", "not a number"), ("1e11,-3", "positive"), ("1e11:1e12", "START:STOP:N"),
                      ("1e12:1e11:3", "STOP must be"), ("", "no budgets"), ("1e11,1e11", "repeat")):
        with pytest.raises(SweepError, match=word) as e:
            parse_budgets(bad)
        assert "--budgets" in str(e.value) or "once" in str(e.value)


def test_dense_shapes_are_sane():
    for target in (5e4, 3e5, 2e6, 4e7, 1e9, 4.2e10):
        seq = 4096 if target > 1e9 else 128
        s = dense_shape(target, seq, min_dim=16)
        hd = s.dim // s.n_heads
        assert s.dim % s.n_heads == 0 and hd in (16, 32, 64, 128)
        assert 32 / 4 <= s.dim / s.n_layers <= 32 * 4 or s.n_layers == 1
        assert abs(math.log(s.m(seq) / target)) < 0.7
        assert abs(s.inter_dim - 8 * s.dim / 3) <= 8
    assert dense_shape(5e4, 128).dim == 32          # the default min_dim keeps two heads of 16


# -- generation --------------------------------------------------------------------------------------
def _gen(tmp_path, name="t", budgets="1e11,1e12", **kw):
    kw.setdefault("sets", ["data.corpus_bytes=400000"])
    return generate_sweep(name, budgets, tmp_path / "configs", runs_dir=str(tmp_path / "runs"), min_dim=16, **kw)


def test_generator_writes_loadable_isoflop_configs(tmp_path):
    sw = _gen(tmp_path)
    assert sw.path == tmp_path / "configs" / "t" / "sweep.yaml" and len(sw.points) == 8
    for c in sw.budgets:
        pts = [p for p in sw.points if p.budget == c]
        assert len(pts) >= 3
        ms = [p.m for p in pts]
        assert min(ms) < DEEPSEEK_LLM.model(c) < max(ms)        # the sizes bracket M_opt(C)
        for p in pts:
            cfg = load_config(sw.config_path(p))               # a valid pretrain config
            mc, t, seq = cfg.model_config(), cfg.train, cfg.data.seq_len
            assert (mc.n_layers, mc.dim, mc.n_heads, mc.inter_dim) == (p.n_layers, p.dim, p.n_heads, p.inter_dim)
            assert mc.attention == "gqa" and mc.n_routed_experts == 0
            assert p.m == model_scale(mc.n_layers, mc.dim, seq)
            tokens = t.steps * t.global_batch_size * seq
            assert tokens == p.tokens
            # D·M = C within one step's rounding
            assert abs(p.m * tokens - c) <= p.m * t.global_batch_size * seq / 2
            # batch and LR from the DeepSeek LLM fits
            assert t.global_batch_size == max(1, round(DEEPSEEK_LLM.batch(c) / seq))
            assert t.lr == pytest.approx(DEEPSEEK_LLM.lr(c), rel=1e-3)
            assert t.eval_every == t.steps and t.lr_schedule == "multistep"   # a held-out eval at the end
            assert cfg.logging.run_dir == str(tmp_path / "runs" / p.name)
    again = load_sweep(sw.root)
    assert [p.to_dict() for p in again.points] == [p.to_dict() for p in sw.points]
    with pytest.raises(SweepError, match="already exists; pass --force"):
        _gen(tmp_path)
    one = _gen(tmp_path, budgets="1e12", overwrite=True)   # stale point configs go, the manifest is replaced
    assert sorted(f.name for f in (one.root / "points").iterdir()) == sorted(Path(p.config).name for p in one.points)


def test_generator_bad_input(tmp_path):
    with pytest.raises(SweepError, match="not a number"):
        _gen(tmp_path, budgets="1e11,lots")
    with pytest.raises(SweepError, match="at least 3"):
        _gen(tmp_path, n_points=2)
    with pytest.raises(SweepError, match="distinct shapes"):
        _gen(tmp_path, budgets="1e7")                          # everything clamps to the smallest width
    with pytest.raises(SweepError, match=r"does not load: .*train\.bogus.*regenerate"):
        _gen(tmp_path, sets=["train.bogus=1"])
    with pytest.raises(SweepError, match="not a dense GQA"):
        _gen(tmp_path, sets=["model.preset=tiny-deepseek-v3"])
    with pytest.raises(SweepError, match="does not exist.*generate"):
        load_sweep(tmp_path / "nowhere")


# -- fits --------------------------------------------------------------------------------------------
def test_power_law_fit_recovers_exponent_with_ci():
    rng = np.random.default_rng(1)
    x = np.geomspace(1e17, 3e20, 10)
    y = 0.1715 * x ** 0.5243 * np.exp(rng.normal(0, 0.05, len(x)))
    f = fit_power_law(x, y, n_boot=1000, seed=0)
    assert isinstance(f.law, PowerLaw)
    assert f.law.a == pytest.approx(0.5243, abs=0.02)
    assert f.a_ci[0] < 0.5243 < f.a_ci[1] and f.a_ci[1] - f.a_ci[0] < 0.08
    assert f.k_ci[0] < 0.1715 < f.k_ci[1]
    assert fit_power_law(x, y, n_boot=200, seed=3).a_ci == fit_power_law(x, y, n_boot=200, seed=3).a_ci  # seeded
    with pytest.raises(SweepError, match="positive"):
        fit_power_law([1, 2], [1, -1])


def _isoflop_points(a=0.55, k=0.3, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c in (1e17, 1e18, 1e19, 1e20):
        m_star = k * c ** a
        for f in np.geomspace(1 / 4, 4, 5):
            m = m_star * f
            loss = 3.0 - 0.1 * math.log10(c) + 0.08 * math.log(f) ** 2 + rng.normal(0, noise)
            rows.append({"budget": c, "m": m, "final_val_loss": loss})
    return rows


def test_isoflop_parabola_minimum_and_law():
    par = fit_parabola([1e5, 2e5, 4e5, 8e5], [3.0 + 0.2 * math.log(m / 3e5) ** 2 for m in (1e5, 2e5, 4e5, 8e5)])
    assert par.convex and par.m_opt == pytest.approx(3e5, rel=1e-6) and par.loss_min == pytest.approx(3.0)
    fit = fit_isoflop(_isoflop_points(), n_boot=50)
    assert fit.model.law.a == pytest.approx(0.55, abs=1e-6) and fit.model.law.k == pytest.approx(0.3, rel=1e-5)
    assert fit.data.law.a == pytest.approx(0.45, abs=1e-6) and all(fit.in_range)
    noisy = fit_isoflop(_isoflop_points(noise=0.004, seed=2), n_boot=400, seed=0)
    assert noisy.model.a_ci[0] < 0.55 < noisy.model.a_ci[1]
    assert noisy.data.a_ci[0] < 0.45 < noisy.data.a_ci[1]
    assert isinstance(noisy.laws(), ScalingLaws) and noisy.laws().batch == DEEPSEEK_LLM.batch
    with pytest.raises(SweepError, match="at least 2 budgets"):
        fit_isoflop([r for r in _isoflop_points() if r["budget"] == 1e17])
    flat = [{**r, "final_val_loss": -r["final_val_loss"]} for r in _isoflop_points()]
    with pytest.raises(SweepError, match="not convex"):
        fit_isoflop(flat)


def test_plots(tmp_path):
    rows = _isoflop_points(noise=0.003)
    fit = fit_isoflop(rows, n_boot=50)
    for p in (plot_isoflop(rows, fit, tmp_path / "iso.png"), plot_laws(fit, tmp_path / "laws.png")):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- runner: resume, collect, Slurm ------------------------------------------------------------------
def _write_metrics(run_dir: Path, last_step: int, steps: int, val_at_end=True, every=10):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, "val_lm_loss": 6.0}]
    for s in range(every, last_step + 1, every):
        row = {"step": s, "loss": 5.0 - s / steps, "lm_loss": 5.0 - s / steps, "consumed_samples": s * 4,
               "step_time": 0.01}
        if s == steps and val_at_end:
            row["val_lm_loss"] = 4.5 - s / steps
        lines.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _fake_states(sw):
    """point 0 finished, 1 partial with a checkpoint, 2 partial without one, 3 finished but its final
    eval missing (so unfinished), the rest not started."""
    p = sw.points
    _write_metrics(Path(p[0].run_dir), p[0].steps, p[0].steps, every=p[0].steps)
    _write_metrics(Path(p[1].run_dir), p[1].steps // 2, p[1].steps, every=max(1, p[1].steps // 4))
    (Path(p[1].run_dir) / "checkpoints" / "step_00000010").mkdir(parents=True)
    _write_metrics(Path(p[2].run_dir), 1, p[2].steps, every=1)
    _write_metrics(Path(p[3].run_dir), p[3].steps, p[3].steps, val_at_end=False, every=p[3].steps)


def test_resume_runs_only_unfinished_points(tmp_path):
    sw = _gen(tmp_path)
    _fake_states(sw)
    finished_bytes = (Path(sw.points[0].run_dir) / "metrics.jsonl").read_bytes()
    launched = []

    def launcher(cmd, log_path):          # pretend to train: write a finished run
        launched.append(cmd)
        name = Path(cmd[cmd.index("--config") + 1]).stem
        p = next(q for q in sw.points if q.name == name)
        _write_metrics(Path(p.run_dir), p.steps, p.steps, every=p.steps)
        return 0

    assert [point_state(p.run_dir, p.steps).status for p in sw.points[:5]] == \
        ["finished", "partial", "partial", "partial", "not started"]
    res = run_local(sw, launcher=launcher, out=lambda s: None)
    names = [Path(c[c.index("--config") + 1]).stem for c in launched]
    assert names == [p.name for p in sw.points[1:]] and res["failed"] == [] and res["skipped"] == [sw.points[0].name]
    assert launched[0][:4] == [sys.executable, "-m", "pretrain", "--config"]
    assert (Path(sw.points[0].run_dir) / "metrics.jsonl").read_bytes() == finished_bytes   # never touched
    assert (Path(sw.points[2].run_dir) / "metrics.jsonl.stale-1").is_file()   # no checkpoint: set aside
    assert not (Path(sw.points[1].run_dir) / "metrics.jsonl.stale-1").exists()  # has one: resumes in place
    rec = json.loads((Path(sw.points[1].run_dir) / "sweep_point.json").read_text())
    assert rec["attempts"][0]["rc"] == 0 and rec["attempts"][0]["start_step"] == sw.points[1].steps // 2

    # a second run launches nothing
    launched.clear()
    assert run_local(sw, launcher=launcher, out=lambda s: None)["ran"] == [] and launched == []

    rows = collect(sw)
    assert all(r["status"] == "finished" for r in rows)
    r1 = rows[1]
    assert r1["final_val_loss"] == pytest.approx(3.5) and r1["final_train_loss"] == pytest.approx(4.0)
    assert r1["tokens"] == sw.points[1].steps * 4 * sw.seq_len and r1["flops"] == r1["m"] * r1["tokens"]
    assert r1["wall_s"] is not None and rows[0]["wall_s"] is None     # point 0 never ran through the runner


def test_collect_and_failed_launch(tmp_path):
    sw = _gen(tmp_path)
    _fake_states(sw)
    rows = collect(sw)
    assert [r["status"] for r in rows[:5]] == ["finished", "partial", "partial", "partial", "not started"]
    assert rows[0]["final_val_loss"] is not None and rows[3]["final_val_loss"] is None
    assert rows[1]["last_step"] == sw.points[1].steps // 2
    msgs = []
    res = run_local(sw, indices=[4], launcher=lambda cmd, log: 1, out=msgs.append)
    assert res["failed"] == [sw.points[4].name] and "rerun the same command to resume" in msgs[-1]
    with pytest.raises(SweepError, match="out of range"):
        run_local(sw, indices=[99], launcher=lambda cmd, log: 0)


def test_slurm_dry_run_array(tmp_path, capsys):
    sw = _gen(tmp_path)
    calls = []
    res = submit_slurm(sw, "launch/slurm/sweep.sbatch", dry_run=True, runner=lambda *a, **k: calls.append(a),
                       out=lambda s: None)
    assert calls == [] and f"--array=0-{len(sw.points) - 1}" in res["cmd"] and len(res["indices"]) == len(sw.points)
    _fake_states(sw)
    res = submit_slurm(sw, "launch/slurm/sweep.sbatch", dry_run=True, max_parallel=2, nproc=8, out=lambda s: None)
    assert res["indices"] == list(range(1, len(sw.points)))
    assert f"--array=1-{len(sw.points) - 1}%2" in res["cmd"] and "--export=ALL,NPROC=8" in res["cmd"]
    assert res["cmd"][-1] == str(sw.path)
    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    # the CLI path prints the sbatch call and submits nothing
    from launch.sweep import main
    assert main(["run", str(sw.root), "--slurm", "--dry-run", "--max-parallel", "3"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and f"--array=1-{len(sw.points) - 1}%3" in out and "sweep.sbatch" in out
    script = (ROOT / "launch" / "slurm" / "sweep.sbatch").read_text()
    assert "SLURM_ARRAY_TASK_ID" in script and "-m launch.sweep run" in script


def test_cli_bad_input(tmp_path, capsys):
    from launch.sweep import main
    assert main(["run", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--name", "x", "--budgets", "1e11;1e12", "--out", str(tmp_path)]) == 2
    assert "--budgets 1e11,3e11,1e12" in capsys.readouterr().err
    sw = _gen(tmp_path)
    bad = sw.config_path(sw.points[1])
    bad.write_text(bad.read_text().replace("lr_schedule: multistep", "lr_schedule: sometimes"))
    assert main(["run", str(sw.root)]) == 2                # refused before anything runs
    err = capsys.readouterr().err
    assert str(bad) in err and "train.lr_schedule" in err and not Path(sw.points[0].run_dir).exists()
    assert main(["fit", str(tmp_path / "none.json")]) == 2
    assert "collect" in capsys.readouterr().err


# -- one real sweep ----------------------------------------------------------------------------------
def test_end_to_end_two_point_sweep(corpus, tmp_path, monkeypatch, capsys):
    """Two real points of a few steps each through `python -m launch.sweep run` (its main(), in this
    process; each point is a `python -m pretrain` subprocess), then collect; a second run, as a real
    `python -m launch.sweep` process, finds both finished and launches nothing."""
    from launch.sweep import main
    sw = generate_sweep("e2e", "3e10", tmp_path / "configs", runs_dir=str(tmp_path / "runs"), seq_len=32,
                        min_dim=16, n_points=3, validate=False,
                        sets=[f"data.cache_dir={corpus}", "data.corpus_bytes=400000", "data.split=90,10,0",
                              "logging.peak_tflops=1.0"])
    sw.points = sw.points[:2]
    for p in sw.points:                                     # shrink to a handful of steps
        path = sw.config_path(p)
        cfg = yaml.safe_load(path.read_text())
        p.steps, p.tokens = 4, 4 * p.global_batch_size * sw.seq_len
        p.flops = float(p.m * p.tokens)
        cfg["train"].update(steps=4, eval_every=4, warmup_steps=1, eval_batches=2)
        cfg["checkpoint"]["every"] = 2
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    write_manifest(sw)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)
    assert main(["run", str(sw.root)]) == 0
    out = capsys.readouterr().out
    assert "2 point(s) ran" in out, out
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "launch.sweep", "run", str(sw.root)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "0 point(s) ran, 2 were already finished" in r.stdout, r.stdout + r.stderr
    rows = collect(load_sweep(sw.root))
    for row in rows:
        assert row["status"] == "finished" and row["last_step"] == 4
        assert row["final_val_loss"] is not None and row["initial_val_loss"] > row["final_val_loss"]
        assert row["tokens"] == 4 * row["global_batch_size"] * 32 and row["wall_s"] > 0
