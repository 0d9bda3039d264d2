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
    log, validate on data.valid_files pairs, checkpoint (the iterator position goes into it)

Every rank runs the same number of forwards (the same pairs per rank and micro-batches per step), which
FSDP2's gathers and the MoE all-to-alls need. The reference is not checkpointed: it is init.checkpoint.
"""
from __future__ import annotations

import sys

import torch

from model.transformer import IGNORE_INDEX
from parallel import finish_grad_sync, sequence_multiple, set_gradient_sync
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


def pair_rows(pairs: list[tuple[Example, Example]], multiple: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows [2n, L] (the n chosen, then the n rejected; L a multiple of `multiple`, the
    token split under tp) and their targets: the next token where it is a reply token, else IGNORE_INDEX."""
    examples = [c for c, _ in pairs] + [r for _, r in pairs]
    L = -(-max(map(len, examples)) // multiple) * multiple
    tokens = torch.full((len(examples), L), pad, dtype=torch.long)
    targets = torch.full((len(examples), L), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        ids, mask = torch.tensor(ex.input_ids), torch.tensor(ex.loss_mask, dtype=torch.bool)
        tokens[i, :len(ids)] = ids
        targets[i, :len(ids) - 1] = torch.where(mask[1:], ids[1:], IGNORE_INDEX)
    return tokens, targets


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
        self.session = sess = StageSession(cfg, "dpo")
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
        self.ref = sess.build(trainable=False)
        sess.resume()
        if sess.stage_state:
            self.it.load_state_dict(sess.stage_state["iterator"])

    def _encode(self, located):
        d = self.cfg.data
        return encode_pairs(located, self.session.tokenizer, d.template, d.seq_len, d.overflow)

    def _terms(self, pairs: list, backward: bool) -> dict[str, float]:
        """Loss and implicit rewards over this rank's pairs, averaged over all dp ranks' pairs; with
        `backward`, the gradient of that mean loss (synchronised)."""
        sess, dpo, mbs = self.session, self.cfg.dpo, self.cfg.train.micro_batch_size
        net, n_micro = sess.policy, len(pairs) // mbs
        sums: dict[str, torch.Tensor] = {}
        tokens_seen = 0
        for m in range(n_micro):
            micro = pairs[m * mbs:(m + 1) * mbs]
            tokens, targets = pair_rows(micro, self.multiple, sess.tokenizer.eod_id)
            tokens, targets = tokens.to(sess.device), targets.to(sess.device)
            with torch.no_grad():
                ref = self.ref.token_logprobs(tokens, targets)["logprobs"].sum(-1)
            logp = net.token_logprobs(tokens, targets)["logprobs"].sum(-1)
            k = tokens.shape[0] // 2
            loss, _ = dpo_loss(logp[:k], logp[k:], ref[:k], ref[k:], beta=dpo.beta, label_smoothing=dpo.label_smoothing)
            if backward:
                set_gradient_sync(net, m == n_micro - 1)
                (loss.sum() / len(pairs)).backward()    # FSDP2 averages over dp: the global mean
            with torch.no_grad():
                rewards = dpo.beta * (logp.detach() - ref).double()
                chosen, rejected = rewards[:k], rewards[k:]
                terms = {"loss": loss.detach().double().sum(), "chosen": chosen.sum(), "rejected": rejected.sum(),
                         "correct": (chosen > rejected).double().sum()}
                for name, v in terms.items():
                    sums[name] = sums.get(name, 0.0) + v
            tokens_seen += sum(len(c) + len(r) for c, r in micro)
        if backward:
            finish_grad_sync(net, sess.mesh)
        tot = sess.all_sum({**sums, "tokens": tokens_seen, "pairs": len(pairs)})
        n = tot["pairs"]
        return {"loss": tot["loss"] / n, "reward_chosen": tot["chosen"] / n, "reward_rejected": tot["rejected"] / n,
                "reward_margin": (tot["chosen"] - tot["rejected"]) / n, "reward_accuracy": tot["correct"] / n,
                "tokens": tot["tokens"]}

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
        sess.policy.eval()
        out = self._terms(self.valid[sess.dp_rank * n:(sess.dp_rank + 1) * n], backward=False)
        sess.policy.train()
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
