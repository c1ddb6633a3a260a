"""Training and validation data loaders on MONAI datasets."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data import DistributedSampler as MonaiDistributedSampler
from monai.utils import look_up_option
from torch.utils.data import DistributedSampler

from app.data.datalist import DataList, read_volume_info
from app.data.errors import data_error
from app.data.transforms import Preprocessing, normalize_patch_size, train_transforms, val_transforms
from app.data.video import is_video

__all__ = ["CACHE_MODES", "build_loaders", "check_channels"]

PathLikeStr = Union[str, "PathLike[str]"]

CACHE_MODES = ("none", "memory", "disk")


def check_channels(items: Sequence[dict[str, str]], in_channels: int) -> None:
    """Checks from the headers that every image has ``in_channels`` channels (clips: 1 or 3).

    Raises:
        DataError: naming the first image that does not.
    """
    for item in items:
        image = item["image"]
        if is_video(image):
            if in_channels not in (1, 3):
                raise data_error(image, f"video clips are read with 1 (grey) or 3 (RGB) channels, not {in_channels}")
            continue
        n = read_volume_info(image).n_channels
        if n != in_channels:
            raise data_error(image, f"image has {n} channel(s), but Preprocessing.in_channels={in_channels}")


def _cache_subdir(cache_dir: Path, pre: Preprocessing, patch: tuple[int, int, int], n_classes: int, split: str) -> Path:
    """A folder per preprocessing setting: PersistentDataset keys its files by item only, so a
    changed setting must not find the old tensors."""
    key = json.dumps({"pre": pre.to_dict(), "patch": patch, "n_classes": n_classes}, sort_keys=True)
    return cache_dir / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _dataset(data: list[dict[str, str]], transform: Callable[..., Any], cache: str, cache_dir: Path | None) -> Dataset:
    """A MONAI dataset for the cache mode; ``cache_dir`` is only used (and must be set) for ``"disk"``."""
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=None, progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache folder")
        cache_dir.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    return Dataset(data, transform)


def build_loaders(
    datalist: DataList,
    pre: Preprocessing,
    patch_size: Sequence[int] | int,
    n_classes: int,
    batch_size: int = 2,
    num_workers: int = 0,
    cache: str = "none",
    cache_dir: PathLikeStr | None = None,
    num_samples: int = 1,
    distributed: bool = False,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Builds the training loader (random patches) and the validation loader (whole volumes).

    Args:
        datalist: cases from :func:`app.data.load_datalist`.
        pre: preprocessing settings (``pre.in_channels`` is checked against the image headers).
        patch_size: training patch ``(px, py, pz)`` or one size.
        n_classes: classes including background; must equal ``datalist.n_classes``.
        batch_size: training volumes per batch; a batch holds ``batch_size * num_samples`` patches.
        num_workers: loader worker processes (0: load in the main process).
        cache: ``"none"``; ``"memory"`` (``CacheDataset``: preprocessed volumes in RAM); ``"disk"``
            (``PersistentDataset`` under ``cache_dir``, one subfolder per preprocessing setting).
            The cache holds everything up to the first random transform.
        cache_dir: folder for ``cache="disk"``; None means ``<datalist.root>/.cache``.
        num_samples: patches cut from each loaded volume.
        distributed: shard both loaders over the ``torch.distributed`` process group (initialised by
            the caller): training through ``DistributedSampler`` (call
            ``train_loader.sampler.set_epoch(epoch)`` every epoch), validation without padding
            duplicates (reduce metrics across ranks).
        seed: seeds the shuffling and the augmentation (plus the rank when distributed).

    Returns:
        ``(train_loader, val_loader)``. Training batches: ``image (B*num_samples, C, px, py, pz)``,
        ``label (B*num_samples, 1, px, py, pz)``. Validation batches: batch size 1,
        ``image (1, C, X, Y, Z)``, ``label (1, 1, X, Y, Z)`` after preprocessing.

    Raises:
        DataError: no training cases, class count or channel count mismatch.
        ValueError: bad ``cache``, non-positive sizes, or
            ``distributed=True`` without an initialised process group.
    """
    cache = look_up_option(cache, CACHE_MODES)
    patch = normalize_patch_size(patch_size)
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size=}, {num_workers=}")
    if not datalist.train:
        raise data_error(datalist.root, "no training cases")
    if n_classes != datalist.n_classes:
        raise data_error(
            datalist.root,
            f"n_classes={n_classes} but the dataset has {datalist.n_classes} classes {datalist.class_names}",
        )
    check_channels(datalist.train + datalist.val, pre.in_channels)
    rank = 0
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs torch.distributed initialised (init_process_group) first")
        rank = dist.get_rank()

    train_tf = train_transforms(pre, patch, n_classes, num_samples=num_samples)
    train_tf.set_random_state(seed=seed + rank)
    val_tf = val_transforms(pre)
    root_cache = None
    if cache == "disk":
        root_cache = Path(cache_dir).expanduser() if cache_dir is not None else datalist.root / ".cache"
    train_dir = _cache_subdir(root_cache, pre, patch, n_classes, "train") if root_cache else None
    val_dir = _cache_subdir(root_cache, pre, patch, n_classes, "val") if root_cache else None
    train_ds = _dataset(datalist.train, train_tf, cache, train_dir)
    val_ds = _dataset(datalist.val, val_tf, cache, val_dir)

    pin = torch.cuda.is_available()
    generator = torch.Generator().manual_seed(seed)
    train_sampler = DistributedSampler(train_ds, shuffle=True, seed=seed) if distributed else None
    val_sampler = MonaiDistributedSampler(val_ds, even_divisible=False, shuffle=False) if distributed else None
    train_loader = DataLoader(
        train_ds,
        batch_size=batch_size,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
        generator=generator,
    )
    val_loader = DataLoader(
        val_ds,
        batch_size=1,
        shuffle=False,
        sampler=val_sampler,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
    )
    return train_loader, val_loader
