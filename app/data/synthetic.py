"""Small datasets written to disk in the Medical Segmentation Decathlon layout.

* :func:`make_synthetic_dataset`: random 3D shapes with MRI-like noise and bias field; any size,
  any number of classes, generated in well under a second for the default.
* :func:`make_mni_dataset`: a tiny real-anatomy task (grey / white matter) from the MNI152
  templates that nilearn ships inside its package (no download).

Both are idempotent: a folder that already holds the same dataset (same parameters, all files
present) is reused; a folder holding anything else is never overwritten.
"""

from __future__ import annotations

import json

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Union

import nibabel as nib
import numpy as np

from app.data.errors import data_error
from app.utils import atomic_path
from app.data.nifti import save_nifti

__all__ = ["make_mni_dataset", "make_synthetic_dataset"]

PathLikeStr = Union[str, "PathLike[str]"]

DATASET_JSON = "dataset.json"
# Written before the first file and removed after dataset.json: marks a folder whose generation was
# interrupted, so the next call may finish it instead of refusing to touch it.
_IN_PROGRESS = ".stochprop-generating.json"
# Bump when the generator's output changes, so an old folder is not taken for the new dataset.
_SYNTHETIC_VERSION = 1
_MNI_VERSION = 1


# --------------------------------------------------------------------------------------------
# Idempotent folder handling shared by all generators (also used by app.data.video).
# --------------------------------------------------------------------------------------------


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    """Normalises tuples to lists etc., so parameters compare equal to what dataset.json holds."""
    return json.loads(json.dumps(params))


def _listed_files(root: Path, meta: dict[str, Any]) -> list[Path]:
    items = list(meta.get("training", [])) + list(meta.get("validation", []))
    return [root / item[k] for item in items for k in ("image", "label")]


def holds_dataset(root: PathLikeStr, key: str, params: dict[str, Any]) -> bool:
    """Whether ``root`` already holds this exact, complete dataset (reads only).

    Raises:
        DataError: ``root`` is a file, or holds another dataset or an unreadable dataset.json.
    """
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise data_error(root, "exists and is not a folder")
    meta_path = root / DATASET_JSON
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise data_error(meta_path, f"cannot read it ({e}); refusing to overwrite this folder") from e
    want = _jsonable(params)
    if meta.get(key) != want:
        found = meta.get(key, "no generator parameters (not made by this generator)")
        raise data_error(
            root,
            f"holds a different dataset ({key}: {found}, requested {want}); "
            "refusing to overwrite it, use another folder or delete this one",
        )
    return all(p.exists() for p in _listed_files(root, meta))  # files, or folders of frames / masks


def claim_dataset_root(root: PathLikeStr, key: str, params: dict[str, Any]) -> bool:
    """Decides whether a generator may reuse, must (re)generate, or must leave ``root`` alone.

    Args:
        root: target folder.
        key: the dataset.json key holding the generator's parameters (e.g. ``"synthetic"``).
        params: the requested parameters (JSON-serialisable).

    Returns:
        True when ``root`` already holds this exact, complete dataset (nothing to do); False when
        the caller must write it (the folder is then created and marked as in progress).

    Raises:
        DataError: ``root`` holds another dataset, other files, or an unreadable dataset.json.
    """
    root = Path(root).expanduser()
    if holds_dataset(root, key, params):
        return True
    want = _jsonable(params)
    marker = root / _IN_PROGRESS
    if (root / DATASET_JSON).is_file():
        pass  # this dataset, with files missing: regenerate it
    elif marker.is_file():
        try:
            pending = json.loads(marker.read_text())
        except (OSError, ValueError):
            pending = None
        if pending != {key: want}:
            raise data_error(
                root, f"holds an unfinished generation with other parameters ({pending}); delete the folder"
            )
    elif root.is_dir() and any(root.iterdir()):
        raise data_error(root, f"is not empty and holds no {DATASET_JSON}; refusing to write a dataset into it")
    root.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(marker, {key: want})
    return False


def finish_dataset_root(root: PathLikeStr, meta: dict[str, Any]) -> Path:
    """Writes dataset.json last (atomically) and removes the in-progress marker; returns ``root``."""
    root = Path(root).expanduser()
    _write_json_atomic(root / DATASET_JSON, _jsonable(meta))
    (root / _IN_PROGRESS).unlink(missing_ok=True)
    return root


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def decathlon_items(names: Sequence[str], image_suffix: str) -> list[dict[str, str]]:
    return [{"image": f"./imagesTr/{n}{image_suffix}", "label": f"./labelsTr/{n}.nii.gz"} for n in names]


# --------------------------------------------------------------------------------------------
# Random shapes
# --------------------------------------------------------------------------------------------

