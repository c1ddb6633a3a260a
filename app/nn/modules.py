"""``torch.nn`` drop-in convolution modules whose weight gradient is sketched.

Each class subclasses its ``torch.nn`` counterpart and overrides only the forward hook, so
``reset_parameters``, ``state_dict`` keys and checkpoints are interchangeable with ``torch.nn``.
The maths lives in :mod:`app.nn.functional`; the modules keep the sketch options. In eval mode,
under ``torch.no_grad()``, with ``n_probes=0``, inside ``app.nn.exact(...)`` or when the input has
fewer than ``min_voxels`` voxels, the layer is an ordinary convolution.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.nn.common_types import _size_1_t, _size_2_t, _size_3_t

from .functional import DEFAULT_N_PROBES, DEFAULT_SKETCH, _stochastic_conv_nd, check_sketch_options, resolve_sketch

__all__ = [
    "DEFAULT_N_PROBES",
    "DEFAULT_SKETCH",
    "StochasticConvMixin",
    "StochasticConv1d",
    "StochasticConv2d",
    "StochasticConv3d",
    "StochasticConvTranspose1d",
    "StochasticConvTranspose2d",
    "StochasticConvTranspose3d",
    "STOCHASTIC_OF",
]


class StochasticConvMixin:
    """Sketch options of a stochastic convolution and the rule that decides when the sketch is used.

    Attributes:
        n_probes: probes per call; 0 is exact backprop.
        probes: probe family (``app.nn.PROBE_FAMILIES``).
        sketch: the sketch this layer runs (already resolved by :func:`app.nn.functional.resolve_sketch`:
            never None, never ``"offset"`` on a transposed convolution).
        control: ``"mean"`` or ``"none"``.
        min_voxels: inputs with fewer voxels per sample use exact backprop.
        conv_block: largest result, in elements, of one call of the convolution and of its input
            gradient; a larger one is computed in blocks of channels (at least
            :data:`app.nn.functional.MIN_BLOCK_CHANNELS`), which bounds the library's workspace
            (cuDNN's bf16 kernels take about twice their result's size). The same numbers, slower
            (many smaller calls); None: one call.
        force_exact: set by :func:`app.nn.exact`.
    """

    n_probes: int
    probes: str
    sketch: str
    control: str
    min_voxels: int
    conv_block: Optional[int] = None
    force_exact: bool = False
    transposed: bool

    def set_sketch_options(
        self,
        n_probes: int = DEFAULT_N_PROBES,
        probes: str = "rademacher",
        sketch: Optional[str] = DEFAULT_SKETCH,
        control: str = "mean",
        min_voxels: int = 0,
        conv_block: Optional[int] = None,
    ) -> None:
        """Validates and sets the sketch options (``sketch=None`` means :data:`DEFAULT_SKETCH`)."""
        check_sketch_options(n_probes, probes, sketch, control)
        if not isinstance(min_voxels, int) or min_voxels < 0:
            raise ValueError(f"min_voxels must be an int >= 0, but got min_voxels={min_voxels!r}")
        if conv_block is not None and (isinstance(conv_block, bool) or not isinstance(conv_block, int) or conv_block < 1):
            raise ValueError(f"conv_block must be an int >= 1 (elements) or None, but got conv_block={conv_block!r}")
        self.n_probes, self.probes, self.control, self.min_voxels = n_probes, probes, control, min_voxels
        self.conv_block = conv_block
        self.sketch = resolve_sketch(sketch, self.transposed)

    def uses_sketch(self, x: torch.Tensor) -> bool:
        """True when a call on ``x`` runs the stochastic convolution instead of the ordinary one."""
        return (
            self.n_probes > 0
            and not self.force_exact
            and self.training
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and math.prod(x.shape[2:]) >= self.min_voxels
        )

    def sketch_repr(self) -> str:
        text = f"n_probes={self.n_probes}, probes={self.probes}, sketch={self.sketch}, control={self.control}, min_voxels={self.min_voxels}"
        return text if self.conv_block is None else f"{text}, conv_block={self.conv_block}"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.sketch_repr()}"


class _StochasticConvNd(StochasticConvMixin):
    """Forward hook of the regular convolutions (``torch.nn.Conv{1,2,3}d._conv_forward``)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.uses_sketch(input):
            return super()._conv_forward(input, weight, bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return _stochastic_conv_nd(
            input, weight, bias, dims=len(self.kernel_size), transposed=False, stride=self.stride, padding=padding,
            output_padding=0, dilation=self.dilation, groups=self.groups, n_probes=self.n_probes, probes=self.probes,
            sketch=self.sketch, control=self.control, seed=None, conv_block=self.conv_block,
        )


class _StochasticConvTransposeNd(StochasticConvMixin):
    """Forward of the transposed convolutions (``torch.nn.ConvTranspose{1,2,3}d.forward``)."""

    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        if not self.uses_sketch(input):
            return super().forward(input, output_size)
        dims = len(self.kernel_size)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, dims, self.dilation)
        return _stochastic_conv_nd(
            input, self.weight, self.bias, dims=dims, transposed=True, stride=self.stride, padding=self.padding,
            output_padding=output_padding, dilation=self.dilation, groups=self.groups, n_probes=self.n_probes,
            probes=self.probes, sketch=self.sketch, control=self.control, seed=None, conv_block=self.conv_block,
        )


