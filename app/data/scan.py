"""Reading every voxel of a dataset once, before training, to find what header checks cannot.

:func:`app.data.load_datalist` checks headers (files present, shapes, affines, truncation). The
problems only the voxels show would otherwise surface inside the loader, after training started:
NaN/inf voxels, a ``.nii.gz`` whose compressed data is damaged (its CRC is checked here: nibabel
reads only the bytes it needs and never reaches the gzip trailer), a video whose frames do not
decode, an image with one value everywhere (nothing to learn; the foreground crop would be empty),
label values that are not integers or are outside ``0..n_classes-1``. :func:`scan_cases` finds
them all, in training and validation cases, and raises the first as one line naming the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from app.data.errors import DataError, data_error
from app.data.transforms import Preprocessing
from app.data.video import is_clip, read_mask_clip, read_video_volume

__all__ = [
    "check_image_voxels",
    "check_label_range",
    "check_label_voxels",
    "read_nifti_checked",
    "read_nifti_image_checked",
    "scan_cases",
]

PathLikeStr = Union[str, "PathLike[str]"]

# Files read at once: gzip and numpy release the GIL, so a few threads overlap decompression.
_THREADS = 4


def read_nifti_image_checked(path: PathLikeStr) -> nib.Nifti1Image | nib.Nifti2Image:
    """A NIfTI file read whole into memory: the returned image's voxels come from those bytes.

    A ``.nii.gz`` is decompressed to its end, so its CRC and length are checked.

    Raises:
        DataError: unreadable, damaged compressed data, or fewer bytes than the header needs.
    """
    p = Path(path)
    try:
        klass = type(nib.load(p))
        if str(p).lower().endswith(".gz"):
            with gzip.open(p, "rb") as fh:
                raw = fh.read()
            img = klass.from_bytes(raw)
        else:
            img = klass.from_bytes(p.read_bytes())
        return img
    except (OSError, EOFError, zlib.error) as e:
        raise data_error(p, f"compressed data is damaged ({type(e).__name__}: {e}); re-export or re-copy the file") from e
    except (ImageFileError, ValueError, struct.error) as e:
        raise data_error(p, f"cannot read the voxel data ({type(e).__name__}: {e})") from e


def read_nifti_checked(path: PathLikeStr) -> np.ndarray:
    """The voxel array of a NIfTI file (scaled as nibabel scales it), every byte read.

    A ``.nii.gz`` is decompressed to its end, so its CRC and length are checked.

    Raises:
        DataError: unreadable, damaged compressed data, or fewer bytes than the header needs.
    """
    img = read_nifti_image_checked(path)
    try:
        return np.asanyarray(img.dataobj)
    except (ValueError, struct.error) as e:
        raise data_error(path, f"cannot read the voxel data ({type(e).__name__}: {e})") from e


def check_image_voxels(path: PathLikeStr, volume: np.ndarray) -> None:
    """The voxel checks of an image read whole (NaN/inf, one value everywhere).

    Raises:
        DataError: naming ``path``.
    """
    if np.issubdtype(volume.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(volume)))
        if bad:
            raise data_error(path, f"image holds {bad} NaN/inf voxels; replace them (e.g. by 0) first")
    if volume.size and volume.min() == volume.max():
        raise data_error(path, f"image has the same value ({float(volume.min()):g}) in every voxel: nothing to learn from")


def check_label_voxels(path: PathLikeStr, label: np.ndarray, n_classes: int) -> None:
    """The voxel checks of a label read whole (NaN/inf, non-integer values, values outside the classes).

    Raises:
        DataError: naming ``path``.
    """
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            raise data_error(path, "label holds NaN/inf values; labels must be integer classes")
        fractional = label[label != np.round(label)]
        if fractional.size:
            raise data_error(
                path, f"label has non-integer values (e.g. {float(fractional.flat[0]):g}); labels must be "
                f"integer classes 0..{n_classes - 1}, not rounded or interpolated values",
            )
    if label.size:
        check_label_range(path, float(label.min()), float(label.max()), n_classes)


def check_label_range(path: PathLikeStr, lo: float, hi: float, n_classes: int) -> None:
    """Label values ``lo..hi`` must lie in ``0..n_classes-1``.

    Raises:
        DataError: naming ``path``.
    """
    if lo < 0 or hi > n_classes - 1:
        raise data_error(
            path, f"label values span {lo:g}..{hi:g}, outside 0..{n_classes - 1} for the data set's "
            f"{n_classes} classes; fix the label or name every class in dataset.json 'labels'",
        )


def _check_image(path: str, in_channels: int) -> tuple[int, ...]:
    """Reads an image whole; returns its spatial shape."""
    if is_clip(path):
        volume = read_video_volume(path, grayscale=in_channels == 1)
        shape = tuple(volume.shape[-3:])
    else:
        volume = read_nifti_checked(path)
        shape = tuple(volume.shape[:3])
    check_image_voxels(path, volume)
    return shape


def _check_label(path: str, n_classes: int, clip: str) -> tuple[int, ...]:
    """Reads a label (NIfTI, or a clip's masks) whole; returns its shape."""
    label = read_mask_clip(path, clip=clip) if is_clip(path) else read_nifti_checked(path)
    check_label_voxels(path, label, n_classes)
    return tuple(label.shape[:3])


def _check_case(item: dict[str, str], n_classes: int, in_channels: int) -> DataError | None:
    try:
        shape = _check_image(item["image"], in_channels)
        if "label" not in item:
            return None
        label_shape = _check_label(item["label"], n_classes, item["image"])
    except DataError as e:
        return e
    if shape != label_shape:  # a clip whose frames did not all decode
        return data_error(item["image"], f"decoded to shape {shape}, but its label {item['label']} has {label_shape}")
    return None


def scan_cases(items: Sequence[dict[str, str]], n_classes: int, pre: Preprocessing | None = None) -> None:
    """Reads every image and label whole and checks their voxels (see the module docstring).

    Args:
        items: ``{"image", "label"}`` paths (training and validation cases); ``{"image"}`` alone
            for a case without a label.
        n_classes: classes including background; label values must be ``0..n_classes-1``.
        pre: pre-processing settings (``in_channels`` picks grey or RGB decoding of clips).

    Raises:
        DataError: the first bad case in ``items`` order, one line naming the file.
    """
    in_channels = pre.in_channels if pre is not None else 1
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        for error in pool.map(lambda it: _check_case(it, n_classes, in_channels), items):
            if error is not None:
                raise error
