"""Counting memory: the bytes autograd keeps for the backward pass (device independent), and the
peak of what torch allocates inside a block of code (on the CPU too, where ``torch.cuda``'s
counters do not exist)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


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


class PeakMemory:
    """Context manager: the peak of the bytes torch allocates on ``device`` inside the block.

    Runs ``torch.profiler`` with ``profile_memory=True``, which records every allocation and free
    of torch's allocators with its time and size. Summed in time order, they give the bytes
    allocated since entry at every instant: ``peak_bytes`` is the largest value (a tensor that
    existed before the block and is freed inside counts negatively), ``end_bytes`` the value at
    exit. It measures what ``torch.cuda.max_memory_allocated`` measures, on any device, at the cost
    of profiling the block; it reads the profiler's event tree (the records torch's own memory
    timeline is built from).

    Args:
        device: device type whose allocations count. Default ``"cpu"`` (on CUDA,
            ``torch.cuda.max_memory_allocated`` needs no profiler).

    Example:
        >>> y = layer(x)
        >>> with PeakMemory() as mem:
        ...     y.backward(grad)
        >>> mem.peak_bytes / x.nbytes  # peak of the backward pass in multiples of the input
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.peak_bytes = 0
        self.end_bytes = 0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        self._profile = profile(activities=activities, profile_memory=True)

    def __enter__(self) -> "PeakMemory":
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        events: list[tuple[int, int]] = []
        stack = list(self._profile.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == self.device:
                events.append((event.start_time_ns, event.extra_fields.alloc_size))
        current = peak = 0
        for _, size in sorted(events, key=lambda e: e[0]):
            current += size
            peak = max(peak, current)
        self.peak_bytes, self.end_bytes = peak, current
