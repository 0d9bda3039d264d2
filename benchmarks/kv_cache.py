"""KV-cache bytes per token: MLA's latent cache (V2 §2.1.3-2.1.4) versus the equivalent MHA cache.

For each MLA preset (deepseek-v2-lite, deepseek-v2, deepseek-v3):

* formula: MLA caches the joint KV latent c^KV (d_c = kv_lora_rank) and the shared decoupled RoPE key
  k^R (d_h^R = qk_rope_head_dim) per token per layer: (d_c + d_h^R) elements (V2 §2.1.3, Table 1).
* measured: the bytes per token of the cache objects our model allocates, `net.new_cache(...)` ->
  per-layer `KVCache.nbytes_per_token()`, (a) on a real CPU model with the preset's attention shapes
  but one layer, a tiny vocabulary and a tiny FFN (the attention weights are the preset's), and
  (b) for the full-depth preset built on the meta device (allocates nothing).
* "equivalent MHA": the same heads with materialised per-head keys and values, i.e. what the
  training path (`MLA._forward_full`) feeds to attention: per head a key of
  qk_nope_head_dim + qk_rope_head_dim elements and a value of v_head_dim elements, so
  n_heads * (qk_head_dim + v_head_dim) elements per token per layer. It is measured with a
  `KVCache` of exactly those two fields. The V2 paper's Table 1 MHA row, 2 * n_h * d_h with
  d_h = 128, is reported as well (`paper_mha_*`); for V2 it gives the "GQA with 2.25 groups" claim.

Everything in bf16 (2 bytes per element). Usage: python benchmarks/kv_cache.py [--out PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from _machine import machine, write_result

from model import build_model, preset
from model.attention import KVCache

PRESETS = ("deepseek-v2-lite", "deepseek-v2", "deepseek-v3")
DTYPE = torch.bfloat16


def measure(name: str) -> dict:
    cfg = preset(name)
    elem = torch.empty((), dtype=DTYPE).element_size()
    d_c, d_r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    mla_elems = d_c + d_r                                              # V2 §2.1.3: (d_c + d_h^R) per layer
    mha_elems = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)        # keys (nope+rope) + values, per head
    paper_d_h = cfg.v_head_dim                                          # V2 Table 1: d_h = 128
    paper_mha_elems = 2 * cfg.n_heads * paper_d_h

    # (a) a real model on CPU: the preset's attention, one (dense) layer, tiny vocab and FFN
    small = dataclasses.replace(cfg, n_layers=1, n_dense_layers=1, vocab_size=8, inter_dim=8, n_mtp=0)
    t0 = time.perf_counter()
    net = build_model(small, device="cpu", dtype=DTYPE, seed=0)
    batch, max_len = 2, 16
    caches = net.new_cache(batch, max_len, dtype=DTYPE)
    real_per_token = caches[0].nbytes_per_token()
    real_buffer_bytes = sum(b.numel() * b.element_size() for b in caches[0].buffers())
    fields = {n: list(b.shape[2:]) for n, b in caches[0].named_buffers()}
    attn_params = sum(p.numel() for p in net.layers["0"].attn.parameters())
    del net, caches
    build_s = time.perf_counter() - t0

    # (b) the full-depth preset on the meta device
    full = build_model(cfg, device="meta")
    meta_caches = full.new_cache(1, 1, dtype=DTYPE)
    per_layer = [c.nbytes_per_token() for c in meta_caches]
    whole_mla = sum(per_layer)

    # equivalent MHA cache measured with the same KVCache class
    mha_cache = KVCache(1, 1, {"k": (cfg.n_heads, cfg.qk_head_dim), "v": (cfg.n_heads, cfg.v_head_dim)},
                        DTYPE, "meta")
    mha_per_token = mha_cache.nbytes_per_token()

    formula_bytes = mla_elems * elem
    checks = {
        "cpu_1layer_equals_formula": real_per_token == formula_bytes,
        "cpu_buffers_equal_batch_x_len_x_per_token": real_buffer_bytes == batch * max_len * real_per_token,
        "every_meta_layer_equals_formula": all(b == formula_bytes for b in per_layer),
        "mha_cache_equals_formula": mha_per_token == mha_elems * elem,
    }
    for k, ok in checks.items():
        if not ok:
            raise AssertionError(f"{name}: check {k} failed")
    return {
        "preset": name,
        "shape": {"n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "kv_lora_rank": d_c,
                  "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": d_r,
                  "v_head_dim": cfg.v_head_dim, "q_lora_rank": cfg.q_lora_rank},
        "mla_cache_fields": fields,
        "mla_elements_per_token_per_layer_formula": mla_elems,
        "mla_bytes_per_token_per_layer_formula": formula_bytes,
        "mla_bytes_per_token_per_layer_measured_cpu_1layer": real_per_token,
        "mla_bytes_per_token_per_layer_measured_meta_full": per_layer[0],
        "mha_equivalent_definition": "per head: key of qk_nope_head_dim + qk_rope_head_dim, value of v_head_dim",
        "mha_elements_per_token_per_layer": mha_elems,
        "mha_bytes_per_token_per_layer": mha_per_token,
        "paper_table1_mha_elements_per_token_per_layer": paper_mha_elems,
        "paper_table1_d_h": paper_d_h,
        "mla_equals_gqa_groups": mla_elems / (2 * paper_d_h),
        "ratio_mla_over_mha": formula_bytes / mha_per_token,
        "ratio_mla_over_paper_mha": mla_elems / paper_mha_elems,
        "whole_model_mla_bytes_per_token": whole_mla,
        "whole_model_mha_bytes_per_token": mha_per_token * cfg.n_layers,
        "whole_model_note": "n_layers main layers; the MTP module (V3) keeps no inference cache in new_cache",
        "attention_params_per_layer": attn_params,
        "checks": checks,
        "cpu_build_seconds": round(build_s, 2),
    }


def main(argv=None) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "results", "kv_cache.json"))
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = ap.parse_args(argv)

    rows = [measure(p) for p in args.presets]
    result = {
        "benchmark": "kv_cache",
        "command": "python " + " ".join([os.path.relpath(__file__, os.path.dirname(here))] + sys.argv[1:]),
        "machine": machine(),
        "torch": torch.__version__,
        "dtype": "bfloat16",
        "results": rows,
    }
    write_result(args.out, result)

    print("KV cache per token, bf16 (MLA measured from net.new_cache; MHA = n_heads*(qk_head_dim+v_head_dim))")
    print(f"{'preset':<18}{'MLA B/tok/layer':>16}{'MHA B/tok/layer':>16}{'ratio':>8}"
          f"{'MLA KiB/tok':>13}{'MHA KiB/tok':>13}")
    for r in rows:
        print(f"{r['preset']:<18}{r['mla_bytes_per_token_per_layer_measured_cpu_1layer']:>16,}"
              f"{r['mha_bytes_per_token_per_layer']:>16,}{r['ratio_mla_over_mha']:>8.2%}"
              f"{r['whole_model_mla_bytes_per_token'] / 1024:>13.1f}"
              f"{r['whole_model_mha_bytes_per_token'] / 1024:>13.1f}")
    print(f"all checks passed; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
