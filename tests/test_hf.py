"""Hugging Face interop (model/hf.py, model/convert.py) against transformers on tiny random checkpoints.

Every case randomises every parameter and buffer of a transformers model (norm weights and the V3
e_score_correction_bias included), saves it with save_pretrained, loads it with `load_hf` and compares
fp32 logits with transformers' eager attention; then `save_hf` writes ours back and transformers reloads it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from model import build_model, load_hf, preset, preset_names  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.convert import load_native, main as convert_main, native_to_hf  # noqa: E402
from parallel.fp8 import dequantize, quantize  # noqa: E402
from model.hf import (config_from_hf, config_to_hf, dequantize_fp8, from_hf_state_dict, save_hf,  # noqa: E402
                      to_hf_state_dict)

TOL = dict(rtol=1e-4, atol=1e-4)
BATCH, SEQ = 2, 24
YARN_V3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
_MLA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256)
_GQA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

# name -> (transformers class name, config kwargs, save_pretrained max_shard_size)
CASES = {
    # query compression, 4 groups / top-2 groups, YaRN, sigmoid + bias, 1 shared expert, 1 dense layer, sharded
    "v3": ("DeepseekV3", dict(_MLA, num_hidden_layers=3, q_lora_rank=32, n_shared_experts=1, n_group=4, topk_group=2,
                              first_k_dense_replace=1, routed_scaling_factor=2.5, rope_parameters=YARN_V3), "60KB"),
    # no query compression, rope rows in rotate_half order, 2 shared experts, every layer MoE, no YaRN
    "v3-half-rope": ("DeepseekV3", dict(_MLA, num_hidden_layers=2, q_lora_rank=None, n_shared_experts=2, n_group=2,
                                        topk_group=1, first_k_dense_replace=0, rope_interleave=False,
                                        norm_topk_prob=False, routed_scaling_factor=1.5), None),
    # no query compression, softmax group-limited routing, YaRN mscale 0.707, 2 shared; config.json is then
    # rewritten in DeepSeek's remote-code form (rope_scaling, scoring_func, aux_loss_alpha, ...)
    "v2-lite": ("DeepseekV2", dict(_MLA, num_hidden_layers=3, q_lora_rank=None, n_shared_experts=2,
                                   topk_method="group_limited_greedy", n_group=4, topk_group=2, first_k_dense_replace=1,
                                   rope_parameters=dict(YARN_V3, mscale=0.707, mscale_all_dim=0.707)), None),
    # query compression, greedy softmax routing scaled by 16, 1 shared expert
    "v2": ("DeepseekV2", dict(_MLA, num_hidden_layers=2, q_lora_rank=32, n_shared_experts=1, topk_method="greedy",
                              first_k_dense_replace=1, routed_scaling_factor=16.0), None),
    # GQA 4/2 heads, QKV bias, tied embeddings
    "qwen2": ("Qwen2", dict(_GQA, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 1e6}), None),
    # GQA 4/2 heads with head_dim 32 != hidden/heads, YaRN on rotate_half rope
    "llama": ("Llama", dict(_GQA, head_dim=32, rms_norm_eps=1e-5,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                                             "original_max_position_embeddings": 64}), None),
}


def _hf_classes(prefix):
    return getattr(transformers, prefix + "Config"), getattr(transformers, prefix + "ForCausalLM")


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and persistent buffer random, at scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "inv_freq" in name:
            continue
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            t.copy_(1 + 0.3 * r)
        elif name.endswith("e_score_correction_bias"):
            t.copy_(0.05 * r)
        elif name.endswith("embed_tokens.weight"):
            t.copy_(r)
        elif t.dim() >= 2:
            t.copy_(r * t.shape[-1] ** -0.5)
        else:  # q/k/v biases
            t.copy_(0.3 * r)


def hf_logits(path, tokens, **kw):
    cls = getattr(transformers, json.loads((path / "config.json").read_text())["architectures"][0])
    m = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32, **kw)
    info = None
    if kw.get("output_loading_info"):
        m, info = m
    with torch.no_grad():
        out = m.eval()(tokens).logits
    return (out, info) if info is not None else out


def our_logits(net, tokens):
    with torch.no_grad():
        return net(tokens)


def legacy_config(path):
    """Rewrite a transformers-5 config.json the way DeepSeek's remote-code checkpoints spell it."""
    d = json.loads((path / "config.json").read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    d["rope_scaling"] = rope
    d.update(scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, moe_layer_freq=1, ep_size=1)
    (path / "config.json").write_text(json.dumps(d, indent=2))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory, tokens):
    """(name, checkpoint dir, transformers' logits on it)."""
    name = request.param
    prefix, kw, shard = CASES[name]
    config_cls, model_cls = _hf_classes(prefix)
    torch.manual_seed(0)
    model = model_cls(config_cls(**kw))
    randomize(model, seed=list(CASES).index(name))
    path = tmp_path_factory.mktemp(name.replace("-", "_"))
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    if name == "v2-lite":
        legacy_config(path)
    ref = hf_logits(path, tokens)
    assert ref.std() > 0.5, "logits too small for the tolerance to mean anything"
    return name, path, ref


