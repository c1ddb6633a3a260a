"""Counting the bytes autograd keeps for the backward pass (device independent)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch


class SavedTensorCounter:
    """Context manager summing the storage bytes of every tensor saved for backward.

    Storages are counted once (views and re-saves of one tensor share a storage). Tensors whose
    storage belongs to ``ignore`` (e.g. ``model.parameters()``) are not counted.

    Example:
        >>> with SavedTensorCounter(ignore=model.parameters()) as saved:
        ...     loss = model(x).sum()
        >>> saved.bytes
    """

    def __init__(self, ignore: Optional[Iterable[torch.Tensor]] = None) -> None:
        self._ignore = {t.untyped_storage().data_ptr() for t in (ignore or ())}
        self._seen: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._ignore:
            self._seen[(str(t.device), ptr)] = storage.nbytes()
        # Not ``t`` itself: when ``t`` is the op's own output, the graph would hold its output
        # (and that its grad_fn) through C++, a cycle Python's gc cannot see, and the whole
        # forward graph would never be freed. A detached alias has the same storage and no grad_fn.
        return t.detach()

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
