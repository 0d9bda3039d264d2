"""One config system (DESIGN decision 7): typed dataclasses, loaded from YAML, overridden by dotted
`key=value` arguments. An unknown key or a value of the wrong type is an error that names the key
and lists the valid ones; nothing is silently ignored.

    cfg = load_config("configs/pretrain/tiny_v3.yaml", ["train.steps=50", "parallel.ep=2"])
    cfg.model_config()       # the preset with the model.* overrides applied (a ModelConfig)
    save_config(cfg, run_dir / "config.yaml")

The `model` section is open: `model.preset` names a preset and every other `model.*` key overrides
that ModelConfig field (checked against ModelConfig's own fields and types).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from model import ModelConfig, preset
from model.config import _PRESETS

from .data import DataConfig, DataError, check_split


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


# The OSErrors of a path the user gave (a data file, a tokenizer, the run or checkpoint directory): the fix is
# theirs, and the message names the path. Other OSErrors (a dropped connection, a full disk) keep their traceback.
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user's input causes, each with a message that names the key, file or value and the fix:
    `python -m pretrain` and the post-training stages print them as one `error:` line (exit 2), not a
    traceback. Only the project's own classes (a config, a data file, a checkpoint) and PATH_ERRORS, never
    ValueError as such (that would hide bugs). A function, so that loading a config does not import the
    parallel runtime."""
    from parallel.checkpoint import CheckpointError
    return (ConfigError, DataError, CheckpointError, *PATH_ERRORS)


def print_error(e: BaseException) -> None:
    """`error: <message>` on stderr, once: on rank 0 under torchrun (every rank meets the same error)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {e}", file=sys.stderr, flush=True)


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    dp: int = 0                     # 0: world / (pp x cp x tp)
    ep: int = 1
    sp: bool = False
    cp: int = 1                     # context parallel: each row cut over cp ranks (parallel/context_parallel.py)
    node_size: int = 8              # ranks per node (tp and ep groups are placed with it)
    zero: int = 3                   # FSDP2: 3 reshards parameters after forward, 2 keeps them
    pp_schedule: str = "1f1b"       # gpipe | 1f1b | interleaved_1f1b | zb1p | zbv | dualpipev
    vpp: int = 2                    # stages per rank of interleaved_1f1b
    layer_split: list[list[int]] = field(default_factory=list)   # layers per stage; [] = by cost
    recompute: str = "none"         # none | selective | full
    overlap: str = "none"           # none | ep: pp = 1: forward k+1 under backward k; pp > 1: DualPipeV F&B pairs


@dataclass
class TrainSection:
    steps: int = 100
    seed: int = 0
    lr: float = 3e-3                # peak
    lr_schedule: str = "cosine"     # constant | cosine | wsd | multistep | v3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1       # final lr / peak (cosine, wsd)
    lr_milestones: list[float] = field(default_factory=list)   # fractions of the tokens; [] = defaults
    lr_factors: list[float] = field(default_factory=list)
    micro_batch_size: int = 4
    global_batch_size: int = 16
    batch_ramp: list[int] = field(default_factory=list)        # [start, increment, ramp_samples] (V3 §4.2)
    exit_at_step: int = 0           # save and stop there without changing the schedule (0: off)
    dtype: str = "fp32"             # fp32 | bf16 (parameters and optimizer stay fp32)
    fp8: str = "none"               # none | blockwise (V3 §3.3: linears and expert GEMMs in FP8)
    fp8_backend: str = "auto"       # auto | emulate | torch (auto: torch's scaled_mm on CUDA, else emulate)
    compile: bool = False           # torch.compile each block from outside (parallel/compile.py; inductor on CUDA)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    moment_dtype: str = "fp32"      # fp32 | bf16 AdamW moments (V3 §3.3)
    grad_clip: float = 1.0
    mtp_lambda: list[list[float]] = field(default_factory=list)  # [[progress, value], ...]; [] = model's
    bias_gamma: list[list[float]] = field(default_factory=list)  # [[progress, value], ...]; [] = model's
    ema_decay: float = 0.0          # 0: no EMA
    max_nonfinite: int = 3          # consecutive skipped steps before the run stops
    eval_every: int = 0             # 0: no periodic validation
    eval_batches: int = 2
    device: str = "auto"            # auto | cpu | cuda


@dataclass
class CheckpointSection:
    dir: str = ""                   # "" = RUN_DIR/checkpoints
    every: int = 0                  # 0: only at exit_at_step, on a signal and at the end
    keep: int = 3
    async_save: bool = False
    resume: str = "auto"            # auto (latest in dir, if any) | none | PATH of a checkpoint
    overwrite: bool = False         # resume=none where checkpoints exist: true replaces that run (else refused)


@dataclass
class InitSection:
    # a checkpoint (root or step dir) whose weights start this run: weights only (fresh optimizer, step 0, this
    # run's schedule); checkpoint.resume wins once the run has checkpoints of its own. The model.* keys may
    # switch YaRN on (rope_factor, original_seq_len, beta_fast/slow, mscale, mscale_all_dim, max_seq_len: V3 §4.3);
    # the architecture must be the checkpoint's (pretrain.session.check_init_model). "" = random (train.seed)
    checkpoint: str = ""


@dataclass
class LoggingSection:
    run_dir: str = "runs/default"
    every: int = 1
    wandb: str = "offline"          # online | offline | disabled
    wandb_project: str = "whaletron"
    wandb_entity: str = ""
    wandb_name: str = ""
    wandb_tags: list[str] = field(default_factory=list)
    peak_tflops: float = 0.0        # per device, for MFU; 0: from the device (CUDA table, CPU measured)
    # operating a long run (docs/operating.md, "Operating a long run"; pretrain/operate.py)
    profile_steps: list[int] = field(default_factory=list)  # [a, b]: torch profiler trace of steps a..b per rank
    memory_history_steps: int = 0   # CUDA: allocator history of the first K steps, snapshot after them (0: off)
    flight_recorder: int = 2000     # collectives kept by the flight recorder, dumped on a timeout (0: off)


@dataclass
class WatchdogSection:
    """Hang and straggler detection (pretrain/watchdog.py): a step that runs longer than
    max(min_seconds, factor x the median of the last `window` steps), or than `timeout`, dumps every
    rank's Python stacks and the collectives in flight to RUN_DIR/watchdog/."""
    factor: float = 0.0             # x the running median step time; 0: no relative limit
    window: int = 100               # steps in the running median
    warmup_steps: int = 3           # a process's first steps are not measured (warm-up, allocator growth)
    min_seconds: float = 10.0       # the relative limit is never below this (short steps jitter)
    timeout: float = 0.0            # seconds any step may take, also before a median exists; 0: no absolute limit
    exit: bool = False              # after the dump, exit with code 4 (torchrun --max-restarts then resumes)


