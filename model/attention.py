"""Attention: dense MHA/GQA (DeepSeek LLM, Qwen2, Llama) and Multi-head Latent Attention (V2 §2.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import KeyExchange, RMSNorm, apply_rope, softmax_scale


def attention_mask(s: int, t: int, start_pos: int, device, doc_ids: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [b or 1, s, t] mask, True where query start_pos+i (or positions[i]) may see key j: causal and,
    given `doc_ids` [b, t] (a document id for every position up to the last query), within one document.

    Packed sequences (several documents per row) and left-padded prompts (the padding is its own
    document) both reduce to this. Positions are not restarted per document: RoPE scores depend only
    on the distance between query and key, so within a document the result is that of the document
    alone, wherever it starts. Every query sees at least itself, so no row of scores is all -inf."""
    q = torch.arange(start_pos, start_pos + s, device=device) if positions is None else positions
    mask = (torch.arange(t, device=device)[None, :] <= q[:, None])[None]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, q, None] == doc_ids[:, None, :t])
    return mask


def rotate(x: torch.Tensor, rope: torch.Tensor, interleave: bool) -> torch.Tensor:
    """apply_rope, also for per-token tables rope [b, s, d/2] (every sequence of a continuously batched
    step at its own positions): the rotation is elementwise, so the batch is flattened into one row."""
    if rope.dim() == 2:
        return apply_rope(x, rope, interleave)
    b, s = x.shape[:2]
    return apply_rope(x.reshape(1, b * s, *x.shape[2:]), rope.reshape(b * s, -1), interleave).view(x.shape)


def _check_keys(queries: int, keys: int, mask) -> None:
    """Without a mask attention is plain causal over as many keys as queries; keys for other positions (a
    context-parallel exchange) need the queries' positions, from which the model builds the mask."""
    if mask is None and keys != queries:
        raise ValueError(f"{queries} queries against {keys} keys without a mask: call the model with the "
                         "queries' global `positions` (loss/hidden) when keys are exchanged (context parallelism)")


class KVCache(nn.Module):
    """Preallocated per-layer cache; `fields` name the per-token tensors it keeps."""

    def __init__(self, batch: int, max_len: int, shapes: dict[str, tuple[int, ...]], dtype, device):
        super().__init__()
        self.max_len = max_len
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(batch, max_len, *shape, dtype=dtype, device=device),
                                 persistent=False)

    def write(self, name: str, start_pos: int, value: torch.Tensor) -> torch.Tensor:
        """Store value [b, s, ...] at start_pos and return everything cached up to its end."""
        end = start_pos + value.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; writing up to position {end}. "
                             "Allocate a longer cache with new_cache(batch, max_len).")
        buf = getattr(self, name)
        buf[: value.shape[0], start_pos:end] = value.to(buf.dtype)
        return buf[: value.shape[0], :end]

    def nbytes_per_token(self) -> int:
        return sum(b[0, 0].numel() * b.element_size() for b in self.buffers())


