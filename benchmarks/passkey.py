"""Passkey retrieval before and after a YaRN context extension (V3 §4.3 and its "Needle In A Haystack" test, in
miniature on CPU). Results: docs/long_context_passkey.json and .png; the write-up: docs/long_context.md.

    python benchmarks/passkey.py                       # every phase, then the evaluation (--threads 2 by default)
    python benchmarks/passkey.py --phases yarn,control # rerun some phases over the others' checkpoints
    python benchmarks/passkey.py --phases ''           # score the checkpoints already under --run-dir again

1. Data. A passkey document is `filler ... "the pass key is 71432. remember it. 71432 is the pass key." ...
   filler "what is the pass key? the pass key is" " 71432" <eod>` (the needle of Mohtashami & Jaggi's passkey
   test), exactly L tokens, the needle at a depth in [0, 1] (the fraction of the filler before it), the filler a
   contiguous slice of the embedded corpus's token stream (the Python standard library; its sentencepiece
   tokenizer splits digits, one token each). Documents of exactly `data.seq_len` tokens make every
   megatron-core sample one whole document (sample i is tokens [i*S, (i+1)*S + 1) of the concatenated
   documents). They are written with pretrain.preprocess's `write_indexed_dataset` into the run directory and
   blended with the embedded corpus through `data.paths` and `data.weights`. Training filler comes from the
   corpus's train documents, evaluation filler from its last 2 % (data.split 98,2,0's valid part).
2. Pretraining, `python -m pretrain`, the tiny V3 preset (MLA, MoE with the aux-loss-free bias, one MTP module)
   with plain RoPE (model.rope_factor=1), in Plan.stages, each from the previous one's weights through
   init.checkpoint: 64-token documents (passkey share 0.9, then 0.99), then Plan.pre_len = 128.
3. Extension, 4x the length on pretrain_long's mix from its weights (`init.checkpoint`), under context
   parallelism (`parallel.cp=2`, two gloo ranks under torch.distributed.run), at the LR pretraining ended with
   (V3 §4.3): "yarn" switches YaRN on at load as V3 does (rope_factor 4 over original_seq_len = pre_len,
   beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1, so the softmax scale grows by (0.1 ln 4 + 1)^2 and
   cos/sin stay unit); "control" spends the same steps, batch and tokens without YaRN.
4. Evaluation: greedy decoding (posttrain.generate.Generator over load_for_sampling) of the answer's tokens
   after the question, exact match of the digits, on a grid of needle depths x document lengths, N documents
   per cell from fixed seeds (the same documents for every model), for the pretrained model, the YaRN-extended
   model and the control; also each model's next-token loss on held-out corpus text by position. JSON and a
   heatmap (three panels and the loss by position).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NEEDLE = "the pass key is {key}. remember it. {key} is the pass key."  # Mohtashami & Jaggi (2023)
QUESTION = "what is the pass key? the pass key is"
KEY_DIGITS = 5


# -- data ------------------------------------------------------------------------------------------------
@dataclass
class PasskeyDoc:
    ids: list[int]          # the whole document: filler, needle, filler, question, answer, eod
    prompt_len: int         # tokens up to and including the question (what the model is given)
    answer: list[int]       # the answer's tokens (" 71432": the word-start piece, then one per digit)
    key: str
    needle_start: int       # token index where the needle begins
    depth: float


class PasskeyMaker:
    """Builds passkey documents of an exact token length from a filler token stream.

    tok: a pretrain.tokenizer.Tokenizer; filler: a 1-D int array of filler token ids (end-of-document
    ids already removed)."""

    def __init__(self, tok, filler: np.ndarray):
        self.tok, self.filler = tok, np.asarray(filler, dtype=np.int64)
        self.question = tok.encode(QUESTION)
        probe = self.answer_ids("12345")
        if len(probe) != KEY_DIGITS + 1:
            raise ValueError(f"the tokenizer {tok} does not split digits into one token each ({probe}); the scorer "
                             "and the documents' lengths assume it does")

    def answer_ids(self, key: str) -> list[int]:
        return self.tok.encode(" " + key)

    def needle_ids(self, key: str) -> list[int]:
        return self.tok.encode(NEEDLE.format(key=key))

    def overhead(self, key: str = "12345") -> int:
        """Tokens of a document that are not filler."""
        return len(self.needle_ids(key)) + len(self.question) + len(self.answer_ids(key)) + 1

    def make(self, length: int, depth: float, rng: random.Random, key: str | None = None) -> PasskeyDoc:
        """A document of exactly `length` tokens (end-of-document included) with the needle after
        round(depth * n_filler) filler tokens."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {depth}")
        key = key if key is not None else f"{rng.randrange(10 ** KEY_DIGITS):0{KEY_DIGITS}d}"
        needle, answer = self.needle_ids(key), self.answer_ids(key)
        n_filler = length - self.overhead(key)
        if n_filler < 0:
            raise ValueError(f"length {length} is shorter than a document without filler ({self.overhead(key)})")
        start = rng.randrange(len(self.filler) - n_filler)
        filler = self.filler[start:start + n_filler].tolist()
        cut = round(depth * n_filler)
        ids = filler[:cut] + needle + filler[cut:] + self.question
        prompt_len = len(ids)
        ids += answer + [self.tok.eod_id]
        assert len(ids) == length
        return PasskeyDoc(ids, prompt_len, answer, key, cut, depth)


