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
Pipeline parallelism is not handled here: the post-training stages regather the stages to pp = 1
before rollouts (posttrain.runtime), because decoding one token per step through a pipeline keeps all
but one stage idle.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["SamplingParams", "Completion", "Generator", "sample_tokens"]


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0       # 0: greedy
    top_p: float = 1.0             # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0                 # 0: off
    stop: list[str] = field(default_factory=list)   # stop strings (kept in the text), besides end-of-document
    include_stop: bool = True      # keep the stop string in the text (the format reward needs </answer>)

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


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]            # generated tokens, ending with end-of-document when it stopped on one
    text: str                 # decoded, cut after the stop string that ended it
    logprobs: list[float]     # log-prob of each generated token under the sampled distribution (logits / T)
    finish: str               # "eod", "stop", or "length"


def sample_tokens(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None):
    """Draw one token per row of fp32 logits [batch, vocab]; returns (ids, log-prob of each under
    logits / temperature, before the top-k / top-p truncation)."""
    logits = logits.float()
    if p.temperature == 0:
        ids = logits.argmax(-1)
        return ids, logits.log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    logits = logits / p.temperature
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
    ids = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return ids, logp.gather(-1, ids[:, None])[:, 0]


class Generator:
    def __init__(self, model, tokenizer, *, pad_id: int | None = None):
        self.model, self.tokenizer = model, tokenizer
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
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int = 0):
        """Sample one completion per prompt. Returns (completions, stats) with stats tokens, seconds,
        tokens_per_s (this rank's generated tokens over the wall time of the call)."""
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
        finish = [""] * b
        texts = [""] * b
        running = torch.ones(b, dtype=torch.bool)
        t0 = time.perf_counter()
        pos, step_in = 0, tokens
        for step in range(params.max_new_tokens):
            logits = net.gather_logits(net(step_in, pos, caches, doc_ids=doc)[:, -1])
            ids, lp = sample_tokens(logits, params, gen)
            pos += step_in.shape[1]
            ids_l, lp_l = ids.tolist(), lp.tolist()
            for i in range(b):
                if not running[i]:
                    continue
                out[i].append(ids_l[i])
                logps[i].append(lp_l[i])
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
        completions = []
        for i in range(b):
            if not finish[i]:
                finish[i] = "length"
            text = texts[i] if finish[i] == "stop" else self.tokenizer.decode(
                [t for t in out[i] if t != self.eod])
            completions.append(Completion(list(prompts[i]), out[i], text, logps[i], finish[i]))
        n = sum(len(c.ids) for c in completions)
        net.train(was_training)
        return completions, {"tokens": n, "seconds": seconds, "tokens_per_s": n / max(seconds, 1e-9)}
