"""Training patches cut from preprocessed cases, with nnU-Net-style foreground oversampling and augmentation.

Every random choice of a training sample (which case, where its patches lie, how they are
augmented) comes from a seed that :class:`SeededSampler` draws from ``(seed, epoch)`` and hands
to the dataset with the case index. A sample therefore does not depend on the worker process
that makes it, on how many workers there are, on whether they persist between epochs, or on
where the preprocessed arrays live (disk, memory, recomputed): the same seed and epoch give the
same batches, and a resumed run redraws exactly the batches of the run it continues.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

from app.data.degrade import Degradation
from app.data.preprocess import PreparedCases, PreprocessedCase

__all__ = [
    "Augmentation",
    "PatchDataset",
    "RestorationPatchDataset",
    "RestorationVolumeDataset",
    "EpochBatches",
    "SeededSampler",
    "VolumeDataset",
    "crop_patch",
    "patch_corner",
]


class SeededSampler(DistributedSampler):
    """``DistributedSampler`` whose items are ``(index, seed)``: the case and the seed of all its randomness.

    The indices are torch's ``DistributedSampler``'s (a permutation of the cases drawn from
    ``seed + epoch``, padded to a multiple of ``num_replicas``, every ``num_replicas``-th from
    ``rank`` on), so the sharding over DDP ranks is torch's. The seeds come from
    ``np.random.SeedSequence([seed, epoch])``, one per position of the whole epoch, so a position
    gets the same seed on whichever rank takes it. Without DDP, ``num_replicas=1`` and ``rank=0``.
    Call :meth:`set_epoch` before each epoch.

    Args:
        n: number of cases.
        seed: the run's seed.
        num_replicas: processes sharing the epoch.
        rank: this process's rank.
        shuffle: permute the cases (True for training).
    """

    def __init__(self, n: int, seed: int = 0, num_replicas: int = 1, rank: int = 0, shuffle: bool = True) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)

    def __iter__(self):  # type: ignore[override]
        indices = list(super().__iter__())
        seeds = np.random.SeedSequence([int(self.seed), int(self.epoch)]).generate_state(self.total_size, dtype=np.uint64)
        mine = seeds[self.rank : self.total_size : self.num_replicas]
        return iter([(int(i), int(s)) for i, s in zip(indices, mine)])


RESTART_STRIDE = 100_003
"""An epoch that needs more batches than one pass of the cases holds goes on with the passes of
sampler epochs ``epoch + RESTART_STRIDE``, ``epoch + 2 · RESTART_STRIDE``, ... (never another epoch's)."""


class EpochBatches(Sampler[list]):
    """Batch sampler of a training loader: the batches of an epoch, or of epoch after epoch.

    Epoch ``e`` yields :attr:`per_epoch` batches: those of ``sampler``'s pass for epoch ``e`` (as
    torch's ``BatchSampler``, the pass's last batch may be short), then, when one pass holds fewer,
    those of its passes for :data:`RESTART_STRIDE`-shifted epochs. ``per_epoch=None`` makes an
    epoch one pass. An iterator begins with the epoch of :meth:`set_epoch`; with
    :attr:`endless`, epoch ``e + 1`` follows epoch ``e`` without end, so one ``DataLoader``
    iterator streams a whole run and its workers keep loading ahead across the ends of passes and
    epochs (and through validation) instead of starting again with an empty queue. The batches
    are those of a loader restarted at every pass.

    Args:
        sampler: the epoch's ``(index, seed)`` items (:class:`SeededSampler`).
        batch_size: items per batch.
        per_epoch: batches per epoch (the trainer's steps times gradient accumulation), or None.
        endless: iterate epoch after epoch (the trainer's stream) instead of one epoch.
    """

    def __init__(self, sampler: SeededSampler, batch_size: int, per_epoch: int | None = None,
                 endless: bool = False) -> None:
        self.sampler, self.batch_size, self.per_epoch, self.endless = sampler, int(batch_size), per_epoch, endless
        self.first_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The next iterator begins with epoch ``epoch``."""
        self.first_epoch = int(epoch)

    def __len__(self) -> int:
        """Batches of one pass over the cases."""
        return -(-len(self.sampler) // self.batch_size)

    def _pass(self, sampler_epoch: int) -> Iterator[list]:
        self.sampler.set_epoch(sampler_epoch)
        return iter(BatchSampler(self.sampler, self.batch_size, drop_last=False))

    def epoch(self, epoch: int) -> Iterator[list]:
        """The batches of ``epoch``."""
        produced, restart = 0, 0
        while True:
            for batch in self._pass(epoch + RESTART_STRIDE * restart):
                yield batch
                produced += 1
                if produced == self.per_epoch:
                    return
            if self.per_epoch is None or produced == 0:
                return
            restart += 1

    def __iter__(self) -> Iterator[list]:
        epoch = self.first_epoch
        while True:
            yield from self.epoch(epoch)
            if not self.endless:
                return
            epoch += 1


@dataclass(frozen=True)
class Augmentation:
    """Random flips on the three axes, a 90-degree turn, intensity scale and shift, Gaussian noise.

    The same distribution as MONAI's ``RandFlipd`` / ``RandRotate90d`` / ``RandScaleIntensityd`` /
    ``RandShiftIntensityd`` / ``RandGaussianNoised`` with the listed settings; implemented on torch
    tensors so it runs wherever the patch is (a loader worker, or the GPU). All choices come from
    one seed; the noise from a torch generator on the patch's device (CPU and CUDA noise differ).

    Attributes:
        plane: the axis pair of the 90-degree turns (``(0, 1)`` ...), None for none.
        flip_prob: chance of a flip, per axis.
        rotate_prob: chance of a turn by 90, 180 or 270 degrees.
        scale_prob / scale: chance of ``image * (1 + f)``, ``f`` uniform in ``[-scale, scale]``.
        shift_prob / shift: chance of ``image + o``, ``o`` uniform in ``[-shift, shift]``.
        noise_prob / noise_std: chance of noise with a standard deviation uniform in ``[0, noise_std]``.
    """

    plane: tuple[int, int] | None = (0, 1)
    flip_prob: float = 0.5
    rotate_prob: float = 0.5
    scale_prob: float = 0.5
    scale: float = 0.1
    shift_prob: float = 0.5
    shift: float = 0.1
    noise_prob: float = 0.15
    noise_std: float = 0.1

    def __call__(self, image: torch.Tensor, label: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments one patch.

        Args:
            image: ``(C, px, py, pz)``.
            label: ``(1, px, py, pz)``.
            seed: the seed of every choice.

        Returns:
            ``(image, label)``, new tensors on the same device.
        """
        rng = np.random.default_rng(int(seed))
        u = rng.random(7)
        k = int(rng.integers(1, 4))
        factor, offset, std = rng.uniform(-self.scale, self.scale), rng.uniform(-self.shift, self.shift), rng.uniform(0, self.noise_std)
        noise_seed = int(rng.integers(2**62))
        dims = [axis + 1 for axis in range(3) if u[axis] < self.flip_prob]
        if dims:
            image, label = torch.flip(image, dims), torch.flip(label, dims)
        if self.plane is not None and u[3] < self.rotate_prob:
            axes = (self.plane[0] + 1, self.plane[1] + 1)
            image, label = torch.rot90(image, k, axes), torch.rot90(label, k, axes)
        if u[4] < self.scale_prob:
            image = image * (1.0 + factor)
        if u[5] < self.shift_prob:
            image = image + offset
        if u[6] < self.noise_prob:
            gen = torch.Generator(device=image.device).manual_seed(noise_seed)
            image = image + std * torch.randn(image.shape, generator=gen, device=image.device, dtype=image.dtype)
        return image.contiguous(), label.contiguous()

    def batch(self, image: torch.Tensor, label: torch.Tensor, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augments each patch of a batch ``(B, C, ...)`` / ``(B, 1, ...)`` with its seed ``seeds[b]``."""
        pairs = [self(image[b], label[b], int(s)) for b, s in enumerate(seeds.tolist())]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def patch_corner(
    case: PreprocessedCase,
    patch: Sequence[int],
    rng: np.random.Generator,
    oversample_foreground: float,
    n_classes: int | None = None,
) -> np.ndarray:
    """The lower corner of a random patch (may be negative, or reach past the end: padded there).

    With chance ``oversample_foreground`` the patch is centred on a voxel of a foreground class
    (a class drawn uniformly among those present, then one of its stored voxels), else its corner
    is uniform over the positions that keep it inside the volume (or, along an axis shorter than
    the patch, that keep the volume inside it). nnU-Net oversamples a third of its patches this way.

    Args:
        case: the preprocessed case.
        patch: ``(px, py, pz)``.
        rng: the sample's generator.
        oversample_foreground: chance of a foreground-centred patch, in [0, 1].
        n_classes: classes considered (labels ``1..n_classes-1``); None: all.

    Returns:
        ``(3,)`` int64 corner.
    """
    shape = np.asarray(case.shape)
    size = np.asarray(patch)
    low, high = np.minimum(0, shape - size), np.maximum(0, shape - size)
    forced = rng.random() < oversample_foreground
    classes = [i for i, locs in enumerate(case.locations) if len(locs) and (n_classes is None or i + 1 < n_classes)]
    if forced and classes:
        locs = case.locations[classes[int(rng.integers(len(classes)))]]
        centre = locs[int(rng.integers(len(locs)))].astype(np.int64)
        return np.clip(centre - size // 2, low, high)
    return np.array([int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high)], dtype=np.int64)


def crop_patch(array: np.ndarray, corner: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """``array[:, c0:c0+p0, ...]`` of a ``(C, X, Y, Z)`` array, zero outside it; reads only the patch's voxels.

    Returns:
        A new ``(C, px, py, pz)`` array of ``array``'s dtype.
    """
    out = np.zeros((array.shape[0], *patch), dtype=array.dtype)
    src, dst = [slice(None)], [slice(None)]
    for c, p, s in zip(corner, patch, array.shape[1:]):
        a, b = max(int(c), 0), min(int(c) + int(p), int(s))
        src.append(slice(a, b))
        dst.append(slice(a - int(c), b - int(c)))
    out[tuple(dst)] = array[tuple(src)]
    return out


class _SeededPatches(Dataset):
    """Patches cut from prepared cases, each item seeded by the index pair :class:`SeededSampler` yields."""

    def __init__(self, cases: PreparedCases, patch_size: Sequence[int], num_samples: int,
                 augmentation: Augmentation | None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got num_samples={num_samples}")
        self.cases = cases
        self.patch = tuple(int(p) for p in patch_size)
        self.num_samples = num_samples
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.cases)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> _SeededPatches:
        """No state to seed (MONAI's loaders call this): each item carries its own seed."""
        return self


class PatchDataset(_SeededPatches):
    """Random training patches; items are ``(index, seed)`` pairs from :class:`SeededSampler`.

    Args:
        cases: the preprocessed training cases.
        patch_size: ``(px, py, pz)``.
        n_classes: classes including background.
        num_samples: patches per item (the loader flattens them into the batch).
        oversample_foreground: chance of a foreground-centred patch (see :func:`patch_corner`).
        augmentation: applied here (in the loader's workers); None leaves the patches as cut
            (for augmentation on the GPU: :meth:`Augmentation.batch` with the batch's ``seed``).

    Returns (per item):
        A list of ``num_samples`` dicts: ``image (C, px, py, pz)`` float32, ``label (1, px, py, pz)``
        float32, ``seed`` (int64 scalar, the augmentation seed).
    """

    def __init__(
        self,
        cases: PreparedCases,
        patch_size: Sequence[int],
        n_classes: int,
        num_samples: int = 1,
        oversample_foreground: float = 0.33,
        augmentation: Augmentation | None = None,
    ) -> None:
        if not 0.0 <= oversample_foreground <= 1.0:
            raise ValueError(f"oversample_foreground must be in [0, 1], got oversample_foreground={oversample_foreground}")
        super().__init__(cases, patch_size, num_samples, augmentation)
        self.n_classes = n_classes
        self.oversample_foreground = float(oversample_foreground)

    def __getitem__(self, item: tuple[int, int] | int) -> list[dict[str, torch.Tensor]]:
        index, seed = item if isinstance(item, tuple) else (int(item), 0)
        case = self.cases.case(index)
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(self.num_samples):
            corner = patch_corner(case, self.patch, rng, self.oversample_foreground, self.n_classes)
            aug_seed = int(rng.integers(2**62))
            image = torch.from_numpy(crop_patch(case.image, corner, self.patch))
            label = torch.from_numpy(crop_patch(case.label, corner, self.patch).astype(np.float32))
            if self.augmentation is not None:
                image, label = self.augmentation(image, label, aug_seed)
            out.append({"image": image, "label": label, "seed": torch.tensor(aug_seed, dtype=torch.int64)})
        return out


class VolumeDataset(Dataset):
    """Whole preprocessed volumes, for validation: ``image (C, X, Y, Z)`` float32, ``label (1, X, Y, Z)`` float32."""

    def __init__(self, cases: PreparedCases) -> None:
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case = self.cases.case(int(index))
        return {"image": torch.from_numpy(np.array(case.image, dtype=np.float32)),
                "label": torch.from_numpy(np.array(case.label, dtype=np.float32))}


class RestorationPatchDataset(_SeededPatches):
    """Random training windows for restoration; items are ``(index, seed)`` pairs from :class:`SeededSampler`.

    A window is cut from the clean clip (uniformly: there are no labels to oversample), augmented
    geometrically (flips, turns; no intensity changes, which would make the target ambiguous), then
    degraded into the input.

    Args:
        cases: the preprocessed training clips (values in [0, 1]).
        patch_size: ``(T, H, W)`` of a window.
        degradation: makes the input from the clean window.
        num_samples: windows per item.
        augmentation: geometric augmentation of the clean window; None for none.

    Returns (per item):
        A list of ``num_samples`` dicts: ``image (C, T, H, W)`` the degraded window, ``label (C, T, H, W)``
        the clean one (float32), ``seed`` (int64 scalar).
    """

    def __init__(
        self,
        cases: PreparedCases,
        patch_size: Sequence[int],
        degradation: Degradation,
        num_samples: int = 1,
        augmentation: Augmentation | None = None,
    ) -> None:
        super().__init__(cases, patch_size, num_samples, augmentation)
        self.degradation = degradation

    def __getitem__(self, item: tuple[int, int] | int) -> list[dict[str, torch.Tensor]]:
        index, seed = item if isinstance(item, tuple) else (int(item), 0)
        case = self.cases.case(index)
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(self.num_samples):
            corner = patch_corner(case, self.patch, rng, 0.0)
            aug_seed, noise_seed = (int(v) for v in rng.integers(2**62, size=2))
            clean = torch.from_numpy(crop_patch(case.image, corner, self.patch))
            if self.augmentation is not None:
                clean, _ = self.augmentation(clean, clean[:1], aug_seed)
            degraded = torch.from_numpy(self.degradation(clean.numpy(), noise_seed))
            out.append({"image": degraded, "label": clean, "seed": torch.tensor(aug_seed, dtype=torch.int64)})
        return out


class RestorationVolumeDataset(Dataset):
    """Whole clips for restoration validation: ``image`` degraded, ``label`` clean, both ``(C, T, H, W)`` float32.

    Clip ``i`` is degraded with seed ``seed + i`` once and kept, so every validation scores the same inputs.
    """

    def __init__(self, cases: PreparedCases, degradation: Degradation, seed: int = 0) -> None:
        self.cases = cases
        self.degradation = degradation
        self.seed = int(seed)
        self._degraded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        clean = np.array(self.cases.case(index).image, dtype=np.float32)
        if index not in self._degraded:
            self._degraded[index] = self.degradation(clean, self.seed + index)
        return {"image": torch.from_numpy(self._degraded[index]), "label": torch.from_numpy(clean)}
