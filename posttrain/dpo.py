"""Direct preference optimisation: `python -m posttrain.dpo --config FILE [key=value ...]`. DeepSeek LLM
(arXiv 2401.02954) §5 aligns its chat model with DPO; the loss is Rafailov et al. 2023, eq. 7.

One step, top to bottom:
    pairs  = this dp rank's share of train.global_batch_size preference pairs (seeded, resumable epochs)
    logp   = log pi(reply | prompt) summed over the reply's tokens and its end-of-document (the prompt is
             masked), chosen and rejected rows in one forward, under the policy and under a frozen
             reference (init.checkpoint); under tp the logits stay split over the vocabulary
    loss   = -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))) averaged over the global batch
             (dpo.label_smoothing > 0: conservative DPO)
    opt    = micro-batches accumulate, FSDP2 reduces after the last; clip, AdamW at the scheduled lr
             (the engine's step with DPOObjective: under pp > 1 the objective runs on the last stage and the
             reference scores through the pipeline, with rows padded to data.seq_len)
    log, validate on data.valid_files pairs, checkpoint (the iterator position goes into it)

Every rank runs the same number of forwards (the same pairs per rank and micro-batches per step), which
FSDP2's gathers and the MoE all-to-alls need. The reference is not checkpointed: it is init.checkpoint.
"""
from __future__ import annotations

import sys

import torch

from model.transformer import IGNORE_INDEX
from parallel import sequence_multiple
from pretrain.config import ConfigError

from .config import PosttrainConfig
from .data import (DataError, Example, PackedIterator, load_preference_pairs, pair_conversations,
                   tokenize_conversation)
from .objectives import dpo_loss
from .stage import StageSession, stage_main
from .templates import get_template


def encode_pairs(located: list[tuple[str, dict]], tokenizer, template: str, seq_len: int,
                 overflow: str = "truncate") -> tuple[list[tuple[Example, Example]], dict[str, int]]:
    """(chosen, rejected) token ids and loss masks (the reply and its EOD) of each pair, at most seq_len
    tokens: a longer one is cut at seq_len (overflow="truncate"; dropped if its reply is cut away) or
    dropped (overflow="drop"). A pair the template cannot render is an error naming file:line."""
    template = get_template(template)
    out, errors, stats = [], [], {"truncated": 0, "dropped": 0}
    for where, pair in located:
        try:
            c, r = (Example(*tokenize_conversation(template, tokenizer, conv)) for conv in pair_conversations(pair))
        except ValueError as e:
            errors.append(f"{where}: {e}")
            continue
        too_long = max(len(c), len(r)) > seq_len
        c, r = (Example(e.input_ids[:seq_len], e.loss_mask[:seq_len]) for e in (c, r))
        if (too_long and overflow == "drop") or not (c.n_targets and r.n_targets):
            stats["dropped"] += 1
            continue
        stats["truncated"] += too_long
        out.append((c, r))
    if errors:
        raise DataError(f"{len(errors)} pair(s) cannot be used with the {template.name} template:\n  "
                        + "\n  ".join(errors[:10]))
    return out, stats


def pair_rows(pairs: list[tuple[Example, Example]], multiple: int, pad: int,
              length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows [2n, L] (the n chosen, then the n rejected; L a multiple of `multiple`, the
    token split under tp, or `length` when given) and their targets: the next token where it is a reply
    token, else IGNORE_INDEX."""
    examples = [c for c, _ in pairs] + [r for _, r in pairs]
    L = length or -(-max(map(len, examples)) // multiple) * multiple
    tokens = torch.full((len(examples), L), pad, dtype=torch.long)
    targets = torch.full((len(examples), L), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        ids, mask = torch.tensor(ex.input_ids), torch.tensor(ex.loss_mask, dtype=torch.bool)
        tokens[i, :len(ids)] = ids
        targets[i, :len(ids) - 1] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
    return tokens, targets


def token_logprobs(model, h, tokens, targets):
    """The engines' scoring function: log pi(target | prefix) per position (h: a pipeline stage's input)."""
    return model.token_logprobs(tokens, targets, h=h)["logprobs"]


class DPOObjective:
    """One micro-batch's DPO terms on the last stage (the engines' objective contract): the rows are its
    pairs' chosen then rejected replies, `ref` the reference's summed log-probs per row. Each term is the
    micro-batch's mean over pairs; the engine averages micro-batches (equal sizes) and dp ranks."""
    terms = ("loss", "chosen", "rejected", "correct")

    def __init__(self, beta: float, label_smoothing: float):
        self.beta, self.label_smoothing = beta, label_smoothing

    def __call__(self, model, h, tokens, targets, ref):
        logp = token_logprobs(model, h, tokens, targets).sum(-1)
        return dpo_terms(logp, ref, self.beta, self.label_smoothing)


