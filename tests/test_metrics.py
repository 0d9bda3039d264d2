"""Pretraining metrics: metrics.jsonl (and its truncation on resume), W&B offline/online-fallback/disabled
read back from the run's own .wandb file, MaxVio, training FLOPs per token, MFU, heatmap, console line."""
import json
import re

import numpy as np
import pytest
import torch

from model import build_model, preset
from pretrain.metrics import (MetricsLogger, bias_stats, device_peak_flops, expert_load_stats, expert_state,
                              load_heatmap, memory_stats, mfu, train_flops_per_token)
from pretrain.wandb_run import read_wandb_history, resolve_wandb_mode

REQUIRED = ("step", "loss", "lm_loss", "lr", "grad_norm", "tokens_per_s")


@pytest.fixture
def no_wandb_net(monkeypatch, tmp_path):
    """No credentials, no server: W&B must never reach for the network, and never wait long."""
    for k in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "30")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def _metrics(step):
    return {"loss": 3.0 / step, "lm_loss": 2.5 / step, "mtp_loss": 0.4 / step, "aux_loss": torch.tensor(0.1),
            "lr": 1e-3, "grad_norm": np.float32(0.5), "tokens_per_s": 1234.0, "mfu": 0.25,
            "maxvio/layer1": 0.5, "maxvio/max": 0.5}


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_lines_and_resume_truncation(tmp_path, no_wandb_net, capsys):
    with MetricsLogger(tmp_path, rank=0) as log:
        for step in range(1, 6):
            log.log(step, _metrics(step))
    rows = _read(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert set(REQUIRED) <= r.keys()
        assert isinstance(r["aux_loss"], float) and isinstance(r["grad_norm"], float)
    out = capsys.readouterr().out
    assert out.count("\n") == 5 and "loss 3.0000" in out and "lr 1.000e-03" in out
    assert not (tmp_path / "wandb").exists()           # disabled: nothing of W&B

    # a crash after step 5 left half a line; the run resumes from its step-3 checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    with MetricsLogger(tmp_path, rank=0, resume_step=3) as log:
        for step in range(4, 8):
            log.log(step, _metrics(step), console=False)
    rows = _read(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[0]["loss"] == 3.0 and rows[4]["loss"] == 3.0 / 5
    assert not list(tmp_path.glob(".metrics.*"))        # the temporary file is gone


def test_nonfinite_values_and_other_ranks(tmp_path, no_wandb_net, capsys):
    with MetricsLogger(tmp_path, rank=0) as log:
        log.log(1, {**_metrics(1), "loss": float("nan"), "grad_norm": float("inf")}, console=False)
        with pytest.raises(TypeError, match="'lr'"):
            log.log(2, {"lr": "high"})
    (row,) = _read(tmp_path / "metrics.jsonl")
    assert row["loss"] is None and row["grad_norm"] is None and row["nonfinite"] == ["loss", "grad_norm"]
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()

    other = tmp_path / "rank1"
    with MetricsLogger(other, rank=1, wandb_mode="offline") as log:
        log.log(1, _metrics(1))
    assert not other.exists() and capsys.readouterr().out == ""


def _history(run):
    rows = read_wandb_history(run)
    return {r["_step"]: r for r in rows}


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_wandb_offline_run_has_the_logged_keys(tmp_path, no_wandb_net, capsys, mode):
    heat = load_heatmap({1: torch.tensor([1.0, 2.0, 3.0, 2.0]), 2: torch.tensor([0.0, 4.0, 4.0, 0.0])})
    with MetricsLogger(tmp_path, rank=0, wandb_mode=mode, name="t", tags=["ci"],
                       config={"train": {"lr": 1e-3}}) as log:
        assert log.wandb_mode == "offline"
        for step in (1, 2):
            log.log(step, _metrics(step), images={"expert_load": heat}, console=False)
    out = capsys.readouterr().out
    if mode == "online":                                # one line saying why
        assert out.count("\n") == 1 and "no API key" in out and "offline" in out
    run = log.wandb_dir
    assert run.parent == tmp_path / "wandb" and run.name.startswith("offline-run-")
    assert list(run.glob("run-*.wandb"))
    wandb_file = next(run.glob("run-*.wandb"))
    hist = _history(run)
    assert sorted(hist) == [1, 2], f"{wandb_file.stat().st_size} bytes: {wandb_file.read_bytes()[:200]!r}"
    assert hist[2]["loss"] == pytest.approx(1.5) and hist[1]["maxvio/layer1"] == 0.5
    assert hist[1]["expert_load/_type"] == "image-file"
    assert (run / "files" / hist[1]["expert_load/path"]).exists()
    if mode == "online":
        return
    # a resumed run continues the same W&B run id; 300 steps span several 32 KiB blocks of the log
    with MetricsLogger(tmp_path, rank=0, wandb_mode="offline", resume_step=1) as log2:
        for step in range(2, 302):
            log2.log(step, _metrics(step), console=False)
    assert log2.wandb_dir != run and _run_id(log2.wandb_dir) == _run_id(run)
    assert next(log2.wandb_dir.glob("run-*.wandb")).stat().st_size > 3 * 32768
    hist = _history(log2.wandb_dir)
    assert sorted(hist) == list(range(2, 302)) and hist[301]["loss"] == pytest.approx(3.0 / 301)


def _run_id(run_dir) -> str:
    """The W&B run id in an offline run directory's name: offline-run-<YYYYMMDD_HHMMSS>-<id>, with W&B's
    "-<n>" suffix when a run of the same id starts within the same second (a resume in a fast test)."""
    m = re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(?:-\d+)?", run_dir.name)
    assert m, run_dir.name
    return m.group(1)


def test_online_falls_back_when_the_server_does_not_answer(tmp_path, no_wandb_net, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")    # discard port: refused at once
    mode, why = resolve_wandb_mode("online", probe_timeout=2.0)
    assert mode == "offline" and "127.0.0.1:9 is not reachable" in why
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("offline")[0] == "disabled"
    with pytest.raises(ValueError, match="online, offline, disabled"):
        resolve_wandb_mode("cloud")


def test_maxvio_and_bias_stats():
    e = 8
    stats = expert_load_stats({3: torch.full((e,), 5.0), 4: torch.tensor([40.0] + [0.0] * (e - 1)),
                               5: torch.zeros(e)})  # layer 5 routed nothing: left out
    assert stats["maxvio/layer3"] == 0.0
    assert stats["maxvio/layer4"] == pytest.approx(e - 1)
    assert "maxvio/layer5" not in stats
    assert stats["maxvio/max"] == pytest.approx(e - 1) and stats["maxvio/mean"] == pytest.approx((e - 1) / 2)
    assert expert_load_stats({}) == {}

    b = bias_stats({1: torch.tensor([-0.5, 0.5]), 2: torch.tensor([0.0, 1.0])})
    assert b["bias/mean_abs"] == pytest.approx(0.5) and b["bias/max_abs"] == 1.0
    assert b["bias/std"] == pytest.approx(torch.tensor([-0.5, 0.5, 0.0, 1.0]).std(unbiased=False).item())
    assert b["bias/range/layer1"] == 1.0 and b["bias/range/layer2"] == 1.0


def test_expert_state_of_a_model():
    cfg = preset("tiny-deepseek-v3")
    net = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    net.loss(tokens, tokens)
    loads, biases = expert_state(net)
    moe = [i for i in range(cfg.n_layers + cfg.n_mtp) if cfg.is_moe_layer(i)]
    assert sorted(loads) == moe and sorted(biases) == moe
    per_layer = 2 * 16 * cfg.n_activated_experts
    assert all(load.sum().item() == per_layer for load in loads.values())
    assert set(expert_load_stats(loads)) >= {f"maxvio/layer{i}" for i in moe}


def test_heatmap_image():
    img = load_heatmap({i: torch.rand(16) for i in range(3, 7)})
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 50
    with pytest.raises(ValueError):
        load_heatmap({})


def test_train_flops_per_token():
    tiny = build_model(preset("tiny-deepseek-v3"), device="meta")
    pre, layers, post = tiny.stage_costs(128)
    assert train_flops_per_token(tiny, 128) == 3 * (pre + sum(layers) + post)
    assert train_flops_per_token(tiny, 256) > train_flops_per_token(tiny, 128)

    cfg = preset("deepseek-v3")
    v3 = build_model(cfg, device="meta")
    f = train_flops_per_token(v3, 4096)
    six_n = 6 * cfg.param_counts()["active"]                  # 6 x ~37.6B (V3 §1: 37B activated)
    assert 2.0e11 < six_n < 2.4e11
    assert six_n < f < 1.25 * six_n                           # + causal attention and MTP, - embedding
    _, layers, _ = v3.stage_costs(4096)
    assert 1.2e9 < max(layers) < 1.5e9                        # ~1.34 GFLOP/token forward per MoE layer


def test_mfu_and_console_line():
    # 1000 tok/s x 6e9 FLOP/token on 2 devices of 1e13 FLOP/s = 30%
    assert mfu(1000.0, 6e9, 2, 1e13) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0, 1.0)
    assert 1e8 < device_peak_flops("cpu") < 1e14                  # measured fp32 matmul rate
    mem = memory_stats("cpu")
    assert 0 < mem["memory/allocated_gib"] <= mem["memory/peak_gib"]
    log = MetricsLogger("unused", rank=3, total_steps=100)
    line = log.console_line(12, {"loss": 3.2104, "lm_loss": 3.1, "mtp_loss": 0.11, "aux_loss": 4e-4, "lr": 3e-4,
                                 "grad_norm": 0.8123, "tokens_per_s": 12345.0, "mfu": 0.412,
                                 "memory/peak_gib": 3.21, "maxvio/max": 0.12})
    assert line == ("step 12/100 | loss 3.2104 (lm 3.1000 mtp 0.1100 aux 4.000e-04) | lr 3.000e-04 | "
                    "gnorm 0.8123 | 12.3k tok/s | mfu 41.2% | mem 3.2 GiB | maxvio 0.12")
