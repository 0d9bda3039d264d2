"""What every benchmark result records about the machine it ran on, and how a result is written."""
import json
import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(load_before: tuple | None = None) -> dict:
    """The machine a result ran on: CPU, uname, cores, torch's threads, the GPU if any, and with load_before
    (os.getloadavg() when the run started) the load average at its start and end."""
    import torch
    out = {"cpu": cpu_name(), "uname": " ".join(platform.uname()), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["gpu"], out["cuda"] = torch.cuda.get_device_name(), torch.version.cuda
    if load_before is not None:
        out["loadavg_1_5_15_at_start_and_end"] = [list(load_before), list(os.getloadavg())]
    return out


def roofline(device: str = "cpu", seconds: float = 1.0) -> dict:
    """The device's two ceilings, measured (float32 on a CPU, bfloat16 on a GPU): GEMM arithmetic (a 2048^3
    matmul, FLOP/s) and memory bandwidth (a 256 MiB copy, bytes read + written per s), each the best of as many
    calls as fit in `seconds`; their ratio is the ridge point: a step whose FLOPs per byte of memory it reads are
    below it is bound by memory, above it by arithmetic."""
    import time

    import torch
    cuda = device == "cuda"
    dev, dtype = device, torch.bfloat16 if cuda else torch.float32

    def best(fn) -> float:
        fn()   # warm up
        t_end, b = time.perf_counter() + seconds, float("inf")
        while time.perf_counter() < t_end:
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            b = min(b, time.perf_counter() - t)
        return b

    n = 2048
    a, w = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    flops = 2 * n ** 3 / best(lambda: a @ w)
    x = torch.empty(64 * 2 ** 20, device=dev, dtype=torch.float32)
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / best(lambda: y.copy_(x))
    return {"gemm_tflops": round(flops / 1e12, 3), "memory_tb_per_s": round(bw / 1e12, 4),
            "ridge_flop_per_byte": round(flops / bw, 1), "dtype": str(dtype).removeprefix("torch.")}


def write_result(path: str, result: dict) -> None:
    """The result as indented JSON at path, its folder made if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