@dataclass
class Config:
    model: dict = field(default_factory=lambda: {"preset": "tiny-deepseek-v3"})
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    init: InitSection = field(default_factory=InitSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)

    def model_config(self) -> ModelConfig:
        """The preset with the model.* overrides; types checked by ModelConfig itself."""
        over = dict(self.model)
        name = over.pop("preset")
        base = preset(name)
        try:
            return dataclasses.replace(base, **over)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Constraints between keys that a single field's type cannot express."""
        t, p = self.train, self.parallel
        choices = {"train.dtype": (t.dtype, ("fp32", "bf16")), "train.fp8": (t.fp8, ("none", "blockwise")),
                   "train.fp8_backend": (t.fp8_backend, ("auto", "emulate", "torch")),
                   "train.moment_dtype": (t.moment_dtype, ("fp32", "bf16")),
                   "train.device": (t.device, ("auto", "cpu", "cuda")),
                   "parallel.recompute": (p.recompute, ("none", "selective", "full")),
                   "parallel.overlap": (p.overlap, ("none", "ep")),
                   "logging.wandb": (self.logging.wandb, ("online", "offline", "disabled"))}
        check_choices(choices)
        if t.compile and p.recompute == "selective":
            raise ConfigError("train.compile=true cannot trace parallel.recompute=selective (its saved-tensor "
                              "hooks replay submodules in backward); set parallel.recompute=full or none, or "
                              "train.compile=false")
        from parallel.pp_schedules import SCHEDULES
        if p.pp_schedule not in SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule = {p.pp_schedule!r}; valid: {', '.join(SCHEDULES)}")
        for key in ("steps", "micro_batch_size", "global_batch_size"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
        if t.exit_at_step < 0 or t.exit_at_step > t.steps:
            raise ConfigError(f"train.exit_at_step = {t.exit_at_step} must lie in [0, train.steps = {t.steps}]")
        if self.checkpoint.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {self.checkpoint.keep}")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must lie in [0, 1) (0 disables the EMA), got {t.ema_decay}")
        self._check_optimizer()
        for key, value, zero in (("train.eval_every", t.eval_every, "no periodic validation"),
                                 ("checkpoint.every", self.checkpoint.every,
                                  "save only at train.exit_at_step, on a signal and at the end")):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (every N steps; 0: {zero}), got {value}")
        if self.logging.every < 1:
            raise ConfigError(f"logging.every must be >= 1 (log every N steps), got {self.logging.every}")
        self._check_operating()
        self._check_data(self.model_config())
        self._check_context_parallel(self.model_config())

    def _check_optimizer(self) -> None:
        """AdamW's and clipping's numbers (NaN fails every comparison, so it is refused too)."""
        t = self.train
        if not (t.lr >= 0 and math.isfinite(t.lr)):
            raise ConfigError(f"train.lr must be a finite number >= 0 (the peak learning rate, e.g. 3e-4), got {t.lr}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(t, key) < 1.0:
                raise ConfigError(f"train.{key} must lie in [0, 1) (DeepSeek: beta1 = 0.9, beta2 = 0.95), "
                                  f"got {getattr(t, key)}")
        if not (t.adam_eps > 0 and math.isfinite(t.adam_eps)):
            raise ConfigError(f"train.adam_eps must be a finite number > 0 (e.g. 1e-8), got {t.adam_eps}")
        if not (t.weight_decay >= 0 and math.isfinite(t.weight_decay)):
            raise ConfigError(f"train.weight_decay must be a finite number >= 0 (0: none; DeepSeek: 0.1), "
                              f"got {t.weight_decay}")
        if not t.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be > 0 (the bound on the global gradient norm, e.g. 1.0); "
                              f"there is no off value: a very large bound such as 1e9 never clips; got {t.grad_clip}")

    def _check_operating(self) -> None:
        """The tools for operating a long run: the profiler window, the memory history, the flight recorder
        and the watchdog (docs/operating.md, "Operating a long run")."""
        lg, w, steps = self.logging, self.watchdog, self.train.steps
        window = lg.profile_steps
        if window and (len(window) != 2 or not 1 <= window[0] <= window[1] <= steps):
            raise ConfigError(f"logging.profile_steps = {window} must be [first, last] with 1 <= first <= last <= "
                              f"train.steps = {steps} (e.g. [10, 12]; [] profiles nothing)")
        for key in ("memory_history_steps", "flight_recorder"):
            if getattr(lg, key) < 0:
                raise ConfigError(f"logging.{key} must be >= 0 (0: off), got {getattr(lg, key)}")
        if not (w.factor == 0 or w.factor > 1) or not math.isfinite(w.factor):
            raise ConfigError(f"watchdog.factor must be 0 (off) or a number > 1 (a step slower than factor x the "
                              f"median step is reported; e.g. 5), got {w.factor}")
        if w.window < 1 or w.warmup_steps < 0:
            raise ConfigError(f"watchdog.window must be >= 1 and watchdog.warmup_steps >= 0, got {w.window} and "
                              f"{w.warmup_steps}")
        for key in ("min_seconds", "timeout"):
            if not (getattr(w, key) >= 0 and math.isfinite(getattr(w, key))):
                raise ConfigError(f"watchdog.{key} must be a finite number of seconds >= 0, got {getattr(w, key)}")
        if w.exit and not (w.factor or w.timeout):
            raise ConfigError("watchdog.exit = true but the watchdog is off (watchdog.factor = 0 and "
                              "watchdog.timeout = 0): set watchdog.factor (e.g. 5) or watchdog.timeout (seconds), "
                              "or drop watchdog.exit")

    def _check_data(self, model_cfg: ModelConfig) -> None:
        """A sample's length against the model's context, and data.split (no file is opened)."""
        d = self.data
        if d.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2 (tokens per training sample), got {d.seq_len}")
        if d.seq_len > model_cfg.max_seq_len:
            raise ConfigError(f"data.seq_len = {d.seq_len} exceeds model.max_seq_len = {model_cfg.max_seq_len} "
                              f"(model.preset {self.model['preset']}): lower data.seq_len, or set "
                              f"model.max_seq_len={d.seq_len}")
        try:
            check_split(d.split)
        except ValueError as e:
            raise ConfigError(str(e)) from None


    def _check_context_parallel(self, model_cfg: ModelConfig) -> None:
        """parallel.cp against the sequence length: 2·cp chunks per row, each rank's pair split over tp again
        under sequence parallelism or the MoE's token split (parallel/context_parallel.py)."""
        p, seq = self.parallel, self.data.seq_len
        if p.cp < 1:
            raise ConfigError(f"parallel.cp must be >= 1 (1: no context parallelism), got {p.cp}")
        if p.cp == 1:
            return
        tp = p.tp if p.tp > 1 and (p.sp or model_cfg.is_moe) else 1
        multiple = 2 * p.cp * tp
        if seq % multiple:
            why = (f"2 x parallel.cp = {multiple}" if tp == 1 else
                   f"2 x parallel.cp x parallel.tp = {multiple} (" +
                   ("parallel.sp" if p.sp else "the MoE's token split") + " splits each rank's chunks over tp)")
            raise ConfigError(f"data.seq_len = {seq} is not divisible by {why}: context parallelism cuts every row "
                              f"into 2·cp chunks; set data.seq_len to a multiple of {multiple} or change parallel.cp")


