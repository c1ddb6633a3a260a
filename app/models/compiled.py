"""Faster training steps, exact and stochastic models alike (``trainer.compile``).

Two ways, one option:

* ``cuda-graphs``: the eager step (forward, loss, backward) captured whole as one CUDA graph
  (:class:`CapturedBackward`) and replayed for every batch: no code generation, nothing to wait
  for; it removes the host time of the many small kernels a step launches (the GPU no longer
  waits on Python and dispatch). CUDA only.
* a ``torch.compile`` mode (:func:`compile_model`): generated, fused kernels; ``reduce-overhead``
  also replays the compiled forward and backward as CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

import app.nn

CUDA_GRAPHS = "cuda-graphs"
"""``trainer.compile`` value that captures the eager step as one CUDA graph (:class:`CapturedBackward`)."""

COMPILE_MODES = ("off", CUDA_GRAPHS, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``off`` (eager), :data:`CUDA_GRAPHS`, or the ``torch.compile`` mode the training model is
compiled with; ``reduce-overhead`` also replays the compiled forward and backward as CUDA graphs."""


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
    if mode in ("off", CUDA_GRAPHS):  # cuda-graphs captures the step, not the model (CapturedBackward)
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


def check_capturable(model: nn.Module, device: torch.device, amp: torch.dtype | None, world_size: int = 1) -> None:
    """Raises ``ValueError`` (one line naming the setting) when ``trainer.compile=cuda-graphs`` cannot
    capture this model's step: not CUDA, fp16 (its loss scaler decides on the host), several
    processes (DDP's gradient hooks), or a stochastic layer whose sketch draws its probes from
    host generators (a replay would reuse the captured draws; the spectral sketch draws on the device)."""
    where = f"trainer.compile={CUDA_GRAPHS}"
    if device.type != "cuda":
        raise ValueError(f"{where} needs a CUDA device, but trainer.device is {device}")
    if amp == torch.float16:
        raise ValueError(f"{where} supports trainer.amp=bf16 or no autocast, not fp16 (its loss scaler syncs with the host)")
    if world_size > 1:
        raise ValueError(f"{where} runs in one process; with {world_size} processes use trainer.compile=reduce-overhead")
    for name, layer in app.nn.stochastic_layers(model):
        if layer.n_probes > 0 and layer.sketch != "spectral":
            raise ValueError(f"{where} needs sketch.sketch=spectral (its draws come from the device), "
                             f"but layer {name} uses sketch={layer.sketch!r}")


class CapturedBackward:
    """Forward, loss and backward of a fixed-shape batch, captured once as one CUDA graph and replayed.

    ``loss_of(image, label)`` runs the forward pass and returns the scalar loss (autocast, deep
    supervision and any scaling inside it). A call does what ``loss_of(image, label).backward()``
    does: the gradients land in (or are added to) ``p.grad`` of ``parameters``, and the loss comes
    back detached. The first ``warmup`` calls run eagerly on a side stream (cuDNN and cuBLAS set
    themselves up, the spectral sketch makes its device seed counter); the next call captures the
    graph on static copies of its inputs, and every later call copies its batch into them and
    replays. A batch of another shape or dtype runs eagerly. The graph keeps its own memory pool
    (about an eager step's peak) and writes the gradients into the same tensors on every replay.

    The spectral sketch draws from a device counter the graph advances, so every replay samples
    afresh; :func:`check_capturable` refuses what a graph cannot replay faithfully. After anything
    that changes the model's structure (the probe allocator's per-layer probe counts), call
    :meth:`reset` to capture again.

    Shapes:
        ``image`` ``(B, C_in, *S)``, ``label`` ``(B, 1, *S)`` (any fixed shape); returns a 0-dim tensor.
    """

    def __init__(self, loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 parameters: Sequence[nn.Parameter], warmup: int = 3) -> None:
        self.loss_of = loss_of
        self.parameters = list(parameters)
        self.warmup = warmup
        self.reset()

    def reset(self) -> None:
        """Drops the graph; the next calls warm up and capture again."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.static_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.static_loss: torch.Tensor | None = None
        self.static_grads: list[torch.Tensor | None] = []

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return self._eager_on_side_stream(image, label)
        if self.graph is None:
            self._capture(image, label)
        elif not all(_same_layout(s, t) for s, t in zip(self.static_inputs, (image, label))):
            return self._eager_on_side_stream(image, label)
        for p, static in zip(self.parameters, self.static_grads):
            if p.grad is not None and p.grad is static:  # an earlier replay's gradient, still being accumulated into
                p.grad = p.grad.clone()
        self.static_inputs[0].copy_(image, non_blocking=True)
        self.static_inputs[1].copy_(label, non_blocking=True)
        self.graph.replay()
        for p, static in zip(self.parameters, self.static_grads):
            if static is None:
                continue
            if p.grad is None:
                p.grad = static
            else:
                p.grad.add_(static)
        return self.static_loss

    def _eager_on_side_stream(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        side = torch.cuda.Stream(device=image.device)
        side.wait_stream(torch.cuda.current_stream(image.device))
        with torch.cuda.stream(side):
            loss = self.loss_of(image, label)
            loss.backward()
            loss = loss.detach()
        torch.cuda.current_stream(image.device).wait_stream(side)
        return loss

    def _capture(self, image: torch.Tensor, label: torch.Tensor) -> None:
        device = image.device
        app.nn.probes.ensure_device_seed(device)
        self.static_inputs = (image.detach().clone(), label.detach().clone())
        held = [p.grad for p in self.parameters]
        for p in self.parameters:
            p.grad = None  # the backward inside the graph allocates the gradients in the graph's pool
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the warm-up's cached blocks, so the graph's pool fits where eager did
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's pin-memory thread may allocate pinned memory meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self.loss_of(*self.static_inputs)
                loss.backward()
                self.static_loss = loss.detach()
                del loss
        finally:
            self.static_grads = [p.grad for p in self.parameters]
            for p, g in zip(self.parameters, held):
                p.grad = g
        self.graph = graph


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
