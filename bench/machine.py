"""What every benchmark prints beside its figures (the machine, torch, threads, the date and the command), and the
scratch place where benchmarks train."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
    """Best median GFLOP/s of square products: the hardware's practical limit, measured now.

    CPU: 512..2048. CUDA: 2048..8192, timed with events, since smaller products cannot fill a GPU.
    """
    sizes = (512, 1024, 2048) if device == "cpu" else (2048, 4096, 8192)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(reps if device == "cpu" else 20):
            if device == "cpu":
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            else:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                a @ b
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end) / 1000)
        best = max(best, 2 * n**3 / statistics.median(times) / 1e9)
    return best


def alternating(items: dict, rounds: int) -> Iterator[tuple]:
    """Each (name, value) of `items`, round after round, the order reversed every other round: timed in this order,
    all see the same moments of a drifting machine, and none always runs first."""
    for r in range(rounds):
        yield from (list(items.items()) if r % 2 == 0 else list(reversed(items.items())))


def log_every(steps: int, most: int) -> int:
    """A training-log interval for a bench run of `steps` steps: `most`, or less so that a short run still logs
    a few times."""
    return max(1, min(most, steps // 4))


def median_tokens_per_s(records: list[dict]) -> float:
    """The median training tokens/s of a run's log lines, leaving out the first (warm-up) when there are others."""
    speeds = [r["tokens_per_s"] for r in records if r["event"] == "train"]
    if not speeds:
        sys.exit(f"{Path(sys.argv[0]).name}: the training logged no speed (too few steps for its log_every): "
                 "give it more steps or seconds")
    return statistics.median(speeds[1:] or speeds)


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory that is also the working directory while it lasts: a run trained there points the
    runs/latest beside it, not the user's runs/latest at a run about to be deleted."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(previous)


def absolute_path(text: str) -> Path:
    """argparse type for paths: resolved at once, since the benchmark trains in a scratch working directory."""
    return Path(text).resolve()


def require_cuda(device: str = "cuda") -> None:
    """Stop a benchmark that needs a CUDA GPU with one clear line, before any torch.cuda call fails deep inside."""
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name}: this benchmark needs a CUDA GPU, and PyTorch sees none here")


def counts(text: str) -> list[int]:
    """argparse type for a comma-separated list of counts (streams, window multiples): each a whole number >= 1."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers of at least 1, such as 1,64,1024")
    return values


def known_names(parser, text: str, known, option: str) -> list[str]:
    """The comma-separated names of `text`, each one of `known`; argparse's error naming the others."""
    names = text.split(",")
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"{option} takes {', '.join(known)}; not {', '.join(unknown)}")
    return names


def require_at_least(parser, value: int, least: int, option: str, why: str) -> None:
    """argparse's error for an option below what the benchmark's statistics need."""
    if value < least:
        parser.error(f"{option} must be at least {least} ({why})")


class CaptureCounter:
    """Counts the CUDA-graph captures a benchmark's runs make and the ones that fail: lmtool falls back to eager
    steps after a failed capture, which would otherwise go unseen in a timing."""

    def __init__(self) -> None:
        self.captures, self.failures = 0, []

    def counting(self, capture):
        """`capture`, counted."""
        def counted(run):
            try:
                replay = capture(run)
            except Exception as error:
                cause = error.__context__ or error  # a failed capture_end hides the error that invalidated it
                self.failures.append(f"{type(cause).__name__}: {cause}"[:300])
                raise
            self.captures += 1
            return replay

        return counted

    def taken(self) -> dict:
        """The counts since the last call, as JSON fields."""
        record = {"captures": self.captures, "capture_failures": self.failures}
        self.captures, self.failures = 0, []
        return record


def graph_and_eager(units: int, seconds: dict[str, list[float]]) -> dict:
    """JSON fields for `units` tokens timed with ("graph") and without ("eager") a CUDA graph over rounds: each
    way's median tokens/s and the median of the rounds' ratios."""
    return {"graph_tokens_per_s": round(units / statistics.median(seconds["graph"])),
            "eager_tokens_per_s": round(units / statistics.median(seconds["eager"])),
            "graph_over_eager": round(statistics.median(e / g for g, e in zip(seconds["graph"], seconds["eager"])), 2)}
