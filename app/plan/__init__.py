"""Patch-size planning by measurement: ``python -m app.plan`` (``stochprop-plan``).

* :func:`plan_patch_size` / :func:`plan`: the largest patch within a memory budget, per variant
  (measured with :func:`app.measure.measure_step` on a GPU, estimated from saved bytes on the
  CPU), with a calibration cache (:mod:`app.plan.cache`).

Imports :mod:`app.measure`, :mod:`app.models`, :mod:`app.nn` and :mod:`app.utils` only.
"""

from app.plan.cache import CACHE_ENV, CalibrationCache, cache_key, default_cache_path
from app.plan.planner import (
    CALIBRATION_FACTORS,
    DEFAULT_CALIBRATION_FACTOR,
    STATE_BYTES_PER_PARAMETER_BYTE,
    PlanResult,
    calibration_factor,
    candidate_patches,
    default_budget_gib,
    plan,
    plan_patch_size,
    required_divisor,
    search_largest,
)

__all__ = [
    "CACHE_ENV",
    "CALIBRATION_FACTORS",
    "DEFAULT_CALIBRATION_FACTOR",
    "STATE_BYTES_PER_PARAMETER_BYTE",
    "CalibrationCache",
    "PlanResult",
    "cache_key",
    "calibration_factor",
    "candidate_patches",
    "default_budget_gib",
    "default_cache_path",
    "plan",
    "plan_patch_size",
    "required_divisor",
    "search_largest",
]
