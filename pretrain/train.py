"""The pretraining loop. `train(cfg)` runs one job: under torchrun (one process per device) or as a
plain process; the same code on CPU (gloo) and CUDA (NCCL).

One step, top to bottom:
    batch  = this dp rank's share of global batch k (the same samples whatever the layout)
    loss   = forward + backward of its micro-batches (gradient accumulation, or the pipeline schedule)
    norm   = global gradient norm, clipped; a non-finite loss or norm skips the step
    opt    = AdamW at the scheduled lr; the routing bias moves by the scheduled gamma (V3 §2.1.2)
    ema    = the CPU EMA takes the new parameters in the background (V3 §3.2.3)
    log, validate, checkpoint; a signal (SIGTERM / SIGUSR1) saves and exits cleanly
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from model import build_model
from parallel import (LayoutError, ParallelConfig, apply_recompute, attach_schedule, build_mesh, build_pipeline,
                      clip_grad_norm_, finish_grad_sync, init_parallel_weights, parallelize,
                      set_gradient_sync, sync_expert_load)
from parallel import comm
from parallel.data_parallel import reshard
from parallel.fp8 import Fp8Error, Fp8Recipe, get_backend
from parallel.pp_schedules import check_microbatches
from parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, sharded_state

from .config import Config, ConfigError, save_config
from .data import PretrainData, check_batch_sizes, global_batch_size_at, ramp_batch_sizes, samples_for_steps
from .metrics import (MetricsLogger, bias_stats, device_peak_flops, expert_load_stats, expert_state, load_heatmap,
                      memory_stats, mfu, train_flops_per_token)
from .optim import EMA, AdamW, param_groups
from .schedules import check_lr_schedule, check_piecewise, lr_at, piecewise

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


# -- process setup ---------------------------------------------------------------------------------
def init_distributed(device_pref: str = "auto") -> torch.device:
    """Join the torchrun job when there is one (env RANK/WORLD_SIZE); NCCL on CUDA, gloo on CPU."""
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda, but no CUDA device is visible; use train.device=cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            # torchrun's agent keeps one store across `--max-restarts` rounds; without a prefix per
            # round a restarted rank reads the dead round's addresses and gloo's connect is refused
            store, rank, world = next(dist.rendezvous("env://"))
            store = dist.PrefixStore(f"whaletron/round{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group("nccl" if use_cuda else "gloo", store=store, rank=rank, world_size=world)
        else:  # a plain process is a world of one: the runtime (FSDP2's bf16 policy, DCP) runs unchanged
            dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    return device


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def open_run(cfg, pp: int | None = None):
    """What every training job does first: join the process group, create the run directory with the
    resolved config, and build the mesh (pp overrides parallel.pp). Returns (device, run_dir, ckpt_dir, mesh)."""
    p = cfg.parallel
    device = init_distributed(cfg.train.device)
    run_dir = Path(cfg.logging.run_dir)
    ckpt_dir = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    if _rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    try:
        mesh = build_mesh(ParallelConfig(tp=p.tp, pp=p.pp if pp is None else pp, dp=p.dp, ep=p.ep, sp=p.sp,
                                         node_size=p.node_size, zero=p.zero), device.type)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    return device, run_dir, ckpt_dir, mesh


def fp8_recipe(t, device: torch.device) -> Fp8Recipe | None:
    """The FP8 recipe that train.fp8 asks for (V3 §3.3), its backend checked against this device up front."""
    if t.fp8 != "blockwise":
        return None
    try:
        get_backend(t.fp8_backend, device)
    except Fp8Error as e:
        raise ConfigError(f"train.fp8_backend = {t.fp8_backend}: {e}") from None
    return Fp8Recipe(t.fp8_backend)


def micro_batch_losses(net, mesh, micro_batches, backward: bool) -> dict[str, float]:
    """The loss terms of `net.loss(**kwargs)` over micro-batches (a list of kwargs), averaged over them
    and over the dp ranks; with `backward`, the gradients of that mean (FSDP2 reduces once, after the
    last micro-batch)."""
    n = len(micro_batches)
    sums: dict[str, torch.Tensor] = {}
    for i, kwargs in enumerate(micro_batches):
        out = net.loss(**kwargs)
        if backward:
            set_gradient_sync(net, i == n - 1)
            (out["loss"] / n).backward()
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() / n
    if backward:
        finish_grad_sync(net, mesh)
    keys = sorted(sums)
    vec = torch.stack([sums[k] for k in keys]).double()
    comm.all_reduce(vec, mesh["dp"])
    vec /= mesh.dims.dp
    return dict(zip(keys, vec.tolist()))


# -- the trainer -----------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        self.device, self.run_dir, self.ckpt_dir, self.mesh = open_run(cfg)
        self.rank, self.world = _rank(), _world()
        dims = self.mesh.dims
        self.dp_rank = dims.coords(self.mesh.rank)["dp"]
        try:  # the checks' messages name the keys; as ConfigErrors they print without a traceback
            check_batch_sizes(t.global_batch_size, t.micro_batch_size, dims.dp, t.batch_ramp)
            check_lr_schedule(t.lr_schedule, t.warmup_steps, t.steps, t.min_lr_ratio, t.lr_milestones, t.lr_factors)
            for key in ("mtp_lambda", "bias_gamma"):
                if getattr(t, key):
                    check_piecewise(getattr(t, key), f"train.{key}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.total_samples = samples_for_steps(t.steps, t.global_batch_size, t.batch_ramp)
        self.model_cfg = cfg.model_config()

        self.data = self._build_data()
        if self.data.vocab_size > self.model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {self.data.vocab_size} tokens but model.vocab_size is "
                              f"{self.model_cfg.vocab_size}; set model.vocab_size={self.data.vocab_size} (or more)")
        self.param_dtype = DTYPES[t.dtype]
        self.fp8 = fp8_recipe(t, self.device)
        try:
            self._build_model()
        except ValueError as e:  # layout and micro-batch constraints; their messages name the keys
            raise ConfigError(str(e)) from None
        named = [(n, q) for m in self.models for n, q in m.named_parameters()]
        self.opt = AdamW(param_groups(named, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                         eps=t.adam_eps, weight_decay=t.weight_decay,
                         moment_dtype=torch.bfloat16 if t.moment_dtype == "bf16" else torch.float32)
        self.ema = EMA(self._named_unique(), t.ema_decay) if t.ema_decay > 0 else None
        self.flops_per_token = train_flops_per_token(build_model(self.model_cfg, device="meta"), cfg.data.seq_len)
        self.peak = cfg.logging.peak_tflops * 1e12 or device_peak_flops(self.device, t.dtype)

        self.step, self.consumed, self.nonfinite_streak, self.skipped = 0, 0, 0, 0
        self._resume()
        lg = cfg.logging
        self.logger = MetricsLogger(self.run_dir, rank=self.rank, wandb_mode=lg.wandb, project=lg.wandb_project,
                                    entity=lg.wandb_entity, name=lg.wandb_name or self.run_dir.name,
                                    tags=lg.wandb_tags, config=cfg.to_dict(),
                                    resume_step=self.step if self.step else None, total_steps=t.steps)
        self.stop_signal = 0
        self.last_step = t.exit_at_step or t.steps

    # -- setup -------------------------------------------------------------------------------------
    def _build_data(self) -> PretrainData:
        cfg, t = self.cfg, self.cfg.train
        # every rank builds it (megatron's builder synchronises); rank 0 tokenizes the embedded corpus
        return PretrainData(cfg.data, seed=t.seed, train_samples=self.total_samples,
                            valid_samples=max(1, t.eval_batches) * t.global_batch_size,
                            dp_rank=self.dp_rank, dp_size=self.mesh.dims.dp)

    def _build_model(self) -> None:
        cfg, p, t = self.cfg, self.cfg.parallel, self.cfg.train
        meta = build_model(self.model_cfg, device="meta")
        if p.pp > 1:
            m0 = t.micro_batch_size * self.mesh.dims.dp
            for gbs in ramp_batch_sizes(t.global_batch_size, t.batch_ramp):  # every size the ramp reaches
                try:
                    check_microbatches(p.pp_schedule, p.pp, gbs // m0, p.vpp)
                except ValueError as e:
                    raise ConfigError(f"at a global batch of {gbs} sequences (train.batch_ramp = {t.batch_ramp}, "
                                      f"{gbs // m0} micro-batches per dp rank): {e}") from None
            self.pipe = build_pipeline(meta, self.mesh, p.pp_schedule, t.global_batch_size // m0, vpp=p.vpp,
                                       layer_split=p.layer_split or None, seq_len=cfg.data.seq_len,
                                       recompute=p.recompute, param_dtype=self.param_dtype, fp8=self.fp8)
            self.pipe.init_weights(t.seed, self.device)
            self.models = self.pipe.stages
            self._schedule_for(self.batch_size(0)[0])
        else:
            self.pipe = None
            if p.recompute != "none":
                apply_recompute(meta, p.recompute)
            net = parallelize(meta, self.mesh, param_dtype=self.param_dtype, fp8=self.fp8)
            init_parallel_weights(net, self.mesh, t.seed, self.device)
            self.models = [net]

    def _schedule_for(self, n_micro: int) -> None:
        """(Re)build the pipeline schedule for n_micro micro-batches (the batch ramp changes it)."""
        if self.pipe.schedule is None or self.pipe.n_microbatches != n_micro:
            self.pipe.n_microbatches = n_micro
            attach_schedule(self.pipe, self.cfg.train.micro_batch_size, self.cfg.data.seq_len,
                            dtype=self.param_dtype, device=self.device)

    def _named_unique(self):
        """Parameters by name, each once (the V layouts hold the embedding twice on one rank)."""
        seen = {}
        for m in self.models:
            for n, q in m.named_parameters():
                seen.setdefault(n, q)
        return list(seen.items())

    def _state(self) -> dict:
        return sharded_state(self.models, self.mesh, self.opt, self.ema)

    def _resume(self) -> None:
        c = self.cfg.checkpoint
        if c.resume == "none":
            return
        path = latest_checkpoint(self.ckpt_dir) if c.resume == "auto" else Path(c.resume)
        if path is None:
            return
        meta = load_checkpoint(path, self._state(), model_config=self.model_cfg.to_dict())
        self.step, self.consumed = meta["step"], meta["consumed_samples"]
        self.opt.step_count = meta["optimizer_steps"]
        self.nonfinite_streak, self.skipped = meta.get("nonfinite_streak", 0), meta.get("skipped_steps", 0)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step} ({self.consumed} samples)", flush=True)

    def save(self) -> None:
        t0 = time.perf_counter()
        meta = {"step": self.step, "consumed_samples": self.consumed, "optimizer_steps": self.opt.step_count,
                "nonfinite_streak": self.nonfinite_streak, "skipped_steps": self.skipped,
                "model_config": self.model_cfg.to_dict(), "parallel": asdict(self.mesh.dims),
                "config": self.cfg.to_dict()}
        path = save_checkpoint(self.ckpt_dir, self.step, self._state(), meta, keep=self.cfg.checkpoint.keep,
                               async_save=self.cfg.checkpoint.async_save)
        if self.rank == 0:
            print(f"checkpoint step {self.step} -> {path} ({time.perf_counter() - t0:.2f} s)", flush=True)

    # -- schedules ---------------------------------------------------------------------------------
    def batch_size(self, consumed: int) -> tuple[int, int]:
        """(micro-batches per dp rank, global batch) after `consumed` samples (the ramp's rule)."""
        t = self.cfg.train
        gbs = global_batch_size_at(consumed, t.global_batch_size, t.batch_ramp)
        return gbs // (t.micro_batch_size * self.mesh.dims.dp), gbs

    def progress(self) -> float:
        """The fraction of the run's tokens consumed before this step (the papers' schedules are in tokens)."""
        return self.consumed / self.total_samples

    def lr(self) -> float:
        t = self.cfg.train
        return lr_at(self.step, self.progress(), peak=t.lr, schedule=t.lr_schedule, warmup_steps=t.warmup_steps,
                     min_ratio=t.min_lr_ratio, milestones=t.lr_milestones, factors=t.lr_factors)

    def mtp_lambda(self) -> float:
        pts = self.cfg.train.mtp_lambda
        return piecewise(self.progress(), pts) if pts else self.model_cfg.mtp_lambda

    def bias_gamma(self) -> float:
        pts = self.cfg.train.bias_gamma
        return piecewise(self.progress(), pts) if pts else self.model_cfg.bias_update_gamma

    # -- one step ----------------------------------------------------------------------------------
    def forward_backward(self, tokens: torch.Tensor, labels: torch.Tensor, n_micro: int) -> dict[str, float]:
        """Gradients of the mean micro-batch loss over the global batch; the loss terms, averaged
        the same way, identical on every rank."""
        if self.pipe is not None:
            self._schedule_for(n_micro)
            return self.pipe.step(tokens, labels)
        return self._micro_batches(tokens, labels, n_micro, backward=True)

    def _micro_batches(self, tokens, labels, n_micro: int, backward: bool) -> dict[str, float]:
        mbs = self.cfg.train.micro_batch_size
        return micro_batch_losses(self.models[0], self.mesh, [
            dict(tokens=tokens[i * mbs:(i + 1) * mbs], labels=labels[i * mbs:(i + 1) * mbs]) for i in range(n_micro)],
            backward)

    def clip(self) -> float:
        clip = self.cfg.train.grad_clip
        norm = self.pipe.clip_grad_norm_(clip) if self.pipe is not None else clip_grad_norm_(self.models[0], clip, self.mesh)
        return float(norm)

    @torch.no_grad()
    def expert_stats(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Every MoE layer's token load of this step (already summed over the stage's ranks) and routing
        bias, keyed by global layer index (MTP layers after the decoder's), gathered over pp."""
        loads, biases = {}, {}
        for m in self.models:
            a, b = expert_state(m)
            loads.update(a)
            biases.update(b)
        layers = sorted(i for i in range(self.model_cfg.n_layers + self.model_cfg.n_mtp)
                        if self.model_cfg.is_moe_layer(min(i, self.model_cfg.n_layers)))
        table = torch.zeros(2, len(layers), self.model_cfg.n_routed_experts, dtype=torch.float64, device=self.device)
        for row, i in enumerate(layers):
            if i in loads:
                table[0, row] = loads[i].double()
            if i in biases:
                table[1, row] = biases[i].double()
        if self.mesh.dims.pp > 1:  # each layer lives on one pp rank
            comm.all_reduce(table, self.mesh["pp"])
        table = table.cpu()
        bias = {i: table[1, r] for r, i in enumerate(layers)} if self.model_cfg.aux_free_bias else {}
        return {i: table[0, r] for r, i in enumerate(layers)}, bias

    def train_step(self) -> dict[str, float]:
        t = self.cfg.train
        torch.manual_seed(t.seed * 1_000_003 + self.step)  # step-keyed randomness: resume is exact
        n_micro, gbs = self.batch_size(self.consumed)
        tokens, labels = self.data.global_batch(self.consumed, gbs)
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        lr, lam, gamma = self.lr(), self.mtp_lambda(), self.bias_gamma()
        for m in self.models:
            m.mtp_lambda = lam
        for g in self.opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        metrics = self.forward_backward(tokens, labels, n_micro)
        grad_norm = self.clip()
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        for m in self.models:
            sync_expert_load(m, self.mesh)  # the step's global load, for the bias update and the stats
        logged = not finite or (self.step + 1) % self.cfg.logging.every == 0 or self.step + 1 == self.last_step
        loads, bias = self.expert_stats() if logged and self.model_cfg.is_moe else ({}, {})
        if finite:
            self.opt.step()
            if self.ema is not None:
                self.ema.update()
            self.nonfinite_streak = 0
        else:  # skip: no update and no bias move (gamma 0 below only resets the load counts)
            self.nonfinite_streak += 1
            self.skipped += 1
        for m in self.models:
            m.update_expert_bias(gamma if finite else 0.0)
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.consumed += gbs
        self.step += 1
        tokens_per_s = gbs * self.cfg.data.seq_len / dt
        metrics.update(lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s, step_time=dt,
                       mfu=mfu(tokens_per_s, self.flops_per_token, self.world, self.peak) if self.peak else 0.0,
                       global_batch_size=gbs, consumed_samples=self.consumed,
                       skipped_steps=self.skipped)
        metrics.update(memory_stats(self.device))
        if self.model_cfg.n_mtp:
            metrics["mtp_lambda"] = lam
        if loads:
            metrics.update(expert_load_stats(loads))
        if bias:
            metrics["bias_gamma"] = gamma
            metrics.update(bias_stats(bias))
        self._last_loads = loads
        if not finite:
            metrics["skipped"] = 1.0
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        t = self.cfg.train
        totals: dict[str, float] = {}
        for tokens, labels in self.data.valid_batches(t.eval_batches, t.global_batch_size):
            tokens, labels = tokens.to(self.device), labels.to(self.device)
            if self.pipe is not None:
                out = self.pipe.evaluate(tokens, labels)
            else:
                net = self.models[0]
                net.eval()
                out = self._micro_batches(tokens, labels, tokens.shape[0] // t.micro_batch_size, backward=False)
                net.train()
                reshard(net)
            for k in ("lm_loss", "mtp_loss"):
                if k in out:
                    totals[f"val_{k}"] = totals.get(f"val_{k}", 0.0) + out[k] / t.eval_batches
        return totals

    # -- the run -----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def _stop_requested(self) -> bool:
        """Every rank must agree (a signal may reach only some of them)."""
        flag = torch.tensor([float(self.stop_signal)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run(self) -> int:
        cfg, t, c = self.cfg, self.cfg.train, self.cfg.checkpoint
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        last = self.last_step
        if self.rank == 0:
            counts = self.model_cfg.param_counts()
            print(f"{self.model_cfg.name}: {counts['total']:,} parameters ({counts['active']:,} active), "
                  f"{self.world} ranks {self.mesh.dims}, run dir {self.run_dir}", flush=True)
        try:
            if t.eval_every and self.step == 0:
                self.logger.log(0, self.evaluate())
            while self.step < last:
                metrics = self.train_step()
                if t.eval_every and self.step % t.eval_every == 0:
                    metrics.update(self.evaluate())
                if self.step % cfg.logging.every == 0 or self.step == last or "skipped" in metrics:
                    images = None
                    if self._last_loads and self.step % (10 * cfg.logging.every) == 0:
                        images = {"expert_load": load_heatmap(self._last_loads)}
                    self.logger.log(self.step, metrics, images=images)
                if self.nonfinite_streak > t.max_nonfinite:
                    raise NonFiniteError(
                        f"{self.nonfinite_streak} non-finite steps in a row (train.max_nonfinite = {t.max_nonfinite}); "
                        f"stopping without saving. The last good checkpoint is in {self.ckpt_dir}: lower train.lr or "
                        f"check the data, then resume from it")
                if self._stop_requested():
                    self.save()
                    if self.rank == 0:
                        print(f"stopped by signal {self.stop_signal or 'on another rank'} at step {self.step}; "
                              f"resume with checkpoint.resume=auto", flush=True)
                    return 0
                if self.step == last or (c.every and self.step % c.every == 0):
                    self.save()
            return 0
        finally:
            from parallel.checkpoint import finalize_pending
            finalize_pending()
            if self.ema is not None:
                self.ema.close()
            self.logger.close()
            if self.rank == 0:
                print(f"metrics: {self.run_dir / 'metrics.jsonl'}; checkpoints: {self.ckpt_dir}"
                      + (f"; W&B: {self.logger.wandb_dir}" if self.logger.wandb_dir else ""), flush=True)


def train(cfg: Config) -> int:
    owns_group = not dist.is_initialized()
    try:
        return Trainer(cfg).run()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
