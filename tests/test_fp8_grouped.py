"""The Triton grouped blockwise FP8 GEMM and fused quantisers (parallel/fp8_grouped.py) on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1), against parallel/fp8.py's plain-torch recipe (the
emulation, the reference): quantisers bit for bit, GEMMs to fp32 summation order. Tiny shapes only:
the interpreter runs each program in numpy. The same checks run on a GPU in tests/test_fp8_cuda.py."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

pytest.importorskip("triton", reason="Triton is in the test extra (pyproject); the kernels need it")

from fp8_reference import grouped_both  # noqa: E402
from parallel.fp8 import (AMAX_FLOOR, BLOCK, INV_E4M3_MAX, TILE, Fp8Recipe, Fp8Tensor, dequantize,  # noqa: E402
                          quantize_torch)

E4M3 = torch.float8_e4m3fn


def _fresh_triton():
    """Forget triton and our kernel modules: triton.jit (and Triton's own @jit helpers, tl.max...) choose
    the interpreter or the compiler when they are defined, i.e. at import, from TRITON_INTERPRET. Its
    compiled extension (triton._C) stays: an extension module cannot be loaded twice."""
    import parallel.fp8 as fp8
    for name in [m for m in sys.modules if (m == "triton" or m.startswith("triton.")) and
                 not m.startswith("triton._C") or m in ("parallel.fp8_grouped", "parallel.fp8_kernels")]:
        del sys.modules[name]
    fp8._KERNELS = fp8._FUSED = None


@pytest.fixture(scope="module")
def fg():
    """parallel.fp8_grouped with its kernels interpreted; afterwards this process imports them compiled
    again (a GPU run of tests/test_fp8_cuda.py in the same process gets the real kernels)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    _fresh_triton()
    yield importlib.import_module("parallel.fp8_grouped")
    if old is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = old
    _fresh_triton()


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def same(a, b):
    """Bit-identical (E4M3 compared as bytes; NaNs as NaNs)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if a.dtype == E4M3:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
        nan_a, nan_b = (a & 0x7F) == 0x7F, (b & 0x7F) == 0x7F
        assert torch.equal(nan_a, nan_b)
        assert torch.equal(a[~nan_a], b[~nan_b]), int((a[~nan_a] != b[~nan_b]).sum())
    else:
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def hard_input(r, c, seed):
    """Magnitudes over 6 decades, exact E4M3 ties and binade carries (-0.4945 -> -0.5), a NaN, an Inf,
    an all-zero tile, tiny negatives that round to -0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, c, generator=g) * torch.logspace(-3, 3, c)
    if r > 40 and c > 140:
        x[3, 5] = float("nan")
        x[37, 140] = float("inf")
        x[:, 130] = -1e-30
        x[20:, :128] = 0.0 if r > 148 else x[20:, :128]
    return x


def seg_reference(x, counts, pow2=False):
    """Per-segment 128x1 token tiles of x [T, C] in the kernels' layout: E4M3 [C, T], scales [C, tiles]."""
    qs, ss, s = [], [], 0
    for n in counts:
        if n:
            q, sc = quantize_torch(x[s:s + n].t(), TILE, pow2)
            qs.append(q)
            ss.append(sc)
        s += n
    return torch.cat(qs, 1), torch.cat(ss, 1)


def test_e4m3_rounding_is_torch_cast(fg):
    """The explicit round-to-nearest-even matches torch's cast on every fp32 in E4M3's range we can
    enumerate densely: all halfway points, carries into the exponent, subnormals, signed zeros."""
    grid = torch.arange(-448.0, 448.0, 1 / 64)
    vals = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    vals = vals[vals.isfinite()].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([grid, vals, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9)),
                   torch.tensor([-1e-30, 1e-30, -0.0, 0.0, -0.4945, 0.4945, 447.9, -447.0, float("nan")])])
    same(fg.round_e4m3(x), x.to(E4M3))