@pytest.fixture(scope="module")
def loaded(hf_case):
    name, path, ref = hf_case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # V3: config.json declares an MTP module that save_pretrained omits
        return load_hf(path)


def test_import_matches_transformers(hf_case, loaded, tokens):
    name, path, ref = hf_case
    if name == "v3":
        assert (path / "model.safetensors.index.json").is_file(), "the v3 case must exercise a sharded index"
    assert not loaded.training
    torch.testing.assert_close(our_logits(loaded, tokens), ref, **TOL)


def test_import_config(hf_case, loaded):
    name, path, _ = hf_case
    cfg = loaded.cfg
    if name == "v3":
        assert (cfg.score_func, cfg.aux_free_bias, cfg.norm_topk_prob) == ("sigmoid", True, True)
        assert (cfg.n_expert_groups, cfg.n_limited_groups, cfg.n_dense_layers, cfg.q_lora_rank) == (4, 2, 1, 32)
        assert cfg.rope_factor == 4.0 and cfg.n_mtp == 0
        bias = loaded.layers["1"].ffn.gate.bias
        assert bias.dtype == torch.float32 and bias.abs().sum() > 0
    elif name == "v2-lite":
        assert (cfg.score_func, cfg.aux_free_bias, cfg.q_lora_rank, cfg.n_shared_experts) == ("softmax", False, 0, 2)
        assert (cfg.n_expert_groups, cfg.n_limited_groups) == (4, 2)
        assert (cfg.balance_alpha_expert, cfg.mscale, cfg.mscale_all_dim) == (0.001, 0.707, 0.707)
    elif name == "v2":
        assert (cfg.n_expert_groups, cfg.route_scale) == (1, 16.0)
    elif name == "qwen2":
        assert cfg.qkv_bias and cfg.tie_embeddings and cfg.kv_heads == 2 and not cfg.rope_interleave
        assert loaded.head.weight is loaded.embed.weight
    elif name == "llama":
        assert (cfg.attention, cfg.kv_heads, cfg.gqa_head_dim, cfg.norm_eps) == ("gqa", 2, 32, 1e-5)


def test_export_reimports_in_transformers(hf_case, loaded, tokens, tmp_path):
    name, _, ref = hf_case
    out = tmp_path / "export"
    save_hf(loaded, out, max_shard_bytes=150_000 if name == "v2-lite" else 5 * 2**30)
    sharded = (out / "model.safetensors.index.json").is_file()
    assert sharded == (name == "v2-lite") and (out / "model.safetensors").is_file() != sharded
    logits, info = hf_logits(out, tokens, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(logits, ref, **TOL)
    # hub layout: one tensor per routed expert
    d = json.loads((out / "config.json").read_text())
    if loaded.cfg.is_moe:
        n = loaded.cfg.n_dense_layers
        files = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] if sharded else None
        keys = set(files) if sharded else set(safe_open(out / "model.safetensors", "pt").keys())
        assert f"model.layers.{n}.mlp.experts.7.down_proj.weight" in keys
        assert not any("gate_up_proj" in k for k in keys)
    # the exported config reads back to the same ModelConfig
    assert config_from_hf(d) == loaded.cfg


def test_state_dict_roundtrip(loaded):
    sd = {k: v.clone() for k, v in loaded.state_dict().items()}
    hf = to_hf_state_dict(loaded)
    back = from_hf_state_dict(loaded.cfg, hf)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


