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

Exactness. A sequence's arithmetic is the static engine's up to the order of floating-point sums, so at
temperature 0 the tokens are the same and the log-probs equal to rounding. Each sequence samples from its
own generator (`seeds`, or seed * 1_000_003 + index), so a sampled sequence is the same alone or in any
batch, whatever finishes beside it.

Speculation (draft_tokens = k >= 1; V3 §5.4.3). The first MTP module drafts k tokens, chained on its own
hidden state past the first, as vLLM and SGLang do with V3's single module; the main model verifies
[pending token, drafts] in one forward, and each draft is accepted with probability min(1, p/q), a
rejected one replaced by a sample of norm(max(0, p - q)), and a fully accepted run ends with a sample of
p (Leviathan et al. 2023, Chen et al. 2023): the emitted tokens are distributed exactly as the model's,
and at temperature 0 they are its greedy tokens. The MTP cache lags the main one: each step it first
catches up on the positions the main model accepted last step, with the main model's hidden states.

Parallel layouts. Under tp every rank holds the same prompts and seeds and gathers the same logits, so all
run the same schedule. Under ep (and any layout whose forward is a collective) the ranks hold different
prompts: each forward of the schedule (prefill, MTP prefill, MTP catch-up, each chained draft, decode or
verify) is preceded by an all-reduce of "does any rank need it", and a rank that does not runs a one-token
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

from parallel.data_parallel import reshard

from .generate import Completion, Generator, SamplingParams, allowed_ids, restricted_logprobs, sampling_distribution

__all__ = ["Engine", "PagePool", "PagedCache", "rollout_engine"]

TOO_LONG = "prompt_too_long"   # the finish of a prompt that cannot fit: reported, never truncated


class PagePool:
    """Every layer's cache cut into `n_pages` pages of `page_size` positions, with reference counts
    (shared prefixes) and promises (pages admitted sequences may still take). Page 0 is scratch."""

    def __init__(self, model, n_pages: int, page_size: int, mtp: bool):
        # a KVCache of batch n_pages and length page_size: its batch rows are the pages
        self.caches = model.new_cache(n_pages, page_size, mtp=mtp)
        self.n_pages, self.page_size = n_pages, page_size
        self.free = list(range(n_pages - 1, 0, -1))
        self.refs = [0] * n_pages
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
    """One layer's pages seen by the attention as a cache, for one forward: `write` stores the step's
    values at `slots` [b, s] (flat page * page_size + offset) and returns each sequence's values in
    position order, gathered at `gather` [b, keys]."""

    def __init__(self, pages, slots: torch.Tensor, gather: torch.Tensor):
        # flat indices: index_copy_ / index_select run ~4x faster than advanced indexing on CPU
        self.pages, self.slots, self.gather, self.shape = pages, slots.flatten(), gather.flatten(), gather.shape

    def write(self, name: str, start_pos: int, value: torch.Tensor) -> torch.Tensor:
        buf = getattr(self.pages, name)
        flat = buf.view(-1, *buf.shape[2:])
        flat.index_copy_(0, self.slots, value.flatten(0, 1).to(flat.dtype))   # padding: all into scratch slot 0
        return flat.index_select(0, self.gather).view(*self.shape, *flat.shape[1:])


@dataclass
class Sequence:
    """One prompt's sample in flight: tokens are the prompt's then the sampled ones. Its cache holds
    positions [0, length); tokens[length] is the last token sampled, not yet fed back. The MTP cache holds
    [0, mtp_len); `hidden` are the main model's hidden states at [mtp_len, length), which it still has to
    catch up on."""

    index: int
    gen: torch.Generator
    pages: list[int]
    promise: int
    tokens: list[int] = field(default_factory=list)
    length: int = 0
    mtp_len: int = 0
    hidden: torch.Tensor | None = None
    out: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    finish: str = ""
    text: str = ""
    routes: list = field(default_factory=list)   # with record_routing: [n, n_moe_layers, k] per fed chunk
    allowed: list = field(default_factory=list)  # with keep_sampling_mask: each emitted token's allowed ids


