"""Post-training configuration: pretraining's typed Config (model, parallel, train, checkpoint,
logging) plus the sections of the post-training stages, loaded and overridden the same way
(`load_config(path, ["grpo.beta=0.04"])`): unknown keys and wrong types are errors naming the key.

Each stage reads the sections it needs; `train.steps` counts optimizer steps for SFT/DPO and
rollout batches for GRPO.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.config import Config, ConfigError, check_choices, load_config as _load_config, user_errors as _user_errors


@dataclass
class InitSection:
    # whaletron checkpoint (root or step dir) with the starting weights; "" = random (train.seed)
    checkpoint: str = ""
    tokenizer: str = ""             # sentencepiece .model or HF tokenizer.json / directory


@dataclass
class PostData:
    train_files: list[str] = field(default_factory=list)   # jsonl: conversations or prompt/answer records
    valid_files: list[str] = field(default_factory=list)   # held-out prompts (eval accuracy) or SFT rows
    template: str = "r1_zero"       # posttrain.templates: r1_zero | chat
    seq_len: int = 256              # packed SFT row length; GRPO: prompt + completion must fit max_seq_len
    overflow: str = "truncate"      # truncate | drop an SFT example longer than seq_len
    epochs: int = 0                 # SFT: > 0 sets the steps to this many passes over the packed rows
                                    # (else train.steps)


@dataclass
class RolloutSection:
    max_new_tokens: int = 64
    temperature: float = 1.0        # R1-Zero: 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    # the generator (posttrain/engine.py): paged = continuous batching over a paged latent cache with shared
    # prompt prefixes (and MTP speculation when draft_tokens > 0); static = one padded batch (posttrain/generate.py)
    engine: str = "paged"           # paged | static
    draft_tokens: int = 0           # MTP drafts per decode step (V3 §5.4.3); needs model.n_mtp >= 1
    # decode-sized steps through torch.compile (on a CUDA device replayed from CUDA graphs: posttrain/engine.py);
    # one process only. GRPO then generates with a plain copy of the policy when the policy is an FSDP2 module
    # (a compute dtype set), refreshed after each update; the first steps of each shape compile (tens of seconds)
    compile: bool = False
    page_size: int = 16             # positions per cache page
    max_batch: int = 64             # sequences decoded together
    # the rollout layout (issue 22 §1): generation on the same ranks with its own tp and ep, dp = world / tp and no
    # pp; 0 = the training layout's. When it differs from training's (always under parallel.pp > 1), the weights
    # are refreshed shard to shard after each update (parallel/refit.py)
    tp: int = 0
    ep: int = 0


@dataclass
class GRPOSection:
    group_size: int = 8             # G samples per prompt (R1-Zero: 16; DeepSeekMath: 64)
    prompts_per_step: int = 8       # prompts per rollout batch over all dp ranks (R1-Zero: 32)
    inner_steps: int = 1            # optimizer steps per rollout batch (mu in DeepSeekMath Alg. 1)
    eps_low: float = 0.2            # clip 1 - eps_low
    eps_high: float = 0.2           # clip 1 + eps_high (DAPO's clip-higher: 0.28)
    beta: float = 0.0               # k3 KL coefficient (R1-Zero: 0.001, DeepSeekMath: 0.04); 0 builds no reference
    ref_update_every: int = 0       # replace the reference by the policy every N rollout batches (R1-Zero: 400);
                                    # 0 = never
    std_normalize: bool = True      # false: Dr. GRPO advantages (no division by the group std)
    loss_agg: str = "token_mean"    # token_mean | seq_mean | constant
    dynamic_sampling: bool = True   # drop groups whose rewards are all equal (zero advantage, zero signal)
    old_logprobs: str = "rollout"   # rollout: recorded while sampling | recompute: a training-path forward
    tis_cap: float = 0.0            # truncated importance sampling, w = min(pi_old / pi_rollout, cap) per token
                                    # (needs old_logprobs=recompute; verl and slime use 2); 0 = off
    offpolicy_mask: float = 0.0     # DeepSeek-V3.2's off-policy sequence masking: drop negative-advantage
                                    # sequences whose mean log(pi_rollout / pi_theta) exceeds this; 0 = off
    keep_sampling_mask: bool = False  # DeepSeek-V3.2's Keep Sampling Mask: the rollout records each token's top-p /
                                    # top-k allowed set; the policy, pi_old and reference log-probs are computed on
                                    # it (renormalised), so both policies share one action space; needs truncation
    kl_clamp: float = 10.0          # |log-ratio| bound inside k3 and the ratio
    entropy_floor: float = 0.0      # stop when the mean token entropy stays below this (collapse); 0 = off
    min_response_len: float = 0.0   # stop when the mean response length stays below this (collapse); 0 = off
    collapse_patience: int = 5      # rollout batches in a row below a floor before stopping
    routing_replay: str = "none"    # rollout: the policy's training forwards force the experts the rollout chose
                                    # (R3, arXiv 2510.11370); none: route afresh (routing_mismatch is logged both ways)
    mtp_weight: float = 0.0         # > 0: also train the MTP modules on the rollouts (their CE x this weight),
                                    # their inputs detached and their gradients clipped apart, so the policy's update
                                    # is unchanged; keeps the speculative drafter in step with the policy; 0 = off


@dataclass
class RewardSection:
    # name (or module.path:function) -> weight, or -> {weight: w, option: value} (posttrain.rewards)
    weights: dict = field(default_factory=lambda: {"accuracy": 1.0})


@dataclass
class EvalSection:
    every: int = 0                  # rollout batches (GRPO) or steps (SFT) between held-out evaluations; 0 = off
    prompts: int = 64               # held-out prompts per evaluation (from data.valid_files)
    temperature: float = 0.0        # 0: greedy accuracy; R1 reports pass@1 at 0.6 (top-p 0.95, k samples)
    top_p: float = 1.0
    samples: int = 1                # k samples per prompt (temperature > 0): accuracy is pass@1 averaged over k
    max_new_tokens: int = 0         # 0: rollout.max_new_tokens


@dataclass
class DPOSection:
    beta: float = 0.1               # the KL strength of DPO's implicit reward beta * log(pi / pi_ref)
    label_smoothing: float = 0.0    # > 0: conservative DPO (the labels are flipped with this probability)


@dataclass
class RejectionSection:
    samples: int = 4                # k completions per prompt
    output: str = ""                # SFT jsonl to write
    max_response_tokens: int = 0    # drop longer responses; 0 = keep all
    min_language_consistency: float = 0.0   # drop mixed-language chains of thought below this fraction
    language: str = "en"            # the target language of that check (a record's "language" overrides it)
    keep_per_prompt: int = 1        # verified-correct completions kept per prompt
    batch_prompts: int = 8          # prompts per generation call (x samples rows); the seeds follow it, not dp
    overwrite: bool = False         # replace existing output files (otherwise the run refuses to start)
    pairs_output: str = ""          # DPO pairs jsonl (a kept correct vs an incorrect completion); "" = off
    samples_output: str = ""        # every sample with its scores and verdict (pass@k analysis); "" = off


@dataclass
class PosttrainConfig(Config):
    data: PostData = field(default_factory=PostData)
    init: InitSection = field(default_factory=InitSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    reward: RewardSection = field(default_factory=RewardSection)
    eval: EvalSection = field(default_factory=EvalSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    rejection: RejectionSection = field(default_factory=RejectionSection)

    def check(self) -> None:
        super().check()
        g = self.grpo
        choices = {"grpo.loss_agg": (g.loss_agg, ("token_mean", "seq_mean", "constant")),
                   "grpo.old_logprobs": (g.old_logprobs, ("rollout", "recompute")),
                   "grpo.routing_replay": (g.routing_replay, ("none", "rollout")),
                   "data.overflow": (self.data.overflow, ("truncate", "drop")),
                   "rollout.engine": (self.rollout.engine, ("paged", "static"))}
        check_choices(choices)
        self._check_rollout()
        if g.group_size < 2:
            raise ConfigError("grpo.group_size must be >= 2 (advantages compare samples of one prompt), "
                              f"got {g.group_size}")
        for key in ("prompts_per_step", "inner_steps"):
            if getattr(g, key) < 1:
                raise ConfigError(f"grpo.{key} must be >= 1, got {getattr(g, key)}")
        if not (0 <= g.eps_low < 1 and g.eps_high >= 0):
            raise ConfigError("grpo.eps_low must lie in [0, 1) and grpo.eps_high be >= 0; "
                              f"got {g.eps_low}, {g.eps_high}")
        if g.beta < 0:
            raise ConfigError(f"grpo.beta must be >= 0, got {g.beta}")
        if not (g.tis_cap == 0 or g.tis_cap >= 1) or not math.isfinite(g.tis_cap):
            raise ConfigError(f"grpo.tis_cap must be 0 (off) or a cap >= 1 on pi_old / pi_rollout (e.g. 2), got "
                              f"{g.tis_cap}")
        if g.tis_cap and g.old_logprobs != "recompute":
            raise ConfigError("grpo.tis_cap weights each token by pi_old / pi_rollout, so pi_old must come from the "
                              "training path: set grpo.old_logprobs=recompute (or grpo.tis_cap=0)")
        if g.keep_sampling_mask and self.rollout.top_p == 1 and self.rollout.top_k == 0:
            raise ConfigError("grpo.keep_sampling_mask=true keeps the sampler's top-p / top-k truncation, and "
                              "rollout.top_p = 1 with rollout.top_k = 0 truncates nothing, so it would do nothing; "
                              "set rollout.top_p < 1 or rollout.top_k > 0, or grpo.keep_sampling_mask=false")
        if g.keep_sampling_mask and self.rollout.temperature == 0:
            raise ConfigError("grpo.keep_sampling_mask=true keeps the sampler's truncation, and "
                              "rollout.temperature = 0 samples greedily (no truncation to keep); set "
                              "rollout.temperature > 0 or grpo.keep_sampling_mask=false")
        if not (g.offpolicy_mask >= 0 and math.isfinite(g.offpolicy_mask)):
            raise ConfigError(f"grpo.offpolicy_mask must be >= 0 (a KL threshold; 0: off), got {g.offpolicy_mask}")
        for key, value in (("grpo.ref_update_every", g.ref_update_every), ("eval.every", self.eval.every)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (every N steps; 0: never), got {value}")
        if self.parallel.cp != 1:
            raise ConfigError("post-training runs with parallel.cp = 1: its log-probability and generation paths "
                              "take whole sequences (context parallelism is a pretraining layout); set parallel.cp=1")
        if not (g.mtp_weight >= 0 and math.isfinite(g.mtp_weight)):
            raise ConfigError(f"grpo.mtp_weight must be >= 0 (0: the MTP modules are not trained), got {g.mtp_weight}")
        if g.mtp_weight > 0 and not self.model_config().n_mtp:
            raise ConfigError(f"grpo.mtp_weight = {g.mtp_weight} trains the MTP modules, and this model has none "
                              "(model.n_mtp = 0); set grpo.mtp_weight=0 or start from a model with MTP modules")
        if g.routing_replay != "none":
            if not self.model_config().is_moe:
                raise ConfigError(f"grpo.routing_replay = {g.routing_replay} replays MoE routing, and this model has "
                                  "no MoE layer; set grpo.routing_replay=none")
            if self.parallel.tp != 1:
                raise ConfigError(f"grpo.routing_replay = {g.routing_replay} needs parallel.tp = 1: under tp each "
                                  "rank's routers see a share of the tokens (the MoE token split), whose order the "
                                  "recorded routes do not follow; set parallel.tp=1 (ep and dp replay) or "
                                  "grpo.routing_replay=none")
        e = self.eval
        if e.samples < 1 or (e.samples > 1 and e.temperature <= 0):
            raise ConfigError(f"eval.samples = {e.samples}: it must be >= 1, and more than one sample per prompt needs "
                              f"eval.temperature > 0 (greedy samples are all the same; got {e.temperature})")
        if not 0 < e.top_p <= 1:
            raise ConfigError(f"eval.top_p must lie in (0, 1], got {e.top_p}")
        self._check_stages()
        from .rewards import build_reward
        try:
            build_reward(self.reward.weights)
        except ValueError as e:
            raise ConfigError(f"reward.weights: {e}") from None

    def _check_rollout(self) -> None:
        r = self.rollout
        for key in ("page_size", "max_batch"):
            if getattr(r, key) < 1:
                raise ConfigError(f"rollout.{key} must be >= 1, got {getattr(r, key)}")
        for key in ("tp", "ep"):
            if getattr(r, key) < 0:
                raise ConfigError(f"rollout.{key} must be >= 1 (or 0: the training layout's parallel.{key}), "
                                  f"got {getattr(r, key)}")
        if r.draft_tokens < 0:
            raise ConfigError(f"rollout.draft_tokens must be >= 0 (MTP drafts per step; 0: no speculation), "
                              f"got {r.draft_tokens}")
        if r.draft_tokens and r.engine != "paged":
            raise ConfigError("rollout.draft_tokens > 0 needs rollout.engine=paged (the static generator does not "
                              "speculate); set rollout.engine=paged or rollout.draft_tokens=0")
        if r.draft_tokens and not self.model_config().n_mtp:
            raise ConfigError(f"rollout.draft_tokens = {r.draft_tokens} drafts with the model's MTP module, and "
                              "model.n_mtp is 0; set rollout.draft_tokens=0 or use a model with MTP modules")

    def _check_data(self, model_cfg) -> None:
        """data.seq_len alone: the stages that pack rows (SFT, DPO) check it against model.max_seq_len."""
        if self.data.seq_len < 1:
            raise ConfigError(f"data.seq_len must be >= 1 (tokens per packed row), got {self.data.seq_len}")

    def _check_stages(self) -> None:
        """The rejection and DPO sections (their own ranges; the stages check what needs the data)."""
        r, d = self.rejection, self.dpo
        for key in ("samples", "keep_per_prompt", "batch_prompts"):
            if getattr(r, key) < 1:
                raise ConfigError(f"rejection.{key} must be >= 1, got {getattr(r, key)}")
        if r.max_response_tokens < 0:
            raise ConfigError(f"rejection.max_response_tokens must be >= 0 (0 = no limit), got {r.max_response_tokens}")
        if not 0.0 <= r.min_language_consistency <= 1.0:
            raise ConfigError("rejection.min_language_consistency is a fraction of words and must lie in [0, 1] "
                              f"(0 = off), got {r.min_language_consistency}")
        from .rewards import language_fraction
        try:
            language_fraction("", r.language)
        except ValueError as e:
            raise ConfigError(f"rejection.language: {e}") from None
        if not d.beta > 0:
            raise ConfigError(f"dpo.beta must be > 0 (the implicit reward's scale), got {d.beta}")
        if not 0.0 <= d.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must lie in [0, 0.5) (0.5 would make chosen and rejected "
                              f"equal), got {d.label_smoothing}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PosttrainConfig:
    return _load_config(path, overrides, cls=PosttrainConfig)


def user_errors() -> tuple[type[Exception], ...]:
    """pretrain.config.user_errors() plus a malformed post-training data file; posttrain.stage adds StageError."""
    from .data import DataError
    from .sandbox import SandboxUnavailable
    return (*_user_errors(), DataError, SandboxUnavailable)