# --------------------------------------------------------------------------------------------
# layouts: fused experts on disk, rotate_half export, GQA models with interleaved rope
# --------------------------------------------------------------------------------------------
def test_fused_expert_layout_on_disk(tmp_path, tokens):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2I, D], experts.down_proj) written as is."""
    config_cls, model_cls = _hf_classes("DeepseekV3")
    m = model_cls(config_cls(**dict(CASES["v3"][1], num_mtp_layers=0)))
    randomize(m, seed=5)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    m.config.save_pretrained(tmp_path)
    assert "model.layers.1.mlp.experts.gate_up_proj" in load_file(tmp_path / "model.safetensors")
    with torch.no_grad():
        ref = m.eval()(tokens).logits
    torch.testing.assert_close(our_logits(load_hf(tmp_path), tokens), ref, **TOL)


def test_v3_export_with_half_rope(tmp_path, tokens):
    cfg = preset("tiny-deepseek-v3", n_mtp=0)
    net = build_model(cfg, seed=3).eval()
    with torch.no_grad():
        for m in net.moe_layers():
            m.gate.bias.normal_(0, 0.05)
    save_hf(net, tmp_path / "half", rope_interleave=False)
    assert json.loads((tmp_path / "half" / "config.json").read_text())["rope_interleave"] is False
    ours = our_logits(net, tokens)
    torch.testing.assert_close(hf_logits(tmp_path / "half", tokens), ours, **TOL)
    back = load_hf(tmp_path / "half")  # rows permuted back to interleaved order
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_gqa_with_interleaved_rope_exports_as_half(tmp_path, tokens):
    """A GQA model that rotates interleaved pairs is written with q/k rows in rotate_half order."""
    cfg = preset("tiny-llama-3-8b", rope_interleave=True, qkv_bias=True, head_dim=32)
    net = build_model(cfg, seed=4).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))  # non-zero biases and norms
    save_hf(net, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    torch.testing.assert_close(hf_logits(tmp_path / "q", tokens), our_logits(net, tokens), **TOL)


# --------------------------------------------------------------------------------------------
# MTP (deepseek-v3-weights-format.md: layer num_hidden_layers + k)
# --------------------------------------------------------------------------------------------
def _mtp_tensors(src: dict[str, torch.Tensor], n: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """A random MTP layer n: a copy of layer n-1's decoder tensors with fresh values, plus the MTP extras."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in src.items():
        if k.startswith(f"model.layers.{n - 1}."):
            r = torch.randn(v.shape, generator=g)
            out[k.replace(f"layers.{n - 1}.", f"layers.{n}.")] = (
                1 + 0.3 * r if k.endswith("norm.weight") else 0.05 * r if "e_score" in k
                else r * v.shape[-1] ** -0.5)
    h = f"model.layers.{n}."
    out.update({h + "enorm.weight": 1 + 0.3 * torch.randn(dim, generator=g),
                h + "hnorm.weight": 1 + 0.3 * torch.randn(dim, generator=g),
                h + "eh_proj.weight": torch.randn(dim, 2 * dim, generator=g) / (2 * dim) ** 0.5,
                h + "shared_head.norm.weight": 1 + 0.3 * torch.randn(dim, generator=g),
                h + "shared_head.head.weight": src["lm_head.weight"].clone(),
                h + "embed_tokens.weight": src["model.embed_tokens.weight"].clone()})
    return out


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory, tokens):
    """The v3 case plus an MTP layer model.layers.3.* in a shard of its own (num_nextn_predict_layers=1)."""
    config_cls, model_cls = _hf_classes("DeepseekV3")
    m = model_cls(config_cls(**CASES["v3"][1]))
    randomize(m, seed=11)
    path = tmp_path_factory.mktemp("v3_mtp")
    m.save_pretrained(path, max_shard_size="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    src = {}
    for f in sorted(set(index["weight_map"].values())):
        src.update(load_file(path / f))
    mtp = _mtp_tensors(src, 3, 64, seed=12)
    save_file(mtp, path / "model-mtp.safetensors", metadata={"format": "pt"})
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    d = json.loads((path / "config.json").read_text())
    assert d["num_nextn_predict_layers"] == 1
    with torch.no_grad():
        ref = m.eval()(tokens).logits
    return path, mtp, ref


def test_mtp_roundtrip(mtp_checkpoint, tokens, tmp_path):
    path, mtp, ref = mtp_checkpoint
    net = load_hf(path)
    assert net.cfg.n_mtp == 1
    torch.testing.assert_close(our_logits(net, tokens), ref, **TOL)  # MTP tensors do not disturb the main model
    k = net.mtp[0]
    h = "model.layers.3."
    for ours, theirs in [(k.enorm.weight, "enorm.weight"), (k.hnorm.weight, "hnorm.weight"),
                         (k.eh_proj.weight, "eh_proj.weight"), (k.norm.weight, "shared_head.norm.weight"),
                         (k.block.attn.wq_a.weight, "self_attn.q_a_proj.weight"),
                         (k.block.attn.wkv_a.weight, "self_attn.kv_a_proj_with_mqa.weight"),
                         (k.block.attn_norm.weight, "input_layernorm.weight"),
                         (k.block.ffn.gate.bias, "mlp.gate.e_score_correction_bias"),
                         (k.block.ffn.experts.w1[5], "mlp.experts.5.gate_proj.weight"),
                         (k.block.ffn.experts.w3[5], "mlp.experts.5.up_proj.weight"),
                         (k.block.ffn.experts.w2[5], "mlp.experts.5.down_proj.weight"),
                         (k.block.ffn.shared_experts.w2.weight, "mlp.shared_experts.down_proj.weight")]:
        assert torch.equal(ours, mtp[h + theirs]), theirs
    loss = net.loss(tokens, tokens)
    assert torch.isfinite(loss["mtp_loss"])

    out = tmp_path / "export"
    save_hf(net, out, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    written = {}
    for f in sorted(set(index.values())):
        written.update({k: v for k, v in load_file(out / f).items() if k.startswith(h)})
    assert written.keys() == mtp.keys()
    for key, v in mtp.items():
        assert torch.equal(written[key], v), key
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    torch.testing.assert_close(hf_logits(out, tokens), ref, **TOL)  # transformers skips layer 3


def test_mtp_module_matches_transformers(mtp_checkpoint, tokens, monkeypatch):
    """Our imported MTP module against transformers' generic MtpModel (used by generate(use_mtp=True))."""
    from transformers import modeling_layers as layers  # MtpModel: transformers >= 5.23 (pyproject's test extra)
    path = mtp_checkpoint[0]
    cls = transformers.DeepseekV3ForCausalLM
    # transformers finds the MTP tensors through this pattern, written for the 61-layer release
    monkeypatch.setattr(cls, "_keys_to_ignore_on_load_unexpected", [r"model\.layers\.3.*"])
    main = cls.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    mtp = layers.MtpModel.from_pretrained(main).eval()
    net = load_hf(path)
    k = net.mtp[0]
    with torch.no_grad():
        # h^0 is the main model's final-normed output, in transformers' generation as in our training loss
        h = main.model(tokens).last_hidden_state[:, :-1]
        torch.testing.assert_close(net.norm(net.hidden(tokens))[:, :-1], h, **TOL)
        pos = torch.arange(1, SEQ)[None].expand(BATCH, -1)  # RoPE is relative: a shift by one changes nothing
        theirs = mtp._project_to_logits(mtp.forward_layer(0, h, pos, None, input_ids=tokens[:, 1:]))
        ours = net.head(k(h, net.embed(tokens[:, 1:]), net.rope(torch.arange(SEQ - 1))))
    assert theirs.std() > 0.5
    torch.testing.assert_close(ours, theirs, **TOL)


def test_load_bf16(mtp_checkpoint):
    net = load_hf(mtp_checkpoint[0], dtype="bf16")
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert net.layers["1"].ffn.gate.bias.dtype == torch.float32  # e_score_correction_bias stays fp32
    assert net.mtp[0].block.ffn.gate.bias.dtype == torch.float32
    assert net.rope.inv_freq.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# FP8 (deepseek-v3-weights-format.md): e4m3 weights with a scale per 2-D block
# --------------------------------------------------------------------------------------------
def quantize_fp8(w: torch.Tensor, block: tuple[int, int]):
    return quantize(w, block)   # the training recipe's quantizer (parallel/fp8.py) writes V3's format


def expand_scale(scale_inv, shape, block):
    return scale_inv.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def test_dequantize_fp8_partial_blocks():
    w = torch.randn(200, 300)
    q, s = quantize_fp8(w, (128, 128))
    assert s.shape == (2, 3)
    deq = dequantize_fp8(q, s, (128, 128))
    for i in range(2):
        for j in range(3):
            blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            assert torch.equal(deq[blk], q[blk].float() * s[i, j])
    with pytest.raises(ValueError, match=r"needs \(2, 3\)"):
        dequantize_fp8(q, s[:, :2], (128, 128))


@pytest.mark.parametrize("shape, block", [((256, 384), (128, 128)), ((200, 300), (128, 128)), ((40, 64), (32, 32))])
def test_dequantize_fp8_equals_the_training_recipe(shape, block):
    # model/ dequantizes checkpoints without importing parallel/: it must equal parallel.fp8's bit for bit
    g = torch.Generator().manual_seed(0)
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[1])   # magnitudes differing per block
    q, s = quantize_fp8(w, block)
    assert torch.equal(dequantize_fp8(q, s, block), dequantize(q, s, block))
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):                  # any codes, any scales
        q = (torch.randn(shape, generator=g) * 64).to(dt)
        s = torch.rand(grid, generator=g) * 10 ** torch.randint(-6, 3, grid, generator=g).float()
        assert torch.equal(dequantize_fp8(q, s, block), dequantize(q, s, block))


