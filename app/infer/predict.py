"""Sliding-window prediction: gaussian blending, flip test-time augmentation, AMP, device split.

The windows run on ``sw_device`` (usually the GPU); the blended output of the whole
volume is accumulated on ``device``, which is moved to the CPU when the volume is large
(as ``monai.inferers.sliding_window_inference`` allows), so a volume whose logits do not
fit next to the network in GPU memory still runs with GPU windows.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference
from torch import nn

__all__ = [
    "AMP_MODES",
    "WindowSettings",
    "resolve_device",
    "resolve_amp",
    "flip_axes",
    "predict_logits",
    "stitch_bytes",
]

AMP_MODES = ("auto", "bf16", "fp16", "off")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def resolve_device(name: str | torch.device) -> torch.device:
    """Turn ``"auto"`` into ``cuda`` when available (else ``cpu``) and check CUDA requests.

    Raises:
        ValueError: a CUDA device was asked for but CUDA is not available.
    """
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} requested but CUDA is not available; use --device cpu")
    return dev


def resolve_amp(amp: str, device: torch.device) -> str:
    """Resolve ``"auto"``: bf16 on a CUDA device that supports it, otherwise off.

    Raises:
        ValueError: unknown mode.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {list(AMP_MODES)}, but got amp={amp!r}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return amp


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
    amp_dtype = _AMP_DTYPES.get(settings.amp)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        if isinstance(out, (list, tuple)):  # deep supervision heads: the full-resolution one
            out = out[0]
        return out.float()

    def predict(x: torch.Tensor) -> torch.Tensor:
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
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
