"""What every training job shares, pretraining and each post-training stage alike: joining the
process group, the run directory and the mesh (`open_run`), the FP8 recipe, and a `Session`, the
job's state around its engine (`parallel.engine`):

    run = open_run(cfg)                              # process group, storage checks, RUN_DIR/config.yaml, mesh
    engine = build_engine(build_model(mcfg, device="meta"), run.mesh, ...)
    session = Session(cfg, run, engine, mcfg)        # AdamW (+ the CPU EMA) over the engine's parameters
    session.resume(); session.open_logger(total_steps)   # this run's checkpoint, else init.checkpoint's weights
    while ...:
        metrics = engine.step(tokens, labels)
        norm, finite = session.guarded_step(lr, metrics["loss"])   # clip; AdamW, or skip a non-finite step
        session.step += 1; session.log(metrics); session.check_nonfinite(); session.save()
    session.close()
"""
from __future__ import annotations

import itertools
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import LayoutError, Mesh, ParallelConfig, build_mesh
from parallel.checkpoint import (LATEST_FILE, META_FILE, AsyncCheckpoint, CheckpointError, finalize_pending,
                                 latest_checkpoint, load_checkpoint, read_meta, save_checkpoint, sharded_state)
from parallel.fp8 import Fp8Error, Fp8Recipe, get_backend

