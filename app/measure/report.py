"""What a measurement prints: the environment it ran in and markdown tables."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["GIB", "MIB", "environment", "environment_info", "markdown_table"]

MIB = 2.0**20
GIB = 2.0**30


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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with 3 significant digits (NaN as ``-``)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)