def corpus_filler(prefix: str, eod_id: int, part: str) -> np.ndarray:
    """The token stream of the embedded corpus's train (first 98 %) or valid (last 2 %) documents, without
    end-of-document tokens (data.split 98,2,0 as megatron-core rounds it)."""
    from pretrain.data import check_indexed_dataset

    info = check_indexed_dataset(prefix)
    n = len(info.sequence_lengths)
    cut = int(round(0.98 * n))
    offsets = np.concatenate([[0], np.cumsum(info.sequence_lengths, dtype=np.int64)])
    lo, hi = (0, offsets[cut]) if part == "train" else (offsets[cut], offsets[-1])
    tokens = np.memmap(prefix + ".bin", dtype=info.dtype, mode="r", shape=(info.n_tokens,))[lo:hi]
    return np.asarray(tokens[tokens != eod_id], dtype=np.int64)


def write_passkey_dataset(maker: PasskeyMaker, prefix: str, n_docs: int, length: int, seed: int) -> int:
    """n_docs documents of exactly `length` tokens, needles at uniform depths, as PREFIX.bin/.idx."""
    from pretrain.preprocess import write_indexed_dataset

    rng = random.Random(seed)
    docs = (maker.make(length, rng.random(), rng).ids for _ in range(n_docs))
    return write_indexed_dataset(docs, prefix, maker.tok.vocab_size)[1]


def key_from_text(text: str) -> str | None:
    """The digits a completion starts with (after spaces), or None."""
    m = re.match(r"\s*(\d+)", text)
    return m.group(1) if m else None


def score(text: str, key: str) -> bool:
    """Exact match: the completion's leading digits are the key, no more and no fewer."""
    return key_from_text(text) == key


# -- evaluation -----------------------------------------------------------------------------------------
def cell_docs(maker: PasskeyMaker, length: int, depth: float, n: int, seed: int) -> list[PasskeyDoc]:
    """The n documents of one grid cell: the same for every model (seeded by seed, length and depth)."""
    rng = random.Random(f"passkey-eval/{seed}/{length}/{depth}")
    return [maker.make(length, depth, rng) for _ in range(n)]