from .config import ConfigError, save_config
from .metrics import MetricsLogger
from .operate import FR_DIR, RunTools, flight_recorder_env
from .optim import EMA, AdamW, param_groups

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is kept."""


# -- process setup ---------------------------------------------------------------------------------
def init_distributed(device_pref: str = "auto", env: dict[str, str | None] | None = None) -> torch.device:
    """Join the torchrun job when there is one (env RANK/WORLD_SIZE); NCCL on CUDA, gloo on CPU. `env`: set
    into os.environ first (None: unset), since torch reads it when the process group is created (the flight
    recorder's settings, pretrain.operate.flight_recorder_env)."""
    for key, value in (env or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
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


@dataclass
class Run:
    """Where a job runs and what it writes to: RUN_DIR holds config.yaml and metrics.jsonl."""

    device: torch.device
    run_dir: Path
    ckpt_dir: Path
    mesh: Mesh


_DECISIONS = itertools.count()  # one key per decision; every rank makes the same decisions in the same order


def decided_on_rank0(decide, what: str):
    """decide()'s value, computed on rank 0 alone and the same on every rank: for checks that read shared
    storage once and that every rank must act on alike. A ConfigError on rank 0 is raised on every rank; any
    other exception is re-raised on rank 0 and named in a ConfigError on the others, so no rank is left
    waiting in a collective."""
    box, failure = [None], None
    if dist.get_rank() == 0:
        try:
            box[0] = (True, decide())
        except ConfigError as e:
            box[0] = (False, str(e))
        except Exception as e:
            box[0], failure = (False, f"rank 0 failed {what}: {type(e).__name__}: {e}"), e
    if dist.get_world_size() > 1:
        box[0] = _share_from_rank0(box[0])
    if failure is not None:
        raise failure
    ok, value = box[0]
    if not ok:
        raise ConfigError(value)
    return value


def _share_from_rank0(value):
    """value, as rank 0 has it, on every rank, through the job's store rather than a gloo collective: a
    refusal ends the process right after this, and a process that exits right after a gloo collective can
    abort (SIGABRT, "terminate called without an active exception") while gloo's worker thread still frees
    that collective's work. Rank 0 waits for every rank's acknowledgement, so it never takes the store down
    (it hosts it outside torchrun) before a rank has read."""
    store, rank, world = dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size()
    key = f"whaletron/decided/{next(_DECISIONS)}"
    if rank == 0:
        store.set(key, pickle.dumps(value))
        store.wait([f"{key}/read/{r}" for r in range(1, world)])
        return value
    value = pickle.loads(store.get(key))
    store.set(f"{key}/read/{rank}", b"1")
    return value


def join_job(cfg) -> torch.device:
    """init_distributed for a config: its device, and the flight recorder's settings (logging.flight_recorder)
    in place before the process group exists. Every entry point joins the job through here."""
    return init_distributed(cfg.train.device,
                            env=flight_recorder_env(cfg.logging.flight_recorder, Path(cfg.logging.run_dir)))


def open_run(cfg, pp: int | None = None, *, train: bool = True) -> Run:
    """What every training job does first: join the process group, check its storage (`check_storage`,
    rank 0 decides and every rank raises the same ConfigError), create the run directory with the
    resolved config, and build the mesh (pp overrides parallel.pp). train=False: a job that writes no
    checkpoints (sampling only), whose checkpoint directory is neither checked nor created."""
    p = cfg.parallel
    run_dir = Path(cfg.logging.run_dir)
    ckpt_dir = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    device = join_job(cfg)

    def prepare() -> None:  # everything rank 0 writes before the mesh, so that any failure is one agreed answer
        problem = check_storage(cfg, run_dir, ckpt_dir, train=train)
        if problem is not None:
            raise ConfigError(problem)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    decided_on_rank0(prepare, f"preparing {run_dir}")
    if cfg.logging.flight_recorder and device.type == "cuda":  # where NCCL dumps on a collective timeout
        (run_dir / FR_DIR).mkdir(parents=True, exist_ok=True)
    try:
        mesh = build_mesh(ParallelConfig(tp=p.tp, pp=p.pp if pp is None else pp, dp=p.dp, ep=p.ep, sp=p.sp,
                                         node_size=p.node_size, zero=p.zero, cp=getattr(p, "cp", 1)), device.type)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    return Run(device, run_dir, ckpt_dir, mesh)


# -- storage, checked before anything is built -----------------------------------------------------------
_CKPT_ENTRY = re.compile(r"step_\d+(\.partial)?")


def checkpoint_bytes(cfg, model_cfg) -> tuple[int, str]:
    """About what one checkpoint of this job holds, and how that is counted: every parameter (MTP included)
    as fp32 weights, AdamW's two moments (fp32 or bf16, train.moment_dtype), the EMA's fp32 copy and, for
    GRPO with a KL term (grpo.beta > 0), the frozen reference's weights."""
    t = cfg.train
    n = model_cfg.param_counts(include_mtp=True)["total"]
    moments = 2 * (2 if t.moment_dtype == "bf16" else 4)
    reference = getattr(getattr(cfg, "grpo", None), "beta", 0) > 0  # GRPO saves its KL reference beside the policy
    per = 4 + moments + (4 if t.ema_decay > 0 else 0) + (4 if reference else 0)
    how = f"{n:,} parameters x {per} bytes (fp32 weights, {t.moment_dtype} AdamW moments" + \
        (", fp32 EMA" if t.ema_decay > 0 else "") + (", the GRPO reference's fp32 weights" if reference else "") + ")"
    return n * per, how


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:,.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:,.1f} {unit}"


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _writable(d: Path, key: str, way_out: str) -> str | None:
    """None when `d` can be created and written (a probe file is written and removed); else why not."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as f:  # no fsync: on a busy filesystem it can take many seconds
            f.write(b"whaletron")
        probe.unlink()
    except OSError as e:
        return f"{key} = {d} is not writable ({e.strerror or e}{': ' + e.filename if e.filename else ''}); {way_out}"
    return None


def check_storage(cfg, run_dir: Path, ckpt_dir: Path, *, train: bool = True) -> str | None:
    """Rank 0's checks before a job writes anything; the reason to refuse it (one line naming the path and
    the way out), or None to go on. A job that trains (writes checkpoints):
    - a fresh start (checkpoint.resume=none) where checkpoints of a run already are is refused: keep-K
      pruning would delete them at the first save and metrics.jsonl would mix two runs. With
      checkpoint.overwrite=true that run's checkpoints and metrics.jsonl are removed (and said so, once);
    - the checkpoint directory must be writable, and hold one more checkpoint (`checkpoint_bytes`) where
      shutil.disk_usage can tell.
    Every job: the run directory must be writable."""
    c = cfg.checkpoint
    where = "checkpoint.dir" if c.dir else "logging.run_dir"
    err = _writable(run_dir, "logging.run_dir", "choose a writable logging.run_dir")
    if err or not train:
        return err
    # only whether a run exists: reading every file would cost a checkpoint's size on rank 0 alone
    old = latest_checkpoint(ckpt_dir, verify=False) if c.resume == "none" else None
    if old is not None and not c.overwrite:
        return (f"{ckpt_dir} already holds the checkpoints of a run (latest {old.name}) and checkpoint.resume=none "
                f"would start a new one over them; set checkpoint.resume=auto to continue that run, a new {where} "
                f"to start elsewhere, or checkpoint.overwrite=true to replace it")
    err = _writable(ckpt_dir, "checkpoint.dir", f"point {where} at a writable directory")
    if err:
        return err
    doomed = sorted(d for d in ckpt_dir.iterdir() if _CKPT_ENTRY.fullmatch(d.name)) if old is not None else []
    try:
        free = shutil.disk_usage(ckpt_dir).free
    except OSError:
        free = None  # the filesystem cannot tell: go on
    if free is not None:
        need, how = checkpoint_bytes(cfg, cfg.model_config())
        freed = sum(_tree_bytes(d) for d in doomed)
        if need > free + freed:
            also = f" (+{_size(freed)} of the run it replaces)" if freed else ""
            return (f"{ckpt_dir}: a checkpoint of this run needs about {_size(need)} ({how}) but only {_size(free)}"
                    f"{also} is free there; free space, or point {where} at a larger volume")
    if old is not None:  # checkpoint.overwrite=true: replace that run, and say what goes
        print(f"checkpoint.overwrite=true: replacing the run in {ckpt_dir}: removing its {len(doomed)} checkpoint "
              f"director{'y' if len(doomed) == 1 else 'ies'} (latest {old.name}) and {run_dir / 'metrics.jsonl'}",
              flush=True)
        (ckpt_dir / LATEST_FILE).unlink(missing_ok=True)
        for d in doomed:  # renamed first: a crash midway never leaves a damaged directory that looks complete
            gone = d.with_name(f".{d.name}.replaced-{os.getpid()}")
            os.replace(d, gone)
            shutil.rmtree(gone)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return None


def fp8_recipe(t, device: torch.device) -> Fp8Recipe | None:
    """The FP8 recipe that train.fp8 asks for (V3 §3.3), its backend checked against this device up front."""
    if t.fp8 != "blockwise":
        return None
    try:
        get_backend(t.fp8_backend, device)
    except Fp8Error as e:
        raise ConfigError(f"train.fp8_backend = {t.fp8_backend}: {e}") from None
    return Fp8Recipe(t.fp8_backend)


# -- starting from a checkpoint's weights (init.checkpoint) --------------------------------------------
# YaRN's keys (V2 §3.1.4, V3 §4.3): an extension run switches them on over weights trained without them
ROPE_EXTENSION_KEYS = ("rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                       "max_seq_len")
# what shapes training but not the network a checkpoint's weights describe (balance losses, bias speed, MTP weight)
TRAINING_ONLY_KEYS = ("name", "init_std", "bias_update_gamma", "balance_alpha_expert", "balance_alpha_device",
                      "balance_alpha_comm", "balance_per_sequence", "capacity_factor", "drop_exempt_fraction",
                      "mtp_lambda")


def _init_meta(path) -> dict | None:
    """The meta.json of the checkpoint `path` names (a step directory, or a root's newest complete one), read
    without verifying any file (load_checkpoint verifies); None when there is none to read (then
    load_checkpoint says what is wrong with the path)."""
    p = Path(path)
    try:
        step = p if (p / META_FILE).is_file() else latest_checkpoint(p, verify=False)
        return read_meta(step) if step is not None else None
    except (CheckpointError, OSError):
        return None


def check_init_model(saved: dict, saved_seq_len: int | None, model_cfg, key: str = "init.checkpoint",
                     path="") -> None:
    """Whether a run's model may start from weights saved under the model config `saved` (a dict, as
    meta.json records it) that were trained at `saved_seq_len` tokens (the saved run's data.seq_len; None:
    unknown). The architecture must be the checkpoint's; the training-only keys may change; YaRN (V3 §4.3)
    may be switched on at load, the weights unchanged, when it describes them: its original_seq_len must be
    the length the weights were trained at (the checkpoint's original_seq_len when it already had YaRN), and
    a checkpoint trained with YaRN keeps it on. Otherwise a ConfigError naming the keys and the fix."""
    run = model_cfg.to_dict()
    where = f"{key} = {path}" if path else key
    free = set(ROPE_EXTENSION_KEYS) | set(TRAINING_ONLY_KEYS)
    arch = [k for k in sorted(set(saved) | set(run))
            if k not in free and saved.get(k, "<absent>") != run.get(k, "<absent>")]
    if "rope_theta" in arch:
        raise ConfigError(f"{where}: model.rope_theta = {run.get('rope_theta')!r}, but the checkpoint was trained with "
                          f"rope_theta {saved.get('rope_theta')!r}; YaRN extends the context by rescaling the "
                          f"checkpoint's own frequencies (model.rope_factor, V3 §4.3), a new base discards what its "
                          f"positions learned: set model.rope_theta={saved.get('rope_theta')!r}")
    if arch:
        lines = "; ".join(f"model.{k}: checkpoint {saved.get(k, '<absent>')!r}, this run {run.get(k, '<absent>')!r}"
                          for k in arch)
        fix = " ".join(f"model.{k}={saved[k]!r}" for k in arch if k in saved)
        raise ConfigError(f"{where} holds weights of another architecture ({lines}): its weights load only into the "
                          f"same network; set {fix} (only the YaRN keys {', '.join(ROPE_EXTENSION_KEYS)} and the "
                          f"training-only keys may differ), or start from random weights with {key}=""")
    had, has = float(saved.get("rope_factor", 1.0)) > 1, run["rope_factor"] > 1
    if had and not has:
        raise ConfigError(f"{where} was trained with YaRN (rope_factor {saved['rope_factor']}, original_seq_len "
                          f"{saved.get('original_seq_len')}), but model.rope_factor = {run['rope_factor']} switches it "
                          f"off, which changes every position's rotation under its weights: set "
                          f"model.rope_factor={saved['rope_factor']} and model.original_seq_len="
                          f"{saved.get('original_seq_len')}")
    if not has:
        return
    if had:
        want, why = int(saved.get("original_seq_len", 0)), "the checkpoint's own YaRN original_seq_len"
    elif saved_seq_len:
        want, why = int(saved_seq_len), "the sequence length it was trained at (its data.seq_len)"
    else:
        want, why = int(saved.get("max_seq_len", 0)), "its model.max_seq_len (its config records no data.seq_len)"
    if want and run["original_seq_len"] != want:
        raise ConfigError(f"{where}: model.original_seq_len = {run['original_seq_len']}, but YaRN's original length "
                          f"must be {want}, {why}: the frequencies it rescales (model.rope_factor = "
                          f"{run['rope_factor']}) are those the weights learned at that length (V3 §4.3); set "
                          f"model.original_seq_len={want}")


