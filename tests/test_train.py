"""The pretraining runtime end to end: exact resume, resharding a checkpoint across layouts, signals,
non-finite steps, a refused checkpoint, metrics and W&B files, export.

Every run trains the tiny V3 preset (MLA, MoE with the aux-free bias, MTP) on the embedded corpus
(the standard library's sources), built once per session at a small size."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from pretrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def base_overrides(corpus, run_dir, **extra) -> list[str]:
    o = {"model.preset": "tiny-deepseek-v3", "model.vocab_size": 512, "model.n_layers": 4, "model.dim": 32,
         "data.embedded": True, "data.cache_dir": str(corpus), "data.vocab_size": 512,
         "data.corpus_bytes": 400_000, "data.seq_len": 32, "train.steps": 10, "train.lr": 3e-3,
         "train.warmup_steps": 2, "train.micro_batch_size": 2, "train.global_batch_size": 8,
         "train.eval_every": 0, "logging.wandb": "disabled", "logging.run_dir": str(run_dir),
         "checkpoint.keep": 5, "data.split": "90,10,0"}
    o.update(extra)
    return [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}" for k, v in o.items()]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir, key="loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics(run_dir) if key in m}


def _train_rank(overrides):
    from pretrain.train import train
    assert train(load_config(None, overrides)) == 0


def run(overrides, world=1):
    if world == 1:
        _train_rank(overrides)
    else:
        run_ranks(world, _train_rank, overrides)


# -- exact resume ------------------------------------------------------------------------------------
def test_exact_resume_same_layout(corpus, tmp_path):
    """20 steps in one run = 10 steps (exit_at_step saves and stops), resume, 10 more: identical losses."""
    common = dict(**{"train.steps": 20, "train.ema_decay": 0.9, "train.batch_ramp": [4, 2, 24]})
    run(base_overrides(corpus, tmp_path / "full", **common))
    run(base_overrides(corpus, tmp_path / "split", **common, **{"train.exit_at_step": 10}))
    assert max(losses(tmp_path / "split")) == 10
    run(base_overrides(corpus, tmp_path / "split", **common))
    full, split = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 21))          # each step logged once after the resume
    assert split == full, {s: (full[s], split[s]) for s in full if full[s] != split[s]}
    for key in ("lm_loss", "mtp_loss", "grad_norm", "lr", "maxvio/mean"):
        assert losses(tmp_path / "split", key) == losses(tmp_path / "full", key), key
    m = metrics(tmp_path / "full")
    assert [x["global_batch_size"] for x in m[:6]] == [4, 4, 4, 6, 6, 8]  # Megatron's ramp: +2 every 12 samples
    assert m[-1]["loss"] < m[0]["loss"]


# -- resharding ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_reshard_pp2_tp2_ep2_to_ep4_and_one_process(corpus, tmp_path):
    """A checkpoint of pp2 x tp2 x ep2 (8 ranks, sp) resumes under ep4 (4 ranks) and in one process and
    continues with the losses of the original run; every layout sees the same global batches."""
    common = {"train.steps": 8, "checkpoint.every": 4}
    ref = tmp_path / "pp2tp2ep2"
    run(base_overrides(corpus, ref, **common, **{"parallel.pp": 2, "parallel.tp": 2, "parallel.ep": 2,
                                                 "parallel.sp": True}), world=8)
    for name, world, layout in (("ep4", 4, {"parallel.ep": 4}), ("one", 1, {})):
        d = tmp_path / name
        (d / "checkpoints").mkdir(parents=True)
        shutil.copytree(ref / "checkpoints" / "step_00000004", d / "checkpoints" / "step_00000004")
        run(base_overrides(corpus, d, **common, **layout), world=world)
        got, want = losses(d), losses(ref)
        assert sorted(got) == [5, 6, 7, 8], name
        for s in got:
            assert got[s] == pytest.approx(want[s], rel=2e-5, abs=1e-6), (name, s, got[s], want[s])


def test_export_from_a_parallel_checkpoint(corpus, tmp_path):
    """Validation under DualPipeV (pp2 x ep2) equals one process's; `python -m model.convert
    checkpoint-to-hf` writes HF safetensors from that checkpoint that load_hf reads back exactly."""
    d = tmp_path / "run"
    common = {"train.steps": 3, "train.global_batch_size": 16, "train.eval_every": 3}
    run(base_overrides(corpus, d, **common, **{"parallel.pp": 2, "parallel.ep": 2,
                                               "parallel.pp_schedule": "dualpipev"}), world=4)
    run(base_overrides(corpus, tmp_path / "one", **common))
    for step in (0, 3):  # validation through the V-shaped stages equals one process's
        a, b = losses(d, "val_lm_loss")[step], losses(tmp_path / "one", "val_lm_loss")[step]
        assert a == pytest.approx(b, rel=2e-5), (step, a, b)
    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "model.convert", "checkpoint-to-hf", str(d / "checkpoints"), str(out)],
                   check=True, cwd=ROOT)
    from model import load_hf
    from parallel.checkpoint import latest_checkpoint, read_full_model_state
    net = load_hf(out)
    state, _ = read_full_model_state(latest_checkpoint(d / "checkpoints"))
    ours = net.state_dict()
    for k, v in state.items():
        if k in ours:
            assert torch.equal(ours[k].float(), v.float()), k


# -- pipeline in bf16 --------------------------------------------------------------------------------
def test_bf16_pipeline_matches_one_process(corpus, tmp_path):
    """train.dtype=bf16 under pp2 (fp32 master weights, bf16 compute and activations between stages)
    follows the one-process bf16 run within bf16 rounding."""
    common = {"train.steps": 4, "train.dtype": "bf16"}
    run(base_overrides(corpus, tmp_path / "pp", **common, **{"parallel.pp": 2}), world=2)
    run(base_overrides(corpus, tmp_path / "one", **common))
    a, b = losses(tmp_path / "pp"), losses(tmp_path / "one")
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=2e-2), (s, a[s], b[s])
    assert a[4] < a[1]


# -- failure handling ----------------------------------------------------------------------------------
def test_mismatched_checkpoint_is_refused(corpus, tmp_path):
    run(base_overrides(corpus, tmp_path, **{"train.steps": 2}))
    from parallel.checkpoint import CheckpointMismatch
    with pytest.raises(CheckpointMismatch, match="n_layers"):
        run(base_overrides(corpus, tmp_path, **{"train.steps": 4, "model.n_layers": 3}))


def test_nonfinite_steps_are_skipped_then_stop(corpus, tmp_path, monkeypatch):
    """A NaN loss skips the update (parameters unchanged) and is reported; more than max_nonfinite in a
    row stops the run with a message, and the last good checkpoint stays the latest."""
    from pretrain import train as T
    from pretrain.session import NonFiniteError
    real = T.Trainer.forward_backward
    bad = {3, 6, 7, 8}

    def flaky(self, tokens, labels):
        out = real(self, tokens, labels)
        if self.session.step + 1 in bad:
            out["loss"] = float("nan")
        return out

    monkeypatch.setattr(T.Trainer, "forward_backward", flaky)
    cfg = load_config(None, base_overrides(corpus, tmp_path, **{"train.steps": 12, "checkpoint.every": 5,
                                                                "train.max_nonfinite": 2}))
    trainer = T.Trainer(cfg)
    with pytest.raises(NonFiniteError, match="train.max_nonfinite"):
        trainer.run()
    m = metrics(tmp_path)
    assert [x["step"] for x in m if x.get("skipped")] == [3, 6, 7, 8]
    assert m[-1]["skipped_steps"] == 4
    from parallel.checkpoint import latest_checkpoint
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000005"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_saves_a_loadable_checkpoint(corpus, tmp_path, sig):
    """SIGTERM, SIGUSR1 (Slurm's preemption warning) or Ctrl-C (SIGINT) mid-run: the step finishes, a
    checkpoint is written, the process exits 0 naming the signal; resuming continues."""
    args = base_overrides(corpus, tmp_path, **{"train.steps": 100000})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "pretrain", "--config", str(ROOT / "configs/pretrain/tiny_v3.yaml"),
                          "parallel.pp=1", "parallel.ep=1", "train.batch_ramp=[]", "train.mtp_lambda=[]",
                          "train.bias_gamma=[]", "train.ema_decay=0", *args],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    f = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (f.exists() and len(f.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert "stopped by signal" in out
    assert f"stopped by signal {signal.Signals(sig).name}" in out and "Traceback" not in out, out
    from parallel.checkpoint import latest_checkpoint
    step = latest_checkpoint(tmp_path / "checkpoints")
    meta = json.loads((step / "meta.json").read_text())
    assert meta["step"] == max(losses(tmp_path))
    run(base_overrides(corpus, tmp_path, **{"train.steps": meta["step"] + 2}))
    assert sorted(losses(tmp_path)) == list(range(1, meta["step"] + 3))


# -- metrics and W&B -----------------------------------------------------------------------------------
def test_metrics_schema_and_wandb_offline(corpus, tmp_path):
    run(base_overrides(corpus, tmp_path, **{"train.steps": 3, "logging.wandb": "offline", "train.eval_every": 3}))
    m = metrics(tmp_path)
    for key in ("step", "loss", "lm_loss", "lr", "grad_norm", "tokens_per_s", "mtp_loss", "aux_loss", "mfu",
                "memory/peak_gib", "maxvio/mean", "bias/mean_abs"):
        assert key in m[-1], key
    assert "val_lm_loss" in m[-1] and "val_lm_loss" in m[0] and m[0]["step"] == 0
    assert (tmp_path / "config.yaml").exists()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs, list(tmp_path.rglob("*"))
    blob = runs[0].read_bytes()
    for key in (b"lm_loss", b"mtp_loss", b"grad_norm", b"tokens_per_s", b"maxvio/mean"):
        assert key in blob, key


@pytest.mark.slow
def test_torchrun_restart_resumes_from_the_last_checkpoint(corpus, tmp_path):
    """A worker killed mid-run (SIGKILL: no chance to save) under `torchrun --max-restarts`: the
    restarted workers resume from the last checkpoint and the run finishes with every step logged once."""
    args = base_overrides(corpus, tmp_path, **{"train.steps": 40, "checkpoint.every": 4, "parallel.ep": 2})
    env = dict(os.environ, MAX_RESTARTS="1", PY=sys.executable, OMP_NUM_THREADS="1")
    log = open(tmp_path / "torchrun.log", "w")  # a file, not a pipe: nobody reads while we wait
    p = subprocess.Popen(["launch/torchrun.sh", "2", "--config", str(ROOT / "configs/pretrain/tiny_v3.yaml"),
                          "parallel.pp=1", "train.batch_ramp=[]", *args], cwd=ROOT, env=env,
                         stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        ckpt = tmp_path / "checkpoints" / "latest"
        deadline = time.time() + 240
        while time.time() < deadline and not (ckpt.exists() and len(losses(tmp_path)) >= 6):
            time.sleep(0.2)
        assert ckpt.exists(), "no checkpoint appeared"
        # launch/torchrun.sh execs torchrun, whose children are the workers
        workers = [int(w) for w in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                                  text=True).stdout.split()]
        assert workers, "no worker processes found"
        os.kill(max(workers), signal.SIGKILL)
        p.wait(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        log.close()
    out = (tmp_path / "torchrun.log").read_text()
    assert p.returncode == 0, out[-3000:]
    assert "resumed from" in out
    assert sorted(losses(tmp_path)) == list(range(1, 41))
