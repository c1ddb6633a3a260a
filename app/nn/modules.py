"""``torch.nn`` drop-in convolution modules whose weight gradient is sketched.

Each class subclasses its ``torch.nn`` counterpart and overrides only the forward hook, so
``reset_parameters``, ``state_dict`` keys and checkpoints are interchangeable with ``torch.nn``.
In eval mode, under ``torch.no_grad()``, with ``n_probes=0``, inside ``app.nn.exact(...)`` or
when the input has fewer than ``min_voxels`` voxels, the layer is an ordinary convolution.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .functional import _apply, check_sketch_options

DEFAULT_N_PROBES = 256
"""Default probes per layer: with the spectral sketch, whole-network dW cosine 0.99 against exact
(the cosine of two exact mini-batch gradients) on the default U-Net at 96³ (docs/benchmarks.md)."""


class StochasticConvMixin:
    """Sketch options and the rule that decides when the sketch is used."""

    n_probes: int
    probes: str
    sketch: Optional[str]
    control: str
    min_voxels: int
    force_exact: bool = False

    def set_sketch_options(
        self,
        n_probes: int = DEFAULT_N_PROBES,
        probes: str = "rademacher",
        sketch: Optional[str] = None,
        control: str = "mean",
        min_voxels: int = 0,
    ) -> None:
        """Validates and sets the sketch options (``sketch=None``: the layer kind's default)."""
        check_sketch_options(n_probes, probes, sketch, control)
        if isinstance(self, nn.modules.conv._ConvTransposeNd) and sketch == "offset":
            sketch = "shifted"  # a transposed convolution's input is its small side: sketch it there
        if min_voxels < 0:
            raise ValueError(f"min_voxels must be >= 0, but got min_voxels={min_voxels}")
        self.n_probes, self.probes, self.sketch, self.control, self.min_voxels = n_probes, probes, sketch, control, min_voxels

    def resolved_sketch(self) -> str:
        """The sketch this layer uses: its ``sketch``, or ``"spectral"`` for ``None``."""
        return self.sketch or "spectral"

    def uses_sketch(self, x: torch.Tensor) -> bool:
        """True when this call keeps a sketch instead of the input."""
        return (
            self.n_probes > 0
            and not self.force_exact
            and self.training
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and math.prod(x.shape[2:]) >= self.min_voxels
        )

    def sketch_repr(self) -> str:
        return f"n_probes={self.n_probes}, probes={self.probes}, sketch={self.sketch}, control={self.control}, min_voxels={self.min_voxels}"


class _StochasticConvNd(StochasticConvMixin):
    _dims: int

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.uses_sketch(input):
            return super()._conv_forward(input, weight, bias)
        padding = self.padding
        sketch = self.resolved_sketch()
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return _apply(
            input, weight, bias, self._dims, False, self.stride, padding, 0, self.dilation, self.groups,
            self.n_probes, self.probes, sketch, self.control, None,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.sketch_repr()}"


class _StochasticConvTransposeNd(StochasticConvMixin):
    _dims: int

    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        if not self.uses_sketch(input):
            return super().forward(input, output_size)
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, self._dims, self.dilation
        )
        return _apply(
            input, self.weight, self.bias, self._dims, True, self.stride, self.padding, output_padding, self.dilation,
            self.groups, self.n_probes, self.probes, self.resolved_sketch(), self.control, None,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.sketch_repr()}"


def _make_module(base: type, mixin: type, dims: int) -> type:
    def __init__(self, *args, n_probes: int = DEFAULT_N_PROBES, probes: str = "rademacher", sketch: Optional[str] = None,
                 control: str = "mean", min_voxels: int = 0, **kwargs) -> None:
        base.__init__(self, *args, **kwargs)
        self.set_sketch_options(n_probes, probes, sketch, control, min_voxels)

    name = f"Stochastic{base.__name__}"
    doc = f"""Drop-in ``torch.nn.{base.__name__}`` whose weight gradient is an unbiased sketch estimate.

    Args:
        *args, **kwargs: exactly those of ``torch.nn.{base.__name__}``.
        n_probes: probes of the trace estimator (memory ``r·C_in·K`` or ``r·C_in`` numbers); ``0`` = exact backprop.
        probes: ``"rademacher"``, ``"gaussian"`` or ``"orthogonal"``.
        sketch: ``"shifted"`` (``r·C_in`` numbers kept), ``"offset"`` (``r·C_in·K``; regular convs only) or
            ``"spectral"`` (``B·r·C_in`` complex Fourier coefficients);
            ``None`` (default): ``"spectral"``.
        control: ``"mean"`` (exact per-channel-mean control variate) or ``"none"``.
        min_voxels: inputs with fewer voxels than this use exact backprop (they are cheap to keep).

    Shape:
        as ``torch.nn.{base.__name__}``.
    """
    return type(name, (mixin, base), {"__init__": __init__, "__doc__": doc, "_dims": dims, "__module__": __name__})


StochasticConv1d = _make_module(nn.Conv1d, _StochasticConvNd, 1)
StochasticConv2d = _make_module(nn.Conv2d, _StochasticConvNd, 2)
StochasticConv3d = _make_module(nn.Conv3d, _StochasticConvNd, 3)
StochasticConvTranspose1d = _make_module(nn.ConvTranspose1d, _StochasticConvTransposeNd, 1)
StochasticConvTranspose2d = _make_module(nn.ConvTranspose2d, _StochasticConvTransposeNd, 2)
StochasticConvTranspose3d = _make_module(nn.ConvTranspose3d, _StochasticConvTransposeNd, 3)

STOCHASTIC_OF: dict[type, type] = {
    nn.Conv1d: StochasticConv1d,
    nn.Conv2d: StochasticConv2d,
    nn.Conv3d: StochasticConv3d,
    nn.ConvTranspose1d: StochasticConvTranspose1d,
    nn.ConvTranspose2d: StochasticConvTranspose2d,
    nn.ConvTranspose3d: StochasticConvTranspose3d,
}
