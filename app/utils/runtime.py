"""Device and autocast settings, resolved the same way by training, inference, planning and benchmarks."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["AMP_DTYPES", "amp_dtype", "resolve_amp", "resolve_device"]

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
"""Autocast settings and their dtypes (``off``: no autocast)."""


def amp_dtype(value: Any, option: str = "amp") -> torch.dtype | None:
    """An autocast setting (``bf16``, ``fp16``, ``off``) as its dtype (``None`` for ``off``).

    YAML reads a bare ``off`` as ``False``; ``None`` and ``False`` mean ``off`` too.

    Args:
        value: the setting.
        option: the option's name, for the error message (``trainer.amp``, ``--amp``).

    Raises:
        ValueError: an unknown setting (the message names the option and the valid values).
    """
    key = "off" if value is None or value is False else str(value).lower()
    if key not in AMP_DTYPES:
        raise ValueError(f"{option} must be one of {list(AMP_DTYPES)}, but got {option}={value!r}")
    return AMP_DTYPES[key]


def resolve_amp(value: Any, device: torch.device, option: str = "amp") -> str:
    """An autocast setting with ``auto`` resolved: ``bf16`` on a CUDA device that supports it, else ``off``.

    Raises:
        ValueError: an unknown setting.
    """
    if str(value).lower() == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    dtype = amp_dtype(value, option)
    return next(name for name, d in AMP_DTYPES.items() if d == dtype)


def resolve_device(name: str | torch.device, local_rank: int = 0, option: str = "device") -> torch.device:
    """``auto`` -> this process's CUDA device (``cuda:<local_rank>``) when CUDA is available, else the CPU.

    A bare ``cuda`` also becomes ``cuda:<local_rank>``, so each ``torchrun`` process takes its own GPU.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (or a ``torch.device``).
        local_rank: the process's rank on its machine (``LOCAL_RANK`` under ``torchrun``).
        option: the option's name, for error messages (``trainer.device``, ``--device``).

    Raises:
        ValueError: an unknown name, or CUDA requested on a machine without it.
    """
    text = str(name)
    if text == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(f"{option} must be auto, cpu, cuda or cuda:N, but got {option}={text!r}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option}={text} but CUDA is not available here; use {option}=auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device
