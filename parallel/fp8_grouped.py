"""Grouped blockwise FP8 GEMMs for the routed experts, and the fused quantisers around them (Triton).

All local experts in one launch per GEMM, DeepSeek-V3's recipe (V3 §3.3.2, Fig. 7):
  forward   Y[rows of e]  = X_e W_e^T      X in 1x128 tiles, W [E, N, K] in 128x128 blocks
  dgrad     dX[rows of e] = dY_e W_e       dY in 1x128 tiles, W^T [E, K, N] (the forward's cached copy)
  wgrad     dW[e]         = dY_e^T X_e     both in 128x1 token tiles restarting at each expert's first row
Each 128-element slice of K (of the tokens, for wgrad) is one FP8 dot product whose fp32 result is
multiplied by the two scales and added into an fp32 accumulator: V3 §3.3.2's promotion every
N_C = 128 elements. Token counts stay on the device: segment offsets are cumulative sums computed
there, the grids are sized by upper bounds (T/128 + E tiles), and a program past the last tile
returns at once, so there is no .item()/.tolist() anywhere.

  quant_blocks_t(w)           (W, s) and (W^T, s^T): both layouts of the 128x128 blocks in one pass
  quant_rows(x)               x's 1x128 tiles (the forward's activation operand)
  quant_dual(x, offs, ...)    one pass over x [T, C]: its 1x128 row tiles (dgrad) and its per-segment
                              128x1 token tiles, stored transposed [C, T] (wgrad); x may be E4M3 with
                              its 1x128 scales (the cached input, re-tiled: V3 §3.3.3)
  grouped_gemm(a, b, offs)    C = A_e B_e^T per segment (forward and dgrad)
  grouped_wgrad(dyt, xt, offs) dW[e] = sum over e's token tiles

Every E4M3 value is rounded explicitly to nearest-even (`_e4m3`) before the cast, which is then exact:
the same bits as torch's cast on GPU, and under Triton's CPU interpreter (TRITON_INTERPRET=1),
whose own float->fp8 conversion drops the carry into the exponent (-0.4945 -> -0.25).
The CPU reference is parallel/fp8.py's emulation; tests/test_fp8_grouped.py checks these kernels
against it under the interpreter, tests/test_fp8_cuda.py on a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fp8_kernels import _scale_of   # the quantisers' scale rule, one definition

TILE_K = 128


# -- E4M3 rounding ------------------------------------------------------------------------------------------
@triton.jit
def _e4m3(q):
    """The E4M3 bit pattern (uint8) of q (fp32, already clamped to +-448), rounded to nearest, ties to
    even: 3 mantissa bits in the normal range (|q| >= 2^-6), multiples of 2^-9 below it; NaN -> 0x7F
    with q's sign, -0 stays -0. Written out in integer arithmetic, so the interpreter gives the
    hardware cast's bits (its own float->fp8 conversion loses carries and NaNs)."""
    bits = q.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    bi = bits.to(tl.int32, bitcast=True)
    normal = ((((bi >> 23) & 0xFF) - 120) << 3) | ((bi >> 20) & 7)
    sub = ((tl.abs(q) + 24576.0) - 24576.0) * 512.0     # 1.5 * 2^14: its fp32 ulp is 2^-9 on both sides
    code = tl.where(tl.abs(q) >= 0.015625, normal, sub.to(tl.int32))
    code = tl.where(q != q, 0x7F, code) | ((q.to(tl.int32, bitcast=True) >> 24) & 0x80)
    return code.to(tl.uint8)


