"""Work that several ``torch.distributed`` processes must not do at once, on one machine or several."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

__all__ = ["staggered"]

T = TypeVar("T")


def staggered(fn: Callable[[], T]) -> T:
    """``fn()`` on every process of the initialised process group, in three waves: global rank 0,
    then the first process of every other machine (``LOCAL_RANK`` 0), then all the others.

    For work that fills a folder the later processes reuse (a generated data set, a preprocessing
    cache): on a file system that every machine shares, rank 0 does the work and everyone else
    finds it done; on machine-local disks one process per machine does it, and no two processes of
    one machine write at the same time. Every process takes part in all three waves (three
    barriers), also when ``fn`` raises in it; the exception is raised after the last barrier, so
    the others never wait for a process that has left. Without an initialised group: ``fn()``.

    Args:
        fn: the work; called once in every process.

    Returns:
        What ``fn`` returned in this process.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    wave = 0 if dist.get_rank() == 0 else 1 if int(os.environ.get("LOCAL_RANK", "0")) == 0 else 2
    result: T | None = None
    error: BaseException | None = None
    for turn in range(3):
        if turn == wave:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001  raised below, once every wave has passed
                error = exc
        dist.barrier()
    if error is not None:
        raise error
    return result  # type: ignore[return-value]
