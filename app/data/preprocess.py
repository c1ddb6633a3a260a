"""Preprocess once: every case reoriented, resampled, normalised and cropped a single time, then stored.

nnU-Net's approach: the deterministic part of the pipeline (:func:`~app.data.transforms.preprocessing_transforms`,
the same steps validation and inference run) is applied once per case, and training cuts its patches
from the stored arrays. A stored case (an *entry*) is three ``.npy`` files and a ``.json`` file in the
cache folder, named by the case's key:

* ``<key>.image.npy``: ``(C, X, Y, Z)`` float32, the preprocessed image;
* ``<key>.label.npy``: ``(1, X, Y, Z)`` uint8 (int16 above 255 classes), the label on the same grid
  (``(1, 0, 0, 0)`` for a case without a label, as the restoration task reads them);
* ``<key>.locations.npy``: ``(N, 3)`` int32 voxel indices of foreground classes 1, 2, ... (at most
  :data:`MAX_LOCATIONS_PER_CLASS` per class, drawn with a fixed seed), for foreground oversampling;
* ``<key>.json``: shapes, label range, locations per class, the source files. Written last: an
  entry exists when its json does.

Clips (video files and frame folders) are stored decoded, so training cuts its windows of frames
from the memory-mapped array instead of decoding the clip again.

The key is a hash of the bytes of the image and label files, the preprocessing settings, the
format version and the versions of the libraries that compute the arrays (MONAI, torch, nibabel,
PyAV): a changed file, setting or library gives a new key, so nothing stale is read. Every file
is written through :func:`app.utils.atomic_path`; a kill leaves at most hidden temporary files
(removed by the next run) and ``.npy`` files without their json (not an entry; rewritten).

The pass that preprocesses a case also runs the voxel checks of :mod:`app.data.scan` on the bytes
it read (NaN/inf, damaged ``.nii.gz``, undecodable clip, constant image, label values): one read
instead of two. An entry is written only for a case that passed them; the label range is checked
against the class count again on every use of the entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Union

import av
import monai
import nibabel as nib
import numpy as np
import torch
from monai.data import ImageReader, NibabelReader
from monai.data.utils import correct_nifti_header_if_necessary
from monai.transforms import Compose
from monai.utils import ensure_tuple, look_up_option
from tqdm import tqdm

from app.data.errors import data_error
from app.data.scan import (
    check_image_voxels,
    check_label_range,
    check_label_voxels,
    read_nifti_image_checked,
)
from app.data.transforms import Preprocessing, preprocessing_transforms
from app.data.video import VideoReader, is_clip, read_mask_clip, read_video_volume
from app.utils import atomic_path

__all__ = [
    "CACHE_MODES",
    "MAX_LOCATIONS_PER_CLASS",
    "PREPROCESS_VERSION",
    "CaseStore",
    "PreparedCases",
    "PreprocessedCase",
    "case_key",
    "default_threads",
    "class_locations",
    "file_digest",
    "prepare_cases",
    "preprocess_case",
]

log = logging.getLogger(__name__)

PathLikeStr = Union[str, "PathLike[str]"]

CACHE_MODES = ("disk", "memory", "none")
PREPROCESS_VERSION = 1
"""Bump when the stored arrays change for the same inputs and settings."""
MAX_LOCATIONS_PER_CLASS = 10_000
"""Foreground voxels kept per class as patch centres (nnU-Net keeps 10,000): spread over the whole
structure, 120 kB per class."""
_LOCATIONS_SEED = 1234
_DIGEST_CHUNK = 1 << 22
_SUFFIXES = (".image.npy", ".label.npy", ".locations.npy", ".json")


def file_digest(path: PathLikeStr | None) -> str:
    """sha256 of a file's bytes, as hex; of a folder (frame images), of its files' names and bytes
    in name order; ``""`` for None (no file).

    Raises:
        DataError: the file cannot be read.
    """
    if path is None:
        return ""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f"\0{f.name}\0".encode())
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(_DIGEST_CHUNK):
                    h.update(chunk)
        except OSError as e:
            raise data_error(f, f"cannot read the file ({type(e).__name__}: {e})") from e
    return h.hexdigest()


def case_key(image_digest: str, label_digest: str, pre: Preprocessing) -> str:
    """The name of a case's entry: a hash of both files' bytes, the settings and the library versions."""
    text = json.dumps(
        {
            "version": PREPROCESS_VERSION,
            "image": image_digest,
            "label": label_digest,
            "pre": pre.to_dict(),
            "libraries": {"monai": monai.__version__, "torch": torch.__version__, "nibabel": nib.__version__,
                          "av": av.__version__},
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class PreprocessedCase:
    """One case after preprocessing.

    Attributes:
        image: ``(C, X, Y, Z)`` float32 (a read-only memory map for a stored entry).
        label: ``(1, X, Y, Z)`` integer classes on the image's grid (``(1, 0, 0, 0)``: no label).
        locations: for each foreground class ``1..K`` (``K`` the largest label value), an
            ``(n, 3)`` int32 array of voxel indices holding that class (``n = 0`` where absent).
        source: the ``{"image", "label"}`` paths it came from (``{"image"}`` without a label).
        label_range: ``(min, max)`` of the label values before preprocessing.
    """

    image: np.ndarray
    label: np.ndarray
    locations: list[np.ndarray]
    source: dict[str, str]
    label_range: tuple[float, float] = (0.0, 0.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]


def class_locations(label: np.ndarray, max_per_class: int = MAX_LOCATIONS_PER_CLASS) -> list[np.ndarray]:
    """Voxel indices of each foreground class, at most ``max_per_class`` each (a fixed-seed draw).

    Args:
        label: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` integer classes.
        max_per_class: cap per class.

    Returns:
        For classes ``1..label.max()``, an ``(n, 3)`` int32 array each, in raster order.
    """
    spatial = label.shape[-3:]
    flat = np.asarray(label).reshape(-1)
    fg = np.flatnonzero(flat > 0)
    values = flat[fg]
    rng = np.random.default_rng(_LOCATIONS_SEED)
    top = int(values.max()) if values.size else 0
    out = []
    for cls in range(1, top + 1):
        picked = fg[values == cls]
        if picked.size > max_per_class:
            picked = np.sort(rng.choice(picked, max_per_class, replace=False))
        out.append(np.stack(np.unravel_index(picked, spatial), axis=1).astype(np.int32))
    return out


class _PreloadedReader(ImageReader):
    """Hands files already read (and checked) to ``LoadImaged``, so each file is read once.

    The arrays and metadata come from MONAI's own readers (``NibabelReader`` for NIfTI,
    :class:`~app.data.video.VideoReader` for clips) applied to the in-memory data, so they equal
    what ``LoadImaged`` gives from the file.

    Args:
        loaded: path -> ``(reader, what reader.read would return)``.
    """

    def __init__(self, loaded: dict[str, tuple[ImageReader, Any]]) -> None:
        super().__init__()
        self.loaded = loaded

    def verify_suffix(self, filename: Sequence[PathLikeStr] | PathLikeStr) -> bool:
        return all(str(f) in self.loaded for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLikeStr] | PathLikeStr, **kwargs: Any) -> Any:
        (name,) = ensure_tuple(data)
        reader, obj = self.loaded[str(name)]
        reader.filenames = (str(name),)  # NibabelReader.get_data pairs images with their names
        return reader, obj

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        reader, obj = img
        return reader.get_data(obj)


def _read_checked(item: dict[str, str], pre: Preprocessing, n_classes: int) -> tuple[_PreloadedReader, float, float]:
    """Reads image and label (if any) whole and runs the voxel checks; returns the reader and the label range."""
    image, label = item["image"], item.get("label")
    loaded: dict[str, tuple[ImageReader, Any]] = {}
    if is_clip(image):
        volume = read_video_volume(image, grayscale=pre.in_channels == 1)
        check_image_voxels(image, volume)
        shape = tuple(volume.shape[-3:])
        loaded[image] = (VideoReader(grayscale=pre.in_channels == 1), [(image, volume)])
    else:
        img = read_nifti_image_checked(image)
        check_image_voxels(image, _voxels(image, img))
        shape = tuple(img.shape[:3])
        loaded[image] = (NibabelReader(), correct_nifti_header_if_necessary(img))
    if label is None:
        return _PreloadedReader(loaded), 0.0, 0.0
    if is_clip(label):  # per-frame masks: class ids on the clip's grid, handed over as an in-memory NIfTI
        masks = read_mask_clip(label, *shape, clip=image)
        lab = nib.Nifti1Image(masks.astype(_label_dtype(float(masks.max(initial=0)))), np.eye(4))
    else:
        lab = read_nifti_image_checked(label)
    values = _voxels(label, lab)
    check_label_voxels(label, values, n_classes)
    if shape != tuple(lab.shape[:3]):  # a clip whose frames did not all decode
        raise data_error(image, f"decoded to shape {shape}, but its label {label} has {tuple(lab.shape[:3])}")
    loaded[label] = (NibabelReader(), correct_nifti_header_if_necessary(lab))
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    return _PreloadedReader(loaded), lo, hi


def _voxels(path: str, img: Any) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except (ValueError, OSError, EOFError) as e:
        raise data_error(path, f"cannot read the voxel data ({type(e).__name__}: {e})") from e


def _label_dtype(hi: float) -> np.dtype:
    return np.dtype(np.uint8) if hi <= 255 else np.dtype(np.int16)


def preprocess_case(
    item: dict[str, str], pre: Preprocessing, n_classes: int | None = None, *, check: bool = True
) -> PreprocessedCase:
    """Runs the deterministic preprocessing on one case (no cache).

    Args:
        item: ``{"image", "label"}`` paths, or ``{"image"}`` alone (the label is then empty,
            ``(1, 0, 0, 0)``).
        pre: the settings.
        n_classes: classes including background; needed with ``check`` (not read without a label).
        check: read both files whole first and run the voxel checks of :mod:`app.data.scan`
            (NaN/inf, damaged ``.nii.gz``, constant image, label values); else load them as
            ``LoadImaged`` does. The arrays are the same either way.

    Returns:
        The case, in memory; ``image``/``label`` equal what
        :func:`~app.data.transforms.val_transforms` gives.

    Raises:
        DataError: naming the file at fault.
    """
    with_label = "label" in item
    transforms = preprocessing_transforms(pre, ("image", "label"), with_label=with_label)
    load, rest = transforms[0], Compose(transforms[1:])
    if check:
        if n_classes is None:
            raise ValueError("preprocess_case(check=True) needs n_classes")
        reader, lo, hi = _read_checked(item, pre, n_classes)
        data = rest(load(dict(item), reader=reader))
    else:
        data = rest(load(dict(item)))
    image = np.ascontiguousarray(data["image"].as_subclass(torch.Tensor).numpy(), dtype=np.float32)
    if not with_label:
        return PreprocessedCase(image, np.zeros((1, 0, 0, 0), np.uint8), [], dict(item), (0.0, 0.0))
    raw_label = data["label"].as_subclass(torch.Tensor).numpy()
    if not check:
        lo, hi = (float(raw_label.min()), float(raw_label.max())) if raw_label.size else (0.0, 0.0)
    label = np.ascontiguousarray(raw_label.astype(_label_dtype(hi)))
    return PreprocessedCase(image, label, class_locations(label), dict(item), (lo, hi))


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


@dataclass
class CaseStore:
    """A folder of entries (see the module docstring); safe to share between data sets and processes.

    Args:
        root: the folder; created on first write.
    """

    root: Path
    _warned: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()

    def paths(self, key: str) -> dict[str, Path]:
        """The files of entry ``key``: ``image``, ``label``, ``locations`` (``.npy``) and ``meta`` (``.json``)."""
        return {name: self.root / f"{key}{suffix}" for name, suffix in zip(("image", "label", "locations", "meta"), _SUFFIXES)}

    def load(self, key: str, mmap: bool = True) -> PreprocessedCase | None:
        """The entry ``key``, memory-mapped (``mmap``) or read into memory; None when there is none.

        An entry whose files disagree with its json (a file deleted or replaced by hand) counts
        as absent, with a warning.
        """
        paths = self.paths(key)
        if not paths["meta"].is_file():
            return None
        try:
            meta = json.loads(paths["meta"].read_text())
            mode = "r" if mmap else None
            image = np.load(paths["image"], mmap_mode=mode)
            label = np.load(paths["label"], mmap_mode=mode)
            locs = np.load(paths["locations"])
            if (meta["key"] != key or list(image.shape) != meta["image_shape"] or list(label.shape) != meta["label_shape"]
                    or locs.shape[0] != sum(meta["locations_per_class"])):
                raise ValueError("the files do not match the json")
        except (OSError, ValueError, KeyError, TypeError) as e:
            if key not in self._warned:
                self._warned.add(key)
                log.warning("%s: damaged cache entry (%s); preprocessing the case again", paths["meta"], e)
            return None
        bounds = np.cumsum([0, *meta["locations_per_class"]])
        locations = [locs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return PreprocessedCase(image, label, locations, dict(meta["source"]), tuple(meta["label_range"]))

    def save(self, key: str, case: PreprocessedCase) -> None:
        """Writes entry ``key``, every file atomically, the json last."""
        paths = self.paths(key)
        counts = [int(len(a)) for a in case.locations]
        locs = np.concatenate(case.locations) if case.locations else np.zeros((0, 3), np.int32)
        for name, array in (("image", case.image), ("label", case.label), ("locations", locs)):
            with atomic_path(paths[name], suffix=".npy") as tmp:
                np.save(tmp, np.ascontiguousarray(array))
        meta = {
            "key": key,
            "version": PREPROCESS_VERSION,
            "image_shape": list(case.image.shape),
            "label_shape": list(case.label.shape),
            "label_dtype": str(case.label.dtype),
            "label_range": list(case.label_range),
            "locations_per_class": counts,
            "source": case.source,
        }
        with atomic_path(paths["meta"]) as tmp:
            tmp.write_text(json.dumps(meta, indent=1))

    def clean_temporaries(self) -> list[Path]:
        """Removes the hidden temporary files an interrupted write left; returns them."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.name.startswith(".") and any(s in p.name for s in _SUFFIXES)]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale


# --------------------------------------------------------------------------------------------
# Preparing a data set
# --------------------------------------------------------------------------------------------


class PreparedCases:
    """The preprocessed cases of one split, as the loaders' datasets read them.

    ``"disk"``: entries of a :class:`CaseStore`, memory-mapped on first use in each process
    (worker processes open their own maps). ``"memory"``: arrays held in RAM. ``"none"``: each
    access preprocesses the case again (the same arrays, at the full cost every time).

    Args:
        items: the ``{"image", "label"}`` paths.
        pre: the preprocessing settings.
        mode: one of :data:`CACHE_MODES`.
        cases: ``"memory"``: the preprocessed cases.
        store: ``"disk"``: the store, and ``keys`` the entry of each item.
    """

    def __init__(
        self,
        items: Sequence[dict[str, str]],
        pre: Preprocessing,
        mode: str,
        cases: list[PreprocessedCase] | None = None,
        store: CaseStore | None = None,
        keys: list[str] | None = None,
    ) -> None:
        self.items = [dict(it) for it in items]
        self.pre = pre
        self.mode = look_up_option(mode, CACHE_MODES)
        self._cases = cases
        self.store = store
        self.keys = keys
        self._maps: dict[int, PreprocessedCase] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are reopened by each process
        return state

    def case(self, index: int) -> PreprocessedCase:
        """Case ``index``, preprocessed.

        Raises:
            DataError: ``"disk"`` and its entry has gone (the cache folder was cleared while
                training ran), or ``"none"`` and the file cannot be loaded.
        """
        if self.mode == "memory":
            assert self._cases is not None
            return self._cases[index]
        if self.mode == "none":
            return preprocess_case(self.items[index], self.pre, check=False)
        case = self._maps.get(index)
        if case is None:
            assert self.store is not None and self.keys is not None
            case = self.store.load(self.keys[index])
            if case is None:
                raise data_error(self.store.paths(self.keys[index])["meta"],
                                 f"cache entry of {self.items[index]['image']} is missing; run again to rebuild it")
            self._maps[index] = case
        return case


def _prepare_one(
    item: dict[str, str], pre: Preprocessing, n_classes: int, mode: str, store: CaseStore | None
) -> tuple[PreprocessedCase | None, str | None, bool]:
    """``(case in memory or None, key or None, whether it was computed)`` for one item."""
    if mode == "disk":
        assert store is not None
        key = case_key(file_digest(item["image"]), file_digest(item.get("label")), pre)
        cached = store.load(key, mmap=True)
        if cached is not None:
            if "label" in item:
                check_label_range(item["label"], *cached.label_range, n_classes)
            return None, key, False
        store.save(key, preprocess_case(item, pre, n_classes, check=True))
        return None, key, True
    return preprocess_case(item, pre, n_classes, check=True), None, True


def default_threads() -> int:
    """Threads for preprocessing: the cores this process may use, at most 8 (each also runs torch's own threads)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def prepare_cases(
    items: Sequence[dict[str, str]],
    pre: Preprocessing,
    n_classes: int,
    mode: str = "disk",
    cache_dir: PathLikeStr | None = None,
    *,
    threads: int | None = None,
    progress: bool = True,
    desc: str = "preprocessing",
) -> PreparedCases:
    """Preprocesses every case once (checking its voxels on the way), stores it, returns the lot.

    ``"disk"``: cases with an entry in ``cache_dir`` are not read (only hashed); the others are
    read, checked, preprocessed and stored. ``"memory"``: every case is read, checked and
    preprocessed into RAM. ``"none"``: nothing is read here (the loaders preprocess on every
    access; run :func:`app.data.scan_cases` for the voxel checks).

    Args:
        items: ``{"image", "label"}`` paths.
        pre: the preprocessing settings (part of the key).
        n_classes: classes including background; label values must be ``0..n_classes-1``.
        mode: one of :data:`CACHE_MODES`.
        cache_dir: the store's folder (``"disk"`` only).
        threads: cases preprocessed at once; None: :func:`default_threads`.
        progress: show a progress bar (tqdm, on stderr) over the cases.
        desc: the progress bar's label.

    Returns:
        The :class:`PreparedCases`, in ``items`` order.

    Raises:
        DataError: the first bad case in ``items`` order, one line naming the file.
        ValueError: ``"disk"`` without ``cache_dir``, or an unknown mode.
    """
    mode = look_up_option(mode, CACHE_MODES)
    if mode == "none":
        return PreparedCases(items, pre, mode)
    store = None
    if mode == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache folder (cache_dir)")
        store = CaseStore(Path(cache_dir))
        for stale in store.clean_temporaries():
            log.info("removed %s, left by an interrupted preprocessing run", stale)
    n_threads = threads or default_threads()
    results: list[tuple[PreprocessedCase | None, str | None, bool]] = []
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress, leave=False, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=max(1, min(n_threads, len(items))))
    try:
        futures = [pool.submit(_prepare_one, dict(it), pre, n_classes, mode, store) for it in items]
        for future in futures:
            results.append(future.result())  # the first bad case in order raises here
            bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    computed = sum(1 for _, _, done in results if done)
    if mode == "disk":
        log.info("data: %d of %d cases preprocessed and stored in %s, %d read from there",
                 computed, len(items), cache_dir, len(items) - computed)
        return PreparedCases(items, pre, mode, store=store, keys=[key for _, key, _ in results])  # type: ignore[misc]
    return PreparedCases(items, pre, mode, cases=[case for case, _, _ in results])  # type: ignore[misc]

