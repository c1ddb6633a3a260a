"""Replay a checkpoint's pre-processing on a NIfTI file, and invert it on the prediction.

The checkpoint's ``preprocessing`` dict (the ``data.preprocessing`` group of the training
config, ``app.data.Preprocessing.to_dict()``) is parsed into :class:`Preprocessing`, then
turned into a MONAI dictionary transform chain whose spatial steps are invertible, so that
:func:`build_inverter` can bring a prediction made in the processed space back onto the
input's original voxel grid, orientation and affine.

Chain (key ``"image"``), the same steps and order as training's
``app.data.transforms.preprocessing_transforms``::

    LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd
      zscore: -> CropForegroundd -> NormalizeIntensityd(nonzero, channel-wise)
      ct:     -> ScaleIntensityRanged(ct_window -> [0, 1], clipped) -> CropForegroundd
      none:   -> CropForegroundd

Foreground is "above the image minimum" (zero / air padding removed), as in training.

Note:
    ``app.data.transforms.infer_transforms`` serves the same purpose; this module was
    written independently (to avoid blocking on it) and mirrors its semantics; a test in
    ``tests/test_infer.py`` compares the two chains voxel for voxel. They should be unified
    into one definition.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

__all__ = ["INTENSITY_MODES", "Preprocessing", "build_preprocess", "build_inverter"]

logger = logging.getLogger(__name__)

INTENSITY_MODES = ("zscore", "ct", "none")
# The labels Orientationd uses for RAS axis codes (passed explicitly: MONAI is changing the default).
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_KNOWN_KEYS = ("spacing", "orientation", "intensity", "ct_window", "crop_foreground", "in_channels")


@dataclass(frozen=True)
class Preprocessing:
    """Pre-processing settings stored in a checkpoint.

    Defaults are those of ``app.data.Preprocessing`` (used when a key is missing).

    Attributes:
        spacing: target voxel spacing in mm per axis (after re-orientation; one number
            means isotropic), or None to keep the input's spacing.
        orientation: target axis codes (e.g. ``"RAS"``), or None to keep the input's.
        intensity: ``"zscore"`` (per channel, mean/std of the non-zero voxels),
            ``"ct"`` (clip to ``ct_window`` and scale it to [0, 1]) or ``"none"``.
        ct_window: ``(low, high)`` in HU, used by ``"ct"``. Default (-175, 250).
        crop_foreground: crop to the bounding box of the voxels above the image's
            minimum (after CT windowing). Default True.
        in_channels: number of image channels the network expects.
    """

    spacing: tuple[float, ...] | None = None
    orientation: str | None = "RAS"
    intensity: str = "zscore"
    ct_window: tuple[float, float] = (-175.0, 250.0)
    crop_foreground: bool = True
    in_channels: int = 1

    @classmethod
    def from_dict(cls, pre: Mapping[str, Any], in_channels: int | None = None) -> Preprocessing:
        """Parse and validate a checkpoint's ``preprocessing`` dict.

        Args:
            pre: the dict; missing keys take the defaults above, unknown keys are ignored
                (logged at debug level).
            in_channels: the model's input channels; wins over ``pre["in_channels"]``
                when both are given and they disagree (with a warning).

        Raises:
            ValueError: a value is invalid (the message names the key).
        """
        unknown = sorted(set(pre) - set(_KNOWN_KEYS))
        if unknown:
            logger.debug("ignoring unknown preprocessing keys %s", unknown)
        spacing = pre.get("spacing")
        if isinstance(spacing, (int, float)):
            spacing = (float(spacing),) * 3
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if not spacing or any(s <= 0 for s in spacing):
                raise ValueError(f"preprocessing spacing must be positive, but got spacing={list(spacing)}")
        orientation = pre.get("orientation", "RAS")
        if orientation is not None:
            orientation = str(orientation).upper()
            if len(orientation) != 3 or sorted(orientation.translate(str.maketrans("LPI", "RAS"))) != ["A", "R", "S"]:
                raise ValueError(f"preprocessing orientation must be axis codes like 'RAS', but got {orientation!r}")
        intensity = str(pre.get("intensity", "zscore")).lower()
        if intensity not in INTENSITY_MODES:
            raise ValueError(f"preprocessing intensity must be one of {list(INTENSITY_MODES)}, but got {intensity!r}")
        window = pre.get("ct_window")
        window = cls.ct_window if window is None else (float(window[0]), float(window[1]))
        if not window[0] < window[1]:
            raise ValueError(f"preprocessing ct_window must be [low, high] with low < high, but got {list(window)}")
        channels = pre.get("in_channels")
        if in_channels is not None:
            if channels is not None and int(channels) != in_channels:
                logger.warning(
                    "preprocessing in_channels=%s disagrees with the model's in_channels=%s; using the model's",
                    channels,
                    in_channels,
                )
            channels = in_channels
        return cls(
            spacing=spacing,
            orientation=orientation,
            intensity=intensity,
            ct_window=window,
            crop_foreground=bool(pre.get("crop_foreground", cls.crop_foreground)),
            in_channels=int(channels if channels is not None else 1),
        )


def _above_minimum(x: torch.Tensor) -> torch.Tensor:
    """Foreground for cropping: voxels brighter than the image's minimum (zero / air padding)."""
    return x > x.min()


def build_preprocess(pre: Preprocessing, key: str = "image") -> Compose:
    """Build the invertible MONAI chain that loads and pre-processes one NIfTI file.

    Args:
        pre: the pre-processing settings.
        key: dictionary key holding the file path on input, the image on output.

    Returns:
        A ``Compose`` mapping ``{key: path}`` to ``{key: MetaTensor}`` of shape
        ``(C, *S')`` in the processed space; the tensor records the applied spatial
        operations for :func:`build_inverter`.
    """
    steps: list[MapTransform] = [
        LoadImaged(key, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(key),
    ]
    if pre.orientation is not None:
        steps.append(Orientationd(key, axcodes=pre.orientation, labels=_RAS_LABELS))
    if pre.spacing is not None:
        steps.append(Spacingd(key, pixdim=pre.spacing, mode="bilinear"))
    crop: list[MapTransform] = (
        [CropForegroundd(key, source_key=key, select_fn=_above_minimum, allow_smaller=True)]
        if pre.crop_foreground
        else []
    )
    if pre.intensity == "zscore":
        steps += crop + [NormalizeIntensityd(key, nonzero=True, channel_wise=True)]
    elif pre.intensity == "ct":
        low, high = pre.ct_window
        steps += [ScaleIntensityRanged(key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True), *crop]
    else:
        steps += crop
    return Compose(steps)


def build_inverter(
    transform: Compose, key: str = "pred", orig_key: str = "image", nearest: bool | Sequence[bool] = False
) -> Invertd:
    """Build the transform that maps a prediction back to the original voxel grid.

    Args:
        transform: the chain returned by :func:`build_preprocess`.
        key: dictionary key of the prediction, shape ``(K, *S')`` in the processed space.
        orig_key: key of the pre-processed image, whose recorded operations are undone.
        nearest: nearest-neighbour interpolation (for label maps); bilinear otherwise
            (for probabilities).

    Returns:
        An ``Invertd``; after it, ``data[key]`` has shape ``(K, *S)`` on the input's grid.
        Regions removed by foreground cropping come back as zeros.
    """
    return Invertd(key, transform=transform, orig_keys=orig_key, nearest_interp=nearest, to_tensor=True)