def load_init_weights(modules, mesh, path, model_cfg, *, key: str = "init.checkpoint", extension: bool = False) -> dict:
    """Load only the weights (model/*) of the checkpoint at `path` (a root: its newest that verifies; a step
    directory) into `modules` under this rank's layout (checkpoints reshard, DESIGN decision 4); returns its
    meta. extension=False: the model config must equal the saved one (post-training stages); True: it is checked
    by check_init_model, which lets a pretraining run switch YaRN on (V3 §4.3). Every rank calls it. Errors
    are ConfigErrors naming `key`."""
    if extension:
        meta = _init_meta(path)
        if meta is not None and isinstance(meta.get("model_config"), dict):
            seq = ((meta.get("config") or {}).get("data") or {}).get("seq_len")
            check_init_model(meta["model_config"], seq if isinstance(seq, int) else None, model_cfg, key, path)
    model_only = {k: v for k, v in sharded_state(modules, mesh).items() if k.startswith("model/")}
    try:
        return load_checkpoint(path, model_only, model_config=None if extension else model_cfg.to_dict())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key} = {path}: {e}") from None


def unique_parameters(models) -> list[tuple[str, torch.Tensor]]:
    """Parameters by name, each once (the V layouts hold the embedding twice on one rank)."""
    seen = {}
    for m in models:
        for n, q in m.named_parameters():
            seen.setdefault(n, q)
    return list(seen.items())