@pytest.mark.parametrize("pow2", [False, True])
def test_quantisers_bit_identical_to_reference(fg, pow2):
    x = hard_input(300, 200, 1)
    q, s = fg.quant_rows(x, AMAX_FLOOR, INV_E4M3_MAX, pow2)
    for got, ref in zip((q, s), quantize_torch(x, TILE, pow2)):
        same(got, ref)
    w = hard_input(3 * 136, 200, 2).view(3, 136, 200)
    (wq, ws), (wqt, wst) = fg.quant_blocks_t(w, AMAX_FLOOR, INV_E4M3_MAX, pow2)
    rq, rs = quantize_torch(w, BLOCK, pow2)
    same(wq, rq)
    same(ws, rs)
    same(wqt, rq.transpose(-2, -1).contiguous())
    same(wst, rs.transpose(-2, -1).contiguous())
    # the fused dual quantiser: 1x128 rows and per-segment 128x1 token tiles in one pass
    counts = [130, 0, 27, 143]
    ro, to = fg.offsets(torch.tensor(counts))
    n_tiles = fg.max_tiles(300, 4)
    (dq, ds), (dqt, dst) = fg.quant_dual(x, ro, to, n_tiles, AMAX_FLOOR, INV_E4M3_MAX, pow2)
    for got, ref in zip((dq, ds), quantize_torch(x, TILE, pow2)):
        same(got, ref)
    tq, ts = seg_reference(x, counts, pow2)
    same(dqt, tq)
    same(dst[:, :ts.shape[1]], ts)
    # a dense layer is one segment: both tilings of dY (dgrad's 1x128, wgrad's 128x1 = quant_t)
    ro1, to1 = fg.offsets(torch.tensor([300]))
    _, (q1, s1) = fg.quant_dual(x, ro1, to1, 3, AMAX_FLOOR, INV_E4M3_MAX, pow2, rows=False)
    for got, ref in zip((q1, s1), quantize_torch(x.t(), TILE, pow2)):
        same(got, ref)
    # the cached FP8 input re-tiled: dequantized and quantized again along each segment's tokens
    xq, xs = quantize_torch(x, TILE, pow2)
    _, (rq2, rs2) = fg.quant_dual(xq, ro, to, n_tiles, AMAX_FLOOR, INV_E4M3_MAX, pow2, rows=False, row_scale=xs)
    tq2, ts2 = seg_reference(dequantize(xq, xs, TILE), counts, pow2)
    same(rq2, tq2)
    same(rs2[:, :ts2.shape[1]], ts2)


@pytest.mark.parametrize("counts,k,n", [([100, 0, 300, 37], 200, 130), ([0, 0], 128, 64), ([129, 64], 256, 128)])
def test_grouped_gemms_match_emulation(fg, counts, k, n):
    """Forward, dgrad and wgrad in one launch each against the emulated recipe: empty experts, counts off
    128, K and N off 128. The same FP8 products; only the fp32 summation order differs (< 1e-6)."""
    torch.manual_seed(sum(counts) + k + n)
    t = sum(counts)
    x = torch.randn(t, k)
    w = torch.randn(len(counts), n, k) * 0.05
    dy = torch.randn(t, n)
    ct = torch.tensor(counts)
    res = grouped_both(fg, x, w, dy, ct)
    for got, ref in zip(res["triton"], res["emulate"]):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        if ref.abs().sum() == 0:
            assert torch.equal(got, ref)
        else:
            assert rel(got, ref) < 1e-6, rel(got, ref)
    for e, c in enumerate(counts):
        if not c:
            assert torch.equal(res["triton"][2][e], torch.zeros(n, k))


def test_grouped_gemm_bf16_and_fp32_accumulation(fg):
    """bf16 in, bf16 out; the accumulator is fp32 promoted every 128 of K: against the fp64 product of the
    same FP8 operands the kernel is within bf16 output rounding, with K = 1024 (8 promotions)."""
    torch.manual_seed(3)
    counts = torch.tensor([70, 90])
    x = torch.randn(160, 1024).bfloat16()
    w = (torch.randn(2, 64, 1024) * 0.05).bfloat16()
    y = fg.fp8_grouped_mm(x, w, counts, AMAX_FLOOR, INV_E4M3_MAX)
    assert y.dtype == torch.bfloat16
    xd = Fp8Tensor.of(x, TILE).float().double()
    wd = Fp8Tensor.of(w, BLOCK).float().double()
    ref = torch.cat([xd[:70] @ wd[0].t(), xd[70:] @ wd[1].t()])
    assert rel(y, ref) < 4e-3


