"""torch.distributed set-up for runs launched with ``torchrun`` (``WORLD_SIZE > 1``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from app.utils import resolve_device

__all__ = ["DistInfo", "init_distributed", "barrier", "cleanup"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank``/``world_size`` (0/1 without DDP) and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when launched by ``torchrun`` with more than one process.

    Uses NCCL on CUDA devices and Gloo on the CPU; each process takes the GPU of its
    ``LOCAL_RANK``. Without ``WORLD_SIZE > 1`` nothing is initialised.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, option="trainer.device")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op without DDP)."""
    if info.enabled and dist.is_initialized():
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group if this module joined one."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
