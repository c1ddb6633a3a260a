"""Finding the cases of a dataset on disk and checking them before training starts.

Two layouts are read:

* Medical Segmentation Decathlon: ``dataset.json`` (``labels``, ``modality``, ``training`` and
  optionally ``validation`` lists of relative ``{"image", "label"}`` paths) next to ``imagesTr/`` and
  ``labelsTr/``. nnU-Net v2's variant (``labels`` as name -> value, ``channel_names``, no
  ``training`` list) is read too.
* A plain folder: ``imagesTr/`` and ``labelsTr/`` matched by base name; images may carry the
  nnU-Net channel suffix ``_0000`` (``case_0000.nii.gz`` pairs with ``case.nii.gz``).

Images are NIfTI (3D, or 4D multi-channel) or clips: video files (``.mp4`` / ``.avi`` / ``.mkv`` /
``.webm``) or folders of numbered frame images. Labels are 3D NIfTI or, for clips, per-frame masks:
a mask video or a folder of mask PNGs (:func:`app.data.video.read_mask_clip`). Without labels
(``labels=False``, the restoration task) only the images are listed; a plain folder of clips is
read too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Union

import nibabel as nib
import numpy as np

from app.data.errors import data_error
from app.data.nifti import NIFTI_SUFFIXES, VolumeInfo, check_pair_info, is_nifti, read_header_info, strip_suffix
from app.data.video import VIDEO_SUFFIXES, is_clip, is_frame_folder, is_video, open_clip, read_mask_clip, read_video_info

__all__ = ["DataList", "check_pair", "load_datalist", "read_label_info", "read_volume_info"]

PathLikeStr = Union[str, "PathLike[str]"]

DATASET_JSON = "dataset.json"
_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")
# Labels read (evenly spread over the cases) to find the classes when no dataset.json names them.
_LABEL_SCAN = 5


@dataclass
class DataList:
    """The cases of a dataset, split into training and validation.

    Attributes:
        root: dataset folder (absolute).
        train: training items ``{"image": abs path, "label": abs path}`` (``{"image"}`` only without labels).
        val: validation items, same form.
        class_names: name of each label value, index = value; ``class_names[0]`` is background
            (empty when the data list was loaded without labels).
        modality: e.g. ``"MRI"``, ``"CT"``, ``"FLAIR,T1w,t1gd,T2w"`` (one per channel) or ``"video"``.
        n_channels: image channels, when the headers were read (``validate=True``).
        median_spacing: median voxel size of the images, when the headers were read.
        median_shape: median spatial shape of the images, when the headers were read.
    """

    root: Path
    train: list[dict[str, str]]
    val: list[dict[str, str]]
    class_names: list[str]
    modality: str
    n_channels: int | None = None
    median_spacing: tuple[float, float, float] | None = None
    median_shape: tuple[int, int, int] | None = None

    @property
    def n_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_names)


# --------------------------------------------------------------------------------------------
# dataset.json
# --------------------------------------------------------------------------------------------


def read_volume_info(path: PathLikeStr, verify_checksum: bool = False) -> VolumeInfo:
    """:func:`~app.data.nifti.read_header_info` for NIfTI files, the clip probe of :mod:`app.data.video` for clips."""
    if is_clip(path):
        return read_video_info(path)
    return read_header_info(path, verify_checksum=verify_checksum)


def read_label_info(path: PathLikeStr, verify_checksum: bool = False) -> VolumeInfo:
    """The header of a label: NIfTI, or per-frame masks (mask video or PNG folder) probed as a clip.

    Raises:
        DataError: unreadable label, one line naming it.
    """
    if is_clip(path):
        source = open_clip(path)
        return VolumeInfo(source.path, source.shape, 1, np.eye(4), (1.0, 1.0, 1.0), "uint8")
    return read_header_info(path, verify_checksum=verify_checksum)


def check_pair(
    image_path: PathLikeStr, label_path: PathLikeStr, atol: float = 1e-3, *, verify_checksum: bool = False
) -> tuple[VolumeInfo, VolumeInfo]:
    """Reads both headers and checks that the label fits the image (see :func:`~app.data.nifti.check_pair_info`).

    Args:
        image_path: NIfTI image (3D or 4D multi-channel) or clip.
        label_path: 3D NIfTI label, or a clip's masks (mask video or PNG folder).
        atol: affine tolerance.
        verify_checksum: also decompress ``.nii.gz`` files whole to check their CRC.

    Returns:
        ``(image_info, label_info)``.

    Raises:
        DataError: either file unreadable, or the pair disagrees (message names both files).
    """
    image = read_volume_info(image_path, verify_checksum=verify_checksum)
    label = read_label_info(label_path, verify_checksum=verify_checksum)
    if is_clip(label_path) and label.shape != image.shape:
        raise data_error(label.path, f"masks have {label.shape[0]} frames of {label.shape[1]}x{label.shape[2]}, but "
                                     f"the clip {image.path} has {image.shape[0]} frames of {image.shape[1]}x{image.shape[2]}")
    check_pair_info(image, label, atol)
    return image, label


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise data_error(path, f"cannot read JSON ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise data_error(path, f"must hold a JSON object, found {type(meta).__name__}")
    return meta


def _class_names_from_json(labels: Any, meta_path: Path) -> list[str]:
    """``{"0": "background", "1": "liver"}`` (MSD) or ``{"background": 0, "liver": 1}`` (nnU-Net v2).

    Missing values between 0 and the largest are named ``label_<value>`` so that label value and
    class index stay equal.
    """
    if not isinstance(labels, dict) or not labels:
        raise data_error(meta_path, f"'labels' must be a non-empty object mapping values to names, got {labels!r}")
    by_value: dict[int, str] = {}
    if all(str(k).strip().lstrip("-").isdigit() for k in labels):
        by_value = {int(k): str(v) for k, v in labels.items()}
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        by_value = {int(v): str(k) for k, v in labels.items()}
    else:
        raise data_error(
            meta_path,
            f"'labels' must map values to names ({{'0': 'background', ...}}) or names to integer values "
            f"({{'background': 0, ...}}); got {labels!r} (region-based labels are not supported)",
        )
    if min(by_value) < 0:
        raise data_error(meta_path, f"'labels' has a negative value: {sorted(by_value)}")
    if 0 not in by_value:
        by_value[0] = "background"
    return [by_value.get(v, f"label_{v}") for v in range(max(by_value) + 1)]


def _modality_from_json(meta: dict[str, Any]) -> str:
    modality = meta.get("modality", meta.get("channel_names"))
    if isinstance(modality, dict):
        return ",".join(str(modality[k]) for k in sorted(modality, key=lambda k: int(k) if str(k).isdigit() else 0))
    if isinstance(modality, (list, tuple)):
        return ",".join(map(str, modality))
    return str(modality) if modality else "unknown"


def _items_from_json(entries: Any, key: str, root: Path, meta_path: Path, labels: bool = True) -> list[dict[str, str]]:
    keys = ("image", "label") if labels else ("image",)
    if not isinstance(entries, list):
        raise data_error(meta_path, f"'{key}' must be a list of {{{', '.join(map(repr, keys))}}} objects")
    items = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in keys)):
            raise data_error(
                meta_path, f"{key}[{i}] must be an object with {' and '.join(map(repr, keys))} paths (strings), got {entry!r}"
            )
        items.append({k: _abs(root, entry[k]) for k in keys})
    return items


def _abs(root: Path, rel: str) -> str:
    """``root / rel`` made absolute and normalised (``./imagesTr/a.nii.gz`` -> ``/root/imagesTr/a.nii.gz``)."""
    return os.path.normpath(os.path.join(root, os.path.expanduser(rel)))


# --------------------------------------------------------------------------------------------
# imagesTr / labelsTr folders
# --------------------------------------------------------------------------------------------


def _case_id(image: Path) -> tuple[str, int | None]:
    """``case_0000.nii.gz -> ("case", 0)``, ``case.mp4 -> ("case", None)``, frame folder ``case/ -> ("case", None)``."""
    if image.is_dir():
        return image.name, None
    stem = strip_suffix(image.name, NIFTI_SUFFIXES + VIDEO_SUFFIXES)
    match = _CHANNEL_SUFFIX.search(stem)
    if match:
        return stem[: match.start()], int(match.group(1))
    return stem, None


def _images_in(folder: Path) -> list[Path]:
    """NIfTI files, video files and frame folders in ``folder`` (hidden and macOS ``._`` files skipped)."""
    return sorted(
        p for p in folder.iterdir()
        if not p.name.startswith(".") and (p.is_file() and (is_nifti(p) or is_video(p)) or is_frame_folder(p))
    )


def _items_from_folders(root: Path, labels: bool = True) -> list[dict[str, str]]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise data_error(images_dir, "images folder not found")
    if labels and not labels_dir.is_dir():
        raise data_error(labels_dir, f"labels folder not found (needed for the images in {images_dir})")
    images = _images_in(images_dir)
    if not images:
        raise data_error(
            images_dir, f"no images in the folder (expected {', '.join(NIFTI_SUFFIXES + VIDEO_SUFFIXES)} files "
            "or folders of frame images)"
        )
    if not labels:
        return _image_items(images)
    label_files = {  # NIfTI labels, mask videos, mask PNG folders
        strip_suffix(p.name, NIFTI_SUFFIXES + VIDEO_SUFFIXES): p
        for p in sorted(labels_dir.iterdir())
        if not p.name.startswith(".") and (p.is_file() and (is_nifti(p) or is_video(p)) or p.is_dir())
    }
    items = []
    for case, image in _cases(images).items():
        label = label_files.get(case)
        if label is None:
            raise data_error(labels_dir / f"{case}.nii.gz", f"label not found for image {image}")
        items.append({"image": str(image), "label": str(label)})
    return items


def _image_items(images: list[Path]) -> list[dict[str, str]]:
    return [{"image": str(image)} for image in _cases(images).values()]


def _cases(images: list[Path]) -> dict[str, Path]:
    """Case id -> image; refuses per-channel files and two images of one case."""
    by_case: dict[str, Path] = {}
    for image in images:
        case, channel = _case_id(image)
        if channel not in (None, 0):
            raise data_error(
                image,
                f"channel file _{channel:04d}: images split into one file per channel are not supported; "
                "stack the channels into one 4D NIfTI (X, Y, Z, C)",
            )
        if case in by_case:
            raise data_error(image, f"second image for case '{case}' (the first is {by_case[case]})")
        by_case[case] = image
    return by_case


def _class_names_from_labels(items: list[dict[str, str]]) -> list[str]:
    """Reads up to ``_LABEL_SCAN`` labels spread over the cases; names ``background, label_1, ...``."""
    if not items:
        return ["background"]
    picks = sorted({round(i) for i in np.linspace(0, len(items) - 1, min(_LABEL_SCAN, len(items)))})
    top = 0
    for i in picks:
        path = items[i]["label"]
        if is_clip(path):
            data = read_mask_clip(path)
        else:
            try:
                data = np.asanyarray(nib.load(path).dataobj)
            except Exception as e:  # noqa: BLE001  nibabel/gzip raise many types for broken files
                raise data_error(path, f"cannot read label data ({type(e).__name__}: {e})") from e
        if data.size == 0:
            raise data_error(path, "label is empty")
        lo, hi = float(np.min(data)), float(np.max(data))
        if lo < 0:
            raise data_error(path, f"label has negative values (min {lo}); labels must be 0..n_classes-1")
        if np.issubdtype(data.dtype, np.floating) and not np.all(np.mod(data, 1) == 0):
            raise data_error(path, "label has non-integer values; labels must be integer classes")
        top = max(top, int(hi))
    return ["background"] + [f"label_{v}" for v in range(1, top + 1)]


# --------------------------------------------------------------------------------------------
# Split and checks
# --------------------------------------------------------------------------------------------


def _split(
    items: list[dict[str, str]], val_fraction: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Deterministic split; at least one case each side when ``val_fraction > 0`` and there are 2+."""
    n = len(items)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return [it for i, it in enumerate(items) if i not in val_idx], [it for i, it in enumerate(items) if i in val_idx]


