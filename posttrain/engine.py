"""The rollout engine: continuous batching over a paged cache, shared prompt prefixes, MTP speculation.

    engine = Engine(net, tokenizer, max_batch=64, draft_tokens=1)   # draft_tokens 0: no speculation
    outs, stats = engine.generate(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.7), seed=0)
    outs[i]: a posttrain.generate.Completion; stats: tokens, seconds, tokens_per_s, forwards, acceptance, ...

Pages. Every layer's cache (and the MTP block's, when speculating) is one `KVCache` whose batch rows are
pages of `page_size` positions: for MLA a page holds only the latent c^KV and the rotated k^R (V2 §2.1.3),
for dense attention keys and values. A sequence owns a block table, the list of its pages; position t
lives in page table[t // page_size] at slot t % page_size. `PagedCache` hands a layer's pages to the
attention as an ordinary cache: `write` scatters the step's keys into their slots and returns each
sequence's keys gathered in position order, [batch, longest context, ...]; the mask hides what lies past
each sequence's own length. Page 0 is scratch, the target of padding writes.

Scheduler. Prompts wait in arrival order; identical prompts (a GRPO group's G samples, rejection sampling's
k) form a group that is prefilled once: the children share the prompt's pages (reference counts) and
copy a page before their first write into it (copy on write; only the page holding a child's first write
ever is). A group is admitted when the pool can promise every child its worst case (prompt +
max_new_tokens) and the batch has room, so no running sequence ever waits for a page or is preempted; a
group that does not fit whole is split. Each step decodes every running sequence at its own position; a sequence that
finishes leaves the batch and its pages return to the pool, and waiting prompts take its place.

Per step cost. On a small model a step's time is mostly fixed (the forward's per-op overhead), so the
engine keeps its own work per step to a few small tensors: each running sequence holds a batch slot, whose
row of the block-table tensor `table` is updated only when a page is taken or copied (speculating, its
row of the draft buffer `dbuf` each step). A step is one call (`decode_step`, `speculation_step`): it builds
its write slots, gather indices and mask from those rows, the start positions and the key count (`frame`),
runs the forward, and draws (with the acceptance of drafts and the next drafts, speculating) inside.
With compile=True (one process) every decode, verify and draft forward of at most COMPILE_TOKENS tokens runs
through torch.compile with symbolic batch, chunk and context sizes (posttrain/generate.py `compiled`), which
removes most of the per-op cost of the model's hundreds of small kernels. The first step of each shape class
compiles (tens of seconds on a CPU). On a CUDA device each step is also padded to a batch and a context
bucket and replayed from a CUDA graph recorded per bucket (`buckets`, `StepGraphs`): the whole step, one launch.

Exactness. A sequence's arithmetic is the static engine's up to the order of floating-point sums, so at
temperature 0 the tokens are the same and the log-probs equal to rounding. Each sequence samples from its
own stream (`seeds`, or seed * 1_000_003 + index): every draw is an inverse-CDF draw with a uniform that is a
hash of the seed and the count of uniforms drawn before (`stream_uniforms`, counter-based), so a sampled
sequence is the same alone or in any batch, whatever finishes beside it, and the batch draws inside the step's
program in a few vectorised ops rather than a generator call per sequence.

Speculation (draft_tokens = k >= 1; V3 §5.4.3). The first MTP module drafts k tokens, chained on its own
hidden state past the first, as vLLM and SGLang do with V3's single module; the main model verifies
[pending token, drafts] in one forward, and each draft is accepted with probability min(1, p/q), a
rejected one replaced by a sample of norm(max(0, p - q)), and a fully accepted run ends with a sample of
p (Leviathan et al. 2023, Chen et al. 2023): the emitted tokens are distributed exactly as the model's,
and at temperature 0 they are its greedy tokens. Each step drafts the next one's tokens at its end: the
MTP module runs over the verified positions with the main model's hidden states and the tokens one ahead
(the accepted drafts, then the last emitted token) and drafts from the last emitted position, so the MTP
cache keeps pace with the main one; a new sequence's first drafts come from the prompt's last position at
admission. The whole step (verify, acceptance, the MTP pass and the chained drafts) is one call, one
compiled program with compile=True (`speculation_step`): at T > 0 the step's uniforms come from each
sequence's stream inside it, and acceptance and every draw (inverse CDF) happen inside too. On a small
model a step then costs about a decode plus the MTP block's share, not three calls' fixed costs.

Parallel layouts. Under tp every rank holds the same prompts and seeds and gathers the same logits, so all
run the same schedule. Under ep (and any layout whose forward is a collective) the ranks hold different
prompts: each forward of the schedule (prefill, MTP prefill, first drafts, decode, or verify and its drafts)
is preceded by an all-reduce of "does any rank need it", and a rank that does not runs a one-token
forward into the scratch page, so that every rank enters every collective. Pipeline parallelism is not
handled: post-training rolls out at pp = 1.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.data_parallel import is_fsdp, reshard

from .generate import (COMPILE_TOKENS, Completion, Generator, SamplingParams, allowed_ids, compiled,
                       restricted_logprobs, sampling_distribution)

__all__ = ["Engine", "PagePool", "PagedCache", "StepGraphs", "batch_bucket", "keys_bucket", "rollout_engine"]

TOO_LONG = "prompt_too_long"   # the finish of a prompt that cannot fit: reported, never truncated


def inverse_cdf(dist: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of the unnormalised distributions dist [b, vocab], drawn with the uniforms u [b]: the
    first whose cumulative mass exceeds u times the row's total (never a zero-mass token)."""
    cdf = dist.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=dist.shape[-1] - 1)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for x in [0, 2^32) held in int64, without overflowing int64 (c split in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' lowbias32), on int64 tensors holding [0, 2^32)."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def stream_uniforms(rng: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's next n uniforms in [0, 1), [b, n] fp32, from its own counter-based stream: rng [b, 2] int64 holds
    each row's seed and how many it has drawn before, and draw c of seed s is a hash of (s, c), so a row's draws
    depend on its seed and count alone (the batch, the step and the device do not enter), and the whole batch
    draws in a few vectorised ops inside the step's program (a generator per sequence would be a call per row)."""
    seed, drawn = rng[:, 0], rng[:, 1]
    key = _mix32(_mix32((seed & _M32) ^ 0x9E3779B9) ^ ((seed >> 32) & _M32))   # the row's 32-bit key
    c = (drawn[:, None] + torch.arange(n, device=rng.device)) & _M32
    h = _mix32(_mix32(c ^ 0x85EBCA6B) ^ key[:, None])                          # a bijection of c per key
    return (h >> 8).to(torch.float32) * 2.0 ** -24   # 24 bits: exact in fp32, below 1


def frame(table, start, s: int, keys: int, pages: list[dict], lens=None):
    """(positions [b, s], mask [b, s, keys], a `PagedCache` per layer's `pages`) for chunks of s tokens at
    positions start[b] + 0, 1, ... of the sequences whose block tables are the rows of `table`; the keys span
    positions [0, keys); lens [b]: each row's own chunk length, the rest right padding (None: all are s long).
    Built from tensors alone (no Python loop over the batch), inside a step's program when it is compiled."""
    P = next(iter(pages[0].values())).shape[1]
    ar_s, t = torch.arange(s, device=table.device), torch.arange(keys, device=table.device)
    pos = start[:, None] + ar_s
    # position t lives in page table[t // P] at slot t % P (a position past the table, padding or a scratch
    # row's keys: its last page, masked or scratch)
    last = table.shape[1] - 1
    slots = table.gather(1, (pos // P).clamp(max=last)) * P + pos % P
    gather = table.gather(1, (t // P).clamp(max=last).expand(table.shape[0], -1)) * P + t % P
    mask = t <= pos[..., None]
    if lens is not None:
        valid = ar_s < lens[:, None]
        slots = torch.where(valid, slots, 0)                              # padding writes go to scratch
        mask = torch.where(valid[..., None], mask, t == 0)               # padding queries see key 0 only
    return pos, mask, [PagedCache(layer, slots, gather) for layer in pages]


def step_routes(model) -> torch.Tensor | None:
    """With routing replay's recording on (`Transformer.record_routing`): the trunk's experts of the forward just
    run [b, s, n_moe_layers, k], the record emptied for the next; else None. The step programs return them as an
    output, so a compiled step records what an eager one does and a CUDA graph's replay returns them too (a module
    attribute set inside a captured program is not set again when it replays)."""
    if not any(m.record_routes for m in model.trunk_moe_layers()):
        return None
    routes = model.recorded_routing()[-1]
    model.record_routing()
    return routes


def decode_step(model, tokens, table, start, keys: int, pages, params, rng=None):
    """One decode step for the batch as one program (compiled like speculation_step): the main model over
    tokens [b, 1] at positions start (its cache: `frame` over the trunk's `pages`), then each row's next token,
    the argmax at T = 0, else an inverse-CDF draw from its sampling distribution with the row's next uniform
    (rng: `stream_uniforms`). Returns (tokens [b], their log-probs [b], the truncation masks [b, vocab] or
    None, the recorded experts [b, 1, n_moe_layers, k] or None: `step_routes`)."""
    pos, mask, caches = frame(table, start, 1, keys, pages)
    logits, _ = model.decode(tokens, pos, caches, mask)
    routes = step_routes(model)
    logits = model.gather_logits(logits[:, 0]).float()
    logp, p, keep = Engine._distributions(logits, params)
    ids = logits.argmax(-1) if rng is None else inverse_cdf(p, stream_uniforms(rng, 1)[:, 0])
    return ids, logp.gather(1, ids[:, None])[:, 0], keep, routes


def speculation_step(model, tokens, table, start, keys: int, lens, pages, drafted, limit, n_draft: int, params,
                     accept=None, q=None, rng=None):
    """One speculation step as one program (compiled like the decode-sized forwards; V3 §5.4.3, Leviathan et al.
    2023 alg. 1). The main model verifies tokens [b, 1 + w] = [pending, drafts] at positions start + 0, 1, ...
    (`frame` over `pages`: the trunk's layers' then the MTP block's; lens [b]: 1 + each row's drafts, or None
    when all have w; drafted [b]: how many of a row's drafts are real); the drafts are accepted while the rule
    holds, and the token after the accepted run is drawn; then the MTP module runs over the same positions with
    the main model's hidden states and the tokens one ahead (the accepted drafts, then that token: V3 eq. 21)
    and drafts the next step's first token from the last emitted position, the rest chained on its own hidden
    state one position on (clamped to each row's `limit`: a draft past what a row may still emit is never used;
    `draft_step`).

    At T = 0 a draft is accepted while it is the argmax, and every draw is the argmax. At T > 0 (q [b, n_draft,
    vocab]: the drafts' sampling distributions; u [b, 2 n_draft + 1]: the row's next uniforms, from rng by
    `stream_uniforms`) draft j is accepted when accept(p, q, u[:, j]) (u q(d) < p(d)), a rejected one replaced by a
    draw from norm(max(0, p - q)) and a run accepted whole followed by a draw from p (u[:, n_draft]), and
    the next drafts are drawn from the MTP's distributions (u[:, n_draft + 1 + j]), each by inverse CDF.
    Returns (tokens one ahead [b, 1 + w], whose first accepted + 1 are emitted; their log-probs; the
    truncation masks [b, 1 + w, vocab] or None; accepted drafts per row [b]; next drafts [b, n_draft]; their
    distributions [b, n_draft, vocab] or None at T = 0; the verify's recorded experts [b, 1 + w, n_moe_layers, k]
    or None: `step_routes`)."""
    greedy = params.temperature == 0
    pos, mask, caches = frame(table, start, tokens.shape[1], keys, pages, lens)
    logits, h = model.decode(tokens, pos, caches[:-1], mask)
    routes = step_routes(model)
    logits = model.gather_logits(logits).float()
    logp, p, keep = Engine._distributions(logits, params)
    at = torch.arange(tokens.shape[0], device=tokens.device)
    w, d = tokens.shape[1] - 1, tokens[:, 1:]
    real = torch.arange(w, device=tokens.device) < drafted[:, None]
    if greedy:
        ahead = logits.argmax(-1)
        accepted = ((ahead[:, :-1] == d) & real).long().cumprod(1).sum(1)
    else:
        u = stream_uniforms(rng, 2 * n_draft + 1)
        p_d, q_d = p[:, :w].gather(2, d[..., None])[..., 0], q[:, :w].gather(2, d[..., None])[..., 0]
        accepted = (accept(p_d, q_d, u[:, :w]) & real).long().cumprod(1).sum(1)
        p_n, q_n = p[at, accepted], q[at, accepted.clamp(max=n_draft - 1)]
        last = inverse_cdf(torch.where((accepted < drafted)[:, None], (p_n - q_n).clamp(min=0), p_n),
                           u[:, n_draft])
        ahead = torch.where(torch.arange(w + 1, device=d.device) == accepted[:, None], last[:, None],
                            torch.cat([d, last[:, None]], 1))
    logp = logp.gather(2, ahead[..., None])[..., 0]
    drafts, qs = draft_step(model, h, ahead, pos, caches[-1], mask, accepted, limit, n_draft, params,
                            None if greedy else u[:, n_draft + 1:])
    return ahead, logp, keep, accepted, drafts, qs, routes


def draft_step(model, h, ahead, pos, cache, mask, at, limit, n_draft: int, params, u=None):
    """The next n_draft drafts per row, as one program: the first MTP module over chunks at positions pos
    [b, s] with the main model's hidden states h [b, s, dim] and the tokens one ahead of them, the first
    draft from chunk position at [b], the rest chained on the module's own hidden state one position on
    (clamped to `limit`), through a `ChainCache`; argmax at T = 0, else inverse-CDF draws with u [b,
    n_draft]. Returns (drafts [b, n_draft], their distributions [b, n_draft, vocab] or None at T = 0)."""
    rows = torch.arange(ahead.shape[0], device=ahead.device)
    d_logits, g = model.draft(h, ahead, pos, cache, mask)
    d_logits, g, at_pos = d_logits[rows, at], g[rows, at][:, None], pos[rows, at]
    keys, chain = torch.arange(mask.shape[-1], device=mask.device), ChainCache(cache)
    drafts, qs = [], []
    for j in range(n_draft):
        if j:
            at_pos = chain.pos = torch.minimum(at_pos + 1, limit)
            d_logits, g = model.draft(g, drafts[-1][:, None], at_pos[:, None], chain,
                                      (keys <= at_pos[:, None])[:, None])
            d_logits = d_logits[:, 0]
        d_logits = model.gather_logits(d_logits).float()
        _, q_j, _ = Engine._distributions(d_logits, params)
        drafts.append(d_logits.argmax(-1) if u is None else inverse_cdf(q_j, u[:, j]))
        qs.append(q_j)
    return torch.stack(drafts, 1), None if u is None else torch.stack(qs, 1)


def first_draft_step(model, hidden, tokens, table, start, keys: int, pages, limit, n_draft: int, params, rng=None):
    """New sequences' first drafts as one program (`draft_step` at each row's prompt's last position start [b],
    on its hidden state there [b, 1, dim] and its first sampled token [b, 1]; `frame` over the MTP block's
    `pages`), with the rows' next n_draft uniforms drawn inside at T > 0 (rng: `stream_uniforms`)."""
    pos, mask, caches = frame(table, start, 1, keys, [pages])
    u = None if rng is None else stream_uniforms(rng, n_draft)
    return draft_step(model, hidden, tokens, pos, caches[0], mask, torch.zeros_like(limit), limit, n_draft, params, u)


def batch_bucket(n: int, cap: int) -> int:
    """The batch a step of n rows is padded to: the next of 1, 2, 4, 8, then multiples of 16, at most cap (the
    engine's max_batch), so that a rollout's steps take a dozen shapes (vLLM's and SGLang's capture sizes)."""
    b = 1 << max(n - 1, 0).bit_length() if n <= 8 else -(-n // 16) * 16
    return min(b, cap)


def keys_bucket(n: int, floor: int, cap: int) -> int:
    """The key count a step reaching n positions attends over: the next power of two times `floor` (the page
    size), at most cap (max_seq_len). Keys past a row's position are masked, so padding them changes no row."""
    k = floor
    while k < n:
        k *= 2
    return min(k, cap)


class StepGraphs:
    """CUDA graphs of the engine's step programs over one page pool, one per shape (batch bucket, chunk, context
    bucket, sampling), each recorded on its first use and replayed after, as vLLM and SGLang replay their decode
    graphs: a replay copies the step's rows into the graph's static inputs (zero rows past them) and launches
    the whole step, hundreds of kernels, at once. The pages are the same tensors in every replay (the graphs
    belong to one pool). All graphs share one memory pool: a step's outputs are read before the next replay,
    as every caller does (it copies them or moves them to the host at once)."""

    def __init__(self):
        self.pool, self.graphs, self.recorded, self.replays = None, {}, 0, 0

    @staticmethod
    def _fill(static: dict, rows: dict) -> None:
        for name, value in rows.items():
            if value is not None:
                static[name][:value.shape[0]].copy_(value)
                static[name][value.shape[0]:].zero_()

    def record(self, fn, static: dict, fixed: dict):
        """(replay, outputs) of fn over the static inputs: warmed up outside the graph, then captured."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # compile, autotune and warm the allocator outside the capture
            fn(**static, **fixed)       # (it writes the step's own keys, as the replay will again)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(**static, **fixed)
        return graph.replay, out

    def __call__(self, key, fn, rows: dict, batch: int, fixed: dict):
        if key not in self.graphs:
            static = {k: None if v is None else v.new_zeros(batch, *v.shape[1:]) for k, v in rows.items()}
            self._fill(static, rows)
            self.graphs[key] = (*self.record(fn, static, fixed), static)
            self.recorded += 1
        replay, out, static = self.graphs[key]
        self._fill(static, rows)
        replay()
        self.replays += 1
        return out


class PagePool:
    """Every layer's cache cut into `n_pages` pages of `page_size` positions, with reference counts
    (shared prefixes) and promises (pages admitted sequences may still take). Page 0 is scratch."""

    def __init__(self, model, n_pages: int, page_size: int, mtp: bool):
        # a KVCache of batch n_pages and length page_size: its batch rows are the pages; forwards take its
        # buffers as plain tensors (a compiled step guarding on a freed pool's module would recompile)
        self.caches = model.new_cache(n_pages, page_size, mtp=mtp)
        self.pages = [dict(c.named_buffers()) for c in self.caches]
        self.n_pages, self.page_size = n_pages, page_size
        self.reset()

    def reset(self) -> None:
        """Every page free (a kept pool's next call: pages are written before they are read, so none is cleared)."""
        self.free = list(range(self.n_pages - 1, 0, -1))
        self.refs = [0] * self.n_pages
        self.promised = 0

    def available(self) -> int:
        """Pages neither in use nor promised."""
        return len(self.free) - self.promised

    def take(self) -> int:
        """A fresh page, out of a promise already made."""
        page = self.free.pop()
        self.refs[page], self.promised = 1, self.promised - 1
        return page

    def share(self, page: int) -> None:
        self.refs[page] += 1

    def release(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self.free.append(page)

    @torch.no_grad()
    def copy(self, src: int, dst: int) -> None:
        for cache in self.caches:
            for buf in cache.buffers():
                buf[dst].copy_(buf[src])


class PagedCache:
    """One layer's pages (its cache's buffers by name) seen by the attention as a cache, for one forward:
    `write` stores the step's values at `slots` [b, s] (flat page * page_size + offset) and returns each
    sequence's values in position order, gathered at `gather` [b, keys]."""

    def __init__(self, pages: dict[str, torch.Tensor], slots: torch.Tensor, gather: torch.Tensor):
        # flat indices: index_copy_ / index_select run ~4x faster than advanced indexing on CPU
        self.pages, self.slots, self.gather, self.shape = pages, slots.flatten(), gather.flatten(), gather.shape

    def write(self, name: str, start_pos: int, value: torch.Tensor) -> torch.Tensor:
        buf = self.pages[name]
        flat = buf.view(-1, *buf.shape[2:])
        value = value.flatten(0, 1)
        if value.dtype != flat.dtype:
            value = value.to(flat.dtype)
        flat.index_copy_(0, self.slots, value)   # padding: all into scratch slot 0
        return flat.index_select(0, self.gather).view(*self.shape, *flat.shape[1:])


class ChainCache:
    """The MTP block's cache as chained drafts inside one program see it: the pages gathered once, and
    each chained position's values put into that copy instead of into the pages. A chained draft's entry is
    overwritten by the next step's MTP pass before anything else reads it, so the pages need not hold it,
    and a program writing a buffer twice would copy the whole buffer. `pos` [b]: the position written next."""

    def __init__(self, paged: PagedCache):
        self.paged, self.pos, self.values = paged, None, {}

    def write(self, name: str, start_pos: int, value: torch.Tensor) -> torch.Tensor:
        if name not in self.values:
            buf = self.paged.pages[name]
            flat = buf.view(-1, *buf.shape[2:])
            self.values[name] = flat.index_select(0, self.paged.gather).view(*self.paged.shape, *flat.shape[1:])
        old = self.values[name]
        hit = torch.arange(old.shape[1], device=old.device) == self.pos[:, None]   # [b, keys]
        self.values[name] = torch.where(hit.view(*hit.shape, *[1] * (old.dim() - 2)), value.to(old.dtype), old)
        return self.values[name]


@dataclass
class Sequence:
    """One prompt's sample in flight: tokens are the prompt's then the sampled ones. Its cache holds
    positions [0, length); tokens[length] is the last token sampled, not yet fed back; `limit` is the last
    position it may ever write (prompt + max_new_tokens - 1). Its pages are row `slot` of the engine's
    block table; speculating, the MTP cache holds [0, length) too, and the next step's drafts wait in row
    `slot` of the engine's draft buffer."""

    index: int
    seed: int
    pages: list[int]
    promise: int
    tokens: list[int] = field(default_factory=list)
    length: int = 0
    limit: int = 0
    slot: int = 0
    out: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    finish: str = ""
    text: str = ""
    routes: list = field(default_factory=list)   # with record_routing: [n, n_moe_layers, k] per fed chunk
    allowed: list = field(default_factory=list)  # with keep_sampling_mask: each emitted token's allowed ids
    drawn: int = 0                               # uniforms drawn so far from its stream (`stream_uniforms`)


class Engine:
    """Continuous batching over a paged cache, with shared prefixes and optional MTP speculation.

    page_size: positions per page; n_pages: the pool (default: room for max_batch worst-case sequences);
    max_batch: sequences decoded together; share_prefix: identical prompts prefill once; draft_tokens: MTP
    drafts per step (0: none; needs a model with MTP modules); compile: decode-sized forwards through
    torch.compile (one process only); buckets: each step padded to a batch bucket and a
    context bucket (`batch_bucket`, `keys_bucket`), and on a CUDA device, compiled, replayed from a CUDA graph per
    bucket (`StepGraphs`; the engine then keeps its pool and graphs between calls: `release` frees them).
    None: on exactly when compiled on a CUDA device."""

    def __init__(self, model, tokenizer, *, page_size: int = 16, n_pages: int | None = None, max_batch: int = 64,
                 pad_id: int | None = None, share_prefix: bool = True, draft_tokens: int = 0, compile: bool = False,
                 buckets: bool | None = None):
        if page_size < 1 or max_batch < 1 or draft_tokens < 0:
            raise ValueError(f"page_size ({page_size}) and max_batch ({max_batch}) must be >= 1, draft_tokens "
                             f"({draft_tokens}) >= 0")
        if compile and is_fsdp(model):
            raise ValueError("compile=True traces each step whole, and this model is an FSDP2 module, whose hooks "
                             "do not trace: generate with a plain copy of the weights (posttrain/grpo.py does so "
                             "under rollout.compile), or set compile=False")
        if draft_tokens and not model.cfg.n_mtp:
            raise ValueError(f"speculative decoding (draft_tokens={draft_tokens}) drafts with the model's MTP "
                             "module, and this model has no MTP module (model.n_mtp = 0); set draft_tokens=0")
        self.model, self.tokenizer = model, tokenizer
        self.eod = tokenizer.eod_id
        self.pad = self.eod if pad_id is None else pad_id
        self.max_seq_len = model.cfg.max_seq_len
        self.n_layers = model.cfg.n_layers
        self.page_size, self.n_pages, self.max_batch = page_size, n_pages, max_batch
        self.share_prefix, self.draft_tokens = share_prefix, draft_tokens
        self.compile, self.compile_tokens = compile, COMPILE_TOKENS
        self.buckets, self.bucketed = buckets, bool(buckets)   # bucketed: resolved per call (None: on CUDA, compiled)
        self.kept: tuple[PagePool, StepGraphs] | None = None   # with graphs: the pool and its graphs, between calls
        self.graphs: StepGraphs | None = None
        self.record, self.routes = False, None   # routing replay: record the trunk's experts per forward

    # -- the acceptance rule (speculative sampling) -----------------------------------------------------
    @staticmethod
    def accept(p: torch.Tensor, q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Accept draft tokens drawn from q with probability min(1, p / q): p and q are their probabilities
        under the model's and the draft's sampling distributions, u uniforms in [0, 1)."""
        return u * q < p

    # -- one forward over a ragged batch ------------------------------------------------------------------
    def _extent(self, starts: list[int], s: int, lens: list[int] | None, reach: int = 0):
        """`frame`'s (start [b], keys, lens [b] or None) for chunks of s tokens at positions starts[i] + 0, 1, ...;
        lens[i]: row i's own chunk length (None: every row is s long); the keys reach `reach` positions past the
        longest chunk's end (the chained drafts', capped at max_seq_len)."""
        end = max(starts) + s if lens is None else max(st + n for st, n in zip(starts, lens))
        keys = min(end + reach, self.max_seq_len) if reach else end
        return (torch.tensor(starts, device=self.device), keys,
                None if lens is None else torch.tensor(lens, device=self.device))

    def _frame(self, table: torch.Tensor, starts: list[int], s: int, lens: list[int] | None, reach: int = 0):
        """(positions [b, s], mask [b, s, keys], every layer's PagedCache) for the sequences whose pages are the
        rows of `table` (see `_extent` and `frame`)."""
        start, keys, lens = self._extent(starts, s, lens, reach)
        return frame(table, start, s, keys, self.pool.pages, lens)

    def _compiles(self, n_tokens: int) -> bool:
        """Whether a forward over n_tokens tokens runs compiled: a decode-sized one, with compile on."""
        return self.compile and n_tokens <= self.compile_tokens

    def _launch(self, fn, rows: dict, keys: int, **fixed):
        """fn(**rows, keys=keys, **fixed), one call for the batch (a step function: `decode_step`,
        `speculation_step`, `first_draft_step`), compiled when decode-sized. rows: the batch's tensors [b, ...]
        (or None). With buckets the rows are padded with zero rows (token 0 at position 0 of the scratch page:
        a row that writes only scratch and is cut off after) to `batch_bucket`, the keys to `keys_bucket`, and a
        compiled step on a CUDA device replays its CUDA graph. Returns fn's outputs for the b real rows."""
        tokens = rows["tokens"]
        b = tokens.shape[0]
        if not self.bucketed:
            return (compiled(fn) if self._compiles(tokens.numel()) else fn)(**rows, keys=keys, **fixed)
        batch, keys = batch_bucket(b, self.max_batch), keys_bucket(keys, self.page_size, self.max_seq_len)
        runs_compiled = self._compiles(batch * tokens.shape[1])
        if self.graphs is not None and runs_compiled:
            sampling = fixed["params"]
            key = (fn, batch, keys, tuple((k, None if v is None else (v.shape[1:], v.dtype)) for k, v in rows.items()),
                   fixed.get("n_draft"), sampling.temperature, sampling.top_p, sampling.top_k, sampling.records_mask,
                   self.record)
            out = self.graphs(key, compiled(fn), rows, batch, dict(fixed, keys=keys))
        else:
            rows = {k: v if v is None or batch == b else torch.cat([v, v.new_zeros(batch - b, *v.shape[1:])])
                    for k, v in rows.items()}
            out = (compiled(fn) if runs_compiled else fn)(**rows, keys=keys, **fixed)
        return tuple(None if o is None else o[:b] for o in out)

    def _forward(self, table: torch.Tensor, starts: list[int], tokens: torch.Tensor, lens: list[int] | None = None,
                 hidden: torch.Tensor | None = None):
        """(logits [b, s, vocab], h [b, s, dim]) of tokens [b, s] at positions starts[i] + 0, 1, ... (see
        `_frame`), through the main model, or with `hidden` [b, s, dim] through the first MTP module (tokens
        then are the ones one ahead)."""
        pos, mask, caches = self._frame(table, starts, tokens.shape[1], lens)
        self.forwards += 1
        if hidden is None:
            if self._compiles(tokens.numel()):
                out = compiled(type(self.model).decode)(self.model, tokens, pos, caches[:self.n_layers], mask)
            else:
                out = self.model.decode(tokens, pos, caches[:self.n_layers], mask)
            self._recorded()
            return out
        if self._compiles(tokens.numel()):
            return compiled(type(self.model).draft)(self.model, hidden.contiguous(), tokens, pos,
                                                    caches[self.n_layers], mask)
        return self.model.draft(hidden, tokens, pos, caches[self.n_layers], mask)

    def _recorded(self) -> None:
        """With routing replay's recording on: the trunk's experts of the last forward per row [b, s,
        n_moe_layers, k] (padding rows are sliced off by the caller); the MTP's are not recorded."""
        if self.record:
            self.routes = step_routes(self.model).cpu()

    def _slots(self, seqs: list[Sequence]) -> torch.Tensor:
        return torch.tensor([s.slot for s in seqs], device=self.device)

    def _tokens(self, chunks: list[list[int]]) -> tuple[torch.Tensor, list[int] | None]:
        """(tokens [b, longest] right-padded, the chunks' lengths or None when all are equally long)."""
        lens = [len(c) for c in chunks]
        s = max(lens)
        if min(lens) == s:
            return torch.tensor(chunks, device=self.device), None
        return torch.tensor([c + [self.pad] * (s - len(c)) for c in chunks], device=self.device), lens

    def _anyone(self, flag: bool) -> bool:
        """Whether any rank needs the next forward (every rank then runs one: ep's all-to-alls are collective)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _idle(self, draft: bool = False) -> None:
        """A one-token forward into the scratch page, for a rank with nothing to run when another has."""
        p = next(self.model.parameters())
        hidden = torch.zeros(1, 1, self.model.cfg.dim, dtype=p.dtype, device=self.device) if draft else None
        zero = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._forward(zero, [0], zero + self.pad, None, hidden)
        self.forwards -= 1

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.model.gather_logits(logits).float()

    # -- pages ---------------------------------------------------------------------------------------------
    def _pages_for(self, seq: Sequence, start: int, end: int) -> None:
        """Make positions [start, end) writable: fresh pages up to end, and a private copy of any shared
        page among them (copy on write)."""
        P = self.page_size
        for i in range(start // P, math.ceil(end / P)):
            if i == len(seq.pages):
                seq.pages.append(self.pool.take())
                seq.promise -= 1
                self.table[seq.slot, i] = seq.pages[i]
            elif self.pool.refs[seq.pages[i]] > 1:
                page = self.pool.take()
                seq.promise -= 1
                self.pool.copy(seq.pages[i], page)
                self.pool.release(seq.pages[i])
                seq.pages[i] = page
                self.table[seq.slot, i] = page

    def _retire(self, seq: Sequence) -> None:
        for page in seq.pages:
            self.pool.release(page)
        self.pool.promised -= seq.promise
        self.table[seq.slot].zero_()   # the scratch page: a stale row would still be masked, but stays clean
        self.slots.append(seq.slot)
        seq.pages, seq.promise = [], 0

    # -- sampling -----------------------------------------------------------------------------------------
    @staticmethod
    def _distributions(logits: torch.Tensor, params: SamplingParams):
        """(log-probs under logits / T, the normalised sampling distributions or None at T = 0, the truncation
        masks or None) of fp32 logits [..., vocab], all rows at once. With params.records_mask the log-probs
        are renormalised over the truncation (Keep Sampling Mask) and the masks come back."""
        if params.temperature == 0:
            return logits.log_softmax(-1), None, None
        if params.records_mask:
            logp, probs, keep = sampling_distribution(logits.flatten(0, -2), params, with_keep=True)
            return (restricted_logprobs(logp, keep).view_as(logits),
                    (probs / probs.sum(-1, keepdim=True)).view_as(logits), keep.view_as(logits))
        logp, probs = sampling_distribution(logits.flatten(0, -2), params)
        return logp.view_as(logits), (probs / probs.sum(-1, keepdim=True)).view_as(logits), None

    def _draw(self, logits: torch.Tensor, probs: torch.Tensor | None, seqs: list[Sequence]) -> list[int]:
        """One token per row: the argmax at T = 0, else an inverse-CDF draw from each row's distribution with the
        next uniform of its own sequence's stream (so that no sequence's draws depend on the others)."""
        if probs is None:
            return logits.argmax(-1).tolist()
        return inverse_cdf(probs, stream_uniforms(self._streams(seqs, 1), 1)[:, 0]).tolist()

    def _emit(self, seq: Sequence, token: int, logp: float, params: SamplingParams,
              allowed: torch.Tensor | None = None) -> bool:
        """Append a sampled token (and its allowed set, when recorded); True when the sequence is finished (end
        of document, a stop string, or max_new_tokens), as the static engine decides."""
        seq.out.append(token)
        seq.logps.append(logp)
        if allowed is not None:
            seq.allowed.append(allowed)
        seq.tokens.append(token)
        if token == self.eod:
            seq.finish = "eod"
        elif params.stop:
            text = self.tokenizer.decode(seq.out)
            hits = [text.find(s) + len(s) * params.include_stop for s in params.stop if s in text]
            if hits:
                seq.finish, seq.text = "stop", text[:min(hits)]
        if not seq.finish and len(seq.out) == params.max_new_tokens:
            seq.finish = "length"
        return bool(seq.finish)

    # -- the scheduler -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int = 0,
                 seeds: list[int] | None = None, record_routing: bool = False):
        """One completion per prompt, in order. Returns (completions, stats); a prompt that cannot fit
        (prompt + max_new_tokens > max_seq_len) comes back with finish "prompt_too_long" and no tokens.
        stats: tokens, seconds, tokens_per_s, forwards (of the model or its MTP module), steps (decode or
        verify steps), prefill_tokens, skipped, pages, and with speculation acceptance (accepted over
        drafted tokens) and acceptance_per_position (the same at each draft position). With `record_routing`
        each completion carries `routes` [len, n_moe_layers, k]: the trunk's experts for every token fed (the
        prompt's from its shared prefill; of a verify step only the accepted positions; the MTP's excluded)."""
        if not prompts or any(len(q) == 0 for q in prompts):
            raise ValueError("generate needs at least one prompt, and every prompt at least one token")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds: one per prompt ({len(prompts)}), got {len(seeds)}")
        net = self.model
        was_training = net.training
        net.eval()
        if record_routing and not net.trunk_moe_layers():
            raise ValueError("record_routing: this model has no MoE layer whose routing could be recorded")
        self.record = record_routing
        if record_routing:
            net.record_routing()
        try:
            return self._generate(prompts, params, seed, seeds, was_training)
        finally:
            if record_routing:
                net.record_routing(False)
            self.record, self.routes = False, None

    def _generate(self, prompts, params, seed, seeds, was_training):
        net = self.model
        self.device = next(net.parameters()).device
        P, new = self.page_size, params.max_new_tokens
        fits = [len(q) + new <= self.max_seq_len for q in prompts]
        worst = max((sum(self._group_pages(len(q), params)[:2]) for q, ok in zip(prompts, fits) if ok), default=0)
        n_pages = self.n_pages or self.max_batch * worst + 1
        if worst > n_pages - 1:
            longest = max(len(q) for q, ok in zip(prompts, fits) if ok)
            raise ValueError(f"a page budget of {n_pages} pages of {P} positions (one is scratch) cannot hold one "
                             f"sequence: a {longest}-token prompt + max_new_tokens {new} needs {worst} pages; "
                             f"raise n_pages to at least {worst + 1} or lower max_new_tokens")
        self.bucketed = self.buckets if self.buckets is not None else self.compile and self.device.type == "cuda"
        self.pool, self.graphs = self._pool(n_pages)
        n_pages = self.pool.n_pages
        # the running sequences' block tables, one row per batch slot (unused entries: the scratch page 0), and
        # with speculation their next drafts (at T > 0 also the drafts' sampling distributions), per slot
        self.table = torch.zeros(self.max_batch, -(-self.max_seq_len // P), dtype=torch.long, device=self.device)
        self.slots = list(range(self.max_batch - 1, -1, -1))
        self.dbuf = (torch.full((self.max_batch, self.draft_tokens), self.pad, dtype=torch.long, device=self.device)
                     if self.draft_tokens else None)
        self.qbuf = (torch.ones(self.max_batch, self.draft_tokens, self.model.cfg.vocab_size, device=self.device)
                     if self.draft_tokens and params.temperature > 0 else None)
        self.sampled = params.temperature > 0
        self.forwards = self.prefilled = self.steps = 0
        self.drafted = [0] * self.draft_tokens
        self.accepted = [0] * self.draft_tokens
        seqs: list[Sequence | None] = [None] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for i, q in enumerate(prompts):
            if fits[i]:
                groups.setdefault(tuple(q) if self.share_prefix else (i,), []).append(i)
        waiting = deque(groups.values())
        running: list[Sequence] = []
        t0 = time.perf_counter()
        while self._anyone(bool(waiting or running)):
            admitted = self._admit(waiting, running, prompts, params, seed, seeds)
            if self._anyone(bool(admitted)):
                running += self._prefill(admitted, params)
            if not running and waiting and not admitted:   # cannot happen: an empty pool takes any group
                raise RuntimeError("the scheduler admitted nothing into an empty batch")
            if self._anyone(bool(running)):
                self.steps += bool(running)
                (self._speculate if self.draft_tokens else self._decode)(running, params)
            for seq in running:
                if seq.finish:
                    seqs[seq.index] = seq
                    self._retire(seq)
            running = [s for s in running if not s.finish]
            for group in admitted:   # children finished by their first token
                for seq in group[1]:
                    if seq.finish and seqs[seq.index] is None:
                        seqs[seq.index] = seq
                        self._retire(seq)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        if len(self.pool.free) != n_pages - 1 or self.pool.promised or len(self.slots) != self.max_batch:
            raise RuntimeError(f"page accounting: {n_pages - 1 - len(self.pool.free)} pages, {self.pool.promised} "
                               f"promises and {self.max_batch - len(self.slots)} batch slots outstanding after the "
                               "batch")   # every page, promise and slot came back
        completions = []
        for i, q in enumerate(prompts):
            seq = seqs[i]
            if seq is None:
                completions.append(Completion(list(q), [], "", [], TOO_LONG))
                continue
            text = seq.text if seq.finish == "stop" else self.tokenizer.decode([t for t in seq.out if t != self.eod])
            routes = torch.cat(seq.routes) if self.record else None
            completions.append(Completion(list(q), seq.out, text, seq.logps, seq.finish, routes,
                                          seq.allowed if params.records_mask else None))
        net.train(was_training)
        reshard(net)   # free the root FSDP2 keeps gathered after a no-grad forward (as SingleStage.evaluate)
        n = sum(len(c.ids) for c in completions)
        stats = {"tokens": n, "seconds": seconds, "tokens_per_s": n / max(seconds, 1e-9), "forwards": self.forwards,
                 "steps": self.steps, "prefill_tokens": self.prefilled, "skipped": fits.count(False), "pages": n_pages}
        if self.graphs is not None:
            stats["graphs"], stats["graph_replays"] = self.graphs.recorded, self.graphs.replays
        if self.draft_tokens:
            stats["acceptance"] = sum(self.accepted) / max(sum(self.drafted), 1)
            stats["drafted"], stats["accepted"] = sum(self.drafted), sum(self.accepted)
            stats["acceptance_per_position"] = [a / max(d, 1) for a, d in zip(self.accepted, self.drafted)]
        self.pool = self.graphs = self.table = self.dbuf = self.qbuf = None
        return completions, stats

    def _pool(self, n_pages: int) -> tuple[PagePool, StepGraphs | None]:
        """The page pool of a call, and the CUDA graphs of its steps when they replay them (bucketed, compiled, on
        a CUDA device). The graphs hold the pages' addresses, so then the pool and its graphs are kept between
        calls and reused while the pool has at least n_pages pages (`release` frees them); else a pool per call."""
        graphs = self._graphed()
        if graphs and self.kept is not None and self.kept[0].n_pages >= n_pages:
            self.kept[0].reset()
            return self.kept
        self.kept = None   # the old pool is freed before the new one is allocated
        pool = PagePool(self.model, n_pages, self.page_size, mtp=self.draft_tokens > 0)
        if graphs:
            self.kept = (pool, StepGraphs())
            return self.kept
        return pool, None

    def _graphed(self) -> bool:
        """Whether this call's compiled steps replay CUDA graphs: bucketed, compiled, on a CUDA device."""
        return self.bucketed and self.compile and self.device.type == "cuda"

    def release(self) -> None:
        """Free the pool and CUDA graphs kept between calls (with graphs), e.g. before a training step needs the
        memory; the next call allocates and records them again."""
        self.kept = None

    def _admit(self, waiting: deque, running: list, prompts, params, seed, seeds) -> list:
        """Take waiting groups in order while the batch has room and the pool can promise each child its
        worst case; a group that does not fit whole is split. Returns [(prompt, children)]."""
        admitted, room = [], self.max_batch - len(running)
        while waiting and room > 0:
            members = waiting[0]
            q = prompts[members[0]]
            prefix, fresh, copy = self._group_pages(len(q), params)
            g = min(len(members), room, (self.pool.available() - prefix + copy) // (fresh + copy))
            if g <= 0:
                break
            if g == len(members):
                waiting.popleft()
            else:
                waiting[0] = members[g:]
            # all but one child may copy the shared page they first write to (the last holder writes in place)
            self.pool.promised += prefix + g * fresh + (g - 1) * copy
            children = []
            for n, i in enumerate(members[:g]):
                stream = (seeds[i] if seeds is not None else seed * 1_000_003 + i) % 2 ** 63
                promise = fresh + copy * (n < g - 1)   # which child copies is the pool's concern, not the sum
                children.append(Sequence(i, stream, [], promise, tokens=list(q), length=len(q),
                                         limit=len(q) + params.max_new_tokens - 1, slot=self.slots.pop()))
            admitted.append((q, children))
            room -= g
        return admitted

    def _group_pages(self, n: int, params: SamplingParams) -> tuple[int, int, int]:
        """(pages of a prompt of n tokens, fresh pages a child takes past them at most, 1 when a child's first
        write lands in a prompt page, which it copies while shared): the first write is at position n, or
        n - 1 with speculation (the MTP cache's last prompt position)."""
        P = self.page_size
        prefix = math.ceil(n / P)
        first = (n - 1 if self.draft_tokens else n) // P
        return prefix, math.ceil((n + params.max_new_tokens) / P) - prefix, int(first < prefix)

    def _prefill(self, admitted: list, params: SamplingParams) -> list[Sequence]:
        """Prefill each admitted group's prompt once, in one forward; each child shares its pages and
        draws its first token from the shared last logits. Returns the children still running."""
        if not admitted:   # another rank prefills
            self._idle()
            if self.draft_tokens and self._anyone(False):
                self._idle(draft=True)
            if self.draft_tokens and self._anyone(False):
                self._draft([], None, None, params)
            return []
        tables = [[self.pool.take() for _ in range(math.ceil(len(q) / self.page_size))] for q, _ in admitted]
        width = max(map(len, tables))
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=self.device)
        prompts = [q for q, _ in admitted]
        self.prefilled += sum(map(len, prompts))
        tokens, lens = self._tokens(prompts)
        logits, h = self._forward(table, [0] * len(prompts), tokens, lens)
        prompt_routes = self.routes
        if self.draft_tokens:   # the MTP cache over the prompt but its last position (which needs the sample)
            spans = [q[1:] for q in prompts]
            idx = [i for i, sp in enumerate(spans) if sp]
            if self._anyone(bool(idx)):
                if idx:
                    tokens, lens = self._tokens([spans[i] for i in idx])
                    self._forward(table[idx], [0] * len(idx), tokens, lens, hidden=h[idx, :tokens.shape[1]])
                else:
                    self._idle(draft=True)
        ends = torch.tensor([len(q) - 1 for q in prompts], device=self.device)
        last = self._logits(logits[torch.arange(len(prompts), device=self.device), ends])
        logp, probs, keep = self._distributions(last, params)
        sets = allowed_ids(keep) if keep is not None else None
        out, rows = [], []
        for g, ((q, children), pages) in enumerate(zip(admitted, tables)):
            tokens = self._draw(last[g:g + 1].expand(len(children), -1),
                                None if probs is None else probs[g:g + 1].expand(len(children), -1), children)
            lps = logp[g, tokens].tolist()
            slots = torch.tensor([c.slot for c in children], device=self.device)
            self.table[slots, :len(pages)] = table[g, :len(pages)]
            for seq, token, lp in zip(children, tokens, lps):
                for page in pages:
                    self.pool.share(page)
                seq.pages = list(pages)
                if self.record:   # the children share the prompt's prefill, and so its routing
                    seq.routes = [prompt_routes[g, :len(q)]]
                if not self._emit(seq, token, lp, params, None if sets is None else sets[g]):
                    out.append(seq)
                    rows.append(g)
            for page in pages:   # the group's own reference: the children hold theirs
                self.pool.release(page)
        if self.draft_tokens and self._anyone(bool(out)):
            # the first drafts: the MTP module at the prompt's last position, on its hidden state and the
            # first sampled token; its writes, and the chain's past it, copy a still shared page first
            for seq in out:
                self._pages_for(seq, seq.length - 1, min(seq.length - 1 + self.draft_tokens, seq.limit + 1))
            rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
            self._draft(out, h[rows_t, ends[rows_t]][:, None], [seq.length - 1 for seq in out], params)
        return out

    def _decode(self, running: list[Sequence], params: SamplingParams):
        """One token for every running sequence: a fresh page only where a sequence crosses into one (or
        its first write lands in a shared page), then one call for the batch (`decode_step`: the forward and
        the draws, at T > 0 with the next uniform of each sequence's own stream)."""
        if not running:   # another rank decodes
            return self._idle()
        P, refs = self.page_size, self.pool.refs
        for seq in running:
            i = seq.length // P
            if i == len(seq.pages) or refs[seq.pages[i]] > 1:
                self._pages_for(seq, seq.length, seq.length + 1)
        tokens = torch.tensor([s.tokens[s.length] for s in running], device=self.device)[:, None]
        start, keys, _ = self._extent([s.length for s in running], 1, None)
        self.forwards += 1
        ids, logps, keep, routes = self._launch(
            decode_step, dict(tokens=tokens, table=self.table[self._slots(running)], start=start,
                              rng=self._streams(running, 1)),
            keys, model=self.model, pages=self.pool.pages[:self.n_layers], params=params)
        sets = allowed_ids(keep) if keep is not None else [None] * len(running)
        routes = routes.to("cpu", copy=True) if self.record else None   # a copy: a graph's output is rewritten
        for b, (seq, token, lp) in enumerate(zip(running, ids.tolist(), logps.tolist())):
            if self.record:
                seq.routes.append(routes[b, :1])
            seq.length += 1
            self._emit(seq, token, lp, params, sets[b])

    def _speculate(self, running: list[Sequence], params: SamplingParams):
        """One verify step, one call for the batch (`speculation_step`): the main model scores [pending token,
        its drafts] (up to draft_tokens drafts, no more than the sequence may still emit, less one), the
        speculative-sampling rule decides what is emitted, and the MTP module drafts the next step's tokens
        from the verified positions' hidden states. At T > 0 each sequence's uniforms come from its own
        stream, drawn inside the call."""
        K, dev = self.draft_tokens, self.device
        if not running:   # another rank verifies: the same collectives, into the scratch page
            zero = torch.zeros(1, 1, dtype=torch.long, device=dev)
            q = None if self.qbuf is None else self.qbuf[:1]
            self._step(zero, [0], zero + self.pad, None, zero[0], zero[0], params, q, self._streams([None], 2 * K + 1))
            self.forwards -= 1 + K
            return
        ks = [min(K, params.max_new_tokens - len(s.out) - 1) for s in running]
        P, refs = self.page_size, self.pool.refs
        for seq, k in zip(running, ks):   # the verify and the MTP write [length, length + 1 + k), the chain past it
            end = min(seq.length + k + K, seq.limit + 1)
            if -(-end // P) > len(seq.pages) or refs[seq.pages[seq.length // P]] > 1:
                self._pages_for(seq, seq.length, end)
        # the verify scores [pending, drafts]: 1 + width positions; at least one draft slot, so that a step in
        # which no sequence may draft (all one token from max_new_tokens) keeps the program's shapes (a compiled
        # step traced over zero drafts fails in dynamo's fake cumprod); the slot is padding (lens 1)
        width = max(max(ks), 1)
        slots = self._slots(running)
        pending = torch.tensor([s.tokens[s.length] for s in running], device=dev)[:, None]
        tokens = torch.cat([pending, self.dbuf[slots, :width]], 1)
        drafted, limit = torch.tensor([ks, [s.limit for s in running]], device=dev)
        for j in range(K):   # acceptance per position: accepted over drafted, whatever came before
            self.drafted[j] += sum(k > j for k in ks)
        ahead, logp, keep, n_ok, drafts, q, verify_routes = self._step(
            self.table[slots], [s.length for s in running], tokens, None if min(ks) == width else [1 + k for k in ks],
            drafted, limit, params, None if self.qbuf is None else self.qbuf[slots], self._streams(running, 2 * K + 1))
        self.dbuf[slots] = drafts
        if q is not None:
            self.qbuf[slots] = q
        n_ok, ahead, logp = n_ok.tolist(), ahead.tolist(), logp.tolist()
        verify_routes = verify_routes.to("cpu", copy=True) if self.record else None
        for j in range(K):
            self.accepted[j] += sum(a > j for a in n_ok)
        sets, base = None, 0
        if keep is not None:   # the emitted tokens' allowed sets: the truncation of the main model's p
            sets = allowed_ids(keep[[b for b, a in enumerate(n_ok) for _ in range(a + 1)],
                                    [j for a in n_ok for j in range(a + 1)]])
        for b, seq in enumerate(running):
            emitted = 0
            for j in range(n_ok[b] + 1):
                emitted += 1
                if self._emit(seq, ahead[b][j], logp[b][j], params, None if sets is None else sets[base + j]):
                    break
            base += n_ok[b] + 1
            if self.record:   # the pending token and the accepted drafts: the positions now in the cache
                seq.routes.append(verify_routes[b, :emitted])
            seq.length += emitted

    def _streams(self, running: list, n: int) -> torch.Tensor | None:
        """At T > 0 the rows' streams for `stream_uniforms` [b, 2] (seed, uniforms drawn before; a scratch row
        None draws from seed 0), each sequence's count advanced by the n it is about to draw; at T = 0 None."""
        if not self.sampled:
            return None
        rows = [(s.seed, s.drawn) if s is not None else (0, 0) for s in running]
        for s in running:
            if s is not None:
                s.drawn += n
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _step(self, table, starts, tokens, lens, drafted, limit, params, q, rng):
        """`speculation_step` over the batch (compiled when decode-sized)."""
        start, keys, lens = self._extent(starts, tokens.shape[1], lens, reach=self.draft_tokens - 1)
        self.forwards += 1 + self.draft_tokens
        return self._launch(speculation_step, dict(tokens=tokens, table=table, start=start, lens=lens,
                                                   drafted=drafted, limit=limit, q=q, rng=rng),
                            keys, model=self.model, pages=self.pool.pages, n_draft=self.draft_tokens, params=params,
                            accept=None if q is None else self.accept)

    def _draft(self, seqs: list[Sequence], hidden, starts: list[int] | None, params: SamplingParams) -> None:
        """New sequences' first drafts into the draft buffer (at T > 0 their distributions into the q buffer):
        `first_draft_step` at each one's prompt's last position `starts`, on its hidden state there [b, 1, dim] and
        the first sampled token, with uniforms from its own stream at T > 0. A rank with no sequence runs
        the same program on a scratch row (its forwards are collectives under ep)."""
        K, dev = self.draft_tokens, self.device
        scratch = not seqs
        if scratch:
            zero = torch.zeros(1, 1, dtype=torch.long, device=dev)
            p = next(self.model.parameters())
            table, starts, tokens = zero, [0], zero + self.pad
            hidden, limit = torch.zeros(1, 1, self.model.cfg.dim, dtype=p.dtype, device=dev), zero[0]
        else:
            slots = self._slots(seqs)
            table = self.table[slots]
            tokens = torch.tensor([[s.tokens[s.length]] for s in seqs], dtype=torch.long, device=dev)
            limit = torch.tensor([s.limit for s in seqs], device=dev)
        start, keys, _ = self._extent(starts, 1, None, reach=K - 1)
        drafts, q = self._launch(first_draft_step, dict(hidden=hidden.contiguous(), tokens=tokens, table=table,
                                                        start=start, limit=limit, rng=self._streams(seqs or [None], K)),
                                 keys, model=self.model, pages=self.pool.pages[self.n_layers], n_draft=K, params=params)
        if scratch:
            return
        self.forwards += K
        self.dbuf[slots] = drafts
        if q is not None:
            self.qbuf[slots] = q


def rollout_engine(model, tokenizer, rollout) -> Engine | Generator:
    """The generator a post-training stage samples with, from its `rollout` config section: the paged engine
    (continuous batching, shared prompt prefixes, `draft_tokens` MTP drafts) or the static padded batch."""
    if rollout.engine == "static":
        return Generator(model, tokenizer, compile=rollout.compile)
    return Engine(model, tokenizer, page_size=rollout.page_size, max_batch=rollout.max_batch,
                  draft_tokens=rollout.draft_tokens, compile=rollout.compile)
