"""Validation: sliding-window inference on whole volumes, per-class Dice, slice overlays."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

__all__ = ["validate", "class_dice", "mean_dice", "overlay"]

# RGB colours of classes 1, 2, ... in the overlays (background is not drawn).
_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]],
    dtype=np.float32,
)


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    *,
    n_classes: int,
    roi_size: Sequence[int],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    n_images: int = 0,
) -> tuple[list[list[float]], list[np.ndarray]]:
    """Segment whole volumes with a sliding window and score each with per-class Dice.

    Args:
        model: the network (put in eval mode here, restored to its mode afterwards).
        loader: yields ``{"image": (1, C, *S), "label": (1, 1, *S)}`` whole volumes.
        n_classes: number of output classes, background included.
        roi_size: sliding-window size (the training patch size).
        device: where the windows run; volumes are stitched there too.
        amp_dtype: autocast dtype of the forward passes (``torch.bfloat16``/``torch.float16``), or None.
        sw_batch_size: windows per forward pass. Default 2.
        overlap: window overlap in ``[0, 1)``. Default 0.25.
        n_images: number of volumes (the first ones) to render as slice overlays. Default 0.

    Returns:
        ``(per_case, images)``: for each volume, the Dice of classes 1..K-1 (NaN where the
        class is absent from the reference; :func:`class_dice` averages them, also over the
        volumes of every DDP rank), and up to ``n_images`` RGB overlays (``(H, 3 W, 3)`` uint8,
        see :func:`overlay`).
    """
    was_training = model.training
    model.eval()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    per_case: list[list[float]] = []
    images: list[np.ndarray] = []
    try:
        for i, batch in enumerate(loader):
            image = batch["image"].as_subclass(torch.Tensor).to(device)  # plain tensors: no MetaTensor overhead
            label = batch["label"].as_subclass(torch.Tensor).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = sliding_window_inference(
                    image, roi_size=list(roi_size), sw_batch_size=sw_batch_size, predictor=model,
                    overlap=overlap, mode="gaussian",
                )
            pred = logits.float().argmax(dim=1, keepdim=True)
            dice = metric(y_pred=one_hot(pred, n_classes), y=one_hot(label.long(), n_classes))
            per_case.append([float(v) for v in dice[0].tolist()])
            if i < n_images:
                images.append(overlay(image[0, 0].float().cpu().numpy(), label[0, 0].cpu().numpy(), pred[0, 0].cpu().numpy()))
    finally:
        model.train(was_training)
    return per_case, images


def class_dice(per_case: Sequence[Sequence[float]]) -> list[float]:
    """Per-class Dice over volumes: the mean of each column, NaN entries (class absent) skipped."""
    table = np.asarray(per_case, dtype=np.float64)
    present = ~np.isnan(table)
    sums = np.where(present, table, 0.0).sum(axis=0)
    counts = present.sum(axis=0)
    return [float(s / c) if c else float("nan") for s, c in zip(sums, counts)]


def mean_dice(dice: Sequence[float]) -> float:
    """Mean over the classes present in the references (NaN entries skipped; NaN if none)."""
    present = [d for d in dice if not math.isnan(d)]
    return float(np.mean(present)) if present else float("nan")


def overlay(image: np.ndarray, label: np.ndarray, pred: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Render the axial slice with the most labelled voxels as image | label | prediction.

    Args:
        image: ``(X, Y, Z)`` intensities.
        label: ``(X, Y, Z)`` reference classes.
        pred: ``(X, Y, Z)`` predicted classes.
        alpha: opacity of the class colours. Default 0.45.

    Returns:
        ``(Y, 3 X, 3)`` uint8 RGB: the grey slice, then the slice with the reference in
        colour, then with the prediction in colour; both coloured panels also show the
        reference's outline in white, so misses and false positives stand out.
    """
    z = int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(axis=0))) if label.any() else label.shape[-1] // 2
    img, lab, prd = image[..., z].T, label[..., z].T.astype(np.int64), pred[..., z].T.astype(np.int64)
    lo, hi = np.percentile(img, [0.5, 99.5])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)[..., None].repeat(3, axis=-1) * 255.0
    edge = _outline(lab)

    def paint(classes: np.ndarray) -> np.ndarray:
        rgb = grey.copy()
        fg = classes > 0
        colours = _PALETTE[(classes[fg] - 1) % len(_PALETTE)]
        rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours
        rgb[edge] = 255.0
        return rgb

    return np.concatenate([grey, paint(lab), paint(prd)], axis=1).round().astype(np.uint8)


def _outline(classes: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another class (inner boundary of each region)."""
    padded = np.pad(classes, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre) | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre)
    )
    return differs & (centre > 0)
