"""The generation engine: batched sampling with a KV cache, on the model the trainer holds.

    gen = Generator(net, tokenizer)                       # net: plain or parallelize()d (tp, ep, FSDP2)
    outs, stats = gen.generate(prompt_ids, SamplingParams(max_new_tokens=64, temperature=1.0), seed=0)
    outs[i].text, outs[i].ids, outs[i].logprobs, outs[i].finish; stats["tokens_per_s"]

Prompts of different lengths are left-padded into one batch; the padding is its own document for
the attention mask (model.attention.attention_mask), so every prompt decodes as if alone. MLA keeps
only the latent c^KV and k^R per token and absorbs W^UK / W^UV (V2 §2.1.3); dense attention caches
keys and values.

Parallel layouts. Under tensor parallelism the last position's logits are all-gathered over the
vocabulary (a [batch, vocab] tensor per step; training log-probs never gather, see
Transformer.token_logprobs) and every tp rank draws the same token from the same seed. Under expert
parallelism and FSDP2 the ranks of a group run collectives inside every forward, so all ranks take
the same number of decode steps: each step all-reduces "is any sequence still running" over the whole
job, and a rank whose sequences have finished keeps feeding padding until every rank is done.
Pipeline parallelism is not handled here: decoding one token per step through a pipeline keeps all
but one stage idle, so post-training runs at pp = 1 and loads pp-trained checkpoints through DCP
resharding (parallel.checkpoint).

The sampling command shows what a checkpoint learned, in one process (any saved layout loads):

    python -m posttrain.generate --checkpoint runs/tiny_v3 --prompt "def " --num-samples 3
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx.experimental._config
import yaml

from model import ModelConfig, build_model
from parallel.data_parallel import reshard
from parallel.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, read_meta, resolve_checkpoint,
                                 sharded_state)
from pretrain.corpus import embedded_tokenizer_path
from pretrain.tokenizer import load_tokenizer

__all__ = ["SamplingParams", "Completion", "Generator", "sample_tokens", "sampling_distribution", "restricted_logprobs",
           "allowed_ids", "load_for_sampling", "main", "compiled", "COMPILE_TOKENS"]


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0       # 0: greedy
    top_p: float = 1.0             # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0                 # 0: off
    stop: list[str] = field(default_factory=list)   # stop strings (kept in the text), besides end-of-document
    include_stop: bool = True      # keep the stop string in the text (the format reward needs </answer>)
    # DeepSeek-V3.2's Keep Sampling Mask: record each token's allowed set (Completion.allowed) and its log-prob
    # renormalised over that set; a no-op when nothing is truncated (top_p = 1, top_k = 0, or greedy)
    keep_sampling_mask: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def records_mask(self) -> bool:
        """Whether the generators record the truncation masks: asked for, and top-k or top-p truncates."""
        return self.keep_sampling_mask and self.temperature > 0 and (self.top_p < 1 or self.top_k > 0)


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]            # generated tokens, ending with end-of-document when it stopped on one
    text: str                 # decoded, cut after the stop string that ended it
    logprobs: list[float]     # log-prob of each generated token under the sampled distribution (logits / T)
    finish: str               # "eod", "stop", or "length"
    # with generate(..., record_routing=True): the experts each trunk MoE layer chose for every token fed
    # through the model (the prompt, then each generated token but the last) [len, n_moe_layers, k], long
    routes: torch.Tensor | None = None
    # with SamplingParams.keep_sampling_mask (and truncation): per generated token, the sorted token ids the
    # sampler's top-k / top-p distribution allowed at that step (int32), and `logprobs` are then renormalised over
    # them. Ids, not a vocabulary-wide bool mask: a nucleus or top-k set is a few to a few hundred of V3's 129k.
    allowed: list[torch.Tensor] | None = None


def sample_tokens(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None):
    """Draw one token per row of fp32 logits [batch, vocab]; returns (ids, log-prob of each under
    logits / temperature, before the top-k / top-p truncation)."""
    logits = logits.float()
    if p.temperature == 0:
        ids = logits.argmax(-1)
        return ids, logits.log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    logp, probs = sampling_distribution(logits, p)
    ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return ids, logp.gather(-1, ids[:, None])[:, 0]


def sampling_distribution(logits: torch.Tensor, p: SamplingParams, *, with_keep: bool = False):
    """(log-probs of logits / temperature [batch, vocab], the unnormalised probabilities the sampler draws
    from: top-k and top-p truncated) for temperature > 0; with `with_keep` also the truncation's bool mask."""
    logits = logits.float() / p.temperature
    logp = logits.log_softmax(-1)
    keep = torch.ones_like(logits, dtype=torch.bool)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1).values[:, -1:]
        keep &= logits >= kth
    if p.top_p < 1:
        probs, order = logp.exp().sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs                  # mass strictly before each token: the first is always kept
        keep &= torch.zeros_like(keep).scatter(-1, order, before < p.top_p)
    probs = logp.exp().masked_fill(~keep, 0)
    return (logp, probs, keep) if with_keep else (logp, probs)


