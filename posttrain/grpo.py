"""GRPO (DeepSeekMath §4.1, Algorithm 1; R1 §2.2): `python -m posttrain.grpo --config FILE [key=value ...]`.

One rollout batch, top to bottom:
    prompts   = this dp rank's share of grpo.prompts_per_step (a seeded, resumable pass over the data)
    rollouts  = G samples per prompt from the policy (posttrain.generate, KV cache), with log pi_old
    rewards   = rule-based (posttrain.rewards); A_i = (r_i - mean) / std within each prompt's group
    drop      = groups whose rewards are all equal carry no signal (dynamic sampling): weight 0
    update    = grpo.inner_steps optimizer steps on the clipped surrogate - beta * k3 KL to the reference
    guard     = NaN-free k3 and ratios (clamped log-ratios); stop when entropy or length collapses
    log, evaluate held-out accuracy, replace the reference every grpo.ref_update_every, checkpoint

At load, before the model is built, every prompt file must hold records; then every prompt that can be
drawn (encoded with the template, as the generator receives it) plus rollout.max_new_tokens (eval's
budget for the held-out prompts an evaluation scores) must fit model.max_seq_len: otherwise one error
line names the file:line and the fix, rather than a hang or a crash at the batch that draws it.

Log-probs come from Transformer.token_logprobs: under tp the logits stay split over the vocabulary.
Every rank runs the same number of forwards (same prompts per rank, same micro-batch count), which
FSDP2's gathers and the MoE all-to-alls need; dropped groups therefore keep their rows at weight 0.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

import torch.distributed as dist

from model import build_model
from model.transformer import IGNORE_INDEX
from parallel import (LayoutError, ParallelConfig, build_mesh, comm, finish_grad_sync, init_parallel_weights,
                      parallelize, sequence_multiple, set_gradient_sync)
from parallel.data_parallel import is_fsdp
from parallel.refit import Refit
from pretrain.config import ConfigError
from pretrain.session import DTYPES

from .config import PosttrainConfig
from .data import DataError, check_prompt_fit, encode_prompt, load_located_prompts
from .engine import rollout_engine
from .generate import SamplingParams
from .objectives import aggregate, group_advantages, grpo_token_terms, offpolicy_sequence_keep, truncated_is_weights
from .rewards import build_reward, verified
from .stage import StageError, StageSession, stage_main


def _load_prompts(key: str, files: list[str]) -> list[tuple[str, dict]]:
    """The validated prompt records of one config key's files; a bad or empty file is a ConfigError naming both."""
    try:
        return load_located_prompts(files)
    except (OSError, DataError) as e:
        raise ConfigError(f"{key}: {e}") from None


class CollapseError(StageError):
    """Entropy or response length collapsed; the run stops with the last checkpoint kept."""


class PromptStream:
    """Seeded passes over the prompt records: each epoch a fresh permutation; state (epoch, index)."""

    def __init__(self, records: list[dict], seed: int):
        if not records:     # take() would draw from an empty permutation forever
            raise ValueError("PromptStream needs at least one prompt record")
        self.records, self.seed, self.epoch, self.index = records, seed, 0, 0

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.records), generator=g).tolist()
            while self.index < len(order) and len(out) < n:
                out.append(self.records[order[self.index]])
                self.index += 1
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load(self, state: dict) -> None:
        self.epoch, self.index = int(state.get("epoch", 0)), int(state.get("index", 0))


