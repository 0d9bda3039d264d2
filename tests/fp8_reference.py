"""What the FP8 test files share: the grouped GEMMs run both ways on the same inputs."""
from __future__ import annotations

import torch

from parallel.fp8 import AMAX_FLOOR, INV_E4M3_MAX, Fp8Recipe, fp8_grouped_mm


def grouped_both(fg, x, w, dy, counts: torch.Tensor) -> dict:
    """{"emulate", "triton"} -> (y, dx, dw): the emulated recipe's grouped GEMM and parallel.fp8_grouped's
    (the module `fg`: the interpreter's or the GPU's) on the same inputs, backward from dy."""
    res = {}
    for name, fn in (("emulate", lambda a, b: fp8_grouped_mm(a, b, counts, Fp8Recipe("emulate"))),
                     ("triton", lambda a, b: fg.fp8_grouped_mm(a, b, counts, AMAX_FLOOR, INV_E4M3_MAX))):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xr, wr)
        y.backward(dy)
        res[name] = (y, xr.grad, wr.grad)
    return res