class StochasticConv1d(_StochasticConvNd, nn.Conv1d):
    """Drop-in ``torch.nn.Conv1d`` whose weight gradient is an unbiased sketch estimate
    (:func:`app.nn.functional.stochastic_conv1d`); forward and input gradient are exact.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype: those of ``torch.nn.Conv1d``, same defaults (stride 1, padding 0, dilation 1,
            groups 1, bias True, padding_mode ``"zeros"``).
        n_probes: probes of the trace estimator; 0 is exact backprop. Default :data:`DEFAULT_N_PROBES`.
        probes: ``"rademacher"``, ``"gaussian"`` or ``"orthogonal"``. Default ``"rademacher"``.
        sketch: ``"spectral"``, ``"shifted"`` or ``"offset"`` (:mod:`app.nn.functional`); None means
            :data:`DEFAULT_SKETCH`. Default :data:`DEFAULT_SKETCH`.
        control: ``"mean"`` (exact per-channel-mean control variate) or ``"none"``. Default ``"mean"``.
        min_voxels: inputs with fewer voxels per sample use exact backprop. Default 0.

    Shape:
        - input: ``(B, C_in, L_in)``
        - output: ``(B, C_out, L_out)``, ``L_out = floor((L_in + 2·padding − dilation·(kernel_size − 1) − 1) / stride) + 1``

    Example:
        >>> layer = StochasticConv1d(4, 8, 3, padding=1, n_probes=16)
        >>> layer(torch.randn(2, 4, 50)).sum().backward()  # layer.weight.grad: an unbiased estimate
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_1_t,
        stride: _size_1_t = 1,
        padding: Union[str, _size_1_t] = 0,
        dilation: _size_1_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        n_probes: int = DEFAULT_N_PROBES,
        probes: str = "rademacher",
        sketch: Optional[str] = DEFAULT_SKETCH,
        control: str = "mean",
        min_voxels: int = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype)
        self.set_sketch_options(n_probes, probes, sketch, control, min_voxels)


class StochasticConv2d(_StochasticConvNd, nn.Conv2d):
    """Drop-in ``torch.nn.Conv2d`` whose weight gradient is an unbiased sketch estimate
    (:func:`app.nn.functional.stochastic_conv2d`); forward and input gradient are exact.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype: those of ``torch.nn.Conv2d``, same defaults.
        n_probes, probes, sketch, control, min_voxels: as in :class:`StochasticConv1d`. Defaults
            :data:`DEFAULT_N_PROBES`, ``"rademacher"``, :data:`DEFAULT_SKETCH`, ``"mean"``, 0.

    Shape:
        - input: ``(B, C_in, H_in, W_in)``
        - output: ``(B, C_out, H_out, W_out)``, per dimension
          ``out = floor((in + 2·padding − dilation·(kernel_size − 1) − 1) / stride) + 1``

    Example:
        >>> layer = StochasticConv2d(4, 8, 3, padding=1, n_probes=16)
        >>> layer(torch.randn(2, 4, 32, 33)).sum().backward()
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: Union[str, _size_2_t] = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        n_probes: int = DEFAULT_N_PROBES,
        probes: str = "rademacher",
        sketch: Optional[str] = DEFAULT_SKETCH,
        control: str = "mean",
        min_voxels: int = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype)
        self.set_sketch_options(n_probes, probes, sketch, control, min_voxels)