@triton.jit
def _from_e4m3(b):
    """fp32 value of E4M3 bit patterns b (uint8), decoded in integer arithmetic (exact; 0x7F/0xFF NaN)."""
    b = b.to(tl.int32)
    e, m = (b >> 3) & 0xF, b & 7
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, (8 + m).to(tl.float32) * tl.exp2((e - 10).to(tl.float32)))
    mag = tl.where((b & 0x7F) == 0x7F, float("nan"), mag)
    return (mag.to(tl.uint32, bitcast=True) | ((b & 0x80).to(tl.uint32) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _round_kernel(x_ptr, q_ptr, n, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    m = i < n
    tl.store(q_ptr + i, _e4m3(tl.load(x_ptr + i, mask=m, other=0.0)), mask=m)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """`_e4m3` on a tensor (fp32 within +-448): the E4M3 values, for checking the rounding itself."""
    x = x.float().contiguous()
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    if x.numel():
        _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, q.view(torch.uint8), x.numel(), B=1024)
    return q


@triton.jit
def _quantize(x, s):
    q = tl.minimum(tl.maximum(tl.div_rn(x, s), -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    return _e4m3(q)     # stored through uint8 views of the E4M3 tensors


@triton.jit
def _segment_of(tile, tile_offs_ptr, E):
    """The segment (expert) holding global tile `tile`: tile_offs [E + 1] are cumulative tile counts."""
    e = tile * 0
    for i in range(E):
        e += (tile >= tl.load(tile_offs_ptr + i + 1)).to(tl.int32)
    return e


# -- quantisers ----------------------------------------------------------------------------------------------
@triton.jit
def _quant_blocks_t_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, nb_n, nb_k, floor, inv,
                           POW2: tl.constexpr):
    pid_b, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * 128 + tl.arange(0, 128)
    cols = pid_k * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    base = pid_b.to(tl.int64) * N * K
    w = tl.load(w_ptr + base + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    amax = tl.where(tl.sum(tl.sum((w != w).to(tl.int32), axis=1), axis=0) > 0, float("nan"), amax)
    s = _scale_of(amax, floor, inv, POW2)
    q = _quantize(w, s)
    tl.store(q_ptr + base + rows[:, None] * K + cols[None, :], q, mask=mask)
    tl.store(qt_ptr + base + cols[None, :] * N + rows[:, None], q, mask=mask)     # W^T [K, N], for dgrad
    tl.store(s_ptr + (pid_b * nb_n + pid_n) * nb_k + pid_k, s)
    tl.store(st_ptr + (pid_b * nb_k + pid_k) * nb_n + pid_n, s)


@triton.jit
def _quant_dual_kernel(x_ptr, xs_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, row_offs_ptr, tile_offs_ptr,
                       E, C, n_row_tiles, xs_tiles, st_stride, floor, inv,
                       ROWS: tl.constexpr, COLS: tl.constexpr, DEQUANT: tl.constexpr, POW2: tl.constexpr):
    tile, pid_c = tl.program_id(0), tl.program_id(1)
    if tile >= tl.load(tile_offs_ptr + E):
        return
    e = _segment_of(tile, tile_offs_ptr, E)
    r0 = tl.load(row_offs_ptr + e) + (tile - tl.load(tile_offs_ptr + e)) * 128
    r1 = tl.load(row_offs_ptr + e + 1)
    rows = r0 + tl.arange(0, 128)
    cols = pid_c * 128 + tl.arange(0, 128)
    mask = (rows[:, None] < r1) & (cols[None, :] < C)
    if DEQUANT:   # the cached FP8 input (as uint8) with its 1x128 scales: dequantized, re-tiled (V3 §3.3.3)
        x = _from_e4m3(tl.load(x_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0))
        xs = tl.load(xs_ptr + rows * xs_tiles + pid_c, mask=rows < r1, other=1.0)
        x = x * xs[:, None]
    else:
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    nan = x != x
    if ROWS:      # 1x128 tiles along C (dgrad's operand)
        amax = tl.max(tl.abs(x), axis=1)
        amax = tl.where(tl.sum(nan.to(tl.int32), axis=1) > 0, float("nan"), amax)
        s = _scale_of(amax, floor, inv, POW2)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], _quantize(x, s[:, None]), mask=mask)
        tl.store(s_ptr + rows * n_row_tiles + pid_c, s, mask=rows < r1)
    if COLS:      # 128x1 tiles along this segment's tokens (wgrad's operand), stored transposed [C, T]
        amax = tl.max(tl.abs(x), axis=0)
        amax = tl.where(tl.sum(nan.to(tl.int32), axis=0) > 0, float("nan"), amax)
        s = _scale_of(amax, floor, inv, POW2)
        qt = tl.trans(_quantize(x, s[None, :]))
        T = tl.load(row_offs_ptr + E)
        tl.store(qt_ptr + cols[:, None].to(tl.int64) * T + rows[None, :], qt,
                 mask=(cols[:, None] < C) & (rows[None, :] < r1))
        tl.store(st_ptr + cols * st_stride + tile, s, mask=cols < C)


# -- GEMMs ---------------------------------------------------------------------------------------------------
@triton.jit
def _grouped_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, row_offs_ptr, tile_offs_ptr, E, N, K,
                         s_am, s_asm, s_be, s_bn, s_bse, s_bsn, s_bsk, s_cm,
                         BM: tl.constexpr, BN: tl.constexpr, OUT_BF16: tl.constexpr):
    """C[rows of e, :] = A[rows of e] B[e]^T; A [T, K] 1x128 tiles (scales [T, ceil(K/128)]), B [E, N, K]
    in 128x128 blocks (scales [E, ceil(N/128), ceil(K/128)]). BN divides 128."""
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    if tile >= tl.load(tile_offs_ptr + E):
        return
    e = _segment_of(tile, tile_offs_ptr, E)
    r0 = tl.load(row_offs_ptr + e) + (tile - tl.load(tile_offs_ptr + e)) * BM
    r1 = tl.load(row_offs_ptr + e + 1)
    rows = r0 + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, 128)
    rmask, cmask = rows < r1, cols < N
    a_row = a_ptr + rows[:, None].to(tl.int64) * s_am
    b_row = b_ptr + e.to(tl.int64) * s_be + cols[:, None].to(tl.int64) * s_bn
    bs_base = bs_ptr + e * s_bse + (pid_n * BN // 128) * s_bsn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, 128)):
        kk = kb * 128 + ks
        a = tl.load(a_row + kk[None, :], mask=rmask[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(b_row + kk[None, :], mask=cmask[:, None] & (kk[None, :] < K), other=0.0)
        part = tl.dot(a, tl.trans(b), out_dtype=tl.float32)          # one 128-deep FP8 slice
        sa = tl.load(as_ptr + rows * s_asm + kb, mask=rmask, other=0.0)
        sb = tl.load(bs_base + kb * s_bsk)
        acc += part * (sa[:, None] * sb)                           # promoted to fp32 (V3 §3.3.2)
    out = acc.to(tl.bfloat16) if OUT_BF16 else acc
    tl.store(c_ptr + rows[:, None].to(tl.int64) * s_cm + cols[None, :], out, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _grouped_wgrad_kernel(dyt_ptr, dys_ptr, xt_ptr, xs_ptr, dw_ptr, row_offs_ptr, tile_offs_ptr, N, K,
                          s_dys, s_xs, BN: tl.constexpr, BK: tl.constexpr):
    """dW[e] = sum over e's 128-token tiles j of (dY^T_j X_j) * s_dy[:, j] s_x[:, j]; dY^T [N, T] and
    X^T [K, T] in 128x1 token tiles (scales [N, tiles], [K, tiles]); dW fp32 [E, N, K]."""
    pid_n, pid_k, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    T = tl.load(row_offs_ptr + tl.num_programs(2))
    r0, r1 = tl.load(row_offs_ptr + e), tl.load(row_offs_ptr + e + 1)
    t0 = tl.load(tile_offs_ptr + e)
    ns = pid_n * BN + tl.arange(0, BN)
    ks = pid_k * BK + tl.arange(0, BK)
    nmask, kmask = ns < N, ks < K
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for j in range(0, tl.cdiv(r1 - r0, 128)):
        ts = r0 + j * 128 + tl.arange(0, 128)
        tmask = ts < r1
        dy = tl.load(dyt_ptr + ns[:, None].to(tl.int64) * T + ts[None, :], mask=nmask[:, None] & tmask[None, :],
                     other=0.0)
        x = tl.load(xt_ptr + ks[:, None].to(tl.int64) * T + ts[None, :], mask=kmask[:, None] & tmask[None, :],
                    other=0.0)
        part = tl.dot(dy, tl.trans(x), out_dtype=tl.float32)
        sdy = tl.load(dys_ptr + ns * s_dys + t0 + j, mask=nmask, other=0.0)
        sx = tl.load(xs_ptr + ks * s_xs + t0 + j, mask=kmask, other=0.0)
        acc += part * (sdy[:, None] * sx[None, :])                 # promoted to fp32 per token tile
    tl.store(dw_ptr + e.to(tl.int64) * N * K + ns[:, None] * K + ks[None, :], acc,
             mask=nmask[:, None] & kmask[None, :])


# -- Python wrappers ------------------------------------------------------------------------------------------
def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def offsets(counts: torch.Tensor, rows_per_tile: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(row offsets [E+1], tile offsets [E+1]) of the segments, int32 on counts' device: no host sync."""
    c = counts.to(torch.int32)
    zero = c.new_zeros(1)
    rows = torch.cat([zero, torch.cumsum(c, 0, dtype=torch.int32)])
    tiles = torch.cat([zero, torch.cumsum((c + rows_per_tile - 1) // rows_per_tile, 0, dtype=torch.int32)])
    return rows, tiles


def max_tiles(t: int, e: int, rows_per_tile: int = 128) -> int:
    """An upper bound on sum_e ceil(count_e / rows_per_tile) knowing only T and E (no host sync)."""
    return t // rows_per_tile + e if e > 1 else triton.cdiv(t, rows_per_tile)


def quant_blocks_t(w: torch.Tensor, floor: float, inv: float, pow2: bool = False):
    """w [..., N, K] -> (E4M3 [..., N, K], scales [..., nN, nK]) and the transposed copy (E4M3 [..., K, N],
    scales [..., nK, nN]) in one pass: the forward quantises once, dgrad reads the transpose."""
    w = w.contiguous()
    n, k = w.shape[-2:]
    batch = w.numel() // (n * k) if w.numel() else 0
    nb_n, nb_k = triton.cdiv(n, 128), triton.cdiv(k, 128)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    qt = torch.empty(*w.shape[:-2], k, n, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(*w.shape[:-2], nb_n, nb_k, dtype=torch.float32, device=w.device)
    st = torch.empty(*w.shape[:-2], nb_k, nb_n, dtype=torch.float32, device=w.device)
    if batch:
        _quant_blocks_t_kernel[(batch, nb_n, nb_k)](w, q.view(torch.uint8), s, qt.view(torch.uint8), st, n, k,
                                                     nb_n, nb_k, floor, inv, POW2=pow2, num_warps=8)
    return (q, s), (qt, st)


def quant_dual(x: torch.Tensor, row_offs: torch.Tensor, tile_offs: torch.Tensor, n_tiles: int, floor: float,
               inv: float, pow2: bool = False, rows: bool = True, cols: bool = True,
               row_scale: torch.Tensor | None = None):
    """One pass over x [T, C] (segments given by the offsets; one segment for a dense layer):
    rows=True: its 1x128 tiles along C, E4M3 [T, C] and scales [T, ceil(C/128)] (dgrad's operand);
    cols=True: its 128x1 tiles along each segment's tokens, stored transposed, E4M3 [C, T] and scales
    [C, n_tiles] (wgrad's operand; columns past the segments' tiles are left unset).
    row_scale: x is E4M3 with these 1x128 scales (the cached input: dequantized and re-tiled)."""
    x = x.contiguous()
    t, c = x.shape
    e = row_offs.numel() - 1
    x_in = x.view(torch.uint8) if row_scale is not None else x
    nc = triton.cdiv(c, 128)
    q = torch.empty(t, c, dtype=torch.float8_e4m3fn, device=x.device) if rows else None
    s = torch.empty(t, nc, dtype=torch.float32, device=x.device) if rows else None
    qt = torch.empty(c, t, dtype=torch.float8_e4m3fn, device=x.device) if cols else None
    st = torch.empty(c, n_tiles, dtype=torch.float32, device=x.device) if cols else None
    any_q, any_s = (q, s) if rows else (qt, st)
    xs = row_scale.contiguous() if row_scale is not None else any_s
    if t and c and n_tiles:
        qb, qtb = (any_q if q is None else q).view(torch.uint8), (any_q if qt is None else qt).view(torch.uint8)
        _quant_dual_kernel[(n_tiles, nc)](x_in, xs, qb, any_s, qtb, st if cols else any_s,
                                          row_offs, tile_offs, e, c, nc, xs.shape[-1], n_tiles, floor, inv,
                                          ROWS=rows, COLS=cols, DEQUANT=row_scale is not None, POW2=pow2,
                                          num_warps=8)
    return (q, s), (qt, st)


def _block_m(t: int, e: int) -> int:
    return 64 if interpreted() or t < 128 * e else 128


def grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 row_offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """C [T, N]: the rows of segment e of A [T, K] (1x128 tiles) times B[e]^T, B [E, N, K] contiguous in
    128x128 blocks. Rows past the last segment are left zero."""
    t, k = a.shape
    n_exp, n = b.shape[0], b.shape[1]
    c = torch.zeros(t, n, dtype=out_dtype, device=a.device)
    if not (t and n and k):
        return c
    bm = _block_m(t, n_exp)
    counts = row_offs[1:] - row_offs[:-1]
    _, tile_offs = offsets(counts, bm)
    bn = 64 if interpreted() else 128
    a, b = a.contiguous(), b.contiguous()
    grid = (max_tiles(t, n_exp, bm), triton.cdiv(n, bn))
    _grouped_gemm_kernel[grid](a, a_scale.contiguous(), b, b_scale.contiguous(), c, row_offs, tile_offs, n_exp, n, k,
                               a.stride(0), a_scale.stride(0), b.stride(0), b.stride(1), b_scale.stride(0),
                               b_scale.stride(1), b_scale.stride(2), c.stride(0), BM=bm, BN=bn,
                               OUT_BF16=out_dtype == torch.bfloat16, num_warps=8, num_stages=3)
    return c


def grouped_wgrad(dyt: torch.Tensor, dy_scale: torch.Tensor, xt: torch.Tensor, x_scale: torch.Tensor,
                  row_offs: torch.Tensor, tile_offs: torch.Tensor) -> torch.Tensor:
    """dW [E, N, K] fp32 from dY^T [N, T] and X^T [K, T] in per-segment 128x1 token tiles."""
    n, t = dyt.shape
    k = xt.shape[0]
    n_exp = row_offs.numel() - 1
    dw = torch.zeros(n_exp, n, k, dtype=torch.float32, device=dyt.device)
    if not (t and n and k and n_exp):
        return dw
    bn, bk = (64, 64) if interpreted() else (128, 128)
    _grouped_wgrad_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk), n_exp)](
        dyt, dy_scale, xt, x_scale, dw, row_offs, tile_offs, n, k, dy_scale.stride(0), x_scale.stride(0),
        BN=bn, BK=bk, num_warps=8, num_stages=3)
    return dw


_DENSE_OFFSETS: dict = {}


def _dense_offsets(t: int, device: torch.device):
    """One segment's offsets, made once per (T, device): a host-to-device copy per call would stall."""
    key = (t, str(device))
    if key not in _DENSE_OFFSETS:
        if len(_DENSE_OFFSETS) > 64:
            _DENSE_OFFSETS.clear()
        _DENSE_OFFSETS[key] = (torch.tensor([0, t], dtype=torch.int32, device=device),
                               torch.tensor([0, triton.cdiv(t, 128)], dtype=torch.int32, device=device))
    return _DENSE_OFFSETS[key]


def quant_both(x: torch.Tensor, floor: float, inv: float, pow2: bool = False, rows: bool = True, cols: bool = True,
               row_scale: torch.Tensor | None = None):
    """A dense layer's operand x [T, C] (one segment) in one pass: its 1x128 tiles (as fp8.quantize(x, TILE))
    and its 128x1 tiles stored as x^T (as fp8.quantize_t(x)); each pair None when not asked for."""
    t = x.shape[0]
    nt = triton.cdiv(t, 128)
    ro, to = _dense_offsets(t, x.device)
    r, c = quant_dual(x, ro, to, nt, floor, inv, pow2, rows=rows, cols=cols, row_scale=row_scale)
    return (r if rows else None), (c if cols else None)


def quant_rows(x: torch.Tensor, floor: float, inv: float, pow2: bool = False):
    """x [T, C] -> its 1x128 tiles only (E4M3 [T, C], scales [T, ceil(C/128)]), as fp8.quantize(x, TILE)."""
    return quant_both(x, floor, inv, pow2, cols=False)[0]


# -- the routed experts' autograd function ---------------------------------------------------------------------
class GroupedFp8MM(torch.autograd.Function):
    """Rows of x sorted by expert (counts on the device) times w[e]^T, all three GEMMs in FP8, one launch
    each: the recipe of parallel/fp8.py's `_Fp8GroupedMM`, whose emulation is the reference."""

    @staticmethod
    def forward(ctx, x, w, counts, floor, inv, pow2):
        from .fp8 import Fp8Rows
        row_offs, tile_offs = offsets(counts)
        # the FP8 copy kept for backward (V3 §3.3.3): as dispatched (FP8 dispatch, the same bits), else made here
        xq, xs = (x.fp8.data, x.fp8.scale) if isinstance(x, Fp8Rows) else quant_rows(x, floor, inv, pow2)
        (wq, ws), (wqt, wst) = quant_blocks_t(w, floor, inv, pow2)
        y = grouped_gemm(xq, xs, wq, ws, row_offs, _gemm_dtype(x.dtype)).to(x.dtype)
        ctx.save_for_backward(xq, xs, wqt, wst, row_offs, tile_offs)   # W^T cached: dgrad needs no transpose
        ctx.meta = (floor, inv, pow2, w.dtype, x.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wqt, wst, row_offs, tile_offs = ctx.saved_tensors
        floor, inv, pow2, w_dtype, x_dtype = ctx.meta
        n_tiles = max_tiles(xq.shape[0], row_offs.numel() - 1)
        # dY once: 1x128 tiles for dgrad and per-expert 128x1 token tiles for wgrad (App. B.2: never blocks)
        (dq, ds), (dqt, dst) = quant_dual(dy, row_offs, tile_offs, n_tiles, floor, inv, pow2)
        dx = grouped_gemm(dq, ds, wqt, wst, row_offs, _gemm_dtype(x_dtype)).to(x_dtype)
        _, (xqt, xst) = quant_dual(xq, row_offs, tile_offs, n_tiles, floor, inv, pow2, rows=False, row_scale=xs)
        dw = grouped_wgrad(dqt, dst, xqt, xst, row_offs, tile_offs)
        return dx, dw.to(w_dtype), None, None, None, None


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, floor: float, inv: float,
                   pow2: bool = False) -> torch.Tensor:
    """The experts' grouped GEMM (x [T, K] sorted by expert, w [E, N, K], counts [E] on x's device) in FP8,
    with no host synchronisation: a row-count mismatch is caught on the device."""
    torch._assert_async(counts.sum() == x.shape[0])
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    return GroupedFp8MM.apply(x, w, counts, floor, inv, pow2)


# -- other grouped blockwise kernels: detected at run time, never required ---------------------------------------
def alternatives(device: torch.device | str = "cuda") -> dict:
    """What else could run the experts' blockwise grouped GEMM here, for the benchmark's record:
    DeepGEMM (`import deep_gemm`) and torch's `F.scaled_grouped_mm` with 1x128 / 128x128 scales (torch
    2.11-2.13 take only row-wise and MX scales there; probed with one tiny call). The Triton kernels
    above stay the path until one of these is wired behind WHALETRON_FP8_GROUPED and measured faster:
    DeepGEMM wants each expert's rows padded to 128 and its own (TMA-aligned) scale layout."""
    out = {"deep_gemm": None, "torch_blockwise_grouped": None}
    try:
        import deep_gemm
        out["deep_gemm"] = getattr(deep_gemm, "__version__", "present")
    except Exception as e:   # ImportError, or a build for another CUDA
        out["deep_gemm_error"] = f"{type(e).__name__}: {e}"[:300]
    device = torch.device(device)
    fn = getattr(torch.nn.functional, "scaled_grouped_mm", None)
    st = getattr(torch.nn.functional, "ScalingType", None)
    if fn is None or st is None or device.type != "cuda" or not torch.cuda.is_available():
        out["torch_blockwise_grouped_error"] = "needs CUDA and F.scaled_grouped_mm with F.ScalingType"
        return out
    try:
        e, m, n, k = 2, 256, 128, 256
        a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(e, n, k, device=device).to(torch.float8_e4m3fn)
        sa = torch.ones(k // 128, m, device=device).t()
        sb = torch.ones(e, k // 128, n // 128, device=device)
        offs = torch.tensor([128, 256], dtype=torch.int32, device=device)
        fn(a, b.transpose(-2, -1), sa, st.BlockWise1x128, sb, st.BlockWise128x128, offs=offs,
           output_dtype=torch.bfloat16)
        out["torch_blockwise_grouped"] = True
    except Exception as exc:
        out["torch_blockwise_grouped"] = False
        out["torch_blockwise_grouped_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def compile_for_hopper(arch: int = 90) -> dict[str, dict]:
    """Compile every kernel above for an sm_<arch> GPU without one (Triton's ahead-of-time path: needs no
    driver, only the ptxas Triton ships). Returns per kernel whether its PTX uses Hopper's wgmma and its
    shared memory. CI calls it so a kernel that would not compile for the H100/H200 fails here first."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(fn, types: dict, consts: dict, **options):
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        return dict(wgmma="wgmma.mma_async" in k.asm["ptx"], shared=k.metadata.shared)

    ptrs = dict(row_offs_ptr="*i32", tile_offs_ptr="*i32", floor="fp32", inv="fp32")
    out = {}
    for out_bf16 in (True, False):
        out[f"grouped_gemm_{'bf16' if out_bf16 else 'fp32'}"] = build(
            _grouped_gemm_kernel, dict(ptrs, a_ptr="*fp8e4nv", as_ptr="*fp32", b_ptr="*fp8e4nv", bs_ptr="*fp32",
                                       c_ptr="*bf16" if out_bf16 else "*fp32"),
            dict(BM=128, BN=128, OUT_BF16=out_bf16), num_warps=8, num_stages=3)
    out["grouped_wgrad"] = build(_grouped_wgrad_kernel, dict(ptrs, dyt_ptr="*fp8e4nv", dys_ptr="*fp32",
                                                             xt_ptr="*fp8e4nv", xs_ptr="*fp32", dw_ptr="*fp32"),
                                 dict(BN=128, BK=128), num_warps=8, num_stages=3)
    for rows, cols, deq in ((True, True, False), (True, False, False), (False, True, True)):
        out[f"quant_dual_{int(rows)}{int(cols)}{int(deq)}"] = build(
            _quant_dual_kernel, dict(ptrs, x_ptr="*u8" if deq else "*bf16", xs_ptr="*fp32", q_ptr="*u8", s_ptr="*fp32",
                                     qt_ptr="*u8", st_ptr="*fp32"),
            dict(ROWS=rows, COLS=cols, DEQUANT=deq, POW2=False), num_warps=8)
    out["quant_blocks_t"] = build(_quant_blocks_t_kernel, dict(ptrs, w_ptr="*bf16", q_ptr="*u8", s_ptr="*fp32",
                                                               qt_ptr="*u8", st_ptr="*fp32"), dict(POW2=True),
                                  num_warps=8)
    return out
