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


def write_result(path: str, result: dict) -> None:
    """The result as indented JSON at path, its folder made if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