def dpo_terms(logp: torch.Tensor, ref: torch.Tensor, beta: float, label_smoothing: float) -> dict:
    k = logp.shape[0] // 2
    loss, _ = dpo_loss(logp[:k], logp[k:], ref[:k], ref[k:], beta=beta, label_smoothing=label_smoothing)
    with torch.no_grad():
        rewards = beta * (logp.detach() - ref).double()
        chosen, rejected = rewards[:k], rewards[k:]
    return {"loss": loss.mean(), "chosen": chosen.mean(), "rejected": rejected.mean(),
            "correct": (chosen > rejected).double().mean()}


class _PairSet:
    """Pairs indexed like PackedRows, so PackedIterator's seeded, resumable epochs apply unchanged."""

    def __init__(self, pairs: list):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, idx: torch.Tensor) -> dict:
        return {"pairs": [self.pairs[i] for i in idx.tolist()]}


def _read(key: str, files: list[str]) -> list[tuple[str, dict]]:
    """The validated pairs of one config key's files; a bad or empty file is a ConfigError naming both."""
    try:
        return load_preference_pairs(files)
    except (OSError, DataError) as e:
        raise ConfigError(f"{key}: {e}") from None


class DPOTrainer:
    """DPO against a frozen copy of the starting policy."""

    def __init__(self, cfg: PosttrainConfig):
        self.cfg = cfg
        d, t = cfg.data, cfg.train
        if not d.train_files:
            raise ConfigError('data.train_files is empty: name the jsonl files of preference pairs '
                              '{"prompt", "chosen", "rejected"}')
        # the data first: a bad or empty file stops the run before the model is built or loaded
        train = _read("data.train_files", d.train_files)
        valid = _read("data.valid_files", d.valid_files) if d.valid_files else []
        self.session = sess = StageSession(cfg, "dpo", rows_per_item=2)   # a pair is two rows
        dp = sess.dims.dp
        if t.global_batch_size % (dp * t.micro_batch_size):
            raise ConfigError(f"train.global_batch_size = {t.global_batch_size} (pairs) must be a multiple of "
                              f"train.micro_batch_size ({t.micro_batch_size}) x the data-parallel size ({dp})")
        if d.seq_len > sess.model_cfg.max_seq_len:
            raise ConfigError(f"data.seq_len = {d.seq_len} exceeds model.max_seq_len = {sess.model_cfg.max_seq_len}")
        self.multiple = sequence_multiple(sess.dims, sess.model_cfg.is_moe)
        try:
            self.pairs, self.stats = self._encode(train)
            self.valid = self._encode(valid)[0] if valid else []
        except DataError as e:
            raise ConfigError(f"data: {e}") from None
        if sess.rank == 0 and (self.stats["truncated"] or self.stats["dropped"]):
            print(f"dpo: {self.stats['truncated']} pairs truncated to data.seq_len = {d.seq_len}, "
                  f"{self.stats['dropped']} dropped (data.overflow = {d.overflow}, or no reply token left)", flush=True)
        if len(self.pairs) < t.global_batch_size:
            raise ConfigError(f"data.train_files hold {len(self.pairs)} usable pairs, fewer than one global batch "
                              f"(train.global_batch_size = {t.global_batch_size})")
        self.it = PackedIterator(_PairSet(self.pairs), t.global_batch_size // dp, seed=t.seed, dp_rank=sess.dp_rank,
                                 dp_size=dp)
        self.steps = d.epochs * self.it.batches_per_epoch if d.epochs > 0 else t.steps
        sess.total_steps = self.steps
        self.last = min(t.exit_at_step or self.steps, self.steps)
        self.ref = sess.build_engine(trainable=False)   # the reference in the policy's layout
        sess.resume()
        if sess.stage_state:
            self.it.load_state_dict(sess.stage_state["iterator"])

    def _encode(self, located):
        d = self.cfg.data
        return encode_pairs(located, self.session.tokenizer, d.template, d.seq_len, d.overflow)

    def _rows(self, pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batches' rows stacked [2 x pairs, L]: L is data.seq_len under a pipeline (its stages
        pass fixed shapes), else the longest reply row of the step (rounded to the tp split)."""
        sess, mbs = self.session, self.cfg.train.micro_batch_size
        L = self.cfg.data.seq_len if sess.dims.pp > 1 else 0
        if not L:
            L = -(-max(len(e.input_ids) for pair in pairs for e in pair) // self.multiple) * self.multiple
        parts = [pair_rows(pairs[i:i + mbs], self.multiple, sess.tokenizer.eod_id, L)
                 for i in range(0, len(pairs), mbs)]
        return torch.cat([t for t, _ in parts]).to(sess.device), torch.cat([y for _, y in parts]).to(sess.device)

    def _terms(self, pairs: list, backward: bool) -> dict[str, float]:
        """Loss and implicit rewards over this rank's pairs, averaged over all dp ranks' pairs; with
        `backward`, the gradient of that mean loss (synchronised). Through the engines (any layout, pp > 1
        included): the reference scores the rows forward only, the policy's step runs DPOObjective."""
        sess, dpo = self.session, self.cfg.dpo
        tokens, targets = self._rows(pairs)
        ref = self.ref.score(tokens, targets, token_logprobs).sum(-1)
        if backward:
            terms = sess.engine.step(tokens, targets, objective=DPOObjective(dpo.beta, dpo.label_smoothing), ref=ref)
        else:   # validation: the policy scored forward only, the terms per micro-batch as the objective's
            logp, mbs = sess.engine.score(tokens, targets, token_logprobs).sum(-1), 2 * self.cfg.train.micro_batch_size
            parts = [dpo_terms(logp[i:i + mbs], ref[i:i + mbs], dpo.beta, dpo.label_smoothing)
                     for i in range(0, tokens.shape[0], mbs)]
            sums = sess.all_sum({k: sum(float(p[k]) for p in parts) for k in DPOObjective.terms})
            terms = {k: v / (len(parts) * sess.dims.dp) for k, v in sums.items()}
        tokens_seen = sess.all_sum({"t": float(sum(len(c) + len(r) for c, r in pairs))})["t"]
        return {"loss": terms["loss"], "reward_chosen": terms["chosen"], "reward_rejected": terms["rejected"],
                "reward_margin": terms["chosen"] - terms["rejected"], "reward_accuracy": terms["correct"],
                "tokens": tokens_seen}

    def train_step(self, pairs: list) -> dict[str, float]:
        metrics = self._terms(pairs, backward=True)
        metrics.update(self.session.optimizer_step(metrics["loss"]))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and preference accuracy on the held-out pairs, split evenly over the dp ranks."""
        sess, mbs = self.session, self.cfg.train.micro_batch_size
        n = len(self.valid) // (sess.dims.dp * mbs) * mbs
        if n == 0:
            return {}
        for net in sess.engine.stages:
            net.eval()
        try:
            out = self._terms(self.valid[sess.dp_rank * n:(sess.dp_rank + 1) * n], backward=False)
        finally:
            for net in sess.engine.stages:
                net.train()
        return {f"val_{k}": out[k] for k in ("loss", "reward_accuracy", "reward_margin")}

    def step(self) -> tuple[dict, dict]:
        batch = next(self.it)
        metrics = self.train_step(batch["pairs"])
        metrics["epoch"] = float(batch["epoch"])
        return metrics, {"tokens_per_s": metrics.pop("tokens")}

    def run(self) -> int:
        return self.session.train_loop(self.last, self.step, self.evaluate, lambda: {"iterator": self.it.state_dict()})


def main(argv: list[str] | None = None) -> int:
    return stage_main(DPOTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())
