"""Supervised fine-tuning (R1 §2.3.1 cold start, §2.3.3 the 800K-sample SFT; distillation is this
stage on teacher outputs): `python -m posttrain.sft --config FILE [key=value ...]`.

One step, top to bottom:
    batch = this dp rank's rows of the next global batch of packed rows (resumable, epoch-aware)
    loss  = next-token loss on the assistant tokens only; attention and targets never cross a
            document boundary inside a packed row (doc_ids)
    opt   = clip, AdamW at the scheduled lr (non-finite steps skipped)
    log, validate on held-out rows, checkpoint (the iterator position goes into the checkpoint)
"""
from __future__ import annotations

import sys

import torch

from parallel import sequence_multiple
from pretrain.config import ConfigError

from .config import PosttrainConfig
from .data import DataError, PackedIterator, pack_examples, read_sft_records, tokenize_sft_records
from .stage import StageSession, stage_main


def _read(key: str, files: list[str]) -> list[tuple[str, dict]]:
    """The validated records of one config key's files; a bad or empty file is a ConfigError naming both."""
    try:
        return read_sft_records(files)
    except (OSError, DataError) as e:
        raise ConfigError(f"{key}: {e}") from None


class SFTTrainer:
    """Supervised fine-tuning on packed, document-masked rows."""

    def __init__(self, cfg: PosttrainConfig, stage: str = "sft"):
        self.cfg = cfg
        d, t = cfg.data, cfg.train
        if not d.train_files:
            raise ConfigError("data.train_files is empty: "
                              "name the jsonl files of conversations or prompt/response records")
        # the data first: a bad or empty file stops the run before the model is built or loaded
        train = _read("data.train_files", d.train_files)
        valid = _read("data.valid_files", d.valid_files) if d.valid_files else None
        self.session = sess = StageSession(cfg, stage)
        dp = sess.dims.dp
        if t.global_batch_size % (dp * t.micro_batch_size):
            raise ConfigError(f"train.global_batch_size = {t.global_batch_size} must be a multiple of "
                              f"train.micro_batch_size ({t.micro_batch_size}) x the data-parallel size ({dp})")
        multiple = sequence_multiple(sess.dims, sess.model_cfg.is_moe)
        if d.seq_len % multiple or d.seq_len > sess.model_cfg.max_seq_len:
            raise ConfigError(f"data.seq_len = {d.seq_len} must be a multiple of parallel.tp = {multiple} "
                              f"(the token split) and at most model.max_seq_len = {sess.model_cfg.max_seq_len}")
        try:
            self.rows = self._pack(train)
            self.valid = self._pack(valid) if valid is not None else None
        except (DataError, ValueError) as e:
            raise ConfigError(f"data: {e}") from None
        self.per_rank = t.global_batch_size // dp
        try:
            self.it = PackedIterator(self.rows, self.per_rank, seed=t.seed, dp_rank=sess.dp_rank, dp_size=dp)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None
        self.steps = d.epochs * self.it.batches_per_epoch if d.epochs > 0 else t.steps
        sess.total_steps = self.steps
        self.last = min(t.exit_at_step or self.steps, self.steps)   # save and stop there, same schedule
        sess.resume()
        if sess.stage_state:
            self.it.load_state_dict(sess.stage_state["iterator"])

    def _pack(self, located):
        examples = tokenize_sft_records(located, self.session.tokenizer, self.cfg.data.template)
        return pack_examples(examples, self.cfg.data.seq_len, seed=self.cfg.train.seed, overflow=self.cfg.data.overflow,
                             pad_id=self.session.tokenizer.eod_id)

    def _rows(self, batch: dict) -> dict[str, torch.Tensor]:
        """A batch of packed rows as the engine's step and evaluate take it (doc_ids mask the documents)."""
        device = self.session.device
        return {"tokens": batch["input_ids"].to(device), "labels": batch["labels"].to(device),
                "doc_ids": batch["doc_ids"].to(device)}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.valid is None:
            return {}
        sess = self.session
        n = len(self.valid) // (sess.dims.dp * self.cfg.train.micro_batch_size) * self.cfg.train.micro_batch_size
        if n == 0:
            return {}
        rows = self.valid[torch.arange(sess.dp_rank * n, (sess.dp_rank + 1) * n)]
        out = sess.engine.evaluate(**self._rows(rows))
        return {f"val_{k}": v for k, v in out.items() if k in ("lm_loss", "mtp_loss")}

    def step(self) -> tuple[dict, dict]:
        cfg, sess = self.cfg, self.session
        torch.manual_seed(cfg.train.seed * 1_000_003 + sess.step)
        batch = next(self.it)
        metrics = sess.engine.step(**self._rows(batch))
        metrics.update(sess.optimizer_step(metrics["loss"]), epoch=float(batch["epoch"]))
        targets = sess.all_sum({"targets": float((batch["labels"] != -100).sum())})["targets"]
        return metrics, {"target_tokens_per_s": targets, "tokens_per_s": cfg.train.global_batch_size * cfg.data.seq_len}

    def run(self) -> int:
        return self.session.train_loop(self.last, self.step, self.evaluate, lambda: {"iterator": self.it.state_dict()})


def main(argv: list[str] | None = None) -> int:
    return stage_main(SFTTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())
