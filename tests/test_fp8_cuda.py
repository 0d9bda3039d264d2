"""The CUDA FP8 backend (`torch`: F.scaled_mm with blockwise scales) against the emulation, the
recipe's reference. Needs a GPU (skipped elsewhere; run on the lent H100/H200)."""
import pytest
import torch

from fp8_reference import grouped_both
from parallel.fp8 import BLOCK, TILE, Emulated, Fp8Recipe, Fp8Tensor, TorchScaledMM, fp8_grouped_mm, fp8_linear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                            reason="needs an SM >= 9.0 GPU for blockwise FP8")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@hopper
@pytest.mark.parametrize("m,k,n", [(256, 512, 384), (1000, 7168, 2048), (33, 200, 70), (8, 32, 48), (128, 128, 16)])
@pytest.mark.parametrize("b_group", [BLOCK, TILE])
def test_scaled_mm_matches_emulation(m, k, n, b_group):
    torch.manual_seed(m + k + n)
    a = Fp8Tensor.of(torch.randn(m, k, device="cuda"), TILE)
    b = Fp8Tensor.of(torch.randn(n, k, device="cuda") * 3, b_group)
    got = TorchScaledMM().gemm(a, b, torch.float32)
    ref = a.float().double() @ b.float().double().t()
    assert got.shape == (m, n)
    # The same FP8 products. Inside each 128-element interval Hopper's tensor cores keep about
    # 14 bits before the fp32 promotion (V3 §3.3.2): ~1e-4, far below one E4M3 step (6%).
    assert rel(got, ref) < 1e-3
    assert rel(Emulated().gemm(a, b, torch.float32), ref) < 1e-5


@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_and_grouped_match_emulation(dtype):
    torch.manual_seed(0)
    x = torch.randn(512, 384, device="cuda", dtype=dtype)
    w = torch.randn(256, 384, device="cuda", dtype=dtype) * 0.05
    g = torch.randn(512, 256, device="cuda", dtype=dtype)
    outs = {}
    for be in ("torch", "emulate"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, Fp8Recipe(be))
        y.backward(g)
        outs[be] = (y, xr.grad, wr.grad)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3   # bf16 outputs; tensor-core sums (see above)
    for a, b in zip(outs["torch"], outs["emulate"]):
        assert rel(a, b) < tol
    W = torch.randn(4, 256, 384, device="cuda", dtype=dtype) * 0.05
    counts = torch.tensor([100, 0, 300, 112], device="cuda")
    res = {}
    for be in ("torch", "emulate"):
        xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
        y = fp8_grouped_mm(xr, Wr, counts, Fp8Recipe(be))
        y.backward(g)
        res[be] = (y, xr.grad, Wr.grad)
    for a, b in zip(res["torch"], res["emulate"]):
        assert rel(a, b) < tol


@cuda
def test_auto_backend_is_torch_on_cuda():
    from parallel.fp8 import get_backend
    assert get_backend("auto", "cuda").name == "torch"


