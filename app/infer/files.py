"""File handling for inference: input discovery, output naming, atomic NIfTI writing, summaries."""

from __future__ import annotations

import csv
import glob
import json
import os

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from app.data.nifti import NIFTI_SUFFIXES, is_nifti
from app.utils import atomic_path

__all__ = [
    "split_nifti_name",
    "output_path",
    "collect_inputs",
    "write_like",
    "write_probabilities",
    "voxel_volume_ml",
    "write_summary",
]

_GLOB_CHARS = set("*?[")


def split_nifti_name(path: str | os.PathLike[str]) -> tuple[str, str]:
    """Split ``dir/case.nii.gz`` into ``("case", ".nii.gz")``.

    Raises:
        ValueError: the name does not end with ``.nii`` or ``.nii.gz``.
    """
    name = Path(path).name
    for ext in NIFTI_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext) :]
    raise ValueError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz)")


def output_path(input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], suffix: str) -> Path:
    """Output file for an input: same base name plus ``suffix``, same extension, in ``out_dir``."""
    base, ext = split_nifti_name(input_path)
    return Path(out_dir) / f"{base}{suffix}{ext}"


def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]], exclude_dir: Path | None = None, exclude_suffix: str | None = None
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated list of NIfTI files.

    A folder contributes its ``*.nii``/``*.nii.gz`` files (not recursive); a glob pattern
    (``*``, ``?``, ``[``; ``**`` recurses) contributes its NIfTI matches. Hidden files (a name
    starting with a dot: the temporary files of an interrupted write, macOS ``._`` files) are
    skipped in folders and glob matches, as the training data list skips them. Files found in a
    folder or by a glob inside ``exclude_dir`` whose base name ends with ``exclude_suffix``
    are taken for earlier outputs and left out.

    Args:
        inputs: paths as given on the command line.
        exclude_dir: the output folder.
        exclude_suffix: the output suffix (e.g. ``"_seg"``).

    Returns:
        ``(files, problems)``: the files to process, in order of first appearance, and
        ``(path, reason)`` for inputs that are missing or not NIfTI files.
    """
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def looks_like_output(p: Path) -> bool:
        if exclude_dir is None or not exclude_suffix:
            return False
        try:
            same_dir = p.parent.resolve() == exclude_dir.resolve()
        except OSError:
            return False
        return same_dir and split_nifti_name(p)[0].endswith(exclude_suffix)

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(p)

    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
            if not found:
                problems.append((path, "folder holds no .nii/.nii.gz files"))
            for p in found:
                if not looks_like_output(p):
                    add(p)
        elif path.is_file():
            if is_nifti(path):
                add(path)
            else:
                problems.append((path, "not a NIfTI file (expected .nii or .nii.gz)"))
        elif _GLOB_CHARS & set(text):
            found = sorted(
                Path(p) for p in glob.glob(text, recursive=True)
                if Path(p).is_file() and is_nifti(p) and not Path(p).name.startswith(".")
            )
            if not found:
                problems.append((path, "pattern matches no .nii/.nii.gz files"))
            for p in found:
                if not looks_like_output(p):
                    add(p)
        else:
            problems.append((path, "no such file or folder"))
    return files, problems


def write_like(
    data: np.ndarray, reference: nib.Nifti1Image, path: Path, dtype: np.dtype | type, slope: float = 1.0
) -> None:
    """Write ``data`` as a NIfTI with the reference's affine and header (atomically).

    The header is the reference's (orientation codes, units, description, ...) with the
    data type, shape and scaling replaced.

    Args:
        data: array of shape ``reference.shape[:3]`` (label map) or that plus a
            trailing channel axis (probabilities), already of type ``dtype``'s kind.
        reference: the input image as loaded by nibabel.
        path: destination (``.nii`` or ``.nii.gz``).
        dtype: on-disk type, e.g. ``np.uint8``.
        slope: NIfTI ``scl_slope`` (readers see ``data * slope``). Default 1.
    """
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    # affine=None: the image takes the header's own qform/sform fields and codes verbatim,
    # so the output's affine is bit-for-bit the input's (no re-encoding of the quaternion).
    img = type(reference)(np.asarray(data, dtype=dtype), None, header)
    img.header.set_slope_inter(slope, 0.0)
    if "cal_min" in img.header:
        img.header["cal_min"], img.header["cal_max"] = 0, 0
    with atomic_path(path, suffix=split_nifti_name(path)[1]) as tmp:
        nib.save(img, tmp)


# NIfTI-1 has no float16 type: probabilities are stored as uint16 with scl_slope = 1/65535,
# the same two bytes per voxel, with a uniform 1.5e-5 step over [0, 1].
PROBABILITY_LEVELS = 65535


def write_probabilities(probs: np.ndarray, reference: nib.Nifti1Image, path: Path) -> None:
    """Write class probabilities ``(*S, K)`` in [0, 1] as 16-bit fixed point (see above).

    ``nib.load(path).get_fdata()`` gives the probabilities back to within 7.7e-6.
    """
    q = np.rint(np.clip(probs, 0.0, 1.0) * PROBABILITY_LEVELS).astype(np.uint16)
    write_like(q, reference, path, np.uint16, slope=1.0 / PROBABILITY_LEVELS)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL (affine in mm): ``|det(affine[:3, :3])| / 1000``."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) / 1000.0)


def write_summary(
    rows: Iterable[dict[str, Any]], class_names: Sequence[str], out_dir: Path, name: str, meta: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``<name>.csv`` (one row per input) and ``<name>.json`` (rows plus ``meta``).

    Args:
        rows: per file: ``input``, ``status``, ``output``, ``probabilities``, ``seconds``,
            ``message`` and ``volumes_ml`` (class name -> mL).
        class_names: column order for the volumes (CSV columns ``volume_ml_<name>``).
        out_dir: output folder.
        name: file stem.
        meta: run-level information stored in the JSON (checkpoint, options, versions).

    Returns:
        The CSV and JSON paths.
    """
    rows = list(rows)
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    fields = ["input", "status", "output", "probabilities", "seconds", "message"]
    fields += [f"volume_ml_{c}" for c in class_names]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            flat = {k: ("" if row.get(k) is None else row.get(k)) for k in fields[:6]}
            vols = row.get("volumes_ml") or {}
            flat.update({f"volume_ml_{c}": ("" if c not in vols else vols[c]) for c in class_names})
            writer.writerow(flat)
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps({**meta, "class_names": list(class_names), "files": rows}, indent=2))
    return csv_path, json_path
