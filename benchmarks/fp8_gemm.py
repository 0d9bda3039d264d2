"""BF16 vs FP8 (DeepSeek-V3 blockwise recipe, `torch` backend) linear layers at V3 shapes, on CUDA.

    python benchmarks/fp8_gemm.py [--tokens 8192] [--out benchmarks/results/fp8_gemm_<gpu>.json]

For each V3 linear shape (in -> out) it reports TFLOP/s of:
  gemm     the FP8 GEMM alone on pre-quantized operands (1x128 x 128x128 scales) vs the BF16 GEMM;
  fprop    the whole forward of the layer (online quantization of x and W, then the GEMM);
  step     forward + backward (Fprop, Dgrad, Wgrad, each with its quantization);
and the grouped expert GEMM (V3's routed-expert up- and down-projection with E local experts).
Each FP8 result is also checked against the CPU-reference emulation (relative error, which must
be at fp32-summation level: the backends compute the same FP8 products).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parallel.fp8 import (BLOCK, TILE, Emulated, Fp8Recipe, Fp8Tensor, TorchScaledMM, fp8_grouped_mm,  # noqa: E402
                          fp8_linear)

SHAPES = [(7168, 2048), (2048, 7168), (7168, 18432), (18432, 7168)]   # (in, out), V3's dim / moe_inter / inter


def bench(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds of fn() over iters, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear_case(m: int, k: int, n: int) -> dict:
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=dev) * k ** -0.5).to(torch.bfloat16)
    flops = 2.0 * m * n * k
    torch_be, emu = TorchScaledMM(), Emulated()
    xq, wq = Fp8Tensor.of(x, TILE), Fp8Tensor.of(w, BLOCK)
    out = {"m": m, "k": k, "n": n}
    # correctness against the emulation on the same FP8 operands
    out["gemm_rel_err_vs_emulation"] = rel(torch_be.gemm(xq, wq, torch.float32), emu.gemm(xq, wq, torch.float32))
    out["fp8_vs_bf16_rel_err"] = rel(torch_be.gemm(xq, wq, torch.float32), x.float() @ w.float().t())
    t_bf = bench(lambda: x @ w.t())
    t_f8 = bench(lambda: torch_be.gemm(xq, wq, torch.bfloat16))
    out.update(gemm_bf16_tflops=flops / t_bf / 1e12, gemm_fp8_tflops=flops / t_f8 / 1e12)
    t_qx, t_qw = bench(lambda: Fp8Tensor.of(x, TILE)), bench(lambda: Fp8Tensor.of(w, BLOCK))
    out.update(quant_x_ms=t_qx * 1e3, quant_w_ms=t_qw * 1e3,
               quant_x_gbps=(x.numel() * 3 + x.numel() / 32) / t_qx / 1e9)   # read bf16, write e4m3 + scales
    rec = Fp8Recipe("torch")
    t_fwd = bench(lambda: fp8_linear(x, w, rec))
    out.update(fprop_fp8_tflops=flops / t_fwd / 1e12, fprop_bf16_tflops=flops / t_bf / 1e12)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    def step_bf16():
        (xr @ wr.t()).backward(g)

    def step_fp8():
        fp8_linear(xr, wr, rec).backward(g)

    t_sb, t_s8 = bench(step_bf16), bench(step_fp8)
    out.update(step_bf16_tflops=3 * flops / t_sb / 1e12, step_fp8_tflops=3 * flops / t_s8 / 1e12,
               step_speedup=t_sb / t_s8, gemm_speedup=t_bf / t_f8)
    # the full layer (three GEMMs) against the emulation: outputs and gradients
    xr.grad = wr.grad = None
    y = fp8_linear(xr, wr, rec)
    y.backward(g)
    xe2, we2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y2 = fp8_linear(xe2, we2, Fp8Recipe("emulate"))
    y2.backward(g)
    out.update(layer_rel_err_vs_emulation={"y": rel(y, y2), "dx": rel(xr.grad, xe2.grad), "dw": rel(wr.grad, we2.grad)})
    return out


def grouped_case(tokens: int, experts: int, k: int, n: int) -> dict:
    dev = "cuda"
    counts = torch.full((experts,), tokens // experts, device=dev)
    x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(experts, n, k, device=dev) * k ** -0.5).to(torch.bfloat16)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    flops = 2.0 * tokens * n * k
    rec = Fp8Recipe("torch")
    t_bf = bench(lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))
    t_f8 = bench(lambda: fp8_grouped_mm(x, w, counts, rec))
    y = fp8_grouped_mm(x, w, counts, rec)
    ye = fp8_grouped_mm(x, w, counts, Fp8Recipe("emulate"))
    return {"tokens": tokens, "experts": experts, "k": k, "n": n, "grouped_bf16_tflops": flops / t_bf / 1e12,
            "grouped_fp8_tflops": flops / t_f8 / 1e12, "speedup": t_bf / t_f8, "rel_err_vs_emulation": rel(y, ye)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fp8_gemm.py needs a CUDA GPU (Hopper for the blockwise FP8 GEMM)")
    name = torch.cuda.get_device_name()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192 ** 3 / bench(lambda: a @ a) / 1e12
    res = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
           "command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d"),
           "bf16_matmul_8192_tflops": peak, "linear": [], "grouped": []}
    for k, n in SHAPES:
        r = linear_case(args.tokens, k, n)
        res["linear"].append(r)
        print(f"{k:>6}x{n:<6} gemm bf16 {r['gemm_bf16_tflops']:7.1f} fp8 {r['gemm_fp8_tflops']:7.1f} "
              f"({r['gemm_speedup']:.2f}x) | quant x {r['quant_x_ms']:.3f} ms ({r['quant_x_gbps']:.0f} GB/s) | "
              f"fprop fp8 {r['fprop_fp8_tflops']:7.1f} | step bf16 "
              f"{r['step_bf16_tflops']:7.1f} fp8 {r['step_fp8_tflops']:7.1f} ({r['step_speedup']:.2f}x) | err vs emu "
              f"{r['gemm_rel_err_vs_emulation']:.1e} layer {r['layer_rel_err_vs_emulation']}", flush=True)
    for k, n in ((7168, 2048), (2048, 7168)):
        r = grouped_case(args.tokens, args.experts, k, n)
        res["grouped"].append(r)
        print(f"grouped E={args.experts} {k}x{n}: bf16 {r['grouped_bf16_tflops']:.1f} "
              f"fp8 {r['grouped_fp8_tflops']:.1f} ({r['speedup']:.2f}x) "
              f"err vs emu {r['rel_err_vs_emulation']:.1e}", flush=True)
    out = Path(args.out or Path(__file__).parent / "results" / f"fp8_gemm_{name.split()[1].lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
