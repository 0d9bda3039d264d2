"""Hugging Face checkpoint interop: DeepseekV3, DeepseekV2, Qwen2 and Llama safetensors <-> `Transformer`.

Config fields follow transformers 5.23 (`models/{deepseek_v3,deepseek_v2,qwen2,llama}/configuration_*.py`)
and also DeepSeek's original remote-code config.json files (`rope_scaling`, `scoring_func`, `topk_method`,
`aux_loss_alpha`, `seq_aux`, `moe_layer_freq`). Tensor names on disk are the hub's: routed experts one
tensor per expert (`mlp.experts.{e}.gate_proj.weight`), V3 MTP modules as `model.layers.{n_layers + k}.*`
(../shared/reference/deepseek-v3-weights-format.md), FP8 weights dequantized on import with their
128x128 block scales (`weight_scale_inv`).

Everything streams: `load_hf` fills a model allocated once, one tensor at a time, and `save_hf` writes
one shard at a time; nothing holds the whole checkpoint twice. The safetensors files themselves (sharded
reading and writing, atomic directories) are model/safetensors_io.py's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .safetensors_io import SafetensorsDir, ShardWriter, as_dtype, atomic_dir

# architecture name -> model_type, as transformers writes them
ARCHITECTURES = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
_ARCH_OF_TYPE = {v: k for k, v in ARCHITECTURES.items()}

# ModelConfig fields with no transformers counterpart (training-time knobs); written under the
# "whaletron" key of config.json so that an export/import round trip gives the same ModelConfig.
_EXTRA_FIELDS = ("name", "topk_devices", "topk_nodes", "bias_update_gamma", "balance_alpha_device",
                 "balance_alpha_comm", "capacity_factor", "drop_exempt_fraction", "mtp_lambda")

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DEFAULT_FP8_BLOCK = (128, 128)


# =============================================================================================
# config.json <-> ModelConfig
# =============================================================================================
def hf_architecture(d: dict) -> str:
    """The model_type ('deepseek_v3' | 'deepseek_v2' | 'qwen2' | 'llama') of an HF config dict."""
    archs = d.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    if d.get("model_type") in _ARCH_OF_TYPE:
        return d["model_type"]
    raise ValueError(
        f"unsupported architecture {archs or None} (model_type {d.get('model_type')!r}); whaletron converts "
        f"{', '.join(ARCHITECTURES)} (model_type {', '.join(_ARCH_OF_TYPE)})")


# config.json fields read as numbers or flags (absent or null: the default applies); checked before use so
# that a string or a fraction is an error naming the field, not a traceback or a silent int("64") / int(64.5)
_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "original_max_position_embeddings",
               "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
               "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
               "first_k_dense_replace", "n_group", "topk_group", "moe_layer_freq", "num_nextn_predict_layers",
               "num_mtp_layers")
_FLOAT_FIELDS = ("rms_norm_eps", "initializer_range", "rope_theta", "routed_scaling_factor", "aux_loss_alpha",
                 "partial_rotary_factor")
_BOOL_FIELDS = ("tie_word_embeddings", "seq_aux", "norm_topk_prob", "rope_interleave", "attention_bias", "mlp_bias",
                "use_sliding_window")
_ROPE_FLOAT_FIELDS = ("rope_theta", "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                      "partial_rotary_factor")
_ROPE_INT_FIELDS = ("original_max_position_embeddings",)


def _is_int(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_field_types(d, source: str) -> None:
    """Raise a one-line ValueError naming `source` and the field when a config.json value has the wrong type."""
    if not isinstance(d, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
            type(d), "null" if d is None else type(d).__name__)
        raise ValueError(f"{source} holds {kind}, not a JSON object; a Hugging Face "
                         "config.json is an object of fields ({\"architectures\": [...], \"hidden_size\": ...})")

    def bad(key: str, v, kind: str) -> ValueError:
        return ValueError(f"{source}: {key}={v!r} is not {kind}; correct that field")

    def check(obj: dict, prefix: str, ints, floats, bools=()) -> None:
        for key in ints:
            if obj.get(key) is not None and not _is_int(obj[key]):
                raise bad(prefix + key, obj[key], "an integer")
        for key in floats:
            if obj.get(key) is not None and not _is_number(obj[key]):
                raise bad(prefix + key, obj[key], "a number")
        for key in bools:
            if obj.get(key) is not None and not (isinstance(obj[key], int) and obj[key] in (0, 1)):
                raise bad(prefix + key, obj[key], "true or false")

    check(d, "", _INT_FIELDS, _FLOAT_FIELDS, _BOOL_FIELDS)
    for key in ("rope_parameters", "rope_scaling"):
        rp = d.get(key)
        if rp is not None and not isinstance(rp, dict):
            raise bad(key, rp, "a JSON object")
        if rp:
            check(rp, key + ".", _ROPE_INT_FIELDS, _ROPE_FLOAT_FIELDS)
    q = d.get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise bad("quantization_config", q, "a JSON object")
    block = (q or {}).get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(_is_int(b) and b > 0 for b in block)):
        raise bad("quantization_config.weight_block_size", block, "a list of two positive integers")
    extra = d.get("whaletron")
    if extra is not None and not isinstance(extra, dict):
        raise bad("whaletron", extra, "a JSON object")
    kinds = {f.name: type(f.default) for f in dataclasses.fields(ModelConfig) if f.name in _EXTRA_FIELDS}
    for key, v in (extra or {}).items():
        kind = kinds.get(key)
        if (kind is int and not _is_int(v)) or (kind is float and not _is_number(v)) \
                or (kind is str and not isinstance(v, str)):
            raise bad(f"whaletron.{key}", v, {int: "an integer", float: "a number", str: "a string"}[kind])


def _need(d: dict, key: str, arch: str):
    if d.get(key) is None:
        raise ValueError(f"{arch} config.json lacks {key!r}, which whaletron needs to build the model")
    return d[key]


def _rope_from_hf(d: dict, arch: str, mla: bool) -> dict:
    """rope_parameters (transformers 5) or rope_scaling + rope_theta (older config.json files)."""
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rp, dict):  # (_check_field_types has said so already)
        raise ValueError(f"rope_parameters/rope_scaling must be a JSON object, got {rp!r}")
    theta = float(rp.get("rope_theta") or d.get("rope_theta") or 10000.0)
    rtype = rp.get("rope_type") or rp.get("type") or "default"
    out = dict(rope_theta=theta)
    if (rp.get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported: whaletron rotates the whole rope dimension")
    if rtype == "default":
        return out
    if rtype != "yarn":
        raise ValueError(f"unsupported RoPE type {rtype!r} in rope_parameters/rope_scaling: whaletron supports "
                         "'default' and 'yarn' (DeepSeek's YaRN with factor, beta_fast/slow, mscale, mscale_all_dim)")
    if rp.get("truncate", True) is False:
        raise ValueError("YaRN with truncate=false is not supported (whaletron, like DeepSeek, floors/ceils the "
                         "correction range)")
    max_pos = d.get("max_position_embeddings")
    original = rp.get("original_max_position_embeddings") or d.get("original_max_position_embeddings") or max_pos
    if original is None:
        raise ValueError("YaRN needs original_max_position_embeddings (or max_position_embeddings)")
    factor = rp.get("factor")
    if factor is None:  # transformers: the ratio of the two context lengths
        factor = max_pos / original
    factor = float(factor)
    if factor < 1:
        raise ValueError(f"YaRN factor must be >= 1, got {factor}")
    # transformers uses mscale/mscale_all_dim only when both are set, else 0.1 ln(s) + 1 (mscale = 1);
    # ModelConfig does the same with mscale = 0 standing for "not given".
    mscale = float(rp.get("mscale") or 0.0)
    mscale_all_dim = float(rp.get("mscale_all_dim") or 0.0)
    if not mla and mscale_all_dim:
        raise ValueError(f"{arch}: YaRN mscale_all_dim is not supported for GQA attention (transformers' "
                         "Llama/Qwen2 do not scale the softmax by it, whaletron does)")
    out.update(rope_factor=factor, original_seq_len=int(original), beta_fast=float(rp.get("beta_fast") or 32),
               beta_slow=float(rp.get("beta_slow") or 1), mscale=mscale, mscale_all_dim=mscale_all_dim)
    if rp.get("attention_factor") is not None:
        from .config import yarn_mscale
        ours = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
                else yarn_mscale(factor))
        if not math.isclose(float(rp["attention_factor"]), ours, rel_tol=1e-6):
            raise ValueError(f"YaRN attention_factor {rp['attention_factor']} differs from the one implied by "
                             f"factor/mscale/mscale_all_dim ({ours}); whaletron cannot express it")
    return out


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig for a Hugging Face config.json dict (transformers 5 or DeepSeek remote-code form).

    `source` (the file's path) names the file in the errors."""
    _check_field_types(d, source)
    arch = hf_architecture(d)
    name = _ARCH_OF_TYPE[arch]
    mla = arch in ("deepseek_v3", "deepseek_v2")
    if (d.get("hidden_act") or "silu") != "silu":
        raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported; whaletron's FFNs are SwiGLU (silu)")
    n_layers = int(_need(d, "num_hidden_layers", name))
    kw = dict(
        name=d.get("_name_or_path") or f"hf-{arch}",
        vocab_size=int(_need(d, "vocab_size", name)),
        dim=int(_need(d, "hidden_size", name)),
        n_layers=n_layers,
        inter_dim=int(_need(d, "intermediate_size", name)),
        n_heads=int(_need(d, "num_attention_heads", name)),
        norm_eps=float(d.get("rms_norm_eps") or 1e-6),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(d.get("initializer_range") or 0.02),
        max_seq_len=int(d.get("max_position_embeddings") or {"deepseek_v3": 4096, "qwen2": 32768}.get(arch, 2048)),
    )
    kw.update(_rope_from_hf(d, name, mla))
    n_mtp = d.get("num_nextn_predict_layers", d.get("num_mtp_layers"))
    kw["n_mtp"] = int((1 if arch == "deepseek_v3" else 0) if n_mtp is None else n_mtp)

    if mla:
        if d.get("attention_bias"):
            raise ValueError(f"{name}: attention_bias=true is not supported for MLA")
        if d.get("mlp_bias"):
            raise ValueError(f"{name}: mlp_bias=true is not supported")
        if "q_lora_rank" not in d:
            raise ValueError(f"{name} config.json lacks 'q_lora_rank' (null: no query compression)")
        kw.update(attention="mla", q_lora_rank=int(d["q_lora_rank"] or 0),
                  kv_lora_rank=int(_need(d, "kv_lora_rank", name)),
                  qk_nope_head_dim=int(_need(d, "qk_nope_head_dim", name)),
                  qk_rope_head_dim=int(_need(d, "qk_rope_head_dim", name)),
                  v_head_dim=int(_need(d, "v_head_dim", name)))
        kw.update(_moe_from_hf(d, arch, name, n_layers))
    else:
        if d.get("mlp_bias"):
            raise ValueError(f"{name}: mlp_bias=true is not supported")
        if arch == "llama" and d.get("attention_bias"):
            raise ValueError("LlamaForCausalLM with attention_bias=true (bias on q/k/v and o) is not supported; "
                             "whaletron has q/k/v biases only (Qwen2)")
        if arch == "qwen2" and d.get("use_sliding_window") and any(
                t == "sliding_attention" for t in (d.get("layer_types") or ["sliding_attention"])):
            raise ValueError("Qwen2 sliding-window attention is not supported")
        if d.get("n_routed_experts") or d.get("num_experts") or d.get("num_local_experts"):
            raise ValueError(f"{name} with routed experts is not a transformers architecture whaletron knows")
        n_heads = kw["n_heads"]
        head_dim = int(d.get("head_dim") or kw["dim"] // n_heads)
        kw.update(attention="gqa", rope_interleave=False, n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
                  head_dim=0 if head_dim * n_heads == kw["dim"] else head_dim, qkv_bias=arch == "qwen2")
    extra = d.get("whaletron") or {}
    unknown = sorted(set(extra) - set(_EXTRA_FIELDS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} under config.json 'whaletron'; valid: {list(_EXTRA_FIELDS)}")
    kw.update(extra)
    return ModelConfig.from_dict(kw)


def _moe_from_hf(d: dict, arch: str, name: str, n_layers: int) -> dict:
    n_experts = d.get("n_routed_experts", d.get("num_experts", d.get("num_local_experts")))
    if not n_experts:
        return dict(n_dense_layers=n_layers)  # an MLA model without MoE layers
    if (d.get("moe_layer_freq") or 1) != 1:
        raise ValueError(f"moe_layer_freq={d['moe_layer_freq']} is not supported: whaletron puts an MoE FFN in "
                         "every layer after first_k_dense_replace (moe_layer_freq must be 1)")
    v3 = arch == "deepseek_v3"
    score = d.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    if score != ("sigmoid" if v3 else "softmax"):
        raise ValueError(f"{name} with scoring_func={score!r} is not supported: transformers' "
                         f"{name} uses {'sigmoid' if v3 else 'softmax'} scores")
    method = d.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    first_dense = d.get("first_k_dense_replace")
    first_dense = (3 if v3 else 0) if first_dense is None else int(first_dense)
    n_shared = d.get("n_shared_experts", 1 if v3 else 2)
    kw = dict(n_routed_experts=int(n_experts),
              n_activated_experts=int(_need(d, "num_experts_per_tok", name)),
              moe_inter_dim=int(_need(d, "moe_intermediate_size", name)),
              n_shared_experts=int(n_shared or 0),
              n_dense_layers=min(first_dense, n_layers),
              route_scale=float(d.get("routed_scaling_factor", 2.5 if v3 else 1.0)),
              score_func=score)
    if d.get("aux_loss_alpha") is not None:
        kw["balance_alpha_expert"] = float(d["aux_loss_alpha"])
    if d.get("seq_aux") is not None:
        kw["balance_per_sequence"] = bool(d["seq_aux"])
    if v3:
        if method != "noaux_tc":
            raise ValueError(f"{name} with topk_method={method!r} is not supported: DeepSeek-V3 routing is "
                             "'noaux_tc' (sigmoid scores + e_score_correction_bias, group-limited)")
        n_group = d.get("n_group", 8)
        topk_group = d.get("topk_group", 4)
        kw.update(aux_free_bias=True, norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                  n_expert_groups=int(n_group or 1), n_limited_groups=int(topk_group or 1))
    else:
        if method == "greedy":
            kw.update(n_expert_groups=1, n_limited_groups=1)
        elif method == "group_limited_greedy":
            kw.update(n_expert_groups=int(_need(d, "n_group", name)),
                      n_limited_groups=int(_need(d, "topk_group", name)))
        else:
            raise ValueError(f"{name} with topk_method={method!r} is not supported; use 'greedy' or "
                             "'group_limited_greedy'")
        if d.get("norm_topk_prob"):
            warnings.warn("DeepseekV2 config has norm_topk_prob=true: whaletron normalises the top-k gate weights "
                          "as DeepSeek's own modeling code does; transformers' DeepseekV2 ignores this flag",
                          stacklevel=3)
            kw["norm_topk_prob"] = True
    return kw


def _export_arch(cfg: ModelConfig) -> str:
    """The model_type that expresses cfg exactly, or a ValueError saying why none does."""
    if cfg.attention == "gqa":
        if cfg.is_moe:
            raise ValueError(
                f"{cfg.name}: a GQA/MHA model with routed experts (DeepSeekMoE 16B style) has no transformers "
                "architecture among DeepseekV3ForCausalLM, DeepseekV2ForCausalLM, Qwen2ForCausalLM and "
                "LlamaForCausalLM; keep it in whaletron's native format (python -m model.convert)")
        if cfg.rope_factor > 1 and cfg.mscale_all_dim:
            raise ValueError(f"{cfg.name}: YaRN mscale_all_dim on GQA attention cannot be expressed in "
                             "transformers' Llama/Qwen2 (they do not scale the softmax)")
        return "qwen2" if cfg.qkv_bias else "llama"
    if cfg.score_func == "sigmoid":
        if not cfg.aux_free_bias and cfg.is_moe and cfg.n_expert_groups > 1:
            raise ValueError(f"{cfg.name}: sigmoid routing with expert groups but without the aux-loss-free bias "
                             "ranks groups by their best expert; transformers' DeepseekV3 ranks them by the sum of "
                             "the top 2 (set aux_free_bias=True or n_expert_groups=1)")
        return "deepseek_v3"
    if cfg.aux_free_bias:
        raise ValueError(f"{cfg.name}: softmax routing with the aux-loss-free bias cannot be expressed: "
                         "transformers' DeepseekV2 has no e_score_correction_bias (use score_func='sigmoid' for V3)")
    return "deepseek_v2"


def config_to_hf(cfg: ModelConfig, rope_interleave: bool = True) -> dict:
    """The config.json dict (transformers 5 form) of the architecture that expresses cfg.

    MLA with sigmoid routing -> DeepseekV3ForCausalLM, MLA otherwise -> DeepseekV2ForCausalLM, GQA with
    QKV bias -> Qwen2ForCausalLM, GQA otherwise -> LlamaForCausalLM. `rope_interleave` only matters for
    DeepseekV3 (False: the rope rows of q and wkv_a are written in rotate_half order).
    """
    arch = _export_arch(cfg)
    d = {
        "architectures": [_ARCH_OF_TYPE[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads if cfg.attention == "gqa" else cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor > 1:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
                "beta_slow": cfg.beta_slow}
        if cfg.mscale:
            rope["mscale"] = cfg.mscale
        if cfg.mscale_all_dim:
            rope["mscale_all_dim"] = cfg.mscale_all_dim
    d["rope_parameters"] = rope
    if cfg.attention == "gqa":
        if arch == "llama":
            d.update(attention_bias=False, mlp_bias=False, head_dim=cfg.gqa_head_dim)
        else:
            d.update(use_sliding_window=False, sliding_window=None)
            if cfg.head_dim:
                d["head_dim"] = cfg.head_dim
    else:
        d.update(attention_bias=False, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
                 qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                 v_head_dim=cfg.v_head_dim)
        if arch == "deepseek_v3":
            d["rope_interleave"] = bool(rope_interleave)
        else:
            d["mlp_bias"] = False
        if cfg.is_moe:
            d.update(n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.n_activated_experts,
                     n_shared_experts=cfg.n_shared_experts, moe_intermediate_size=cfg.moe_inter_dim,
                     first_k_dense_replace=cfg.n_dense_layers, routed_scaling_factor=cfg.route_scale,
                     n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
                     norm_topk_prob=cfg.norm_topk_prob, scoring_func=cfg.score_func,
                     aux_loss_alpha=cfg.balance_alpha_expert, seq_aux=cfg.balance_per_sequence, moe_layer_freq=1)
            if arch == "deepseek_v3":
                d["topk_method"] = "noaux_tc"
            else:
                d["topk_method"] = "group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy"
                if cfg.norm_topk_prob:
                    warnings.warn("exporting softmax routing with norm_topk_prob=True as DeepseekV2: DeepSeek's "
                                  "own modeling code honours it, transformers' DeepseekV2 ignores it", stacklevel=2)
        else:  # no MoE layer: every layer keeps its dense FFN
            d.update(n_routed_experts=0, num_experts_per_tok=0, n_shared_experts=0, moe_intermediate_size=0,
                     first_k_dense_replace=cfg.n_layers)
    d["num_nextn_predict_layers"] = cfg.n_mtp
    d["whaletron"] = {k: getattr(cfg, k) for k in _EXTRA_FIELDS}
    return d


# =============================================================================================
# tensor names
# =============================================================================================
@dataclass(frozen=True)
class _Entry:
    hf: str                      # name on disk
    ours: str | None             # our state_dict key (None: export-only zeros)
    expert: int | None = None    # index into our stacked expert tensor
    rope: str | None = None      # rows holding rotary dims: "mla_q" | "mla_kv" | "gqa_q" | "gqa_k"
    kind: str = "param"          # "param" | "copy" (export-only duplicate) | "zeros" (export-only)
    group: str | None = None     # HF prefix of the routed experts (for the fused on-disk form)


def _block_entries(cfg: ModelConfig, layer_id: int, h: str, o: str, v3: bool) -> list[_Entry]:
    """Entries of one decoder block: HF prefix h ('model.layers.3.'), our prefix o ('layers.3.')."""
    E = _Entry
    out = []
    if cfg.attention == "mla":
        if cfg.q_lora_rank:
            out += [E(h + "self_attn.q_a_proj.weight", o + "attn.wq_a.weight"),
                    E(h + "self_attn.q_a_layernorm.weight", o + "attn.q_norm.weight"),
                    E(h + "self_attn.q_b_proj.weight", o + "attn.wq_b.weight", rope="mla_q")]
        else:
            out.append(E(h + "self_attn.q_proj.weight", o + "attn.wq.weight", rope="mla_q"))
        out += [E(h + "self_attn.kv_a_proj_with_mqa.weight", o + "attn.wkv_a.weight", rope="mla_kv"),
                E(h + "self_attn.kv_a_layernorm.weight", o + "attn.kv_norm.weight"),
                E(h + "self_attn.kv_b_proj.weight", o + "attn.wkv_b.weight"),
                E(h + "self_attn.o_proj.weight", o + "attn.wo.weight")]
    else:
        params = ["weight", "bias"] if cfg.qkv_bias else ["weight"]
        for hf_name, ours, rope in (("q_proj", "wq", "gqa_q"), ("k_proj", "wk", "gqa_k"), ("v_proj", "wv", None)):
            out += [E(f"{h}self_attn.{hf_name}.{p}", f"{o}attn.{ours}.{p}", rope=rope) for p in params]
        out.append(E(h + "self_attn.o_proj.weight", o + "attn.wo.weight"))
    if cfg.is_moe_layer(layer_id):
        out.append(E(h + "mlp.gate.weight", o + "ffn.gate.weight"))
        if cfg.aux_free_bias:
            out.append(E(h + "mlp.gate.e_score_correction_bias", o + "ffn.gate.bias"))
        elif v3:
            out.append(E(h + "mlp.gate.e_score_correction_bias", None, kind="zeros"))
        g = h + "mlp.experts."
        for e in range(cfg.n_routed_experts):
            out += [E(f"{g}{e}.gate_proj.weight", o + "ffn.experts.w1", expert=e, group=g),
                    E(f"{g}{e}.up_proj.weight", o + "ffn.experts.w3", expert=e, group=g),
                    E(f"{g}{e}.down_proj.weight", o + "ffn.experts.w2", expert=e, group=g)]
        if cfg.n_shared_experts:
            out += [E(h + f"mlp.shared_experts.{p}_proj.weight", o + f"ffn.shared_experts.{w}.weight")
                    for p, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))]
    else:
        out += [E(h + f"mlp.{p}_proj.weight", o + f"ffn.{w}.weight") for p, w in (("gate", "w1"), ("up", "w3"),
                                                                                 ("down", "w2"))]
    out += [E(h + "input_layernorm.weight", o + "attn_norm.weight"),
            E(h + "post_attention_layernorm.weight", o + "ffn_norm.weight")]
    return out


def _table(cfg: ModelConfig, arch: str) -> list[_Entry]:
    """Every tensor of the HF checkpoint for cfg, in the order it is written."""
    v3 = arch == "deepseek_v3"
    E = _Entry
    out = [E("model.embed_tokens.weight", "embed.weight")]
    for i in range(cfg.n_layers):
        out += _block_entries(cfg, i, f"model.layers.{i}.", f"layers.{i}.", v3)
    out.append(E("model.norm.weight", "norm.weight"))
    if not cfg.tie_embeddings:
        out.append(E("lm_head.weight", "head.weight"))
    for k in range(cfg.n_mtp):  # V3 weights format: MTP module k is layer n_layers + k
        h, o = f"model.layers.{cfg.n_layers + k}.", f"mtp.{k}."
        out += [E(h + "embed_tokens.weight", "embed.weight", kind="copy"),
                E(h + "enorm.weight", o + "enorm.weight"),
                E(h + "hnorm.weight", o + "hnorm.weight"),
                E(h + "eh_proj.weight", o + "eh_proj.weight")]
        out += _block_entries(cfg, cfg.n_layers + k, h, o + "block.", v3)
        out += [E(h + "shared_head.norm.weight", o + "norm.weight"),
                E(h + "shared_head.head.weight", "head.weight", kind="copy")]
    return out


def _rope_perm(d: int, to_interleaved: bool) -> torch.Tensor:
    """Row order taking rotate_half layout [x_0..x_{d/2-1}, y_0..] to interleaved pairs [x_0, y_0, x_1, ...]
    (or back): both rotate (x_j, y_j) by frequency j."""
    half_to_interleaved = torch.arange(d).view(2, d // 2).t().reshape(-1)
    return half_to_interleaved if to_interleaved else torch.argsort(half_to_interleaved)


def _permute_rope(t: torch.Tensor, kind: str, cfg: ModelConfig, to_interleaved: bool) -> torch.Tensor:
    """Reorder the rotary rows (dim 0) of a q/k projection weight or bias between the two layouts."""
    shape = t.shape
    if kind == "mla_q":
        perm = _rope_perm(cfg.qk_rope_head_dim, to_interleaved)
        v = t.reshape(cfg.n_heads, cfg.qk_head_dim, -1)
        nope = cfg.qk_nope_head_dim
        v = torch.cat([v[:, :nope], v[:, nope:][:, perm]], dim=1)
    elif kind == "mla_kv":
        perm = _rope_perm(cfg.qk_rope_head_dim, to_interleaved)
        v = torch.cat([t[: cfg.kv_lora_rank], t[cfg.kv_lora_rank:][perm]], dim=0)
    elif kind in ("gqa_q", "gqa_k"):
        perm = _rope_perm(cfg.gqa_head_dim, to_interleaved)
        heads = cfg.n_heads if kind == "gqa_q" else cfg.kv_heads
        v = t.reshape(heads, cfg.gqa_head_dim, -1)[:, perm]
    else:
        raise AssertionError(kind)
    return v.reshape(shape)


def _hf_rope_interleaved(arch: str, hf_config: dict | None, rope_interleave: bool = True) -> bool:
    if arch == "deepseek_v3":
        return bool(hf_config.get("rope_interleave", True)) if hf_config is not None else rope_interleave
    return arch == "deepseek_v2"  # V2 rotates complex (interleaved) pairs; Llama/Qwen2 rotate halves


def _ours_interleaved(cfg: ModelConfig) -> bool:
    return cfg.attention == "mla" or cfg.rope_interleave  # our MLA always rotates interleaved pairs


def _natural(key: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def _key_error(what: str, missing: list[str], unexpected: list[str], hint: str) -> ValueError:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            keys = sorted(keys, key=_natural)
            more = f" ... (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"{len(keys)} {label} tensor(s): {', '.join(keys[:5])}{more}")
    return ValueError(f"{what} does not match the config: {'; '.join(parts)}. {hint}")


def _check_hf_keys(cfg: ModelConfig, table: list[_Entry], keys: Iterable[str]) -> set[str]:
    """Raise on missing or unexpected tensors; return the expert groups stored fused on disk."""
    present = set(keys)
    expected = {e.hf for e in table if e.kind == "param"}
    optional = {e.hf for e in table if e.kind != "param"}
    fused = set()
    for g in sorted({e.group for e in table if e.group}):
        per_expert = {e.hf for e in table if e.group == g}
        fused_keys = {g + "gate_up_proj", g + "down_proj"}
        if not per_expert & present and fused_keys <= present:  # transformers' in-memory layout on disk
            fused.add(g)
            expected = (expected - per_expert) | fused_keys
    scales = {k for k in present if k.endswith("_scale_inv") and k[: -len("_scale_inv")] in present}
    ignored = {k for k in present if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        ignored.add("lm_head.weight")
    missing = expected - present
    unexpected = present - expected - optional - scales - ignored
    if missing or unexpected:
        raise _key_error("checkpoint", list(missing), list(unexpected),
                         f"(config: {cfg.n_layers} layers, {cfg.n_routed_experts} routed experts, "
                         f"{cfg.n_mtp} MTP modules, q_lora_rank={cfg.q_lora_rank})")
    return fused


def _expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    from .transformer import Transformer

    with torch.device("meta"):
        net = Transformer(cfg)
    return {k: v.shape for k, v in net.state_dict().items()}


# =============================================================================================
# FP8 (deepseek-v3-weights-format.md, "FP8 Weight Documentation")
# =============================================================================================
def fp8_block_size(hf_config: dict | None) -> tuple[int, int]:
    q = (hf_config or {}).get("quantization_config") or {}
    if q and q.get("quant_method", "fp8") != "fp8":
        raise ValueError(f"quantization_config.quant_method {q.get('quant_method')!r} is not supported "
                         "(only DeepSeek's block-wise 'fp8')")
    b = q.get("weight_block_size") or DEFAULT_FP8_BLOCK
    return int(b[0]), int(b[1])


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_FP8_BLOCK,
                   name: str = "weight") -> torch.Tensor:
    """fp32 weight from an e4m3 [out, in] weight and its fp32 [ceil(out/b0), ceil(in/b1)] scale grid:
    each (b0 x b1) block times its scale_inv; a partial block at the edge uses its block's scale."""
    if w.dim() != 2:
        raise ValueError(f"{name}: FP8 dequantization expects a 2-D weight, got shape {tuple(w.shape)}")
    (out, inp), (b0, b1) = w.shape, block
    grid = (math.ceil(out / b0), math.ceil(inp / b1))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(f"{name}_scale_inv has shape {tuple(scale_inv.shape)}; a {out}x{inp} weight in "
                         f"{b0}x{b1} blocks needs {grid}")
    # ../shared/reference/deepseek-v3-weights-format.md, "Dequantization Method": "(128x128 weight block) *
    # weight_scale_inv", a block not aligned to 128 zero-padded to a whole one and cut back after. One fp32
    # product per element, as the training recipe's parallel.fp8.dequantize (tests/test_hf.py compares them)
    x, pad_r, pad_c = w.float(), grid[0] * b0 - out, grid[1] * b1 - inp
    if pad_r or pad_c:
        x = F.pad(x, (0, pad_c, 0, pad_r))
    x = x.unflatten(-1, (grid[1], b1)).unflatten(0, (grid[0], b0)) * scale_inv.float()[:, None, :, None]
    return x.flatten(2, 3).flatten(0, 1)[:out, :inp]


# =============================================================================================
# streaming conversion
# =============================================================================================
Getter = Callable[..., torch.Tensor]  # get(key) or get(key, index) -> tensor


def iter_from_hf(cfg: ModelConfig, keys: Iterable[str], get: Getter, hf_config: dict | None = None,
                 fp8_dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(our key, tensor) for every tensor of our state_dict (the tied head excepted), built one at a time
    from HF tensors fetched with get(hf_key): experts stacked, FP8 dequantized (to fp8_dtype), rope rows
    reordered when the checkpoint rotates halves. Raises at once (before any tensor is read) if the names
    do not match the config; the returned generator reads lazily."""
    keys = set(keys)
    arch = hf_architecture(hf_config) if hf_config is not None else _export_arch(cfg)
    table = _table(cfg, arch)
    fused = _check_hf_keys(cfg, table, keys)
    permute = _hf_rope_interleaved(arch, hf_config) != _ours_interleaved(cfg)
    block = fp8_block_size(hf_config)
    shapes = _expected_shapes(cfg)

    def read(hf: str, rope: str | None) -> torch.Tensor:
        t = get(hf)
        if t.dtype in FP8_DTYPES:
            if hf + "_scale_inv" not in keys:
                raise ValueError(f"{hf} is stored as {t.dtype} but {hf}_scale_inv is missing")
            scale_inv = get(hf + "_scale_inv")
            check_float(hf + "_scale_inv", scale_inv)
            t = dequantize_fp8(t, scale_inv, block, hf).to(fp8_dtype)
        if permute and rope:
            t = _permute_rope(t, rope, cfg, to_interleaved=_ours_interleaved(cfg))
        return t

    def check(hf: str, t: torch.Tensor, shape) -> None:
        check_float(hf, t)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{hf} has shape {tuple(t.shape)} but the config implies {tuple(shape)}; "
                             "does config.json belong to these weights?")

    return _import_gen(_table_groups(table), fused, shapes, read, check, get)


def check_float(name: str, t: torch.Tensor) -> None:
    """Every weight, norm, bias and scale of these models is floating point: an integer (or bool, complex)
    tensor would be cast silently by copy_, so it is an error naming the tensor."""
    if not t.is_floating_point():
        raise ValueError(f"{name} is stored as {t.dtype}, but it is a floating-point weight; the checkpoint is "
                         "damaged or was written by another program (export it again in fp32/bf16/fp16)")


def _table_groups(table: list[_Entry]) -> dict[str, list[_Entry]]:
    groups: dict[str, list[_Entry]] = OrderedDict()
    for e in table:
        if e.kind == "param":
            groups.setdefault(e.ours, []).append(e)
    return groups


def _import_gen(groups, fused, shapes, read, check, get):
    for ours, entries in groups.items():
        shape = shapes[ours]
        if entries[0].expert is None:
            t = read(entries[0].hf, entries[0].rope)
            check(entries[0].hf, t, shape)
            yield ours, t
            continue
        g = entries[0].group
        if g in fused:
            name = g + ("down_proj" if ours.endswith("w2") else "gate_up_proj")
            t = get(name)
            if t.dtype in FP8_DTYPES:
                raise ValueError(f"{name}: FP8 is supported for per-expert tensors only, not the fused layout")
            if not ours.endswith("w2"):
                check(name, t, (shape[0], 2 * shape[1], shape[2]))
                t = t[:, : shape[1]] if ours.endswith("w1") else t[:, shape[1]:]
            check(name, t, shape)
            yield ours, t.contiguous()
            continue
        out = None
        for e in entries:
            t = read(e.hf, e.rope)
            check(e.hf, t, shape[1:])
            if out is None:
                out = torch.empty(shape, dtype=t.dtype)
            out[e.expert] = t
        yield ours, out


def iter_to_hf(cfg: ModelConfig, get: Getter, rope_interleave: bool = True
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) for every tensor of the HF checkpoint, from our tensors fetched with get(key) or
    get(key, expert_index); MTP copies of the embedding and head included (V3 weights format)."""
    arch = _export_arch(cfg)
    permute = _hf_rope_interleaved(arch, None, rope_interleave) != _ours_interleaved(cfg)
    for e in _table(cfg, arch):
        if e.kind == "zeros":
            yield e.hf, torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
            continue
        key = "embed.weight" if cfg.tie_embeddings and e.ours == "head.weight" else e.ours
        t = get(key) if e.expert is None else get(key, e.expert)
        if permute and e.rope:
            t = _permute_rope(t, e.rope, cfg, to_interleaved=False)
        yield e.hf, t


def _state_getter(sd: dict[str, torch.Tensor]) -> Getter:
    def get(key, index=None):
        t = sd[key]
        return t if index is None else t[index]
    return get


def to_hf_state_dict(net, rope_interleave: bool = True) -> dict[str, torch.Tensor]:
    """Our model's tensors under HF on-disk names (per-expert tensors; views, not copies, where possible)."""
    cfg = net.cfg
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    used = {e.ours for e in _table(cfg, _export_arch(cfg)) if e.ours}
    extra = set(sd) - used - ({"head.weight"} if cfg.tie_embeddings else set())
    if extra:
        raise ValueError(f"model tensors with no HF name: {sorted(extra, key=_natural)[:5]} ({len(extra)} in all)")
    return dict(iter_to_hf(cfg, _state_getter(sd), rope_interleave))


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], hf_config: dict | None = None
                       ) -> dict[str, torch.Tensor]:
    """Our state_dict from HF-named tensors (per-expert or fused experts, FP8 + scale_inv accepted).

    hf_config (the config.json dict) tells the architecture, the rope layout (DeepseekV3 rope_interleave)
    and the FP8 block size; without it the checkpoint is taken to be in the layout `config_to_hf(cfg)` writes.
    """
    out = dict(iter_from_hf(cfg, sd.keys(), _state_getter(sd), hf_config))
    if cfg.tie_embeddings:
        out["head.weight"] = out["embed.weight"]
    return out


# =============================================================================================
# files
# =============================================================================================
def read_hf_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; a Hugging Face checkpoint directory holds config.json "
                                "plus model.safetensors or model.safetensors.index.json and its shards")
    try:
        d = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        _check_field_types(d, str(cfg_file))
    return d


def mtp_present(n_layers: int, keys: Iterable[str]) -> int:
    """How many consecutive MTP layers (model.layers.{n_layers + k}.*) a checkpoint holds."""
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    k = 0
    while n_layers + k in layers:
        k += 1
    return k


def _trim_mtp(cfg: ModelConfig, keys: Iterable[str]) -> ModelConfig:
    present = mtp_present(cfg.n_layers, keys)
    if present < cfg.n_mtp:
        # transformers writes num_nextn_predict_layers (default 1) without MTP weights
        warnings.warn(f"config.json declares {cfg.n_mtp} MTP module(s) but the checkpoint holds {present} "
                      f"(model.layers.{cfg.n_layers}.* onwards); loading {present}", stacklevel=3)
        cfg = dataclasses.replace(cfg, n_mtp=present)
    return cfg


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device):
    """An uninitialised Transformer on `device`: parameters in dtype; routing bias, load counters and
    rotary frequencies fp32 (FP32Buffers) and initialised."""
    from .transformer import Transformer

    with torch.device("meta"):
        net = Transformer(cfg)
    net = net.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:
        net.head.weight = net.embed.weight
    net.init_buffers()
    return net


def load_hf(path, dtype=torch.float32, device="cpu"):
    """A Hugging Face checkpoint directory (config.json + model.safetensors or a sharded index; FP8 weights
    dequantized) as an eval-mode Transformer, filled one tensor at a time."""
    path = Path(path)
    d = read_hf_config(path)
    cfg = config_from_hf(d, str(path / "config.json"))
    dtype = as_dtype(dtype) or torch.float32
    with SafetensorsDir(path) as reader:
        keys = reader.keys()
        cfg = _trim_mtp(cfg, keys)
        tensors = iter_from_hf(cfg, keys, reader.get, d)  # checks the names before the model is allocated
        net = _empty_model(cfg, dtype, device)
        dest = net.state_dict()
        with torch.no_grad():
            for key, t in tensors:
                dest[key].copy_(t)
    return net.eval()


def save_hf(net, path, max_shard_bytes: int = 5 * 2**30, dtype=None, overwrite: bool = False,
            rope_interleave: bool = True) -> Path:
    """Write `net` as a Hugging Face checkpoint: config.json, model.safetensors or shards + index, atomically.

    dtype (None: as in the model) applies to every floating tensor except the fp32 routing bias
    (e_score_correction_bias). rope_interleave=False writes a DeepseekV3 with rotate_half rope rows.
    """
    cfg = net.cfg
    dtype = as_dtype(dtype)
    hf_cfg = config_to_hf(cfg, rope_interleave)
    tensors = to_hf_state_dict(net, rope_interleave)
    with atomic_dir(path, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for k, t in tensors.items():
            writer.add(k, cast_for_export(k, t, dtype))
        writer.close()
        written = dtype or net.embed.weight.dtype
        hf_cfg["dtype"] = str(written).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return Path(path)


def cast_for_export(key: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not t.is_floating_point() or key.endswith(("e_score_correction_bias", "gate.bias")):
        return t
    return t.to(dtype)