class StochasticConv3d(_StochasticConvNd, nn.Conv3d):
    """Drop-in ``torch.nn.Conv3d`` whose weight gradient is an unbiased sketch estimate
    (:func:`app.nn.functional.stochastic_conv3d`); forward and input gradient are exact.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype: those of ``torch.nn.Conv3d``, same defaults.
        n_probes, probes, sketch, control, min_voxels: as in :class:`StochasticConv1d`. Defaults
            :data:`DEFAULT_N_PROBES`, ``"rademacher"``, :data:`DEFAULT_SKETCH`, ``"mean"``, 0.

    Shape:
        - input: ``(B, C_in, D_in, H_in, W_in)``
        - output: ``(B, C_out, D_out, H_out, W_out)``, per dimension
          ``out = floor((in + 2·padding − dilation·(kernel_size − 1) − 1) / stride) + 1``

    Example:
        >>> layer = StochasticConv3d(4, 8, 3, padding=1, n_probes=16)
        >>> layer(torch.randn(2, 4, 16, 17, 18)).sum().backward()
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_3_t,
        stride: _size_3_t = 1,
        padding: Union[str, _size_3_t] = 0,
        dilation: _size_3_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        n_probes: int = DEFAULT_N_PROBES,
        probes: str = "rademacher",
        sketch: Optional[str] = DEFAULT_SKETCH,
        control: str = "mean",
        min_voxels: int = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype)
        self.set_sketch_options(n_probes, probes, sketch, control, min_voxels)


class StochasticConvTranspose1d(_StochasticConvTransposeNd, nn.ConvTranspose1d):
    """Drop-in ``torch.nn.ConvTranspose1d`` whose weight gradient is an unbiased sketch estimate
    (:func:`app.nn.functional.stochastic_conv_transpose1d`); forward and input gradient are exact.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation,
            padding_mode, device, dtype: those of ``torch.nn.ConvTranspose1d``, same defaults.
        n_probes, probes, control, min_voxels: as in :class:`StochasticConv1d`. Defaults
            :data:`DEFAULT_N_PROBES`, ``"rademacher"``, ``"mean"``, 0.
        sketch: ``"spectral"`` or ``"shifted"``; ``"offset"`` runs ``"shifted"`` and None
            :data:`DEFAULT_SKETCH` (:func:`app.nn.functional.resolve_sketch`). Default :data:`DEFAULT_SKETCH`.

    Shape:
        - input: ``(B, C_in, L_in)``
        - output: ``(B, C_out, L_out)``,
          ``L_out = (L_in − 1)·stride − 2·padding + dilation·(kernel_size − 1) + output_padding + 1``
          (``forward(input, output_size)`` picks ``output_padding`` as torch does)

    Example:
        >>> layer = StochasticConvTranspose1d(8, 4, 2, stride=2, n_probes=16)
        >>> layer(torch.randn(2, 8, 25)).shape
        torch.Size([2, 4, 50])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_1_t,
        stride: _size_1_t = 1,
        padding: _size_1_t = 0,
        output_padding: _size_1_t = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: _size_1_t = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        n_probes: int = DEFAULT_N_PROBES,
        probes: str = "rademacher",
        sketch: Optional[str] = DEFAULT_SKETCH,
        control: str = "mean",
        min_voxels: int = 0,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation, padding_mode, device, dtype
        )
        self.set_sketch_options(n_probes, probes, sketch, control, min_voxels)


