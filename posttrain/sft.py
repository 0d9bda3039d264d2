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

from pretrain.config import ConfigError
from pretrain.train import micro_batch_losses

from .config import PosttrainConfig
from .data import DataError, PackedIterator, load_sft_examples, pack_examples
from .runtime import Runtime, stage_main


class SFTTrainer:
    """Supervised fine-tuning on packed, document-masked rows."""

    def __init__(self, cfg: PosttrainConfig, stage: str = "sft"):
        self.cfg = cfg
        self.rt = rt = Runtime(cfg, stage)
        d, t = cfg.data, cfg.train
        if not d.train_files:
            raise ConfigError("data.train_files is empty: name the jsonl files of conversations or prompt/response records")
        dp = rt.dims.dp
        if t.global_batch_size % (dp * t.micro_batch_size):
            raise ConfigError(f"train.global_batch_size = {t.global_batch_size} must be a multiple of train.micro_batch_size "
                              f"({t.micro_batch_size}) x the data-parallel size ({dp})")
        multiple = rt.dims.tp if rt.dims.tp > 1 and (rt.model_cfg.is_moe or cfg.parallel.sp) else 1
        if d.seq_len % multiple or d.seq_len > rt.model_cfg.max_seq_len:
            raise ConfigError(f"data.seq_len = {d.seq_len} must be a multiple of parallel.tp = {multiple} (the token split) "
                              f"and at most model.max_seq_len = {rt.model_cfg.max_seq_len}")
        try:
            self.rows = self._pack(d.train_files)
            self.valid = self._pack(d.valid_files) if d.valid_files else None
        except (OSError, DataError, ValueError) as e:
            raise ConfigError(f"data: {e}") from None
        self.per_rank = t.global_batch_size // dp
        try:
            self.it = PackedIterator(self.rows, self.per_rank, seed=t.seed, dp_rank=rt.dp_rank, dp_size=dp)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None
        self.steps = d.epochs * self.it.batches_per_epoch if d.epochs > 0 else t.steps
        rt.total_steps = self.steps
        self.last = min(t.exit_at_step or self.steps, self.steps)   # save and stop there, same schedule
        rt.resume()
        if rt.extra_state:
            self.it.load_state_dict(rt.extra_state["iterator"])

    def _pack(self, files):
        examples = load_sft_examples(files, self.rt.tokenizer, self.cfg.data.template)
        return pack_examples(examples, self.cfg.data.seq_len, seed=self.cfg.train.seed, overflow=self.cfg.data.overflow,
                             pad_id=self.rt.tokenizer.eod_id)

    def _micro_batches(self, batch: dict, backward: bool) -> dict[str, float]:
        """The loss terms averaged over micro-batches and dp ranks (with `backward`, their gradients)."""
        rt, mbs = self.rt, self.cfg.train.micro_batch_size
        n_micro = batch["input_ids"].shape[0] // mbs
        return micro_batch_losses(rt.policy, rt.mesh, [
            {"tokens": batch["input_ids"][m * mbs:(m + 1) * mbs].to(rt.device),
             "labels": batch["labels"][m * mbs:(m + 1) * mbs].to(rt.device),
             "doc_ids": batch["doc_ids"][m * mbs:(m + 1) * mbs].to(rt.device)} for m in range(n_micro)], backward)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.valid is None:
            return {}
        rt = self.rt
        n = len(self.valid) // (rt.dims.dp * self.cfg.train.micro_batch_size) * self.cfg.train.micro_batch_size
        if n == 0:
            return {}
        rows = self.valid[torch.arange(rt.dp_rank * n, (rt.dp_rank + 1) * n)]
        rt.policy.eval()
        out = self._micro_batches(rows, backward=False)
        rt.policy.train()
        return {f"val_{k}": v for k, v in out.items() if k in ("lm_loss", "mtp_loss")}

    def step(self) -> tuple[dict, dict]:
        cfg, rt = self.cfg, self.rt
        torch.manual_seed(cfg.train.seed * 1_000_003 + rt.step)
        batch = next(self.it)
        metrics = self._micro_batches(batch, backward=True)
        metrics.update(rt.optimizer_step(metrics["loss"]), epoch=float(batch["epoch"]))
        targets = rt.all_sum([float((batch["labels"] != -100).sum())])[0]
        return metrics, {"target_tokens_per_s": targets, "tokens_per_s": cfg.train.global_batch_size * cfg.data.seq_len}

    def run(self) -> int:
        return self.rt.train_loop(self.last, self.step, self.evaluate, lambda: {"iterator": self.it.state_dict()})


def main(argv: list[str] | None = None) -> int:
    return stage_main(SFTTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())