def restricted_logprobs(logp: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Log-probs renormalised over the kept tokens (-inf outside): log pi_old on the sampler's action subspace."""
    return logp.masked_fill(~keep, float("-inf")).log_softmax(-1)


def allowed_ids(keep: torch.Tensor) -> list[torch.Tensor]:
    """Each row's kept token ids, sorted, int32 on the CPU (Completion.allowed)."""
    return [row.nonzero()[:, 0].to(torch.int32) for row in keep.cpu()]


# forwards of at most this many tokens run compiled (Engine(compile=True), Generator(compile=True)): a decode or
# verify step, whose MoE layers then take the dense inference path (model/moe.py Experts.dense_products), which
# traces; a prefill runs eagerly
COMPILE_TOKENS = 512
RECOMPILE_LIMIT = 24   # programs per compiled function (see `compiled`)
COMPILE_BACKEND = "inductor"   # tests trace with "eager" (dynamo's graphs run by eager kernels: no C++ build)
_COMPILED: dict = {}


def compiled(fn):
    """torch.compile(fn, dynamic=True, fullgraph=True), once per function (Transformer.decode, .draft, .forward,
    the engine's step functions) for the process: shapes (batch, chunk, context) are symbolic, so one program
    serves every decode step of every call; the first call of each shape class compiles (tens of seconds on a
    CPU: inductor's C++ kernels). fullgraph: a graph break (a host sync such as .item(), data-dependent control
    flow) is an error, not a silent split, so every step is one program a CUDA graph can capture whole."""
    if fn not in _COMPILED:
        # on a CPU, inductor's C++ wrapper: the program's hundreds of kernel calls made from C++, not Python (the
        # CPU's counterpart of a CUDA graph's one launch; measured 1.18-1.40x per decode step on 2 cores)
        cpu = COMPILE_BACKEND == "inductor" and not torch.cuda.is_available()
        program = torch.compile(fn, dynamic=True, backend=COMPILE_BACKEND, fullgraph=True,
                                options={"cpp_wrapper": True} if cpu else None)

        def run(*args, **kwargs):
            # no shape specialised: not a batch of 1 or a chunk of 1, nor a batch as wide as the model (duck sizing);
            # programs per function: one per draft count (a loop bound), inductor's batch-of-1 indexing, and a
            # recompile when a guarded object of an earlier call is gone: a sweep over draft counts (the rollout
            # benchmark) needs more than dynamo's default 8, after which a function would run eagerly
            with torch.fx.experimental._config.patch(use_duck_shape=False, backed_size_oblivious=True), \
                    torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return program(*args, **kwargs)
        _COMPILED[fn] = run
    return _COMPILED[fn]


# model hooks read here (cfg, new_cache, gather_logits): parallel/protocols.py
class Generator:
    def __init__(self, model, tokenizer, *, pad_id: int | None = None, compile: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.compile = compile   # decode steps of at most COMPILE_TOKENS tokens through torch.compile (one process)
        self.eod = tokenizer.eod_id
        self.pad = self.eod if pad_id is None else pad_id
        self.max_seq_len = model.cfg.max_seq_len

    def _any_running(self, running: torch.Tensor) -> bool:
        """Whether any sequence of any rank is still running (every rank decodes in lockstep)."""
        flag = running.any().to(torch.int32).reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = flag.to(next(self.model.parameters()).device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int = 0,
                 record_routing: bool = False):
        """Sample one completion per prompt. Returns (completions, stats) with stats tokens, seconds,
        tokens_per_s (this rank's generated tokens over the wall time of the call). With `record_routing`
        each completion carries `routes` (the experts of every token fed, for routing replay)."""
        if not prompts or any(len(q) == 0 for q in prompts):
            raise ValueError("generate needs at least one prompt, and every prompt at least one token")
        net = self.model
        was_training = net.training
        net.eval()   # no load counting, no token dropping, no dropout of any kind
        device = next(net.parameters()).device
        b, P = len(prompts), max(len(q) for q in prompts)
        total = P + params.max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} exceeds the "
                             f"model's max_seq_len {self.max_seq_len}; lower max_new_tokens or raise model.max_seq_len")
        tokens = torch.full((b, P), self.pad, dtype=torch.long, device=device)
        doc = torch.zeros(b, total, dtype=torch.long, device=device)
        for i, q in enumerate(prompts):
            tokens[i, P - len(q):] = torch.tensor(q, device=device)
            doc[i, :P - len(q)] = -1                       # left padding: a document of its own
        gen = torch.Generator(device=device).manual_seed(seed)
        caches = net.new_cache(b, total, device=device)
        out = [[] for _ in range(b)]
        logps = [[] for _ in range(b)]
        record = params.records_mask
        allowed = [[] for _ in range(b)] if record else None
        finish = [""] * b
        texts = [""] * b
        running = torch.ones(b, dtype=torch.bool)
        t0 = time.perf_counter()
        pos, step_in = 0, tokens
        if record_routing and not net.trunk_moe_layers():
            raise ValueError("record_routing: this model has no MoE layer whose routing could be recorded")
        if record_routing:
            net.record_routing()
        forward = partial(compiled(type(net).forward), net) if self.compile and not record_routing else None
        for step in range(params.max_new_tokens):
            small = forward is not None and step_in.numel() <= COMPILE_TOKENS   # a decode step, not the prefill
            logits = net.gather_logits((forward if small else net)(step_in, pos, caches, doc_ids=doc)[:, -1])
            if record:   # the same draw as sample_tokens; the log-prob renormalised over the truncation
                logp, probs, keep = sampling_distribution(logits, params, with_keep=True)
                ids = torch.multinomial(probs, 1, generator=gen)[:, 0]
                lp = restricted_logprobs(logp, keep).gather(-1, ids[:, None])[:, 0]
                sets = allowed_ids(keep)
            else:
                ids, lp = sample_tokens(logits, params, gen)
            pos += step_in.shape[1]
            ids_l, lp_l = ids.tolist(), lp.tolist()
            for i in range(b):
                if not running[i]:
                    continue
                out[i].append(ids_l[i])
                logps[i].append(lp_l[i])
                if record:
                    allowed[i].append(sets[i])
                if ids_l[i] == self.eod:
                    finish[i], running[i] = "eod", False
                elif params.stop:
                    text = self.tokenizer.decode(out[i])
                    hits = [text.find(s) + len(s) * params.include_stop for s in params.stop if s in text]
                    if hits:
                        finish[i], running[i], texts[i] = "stop", False, text[:min(hits)]
            if step + 1 == params.max_new_tokens or not self._any_running(running):
                break
            step_in = torch.where(running.to(device), ids, torch.full_like(ids, self.pad))[:, None]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        steps = net.recorded_routing() if record_routing else []
        if record_routing:
            net.record_routing(False)
        completions = []
        for i in range(b):
            if not finish[i]:
                finish[i] = "length"
            text = texts[i] if finish[i] == "stop" else self.tokenizer.decode(
                [t for t in out[i] if t != self.eod])
            routes = None
            if record_routing:   # the prompt past its left padding, then each generated token fed back
                routes = torch.cat([steps[0][i, P - len(prompts[i]):]] +
                                   [steps[j][i] for j in range(1, len(out[i]))]).cpu()
            completions.append(Completion(list(prompts[i]), out[i], text, logps[i], finish[i], routes,
                                          allowed[i] if record else None))
        n = sum(len(c.ids) for c in completions)
        net.train(was_training)
        reshard(net)   # free the root FSDP2 keeps gathered after a no-grad forward (as SingleStage.evaluate)
        return completions, {"tokens": n, "seconds": seconds, "tokens_per_s": n / max(seconds, 1e-9)}


