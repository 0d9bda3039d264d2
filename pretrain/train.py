"""The pretraining loop. `train(cfg)` runs one job: under torchrun (one process per device) or as a
plain process; the same code on CPU (gloo) and CUDA (NCCL), at pp = 1 and pp > 1 (`parallel.engine`).

One step, top to bottom:
    batch  = this dp rank's share of global batch k (the same samples whatever the layout)
    loss   = engine.step: forward + backward of its micro-batches (gradient accumulation, or the pipeline schedule)
    norm   = global gradient norm, clipped; a non-finite loss or norm skips the step (pretrain.session)
    opt    = AdamW at the scheduled lr; the routing bias moves by the scheduled gamma (V3 §2.1.2)
    ema    = the CPU EMA takes the new parameters in the background (V3 §3.2.3)
    log, validate, checkpoint; a signal (SIGTERM / SIGUSR1 / SIGINT) saves and exits cleanly

Each step runs inside `self.tools.step(k)` (pretrain.operate): the hang and straggler watchdog, the profiler
window and the CUDA memory history hook in there and nowhere else (docs/operating.md).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from model import build_model
from parallel import build_engine, comm
from parallel.pp_schedules import check_microbatches

from .config import Config, ConfigError
from .data import PretrainData, check_batch_sizes, global_batch_size_at, ramp_batch_sizes, samples_for_steps
from .metrics import (bias_stats, device_peak_flops, expert_load_stats, expert_state, load_heatmap, memory_stats, mfu,
                      peak_rss_gib, rss_by_rank, train_flops_per_token)
from .schedules import check_lr_schedule, check_piecewise, lr_at, piecewise
from .session import DTYPES, Session, fp8_recipe, open_run

# the step in flight finishes, a checkpoint is written and the run exits 0: a scheduler's preemption
# (SIGTERM, Slurm's --signal=USR1) or Ctrl-C (a second Ctrl-C stops at once, without saving)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


# -- the trainer -----------------------------------------------------------------------------------
class Trainer:
    """The data, the schedules and the loop; the engine (`parallel.engine`) runs the model, the session
    (`pretrain.session`) owns the optimizer, the counters, checkpoints and the metrics logger."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        run = open_run(cfg)
        self.device, self.run_dir, self.ckpt_dir, self.mesh = run.device, run.run_dir, run.ckpt_dir, run.mesh
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
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
            self.engine = self._build_engine()
            if t.compile:   # per block, from outside; on CPU traced without code generation (inductor: minutes)
                from parallel.compile import apply_compile
                for stage in self.engine.stages:
                    apply_compile(stage, backend="inductor" if self.device.type == "cuda" else "aot_eager")
        except ValueError as e:  # layout and micro-batch constraints; their messages name the keys
            raise ConfigError(str(e)) from None
        self.session = Session(cfg, run, self.engine, self.model_cfg)
        self.flops_per_token = train_flops_per_token(build_model(self.model_cfg, device="meta"), cfg.data.seq_len)
        self.peak = cfg.logging.peak_tflops * 1e12 or device_peak_flops(self.device, t.dtype)
        self.session.resume()
        self.session.open_logger(t.steps)
        self.stop_signal = 0
        self.last_step = t.exit_at_step or t.steps
        self.tools = self.session.open_tools()

    # -- setup -------------------------------------------------------------------------------------
    def _build_data(self) -> PretrainData:
        cfg, t = self.cfg, self.cfg.train
        # every rank builds it (megatron's builder synchronises); rank 0 tokenizes the embedded corpus
        return PretrainData(cfg.data, seed=t.seed, train_samples=self.total_samples,
                            valid_samples=max(1, t.eval_batches) * t.global_batch_size,
                            dp_rank=self.dp_rank, dp_size=self.mesh.dims.dp)

    def _build_engine(self):
        """This rank's engine: the whole model (pp = 1) or its pipeline stages, seeded and sharded."""
        cfg, p, t = self.cfg, self.cfg.parallel, self.cfg.train
        if p.pp > 1:  # every micro-batch count the batch ramp reaches must suit the schedule
            m0 = t.micro_batch_size * self.mesh.dims.dp
            for gbs in ramp_batch_sizes(t.global_batch_size, t.batch_ramp):
                try:
                    check_microbatches(p.pp_schedule, p.pp, gbs // m0, p.vpp)
                except ValueError as e:
                    raise ConfigError(f"at a global batch of {gbs} sequences (train.batch_ramp = {t.batch_ramp}, "
                                      f"{gbs // m0} micro-batches per dp rank): {e}") from None
        return build_engine(build_model(self.model_cfg, device="meta"), self.mesh, micro_batch_size=t.micro_batch_size,
                            seq_len=cfg.data.seq_len, seed=t.seed, device=self.device, param_dtype=self.param_dtype,
                            fp8=self.fp8, recompute=p.recompute, schedule=p.pp_schedule,
                            n_microbatches=self.batch_size(0)[0], vpp=p.vpp, layer_split=p.layer_split or None,
                            overlap=p.overlap)

    # -- schedules ---------------------------------------------------------------------------------
    def batch_size(self, consumed: int) -> tuple[int, int]:
        """(micro-batches per dp rank, global batch) after `consumed` samples (the ramp's rule)."""
        t = self.cfg.train
        gbs = global_batch_size_at(consumed, t.global_batch_size, t.batch_ramp)
        return gbs // (t.micro_batch_size * self.mesh.dims.dp), gbs

    def progress(self) -> float:
        """The fraction of the run's tokens consumed before this step (the papers' schedules are in tokens)."""
        return self.session.consumed / self.total_samples

    def lr(self) -> float:
        t = self.cfg.train
        return lr_at(self.session.step, self.progress(), peak=t.lr, schedule=t.lr_schedule,
                     warmup_steps=t.warmup_steps, min_ratio=t.min_lr_ratio, milestones=t.lr_milestones,
                     factors=t.lr_factors)

    def mtp_lambda(self) -> float:
        pts = self.cfg.train.mtp_lambda
        return piecewise(self.progress(), pts) if pts else self.model_cfg.mtp_lambda

    def bias_gamma(self) -> float:
        pts = self.cfg.train.bias_gamma
        return piecewise(self.progress(), pts) if pts else self.model_cfg.bias_update_gamma

    # -- one step ----------------------------------------------------------------------------------
    def forward_backward(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Gradients of the mean micro-batch loss over the global batch; the loss terms, averaged
        the same way, identical on every rank."""
        return self.engine.step(tokens, labels)

    @torch.no_grad()
    def expert_stats(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Every MoE layer's token load of this step (already summed over the stage's ranks) and routing
        bias, keyed by global layer index (MTP layers after the decoder's), gathered over pp."""
        loads, biases = {}, {}
        for m in self.engine.stages:
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
        comm.all_reduce(table, self.mesh["pp"])  # each layer lives on one pp rank (a no-op at pp = 1)
        table = table.cpu()
        bias = {i: table[1, r] for r, i in enumerate(layers)} if self.model_cfg.aux_free_bias else {}
        return {i: table[0, r] for r, i in enumerate(layers)}, bias

    # model hooks read here (mtp_lambda, update_expert_bias): parallel/protocols.py
    def train_step(self) -> dict[str, float]:
        t, s = self.cfg.train, self.session
        torch.manual_seed(t.seed * 1_000_003 + s.step)  # step-keyed randomness: resume is exact
        n_micro, gbs = self.batch_size(s.consumed)
        tokens, labels = self.data.global_batch(s.consumed, gbs)
        tokens, labels = tokens.to(self.device), labels.to(self.device)
        lr, lam, gamma = self.lr(), self.mtp_lambda(), self.bias_gamma()
        for m in self.engine.stages:
            m.mtp_lambda = lam
        t0 = time.perf_counter()
        metrics = self.forward_backward(tokens, labels)
        grad_norm, finite = s.guarded_step(lr, metrics["loss"])
        logged = not finite or (s.step + 1) % self.cfg.logging.every == 0 or s.step + 1 == self.last_step
        loads, bias = self.expert_stats() if logged and self.model_cfg.is_moe else ({}, {})
        self.engine.update_expert_bias(gamma if finite else 0.0)  # skipped: gamma 0 only resets the load counts
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        s.consumed += gbs
        s.step += 1
        tokens_per_s = gbs * self.cfg.data.seq_len / dt
        metrics.update(lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s, step_time=dt,
                       mfu=mfu(tokens_per_s, self.flops_per_token, self.world, self.peak) if self.peak else 0.0,
                       global_batch_size=gbs, consumed_samples=s.consumed,
                       skipped_steps=s.skipped)
        metrics.update(memory_stats(self.device))
        if logged:
            metrics.update(self.peak_rss_by_rank())
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

    def peak_rss_by_rank(self) -> dict[str, float]:
        """Every rank's peak resident memory (one all-reduce of a number per rank, at logged steps)."""
        every = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        every[self.rank] = peak_rss_gib()
        dist.all_reduce(every)
        return rss_by_rank(every.tolist())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        t = self.cfg.train
        totals: dict[str, float] = {}
        for tokens, labels in self.data.valid_batches(t.eval_batches, t.global_batch_size):
            out = self.engine.evaluate(tokens.to(self.device), labels.to(self.device))
            for k in ("lm_loss", "mtp_loss"):
                if k in out:
                    totals[f"val_{k}"] = totals.get(f"val_{k}", 0.0) + out[k] / t.eval_batches
        return totals

    # -- the run -----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without saving
        self.stop_signal = signum
        if signum == signal.SIGINT and self.rank == 0:
            try:  # os.write: a print here could re-enter one in progress
                os.write(sys.stderr.fileno(), b"\nCtrl-C: finishing this step, then saving and stopping "
                                              b"(Ctrl-C again stops at once, without saving)\n")
            except (OSError, ValueError, AttributeError):
                pass

    def _stop_requested(self) -> bool:
        """Every rank must agree (a signal may reach only some of them)."""
        flag = torch.tensor([float(self.stop_signal)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run(self) -> int:
        # the caller's handlers come back when the run ends (a library caller's Ctrl-C, say)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _run(self) -> int:
        cfg, t, c, s = self.cfg, self.cfg.train, self.cfg.checkpoint, self.session
        last = self.last_step
        if self.rank == 0:
            counts = self.model_cfg.param_counts()
            print(f"{self.model_cfg.name}: {counts['total']:,} parameters ({counts['active']:,} active), "
                  f"{self.world} ranks {self.mesh.dims}, run dir {self.run_dir}", flush=True)
        try:
            if t.eval_every and s.step == 0:
                s.log(self.evaluate())
            while s.step < last:
                with self.tools.step(s.step + 1):  # watchdog, profiler window, memory history (pretrain.operate)
                    metrics = self.train_step()
                if t.eval_every and s.step % t.eval_every == 0:
                    metrics.update(self.evaluate())
                if s.step % cfg.logging.every == 0 or s.step == last or "skipped" in metrics:
                    images = None
                    if self._last_loads and s.step % (10 * cfg.logging.every) == 0:
                        images = {"expert_load": load_heatmap(self._last_loads)}
                    s.log(metrics, images=images)
                s.check_nonfinite()
                if self._stop_requested():
                    s.save()
                    if self.rank == 0:
                        how = signal.Signals(self.stop_signal).name if self.stop_signal else "on another rank"
                        print(f"stopped by signal {how} at step {s.step}; resume with checkpoint.resume=auto",
                              flush=True)
                    return 0
                if s.step == last or (c.every and s.step % c.every == 0):
                    s.save()
            return 0
        finally:
            s.close()  # the tools too
            if self.rank == 0:
                print(f"metrics: {self.run_dir / 'metrics.jsonl'}; checkpoints: {self.ckpt_dir}"
                      + (f"; W&B: {s.logger.wandb_dir}" if s.logger.wandb_dir else ""), flush=True)


def train(cfg: Config) -> int:
    owns_group = not dist.is_initialized()
    try:
        return Trainer(cfg).run()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