def _same(a, b):
    """Bit-identical tensors (NaNs compared as NaNs)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
        nan_a, nan_b = (a & 0x7F) == 0x7F, (b & 0x7F) == 0x7F
        assert torch.equal(nan_a, nan_b)
        assert torch.equal(a[~nan_a], b[~nan_b])
    else:
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


@hopper
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(256, 512), (33, 200), (1, 1), (300, 129), (4096, 7168)])
def test_kernels_bit_identical_to_reference(shape, pow2):
    from parallel import fp8_kernels as k
    from parallel.fp8 import AMAX_FLOOR, INV_E4M3_MAX, quantize_torch
    torch.manual_seed(sum(shape))
    x = torch.randn(*shape, device="cuda") * torch.logspace(-3, 3, shape[1], device="cuda")
    x = x.to(torch.bfloat16)
    if shape[0] > 40 and shape[1] > 140:
        x[3, 5] = float("nan")
        x[37, 140] = float("inf")
        x[130:, :128] = 0.0 if shape[0] > 130 else x[130:, :128]
    for got, ref in zip(k.quant_rows(x, AMAX_FLOOR, INV_E4M3_MAX, pow2), quantize_torch(x, TILE, pow2)):
        _same(got, ref)
    for got, ref in zip(k.quant_blocks(x, AMAX_FLOOR, INV_E4M3_MAX, pow2), quantize_torch(x, BLOCK, pow2)):
        _same(got, ref)
    for got, ref in zip(k.quant_t(x, AMAX_FLOOR, INV_E4M3_MAX, None, pow2), quantize_torch(x.t(), TILE, pow2)):
        _same(got, ref)
    q, s = quantize_torch(x, TILE, pow2)   # Wgrad's re-tiling of the cached FP8 input
    ref = quantize_torch(Fp8Tensor(q, s, TILE).float().t(), TILE, pow2)
    for got, r in zip(k.quant_t(q, AMAX_FLOOR, INV_E4M3_MAX, s, pow2), ref):
        _same(got, r)
    w = torch.randn(3, *shape, device="cuda")
    for got, ref in zip(k.quant_blocks(w, AMAX_FLOOR, INV_E4M3_MAX, pow2), quantize_torch(w, BLOCK, pow2)):
        _same(got, ref)


@hopper
def test_rowwise_fallback_is_close_to_the_blockwise_result():
    """A torch build without blockwise scaled_mm falls back to one scale per row: same product
    shape, a larger but still FP8-sized error (the warning on construction names the gap)."""
    torch.manual_seed(1)
    a = Fp8Tensor.of(torch.randn(300, 512, device="cuda"), TILE)
    b = Fp8Tensor.of(torch.randn(200, 512, device="cuda"), BLOCK)
    be = TorchScaledMM()
    be.blockwise = False
    got = be.gemm(a, b, torch.float32)
    ref = a.float().double() @ b.float().double().t()
    assert got.shape == (300, 200)
    assert 1e-4 < rel(got, ref) < 0.1     # requantized per row: a second E4M3 rounding, not a wrong product


# -- the grouped Triton GEMM and the fused plumbing (parallel/fp8_grouped.py) on the GPU --------------------
@hopper
@pytest.mark.parametrize("counts,k,n", [([100, 0, 300, 37], 200, 130), ([1024, 512, 0, 1536], 7168, 2048),
                                        ([640, 384], 2048, 7168)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_triton_matches_emulation(counts, k, n, dtype):
    """Forward, dgrad and wgrad of the one-launch grouped kernels against the emulated recipe on the same
    inputs: the same FP8 products, tensor-core sums inside each 128-slice (~1e-4), bf16 outputs (~4e-3)."""
    from parallel import fp8_grouped as fg
    torch.manual_seed(sum(counts) + k + n)
    t = sum(counts)
    x = torch.randn(t, k, device="cuda", dtype=dtype)
    w = (torch.randn(len(counts), n, k, device="cuda") * 0.05).to(dtype)
    dy = torch.randn(t, n, device="cuda", dtype=dtype)
    ct = torch.tensor(counts, device="cuda")
    res = grouped_both(fg, x, w, dy, ct)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    for got, ref in zip(res["triton"], res["emulate"]):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert rel(got, ref) < tol, rel(got, ref)
    for e, c in enumerate(counts):
        if not c:
            assert torch.equal(res["triton"][2][e], torch.zeros_like(res["triton"][2][e]))


@hopper
@pytest.mark.parametrize("pow2", [False, True])
def test_fused_quantisers_bit_identical_on_gpu(pow2):
    from parallel import fp8_grouped as fg
    from parallel.fp8 import AMAX_FLOOR, INV_E4M3_MAX, quantize_torch
    torch.manual_seed(5)
    x = (torch.randn(1000, 7168, device="cuda") * torch.logspace(-3, 3, 7168, device="cuda")).bfloat16()
    x[3, 5], x[37, 140] = float("nan"), float("inf")
    counts = [300, 0, 129, 571]
    ro, to = fg.offsets(torch.tensor(counts, device="cuda"))
    (q, s), (qt, st) = fg.quant_dual(x, ro, to, fg.max_tiles(1000, 4), AMAX_FLOOR, INV_E4M3_MAX, pow2)
    for got, ref in zip((q, s), quantize_torch(x, TILE, pow2)):
        _same(got, ref)
    start, cols, tiles = 0, [], []
    for c in counts:
        if c:
            rq, rs = quantize_torch(x[start:start + c].t(), TILE, pow2)
            cols.append(rq)
            tiles.append(rs)
        start += c
    _same(qt, torch.cat(cols, 1))
    _same(st[:, :sum(t.shape[1] for t in tiles)], torch.cat(tiles, 1))
    w = torch.randn(3, 2048, 7168, device="cuda").bfloat16()
    (wq, ws), (wqt, wst) = fg.quant_blocks_t(w, AMAX_FLOOR, INV_E4M3_MAX, pow2)
    rq, rs = quantize_torch(w, BLOCK, pow2)
    _same(wq, rq)
    _same(ws, rs)
    _same(wqt, rq.transpose(-2, -1).contiguous())


@hopper
def test_fused_linear_plumbing_equals_unfused_on_gpu(monkeypatch):
    """The dense FP8 linear with the fused quantisers and the cached W^T against the per-GEMM plumbing:
    the same FP8 operands into the same cuBLAS GEMMs."""
    torch.manual_seed(6)
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(2048, 7168, device="cuda") * 0.02).bfloat16()
    g = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    res = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("WHALETRON_FP8_FUSED", fused)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr, Fp8Recipe("torch"))
        y.backward(g)
        res[fused] = (y, xr.grad, wr.grad)
    for a, b in zip(res["1"], res["0"]):
        assert rel(a, b) < 1e-6
