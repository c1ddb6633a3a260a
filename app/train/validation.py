"""Validation: sliding-window inference on whole volumes; per-class Dice and slice overlays for
segmentation, PSNR and SSIM for restoration; side-by-side clips (input | prediction | target) for video."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, PSNRMetric, SSIMMetric
from monai.networks.utils import one_hot
from torch import nn

__all__ = [
    "class_dice",
    "mean_dice",
    "overlay",
    "restoration_clip",
    "segmentation_clip",
    "validate",
    "validate_restoration",
]

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
    n_clips: int = 0,
    clip_frames: int = 32,
) -> tuple[list[list[float]], list[np.ndarray], list[np.ndarray]]:
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
        n_clips: number of clips (the first volumes, time on their first axis) to render as
            side-by-side clips (:func:`segmentation_clip`). Default 0.
        clip_frames: frames of each rendered clip (its first ones). Default 32.

    Returns:
        ``(per_case, images, clips)``: for each volume, the Dice of classes 1..K-1 (NaN where the
        class is absent from the reference; :func:`class_dice` averages them, also over the
        volumes of every DDP rank); up to ``n_images`` RGB overlays (``(H, 3 W, 3)`` uint8,
        see :func:`overlay`); up to ``n_clips`` clips ``(T, H, 3 W, 3)`` uint8.
    """
    was_training = model.training
    model.eval()
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    per_case: list[list[float]] = []
    images: list[np.ndarray] = []
    clips: list[np.ndarray] = []
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
            if i < n_clips:
                t = min(int(clip_frames), image.shape[2])
                clips.append(segmentation_clip(image[0, :, :t].float().cpu().numpy(), pred[0, 0, :t].cpu().numpy(),
                                               label[0, 0, :t].cpu().numpy()))
    finally:
        model.train(was_training)
    return per_case, images, clips


@torch.no_grad()
def validate_restoration(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    *,
    roi_size: Sequence[int],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    n_clips: int = 0,
    clip_frames: int = 32,
) -> tuple[list[list[float]], list[np.ndarray]]:
    """Restore whole degraded clips with a sliding window; score each against its clean original.

    PSNR (MONAI's ``PSNRMetric``, peak 1) over the whole clip and SSIM (``SSIMMetric``, 2D, data
    range 1) averaged over its frames, with the prediction clamped to [0, 1] as it would be written.

    Args:
        model: the network (put in eval mode here, restored to its mode afterwards).
        loader: yields ``{"image": (1, C, T, H, W) degraded, "label": (1, C, T, H, W) clean}``.
        roi_size: sliding-window size (the training patch size).
        device: where the windows run and the clip is stitched.
        amp_dtype: autocast dtype of the forward passes, or None.
        sw_batch_size: windows per forward pass. Default 2.
        overlap: window overlap in ``[0, 1)``. Default 0.25.
        n_clips: number of clips (the first ones) to render as input | prediction | target. Default 0.
        clip_frames: frames of each rendered clip (its first ones). Default 32.

    Returns:
        ``(per_case, clips)``: ``[psnr, ssim]`` of each clip (the degraded input's own PSNR and
        SSIM follow, ``[psnr, ssim, input_psnr, input_ssim]``), and up to ``n_clips`` clips
        ``(T, H, 3 W, 3)`` uint8 (:func:`restoration_clip`).
    """
    was_training = model.training
    model.eval()
    psnr = PSNRMetric(max_val=1.0, reduction="none")
    per_case: list[list[float]] = []
    clips: list[np.ndarray] = []
    try:
        for i, batch in enumerate(loader):
            image = batch["image"].as_subclass(torch.Tensor).to(device)
            clean = batch["label"].as_subclass(torch.Tensor).to(device).float()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = sliding_window_inference(
                    image, roi_size=list(roi_size), sw_batch_size=sw_batch_size, predictor=model,
                    overlap=overlap, mode="gaussian",
                )
            restored = out.float().clamp(0.0, 1.0)
            row = []
            for x in (restored, image.float().clamp(0.0, 1.0)):
                row += [float(psnr(x, clean).mean()), frame_ssim(x, clean)]
            per_case.append(row)
            if i < n_clips:
                t = min(int(clip_frames), image.shape[2])
                clips.append(restoration_clip(image[0, :, :t].float().cpu().numpy(), restored[0, :, :t].cpu().numpy(),
                                              clean[0, :, :t].cpu().numpy()))
    finally:
        model.train(was_training)
    return per_case, clips


def frame_ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM over the frames of ``(1, C, T, H, W)`` clips in [0, 1] (Gaussian window of 11, or the frame size if smaller)."""
    frames_p = pred[0].transpose(0, 1)  # (T, C, H, W)
    frames_t = target[0].transpose(0, 1)
    win = min(11, frames_p.shape[-2], frames_p.shape[-1])
    win -= 1 - win % 2  # odd
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=max(win, 1), reduction="mean")
    return float(metric(frames_p, frames_t).mean())


def _rgb_frames(clip: np.ndarray) -> np.ndarray:
    """``(C, T, H, W)`` in [0, 1] -> ``(T, H, W, 3)`` float in [0, 255] (grey repeated; other channel counts: the first)."""
    rgb = clip if clip.shape[0] == 3 else np.repeat(clip[:1], 3, axis=0)
    return np.clip(np.moveaxis(rgb, 0, -1), 0.0, 1.0) * 255.0


def segmentation_clip(image: np.ndarray, pred: np.ndarray, label: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Frames of a segmented clip side by side: input | prediction | target.

    Args:
        image: ``(C, T, H, W)`` intensities (any range: each channel is scaled to its 0.5..99.5 percentiles).
        pred: ``(T, H, W)`` predicted classes.
        label: ``(T, H, W)`` reference classes.
        alpha: opacity of the class colours.

    Returns:
        ``(T, H, 3 W, 3)`` uint8 RGB; both coloured panels show the reference's outline in white.
    """
    lo = np.percentile(image, 0.5, axis=(1, 2, 3), keepdims=True)
    hi = np.percentile(image, 99.5, axis=(1, 2, 3), keepdims=True)
    grey = _rgb_frames((image - lo) / np.maximum(hi - lo, 1e-6))  # (T, H, W, 3)
    lab, prd = label.astype(np.int64), pred.astype(np.int64)
    edge = np.stack([_outline(f) for f in lab])

    def paint(classes: np.ndarray) -> np.ndarray:
        rgb = grey.copy()
        fg = classes > 0
        rgb[fg] = (1 - alpha) * rgb[fg] + alpha * _PALETTE[(classes[fg] - 1) % len(_PALETTE)]
        rgb[edge] = 255.0
        return rgb

    return np.concatenate([grey, paint(prd), paint(lab)], axis=2).round().astype(np.uint8)


def restoration_clip(degraded: np.ndarray, restored: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """Frames of a restored clip side by side: degraded input | restored | clean target.

    Args:
        degraded, restored, clean: ``(C, T, H, W)`` in [0, 1] (clipped).

    Returns:
        ``(T, H, 3 W, 3)`` uint8 RGB.
    """
    return np.concatenate([_rgb_frames(c) for c in (degraded, restored, clean)], axis=2).round().astype(np.uint8)


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
