"""`torch.compile` of each block, applied from outside (torchtitan's per-block compile):

    apply_compile(model)              # after tp/ep/FP8/recompute, before or after FSDP2

Each module whose class sets `fsdp_unit` (the transformer blocks, the MTP modules' blocks included)
is compiled in place with `module.compile(...)`: its parameters, names and state dict do not change,
and what wraps it from outside composes with it:
  - FP8 (parallel/fp8.py) swaps linear classes and the experts' `grouped_gemm` seam: dynamo traces the
    FP8 autograd functions (emulated: plain torch ops; on CUDA the Triton kernels are opaque calls);
  - activation recomputation (parallel/recompute.py) sets the block's instance `forward`, which the
    compiled call runs: "full" is torch.utils.checkpoint, which dynamo traces; "selective" records and
    replays submodules through saved-tensor hooks, which dynamo does not trace, so its blocks are
    refused with a message (compile those with recompute "full" or "none");
  - FSDP2 (`fully_shard`) keeps the compiled forward and adds its hooks around it, as in torchtitan.
Whole-model compilation is not offered: the pipeline, the expert dispatch and the loss cut the graph.

One known gap, worked around here: on CPU, torch 2.13's meta function for the grouped GEMM
(`torch._grouped_mm`) accepts only bf16, so dynamo cannot trace the fp32 experts of a CPU run; the
experts' grouped GEMM then runs eagerly (`torch.compiler.disable`) inside the compiled block.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompileError(ValueError):
    pass


_WRAPPED: weakref.WeakSet = weakref.WeakSet()   # the seams wrapped below (applying twice wraps once)


def _eager_on_cpu_fp32(gemm):
    """The grouped GEMM seam, run eagerly where torch's meta function cannot trace it (fp32 on CPU)."""
    eager = torch.compiler.disable(gemm)

    def grouped_gemm(x, w, counts):
        if x.dtype == torch.float32 and not x.is_cuda:
            return eager(x, w, counts)
        return gemm(x, w, counts)

    _WRAPPED.add(grouped_gemm)
    return grouped_gemm


# hooks read here (fsdp_unit, ep_params, grouped_gemm, _recompute_mode): parallel/protocols.py
def apply_compile(model: nn.Module, mode: str | None = None, backend: str = "inductor",
                  fullgraph: bool = False, dynamic: bool | None = None) -> list[str]:
    """Compile every outermost block (class attribute `fsdp_unit`) of `model` in place; returns their paths.
    backend: "inductor" (fused kernels), or "aot_eager" (traces forward and backward, no code generation:
    for checking that a model traces). Raises CompileError naming the block and the fix where a block
    cannot be compiled (selective recomputation)."""
    if mode is not None and mode not in MODES:
        raise CompileError(f"compile mode {mode!r} is not one of {', '.join(MODES)}")
    units = []
    for path, m in model.named_modules():
        if getattr(type(m), "fsdp_unit", False) and not any(path.startswith(p + ".") for p, _ in units):
            units.append((path, m))
    if not units:
        raise CompileError(f"{type(model).__name__} has no block to compile: no module class sets `fsdp_unit`")
    for path, m in units:
        if getattr(m, "_recompute_mode", "none") == "selective":
            raise CompileError(f"{path}: torch.compile cannot trace selective recomputation (its saved-tensor "
                               "hooks replay submodules in backward); use parallel.recompute=full or none with "
                               "train.compile=true")
    for path, m in model.named_modules():
        if getattr(type(m), "ep_params", None) and hasattr(m, "grouped_gemm"):
            if m.grouped_gemm not in _WRAPPED:
                m.grouped_gemm = _eager_on_cpu_fp32(m.grouped_gemm)
    options = {} if mode is None else {"mode": mode}
    for path, m in units:
        m.compile(backend=backend, fullgraph=fullgraph, dynamic=dynamic, **options)
    return [p for p, _ in units]


__all__ = ["apply_compile", "CompileError"]
