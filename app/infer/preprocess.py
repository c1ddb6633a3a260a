"""What inference adds to training's pre-processing: reading a checkpoint's settings, inverting the chain.

The chain itself is training's, :func:`app.data.transforms.infer_transforms` (the deterministic
:func:`~app.data.transforms.preprocessing_transforms` on the image alone), so the network sees at
inference exactly the grid and intensities it was trained on. This module holds only:

* :func:`checkpoint_preprocessing`: a checkpoint's ``preprocessing`` dict (written by training as
  :meth:`app.data.Preprocessing.to_dict`) as an :class:`app.data.Preprocessing`, with the model's
  ``in_channels`` taking precedence and keys this version does not know ignored;
* :func:`build_inverter`: the ``Invertd`` that maps a prediction made in the processed space back
  onto the input's original voxel grid, orientation and affine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from monai.transforms import Compose, Invertd

from app.data.transforms import Preprocessing

__all__ = ["build_inverter", "checkpoint_preprocessing"]

logger = logging.getLogger(__name__)


def checkpoint_preprocessing(pre: Mapping[str, Any], in_channels: int | None = None) -> Preprocessing:
    """Parse and validate a checkpoint's ``preprocessing`` dict.

    Args:
        pre: the dict; missing keys take :class:`~app.data.Preprocessing`'s defaults, unknown keys
            are ignored (logged at debug level).
        in_channels: the model's input channels; wins over ``pre["in_channels"]`` when both are
            given and they disagree (with a warning). Default None (use ``pre``'s).

    Returns:
        The settings for :func:`app.data.transforms.infer_transforms`.

    Raises:
        ValueError: a value is invalid (the message names the key).
    """
    known = {f.name for f in dataclasses.fields(Preprocessing)}
    unknown = sorted(set(pre) - known)
    if unknown:
        logger.debug("ignoring unknown preprocessing keys %s", unknown)
    settings = {k: v for k, v in pre.items() if k in known}
    if in_channels is not None:
        channels = settings.get("in_channels")
        if channels is not None and int(channels) != in_channels:
            logger.warning(
                "preprocessing in_channels=%s disagrees with the model's in_channels=%s; using the model's",
                channels,
                in_channels,
            )
        settings["in_channels"] = in_channels
    try:
        return Preprocessing.from_dict(settings)
    except ValueError as exc:
        raise ValueError(f"checkpoint preprocessing: {exc}") from exc


def build_inverter(
    transform: Compose, key: str = "pred", orig_key: str = "image", nearest: bool | Sequence[bool] = False
) -> Invertd:
    """Build the transform that maps a prediction back to the original voxel grid.

    Args:
        transform: the chain that pre-processed the image,
            :func:`app.data.transforms.infer_transforms`.
        key: dictionary key of the prediction, shape ``(K, *S')`` in the processed space.
        orig_key: key of the pre-processed image, whose recorded operations are undone.
        nearest: nearest-neighbour interpolation (for label maps); bilinear otherwise
            (for probabilities). Default False.

    Returns:
        An ``Invertd``; after it, ``data[key]`` has shape ``(K, *S)`` on the input's grid.
        Regions removed by foreground cropping come back as zeros.
    """
    return Invertd(key, transform=transform, orig_keys=orig_key, nearest_interp=nearest, to_tensor=True)
