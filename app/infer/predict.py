"""Sliding-window prediction: gaussian blending, flip test-time augmentation, AMP, device split.

The windows run on ``sw_device`` (usually the GPU); the blended output of the whole
volume is accumulated on ``device``, which is moved to the CPU when the volume is large
(as ``monai.inferers.sliding_window_inference`` allows), so a volume whose logits do not
fit next to the network in GPU memory still runs with GPU windows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
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
]

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
        mode="gaussian",
        sw_device=settings.sw_device,
        device=settings.device,
    )
    assert isinstance(out, torch.Tensor)
    return out[0]
