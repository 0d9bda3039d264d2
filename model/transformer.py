"""The decoder: embedding, `n_dense_layers` dense blocks then MoE blocks, final norm, output head,
and V3's multi-token prediction modules (V3 §2.2)."""
from __future__ import annotations

import dataclasses
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLA, Attention, KVCache, attention_mask
from .config import ModelConfig
from .layers import MLP, RMSNorm, RotaryEmbedding, at_least_fp32
from .moe import MoE

IGNORE_INDEX = -100


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    # runtime hooks (fsdp_unit, recompute_selective): parallel/protocols.py
    fsdp_unit = True  # FSDP2 gathers and frees parameters block by block
    # selective recomputation recomputes these in backward instead of keeping their outputs: every
    # RMSNorm and the MLA up-projections (V3 §3.2.3); names absent in a block (GQA, no q_lora) are skipped
    recompute_selective = ("attn_norm", "ffn_norm", "attn.q_norm", "attn.kv_norm", "attn.wq_b", "attn.wkv_b")

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn = MLA(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.dim, cfg.inter_dim)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, start_pos: int = 0, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        x = x + self.attn(self.attn_norm(x), rope, start_pos, cache, mask)
        return x + self.ffn(self.ffn_norm(x))

    # runtime hook (moe phases): a MoE block's forward = moe_post(moe_pre(...), the routed experts' output),
    # cut where the experts' token dispatch sits (parallel/overlap.py interleaves two micro-batches' parts)
    def moe_pre(self, x, rope, start_pos: int = 0, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        """Attention and the router: (h = x + attn(norm(x)), then MoE.route(ffn_norm(h)): u [T, dim],
        weights, routed, partial, stats)."""
        h = x + self.attn(self.attn_norm(x), rope, start_pos, cache, mask)
        return (h, *self.ffn.route(self.ffn_norm(h)))

    def moe_shared(self, u):
        """MoE.shared(u): the shared experts' output (None without them), which needs no dispatch."""
        return self.ffn.shared(u)

    def moe_post(self, h, u, y, stats, shared=None):
        """h + MoE.merge(u, y, stats, shared): the residual around the routed output y [T, dim] and the
        shared experts' (`shared`, from moe_shared, or computed here)."""
        return h + self.ffn.merge(u, y, stats, shared)


class MTP(nn.Module):
    """k-th MTP module (V3 eq. 21-22): h'_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))],
    h^k = TRM_k(h'). Embedding and output head are the main model's; `norm` is the shared head's
    own RMSNorm, and h^k is passed on normalised, as transformers' MtpModel and vLLM chain it.
    The concatenation puts the embedding first, as the released V3 weights expect."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)  # M_k
        self.block = Block(layer_id, cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, rope, mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        if cache is None:   # training: the call recomputation wraps, unchanged
            return self.norm(self.block(h, rope, mask=mask))
        return self.norm(self.block(h, rope, cache=cache, mask=mask))


class Transformer(nn.Module):
    """The DeepSeek decoder. `forward(tokens)` gives logits [batch, seq, vocab]; `loss` gives the
    LM, MTP and balance losses separately. Layers sit in a ModuleDict keyed by global index so that
    the parallel runtime can cut pipeline stages (and set embed/norm/head to None) from outside."""

    # runtime hooks (tp_plan, fsdp_forward_methods, the Model protocol): parallel/protocols.py
    tp_plan = {"embed": "vocab_embed", "head": "vocab_head"}
    fsdp_forward_methods = ("loss", "hidden", "scored", "decode", "draft")  # FSDP2 entry points besides forward

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTP(cfg.n_layers + k, cfg) for k in range(cfg.n_mtp))
        self.rope = RotaryEmbedding(cfg)
        self.mtp_lambda = cfg.mtp_lambda  # V3 §4.2 changes it during training; the loop sets it per step

    # -- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """N(0, init_std) for every matrix (DeepSeek LLM §2 / V2 §3.1.2 / V3 §4.2), ones for norms,
        zeros for biases and the aux-loss-free routing bias. Each parameter (each expert of a
        stacked expert weight) draws from its own generator seeded by (seed, name), so that the
        parallel runtime produces the same values for any shard without building the others."""
        for name, p in self.named_parameters():
            p.copy_(self.init_value(name, p.shape, seed, device=p.device).to(p.dtype))
        self.init_buffers()

    def init_value(self, name: str, shape, seed: int = 0, experts: range | None = None,
                   device=None) -> torch.Tensor:
        """The fp32 initial value of parameter `name` of global `shape`; for stacked expert weights
        ([n_experts, out, in]) only the experts in `experts` when given."""
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=device)
        if name.endswith(".bias"):
            return torch.zeros(shape, device=device)
        if name.split(".")[-2] == "experts":
            rows = experts if experts is not None else range(shape[0])
            return torch.stack([_normal(shape[1:], self.cfg.init_std, (seed, name, e), device) for e in rows])
        return _normal(shape, self.cfg.init_std, (seed, name), device)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Zero routing biases and load counters, recompute rotary frequencies (after `to_empty`)."""
        for m in self.moe_layers():
            m.tokens_per_expert.zero_()
            if m.gate.bias is not None:
                m.gate.bias.zero_()
        self.rope.reset_parameters()

    # -- forward -------------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, start_pos: int = 0, caches: list[KVCache] | None = None,
               h: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
               positions: torch.Tensor | None = None):
        """Final-layer hidden states before the output norm. On a pipeline stage without the
        embedding, `h` carries the previous stage's hidden states (`tokens` still give the positions).
        `doc_ids` [batch, start_pos + seq]: attention stays within a document (packed rows, padding).
        `positions` [n]: compute only the tokens at these global positions of the whole rows `tokens`
        (a context-parallel rank's share), whose keys the attention's exchange point returns for every
        position 0..seq-1; None: every position."""
        return self._hidden(tokens, start_pos, caches, h, doc_ids, positions)

    def _hidden(self, tokens, start_pos=0, caches=None, h=None, doc_ids=None, positions=None):
        # forward's body too: FSDP2 wraps `hidden` as an entry point, whose exit would reshard the
        # root's parameters (norm, head) before forward uses them
        local, rope, mask = self._frame(tokens, start_pos, doc_ids, caches is not None, positions)
        h = self.embed(local) if h is None else h
        return self._blocks(h, rope, start_pos, caches, mask)

    def _frame(self, tokens, start_pos: int, doc_ids, cached: bool, positions):
        """(this process's tokens, their rotary table, the attention mask) for whole rows `tokens`."""
        if positions is None:
            s = tokens.shape[1]
            return tokens, self._rope(s, start_pos, tokens.device), self._mask(s, start_pos, tokens.device,
                                                                              doc_ids, cached)
        if cached or start_pos:
            raise ValueError("positions (a share of whole rows) are for training and scoring whole rows; "
                             "decode with caches without them")
        # queries at their global positions against keys at 0..seq-1: RoPE scores depend on the distance
        # between the two only, so the share computes what the whole rows do at these positions
        seq = tokens.shape[1]
        mask = attention_mask(positions.numel(), seq, 0, tokens.device, doc_ids, positions=positions)
        return tokens[:, positions], self.rope(positions), mask

    @staticmethod
    def _mask(s: int, start_pos: int, device, doc_ids, cached: bool) -> torch.Tensor | None:
        """None (plain causal, SDPA's fused path) unless documents or a cache call for an explicit mask."""
        if doc_ids is None:
            return None
        if doc_ids.shape[1] < start_pos + s:
            raise ValueError(f"doc_ids covers {doc_ids.shape[1]} positions; it needs one id per position up to "
                             f"the last query ({start_pos + s})")
        return attention_mask(s, start_pos + s if cached else s, start_pos, device, doc_ids)

    def _rope(self, seq_len: int, start_pos: int, device) -> torch.Tensor:
        # from the token count, not the hidden states: sequence parallelism splits those
        return self.rope(torch.arange(start_pos, start_pos + seq_len, device=device))

    def _blocks(self, h: torch.Tensor, rope, start_pos: int = 0, caches: list[KVCache] | None = None,
                mask: torch.Tensor | None = None):
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, rope, start_pos, None if caches is None else caches[i], mask)
        return h

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, caches: list[KVCache] | None = None,
                doc_ids: torch.Tensor | None = None):
        h = self._hidden(tokens, start_pos, caches, doc_ids=doc_ids)
        if self.head is None:
            return h
        return self.head(self.norm(h))

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None, mtp: bool = False) -> list[KVCache]:
        """Per-layer inference caches; MLA keeps only the latent c^KV and k^R (V2 §2.1.3). With `mtp`,
        the MTP blocks' caches follow the layers' (speculative drafting, posttrain/engine.py)."""
        p = next(self.parameters())
        blocks = list(self.layers.values()) + ([m.block for m in self.mtp] if mtp else [])
        return [b.attn.new_cache(batch, max_len, dtype or p.dtype, device or p.device) for b in blocks]

    # -- decoding at per-sequence positions (the continuous-batching engine, posttrain/engine.py) ---------
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, caches: list, mask: torch.Tensor):
        """(logits, h) of tokens [b, s] at their own positions [b, s] (each sequence of a batch at its own
        length), attending to what `caches` hold under `mask` [b, s, keys]. h: the final hidden states
        after the output norm, which the MTP modules take (V3 eq. 21). Logits are vocab-split under tp."""
        rope = self.rope(positions.flatten()).unflatten(0, positions.shape)
        h = self.norm(self._blocks(self.embed(tokens), rope, 0, caches, mask))
        return self.head(h), h

    def draft(self, h: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor):
        """(logits, h^1) of the first MTP module at positions [b, s]: h [b, s, dim] are the main model's
        (or the module's own, chaining drafts) normed hidden states at those positions and tokens the
        tokens one ahead, t_{i+1} (V3 eq. 21-22; §5.4.3 speculative decoding)."""
        if not len(self.mtp):
            raise ValueError("this model has no MTP module (model.n_mtp = 0) to draft with; decode without "
                             "speculation or use a model trained with n_mtp >= 1")
        rope = self.rope(positions.flatten()).unflatten(0, positions.shape)
        h = self.mtp[0](h, self.embed(tokens), rope, mask, cache)
        return self.head(h), h

    # -- training objective --------------------------------------------------------------------
    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, mtp_lambda: float | None = None,
             h: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Losses for next-token labels [batch, seq] (IGNORE_INDEX masks a position).

        Returns `loss` (what to backpropagate) = lm_loss + mtp_loss + the balance losses, and each
        term separately: `lm_loss`, `mtp_loss` (V3 eq. 24-25, lambda = self.mtp_lambda unless given),
        `balance_expert` / `balance_device` / `balance_comm` summed over MoE layers, and `aux_loss`
        (their sum). On the last pipeline stage `h` carries the previous stage's hidden states, and
        the balance losses are those of this stage's MoE layers. With `doc_ids` [batch, seq] (packed
        documents) attention and the MTP targets stay within each document; the caller masks the
        label of each document's last token.

        `positions` [n] (global positions of whole rows; see `hidden`): only those tokens are computed
        here. tokens, labels and doc_ids stay whole rows, so MTP reads t_{i+k} and its label wherever they
        lie, and the token losses are normalised by the whole rows' count; the sums over this share go
        through `reduce_sequence_stats` (identity in one process), so every share returns the rows' terms.
        """
        seq = tokens.shape[1]
        local, rope, mask = self._frame(tokens, 0, doc_ids, False, positions)
        pos = torch.arange(seq, device=tokens.device) if positions is None else positions
        h = self.norm(self._blocks(self.embed(local) if h is None else h, rope, mask=mask))
        n_tokens = (labels != IGNORE_INDEX).sum().clamp(min=1)   # eq. 24's T: the whole rows' count
        lm = self.cross_entropy(at_least_fp32(self.head(h)), labels if positions is None else labels[:, pos])
        out = {"lm_loss": self.reduce_sequence_stats(lm) / n_tokens}
        total = out["lm_loss"]
        if len(self.mtp):
            lam = self.mtp_lambda if mtp_lambda is None else mtp_lambda
            mtp = h.new_zeros(())
            for ce in self._mtp_ce(h, tokens, labels, rope, mask, pos, doc_ids):
                mtp = mtp + ce / n_tokens   # eq. 24: 1/T
            out["mtp_loss"] = lam / len(self.mtp) * mtp
            total = total + out["mtp_loss"]
        aux = self.balance_losses()
        if aux:
            out.update(aux)
            out["aux_loss"] = sum(aux.values())
            total = total + out["aux_loss"]
        out["loss"] = total
        return out

    def _mtp_ce(self, h, tokens, labels, rope, mask, pos, doc_ids, detached: bool = False,
                temperature: float = 1.0) -> list[torch.Tensor]:
        """The MTP modules' cross-entropy per depth, each summed over tokens (V3 eq. 21-24 before the 1/T and
        lambda/D factors). h: the main model's normed final hidden states. `detached`: every input the main
        model provides (h, the embedding of t_{i+k}, the output head's weight) is cut from its graph, so the
        gradient reaches the MTP modules alone (issue 23 §4: training MTP during RL without touching the policy)."""
        if detached:
            h = h.detach()
        terms = []
        seq = tokens.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if seq <= k:
                break
            # Depth k pairs h^{k-1}_i with Emb(t_{i+k}) and predicts t_{i+k+1}. Tokens and labels are
            # read k ahead (global positions, wrapping like a roll), not the hidden states shifted, so
            # every tensor keeps the sequence length (and its sequence-parallel split); the last k
            # positions have no target and are masked. They still pass through the MTP block, whose
            # causal attention keeps them out of every earlier position.
            ahead = (pos + k) % seq
            emb = self.embed(tokens[:, ahead])
            h = module(h, emb.detach() if detached else emb, rope, mask)
            target = labels[:, ahead].masked_fill(pos + k >= seq, IGNORE_INDEX)
            if doc_ids is not None:  # t_{i+k+1} from another document is no target for position i
                target = target.masked_fill(doc_ids[:, ahead] != doc_ids[:, pos], IGNORE_INDEX)
            logits = at_least_fp32(self._head_detached(h) if detached else self.head(h))
            if temperature != 1.0:
                logits = logits / temperature
            terms.append(self.reduce_sequence_stats(self.cross_entropy(logits, target)))
        return terms

    def _head_detached(self, h: torch.Tensor) -> torch.Tensor:
        """The output head on h with its weight out of the graph (its input gradient kept): the head module is
        called, so what the runtime installed on it (tensor parallelism's input region) still applies."""
        weights = {name: p.detach() for name, p in self.head.named_parameters()}
        return torch.func.functional_call(self.head, weights, (h,))

    def scored(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
               mtp_labels: torch.Tensor | None = None, temperature: float = 1.0, h: torch.Tensor | None = None):
        """(logits, MTP cross-entropy or None) of whole rows: token_logprobs' forward, an FSDP2 entry point.
        With `mtp_labels` [batch, seq] (next-token labels, IGNORE_INDEX masked) also the MTP modules'
        cross-entropy on the main model's detached outputs at `temperature` (`_mtp_ce`), summed over depths
        and tokens. On the last pipeline stage `h` carries the previous stage's hidden states."""
        local, rope, mask = self._frame(tokens, 0, doc_ids, False, None)
        h = self.norm(self._blocks(self.embed(local) if h is None else h, rope, mask=mask))
        mtp = None
        if mtp_labels is not None:
            if not len(self.mtp):
                raise ValueError("mtp_labels: this model has no MTP module (model.n_mtp = 0) to train")
            pos = torch.arange(tokens.shape[1], device=tokens.device)
            mtp = sum(self._mtp_ce(h, tokens, mtp_labels, rope, mask, pos, doc_ids, detached=True,
                                   temperature=temperature))
        return self.head(h), mtp

    def token_logprobs(self, tokens: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None,
                       entropy: bool = False, temperature: float = 1.0,
                       mtp: bool = False, allowed: torch.Tensor | None = None,
                       h: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """log pi(targets | prefix) per position [batch, seq] (0 where the target is IGNORE_INDEX), and
        with `entropy` the policy's entropy per position (no gradient). `temperature` scales the logits
        as the sampler did, so that ratios compare the distribution the samples came from. Under tensor
        parallelism the logits stay split over the vocabulary: both come from a few all-reduces of
        [tokens] values. With `mtp`, "mtp_ce": the MTP modules' cross-entropy on `targets` at `temperature`,
        summed over tokens and averaged over depths, whose gradient reaches the MTP modules only. With
        `allowed` [2, n] (flat position in batch x seq, token id) pairs, a position that appears in it keeps
        only those tokens: the log-probs and entropy are the renormalised distribution's (restrict_vocab).
        `h`: the previous pipeline stage's hidden states, on the last stage."""
        logits, mtp_ce = self.scored(tokens, doc_ids, targets if mtp else None, temperature, h=h)
        logits = at_least_fp32(logits)
        if temperature != 1.0:
            logits = logits / temperature
        if allowed is not None:   # DeepSeek-V3.2 §RL (Keep Sampling Mask): pi_theta on pi_old's action subspace
            logits = self.restrict_vocab(logits, allowed)
        out = {"logprobs": -self.cross_entropy(logits, targets, reduction="none").view_as(targets)}
        if entropy:
            with torch.no_grad():
                out["entropy"] = self.entropy(logits.detach()).view_as(targets)
        if mtp:
            out["mtp_ce"] = mtp_ce / len(self.mtp)
        return out

    @staticmethod
    def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Token cross-entropy of (at least fp32) logits, summed or per token (`reduction="none"`, 0 at
        IGNORE_INDEX); tensor parallelism swaps in the vocab-parallel one."""
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction=reduction)

    @staticmethod
    def reduce_sequence_stats(t: torch.Tensor) -> torch.Tensor:
        """A sum over this process's tokens, summed over every process holding other tokens of the same
        rows; the identity in one process, where they are all here. Context parallelism swaps in an
        all-reduce over its ranks whose backward is the identity (each rank's gradient is its tokens')."""
        return t

    @staticmethod
    def gather_logits(logits: torch.Tensor) -> torch.Tensor:
        """The whole vocabulary's logits (for sampling a few positions); tensor parallelism swaps in an
        all-gather of the vocab-parallel shards."""
        return logits

    @staticmethod
    def restrict_vocab(logits: torch.Tensor, allowed: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
        """logits [b, s, vocab or this rank's vocab/tp columns from vocab_start] with every token outside its
        position's allowed set (`allowed` [2, n]: flat position, global token id; positions absent from it keep
        everything) at a finite minus infinity. Tensor parallelism binds vocab_start to the rank's slice."""
        flat = logits.flatten(0, -2)
        n_local = flat.shape[-1]
        pos, ids = allowed[0], allowed[1] - vocab_start
        keep = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device).index_fill_(0, pos, False)
        keep = keep[:, None].repeat(1, n_local)
        inside = (ids >= 0) & (ids < n_local)
        keep[pos[inside], ids[inside]] = True
        # exp underflows to exactly 0 as for -inf, the log-probs are the same, and 0 * it stays 0 in the entropy
        # and the vocab-parallel sums (0 * -inf would be NaN); a rank may hold none of a position's allowed ids
        return flat.masked_fill(~keep, -1e30).view_as(logits)

    @staticmethod
    def entropy(logits: torch.Tensor) -> torch.Tensor:
        """Entropy of softmax(logits) per position, flattened; tensor parallelism swaps in the
        vocab-parallel one."""
        logp = logits.flatten(0, -2).log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)

    # -- cost, for cutting pipeline stages -------------------------------------------------------
    def stage_costs(self, seq_len: int) -> tuple[float, list[float], float]:
        """Forward FLOPs per token of (what precedes the first layer, each layer, what follows the last
        layer): 2 per active weight (routed experts at n_activated/n_routed) plus causal attention
        scores and values. V3's 3 dense + 58 MoE layers, head and MTP are not equal costs (V3 §3.2)."""
        def active(m: nn.Module) -> float:
            n = 0.0
            for name, p in m.named_parameters():
                share = self.cfg.n_activated_experts / self.cfg.n_routed_experts if ".experts." in f".{name}" else 1.0
                n += p.numel() * share
            return n

        def block(b: Block) -> float:
            a = b.attn
            qk = a.qk_head_dim if isinstance(a, MLA) else a.head_dim
            v = a.v_head_dim if isinstance(a, MLA) else a.head_dim
            return 2 * active(b) + 2 * a.n_heads * (qk + v) * seq_len / 2  # causal: half the scores

        head = 2 * self.cfg.dim * self.cfg.vocab_size
        mtp = sum(block(m.block) + 2 * m.eh_proj.weight.numel() + head for m in self.mtp)
        return 0.0, [block(b) for b in self.layers.values()], head + mtp

    # -- MoE bookkeeping -----------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    # -- routing replay (R3, arXiv 2510.11370; Megatron-core RouterReplay): set from outside the forward ---------
    def trunk_moe_layers(self) -> list[MoE]:
        """The MoE layers of the decoder stack in layer order (the MTP modules' own MoE excluded)."""
        return [b.ffn for b in self.layers.values() if isinstance(b.ffn, MoE)]

    def record_routing(self, on: bool = True) -> None:
        """From now on every forward appends, per trunk MoE layer, the experts its router chose."""
        for m in self.trunk_moe_layers():
            m.record_routes, m.routes = on, ()

    def recorded_routing(self, forced: bool = True) -> list[torch.Tensor]:
        """Per recorded forward, the experts [*tokens' shape, n_moe_layers, k] (long): those used (`forced`,
        the replayed ones where replay forced them) or those the router chose itself (forced=False)."""
        layers = self.trunk_moe_layers()
        if not layers:
            return []
        return [torch.stack([m.routes[i][int(forced)] for m in layers], dim=-2) for i in range(len(layers[0].routes))]

    def replay_routing(self, routes: torch.Tensor) -> None:
        """Force the experts routes [*tokens' shape, n_moe_layers, k] (-1 in a token's row: route it normally)
        in every following forward (and its recomputation in backward) until `clear_routing`. The tokens'
        shape is that of the micro-batch the gates see ([batch, seq] flattened in order)."""
        layers = self.trunk_moe_layers()
        if routes.dim() < 2 or routes.shape[-2] != len(layers):
            raise ValueError(f"replay_routing: routes of shape {tuple(routes.shape)} need [..., {len(layers)} MoE "
                             f"layers, k]")
        flat = routes.reshape(-1, *routes.shape[-2:]).long()
        for i, m in enumerate(layers):
            m.forced_routes = flat[:, i]

    def clear_routing(self) -> None:
        """Stop recording and replaying; drop what was recorded."""
        for m in self.trunk_moe_layers():
            m.forced_routes, m.record_routes, m.routes = None, False, ()

    def balance_losses(self) -> dict[str, torch.Tensor]:
        """Each balance loss of the last forward, summed over this model's (or stage's) MoE layers."""
        aux: dict[str, torch.Tensor] = {}
        for m in self.moe_layers():
            for name, value in m.aux_losses.items():
                aux[name] = aux.get(name, 0.0) + value
        return aux

    @torch.no_grad()
    def update_expert_bias(self, gamma: float | None = None) -> None:
        """After each optimizer step (V3 §2.1.2): move each routing bias by gamma against the load
        counted since the last update, then reset the counts. The parallel runtime all-reduces
        `tokens_per_expert` first so that every rank applies the same update."""
        gamma = self.cfg.bias_update_gamma if gamma is None else gamma
        for m in self.moe_layers():
            m.gate.update_bias(m.tokens_per_expert, gamma)
            m.tokens_per_expert.zero_()

    def set_expert_placement(self, n_devices: int, devices_per_node: int = 1) -> None:
        """The expert-to-device and device-to-node maps used by limited routing and the V2 losses."""
        for m in self.moe_layers():
            m.gate.set_placement(n_devices, devices_per_node)


def _normal(shape, std: float, key: tuple, device) -> torch.Tensor:
    """N(0, std) from a CPU generator seeded by a stable hash of key: the same on every rank and device."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    return torch.empty(shape).normal_(0.0, std, generator=gen).to(device)


def build_model(cfg: ModelConfig, device=None, dtype=None, seed: int | None = 0) -> Transformer:
    """A randomly initialised model (N(0, init_std)); on the meta device nothing is allocated."""
    with torch.device(device or "cpu"):
        net = Transformer(cfg)
    if dtype is not None:
        net = net.to(dtype)
    if seed is not None and not any(p.is_meta for p in net.parameters()):
        net.init_weights(seed)
    return net


def param_counts(cfg: ModelConfig, include_mtp: bool = False) -> dict[str, int]:
    """ModelConfig.param_counts (model/__init__.py hands it over): the network built on the meta device,
    its parameters counted; "active" keeps n_activated_experts of the routed experts of each MoE layer."""
    cfg = cfg if include_mtp else dataclasses.replace(cfg, n_mtp=0)
    with torch.device("meta"):
        net = Transformer(cfg)
    total = sum(p.numel() for p in net.parameters())
    routed = sum(p.numel() for n, p in net.named_parameters() if ".experts." in n)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers)) + (cfg.n_mtp if cfg.is_moe else 0)
    active = total - routed
    if n_moe:
        active += routed * cfg.n_activated_experts // cfg.n_routed_experts
    return {"total": total, "active": active}
