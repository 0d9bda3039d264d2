"""model/: presets and parameter counts, components against their formulas, and the MLA cache."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer, build_model, preset, preset_names
from model.layers import RotaryEmbedding, apply_rope, softmax_scale, yarn_inv_freq
from model.moe import MoE, grouped_mm

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"


# -- presets ---------------------------------------------------------------------------------

# (total, active) from the papers; V3 main model without MTP (weights doc: +11.5B unique for MTP).
PAPER = {
    "deepseek-v3": (671e9, 37e9),
    "deepseek-v2": (236e9, 21e9),
    "deepseek-v2-lite": (15.7e9, 2.4e9),
    "deepseek-moe-16b": (16.4e9, 2.8e9),
    "deepseek-llm-7b": (6.9e9, 6.9e9),     # V2 report Table 7 (DeepSeek 7B dense)
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_param_counts_match_papers(name):
    cfg = preset(name)
    counts = cfg.param_counts()
    total, active = PAPER[name]
    assert abs(counts["total"] / total - 1) < 0.01, counts
    # Our convention counts the input embedding and the output head in "active" (as the V3 weights
    # documentation). The V2 report's V2-Lite figure (2.4B) leaves the embedding lookup out; the same
    # report's DeepSeekMoE 16B and 7B figures keep it, so the convention is per source.
    ours = counts["active"] - (cfg.vocab_size * cfg.dim if name == "deepseek-v2-lite" else 0)
    assert abs(ours / active - 1) < 0.03, counts


def test_v3_mtp_adds_11_5b_unique_parameters():
    cfg = preset("deepseek-v3")
    extra = cfg.param_counts(include_mtp=True)["total"] - cfg.param_counts()["total"]
    assert abs(extra / 11.5e9 - 1) < 0.01, extra


def test_building_671b_on_meta_allocates_nothing():
    with torch.device("meta"):
        net = Transformer(preset("deepseek-v3"))
    assert all(p.is_meta for p in net.parameters())
    assert sum(p.numel() for p in net.parameters()) > 680e9  # includes the MTP module


@pytest.mark.parametrize("name,file", [("deepseek-v2-lite", "config_16B.json"), ("deepseek-v2", "config_236B.json"),
                                       ("deepseek-v3", "config_671B.json")])
def test_presets_carry_the_official_inference_configs(name, file):
    ref = json.loads((REF / "deepseek-inference-configs" / file).read_text())
    cfg = preset(name)
    names = {"dim": "dim", "inter_dim": "inter_dim", "moe_inter_dim": "moe_inter_dim", "n_layers": "n_layers",
             "n_dense_layers": "n_dense_layers", "n_heads": "n_heads", "n_routed_experts": "n_routed_experts",
             "n_shared_experts": "n_shared_experts", "n_activated_experts": "n_activated_experts",
             "route_scale": "route_scale", "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
             "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
             "v_head_dim": "v_head_dim", "vocab_size": "vocab_size", "n_expert_groups": "n_expert_groups",
             "n_limited_groups": "n_limited_groups", "score_func": "score_func", "mscale": "mscale"}
    for ref_key, ours in names.items():
        if ref_key in ref:
            assert getattr(cfg, ours) == ref[ref_key], ref_key


def test_every_preset_has_a_tiny_variant_that_runs():
    full = [n for n in preset_names() if not n.startswith("tiny-")]
    assert len(full) == 8
    for name in full:
        tiny = preset("tiny-" + name)
        big = preset(name)
        for key in ("attention", "score_func", "norm_topk_prob", "aux_free_bias", "qkv_bias", "tie_embeddings",
                    "rope_interleave"):
            assert getattr(tiny, key) == getattr(big, key), (name, key)
        assert (tiny.q_lora_rank > 0) == (big.q_lora_rank > 0) and (tiny.n_mtp > 0) == (big.n_mtp > 0)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model preset 'deepseek-v4'.*deepseek-v3"):
        preset("deepseek-v4")
    with pytest.raises(ValueError, match="unknown ModelConfig keys \\['hidden'\\]"):
        ModelConfig.from_dict({"hidden": 4})
    with pytest.raises(ValueError, match="n_kv_heads"):
        preset("tiny-llama-3-8b", n_kv_heads=3)
    with pytest.raises(ValueError, match="n_expert_groups"):
        preset("tiny-deepseek-v3", n_expert_groups=3)
    with pytest.raises(ValueError, match="dim must be <class 'int'>|dim must be int"):
        preset("tiny-deepseek-v3", dim=64.0)


# -- RoPE / YaRN -----------------------------------------------------------------------------

def test_yarn_frequencies_and_scales_match_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = preset("deepseek-v3")
    hf = DeepseekV3Config(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                           "original_max_position_embeddings": 4096}, max_position_embeddings=163840)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    torch.testing.assert_close(yarn_inv_freq(cfg), inv_freq, rtol=1e-6, atol=0)  # fp32 rounding order
    assert RotaryEmbedding(cfg).attention_factor == pytest.approx(attention_factor)
    # V3 §4.3 / reference: softmax scale = d_qk^-0.5 * (0.1 * mscale * ln(factor) + 1)^2
    assert softmax_scale(cfg, 192) == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert softmax_scale(preset("deepseek-v3", rope_factor=1.0), 192) == pytest.approx(192 ** -0.5)


def test_interleaved_and_half_rope_are_the_same_rotation_up_to_a_permutation():
    cfg = preset("tiny-deepseek-v3")
    freqs = RotaryEmbedding(cfg)(torch.arange(7))
    x = torch.randn(2, 7, 3, cfg.qk_rope_head_dim)
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])  # interleaved -> halves
    torch.testing.assert_close(apply_rope(x, freqs, True)[..., perm], apply_rope(x[..., perm], freqs, False))
    # a rotation keeps norms, and q.k depends only on the relative position
    y = apply_rope(x, freqs, True)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    shifted = apply_rope(x, RotaryEmbedding(cfg)(torch.arange(7) + 5), True)
    torch.testing.assert_close(torch.einsum("bshd,bthd->bhst", y, y), torch.einsum("bshd,bthd->bhst", shifted, shifted))
    # the rotation itself, written out: pair j turns by position * inv_freq_j
    theta = torch.arange(7.0)[:, None] * yarn_inv_freq(cfg)[None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s_ = theta.cos()[None, :, None], theta.sin()[None, :, None]
    want = torch.stack([x1 * c - x2 * s_, x1 * s_ + x2 * c], dim=-1).flatten(-2)
    torch.testing.assert_close(y, want)


# -- MoE -------------------------------------------------------------------------------------

def reference_gate(x, weight, bias, cfg):
    """DeepSeek-V3 inference/model.py Gate.forward, restated."""
    scores = x @ weight.t()
    scores = scores.softmax(-1) if cfg.score_func == "softmax" else scores.sigmoid()
    original = scores
    if bias is not None:
        scores = scores + bias
    if cfg.n_expert_groups > 1:
        scores = scores.view(x.size(0), cfg.n_expert_groups, -1)
        group = scores.amax(-1) if bias is None else scores.topk(2, dim=-1)[0].sum(-1)
        idx = group.topk(cfg.n_limited_groups, dim=-1)[1]
        mask = scores.new_ones(x.size(0), cfg.n_expert_groups, dtype=torch.bool).scatter_(1, idx, False)
        scores = scores.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = scores.topk(cfg.n_activated_experts, dim=-1)[1]
    weights = original.gather(1, indices)
    if cfg.score_func == "sigmoid":
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * cfg.route_scale, indices


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-deepseek-moe-16b"])
def test_router_matches_deepseek_reference_gate(name):
    cfg = preset(name, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    if moe.gate.bias is not None:
        moe.gate.bias.normal_(std=0.1)
    x = torch.randn(64, cfg.dim)
    w, i, _ = moe.gate(x)
    rw, ri = reference_gate(x, moe.gate.weight, moe.gate.bias, cfg)
    order, rorder = i.sort(-1), ri.sort(-1)
    assert torch.equal(order.values, rorder.values)
    torch.testing.assert_close(w.gather(1, order.indices), rw.gather(1, rorder.indices))


def test_bias_steers_selection_but_not_weights():
    cfg = preset("tiny-deepseek-v3", n_expert_groups=1, n_limited_groups=1)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(32, cfg.dim)
    moe.gate.bias[3] = 10.0  # expert 3 always selected, weight still from its unbiased score
    w, i, s = moe.gate(x)
    assert (i == 3).any(-1).all()
    sel = s.gather(1, i)
    torch.testing.assert_close(w, sel / sel.sum(-1, keepdim=True) * cfg.route_scale)


def test_aux_free_bias_update_follows_the_load():
    net = build_model(preset("tiny-deepseek-v3"))
    moe = net.moe_layers()[0]
    moe.tokens_per_expert.copy_(torch.tensor([5.0, 1, 1, 1, 1, 1, 1, 5]))  # mean 2
    net.update_expert_bias(gamma=0.01)
    expected = torch.tensor([-0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, -0.01])
    torch.testing.assert_close(moe.gate.bias, expected)
    assert moe.tokens_per_expert.sum() == 0
    net.train()
    tok = torch.randint(0, 256, (2, 16))
    assert "aux_loss" in net.loss(tok, tok)
    assert moe.tokens_per_expert.sum() == 2 * 16 * net.cfg.n_activated_experts
    net.eval()  # evaluation neither counts load nor reports stale training losses
    assert "aux_loss" not in net.loss(tok, tok)
    assert moe.tokens_per_expert.sum() == 2 * 16 * net.cfg.n_activated_experts


def _placement_of(indices, n_groups, n_experts):
    return indices // (n_experts // n_groups)


def test_device_limited_routing_uses_the_best_m_devices():
    cfg = preset("tiny-deepseek-v2", n_routed_experts=16, n_activated_experts=3, n_expert_groups=1,
                 n_limited_groups=1, topk_devices=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    x = torch.randn(256, cfg.dim)
    _, free, _ = moe.gate(x)
    moe.gate.set_placement(n_devices=8, devices_per_node=1)
    _, i, s = moe.gate(x)
    dev = _placement_of(i, 8, 16)
    assert max(len(set(r.tolist())) for r in dev) <= 2
    assert max(len(set(r.tolist())) for r in _placement_of(free, 8, 16)) > 2  # the limit did something
    with pytest.raises(ValueError, match="cannot select 3 experts"):
        moe.gate.set_placement(n_devices=16, devices_per_node=1)
    best = s.view(256, 8, 2).amax(-1).topk(2, dim=-1).indices.sort(-1).values
    for r, b in zip(dev, best):
        assert set(r.tolist()) <= set(b.tolist())


def test_node_limited_routing_ranks_nodes_by_top_k_over_m_sum():
    cfg = preset("tiny-deepseek-v3", n_routed_experts=16, n_activated_experts=4, n_expert_groups=1,
                 n_limited_groups=1, topk_nodes=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    moe.gate.set_placement(n_devices=8, devices_per_node=2)  # 4 nodes of 4 experts
    x = torch.randn(256, cfg.dim)
    _, i, s = moe.gate(x)
    nodes = _placement_of(i, 4, 16)
    assert max(len(set(r.tolist())) for r in nodes) <= 2
    node_score = s.view(256, 4, 4).topk(2, dim=-1).values.sum(-1)  # K_r / M = 2 highest per node
    best = node_score.topk(2, dim=-1).indices
    for r, b in zip(nodes, best):
        assert set(r.tolist()) <= set(b.tolist())


def reference_moe(moe, x):
    """Token by token: sum_i g_i FFN_i(x) + shared(x)."""
    w, idx, _ = moe.gate(x)
    out = []
    for t in range(x.shape[0]):
        y = moe.shared_experts(x[t]) if moe.shared_experts is not None else torch.zeros_like(x[t])
        for g, e in zip(w[t], idx[t]):
            ex = moe.experts
            y = y + g * (ex.w2[e] @ (F.silu(ex.w1[e] @ x[t]) * (ex.w3[e] @ x[t])))
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("dim,inter", [(64, 32), (36, 20)])  # aligned (grouped GEMM) and the fallback
def test_batched_experts_equal_token_by_token(dim, inter):
    cfg = preset("tiny-deepseek-v3", dim=dim, moe_inter_dim=inter)
    net = build_model(cfg)
    moe = net.moe_layers()[0]
    x = torch.randn(40, dim, requires_grad=True)
    y = moe(x)
    ref = reference_moe(moe, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, moe.experts.w1, moe.gate.weight], g)
    want = torch.autograd.grad(ref, [x, moe.experts.w1, moe.gate.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_grouped_mm_handles_empty_experts():
    x = torch.randn(10, 16)
    w = torch.randn(4, 8, 16)
    counts = torch.tensor([0, 6, 0, 4])
    out = grouped_mm(x, w, counts)
    torch.testing.assert_close(out, torch.cat([x[:6] @ w[1].t(), x[6:] @ w[3].t()]))


def test_balance_losses_follow_the_v2_formulas():
    cfg = preset("tiny-deepseek-v2", n_routed_experts=8, n_activated_experts=2, n_expert_groups=1,
                 n_limited_groups=1, topk_devices=2, balance_per_sequence=True)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    moe.gate.set_placement(4, 1)
    b, t = 3, 10
    x = torch.randn(b, t, cfg.dim)
    moe(x)
    _, idx, s = moe.gate(x.view(-1, cfg.dim))
    e, k, d, m = 8, 2, 4, 2
    exp = dev = comm = 0.0
    for seq in range(b):
        rows = slice(seq * t, (seq + 1) * t)
        f = torch.tensor([(idx[rows] == i).any(-1).sum().item() * e / (k * t) for i in range(e)])
        p = s[rows].mean(0)
        exp += (f * p).sum() / b
        fd = f.view(d, 2).mean(-1)
        pd = p.view(d, 2).sum(-1)
        dev += (fd * pd).sum() / b
        sent = torch.tensor([((idx[rows] // 2) == i).any(-1).sum().item() * d / (m * t) for i in range(d)])
        comm += (sent * pd).sum() / b
    aux = moe.aux_losses
    torch.testing.assert_close(aux["balance_expert"], cfg.balance_alpha_expert * exp)
    torch.testing.assert_close(aux["balance_device"], cfg.balance_alpha_device * dev)
    torch.testing.assert_close(aux["balance_comm"], cfg.balance_alpha_comm * comm)


def test_v3_sequence_wise_balance_uses_normalised_affinities():
    cfg = preset("tiny-deepseek-v3", n_expert_groups=1, n_limited_groups=1)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    x = torch.randn(2, 12, cfg.dim)
    moe(x)
    _, idx, s = moe.gate(x.view(-1, cfg.dim))
    sp = s / s.sum(-1, keepdim=True)  # V3 eq. 19
    want = 0.0
    for seq in range(2):
        rows = slice(seq * 12, (seq + 1) * 12)
        f = torch.stack([(idx[rows] == i).any(-1).float().sum() for i in range(8)]) * 8 / (2 * 12)
        want += (f * sp[rows].mean(0)).sum() / 2
    torch.testing.assert_close(moe.aux_losses["balance_expert"], cfg.balance_alpha_expert * want)
    moe.aux_losses["balance_expert"].backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_token_dropping_keeps_the_highest_affinities_per_device():
    overrides = dict(n_routed_experts=8, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
                     topk_devices=0, capacity_factor=1.0, drop_exempt_fraction=0.0)
    cfg = preset("tiny-deepseek-v2", **overrides)
    moe = build_model(preset("tiny-deepseek-v2", n_layers=2, **overrides)).moe_layers()[0].train()
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    moe.gate.weight.data[:4, 0] += 1.0  # with x[..., 0] = 2 device 0's experts are popular: it overflows
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.set_placement(2, 1)
    x = torch.randn(4, 16, cfg.dim)
    x[..., 0] = 2.0
    w, idx, s = moe.gate(x.view(-1, cfg.dim))
    kept_w, kept_idx = moe._drop_tokens(w, idx, s, batch=4)
    cap = math.ceil(64 * 2 / 2)
    dev = idx // 4
    aff = s.gather(1, idx)
    assert (kept_idx == 8).any()  # something was dropped
    for d in range(2):
        on_d = dev == d
        kept = on_d & (kept_idx < 8)
        assert kept.sum() == min(cap, on_d.sum())
        if (on_d & ~kept).any():
            assert aff[kept].min() >= aff[on_d & ~kept].max()
    assert torch.equal(kept_w == 0, kept_idx == 8)
    # dropped pairs contribute nothing in training; evaluation never drops
    train_out = moe(x)
    moe.eval()
    eval_out = moe(x)
    assert (train_out - eval_out).abs().max() > 1e-3
    moe.double()  # the semantics check runs in fp64 so that summation order cannot matter
    torch.testing.assert_close(moe(x.double()).view(-1, cfg.dim), reference_moe(moe, x.double().view(-1, cfg.dim)))
    # exempt sequences are never dropped
    moe.cfg.drop_exempt_fraction = 1.0
    _, all_kept = moe._drop_tokens(w, idx, s, batch=4)
    assert torch.equal(all_kept, idx)


# -- the decoder -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-deepseek-v2-lite", "tiny-deepseek-llm-67b"])
def test_causal(name):
    net = build_model(preset(name)).eval()
    tok = torch.randint(0, 256, (2, 20))
    tok2 = tok.clone()
    tok2[:, 12:] = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(net(tok)[:, :12], net(tok2)[:, :12])


def test_mtp_loss_is_the_shifted_prediction_of_eq_24():
    cfg = preset("tiny-deepseek-v3")
    net = build_model(cfg)
    tok = torch.randint(0, 256, (2, 17))
    x, y = tok[:, :-1], tok[:, 1:]
    out = net.loss(x, y)
    h = net.norm(net.hidden(x))  # h^0: the main model's output representation
    mtp = net.mtp[0]
    rope = net.rope(torch.arange(15))
    h1 = mtp.block(mtp.eh_proj(torch.cat([mtp.enorm(net.embed(x)[:, 1:]), mtp.hnorm(h[:, :15])], -1)), rope)
    logits = net.head(mtp.norm(h1))  # h^1_i from h^0_i and Emb(t_{i+1}) predicts t_{i+2}
    ce = F.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten(), reduction="sum") / y.numel()
    torch.testing.assert_close(out["mtp_loss"], cfg.mtp_lambda * ce)
    torch.testing.assert_close(out["loss"], out["lm_loss"] + out["mtp_loss"] + out["aux_loss"])
    out["loss"].backward()
    assert net.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert net.loss(x, y, mtp_lambda=0.1)["mtp_loss"].item() == pytest.approx(out["mtp_loss"].item() / 3, rel=1e-5)


def test_loss_masks_ignored_labels():
    net = build_model(preset("tiny-deepseek-llm-7b"))
    tok = torch.randint(0, 256, (2, 9))
    x, y = tok[:, :-1], tok[:, 1:].clone()
    y[:, :4] = -100
    logits = net(x)
    want = F.cross_entropy(logits[:, 4:].flatten(0, 1), y[:, 4:].flatten())
    torch.testing.assert_close(net.loss(x, y)["lm_loss"], want)


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-deepseek-v2-lite", "tiny-deepseek-v2",
                                  "tiny-qwen2.5-1.5b", "tiny-deepseek-llm-67b"])
def test_cached_decode_equals_full_forward_token_by_token(name):
    """MLA: the absorbed path over the latent cache (c^KV, k^R only) gives the training path's logits."""
    cfg = preset(name)
    net = build_model(cfg).eval()
    for layer in net.moe_layers():
        if layer.gate.bias is not None:
            layer.gate.bias.normal_(std=0.01)
    tok = torch.randint(0, 256, (3, 24))
    with torch.no_grad():
        full = net(tok)
        caches = net.new_cache(3, 32)
        steps = [net(tok[:, :6], 0, caches)]  # prefill, then one token at a time
        steps += [net(tok[:, i:i + 1], i, caches) for i in range(6, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    if cfg.attention == "mla":
        per_token = caches[0].nbytes_per_token()
        assert per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # V2 §2.1: d_c + d_h^R elements


def test_cache_overflow_is_a_clear_error():
    net = build_model(preset("tiny-deepseek-v3")).eval()
    caches = net.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4 tokens"):
        net(torch.zeros(1, 5, dtype=torch.long), 0, caches)


def test_tied_embeddings_share_storage_and_init_is_deterministic():
    net = build_model(preset("tiny-qwen2.5-1.5b"))
    assert net.head.weight is net.embed.weight
    a, b = build_model(preset("tiny-deepseek-v3"), seed=3), build_model(preset("tiny-deepseek-v3"), seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    std = a.layers["0"].attn.wkv_a.weight.std().item()
    assert abs(std - 0.006) < 0.001


def test_bf16_cast_keeps_routing_state_and_rope_in_fp32():
    net = build_model(preset("tiny-deepseek-v3")).to(torch.bfloat16)
    moe = net.moe_layers()[0]
    assert net.embed.weight.dtype == torch.bfloat16
    assert moe.gate.bias.dtype == moe.tokens_per_expert.dtype == net.rope.inv_freq.dtype == torch.float32
    torch.testing.assert_close(net.rope.inv_freq, yarn_inv_freq(net.cfg), rtol=0, atol=0)
    moe.gate.bias.fill_(0.75)
    moe.tokens_per_expert.copy_(torch.arange(8.0))
    net.update_expert_bias(gamma=0.001)  # a 1e-3 step on 0.75 would vanish in bf16
    assert moe.gate.bias[0].item() == pytest.approx(0.751)


def test_bf16_training_step_runs():
    net = build_model(preset("tiny-deepseek-v3"), dtype=torch.bfloat16)
    tok = torch.randint(0, 256, (2, 17))
    out = net.loss(tok[:, :-1], tok[:, 1:])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["lm_loss"].dtype == torch.float32
    assert all(p.grad is not None for p in net.parameters())  # MTP, gate and every expert included
