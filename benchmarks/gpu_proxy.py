"""One training step of a DeepSeek-V3-width proxy on one GPU: BF16 and FP8, eager and compiled, beside
torchtitan's DeepSeek-V3 at the same shape (issue 26).

The proxy keeps V3's layer widths (V3 §4.2): dim 7168, MLA with 128 heads, q_lora 1536, kv_lora 512,
nope/rope/v head dims 128/64/128; a first dense layer (inter 18432); MoE layers with expert width 2048,
top-8 routing (sigmoid, normalised, scale 2.5, 8 groups / top-4 when the expert count allows), one
shared expert; sequence 4096. Depth and expert count are what one card holds with optimizer state:
`--moe-layers` MoE layers, and the largest expert count (a multiple of 8) whose parameters, gradients
and AdamW moments fit `--state-gib` (default: 55% of the card; bf16 parameters, gradients and moments,
8 bytes per parameter; the rest is for activations). `--balanced` forces every expert to get the same
number of tokens (round-robin routing), which removes routing skew from the timing.

Measured, all in one run:
  step          zero_grad + forward + loss + backward + AdamW step, median of --repeats after --warmup,
                per variant: bf16, fp8 (train.fp8=blockwise, backend torch on CUDA / emulate on CPU),
                bf16_compiled, fp8_compiled (parallel/compile.apply_compile: each block compiled)
  MFU           the planner's model FLOPs per token (plan/planner.model_shape, 6 per active weight plus
                causal attention) x tokens/s over the card's BF16 matmul rate measured here (8192^3)
  memory        peak allocated per variant
  breakdown     torch.profiler: the kernels taking most device time in one bf16 and one fp8 step
  experts       the routed experts alone (Experts.forward, fwd+bwd, the whole permute/GEMMs/combine):
                BF16 grouped GEMM vs FP8 grouped GEMM (one Triton launch per GEMM) vs FP8 one GEMM per expert
  linears       each linear shape of the proxy, fwd+bwd, FP8 / BF16 at the step's token count: the data
                for parallel/fp8.py's BF16_BELOW rule
  torchtitan    torchtitan 0.3.0's DeepSeekV3Model at the same shape, batch and precision (BF16), eager
                and compiled per block; its loss is plain cross-entropy (ours adds the balance loss)

Writes benchmarks/results/gpu_proxy_<device>.json (or --out): device, mfu_bf16, fp8_over_bf16 (BF16 step
time / FP8 step time), experts_fp8_over_bf16, ours_over_torchtitan (our tokens/s / theirs; null with the
reason when torchtitan cannot run), versions and the command.

    python benchmarks/gpu_proxy.py                       # the H200 run (benchmarks/gpu_issue26.sh)
    python benchmarks/gpu_proxy.py --toy --out /tmp/x.json   # CPU, toy widths: checks the harness end to end
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_name  # noqa: E402

from model import ModelConfig, build_model, preset  # noqa: E402
from model.moe import Experts  # noqa: E402
from parallel.compile import apply_compile  # noqa: E402
from parallel.fp8 import BF16_BELOW, Fp8Recipe, apply_fp8, fp8_grouped_mm, fp8_linear  # noqa: E402
from plan.planner import model_shape  # noqa: E402

BYTES_PER_PARAM = 8     # bf16 parameter + bf16 gradient + two bf16 AdamW moments
TARGETS = dict(mfu_bf16=0.45, fp8_over_bf16=1.15, experts_fp8_over_bf16=1.3, ours_over_torchtitan=1.2)


# -- the proxy ---------------------------------------------------------------------------------------------
def proxy_config(toy: bool, moe_layers: int, experts: int, vocab: int, seq: int) -> ModelConfig:
    common = dict(n_layers=1 + moe_layers, n_dense_layers=1, n_mtp=0, max_seq_len=max(seq, 4096))
    if toy:   # the same structure at widths a CPU steps through in seconds (multiples of 128: whole FP8 tiles)
        return preset("tiny-deepseek-v3", **common, vocab_size=vocab, dim=128, inter_dim=256, n_heads=2,
                      q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64,
                      v_head_dim=64, moe_inter_dim=128, n_routed_experts=experts, n_activated_experts=2,
                      n_expert_groups=1, n_limited_groups=1, topk_nodes=0, init_std=0.02)
    groups = 8 if experts % 8 == 0 and experts // 8 * 4 >= 8 else 1
    return preset("deepseek-v3", **common, vocab_size=vocab, n_routed_experts=experts,
                  n_expert_groups=groups, n_limited_groups=4 if groups > 1 else 1, topk_nodes=0)


def fit_experts(moe_layers: int, vocab: int, seq: int, state_bytes: float, cap: int = 256) -> int:
    """The largest multiple of 8 (<= cap) of routed experts whose training state fits state_bytes."""
    best = 8
    for e in range(8, cap + 1, 8):
        if proxy_config(False, moe_layers, e, vocab, seq).param_counts()["total"] * BYTES_PER_PARAM <= state_bytes:
            best = e
    return best


def balanced_routing(net: nn.Module) -> int:
    """Force round-robin routing: token t's k-th expert is (t*K + k) mod E (every expert the same load).
    The gate still runs and gets gradients through its weights."""
    n = 0
    for m in net.modules():
        if type(m).__name__ == "Gate":
            gate_forward = m.forward

            def forward(x, _f=gate_forward, _m=m):
                w, idx, s = _f(x)
                t, k = idx.shape
                e = s.shape[-1]
                idx = ((torch.arange(t, device=x.device)[:, None] * k + torch.arange(k, device=x.device)) % e)
                return w, idx, s
            m.forward = forward
            n += 1
    return n


# -- timing helpers ----------------------------------------------------------------------------------------
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(dev)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return out


def matmul_rate(dev, toy: bool) -> float:
    """The card's BF16 matmul rate measured now (fp32 on CPU): FLOP/s of an n^3 product."""
    n = 512 if toy else 8192
    dt = torch.float32 if dev.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    ts = timed(lambda: a @ b, dev, 3, 10)
    return 2.0 * n ** 3 / statistics.median(ts)