def _is_quantized(key: str, t: torch.Tensor) -> bool:
    # as DeepSeek-V3's release: linear weights in FP8; embedding, head, router, norms, biases high precision
    return t.dim() == 2 and not key.endswith(("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight",
                                              "mlp.gate.weight"))


def test_fp8_import(mtp_checkpoint, tmp_path, tokens):
    path = mtp_checkpoint[0]
    block = (32, 32)  # kv_a_proj_with_mqa (40 x 64) leaves a partial row of blocks
    index = json.loads((path / "model.safetensors.index.json").read_text())
    src = {}
    for f in sorted(set(index["weight_map"].values())):
        src.update(load_file(path / f))
    # Routing bias 2 apart per expert: every token picks the same experts, so rounding cannot flip a top-k
    # choice and the logits move smoothly with the weights (selection itself is tested above).
    for k in src:
        if k.endswith("e_score_correction_bias"):
            src[k] = 2.0 * torch.arange(src[k].numel(), dtype=torch.float32)
    d = json.loads((path / "config.json").read_text())
    (tmp_path / "orig").mkdir()
    save_file(src, tmp_path / "orig" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "orig" / "config.json").write_text(json.dumps(d))
    ref = hf_logits(tmp_path / "orig", tokens)
    fp8, deq = {}, {}
    for k, v in src.items():
        if _is_quantized(k, v):
            q, s = quantize_fp8(v, block)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            deq[k] = q.float() * expand_scale(s, v.shape, block)
            # e4m3 keeps 3 mantissa bits: rounding error <= 2^-4 relative for normals, and <= half the
            # subnormal spacing (2^-10) times the block scale below the normal range
            bound = torch.maximum(v.abs() * 2**-4, expand_scale(s, v.shape, block) * 2**-10)
            assert ((deq[k] - v).abs() <= bound * (1 + 1e-6)).all(), k
        else:
            fp8[k] = deq[k] = v
    assert any(s.shape == (2, 2) for k, s in fp8.items() if k.endswith("kv_a_proj_with_mqa.weight_scale_inv"))
    (tmp_path / "fp8").mkdir()
    save_file(fp8, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(dict(d, quantization_config={
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)})))
    net = load_hf(tmp_path / "fp8")
    assert net.cfg.n_mtp == 1

    # the import is exact: our tensors are the dequantized ones, bit for bit
    for k, v in to_hf_state_dict(net).items():
        assert torch.equal(v, deq[k]), k
    # and the model computes what transformers computes with the dequantized weights
    (tmp_path / "deq").mkdir()
    save_file({k: v for k, v in deq.items() if not k.startswith("model.layers.3.")},
              tmp_path / "deq" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "deq" / "config.json").write_text(json.dumps(dict(d, num_nextn_predict_layers=0)))
    ours = our_logits(net, tokens)
    torch.testing.assert_close(ours, hf_logits(tmp_path / "deq", tokens), **TOL)

    # Against the unquantized model. FP8 rounding moves each quantized weight by <= 2^-4 relative (~2.6% RMS
    # here), and how far that moves the logits depends on the network's sensitivity, which for these random
    # O(1)-logit models is high (~10% logit error). So measure the sensitivity: round the same weights to bf16
    # instead (2^-8 relative, ~16x finer) and extrapolate linearly by the ratio of the weight errors. With
    # routing choices fixed (above) the response is smooth: over six seeds measured/predicted was 0.94-1.03.
    # Allow a factor 2 either way; the lower bound also checks that quantization did act.
    def rel_err(a, b):
        return ((a - b).norm() / b.norm()).item()

    w_fp8 = sum(rel_err(deq[k], v) for k, v in src.items() if _is_quantized(k, v))
    bf16 = {k: v.bfloat16().float() if _is_quantized(k, v) else v for k, v in src.items()}
    w_bf16 = sum(rel_err(bf16[k], v) for k, v in src.items() if _is_quantized(k, v))
    net.load_state_dict(from_hf_state_dict(net.cfg, bf16, d))
    predicted = rel_err(our_logits(net, tokens), ref) * w_fp8 / w_bf16
    measured = rel_err(ours, ref)
    assert 0.5 * predicted < measured < 2 * predicted, (measured, predicted)

    # the CLI dequantizes too
    assert convert_main(["hf-to-native", str(tmp_path / "fp8"), str(tmp_path / "native"), "--dtype", "fp32"]) == 0
    native = load_native(tmp_path / "native")
    for k, v in load_hf(tmp_path / "fp8").state_dict().items():
        assert torch.equal(native.state_dict()[k], v), k


