"""Shared benchmark helpers: environment header, timing, peak memory, markdown tables."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def environment_info(device: torch.device | None = None) -> dict[str, Any]:
    """The machine and software the numbers were measured on, as plain data for JSON reports.

    Args:
        device: where the numbers were measured. Default None: the current CUDA device when CUDA
            is available, else the CPU. A CPU device leaves the GPU keys out.

    Returns:
        ``python``, ``torch``, ``cpu`` and ``threads`` (torch's intra-op threads); on a CUDA
        device also ``gpu`` (name), ``cuda`` (version) and ``cudnn`` (version number).
    """
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    if on_gpu:
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def environment() -> str:
    """One line naming the machine and software the numbers were measured on (:func:`environment_info`)."""
    info = environment_info()
    parts = [f"torch {info['torch']}", f"python {info['python']}"]
    if "gpu" in info:
        parts += [info["gpu"], f"CUDA {info['cuda']}", f"cuDNN {info['cudnn']}"]
    else:
        parts += [f"CPU {info['cpu']}", f"{info['threads']} threads"]
    return ", ".join(parts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn: Callable[[], Any], device: torch.device, repeat: int) -> list[float]:
    """Wall time in seconds of each of ``repeat`` calls of ``fn()``, synchronising the device around each."""
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], Any], device: torch.device, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed calls (:func:`timed_calls`)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_calls(fn, device, repeat))


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