def evaluate(checkpoint: str, maker: PasskeyMaker, lengths, depths, n: int, seed: int, batch: int = 16,
             model_keys: dict | None = None) -> dict:
    """Exact-match retrieval accuracy per (length, depth) cell: the checkpoint loaded in one process with
    posttrain.generate.load_for_sampling, the key decoded greedily by its Generator. `model_keys`: model
    config keys changed at load, the weights kept (YaRN switched on without training)."""
    import dataclasses

    import torch

    from model import build_model
    from posttrain.generate import Generator, SamplingParams, load_for_sampling

    net, tok, info = load_for_sampling(checkpoint)
    if model_keys:   # the same weights under another rotary setting (what init.checkpoint does at load)
        weights = net.state_dict()
        net = build_model(dataclasses.replace(net.cfg, **model_keys), seed=None)
        net.load_state_dict(weights)
        net.eval()
    gen = Generator(net, tok)
    acc, digits = {}, {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for length in lengths:
            for depth in depths:
                docs = cell_docs(maker, length, depth, n, seed)
                hits, digit_hits = 0, 0
                for i in range(0, n, batch):
                    part = docs[i:i + batch]
                    outs, _ = gen.generate([d.ids[:d.prompt_len] for d in part],
                                           SamplingParams(max_new_tokens=len(part[0].answer), temperature=0.0))
                    for d, o in zip(part, outs):
                        hits += score(o.text, d.key)
                        got = (key_from_text(o.text) or "").ljust(KEY_DIGITS)
                        digit_hits += sum(a == b for a, b in zip(got, d.key))
                acc[f"{length}/{depth}"] = hits / n
                digits[f"{length}/{depth}"] = digit_hits / (n * KEY_DIGITS)
    nll = heldout_nll(net, maker.filler, max(lengths), seed)
    return {"checkpoint": str(info["step_dir"]), "step": info["step"], "accuracy": acc, "digit_accuracy": digits,
            "heldout_nll_by_position": nll,
            "rope_factor": net.cfg.rope_factor, "original_seq_len": net.cfg.original_seq_len,
            "eval_seconds": round(time.perf_counter() - t0, 1)}


def heldout_nll(net, filler: np.ndarray, length: int, seed: int, rows: int = 32, bucket: int = 128) -> dict:
    """Mean next-token NLL of held-out corpus text (no passkey) by position bucket: how a model reads positions
    past its training length, whatever it retrieves."""
    import torch

    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(filler) - length - 1, rows)
    x = torch.tensor(np.stack([filler[s:s + length + 1] for s in starts]))
    with torch.no_grad():
        logp = torch.log_softmax(net(x[:, :-1]).float(), -1)
    nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
    return {f"{i}-{i + bucket}": round(nll[:, i:i + bucket].mean().item(), 4) for i in range(0, length, bucket)}


# -- the phases -----------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Every number of the demonstration (recorded in the JSON)."""
    pre_len: int = 128               # the pretraining length the extension starts from (YaRN's original_seq_len)
    ext_len: int = 512
    # Pretraining in three stages, each from the previous stage's weights (init.checkpoint: fresh optimizer and
    # schedule): (phase, document length, steps, passkey share). A model this small does not learn to retrieve
    # from 128-token documents in the budget (0/16 in every cell after 1,400 steps, docs/long_context.md); it
    # learns on 64-token documents once the mix is nearly all passkey documents, and then carries it to 128.
    stages: tuple = (("pretrain", 64, 450, 0.9), ("pretrain_focus", 64, 350, 0.99), ("pretrain_long", 128, 150, 0.9))
    pre_batch: int = 64              # sequences per step in every pretraining stage
    lr: float = 3e-3                 # constant after the warmup, in every phase
    warmup: int = 20
    ext_steps: int = 150
    short_ext_steps: int = 30        # the "_short" pair: the same extension on a fifth of the budget
    ext_batch: int = 16              # sequences of ext_len per step: ext_batch * ext_len = pre_batch * pre_len tokens
    ext_warmup: int = 5
    cp: int = 2
    ext_passkey_weight: float = 0.9  # the extension's mix: pretrain_long's, at ext_len
    passkey_tokens: int = 1_024_000  # tokens of passkey documents written per length
    rope_factor: float = 4.0         # YaRN s = ext_len / pre_len
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0              # V3: mscale = mscale_all_dim = 1 -> softmax x (0.1 ln s + 1)^2, cos/sin unscaled
    seed: int = 0
    eval_lengths: tuple = (64, 128, 256, 384, 512)
    eval_depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_n: int = 16

    @property
    def ext_lr(self) -> float:
        """V3 §4.3 extends at the learning rate pretraining ended with (7.3e-6); here the constant LR."""
        return self.lr

    @property
    def phases(self) -> tuple:
        return tuple(st[0] for st in self.stages) + EXTENSIONS

    @property
    def lengths(self) -> tuple:
        """The document lengths with a passkey dataset."""
        return tuple(sorted({st[1] for st in self.stages} | {self.ext_len}))


