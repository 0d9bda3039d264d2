"""ModelConfig and the published presets of the DeepSeek family (and two distillation students).

Numbers come from ../shared/reference/deepseek-numbers.md and deepseek-inference-configs/; each preset
cites its source. `param_counts()` builds the model on the meta device, so even the 671B preset
allocates nothing; the counting is model/transformer.py's, handed in by model/__init__.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Callable

# The network imports this module, so this module does not import the network: model/__init__.py hands
# its parameter counter (model.transformer.param_counts) in through set_param_counter.
_param_counter: Callable[["ModelConfig", bool], dict[str, int]] | None = None


def set_param_counter(counter: Callable[["ModelConfig", bool], dict[str, int]]) -> None:
    """The function that ModelConfig.param_counts delegates to (set once, by model/__init__.py)."""
    global _param_counter
    _param_counter = counter


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_dense_layers: int = 0          # first_k_dense_replace: leading layers with a dense FFN
    inter_dim: int = 128             # dense SwiGLU hidden size
    norm_eps: float = 1e-6
    tie_embeddings: bool = False     # Qwen2.5-1.5B ties the output head to the embedding
    init_std: float = 0.006          # DeepSeek LLM / V2 / V3 initialisation
    max_seq_len: int = 4096

    # attention: "mla" (V2 §2.1) or "gqa" (MHA when n_kv_heads == n_heads)
    attention: str = "mla"
    n_heads: int = 4
    n_kv_heads: int = 0              # gqa only; 0 means n_heads
    head_dim: int = 0                # gqa only; 0 means dim // n_heads
    qkv_bias: bool = False           # Qwen2
    q_lora_rank: int = 0             # 0: no query compression (V2-Lite)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16

    # rotary embedding; YaRN (V2 §3.1.4 / V3 §4.3) is on when rope_factor > 1
    rope_theta: float = 10000.0
    rope_interleave: bool = True     # DeepSeek MLA checkpoints rotate interleaved pairs; Llama/Qwen rotate halves
    rope_factor: float = 1.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    # DeepSeekMoE (n_routed_experts == 0: a dense model)
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    n_activated_experts: int = 0
    moe_inter_dim: int = 0
    score_func: str = "softmax"      # "softmax" (DeepSeekMoE, V2) | "sigmoid" (V3)
    norm_topk_prob: bool = False     # V3: gate weights normalised over the selected experts
    route_scale: float = 1.0         # routed_scaling_factor
    n_expert_groups: int = 1         # n_group
    n_limited_groups: int = 1        # topk_group
    topk_devices: int = 0            # V2 §2.2.1 device-limited routing: M devices (0: off)
    topk_nodes: int = 0              # V3 §2.1.2 node-limited routing: M nodes (0: off)
    aux_free_bias: bool = False      # V3 §2.1.2 auxiliary-loss-free balancing bias
    bias_update_gamma: float = 0.001
    balance_alpha_expert: float = 0.0   # V2 a1 / V3 sequence-wise alpha
    balance_alpha_device: float = 0.0   # V2 a2
    balance_alpha_comm: float = 0.0     # V2 a3
    balance_per_sequence: bool = True   # T = tokens of one sequence (V2 eq. 24-25, V3 eq. 17-20)
    capacity_factor: float = 0.0     # V2 §2.2.4 device-level token dropping in training (0: off)
    drop_exempt_fraction: float = 0.1   # sequences never dropped (V2 §2.2.4: ~10%)

    # multi-token prediction (V3 §2.2)
    n_mtp: int = 0
    mtp_lambda: float = 0.3

    def __post_init__(self):
        self.validate()

    # -- derived -------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.gqa_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.is_moe and layer_id >= self.n_dense_layers

    def validate(self) -> None:
        def bad(key, why):
            raise ValueError(f"ModelConfig({self.name}): {key} {why}")

        for f in fields(self):
            v = getattr(self, f.name)
            type_name = f.type if isinstance(f.type, str) else f.type.__name__
            want = {"int": int, "float": (int, float), "bool": bool, "str": str}[type_name]
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                bad(f.name, f"must be {f.type}, got {v!r}")
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "inter_dim"):
            if getattr(self, key) <= 0:
                bad(key, "must be positive")
        if self.attention not in ("mla", "gqa"):
            bad("attention", f"must be 'mla' or 'gqa', got {self.attention!r}")
        if self.attention == "gqa":
            if self.n_heads % self.kv_heads:
                bad("n_kv_heads", f"({self.kv_heads}) must divide n_heads ({self.n_heads})")
            if not self.head_dim and self.dim % self.n_heads:
                bad("dim", f"({self.dim}) must be divisible by n_heads ({self.n_heads}) or set head_dim")
            if self.gqa_head_dim % 2:
                bad("head_dim", "must be even for rotary embeddings")
        else:
            if self.kv_lora_rank <= 0:
                bad("kv_lora_rank", "must be positive for MLA")
            if self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
                bad("qk_rope_head_dim", "must be a positive even number")
        if self.score_func not in ("softmax", "sigmoid"):
            bad("score_func", f"must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            bad("n_dense_layers", f"must lie in [0, n_layers={self.n_layers}]")
        if self.rope_factor < 1:
            bad("rope_factor", "must be >= 1 (1 disables YaRN)")
        if self.is_moe:
            if self.moe_inter_dim <= 0:
                bad("moe_inter_dim", "must be positive for an MoE model")
            if not 0 < self.n_activated_experts <= self.n_routed_experts:
                bad("n_activated_experts", f"must lie in [1, n_routed_experts={self.n_routed_experts}]")
            if self.n_routed_experts % self.n_expert_groups:
                bad("n_expert_groups",
                    f"({self.n_expert_groups}) must divide n_routed_experts ({self.n_routed_experts})")
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                bad("n_limited_groups", f"must lie in [1, n_expert_groups={self.n_expert_groups}]")
            per_group = self.n_routed_experts // self.n_expert_groups
            if self.n_limited_groups * per_group < self.n_activated_experts:
                bad("n_limited_groups", "leaves fewer experts than n_activated_experts to choose from")
            if self.aux_free_bias and self.n_expert_groups > 1 and per_group < 2:
                bad("n_expert_groups", "needs at least 2 experts per group (group score = sum of top-2)")
        if self.n_mtp < 0:
            bad("n_mtp", "must be >= 0")

    # -- sizes ---------------------------------------------------------------------------------
    def param_counts(self, include_mtp: bool = False) -> dict[str, int]:
        """Total and per-token active parameters, counted on the meta device (allocates nothing).

        Convention (as the V3 weights documentation): both include the embedding and the output
        head (once when tied); "active" counts the shared experts and n_activated_experts routed
        experts of every MoE layer; the MTP modules are excluded unless include_mtp.
        """
        if _param_counter is None:
            raise RuntimeError("ModelConfig.param_counts: no parameter counter is set; import the model package "
                               "(`import model`), whose __init__ sets model.transformer.param_counts")
        return _param_counter(self, include_mtp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Presets. Each carries the published shape; see ../shared/reference/deepseek-numbers.md.
# ---------------------------------------------------------------------------------------------
_PRESETS: dict[str, dict] = {}


def _register(name: str, **kw) -> None:
    _PRESETS[name] = dict(name=name, **kw)


# DeepSeek LLM (arXiv 2401.02954, Table 2): LLaMA blocks, MHA (7B) / GQA (67B).
_LLM = dict(attention="gqa", rope_interleave=False, vocab_size=102400, max_seq_len=4096)
_register("deepseek-llm-7b", **_LLM, dim=4096, n_layers=30, n_heads=32, n_kv_heads=32, inter_dim=11008)
_register("deepseek-llm-67b", **_LLM, dim=8192, n_layers=95, n_heads=64, n_kv_heads=8, inter_dim=22016)

# DeepSeekMoE 16B (DeepSeekMoE §5): 64 fine-grained routed experts, 2 shared, top-6, MHA.
_register("deepseek-moe-16b", attention="gqa", rope_interleave=False, vocab_size=102400, max_seq_len=4096,
          dim=2048, n_layers=28, n_heads=16, n_kv_heads=16, inter_dim=10944, n_dense_layers=1,
          n_routed_experts=64, n_shared_experts=2, n_activated_experts=6, moe_inter_dim=1408,
          score_func="softmax", balance_alpha_expert=0.001)

# DeepSeek-V2-Lite (config_16B.json): MLA without query compression, YaRN factor 40, mscale 0.707.
_V2_ROPE = dict(rope_factor=40.0, original_seq_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
                mscale_all_dim=0.707, max_seq_len=163840)
_register("deepseek-v2-lite", attention="mla", vocab_size=102400, dim=2048, n_layers=27, n_heads=16,
          q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
          inter_dim=10944, n_dense_layers=1, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
          moe_inter_dim=1408, route_scale=1.0, balance_alpha_expert=0.001, **_V2_ROPE)

# DeepSeek-V2 (config_236B.json; V2 §2.2, §3.2.1): group-limited routing 8/3, device-limited M=3,
# balance factors a1/a2/a3 = 0.003/0.05/0.02, token dropping with capacity factor 1.0.
_register("deepseek-v2", attention="mla", vocab_size=102400, dim=5120, n_layers=60, n_heads=128,
          q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
          inter_dim=12288, n_dense_layers=1, n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
          moe_inter_dim=1536, route_scale=16.0, n_expert_groups=8, n_limited_groups=3, topk_devices=3,
          balance_alpha_expert=0.003, balance_alpha_device=0.05, balance_alpha_comm=0.02,
          capacity_factor=1.0, **_V2_ROPE)

# DeepSeek-V3 (config_671B.json; V3 §2.1-2.2, §4.2-4.3): sigmoid gating normalised over the top-8,
# aux-loss-free bias (gamma 0.001), sequence-wise alpha 1e-4, node-limited M=4, one MTP module.
_register("deepseek-v3", attention="mla", vocab_size=129280, dim=7168, n_layers=61, n_heads=128,
          q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
          inter_dim=18432, n_dense_layers=3, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
          moe_inter_dim=2048, score_func="sigmoid", norm_topk_prob=True, route_scale=2.5,
          n_expert_groups=8, n_limited_groups=4, topk_nodes=4, aux_free_bias=True, bias_update_gamma=0.001,
          balance_alpha_expert=0.0001, n_mtp=1, mtp_lambda=0.3,
          rope_factor=40.0, original_seq_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
          mscale_all_dim=1.0, max_seq_len=163840)

# R1 distillation students (R1 §2.4): dense GQA shapes of Qwen2.5-1.5B and Llama-3-8B.
_register("qwen2.5-1.5b", attention="gqa", rope_interleave=False, vocab_size=151936, dim=1536, n_layers=28,
          n_heads=12, n_kv_heads=2, inter_dim=8960, qkv_bias=True, tie_embeddings=True, rope_theta=1e6,
          max_seq_len=32768, init_std=0.02)
_register("llama-3-8b", attention="gqa", rope_interleave=False, vocab_size=128256, dim=4096, n_layers=32,
          n_heads=32, n_kv_heads=8, inter_dim=14336, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192,
          init_std=0.02)

# Tiny variants: the same architecture switches at toy width, for tests and the CPU demo.
# Widths are multiples of 8 so grouped GEMMs take the fused path.
_TINY = dict(vocab_size=256, dim=64, inter_dim=128, max_seq_len=256)
_TINY_MLA = dict(attention="mla", n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16)
_TINY_YARN = dict(rope_factor=4.0, original_seq_len=64, beta_fast=32.0, beta_slow=1.0)
_register("tiny-deepseek-llm-7b", **{**_LLM, **_TINY}, n_layers=2, n_heads=4, n_kv_heads=4)
_register("tiny-deepseek-llm-67b", **{**_LLM, **_TINY}, n_layers=2, n_heads=4, n_kv_heads=2)
_register("tiny-deepseek-moe-16b", attention="gqa", rope_interleave=False, **_TINY, n_layers=3, n_heads=4,
          n_kv_heads=4, n_dense_layers=1, n_routed_experts=8, n_shared_experts=2, n_activated_experts=2,
          moe_inter_dim=32, balance_alpha_expert=0.001)
_register("tiny-deepseek-v2-lite", **_TINY, **_TINY_MLA, **_TINY_YARN, mscale=0.707, mscale_all_dim=0.707,
          n_layers=3, q_lora_rank=0, n_dense_layers=1, n_routed_experts=8, n_shared_experts=2,
          n_activated_experts=2, moe_inter_dim=32, balance_alpha_expert=0.001)
_register("tiny-deepseek-v2", **_TINY, **_TINY_MLA, **_TINY_YARN, mscale=0.707, mscale_all_dim=0.707,
          n_layers=3, q_lora_rank=32, n_dense_layers=1, n_routed_experts=8, n_shared_experts=2,
          n_activated_experts=2, moe_inter_dim=32, route_scale=16.0, n_expert_groups=4, n_limited_groups=2,
          topk_devices=3, balance_alpha_expert=0.003, balance_alpha_device=0.05, balance_alpha_comm=0.02,
          capacity_factor=1.0)
_register("tiny-deepseek-v3", **_TINY, **_TINY_MLA, **_TINY_YARN, mscale=1.0, mscale_all_dim=1.0,
          n_layers=3, q_lora_rank=32, n_dense_layers=1, n_routed_experts=8, n_shared_experts=1,
          n_activated_experts=2, moe_inter_dim=32, score_func="sigmoid", norm_topk_prob=True, route_scale=2.5,
          n_expert_groups=4, n_limited_groups=2, topk_nodes=4, aux_free_bias=True, bias_update_gamma=0.001,
          balance_alpha_expert=0.0001, n_mtp=1, mtp_lambda=0.3)
_register("tiny-qwen2.5-1.5b", attention="gqa", rope_interleave=False, **_TINY, n_layers=2, n_heads=4,
          n_kv_heads=2, qkv_bias=True, tie_embeddings=True, rope_theta=1e6, init_std=0.02)
_register("tiny-llama-3-8b", attention="gqa", rope_interleave=False, **_TINY, n_layers=2, n_heads=4,
          n_kv_heads=2, rope_theta=500000.0, norm_eps=1e-5, init_std=0.02)


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset as a fresh ModelConfig, with field overrides applied."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(preset_names())}")
    return ModelConfig.from_dict({**_PRESETS[name], **overrides})


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    # V2 §3.1.4 / YaRN: sqrt(1/t) = 0.1 * mscale * ln(s) + 1
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
