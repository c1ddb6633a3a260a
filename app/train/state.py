"""Random state of a training run: seeding, and RNG snapshots a checkpoint can hold.

Every epoch starts from RNG streams derived from ``(seed, epoch, rank)`` (torch, numpy,
Python ``random``, the sketch RNG of :mod:`app.nn`, MONAI's random transforms, the
DataLoader's shuffling), so epoch ``e`` draws the same patches and probes whether the run
went through without a stop or was resumed from the checkpoint of epoch ``e - 1``.
The RNG states themselves are also stored in checkpoints (as plain tensors and lists,
loadable with ``weights_only=True``), one snapshot per rank under DDP, and each rank restores its
own on resume (:func:`rank_rng`); a rank the checkpoint holds none for (a run resumed with more
processes than it had) starts fresh streams of its own (:func:`restore_rank_rng`), never another
rank's, so the ranks keep drawing different probes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.data.utils import set_rnd
from monai.utils import set_determinism
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import app.nn
from app.data.patches import EpochBatches
from app.nn.probes import seed_state, set_seed_state

__all__ = ["derive_seed", "seed_everything", "seed_epoch", "rng_state", "set_rng_state", "rank_rng", "restore_rank_rng"]


def derive_seed(*keys: int) -> int:
    """A 31-bit seed mixed from integer keys (numpy ``SeedSequence``: no correlated streams)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] & 0x7FFFFFFF)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed torch (all devices), numpy, ``random`` (via MONAI's ``set_determinism``) and app.nn.

    Args:
        seed: the seed.
        deterministic: keep cuDNN on deterministic kernels (MONAI's choice); False lets it use
            its default (faster, non-deterministic) kernels. cuDNN's autotuner (``benchmark``)
            stays off either way: its trial workspaces would inflate the peak memory that runs
            report. Default False.
    """
    set_determinism(seed=seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    app.nn.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, rank: int, loader: DataLoader) -> None:
    """Reseed every random stream for ``epoch`` of process ``rank``.

    Args:
        seed: the run's seed (``trainer.seed``).
        epoch: 0-based epoch about to start.
        rank: the process rank under DDP (0 otherwise).
        loader: the training loader: its sampler, generator and the random transforms of
            its dataset are reseeded as well.
    """
    s = derive_seed(seed, epoch, rank)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    app.nn.manual_seed(s)
    for sampler in (loader.batch_sampler, loader.sampler):
        if isinstance(sampler, (EpochBatches, DistributedSampler)):
            sampler.set_epoch(epoch)
            break
    if loader.generator is not None:
        loader.generator.manual_seed(s)
    # With worker processes MONAI reseeds the transforms per worker from the loader's
    # seed; in the main process they keep their own numpy RandomState: reseed it here.
    set_rnd(loader.dataset, derive_seed(seed, epoch, rank, 1))


def rng_state() -> dict[str, Any]:
    """Snapshot of the torch (CPU and CUDA), numpy, Python and sketch (:mod:`app.nn`) RNGs as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    s_version, s_internal, s_gauss = seed_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "sketch": {"version": s_version, "internal": list(s_internal), "gauss_next": s_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot taken by :func:`rng_state` (CUDA states only where devices match)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    s = state.get("sketch")  # optional: checkpoints without it still load
    if s is not None:
        set_seed_state((s["version"], tuple(s["internal"]), s["gauss_next"]))


def rank_rng(ckpt: Mapping[str, Any], rank: int) -> dict[str, Any] | None:
    """The RNG snapshot of ``rank`` in a checkpoint, or None when it holds none for that rank.

    A checkpoint written under DDP in the middle of an epoch holds every rank's (``rng_by_rank``);
    others hold rank 0's only (``rng``).
    """
    by_rank = ckpt.get("rng_by_rank")
    if by_rank:
        return by_rank[rank] if rank < len(by_rank) else None
    return ckpt.get("rng") if rank == 0 else None


def restore_rank_rng(state: dict[str, Any] | None, seed: int, epoch: int, rank: int, step: int) -> None:
    """Restore ``state`` (from :func:`rank_rng`); None: seed torch, numpy, ``random`` and the sketch
    RNG from ``(seed, epoch, rank, step)`` instead, streams no other rank draws from."""
    if state is not None:
        set_rng_state(state)
        return
    s = derive_seed(seed, epoch, rank, step, 2)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    app.nn.manual_seed(s)
