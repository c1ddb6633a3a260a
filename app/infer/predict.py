"""Sliding-window prediction: gaussian blending, flip test-time augmentation, AMP, device split.

The windows run on ``sw_device`` (usually the GPU); the blended output of the whole
volume is accumulated on ``device``, which is moved to the CPU when the volume is large
(as ``monai.inferers.sliding_window_inference`` allows), so a volume whose logits do not
fit next to the network in GPU memory still runs with GPU windows.

:func:`stream_logits` runs the same windows over a volume read slab by slab along its first
axis (a long video clip): each slab is one window deep and goes through :func:`predict_logits`;
the slabs are blended with the weights ``sliding_window_inference`` gives the whole volume, so
the result is the whole-volume prediction (to float rounding) while only a window's depth of
input and logits is held at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import nn

from app.models import main_output
from app.utils import AMP_DTYPES, amp_dtype

__all__ = [
    "AMP_MODES",
    "WindowSettings",
    "flip_axes",
    "predict_logits",
    "stitch_bytes",
    "stream_logits",
    "window_starts",
    "window_weight_sum",
]

# predict_logits blends windows with MONAI's gaussian importance map at its default width
# (sigma = 0.125 x the window size); window_weight_sum must use the same.
BLEND_MODE = "gaussian"
SIGMA_SCALE = 0.125

AMP_MODES = ("auto", *AMP_DTYPES)
"""``--amp`` settings: ``auto`` (bf16 on a CUDA device that supports it, else off) and :data:`app.utils.AMP_DTYPES`."""


@dataclass(frozen=True)
class WindowSettings:
    """How to run the network over a volume.

    Attributes:
        roi_size: window size per spatial axis.
        overlap: fraction of overlap between neighbouring windows, in [0, 1).
        sw_batch_size: windows per forward pass.
        tta: average over all flips of the spatial axes (2**D forward passes per window).
        amp: autocast dtype ``"bf16"``, ``"fp16"`` or ``"off"`` (already resolved).
        sw_device: where the network and the windows run.
        device: where the whole-volume output is stitched.
    """

    roi_size: tuple[int, ...]
    overlap: float = 0.5
    sw_batch_size: int = 2
    tta: bool = False
    amp: str = "off"
    sw_device: torch.device = torch.device("cpu")
    device: torch.device = torch.device("cpu")


def flip_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """Tensor axes to flip for each TTA pass of an ``(N, C, *S)`` tensor, identity first.

    Returns:
        ``2 ** spatial_dims`` tuples; the first is empty.
    """
    axes = range(2, 2 + spatial_dims)
    return [combo for r in range(spatial_dims + 1) for combo in itertools.combinations(axes, r)]


def _window_predictor(
    model: nn.Module, settings: WindowSettings, spatial_dims: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    flips = flip_axes(spatial_dims) if settings.tta else [()]
    dtype = amp_dtype(settings.amp)

    def run(x: torch.Tensor) -> torch.Tensor:
        return main_output(model(x)).float()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None):
            acc = run(x)
            for axes in flips[1:]:
                acc = acc + torch.flip(run(torch.flip(x, axes)), axes)
        return acc / len(flips)

    return predict


def stitch_bytes(spatial_shape: Sequence[int], in_channels: int, out_channels: int) -> int:
    """Bytes the stitched output needs on ``device``: fp32 logits, count map and input.

    Args:
        spatial_shape: processed volume size ``S``.
        in_channels: image channels.
        out_channels: network output channels.
    """
    return 4 * math.prod(spatial_shape) * (out_channels + 1 + in_channels)


@torch.inference_mode()
def predict_logits(model: nn.Module, image: torch.Tensor, settings: WindowSettings) -> torch.Tensor:
    """Run the network over a whole volume with gaussian-weighted sliding windows.

    Args:
        model: network in eval mode, already on ``settings.sw_device``.
        image: ``(C, *S)`` or ``(1, C, *S)`` pre-processed volume (any device).
        settings: window, TTA, AMP and device settings.

    Returns:
        ``(K, *S)`` float32 logits on ``settings.device`` (averaged over flips when
        ``settings.tta``). Volumes smaller than the ROI are padded internally.
    """
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    if x.ndim == len(settings.roi_size) + 1:
        x = x.unsqueeze(0)
    x = x.to(settings.device, dtype=torch.float32)
    out = sliding_window_inference(
        x,
        roi_size=list(settings.roi_size),
        sw_batch_size=settings.sw_batch_size,
        predictor=_window_predictor(model, settings, len(settings.roi_size)),
        overlap=settings.overlap,
        mode=BLEND_MODE,
        sigma_scale=SIGMA_SCALE,
        sw_device=settings.sw_device,
        device=settings.device,
    )
    assert isinstance(out, torch.Tensor)
    return out[0]


def _scan_interval(size: int, roi: int, overlap: float) -> int:
    """Step between window starts along one axis, as ``sliding_window_inference`` takes it."""
    if roi == size:
        return roi
    return max(int(roi * (1 - overlap)), 1)


def window_starts(length: int, roi: int, overlap: float) -> list[int]:
    """Where ``sliding_window_inference`` starts its windows along one axis of ``length`` voxels.

    Args:
        length: the axis' size.
        roi: the window size along it.
        overlap: overlap fraction in [0, 1).

    Returns:
        Increasing start indices; ``[0]`` when ``length <= roi`` (the axis is padded to ``roi``).
        The last window ends at ``max(length, roi)``.
    """
    size = max(length, roi)
    return [int(s[0].start) for s in dense_patch_slices((size,), (roi,), (_scan_interval(size, roi, overlap),))]


def window_weight_sum(
    spatial_shape: Sequence[int], roi_size: Sequence[int], overlap: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Sum of the windows' gaussian weights at each voxel: ``sliding_window_inference``'s count map.

    ``predict_logits`` returns ``sum_w weight_w * logits_w / window_weight_sum``; multiplying its
    output by this map gives back the weighted sum, which can be added to that of other volumes.

    Args:
        spatial_shape: the volume's spatial size ``S``.
        roi_size: window size per axis.
        overlap: overlap fraction in [0, 1).
        device: where to build the map.

    Returns:
        ``S``-shaped float32 tensor (positive). Axes shorter than the window are padded and
        cropped back as ``sliding_window_inference`` does.
    """
    roi = tuple(int(r) for r in roi_size)
    padded = tuple(max(int(s), r) for s, r in zip(spatial_shape, roi))
    steps = [_scan_interval(p, r, overlap) for p, r in zip(padded, roi)]
    weight = compute_importance_map(roi, mode=BLEND_MODE, sigma_scale=SIGMA_SCALE, device=device)
    total = torch.zeros(padded, dtype=torch.float32, device=device)
    for window in dense_patch_slices(padded, roi, steps):
        total[window] += weight
    crop = tuple(slice((p - s) // 2, (p - s) // 2 + s) for p, s in zip(padded, spatial_shape))
    return total[crop]


@torch.inference_mode()
def stream_logits(
    predict: Callable[[torch.Tensor], torch.Tensor],
    read: Callable[[int, int], torch.Tensor],
    length: int,
    settings: WindowSettings,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Sliding-window prediction of a volume read in slabs along its first spatial axis.

    The windows are those :func:`predict_logits` would place on the whole volume. For each
    start ``s`` along the first axis, the slab ``read(s, depth)`` (one window deep) is predicted
    with ``predict`` (which slides the windows over the other axes); its output times
    :func:`window_weight_sum` is added to a running sum, and once no later slab reaches a frame
    that frame's blended logits are handed out. A volume no deeper than a window is one slab.

    Args:
        predict: ``(C, d, *R) -> (K, d, *R)`` logits, e.g. ``lambda x: predict_logits(model, x, settings)``.
        read: ``(start, count) -> (C, count, *R)`` pre-processed input along the first axis.
        length: the volume's size along the first axis.
        settings: the window settings ``predict`` uses (its ROI and overlap).

    Yields:
        ``(start, logits)``: consecutive blocks ``(K, n, *R)``, on the device of ``predict``'s first
        output, that cover ``[0, length)`` in order.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, but got length={length}")
    depth = int(settings.roi_size[0])
    starts = window_starts(length, depth, settings.overlap)
    if len(starts) == 1:
        yield 0, predict(read(0, length))
        return
    num: torch.Tensor | None = None  # weighted logit sums of frames [start, start + depth)
    den: torch.Tensor | None = None  # weight sums of the same frames
    weights: torch.Tensor | None = None
    for i, start in enumerate(starts):
        out = predict(read(start, depth)).float()
        if weights is None:  # blended where the first slab's output lands (predict may fall back to the CPU)
            weights = window_weight_sum(out.shape[1:], settings.roi_size, settings.overlap, out.device)
            num = torch.zeros_like(out)
            den = torch.zeros_like(weights)
        assert num is not None and den is not None
        out = out.to(num.device)
        num += out.mul_(weights)
        den += weights
        done = starts[i + 1] - start if i + 1 < len(starts) else depth
        yield start, num[:, :done] / den[:done]
        # The next window starts `done` frames later: shift what it shares with this one to the front.
        keep = depth - done
        num[:, :keep] = num[:, done:].clone()
        den[:keep] = den[done:].clone()
        num[:, keep:] = 0.0
        den[keep:] = 0.0
