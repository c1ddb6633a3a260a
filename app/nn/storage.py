"""How far the lean layers' reduced-precision storage moves a network's gradients, next to SGD noise.

The lean norms keep ``x̂`` in ``lean_storage`` dtype and rebuild their input gradient from it, so
every gradient upstream of a norm carries that rounding. The error is deterministic (rounding,
not sampling). :func:`storage_errors` measures it the way :func:`app.nn.gradient_fidelity`
measures the sketches: per parameter and for the whole network, the relative error against the
gradient with fp32 storage (torch's maths), beside the relative distance of the gradient of
another batch (the mini-batch noise SGD already lives with).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .convert import convert
from .lean import STORAGE_DTYPES

__all__ = ["StorageError", "storage_errors"]


@dataclass
class StorageError:
    """One storage dtype's gradient error.

    Attributes:
        storage: the ``lean_storage`` name.
        network: ``‖g_s − g‖ / ‖g‖`` over all parameters (``g``: fp32 storage, ``g_s``: this one).
        sgd_noise: ``‖g' − g‖ / ‖g‖`` over all parameters, ``g'`` the gradient of the other batch.
        worst_ratio: the largest per-parameter ``error / sgd noise`` (parameters with a nonzero gradient).
        worst: the parameter where it occurs.
        per_parameter: name -> ``(error, sgd noise)``.
    """

    storage: str
    network: float
    sgd_noise: float
    worst_ratio: float
    worst: str
    per_parameter: dict[str, tuple[float, float]] = field(default_factory=dict)


def _gradients(model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model, batch), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach().double() for p, g in zip(params, grads)]


def storage_errors(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batch: Any,
    reference_batch: Any,
    storages: Sequence[str] = ("bfloat16", "float8_e4m3fn", "float8_e5m2"),
) -> list[StorageError]:
    """Gradient error of each ``lean_storage`` against fp32 storage, with exact convolutions.

    Args:
        model: the network (a copy is converted, ``model`` is left alone), in training mode.
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss (any autocast inside).
        batch: the batch the gradients are taken on.
        reference_batch: another batch: its gradient's distance is the SGD noise.
        storages: names of :data:`app.nn.lean.STORAGE_DTYPES`.

    Returns:
        One :class:`StorageError` per storage, in order.

    Raises:
        ValueError: an unknown storage name.
    """
    unknown = [s for s in storages if s not in STORAGE_DTYPES]
    if unknown:
        raise ValueError(f"storages must be among {list(STORAGE_DTYPES)}, but got {unknown}")
    reference = convert(copy.deepcopy(model), n_probes=0, lean=True, lean_storage="float32").train()
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    exact = _gradients(reference, loss_fn, batch)
    other = _gradients(reference, loss_fn, reference_batch)
    del reference
    noise = [(o - e).norm().item() for o, e in zip(other, exact)]
    norms = [e.norm().item() for e in exact]
    total = math.sqrt(sum(n * n for n in norms))
    sgd = math.sqrt(sum(d * d for d in noise)) / total
    out = []
    for storage in storages:
        lean = convert(copy.deepcopy(model), n_probes=0, lean=True, lean_storage=storage).train()
        grads = _gradients(lean, loss_fn, batch)
        del lean
        errors = [(g - e).norm().item() for g, e in zip(grads, exact)]
        per = {n: (err / norm, d / norm) for n, err, d, norm in zip(names, errors, noise, norms) if norm > 0}
        ratios = {n: err / d for n, (err, d) in per.items() if d > 0}
        worst = max(ratios, key=ratios.get) if ratios else ""
        out.append(StorageError(storage, math.sqrt(sum(e * e for e in errors)) / total, sgd,
                                ratios.get(worst, math.nan), worst, per))
    return out
