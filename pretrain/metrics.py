"""Metrics of the pretraining loop: RUN_DIR/metrics.jsonl, Weights & Biases, a console line, MFU,
expert-load (MaxVio) and routing-bias statistics, a load heatmap.

    with MetricsLogger(run_dir, rank=rank, wandb_mode=cfg.logging.wandb, config=cfg_dict,
                       resume_step=start_step if resumed else None) as log:
        ...
        loads, biases = expert_state(model)          # before model.update_expert_bias() zeroes them
        log.log(step, {"loss": ..., "lm_loss": ..., "lr": ..., "grad_norm": ..., "tokens_per_s": tps,
                       "mfu": mfu(tps, fpt, world, peak), **memory_stats(device),
                       **expert_load_stats(loads), **bias_stats(biases)},
                images={"expert_load": load_heatmap(loads)})

Only rank 0 writes anything; on every other rank the logger's methods do nothing. `wandb` is imported
only when W&B is enabled (the import takes about a second), matplotlib only for the heatmap.

W&B modes ("online" | "offline" | "disabled"), their fallbacks, the run and reading an offline run back
are in pretrain/wandb_run.py. close() finishes the W&B run and shuts wandb's service down, so that the
run's files are complete when it returns (also in multiprocessing children).
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

# PEAK_FLOPS: dense (no 2:4 sparsity) tensor-core FLOP/s per GPU and dtype, from NVIDIA's datasheets.
# It is the cluster planner's GPU table (plan/hardware.py GPUS): one table for MFU and for planning.
from model.safetensors_io import honour_umask
from plan.hardware import PEAK_FLOPS

from .wandb_run import WandbRun, resolve_wandb_mode

_GIB = float(1 << 30)


# -- FLOPs and MFU ------------------------------------------------------------------------------------

# model hook read here (stage_costs): parallel/protocols.py
def train_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 3 x the forward FLOPs of `model.stage_costs(seq_len)` (backward costs
    twice the forward: one GEMM for the input gradient, one for the weight gradient).

    Convention (PaLM, Chowdhery et al. 2022, App. B; Megatron, Narayanan et al. 2021): 6 per active weight
    per token, plus attention scores and values: 6 * n_heads * (d_qk + d_v) * seq_len / 2 per layer —
    causal, so half of PaLM's 12*L*H*Q*T, which counts the whole S x S score matrix. Routed experts count
    at n_activated / n_routed (only the active experts), the embedding lookup counts nothing, the output
    head and the MTP modules count in full. `model` may be on the meta device. Recomputation is not
    counted (it is hardware FLOPs, not model FLOPs: MFU, PaLM App. B).
    """
    pre, layers, post = model.stage_costs(seq_len)
    return 3.0 * (pre + sum(layers) + post)


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation (PaLM App. B): achieved model FLOP/s over the peak of all devices, a
    fraction (0.4 = 40%). `tokens_per_s` is the whole job's throughput."""
    if n_devices <= 0 or peak_flops_per_device <= 0:
        raise ValueError(f"mfu needs n_devices > 0 and peak_flops_per_device > 0, "
                         f"got {n_devices} and {peak_flops_per_device}")
    return tokens_per_s * flops_per_token / (n_devices * peak_flops_per_device)