EXTENSIONS = ("yarn", "control", "yarn_short", "control_short")
PHASES = tuple(Plan().phases)


def yarn_keys(plan: Plan) -> dict:
    """The model keys that switch YaRN on (V3's values: beta 32 / 1, mscale = mscale_all_dim = 1)."""
    return dict(rope_factor=plan.rope_factor, original_seq_len=plan.pre_len, beta_fast=plan.beta_fast,
                beta_slow=plan.beta_slow, mscale=plan.mscale, mscale_all_dim=plan.mscale)


def phase_config(plan: Plan, run_dir: str, corpus: str, tokenizer: str, *, phase: str) -> dict:
    """The `python -m pretrain` config of one phase (plan.phases): the pretraining stages, then the extension
    with YaRN and the control without it."""
    stages = {st[0]: st for st in plan.stages}
    ext = phase in EXTENSIONS
    if not ext and phase not in stages:
        raise ValueError(f"unknown phase {phase!r}; the phases are {', '.join(plan.phases)}")
    ext_steps = plan.short_ext_steps if phase.endswith("_short") else plan.ext_steps
    _, length, steps, share = (phase, plan.ext_len, ext_steps, plan.ext_passkey_weight) if ext else stages[phase]
    model = {"preset": "tiny-deepseek-v3", "vocab_size": 4096, "max_seq_len": plan.ext_len, "rope_factor": 1.0}
    if phase.startswith("yarn"):   # V3 §4.3 / V2 §3.1.4: YaRN over the pretraining length
        model.update(yarn_keys(plan))
    batch = plan.ext_batch if ext else plan.pre_batch
    train = {"steps": steps, "seed": plan.seed, "lr": plan.ext_lr if ext else plan.lr, "lr_schedule": "constant",
             "warmup_steps": plan.ext_warmup if ext else plan.warmup, "micro_batch_size": batch,
             "global_batch_size": batch}
    cfg = {"model": model, "train": train,
           "data": {"paths": [corpus, os.path.join(run_dir, "data", f"passkey_{length}")],
                    "weights": [round(1 - share, 6), share], "tokenizer": tokenizer, "embedded": False,
                    "seq_len": length, "cache_dir": os.path.join(run_dir, "cache")},
           "checkpoint": {"every": steps, "keep": 1},
           "logging": {"run_dir": os.path.join(run_dir, phase), "wandb": "disabled", "every": 10}}
    before = plan.stages[-1][0] if ext else (plan.stages[[st[0] for st in plan.stages].index(phase) - 1][0]
                                             if phase != plan.stages[0][0] else None)
    if before is not None:   # the previous stage's weights (weights only: fresh optimizer and schedule)
        cfg["init"] = {"checkpoint": os.path.join(run_dir, before, "checkpoints")}
    if ext:   # YaRN (if any) switched on at load; the 4x sequence split over cp ranks
        cfg["parallel"] = {"cp": plan.cp}
    return cfg


def run_phase(cfg: dict, path: str, ranks: int, threads: int, log: str) -> float:
    """Write the config to PATH and run `python -m pretrain` on it (under torch.distributed.run when ranks > 1);
    returns the wall seconds."""
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    cmd = [sys.executable, "-m", "pretrain", "--config", path]
    if ranks > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "pretrain"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print("$ " + " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) and c != sys.executable else c for c in cmd),
          flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"phase {path} failed (exit {rc}); log {log}:\n{tail}")
    return time.perf_counter() - t0


