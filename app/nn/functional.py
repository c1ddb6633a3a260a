"""Stochastic-backprop convolutions: exact forward, exact input gradient, sketched weight gradient.

For ``Y = conv(X, W)`` the weight gradient ``dW_k = dYᵀ X_k`` (``X_k``: the ``N × C_in`` inputs seen by
kernel offset ``k``, ``N = B · prod(S_out)``) is the only reason a convolution keeps ``X``. These
functions keep a random sketch of ``X`` instead and return the unbiased estimate
``dW_k ≈ (1/r) (Zᵀ dY)ᵀ (Zᵀ X_k)`` with probes ``Z`` regenerated from a seed (``E[Z Zᵀ] = r I``).

Three sketches (``sketch=``, default :data:`DEFAULT_SKETCH`):
  ``"offset"``   probes live on the output grid; the forward pass keeps ``P_k = Zᵀ X_k`` for every
                 kernel offset (``r · C_in · K`` numbers). Cheap backward (``Zᵀ dY`` only).
  ``"shifted"``  probes live on the input grid; the forward keeps ``P = Zᵀ X`` (``r · C_in``) and
                 the backward shifts the probes with the convolution's own geometry
                 (``conv_weight_grad(Z, dY)``), so zero padding, stride and dilation are exact and
                 nothing wraps around. ``K`` times less memory per probe, more backward work.
  ``"spectral"`` the forward keeps, per sample, the input's Fourier coefficients at ``r``
                 frequencies (the ``r/2`` strongest exactly, ``r/2`` importance-sampled); a
                 shift is a phase, so they serve every kernel offset, and the backward is an
                 FFT of ``dY`` and an ``r``-term sum (:mod:`.spectral`). ``B · r · C_in`` complex
                 numbers (a transposed convolution's: of its input, on the strided grid). Where
                 ``r`` reaches the number of frequencies the layer keeps its input and is exact.

A transposed convolution sketches its input, the small side: ``"spectral"`` or ``"shifted"``; it
runs ``"shifted"`` for ``"offset"`` (:func:`resolve_sketch`, the one place this rule lives).

Control variate (``control="mean"``): ``X = μ + R`` with ``μ`` the per-sample, per-channel mean of the
input. ``dYᵀ μ_k`` is computed exactly in the backward pass (``μ`` is ``B × C_in`` numbers and the
zero padding is respected: ``μ`` is zero outside the volume), and only the residual ``R`` is
sketched. Unbiased, and much lower variance for post-activation inputs, whose mean is large.
The spectral sketch ignores ``control``: the mean is its zero frequency, always kept exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import spectral
from .probes import capturing, check_probe_options, device_seed, ensure_device_seed, iter_blocks, next_seed

SKETCHES = ("offset", "shifted", "spectral")
CONTROLS = ("mean", "none")

DEFAULT_SKETCH = "spectral"
"""Sketch of every functional, module and :func:`app.nn.convert` unless told otherwise: image-like
activations put most of their energy in few frequencies, so at equal ``r`` its weight-gradient
error is several times below the probe sketches' (docs/benchmarks.md)."""

DEFAULT_N_PROBES = 256
"""Probes per layer unless told otherwise: with the spectral sketch, whole-network dW cosine 0.99
against exact (the cosine of two exact mini-batch gradients) on the default U-Net at 96³
(docs/benchmarks.md)."""

IntOrTuple = Union[int, Sequence[int]]


