"""The largest training patch that fits a memory budget, by measurement (nnU-Net's planner, measured).

nnU-Net derives the patch size from a memory budget with a calibrated formula. Here the formula
is replaced by the thing itself where a GPU is present: for each candidate patch the planner runs
real training steps (:func:`app.measure.measure_step`) under the budget
(``torch.cuda.set_per_process_memory_fraction``) and keeps the largest one that runs. Candidates:

* every axis a multiple of the network's required divisor (:func:`required_divisor`: the
  product of a DynUNet plan's strides, ``2**depth`` for MONAI's UNet, ...);
* cubic for isotropic spacing; for anisotropic spacing the edge along an axis shrinks with its
  spacing (``edge * min(spacing) / spacing[d]``), so the patch covers a cube of physical space;
* at most ``max_edge`` voxels along the finest axis, and at most the data's shape if known.

Peak memory grows with the patch, so :func:`search_largest` finds the largest candidate with
exponential growth then bisection: about ``2 log2(n)`` measurements among ``n`` candidates.
Results go to the calibration cache (:mod:`app.plan.cache`), so a second plan is instant.

Without a GPU, nothing can be measured: the planner then *estimates* the peak from the
device-independent bytes saved for backward, counted on the CPU at two small reference patches
(``reference_edge`` and the next candidate) and fitted as ``saved = a + b * voxels``:
``peak ~ calibration_factor(variant) * saved(voxels) + STATE_BYTES_PER_PARAMETER_BYTE * parameter_bytes``. The result says ``estimated=True`` and the CLI says so in words.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from app.models import build_model, plan_dynunet, resolve_model_config
from app.nn import DEFAULT_N_PROBES
from app.utils import resolve_device
from app.plan.cache import CalibrationCache, cache_key, default_cache_path
from app.measure import GIB, OK, OOM, StepStats, Variant, device_name, measure_step, model_config_for_patch, parse_variant

__all__ = [
    "CALIBRATION_FACTORS",
    "DEFAULT_CALIBRATION_FACTOR",
    "STATE_BYTES_PER_PARAMETER_BYTE",
    "PlanResult",
    "calibration_factor",
    "candidate_patches",
    "default_budget_gib",
    "plan",
    "plan_patch_size",
    "required_divisor",
    "search_largest",
]

# Peak device memory of a training step, less the parameter state, divided by the bytes its forward
# pass saves for backward: the CPU planner's calibration, per variant. The peak also holds what is
# not saved for backward (the gradient being back-propagated, the forward's transient outputs and
# the skip tensors, torch.cat copies), so the factor is above 1, and far above 1 when little is
# saved (ckpt, lean). On CUDA, `python -m app.bench memory` prints it per row ("calib" column);
# CALIBRATION_FACTORS holds the H200 figures of the default DynUNet at 256^3 (docs/benchmarks.md,
# "Memory: peak and step time on the H200"; default sketch). DEFAULT_CALIBRATION_FACTOR (variants not listed) is the exact one.
CALIBRATION_FACTORS: dict[str, float] = {
    "exact": 1.27, "amp": 1.24, "ckpt": 3.85, "stochastic": 1.34,
    "stochastic+lean": 3.02, "stochastic+lean+amp": 2.34, "stochastic+lean+ckpt": 4.98,
}
DEFAULT_CALIBRATION_FACTOR = 1.27
# Weights, their gradients and AdamW's two moment buffers: 4x the parameter bytes.
STATE_BYTES_PER_PARAMETER_BYTE = 4


def calibration_factor(variant: str | Variant) -> float:
    """Peak bytes per saved byte of ``variant`` (:data:`CALIBRATION_FACTORS`, else the default)."""
    return CALIBRATION_FACTORS.get(parse_variant(variant).name, DEFAULT_CALIBRATION_FACTOR)


def _axis_divisor(strides: Sequence[Any], ndim: int) -> list[int]:
    div = [1] * ndim
    for s in strides:
        per_axis = [int(s)] * ndim if isinstance(s, (int, float)) else [int(v) for v in s]
        div = [a * b for a, b in zip(div, per_axis)]
    return div


def required_divisor(model_cfg: Mapping[str, Any], spacing: Sequence[float], max_edge: int = 512) -> list[int]:
    """Per axis, a number every candidate patch size is a multiple of, so the network takes it.

    For a DynUNet planned from the patch (no explicit ``strides``) this is the divisor of the
    deepest plan any candidate up to ``max_edge`` gets: a power of two per axis, which every
    shallower plan's divisor divides.
    """
    ndim = len(spacing)
    name = str(model_cfg.get("name", "dynunet")).lower()
    if name == "dynunet" and model_cfg.get("strides") is None:
        keys = ("min_feature_size", "max_depth", "base_features", "max_features")
        finest = min(spacing)
        largest = [max(1, int(max_edge * finest / s)) for s in spacing]
        return plan_dynunet(largest, spacing, **{k: model_cfg[k] for k in keys if k in model_cfg}).divisor
    cfg = dict(model_cfg)
    cfg.setdefault("patch_size", None)
    if name == "dynunet":
        return _axis_divisor(cfg["strides"], ndim)
    resolved = resolve_model_config({**cfg, "patch_size": None})
    if name == "unet":
        return _axis_divisor(resolved["strides"], ndim)
    if name == "basicunet":
        return [16] * ndim
    if name == "segresnet":
        return [2 ** (len(resolved["blocks_down"]) - 1)] * ndim
    return [1] * ndim


def candidate_patches(
    divisor: Sequence[int],
    spacing: Sequence[float],
    *,
    max_edge: int = 512,
    max_shape: Sequence[int] | None = None,
    edge_step: int | None = None,
) -> list[tuple[int, ...]]:
    """Increasing candidate patches (see the module docstring); each axis a multiple of ``divisor``.

    Args:
        divisor: per axis, what each size must be a multiple of.
        spacing: voxel spacing per axis (anisotropic: coarse axes get proportionally fewer voxels).
        max_edge: largest size along the finest axis.
        max_shape: per axis, no candidate exceeds this (rounded up to the divisor); e.g. the
            data's median shape, as nnU-Net caps its patch.
        edge_step: coarser steps along the finest axis: multiples of ``lcm(divisor, edge_step)``
            (default: the divisor).

    Returns:
        Candidates, each at least as large as the previous one on every axis and larger on one.
    """
    if len(divisor) != len(spacing):
        raise ValueError(f"divisor {list(divisor)} and spacing {list(spacing)} need one value per axis")
    finest = min(spacing)
    rel = [finest / float(s) for s in spacing]
    step = max(d for d, r in zip(divisor, rel) if r == 1.0)
    if edge_step is not None:
        step = math.lcm(step, int(edge_step))
    cap = [math.inf] * len(divisor)
    if max_shape is not None:
        cap = [math.ceil(m / d) * d for m, d in zip(max_shape, divisor)]
    out: list[tuple[int, ...]] = []
    for edge in range(step, max_edge + 1, step):
        patch = tuple(
            int(min(c, max(d, round(edge * r / d) * d))) for d, r, c in zip(divisor, rel, cap)
        )
        if not out or patch != out[-1]:
            out.append(patch)
    return out


def search_largest(n: int, fits: Callable[[int], bool]) -> int:
    """Index of the largest of ``n`` candidates that fits, for ``fits`` monotone (True then False).

    Exponential growth (indices 0, 1, 3, 7, ...) until a candidate fails, then bisection between
    the last that fitted and the first that failed: ``O(log n)`` calls of ``fits``, each index
    asked at most once.

    Returns:
        The index, or ``-1`` when not even candidate 0 fits.
    """
    if n <= 0 or not fits(0):
        return -1
    lo, step, hi = 0, 1, None
    while hi is None:
        nxt = min(lo + step, n - 1)
        if nxt == lo:
            return lo
        if fits(nxt):
            lo, step = nxt, step * 2
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _trainable(model_cfg: Mapping[str, Any], patch: Sequence[int], divisor: Sequence[int], spacing: Sequence[float]) -> bool:
    """Whether a network for ``patch`` can train: a planned DynUNet needs three stages (MONAI's minimum); other nets
    need at least 2 voxels per axis at their coarsest level (instance norm of one voxel fails)."""
    name = str(model_cfg.get("name", "dynunet")).lower()
    if name == "dynunet" and model_cfg.get("strides") is None:
        keys = ("min_feature_size", "max_depth", "base_features", "max_features")
        return plan_dynunet(patch, spacing, **{k: model_cfg[k] for k in keys if k in model_cfg}).num_stages >= 3
    return all(p >= 2 * d for p, d in zip(patch, divisor))


def default_budget_gib(device: torch.device | str) -> float:
    """The whole device's memory for a GPU; half of the machine's RAM for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / 2


def _parameter_bytes(model_config: Mapping[str, Any]) -> float:
    with torch.device("meta"):  # no memory, no initialisation cost
        model = build_model(model_config)
    return float(sum(p.numel() * p.element_size() for p in model.parameters()))


@dataclass
class PlanResult:
    """What :func:`plan` found for one variant and batch size.

    Attributes:
        variant: canonical variant name.
        batch_size: patches per step.
        patch_size: the largest candidate that fits, or None when none does (or the variant is
            unavailable here).
        stats: that candidate's :class:`app.measure.StepStats` (or the first failure's).
        budget_bytes: the budget.
        device: where it was measured (or, for estimates, the CPU that counted the bytes).
        estimated: True when the peaks are CPU estimates, not measurements.
        trials: every candidate asked, in order (``stats.extra["source"]``: measured, cached,
            estimated).
    """

    variant: str
    batch_size: int
    patch_size: tuple[int, ...] | None
    stats: StepStats | None
    budget_bytes: float
    device: str
    estimated: bool
    trials: list[StepStats] = field(default_factory=list)


class _SavedBytesEstimate:
    """CPU stand-in for a measurement: the peak from saved bytes counted at two small patches.

    Saved bytes are affine in the voxels, ``a + b * voxels``: ``b`` is what activations keep per
    voxel, ``a`` what does not grow with the patch (bf16 copies of the weights under autocast,
    per-channel statistics). Two reference counts give both; one gives ``b`` alone.
    """

    def __init__(self, measure_references: Callable[[], list[StepStats]], model_cfg: Mapping[str, Any], factor: float) -> None:
        self._measure_references = measure_references
        self._fit: tuple[float, float, StepStats] | None = None
        self.model_cfg = model_cfg
        self.factor = factor
        self.source = "estimated"

    def _affine(self) -> tuple[float, float, StepStats]:
        if self._fit is None:
            refs = self._measure_references()
            ref = refs[-1]
            if not all(r.fits for r in refs):
                self._fit = (math.nan, math.nan, next(r for r in refs if not r.fits))
            elif len(refs) == 1 or refs[0].voxels == ref.voxels:
                self._fit = (0.0, ref.saved_bytes / ref.voxels, ref)
            else:
                per_voxel = max(0.0, (ref.saved_bytes - refs[0].saved_bytes) / (ref.voxels - refs[0].voxels))
                self._fit = (max(0.0, ref.saved_bytes - per_voxel * ref.voxels), per_voxel, ref)
            self.source = "estimated" + (" (cached counts)" if all(r.extra.get("source") == "cached" for r in refs) else "")
        return self._fit

    def __call__(self, patch: tuple[int, ...]) -> StepStats:
        constant, per_voxel, ref = self._affine()
        if not ref.fits:
            return StepStats(**{**ref.__dict__, "patch_size": patch, "extra": {}})
        voxels = ref.batch_size * math.prod(patch)
        saved = constant + per_voxel * voxels
        params = _parameter_bytes(model_config_for_patch(self.model_cfg, patch))
        peak = self.factor * saved + STATE_BYTES_PER_PARAMETER_BYTE * params
        return StepStats(
            variant=ref.variant, patch_size=patch, batch_size=ref.batch_size, status=OK, peak_bytes=peak,
            saved_bytes=saved, saved_bytes_per_voxel=saved / voxels, parameter_bytes=params, device=ref.device,
            estimated=True,
            reason=(f"estimate: {self.factor:g} x ({constant / 2**20:.1f} MiB + {per_voxel:.0f} B/voxel saved, counted "
                    f"up to {'x'.join(map(str, ref.patch_size))}) + {STATE_BYTES_PER_PARAMETER_BYTE} x parameter bytes"),
            extra={"source": self.source},
        )


def _resolve_cache(cache: CalibrationCache | str | os.PathLike[str] | None | bool) -> CalibrationCache:
    if isinstance(cache, CalibrationCache):
        return cache
    if cache is True:
        return CalibrationCache(default_cache_path())
    if cache is None or cache is False:
        return CalibrationCache(None)
    return CalibrationCache(cache)


def plan(
    model_cfg: Mapping[str, Any],
    budget_gib: float | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    variant: str | Variant = "exact",
    batch_size: int = 1,
    device: torch.device | str | None = None,
    *,
    n_probes: int = DEFAULT_N_PROBES,
    sketch_options: Mapping[str, Any] | None = None,
    cache: CalibrationCache | str | os.PathLike[str] | None | bool = True,
    measure_fn: Callable[[tuple[int, ...]], StepStats] | None = None,
    max_edge: int = 512,
    max_shape: Sequence[int] | None = None,
    edge_step: int | None = None,
    warmup: int = 1,
    repeat: int = 2,
    reference_edge: int = 64,
    calibration: float | None = None,
) -> PlanResult:
    """Find the largest candidate patch whose training step fits ``budget_gib`` (see module docstring).

    Args:
        model_cfg: model config (``name``, ``in_channels``, ``out_channels``, ...); ``patch_size``
            is ignored, ``spacing`` defaults to ``spacing``.
        budget_gib: memory budget; None = the device's memory (:func:`default_budget_gib`).
        spacing: voxel spacing of the training data (shapes anisotropic candidates).
        variant: training-step variant, e.g. ``"stochastic+lean+amp"``.
        batch_size: patches per step.
        device: where to measure; None = CUDA when available, else the CPU (estimates).
        n_probes, sketch_options: stochastic-layer settings (``app.nn.convert``).
        cache: a :class:`CalibrationCache`, a file path, True (default file) or None/False (none).
        measure_fn: ``patch -> StepStats`` replacing the measurement (tests, other estimators);
            its results are cached like measurements.
        max_edge: largest candidate edge along the finest axis. Default 512.
        max_shape: per axis, the largest useful size (e.g. the data's median shape).
        edge_step: candidate edges along the finest axis are multiples of ``lcm(divisor,
            edge_step)`` (default: of the divisor).
        warmup, repeat: steps per measurement (see :func:`measure_step`).
        reference_edge: CPU estimate: saved bytes are counted at the first candidate at least this
            large along the finest axis and at the next one. Default 64.
        calibration: CPU estimate: peak bytes per saved byte (default :func:`calibration_factor`).

    Returns:
        A :class:`PlanResult`; ``patch_size`` is None when no candidate fits.
    """
    v = parse_variant(variant)
    spacing = [float(s) for s in spacing]
    cfg = dict(model_cfg)
    if cfg.get("spacing") is None:
        cfg["spacing"] = spacing
    dev = resolve_device("auto" if device is None else device)
    if budget_gib is None:
        budget_gib = default_budget_gib(dev)
    if not budget_gib > 0:
        raise ValueError(f"budget_gib must be positive, but got budget_gib={budget_gib}")
    budget = budget_gib * GIB
    store = _resolve_cache(cache)
    divisor = required_divisor(cfg, spacing, max_edge)
    candidates = [c for c in candidate_patches(divisor, spacing, max_edge=max_edge, max_shape=max_shape, edge_step=edge_step)
                  if _trainable(cfg, c, divisor, spacing)]
    if not candidates:
        raise ValueError(f"no candidate patch: max_edge={max_edge} is below the network's divisor")
    name = device_name(dev)
    options = dict(sketch_options or {})
    estimated = dev.type != "cuda" and measure_fn is None

    def cached(patch: tuple[int, ...], fn: Callable[[], StepStats], cap: float | None, timed: bool = True) -> StepStats:
        key, fields = cache_key(
            model_config=cfg, device=name, variant=v.name, patch_size=patch,
            batch_size=batch_size, n_probes=n_probes, sketch_options=options, timed=timed,
        )
        hit = store.lookup(key, cap)
        if hit is not None:
            hit.extra["source"] = "cached"
            return hit
        stats = fn()
        store.store(key, fields, stats, cap)
        stats.extra.setdefault("source", "measured")
        return stats

    def measured(patch: tuple[int, ...]) -> StepStats:
        return measure_step(
            cfg, patch_size=patch, batch_size=batch_size, variant=v, n_probes=n_probes, device=dev,
            warmup=warmup, repeat=repeat, memory_cap_gib=budget_gib if dev.type == "cuda" else None,
            sketch_options=options, report_errors=True,
        )

    if measure_fn is not None:
        def probe(patch: tuple[int, ...]) -> StepStats:
            return cached(patch, lambda: measure_fn(patch), budget)
    elif estimated:
        finest = spacing.index(min(spacing))
        ref_index = next((i for i, c in enumerate(candidates) if c[finest] >= reference_edge), len(candidates) - 1)
        references = candidates[ref_index:ref_index + 2]  # the next candidate: usually the same topology

        def reference_stats() -> list[StepStats]:
            return [cached(r, lambda r=r: measure_step(
                cfg, patch_size=r, batch_size=batch_size, variant=v, n_probes=n_probes, device=dev,
                warmup=0, repeat=0, sketch_options=options,
            ), None, timed=False) for r in references]

        probe = _SavedBytesEstimate(reference_stats, cfg, calibration if calibration is not None else calibration_factor(v))
    else:
        def probe(patch: tuple[int, ...]) -> StepStats:
            return cached(patch, lambda: measured(patch), budget)

    trials: list[StepStats] = []

    def fits(i: int) -> bool:
        stats = probe(candidates[i])
        trials.append(stats)
        if stats.fits and stats.peak_bytes > budget:  # an estimate (or a cached peak) over the budget
            stats.status = OOM
            stats.reason = f"{'estimated' if stats.estimated else 'measured'} peak {stats.peak_bytes / GIB:.2f} GiB is over the budget"
        return stats.fits  # a NaN peak (injected measurement without one) is judged by its status

    best = search_largest(len(candidates), fits)
    by_patch = {t.patch_size: t for t in trials}
    if best < 0:
        return PlanResult(v.name, batch_size, None, by_patch.get(candidates[0]), budget, name, estimated, trials)
    return PlanResult(v.name, batch_size, candidates[best], by_patch[candidates[best]], budget, name, estimated, trials)


def plan_patch_size(
    model_cfg: Mapping[str, Any],
    budget_gib: float | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    variant: str | Variant = "exact",
    batch_size: int = 1,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> tuple[int, ...]:
    """The largest patch whose training step fits ``budget_gib`` GiB (see :func:`plan`).

    Raises:
        ValueError: no candidate fits (the message names the budget, the variant and the
            smallest candidate's peak).

    Examples:
        >>> plan_patch_size({"name": "dynunet", "in_channels": 1, "out_channels": 3}, 24, (1, 1, 1),
        ...                 "stochastic+lean+amp", device="cuda")  # doctest: +SKIP
        (320, 320, 320)
    """
    result = plan(model_cfg, budget_gib, spacing, variant, batch_size, device, **kwargs)
    if result.patch_size is None:
        s = result.stats
        what = "" if s is None else f"; smallest candidate {list(s.patch_size)}: {s.status} ({s.reason or 'over budget'})"
        raise ValueError(
            f"no patch of variant {result.variant!r} with batch size {batch_size} fits {result.budget_bytes / GIB:.2f} GiB "
            f"on {result.device}{what}; raise the budget or pick a leaner variant (e.g. stochastic+lean+amp)"
        )
    return result.patch_size
