"""Triton kernels for the FP8 recipe's quantization on CUDA: one pass over the tensor each, where the
plain-torch path (fp8.quantize) takes a dozen. They compute exactly the reference's values
(max-abs times the fp32 1/448 with the same floor, IEEE division, round-to-nearest-even E4M3) and are checked
bit-for-bit against it (tests/test_fp8_cuda.py).

  quant_rows(x)             x [R, C] -> E4M3 [R, C] and scales [R, ceil(C/128)]   (1x128 tiles)
  quant_t(x, row_scale)     x^T in 1x128 tiles along R: E4M3 [C, R], scales [C, ceil(R/128)];
                            x may be E4M3 with its 1x128 row scales (Wgrad's re-tiling of the
                            cached input, V3 §3.3.3: dequantized and quantized again in one pass)
  quant_blocks(w)           w [..., N, K] -> E4M3 and scales [..., ceil(N/128), ceil(K/128)]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0


@triton.jit
def _scale_of(amax, floor, inv, POW2: tl.constexpr):
    s = tl.maximum(amax, floor, propagate_nan=tl.PropagateNan.ALL) * inv
    if POW2:
        s = tl.exp2(tl.ceil(tl.log2(s)))
    return s


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, R, C, n_tiles, floor, inv,
                       BR: tl.constexpr, POW2: tl.constexpr):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    amax = tl.where(tl.sum((x != x).to(tl.int32), axis=1) > 0, float("nan"), amax)   # NaN propagates, as torch's amax
    s = _scale_of(amax, floor, inv, POW2)
    q = tl.minimum(tl.maximum(tl.div_rn(x, s[:, None]), -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    tl.store(q_ptr + rows[:, None] * C + cols[None, :], q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + rows * n_tiles + pid_c, s, mask=rows < R)


@triton.jit
def _quant_t_kernel(x_ptr, xs_ptr, q_ptr, s_ptr, R, C, n_tiles, xs_tiles, floor, inv,
                    BC: tl.constexpr, DEQUANT: tl.constexpr, POW2: tl.constexpr):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    rows = pid_r * 128 + tl.arange(0, 128)
    cols = pid_c * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if DEQUANT:
        xs = tl.load(xs_ptr + rows[:, None] * xs_tiles + cols[None, :] // 128, mask=mask, other=1.0)
        x = x * xs
    amax = tl.max(tl.abs(x), axis=0)
    amax = tl.where(tl.sum((x != x).to(tl.int32), axis=0) > 0, float("nan"), amax)
    s = _scale_of(amax, floor, inv, POW2)
    q = tl.minimum(tl.maximum(tl.div_rn(x, s[None, :]), -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    qt = tl.trans(q.to(tl.float8e4nv))                                    # [BC, 128]
    tl.store(q_ptr + cols[:, None] * R + rows[None, :], qt, mask=(cols[:, None] < C) & (rows[None, :] < R))
    tl.store(s_ptr + cols * n_tiles + pid_r, s, mask=cols < C)


@triton.jit
def _quant_blocks_kernel(w_ptr, q_ptr, s_ptr, N, K, nb_n, nb_k, floor, inv, POW2: tl.constexpr):
    pid_b, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * 128 + tl.arange(0, 128)
    cols = pid_k * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    base = pid_b.to(tl.int64) * N * K
    w = tl.load(w_ptr + base + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    amax = tl.where(tl.sum(tl.sum((w != w).to(tl.int32), axis=1), axis=0) > 0, float("nan"), amax)
    s = _scale_of(amax, floor, inv, POW2)
    q = tl.minimum(tl.maximum(tl.div_rn(w, s), -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    tl.store(q_ptr + base + rows[:, None] * K + cols[None, :], q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + (pid_b * nb_n + pid_n) * nb_k + pid_k, s)


def quant_rows(x: torch.Tensor, floor: float, inv: float, pow2: bool = False):
    x = x.contiguous()
    r, c = x.shape
    nt = triton.cdiv(c, 128)
    q = torch.empty(r, c, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(r, nt, dtype=torch.float32, device=x.device)
    br = 16
    _quant_rows_kernel[(triton.cdiv(r, br), nt)](x, q, s, r, c, nt, floor, inv, BR=br, POW2=pow2, num_warps=4)
    return q, s


def quant_t(x: torch.Tensor, floor: float, inv: float, row_scale: torch.Tensor | None = None, pow2: bool = False):
    x = x.contiguous()
    r, c = x.shape
    nt = triton.cdiv(r, 128)
    q = torch.empty(c, r, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(c, nt, dtype=torch.float32, device=x.device)
    bc = 64
    xs = row_scale.contiguous() if row_scale is not None else s
    _quant_t_kernel[(nt, triton.cdiv(c, bc))](x, xs, q, s, r, c, nt, xs.shape[-1], floor, inv, BC=bc,
                                              DEQUANT=row_scale is not None, POW2=pow2, num_warps=4)
    return q, s


def quant_blocks(w: torch.Tensor, floor: float, inv: float, pow2: bool = False):
    w = w.contiguous()
    n, k = w.shape[-2:]
    batch = w.numel() // (n * k) if w.numel() else 0
    nb_n, nb_k = triton.cdiv(n, 128), triton.cdiv(k, 128)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    s = torch.empty(*w.shape[:-2], nb_n, nb_k, dtype=torch.float32, device=w.device)
    if batch:
        _quant_blocks_kernel[(batch, nb_n, nb_k)](w, q, s, n, k, nb_n, nb_k, floor, inv, POW2=pow2, num_warps=8)
    return q, s
