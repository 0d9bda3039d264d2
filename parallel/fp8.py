"""DeepSeek-V3's fine-grained FP8 training recipe (V3 §3.3, Appendix B) as a linear backend.

    apply_fp8(model, Fp8Recipe(backend="auto"))   # before FSDP2; tp/ep/pp applied as usual

The recipe, the same in every backend:
  - E4M3 on every tensor (max 448), scales from the online max-abs of each group (§3.3.2);
  - activations and activation gradients in 1x128 tiles along the GEMM's inner dimension,
    weights in 128x128 blocks (§3.3.2, Fig. 7a); activation gradients are never put in 128x128
    blocks, which diverged on a 16B MoE (App. B.2);
  - Fprop, Dgrad and Wgrad all in FP8 with FP32 accumulation (§3.3.1, Fig. 6); the outputs are
    the activations' dtype (Fprop, Dgrad) and fp32 (Wgrad, cast to the parameter's dtype);
  - the layer's input is cached for backward in FP8 (its 1x128 tiles, §3.3.3) and re-tiled to
    128x1 for Wgrad: dequantized and quantized again along the token dimension;
  - embedding, output head, MoE gating, norms and attention stay in high precision: only
    nn.Linear-like layers and routed-expert GEMMs are converted, the vocab-parallel head is not.

Backends, all computing C = A @ B^T from FP8 A [M, K] and B [N, K] with per-group scales:
  emulate  dequantize, fp32 matmul: exact products, fp32 sums; runs anywhere, the reference;
  torch    `torch.nn.functional.scaled_mm` with BlockWise1x128 / BlockWise128x128 scales on CUDA
           (Hopper); where the build lacks them, row-wise scales, with a warning naming the gap;
A dimension that is not a multiple of 128 gives a partial tile or block at the edge, scaled by
its own max-abs (zero padding, which leaves every max unchanged).

On CUDA (with Triton) the plumbing around the GEMMs is fused (parallel/fp8_grouped.py): W and its
transposed FP8 copy come from one pass and the copy is cached for Dgrad; dY's 1x128 tiles (Dgrad) and
128x1 tiles (Wgrad) come from one pass; the routed experts run all three GEMMs as one grouped Triton
launch each with the token counts kept on the device. The values are the emulation's: quantisers bit
for bit, GEMMs up to the order of fp32 sums. `Fp8Recipe.keep_bf16` / BF16_BELOW keep the linears too
small for FP8 to pay in BF16; `apply_fp8` reports them.
"""
from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tensor_parallel import RowParallelLinear, exit_region

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
INV_E4M3_MAX = 1.0 / E4M3_MAX   # s = amax * (1/448): one fp32 multiply, the same on every device
TILE = (1, 128)      # activations and activation gradients (per token per 128 channels)
BLOCK = (128, 128)   # weights (per 128 input x 128 output channels)
AMAX_FLOOR = 1e-12   # an all-zero (or denormal) group gets a finite scale and quantizes to zeros
BACKENDS = ("auto", "emulate", "torch")


class Fp8Error(ValueError):
    pass


# Which linears stay BF16: FP8 pays only when the GEMM saved outweighs the quantisations and transposes it
# adds (torchao likewise keeps BF16 below a size). Rule: a linear whose smaller side, min(in, out), is below
# BF16_BELOW[backend] stays BF16. Data, not code: MEASURE IT ON THE GPU (benchmarks/gpu_proxy.py's per-shape
# table) and edit it. The 4096 is from one H100 run with the unfused plumbing (docs/fp8.md, 8192 tokens):
# 7168 <-> 2048 ran at 0.52-0.64x BF16 forward+backward, 7168 <-> 18432 at 1.14-1.15x. The emulation (the
# numerical reference) converts every linear. Routed experts are always FP8 (one grouped kernel, V3 §3.3).
BF16_BELOW = {"emulate": 0, "torch": 4096}
ALIGN = 16   # cuBLAS FP8 wants K and N multiples of 16 bytes; other shapes pay a padding copy each call