def test_fp8_missing_scale(tmp_path):
    cfg = preset("tiny-llama-3-8b")
    sd = to_hf_state_dict(build_model(cfg))
    sd = {k: v.clone() for k, v in sd.items()}
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"up_proj.weight is stored as torch.float8_e4m3fn but .*_scale_inv"):
        from_hf_state_dict(cfg, sd)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def test_cli_roundtrip(tmp_path, tokens):
    config_cls, model_cls = _hf_classes("DeepseekV2")
    m = model_cls(config_cls(**CASES["v2-lite"][1]))
    randomize(m, seed=21)
    m.save_pretrained(tmp_path / "hf")
    ref = hf_logits(tmp_path / "hf", tokens)
    assert convert_main(["hf-to-native", str(tmp_path / "hf"), str(tmp_path / "native"), "--max-shard-gb",
                         str(200_000 / 2**30)]) == 0
    assert (tmp_path / "native" / "model.safetensors.index.json").is_file()
    cfg = json.loads((tmp_path / "native" / "whaletron_config.json").read_text())
    assert ModelConfig.from_dict(cfg).n_expert_groups == 4
    assert "layers.1.ffn.experts.w1" in json.loads(
        (tmp_path / "native" / "model.safetensors.index.json").read_text())["weight_map"]
    torch.testing.assert_close(our_logits(load_native(tmp_path / "native"), tokens), ref, **TOL)
    assert convert_main(["native-to-hf", str(tmp_path / "native"), str(tmp_path / "back")]) == 0
    torch.testing.assert_close(hf_logits(tmp_path / "back", tokens), ref, **TOL)
    # bf16: smaller files, same architecture
    assert convert_main(["native-to-hf", str(tmp_path / "native"), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    d = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert d["dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert_main(["--help"])
    assert e.value.code == 0 and "hf-to-native" in capsys.readouterr().out
    assert convert_main(["hf-to-native", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert convert_main(["hf-to-native", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert convert_main(["native-to-hf", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "whaletron_config.json" in capsys.readouterr().err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                                "model_type": "gpt2"}))
    assert convert_main(["hf-to-native", str(tmp_path / "gpt2"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture ['GPT2LMHeadModel']" in err and "DeepseekV3ForCausalLM" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------
def _small_hf_dir(path):
    net = build_model(preset("tiny-qwen2.5-1.5b"), seed=7)
    save_hf(net, path)
    return net


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_hf(tmp_path / "missing")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_hf(tmp_path / "noconfig")
    _small_hf_dir(tmp_path / "ok")
    shutil.copytree(tmp_path / "ok", tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf(tmp_path / "noweights")

    sd = load_file(tmp_path / "ok" / "model.safetensors")
    (tmp_path / "bad").mkdir()
    shutil.copy(tmp_path / "ok" / "config.json", tmp_path / "bad")
    broken = dict(sd)
    del broken["model.layers.1.self_attn.k_proj.bias"]
    broken["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(broken, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 missing tensor\(s\): model.layers.1.self_attn.k_proj.bias; "
                                         r"1 unexpected tensor\(s\): model.layers.1.self_attn.extra.weight"):
        load_hf(tmp_path / "bad")
    many = {k: v for k, v in sd.items() if not k.startswith("model.layers.1.")}
    save_file(many, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match=r"12 missing tensor\(s\): model.layers.1.\S+, .* \(\+7 more\)"):
        load_hf(tmp_path / "bad")

    d = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps(dict(d, hidden_size=32, intermediate_size=64)))
    save_file(sd, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight has shape \(256, 64\) but the config implies "
                                         r"\(256, 32\)"):
        load_hf(tmp_path / "bad")


def test_config_errors():
    base = config_to_hf(preset("tiny-llama-3-8b"))
    with pytest.raises(ValueError, match=r"unsupported RoPE type 'llama3'.*'default' and 'yarn'"):
        config_from_hf(dict(base, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}))
    with pytest.raises(ValueError, match=r"unsupported RoPE type 'dynamic'"):
        config_from_hf(dict(base, rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        config_from_hf(dict(base, architectures=["MixtralForCausalLM"], model_type="mixtral"))
    v3 = config_to_hf(preset("tiny-deepseek-v3"))
    with pytest.raises(ValueError, match="moe_layer_freq=2 is not supported"):
        config_from_hf(dict(v3, moe_layer_freq=2))
    with pytest.raises(ValueError, match="scoring_func='softmax'"):
        config_from_hf(dict(v3, scoring_func="softmax"))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        config_from_hf(dict(v3, hidden_act="gelu"))
    with pytest.raises(ValueError, match="lacks 'kv_lora_rank'"):
        config_from_hf({k: v for k, v in v3.items() if k != "kv_lora_rank"})
    with pytest.raises(ValueError, match="DeepSeekMoE 16B style"):
        config_to_hf(preset("tiny-deepseek-moe-16b"))
    with pytest.raises(ValueError, match="aux-loss-free bias"):
        config_to_hf(preset("tiny-deepseek-v2", aux_free_bias=True))


def test_save_refuses_non_empty_dir(tmp_path):
    net = _small_hf_dir(tmp_path / "ok")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        save_hf(net, tmp_path / "busy")
    moe16 = build_model(preset("tiny-deepseek-moe-16b"))
    with pytest.raises(ValueError, match="no transformers"):
        save_hf(moe16, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "precious"
    save_hf(net, tmp_path / "busy", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
# DeepSeek-V3's released config.json (remote-code form, transformers 4.46)
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_deepseek_v3_release_config():
    cfg = config_from_hf(DEEPSEEK_V3_CONFIG)
    ref = preset("deepseek-v3")
    same = ["vocab_size", "dim", "n_layers", "n_dense_layers", "inter_dim", "n_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_theta", "rope_factor", "original_seq_len",
            "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "n_routed_experts", "n_shared_experts",
            "n_activated_experts", "moe_inter_dim", "score_func", "norm_topk_prob", "route_scale", "n_expert_groups",
            "n_limited_groups", "aux_free_bias", "n_mtp", "max_seq_len", "balance_per_sequence"]
    assert {k: getattr(cfg, k) for k in same} == {k: getattr(ref, k) for k in same}
    assert cfg.balance_alpha_expert == 0.001  # aux_loss_alpha
    assert cfg.param_counts() == ref.param_counts()
    assert 670e9 < cfg.param_counts()["total"] < 672e9  # 671B (V3 weights documentation)


@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("tiny-") and "moe-16b" not in n])
def test_config_roundtrip(name):
    cfg = preset(name)
    d = config_to_hf(cfg)
    assert config_from_hf(json.loads(json.dumps(d))) == cfg
    config_cls = getattr(transformers, d["architectures"][0].replace("ForCausalLM", "Config"))
    hf = config_cls(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert hf.num_hidden_layers == cfg.n_layers


# --------------------------------------------------------------------------------------------
# untrusted checkpoint files
# --------------------------------------------------------------------------------------------
def test_index_names_files_outside_the_checkpoint(tmp_path):
    _small_hf_dir(tmp_path / "ok")
    keys = list(load_file(tmp_path / "ok" / "model.safetensors"))
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "ok" / "model.safetensors", tmp_path / "elsewhere" / "weights.safetensors")
    for entry in ("../elsewhere/weights.safetensors", str(tmp_path / "elsewhere" / "weights.safetensors")):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        bad.mkdir()
        shutil.copy(tmp_path / "ok" / "config.json", bad)
        weight_map = {k: entry for k in keys}
        (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ValueError, match=r"model.safetensors.index.json names a file outside the checkpoint "
                                             r"directory: .*" + entry.split("/")[-2]):
            load_hf(bad)
    (bad / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json has no weight_map"):
        load_hf(bad)


def test_corrupt_safetensors_names_the_file(tmp_path, capsys):
    _small_hf_dir(tmp_path / "ok")
    good = (tmp_path / "ok" / "model.safetensors").read_bytes()
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    for what, content in (("truncated", good[: len(good) // 2]), ("garbage", b"\xff" * 64), ("empty", b"")):
        (bad / "model.safetensors").write_bytes(content)
        with pytest.raises(ValueError, match=r"bad/model.safetensors is not a readable safetensors file") as e:
            load_hf(bad)
        assert "\n" not in str(e.value), what
    assert convert_main(["hf-to-native", str(bad), str(tmp_path / "out")]) == 2
    assert "model.safetensors is not a readable safetensors file" in capsys.readouterr().err
    # a shard that is damaged is named when it is opened (lazily, in a sharded checkpoint)
    net = build_model(preset("tiny-qwen2.5-1.5b"), seed=7)
    save_hf(net, tmp_path / "sharded", max_shard_bytes=100_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].write_bytes(shards[1].read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{shards[1].name} is not a readable safetensors file"):
        load_hf(tmp_path / "sharded")


def test_config_json_types(tmp_path):
    _small_hf_dir(tmp_path / "ok")
    d = json.loads((tmp_path / "ok" / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    for text in ("[1, 2]", '"a string"', "null"):
        (bad / "config.json").write_text(text)
        with pytest.raises(ValueError, match=r"bad/config.json holds .*, not a JSON object"):
            load_hf(bad)
    for key, value, kind in (("hidden_size", "sixty-four", "an integer"), ("hidden_size", "64", "an integer"),
                             ("hidden_size", 64.5, "an integer"), ("num_hidden_layers", True, "an integer"),
                             ("vocab_size", [256], "an integer"), ("rms_norm_eps", "1e-6", "a number"),
                             ("max_position_embeddings", float("inf"), "an integer"),
                             ("tie_word_embeddings", "false", "true or false")):
        (bad / "config.json").write_text(json.dumps(dict(d, **{key: value})))
        with pytest.raises(ValueError, match=rf"bad/config.json: {key}=.* is not {kind}") as e:
            load_hf(bad)
        assert "\n" not in str(e.value)
    (bad / "config.json").write_text(json.dumps(dict(d, rope_parameters={"rope_type": "default",
                                                                         "rope_theta": "1e6"})))
    with pytest.raises(ValueError, match=r"config.json: rope_parameters.rope_theta='1e6' is not a number"):
        load_hf(bad)
    assert config_from_hf(dict(d, hidden_size=64.0)) == config_from_hf(d)  # integral floats are integers
    with pytest.raises(ValueError, match=r"config.json: hidden_size='64' is not an integer"):
        config_from_hf(dict(d, hidden_size="64"))
    with pytest.raises(ValueError, match=r"config.json: whaletron.topk_devices='2' is not an integer"):
        config_from_hf(dict(d, whaletron=dict(d["whaletron"], topk_devices="2")))
    with pytest.raises(ValueError, match=r"quantization_config.weight_block_size=\[128\] is not a list of two"):
        config_from_hf(dict(d, quantization_config={"quant_method": "fp8", "weight_block_size": [128]}))


def test_integer_tensor_where_a_float_weight_belongs(tmp_path):
    _small_hf_dir(tmp_path / "ok")
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.int32)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight is stored as torch.int32"):
        load_hf(bad)
    # native checkpoints too
    assert convert_main(["hf-to-native", str(tmp_path / "ok"), str(tmp_path / "native")]) == 0
    sd = load_file(tmp_path / "native" / "model.safetensors")
    sd["layers.0.ffn.w3.weight"] = sd["layers.0.ffn.w3.weight"].to(torch.int16)
    save_file(sd, tmp_path / "native" / "model.safetensors")
    for load in (load_native, lambda p: native_to_hf(p, tmp_path / "back")):
        with pytest.raises(ValueError, match=r"layers.0.ffn.w3.weight is stored as torch.int16"):
            load(tmp_path / "native")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exports_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        net = _small_hf_dir(tmp_path / "hf")
        save_hf(net, tmp_path / "sharded", max_shard_bytes=100_000)
        assert convert_main(["hf-to-native", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    finally:
        os.umask(old)
    for d in ("hf", "sharded", "native"):
        assert (tmp_path / d).stat().st_mode & 0o777 == 0o777 & ~umask, d
        files = list((tmp_path / d).iterdir())
        assert len(files) >= 2 and {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~umask}, d
