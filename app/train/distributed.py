"""torch.distributed set-up for runs launched with ``torchrun`` (``WORLD_SIZE > 1``), on one machine
or several, and the collectives the training loop uses besides DDP's own: objects broadcast from
rank 0 or gathered from every rank, and the replica check of ``trainer.ddp_check_every``.

Everything here is addressed by the global rank (``RANK``); only the device comes from the rank on
the machine (``LOCAL_RANK``). The rendezvous (``MASTER_ADDR``/``MASTER_PORT``) is torchrun's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from app.utils import resolve_device

__all__ = [
    "DistInfo", "init_distributed", "barrier", "cleanup", "broadcast_object", "gather_object", "replica_fingerprint",
    "compare_replicas", "check_replicas",
]

log = logging.getLogger(__name__)


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


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable; ``obj`` itself without DDP)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without DDP)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers of its own width (floats reinterpreted, not converted)."""
    t = t.detach().reshape(-1)
    if t.is_floating_point():
        t = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def replica_fingerprint(model: nn.Module, sketch_state: Any = None) -> dict[str, Any]:
    """What must agree, and what must not, between the replicas of one model.

    Args:
        model: the network (unwrapped from DDP).
        sketch_state: this rank's sketch RNG state (``app.nn.probes.seed_state()``), or None.

    Returns:
        ``{"parameters": {name: int}, "sketch": str | None}``: per parameter the wrapping int64 sum
        of its bit patterns (one flipped bit anywhere changes it), computed on the parameter's
        device; and a digest of the sketch state.
    """
    names = [name for name, _ in model.named_parameters()]
    sums = torch.stack([_bits(p).to(torch.int64).sum() for _, p in model.named_parameters()]).cpu().tolist()
    digest = None if sketch_state is None else hashlib.sha256(repr(sketch_state).encode()).hexdigest()[:16]
    return {"parameters": dict(zip(names, sums)), "sketch": digest}


def compare_replicas(fingerprints: list[dict[str, Any]], step: int) -> str | None:
    """The first disagreement between the ranks' :func:`replica_fingerprint`, as one line, or None.

    The parameters must be identical on every rank; the sketch states (where given) must all differ,
    or the ranks would draw the same probes and their averaged weight gradient would carry one
    sketch's noise instead of the average of ``world_size`` independent ones.
    """
    first = fingerprints[0]["parameters"]
    for rank, fp in enumerate(fingerprints[1:], start=1):
        differ = [name for name, value in fp["parameters"].items() if first.get(name) != value]
        if differ or fp["parameters"].keys() != first.keys():
            shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            return (f"step {step}: rank {rank}'s parameters differ from rank 0's ({shown or 'other parameter names'}); "
                    "the replicas are no longer in step")
    digests = [fp["sketch"] for fp in fingerprints]
    if None not in digests and len(set(digests)) < len(digests):
        same = [r for r, d in enumerate(digests) if digests.count(d) > 1]
        return f"step {step}: ranks {same} hold the same sketch RNG state and would draw the same probes"
    return None


def check_replicas(info: DistInfo, model: nn.Module, step: int, sketch_state: Any = None) -> str | None:
    """``trainer.ddp_check_every``: gather every rank's :func:`replica_fingerprint`, compare them.

    Every rank gets the same verdict. Returns the problem (one line; the caller stops the run on
    every rank) or None; without DDP, None.
    """
    if not info.enabled:
        return None
    problem = compare_replicas(gather_object(info, replica_fingerprint(model, sketch_state)), step)
    if problem is None and info.is_main:
        log.info("step %d: replicas agree: %d ranks hold identical parameters%s", step, info.world_size,
                 " and draw their own sketches" if sketch_state is not None else "")
    return problem
