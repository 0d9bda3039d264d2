"""The decoder: embedding, `n_dense_layers` dense blocks then MoE blocks, final norm, output head,
and V3's multi-token prediction modules (V3 §2.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLA, Attention, KVCache
from .config import ModelConfig
from .layers import MLP, RMSNorm, RotaryEmbedding
from .moe import MoE

IGNORE_INDEX = -100


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn = MLA(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.dim, cfg.inter_dim)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, start_pos: int = 0, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), rope, start_pos, cache)
        return x + self.ffn(self.ffn_norm(x))


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

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, rope) -> torch.Tensor:
        return self.norm(self.block(self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1)), rope))


class Transformer(nn.Module):
    """The DeepSeek decoder. `forward(tokens)` gives logits [batch, seq, vocab]; `loss` gives the
    LM, MTP and balance losses separately. Layers sit in a ModuleDict keyed by global index so that
    the parallel runtime can cut pipeline stages (and set embed/norm/head to None) from outside."""

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

    # -- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_std) for every matrix (DeepSeek LLM §2 / V2 §3.1.2 / V3 §4.2), ones for norms,
        zeros for biases and the aux-loss-free routing bias."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Zero routing biases and load counters, recompute rotary frequencies (after `to_empty`)."""
        for m in self.moe_layers():
            m.tokens_per_expert.zero_()
            if m.gate.bias is not None:
                m.gate.bias.zero_()
        self.rope.reset_parameters()

    # -- forward -------------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, start_pos: int = 0, caches: list[KVCache] | None = None):
        """Final-layer hidden states before the output norm. Embeds `tokens` unless this stage has
        no embedding, in which case `tokens` already are hidden states."""
        return self._blocks(self.embed(tokens) if self.embed is not None else tokens, start_pos, caches)

    def _blocks(self, h: torch.Tensor, start_pos: int = 0, caches: list[KVCache] | None = None):
        rope = self.rope(torch.arange(start_pos, start_pos + h.shape[1], device=h.device))
        for i, layer in enumerate(self.layers.values()):
            h = layer(h, rope, start_pos, None if caches is None else caches[i])
        return h

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, caches: list[KVCache] | None = None):
        h = self.hidden(tokens, start_pos, caches)
        if self.head is None:
            return h
        return self.head(self.norm(h))

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        """Per-layer inference caches; MLA keeps only the latent c^KV and k^R (V2 §2.1.3)."""
        p = next(self.parameters())
        return [layer.attn.new_cache(batch, max_len, dtype or p.dtype, device or p.device)
                for layer in self.layers.values()]

    # -- training objective --------------------------------------------------------------------
    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, mtp_lambda: float | None = None
             ) -> dict[str, torch.Tensor]:
        """Losses for next-token labels [batch, seq] (IGNORE_INDEX masks a position).

        Returns `loss` (what to backpropagate) = lm_loss + mtp_loss + the balance losses, and each
        term separately: `lm_loss`, `mtp_loss` (V3 eq. 24-25, lambda from the config unless given),
        `balance_expert` / `balance_device` / `balance_comm` summed over MoE layers, and `aux_loss`
        (their sum).
        """
        emb = self.embed(tokens)  # looked up once: the main model and every MTP depth use it
        h = self.norm(self._blocks(emb))
        n_tokens = (labels != IGNORE_INDEX).sum().clamp(min=1)
        out = {"lm_loss": self._ce_sum(self.head(h), labels) / n_tokens}
        total = out["lm_loss"]
        if len(self.mtp):
            lam = self.cfg.mtp_lambda if mtp_lambda is None else mtp_lambda
            seq = tokens.shape[1]
            mtp = h.new_zeros(())
            for k, module in enumerate(self.mtp, start=1):
                if seq <= k:
                    break
                rope = self.rope(torch.arange(seq - k, device=h.device))
                h = module(h[:, : seq - k], emb[:, k:], rope)             # predicts t_{i+k+1}
                mtp = mtp + self._ce_sum(self.head(h), labels[:, k:]) / n_tokens  # eq. 24: 1/T
            out["mtp_loss"] = lam / len(self.mtp) * mtp
            total = total + out["mtp_loss"]
        aux = {}
        for m in self.moe_layers():
            for name, value in m.aux_losses.items():
                aux[name] = aux.get(name, 0.0) + value
        if aux:
            out.update(aux)
            out["aux_loss"] = sum(aux.values())
            total = total + out["aux_loss"]
        out["loss"] = total
        return out

    @staticmethod
    def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    # -- MoE bookkeeping -----------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

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


def build_model(cfg: ModelConfig, device=None, dtype=None, seed: int | None = 0) -> Transformer:
    """A randomly initialised model (N(0, init_std)); on the meta device nothing is allocated."""
    with torch.device(device or "cpu"):
        net = Transformer(cfg)
    if dtype is not None:
        net = net.to(dtype)
    if not any(p.is_meta for p in net.parameters()):
        gen = None
        if seed is not None:
            gen = torch.Generator(device=next(net.parameters()).device).manual_seed(seed)
        net.init_weights(gen)
    return net