@dataclass(frozen=True)
class Fp8Recipe:
    backend: str = "auto"            # auto | emulate | torch
    pow2_scales: bool = False        # round scales up to powers of two (V3 §3.3.3's re-tiled activations)
    bf16_below: int | None = None    # keep linears with min(in, out) below this in BF16; None: BF16_BELOW's

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise Fp8Error(f"unknown FP8 backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")

    def keep_bf16(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> str | None:
        """Why a linear of this shape stays BF16 under this recipe, or None when it goes FP8."""
        backend = self.backend
        if backend == "auto":
            backend = "torch" if (torch.device(device).type if device is not None else
                                  ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" else "emulate"
        below = BF16_BELOW[backend] if self.bf16_below is None else self.bf16_below
        if min(in_features, out_features) < below:
            return f"min(in, out) = {min(in_features, out_features)} < {below}: quantisation costs more than FP8 saves"
        if backend == "torch" and (in_features % ALIGN or out_features % ALIGN):
            return f"{in_features} x {out_features} is not {ALIGN}-aligned for the FP8 GEMM"
        return None


# -- quantization -------------------------------------------------------------------------------------
def _grouped_view(x: torch.Tensor, group: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """x [..., R, C] zero-padded to whole groups and viewed as [..., R/gr, gr, C/gc, gc]."""
    gr, gc = group
    r, c = x.shape[-2:]
    pr, pc = -r % gr, -c % gc
    if pr or pc:
        x = F.pad(x, (0, pc, 0, pr))
    return x.unflatten(-1, (-1, gc)).unflatten(-3, (-1, gr)), (r, c)


def quantize(x: torch.Tensor, group: tuple[int, int], pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 values of x [..., R, C] and fp32 dequantization scales [..., ceil(R/gr), ceil(C/gc)],
    one per (gr x gc) group: s = max|x_group| / 448, q = x / s (V3 §3.3.2, online max-abs).
    A non-finite element makes its whole group NaN after dequantization: never a silent finite.
    On CUDA the 1x128 and 128x128 cases run as one Triton kernel each, bit-identical to this."""
    if x.dim() < 2:
        raise Fp8Error(f"FP8 quantization needs a tensor of at least 2 dimensions, got shape {tuple(x.shape)}")
    kernels = _kernels(x)
    if kernels and group == BLOCK:
        return kernels.quant_blocks(x, AMAX_FLOOR, INV_E4M3_MAX, pow2_scales)
    if kernels and group == TILE and x.dim() == 2:
        return kernels.quant_rows(x, AMAX_FLOOR, INV_E4M3_MAX, pow2_scales)
    return quantize_torch(x, group, pow2_scales)


def quantize_torch(x: torch.Tensor, group: tuple[int, int], pow2_scales: bool = False):
    """`quantize` in plain torch ops: the reference, and the path on CPU."""
    v, (r, c) = _grouped_view(x.float(), group)
    scale = v.abs().amax(dim=(-3, -1)).clamp(min=AMAX_FLOOR) * INV_E4M3_MAX
    if pow2_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (v / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    q = q.flatten(-4, -3).flatten(-2, -1)[..., :r, :c]
    return q.contiguous(), scale


def quantize_t(x: torch.Tensor, pow2: bool = False, row_scale: torch.Tensor | None = None) -> "Fp8Tensor":
    """x^T [C, R] in 1x128 tiles along R (128x1 tiles of x), for Wgrad. x [R, C] is high precision,
    or E4M3 with its 1x128 `row_scale`: the cached input, dequantized and quantized again."""
    kernels = _kernels(x)
    if kernels:
        return Fp8Tensor(*kernels.quant_t(x, AMAX_FLOOR, INV_E4M3_MAX, row_scale, pow2), TILE)
    if row_scale is not None:
        x = dequantize(x, row_scale, TILE)
    return Fp8Tensor(*quantize_torch(x.t(), TILE, pow2), TILE)


_KERNELS = None
_FUSED = None        # parallel.fp8_grouped once imported; False when Triton is missing
FUSED_ON_CPU = None  # tests set the module here to run the fused plumbing interpreted on CPU tensors


def _fused(x: torch.Tensor):
    """The fused Triton quantisers and grouped GEMMs (parallel/fp8_grouped.py) for x's device, else None.
    WHALETRON_FP8_FUSED=0 turns them off (the per-GEMM plumbing, for A/B timing)."""
    global _FUSED
    if FUSED_ON_CPU is not None and not x.is_cuda:
        return FUSED_ON_CPU
    if not x.is_cuda or os.environ.get("WHALETRON_FP8_FUSED", "1") == "0":
        return None
    if _FUSED is None:
        try:
            from . import fp8_grouped
            _FUSED = fp8_grouped
        except ImportError:
            _FUSED = False
    return _FUSED or None


def _kernels(x: torch.Tensor):
    """The Triton kernels module when x is on CUDA and Triton is importable, else None."""
    global _KERNELS
    if not x.is_cuda:
        return None
    if _KERNELS is None:
        try:
            from . import fp8_kernels
            _KERNELS = fp8_kernels
        except ImportError:
            _KERNELS = False
    return _KERNELS or None


def dequantize(q: torch.Tensor, scale: torch.Tensor, group: tuple[int, int]) -> torch.Tensor:
    """fp32 q * s with each group's scale; the inverse of `quantize` up to E4M3 rounding."""
    v, (r, c) = _grouped_view(q.float(), group)
    return (v * scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)[..., :r, :c]


@dataclass
class Fp8Tensor:
    """FP8 data with the scale of each group; `t()` transposes data, scales and grouping (a
    128x128 block stays a block, which is why weights need no requantization for Dgrad)."""

    data: torch.Tensor
    scale: torch.Tensor
    group: tuple[int, int]

    @classmethod
    def of(cls, x: torch.Tensor, group: tuple[int, int], pow2: bool = False) -> "Fp8Tensor":
        return cls(*quantize(x, group, pow2), group)

    def t(self) -> "Fp8Tensor":
        return Fp8Tensor(self.data.transpose(-2, -1), self.scale.transpose(-2, -1), self.group[::-1])

    def float(self) -> torch.Tensor:
        return dequantize(self.data, self.scale, self.group)


class Fp8Rows(torch.Tensor):
    """Token rows that travelled as FP8 (V3 §3.3.3: the dispatch carries the 1x128-tile E4M3 activations the
    experts' up-projections consume): the tensor's values are their dequantization, `fp8` their tiles. Row
    indexing (the experts' sort by expert) gathers the tiles with the rows, and the routed experts' FP8
    GEMM takes `fp8` as its operand instead of quantizing again: quantizing a row needs only that row, so
    the result is the bits a destination quantizing the BF16 rows would get. Every other op gives a
    plain tensor."""

    fp8: "Fp8Tensor"

    @staticmethod
    def wrap(x: torch.Tensor, fp8: "Fp8Tensor") -> "Fp8Rows":
        out = x.as_subclass(Fp8Rows)   # the same storage and autograd history
        out.fp8 = fp8
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.__getitem__ and isinstance(args[0], Fp8Rows) \
                and isinstance(args[1], (torch.Tensor, slice)) and out.dim() == 2:   # rows only
            tiles = args[0].fp8
            return Fp8Rows.wrap(out, Fp8Tensor(tiles.data[args[1]], tiles.scale[args[1]], TILE))
        return out


def row_tiles(x: torch.Tensor, recipe: "Fp8Recipe") -> "Fp8Tensor":
    """x's 1x128 E4M3 tiles as the routed experts' FP8 GEMM would make them (those it carries, if any)."""
    return x.fp8 if isinstance(x, Fp8Rows) else Fp8Tensor.of(x.detach(), TILE, recipe.pow2_scales)


# -- GEMM backends: C = A @ B^T, A [M, K] in 1x128 tiles, B [N, K] in 1x128 tiles or 128x128 blocks ---
def spans(counts: list[int]):
    """(expert, first row, rows) of each non-empty segment."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, n
        start += n


class Backend(ABC):
    """C = A @ B^T from FP8 A [M, K] (1x128 tiles) and B [N, K] (1x128 tiles or 128x128 blocks),
    and the experts' grouped forms. The grouped ones default to one GEMM per expert."""

    name = ""

    @abstractmethod
    def gemm(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor: ...

    def grouped_gemm(self, a: Fp8Tensor, b: Fp8Tensor, counts: list[int], out_dtype) -> torch.Tensor:
        """Rows of a by expert times b[e]^T (b [E, N, K])."""
        outs = [self.gemm(Fp8Tensor(a.data[s:s + n], a.scale[s:s + n], a.group),
                          Fp8Tensor(b.data[e], b.scale[e], b.group), out_dtype) for e, s, n in spans(counts)]
        return _cat_rows(outs, a, b, out_dtype)

    def grouped_wgrad(self, dy: torch.Tensor, x: Fp8Tensor, counts: list[int], pow2: bool) -> torch.Tensor:
        """dW[e] = dY_e^T X_e with both in 128x1 token tiles inside expert e (x: the cached FP8
        input, re-tiled); fp32 [E, N, K]."""
        dw = dy.new_zeros(len(counts), dy.shape[1], x.data.shape[1], dtype=torch.float32)
        for e, s, n in spans(counts):
            dw[e] = self.gemm(quantize_t(dy[s:s + n], pow2),
                              quantize_t(x.data[s:s + n], pow2, row_scale=x.scale[s:s + n]), torch.float32)
        return dw


def _cat_rows(outs, a, b, out_dtype):
    if not outs:
        return a.data.new_zeros(a.data.shape[0], b.data.shape[-2], dtype=out_dtype)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class Emulated(Backend):
    """Exact FP8 arithmetic in plain torch: E4M3 x E4M3 products and their scaling are exact in
    fp32, so this is the recipe's value up to the order of fp32 sums. The reference."""

    name = "emulate"

    def gemm(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return (a.float() @ b.float().transpose(-2, -1)).to(out_dtype)

    def grouped_gemm(self, a, b, counts, out_dtype):
        ad, bd = a.float(), b.float()   # dequantize once, then one fp32 matmul per expert
        outs = [(ad[s:s + n] @ bd[e].t()).to(out_dtype) for e, s, n in spans(counts)]
        return _cat_rows(outs, a, b, out_dtype)

    def grouped_wgrad(self, dy, x, counts, pow2):
        # all experts' token tiles at once (one scatter-amax), then one fp32 matmul per expert
        dyd, xd = quantize_segments(dy, counts, pow2), quantize_segments(x.float(), counts, pow2)
        dw = dyd.new_zeros(len(counts), dyd.shape[1], xd.shape[1])
        for e, s, n in spans(counts):
            dw[e] = dyd[s:s + n].t() @ xd[s:s + n]
        return dw


class TorchScaledMM(Backend):
    """`F.scaled_mm` (cuBLAS/CUTLASS on Hopper): DeepSeek's blockwise scaling natively, with the
    inner-dimension scales applied in fp32 every 128 elements (V3 §3.3.2's N_C = 128 promotion).
    Shapes are zero-padded to the kernel's alignment (exact: padding never changes a group's max).
    Experts run one GEMM each: torch's `scaled_grouped_mm` takes row-wise or MX scales only."""

    name = "torch"

    def __init__(self):
        self.blockwise = hasattr(F, "ScalingType") and hasattr(F.ScalingType, "BlockWise1x128")
        if not self.blockwise:
            warnings.warn("this torch build has no blockwise FP8 scaled_mm (F.ScalingType.BlockWise1x128): "
                          "FP8 GEMMs use one scale per row of each operand (row-wise) instead of per "
                          "1x128 tile / 128x128 block; expect larger quantization error than V3's recipe",
                          stacklevel=2)

    def gemm(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        m, n = a.data.shape[0], b.data.shape[0]
        if not self.blockwise:
            return self._rowwise(a, b, out_dtype)
        ST = F.ScalingType
        ad, as_ = _pad_to(a.data, 128, 128).contiguous(), _pad_scales(a.scale, a.group, 128, 128)
        bd, bs = _pad_to(b.data, 128, 128).contiguous(), _pad_scales(b.scale, b.group, 128, 128)
        # cuBLAS wants A row-major, B column-major, 1x128 scales outer-dim-major (transposed in
        # memory), and the 128x128 scales of B as [K/128 rounded up to 4, N/128], K-major
        a_scale = as_.t().contiguous().t()
        if b.group == TILE:
            b_scale, b_recipe = bs.t().contiguous().t(), ST.BlockWise1x128
        else:
            b_scale = F.pad(bs.contiguous(), (0, -bs.shape[1] % 4), value=1.0).t()
            b_recipe = ST.BlockWise128x128
        out = F.scaled_mm(ad, bd.t(), a_scale, ST.BlockWise1x128, b_scale, b_recipe,
                          output_dtype=torch.float32 if out_dtype == torch.float32 else torch.bfloat16)
        return out[:m, :n].to(out_dtype)

    def _rowwise(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype):
        # the nearest scaling the build has: requantize each row of A and of B with one scale
        a2, b2 = (Fp8Tensor.of(x.float(), (1, x.data.shape[1])) for x in (a, b))
        ad, bd = _pad_to(a2.data, 16, 16), _pad_to(b2.data, 16, 16)
        sa = F.pad(a2.scale, (0, 0, 0, ad.shape[0] - a2.scale.shape[0]), value=1.0)
        sb = F.pad(b2.scale, (0, 0, 0, bd.shape[0] - b2.scale.shape[0]), value=1.0)
        out = torch._scaled_mm(ad, bd.t(), scale_a=sa.contiguous(), scale_b=sb.t().contiguous(),
                               out_dtype=torch.bfloat16 if out_dtype != torch.float32 else torch.float32)
        return out[: a.data.shape[0], : b.data.shape[0]].to(out_dtype)


def _pad_to(x: torch.Tensor, mult_r: int, mult_c: int) -> torch.Tensor:
    pr, pc = -x.shape[-2] % mult_r, -x.shape[-1] % mult_c
    if not (pr or pc):
        return x
    # fp8 has no pad kernel everywhere: pad its bytes
    return F.pad(x.view(torch.uint8), (0, pc, 0, pr)).view(x.dtype)


def _pad_scales(s: torch.Tensor, group, mult_r: int, mult_c: int) -> torch.Tensor:
    """Scales for the padded operand: padded rows (1xN tiles) get scale 1 on zero data."""
    rows = -(-s.shape[0] * group[0] // mult_r) * mult_r // group[0]
    cols = -(-s.shape[1] * group[1] // mult_c) * mult_c // group[1]
    return F.pad(s, (0, cols - s.shape[1], 0, rows - s.shape[0]), value=1.0)


_BACKENDS: dict[str, object] = {}


def get_backend(name: str, device: torch.device | str = "cpu"):
    """The GEMM backend for `name` on `device` ("auto": torch on CUDA, else emulate)."""
    device = torch.device(device)
    if name == "auto":
        name = "torch" if device.type == "cuda" else "emulate"
    if name == "torch" and device.type != "cuda":
        raise Fp8Error(f"FP8 backend 'torch' needs a CUDA device (this run is on {device.type}); "
                       "use train.fp8_backend=emulate on CPU")
    if name not in _BACKENDS:
        _BACKENDS[name] = Emulated() if name == "emulate" else TorchScaledMM()
    return _BACKENDS[name]


# -- the FP8 linear -------------------------------------------------------------------------------------
class _Fp8Linear(torch.autograd.Function):
    """y = x W^T with all three GEMMs in FP8 (V3 Fig. 6); x cached as its FP8 1x128 tiles."""

    @staticmethod
    def forward(ctx, x2d, weight, backend, recipe: Fp8Recipe):
        pow2, fused = recipe.pow2_scales, _fused(x2d)
        xq = Fp8Tensor.of(x2d, TILE, pow2)
        if fused:   # W and its transposed FP8 copy in one pass; dgrad reads the copy, no transpose there
            (wd, ws), (wtd, wts) = fused.quant_blocks_t(weight, AMAX_FLOOR, INV_E4M3_MAX, pow2)
            wq, wt = Fp8Tensor(wd, ws, BLOCK), Fp8Tensor(wtd, wts, BLOCK)
        else:
            wq = Fp8Tensor.of(weight, BLOCK, pow2)
            wt = wq.t()
        y = backend.gemm(xq, wq, x2d.dtype)                         # Fprop: [M,K] x [N,K]^T
        ctx.save_for_backward(xq.data, xq.scale, wt.data, wt.scale)
        ctx.backend, ctx.recipe, ctx.w_dtype, ctx.x_dtype = backend, recipe, weight.dtype, x2d.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xd, xs, wtd, wts = ctx.saved_tensors
        backend, pow2 = ctx.backend, ctx.recipe.pow2_scales
        dy = dy.contiguous()
        dx = dw = None
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fused = _fused(dy)
        if fused:   # one pass over dY: 1x128 tiles for Dgrad and 128x1 tiles (stored as dY^T) for Wgrad
            dy_rows, dy_t = fused.quant_both(dy, AMAX_FLOOR, INV_E4M3_MAX, pow2, rows=need_dx, cols=need_dw)
        else:
            dy_rows = Fp8Tensor.of(dy, TILE, pow2) if need_dx else None
            dy_t = quantize_t(dy, pow2) if need_dw else None
        if need_dx:   # Dgrad: dY in 1x128 tiles along N, W^T in (transposed) blocks
            dx = backend.gemm(Fp8Tensor(*dy_rows, TILE) if fused else dy_rows, Fp8Tensor(wtd, wts, BLOCK), ctx.x_dtype)
        if need_dw:   # Wgrad: dY^T and X^T in 1x128 tiles along the tokens (128x1 of dY, X)
            if fused:                                                 # the cached FP8 input, re-tiled
                _, x_t = fused.quant_both(xd, AMAX_FLOOR, INV_E4M3_MAX, pow2, rows=False, row_scale=xs)
                x_t, dy_t = Fp8Tensor(*x_t, TILE), Fp8Tensor(*dy_t, TILE)
            else:
                x_t = quantize_t(xd, pow2, row_scale=xs)
            dw = backend.gemm(dy_t, x_t, torch.float32).to(ctx.w_dtype)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe = Fp8Recipe()) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T under the blockwise FP8 recipe, in x's dtype."""
    backend = get_backend(recipe.backend, x.device)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)   # as F.linear would require; the fp32 master stays the optimizer's
    y = _Fp8Linear.apply(x.reshape(-1, x.shape[-1]), weight, backend, recipe)
    return y.view(*x.shape[:-1], weight.shape[0])


def quantize_segments(x: torch.Tensor, counts: list[int], pow2: bool = False) -> torch.Tensor:
    """x [T, C] quantized and dequantized (fp32) in 128x1 tiles that restart at each segment's first
    row (counts[e] rows per expert): Wgrad's token tiles never mix experts. All tiles in one pass."""
    tiles = [-(-n // TILE[1]) for n in counts]
    dev = x.device
    seg = torch.repeat_interleave(torch.arange(len(counts), device=dev), torch.tensor(counts, device=dev),
                                  output_size=sum(counts))
    starts = torch.tensor([sum(counts[:e]) for e in range(len(counts))], device=dev)
    bases = torch.tensor([sum(tiles[:e]) for e in range(len(counts))], device=dev)
    tile = bases[seg] + (torch.arange(sum(counts), device=dev) - starts[seg]) // TILE[1]
    v = x.float()
    amax = v.new_zeros(sum(tiles), v.shape[1]).scatter_reduce_(0, tile[:, None].expand_as(v), v.abs(), "amax")
    scale = amax.clamp(min=AMAX_FLOOR) * INV_E4M3_MAX
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return (v / scale[tile]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale[tile]


class _Fp8GroupedMM(torch.autograd.Function):
    """Routed experts: rows of x sorted by expert (counts[e] rows each) times w[e]^T, all three
    GEMMs in FP8. Token tiles (1x128 along the hidden dim) do not depend on the grouping; each
    expert's weight has its own 128x128 blocks; Wgrad's 128x1 token tiles stay inside an expert."""

    @staticmethod
    def forward(ctx, x, w, counts, backend, recipe: Fp8Recipe):
        xq = row_tiles(x, recipe)   # as dispatched (FP8 dispatch), else quantized here
        wq = Fp8Tensor.of(w, BLOCK, recipe.pow2_scales)            # [E, N, K]: blocks per expert
        y = backend.grouped_gemm(xq, wq, counts, x.dtype)
        ctx.save_for_backward(xq.data, xq.scale, wq.data, wq.scale)
        ctx.meta = (counts, backend, recipe, w.dtype, x.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        xd, xs, wd, ws = ctx.saved_tensors
        counts, backend, recipe, w_dtype, x_dtype = ctx.meta
        pow2 = recipe.pow2_scales
        dy = dy.contiguous()
        dx = backend.grouped_gemm(Fp8Tensor.of(dy, TILE, pow2), Fp8Tensor(wd, ws, BLOCK).t(), counts, x_dtype)
        dw = backend.grouped_wgrad(dy, Fp8Tensor(xd, xs, TILE), counts, pow2)
        return dx, dw.to(w_dtype), None, None, None


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                   recipe: Fp8Recipe = Fp8Recipe()) -> torch.Tensor:
    """The experts' grouped GEMM (x [T, K] sorted by expert, w [E, N, K]) under the FP8 recipe."""
    backend = get_backend(recipe.backend, x.device)
    fused = _fused(x) if backend.name == "torch" and os.environ.get("WHALETRON_FP8_GROUPED", "triton") == "triton" \
        else None
    if fused:   # all experts in one launch per GEMM, counts kept on the device (parallel/fp8_grouped.py)
        return fused.fp8_grouped_mm(x, w, counts, AMAX_FLOOR, INV_E4M3_MAX, recipe.pow2_scales)
    if w.dtype != x.dtype:
        w = w.to(x.dtype)
    counts_list = [int(c) for c in counts.tolist()]  # one host sync per grouped GEMM, as the split would
    if x.shape[0] != sum(counts_list):
        raise Fp8Error(f"fp8_grouped_mm: x has {x.shape[0]} rows but the expert counts sum to {sum(counts_list)}")
    return _Fp8GroupedMM.apply(x, w, counts_list, backend, recipe)


# -- applying the recipe to a model from outside ----------------------------------------------------------
class Fp8Linear:
    """Mixin put in front of a linear layer's class (nn.Linear, Column/RowParallelLinear): the
    local GEMM goes through `fp8_linear`; names, parameters and state dicts do not change."""

    fp8_recipe: Fp8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.fp8_recipe)
        if isinstance(self, RowParallelLinear):
            y = exit_region(y, self.group, self.sp)
        return y if self.bias is None else y + self.bias


class Fp8Conversion(list):
    """apply_fp8's answer: the paths converted (a list, as before), and `bf16`: path -> why that linear
    stays BF16 under the recipe's per-shape rule (BF16_BELOW)."""

    def __init__(self, converted=(), bf16=None):
        super().__init__(converted)
        self.bf16: dict[str, str] = dict(bf16 or {})


# hooks read here (tp_plan, ep_params) and the seam swapped (grouped_gemm): parallel/protocols.py
def apply_fp8(model: nn.Module, recipe: Fp8Recipe) -> Fp8Conversion:
    """Convert the model's linear layers and routed-expert GEMMs to FP8 in place; returns the paths
    converted, with `.bf16` naming the linears the per-shape rule keeps BF16 and why (Fp8Recipe.keep_bf16).
    Kept high precision (V3 §3.3.1): the vocab head and embedding (tp styles vocab_head / vocab_embed),
    the gate, norms and attention's core (none of them nn.Linear)."""
    keep = set()
    for path, module in model.named_modules():
        for child, styles in getattr(type(module), "tp_plan", {}).items():
            styles = (styles,) if isinstance(styles, str) else styles
            if {"vocab_head", "vocab_embed"} & set(styles):
                keep.add(f"{path}.{child}".strip(".") if child else path)
    converted, bf16 = [], {}
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
    for path, module in list(model.named_modules()):
        if path in keep:
            continue
        if isinstance(module, nn.Linear) and not isinstance(module, Fp8Linear):
            # the local shard's shape: what the GEMM sees under tp
            why = recipe.keep_bf16(module.weight.shape[1], module.weight.shape[0], device)
            if why:
                bf16[path] = why
                continue
            cls = type(module)
            module.__class__ = type(f"Fp8{cls.__name__}", (Fp8Linear, cls), {})
            module.fp8_recipe = recipe
            converted.append(path)
        elif hasattr(module, "grouped_gemm") and getattr(type(module), "ep_params", None):
            module.grouped_gemm = lambda x, w, counts, r=recipe: fp8_grouped_mm(x, w, counts, r)
            module.fp8_dispatch = recipe   # under ep the dispatch carries the FP8 tiles (expert_parallel.py)
            converted.append(path)
    return Fp8Conversion(converted, bf16)


__all__ = ["Fp8Recipe", "Fp8Error", "Fp8Conversion", "BF16_BELOW",
           "Fp8Tensor", "Fp8Rows", "row_tiles", "quantize", "dequantize", "fp8_linear", "fp8_grouped_mm",
           "apply_fp8", "get_backend", "E4M3_MAX", "TILE", "BLOCK"]
