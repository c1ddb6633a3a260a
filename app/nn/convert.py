"""Turning any model's convolutions into stochastic-backprop ones, and back to exact for a while."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
import torch.nn as nn

from .lean import FP8_DTYPES, LEAN_OF, STORAGE_DTYPES, LeanNormMixin, LeanStorageMixin
from .functional import DEFAULT_N_PROBES, DEFAULT_SKETCH
from .modules import STOCHASTIC_OF, StochasticConvMixin

try:  # the lean DynUNet blocks need MONAI; without it, convert leaves blocks alone
    from .blocks import BLOCK_OF, own_norms
except ImportError:  # pragma: no cover
    BLOCK_OF, own_norms = {}, None


def _selected(name: str, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def convert(
    module: nn.Module,
    n_probes: int = DEFAULT_N_PROBES,
    *,
    min_voxels: int = 0,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    probes: str = "rademacher",
    sketch: Optional[str] = DEFAULT_SKETCH,
    control: str = "mean",
    lean: bool = False,
    lean_storage: str = "bfloat16",
    conv_block: Optional[int] = None,
) -> nn.Module:
    """Makes every ``Conv{1,2,3}d``/``ConvTranspose{1,2,3}d`` of ``module`` a stochastic-backprop layer, in place.

    The layers keep their ``Parameter`` objects (an existing optimizer keeps working) and their
    state-dict keys; only their class changes. Layers already converted get the new options.

    Args:
        module: any model (MONAI UNet, BasicUNet, DynUNet, SegResNet, plain torch).
        n_probes: probes per layer; ``0`` makes the layers exact. Default :data:`DEFAULT_N_PROBES`.
        min_voxels: layers whose input has fewer voxels than this use exact backprop.
        include: ``fnmatch`` patterns of qualified layer names to convert (default: all).
        exclude: patterns of names to leave alone (checked after ``include``).
        probes, sketch, control: see :func:`app.nn.functional.stochastic_conv3d`. Defaults ``"rademacher"``,
            :data:`DEFAULT_SKETCH` (None means it too), ``"mean"``; transposed convolutions run
            ``"shifted"`` for ``"offset"`` (:func:`app.nn.functional.resolve_sketch`).
        lean: also swap ReLU/LeakyReLU for 1-bit-mask versions, PReLU/GELU for versions keeping
            their input in ``lean_storage`` dtype, and instance/group/batch norms for versions keeping
            only the normalised tensor (``app.nn.lean``): the whole block gets lean. MONAI's
            DynUNet blocks (``UnetBasicBlock``, ``UnetResBlock``, ``UnetUpBlock``,
            ``DynUNetSkipLayer``) become their :mod:`app.nn.blocks` subclasses, whose forward pass
            holds fewer tensors (no concatenation in the up blocks, norms in place).
        lean_storage: dtype the lean norms, PReLU and GELU keep their tensor in: ``"bfloat16"``
            (default), ``"float16"``, ``"float32"``, or, for measurements, ``"float8_e4m3fn"`` /
            ``"float8_e5m2"`` (see ``app.nn.lean.STORAGE_DTYPES``).
        conv_block: the stochastic layers' largest result per convolution call, in elements
            (:class:`app.nn.modules.StochasticConvMixin`); None (default): one call. Bounds cuDNN's
            workspace at the largest layers for less speed (:data:`app.nn.functional.CONV_BLOCK`).

    Returns:
        ``module`` itself.
    """
    if lean_storage not in STORAGE_DTYPES:
        raise ValueError(f"lean_storage must be one of {list(STORAGE_DTYPES)}, but got lean_storage={lean_storage!r}")
    for name, layer in module.named_modules():
        if not _selected(name, include, exclude):
            continue
        if lean and type(layer) in BLOCK_OF:
            layer.__class__ = BLOCK_OF[type(layer)]
            continue
        if lean and (type(layer) in LEAN_OF or isinstance(layer, LeanStorageMixin)):
            layer.__class__ = LEAN_OF.get(type(layer), type(layer))
            if isinstance(layer, LeanStorageMixin):
                storage = STORAGE_DTYPES[lean_storage]
                # fp8 is for the norms' x̂; PReLU and GELU keep theirs in bf16
                layer.storage = storage if isinstance(layer, LeanNormMixin) or storage not in FP8_DTYPES else torch.bfloat16
            continue
        if isinstance(layer, StochasticConvMixin):
            target = type(layer)
        else:
            target = STOCHASTIC_OF.get(type(layer))
            if target is None:
                continue
        layer.__class__ = target
        layer.set_sketch_options(n_probes, probes, sketch, control, min_voxels, conv_block)
    if lean and own_norms is not None:
        own_norms(module)
    return module


def stochastic_layers(module: nn.Module) -> Iterator[tuple[str, StochasticConvMixin]]:
    """``(name, layer)`` for every stochastic convolution in ``module``."""
    for name, layer in module.named_modules():
        if isinstance(layer, StochasticConvMixin):
            yield name, layer


@contextlib.contextmanager
def exact(module: nn.Module) -> Iterator[nn.Module]:
    """Context manager: the converted ``module`` uses exact backprop inside the block.

    Example:
        >>> with app.nn.exact(model):
        ...     loss_fn(model(x), y).backward()   # exact gradients, for diagnostics
    """
    layers = [layer for _, layer in stochastic_layers(module)]
    previous = [layer.force_exact for layer in layers]
    for layer in layers:
        layer.force_exact = True
    try:
        yield module
    finally:
        for layer, flag in zip(layers, previous):
            layer.force_exact = flag