class Attention(nn.Module):
    """Multi-head / grouped-query attention with optional QKV bias (Qwen2) and half-rotated RoPE."""

    # tensor parallelism (applied by parallel/): heads split; KV heads replicated when tp exceeds them
    # tp_plan styles and tp_divide: parallel/protocols.py
    tp_plan = {"": "region_input", "wq": "colwise", "wk": "colwise:n_kv_heads", "wv": "colwise:n_kv_heads",
               "wo": "rowwise"}
    tp_divide = ("n_heads", "n_kv_heads")
    # context parallelism: the (local) key and value heads of every position come from kv_exchange
    cp_plan = {"kv_exchange": "gather_sequence"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.gqa_head_dim
        self.interleave = cfg.rope_interleave
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.kv_exchange = KeyExchange()
        self.softmax_scale = softmax_scale(cfg, self.head_dim)

    def new_cache(self, batch: int, max_len: int, dtype, device) -> KVCache:
        shape = (self.n_kv_heads, self.head_dim)
        return KVCache(batch, max_len, {"k": shape, "v": shape}, dtype, device)

    def forward(self, x, rope, start_pos: int = 0, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        """mask: boolean [b or 1, s, keys] (attention_mask); None means plain causal."""
        b, s, _ = x.shape
        q = rotate(self.wq(x).view(b, s, self.n_heads, self.head_dim), rope, self.interleave)
        k = rotate(self.wk(x).view(b, s, self.n_kv_heads, self.head_dim), rope, self.interleave)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        if cache is not None:
            k, v = cache.write("k", start_pos, k), cache.write("v", start_pos, v)
            if mask is None:
                mask = attention_mask(s, k.shape[1], start_pos, x.device)
        else:
            k, v = self.kv_exchange(k, v)  # every key position's (all of them are local in one process)
            _check_keys(s, k.shape[1], mask)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None], is_causal=mask is None,
            scale=self.softmax_scale, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


class MLA(nn.Module):
    """Multi-head Latent Attention (V2 §2.1; names as DeepSeek-V3 inference/model.py).

    Queries: q = W^UQ RMSNorm(W^DQ h) (or W^Q h without query compression, V2-Lite).
    Keys/values: one joint latent c^KV = RMSNorm(W^DKV h) of kv_lora_rank, up-projected per head by
    W^UK / W^UV (wkv_b); a decoupled RoPE key k^R = RoPE(W^KR h) shared by all heads.

    Training path: materialise per-head keys and values. Inference path (with a cache): keep only
    c^KV and k^R per token and absorb W^UK into the query and W^UV into the output (V2 §2.1.3).
    """

    # tensor parallelism: heads split; the down-projections and their norms replicated, and the
    # small latents (not the hidden states) enter the tensor-parallel region
    # tp_plan styles and tp_divide: parallel/protocols.py
    tp_plan = {"wq_a": "region_output", "wq": ("colwise", "region_input"), "wq_b": "colwise",
               "wkv_a": "region_output", "wkv_b": "colwise", "wo": "rowwise",
               "q_norm": "partial_grad", "kv_norm": "partial_grad"}
    tp_divide = ("n_heads",)
    # context parallelism exchanges the latent c^KV and the rotated k^R (d_c + d_h^R per token, V2 §2.1.4),
    # not per-head keys and values, and every rank up-projects them itself (DESIGN decision 9)
    cp_plan = {"kv_exchange": "gather_sequence"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = cfg.qk_head_dim, cfg.v_head_dim
        if self.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, self.q_lora_rank, bias=False)              # W^DQ
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)  # W^UQ, W^QR
        else:
            self.wq = nn.Linear(cfg.dim, self.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)  # W^DKV, W^KR
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim),
                               bias=False)                                                  # W^UK, W^UV
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, cfg.dim, bias=False)
        self.kv_exchange = KeyExchange()
        self.softmax_scale = softmax_scale(cfg, self.qk_head_dim)

    def new_cache(self, batch: int, max_len: int, dtype, device) -> KVCache:
        # (d_c + d_h^R) elements per token per layer (V2 §2.1.4)
        return KVCache(batch, max_len, {"kv": (self.kv_lora_rank,), "pe": (self.qk_rope_head_dim,)}, dtype, device)

    def forward(self, x, rope, start_pos: int = 0, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        """mask: boolean [b or 1, s, keys] (attention_mask); None means plain causal."""
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q = q.unflatten(-1, (self.n_heads, self.qk_head_dim))  # [b, s, heads, d]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = rotate(q_pe, rope, interleave=True)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)
        k_pe = rotate(k_pe.unsqueeze(2), rope, interleave=True)  # one head, shared
        if cache is None:
            kv, k_pe = self.kv_exchange(kv, k_pe)  # every key position's latent (all of them in one process)
            return self._forward_full(q_nope, q_pe, kv, k_pe, mask)
        return self._forward_absorbed(q_nope, q_pe, kv, k_pe.squeeze(2), start_pos, cache, mask)

    def _forward_full(self, q_nope, q_pe, kv, k_pe, mask=None):
        (b, s), t = q_nope.shape[:2], kv.shape[1]
        _check_keys(s, t, mask)
        kv = self.wkv_b(kv).view(b, t, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=None if mask is None else mask[:, None],
                                           is_causal=mask is None, scale=self.softmax_scale)
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))

    def _forward_absorbed(self, q_nope, q_pe, kv, k_pe, start_pos: int, cache: KVCache, mask=None):
        # the contractions as explicit batched GEMMs (what einsum lowers them to, without its per-call planning:
        # a decode step's cost is mostly such fixed per-op work)
        (b, s), h, dn, c = kv.shape[:2], self.n_heads, self.qk_nope_head_dim, self.kv_lora_rank
        wkv_b = self.wkv_b.weight.view(h, dn + self.v_head_dim, c)
        w_uk, w_uv = wkv_b[:, :dn], wkv_b[:, dn:]
        q_lat = torch.bmm(q_nope.reshape(b * s, h, dn).transpose(0, 1), w_uk)   # W^UK absorbed into the query
        q_lat = q_lat.transpose(0, 1).reshape(b, s * h, c)
        kv_all, pe_all = cache.write("kv", start_pos, kv), cache.write("pe", start_pos, k_pe)
        t = kv_all.shape[1]
        scores = torch.bmm(q_lat, kv_all.to(q_lat.dtype).transpose(1, 2))
        scores += torch.bmm(q_pe.reshape(b, s * h, -1), pe_all.to(q_pe.dtype).transpose(1, 2))
        scores = scores.view(b, s, h, t).mul_(self.softmax_scale)
        if mask is None:
            mask = attention_mask(s, t, start_pos, kv.device)
        scores = torch.where(mask[:, :, None, :], scores, float("-inf")).softmax(-1, dtype=torch.float32)
        o = torch.bmm(scores.to(kv.dtype).view(b, s * h, t), kv_all.to(kv.dtype))
        o = torch.bmm(o.view(b * s, h, c).transpose(0, 1), w_uv.transpose(1, 2))  # W^UV absorbed into the output
        return self.wo(o.transpose(0, 1).reshape(b, s, -1))