class Engine:
    """Continuous batching over a paged cache, with shared prefixes and optional MTP speculation.

    page_size: positions per page; n_pages: the pool (default: room for max_batch worst-case sequences);
    max_batch: sequences decoded together; share_prefix: identical prompts prefill once; draft_tokens: MTP
    drafts per step (0: none; needs a model with MTP modules)."""

    def __init__(self, model, tokenizer, *, page_size: int = 16, n_pages: int | None = None, max_batch: int = 64,
                 pad_id: int | None = None, share_prefix: bool = True, draft_tokens: int = 0):
        if page_size < 1 or max_batch < 1 or draft_tokens < 0:
            raise ValueError(f"page_size ({page_size}) and max_batch ({max_batch}) must be >= 1, draft_tokens "
                             f"({draft_tokens}) >= 0")
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
        self.record, self.routes = False, None   # routing replay: record the trunk's experts per forward

    # -- the acceptance rule (speculative sampling) -----------------------------------------------------
    @staticmethod
    def accept(p: float, q: float, gen: torch.Generator) -> bool:
        """Accept a draft token drawn from q with probability min(1, p / q): p and q are its probabilities
        under the model's and the draft's sampling distributions."""
        return torch.rand((), generator=gen).item() * q < p

    # -- one forward over a ragged batch ------------------------------------------------------------------
    def _forward(self, tables: list[list[int]], starts: list[int], chunks: list[list[int]],
                 hidden: torch.Tensor | None = None):
        """(logits [b, s, vocab], h [b, s, dim]) of chunks[i] at positions starts[i] + 0, 1, ... for the
        sequences whose pages are tables[i]; through the main model, or with `hidden` [b, s, dim] through
        the first MTP module (chunks then hold the tokens one ahead). Short chunks are right-padded."""
        P, dev = self.page_size, self.device
        b, s = len(chunks), max(len(c) for c in chunks)
        lens = torch.tensor([len(c) for c in chunks], device=dev)
        start = torch.tensor(starts, device=dev)
        tokens = torch.tensor([c + [self.pad] * (s - len(c)) for c in chunks], device=dev)
        pos = start[:, None] + torch.arange(s, device=dev)
        valid = torch.arange(s, device=dev)[None] < lens[:, None]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=dev)
        page_of = lambda p: table.gather(1, (p // P).clamp(max=width - 1)) * P + p % P   # noqa: E731
        slots = torch.where(valid, page_of(pos), 0)                       # padding writes go to scratch
        keys = int((start + lens).max())
        t = torch.arange(keys, device=dev)
        gather = page_of(t.expand(b, keys))
        mask = torch.where(valid[..., None], t <= pos[..., None], t == 0)  # padding queries see key 0 only
        caches = [PagedCache(c, slots, gather) for c in self.pool.caches]
        self.forwards += 1
        if hidden is None:
            out = self.model.decode(tokens, pos, caches[:self.n_layers], mask)
            if self.record:   # the trunk's experts per row [b, s, n_moe_layers, k]; padding rows are sliced off
                self.routes = self.model.recorded_routing()[-1].cpu()
                self.model.record_routing()
            return out
        return self.model.draft(hidden, tokens, pos, caches[self.n_layers], mask)

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
        self._forward([[0]], [0], [[self.pad]], hidden)
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
            elif self.pool.refs[seq.pages[i]] > 1:
                page = self.pool.take()
                seq.promise -= 1
                self.pool.copy(seq.pages[i], page)
                self.pool.release(seq.pages[i])
                seq.pages[i] = page

    def _retire(self, seq: Sequence) -> None:
        for page in seq.pages:
            self.pool.release(page)
        self.pool.promised -= seq.promise
        seq.pages, seq.promise, seq.hidden = [], 0, None

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
        """One token per row: the argmax at T = 0, else a draw from each row's distribution with its own
        sequence's generator (so that no sequence's stream depends on the others)."""
        if probs is None:
            return logits.argmax(-1).tolist()
        return [int(torch.multinomial(row, 1, generator=seq.gen)) for row, seq in zip(probs, seqs)]

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
        self.pool = PagePool(net, n_pages, P, mtp=self.draft_tokens > 0)
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
        if len(self.pool.free) != n_pages - 1 or self.pool.promised:   # every page and promise came back
            raise RuntimeError(f"page accounting: {n_pages - 1 - len(self.pool.free)} pages and "
                               f"{self.pool.promised} promises outstanding after the batch")
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
        if self.draft_tokens:
            stats["acceptance"] = sum(self.accepted) / max(sum(self.drafted), 1)
            stats["drafted"], stats["accepted"] = sum(self.drafted), sum(self.accepted)
            stats["acceptance_per_position"] = [a / max(d, 1) for a, d in zip(self.accepted, self.drafted)]
        self.pool = None
        return completions, stats

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
                gen = torch.Generator(device=self.device).manual_seed(
                    seeds[i] if seeds is not None else seed * 1_000_003 + i)
                promise = fresh + copy * (n < g - 1)   # which child copies is the pool's concern, not the sum
                children.append(Sequence(i, gen, [], promise, tokens=list(q), length=len(q)))
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
            return []
        tables = [[self.pool.take() for _ in range(math.ceil(len(q) / self.page_size))] for q, _ in admitted]
        prompts = [q for q, _ in admitted]
        self.prefilled += sum(map(len, prompts))
        logits, h = self._forward(tables, [0] * len(prompts), prompts)
        prompt_routes = self.routes
        if self.draft_tokens:   # the MTP cache over the prompt but its last position (which needs the sample)
            spans = [q[1:] for q in prompts]
            idx = [i for i, sp in enumerate(spans) if sp]
            if self._anyone(bool(idx)):
                if idx:
                    self._forward([tables[i] for i in idx], [0] * len(idx), [spans[i] for i in idx],
                                  hidden=h[idx, :max(len(spans[i]) for i in idx)])
                else:
                    self._idle(draft=True)
        last = self._logits(logits[torch.arange(len(prompts)), torch.tensor([len(q) - 1 for q in prompts])])
        logp, probs, keep = self._distributions(last, params)
        sets = allowed_ids(keep) if keep is not None else None
        out = []
        for g, ((q, children), table) in enumerate(zip(admitted, tables)):
            tokens = self._draw(last[g:g + 1].expand(len(children), -1),
                                None if probs is None else probs[g:g + 1].expand(len(children), -1), children)
            for seq, token in zip(children, tokens):
                for page in table:
                    self.pool.share(page)
                seq.pages = list(table)
                if self.record:   # the children share the prompt's prefill, and so its routing
                    seq.routes = [prompt_routes[g, :len(q)]]
                if self.draft_tokens:
                    seq.mtp_len, seq.hidden = len(q) - 1, h[g, len(q) - 1:len(q)]
                if not self._emit(seq, token, float(logp[g, token]), params, None if sets is None else sets[g]):
                    out.append(seq)
            for page in table:   # the group's own reference: the children hold theirs
                self.pool.release(page)
        return out

    def _decode(self, running: list[Sequence], params: SamplingParams):
        """One token for every running sequence."""
        if not running:   # another rank decodes
            return self._idle()
        for seq in running:
            self._pages_for(seq, seq.length, seq.length + 1)
        logits, _ = self._forward([s.pages for s in running], [s.length for s in running],
                                  [[s.tokens[s.length]] for s in running])
        logits = self._logits(logits[:, 0])
        logp, probs, keep = self._distributions(logits, params)
        tokens = self._draw(logits, probs, running)
        sets = allowed_ids(keep) if keep is not None else [None] * len(running)
        logps = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
        for b, (seq, token, lp) in enumerate(zip(running, tokens, logps)):
            if self.record:
                seq.routes.append(self.routes[b, :1])
            seq.length += 1
            self._emit(seq, token, lp, params, sets[b])

    def _speculate(self, running: list[Sequence], params: SamplingParams):
        """One verify step: the MTP module catches up and drafts up to draft_tokens tokens per sequence (no
        more than it may still emit, less one), the main model scores [pending, drafts] in one forward, and
        the speculative-sampling rule decides what is emitted (V3 §5.4.3; Leviathan et al. 2023, alg. 1)."""
        k = {id(s): min(self.draft_tokens, params.max_new_tokens - len(s.out) - 1) for s in running}
        for seq in running:   # the MTP writes from mtp_len, the verify up to length + k
            self._pages_for(seq, seq.mtp_len, seq.length + 1 + k[id(seq)])
        drafts = {id(s): [] for s in running}
        row = {id(s): b for b, s in enumerate(running)}
        q_all = None   # the drafts' sampling distributions [running, draft_tokens, vocab] (T > 0)
        drafting = [s for s in running if k[id(s)] > 0]
        if self._anyone(bool(drafting)) and not drafting:   # another rank drafts: as many forwards as it
            self._idle(draft=True)
            for _ in range(1, self.draft_tokens):
                if not self._anyone(False):
                    break
                self._idle(draft=True)
        elif drafting:
            # catch up on [mtp_len, length) with the main model's hidden states; the last position drafts
            spans = [s.tokens[s.mtp_len + 1:s.length + 1] for s in drafting]
            width = max(map(len, spans))
            hid = torch.stack([torch.nn.functional.pad(s.hidden, (0, 0, 0, width - len(s.hidden)))
                               for s in drafting])
            logits, g = self._forward([s.pages for s in drafting], [s.mtp_len for s in drafting], spans, hidden=hid)
            last = torch.tensor([len(sp) - 1 for sp in spans], device=self.device)
            rows = torch.arange(len(drafting), device=self.device)
            logits, g = self._logits(logits[rows, last]), g[rows, last][:, None]
            for seq in drafting:
                seq.mtp_len, seq.hidden = seq.length, None
            for j in range(self.draft_tokens):
                if j:   # chain: the module on its own hidden state and its last draft, one position on
                    if not self._anyone(bool(drafting)):
                        break
                    if not drafting:
                        self._idle(draft=True)
                        continue
                    logits, g = self._forward([s.pages for s in drafting],
                                              [s.length + j - 1 for s in drafting],
                                              [[drafts[id(s)][-1]] for s in drafting], hidden=g)
                    logits = self._logits(logits[:, 0])
                _, q, _ = self._distributions(logits, params)
                if q is not None:
                    if q_all is None:   # ones where nothing was drafted: never read, never divides by zero
                        q_all = q.new_ones(len(running), self.draft_tokens, q.shape[-1])
                    q_all[[row[id(s)] for s in drafting], j] = q
                for seq, token in zip(drafting, self._draw(logits, q, drafting)):
                    drafts[id(seq)].append(token)
                keep = [i for i, s in enumerate(drafting) if k[id(s)] > j + 1]
                drafting = [drafting[i] for i in keep]
                logits, g = logits[keep], g[keep]
        if not running:   # another rank verifies
            return self._idle()
        logits, h = self._forward([s.pages for s in running], [s.length for s in running],
                                  [[s.tokens[s.length]] + drafts[id(s)] for s in running])
        verify_routes = self.routes
        logits = self._logits(logits)
        # the emitted tokens' allowed sets are the truncation of the main model's p, whose support the residual
        # resample norm(max(0, p - q)) also stays in
        logp, p, keep = self._distributions(logits, params)
        greedy = logits.argmax(-1).tolist() if p is None else None
        if p is not None:   # p(draft) and q(draft) of every draft at once
            width = max(1, max(len(d) for d in drafts.values()))
            d_idx = torch.tensor([drafts[id(s)] + [0] * (width - len(drafts[id(s)])) for s in running])
            p_d = p[:, :width].gather(2, d_idx[..., None])[..., 0].tolist()
            if q_all is None:   # nothing drafted anywhere: every sequence is on its last token
                q_all = p.new_ones(len(running), width, p.shape[-1])
            q_d = q_all[:, :width].gather(2, d_idx[..., None])[..., 0].tolist()
        picks = []
        for b, seq in enumerate(running):
            d = drafts[id(seq)]
            for j in range(len(d)):   # acceptance per position: accepted over drafted, whatever came before
                self.drafted[j] += 1
            tokens = []
            for j, token in enumerate(d):
                ok = greedy[b][j] == token if p is None else self.accept(p_d[b][j], q_d[b][j], seq.gen)
                if not ok:   # the residual norm(max(0, p - q)) keeps the output distributed as p
                    if p is None:
                        tokens.append(greedy[b][j])
                    else:
                        residual = (p[b, j] - q_all[b, j]).clamp(min=0)
                        tokens.append(int(torch.multinomial(residual / residual.sum(), 1, generator=seq.gen)))
                    break
                self.accepted[j] += 1
                tokens.append(token)
            else:            # every draft accepted: one more token from the last verified position
                j = len(d)
                tokens.append(greedy[b][j] if p is None else int(torch.multinomial(p[b, j], 1, generator=seq.gen)))
            picks.append(tokens)
        rows = [b for b, t in enumerate(picks) for _ in t]
        cols = [j for t in picks for j in range(len(t))]
        lps = logp[rows, cols, [x for t in picks for x in t]].tolist()
        sets = allowed_ids(keep[rows, cols]) if keep is not None else [None] * len(rows)
        n = 0
        for b, (seq, tokens) in enumerate(zip(running, picks)):
            emitted = 0
            for token, lp, allowed in zip(tokens, lps[n:n + len(tokens)], sets[n:n + len(tokens)]):
                emitted += 1
                if self._emit(seq, token, lp, params, allowed):
                    break
            n += len(tokens)
            seq.hidden = h[b, :emitted]
            if self.record:   # the pending token and the accepted drafts: the positions now in the cache
                seq.routes.append(verify_routes[b, :emitted])
            seq.length += emitted


def rollout_engine(model, tokenizer, rollout) -> Engine | Generator:
    """The generator a post-training stage samples with, from its `rollout` config section: the paged engine
    (continuous batching, shared prompt prefixes, `draft_tokens` MTP drafts) or the static padded batch."""
    if rollout.engine == "static":
        return Generator(model, tokenizer)
    return Engine(model, tokenizer, page_size=rollout.page_size, max_batch=rollout.max_batch,
                  draft_tokens=rollout.draft_tokens)