# -- the sampling command ------------------------------------------------------------------------------
class SampleError(ValueError):
    """Bad input to the sampling command: one line that names the problem and the fix."""


def _locate(checkpoint) -> tuple[Path, Path | None]:
    """(step directory, run directory or None) of --checkpoint: a run directory (config.yaml, its latest
    checkpoint), a checkpoint root (its latest) or a step directory."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise SampleError(f"--checkpoint {path}: no such directory; give a pretraining run directory "
                          "(e.g. runs/tiny_v3) or a checkpoint directory (RUN/checkpoints/step_N)")
    if (path / "config.yaml").is_file():
        root = path / "checkpoints"
        try:   # checkpoint.dir, when the run set one
            root = Path((yaml.safe_load((path / "config.yaml").read_text()) or {})["checkpoint"]["dir"] or root)
        except (OSError, KeyError, TypeError, yaml.YAMLError):   # unreadable: the default layout RUN/checkpoints
            pass
        try:
            step = latest_checkpoint(root)
        except CheckpointError as e:   # complete checkpoints exist, but none verifies
            raise SampleError(f"--checkpoint {path}: {e}") from None
        if step is None:
            raise SampleError(f"--checkpoint {path}: the run has no complete checkpoint in {root}; train until "
                              "one is saved (checkpoint.every, or the end of the run) or name a step directory")
        return step, path
    try:
        step = resolve_checkpoint(path)
    except CheckpointError as e:
        raise SampleError(f"--checkpoint {e}") from None
    if not (step / "meta.json").is_file():
        raise SampleError(f"--checkpoint {path} is neither a run directory (no config.yaml) nor a checkpoint "
                          "(no meta.json); give RUN_DIR or RUN_DIR/checkpoints/step_N")
    run = step.parent.parent   # RUN/checkpoints/step_N, the trainer's default layout
    return step, run if (run / "config.yaml").is_file() else None


def _training_config(meta: dict, run: Path | None) -> dict:
    """The config the checkpoint was trained under: its meta.json copy, else the run's config.yaml."""
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    if run is not None:
        return yaml.safe_load((run / "config.yaml").read_text()) or {}
    return {}


