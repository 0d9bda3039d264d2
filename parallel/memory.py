"""Peak memory of a block of code, on CUDA and on CPU, so that activation-memory claims (pipeline
schedules, recomputation) are measured in CI too.

CUDA has allocator statistics. CPU has none, so there we read the process's resident set: glibc is
told to serve every allocation of 64 KiB or more with its own mmap (a fixed threshold, not the
adaptive one), so a freed tensor leaves the resident set at once, and the kernel's high-water mark
(VmHWM, reset through /proc/self/clear_refs) is the peak. Small allocations and allocator caches
(MKL's, the first use of a code path) add noise of a few hundred KiB: warm the code up first and
measure tensors of a few MiB or more."""
from __future__ import annotations

import ctypes
import re

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_prepared = False


def _prepare_cpu() -> None:
    global _prepared
    if not _prepared:
        libc = ctypes.CDLL("libc.so.6")
        if not (libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 16)):
            raise RuntimeError("glibc refused mallopt(M_MMAP_THRESHOLD); CPU memory cannot be measured")
        _prepared = True


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak` (bytes above the level at entry, at the
    highest point inside the block) and `m.end` (bytes above it at exit). `m.now()` reads the
    current level inside the block."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak = self.end = 0

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_bytes("VmRSS")

    def now(self) -> int:
        return self._current() - self.base

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _prepare_cpu()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        self.base = self._current()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
        else:
            top = _status_bytes("VmHWM")
        self.peak = top - self.base
        self.end = self.now()
