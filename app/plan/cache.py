"""The calibration cache: measured training steps, kept in a JSON file so repeated plans are instant.

Measuring one candidate patch costs a few training steps; a planner run measures about ten of
them per variant. The results are stored in one JSON file, by default
``$STOCHPROP_PLAN_CACHE`` or else ``$XDG_CACHE_HOME/stochprop/plan_cache.json``
(``~/.cache/stochprop/plan_cache.json``). ``python -m app.plan --cache PATH`` and
``--no-cache`` choose another file or none; deleting the file forgets everything.

An entry is keyed by what decides the memory of a step, as a SHA-256 of its canonical JSON:

* the resolved model config for the patch (every constructor argument, so a DynUNet re-planned
  for another patch is another network), the patch size and the batch size;
* the variant's canonical name, ``n_probes`` and the ``app.nn.convert`` options;
* the device name (``NVIDIA H200``, ``cpu (x86_64)``) and the torch version;
* whether steps were timed (the CPU planner only counts saved bytes);
* :data:`CACHE_VERSION`, raised whenever the measurement itself changes.

The value is the :class:`app.measure.StepStats` plus ``cap_bytes``, the allocator cap the
step ran under (``null``: the whole device). Only ``ok`` and ``oom`` results are stored (a
crash is not a property of the network). How a stored result answers
"does it fit in B bytes?" (:meth:`CalibrationCache.lookup`):

* ``ok`` with peak ``P``: fits iff ``P <= B``, whatever cap it ran under;
* ``oom`` under cap ``C``: does not fit for any ``B <= C``; for ``B > C`` it is measured again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from app.measure import GIB, OK, OOM, StepStats, model_config_for_patch
from app.utils import atomic_path

__all__ = ["CACHE_ENV", "CACHE_VERSION", "CalibrationCache", "cache_key", "default_cache_path"]

CACHE_ENV = "STOCHPROP_PLAN_CACHE"
# Raise when measure_step changes what it measures (optimizer, loss, warm-up rule, ...).
CACHE_VERSION = 2


def default_cache_path() -> Path:
    """``$STOCHPROP_PLAN_CACHE``, else ``$XDG_CACHE_HOME/stochprop/plan_cache.json``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "stochprop" / "plan_cache.json"


def cache_key(
    *,
    model_config: Mapping[str, Any],
    device: str,
    variant: str,
    patch_size: tuple[int, ...],
    batch_size: int,
    n_probes: int,
    sketch_options: Mapping[str, Any] | None = None,
    timed: bool = True,
) -> tuple[str, dict[str, Any]]:
    """``(hash, fields)`` of one measurement; ``fields`` is stored next to the result for humans.

    ``model_config`` is resolved for ``patch_size`` here (:func:`app.measure.model_config_for_patch`,
    the network :func:`app.measure.measure_step` builds), so the planner and ``python -m app.bench
    memory``, which share the cache, key a measurement the same way.
    """
    fields = {
        "version": CACHE_VERSION,
        "model_config": model_config_for_patch(model_config, patch_size),
        "device": device,
        "torch": torch.__version__,
        "variant": variant,
        "patch_size": [int(p) for p in patch_size],
        "batch_size": int(batch_size),
        "n_probes": int(n_probes) if "stochastic" in variant else 0,
        "sketch_options": dict(sketch_options or {}) if ("stochastic" in variant or "lean" in variant) else {},
        "timed": bool(timed),  # False: saved bytes only (no step, no time, no peak)
    }
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), fields


class CalibrationCache:
    """Measured steps in a JSON file (see the module docstring). ``path=None``: in memory only.

    Every :meth:`store` re-reads the file and replaces it atomically, so two planners sharing a
    file lose nothing but a race's last entry.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        self._entries: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # an unreadable cache is an empty one; it is rewritten on the next store
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        entries = data.get("entries", {})
        return entries if isinstance(entries, dict) else {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, budget_bytes: float | None) -> StepStats | None:
        """The stored result if it answers "fits in ``budget_bytes``?" (None: whole device), else None.

        A stored success whose peak exceeds the budget is returned as ``status="oom"``.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        stats = StepStats.from_dict(entry["stats"])
        cap = entry.get("cap_bytes")
        if stats.status == OK:
            if budget_bytes is not None and not math.isnan(stats.peak_bytes) and stats.peak_bytes > budget_bytes:
                stats.status = OOM
                stats.reason = f"measured peak {stats.peak_bytes / GIB:.2f} GiB is over the budget (cached)"
            return stats
        if stats.status == OOM and (cap is None or (budget_bytes is not None and budget_bytes <= cap)):
            return stats
        return None

    def store(self, key: str, fields: Mapping[str, Any], stats: StepStats, cap_bytes: float | None) -> None:
        """Remember an ``ok`` or ``oom`` result (others are ignored) and rewrite the file."""
        if stats.status not in (OK, OOM):
            return
        self._entries.update(self._read())
        self._entries[key] = {"key": dict(fields), "stats": stats.to_dict(), "cap_bytes": cap_bytes}
        if self.path is None:
            return
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": self._entries}, indent=1, sort_keys=True, default=str))
