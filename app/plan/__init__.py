"""Patch-size planning by measurement: ``python -m app.plan`` (``stochprop-plan``).

* :func:`measure_step`: one training step's peak memory, time and bytes saved for backward;
* :func:`plan_patch_size` / :func:`plan`: the largest patch within a memory budget, per variant
  (measured on a GPU, estimated from saved bytes on the CPU), with a calibration cache;
* variants (``exact``, ``amp``, ``ckpt``, ``stochastic``, ``lean`` and ``+`` combinations):
  :mod:`app.plan.variants`.

Imports torch, MONAI, ``app.nn`` and ``app.models`` only (``app.train`` lazily, for ``ckpt``).
"""

from app.plan.cache import CACHE_ENV, CalibrationCache, default_cache_path
from app.plan.measure import GIB, StepStats, measure_step, memory_cap
from app.plan.planner import (
    CALIBRATION_FACTORS,
    DEFAULT_CALIBRATION_FACTOR,
    STATE_BYTES_PER_PARAMETER_BYTE,
    PlanResult,
    calibration_factor,
    candidate_patches,
    plan,
    plan_patch_size,
    required_divisor,
    search_largest,
)
from app.plan.variants import (
    COMPONENTS,
    Variant,
    lean_available,
    parse_variant,
    training_variant,
)

__all__ = [
    "CACHE_ENV",
    "CALIBRATION_FACTORS",
    "COMPONENTS",
    "DEFAULT_CALIBRATION_FACTOR",
    "GIB",
    "STATE_BYTES_PER_PARAMETER_BYTE",
    "CalibrationCache",
    "PlanResult",
    "StepStats",
    "Variant",
    "calibration_factor",
    "candidate_patches",
    "default_cache_path",
    "lean_available",
    "measure_step",
    "memory_cap",
    "parse_variant",
    "plan",
    "plan_patch_size",
    "required_divisor",
    "search_largest",
    "training_variant",
]