def check_choices(choices: dict[str, tuple]) -> None:
    """{key: (value, valid values)}: a ConfigError naming the first key whose value is not valid."""
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{key} = {value!r}; valid values: {', '.join(valid)}")


# -- typed loading ---------------------------------------------------------------------------------
def _coerce(value, tp, key: str):
    """value as type tp (int, float, str, bool, list[...], dict), or a ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list ({_type_name(tp)}), got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _set(cfg: Config, dotted: str, value, source: str) -> None:
    parts = dotted.split(".")
    sections = [f.name for f in fields(cfg)]
    if parts[0] not in sections:
        raise ConfigError(f"{source}: unknown section {parts[0]!r} in {dotted!r}; "
                          f"valid sections: {', '.join(sections)}")
    if len(parts) != 2:
        raise ConfigError(f"{source}: {dotted!r} must be SECTION.KEY (e.g. train.lr)")
    section, key = parts
    if section == "model":
        _set_model(cfg, key, value, source)
        return
    obj = getattr(cfg, section)
    hints = _hints(type(obj))
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {dotted!r}; valid {section}.* keys: {', '.join(sorted(hints))}")
    setattr(obj, key, _coerce(value, hints[key], f"{source}: {dotted}"))


def _set_model(cfg: Config, key: str, value, source: str) -> None:
    model_fields = {f.name: f for f in fields(ModelConfig)}
    if key == "preset":
        if value not in _PRESETS:
            raise ConfigError(f"{source}: model.preset = {value!r} is not a preset; "
                              f"valid: {', '.join(sorted(_PRESETS))}")
        cfg.model["preset"] = value
        return
    if key not in model_fields or key == "name":
        valid = sorted(k for k in model_fields if k != "name")
        raise ConfigError(f"{source}: unknown key 'model.{key}'; valid: model.preset and model.{{{', '.join(valid)}}}")
    tp = {"int": int, "float": float, "bool": bool, "str": str}[model_fields[key].type]
    cfg.model[key] = _coerce(value, tp, f"{source}: model.{key}")


def _flatten(d: dict, source: str, prefix: str = "", cls=None) -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out.extend(_flatten(v, source, key + "."))
        elif not prefix:
            raise ConfigError(f"{source}: top-level key {key!r} must be a section (mapping); "
                              f"valid sections: {', '.join(f.name for f in fields(cls or Config))}")
        else:
            out.append((key, v))
    return out


def parse_override(arg: str) -> tuple[str, object]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003): the value is parsed as YAML (lists, bools, numbers)."""
    if "=" not in arg:
        raise ConfigError(f"command-line override {arg!r} must be KEY=VALUE, e.g. train.steps=100")
    key, text = arg.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def read_yaml(path: Path):
    """The YAML document in `path` (None when empty); a missing file, a directory, unreadable text, bad YAML
    and a key given twice in one mapping (PyYAML would keep the last silently) are ConfigErrors."""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.yaml"))
        hint = f"; it holds {', '.join(found[:6])}{', ...' if len(found) > 6 else ''}" if found else ""
        raise ConfigError(f"config file {path} is a directory: give a YAML file{hint}")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read as text: {e}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node, path: Path, prefix: str = "", seen: set | None = None) -> None:
    """A ConfigError naming the dotted key and both lines when a mapping in the tree holds a key twice."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path, prefix, seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue  # a `<<:` merge may be overridden by the keys beside it; that is what it is for
        key, line = prefix + key_node.value, key_node.start_mark.line + 1
        if key in first:
            raise ConfigError(f"{path}:{line}: duplicate key {key!r} (first at line {first[key]}); YAML would keep "
                              f"only the last one: merge the two into one")
        first[key] = line
        _refuse_duplicate_keys(value_node, path, key + ".", seen)


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = Config) -> Config:
    """`cls`: the root dataclass (Config, or a subclass with more sections, as posttrain's)."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for key, value in _flatten(data, str(path), cls=cls):
            _set(cfg, key, value, str(path))
    for arg in overrides:
        key, value = parse_override(arg)
        _set(cfg, key, value, "command line")
    cfg.check()
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved configuration (every key, defaults included), written atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def config_from_dict(d: dict, cls: type = Config) -> Config:
    cfg = cls()
    for key, value in _flatten(d, "config dict", cls=cls):
        _set(cfg, key, value, "config dict")
    return cfg
