"""What every post-training stage shares: a `StageSession`, pretraining's `Session` (AdamW with clipping
and the non-finite guard, checkpoints with exact resume, the metrics logger) around the stage's policy,
plus the tokenizer, frozen copies (the reference of GRPO and DPO), the stage's LR schedule, the end of
a step and the loop of a stage that trains on a fixed data pass. The policy is built as pretraining
builds its model (meta, parallelised, initialised, then loaded from `init.checkpoint`);
`parallel.recompute` and `train.fp8` apply as there. `StageSession(cfg, stage, train=False)` (a
stage that only samples) builds no optimizer.

SFT (and distillation, which is SFT) and DPO train under the full pretraining layout, pp > 1 included: SFT's
step is pretraining's (`engine.step(tokens, labels, doc_ids)`), DPO's runs its objective on the last stage
(`engine.step(..., objective=)`) and scores through the engine (`engine.score`). The stages that sample
(GRPO, rejection) run with pp = 1 (`PIPELINED` says which may not): tp (+sp), ep and FSDP2 dp apply unchanged.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from model import build_model
from parallel import all_sum, build_engine
from pretrain.config import ConfigError
from pretrain.schedules import check_lr_schedule, lr_at
from pretrain.session import DTYPES, Run, Session, fp8_recipe, load_init_weights, open_run
from pretrain.tokenizer import load_tokenizer

from .config import PosttrainConfig


# the stages that train under pp > 1: SFT's step is pretraining's (distillation's student is an sft stage); DPO's
# objective runs on the last stage (engine.step(objective=)), its reference scores through the pipeline
PIPELINED = ("sft", "dpo", "grpo")


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
    """run()'s exit code; a user's mistake (posttrain.config.user_errors(): config, data, checkpoint and path
    errors) or a guard that fired prints one `error:` line, on rank 0 only, and exits 2; the process group is
    torn down either way."""
    from pretrain.config import print_error

    from .config import user_errors
    try:
        return run()
    except (*user_errors(), StageError) as e:
        print_error(e)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _build(cfg: PosttrainConfig, model_cfg, run: Run, trainable: bool, rows_per_item: int = 1,
           items: tuple[int, str] | None = None):
    """The engine (a SingleStage, or at pp > 1 this rank's pipeline stages under parallel.pp_schedule) with
    the starting weights (init.checkpoint, else the seeded init), on the FP8 backend when train.fp8 =
    blockwise; a trainable one recomputes as parallel.recompute says, a frozen one is in eval mode without
    gradients. A micro-batch is train.micro_batch_size items of `rows_per_item` rows (DPO's pairs: 2); a
    step trains on `items` = (count over all dp ranks, the key that sets it), train.global_batch_size unless
    the stage says (GRPO: its rollout batch)."""
    t, p = cfg.train, cfg.parallel
    mbs = t.micro_batch_size * rows_per_item
    # a frozen model never runs backward: recompute would only cost time
    recompute = p.recompute if trainable else "none"
    pipeline = {}
    if run.mesh.dims.pp > 1:   # every step brings (items per step) / dp items: that many micro-batches
        count, key = items or (t.global_batch_size, "train.global_batch_size")
        dp = run.mesh.dims.dp
        if count % (dp * t.micro_batch_size):
            raise ConfigError(f"{key} = {count} must be a multiple of train.micro_batch_size ({t.micro_batch_size}) x "
                              f"the data-parallel size ({dp}) under parallel.pp > 1 (whole micro-batches per rank)")
        n_micro = count // (dp * t.micro_batch_size)
        from parallel.pp_schedules import check_microbatches
        try:
            check_microbatches(p.pp_schedule, p.pp, n_micro, p.vpp)
        except ValueError as e:
            raise ConfigError(f"{key} = {count} gives {n_micro} micro-batches per dp rank: {e}") from None
        pipeline = dict(schedule=p.pp_schedule, n_microbatches=n_micro, vpp=p.vpp, layer_split=p.layer_split or None)
    try:
        engine = build_engine(build_model(model_cfg, device="meta").train(), run.mesh,
                              micro_batch_size=mbs, seq_len=cfg.data.seq_len, seed=t.seed,
                              device=run.device, param_dtype=DTYPES[t.dtype], fp8=fp8_recipe(t, run.device),
                              recompute=recompute, **pipeline)
    except ValueError as e:   # layout constraints (the pipeline's cut, the schedule); their messages name the keys
        raise ConfigError(str(e)) from None
    if cfg.init.checkpoint:   # the loader pretraining's init.checkpoint uses; here the model config must match exactly
        load_init_weights(engine.stages, run.mesh, cfg.init.checkpoint, model_cfg)
    if not trainable:
        for net in engine.stages:
            net.eval()
            for q in net.parameters():
                q.requires_grad_(False)
    return engine


class StageSession(Session):
    """A post-training stage's session: `policy` (the engine's model), `tokenizer`, `dims`, `dp_rank`;
    `step`, `stage_state` (what the stage keeps across a resume) and the rest of `Session`."""

    def __init__(self, cfg: PosttrainConfig, stage: str, *, train: bool = True, rows_per_item: int = 1,
                 items: tuple[int, str] | None = None):
        """train=False: a stage that only samples (rejection sampling): the policy is frozen like a reference
        and there is no optimizer (no AdamW moments), so optimizer_step and save refuse. rows_per_item: the
        rows of one train.micro_batch_size item (DPO's pair: 2), which the engine's micro-batches hold; items:
        (items per step over all dp ranks, its key) when not train.global_batch_size (GRPO's rollout batch)."""
        t = cfg.train
        if cfg.parallel.pp != 1 and stage not in PIPELINED:
            raise ConfigError(f"the {stage} stage runs with parallel.pp = 1 (tp, ep, sp and FSDP2 dp apply): it "
                              "samples whole sequences on one model, which a pipeline would serialise; set "
                              f"parallel.pp=1 (only {' and '.join(PIPELINED)} train under pp > 1)")
        self._run = run = open_run(cfg, train=train)   # train=False writes no checkpoints: none checked
        try:
            check_lr_schedule(t.lr_schedule, t.warmup_steps, t.steps, t.min_lr_ratio, t.lr_milestones, t.lr_factors)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model_cfg = cfg.model_config()
        if not cfg.init.tokenizer:
            raise ConfigError("init.tokenizer is empty: name the tokenizer file (.model or tokenizer.json) the "
                              "model was trained with")
        try:
            self.tokenizer = load_tokenizer(cfg.init.tokenizer)
        except (OSError, ValueError) as e:
            raise ConfigError(f"init.tokenizer = {cfg.init.tokenizer}: {e}") from None
        if self.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                              f"{model_cfg.vocab_size}; set model.vocab_size={self.tokenizer.vocab_size} (or more)")
        self.rows_per_item, self.items = rows_per_item, items
        super().__init__(cfg, run, _build(cfg, model_cfg, run, train, rows_per_item, items), model_cfg, train=train,
                         stage=stage)
        self.policy = self.engine.stages[0]   # the whole model at pp = 1 (the stages that score and sample)
        self.dims = self.mesh.dims
        self.dp_rank = self.dims.coords(self.mesh.rank)["dp"]
        self.total_steps = t.steps      # the stage may derive its own (SFT: data.epochs)

    # -- models ------------------------------------------------------------------------------------
    def build(self, trainable: bool):
        """Another copy of the starting model in the policy's layout (trainable=False: a frozen reference),
        whole (pp = 1)."""
        return self.build_engine(trainable).stages[0]

    def build_engine(self, trainable: bool):
        """Another copy of the starting model in the policy's layout, as an engine (its `score` runs any
        layout, pp > 1 included)."""
        return _build(self.cfg, self.model_cfg, self._run, trainable, self.rows_per_item, self.items)

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

    def optimizer_step(self, loss_value: float, apart: str = "") -> dict[str, float]:
        """Clip, then step unless the loss or the norm is non-finite (then skip; too many in a row stop
        the run). Gradients must already be synchronised (finish_grad_sync). `apart`: a parameter-name
        prefix clipped as its own group, its norm logged as `grad_norm_<prefix>`."""
        lr = self.lr()
        norm, _ = self.guarded_step(lr, loss_value, apart)
        self.check_nonfinite()
        out = {"lr": lr, "grad_norm": norm, "skipped_steps": float(self.skipped)}
        if apart:
            out[f"grad_norm_{apart.rstrip('.')}"] = self.apart_norm
        return out

    def all_sum(self, values: dict[str, float], group: str = "dp") -> dict[str, float]:
        """Each named per-rank number summed over a group (counts, totals for normalisers and metrics)."""
        return all_sum(values, self.mesh[group], self.mesh.device_type)

    def gather_dp(self, obj) -> list | None:
        """Every dp rank's `obj`, in dp-rank order, on global rank 0 (None elsewhere). tp ranks and pipeline
        stages hold copies, so only the dp group of global rank 0 (tp rank 0, pp rank 0) takes part."""
        if self.dims.coords(self.rank)["tp"] != 0 or self.dims.coords(self.rank)["pp"] != 0:
            return None
        group = self.mesh["dp"].pg
        if group is None:
            return [obj]
        parts = [None] * self.dims.dp if self.rank == 0 else None
        dist.gather_object(obj, parts, dst=0, group=group)
        return parts

    # -- checkpoints, logging and the loop ---------------------------------------------------------
    def resume(self, extra_models=()) -> None:
        """Load the latest checkpoint of this run (checkpoint.resume=auto) into the policy, the optimizer and
        `extra_models` (e.g. GRPO's reference); sets step and stage_state (iterator positions). Opens the
        metrics logger either way (a train=False session calls it for that alone)."""
        super().resume(extra_models)
        self.open_logger(self.total_steps)

    def end_step(self, metrics: dict, last: int, evaluate, stage_state: dict, extra_models=()) -> None:
        """After a step: evaluate every eval.every steps, log every logging.every steps and at `last`,
        checkpoint (with `extra_models`) every checkpoint.every steps and at `last`."""
        c = self.cfg
        if c.eval.every and self.step % c.eval.every == 0:
            metrics.update(evaluate())
        if self.step % c.logging.every == 0 or self.step == last:
            self.log(metrics)
        if self.step == last or (c.checkpoint.every and self.step % c.checkpoint.every == 0):
            self.save(stage_state, extra_models)

    def train_loop(self, last: int, step, evaluate, stage_state) -> int:
        """The loop of a stage that trains on a fixed data pass (SFT, DPO), top to bottom: evaluate at step
        0, then `step()` (one optimizer step; returns its metrics and per-step counts to turn into rates,
        e.g. {"tokens_per_s": n}) and end_step until `last`; the logger and async saves close either way."""
        try:
            tools = self.open_tools()
            if self.cfg.eval.every and self.step == 0:
                self.log(evaluate())
            while self.step < last:
                t0 = time.perf_counter()
                with tools.step(self.step + 1):  # watchdog, profiler window, memory history (pretrain.operate)
                    metrics, counts = step()
                self.step += 1
                dt = time.perf_counter() - t0
                metrics.update(step_time=dt, **{k: n / dt for k, n in counts.items()})
                self.end_step(metrics, last, evaluate, stage_state())
            return 0
        finally:
            self.close()
