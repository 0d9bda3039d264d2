"""The GPU table: what each GPU kind offers (datasheet peaks, memory, SMs, default link bandwidths).
The planner (planner.py) sizes and times layouts with it; pretrain.metrics computes MFU against its
PEAK_FLOPS: one table for both."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """One GPU kind. peak: dense tensor-core FLOP/s per dtype (datasheets quote the 2:4-sparse figure,
    twice these; fp32 means TF32). hbm_gb: memory in GB (1e9 B) as the datasheet names it; hbm_tbps:
    its bandwidth. nvlink_gbps / ib_gbps: default achievable bandwidth per GPU and direction, in GB/s,
    inside a node (NVLink) and across nodes (one InfiniBand NIC per GPU)."""
    name: str
    peak: dict
    hbm_gb: float
    hbm_tbps: float
    sms: int
    nvlink_gbps: float
    ib_gbps: float


_HOPPER = {"bf16": 989.4e12, "fp8": 1978.9e12, "fp32": 494.7e12}   # H100 SXM5 datasheet, dense
GPUS: dict[str, GPU] = {
    # H100 SXM5: 80 GB HBM3 at 3.35 TB/s; NVLink 4: 900 GB/s both ways, 450 one way; the default 360
    # is 0.8 x 450, the share V3's 160 GB/s is of H800's 200; IB: one 400 Gb/s NIC per GPU
    "H100": GPU("H100", _HOPPER, 80, 3.35, 132, 360, 50),
    # H800: H100's compute with NVLink cut to 400 GB/s both ways; V3 §3.2.2: 160 GB/s NVLink, 50 GB/s IB
    "H800": GPU("H800", _HOPPER, 80, 3.35, 132, 160, 50),
    # H200 SXM: H100's compute, 141 GB of HBM3e at 4.8 TB/s
    "H200": GPU("H200", _HOPPER, 141, 4.8, 132, 360, 50),
    # A100 SXM4 80GB: 312 TFLOP/s bf16, no FP8; 2.04 TB/s; NVLink 3: 600 GB/s both ways; 200 Gb/s NICs
    "A100": GPU("A100", {"bf16": 312e12, "fp32": 156e12}, 80, 2.04, 108, 240, 25),
}
# The datasheet table MFU is computed against (pretrain.metrics imports it: one table, this one).
PEAK_FLOPS: dict[str, dict[str, float]] = {name: dict(g.peak) for name, g in GPUS.items()}