def device_peak_flops(device: torch.device | str = "cpu", dtype: str = "bf16") -> float:
    """Peak FLOP/s of one device for MFU: the datasheet figure for a known GPU (PEAK_FLOPS, by name),
    otherwise measured: the best of a few large matmuls (on CPU, fp32). A measured peak gives an MFU
    against what this machine's GEMMs reach, not against a datasheet."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for gpu, table in PEAK_FLOPS.items():
            if gpu in name and dtype in table:
                return table[dtype]
    n = 1024 if device.type == "cpu" else 4096
    tdtype = torch.float32 if device.type == "cpu" or dtype == "fp32" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=tdtype)
    b = torch.randn(n, n, device=device, dtype=tdtype)
    best = math.inf
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def memory_stats(device: torch.device | str = "cpu") -> dict[str, float]:
    """Memory in GiB: on CUDA the allocator's allocated, peak allocated (since start or the last
    torch.cuda.reset_peak_memory_stats) and reserved bytes; on CPU the resident set and its high-water
    mark (/proc/self/status VmRSS, VmHWM). Keys memory/allocated_gib, memory/peak_gib (+ reserved_gib)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"memory/allocated_gib": torch.cuda.memory_allocated(device) / _GIB,
                "memory/peak_gib": torch.cuda.max_memory_allocated(device) / _GIB,
                "memory/reserved_gib": torch.cuda.memory_reserved(device) / _GIB}
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        kib = lambda k: int(fields[k].split()[0]) * 1024 / _GIB  # noqa: E731
        return {"memory/allocated_gib": kib("VmRSS"), "memory/peak_gib": kib("VmHWM")}
    except (OSError, KeyError, ValueError):   # not Linux
        return {}


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB (resource.getrusage's ru_maxrss: KiB on Linux, bytes on
    macOS). On CUDA it is the host side (data, pinned buffers, the CPU EMA)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / _GIB


def rss_by_rank(peaks: Sequence[float], per_rank_up_to: int = 64) -> dict[str, float]:
    """Every rank's peak resident memory (GiB, `peaks[r]` of rank r): memory/rss_peak_gib/rank<r> for each
    rank of a world of at most `per_rank_up_to` ranks, and at any size memory/rss_peak_gib_max with its rank
    (memory/rss_peak_max_rank) and memory/rss_peak_gib_min."""
    if not peaks:
        return {}
    top = max(range(len(peaks)), key=lambda r: peaks[r])
    out = {"memory/rss_peak_gib_max": float(peaks[top]), "memory/rss_peak_max_rank": top,
           "memory/rss_peak_gib_min": float(min(peaks))}
    if len(peaks) <= per_rank_up_to:
        out.update({f"memory/rss_peak_gib/rank{r}": float(v) for r, v in enumerate(peaks)})
    return out


# -- expert load and routing bias ---------------------------------------------------------------------

def expert_state(model) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """({global layer index: tokens routed to each expert since the last bias update}, {global layer index:
    routing bias}) of this model's or stage's MoE blocks, MTP blocks included (index n_layers + k - 1).
    Read them before `update_expert_bias` zeroes the counts; the counts are this rank's tokens only:
    all-reduce them over the data-parallel ranks first (sum) to get the step's load."""
    from model.moe import MoE
    from model.transformer import Block

    loads, biases = {}, {}
    for m in model.modules():
        if isinstance(m, Block) and isinstance(m.ffn, MoE):
            loads[m.layer_id] = m.ffn.tokens_per_expert.detach()
            if m.ffn.gate.bias is not None:
                biases[m.layer_id] = m.ffn.gate.bias.detach()
    return loads, biases


def _maxvio(load: torch.Tensor) -> float | None:
    load = load.detach().double().cpu()
    mean = load.mean().item()
    return None if not mean > 0 else load.max().item() / mean - 1.0


def expert_load_stats(loads: Mapping[int, torch.Tensor]) -> dict[str, float]:
    """MaxVio per MoE layer, max_i load_i / mean(load) - 1 (Wang et al. 2024, "Auxiliary-Loss-Free Load
    Balancing Strategy for Mixture-of-Experts", §4.1, cited by V3 §2.1.2), here MaxVio_batch: the load of
    one step. 0 is perfect balance; all tokens on one of E experts gives E - 1. Keys maxvio/layer{i},
    maxvio/mean, maxvio/max; a layer that routed no token is left out."""
    out: dict[str, float] = {}
    for i in sorted(loads):
        v = _maxvio(loads[i])
        if v is not None:
            out[f"maxvio/layer{i}"] = v
    if out:
        vals = list(out.values())
        out["maxvio/mean"] = sum(vals) / len(vals)
        out["maxvio/max"] = max(vals)
    return out


