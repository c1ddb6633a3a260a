"""``trainer.patch_size=auto``: the largest patch :mod:`app.plan` finds for the training config,
written into the config."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from app.measure import training_variant
from app.nn.fidelity import split_sketch_config
from app.plan import plan_patch_size
from app.train.distributed import DistInfo

__all__ = ["AUTO", "data_shape", "is_auto", "resolve_auto_patch_size", "sketch_convert_options"]

log = logging.getLogger(__name__)

AUTO = "auto"


def sketch_convert_options(sketch: Mapping[str, Any]) -> dict[str, Any]:
    """The ``app.nn.convert`` keywords of a training config's ``sketch`` group, as the trainer passes
    them (``n_probes: auto`` plans for its largest candidate: the most memory the allocator can pick)."""
    return dict(split_sketch_config(sketch)[0])


def is_auto(patch_size: Any) -> bool:
    """True for ``trainer.patch_size: auto``."""
    return isinstance(patch_size, str) and patch_size.strip().lower() == AUTO


def data_shape(datalist: Any, spacing: Sequence[float]) -> list[int] | None:
    """The data's median shape at the network's ``spacing`` (None when the headers were not read)."""
    shape, native = getattr(datalist, "median_shape", None), getattr(datalist, "median_spacing", None)
    if shape is None or native is None:
        return None
    return [max(1, round(n * a / b)) for n, a, b in zip(shape, native, spacing)]


def resolve_auto_patch_size(
    cfg: DictConfig, model_cfg: Mapping[str, Any], device: torch.device, dist: DistInfo | None = None, datalist: Any = None,
) -> list[int]:
    """Plan ``trainer.patch_size=auto`` and write the result into ``cfg.trainer.patch_size``.

    The variant is the one the config trains (``sketch.n_probes`` (``auto``: its largest
    candidate), ``sketch.lean``, ``trainer.amp``, ``trainer.grad_checkpointing``), with the other
    ``sketch`` options; the budget ``trainer.memory_budget_gib``
    (null: the device's memory), the batch ``trainer.batch_size``; the patch is capped at the data's
    median shape. Under DDP rank 0 plans and the others receive its answer.

    Args:
        cfg: the composed training config (an OmegaConf ``DictConfig``); modified in place.
        model_cfg: the model config (``spacing`` filled in).
        device: the training device.
        dist: the trainer's ``DistInfo`` (None: one process).
        datalist: the data list (for its median shape), or None.

    Returns:
        The planned patch size.
    """
    t = cfg.trainer
    options = sketch_convert_options(OmegaConf.to_container(cfg.sketch, resolve=True))
    n_probes = int(options.pop("n_probes", 0))
    lean = bool(options.pop("lean", False))
    variant = training_variant(n_probes=n_probes, amp=t.amp, grad_checkpointing=bool(t.grad_checkpointing), lean=lean)
    spacing = [float(v) for v in model_cfg["spacing"]]
    patch: list[int] | None = None
    if dist is None or not dist.enabled or dist.is_main:
        patch = list(plan_patch_size(
            model_cfg, t.get("memory_budget_gib"), spacing, variant, int(t.batch_size), device,
            n_probes=n_probes, sketch_options=options, max_shape=data_shape(datalist, spacing),
        ))
    if dist is not None and dist.enabled:
        box = [patch]
        torch.distributed.broadcast_object_list(box, src=0)
        patch = box[0]
    assert patch is not None
    log.info("trainer.patch_size=auto: %s (variant %s, budget %s GiB)", patch, variant.name, t.get("memory_budget_gib"))
    with open_dict(cfg):
        cfg.trainer.patch_size = patch
    return patch