def peak_mem(dev) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None


def reset_mem(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def profile_step(step, dev, top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(dev)
    ev = prof.key_averages()
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    rows = [(e.key, getattr(e, attr, 0.0), e.count) for e in ev]
    if dev.type == "cuda":   # device kernels only: rows with device time
        rows = [r for r in rows if r[1] > 0]
    total = sum(r[1] for r in rows) or 1.0
    rows.sort(key=lambda r: -r[1])
    return [dict(name=k[:120], ms=round(t / 1e3, 3), pct=round(100 * t / total, 1), calls=c) for k, t, c in rows[:top]]


def uncompile(net: nn.Module):
    for m in net.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


# -- our step ------------------------------------------------------------------------------------------------
def run_ours(args, cfg, dev, tokens, labels, flops_per_token, rate, out):
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    net = build_model(cfg, device="meta", dtype=dtype, seed=None)
    net.to_empty(device=dev)
    with torch.no_grad():
        net.init_weights(0)
    net.train()
    if args.balanced:
        balanced_routing(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=dev.type == "cuda")
    n_tok = tokens.numel()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = net.loss(tokens, labels)["loss"]
        loss.backward()
        opt.step()
        return loss

    variants = out["variants"]
    backend = "inductor" if dev.type == "cuda" else args.cpu_compile_backend
    t_start = time.perf_counter()
    for name in args.variants:
        if time.perf_counter() - t_start > args.time_budget:
            variants[name] = dict(skipped=f"time budget of {args.time_budget} s spent")
            continue
        fp8, compiled = name.startswith("fp8"), name.endswith("_compiled")
        try:
            if fp8 and not out.get("fp8_applied"):
                uncompile(net)
                conv = apply_fp8(net, Fp8Recipe("auto"))
                out["fp8_applied"] = dict(converted=len(conv), bf16=conv.bf16)
            if compiled:
                apply_compile(net, backend=backend)
            else:
                uncompile(net)
            reset_mem(dev)
            t0 = time.perf_counter()
            step()
            sync(dev)
            first = time.perf_counter() - t0
            ts = timed(step, dev, args.warmup, args.repeats)
            med = statistics.median(ts)
            v = dict(step_s=med, steps_s=ts, first_step_s=first, tokens_per_s=n_tok / med,
                     tflops=flops_per_token * n_tok / med / 1e12, mfu=flops_per_token * n_tok / med / rate,
                     peak_mem_gib=peak_mem(dev), compile_backend=backend if compiled else None)
            if args.profile and not compiled:
                v["kernels"] = profile_step(step, dev)
            variants[name] = v
            print(f"[ours] {name}: {med * 1e3:.1f} ms/step, {v['tokens_per_s']:.0f} tok/s, MFU {v['mfu']:.3f}",
                  flush=True)
        except Exception as e:   # a variant that fails is recorded, the others still run
            variants[name] = dict(error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
            print(f"[ours] {name} failed: {type(e).__name__}: {e}", flush=True)
    uncompile(net)
    net.to("meta")   # frees the device memory (and the optimizer's state goes with the step closure)
    opt.state.clear()
    reset_mem(dev)


# -- the routed experts alone, and each linear shape --------------------------------------------------------
def run_experts(args, cfg, dev, n_tok, out):
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    e, k, d, f = cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim, cfg.moe_inter_dim
    torch.manual_seed(0)
    ex = Experts(e, d, f).to(dev, dtype)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.006)
    x = torch.randn(n_tok, d, device=dev, dtype=dtype, requires_grad=True)
    idx = ((torch.arange(n_tok, device=dev)[:, None] * k + torch.arange(k, device=dev)) % e)
    w = torch.rand(n_tok, k, device=dev, dtype=dtype)
    g = torch.randn(n_tok, d, device=dev, dtype=dtype)
    recipe = Fp8Recipe("auto")
    default = ex.grouped_gemm

    def layer():
        ex.zero_grad(set_to_none=True)
        x.grad = None
        ex(x, idx, w, partial=False).backward(g)

    res = {}
    for name, gemm, env in (("bf16", default, None),
                            ("fp8_grouped", lambda a, b, c: fp8_grouped_mm(a, b, c, recipe), "triton"),
                            ("fp8_per_expert", lambda a, b, c: fp8_grouped_mm(a, b, c, recipe), "loop")):
        if env == "loop" and dev.type != "cuda":
            continue   # on CPU both FP8 forms are the emulation
        try:
            if env:
                os.environ["WHALETRON_FP8_GROUPED"] = env
            ex.grouped_gemm = gemm
            ts = timed(layer, dev, args.warmup, args.repeats)
            flops = 6.0 * n_tok * k * 3 * d * f
            res[name] = dict(ms=statistics.median(ts) * 1e3, tflops=flops / statistics.median(ts) / 1e12)
        except Exception as exc:
            res[name] = dict(error=f"{type(exc).__name__}: {exc}"[:1000])
        finally:
            os.environ.pop("WHALETRON_FP8_GROUPED", None)
    ex.grouped_gemm = default
    res["shape"] = dict(tokens=n_tok, experts=e, topk=k, dim=d, expert_width=f, balanced=True)
    out["experts"] = res
    if "ms" in res.get("bf16", {}) and "ms" in res.get("fp8_grouped", {}):
        out["experts_fp8_over_bf16"] = res["bf16"]["ms"] / res["fp8_grouped"]["ms"]
    print(f"[experts] {json.dumps({n: v for n, v in res.items() if n != 'shape'})}", flush=True)
    ex.to("meta")
    reset_mem(dev)


def linear_shapes(cfg) -> list[tuple[str, int, int]]:
    h = cfg.n_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return [("wq_a", cfg.dim, cfg.q_lora_rank), ("wq_b", cfg.q_lora_rank, h * qk),
            ("wkv_a", cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
            ("wkv_b", cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
            ("wo", h * cfg.v_head_dim, cfg.dim),
            ("dense_w1", cfg.dim, cfg.inter_dim), ("dense_w2", cfg.inter_dim, cfg.dim),
            ("shared_w1", cfg.dim, cfg.moe_inter_dim * cfg.n_shared_experts),
            ("shared_w2", cfg.moe_inter_dim * cfg.n_shared_experts, cfg.dim)]


def run_linears(args, cfg, dev, n_tok, out):
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    recipe = Fp8Recipe("auto")
    rows = []
    for name, k, n in linear_shapes(cfg):
        x = torch.randn(n_tok, k, device=dev, dtype=dtype, requires_grad=True)
        w = (torch.randn(n, k, device=dev, dtype=dtype) * 0.02).requires_grad_()
        g = torch.randn(n_tok, n, device=dev, dtype=dtype)

        def bf16():
            x.grad = w.grad = None
            torch.nn.functional.linear(x, w).backward(g)

        def fp8():
            x.grad = w.grad = None
            fp8_linear(x, w, recipe).backward(g)
        tb = statistics.median(timed(bf16, dev, 2, args.repeats))
        tf = statistics.median(timed(fp8, dev, 2, args.repeats))
        rows.append(dict(layer=name, in_features=k, out_features=n, bf16_ms=tb * 1e3, fp8_ms=tf * 1e3,
                         fp8_over_bf16=tb / tf, rule_keeps_bf16=recipe.keep_bf16(k, n, dev) is not None))
    out["linears"] = dict(tokens=n_tok, rows=rows, bf16_below=BF16_BELOW)
    reset_mem(dev)


# -- torchtitan ------------------------------------------------------------------------------------------------
def torchtitan_config(cfg: ModelConfig):
    import torchtitan.models.deepseek_v3 as tt
    from torchtitan.models.deepseek_v3 import ComplexRoPE, DeepSeekV3Model, Embedding, Linear, RMSNorm
    layers = tt._build_dsv3_layers(
        n_layers=cfg.n_layers, n_dense_layers=cfg.n_dense_layers, dim=cfg.dim, n_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, mscale=cfg.mscale,
        dense_hidden_dim=cfg.inter_dim, moe_hidden_dim=cfg.moe_inter_dim, num_experts=cfg.n_routed_experts,
        num_shared_experts=cfg.n_shared_experts, router_top_k=cfg.n_activated_experts,
        router_score_func=cfg.score_func,
        router_num_expert_groups=cfg.n_expert_groups if cfg.n_expert_groups > 1 else None,
        router_num_limited_groups=cfg.n_limited_groups if cfg.n_expert_groups > 1 else None,
        router_route_scale=cfg.route_scale, router_route_norm=cfg.norm_topk_prob, attn_backend="flex",
        moe_comm_backend="standard", non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=cfg.qk_rope_head_dim, max_seq_len=cfg.max_seq_len, theta=cfg.rope_theta,
                                scaling="yarn", rope_factor=cfg.rope_factor, beta_fast=cfg.beta_fast,
                                beta_slow=cfg.beta_slow, original_seq_len=cfg.original_seq_len))
    v, d = cfg.vocab_size, cfg.dim
    return DeepSeekV3Model.Config(
        vocab_size=v, dim=d,
        tok_embeddings=Embedding.Config(num_embeddings=v, embedding_dim=d, param_init=tt._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=d, param_init=tt._NORM_INIT),
        lm_head=Linear.Config(in_features=d, out_features=v, param_init=tt._output_linear_init(d)),
        layers=layers, mtp_layers=[])


def run_torchtitan(args, cfg, dev, tokens, labels, flops_per_token, rate, out):
    res = out["torchtitan"]
    try:
        import torchtitan
        res["version"] = getattr(torchtitan, "__version__", None)
        tcfg = torchtitan_config(cfg)
    except Exception as e:
        res["error"] = f"torchtitan does not import or configure here: {type(e).__name__}: {e}"[:1500]
        return
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        with torch.device("meta"):
            m = tcfg.build()
        m.to_empty(device=dev)
        m.init_states(buffer_device=dev)
        m.to(dtype)
        m.train()
        b, s = tokens.shape
        pos = torch.arange(s, device=dev).expand(b, s)
        masks = m.get_attention_masks(pos)
        if dev.type == "cpu":   # FlexAttention has no backward on CPU (torch 2.13): check the forward only
            with torch.no_grad():
                y = m(tokens, pos, masks)
            res["cpu_forward_ok"] = list(y.shape) == [b, s, cfg.vocab_size]
            res["error"] = "FlexAttention has no backward on CPU (torch: 'FlexAttention does not support backward " \
                           "on CPU'); torchtitan's language models refuse sdpa, so its step runs on CUDA only"
            return
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
        n_tok = tokens.numel()

        def step():
            opt.zero_grad(set_to_none=True)
            logits = m(tokens, pos, masks)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            loss.backward()
            opt.step()

        for name in ("bf16", "bf16_compiled"):
            if name not in args.torchtitan_variants:
                continue
            try:
                if name.endswith("compiled"):
                    for blk in m.layers.values():   # torchtitan's own scheme: each block compiled
                        blk.compile(backend="inductor")
                reset_mem(dev)
                ts = timed(step, dev, args.warmup, args.repeats)
                med = statistics.median(ts)
                res[name] = dict(step_s=med, tokens_per_s=n_tok / med, tflops=flops_per_token * n_tok / med / 1e12,
                                 mfu=flops_per_token * n_tok / med / rate, peak_mem_gib=peak_mem(dev))
                print(f"[torchtitan] {name}: {med * 1e3:.1f} ms/step", flush=True)
            except Exception as e:
                res[name] = dict(error=f"{type(e).__name__}: {e}"[:1500], trace=traceback.format_exc()[-2000:])
        m.to("meta")
        opt.state.clear()
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"[:1500]
        res["trace"] = traceback.format_exc()[-3000:]
    reset_mem(dev)


# -- main -----------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", action="store_true", help="toy widths on CPU (checks the harness end to end)")
    p.add_argument("--device", default=None)
    p.add_argument("--moe-layers", type=int, default=None, help="MoE layers after the dense one (default 3; toy 1)")
    p.add_argument("--experts", type=int, default=None, help="routed experts per MoE layer (default: what fits)")
    p.add_argument("--state-gib", type=float, default=None, help="memory for parameters+grads+AdamW (default 55%%)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32768; V3's 129280 costs 1.3B params)")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--balanced", action="store_true", help="force round-robin (perfectly balanced) routing")
    p.add_argument("--variants", default="bf16,fp8,bf16_compiled,fp8_compiled")
    p.add_argument("--torchtitan-variants", default="bf16,bf16_compiled")
    p.add_argument("--no-torchtitan", action="store_true")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-linears", dest="linears", action="store_false")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds for our variants; later ones skip")
    p.add_argument("--cpu-compile-backend", default="aot_eager",
                   help="torch.compile backend on CPU (inductor's C++ build of a block takes minutes on 2 cores)")
    p.add_argument("--out", default=None, help="a .json path, or a folder for gpu_proxy_<device>.json "
                                               "(default benchmarks/results/)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.torchtitan_variants = [v for v in args.torchtitan_variants.split(",") if v]

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and not args.toy:
        p.error("the full-width proxy needs a GPU; use --toy on CPU")
    moe_layers = args.moe_layers or (1 if args.toy else 3)
    vocab = args.vocab or (256 if args.toy else 32768)
    seq = args.seq or (64 if args.toy else 4096)
    if args.experts:
        experts = args.experts
    elif args.toy:
        experts = 8
    else:
        total = torch.cuda.get_device_properties(dev).total_memory
        state = (args.state_gib * 2 ** 30) if args.state_gib else 0.55 * total
        experts = fit_experts(moe_layers, vocab, seq, state)
    cfg = proxy_config(args.toy, moe_layers, experts, vocab, seq)
    counts = cfg.param_counts()
    with torch.device("meta"):
        meta = build_model(cfg, device="meta", seed=None)
    flops_per_token = model_shape(meta, seq).train_flops_per_token
    del meta

    triton_version = None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        pass
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    out = dict(
        device=device_name, device_type=dev.type, toy=args.toy,
        torch=torch.__version__, triton=triton_version, python=platform.python_version(),
        command=" ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        config=dict(dim=cfg.dim, n_layers=cfg.n_layers, n_dense_layers=cfg.n_dense_layers, n_heads=cfg.n_heads,
                    q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, moe_inter_dim=cfg.moe_inter_dim,
                    inter_dim=cfg.inter_dim, n_routed_experts=cfg.n_routed_experts,
                    n_activated_experts=cfg.n_activated_experts, n_shared_experts=cfg.n_shared_experts,
                    vocab_size=cfg.vocab_size, seq=seq, batch=args.batch, balanced=args.balanced,
                    params_total=counts["total"], params_active=counts["active"],
                    state_bytes_per_param=BYTES_PER_PARAM),
        flops_per_token=flops_per_token, targets=TARGETS, variants={}, torchtitan={},
        mfu_bf16=None, fp8_over_bf16=None, experts_fp8_over_bf16=None, ours_over_torchtitan=None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            from parallel.fp8_grouped import alternatives
            out["grouped_fp8_alternatives"] = alternatives(dev)
        except Exception as e:
            out["grouped_fp8_alternatives"] = f"{type(e).__name__}: {e}"[:300]
    rate = matmul_rate(dev, args.toy)
    out["matmul_tflops"] = rate / 1e12
    print(f"[gpu_proxy] {device_name}: {cfg.n_layers} layers, {cfg.n_routed_experts} experts, "
          f"{counts['total'] / 1e9:.2f}B params, matmul {rate / 1e12:.1f} TFLOP/s", flush=True)

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch, seq), generator=g).to(dev)
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = -100

    slug = "".join(c if c.isalnum() else "_" for c in device_name.lower())[:40].strip("_")
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    if path.is_dir() or not path.suffix:   # a folder: the default name, gpu_proxy_<device>.json, inside it
        path = path / f"gpu_proxy_{slug}{'_toy' if args.toy else ''}.json"
    stages = [("ours", lambda: run_ours(args, cfg, dev, tokens, labels, flops_per_token, rate, out)),
              ("experts", lambda: run_experts(args, cfg, dev, args.batch * seq, out))]
    if args.linears:
        stages.append(("linears", lambda: run_linears(args, cfg, dev, args.batch * seq, out)))
    if args.no_torchtitan:
        out["torchtitan"]["error"] = "skipped (--no-torchtitan)"
    else:
        stages.append(("torchtitan", lambda: run_torchtitan(args, cfg, dev, tokens, labels, flops_per_token, rate,
                                                            out)))
    for name, stage in stages:   # the JSON is rewritten after each stage: a run cut short keeps what it measured
        try:
            stage()
        except Exception as e:
            out.setdefault("stage_errors", {})[name] = f"{type(e).__name__}: {e}"[:1500]
        summarise(out)
        write(out, path)
    print(f"[gpu_proxy] wrote {path}: mfu_bf16={out['mfu_bf16']} fp8_over_bf16={out['fp8_over_bf16']} "
          f"experts_fp8_over_bf16={out['experts_fp8_over_bf16']} ours_over_torchtitan={out['ours_over_torchtitan']}",
          flush=True)
    return out


def write(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")


def summarise(out: dict) -> None:
    """The headline ratios from the variants measured so far."""
    v, tt = out["variants"], out["torchtitan"]

    def best(*names, src=v):
        got = [(src[n]["step_s"], n) for n in names if "step_s" in src.get(n, {})]
        return min(got) if got else (None, None)
    tb, nb = best("bf16", "bf16_compiled")
    tf, nf = best("fp8", "fp8_compiled")
    if tb:
        out["mfu_bf16"] = v[nb]["mfu"]
        out["mfu_bf16_variant"] = nb
    if tb and tf:
        out["fp8_over_bf16"] = tb / tf
        out["fp8_over_bf16_variants"] = [nb, nf]
    out["ours_over_torchtitan_by_variant"] = {n: tt[n]["step_s"] / v[n]["step_s"] for n in ("bf16", "bf16_compiled")
                                              if "step_s" in tt.get(n, {}) and "step_s" in v.get(n, {})}
    tt_t, tt_n = best("bf16", "bf16_compiled", src=tt)
    if tb and tt_t:
        out["ours_over_torchtitan"] = tt_t / tb     # tokens/s ratio = their step time / ours
        out["ours_over_torchtitan_variants"] = [nb, tt_n]
    else:
        out["ours_over_torchtitan_reason"] = tt.get("error") or "no torchtitan step was timed"
    out["missed"] = {k: dict(target=t, got=out[k]) for k, t in TARGETS.items()
                     if out.get(k) is not None and out[k] < t}


if __name__ == "__main__":
    main()
