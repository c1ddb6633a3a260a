"""Measure one full training step of a network: peak device memory, time, bytes saved for backward.

:func:`measure_step` builds the network from a model config (:func:`app.models.build_model`),
applies a :mod:`variant <app.measure.variants>` (stochastic/lean layers, gradient checkpointing,
bf16 or fp16 autocast) and runs what training runs: forward, DiceCE loss over the
deep-supervision heads, backward, AdamW step.

Two memory numbers:

* ``saved_bytes``: bytes of the tensors saved for backward during one forward pass and loss
  (:class:`app.nn.SavedTensorCounter`, storages counted once, parameters ignored). Device
  independent: it is the same on the CPU and the GPU. With ``ckpt`` it counts what the outer
  graph keeps (stage inputs); the activations recomputed in the backward pass are not in it.
* ``peak_bytes``: ``torch.cuda.max_memory_allocated`` over the timed training steps (after
  ``warmup`` steps), above what was allocated before the network was built: parameters,
  gradients, optimizer state, inputs and every activation and transient. NaN on the CPU.

Out-of-memory (also under a ``memory_cap_gib`` set with
``torch.cuda.set_per_process_memory_fraction``) is a result, ``status="oom"``; the memory is
freed (``gc.collect``, ``torch.cuda.empty_cache``) before the function returns.
"""

from __future__ import annotations

import contextlib
import gc
import math
import platform
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

import app.nn
from app.measure.report import GIB
from app.measure.timing import peak_since, reset_peak, synchronize, timed_calls
from app.measure.variants import Variant, parse_variant
from app.models import build_model, deep_supervision_loss, enable_grad_checkpointing, resolve_model_config
from app.models.compiled import CUDA_GRAPHS, CapturedBackward, check_capturable, compile_model, uses_cuda_graphs

__all__ = [
    "TrainingStep",
    "build_variant_model",
    "StepStats",
    "device_name",
    "free_memory",
    "is_out_of_memory",
    "measure_step",
    "memory_cap",
    "model_config_for_patch",
]

# statuses of a StepStats
OK, OOM, ERROR = "ok", "oom", "error"


@dataclass
class StepStats:
    """One measured (or estimated) training step.

    Attributes:
        variant: canonical variant name (``"stochastic+amp"``).
        patch_size: spatial input size.
        batch_size: patches per step.
        status: ``"ok"``; ``"oom"`` (did not fit); ``"error"`` (another failure, e.g. a kernel
            refusing a tensor that large).
        peak_bytes: peak device memory of a training step (NaN on the CPU or when not ``ok``).
        step_seconds: median wall time of a training step (NaN when not ``ok``).
        saved_bytes: bytes saved for backward by the forward pass and loss (parameters ignored).
        saved_bytes_per_voxel: ``saved_bytes / (batch_size * prod(patch_size))``.
        parameter_bytes: bytes of the network's parameters.
        device: where it was measured (:func:`device_name`).
        estimated: ``peak_bytes`` is an estimate (CPU planner), not a measurement.
        reason: why it is not ``ok`` (one line), or how it was estimated.
    """

    variant: str
    patch_size: tuple[int, ...]
    batch_size: int
    status: str = OK
    peak_bytes: float = math.nan
    step_seconds: float = math.nan
    saved_bytes: float = math.nan
    saved_bytes_per_voxel: float = math.nan
    parameter_bytes: float = math.nan
    device: str = ""
    estimated: bool = False
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        """The step ran (or is estimated to run) to completion."""
        return self.status == OK

    @property
    def voxels(self) -> int:
        return self.batch_size * math.prod(self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready; NaN becomes None)."""
        out = asdict(self)
        out["patch_size"] = list(self.patch_size)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepStats:
        kwargs = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for k in ("peak_bytes", "step_seconds", "saved_bytes", "saved_bytes_per_voxel", "parameter_bytes"):
            if kwargs.get(k) is None:
                kwargs[k] = math.nan
        kwargs["patch_size"] = tuple(int(p) for p in kwargs["patch_size"])
        return cls(**kwargs)


def device_name(device: torch.device | str) -> str:
    """``"NVIDIA H200"``-style name of a CUDA device, ``"cpu (x86_64)"`` for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/CPU allocator failures (also cuDNN/cuBLAS workspace allocations)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text.lower() or "ALLOC_FAILED" in text or "can't allocate memory" in text
    )


def free_memory(device: torch.device | str) -> None:
    """Collect garbage and give cached CUDA blocks back, so the next measurement starts clean."""
    gc.collect()
    if torch.device(device).type == "cuda":
        synchronize(torch.device(device))
        torch.cuda.empty_cache()


@contextlib.contextmanager
def memory_cap(cap_gib: float | None, device: torch.device | str) -> Iterator[None]:
    """Limit the CUDA caching allocator to ``cap_gib`` GiB on ``device`` inside the block.

    Uses ``torch.cuda.set_per_process_memory_fraction`` (the fraction of the device's total
    memory) and restores the previous fraction afterwards. No-op for ``None`` or a CPU device.

    Raises:
        ValueError: ``cap_gib`` is not positive or exceeds the device's memory.
    """
    device = torch.device(device)
    if cap_gib is None or device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < cap_gib * GIB <= total * (1 + 1e-9):  # (the device's own size, round-tripped through GiB, is fine)
        raise ValueError(f"memory cap must be in (0, {total / GIB:.1f}] GiB on {device_name(device)}, but got {cap_gib}")
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = float(getter(device)) if getter is not None else 1.0
    free_memory(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap_gib * GIB / total)), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)