def bias_stats(biases: Mapping[int, torch.Tensor]) -> dict[str, float]:
    """The aux-loss-free routing biases b_i (V3 §2.1.2, eq. 16), over all layers: bias/mean_abs,
    bias/max_abs, bias/std; and the spread max - min of each layer as bias/range/layer{i}."""
    if not biases:
        return {}
    flat = torch.cat([b.detach().double().cpu().flatten() for b in biases.values()])
    out = {"bias/mean_abs": flat.abs().mean().item(), "bias/max_abs": flat.abs().max().item(),
           "bias/std": flat.std(unbiased=False).item()}
    for i in sorted(biases):
        b = biases[i].detach().double()
        out[f"bias/range/layer{i}"] = (b.max() - b.min()).item()
    return out


def load_heatmap(loads: Mapping[int, torch.Tensor]) -> np.ndarray:
    """An RGB uint8 image [height, width, 3] of the expert load: one row per MoE layer, one column per
    expert, coloured by load / the layer's mean load (1 = balanced), for wandb.Image."""
    if not loads:
        raise ValueError("load_heatmap: no MoE layer loads given")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = sorted(loads)
    n_exp = max(loads[i].numel() for i in layers)
    grid = np.full((len(layers), n_exp), np.nan)
    for r, i in enumerate(layers):
        load = loads[i].detach().double().cpu().flatten().numpy()
        mean = load.mean()
        grid[r, :load.size] = load / mean if mean > 0 else np.nan
    top = max(2.0, float(np.nanmax(grid)) if np.isfinite(grid).any() else 2.0)
    fig = Figure(figsize=(min(16.0, 3.0 + 0.06 * n_exp), min(12.0, 1.5 + 0.18 * len(layers))), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=top)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    step = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), step), [str(i) for i in layers[::step]])
    fig.colorbar(im, ax=ax, label="load / mean load")
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# -- the logger ---------------------------------------------------------------------------------------

def _number(key: str, v) -> int | float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise TypeError(f"metric {key!r}: a tensor of shape {tuple(v.shape)}, expected one number")
        v = v.item()
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    raise TypeError(f"metric {key!r}: {type(v).__name__} is not a number")


