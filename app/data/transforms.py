"""MONAI dictionary transforms (keys ``"image"`` / ``"label"``) for training, validation and inference.

The deterministic part (:func:`preprocessing_transforms`) is shared by all three so that a model
sees the same intensities and grid at inference as in training; its settings live in
:class:`Preprocessing`, stored in checkpoints as a plain dict (:meth:`Preprocessing.to_dict`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    LoadImage,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import look_up_option

from app.data.errors import DataError, data_error
from app.data.video import MaskClipReader, VideoReader, is_clip
from app.utils import dataclass_from_mapping

__all__ = [
    "INTENSITY_MODES",
    "CheckChannelsd",
    "CheckFinited",
    "CheckLabelsd",
    "LoadVolumed",
    "Preprocessing",
    "infer_transforms",
    "preprocessing_transforms",
    "rotation_plane",
    "train_transforms",
    "val_transforms",
]

INTENSITY_MODES = ("zscore", "ct", "none")
_AXCODE_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})
# Voxels sampled per class to pick crop centres from: bounds the memory the cached indices take
# (8 bytes each) on large volumes while keeping the centres spread over the whole structure.
MAX_INDICES_PER_CLASS = 200_000


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must be one number or 3 numbers, got {name}={value!r}")
    return values  # type: ignore[return-value]


@dataclass
class Preprocessing:
    """Deterministic preprocessing, identical in training, validation and inference.

    Attributes:
        spacing: target voxel size ``(sx, sy, sz)`` in mm after reorientation; None keeps each
            image's own grid. One number means isotropic.
        orientation: target axis codes, e.g. ``"RAS"`` (MONAI's ``Orientationd``); None keeps each
            image's own axis order.
        intensity: ``"zscore"`` (per-channel mean/std over non-zero voxels, for MRI and video),
            ``"ct"`` (clip to ``ct_window`` HU and scale to [0, 1]) or ``"none"``.
        ct_window: ``(low, high)`` HU window used by ``"ct"``.
        crop_foreground: crop to the bounding box of voxels above the image minimum (removes
            zero / air padding around the body; a no-op on images without such padding).
        in_channels: channels the model expects; checked on every loaded image. For video, 1
            reads clips in grey, 3 in RGB.
    """

    spacing: tuple[float, float, float] | None = None
    orientation: str | None = "RAS"
    intensity: str = "zscore"
    ct_window: tuple[float, float] = (-175.0, 250.0)
    crop_foreground: bool = True
    in_channels: int = 1

    def __post_init__(self) -> None:
        if self.spacing is not None:
            self.spacing = _triple(self.spacing, "spacing")
            if min(self.spacing) <= 0:
                raise ValueError(f"spacing must be positive, got spacing={self.spacing}")
        self.intensity = look_up_option(str(self.intensity).lower(), INTENSITY_MODES)
        if self.orientation is not None:
            codes = str(self.orientation).upper()
            if len(codes) != 3 or any(sum(c in pair for c in codes) != 1 for pair in _AXCODE_PAIRS):
                raise ValueError(
                    f"orientation must be 3 axis codes, one of L/R, A/P, S/I each (e.g. 'RAS', 'LPS'), or None, "
                    f"got orientation={self.orientation!r}"
                )
            self.orientation = codes
        low, high = (float(v) for v in self.ct_window)
        if not low < high:
            raise ValueError(f"ct_window must be (low, high) with low < high, got ct_window={self.ct_window}")
        self.ct_window = (low, high)
        self.crop_foreground = bool(self.crop_foreground)
        if int(self.in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1, got in_channels={self.in_channels}")
        self.in_channels = int(self.in_channels)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples, floats, str, bool, int) for checkpoints and logs."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; also accepts Hydra/OmegaConf mappings (lists for tuples).

        Raises:
            ValueError: unknown keys (the message lists the known ones).
        """
        return dataclass_from_mapping(cls, data, "Preprocessing")


def _above_minimum(x: torch.Tensor) -> torch.Tensor:
    """Foreground for cropping: voxels brighter than the image's minimum (zero / air padding)."""
    return x > x.min()


class CheckChannelsd(MapTransform):
    """Raises :class:`~app.data.errors.DataError` naming the file if an image's channel count is wrong.

    Args:
        keys: image key(s); values are channel-first ``(C, ...)``.
        n_channels: expected ``C``.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, n_channels: int) -> None:
        super().__init__(keys)
        self.n_channels = n_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].shape[0] != self.n_channels:
                raise data_error(
                    _filename(d[key], key),
                    f"image has {d[key].shape[0]} channel(s), the model expects in_channels={self.n_channels}",
                )
        return d


class CheckFinited(MapTransform):
    """Raises :class:`~app.data.errors.DataError` naming the file if an image holds NaN or inf.

    Such values (NaN backgrounds of some processed scans, or a damaged file) would turn the
    loss into NaN many steps later; here they stop the run at the file.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            bad = int((~torch.isfinite(torch.as_tensor(d[key]))).sum())
            if bad:
                raise data_error(
                    _filename(d[key], key), f"image holds {bad} NaN/inf values; replace them (e.g. by 0) first"
                )
        return d


class CheckLabelsd(MapTransform):
    """Raises :class:`~app.data.errors.DataError` naming the file if label values leave ``0..n_classes-1``.

    Args:
        keys: label key(s); values are ``(1, ...)`` class indices.
        n_classes: number of classes, background included.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, n_classes: int) -> None:
        super().__init__(keys)
        self.n_classes = n_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            lo, hi = float(label.min()), float(label.max())
            if lo < 0 or hi > self.n_classes - 1:
                raise data_error(
                    _filename(label, key),
                    f"label values span {lo:g}..{hi:g}, outside 0..{self.n_classes - 1} for n_classes={self.n_classes}",
                )
        return d


class LoadVolumed(LoadImaged):
    """``LoadImaged`` whose failures raise :class:`~app.data.errors.DataError` naming the file.

    Header checks (:func:`app.data.load_datalist`) cannot see damage inside a compressed voxel
    block; such a file fails here, on first load, with its path in the message. A clip under one
    of ``mask_keys`` (a mask video or a folder of mask PNGs) is read as class ids by
    :class:`~app.data.video.MaskClipReader`, not as an image.

    Args:
        keys: as ``LoadImaged``.
        mask_keys: label keys whose clips hold per-frame masks.
        args, kwargs: as ``LoadImaged``.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, *args: Any, mask_keys: Sequence[Hashable] = (), **kwargs: Any) -> None:
        super().__init__(keys, *args, **kwargs)
        self.mask_keys = tuple(mask_keys)
        self._mask_loader = LoadImage(reader=MaskClipReader(), image_only=self._loader.image_only)

    def _load(self, data: Mapping[Hashable, Any], reader: Any) -> dict[Hashable, Any]:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            masks = reader is None and key in self.mask_keys and is_clip(d[key])
            out = (self._mask_loader if masks else self._loader)(d[key], reader)
            if self._loader.image_only:
                d[key] = out
                continue
            d[key] = out[0]
            meta_key = meta_key or f"{key}_{meta_key_postfix}"
            if meta_key in d and not self.overwriting:
                raise KeyError(f"Metadata with key {meta_key} already exists and overwriting=False.")
            d[meta_key] = out[1]
        return d

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        try:
            return self._load(data, reader)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  readers raise many types; all become one DataError
            names = [str(data[k]) for k in self.key_iterator(dict(data))]
            raise data_error(", ".join(names), f"cannot load ({type(e).__name__}: {e})") from e