def test_no_host_sync_on_counts(fg, monkeypatch):
    """The device path never reads the counts back: .tolist()/.item()/int() on a tensor would raise."""
    torch.manual_seed(4)
    counts = torch.tensor([40, 0, 88])
    x = torch.randn(128, 128, requires_grad=True)
    w = (torch.randn(3, 64, 128) * 0.05).requires_grad_()

    def boom(*a, **k):
        raise AssertionError("host sync on the token counts")

    for name in ("tolist", "item", "__int__", "__index__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    y = fg.fp8_grouped_mm(x, w, counts, AMAX_FLOOR, INV_E4M3_MAX)
    y.sum().backward()
    monkeypatch.undo()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("m,k,n", [(300, 200, 130), (128, 256, 64)])
def test_fused_linear_plumbing_equals_unfused(fg, monkeypatch, m, k, n):
    """The dense FP8 linear with the fused plumbing (W and its transposed copy in one pass, cached for
    dgrad; dY's two tilings in one pass; the cached input re-tiled in one pass) gives bit for bit what the
    per-GEMM plumbing gives: the same FP8 operands into the same (emulated) GEMMs."""
    import parallel.fp8 as fp8
    torch.manual_seed(m + k + n)
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.05
    dy = torch.randn(m, n)
    res = {}
    for fused in (None, fg):
        monkeypatch.setattr(fp8, "FUSED_ON_CPU", fused)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.fp8_linear(xr, wr, Fp8Recipe("emulate"))
        y.backward(dy)
        res[fused is None] = (y, xr.grad, wr.grad)
    for a, b in zip(res[False], res[True]):
        assert torch.equal(a, b)


def test_bf16_rule_is_data_and_reported():
    """The per-shape rule: linears with min(in, out) below the threshold stay BF16 and apply_fp8 says which
    and why; the emulation converts every linear by default (the numerical reference)."""
    from torch import nn

    from model import build_model, preset
    from parallel.fp8 import BF16_BELOW, apply_fp8

    assert BF16_BELOW["emulate"] == 0 and BF16_BELOW["torch"] > 0
    assert Fp8Recipe("torch").keep_bf16(7168, 2048) is not None          # V3's 7168 -> 2048: BF16
    assert Fp8Recipe("torch").keep_bf16(7168, 18432) is None             # V3's dense MLP: FP8
    assert Fp8Recipe("torch").keep_bf16(8192, 8200) is not None          # not 16-aligned
    assert Fp8Recipe("emulate").keep_bf16(64, 32) is None
    cfg = preset("tiny-deepseek-v3", vocab_size=512, n_layers=2, dim=128)
    net = build_model(cfg, seed=0)
    report = apply_fp8(net, Fp8Recipe("emulate", bf16_below=129))
    assert report.bf16, "the tiny model has linears narrower than 129"
    for path, why in report.bf16.items():
        mod = net.get_submodule(path)
        assert type(mod) is nn.Linear and min(mod.weight.shape) < 129 and "129" in why
        assert path not in report
    assert any(type(net.get_submodule(p)).__name__ == "Fp8Experts" or "experts" in p for p in report)
    full = apply_fp8(build_model(cfg, seed=0), Fp8Recipe("emulate"))
    assert not full.bf16 and set(report) | set(report.bf16) == set(full)


def test_kernels_compile_for_hopper():
    """Every kernel compiles for sm_90 here, with no GPU (Triton's ahead-of-time path, the compiler it
    ships), and the GEMMs use Hopper's FP8 wgmma. A separate process: the interpreter fixture above
    rebinds triton.jit in this one."""
    import subprocess
    code = ("import json; from parallel.fp8_grouped import compile_for_hopper; "
            "print(json.dumps(compile_for_hopper()))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res) == 7
    for name, info in res.items():
        assert info["shared"] <= 228 * 1024, (name, info)      # an H100/H200 SM's shared memory
        if name.startswith("grouped_"):
            assert info["wgmma"], name