def model_config_for_patch(model_cfg: Mapping[str, Any], patch_size: Sequence[int]) -> dict[str, Any]:
    """The resolved model config for training on ``patch_size`` (a DynUNet without explicit
    strides is re-planned for it, as training would do)."""
    cfg = dict(model_cfg)
    cfg["patch_size"] = [int(p) for p in patch_size]
    return resolve_model_config(cfg)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:600]}" if text else type(exc).__name__


def build_variant_model(
    cfg: dict[str, Any], variant: Variant, n_probes: int, sketch_options: Mapping[str, Any], seed: int = 0
) -> torch.nn.Module:
    """The network of a resolved model config with ``variant``'s levers applied (stochastic/lean
    layers, gradient checkpointing), its weights seeded by ``seed`` (the global RNG is left alone).
    ``sketch_options`` are :func:`app.nn.convert`'s; their ``conv_block`` (default
    :data:`app.nn.CONV_BLOCK`) applies to ``blocked`` variants only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg)
    if variant.stochastic or variant.lean:
        kwargs = dict(sketch_options)
        conv_block = kwargs.pop("conv_block", app.nn.CONV_BLOCK)
        if variant.lean:
            kwargs["lean"] = True
        if variant.blocked:
            kwargs["conv_block"] = conv_block
        app.nn.convert(model, n_probes if variant.stochastic else 0, **kwargs)
    if variant.ckpt:
        enable_grad_checkpointing(model)
    return model


class TrainingStep:
    """What training runs, on random data: forward (under the variant's autocast), DiceCE over the
    deep-supervision heads in fp32, backward, AdamW step.

    Args:
        cfg: a resolved model config (:func:`model_config_for_patch`).
        variant: the levers.
        patch: spatial input size.
        batch_size: patches per step.
        n_probes, sketch_options: stochastic-layer settings (``app.nn.convert``).
        device: where to run.
        seed: seeds the weights, the input and the label.
        compile: ``trainer.compile``'s setting (:data:`app.models.compiled.COMPILE_MODES`): a
            ``torch.compile`` mode for the network, or ``cuda-graphs`` (forward, loss and backward
            captured as one CUDA graph after 3 eager steps); ``eager_model`` stays the uncompiled network.
    """

    def __init__(self, cfg: dict[str, Any], variant: Variant, patch: Sequence[int], batch_size: int, n_probes: int,
                 sketch_options: Mapping[str, Any], device: torch.device, seed: int = 0, compile: str = "off") -> None:
        from monai.losses import DiceCELoss

        self.eager_model = build_variant_model(cfg, variant, n_probes, sketch_options, seed).to(device).train()
        self.model = compile_model(self.eager_model, compile, device)
        self.cuda_graphs = uses_cuda_graphs(compile)
        self.parameters = list(self.eager_model.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-4)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn((batch_size, int(cfg["in_channels"]), *patch), generator=gen).to(device)
        self.y = torch.randint(0, int(cfg["out_channels"]), (batch_size, 1, *patch), generator=gen).to(device)
        self.device, self.dtype = device, variant.autocast_dtype
        self.captured: CapturedBackward | None = None
        if compile == CUDA_GRAPHS:
            check_capturable(self.eager_model, device, self.dtype)
            self.captured = CapturedBackward(self._loss_of, self.parameters)

    @property
    def calls_before_steady(self) -> int:
        """Calls after which every step runs as it will from then on (``cuda-graphs``: once captured)."""
        return 0 if self.captured is None else self.captured.warmup + 1

    def _loss_of(self, image: torch.Tensor, label: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """The loss of ``model`` (default: the eager network) on one batch, as the trainer computes it."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = (self.eager_model if model is None else model)(image)
        return deep_supervision_loss(self.loss_fn, logits, label)  # as the trainer: in fp32, outside autocast

    def forward_loss(self, eager: bool = False) -> torch.Tensor:
        """The loss of one forward pass, through the compiled network or (``eager``) the plain one."""
        return self._loss_of(self.x, self.y, self.eager_model if eager else self.model)

    def __call__(self) -> None:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
        self.optimizer.zero_grad(set_to_none=True)
        if self.captured is not None:
            self.captured(self.x, self.y)
        else:
            self.forward_loss().backward()
        self.optimizer.step()


def _run(
    cfg: dict[str, Any], v: Variant, patch: tuple[int, ...], batch_size: int, n_probes: int,
    sketch_options: Mapping[str, Any], device: torch.device, warmup: int, repeat: int, seed: int, compile: str,
) -> StepStats:
    if compile != "off":
        torch._dynamo.reset()  # graphs of earlier networks would count against dynamo's recompile limit
    base = reset_peak(device)  # what was allocated before the network (normally 0)
    step = TrainingStep(cfg, v, patch, batch_size, n_probes, sketch_options, device, seed, compile)
    params = step.parameters

    with app.nn.SavedTensorCounter(ignore=params) as saved:  # a compiled graph saves its own way: count eager
        loss = step.forward_loss(eager=True)
    del loss
    times: list[float] = []
    peak = math.nan
    if repeat > 0:
        for _ in range(max(warmup, step.calls_before_steady)):
            step()
        reset_peak(device)
        times = timed_calls(step, device, repeat)
        peak = peak_since(device, base)
    voxels = batch_size * math.prod(patch)
    return StepStats(
        variant=v.name, patch_size=patch, batch_size=batch_size, status=OK, peak_bytes=peak,
        step_seconds=statistics.median(times) if times else math.nan, saved_bytes=float(saved.bytes),
        saved_bytes_per_voxel=saved.bytes / voxels,
        parameter_bytes=float(sum(p.numel() * p.element_size() for p in params)), device=device_name(device),
    )


def measure_step(
    model_cfg: Mapping[str, Any],
    *,
    patch_size: Sequence[int],
    batch_size: int = 1,
    variant: str | Variant = "exact",
    n_probes: int = app.nn.DEFAULT_N_PROBES,
    device: torch.device | str = "cuda",
    warmup: int = 1,
    repeat: int = 3,
    memory_cap_gib: float | None = None,
    sketch_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    report_errors: bool = False,
    compile: str = "off",
) -> StepStats:
    """Measure one training step (forward, DiceCE loss, backward, AdamW step) of a network.

    Args:
        model_cfg: a model config for :func:`app.models.build_model` (``patch_size`` is replaced
            by ``patch_size``; a DynUNet without explicit strides is planned for it and needs
            ``spacing``).
        patch_size: spatial input size, e.g. ``(128, 128, 128)``.
        batch_size: patches per step. Default 1.
        variant: e.g. ``"exact"``, ``"stochastic+lean+amp"`` (see :mod:`app.measure.variants`).
        n_probes: probes per stochastic layer (``stochastic`` variants). Default ``app.nn.DEFAULT_N_PROBES``.
        device: where to run. Default ``"cuda"``.
        warmup: untimed steps before the measured ones (they allocate the optimizer state and
            let the allocator settle). Default 1.
        repeat: timed steps; ``step_seconds`` is their median and ``peak_bytes`` their peak.
            Default 3. ``0``: count the saved bytes only (one forward pass; no step, no time, no
            peak), which is all the CPU planner needs.
        memory_cap_gib: limit the CUDA allocator to this many GiB while measuring
            (:func:`memory_cap`); a step that does not fit reports ``status="oom"``.
        sketch_options: other ``app.nn.convert`` options (``probes``, ``sketch``, ``control``,
            ``min_voxels``, ``include``, ``exclude``).
        seed: seeds the weights and the random input/label (the global RNG is left untouched).
        report_errors: return a failure other than out-of-memory (e.g. a kernel refusing a
            tensor this large) as ``status="error"`` instead of raising it, as searches and
            benchmark tables want: that size does not train either. Default False.
        compile: run the network through ``torch.compile`` in this mode
            (:data:`app.models.compiled.COMPILE_MODES`; compilation happens in the warm-up, so
            give ``warmup >= 2`` with CUDA graphs). Default ``"off"``.

    Returns:
        The :class:`StepStats`; out-of-memory gives ``status="oom"`` instead of raising (other
        failures ``status="error"`` with ``report_errors``).

    Raises:
        ValueError: an unknown variant (naming it and listing the valid ones) or a patch size
            the network cannot take.
        RuntimeError: failures other than out-of-memory (unless ``report_errors``).

    Examples:
        >>> cfg = {"name": "unet", "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2]}
        >>> s = measure_step(cfg, patch_size=(16, 16, 16), variant="stochastic", device="cpu", repeat=1)
        >>> s.saved_bytes > 0
        True
    """
    v = parse_variant(variant)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    patch = tuple(int(p) for p in patch_size)
    if warmup < 0 or repeat < 0:
        raise ValueError(f"warmup and repeat must be >= 0, but got warmup={warmup}, repeat={repeat}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, but got batch_size={batch_size}")
    cfg = model_config_for_patch(model_cfg, patch)
    common: dict[str, Any] = {"variant": v.name, "patch_size": patch, "batch_size": batch_size, "device": device_name(dev)}
    failure = None
    with memory_cap(memory_cap_gib, dev):
        free_memory(dev)
        try:
            stats = _run(cfg, v, patch, batch_size, n_probes, dict(sketch_options or {}), dev, warmup, repeat, seed, compile)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
            if is_out_of_memory(exc):
                failure = (OOM, _first_line(exc))
            elif report_errors:
                failure = (ERROR, _first_line(exc))
            else:
                raise
        # the traceback (and the tensors its frames hold) is gone here: memory can be freed
        free_memory(dev)
    if failure is not None:
        return StepStats(**common, status=failure[0], reason=failure[1])
    return stats