def _filename(value: Any, key: Hashable) -> str:
    meta = getattr(value, "meta", None) or {}
    return str(meta.get("filename_or_obj", f"<{key}>"))


def preprocessing_transforms(
    pre: Preprocessing, keys: Sequence[str] = ("image", "label"), with_label: bool = True
) -> list:
    """Deterministic loading and preprocessing, invertible with ``monai.transforms.Invertd``.

    Steps: ``LoadImaged`` (metadata kept; NIfTI via nibabel, clips via
    :class:`~app.data.video.VideoReader`, chosen per file; a label that is a clip's masks via
    :class:`~app.data.video.MaskClipReader`), ``EnsureChannelFirstd``, channel
    and NaN checks, ``Orientationd`` (only if ``pre.orientation``), ``Spacingd`` (bilinear image,
    nearest label; only if ``pre.spacing``), intensity (``NormalizeIntensityd`` non-zero
    channel-wise, or ``ScaleIntensityRanged``) and ``CropForegroundd`` (``allow_smaller=True``)
    -- cropping before z-scoring, after CT windowing.

    Args:
        pre: the settings.
        keys: ``(image_key, label_key)``; with ``with_label=False`` only ``keys[0]`` is used.
        with_label: whether the data holds a label that must follow the image.

    Returns:
        A list of transforms; output ``image`` is ``(C, X, Y, Z)`` float32, ``label`` ``(1, X, Y, Z)``.
    """
    keys = list(keys)
    if not keys or (with_label and len(keys) < 2):
        raise ValueError(f"keys must be (image_key, label_key) when with_label=True, or (image_key,); got keys={keys}")
    image_key = keys[0]
    all_keys = keys[:2] if with_label else [image_key]
    load = LoadVolumed(all_keys, image_only=False, mask_keys=all_keys[1:])
    # Registered after construction, so MONAI still picks readers by file suffix: the video
    # reader answers only for clips, NIfTI goes to the default readers.
    load.register(VideoReader(grayscale=pre.in_channels == 1))
    out: list = [
        load,
        EnsureChannelFirstd(all_keys),
        CheckChannelsd(image_key, pre.in_channels),
        CheckFinited(image_key),
    ]
    if pre.orientation is not None:
        out.append(Orientationd(all_keys, axcodes=pre.orientation, labels=None))
    if pre.spacing is not None:
        modes = ("bilinear", "nearest") if with_label else ("bilinear",)
        out.append(Spacingd(all_keys, pixdim=pre.spacing, mode=modes))
    crop = (
        [CropForegroundd(all_keys, source_key=image_key, select_fn=_above_minimum, allow_smaller=True)]
        if pre.crop_foreground
        else []
    )
    if pre.intensity == "zscore":
        out += crop + [NormalizeIntensityd(image_key, nonzero=True, channel_wise=True)]
    elif pre.intensity == "ct":
        low, high = pre.ct_window
        out += [ScaleIntensityRanged(image_key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)] + crop
    else:
        out += crop
    return out