def _fmt(x: float) -> str:
    if x != x or x in (math.inf, -math.inf):
        return str(x)
    return f"{x:.4f}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.3e}"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class MetricsLogger:
    """One logged step = one line of RUN_DIR/metrics.jsonl, {"step": step, **metrics}, one W&B log at
    that step, and one console line. Non-finite values are written as null (JSON has no NaN/Infinity)
    and their keys listed under "nonfinite"; W&B receives them as they are.

    rank: only rank 0 writes; elsewhere every method is a no-op. wandb_mode: online | offline | disabled
    (see the module docstring for the fallbacks). project, entity, name, tags, config: the W&B run's; its
    files go under RUN_DIR/wandb. resume_step: the step the run resumes from — metrics.jsonl keeps the
    steps up to it, and W&B continues the run id saved in RUN_DIR/wandb/whaletron-run-id.
    total_steps: shown as step i/total. wandb_settings: overrides of wandb.Settings (defaults: silent,
    console capture off, no code/git/requirements capture, init_timeout 30 s).
    """

    def __init__(self, run_dir, *, rank: int, wandb_mode: str = "disabled", project: str = "whaletron",
                 entity: str = "", name: str = "", tags=(), config: dict | None = None,
                 resume_step: int | None = None, total_steps: int | None = None,
                 wandb_settings: dict | None = None):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.total_steps = total_steps
        self.wandb_mode = "disabled"
        self._wandb: WandbRun | None = None
        self._wandb_dir: Path | None = None
        self._file = None
        if rank != 0:
            return
        mode, why = resolve_wandb_mode(wandb_mode)      # a bad mode fails before anything is written
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._prepare_jsonl(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if why:
            print(f"wandb: {why}: logging {mode}" + (f" to {self.run_dir / 'wandb'}" if mode == "offline" else ""),
                  flush=True)
        if mode != "disabled":
            self._wandb = WandbRun(self.run_dir, mode, project=project, entity=entity, name=name, tags=tags,
                                   config=config, resume_step=resume_step, settings=wandb_settings)
            self.wandb_mode = self._wandb.mode
            self._wandb_dir = self._wandb.dir

    # -- metrics.jsonl --
    def _prepare_jsonl(self, resume_step: int | None) -> None:
        """Drop the lines of steps after `resume_step` (and a line cut short by a crash), rewriting the
        file through a temporary file and os.replace so that the earlier lines are never lost."""
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        partial = bool(lines) and not lines[-1].endswith("\n")
        if resume_step is None and not partial:
            return
        keep = []
        for line in lines:
            if not line.endswith("\n"):
                continue
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                step = None
            if resume_step is None or not isinstance(step, int) or step <= resume_step:
                keep.append(line)
        if len(keep) == len(lines):
            return
        fd, tmp = tempfile.mkstemp(dir=self.run_dir, prefix=".metrics.", suffix=".jsonl.tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            honour_umask(tmp)  # mkstemp creates 0o600; metrics.jsonl keeps a plain file's mode
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- W&B --
    @property
    def wandb_dir(self) -> Path | None:
        """The W&B run directory (RUN_DIR/wandb/offline-run-* or run-*), or None without W&B."""
        return self._wandb_dir

    @property
    def wandb_url(self) -> str | None:
        return None if self._wandb is None else self._wandb.url

    # -- logging --
    def log(self, step: int, metrics: Mapping[str, Any], *, images: Mapping[str, np.ndarray] | None = None,
            console: bool = True) -> None:
        if self.rank != 0:
            return
        if "step" in metrics:
            raise ValueError("metrics must not contain 'step': it is the first argument of log()")
        values = {k: _number(k, v) for k, v in metrics.items()}
        row: dict[str, Any] = {"step": int(step)}
        bad = []
        for k, v in values.items():
            if isinstance(v, float) and not math.isfinite(v):
                bad.append(k)
                v = None
            row[k] = v
        if bad:
            row["nonfinite"] = bad
        if self._file is not None:
            self._file.write(json.dumps(row, allow_nan=False) + "\n")
            self._file.flush()
        if self._wandb is not None:
            self._wandb.log(step, values, images)
        if console:
            print(self.console_line(step, values), flush=True)

    def console_line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """`step 12/100 | loss 3.2104 (lm 3.1000 mtp 0.1100 aux 0.0004) | lr 3.000e-04 | gnorm 0.8123 |
        12.3k tok/s | mfu 41.2% | mem 3.2 GiB | maxvio 0.12` — terms that are absent are left out."""
        m = metrics
        parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        if "loss" in m:
            terms = " ".join(f"{short} {_fmt(float(m[k]))}" for k, short in
                             (("lm_loss", "lm"), ("mtp_loss", "mtp"), ("aux_loss", "aux")) if k in m)
            parts.append(f"loss {_fmt(float(m['loss']))}" + (f" ({terms})" if terms else ""))
        if "lr" in m:
            parts.append(f"lr {float(m['lr']):.3e}")
        if "grad_norm" in m:
            parts.append(f"gnorm {_fmt(float(m['grad_norm']))}")
        if "tokens_per_s" in m:
            parts.append(f"{_si(float(m['tokens_per_s']))} tok/s")
        if "mfu" in m:
            parts.append(f"mfu {100 * float(m['mfu']):.1f}%")
        if "memory/peak_gib" in m:
            parts.append(f"mem {float(m['memory/peak_gib']):.1f} GiB")
        if "maxvio/max" in m:
            parts.append(f"maxvio {float(m['maxvio/max']):.2f}")
        if "val_lm_loss" in m:
            parts.append(f"val lm {_fmt(float(m['val_lm_loss']))}")
        if m.get("skipped"):
            parts.append("SKIPPED (non-finite loss or gradient)")
        return " | ".join(parts)

    # -- end --
    def close(self, exit_code: int = 0) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            run.finish(exit_code)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
