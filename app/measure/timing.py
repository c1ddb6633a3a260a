"""Timing and peak device memory of a piece of work, synchronising the device around it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["median_time", "peak_since", "reset_peak", "synchronize", "timed_calls"]


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