class StochasticConvTranspose2d(_StochasticConvTransposeNd, nn.ConvTranspose2d):
    """Drop-in ``torch.nn.ConvTranspose2d`` whose weight gradient is an unbiased sketch estimate
    (:func:`app.nn.functional.stochastic_conv_transpose2d`); forward and input gradient are exact.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation,
            padding_mode, device, dtype: those of ``torch.nn.ConvTranspose2d``, same defaults.
        n_probes, probes, sketch, control, min_voxels: as in :class:`StochasticConvTranspose1d`. Defaults
            :data:`DEFAULT_N_PROBES`, ``"rademacher"``, :data:`DEFAULT_SKETCH`, ``"mean"``, 0.

    Shape:
        - input: ``(B, C_in, H_in, W_in)``
        - output: ``(B, C_out, H_out, W_out)``, per dimension
          ``out = (in − 1)·stride − 2·padding + dilation·(kernel_size − 1) + output_padding + 1``

    Example:
        >>> layer = StochasticConvTranspose2d(8, 4, 2, stride=2, n_probes=16)
        >>> layer(torch.randn(2, 8, 16, 17)).shape
        torch.Size([2, 4, 32, 34])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t = 0,
        output_padding: _size_2_t = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: _size_2_t = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        n_probes: int = DEFAULT_N_PROBES,
        probes: str = "rademacher",
        sketch: Optional[str] = DEFAULT_SKETCH,
        control: str = "mean",
        min_voxels: int = 0,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation, padding_mode, device, dtype
        )
        self.set_sketch_options(n_probes, probes, sketch, control, min_voxels)


class StochasticConvTranspose3d(_StochasticConvTransposeNd, nn.ConvTranspose3d):
    """Drop-in ``torch.nn.ConvTranspose3d`` whose weight gradient is an unbiased sketch estimate
    (:func:`app.nn.functional.stochastic_conv_transpose3d`); forward and input gradient are exact.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation,
            padding_mode, device, dtype: those of ``torch.nn.ConvTranspose3d``, same defaults.
        n_probes, probes, sketch, control, min_voxels: as in :class:`StochasticConvTranspose1d`. Defaults
            :data:`DEFAULT_N_PROBES`, ``"rademacher"``, :data:`DEFAULT_SKETCH`, ``"mean"``, 0.

    Shape:
        - input: ``(B, C_in, D_in, H_in, W_in)``
        - output: ``(B, C_out, D_out, H_out, W_out)``, per dimension
          ``out = (in − 1)·stride − 2·padding + dilation·(kernel_size − 1) + output_padding + 1``

    Example:
        >>> layer = StochasticConvTranspose3d(8, 4, 2, stride=2, n_probes=16)
        >>> layer(torch.randn(2, 8, 8, 9, 10)).shape
        torch.Size([2, 4, 16, 18, 20])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_3_t,
        stride: _size_3_t = 1,
        padding: _size_3_t = 0,
        output_padding: _size_3_t = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: _size_3_t = 1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        n_probes: int = DEFAULT_N_PROBES,
        probes: str = "rademacher",
        sketch: Optional[str] = DEFAULT_SKETCH,
        control: str = "mean",
        min_voxels: int = 0,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation, padding_mode, device, dtype
        )
        self.set_sketch_options(n_probes, probes, sketch, control, min_voxels)


STOCHASTIC_OF: dict[type, type] = {
    nn.Conv1d: StochasticConv1d,
    nn.Conv2d: StochasticConv2d,
    nn.Conv3d: StochasticConv3d,
    nn.ConvTranspose1d: StochasticConvTranspose1d,
    nn.ConvTranspose2d: StochasticConvTranspose2d,
    nn.ConvTranspose3d: StochasticConvTranspose3d,
}
"""The stochastic class of each ``torch.nn`` convolution (what :func:`app.nn.convert` swaps in)."""