# -- the session -----------------------------------------------------------------------------------
class Session:
    """A training job's state around its engine: AdamW over the engine's parameters (and the CPU EMA,
    train.ema_decay > 0), the guarded optimizer step, the counters (step, consumed samples, skipped and
    non-finite steps), checkpoints with exact resume, and the metrics logger.

    train=False: a job that only samples; no optimizer, and guarded_step and save refuse. stage: a
    post-training stage's name, written into its checkpoints beside its `stage_state`."""

    def __init__(self, cfg, run: Run, engine, model_cfg, *, train: bool = True, stage: str | None = None):
        self.cfg, self.engine, self.model_cfg, self.stage = cfg, engine, model_cfg, stage
        self.device, self.run_dir, self.ckpt_dir, self.mesh = run.device, run.run_dir, run.ckpt_dir, run.mesh
        self.rank = dist.get_rank()
        t = cfg.train
        self.opt: AdamW | None = None
        self.ema: EMA | None = None
        if train:
            named = [(n, q) for m in engine.stages for n, q in m.named_parameters()]
            self.opt = AdamW(param_groups(named, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                             eps=t.adam_eps, weight_decay=t.weight_decay,
                             moment_dtype=torch.bfloat16 if t.moment_dtype == "bf16" else torch.float32)
            # every parameter's moments exist from the start: a job may never touch some (GRPO leaves the
            # MTP modules alone), and a checkpoint must hold the same keys whenever it is written
            self.opt.init_state()
            if t.ema_decay > 0:
                self.ema = EMA(unique_parameters(engine.stages), t.ema_decay)
        self.step, self.consumed, self.skipped, self.nonfinite_streak = 0, 0, 0, 0
        self.apart_norm: float | None = None   # guarded_step's norm of a separately clipped group
        self.total_steps = t.steps      # the run's last step (a stage may derive its own: SFT's data.epochs)
        self.stage_state: dict = {}     # what a stage keeps across a resume (iterator positions)
        self.logger: MetricsLogger | None = None
        self.tools: RunTools | None = None

    def open_tools(self) -> RunTools:
        """The operating tools around each step (pretrain.operate: watchdog, profiler window, memory
        history), opened when the loop starts so that a failing setup leaves no thread behind; close()
        closes them."""
        self.tools = RunTools(self.cfg, self.run_dir, rank=self.rank, world=dist.get_world_size(),
                              device=self.device)
        return self.tools

    def _who(self) -> str:
        return f"the {self.stage} stage" if self.stage else "this job"

    def _need_optimizer(self, what: str) -> None:
        if self.opt is None:
            raise RuntimeError(f"{what} needs an optimizer, but {self._who()} built its session with train=False "
                               "(sampling only); build it with train=True to train or checkpoint")

    # -- the step --------------------------------------------------------------------------------------
    def guarded_step(self, lr: float, loss: float, apart: str = "") -> tuple[float, bool]:
        """Clip the (synchronised) gradients, then AdamW at `lr` unless the loss or the norm is
        non-finite: then the step is skipped and counted. Gradients are zeroed either way.
        Returns (gradient norm, finite). `apart`: a parameter-name prefix clipped as its own group
        (parallel.clip_grad_norm_); the norm returned is the rest's, the group's is `self.apart_norm`."""
        self._need_optimizer("Session.guarded_step")
        for g in self.opt.param_groups:
            g["lr"] = lr
        norms = self.engine.clip_grad_norm_(self.cfg.train.grad_clip, apart) if apart else \
            self.engine.clip_grad_norm_(self.cfg.train.grad_clip)
        norm, self.apart_norm = (float(norms[0]), float(norms[1])) if apart else (float(norms), None)
        finite = math.isfinite(loss) and math.isfinite(norm) and (not apart or math.isfinite(self.apart_norm))
        if finite:
            self.opt.step()
            if self.ema is not None:
                self.ema.update()
            self.nonfinite_streak = 0
        else:  # skip: no update
            self.nonfinite_streak += 1
            self.skipped += 1
        self.opt.zero_grad(set_to_none=True)
        return norm, finite

    def check_nonfinite(self) -> None:
        """Stop once more than train.max_nonfinite steps in a row were skipped (nothing is saved)."""
        limit = self.cfg.train.max_nonfinite
        if self.nonfinite_streak > limit:
            raise NonFiniteError(
                f"{self.nonfinite_streak} non-finite steps in a row (train.max_nonfinite = {limit}); stopping "
                f"without saving. The last good checkpoint is in {self.ckpt_dir}: lower train.lr or check the "
                f"data, then resume from it")

    # -- checkpoints -----------------------------------------------------------------------------------
    def state(self, extra_models=()) -> dict:
        """This rank's checkpoint state: the engine's models, AdamW, the EMA, and the weights of
        `extra_models` (e.g. GRPO's reference) under extra<i>/."""
        state = sharded_state(self.engine.stages, self.mesh, self.opt, self.ema)
        for i, m in enumerate(extra_models):
            state.update({f"extra{i}/{k}": v for k, v in sharded_state(m, self.mesh).items() if k.startswith("model/")})
        return state

    def resume(self, extra_models=()) -> None:
        """Load the checkpoint that checkpoint.resume names (auto: this run's latest, if any) into the
        models, AdamW, the EMA and `extra_models`, with the counters and the stage's state. A pretraining
        run with no checkpoint of its own to resume starts from init.checkpoint's weights (if set); a
        post-training stage loads those when it builds each model (posttrain.stage)."""
        c = self.cfg.checkpoint
        if c.resume == "none":
            self.init_weights()
            return
        # every rank verifies 1/world of the files (collective), then all agree on the newest that verifies
        path = latest_checkpoint(self.ckpt_dir, collective=True) if c.resume == "auto" else Path(c.resume)
        if path is None:
            self.init_weights()
            return
        if self.opt is None:  # sampling only: no run state to restore (init.checkpoint loads weights)
            raise ConfigError(f"checkpoint.resume = {c.resume} names {path}, but {self._who()} does not train and "
                              "restores no run state; set checkpoint.resume=none and load weights with init.checkpoint")
        self._check_not_past_the_end(path)
        meta = load_checkpoint(path, self.state(extra_models), model_config=self.model_cfg.to_dict())
        self.step, self.consumed = meta["step"], meta["consumed_samples"]
        self.opt.step_count = meta["optimizer_steps"]
        self.nonfinite_streak, self.skipped = meta.get("nonfinite_streak", 0), meta.get("skipped_steps", 0)
        self.stage_state = meta.get("stage_state", {})
        if self.rank == 0:
            samples = f" ({self.consumed} samples)" if self.consumed else ""
            print(f"resumed from {path} at step {self.step}{samples}", flush=True)

    def init_weights(self) -> None:
        """Pretraining from a checkpoint's weights (init.checkpoint): the engine's models take the saved weights
        (any layout), YaRN switched on if the config says so (check_init_model); AdamW, the counters and the
        schedule start fresh (step 0). Nothing for a post-training stage (its models load at build)."""
        path = getattr(getattr(self.cfg, "init", None), "checkpoint", "")
        if not path or self.stage is not None:
            return
        meta = load_init_weights(self.engine.stages, self.mesh, path, self.model_cfg, extension=True)
        if self.rank == 0:
            print(f"initialised from the weights of {path} (saved at step {meta.get('step', '?')}); optimizer, step "
                  f"and schedule start fresh", flush=True)

    def _check_not_past_the_end(self, path) -> None:
        """A checkpoint past this run's last step would silently do nothing: say so before loading it. Every
        rank reads the same meta.json; an unreadable one is left to load_checkpoint (which agrees on it)."""
        try:
            saved = int(read_meta(path)["step"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            return
        if saved > self.total_steps:
            key = "train.steps" if self.total_steps == self.cfg.train.steps else "data.epochs"
            raise ConfigError(f"checkpoint.resume = {self.cfg.checkpoint.resume}: {path} is at step {saved}, past "
                              f"this run's last step {self.total_steps} ({key}); raise {key} to reach at least step "
                              f"{saved}, or resume from an earlier checkpoint with checkpoint.resume=PATH")
        stop = getattr(self.cfg.train, "exit_at_step", 0)
        if stop and saved > stop:  # every stage: it would save "at exit_at_step" having passed it
            raise ConfigError(f"train.exit_at_step = {stop} lies before step {saved}, where this run resumes ({path}); "
                              f"raise train.exit_at_step or set it to 0, or resume from an earlier checkpoint with "
                              f"checkpoint.resume=PATH")

    def save(self, stage_state: dict | None = None, extra_models=()) -> None:
        self._need_optimizer("Session.save")
        t0 = time.perf_counter()
        c = self.cfg.checkpoint
        meta = {"step": self.step, "consumed_samples": self.consumed, "optimizer_steps": self.opt.step_count,
                "nonfinite_streak": self.nonfinite_streak, "skipped_steps": self.skipped}
        if self.stage is not None:
            meta.update(stage=self.stage, stage_state=stage_state or {})
        meta.update(model_config=self.model_cfg.to_dict(), parallel=asdict(self.mesh.dims), config=self.cfg.to_dict())
        saved = save_checkpoint(self.ckpt_dir, self.step, self.state(extra_models), meta, keep=c.keep,
                                async_save=c.async_save)
        if self.rank == 0:  # an asynchronous save returns its handle: the path is where it completes
            how = "staged; writing in the background" if isinstance(saved, AsyncCheckpoint) else "saved"
            print(f"checkpoint step {self.step} -> {getattr(saved, 'path', saved)} ({how} in "
                  f"{time.perf_counter() - t0:.2f} s)", flush=True)

    # -- metrics ---------------------------------------------------------------------------------------
    def open_logger(self, total_steps: int) -> None:
        """metrics.jsonl (+ W&B), continued after a resume; a stage's runs are tagged with its name."""
        lg = self.cfg.logging
        tags = [self.stage, *lg.wandb_tags] if self.stage else lg.wandb_tags
        self.logger = MetricsLogger(self.run_dir, rank=self.rank, wandb_mode=lg.wandb, project=lg.wandb_project,
                                    entity=lg.wandb_entity, name=lg.wandb_name or self.run_dir.name, tags=tags,
                                    config=self.cfg.to_dict(), resume_step=self.step if self.step else None,
                                    total_steps=total_steps)

    def log(self, metrics: dict, images: dict | None = None) -> None:
        self.logger.log(self.step, metrics, images=images)

    def close(self) -> None:
        """Close the operating tools; wait for asynchronous saves and the EMA's last update; close the logger."""
        if self.tools is not None:
            self.tools.close()
            self.tools = None
        finalize_pending()
        if self.ema is not None:
            self.ema.close()
        if self.logger is not None:
            self.logger.close()
