"""``torch.compile`` for training, exact and stochastic models alike (``trainer.compile``)."""

from __future__ import annotations

import torch
import torch.nn as nn

import app.nn

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``off`` (eager), or the ``torch.compile`` mode the training model is compiled with;
``reduce-overhead`` also replays the compiled forward and backward as CUDA graphs."""


def compile_model(model: nn.Module, mode: str, device: torch.device, backend: str = "inductor") -> nn.Module:
    """``model`` compiled for training under ``mode`` (``off``: ``model`` itself).

    The spectral sketch draws its seeds on the device inside a compiled graph
    (``app.nn.probes.device_seed``); its counter is made here, before tracing, so the first graph
    has no break. ``backend`` other than ``inductor`` takes no mode (``aot_eager`` traces forward
    and backward without generating code: what the CPU tests use).

    Raises:
        ValueError: ``mode`` is not one of :data:`COMPILE_MODES`.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"trainer.compile must be one of {list(COMPILE_MODES)}, but got trainer.compile={mode!r}")
    if mode == "off":
        return model
    app.nn.probes.ensure_device_seed(device)
    if backend != "inductor":
        return torch.compile(model, backend=backend)
    return torch.compile(model, mode=None if mode == "default" else mode)


def uses_cuda_graphs(mode: str) -> bool:
    """Whether ``mode`` replays CUDA graphs, whose outputs a new step must release first
    (``torch.compiler.cudagraph_mark_step_begin`` before each step)."""
    return mode in ("reduce-overhead", "max-autotune")


def uncompiled(model: nn.Module) -> nn.Module:
    """``model`` without a ``torch.compile`` wrapper (the module optimizers and checkpoints see)."""
    return getattr(model, "_orig_mod", model)
