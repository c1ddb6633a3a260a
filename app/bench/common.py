"""Shared benchmark helpers: environment header, timing, peak memory, markdown tables."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def environment() -> str:
    """One line naming the machine and software the numbers were measured on."""
    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    if torch.cuda.is_available():
        parts += [torch.cuda.get_device_name(), f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}"]
    else:
        parts += [f"CPU {platform.processor() or platform.machine()}", f"{torch.get_num_threads()} threads"]
    return ", ".join(parts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device: torch.device) -> int:
    """Resets the CUDA peak counter; returns the bytes allocated now (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_since(device: torch.device, baseline: int) -> float:
    """Peak bytes allocated above ``baseline`` since :func:`reset_peak` (NaN on the CPU)."""
    if device.type != "cuda":
        return float("nan")
    synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - baseline)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


MIB = 2.0**20