def _ntuple(value: IntOrTuple, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, but got {name}={value!r}")
    return value


@dataclass(frozen=True)
class ConvGeometry:
    """Normalised convolution arguments (one entry per spatial dimension)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    kernel: tuple[int, ...]
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def dims(self) -> int:
        return len(self.stride)


def _weight_grad(
    inp: torch.Tensor, grad_out: torch.Tensor, weight_shape: Sequence[int], geom: ConvGeometry, groups: int = 1
) -> torch.Tensor:
    """Weight gradient of the *regular* convolution ``inp -> grad_out`` with ``geom``'s stride,
    padding and dilation: ``out[o, c, k] = Σ_{b,x} grad_out[b, o, x] · inp[b, c, s·x + d·k − p]``."""
    placeholder = grad_out.new_empty(1).expand(tuple(weight_shape))
    return torch.ops.aten.convolution_backward(
        grad_out, inp, placeholder, None, list(geom.stride), list(geom.padding), list(geom.dilation),
        False, [0] * geom.dims, groups, [False, True, False],
    )[1]


def _shape_carrier(grad_out: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``shape`` for an argument of which only the shape is used.

    ``aten.convolution_backward`` takes the convolution's input even when it computes only the
    input gradient (which does not depend on the input's values), and backends such as oneDNN (the
    CPU's) make it contiguous first: a stride-0 placeholder is copied into a new input-sized buffer
    there (a 32 → 32-channel layer's backward then peaks at 3× its input instead of torch's 2×).
    When ``grad_out`` holds enough elements this returns a contiguous view of its memory (nothing
    allocated, nothing copied); otherwise the stride-0 placeholder. Its values are never read.
    """
    numel = math.prod(shape)
    if grad_out.is_contiguous() and grad_out.numel() >= numel:
        return grad_out.reshape(-1)[:numel].view(tuple(shape))
    return grad_out.new_empty(1).expand(tuple(shape))


CONV_BLOCK = 1 << 27
"""A ``conv_block`` (elements of one convolution call's result) that takes the 256³ DynUNet's
full-resolution layers (32 channels, 2^29 elements) in 4 calls: the value of the benchmarks'
``blocked`` variant. cuDNN's bf16 forward and backward-data kernels take a workspace about twice
their result's size, which at those layers (2 GiB) sets the training step's peak."""

MIN_BLOCK_CHANNELS = 8
"""Fewest channels per blocked convolution call (tensor-core tiles stay full)."""


def _channel_block(shape: Sequence[int], conv_block: Optional[int]) -> Optional[int]:
    """Channels per call for a convolution result of ``shape`` ``(B, C, *S)``: None (one call)
    unless ``conv_block`` is set and the result holds more elements; then blocks of at most
    ``conv_block`` elements and at least :data:`MIN_BLOCK_CHANNELS` channels."""
    numel = math.prod(shape)
    if conv_block is None or numel <= conv_block:
        return None
    return max(MIN_BLOCK_CHANNELS, conv_block // (numel // shape[1]))


def _output_shape(x_shape: Sequence[int], weight: torch.Tensor, geom: ConvGeometry) -> tuple[int, ...]:
    """``(B, C_out, *S_out)`` of the convolution of an input of ``x_shape``."""
    spatial = []
    for d, n in enumerate(x_shape[2:]):
        s, p, dl, k = geom.stride[d], geom.padding[d], geom.dilation[d], geom.kernel[d]
        if geom.transposed:
            spatial.append((n - 1) * s - 2 * p + dl * (k - 1) + geom.output_padding[d] + 1)
        else:
            spatial.append((n + 2 * p - dl * (k - 1) - 1) // s + 1)
    channels = weight.shape[1] * geom.groups if geom.transposed else weight.shape[0]
    return (x_shape[0], channels, *spatial)


def _by_channel_blocks(channels: int, block: int, compute: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``compute(c0, c1)`` ``(B, c1 - c0, *S)`` for channel blocks ``[c0, c1)`` of at most ``block``
    channels, each written into one ``(B, channels, *S)`` result and freed before the next."""
    out: Optional[torch.Tensor] = None
    for c0 in range(0, channels, block):
        c1 = min(channels, c0 + block)
        part = compute(c0, c1)
        if out is None:
            out = part.new_empty((part.shape[0], channels, *part.shape[2:]))
        out[:, c0:c1] = part
        del part
    return out


def _input_grad(
    x_shape: Sequence[int], weight: torch.Tensor, grad_out: torch.Tensor, geom: ConvGeometry, block: Optional[int] = None
) -> torch.Tensor:
    """Exact gradient with respect to the convolution's input, from ``dY``, ``W`` and the input's shape.

    ATen's own (``aten.convolution_backward`` with the output mask ``(True, False, False)``): torch
    picks its backend from the input's shape as in the backward of ``torch.nn.functional.conv3d``
    (or ``conv_transpose3d``), so the result is torch's. With ``block`` (an ungrouped convolution
    only), the gradient is computed for at most ``block`` input channels at a time, each with its
    slice of the weight, into one output: the library's workspace for one call (cuDNN's for a bf16
    layer can be twice the gradient's size) is smaller for fewer channels (2 GiB for a 32-channel
    256³ gradient, 1.25 GiB for 8 of its channels on an H200).

    Args:
        x_shape: ``(B, C_in, *S_in)``.
        weight: the convolution's weight.
        grad_out: ``dY`` of shape ``(B, C_out, *S_out)``.
        block: input channels per call (None: all at once).

    Returns:
        ``(B, C_in, *S_in)``.
    """
    channels = x_shape[1]
    if block is None or block >= channels or geom.groups != 1:
        return _input_grad_call(x_shape, weight, grad_out, geom)
    # the weight's input channels: dim 1 of a regular (C_out, C_in, *K), dim 0 of a transposed (C_in, C_out, *K)
    return _by_channel_blocks(channels, block, lambda c0, c1: _input_grad_call(
        (x_shape[0], c1 - c0, *x_shape[2:]), weight[c0:c1] if geom.transposed else weight[:, c0:c1], grad_out, geom))


def _input_grad_call(x_shape: Sequence[int], weight: torch.Tensor, grad_out: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """:func:`_input_grad` in one ``aten.convolution_backward`` call."""
    return torch.ops.aten.convolution_backward(
        grad_out, _shape_carrier(grad_out, x_shape), weight, None, list(geom.stride), list(geom.padding), list(geom.dilation),
        geom.transposed, list(geom.output_padding) or [0] * geom.dims, geom.groups, [True, False, False],
    )[0]


def _conv(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], geom: ConvGeometry, block: Optional[int] = None
) -> torch.Tensor:
    """The convolution's output ``(B, C_out, *S_out)``; with ``block`` (an ungrouped convolution
    only), computed for at most ``block`` output channels at a time into one output, each with its
    slice of the weight and bias (a library workspace is smaller for fewer channels)."""
    channels = weight.shape[1] if geom.transposed else weight.shape[0]
    if block is None or block >= channels or geom.groups != 1:
        return _conv_call(x, weight, bias, geom)
    # the weight's output channels: dim 0 of a regular (C_out, C_in, *K), dim 1 of a transposed (C_in, C_out, *K)
    return _by_channel_blocks(channels, block, lambda c0, c1: _conv_call(
        x, weight[:, c0:c1] if geom.transposed else weight[c0:c1], None if bias is None else bias[c0:c1], geom))


def _conv_call(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], geom: ConvGeometry) -> torch.Tensor:
    """:func:`_conv` in one ``aten.convolution`` call."""
    return torch.ops.aten.convolution(
        x, weight, bias, list(geom.stride), list(geom.padding), list(geom.dilation),
        geom.transposed, list(geom.output_padding) or [0] * geom.dims, geom.groups,
    )


def _pad_end(t: torch.Tensor, extra: Sequence[int]) -> torch.Tensor:
    """Zero-pads the trailing end of each spatial dimension of ``t`` by ``extra``."""
    if not any(extra):
        return t
    pad: list[int] = []
    for e in reversed(extra):
        pad += [0, e]
    return F.pad(t, pad)


def _transposed_overhang(geom: ConvGeometry, in_spatial: Sequence[int], out_spatial: Sequence[int]) -> tuple[int, ...]:
    """How many voxels the regular convolution mapping a transposed conv's output grid back onto its
    input grid produces beyond the input grid (non-zero only when ``output_padding >= stride``)."""
    return tuple(
        (o + 2 * p - d * (k - 1) - 1) // s + 1 - i
        for i, o, s, p, d, k in zip(in_spatial, out_spatial, geom.stride, geom.padding, geom.dilation, geom.kernel)
    )


def _box_sums(t: torch.Tensor, geom: ConvGeometry, in_spatial: Sequence[int]) -> torch.Tensor:
    """``out[b, c, k] = Σ_x t[b, c, x] · 1[0 <= s·x + d·k − p < S_in]`` for a regular convolution:
    for each kernel offset, the sum of ``t`` (on the output grid) over the positions whose input
    voxel lies inside the volume. Separable: one pass over ``t`` and sums of the few edge rows.

    Args:
        t: ``(B, C, *S_out)``.

    Returns:
        ``(B, C, *K)`` in fp32.
    """
    for i, (size_in, k_size) in enumerate(zip(in_spatial, geom.kernel)):
        dim, stride, pad, dil = 2 + i, geom.stride[i], geom.padding[i], geom.dilation[i]
        size = t.shape[dim]
        total = t.sum(dim, keepdim=True, dtype=torch.float32)
        parts = []
        for k in range(k_size):
            lo = max(0, -((dil * k - pad) // stride))  # ceil((p − d·k) / s)
            hi = min(size, (size_in - 1 + pad - dil * k) // stride + 1)
            if hi <= lo:
                parts.append(torch.zeros_like(total))
                continue
            part = total
            if lo > 0:
                part = part - t.narrow(dim, 0, lo).sum(dim, keepdim=True, dtype=torch.float32)
            if hi < size:
                part = part - t.narrow(dim, hi, size - hi).sum(dim, keepdim=True, dtype=torch.float32)
            parts.append(part)
        t = torch.cat(parts, dim)
    return t


def _bmm_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_{b,x} a[b, i, x] b[b, j, x]`` for ``a (B, I, *S)``, ``b (B, J, *S)``: ``(I, J)`` in fp32."""
    a = a.flatten(2)
    b = b.flatten(2)
    return torch.bmm(a, b.transpose(1, 2)).float().sum(0)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off in :class:`_StochasticConv`'s forward and backward (the inputs are cast
    already; the sketch and the gradients keep their own precision). While ``torch.compile`` traces,
    a no-op: dynamo loses the autocast state when it speculates a Function whose backward enters such
    a block (later layers then see autocast off), and the traced code has no operation that autocast
    would change (the convolutions' operands share one dtype, channel mixes run in ``x``'s dtype,
    FFTs and the gradient sums in fp32 or complex64)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class _StochasticConv(torch.autograd.Function):
    """Autograd function behind every stochastic convolution. Not public: use the functionals."""

    @staticmethod
    def forward(ctx, x, weight, bias, geom: ConvGeometry, n_probes: int, probes: str, sketch: str, control: str, seed: int,
                conv_block: Optional[int] = None):
        with _autocast_off(x.device.type):
            ctx.conv_block = conv_block
            block = None if conv_block is None else _channel_block(_output_shape(x.shape, weight, geom), conv_block)
            y = _conv(x, weight, bias, geom, block)
            ctx.geom, ctx.n_probes, ctx.probes, ctx.sketch = geom, n_probes, probes, sketch
            ctx.x_shape, ctx.has_bias = tuple(x.shape), bias is not None
            ctx.budget = y.numel()
            keep_weight = weight if ctx.needs_input_grad[0] else None
            if not ctx.needs_input_grad[1]:
                ctx.save_for_backward(keep_weight, None)
                return y
            if sketch == "spectral":
                ctx.fft_sizes, grid = _spectral_grids(x.shape[2:], y.shape[2:], geom, x.device.type)
                # spectrum blocks of at most half an output: the last decoder layers run at the forward peak
                state = spectral.sketch(x, grid, n_probes, seed, ctx.budget // 2)
            else:
                mu = x.mean(dim=tuple(range(2, x.dim())), dtype=torch.float32) if control == "mean" else None  # (B, C_in)
                state = (_sketch_input(x, mu, geom, n_probes, probes, sketch, seed, ctx.budget, tuple(y.shape[2:])), mu)
            # The probe sketches regenerate their probes from the seed: keep it as a tensor, so that
            # under non-reentrant checkpointing the recomputed forward's saved tensors (sketch and
            # seed together) replace these and always match. The spectral backward needs the sketch
            # only; not keeping its seed also keeps a compiled graph from saving the device seed
            # counter (:func:`app.nn.probes.device_seed`), which later layers advance in place.
            seed_t = None if sketch == "spectral" else torch.tensor(seed, dtype=torch.int64)
            ctx.save_for_backward(keep_weight, seed_t, *state)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, seed_t, *state = ctx.saved_tensors
        geom = ctx.geom
        grad_x = grad_w = grad_b = None
        with _autocast_off(grad_y.device.type):
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_y.sum(dim=(0, *range(2, grad_y.dim())))
            if ctx.needs_input_grad[0]:
                grad_x = _input_grad(ctx.x_shape, weight, grad_y, geom, _channel_block(ctx.x_shape, ctx.conv_block))
            if ctx.needs_input_grad[1] and ctx.sketch == "spectral":
                estimate = spectral.transposed_weight_grad if geom.transposed else spectral.weight_grad
                grad_w = estimate(grad_y, *state, ctx.fft_sizes, geom, ctx.budget)
            elif ctx.needs_input_grad[1]:
                grad_w = _estimate_weight_grad(grad_y, *state, int(seed_t), ctx)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _sketch_input(
    x: torch.Tensor,
    mu: Optional[torch.Tensor],
    geom: ConvGeometry,
    n_probes: int,
    probes: str,
    sketch: str,
    seed: int,
    budget: int,
    out_spatial: tuple[int, ...],
) -> torch.Tensor:
    """The forward pass's sketch of the (mean-removed) input, in fp32.

    Returns:
        ``offset``: ``P`` of shape ``(r, C_in, *K)`` with ``P[j, c, k] = Σ_n Z[n, j] R_k[n, c]``;
        ``shifted`` (and transposed): ``P`` of shape ``(r, C_in)`` with ``P[j, c] = Σ_m Z[m, j] R[m, c]``.
    """
    batch, c_in = x.shape[:2]
    kernel = geom.kernel
    if sketch == "offset":
        out = x.new_zeros((n_probes, c_in, *kernel), dtype=torch.float32)
        for (start, stop), z in iter_blocks(probes, seed, n_probes, batch, out_spatial, budget, x.device, x.dtype):
            width = stop - start
            part = _weight_grad(x, z, (width, c_in, *kernel), geom).float()
            if mu is not None:  # subtract Σ_n Z[n, j] μ_k[n, c] (μ is zero in the padding)
                hits = _box_sums(z, geom, x.shape[2:])
                part -= torch.einsum("bjk,bc->jck", hits.view(batch, width, -1), mu).view_as(part)
            out[start:stop] = part
        return out
    out = x.new_zeros((n_probes, c_in), dtype=torch.float32)
    for (start, stop), z in iter_blocks(probes, seed, n_probes, batch, x.shape[2:], budget, x.device, x.dtype):
        part = _bmm_sum(z, x)
        if mu is not None:
            part -= z.flatten(2).sum(2, dtype=torch.float32).t() @ mu
        out[start:stop] = part
    return out


def _estimate_weight_grad(grad_y: torch.Tensor, sketch_p: torch.Tensor, mu: Optional[torch.Tensor], seed: int, ctx) -> torch.Tensor:
    """``dW ≈ (1/r) Σ_j (Zᵀ dY)_j ⊗ P_j`` plus the exact control-variate part, in fp32 then cast."""
    geom: ConvGeometry = ctx.geom
    r, groups = ctx.n_probes, geom.groups
    batch, c_out = grad_y.shape[:2]
    c_in = ctx.x_shape[1]
    kernel = geom.kernel
    k_numel = 1
    for k in kernel:
        k_numel *= k
    in_spatial = ctx.x_shape[2:]
    dev, dtype = grad_y.device, grad_y.dtype
    cig, cog = c_in // groups, c_out // groups
    if geom.transposed:  # weight (C_in, C_out/g, *K)
        overhang = _transposed_overhang(geom, in_spatial, grad_y.shape[2:])
        grad_w = grad_y.new_zeros((groups, cig, cog, k_numel), dtype=torch.float32)
        p = sketch_p.view(r, groups, cig)
        for (start, stop), z in iter_blocks(ctx.probes, seed, r, batch, in_spatial, ctx.budget, dev, dtype):
            z = _pad_end(z, overhang)
            q = _weight_grad(grad_y, z, (stop - start, c_out, *kernel), geom).float()  # (rb, C_out, *K)
            grad_w += torch.einsum("jgc,jgok->gcok", p[start:stop], q.view(stop - start, groups, cog, k_numel))
        grad_w /= r
        if mu is not None:
            ones = _pad_end(grad_y.new_ones((1, 1, *in_spatial)), overhang)
            u = _weight_grad(grad_y.reshape(1, batch * c_out, *grad_y.shape[2:]), ones, (1, batch * c_out, *kernel), geom)
            grad_w += torch.einsum("bgc,bgok->gcok", mu.view(batch, groups, cig), u.float().view(batch, groups, cog, k_numel))
        return grad_w.reshape(c_in, cog, *kernel)
    # regular convolution: weight (C_out, C_in/g, *K)
    grad_w = grad_y.new_zeros((groups, cog, cig, k_numel), dtype=torch.float32)
    if ctx.sketch == "offset":
        q = grad_y.new_zeros((r, c_out), dtype=torch.float32)
        for (start, stop), z in iter_blocks(ctx.probes, seed, r, batch, grad_y.shape[2:], ctx.budget, dev, dtype):
            q[start:stop] = _bmm_sum(z, grad_y)
        p = sketch_p.view(r, groups, cig, k_numel)
        grad_w += torch.einsum("jgo,jgck->gock", q.view(r, groups, cog), p)
    else:
        p = sketch_p.view(r, groups, cig)
        for (start, stop), z in iter_blocks(ctx.probes, seed, r, batch, in_spatial, ctx.budget, dev, dtype):
            q = _weight_grad(z, grad_y, (c_out, stop - start, *kernel), geom).float()  # (C_out, rb, *K)
            grad_w += torch.einsum("gojk,jgc->gock", q.view(groups, cog, stop - start, k_numel), p[start:stop])
    grad_w /= r
    if mu is not None:
        t = _box_sums(grad_y, geom, in_spatial)
        grad_w += torch.einsum("bgc,bgok->gock", mu.view(batch, groups, cig), t.view(batch, groups, cog, k_numel))
    return grad_w.reshape(c_out, cig, *kernel)


def resolve_sketch(sketch: Optional[str], transposed: bool) -> str:
    """The sketch a convolution runs for the option ``sketch``: the one rule for every entry point.

    ``None`` is :data:`DEFAULT_SKETCH`. A transposed convolution has no ``"offset"`` sketch (that one
    lives on the output grid, a transposed convolution's large side) and runs ``"shifted"``, the
    input-grid sketch, for it: ``convert(model, sketch="offset")`` then works on models with
    up-sampling layers.

    Raises:
        ValueError: ``sketch`` is not one of :data:`SKETCHES` (or None).
    """
    if sketch is None:
        return DEFAULT_SKETCH
    if sketch not in SKETCHES:
        raise ValueError(f"sketch must be one of {list(SKETCHES)} (or None: {DEFAULT_SKETCH!r}), but got sketch={sketch!r}")
    return "shifted" if transposed and sketch == "offset" else sketch


def check_sketch_options(n_probes: int, probes: str, sketch: Optional[str], control: str) -> None:
    """Raises ``ValueError`` naming the option when a sketch option is not usable."""
    check_probe_options(n_probes, probes)
    resolve_sketch(sketch, transposed=False)
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {list(CONTROLS)}, but got control={control!r}")


def _resolve_padding(
    x: torch.Tensor, padding: Union[str, IntOrTuple], kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Turns ``"valid"``/``"same"``/ints into per-dimension symmetric padding, zero-padding ``x``
    explicitly where ``"same"`` needs one more voxel on the right (as torch does)."""
    dims = len(kernel)
    if not isinstance(padding, str):
        return x, _ntuple(padding, dims, "padding")
    if padding == "valid":
        return x, (0,) * dims
    if padding != "same":
        raise ValueError(f"padding must be 'valid', 'same', an int or a tuple of ints, but got padding={padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"padding='same' needs stride=1 (as in torch.nn), but got stride={stride}")
    total = [d * (k - 1) for d, k in zip(dilation, kernel)]
    left = tuple(t // 2 for t in total)
    extra = [t - 2 * l for t, l in zip(total, left)]
    return _pad_end(x, extra), left


def _spectral_grids(
    in_spatial: Sequence[int], out_spatial: Sequence[int], geom: ConvGeometry, device_type: str
) -> tuple[tuple[int, ...], list[int]]:
    """``(M, grid)``: the spectral sketch's FFT lengths on a ``device_type`` device and the grid its
    input is transformed on (``M`` itself, or ``M / s`` for a transposed convolution, whose input is
    the strided side)."""
    if geom.transposed:
        sizes = spectral.fft_sizes(out_spatial, in_spatial, geom, device_type)
        return sizes, [m // s for m, s in zip(sizes, geom.stride)]
    sizes = spectral.fft_sizes(in_spatial, out_spatial, geom, device_type)
    return sizes, list(sizes)


def _spectral_frequencies(in_spatial: Sequence[int], geom: ConvGeometry, device_type: str = "cpu") -> int:
    """Frequencies a spectral sketch of this convolution could keep on a ``device_type`` device."""
    if geom.transposed:
        out_spatial = [
            (n - 1) * s - 2 * p + d * (k - 1) + op + 1
            for n, s, p, d, k, op in zip(in_spatial, geom.stride, geom.padding, geom.dilation, geom.kernel, geom.output_padding)
        ]
    else:
        out_spatial = [
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(in_spatial, geom.padding, geom.dilation, geom.kernel, geom.stride)
        ]
    return spectral.n_frequencies(_spectral_grids(in_spatial, out_spatial, geom, device_type)[1])


def _autocast_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Casts like autocast would for a convolution; autograd casts ``dW`` back to the parameter dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return x, weight, bias


def _stochastic_conv_nd(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    dims: int,
    transposed: bool,
    stride: IntOrTuple,
    padding: Union[str, IntOrTuple],
    output_padding: IntOrTuple,
    dilation: IntOrTuple,
    groups: int,
    n_probes: int,
    probes: str,
    sketch: Optional[str],
    control: str,
    seed: Optional[int],
    conv_block: Optional[int] = None,
) -> torch.Tensor:
    """The n-dimensional core of every functional and module: validates, normalises the arguments
    once, and runs the stochastic convolution (or the ordinary one where no sketch is kept).
    ``conv_block``: the layers' option (:class:`app.nn.modules.StochasticConvMixin`), None for the
    functionals."""
    name = f"stochastic_conv{'_transpose' if transposed else ''}{dims}d"
    if input.dim() != dims + 2:
        raise ValueError(f"{name} expects input of shape (B, C, {', '.join('DHW'[3 - dims:])}), but got shape {tuple(input.shape)}")
    check_sketch_options(n_probes, probes, sketch, control)
    sketch = resolve_sketch(sketch, transposed)
    stride_t = _ntuple(stride, dims, "stride")
    dilation_t = _ntuple(dilation, dims, "dilation")
    kernel = tuple(weight.shape[2:])
    if transposed and isinstance(padding, str):
        raise ValueError(f"{name}: padding must be an int or a tuple of ints, but got padding={padding!r}")
    x, padding_t = _resolve_padding(input, padding, kernel, stride_t, dilation_t)
    c_in = x.shape[1]
    expected = weight.shape[0] if transposed else weight.shape[1] * groups
    if c_in != expected:
        raise ValueError(f"{name}: input has {c_in} channels but weight {tuple(weight.shape)} with groups={groups} expects {expected}")
    geom = ConvGeometry(
        stride=stride_t, padding=padding_t, dilation=dilation_t, groups=groups, kernel=kernel, transposed=transposed,
        output_padding=_ntuple(output_padding, dims, "output_padding") if transposed else (),
    )
    x, weight, bias = _autocast_inputs(x, weight, bias)
    if n_probes == 0 or not torch.is_grad_enabled() or not weight.requires_grad or (
        sketch == "spectral" and n_probes >= _spectral_frequencies(x.shape[2:], geom, x.device.type)
    ):
        return _conv(x, weight, bias, geom)
    return _StochasticConv.apply(
        x, weight, bias, geom, n_probes, probes, sketch, control, _draw_seed(seed, sketch, x.device), conv_block
    )


def _draw_seed(seed: Optional[int], sketch: str, device: torch.device) -> Union[int, torch.Tensor]:
    """The per-call seed: ``seed`` itself when given; for the spectral sketch inside a compiled or
    captured graph, a device tensor advanced by the graph (:func:`app.nn.probes.device_seed`); else
    the next seed of the host stream (:func:`app.nn.manual_seed`). The probe sketches seed
    ``torch.Generator`` objects on the host and always take a host seed."""
    if seed is not None:
        return int(seed)
    if sketch == "spectral":
        if capturing(device):
            return device_seed(device)
        if device.type == "cuda":
            ensure_device_seed(device)  # so that a CUDA-graph capture after eager warm-up steps finds it
    return next_seed()


def stochastic_conv1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrTuple = 1,
    padding: Union[str, IntOrTuple] = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    *,
    n_probes: int = DEFAULT_N_PROBES,
    probes: str = "rademacher",
    sketch: Optional[str] = DEFAULT_SKETCH,
    control: str = "mean",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """1D convolution (``torch.nn.functional.conv1d``) with an exact forward pass and input gradient
    and an unbiased, sketched weight gradient.

    Args:
        input: ``(B, C_in, L_in)``.
        weight: ``(C_out, C_in / groups, kL)``.
        bias: ``(C_out,)`` or None. Default None.
        stride: int or 1-tuple. Default 1.
        padding: int, 1-tuple, ``"valid"`` or ``"same"`` (zero padding). Default 0.
        dilation: int or 1-tuple. Default 1.
        groups: input and output channels are split into ``groups`` blocks. Default 1.
        n_probes: probes ``r`` of the trace estimator; 0 is exact backprop. Default :data:`DEFAULT_N_PROBES`.
        probes: ``"rademacher"``, ``"gaussian"`` or ``"orthogonal"`` (``r`` a power of 2). Default ``"rademacher"``.
        sketch: ``"spectral"``, ``"shifted"`` or ``"offset"`` (module docstring); None means
            :data:`DEFAULT_SKETCH`. Default :data:`DEFAULT_SKETCH`.
        control: ``"mean"`` (exact per-channel-mean control variate) or ``"none"``. Default ``"mean"``.
        seed: probe seed; None draws one from :func:`app.nn.manual_seed`'s stream. Default None.

    Shape:
        - output: ``(B, C_out, L_out)``, ``L_out = floor((L_in + 2·padding − dilation·(kL − 1) − 1) / stride) + 1``.

    Example:
        >>> x = torch.randn(2, 4, 50, requires_grad=True)
        >>> w = torch.randn(8, 4, 3, requires_grad=True)
        >>> stochastic_conv1d(x, w, padding=1, n_probes=16).sum().backward()  # x.grad exact, w.grad estimated
    """
    return _stochastic_conv_nd(
        input, weight, bias, dims=1, transposed=False, stride=stride, padding=padding, output_padding=0, dilation=dilation,
        groups=groups, n_probes=n_probes, probes=probes, sketch=sketch, control=control, seed=seed,
    )


def stochastic_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrTuple = 1,
    padding: Union[str, IntOrTuple] = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    *,
    n_probes: int = DEFAULT_N_PROBES,
    probes: str = "rademacher",
    sketch: Optional[str] = DEFAULT_SKETCH,
    control: str = "mean",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """2D convolution (``torch.nn.functional.conv2d``) with an exact forward pass and input gradient
    and an unbiased, sketched weight gradient.

    Args:
        input: ``(B, C_in, H_in, W_in)``.
        weight: ``(C_out, C_in / groups, kH, kW)``.
        bias: ``(C_out,)`` or None. Default None.
        stride: int or 2-tuple. Default 1.
        padding: int, 2-tuple, ``"valid"`` or ``"same"`` (zero padding). Default 0.
        dilation: int or 2-tuple. Default 1.
        groups: input and output channels are split into ``groups`` blocks. Default 1.
        n_probes, probes, sketch, control, seed: as in :func:`stochastic_conv1d`. Defaults
            :data:`DEFAULT_N_PROBES`, ``"rademacher"``, :data:`DEFAULT_SKETCH`, ``"mean"``, None.

    Shape:
        - output: ``(B, C_out, H_out, W_out)``, per dimension
          ``out = floor((in + 2·padding − dilation·(k − 1) − 1) / stride) + 1``.

    Example:
        >>> x = torch.randn(2, 4, 32, 33, requires_grad=True)
        >>> w = torch.randn(8, 4, 3, 3, requires_grad=True)
        >>> stochastic_conv2d(x, w, padding=1, n_probes=16).sum().backward()  # x.grad exact, w.grad estimated
    """
    return _stochastic_conv_nd(
        input, weight, bias, dims=2, transposed=False, stride=stride, padding=padding, output_padding=0, dilation=dilation,
        groups=groups, n_probes=n_probes, probes=probes, sketch=sketch, control=control, seed=seed,
    )


def stochastic_conv3d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrTuple = 1,
    padding: Union[str, IntOrTuple] = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    *,
    n_probes: int = DEFAULT_N_PROBES,
    probes: str = "rademacher",
    sketch: Optional[str] = DEFAULT_SKETCH,
    control: str = "mean",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """3D convolution (``torch.nn.functional.conv3d``) with an exact forward pass and input gradient
    and an unbiased, sketched weight gradient.

    Args:
        input: ``(B, C_in, D_in, H_in, W_in)``.
        weight: ``(C_out, C_in / groups, kD, kH, kW)``.
        bias: ``(C_out,)`` or None. Default None.
        stride: int or 3-tuple. Default 1.
        padding: int, 3-tuple, ``"valid"`` or ``"same"`` (zero padding). Default 0.
        dilation: int or 3-tuple. Default 1.
        groups: input and output channels are split into ``groups`` blocks. Default 1.
        n_probes, probes, sketch, control, seed: as in :func:`stochastic_conv1d`. Defaults
            :data:`DEFAULT_N_PROBES`, ``"rademacher"``, :data:`DEFAULT_SKETCH`, ``"mean"``, None.

    Shape:
        - output: ``(B, C_out, D_out, H_out, W_out)``, per dimension
          ``out = floor((in + 2·padding − dilation·(k − 1) − 1) / stride) + 1``.

    Example:
        >>> x = torch.randn(2, 4, 16, 17, 18, requires_grad=True)
        >>> w = torch.randn(8, 4, 3, 3, 3, requires_grad=True)
        >>> stochastic_conv3d(x, w, padding=1, n_probes=16).sum().backward()  # x.grad exact, w.grad estimated
    """
    return _stochastic_conv_nd(
        input, weight, bias, dims=3, transposed=False, stride=stride, padding=padding, output_padding=0, dilation=dilation,
        groups=groups, n_probes=n_probes, probes=probes, sketch=sketch, control=control, seed=seed,
    )


def stochastic_conv_transpose1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
    *,
    n_probes: int = DEFAULT_N_PROBES,
    probes: str = "rademacher",
    sketch: Optional[str] = DEFAULT_SKETCH,
    control: str = "mean",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """1D transposed convolution (``torch.nn.functional.conv_transpose1d``, same arguments in the same
    order) with an exact forward pass and input gradient and an unbiased, sketched weight gradient.

    The sketch is taken of the input, the small side: ``"spectral"`` (its Fourier coefficients on the
    strided grid) or ``"shifted"``; ``"offset"`` runs ``"shifted"`` (:func:`resolve_sketch`).

    Args:
        input: ``(B, C_in, L_in)``.
        weight: ``(C_in, C_out / groups, kL)``.
        bias: ``(C_out,)`` or None. Default None.
        stride: int or 1-tuple. Default 1.
        padding: int or 1-tuple, removed from both ends of the output. Default 0.
        output_padding: int or 1-tuple added to the end of the output. Default 0.
        groups: input and output channels are split into ``groups`` blocks. Default 1.
        dilation: int or 1-tuple. Default 1.
        n_probes, probes, sketch, control, seed: as in :func:`stochastic_conv1d`. Defaults
            :data:`DEFAULT_N_PROBES`, ``"rademacher"``, :data:`DEFAULT_SKETCH`, ``"mean"``, None.

    Shape:
        - output: ``(B, C_out, L_out)``,
          ``L_out = (L_in − 1)·stride − 2·padding + dilation·(kL − 1) + output_padding + 1``.

    Example:
        >>> x = torch.randn(2, 8, 25, requires_grad=True)
        >>> w = torch.randn(8, 4, 2, requires_grad=True)
        >>> stochastic_conv_transpose1d(x, w, stride=2, n_probes=16).shape
        torch.Size([2, 4, 50])
    """
    return _stochastic_conv_nd(
        input, weight, bias, dims=1, transposed=True, stride=stride, padding=padding, output_padding=output_padding,
        dilation=dilation, groups=groups, n_probes=n_probes, probes=probes, sketch=sketch, control=control, seed=seed,
    )


def stochastic_conv_transpose2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
    *,
    n_probes: int = DEFAULT_N_PROBES,
    probes: str = "rademacher",
    sketch: Optional[str] = DEFAULT_SKETCH,
    control: str = "mean",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """2D transposed convolution (``torch.nn.functional.conv_transpose2d``, same arguments in the same
    order) with an exact forward pass and input gradient and an unbiased, sketched weight gradient.

    Args:
        input: ``(B, C_in, H_in, W_in)``.
        weight: ``(C_in, C_out / groups, kH, kW)``.
        bias: ``(C_out,)`` or None. Default None.
        stride: int or 2-tuple. Default 1.
        padding: int or 2-tuple, removed from both ends of each output dimension. Default 0.
        output_padding: int or 2-tuple added to the end of each output dimension. Default 0.
        groups: input and output channels are split into ``groups`` blocks. Default 1.
        dilation: int or 2-tuple. Default 1.
        n_probes, probes, sketch, control, seed: as in :func:`stochastic_conv_transpose1d`. Defaults
            :data:`DEFAULT_N_PROBES`, ``"rademacher"``, :data:`DEFAULT_SKETCH`, ``"mean"``, None.

    Shape:
        - output: ``(B, C_out, H_out, W_out)``, per dimension
          ``out = (in − 1)·stride − 2·padding + dilation·(k − 1) + output_padding + 1``.

    Example:
        >>> x = torch.randn(2, 8, 16, 17, requires_grad=True)
        >>> w = torch.randn(8, 4, 2, 2, requires_grad=True)
        >>> stochastic_conv_transpose2d(x, w, stride=2, n_probes=16).shape
        torch.Size([2, 4, 32, 34])
    """
    return _stochastic_conv_nd(
        input, weight, bias, dims=2, transposed=True, stride=stride, padding=padding, output_padding=output_padding,
        dilation=dilation, groups=groups, n_probes=n_probes, probes=probes, sketch=sketch, control=control, seed=seed,
    )


def stochastic_conv_transpose3d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntOrTuple = 1,
    padding: IntOrTuple = 0,
    output_padding: IntOrTuple = 0,
    groups: int = 1,
    dilation: IntOrTuple = 1,
    *,
    n_probes: int = DEFAULT_N_PROBES,
    probes: str = "rademacher",
    sketch: Optional[str] = DEFAULT_SKETCH,
    control: str = "mean",
    seed: Optional[int] = None,
) -> torch.Tensor:
    """3D transposed convolution (``torch.nn.functional.conv_transpose3d``, same arguments in the same
    order) with an exact forward pass and input gradient and an unbiased, sketched weight gradient.

    Args:
        input: ``(B, C_in, D_in, H_in, W_in)``.
        weight: ``(C_in, C_out / groups, kD, kH, kW)``.
        bias: ``(C_out,)`` or None. Default None.
        stride: int or 3-tuple. Default 1.
        padding: int or 3-tuple, removed from both ends of each output dimension. Default 0.
        output_padding: int or 3-tuple added to the end of each output dimension. Default 0.
        groups: input and output channels are split into ``groups`` blocks. Default 1.
        dilation: int or 3-tuple. Default 1.
        n_probes, probes, sketch, control, seed: as in :func:`stochastic_conv_transpose1d`. Defaults
            :data:`DEFAULT_N_PROBES`, ``"rademacher"``, :data:`DEFAULT_SKETCH`, ``"mean"``, None.

    Shape:
        - output: ``(B, C_out, D_out, H_out, W_out)``, per dimension
          ``out = (in − 1)·stride − 2·padding + dilation·(k − 1) + output_padding + 1``.

    Example:
        >>> x = torch.randn(2, 8, 8, 9, 10, requires_grad=True)
        >>> w = torch.randn(8, 4, 2, 2, 2, requires_grad=True)
        >>> stochastic_conv_transpose3d(x, w, stride=2, n_probes=16).shape
        torch.Size([2, 4, 16, 18, 20])
    """
    return _stochastic_conv_nd(
        input, weight, bias, dims=3, transposed=True, stride=stride, padding=padding, output_padding=output_padding,
        dilation=dilation, groups=groups, n_probes=n_probes, probes=probes, sketch=sketch, control=control, seed=seed,
    )


__all__ = [
    "DEFAULT_SKETCH",
    "DEFAULT_N_PROBES",
    "SKETCHES",
    "CONTROLS",
    "ConvGeometry",
    "resolve_sketch",
    "check_sketch_options",
    "stochastic_conv1d",
    "stochastic_conv2d",
    "stochastic_conv3d",
    "stochastic_conv_transpose1d",
    "stochastic_conv_transpose2d",
    "stochastic_conv_transpose3d",
]
