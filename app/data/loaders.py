"""Training and validation data loaders: preprocess once, then cut patches from the stored arrays.

:func:`build_loaders` preprocesses every case once (:func:`app.data.preprocess.prepare_cases`:
stored on disk and memory-mapped by default), then the training loader cuts random patches
from the stored arrays (:class:`app.data.patches.PatchDataset`: foreground oversampling,
augmentation in the workers or, with ``augment_on="device"``, left to the caller's device) in
``num_workers`` persistent worker processes with pinned memory and prefetching.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
from monai.data import DataLoader
from monai.data.utils import worker_init_fn as monai_worker_init_fn
from monai.utils import look_up_option

from app.data.datalist import DataList, read_volume_info
from app.data.errors import data_error
from app.data.degrade import Degradation
from app.data.patches import (
    Augmentation,
    PatchDataset,
    RestorationPatchDataset,
    RestorationVolumeDataset,
    EpochBatches,
    SeededSampler,
    VolumeDataset,
)
from app.data.preprocess import CACHE_MODES, PreparedCases, prepare_cases
from app.data.transforms import Preprocessing, normalize_patch_size, rotation_plane
from app.data.video import is_clip
from app.utils import staggered

__all__ = [
    "AUGMENT_ON",
    "CACHE_MODES",
    "MAX_AUTO_WORKERS",
    "build_loaders",
    "check_channels",
    "default_cache_dir",
    "prepare_datalist",
    "resolve_num_workers",
    "shutdown_workers",
]

PathLikeStr = Union[str, "PathLike[str]"]

AUGMENT_ON = ("workers", "device")
MAX_AUTO_WORKERS = 12
"""``num_workers="auto"`` gives at most this many workers per process (nnU-Net's default count)."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which container limits set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_num_workers(value: Any, device_type: str = "cuda", processes_per_node: int | None = None) -> int:
    """``num_workers``: a count, or ``auto`` from the cores available to this process.

    ``auto`` shares the cores between the processes of this machine (``LOCAL_WORLD_SIZE`` under
    ``torchrun``), then: on a CUDA device all but one core of the share (that one runs the training
    loop), at most :data:`MAX_AUTO_WORKERS`; on the CPU a quarter of the share, because there
    the training step's own threads use the cores a worker would take (0 on up to 3 cores).

    Args:
        value: ``"auto"`` or an integer >= 0.
        device_type: ``"cuda"`` or ``"cpu"``, the training device.
        processes_per_node: processes sharing the cores; None reads ``LOCAL_WORLD_SIZE`` (1 if unset).

    Raises:
        ValueError: neither ``auto`` nor an integer >= 0 (the message names ``num_workers``).
    """
    if str(value).lower() == "auto":
        share = available_cores() // max(1, processes_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        n = share - 1 if device_type == "cuda" else share // 4
        return max(0, min(MAX_AUTO_WORKERS, n))
    if isinstance(value, bool) or not isinstance(value, int) and not str(value).isdigit():
        raise ValueError(f"num_workers must be auto or an integer >= 0, but got num_workers={value!r}")
    n = int(value)
    if n < 0:
        raise ValueError(f"num_workers must be auto or an integer >= 0, but got num_workers={value!r}")
    return n


def default_cache_dir(root: PathLikeStr) -> Path:
    """Where preprocessed cases go when no folder is given: ``<root>/.cache/preprocessed`` when the data
    set's folder is writable, else ``$STOCHPROP_DATA/preprocessed`` (default ``~/.cache/stochprop``)."""
    root = Path(root)
    if os.access(root, os.W_OK) and (not (root / ".cache").exists() or os.access(root / ".cache", os.W_OK)):
        return root / ".cache" / "preprocessed"
    return Path(os.environ.get("STOCHPROP_DATA", "~/.cache/stochprop")).expanduser() / "preprocessed"


def check_channels(items: Sequence[dict[str, str]], in_channels: int) -> None:
    """Checks from the headers that every image has ``in_channels`` channels (clips: 1 or 3).

    Raises:
        DataError: naming the first image that does not.
    """
    for item in items:
        image = item["image"]
        if is_clip(image):
            if in_channels not in (1, 3):
                raise data_error(image, f"video clips are read with 1 (grey) or 3 (RGB) channels, not {in_channels}")
            continue
        n = read_volume_info(image).n_channels
        if n != in_channels:
            raise data_error(image, f"image has {n} channel(s), but Preprocessing.in_channels={in_channels}")


def _worker_init(worker_id: int) -> None:
    """Worker start-up: MONAI's per-worker reseeding of the random transforms, then SIGTERM and SIGINT
    ignored. A scheduler's or ``torchrun``'s stop signal goes to the training process's whole process
    group; the training process finishes its step with the batches its workers load and then shuts
    them down itself (:func:`shutdown_workers`). A worker whose training process dies exits by itself."""
    monai_worker_init_fn(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shutdown_workers(*loaders: DataLoader | None) -> None:
    """Stops the persistent worker processes of ``loaders`` now (None entries are skipped).

    The workers ignore SIGTERM (:func:`_worker_init`), so they must not be left for the interpreter's
    exit, which would stop them with SIGTERM and wait for them; the next iteration of a loader
    starts new workers.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)  # DataLoader keeps its persistent workers' iterator here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        if loader is not None:
            loader._iterator = None


def _rank(distributed: bool) -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without DDP."""
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs torch.distributed initialised (init_process_group) first")
    return dist.get_rank(), dist.get_world_size()


def prepare_datalist(
    datalist: DataList,
    pre: Preprocessing,
    n_classes: int,
    cache: str = "disk",
    cache_dir: PathLikeStr | None = None,
    *,
    distributed: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> tuple[PreparedCases, PreparedCases]:
    """Preprocesses (or finds stored) every training and validation case once, checking their voxels.

    See :func:`app.data.preprocess.prepare_cases`. Under DDP (``distributed``) with ``"disk"``, rank 0
    preprocesses first, then the first process of every other machine (which finds the cases stored
    when the folder is shared), then the rest, which read what is stored
    (:func:`app.utils.staggered`); with ``"memory"`` every rank preprocesses for itself.

    Args:
        datalist: cases from :func:`app.data.load_datalist`.
        pre: preprocessing settings (``pre.in_channels`` is checked against the image headers).
        n_classes: classes including background.
        cache: ``"disk"`` (stored under ``cache_dir``, memory-mapped), ``"memory"`` or ``"none"``
            (preprocessed again at every access; nothing is read here).
        cache_dir: folder of the stored cases; None: :func:`default_cache_dir` of the data set.
        distributed: the process group is initialised and every rank calls this.
        threads: cases preprocessed at once (None: the cores, at most 8).
        progress: a progress bar over the cases (rank 0 only).

    Returns:
        ``(train, val)`` prepared cases.

    Raises:
        DataError: the first bad case (one line naming the file), a channel-count mismatch.
        ValueError: an unknown ``cache``.
    """
    cache = look_up_option(cache, CACHE_MODES)
    check_channels(datalist.train + datalist.val, pre.in_channels)
    rank, _ = _rank(distributed)
    folder = None
    if cache == "disk":
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(datalist.root)
    items = datalist.train + datalist.val

    def prepare() -> PreparedCases:
        return prepare_cases(items, pre, n_classes, cache, folder, threads=threads, progress=progress and rank == 0)

    cases = staggered(prepare) if distributed and cache == "disk" else prepare()
    n = len(datalist.train)
    return _split(cases, 0, n), _split(cases, n, len(items))


def _split(cases: PreparedCases, start: int, stop: int) -> PreparedCases:
    """Cases ``start:stop`` of a :class:`PreparedCases`, as one of its own."""
    return PreparedCases(
        cases.items[start:stop], cases.pre, cases.mode,
        cases=None if cases._cases is None else cases._cases[start:stop],
        store=cases.store, keys=None if cases.keys is None else cases.keys[start:stop],
    )


def build_loaders(
    datalist: DataList,
    pre: Preprocessing,
    patch_size: Sequence[int] | int,
    n_classes: int,
    batch_size: int = 2,
    num_workers: int | str = 0,
    cache: str = "disk",
    cache_dir: PathLikeStr | None = None,
    num_samples: int = 1,
    distributed: bool = False,
    seed: int = 0,
    *,
    prepared: tuple[PreparedCases, PreparedCases] | None = None,
    oversample_foreground: float = 0.33,
    augment_on: str = "workers",
    prefetch_factor: int = 2,
    device_type: str | None = None,
    progress: bool = False,
    degradation: Degradation | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Builds the training loader (random patches of the preprocessed cases) and the validation loader (whole volumes).

    Args:
        datalist: cases from :func:`app.data.load_datalist`.
        pre: preprocessing settings (``pre.in_channels`` is checked against the image headers).
        patch_size: training patch ``(px, py, pz)`` or one size.
        n_classes: classes including background; must equal ``datalist.n_classes``.
        batch_size: training items per batch; a batch holds ``batch_size * num_samples`` patches.
        num_workers: loader worker processes, or ``"auto"`` (:func:`resolve_num_workers`); 0
            loads in the main process. Workers persist across epochs; batches are prefetched and,
            for a CUDA device, pinned.
        cache: ``"disk"`` (default: each case preprocessed once, stored under ``cache_dir`` keyed by
            its files' bytes and the settings, memory-mapped), ``"memory"`` (preprocessed once, kept
            in RAM) or ``"none"`` (preprocessed again at every access). The batches are the same.
        cache_dir: folder for ``"disk"``; None: :func:`default_cache_dir` of the data set.
        num_samples: patches cut from each drawn case.
        distributed: shard both loaders over the ``torch.distributed`` process group (initialised by
            the caller): training through :class:`~app.data.patches.SeededSampler`, validation without padding
            duplicates: volume ``i`` on rank ``i % world_size``, so a rank may have none when there
            are fewer volumes than ranks (reduce metrics across ranks).
        seed: seeds the shuffling, the patch positions and the augmentation.
        prepared: the ``(train, val)`` of :func:`prepare_datalist`, when the caller ran it already.
        oversample_foreground: share of patches centred on a labelled voxel (nnU-Net: 0.33).
        augment_on: ``"workers"`` (augmented in the loader) or ``"device"``: patches come
            unaugmented and ``train_loader.device_augmentation`` (an
            :class:`~app.data.patches.Augmentation`) is to be applied by the caller to each batch
            on its device, as ``device_augmentation.batch(image, label, batch["seed"])``.
        prefetch_factor: batches each worker loads ahead.
        device_type: the training device's type (``"cuda"``/``"cpu"``): pins memory for CUDA and
            sizes ``num_workers="auto"``; None: CUDA when available.
        progress: a progress bar while preprocessing (when ``prepared`` is None).
        degradation: the restoration task: no labels are read (``n_classes`` is not used),
            training items are degraded windows (``image``) with their clean originals
            (``label``), augmented geometrically in the workers
            (:class:`~app.data.patches.RestorationPatchDataset`); validation items are whole
            degraded clips with their clean originals. None (default): segmentation.

    Returns:
        ``(train_loader, val_loader)``. Training batches: ``image (B*num_samples, C, px, py, pz)``
        float32, ``label (B*num_samples, 1, px, py, pz)`` float32, ``seed (B*num_samples,)``.
        Validation batches: batch size 1, ``image (1, C, X, Y, Z)``, ``label (1, 1, X, Y, Z)``
        after preprocessing. With ``degradation``, ``label`` has the image's ``C`` channels.
        Clips (video files, frame folders) turn only in the frame plane ``(H, W)``: time is not
        rotated into space.

    Raises:
        DataError: no training cases, class count or channel count mismatch, a bad case.
        ValueError: bad ``cache``, ``augment_on`` or ``num_workers``, non-positive sizes, or
            ``distributed=True`` without an initialised process group.
    """
    cache = look_up_option(cache, CACHE_MODES)
    augment_on = look_up_option(augment_on, AUGMENT_ON)
    patch = normalize_patch_size(patch_size)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    workers = resolve_num_workers(num_workers, device_type)
    if batch_size < 1 or prefetch_factor < 1:
        raise ValueError(f"need batch_size >= 1 and prefetch_factor >= 1, got {batch_size=}, {prefetch_factor=}")
    if not datalist.train:
        raise data_error(datalist.root, "no training cases")
    if degradation is not None and augment_on == "device":
        raise ValueError("data.augment_on=device is not available for restoration (windows are degraded in the "
                         "loader workers, after their augmentation); use data.augment_on=workers")
    if degradation is None and n_classes < 2:
        raise ValueError(f"n_classes must be >= 2 (background included), got n_classes={n_classes}")
    if degradation is None and n_classes != datalist.n_classes:
        raise data_error(
            datalist.root,
            f"n_classes={n_classes} but the dataset has {datalist.n_classes} classes {datalist.class_names}",
        )
    rank, world = _rank(distributed)
    if prepared is None:
        prepared = prepare_datalist(datalist, pre, n_classes, cache, cache_dir, distributed=distributed, progress=progress)
    train_cases, val_cases = prepared

    clips = all(is_clip(it["image"]) for it in datalist.train + datalist.val)
    plane = ((1, 2) if patch[1] == patch[2] else None) if clips else rotation_plane(patch)
    if degradation is not None:
        geometric = Augmentation(plane=plane, scale_prob=0.0, shift_prob=0.0, noise_prob=0.0)
        train_ds: Any = RestorationPatchDataset(train_cases, patch, degradation, num_samples, geometric)
        val_ds: Any = RestorationVolumeDataset(val_cases, degradation, seed=seed)
        augmentation = geometric
    else:
        augmentation = Augmentation(plane=plane)
        train_ds = PatchDataset(train_cases, patch, n_classes, num_samples, oversample_foreground,
                                augmentation if augment_on == "workers" else None)
        val_ds = VolumeDataset(val_cases)
    pin = device_type == "cuda"
    train_sampler = SeededSampler(len(train_ds), seed=seed, num_replicas=world, rank=rank, shuffle=True)
    # every rank scores its share of the volumes, each volume once (a rank may get none)
    val_sampler = range(rank, len(val_ds), world) if distributed else None
    extra: dict[str, Any] = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if workers else {}
    train_loader = DataLoader(
        train_ds,
        batch_sampler=EpochBatches(train_sampler, batch_size),
        num_workers=workers,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_worker_init,
        **extra,
    )
    # Stored volumes are read in the main process (a memory-map read); recomputed ones in workers.
    val_workers = workers if prepared[1].mode == "none" else 0
    val_loader = DataLoader(
        val_ds,
        batch_size=1,
        shuffle=False,
        sampler=val_sampler,
        num_workers=val_workers,
        pin_memory=pin,
        worker_init_fn=_worker_init,
        **({"prefetch_factor": prefetch_factor, "persistent_workers": True} if val_workers else {}),
    )
    train_loader.device_augmentation = augmentation if augment_on == "device" else None
    return train_loader, val_loader