def _tokenizer_path(config: dict, run: Path | None) -> str:
    """The tokenizer the run trained with: post-training's init.tokenizer, pretraining's data.tokenizer,
    or the embedded corpus's (pretrain.corpus caches it under data.cache_dir). Relative paths were
    relative to the training job's working directory: try this one, then the one the run directory implies."""
    data = config.get("data") or {}
    named = (config.get("init") or {}).get("tokenizer") or data.get("tokenizer") or ""
    if not named and data.get("embedded") and not data.get("paths"):
        named = embedded_tokenizer_path(data.get("cache_dir", ".cache/whaletron"), data.get("vocab_size", 4096),
                                        data.get("corpus_bytes", 8_000_000))
    if not named:
        raise SampleError("the checkpoint's config names no tokenizer; "
                          "pass --tokenizer FILE (.model or tokenizer.json)")
    bases = [Path.cwd()]
    logged = Path((config.get("logging") or {}).get("run_dir") or "")
    if run is not None and logged.parts and not logged.is_absolute() \
            and run.resolve().parts[-len(logged.parts):] == logged.parts:
        bases.append(run.resolve().parents[len(logged.parts) - 1])   # RUN = <training cwd>/logging.run_dir
    for base in bases:
        if (base / named).exists():
            return str(base / named)
    raise SampleError(f"the run's tokenizer {named} is not there (looked under {', '.join(map(str, bases))}); "
                      "pass --tokenizer FILE (.model or tokenizer.json)")


