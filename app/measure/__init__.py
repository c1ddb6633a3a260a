"""One training step, measured: time, peak device memory, bytes saved for backward.

The leaf that :mod:`app.bench`, :mod:`app.plan` and the trainer share:

* :func:`measure_step` / :class:`StepStats`: one real training step of a network under a variant;
* variants (``exact``, ``amp``, ``fp16``, ``ckpt``, ``stochastic``, ``lean`` and ``+``
  combinations): :mod:`app.measure.variants`;
* timing and peak helpers (:mod:`app.measure.timing`) and report helpers: environment line,
  markdown tables (:mod:`app.measure.report`).

Imports torch, MONAI, :mod:`app.nn`, :mod:`app.models` and :mod:`app.utils` only.
"""

from app.measure.report import GIB, MIB, environment, environment_info, markdown_table
from app.measure.step import (
    ERROR,
    OK,
    OOM,
    StepStats,
    TrainingStep,
    build_variant_model,
    device_name,
    free_memory,
    is_out_of_memory,
    measure_step,
    memory_cap,
    model_config_for_patch,
)
from app.measure.timing import median_time, peak_since, reset_peak, synchronize, timed_calls
from app.measure.variants import COMPONENTS, Variant, parse_variant, training_variant

__all__ = [
    "COMPONENTS",
    "ERROR",
    "GIB",
    "MIB",
    "OK",
    "OOM",
    "StepStats",
    "TrainingStep",
    "Variant",
    "build_variant_model",
    "device_name",
    "environment",
    "environment_info",
    "free_memory",
    "is_out_of_memory",
    "markdown_table",
    "measure_step",
    "median_time",
    "memory_cap",
    "model_config_for_patch",
    "parse_variant",
    "peak_since",
    "reset_peak",
    "synchronize",
    "timed_calls",
    "training_variant",
]