def last_metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "loss" in r]
    keep = ("step", "loss", "lm_loss", "mtp_loss", "tokens_per_s")
    out = {k: rows[-1][k] for k in keep if k in rows[-1]} if rows else {}
    if rows:   # the logged steps of the last fifth of the run: less noisy than one step
        tail = [r["lm_loss"] for r in rows if r["step"] > 0.8 * rows[-1]["step"]]
        out["mean_lm_loss_last_fifth"] = round(sum(tail) / len(tail), 4)
    return out


# -- the figure -----------------------------------------------------------------------------------------
def heatmap(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = result["plan"]
    lengths, depths = plan["eval_lengths"], plan["eval_depths"]
    models = result["models"]
    cols = 4
    rows = -(-(len(models) + 1) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), constrained_layout=True, squeeze=False)
    cells = list(grid.flat)
    for ax in cells[len(models) + 1:]:
        ax.axis("off")
    nll_ax, axes = cells[len(models)], cells[:len(models)]
    for name, res in models.items():
        buckets = list(res.get("heldout_nll_by_position", {}))
        if buckets:
            nll_ax.plot(range(len(buckets)), [res["heldout_nll_by_position"][b] for b in buckets], marker="o",
                        label=name)
            nll_ax.set_xticks(range(len(buckets)), buckets, fontsize=8)
    nll_ax.set_xlabel("token positions")
    nll_ax.set_ylabel("held-out NLL (corpus text)")
    nll_ax.set_title("next-token loss by position", fontsize=10)
    nll_ax.legend(fontsize=8)
    for ax, (name, res) in zip(axes, models.items()):
        grid = np.array([[res["accuracy"][f"{n}/{d}"] for n in lengths] for d in depths])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.axvline(lengths.index(plan["pre_len"]) + 0.5 if plan["pre_len"] in lengths else -0.5, color="k", lw=1,
                   ls="--")
        ax.set_xlabel("document length (tokens)")
        ax.set_title(res["title"], fontsize=10)
    for ax in axes[::cols]:
        ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="exact-match retrieval")
    fig.suptitle(f"Passkey retrieval, tiny V3 pretrained at {plan['pre_len']} tokens, extended to {plan['ext_len']}"
                 f" ({plan['eval_n']} documents per cell, greedy)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------------
TITLES = {"pretrained": "pretrained at {pre} (RoPE, no YaRN)",
          "yarn_at_load": "pretrained, YaRN (s={s:g}) on at load, no training",
          "yarn": "extended at {ext} with YaRN, {steps} steps, cp{cp}",
          "control": "control: at {ext} without YaRN, {steps} steps, cp{cp}",
          "yarn_short": "extended at {ext} with YaRN, {short} steps, cp{cp}",
          "control_short": "control: at {ext} without YaRN, {short} steps, cp{cp}"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "passkey"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "long_context_passkey.json"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "long_context_passkey.png"))
    ap.add_argument("--threads", type=int, default=2,
                    help="threads in all: the training processes share them (OMP_NUM_THREADS per rank), the evaluation")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help="training phases to run (the others' checkpoints are read from --run-dir); '' scores only")
    ap.add_argument("--ext-steps", type=int)
    ap.add_argument("--eval-n", type=int)
    args = ap.parse_args(argv)
    plan = Plan()
    for key in ("ext_steps", "eval_n"):
        if getattr(args, key) is not None:
            setattr(plan, key, getattr(args, key))
    if plan.ext_batch * plan.ext_len != plan.pre_batch * plan.pre_len:
        raise SystemExit("the extension's tokens per step must equal pretraining's (V3 §4.3 keeps them)")

    import torch

    from pretrain.corpus import ensure_embedded_corpus
    from pretrain.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    run_dir = os.path.abspath(args.run_dir)
    corpus, tok_path = ensure_embedded_corpus(os.path.join(ROOT, ".cache", "whaletron"))
    tok = load_tokenizer(tok_path)
    train_maker = PasskeyMaker(tok, corpus_filler(corpus, tok.eod_id, "train"))
    eval_maker = PasskeyMaker(tok, corpus_filler(corpus, tok.eod_id, "valid"))
    walls_path = os.path.join(run_dir, "phase_wall_seconds.json")
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(plan.phases)
    if unknown:
        raise SystemExit(f"--phases: unknown {sorted(unknown)}; the phases are {', '.join(plan.phases)}")
    if plan.stages[0][0] in phases:
        shutil.rmtree(run_dir, ignore_errors=True)
    walls = json.load(open(walls_path)) if os.path.isfile(walls_path) else {}
    os.makedirs(os.path.join(run_dir, "data"), exist_ok=True)
    for length in plan.lengths:  # (documents of one length per phase: one document per sample)
        prefix = os.path.join(run_dir, "data", f"passkey_{length}")
        if not os.path.isfile(prefix + ".idx"):
            write_passkey_dataset(train_maker, prefix, plan.passkey_tokens // length, length, seed=plan.seed + length)
    for phase in plan.phases:
        if phase in phases:
            shutil.rmtree(os.path.join(run_dir, phase), ignore_errors=True)
            cfg = phase_config(plan, run_dir, corpus, tok_path, phase=phase)
            ranks = plan.cp if phase in EXTENSIONS else 1
            walls[phase] = round(run_phase(cfg, os.path.join(run_dir, f"{phase}.yaml"), ranks,
                                           max(1, args.threads // ranks), os.path.join(run_dir, f"{phase}.log")), 1)
            print(f"{phase}: {walls[phase]} s, final {last_metrics(os.path.join(run_dir, phase))}", flush=True)
            with open(walls_path, "w") as f:
                json.dump(walls, f)

    models, t_eval = {}, time.perf_counter()
    base = plan.stages[-1][0]
    for name, phase, keys in (("pretrained", base, None), ("yarn_at_load", base, yarn_keys(plan)),
                              *((e, e, None) for e in EXTENSIONS)):
        res = evaluate(os.path.join(run_dir, phase), eval_maker, plan.eval_lengths, plan.eval_depths, plan.eval_n,
                       plan.seed, model_keys=keys)
        res["title"] = TITLES[name].format(pre=plan.pre_len, ext=plan.ext_len, s=plan.rope_factor, cp=plan.cp,
                                           steps=plan.ext_steps, short=plan.short_ext_steps)
        res["final_train_metrics"] = last_metrics(os.path.join(run_dir, phase))
        res["by_length"] = {str(n): sum(res["accuracy"][f"{n}/{d}"] for d in plan.eval_depths) / len(plan.eval_depths)
                            for n in plan.eval_lengths}
        models[name] = res
        print(f"{name}: accuracy by length {res['by_length']} ({res['eval_seconds']} s)", flush=True)

    configs = {}
    for phase in plan.phases:
        with open(os.path.join(run_dir, f"{phase}.yaml")) as f:
            configs[phase] = f.read()
    result = {
        "benchmark": "passkey retrieval before and after a YaRN context extension (V3 §4.3, Needle In A Haystack)",
        "command": "python " + shlex.join([os.path.relpath(os.path.abspath(__file__), ROOT)] + sys.argv[1:]),
        "machine": {"cpu": cpu_name(), "uname": " ".join(platform.uname()), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "threads": args.threads},
        "plan": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.__dict__.items()},
                 "ext_lr": plan.ext_lr},
        "documents": {"needle": NEEDLE, "question": QUESTION, "key_digits": KEY_DIGITS,
                      "overhead_tokens": train_maker.overhead(),
                      "filler": "embedded corpus token stream: train documents for training, the last 2% for eval"},
        "scoring": "greedy decoding of len(' ' + key) tokens after the question; exact match of the leading digits",
        "phase_wall_seconds": walls,   # each phase when it last ran (possibly in an earlier invocation)
        "wall_seconds": round(time.perf_counter() - t_start, 1),   # this invocation: the phases it ran + the scoring
        "total_wall_seconds": round(sum(walls.values()) + time.perf_counter() - t_eval, 1),
        "configs": configs,
        "models": models,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    heatmap(result, args.png)
    print(f"wrote {args.out} and {args.png} ({result['wall_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