def normalize_patch_size(patch_size: Sequence[int] | int) -> tuple[int, int, int]:
    """``96 -> (96, 96, 96)``; checks a 3-tuple of positive sizes."""
    size = (int(patch_size),) * 3 if isinstance(patch_size, int) else tuple(int(s) for s in patch_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"patch_size must be one size or 3 sizes >= 1, got patch_size={patch_size!r}")
    return size  # type: ignore[return-value]


def rotation_plane(patch: tuple[int, int, int]) -> tuple[int, int] | None:
    """First axis pair with equal patch sizes: 90-degree turns there keep the patch shape."""
    for a, b in ((0, 1), (1, 2), (0, 2)):
        if patch[a] == patch[b]:
            return (a, b)
    return None


def train_transforms(
    pre: Preprocessing, patch_size: Sequence[int] | int, n_classes: int, num_samples: int = 1
) -> Compose:
    """Preprocessing, then class-balanced random patches and augmentation.

    After preprocessing: label range check, ``SpatialPadd`` to the patch size, crop-centre indices
    per class (cached by ``CacheDataset``/``PersistentDataset``), ``RandCropByLabelClassesd``
    (equal chance per class, classes absent from a case skipped), random flips on the three axes,
    ``RandRotate90d`` in the first plane where the patch is square, and intensity scale / shift /
    Gaussian noise.

    Args:
        pre: preprocessing settings.
        patch_size: ``(px, py, pz)`` or one size.
        n_classes: classes including background; labels must be ``0..n_classes-1``.
        num_samples: patches per volume per visit (the loader flattens them into the batch).

    Returns:
        ``Compose`` yielding (lists of ``num_samples``) dicts with ``image (C, px, py, pz)`` and
        ``label (1, px, py, pz)``.
    """
    patch = normalize_patch_size(patch_size)
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2 (background included), got n_classes={n_classes}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got num_samples={num_samples}")
    keys = ["image", "label"]
    indices_key = "label_cls_indices"
    out = preprocessing_transforms(pre, keys, with_label=True)
    out += [
        CheckLabelsd("label", n_classes),
        SpatialPadd(keys, spatial_size=patch),
        ClassesToIndicesd(
            "label", indices_postfix="_cls_indices", num_classes=n_classes, max_samples_per_class=MAX_INDICES_PER_CLASS
        ),
        RandCropByLabelClassesd(
            keys,
            label_key="label",
            spatial_size=patch,
            num_classes=n_classes,
            num_samples=num_samples,
            indices_key=indices_key,
            warn=False,
        ),
        DeleteItemsd(indices_key),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
    ]
    plane = rotation_plane(patch)
    if plane is not None:
        out.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=plane))
    out += [
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandGaussianNoised("image", prob=0.15, std=0.1),
    ]
    return Compose(out)


def val_transforms(pre: Preprocessing) -> Compose:
    """Preprocessing of image and label; whole volumes (``image (C, X, Y, Z)``, ``label (1, X, Y, Z)``)."""
    return Compose(preprocessing_transforms(pre, ("image", "label"), with_label=True))


def infer_transforms(pre: Preprocessing) -> Compose:
    """Preprocessing of the image only, for inference.

    Every geometric step is invertible: map a prediction back to the input's grid with
    ``Invertd(keys="pred", transform=infer_transforms(pre), orig_keys="image", nearest_interp=True)``
    and write it with :func:`app.data.save_like`.
    """
    return Compose(preprocessing_transforms(pre, ("image",), with_label=False))
