"""nnU-Net-style topology planning for MONAI's :class:`~monai.networks.nets.DynUNet`.

Given a training patch size and the voxel spacing of the (resampled) data, the planner
decides how many resolution stages the U-Net gets, which axes each stage downsamples and
the convolution kernel of each stage. It follows the rules of nnU-Net's
``get_pool_and_conv_props``:

* the first stage works at full resolution (stride 1);
* an axis is downsampled only while its spacing is within a factor 2 of the finest
  current spacing (coarse axes of anisotropic data wait until the others catch up);
* an axis stops downsampling once halving it would leave fewer than
  ``min_feature_size`` voxels; if only one axis could still be halved, it must hold at
  least ``3 * min_feature_size`` voxels, otherwise the network stops there;
* the kernel of an axis is 1 while that axis is much coarser (>= 2x) than the finest
  one, and 3 from the first stage where it is not (it stays 3 afterwards);
* features start at ``base_features`` and double per stage, capped at ``max_features``.

The plan only depends on its arguments; everything in it is plain ``int`` lists so it
can be stored in a checkpoint and rebuilt identically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DynUNetPlan", "plan_dynunet", "check_patch_size"]

# nnU-Net treats two spacings as "comparable" when their ratio is below this factor.
ANISOTROPY_RATIO = 2.0


@dataclass(frozen=True)
class DynUNetPlan:
    """A DynUNet topology: one entry per resolution stage, the first at full resolution.

    Attributes:
        kernel_size: per stage, the convolution kernel per axis, e.g. ``[[1, 3, 3], [3, 3, 3]]``.
        strides: per stage, the downsampling stride per axis; ``strides[0]`` is all ones.
        filters: per stage, the number of feature channels.
        upsample_kernel_size: per decoder step, the transposed-convolution kernel (equal
            to ``strides[1:]``).
        patch_size: the patch size the plan was derived from.
        spacing: the voxel spacing (mm) the plan was derived from.
    """

    kernel_size: list[list[int]]
    strides: list[list[int]]
    filters: list[int]
    upsample_kernel_size: list[list[int]]
    patch_size: list[int] = field(default_factory=list)
    spacing: list[float] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        """Number of resolution stages (encoder depth, bottleneck included)."""
        return len(self.strides)

    @property
    def divisor(self) -> list[int]:
        """Per axis, the number every input size must be a multiple of (product of strides)."""
        return [math.prod(s[d] for s in self.strides) for d in range(len(self.strides[0]))]

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as a plain dict (lists of ints/floats only)."""
        return asdict(self)


def _as_int_list(values: Sequence[int], name: str) -> list[int]:
    out = [int(v) for v in values]
    if not out or any(v <= 0 for v in out):
        raise ValueError(f"{name} must be a non-empty sequence of positive integers, but got {name}={list(values)!r}")
    return out