def _validate(items: list[dict[str, str]], meta_path: Path | None, verify_checksums: bool) -> list[VolumeInfo]:
    """Header checks of every pair; returns the image headers."""
    infos = []
    where = f" (listed in {meta_path})" if meta_path is not None else ""
    for item in items:
        image = Path(item["image"])
        if not (image.is_file() or image.is_dir()):
            raise data_error(image, f"image file not found{where}")
        if "label" in item:
            label = Path(item["label"])
            if not (label.is_file() or label.is_dir() and is_clip(image)):
                raise data_error(label, f"label file not found for image {image}{where}")
            image_info, _ = check_pair(image, label, verify_checksum=verify_checksums)
        else:
            image_info = read_volume_info(image, verify_checksum=verify_checksums)
        if infos and image_info.n_channels != infos[0].n_channels:
            raise data_error(
                image,
                f"image has {image_info.n_channels} channel(s) but {infos[0].path} has {infos[0].n_channels}; "
                "all images need the same channels",
            )
        infos.append(image_info)
    return infos


def load_datalist(
    root: PathLikeStr,
    val_fraction: float = 0.2,
    seed: int = 0,
    validate: bool = True,
    *,
    verify_checksums: bool = False,
    labels: bool = True,
) -> DataList:
    """Finds a dataset's cases, splits them and (by default) checks every image/label pair.

    Args:
        root: dataset folder (or its ``dataset.json``).
        val_fraction: share of cases held out for validation when ``dataset.json`` has no
            (or an empty) ``validation`` list (at least one case when > 0 and there are 2+ cases). Default 0.2.
        seed: seed of that split; the same seed gives the same split.
        validate: read every header (no voxel data) and check the pairs, so that a bad case fails
            here rather than hours into training: missing files, unreadable / truncated files,
            2D or 5D+ volumes, 4D labels, image/label shape or affine mismatch, images with
            different channel counts. Default True.
        verify_checksums: with ``validate``, also decompress every ``.nii.gz`` whole to check its
            CRC: finds damage inside the voxel data, which the header checks and nibabel itself
            miss, at the cost of reading the whole dataset once. Default False.
        labels: list image/label pairs (default); False lists the images only (a task without
            labels, such as restoration): ``labelsTr/`` is not needed, the ``label`` entries of
            ``dataset.json`` are ignored, and a folder holding clips itself (no ``imagesTr/``) is read.

    Returns:
        The :class:`DataList`; with ``validate``, ``n_channels``, ``median_spacing`` and
        ``median_shape`` are filled in.

    Raises:
        DataError: every bad-input case; the message starts with the offending path.
        ValueError: ``val_fraction`` outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got val_fraction={val_fraction}")
    root = Path(root).expanduser().absolute()
    if root.is_file() and root.name == DATASET_JSON:
        root = root.parent
    if not root.is_dir():
        raise data_error(root, "dataset folder not found")
    meta_path: Path | None = root / DATASET_JSON
    val: list[dict[str, str]] | None = None
    if meta_path.is_file():
        meta = _read_json(meta_path)
        if "training" in meta:
            items = _items_from_json(meta["training"], "training", root, meta_path, labels)
            if meta.get("validation"):
                val = _items_from_json(meta["validation"], "validation", root, meta_path, labels)
        else:  # nnU-Net v2: no list, files in imagesTr / labelsTr
            items = _items_from_folders(root, labels)
        class_names = _class_names_from_json(meta["labels"], meta_path) if "labels" in meta and labels else None
        modality = _modality_from_json(meta)
    elif (root / "imagesTr").is_dir():
        meta_path = None
        items = _items_from_folders(root, labels)
        class_names = None
        modality = "unknown"
    elif not labels and (clips := [p for p in _images_in(root) if is_clip(p)]):
        meta_path = None
        items = _image_items(clips)
        class_names = None
        modality = "video"
    else:
        raise data_error(
            root,
            f"no {DATASET_JSON} and no imagesTr/ folder; expected the Decathlon layout "
            f"({DATASET_JSON} + imagesTr/ + labelsTr/) or imagesTr/ + labelsTr/ with matching file names",
        )
    if not items:
        raise data_error(meta_path or root, "no training cases listed")
    if any(is_clip(it["image"]) for it in items) and modality == "unknown":
        modality = "video"
    train, val = (items, val) if val is not None else _split(items, val_fraction, seed)

    infos = _validate(train + val, meta_path, verify_checksums) if validate else []
    if not labels:
        class_names = []
    elif class_names is None:
        class_names = _class_names_from_labels(train + val)
    datalist = DataList(root, train, val, class_names, modality)
    if infos:
        datalist.n_channels = infos[0].n_channels
        spacing = np.median(np.array([i.spacing for i in infos]), axis=0)
        shape = np.median(np.array([i.shape for i in infos]), axis=0)
        datalist.median_spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        datalist.median_shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    return datalist
