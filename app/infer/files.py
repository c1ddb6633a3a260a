"""File handling for inference: input discovery, output naming, atomic NIfTI writing, summaries."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from app.data.nifti import NIFTI_SUFFIXES, is_nifti
from app.data.video import VIDEO_SUFFIXES, is_frame_folder, is_video
from app.utils import atomic_path

__all__ = [
    "FileError",
    "split_nifti_name",
    "input_stem",
    "output_path",
    "collect_inputs",
    "atomic_folder",
    "write_like",
    "write_probabilities",
    "voxel_volume_ml",
    "write_summary",
]

_GLOB_CHARS = set("*?[")


class FileError(Exception):
    """A per-file problem; the message is one line and names no path (the caller adds it)."""


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


def input_stem(path: str | os.PathLike[str]) -> str:
    """Base name of an input: ``case.nii.gz`` -> ``case``, ``clip.mp4`` -> ``clip``, frame folder ``clip/``
    -> ``clip``."""
    p = Path(path)
    if is_nifti(p):
        return split_nifti_name(p)[0]
    name = p.name
    for ext in VIDEO_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _is_input_file(p: Path) -> bool:
    """A NIfTI or video file that is not hidden."""
    return p.is_file() and (is_nifti(p) or is_video(p)) and not p.name.startswith(".")


def output_path(input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], suffix: str) -> Path:
    """Output file for an input: same base name plus ``suffix``, same extension, in ``out_dir``."""
    base, ext = split_nifti_name(input_path)
    return Path(out_dir) / f"{base}{suffix}{ext}"


def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    exclude_dir: Path | None = None,
    exclude_suffix: str | Sequence[str] | None = None,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated list of inputs.

    An input is a NIfTI file, a video file (:data:`app.data.video.VIDEO_SUFFIXES`) or a folder of
    numbered frame images (a clip). A folder contributes its NIfTI and video files (not
    recursive); a folder without such files but with frame images is one clip. A glob pattern
    (``*``, ``?``, ``[``; ``**`` recurses) contributes its NIfTI and video matches and the frame
    folders it matches. Hidden files (a name starting with a dot: the temporary files of an
    interrupted write, macOS ``._`` files) are skipped in folders and glob matches, as the
    training data list skips them. Inputs found in a folder or by a glob inside ``exclude_dir``
    whose base name (:func:`input_stem`) ends with one of ``exclude_suffix`` are taken for earlier
    outputs and left out.

    Args:
        inputs: paths as given on the command line.
        exclude_dir: the output folder.
        exclude_suffix: the output suffix(es) (e.g. ``"_seg"``).

    Returns:
        ``(inputs, problems)``: the inputs to process, in order of first appearance, and
        ``(path, reason)`` for arguments that are missing or hold no input.
    """
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    suffixes = (exclude_suffix,) if isinstance(exclude_suffix, str) else tuple(exclude_suffix or ())
    suffixes = tuple(x for x in suffixes if x)

    def looks_like_output(p: Path) -> bool:
        if exclude_dir is None or not suffixes:
            return False
        try:
            same_dir = p.parent.resolve() == exclude_dir.resolve()
        except OSError:
            return False
        return same_dir and input_stem(p).endswith(suffixes)

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            files.append(p)

    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_input_file(p))
            if not found and is_frame_folder(path):
                add(path)
                continue
            if not found:
                problems.append((path, "folder holds no .nii/.nii.gz or video files and no frame images"))
            for p in found:
                if not looks_like_output(p):
                    add(p)
        elif path.is_file():
            if is_nifti(path) or is_video(path):
                add(path)
            else:
                expected = ", ".join((".nii", ".nii.gz", *VIDEO_SUFFIXES))
                problems.append((path, f"not a NIfTI or video file (expected one of {expected})"))
        elif _GLOB_CHARS & set(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            found = [p for p in matches if _is_input_file(p) or (p.is_dir() and is_frame_folder(p))]
            if not found:
                problems.append((path, "pattern matches no .nii/.nii.gz or video files or frame folders"))
            for p in found:
                if not looks_like_output(p):
                    add(p)
        else:
            problems.append((path, "no such file or folder"))
    return files, problems


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a hidden temporary folder beside ``path``; when the block succeeds it replaces ``path``.

    An exception inside the block removes the temporary folder and leaves ``path`` as it was. An
    existing ``path`` is moved aside, the new folder renamed into place, then the old one deleted.

    Args:
        path: the destination folder; its parent is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        rows: per file: ``input``, ``status``, ``output``, ``probabilities``, ``overlay``,
            ``frames``, ``seconds``, ``message`` and ``volumes_ml`` (class name -> mL).
        class_names: column order for the volumes (CSV columns ``volume_ml_<name>``).
        out_dir: output folder.
        name: file stem.
        meta: run-level information stored in the JSON (checkpoint, options, versions).

    Returns:
        The CSV and JSON paths.
    """
    rows = list(rows)
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    base = ["input", "status", "output", "probabilities", "overlay", "frames", "seconds", "message"]
    fields = base + [f"volume_ml_{c}" for c in class_names]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            flat = {k: ("" if row.get(k) is None else row.get(k)) for k in base}
            vols = row.get("volumes_ml") or {}
            flat.update({f"volume_ml_{c}": ("" if c not in vols else vols[c]) for c in class_names})
            writer.writerow(flat)
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps({**meta, "class_names": list(class_names), "files": rows}, indent=2))
    return csv_path, json_path