def load_for_sampling(checkpoint, device="cpu", *, tokenizer: str | None = None, ema: bool = False):
    """A one-process eval model with a checkpoint's weights (saved under any layout: DCP reshards) and
    its tokenizer. Returns (model, tokenizer, info) with info: step_dir, step, tokenizer_path."""
    step_dir, run = _locate(checkpoint)
    try:
        meta = read_meta(step_dir)
    except CheckpointError as e:
        raise SampleError(f"--checkpoint {e}") from None
    if not isinstance(meta.get("model_config"), dict):
        raise SampleError(f"--checkpoint {step_dir}: meta.json records no model_config; it was not written by "
                          "python -m pretrain or a post-training stage")
    try:
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError) as e:
        raise SampleError(f"--checkpoint {step_dir}: its model_config does not fit this code ({e}); sample with "
                          "the version that wrote it") from None
    tok_path = tokenizer or _tokenizer_path(_training_config(meta, run), run)
    try:
        tok = load_tokenizer(tok_path)
    except (OSError, ValueError) as e:
        raise SampleError(f"--tokenizer {tok_path}: {e}") from None
    if tok.vocab_size > cfg.vocab_size:
        raise SampleError(f"--tokenizer {tok_path} has {tok.vocab_size} tokens but the model's vocabulary has "
                          f"{cfg.vocab_size}: it is not the tokenizer this model was trained with; pass that one")
    net = build_model(cfg, device=device, seed=None)   # real buffers (rotary tables); the weights come next
    state = {k: v for k, v in sharded_state(net).items() if k.startswith("model/")}
    try:
        load_checkpoint(step_dir, state, model_config=cfg.to_dict())
        if ema:
            if not any(k.startswith("ema/") for k in meta.get("keys", [])):
                raise SampleError(f"--ema: {step_dir} holds no EMA weights (train.ema_decay was 0); drop --ema")
            params = {n for n, _ in net.named_parameters()}
            load_checkpoint(step_dir, {f"ema/{k[6:]}": v for k, v in state.items() if k[6:] in params})
    except CheckpointError as e:
        raise SampleError(f"--checkpoint {e}") from None
    return net.eval(), tok, {"step_dir": step_dir, "step": meta.get("step"), "tokenizer_path": tok_path}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m posttrain.generate",
        description="Sample continuations of prompts from a checkpoint, in one process (CPU or CUDA), whatever "
                    "layout it was trained under. Prints each sample as prompt + continuation, followed by a "
                    "line of dashes; what was loaded and the speed go to stderr.")
    ap.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="a pretraining run directory (its latest checkpoint) or a checkpoint directory")
    ap.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                    help="a prompt (repeatable); none or '': start a new document")
    ap.add_argument("--prompt-file", metavar="FILE", help="more prompts, one per line")
    ap.add_argument("--num-samples", type=int, default=3, metavar="N", help="samples per prompt (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default 64")
    ap.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default 0.8)")
    ap.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K likeliest tokens (0 = off)")
    ap.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass in (0, 1] (1 = off)")
    ap.add_argument("--seed", type=int, default=0,
                    help="the same seed, prompts and --num-samples give the same samples (default 0)")
    ap.add_argument("--tokenizer", metavar="FILE", help="override the run's tokenizer (.model or tokenizer.json)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when visible")
    ap.add_argument("--ema", action="store_true", help="sample from the EMA weights (train.ema_decay > 0)")
    return ap


def _params(a) -> SamplingParams:
    """SamplingParams from the flags, each refusal naming its flag."""
    checks = [(a.num_samples >= 1, f"--num-samples must be >= 1, got {a.num_samples}"),
              (a.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {a.max_new_tokens}"),
              (a.temperature >= 0 and math.isfinite(a.temperature),
               f"--temperature must be >= 0 (0 = greedy), got {a.temperature}"),
              (0 < a.top_p <= 1, f"--top-p must be in (0, 1] (1 = off), got {a.top_p}"),
              (a.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {a.top_k}")]
    for ok, msg in checks:
        if not ok:
            raise SampleError(msg)
    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k)


def _prompts(a) -> list[str]:
    prompts = list(a.prompt)
    if a.prompt_file:
        try:
            with open(a.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\r\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"--prompt-file {a.prompt_file}: {e}") from None
    return prompts or [""]


def _device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device cuda, but no CUDA device is visible; use --device cpu")
    return torch.device("cuda" if pref != "cpu" and torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    try:
        a = _parser().parse_args(argv)
    except SystemExit as e:   # argparse has printed its usage and error; the code (2, or 0 for --help) stands
        return int(e.code or 0)
    try:
        params, prompts, device = _params(a), _prompts(a), _device(a.device)
        net, tok, info = load_for_sampling(a.checkpoint, device, tokenizer=a.tokenizer, ema=a.ema)
        # an empty prompt starts a document: the end-of-document token every training document followed
        ids = [tok.encode(p) or [tok.eod_id] for p in prompts]
        longest = max(len(q) for q in ids)
        if longest + params.max_new_tokens > net.cfg.max_seq_len:
            raise SampleError(f"--max-new-tokens {params.max_new_tokens} + the longest prompt ({longest} tokens) "
                              f"exceeds the model's max_seq_len {net.cfg.max_seq_len}; lower --max-new-tokens")
    except SampleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{info['step_dir']} (step {info['step']}{', EMA' if a.ema else ''}), tokenizer {info['tokenizer_path']}, "
          f"{device}", file=sys.stderr)
    batch = [q for q in ids for _ in range(a.num_samples)]
    outs, stats = Generator(net, tok).generate(batch, params, seed=a.seed)
    for q, c in zip(batch, outs):
        # decode the whole sequence: a tokenizer may join the prompt's last piece to the continuation
        print(tok.decode([t for t in q + c.ids if t != tok.eod_id]))
        print("---------------")
    print(f"{stats['tokens']} tokens in {stats['seconds']:.2f} s ({stats['tokens_per_s']:.0f} tokens/s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
