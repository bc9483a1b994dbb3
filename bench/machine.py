"""What every benchmark prints beside its figures: the machine, torch, threads, the date and the command."""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, device: str = "cpu", reps: int = 5) -> float:
    """Best median GFLOP/s of square products (512..2048): the hardware's practical limit, measured now."""
    best = 0.0
    for n in (512, 1024, 2048):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(reps):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best