def training_rows(prompts: list[list[int]], completions, multiple: int, pad: int, length: int = 0):
    """Right-padded rows prompt + completion [n, L] (L a multiple of `multiple`, the token split under
    tp, or `length` when given: a pipeline's fixed row length), targets (the next token on completion
    positions, else IGNORE_INDEX) and the rollout log-probs at the same positions."""
    lens = [len(p) + len(c.ids) for p, c in zip(prompts, completions)]
    L = length or -(-max(lens) // multiple) * multiple
    n = len(prompts)
    tokens = torch.full((n, L), pad, dtype=torch.long)
    targets = torch.full((n, L), IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros(n, L, dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = torch.tensor(p + c.ids)
        tokens[i, :len(seq)] = seq
        a, b = len(p) - 1, len(p) - 1 + len(c.ids)     # position t predicts token t + 1
        targets[i, a:b] = seq[a + 1:b + 1]
        old[i, a:b] = torch.tensor(c.logprobs)
    return tokens, targets, old


def training_allowed(prompts: list[list[int]], completions, length: int) -> torch.Tensor | None:
    """The rollout's allowed sets aligned to training_rows' rows of `length`, as Transformer.token_logprobs'
    `allowed` [2, n] (flat position row * length + t, token id): position t predicts token t + 1, so a
    completion's j-th set sits at len(prompt) - 1 + j. None when no completion recorded one."""
    pos, ids = [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if c.allowed is None:
            continue
        start = i * length + len(p) - 1
        sizes = torch.tensor([len(a) for a in c.allowed], dtype=torch.long)
        pos.append(torch.repeat_interleave(torch.arange(start, start + len(c.allowed)), sizes))
        ids.append(torch.cat(c.allowed).long())
    if not pos:
        return None
    return torch.stack([torch.cat(pos), torch.cat(ids)])


def allowed_rows(allowed: torch.Tensor | None, n: int, length: int) -> torch.Tensor | None:
    """training_allowed's flat pairs as per-row sets [n, length, K] (token ids, -1 padded), which a pipeline
    schedule can split into micro-batches along the rows like every other input."""
    if allowed is None:
        return None
    pos, ids = allowed[0], allowed[1]
    count = torch.bincount(pos, minlength=n * length)
    out = torch.full((n * length, max(int(count.max()), 1)), -1, dtype=torch.long)
    order = torch.argsort(pos, stable=True)
    pos, ids = pos[order], ids[order]
    slot = torch.arange(len(pos)) - (torch.cumsum(count, 0) - count)[pos]
    out[pos, slot] = ids
    return out.view(n, length, -1)


def flat_allowed(rows: torch.Tensor) -> torch.Tensor:
    """allowed_rows' sets [n, length, K] back to token_logprobs' flat pairs [2, m] of those rows."""
    r, t, j = (rows >= 0).nonzero(as_tuple=True)
    return torch.stack([r * rows.shape[1] + t, rows[r, t, j]])


def training_routes(completions, length: int, n_layers: int, k: int) -> torch.Tensor:
    """The rollout's recorded experts aligned to training_rows' rows [n, length, n_layers, k]: each
    completion's routes (prompt + completion, the last token excepted) at their positions, -1 elsewhere
    (padding, the last token, a completion without a record: those route normally)."""
    out = torch.full((len(completions), length, n_layers, k), -1, dtype=torch.long)
    for i, c in enumerate(completions):
        if c.routes is not None:
            out[i, :len(c.routes)] = c.routes
    return out


def generated_fed(prompts, completions, shape) -> torch.Tensor:
    """[n, L] bool: the positions of the generated tokens fed back through the model (each completion's
    tokens but its last), whose routing the rollout recorded."""
    fed = torch.zeros(shape, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        fed[i, len(p):len(p) + len(c.ids) - 1] = True
    return fed


def routing_disagreement(chosen: torch.Tensor, routes: torch.Tensor, prompts, completions) -> tuple[float, float]:
    """(pairs whose top-k set differs, pairs) over the (generated token fed, MoE layer) pairs of the
    completions: chosen [n, L, layers, k] by the training forward, routes the rollout's (-1: no record)."""
    comp = generated_fed(prompts, completions, chosen.shape[:2])[..., None] & (routes >= 0).all(-1)
    differ = (chosen.sort(-1).values != routes.sort(-1).values).any(-1)
    return float((differ & comp).sum()), float(comp.sum())


class GRPOObjective:
    """GRPO's loss on one micro-batch on the last pipeline stage (the engines' objective contract; the pp = 1
    step computes the same per micro-batch in GRPOTrainer.update). `scale` = dp x micro-batches undoes the
    engine's two means (FSDP2's over dp, the pipeline's over micro-batches), so the gradient is that of the
    rollout batch's aggregate; every other term is the micro-batch's sum, which the caller scales back."""
    terms = ("loss", "objective", "clipped", "kl", "entropy", "mismatch", "ratio", "masked")

    def __init__(self, grpo, temperature: float, norm: float, scale: float, mtp_norm: float = 1.0):
        self.g, self.temperature, self.norm, self.scale, self.mtp_norm = grpo, temperature, norm, scale, mtp_norm
        if grpo.mtp_weight > 0:
            self.terms = (*self.terms, "mtp")

    def __call__(self, model, h, tokens, targets, old, adv, mask, rollout, ref=None, weight=None, allowed=None):
        g = self.g
        out = model.token_logprobs(tokens, targets, entropy=True, temperature=self.temperature, h=h,
                                   mtp=g.mtp_weight > 0, allowed=None if allowed is None else flat_allowed(allowed))
        logp = out["logprobs"]
        loss_tok, clipped, kl = grpo_token_terms(logp, old, adv, eps_low=g.eps_low, eps_high=g.eps_high, ref_logp=ref,
                                                 beta=g.beta, kl_clamp=g.kl_clamp, ratio_clamp=g.kl_clamp,
                                                 is_weight=weight)
        masked = logp.new_zeros(())
        if g.offpolicy_mask:
            seq_keep = offpolicy_sequence_keep(rollout, logp, adv, mask, g.offpolicy_mask)
            masked = ((1 - seq_keep) * (mask.sum(-1) > 0)).sum()
            mask = mask * seq_keep[:, None]
        loss = aggregate(loss_tok, mask, g.loss_agg, self.norm)
        with torch.no_grad():
            terms = {"objective": loss.detach(), "clipped": (clipped.float() * mask).sum(),
                     "kl": (kl * mask).sum() if kl is not None else logp.new_zeros(()),
                     "entropy": (out["entropy"] * mask).sum(), "mismatch": ((logp - old).abs() * mask).sum(),
                     "ratio": ((logp - old).exp() * mask).sum(), "masked": masked}
        if g.mtp_weight > 0:   # issue 23 §4: the MTP modules' own CE, their inputs detached (token_logprobs(mtp=))
            mtp = out["mtp_ce"] / self.mtp_norm
            terms["mtp"] = mtp.detach()
            loss = loss + g.mtp_weight * mtp
        return {"loss": loss * self.scale, **terms}


class GRPOTrainer:
    def __init__(self, cfg: PosttrainConfig):
        self.cfg = cfg
        g, d, e = cfg.grpo, cfg.data, cfg.eval
        if not d.train_files:
            raise ConfigError("data.train_files is empty: name the jsonl prompt files (prompt/answer records)")
        if e.every > 0 and not d.valid_files:
            raise ConfigError(f"eval.every = {e.every} but data.valid_files is empty: name the held-out prompt files "
                              "the evaluation scores, or set eval.every=0")
        # the data first: a bad or empty file stops the run before the model is built or loaded
        train = _load_prompts("data.train_files", d.train_files)
        valid = _load_prompts("data.valid_files", d.valid_files) if d.valid_files else []
        self.train_records = [r for _, r in train]
        self.valid_records = [r for _, r in valid]
        self.session = sess = StageSession(cfg, "grpo", items=(g.prompts_per_step * g.group_size,
                                                               "grpo.prompts_per_step x grpo.group_size"))
        dp = sess.dims.dp
        if g.prompts_per_step % dp:
            raise ConfigError(f"grpo.prompts_per_step = {g.prompts_per_step} must be a multiple of the data-parallel "
                              f"size {dp}, so that every rank samples the same number of prompts")
        self.local_prompts = g.prompts_per_step // dp
        self.prompt_ids = {}
        # every prompt that can be drawn, encoded as the generator receives it, must fit with its reply
        self._check_fit(train, cfg.rollout.max_new_tokens, "rollout.max_new_tokens", "data.train_files")
        if e.every > 0:
            n = self._eval_count()
            if n == 0:
                raise ConfigError(f"eval.prompts = {e.prompts} with {len(valid)} held-out prompts in data.valid_files "
                                  f"leaves no prompt for each of the {dp} data-parallel ranks; set eval.prompts (and "
                                  f"hold out at least that many prompts) to >= {dp}, or set eval.every=0")
            budget = "eval.max_new_tokens" if e.max_new_tokens else "rollout.max_new_tokens"
            self._check_fit(valid[:n], e.max_new_tokens or cfg.rollout.max_new_tokens, budget, "data.valid_files")
        self.reward = build_reward(cfg.reward.weights)
        self.stream = PromptStream(self.train_records, cfg.train.seed)
        # the reference in the policy's layout: an engine, whose `score` runs any layout (pp > 1 included)
        self.ref_engine = sess.build_engine(trainable=False) if g.beta > 0 else None
        self.ref = self.ref_engine.stages[0] if self.ref_engine is not None else None
        self.gen_model, self.gen_mesh, self.refit = self._rollout_layout()
        self.refreshed_at = -1
        self.gen = rollout_engine(self.gen_model, sess.tokenizer, cfg.rollout)
        # routing replay (R3): the rollout records the trunk's experts when the routers' token order is the rows'
        # (tp = 1 in both layouts; config.py refuses replay otherwise), for the replay and the routing_mismatch metric
        self.record_routes = (bool(self.gen_model.trunk_moe_layers()) and sess.dims.tp == 1
                              and self.gen_mesh.dims.tp == 1)
        for stage in sess.engine.stages if sess.dims.pp > 1 else ():
            stage.route_replay = g.routing_replay == "rollout"
        r = cfg.rollout
        self.sampling = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                       top_k=r.top_k, stop=list(r.stop), keep_sampling_mask=g.keep_sampling_mask)
        self.low_streak = {"entropy": 0, "length": 0}
        sess.resume(extra_models=[self.ref_engine.stages] if self.ref_engine is not None else [])
        if sess.stage_state:
            self.stream.load(sess.stage_state.get("prompts", {}))
            self.low_streak.update(sess.stage_state.get("low_streak", {}))

    # -- pieces --------------------------------------------------------------------------------------
    def encode(self, record: dict) -> list[int]:
        key = id(record)
        if key not in self.prompt_ids:
            self.prompt_ids[key] = encode_prompt(self.cfg.data.template, self.session.tokenizer, record)
        return self.prompt_ids[key]

    def _rollout_layout(self):
        """(generating model, its mesh, the Refit that refreshes it) for rollout.tp / rollout.ep (0: the training
        layout's), dp = world / tp, no pp. The training layout itself at pp = 1: the policy generates (no copy,
        no Refit). Otherwise a copy in the rollout layout (FSDP2 over its dp, frozen), refreshed from the
        training shards before each generation that follows an update (issue 22 §1). With rollout.compile (one
        process) the copy is plain, without FSDP2, whose hooks a compiled step cannot trace: made when the
        policy is an FSDP2 module (a compute dtype set), else the policy generates."""
        cfg, sess = self.cfg, self.session
        r, dims = cfg.rollout, sess.dims
        if r.compile and dims.world > 1:
            raise ConfigError(f"rollout.compile runs the rollout's steps through torch.compile in one process, and "
                              f"this run has {dims.world} ranks; set rollout.compile=false or run one process")
        tp, ep = r.tp or dims.tp, r.ep or dims.ep
        if dims.pp == 1 and (tp, ep) == (dims.tp, dims.ep) and not (r.compile and is_fsdp(sess.policy)):
            return sess.policy, sess.mesh, None
        what = f"the rollout layout rollout.tp = {tp}, rollout.ep = {ep} (dp = world / tp = {dims.world // tp})"
        try:
            mesh = build_mesh(ParallelConfig(tp=tp, ep=ep, dp=dims.world // tp if dims.world % tp == 0 else 0,
                                             node_size=cfg.parallel.node_size))
            net = parallelize(build_model(sess.model_cfg, device="meta").eval(), mesh,   # in one process, no
                              param_dtype=None if r.compile else DTYPES[cfg.train.dtype])  # dtype: no FSDP2
            init_parallel_weights(net, mesh, cfg.train.seed, sess.device)
            if DTYPES[cfg.train.dtype] is not None:   # it only generates: stored in the compute dtype, whose values
                net.to(DTYPES[cfg.train.dtype])        # FSDP2 would cast to anyway (the pages follow: model.new_cache)
            refit = Refit(sess.engine.stages, sess.mesh, [net], mesh)
        except (LayoutError, ValueError) as e:   # RefitError is a ValueError: it names the tensor and both layouts
            raise ConfigError(f"{what}: {e}; choose rollout.tp dividing the world size and the attention heads, and "
                              "rollout.ep dividing the routed experts and world size") from None
        for q in net.parameters():
            q.requires_grad_(False)
        gdp, G = mesh.dims.dp, cfg.grpo.group_size
        n_eval = self._eval_count() * cfg.eval.samples if cfg.eval.every else 0
        for count, key in ((cfg.grpo.prompts_per_step * G, "grpo.prompts_per_step x grpo.group_size"),
                           (n_eval, "eval.prompts x eval.samples")):
            if count % gdp:
                raise ConfigError(f"{key} = {count} sequences must split evenly over the rollout layout's {gdp} "
                                  f"data-parallel ranks ({what})")
        return net, mesh, refit

    def sample(self, prompts: list[list[int]], params: SamplingParams, seed: int, record_routing: bool = False):
        """(completions, stats) of this training dp rank's prompts (every rank of its group passes the same):
        generated by the policy itself, or under the rollout layout, where each rollout dp rank generates its
        share of every dp rank's prompts (seeded by its rollout dp rank) after a weight refresh, and the
        completions travel back to the training dp ranks in order."""
        sess = self.session
        if self.refit is None:
            return self.gen.generate(prompts, params, seed=seed + sess.dp_rank, record_routing=record_routing)
        if self.refreshed_at != sess.step:   # the first generation after an update (or the load)
            self.refit.refresh()
            self.refreshed_at = sess.step
        tdims, gdims, world = sess.dims, self.gen_mesh.dims, dist.get_world_size()
        every = [None] * world
        dist.all_gather_object(every, prompts)
        leads = [q for rank in range(world) if tdims.coords(rank)["tp"] == 0 and tdims.coords(rank)["pp"] == 0
                 for q in every[rank]]   # one rank per training dp rank, in dp order
        g, n = gdims.coords(sess.rank), len(leads) // gdims.dp
        comps, stats = self.gen.generate(leads[g["dp"] * n:(g["dp"] + 1) * n], params, seed=seed + g["dp"],
                                         record_routing=record_routing)
        counts = {k: float(stats.get(k, 0)) for k in ("tokens", "drafted", "accepted")}
        dist.all_gather_object(every, (comps, counts) if g["tp"] == 0 else None)
        done = [every[rank] for rank in range(world) if gdims.coords(rank)["tp"] == 0]
        allc = [c for part, _ in done for c in part]
        # stats as the training dp ranks sum them (rollout_stats): each holds its share of the totals
        stats = {k: sum(c[k] for _, c in done) / tdims.dp for k in counts}
        return allc[sess.dp_rank * len(prompts):(sess.dp_rank + 1) * len(prompts)], stats

    def _check_fit(self, located: list[tuple[str, dict]], max_new_tokens: int, budget: str, key: str) -> None:
        """Stop at load when a prompt + max_new_tokens exceeds model.max_seq_len (the generator would fail on
        the batch that first draws it), naming the longest prompt's file:line."""
        encoded = []
        for where, record in located:
            try:
                encoded.append((where, self.encode(record)))
            except ValueError as err:     # the template cannot render it (e.g. r1_zero and a system message)
                raise ConfigError(f"{key}: {where}: {err}") from None
        try:
            check_prompt_fit(encoded, max_new_tokens, self.session.model_cfg.max_seq_len, budget=budget,
                             template=self.cfg.data.template)
        except DataError as err:
            raise ConfigError(f"{key}: {err}") from None
        if self.session.dims.pp > 1 and key == "data.train_files" and encoded:   # the rows the stages pass
            where, ids = max(encoded, key=lambda e: len(e[1]))
            if len(ids) + max_new_tokens > self.cfg.data.seq_len:
                raise ConfigError(f"under parallel.pp > 1 GRPO trains on rows of data.seq_len = "
                                  f"{self.cfg.data.seq_len} tokens (the stages pass fixed shapes), and {where} is a "
                                  f"{len(ids)}-token prompt "
                                  f"+ {budget} = {max_new_tokens}; set data.seq_len >= {len(ids) + max_new_tokens}")

    def _eval_count(self) -> int:
        """Held-out prompts per evaluation: eval.prompts (at most all of them), a multiple of the dp size."""
        dp = self.session.dims.dp
        return min(self.cfg.eval.prompts, len(self.valid_records)) // dp * dp

    def _local_slice(self, items: list) -> list:
        n = len(items) // self.session.dims.dp
        return items[self.session.dp_rank * n:(self.session.dp_rank + 1) * n]

    def rollout(self):
        """This rank's prompts, G completions each, their rewards and advantages."""
        cfg, sess, G = self.cfg, self.session, self.cfg.grpo.group_size
        records = self._local_slice(self.stream.take(cfg.grpo.prompts_per_step))
        prompts = [self.encode(r) for r in records for _ in range(G)]
        seed = (cfg.train.seed * 1_000_003 + sess.step) * 4099     # + the generating dp rank; tp ranks draw alike
        completions, gstats = self.sample(prompts, self.sampling, seed, record_routing=self.record_routes)
        scores = [self.reward.score(c.text, rec) for c, rec in zip(completions, (r for r in records for _ in range(G)))]
        rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float64).view(-1, G)
        adv = group_advantages(rewards, cfg.grpo.std_normalize)
        keep = torch.ones_like(rewards)
        if cfg.grpo.dynamic_sampling:
            keep = (rewards.std(dim=1, keepdim=True) > 0).double().expand_as(rewards)
        return prompts, completions, scores, rewards, adv.flatten(), keep.flatten(), gstats

    def loss_normaliser(self, completions, keep: torch.Tensor) -> float:
        g = self.cfg.grpo
        tokens = sum(len(c.ids) * float(k) for c, k in zip(completions, keep))
        seqs = float(keep.sum())
        tot = self.session.all_sum({"tokens": tokens, "seqs": seqs})
        if g.loss_agg == "token_mean":
            return tot["tokens"]
        if g.loss_agg == "seq_mean":
            return tot["seqs"]
        return tot["seqs"] * self.cfg.rollout.max_new_tokens

    def mismatch_stats(self, old, rollout, weight, mask) -> dict[str, float]:
        """How far the trainer's pi_old is from the sampler's pi_rollout on the counted tokens: the k1
        estimate of KL(pi_rollout || pi_old), and the TIS weights' mean and max (when TIS is on). Zero
        mismatch with grpo.old_logprobs=rollout, where pi_old is pi_rollout by definition (no collective then)."""
        if old is rollout:
            return {"mismatch_kl": 0.0}
        sums = {"kl": ((rollout - old) * mask).sum().double(), "tokens": mask.sum().double()}
        if weight is not None:
            sums["w"] = (weight * mask).sum().double()
        tot = self.session.all_sum(sums)
        tok = max(float(tot["tokens"]), 1.0)
        out = {"mismatch_kl": float(tot["kl"]) / tok}
        if weight is not None:
            out["is_weight_mean"] = float(tot["w"]) / tok
            out["is_weight_max"] = self._max(float((weight * mask).max()) if mask.any() else 0.0)
        return out

    def update(self, prompts, completions, adv, keep) -> dict[str, float]:
        """grpo.inner_steps optimizer steps on this rollout batch."""
        cfg, sess, g = self.cfg, self.session, self.cfg.grpo
        if sess.dims.pp > 1:
            return self._update_pipelined(prompts, completions, adv, keep)
        net, mbs = sess.policy, cfg.train.micro_batch_size
        multiple = sequence_multiple(sess.dims, sess.model_cfg.is_moe)
        tokens, targets, old = training_rows(prompts, completions, multiple, sess.tokenizer.eod_id)
        tokens, targets, old = tokens.to(sess.device), targets.to(sess.device), old.to(sess.device)
        adv, keep = adv.float().to(sess.device), keep.float().to(sess.device)
        mask = (targets != IGNORE_INDEX).float() * keep[:, None]
        norm = max(self.loss_normaliser(completions, keep), 1.0)
        n = tokens.shape[0]
        n_micro = -(-n // mbs)
        temperature = self.sampling.temperature or 1.0
        # routing replay: the policy's forwards (old log-probs, the update) force the rollout's experts; the
        # reference keeps its own routing, which is what its log-probs mean (slime and verl replay the actor only)
        routes = None
        if self.record_routes:
            routes = training_routes(completions, tokens.shape[1], len(net.trunk_moe_layers()),
                                     sess.model_cfg.n_activated_experts)
        replay = routes is not None and g.routing_replay == "rollout"

        def forcing(sl):   # set until clear_routing, after the micro-batch's backward (recomputation replays too)
            if replay:
                net.replay_routing(routes[sl].to(sess.device))

        # Keep Sampling Mask: each micro-batch's allowed sets (None: the option is off or nothing was truncated).
        # The reference is masked too: the k3 KL then compares two distributions on the same support, where an
        # unmasked reference would count the truncated tail as divergence the policy cannot remove
        if g.keep_sampling_mask:
            allowed = [training_allowed(prompts[i:i + mbs], completions[i:i + mbs], tokens.shape[1])
                       for i in range(0, n, mbs)]
            allowed = [None if a is None else a.to(sess.device) for a in allowed]
        else:
            allowed = [None] * n_micro
        ref_logp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_logp = torch.cat([self.ref.token_logprobs(tokens[i:i + mbs], targets[i:i + mbs],
                                                              temperature=temperature, allowed=allowed[m])["logprobs"]
                                      for m, i in enumerate(range(0, n, mbs))])
        rollout = old                     # what the sampler recorded: pi_rollout
        if g.old_logprobs == "recompute":
            with torch.no_grad():
                parts = []
                for m, i in enumerate(range(0, n, mbs)):
                    forcing(slice(i, i + mbs))
                    parts.append(net.token_logprobs(tokens[i:i + mbs], targets[i:i + mbs],
                                                    temperature=temperature, allowed=allowed[m])["logprobs"])
                    net.clear_routing()
                old = torch.cat(parts)
        # rollout/training mismatch correction (issue 22 §3): TIS weights and V3.2's sequence masking
        weight = truncated_is_weights(old, rollout, g.tis_cap) if g.tis_cap else None
        correction = self.mismatch_stats(old, rollout, weight, mask)
        # issue 23 §4: the speculative drafter (the MTP modules) learns from the rollouts without changing the
        # policy's update: inputs detached (Transformer.token_logprobs(mtp=True)) and clipped apart
        train_mtp = g.mtp_weight > 0
        mtp_norm = max(sess.all_sum({"t": float((targets != IGNORE_INDEX).sum())})["t"], 1.0) if train_mtp else 1.0
        stats: dict[str, float] = {}
        t0 = time.perf_counter()
        for inner in range(g.inner_steps):
            sums: dict[str, torch.Tensor] = {}
            for m, i in enumerate(range(0, n, mbs)):
                sl = slice(i, i + mbs)
                forcing(sl)
                measure = routes is not None and inner == 0
                if measure:   # the router's own choices (before forcing) against the rollout's
                    net.record_routing()
                out = net.token_logprobs(tokens[sl], targets[sl], entropy=True, temperature=temperature,
                                         mtp=train_mtp, allowed=allowed[m])
                if measure:
                    chosen = net.recorded_routing(forced=False)[0].cpu()
                    net.record_routing(False)
                    differ, pairs = routing_disagreement(chosen, routes[sl], prompts[sl], completions[sl])
                    sums["route_differ"] = sums.get("route_differ", 0.0) + differ
                    sums["route_pairs"] = sums.get("route_pairs", 0.0) + pairs
                logp = out["logprobs"]
                loss_tok, clipped, kl = grpo_token_terms(
                    logp, old[sl], adv[sl], eps_low=g.eps_low, eps_high=g.eps_high,
                    ref_logp=None if ref_logp is None else ref_logp[sl], beta=g.beta, kl_clamp=g.kl_clamp,
                    ratio_clamp=g.kl_clamp, is_weight=None if weight is None else weight[sl])
                mk = mask[sl]
                if g.offpolicy_mask:  # against the current policy, so each inner step decides again
                    seq_keep = offpolicy_sequence_keep(rollout[sl], logp, adv[sl], mk, g.offpolicy_mask)
                    sums["masked"] = sums.get("masked", 0.0) + ((1 - seq_keep) * (mk.sum(-1) > 0)).sum().double()
                    mk = mk * seq_keep[:, None]
                loss = aggregate(loss_tok, mk, g.loss_agg, norm) * sess.dims.dp
                objective = loss
                if train_mtp:   # the MTP modules' own CE on every completion token (their inputs detached)
                    mtp = out["mtp_ce"] / mtp_norm
                    objective = loss + g.mtp_weight * sess.dims.dp * mtp
                    sums["mtp_loss"] = sums.get("mtp_loss", 0.0) + mtp.detach().double()
                set_gradient_sync(net, m == n_micro - 1)
                objective.backward()
                net.clear_routing()
                with torch.no_grad():
                    terms = {"loss": loss.detach().double() / sess.dims.dp,
                             "clipped": (clipped.float() * mk).sum().double(),
                             "kl": (kl * mk).sum().double() if kl is not None else 0.0,
                             "entropy": (out["entropy"] * mk).sum().double(),
                             "mismatch": ((logp.detach() - old[sl]).abs() * mk).sum().double(),
                             "ratio": ((logp.detach() - old[sl]).exp() * mk).sum().double()}
                    for name, v in terms.items():
                        sums[name] = sums.get(name, 0.0) + v
            finish_grad_sync(net, sess.mesh)
            tot = sess.all_sum({**sums, "tokens": float(mask.sum()), "seqs": float((mask.sum(-1) > 0).sum())})
            tok = max(tot["tokens"], 1.0)
            opt = sess.optimizer_step(tot["loss"], apart="mtp." if train_mtp else "")
            if inner == 0:   # against the rollout's own log-probs, before any update: numerics only
                stats.update(logprob_mismatch=tot["mismatch"] / tok, entropy=tot["entropy"] / tok)
                if "route_pairs" in tot:   # share of (completion token, MoE layer) pairs routed differently
                    stats["routing_mismatch"] = float(tot["route_differ"]) / max(float(tot["route_pairs"]), 1.0)
            if train_mtp:
                stats["mtp_loss"] = float(tot["mtp_loss"])
            stats.update(loss=tot["loss"], clip_fraction=tot["clipped"] / tok, kl=tot["kl"] / tok,
                         ratio_mean=tot["ratio"] / tok, **opt)
            if g.offpolicy_mask:
                stats["offpolicy_masked_fraction"] = tot.get("masked", 0.0) / max(tot["seqs"], 1.0)
        stats.update(correction)
        dt = time.perf_counter() - t0
        trained = sess.all_sum({"tokens": float((targets != IGNORE_INDEX).sum()) * g.inner_steps})["tokens"]
        stats["train_tokens_per_s"] = trained / max(dt, 1e-9)
        return stats

    def _update_pipelined(self, prompts, completions, adv, keep) -> dict[str, float]:
        """`update` under parallel.pp > 1: the rows padded to data.seq_len (the stages pass fixed shapes), the
        reference's and (grpo.old_logprobs=recompute) the policy's log-probs scored through the stages, each
        optimizer step the engine's with GRPOObjective on the last stage; the same loss, gradients and metrics
        as the pp = 1 step (tests/test_grpo.py), routing replay (through the stages, without recompute), the
        Keep Sampling Mask (the allowed sets as per-row tensors) and the MTP modules' detached loss included."""
        cfg, sess, g = self.cfg, self.session, self.cfg.grpo
        multiple = sequence_multiple(sess.dims, sess.model_cfg.is_moe)
        tokens, targets, old = (x.to(sess.device) for x in training_rows(prompts, completions, multiple,
                                                                         sess.tokenizer.eod_id, cfg.data.seq_len))
        adv, keep = adv.float().to(sess.device), keep.float().to(sess.device)
        mask = (targets != IGNORE_INDEX).float() * keep[:, None]
        norm = max(self.loss_normaliser(completions, keep), 1.0)
        temperature = self.sampling.temperature or 1.0

        def logprobs(model, h, tok, tgt, allowed=None):
            return model.token_logprobs(tok, tgt, temperature=temperature, h=h,
                                        allowed=None if allowed is None else flat_allowed(allowed))["logprobs"]

        inputs = {"adv": adv, "mask": mask}
        # Keep Sampling Mask: the sampler's allowed sets per row (the reference is masked too, as at pp = 1)
        allowed = allowed_rows(training_allowed(prompts, completions, tokens.shape[1]), tokens.shape[0],
                               tokens.shape[1]) if g.keep_sampling_mask else None
        masking = {} if allowed is None else {"allowed": allowed.to(sess.device)}
        inputs.update(masking)
        if self.ref_engine is not None:   # the reference keeps its own routing (what its log-probs mean)
            inputs["ref"] = self.ref_engine.score(tokens, targets, logprobs, **masking)
        # routing replay through the stages: each stage forces its MoE layers' columns of the recorded routes for
        # the micro-batch's forward (StageModel.forward); the first step also compares the routers' own choices
        replay, compare = {}, {}
        if self.record_routes:
            routes = training_routes(completions, tokens.shape[1], len(self.gen_model.trunk_moe_layers()),
                                     sess.model_cfg.n_activated_experts).to(sess.device)
            fed = generated_fed(prompts, completions, tokens.shape).to(sess.device)
            compare = {"routes": routes, "route_pairs": fed}
            if g.routing_replay == "rollout":
                replay = {"routes": routes}
        rollout = old
        if g.old_logprobs == "recompute":
            old = sess.engine.score(tokens, targets, logprobs, **replay, **masking)
        weight = truncated_is_weights(old, rollout, g.tis_cap) if g.tis_cap else None
        if weight is not None:
            inputs["weight"] = weight
        correction = self.mismatch_stats(old, rollout, weight, mask)
        n_micro, dp = tokens.shape[0] // cfg.train.micro_batch_size, sess.dims.dp
        mtp_norm = max(sess.all_sum({"t": float((targets != IGNORE_INDEX).sum())})["t"], 1.0) if g.mtp_weight else 1.0
        objective = GRPOObjective(g, temperature, norm, scale=dp * n_micro, mtp_norm=mtp_norm)
        counts = sess.all_sum({"tokens": float(mask.sum()), "seqs": float((mask.sum(-1) > 0).sum())})
        tok = max(counts["tokens"], 1.0)
        stats: dict[str, float] = {}
        t0 = time.perf_counter()
        for inner in range(g.inner_steps):
            for stage in sess.engine.stages:
                stage.route_counts.zero_()
            terms = sess.engine.step(tokens, targets, objective=objective, old=old, rollout=rollout, **inputs,
                                     **(compare if inner == 0 else replay))
            tot = {k: v * n_micro * dp for k, v in terms.items()}   # the engine's means back to sums
            opt = sess.optimizer_step(tot["objective"], apart="mtp." if g.mtp_weight else "")
            if g.mtp_weight:
                stats["mtp_loss"] = tot["mtp"]
            if inner == 0:   # against the rollout's own log-probs, before any update: numerics only
                stats.update(logprob_mismatch=tot["mismatch"] / tok, entropy=tot["entropy"] / tok)
                if compare:   # every (token, layer) pair once: stages hold distinct layers, dp ranks distinct rows
                    mine = sum(s.route_counts for s in sess.engine.stages)
                    rc = sess.all_sum({"differ": float(mine[0]), "pairs": float(mine[1])}, group="world")
                    stats["routing_mismatch"] = rc["differ"] / max(rc["pairs"], 1.0)
            stats.update(loss=tot["objective"], clip_fraction=tot["clipped"] / tok, kl=tot["kl"] / tok,
                         ratio_mean=tot["ratio"] / tok, **opt)
            if g.offpolicy_mask:
                stats["offpolicy_masked_fraction"] = tot["masked"] / max(counts["seqs"], 1.0)
        stats.update(correction)
        dt = time.perf_counter() - t0
        trained = sess.all_sum({"tokens": float((targets != IGNORE_INDEX).sum()) * g.inner_steps})["tokens"]
        stats["train_tokens_per_s"] = trained / max(dt, 1e-9)
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy and format rate over eval.prompts prompts, split over dp ranks: greedy, or pass@1
        averaged over eval.samples samples per prompt (R1's protocol: temperature 0.6, top-p 0.95). Each
        prompt's score goes to RUN_DIR/eval/step_NNNNNNNN.jsonl, so that two evaluations of the same
        prompts can be compared prompt by prompt (posttrain.demo's paired interval)."""
        cfg, sess, e = self.cfg, self.session, self.cfg.eval
        n = self._eval_count()
        if n == 0:
            return {}
        first = sess.dp_rank * (n // sess.dims.dp)
        records = self.valid_records[first:first + n // sess.dims.dp]
        k = e.samples
        params = SamplingParams(max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens,
                                temperature=e.temperature, top_p=e.top_p, stop=list(cfg.rollout.stop))
        outs, _ = self.sample([self.encode(r) for r in records for _ in range(k)], params, seed=cfg.train.seed)
        rows = []
        for i, r in enumerate(records):
            scores = [self.reward.score(c.text, r) for c in outs[i * k:(i + 1) * k]]
            rows.append({"index": first + i, "prompt": r.get("prompt"), "answer": r.get("answer"),
                         "accuracy": sum(verified(s) for s in scores) / k,
                         "format": sum(s.get("format", 0.0) for s in scores) / k, "response": outs[i * k].text})
        self._write_eval(rows)
        tot = sess.all_sum({"accuracy": sum(x["accuracy"] for x in rows), "format": sum(x["format"] for x in rows)})
        return {"eval_accuracy": tot["accuracy"] / n, "eval_format": tot["format"] / n, "eval_prompts": float(n),
                "eval_samples": float(k)}

    def _write_eval(self, rows: list[dict]) -> None:
        """Per-prompt evaluation rows, gathered over dp to rank 0 (tp ranks hold copies) and renamed into place."""
        sess = self.session
        parts = sess.gather_dp(rows)
        if sess.rank == 0:
            path = sess.run_dir / "eval" / f"step_{sess.step:08d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for part in parts:
                    for row in part:
                        f.write(json.dumps(row) + "\n")
            os.replace(tmp, path)

    def guard(self, entropy: float, length: float) -> None:
        """Stop on entropy or length collapse (a floor crossed for grpo.collapse_patience batches in a row)."""
        g = self.cfg.grpo
        for key, value, floor, name in (("entropy", entropy, g.entropy_floor, "grpo.entropy_floor"),
                                        ("length", length, g.min_response_len, "grpo.min_response_len")):
            self.low_streak[key] = self.low_streak[key] + 1 if floor and value < floor else 0
            if self.low_streak[key] >= g.collapse_patience:
                raise CollapseError(
                    f"{key} collapsed: {value:.4g} < {name} = {floor} for {self.low_streak[key]} rollout batches in a "
                    f"row. The policy has stopped exploring (entropy) or answers with almost nothing (length). Lower "
                    f"train.lr, raise rollout.temperature or grpo.eps_high (clip-higher), or add grpo.beta, then "
                    f"resume from the last checkpoint in {self.session.ckpt_dir}")

    # -- the loop ------------------------------------------------------------------------------------
    def rollout_stats(self, completions, scores, rewards, keep, gstats, t_roll: float) -> dict[str, float]:
        """The rollout batch's rewards, accuracy, format rate, lengths and dropped groups over all dp ranks."""
        lengths = [len(c.ids) for c in completions]
        tot = self.session.all_sum({
            "reward": float(rewards.sum()), "reward_sq": float((rewards ** 2).sum()), "n": float(rewards.numel()),
            "accuracy": sum(s.get("accuracy", s.get("countdown", 0.0)) for s in scores),
            "format": sum(s.get("format", 0.0) for s in scores), "length": float(sum(lengths)),
            "dropped": float(keep.numel() - keep.sum()), "rollout_tokens": gstats["tokens"],
            "drafted": float(gstats.get("drafted", 0)), "accepted": float(gstats.get("accepted", 0))})
        n = tot["n"]
        mean = tot["reward"] / n
        spec = {"rollout_acceptance": tot["accepted"] / tot["drafted"]} if tot["drafted"] else {}
        return spec | dict(reward_mean=mean, reward_std=math.sqrt(max(tot["reward_sq"] / n - mean ** 2, 0.0)),
                    accuracy=tot["accuracy"] / n, format_rate=tot["format"] / n,
                    response_length_mean=tot["length"] / n, response_length_max=self._max(float(max(lengths))),
                    dropped_fraction=tot["dropped"] / n, rollout_tokens_per_s=tot["rollout_tokens"] / max(t_roll, 1e-9))

    def run(self) -> int:
        cfg, sess = self.cfg, self.session
        last = cfg.train.steps
        refs = [self.ref_engine.stages] if self.ref_engine is not None else []
        try:
            tools = sess.open_tools()
            if cfg.eval.every and sess.step == 0:
                sess.log(self.evaluate())
            while sess.step < last:
                t0 = time.perf_counter()
                with tools.step(sess.step + 1):  # watchdog, profiler window, memory history (pretrain.operate)
                    prompts, completions, scores, rewards, adv, keep, gstats = self.rollout()
                    t_roll = time.perf_counter() - t0
                    metrics = self.update(prompts, completions, adv, keep)
                sess.step += 1
                metrics.update(self.rollout_stats(completions, scores, rewards, keep, gstats, t_roll))
                if cfg.grpo.ref_update_every and self.ref is not None and sess.step % cfg.grpo.ref_update_every == 0:
                    for ref, net in zip(self.ref_engine.stages, sess.engine.stages):
                        sess.copy_weights(ref, net)       # R1-Zero: the reference follows the policy
                    metrics["reference_updated"] = 1.0
                stage_state = {"prompts": self.stream.state(), "low_streak": dict(self.low_streak)}
                sess.end_step(metrics, last, self.evaluate, stage_state, extra_models=refs)
                self.guard(metrics["entropy"], metrics["response_length_mean"])
            return 0
        finally:
            sess.close()

    def _max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.session.device)
        comm.all_reduce(t, self.session.mesh["dp"], op=torch.distributed.ReduceOp.MAX)
        return float(t.item())


def main(argv: list[str] | None = None) -> int:
    return stage_main(GRPOTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())
