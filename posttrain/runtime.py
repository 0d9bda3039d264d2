"""What every post-training stage shares, from pretraining's pieces: the process group and mesh, the
policy (built on meta, parallelised, initialised, then loaded from `init.checkpoint`), frozen copies
(the reference of GRPO and DPO), AdamW with clipping and the non-finite guard, the LR schedule,
checkpoints with exact resume, and the metrics logger (metrics.jsonl + W&B). `parallel.recompute` and
`train.fp8` apply as in pretraining; `Runtime(cfg, stage, train=False)` (a stage that only samples) builds
no optimizer.

Post-training runs with pp = 1: tp (+sp), ep and FSDP2 dp apply unchanged (the config check says why).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from model import build_model
from parallel import apply_recompute, clip_grad_norm_, init_parallel_weights, parallelize
from parallel import comm
from parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, sharded_state
from pretrain.config import ConfigError
from pretrain.metrics import MetricsLogger
from pretrain.optim import AdamW, param_groups
from pretrain.schedules import check_lr_schedule, lr_at
from pretrain.tokenizer import load_tokenizer
from pretrain.train import DTYPES, NonFiniteError, fp8_recipe, open_run

from .config import PosttrainConfig


class StageError(RuntimeError):
    """A stage stopped on purpose (a guard fired); the message says why and what to change."""


def stage_main(stage, argv: list[str] | None = None) -> int:
    """`python -m posttrain.<stage> --config FILE [key=value ...]` for a stage class taking a config."""
    import argparse

    from .config import load_config
    name = stage.__module__.rsplit(".", 1)[-1]
    ap = argparse.ArgumentParser(prog=f"python -m posttrain.{name}", description=(stage.__doc__ or "").split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (sections of posttrain.config)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. grpo.beta=0.04")
    args = ap.parse_args(argv)
    return guarded(lambda: stage(load_config(args.config, args.overrides)).run())


def guarded(run) -> int:
    """run()'s exit code; a bad config or a guard that fired prints one `error:` line and exits 2, and the
    process group is torn down either way."""
    import sys
    try:
        return run()
    except (ConfigError, StageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Runtime:
    def __init__(self, cfg: PosttrainConfig, stage: str, *, train: bool = True):
        """train=False: a stage that only samples (rejection sampling): the policy is frozen like a reference
        and there is no optimizer (no AdamW moments), so optimizer_step and save refuse."""
        self.cfg, self.stage = cfg, stage
        t = cfg.train
        self.device, self.run_dir, self.ckpt_dir, self.mesh = open_run(cfg, pp=1)
        self.rank = dist.get_rank()
        try:
            check_lr_schedule(t.lr_schedule, t.warmup_steps, t.steps, t.min_lr_ratio, t.lr_milestones, t.lr_factors)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.dims = self.mesh.dims
        self.dp_rank = self.dims.coords(self.mesh.rank)["dp"]
        self.model_cfg = cfg.model_config()
        if not cfg.init.tokenizer:
            raise ConfigError("init.tokenizer is empty: name the tokenizer file (.model or tokenizer.json) the "
                              "model was trained with")
        try:
            self.tokenizer = load_tokenizer(cfg.init.tokenizer)
        except (OSError, ValueError) as e:
            raise ConfigError(f"init.tokenizer = {cfg.init.tokenizer}: {e}") from None
        if self.tokenizer.vocab_size > self.model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                              f"{self.model_cfg.vocab_size}; set model.vocab_size={self.tokenizer.vocab_size} (or more)")
        self.param_dtype = DTYPES[t.dtype]
        self.fp8 = fp8_recipe(t, self.device)
        self.policy = self.build(trainable=train)
        self.opt: AdamW | None = None
        if train:
            self.opt = AdamW(param_groups(list(self.policy.named_parameters()), t.weight_decay), lr=t.lr,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay,
                             moment_dtype=torch.bfloat16 if t.moment_dtype == "bf16" else torch.float32)
            # every parameter's moments exist from the start: a stage may never touch some (GRPO leaves the MTP
            # modules alone), and a checkpoint must hold the same keys whenever it is written
            self.opt.init_state()
        self.step, self.nonfinite_streak, self.skipped = 0, 0, 0
        self.total_steps = t.steps      # the stage may derive its own (SFT: data.epochs)
        self.extra_state: dict = {}
        self.logger: MetricsLogger | None = None

    # -- models ------------------------------------------------------------------------------------
    def build(self, trainable: bool):
        """A parallelised model with the starting weights (init.checkpoint, else the seeded init), on the FP8
        backend when train.fp8 = blockwise; a trainable one recomputes as parallel.recompute says."""
        meta = build_model(self.model_cfg, device="meta").train()
        recompute = self.cfg.parallel.recompute
        if trainable and recompute != "none":   # a frozen model never runs backward: recompute would only cost time
            apply_recompute(meta, recompute)
        net = parallelize(meta, self.mesh, param_dtype=self.param_dtype, fp8=self.fp8)
        init_parallel_weights(net, self.mesh, self.cfg.train.seed, self.device)
        if self.cfg.init.checkpoint:
            model_only = {k: v for k, v in sharded_state(net, self.mesh).items() if k.startswith("model/")}
            try:
                load_checkpoint(self.cfg.init.checkpoint, model_only, model_config=self.model_cfg.to_dict())
            except (OSError, ValueError) as e:
                raise ConfigError(f"init.checkpoint = {self.cfg.init.checkpoint}: {e}") from None
        if not trainable:
            net.eval()
            for q in net.parameters():
                q.requires_grad_(False)
        return net

    @torch.no_grad()
    def copy_weights(self, dst, src) -> None:
        """dst's parameters := src's (the same layout, so shard by shard)."""
        for a, b in zip(dst.parameters(), src.parameters()):
            a.copy_(b)

    # -- optimisation ------------------------------------------------------------------------------
    def lr(self) -> float:
        t = self.cfg.train
        return lr_at(self.step, self.step / max(self.total_steps, 1), peak=t.lr, schedule=t.lr_schedule,
                     warmup_steps=t.warmup_steps, min_ratio=t.min_lr_ratio, milestones=t.lr_milestones,
                     factors=t.lr_factors)

    def _need_optimizer(self, what: str) -> None:
        if self.opt is None:
            raise RuntimeError(f"{what} needs an optimizer, but the {self.stage} stage built its Runtime with "
                               "train=False (sampling only); build it with train=True to train or checkpoint")

    def optimizer_step(self, loss_value: float) -> dict[str, float]:
        """Clip, then step unless the loss or the norm is non-finite (then skip; too many in a row stop
        the run). Gradients must already be synchronised (finish_grad_sync)."""
        self._need_optimizer("Runtime.optimizer_step")
        lr = self.lr()
        for g in self.opt.param_groups:
            g["lr"] = lr
        norm = float(clip_grad_norm_(self.policy, self.cfg.train.grad_clip, self.mesh))
        finite = math.isfinite(loss_value) and math.isfinite(norm)
        if finite:
            self.opt.step()
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1
            self.skipped += 1
        self.opt.zero_grad(set_to_none=True)
        if self.nonfinite_streak > self.cfg.train.max_nonfinite:
            raise NonFiniteError(f"{self.nonfinite_streak} non-finite steps in a row (train.max_nonfinite = "
                                 f"{self.cfg.train.max_nonfinite}); the last good checkpoint is in {self.ckpt_dir}: "
                                 "lower train.lr, then resume from it")
        return {"lr": lr, "grad_norm": norm, "skipped_steps": float(self.skipped)}

    def all_sum(self, values: list[float], group: str = "dp") -> list[float]:
        """Sum of per-rank numbers over a group (counts, totals for normalisers and metrics)."""
        vec = torch.tensor(values, dtype=torch.float64, device=self.device)
        comm.all_reduce(vec, self.mesh[group])
        return vec.tolist()

    def gather_dp(self, obj) -> list | None:
        """Every dp rank's `obj`, in dp-rank order, on global rank 0 (None elsewhere). tp ranks hold copies,
        so only tp rank 0 of each dp group takes part."""
        if self.dims.coords(self.rank)["tp"] != 0:
            return None
        group = self.mesh["dp"].pg
        if group is None:
            return [obj]
        parts = [None] * self.dims.dp if self.rank == 0 else None
        dist.gather_object(obj, parts, dst=0, group=group)
        return parts

    # -- checkpoints and logging -------------------------------------------------------------------
    def _state(self, models) -> dict:
        return sharded_state(models, self.mesh, self.opt)

    def resume(self, extra_models=()) -> None:
        """Load the latest checkpoint of this run (checkpoint.resume=auto) into the policy, the optimizer and
        `extra_models` (e.g. GRPO's reference); sets self.step and self.extra_state (iterator positions).
        Opens the metrics logger either way (a train=False Runtime calls it for that alone)."""
        c = self.cfg.checkpoint
        if c.resume != "none":
            path = latest_checkpoint(self.ckpt_dir) if c.resume == "auto" else Path(c.resume)
            if path is not None:
                if self.opt is None:   # sampling only: no run state to restore (init.checkpoint loads weights)
                    raise ConfigError(f"checkpoint.resume = {c.resume} names {path}, but the {self.stage} stage does "
                                      "not train and restores no run state; set checkpoint.resume=none and load "
                                      "weights with init.checkpoint")
                state = self._state([self.policy])
                for i, m in enumerate(extra_models):
                    state.update({f"extra{i}/{k}": v for k, v in sharded_state(m, self.mesh).items()
                                  if k.startswith("model/")})
                meta = load_checkpoint(path, state, model_config=self.model_cfg.to_dict())
                self.step, self.skipped = meta["step"], meta.get("skipped_steps", 0)
                self.opt.step_count = meta["optimizer_steps"]
                self.extra_state = meta.get("stage_state", {})
                if self.rank == 0:
                    print(f"resumed from {path} at step {self.step}", flush=True)
        lg = self.cfg.logging
        self.logger = MetricsLogger(self.run_dir, rank=self.rank, wandb_mode=lg.wandb, project=lg.wandb_project,
                                    entity=lg.wandb_entity, name=lg.wandb_name or self.run_dir.name,
                                    tags=[self.stage, *lg.wandb_tags], config=self.cfg.to_dict(),
                                    resume_step=self.step if self.step else None, total_steps=self.total_steps)

    def save(self, stage_state: dict, extra_models=()) -> None:
        self._need_optimizer("Runtime.save")
        t0 = time.perf_counter()
        state = self._state([self.policy])
        for i, m in enumerate(extra_models):
            state.update({f"extra{i}/{k}": v for k, v in sharded_state(m, self.mesh).items() if k.startswith("model/")})
        meta = {"step": self.step, "consumed_samples": 0, "optimizer_steps": self.opt.step_count,
                "skipped_steps": self.skipped, "stage": self.stage, "stage_state": stage_state,
                "model_config": self.model_cfg.to_dict(), "parallel": asdict(self.dims), "config": self.cfg.to_dict()}
        path = save_checkpoint(self.ckpt_dir, self.step, state, meta, keep=self.cfg.checkpoint.keep)
        if self.rank == 0:
            print(f"checkpoint step {self.step} -> {path} ({time.perf_counter() - t0:.2f} s)", flush=True)

    def log(self, metrics: dict) -> None:
        self.logger.log(self.step, metrics)

    def end_step(self, metrics: dict, last: int, evaluate, stage_state: dict) -> None:
        """After a step of a stage that trains on a fixed data pass (SFT, DPO): evaluate every eval.every
        steps, log every logging.every steps and at `last`, checkpoint every checkpoint.every and at `last`."""
        c = self.cfg
        if c.eval.every and self.step % c.eval.every == 0:
            metrics.update(evaluate())
        if self.step % c.logging.every == 0 or self.step == last:
            self.log(metrics)
        if self.step == last or (c.checkpoint.every and self.step % c.checkpoint.every == 0):
            self.save(stage_state)

    def train_loop(self, last: int, step, evaluate, stage_state) -> int:
        """The loop of a stage that trains on a fixed data pass (SFT, DPO), top to bottom: evaluate at step
        0, then `step()` (one optimizer step; returns its metrics and per-step counts to turn into rates,
        e.g. {"tokens_per_s": n}) and end_step until `last`; the logger and async saves close either way."""
        try:
            if self.cfg.eval.every and self.step == 0:
                self.log(evaluate())
            while self.step < last:
                t0 = time.perf_counter()
                metrics, counts = step()
                self.step += 1
                dt = time.perf_counter() - t0
                metrics.update(step_time=dt, **{k: n / dt for k, n in counts.items()})
                self.end_step(metrics, last, evaluate, stage_state())
            return 0
        finally:
            self.close()

    def close(self) -> None:
        from parallel.checkpoint import finalize_pending
        finalize_pending()
        if self.logger is not None:
            self.logger.close()