def plan_dynunet(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    *,
    min_feature_size: int = 4,
    max_depth: int = 6,
    base_features: int = 32,
    max_features: int = 320,
) -> DynUNetPlan:
    """Derive a DynUNet topology from a patch size and a voxel spacing, the nnU-Net way.

    Args:
        patch_size: training patch size per spatial axis, e.g. ``(128, 128, 128)``.
        spacing: voxel spacing (mm) per spatial axis, same order as ``patch_size``.
        min_feature_size: an axis is not downsampled below this many voxels. Default 4.
        max_depth: maximum number of resolution stages, the full-resolution stage
            included (so at most ``max_depth - 1`` downsamplings). Default 6.
        base_features: feature channels of the first stage. Default 32.
        max_features: cap on feature channels. Default 320.

    Returns:
        The plan; ``plan.divisor`` gives the per-axis divisibility inputs must satisfy.

    Raises:
        ValueError: if the arguments are inconsistent (lengths, non-positive values).

    Examples:
        >>> plan = plan_dynunet((128, 128, 128), (1.0, 1.0, 1.0))
        >>> plan.num_stages, plan.filters
        (6, [32, 64, 128, 256, 320, 320])
    """
    size = _as_int_list(patch_size, "patch_size")
    spacing_f = [float(s) for s in spacing]
    if len(spacing_f) != len(size):
        raise ValueError(f"spacing must have one value per patch axis ({len(size)}), but got spacing={list(spacing)!r}")
    if any(not math.isfinite(s) or s <= 0 for s in spacing_f):
        raise ValueError(f"spacing must be positive and finite, but got spacing={list(spacing)!r}")
    if min_feature_size < 1:
        raise ValueError(f"min_feature_size must be >= 1, but got min_feature_size={min_feature_size}")
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, but got max_depth={max_depth}")
    if base_features < 1 or max_features < base_features:
        raise ValueError(
            "need 1 <= base_features <= max_features, but got "
            f"base_features={base_features}, max_features={max_features}"
        )

    ndim = len(size)
    cur_size = list(size)
    cur_spacing = list(spacing_f)
    kernel = [1] * ndim
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * ndim]

    def update_kernel() -> list[int]:
        finest = min(cur_spacing)
        for d in range(ndim):
            if cur_spacing[d] / finest < ANISOTROPY_RATIO:
                kernel[d] = 3
        return list(kernel)

    while len(strides) < max_depth:
        poolable = [d for d in range(ndim) if cur_size[d] >= 2 * min_feature_size]
        if not poolable:
            break
        finest = min(cur_spacing[d] for d in poolable)
        poolable = [d for d in poolable if cur_spacing[d] / finest < ANISOTROPY_RATIO]
        if len(poolable) == 1 and cur_size[poolable[0]] < 3 * min_feature_size:
            break
        if not poolable:
            break
        kernels.append(update_kernel())
        stride = [1] * ndim
        for d in poolable:
            stride[d] = 2
            cur_spacing[d] *= 2
            cur_size[d] = math.ceil(cur_size[d] / 2)
        strides.append(stride)
    kernels.append(update_kernel())  # bottleneck (or the only stage)

    filters = [min(base_features * 2**i, max_features) for i in range(len(strides))]
    return DynUNetPlan(
        kernel_size=kernels,
        strides=strides,
        filters=filters,
        upsample_kernel_size=[list(s) for s in strides[1:]],
        patch_size=size,
        spacing=spacing_f,
    )


def _divisor_from_strides(strides: Sequence[Sequence[int] | int], ndim: int) -> list[int]:
    div = [1] * ndim
    for s in strides:
        per_axis = [int(s)] * ndim if isinstance(s, int) else [int(v) for v in s]
        if len(per_axis) != ndim:
            raise ValueError(f"strides entry {s!r} does not have {ndim} values")
        div = [a * b for a, b in zip(div, per_axis, strict=True)]
    return div


def check_patch_size(patch_size: Sequence[int], plan: DynUNetPlan | Sequence[Sequence[int] | int]) -> None:
    """Check that a patch (or any network input) size fits a plan's downsampling.

    Args:
        patch_size: spatial input size per axis.
        plan: a :class:`DynUNetPlan`, or a DynUNet ``strides`` list.

    Raises:
        ValueError: naming the axes that are not multiples of the required divisor and
            the nearest valid sizes below and above.
    """
    size = _as_int_list(patch_size, "patch_size")
    strides = plan.strides if isinstance(plan, DynUNetPlan) else plan
    divisor = _divisor_from_strides(strides, len(size))
    bad = [d for d in range(len(size)) if size[d] % divisor[d]]
    if bad:
        lower = [max(divisor[d], size[d] // divisor[d] * divisor[d]) for d in range(len(size))]
        upper = [math.ceil(size[d] / divisor[d]) * divisor[d] for d in range(len(size))]
        raise ValueError(
            f"patch_size {size} must be divisible by {divisor} per axis (product of the strides); "
            f"axes {bad} are not; use e.g. {lower} or {upper}"
        )