_KINDS = ("ellipsoid", "box", "torus")


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _shape_mask(kind: str, local: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Inside-test of one shape.

    Args:
        kind: one of ``_KINDS``.
        local: ``(3, ...)`` physical offsets from the shape's centre, already rotated.
        size: bounding radius in physical units; the shape fits in the ball of this radius.
        rng: for the shape's proportions.

    Returns:
        Boolean mask of shape ``local.shape[1:]``.
    """
    x, y, z = local
    if kind == "ellipsoid":
        a = size * rng.uniform(0.55, 1.0, size=3)
        a[0] = size
        return (x / a[0]) ** 2 + (y / a[1]) ** 2 + (z / a[2]) ** 2 <= 1.0
    if kind == "box":
        h = size / np.sqrt(3.0) * rng.uniform(0.7, 1.0, size=3)
        return (np.abs(x) <= h[0]) & (np.abs(y) <= h[1]) & (np.abs(z) <= h[2])
    if kind == "torus":
        minor = size * rng.uniform(0.3, 0.4)
        major = size - minor
        return (np.sqrt(x**2 + y**2) - major) ** 2 + z**2 <= minor**2
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def _paint(
    label: np.ndarray,
    cls: int,
    kind: str,
    center: np.ndarray,
    size: float,
    spacing: np.ndarray,
    rng: np.random.Generator,
    overwrite: bool,
) -> None:
    """Paints one rotated shape of class ``cls`` into ``label`` (in place), only inside its bounding box."""
    reach = np.ceil(size / spacing).astype(int) + 1
    lo = np.maximum(np.floor(center).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(center).astype(int) + reach + 1, label.shape)
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    offsets = np.stack([(g - c) * s for g, c, s in zip(grids, center, spacing)])  # (3, ...) physical
    local = np.tensordot(_random_rotation(rng).T, offsets, axes=1)
    mask = _shape_mask(kind, local, size, rng)
    box = label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    if not overwrite:
        mask &= box == 0
    box[mask] = cls


def bias_field(shape: tuple[int, int, int], rng: np.random.Generator, strength: float = 0.25) -> np.ndarray:
    """Smooth multiplicative field ``exp(p(x, y, z))``, ``p`` a random quadratic, values ~[0.75, 1.3]."""
    x, y, z = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    terms = [x, y, z, x * y, x * z, y * z, x**2 - 1 / 3, y**2 - 1 / 3, z**2 - 1 / 3]
    coef = rng.normal(0.0, 1.0, size=len(terms)) * strength / 3.0
    field = sum(c * t for c, t in zip(coef, terms))
    return np.exp(np.broadcast_to(field, shape)).astype(np.float32)


def _synthetic_case(
    shape: tuple[int, int, int], n_classes: int, spacing: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One case: ``(image float32 (X, Y, Z), label uint8 (X, Y, Z))`` with every class present.

    Foreground class ``k`` is drawn as shape ``_KINDS[(k - 1) % 3]`` with its own intensity, inside
    an ellipsoidal "body"; the image gets a bias field and Gaussian noise.
    """
    dims = np.asarray(shape)
    extent = dims * spacing
    label = np.zeros(shape, dtype=np.uint8)
    n_fg = n_classes - 1
    placed: list[tuple[np.ndarray, float]] = []  # (centre in mm, radius in mm)
    for cls in range(1, n_classes):
        kind = _KINDS[(cls - 1) % len(_KINDS)]
        for _ in range(int(rng.integers(1, 3))):
            size = float(extent.min() * rng.uniform(0.12, 0.22))
            size = max(size, 1.5 * float(spacing.max()))
            margin = np.minimum(size / spacing + 1, dims / 2 - 0.5)
            for _attempt in range(30):
                center = rng.uniform(margin, dims - 1 - margin)
                ok = all(np.linalg.norm((center - c) * spacing) > size + r for c, r in placed)
                if ok:
                    break
            placed.append((center, size))
            _paint(label, cls, kind, center, size, spacing, rng, overwrite=False)
    for cls in range(1, n_classes):  # tiny volumes: make sure no class got crowded out
        if not np.any(label == cls):
            size = max(1.5 * float(spacing.max()), float(extent.min()) * 0.08)
            center = rng.uniform(dims * 0.25, dims * 0.75)
            _paint(label, cls, "ellipsoid", center, size, spacing, rng, overwrite=True)

    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    body = (grid[0] / 0.95) ** 2 + (grid[1] / 0.95) ** 2 + (grid[2] / 0.95) ** 2 <= 1.0
    levels = np.concatenate([[0.25], np.linspace(0.5, 1.0, n_fg)]).astype(np.float32)
    image = np.where(body | (label > 0), levels[label], np.float32(0.02))
    image = image * bias_field(shape, rng)
    image += rng.normal(0.0, 0.04, size=shape).astype(np.float32)
    return image.astype(np.float32), label


def _grid_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine with the given voxel size and the volume centred on the world origin."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return affine


def nifti_image(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def make_synthetic_dataset(
    root: PathLikeStr,
    n_train: int = 8,
    n_val: int = 2,
    shape: Sequence[int] = (48, 48, 48),
    n_classes: int = 3,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
) -> Path:
    """Writes (or reuses) a Decathlon-layout dataset of random 3D shapes.

    Layout: ``root/imagesTr/case_000.nii.gz`` (float32), ``root/labelsTr/case_000.nii.gz`` (uint8,
    values ``0..n_classes-1``, every class in every case), ``root/dataset.json`` with ``labels``,
    ``modality``, ``training`` and ``validation`` lists and the generator parameters under
    ``"synthetic"``. Class ``k >= 1`` is an ellipsoid, box or torus (cycling) with its own intensity.

    Args:
        root: target folder; must be absent, empty, or hold this same dataset.
        n_train: number of training cases (>= 1).
        n_val: number of validation cases (>= 0).
        shape: spatial shape ``(X, Y, Z)``, each >= 8.
        n_classes: number of classes including background (2..255).
        spacing: voxel size in mm.
        seed: random seed; the output is a deterministic function of all arguments.

    Returns:
        ``root`` as a Path.

    Raises:
        DataError: ``root`` holds a different dataset or other files.
        ValueError: invalid arguments.
    """
    shape = tuple(int(s) for s in shape)
    spacing_t = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8, got shape={shape}")
    if len(spacing_t) != 3 or min(spacing_t) <= 0:
        raise ValueError(f"spacing must be 3 positive sizes, got spacing={spacing_t}")
    if not 2 <= n_classes <= 255:
        raise ValueError(f"n_classes must be in 2..255 (background included), got n_classes={n_classes}")
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    root = Path(root).expanduser()
    params = {
        "version": _SYNTHETIC_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "shape": shape,
        "n_classes": n_classes,
        "spacing": spacing_t,
        "seed": seed,
    }
    if claim_dataset_root(root, "synthetic", params):
        return root
    affine = _grid_affine(shape, spacing_t)
    names = [f"case_{i:03d}" for i in range(n_train + n_val)]
    rng = np.random.default_rng(seed)
    for name in names:
        image, label = _synthetic_case(shape, n_classes, np.asarray(spacing_t), rng)
        save_nifti(nifti_image(image, affine), root / "imagesTr" / f"{name}.nii.gz")
        save_nifti(nifti_image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
    class_names = ["background"] + [f"{_KINDS[(k - 1) % len(_KINDS)]}_{k}" for k in range(1, n_classes)]
    meta = {
        "name": "stochprop-synthetic",
        "description": "Random ellipsoids / boxes / tori with Gaussian noise and a multiplicative bias field",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {str(k): n for k, n in enumerate(class_names)},
        "numTraining": n_train,
        "numTest": 0,
        "training": decathlon_items(names[:n_train], ".nii.gz"),
        "validation": decathlon_items(names[n_train:], ".nii.gz"),
        "test": [],
        "synthetic": params,
    }
    return finish_dataset_root(root, meta)


# --------------------------------------------------------------------------------------------
# MNI152 grey / white matter
# --------------------------------------------------------------------------------------------


def _require_nilearn(root: Path) -> Any:
    """``nilearn.datasets``, or a DataError with install advice."""
    try:
        from nilearn import datasets
    except ImportError as e:
        raise data_error(
            root,
            "building the MNI dataset needs nilearn, which ships the MNI152 templates; "
            "install it with `pip install nilearn` (or the project's `real` extra)",
        ) from e
    return datasets


def _load_mni_templates(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(t1, gm, wm, affine)`` at 2 mm from nilearn's package data (no network access)."""
    datasets = _require_nilearn(root)
    t1_img = datasets.load_mni152_template(resolution=2)
    if hasattr(datasets, "load_mni152_gm_template"):
        gm_img = datasets.load_mni152_gm_template(resolution=2)
        wm_img = datasets.load_mni152_wm_template(resolution=2)
    else:  # older nilearn: binary masks only
        gm_img = datasets.load_mni152_gm_mask(resolution=2)
        wm_img = datasets.load_mni152_wm_mask(resolution=2)
    arrays = [np.asarray(img.get_fdata(), dtype=np.float32) for img in (t1_img, gm_img, wm_img)]
    if not arrays[0].shape == arrays[1].shape == arrays[2].shape:
        raise data_error(root, f"nilearn's MNI templates disagree in shape: {[a.shape for a in arrays]}")
    return arrays[0], arrays[1], arrays[2], np.asarray(t1_img.affine, dtype=np.float64)


def _resample_to(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear (image) / nearest (label) resampling to ``shape`` with corner voxels aligned.

    Returns:
        ``(image, label, affine)``; output voxel ``j`` sits at input voxel ``j * (n_in - 1) / (n_out - 1)``
        (scipy's ``grid_mode=False``), so the affine's columns scale by that factor.
    """
    from scipy import ndimage

    src = image.shape
    factors = [t / s for t, s in zip(shape, src)]
    image = ndimage.zoom(image, factors, order=1)
    label = ndimage.zoom(label, factors, order=0)
    scale = [(s - 1) / max(t - 1, 1) for s, t in zip(src, shape)]
    return image, label, affine @ np.diag([*scale, 1.0])


def make_mni_dataset(
    root: PathLikeStr,
    shape: Sequence[int] | None = None,
    *,
    n_train: int = 6,
    n_val: int = 2,
    seed: int = 0,
) -> Path:
    """Writes (or reuses) a tiny real-anatomy task: grey and white matter of the MNI152 brain.

    Each case is a random crop (80-100 % per axis), random left-right flip and intensity change
    (gamma, scale, smooth bias field, noise) of nilearn's 2 mm MNI152 T1 template; the label is the
    most probable tissue of nilearn's grey / white matter probability templates: 0 background
    (incl. CSF), 1 grey matter, 2 white matter. Crops keep the world coordinates (affine updated).

    Args:
        root: target folder; must be absent, empty, or hold this same dataset.
        shape: if given, each case is resampled to this ``(X, Y, Z)`` (affine updated); else cases
            keep the crop size (about 80-99 x 94-117 x 76-95 voxels at 2 mm).
        n_train: number of training cases.
        n_val: number of validation cases.
        seed: random seed.

    Returns:
        ``root`` as a Path.

    Raises:
        DataError: nilearn missing, or ``root`` holds something else.
    """
    root = Path(root).expanduser()
    target = None if shape is None else tuple(int(s) for s in shape)
    if target is not None and (len(target) != 3 or min(target) < 8):
        raise ValueError(f"shape must be None or 3 sizes >= 8, got shape={shape}")
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    params = {"version": _MNI_VERSION, "shape": target, "n_train": n_train, "n_val": n_val, "seed": seed}
    if holds_dataset(root, "mni", params):  # reused without nilearn
        return root
    _require_nilearn(root)  # before touching the folder
    if claim_dataset_root(root, "mni", params):
        return root
    t1, gm, wm, affine = _load_mni_templates(root)
    t1 = t1 / max(float(t1.max()), 1e-6)
    label = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.uint8)
    rng = np.random.default_rng(seed)
    names = [f"mni_{i:03d}" for i in range(n_train + n_val)]
    for name in names:
        size = [int(rng.integers(int(0.8 * n), n + 1)) for n in t1.shape]
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(t1.shape, size)]
        sl = tuple(slice(a, a + s) for a, s in zip(start, size))
        img, lab = t1[sl], label[sl]
        case_affine = affine.copy()
        case_affine[:3, 3] = (affine @ np.array([*start, 1.0]))[:3]
        if rng.random() < 0.5:  # mirror the subject; the grid (affine) stays
            img, lab = img[::-1], lab[::-1]
        img = np.clip(img, 0.0, None) ** rng.uniform(0.7, 1.4)
        img = img * bias_field(img.shape, rng, strength=0.2) * rng.uniform(400.0, 1200.0)
        img = img + rng.normal(0.0, 8.0, size=img.shape)
        img = np.clip(img, 0.0, None).astype(np.float32)
        lab = np.ascontiguousarray(lab)
        if target is not None:
            img, lab, case_affine = _resample_to(img, lab, case_affine, target)
        save_nifti(nifti_image(img.astype(np.float32), case_affine), root / "imagesTr" / f"{name}.nii.gz")
        save_nifti(nifti_image(lab.astype(np.uint8), case_affine), root / "labelsTr" / f"{name}.nii.gz")
    meta = {
        "name": "stochprop-mni152-gm-wm",
        "description": "Crops / flips / intensity changes of nilearn's MNI152 2 mm template (ICBM 2009a)",
        "reference": "nilearn.datasets.load_mni152_template / load_mni152_gm_template / load_mni152_wm_template",
        "tensorImageSize": "3D",
        "modality": {"0": "T1w"},
        "labels": {"0": "background", "1": "grey_matter", "2": "white_matter"},
        "numTraining": n_train,
        "numTest": 0,
        "training": decathlon_items(names[:n_train], ".nii.gz"),
        "validation": decathlon_items(names[n_train:], ".nii.gz"),
        "test": [],
        "mni": params,
    }
    return finish_dataset_root(root, meta)
