"""Rejection sampling (R1 §2.3.3): `python -m posttrain.rejection --config FILE [key=value ...]`.

From a converged checkpoint (init.checkpoint), sample several completions per prompt, keep only the
verified-correct ones that read well, and write an SFT jsonl that `posttrain.sft` trains on as is.
Distillation (R1 §2.4) is this stage run with the teacher's config, then `posttrain.sft` with a
student's (`posttrain.distill` runs both).

    prompts  = data.train_files in file order, cut into units of rejection.batch_prompts prompts
    sample   = rejection.samples completions per prompt (rollout.*); unit u runs on dp rank u % dp,
               seeded by its first prompt's global index, so the dp size does not change the output
    verify   = reward.weights; correct = verified(score) == 1 (accuracy, countdown or code, else the reward)
    filter   = replies cut off at rollout.max_new_tokens; R1 drops chains of thought that mix languages or
               run long: rejection.max_response_tokens, rejection.min_language_consistency; then identical
               replies; then all but the first keep_per_prompt per prompt
    write    = gathered to rank 0 unit by unit, in prompt order, into temporary files renamed into place
               at the end; an existing file is never replaced unless rejection.overwrite=true
    pairs    = optional DPO pairs: a kept reply (chosen) against an incorrect one (rejected)
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter

import torch.distributed as dist

from parallel.data_parallel import is_fsdp
from pretrain.config import ConfigError
from pretrain.session import decided_on_rank0, join_job

from .config import PosttrainConfig, RejectionSection
from .data import DataError, check_prompt_fit, encode_prompt, load_located_prompts
from .engine import rollout_engine
from .generate import SamplingParams
from .rewards import build_reward, extract_think, language_fraction, verified
from .stage import StageError, StageSession, stage_main
from .templates import as_messages

DROP_REASONS = ("incorrect", "empty", "unfinished", "too_long", "language", "duplicate", "excess")


def verdicts(samples: list[dict], r: RejectionSection) -> list[str]:
    """"kept", or the first reason a sample is dropped (DROP_REASONS), for the samples of one prompt in order.
    A sample is {"completion": str, "finish": str, "tokens": int, "correct": bool, "language_fraction": float}; one cut
    off at rollout.max_new_tokens is unfinished (SFT would teach the model to stop mid-thought)."""
    out, kept = [], set()
    for s in samples:
        text = s["completion"].strip()
        if not s["correct"]:
            v = "incorrect"
        elif not text:
            v = "empty"
        elif s["finish"] == "length":
            v = "unfinished"
        elif r.max_response_tokens and s["tokens"] > r.max_response_tokens:
            v = "too_long"
        elif s["language_fraction"] < r.min_language_consistency:
            v = "language"
        elif text in kept:
            v = "duplicate"
        elif len(kept) >= r.keep_per_prompt:
            v = "excess"
        else:
            v = "kept"
            kept.add(text)
        out.append(v)
    return out


def _context(record: dict) -> dict:
    """The prompt part of a record (a trailing assistant message, the reference reply, left out) with its
    task fields, the shape it came in."""
    out = {k: v for k, v in record.items() if k != "response"}
    if "messages" in out:
        messages = as_messages(out["messages"])
        out["messages"] = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return out


def sft_record(record: dict, reply: str) -> dict:
    """The prompt record with `reply` as its assistant turn (what posttrain.sft trains on)."""
    out = _context(record)
    if "messages" in out:
        out["messages"] = out["messages"] + [{"role": "assistant", "content": reply}]
    else:
        out["response"] = reply
    return {**out, "source": "rejection"}


def pair_record(record: dict, chosen: str, rejected: str) -> dict:
    return {**_context(record), "chosen": chosen, "rejected": rejected, "source": "rejection"}


class _Outputs:
    """Rank 0's output files: written to temporary files next to them, renamed into place by commit()
    (readers never see half a file), removed when the run fails."""

    def __init__(self, paths: dict[str, str], overwrite: bool):
        self.paths, self.overwrite = {k: p for k, p in paths.items() if p}, overwrite
        self.tmp, self.files = {}, {}
        for key, path in self.paths.items():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.tmp[key] = f"{path}.tmp{os.getpid()}"
            self.files[key] = open(self.tmp[key], "w", encoding="utf-8")

    def write(self, key: str, records: list[dict]) -> None:
        if key in self.files:
            for rec in records:
                self.files[key].write(json.dumps(rec, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for key, path in self.paths.items():
            if os.path.exists(path) and not self.overwrite:   # created while we sampled: keep both
                raise StageError(f"{path} appeared while sampling and rejection.overwrite is false; this run's "
                                 f"records are in {', '.join(self.tmp.values())}")
        for key, path in self.paths.items():
            os.replace(self.tmp[key], path)

    def abort(self) -> None:
        for key, f in self.files.items():
            f.close()
            if os.path.exists(self.tmp[key]):
                os.remove(self.tmp[key])


class RejectionSampler:
    """Verified-correct completions of the policy as SFT data (R1 §2.3.3)."""

    def __init__(self, cfg: PosttrainConfig):
        self.cfg, r, d = cfg, cfg.rejection, cfg.data
        if not r.output:
            raise ConfigError("rejection.output is empty: name the SFT jsonl to write")
        if not d.train_files:
            raise ConfigError("data.train_files is empty: name the jsonl prompt files (prompt/answer records)")
        self.outputs = {"sft": r.output, "pairs": r.pairs_output, "samples": r.samples_output}
        self._refuse_overwrite()
        try:     # the data before the model: a bad or empty file stops the run before any weights load
            located = load_located_prompts(d.train_files)
        except (OSError, DataError) as e:
            raise ConfigError(f"data.train_files: {e}") from None
        self.records = [rec for _, rec in located]
        cfg.checkpoint.resume = "none"      # sampling writes no checkpoint: resume() only opens the logger
        if cfg.parallel.pp > 1:   # no trainer here: the stage samples in its rollout layout (GRPO's rollout.tp/ep)
            p, ro = cfg.parallel, cfg.rollout
            cfg.parallel = dataclasses.replace(p, pp=1, dp=0, tp=ro.tp or p.tp, ep=ro.ep or p.ep, sp=False,
                                               recompute="none")
        self.session = sess = StageSession(cfg, "rejection", train=False)   # samples only: a frozen policy
        self.prompt_ids = []
        for where, rec in located:
            try:
                self.prompt_ids.append(encode_prompt(d.template, sess.tokenizer, rec))
            except ValueError as e:       # the template cannot render it (e.g. r1_zero and a system message)
                raise ConfigError(f"data.train_files: {where}: {e}") from None
        ro = cfg.rollout
        try:     # every prompt, as the generator receives it, and its reply must fit the KV cache
            check_prompt_fit([(where, ids) for (where, _), ids in zip(located, self.prompt_ids)], ro.max_new_tokens,
                             sess.model_cfg.max_seq_len, template=d.template)
        except DataError as e:
            raise ConfigError(f"data.train_files: {e}") from None
        self.sampling = SamplingParams(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                                       top_k=ro.top_k, stop=list(ro.stop))
        self.reward = build_reward(cfg.reward.weights)
        if ro.compile and (sess.dims.world > 1 or is_fsdp(sess.policy)):
            raise ConfigError("rollout.compile: rejection sampling generates with the policy itself, which compiles "
                              "in one process with train.dtype=fp32 only (a compute dtype makes it an FSDP2 module, "
                              f"whose hooks a compiled step cannot trace; this run: {sess.dims.world} rank(s), "
                              f"train.dtype={cfg.train.dtype}); set rollout.compile=false")
        self.gen = rollout_engine(sess.policy, sess.tokenizer, cfg.rollout)
        sess.total_steps = 0                  # one pass, no optimizer steps
        sess.resume()

    def _refuse_overwrite(self) -> None:
        """Stop before any work when an output exists (rank 0 looks, every rank learns the answer)."""
        join_job(self.cfg)
        found = decided_on_rank0(lambda: [p for p in self.outputs.values() if p and os.path.exists(p)],
                                 "looking for the outputs")
        if found and not self.cfg.rejection.overwrite:
            raise ConfigError(f"{', '.join(found)} already exists; choose another rejection.output / pairs_output / "
                              "samples_output, or set rejection.overwrite=true to replace it")

    # -- one unit of prompts -------------------------------------------------------------------------
    def sample_unit(self, u: int) -> tuple[dict[str, list[dict]], Counter, int]:
        """Records (sft, pairs, samples), counts and generated tokens of the prompts of unit u."""
        cfg, r = self.cfg, self.cfg.rejection
        lo, hi = u * r.batch_prompts, min((u + 1) * r.batch_prompts, len(self.records))
        prompts = [self.prompt_ids[i] for i in range(lo, hi) for _ in range(r.samples)]
        outs, stats = self.gen.generate(prompts, self.sampling, seed=cfg.train.seed * 1_000_003 + lo)
        out, counts = {"sft": [], "pairs": [], "samples": []}, Counter()
        for i in range(lo, hi):
            record = self.records[i]
            samples = []
            for j, c in enumerate(outs[(i - lo) * r.samples:(i - lo + 1) * r.samples]):
                score = self.reward.score(c.text, record)
                samples.append({"index": i, "sample": j, "completion": c.text, "finish": c.finish, "score": score,
                                "tokens": len(c.ids) - (c.finish == "eod"), "correct": verified(score) == 1,
                                "language_fraction": language_fraction(extract_think(c.text),
                                                                       record.get("language") or r.language)})
            kept, wrong = [], []
            for s, v in zip(samples, verdicts(samples, r)):
                s["verdict"] = v
                counts[v] += 1
                if v == "kept":
                    kept.append(s["completion"])
                elif v == "incorrect" and s["completion"].strip() and s["completion"] not in wrong:
                    wrong.append(s["completion"])
            counts["correct"] += sum(s["correct"] for s in samples)
            counts["kept_prompts"] += bool(kept)
            out["sft"] += [sft_record(record, text) for text in kept]
            out["pairs"] += [pair_record(record, a, b) for a, b in zip(kept, wrong)]
            out["samples"] += [{**s, "record": _context(record)} for s in samples]
        counts["pairs"] = len(out["pairs"])
        return out, counts, stats["tokens"]

    def _gather(self, out: dict[str, list[dict]] | None, files: _Outputs | None) -> None:
        """One unit per dp rank to rank 0, appended in unit order (dp rank order). tp ranks hold copies."""
        parts = self.session.gather_dp(out)
        if files is not None and parts is not None:
            for part in parts:
                for key, records in (part or {}).items():
                    files.write(key, records)

    # -- the run -------------------------------------------------------------------------------------
    def run(self) -> int:
        sess, r = self.session, self.cfg.rejection
        files = None
        try:
            if sess.rank == 0:
                files = _Outputs(self.outputs, r.overwrite)
            n_units = -(-len(self.records) // r.batch_prompts)
            dp = sess.dims.dp
            counts, tokens, t0 = Counter(), 0, time.perf_counter()
            for t in range(-(-n_units // dp)):
                u = t * dp + sess.dp_rank
                if u < n_units:
                    out, c, n = self.sample_unit(u)
                    counts.update(c)
                    tokens += n
                else:   # every rank generates in lockstep (collectives in each decode step): a stand-in call
                    out = None
                    self.gen.generate(self.prompt_ids[:1], self.sampling, seed=0)
                self._gather(out, files)
            seconds = time.perf_counter() - t0
            keys = ["correct", "kept", "kept_prompts", "pairs", *DROP_REASONS]
            tot = sess.all_sum({**{k: float(counts[k]) for k in keys}, "tokens": float(tokens)})
            error = [None]
            if files is not None:
                try:
                    files.commit()
                except StageError as e:
                    error[0] = str(e)
                files = None
            dist.broadcast_object_list(error, src=0)    # every rank returns once the files are in place
            if error[0]:
                raise StageError(error[0])
            self._report(tot, seconds)
            return 0
        except BaseException:
            if files is not None:
                files.abort()
            raise
        finally:
            sess.close()

    def _report(self, tot: dict, seconds: float) -> None:
        r, n = self.cfg.rejection, len(self.records)
        samples = n * r.samples
        metrics = {"prompts": float(n), "samples": float(samples), "pass_rate": tot["correct"] / samples,
                   "kept": tot["kept"], "kept_prompts": tot["kept_prompts"], "pairs": tot["pairs"],
                   **{f"dropped_{k}": tot[k] for k in DROP_REASONS},
                   "response_tokens_mean": tot["tokens"] / samples, "generation_tokens_per_s": tot["tokens"] / seconds,
                   "seconds": seconds}
        self.session.log(metrics)
        if self.session.rank == 0:
            dropped = ", ".join(f"{k} {int(tot[k])}" for k in DROP_REASONS if tot[k])
            pairs = f"; {int(tot['pairs'])} pairs -> {r.pairs_output}" if r.pairs_output else ""
            print(f"rejection: {n} prompts x {r.samples} samples, pass rate {metrics['pass_rate']:.1%}, kept "
                  f"{int(tot['kept'])} ({int(tot['kept_prompts'])} prompts) -> {r.output}{pairs}; dropped: "
                  f"{dropped or 'none'}; {metrics['generation_tokens_per_s']:.0f} tokens/s", flush=True)


def main(argv: list[str] | None = None) -> int:
    return stage_main(RejectionSampler, argv)


if __name__ == "__main__":
    sys.exit(main())
