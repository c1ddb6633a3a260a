"""NIfTI helpers on nibabel: fast header checks, image/label agreement, writing like a reference.

Every bad-input case raises :class:`~app.data.errors.DataError` with the file path first.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Union

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from numpy.typing import DTypeLike

from app.data.errors import data_error
from app.utils import atomic_path

__all__ = [
    "MAX_CHANNELS",
    "NIFTI_SUFFIXES",
    "VolumeInfo",
    "check_pair_info",
    "is_nifti",
    "read_header_info",
    "save_like",
    "save_nifti",
    "strip_suffix",
]

PathLikeStr = Union[str, "PathLike[str]"]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
# A 4D image is read as (X, Y, Z, C); more channels than this is taken for a time series or a
# mistake (an fMRI run, a 4D label), not a multi-modal image.
MAX_CHANNELS = 16
# Errors nibabel and the gzip layer raise for unreadable files.
_READ_ERRORS = (ImageFileError, OSError, EOFError, ValueError, zlib.error, struct.error)


@dataclass(frozen=True, eq=False)
class VolumeInfo:
    """What the header of a volume says, read without its voxel data.

    Attributes:
        path: the file.
        shape: spatial shape ``(X, Y, Z)`` (for a video: ``(T, H, W)``).
        n_channels: 1 for a 3D file, ``C`` for a 4D ``(X, Y, Z, C)`` file.
        affine: ``(4, 4)`` voxel-to-world matrix (nibabel's best affine: sform, else qform).
        spacing: voxel size in world units along each spatial axis, from the affine's columns.
        dtype: on-disk voxel type, e.g. ``"int16"``.
    """

    path: Path
    shape: tuple[int, int, int]
    n_channels: int
    affine: np.ndarray
    spacing: tuple[float, float, float]
    dtype: str = "float32"


def is_nifti(path: PathLikeStr) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_suffix(name: str, suffixes: tuple[str, ...]) -> str:
    """Removes the first matching suffix (case-insensitive) from a file name, e.g. ``a.nii.gz -> a``."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def _gzip_isize(path: Path) -> int:
    """The ISIZE field of a gzip file: uncompressed size of its last member modulo 2**32."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _gzip_uncompressed_size(path: Path) -> int:
    """Decompresses the whole file (all members) and counts bytes; raises on truncation/CRC errors."""
    n = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            n += len(chunk)
    return n


def _check_data_size(path: Path, expected: int, verify_checksum: bool = False) -> None:
    """Detects truncated files without decoding the voxels where possible.

    An uncompressed ``.nii`` must be at least ``expected`` bytes long. For ``.nii.gz`` the gzip trailer
    stores the uncompressed size; a truncated file ends mid-stream, so its last four bytes are
    compressed data and almost never equal ``expected mod 2**32``. Only on a mismatch (truncation, or
    a legitimate multi-member gzip) is the file decompressed to decide. ``verify_checksum`` always
    decompresses, which also checks the CRC and so finds damage inside the voxel block.
    """
    if not str(path).lower().endswith(".gz"):
        size = path.stat().st_size
        if size < expected:
            raise data_error(path, f"file is truncated: {expected} bytes expected from the header, found {size}")
        return
    if not verify_checksum and path.stat().st_size >= 18 and _gzip_isize(path) == expected % (1 << 32):
        return
    try:
        size = _gzip_uncompressed_size(path)
    except (OSError, EOFError, zlib.error) as e:
        raise data_error(path, f"file is truncated or corrupt ({type(e).__name__}: {e})") from e
    if size < expected:
        raise data_error(path, f"file is truncated: {expected} bytes expected from the header, found {size}")


def read_header_info(path: PathLikeStr, *, check_size: bool = True, verify_checksum: bool = False) -> VolumeInfo:
    """Reads shape, channels, affine and spacing of a NIfTI file from its header only.

    Accepted: 3D ``(X, Y, Z)`` and 4D ``(X, Y, Z, C)`` with ``C <= MAX_CHANNELS`` (multi-channel
    image). Whether a 4D file may be used (labels may not) is decided by :func:`check_pair_info`.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        check_size: also detect truncated files (a stat, or reading the gzip trailer; see
            ``_check_data_size``). Default True.
        verify_checksum: decompress ``.nii.gz`` files whole to check their CRC (finds corruption
            inside the voxel data, which nibabel itself does not notice; costs a full read).

    Returns:
        The header's :class:`VolumeInfo`.

    Raises:
        DataError: missing, not NIfTI, unreadable or corrupt, truncated, 2D, 5D or more, too many
            channels, or a singular / non-finite affine.
    """
    p = Path(path)
    if not p.is_file():
        raise data_error(p, "file not found")
    if not is_nifti(p):
        raise data_error(p, f"not a NIfTI file (expected a name ending in {' or '.join(NIFTI_SUFFIXES)})")
    try:
        img = nib.load(p)
        header = img.header
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
        dtype = header.get_data_dtype()
        # The loaded header reports vox_offset 0; the array proxy knows where the voxels start.
        offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
    except _READ_ERRORS as e:
        raise data_error(p, f"cannot read NIfTI header ({type(e).__name__}: {e})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise data_error(p, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    if len(shape) < 3:
        raise data_error(p, f"image is {len(shape)}D with shape {shape}; a 3D volume (X, Y, Z) is required")
    if len(shape) > 4:
        raise data_error(
            p, f"image is {len(shape)}D with shape {shape}; only 3D (X, Y, Z) or 4D (X, Y, Z, C) are supported"
        )
    n_channels = shape[3] if len(shape) == 4 else 1
    if not 1 <= n_channels <= MAX_CHANNELS:
        raise data_error(
            p, f"4D image with {n_channels} channels (shape {shape}); at most {MAX_CHANNELS} channels are supported"
        )
    if min(shape) < 1:
        raise data_error(p, f"image has an empty axis: shape {shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise data_error(p, f"affine is singular or not finite (voxel sizes {header.get_zooms()[:3]}); fix the header")
    if check_size:
        _check_data_size(p, offset + int(np.prod(shape)) * dtype.itemsize, verify_checksum)
    spatial = (shape[0], shape[1], shape[2])
    return VolumeInfo(p, spatial, n_channels, affine, _spacing_from_affine(affine), str(dtype))


def check_pair_info(image: VolumeInfo, label: VolumeInfo, atol: float = 1e-3) -> None:
    """Checks that a label fits its image: one channel, same spatial shape, same affine.

    Args:
        image: header of the image.
        label: header of the label.
        atol: largest allowed absolute difference between the two ``(4, 4)`` affines.

    Raises:
        DataError: starting with the label's path and naming the image.
    """
    if label.n_channels != 1:
        raise data_error(
            label.path,
            f"label has {label.n_channels} channels (4D); labels must be 3D, one integer class per voxel",
        )
    if label.shape != image.shape:
        raise data_error(
            label.path, f"label shape {label.shape} does not match image shape {image.shape} of {image.path}"
        )
    diff = float(np.max(np.abs(label.affine - image.affine)))
    if diff > atol:
        raise data_error(
            label.path,
            f"label affine differs from the affine of image {image.path} by up to {diff:.4g} (atol {atol}); "
            f"label spacing {tuple(round(s, 4) for s in label.spacing)}, "
            f"image spacing {tuple(round(s, 4) for s in image.spacing)}; resample the label onto the image grid",
        )


def save_nifti(img: nib.Nifti1Image | nib.Nifti2Image, out_path: PathLikeStr) -> Path:
    """Writes an image atomically (temporary file in the same folder, then rename).

    Concurrent writers of the same content (e.g. several DDP ranks) never leave a half-written file.
    """
    out = Path(out_path)
    if not is_nifti(out):
        raise data_error(out, f"output name must end in {' or '.join(NIFTI_SUFFIXES)}")
    with atomic_path(out, suffix=".nii.gz" if out.name.lower().endswith(".gz") else ".nii") as tmp:
        nib.save(img, tmp)
    return out


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch.Tensor / MetaTensor, without importing torch here
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def save_like(
    array: Any,
    reference_path_or_img: PathLikeStr | nib.Nifti1Image | nib.Nifti2Image,
    out_path: PathLikeStr,
    dtype: DTypeLike | None = None,
) -> Path:
    """Writes ``array`` as NIfTI on the grid of a reference image (its affine, codes and header).

    Used by inference to write a segmentation that overlays the input exactly. The reference's
    intensity scaling (``scl_slope``/``scl_inter``) and display range are dropped, so labels read back
    as the integers written.

    Args:
        array: ``(X, Y, Z)`` or ``(X, Y, Z, C)`` numpy array or torch tensor, in the reference's voxel
            order (e.g. after ``monai.transforms.Invertd``; drop the channel axis of a ``(1, X, Y, Z)``
            tensor first).
        reference_path_or_img: the input image (path or loaded nibabel image).
        out_path: ``.nii`` or ``.nii.gz`` file to write; folders are created.
        dtype: on-disk type, e.g. ``np.uint8`` for labels, ``np.float32`` for probabilities. None keeps
            the array's type.

    Returns:
        ``out_path`` as a Path.

    Raises:
        DataError: reference unreadable, or the array's spatial shape differs from the reference's.
    """
    if isinstance(reference_path_or_img, (nib.Nifti1Image, nib.Nifti2Image)):
        ref = reference_path_or_img
        ref_name = ref.get_filename() or "<reference image>"
    else:
        read_header_info(reference_path_or_img, check_size=False)
        ref = nib.load(reference_path_or_img)
        ref_name = str(reference_path_or_img)
    data = _to_numpy(array)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if data.ndim not in (3, 4) or tuple(data.shape[:3]) != tuple(ref.shape[:3]):
        raise data_error(
            out_path,
            f"array shape {tuple(data.shape)} does not fit the grid {tuple(ref.shape[:3])} of reference {ref_name}; "
            "expected (X, Y, Z) or (X, Y, Z, C)",
        )
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    header = ref.header.copy()
    cls = nib.Nifti2Image if isinstance(ref, nib.Nifti2Image) else nib.Nifti1Image
    img = cls(data, ref.affine, header=header)
    img.set_data_dtype(data.dtype)
    # Keep the reference's sform/qform matrices and codes, so every reader picks the same affine.
    img.set_sform(ref.get_sform(), int(ref.get_sform(coded=True)[1]))
    img.set_qform(ref.get_qform(), int(ref.get_qform(coded=True)[1]))
    img.header.set_slope_inter(np.nan, np.nan)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    return save_nifti(img, out_path)
