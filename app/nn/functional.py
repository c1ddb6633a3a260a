"""Stochastic-backprop convolutions: exact forward, exact input gradient, sketched weight gradient.

For ``Y = conv(X, W)`` the weight gradient ``dW_k = dYᵀ X_k`` (``X_k``: the ``N × C_in`` inputs seen by
kernel offset ``k``, ``N = B · prod(S_out)``) is the only reason a convolution keeps ``X``. These
functions keep a random sketch of ``X`` instead and return the unbiased estimate
``dW_k ≈ (1/r) (Zᵀ dY)ᵀ (Zᵀ X_k)`` with probes ``Z`` regenerated from a seed (``E[Z Zᵀ] = r I``).

Two sketches (``sketch=``):
  ``"offset"``   probes live on the output grid; the forward pass keeps ``P_k = Zᵀ X_k`` for every
                 kernel offset (``r · C_in · K`` numbers). Cheap backward (``Zᵀ dY`` only).
  ``"shifted"``  probes live on the input grid; the forward keeps ``P = Zᵀ X`` (``r · C_in``) and
                 the backward shifts the probes with the convolution's own geometry
                 (``conv_weight_grad(Z, dY)``), so zero padding, stride and dilation are exact and
                 nothing wraps around. ``K`` times less memory per probe, more backward work.
                 Transposed convolutions use this one or ``"spectral"`` (their input is the small side).
  ``"spectral"`` the forward keeps, per sample, the input's Fourier coefficients at ``r``
                 frequencies (the ``r/2`` strongest exactly, ``r/2`` importance-sampled); a
                 shift is a phase, so they serve every kernel offset, and the backward is an
                 FFT of ``dY`` and an ``r``-term sum (:mod:`.spectral`). ``B · r · C_in`` complex
                 numbers (a transposed convolution's: of its input, on the strided grid). Where
                 ``r`` reaches the number of frequencies the layer keeps its input and is exact.

Control variate (``control="mean"``): ``X = μ + R`` with ``μ`` the per-sample, per-channel mean of the
input. ``dYᵀ μ_k`` is computed exactly in the backward pass (``μ`` is ``B × C_in`` numbers and the
zero padding is respected: ``μ`` is zero outside the volume), and only the residual ``R`` is
sketched. Unbiased, and much lower variance for post-activation inputs, whose mean is large.
The spectral sketch ignores ``control``: the mean is its zero frequency, always kept exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import spectral
from .probes import check_probe_options, iter_blocks, next_seed

SKETCHES = ("offset", "shifted", "spectral")
CONTROLS = ("mean", "none")

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


def _input_grad(x_shape: Sequence[int], weight: torch.Tensor, grad_out: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Exact gradient with respect to the convolution's input."""
    if geom.transposed:
        conv = (F.conv1d, F.conv2d, F.conv3d)[geom.dims - 1]
        grad_x = conv(grad_out, weight, None, geom.stride, geom.padding, geom.dilation, geom.groups)
        for dim, size in enumerate(x_shape[2:]):
            grad_x = grad_x.narrow(2 + dim, 0, size)
        return grad_x
    placeholder = grad_out.new_empty(1).expand(tuple(x_shape))
    return torch.ops.aten.convolution_backward(
        grad_out, placeholder, weight, None, list(geom.stride), list(geom.padding), list(geom.dilation),
        False, [0] * geom.dims, geom.groups, [True, False, False],
    )[0]


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], geom: ConvGeometry) -> torch.Tensor:
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


class _StochasticConv(torch.autograd.Function):
    """Autograd function behind every stochastic convolution. Not public: use the functionals."""

    @staticmethod
    def forward(ctx, x, weight, bias, geom: ConvGeometry, n_probes: int, probes: str, sketch: str, control: str, seed: int):
        with torch.autocast(x.device.type, enabled=False):
            y = _conv(x, weight, bias, geom)
            ctx.geom, ctx.n_probes, ctx.probes, ctx.sketch = geom, n_probes, probes, sketch
            ctx.x_shape, ctx.has_bias = tuple(x.shape), bias is not None
            ctx.budget = y.numel()
            keep_weight = weight if ctx.needs_input_grad[0] else None
            if not ctx.needs_input_grad[1]:
                ctx.save_for_backward(keep_weight, None)
                return y
            if sketch == "spectral":
                ctx.fft_sizes, grid = _spectral_grids(x.shape[2:], y.shape[2:], geom)
                gen = torch.Generator(device=x.device)
                gen.manual_seed(seed)
                # spectrum blocks of at most half an output: the last decoder layers run at the forward peak
                state = spectral.sketch(x, grid, n_probes, gen, ctx.budget // 2)
            else:
                mu = x.mean(dim=tuple(range(2, x.dim())), dtype=torch.float32) if control == "mean" else None  # (B, C_in)
                state = (_sketch_input(x, mu, geom, n_probes, probes, sketch, seed, ctx.budget, tuple(y.shape[2:])), mu)
            # Keep the seed as a tensor: under non-reentrant checkpointing, the recomputed forward's
            # saved tensors (sketch and seed together) replace these, so they always match.
            ctx.save_for_backward(keep_weight, torch.tensor(seed, dtype=torch.int64), *state)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weight, seed_t, *state = ctx.saved_tensors
        geom = ctx.geom
        grad_x = grad_w = grad_b = None
        with torch.autocast(grad_y.device.type, enabled=False):
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_y.sum(dim=(0, *range(2, grad_y.dim())))
            if ctx.needs_input_grad[0]:
                grad_x = _input_grad(ctx.x_shape, weight, grad_y, geom)
            if ctx.needs_input_grad[1] and ctx.sketch == "spectral":
                estimate = spectral.transposed_weight_grad if geom.transposed else spectral.weight_grad
                grad_w = estimate(grad_y, *state, ctx.fft_sizes, geom, ctx.budget)
            elif ctx.needs_input_grad[1]:
                grad_w = _estimate_weight_grad(grad_y, *state, int(seed_t), ctx)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


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


def check_sketch_options(n_probes: int, probes: str, sketch: Optional[str], control: str) -> None:
    """Raises ``ValueError`` naming the option when a sketch option is not usable
    (``sketch=None``, the modules' per-layer default, is accepted)."""
    check_probe_options(n_probes, probes)
    if sketch is not None and sketch not in SKETCHES:
        raise ValueError(f"sketch must be one of {list(SKETCHES)} (or None: per-layer default), but got sketch={sketch!r}")
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


def _spectral_grids(in_spatial: Sequence[int], out_spatial: Sequence[int], geom: ConvGeometry) -> tuple[tuple[int, ...], list[int]]:
    """``(M, grid)``: the spectral sketch's FFT lengths and the grid its input is transformed on
    (``M`` itself, or ``M / s`` for a transposed convolution, whose input is the strided side)."""
    if geom.transposed:
        sizes = spectral.fft_sizes(out_spatial, in_spatial, geom)
        return sizes, [m // s for m, s in zip(sizes, geom.stride)]
    sizes = spectral.fft_sizes(in_spatial, out_spatial, geom)
    return sizes, list(sizes)


def _spectral_frequencies(in_spatial: Sequence[int], geom: ConvGeometry) -> int:
    """Frequencies a spectral sketch of this convolution could keep."""
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
    return spectral.n_frequencies(_spectral_grids(in_spatial, out_spatial, geom)[1])


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


def _apply(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
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
) -> torch.Tensor:
    name = f"stochastic_conv{'_transpose' if transposed else ''}{dims}d"
    if x.dim() != dims + 2:
        raise ValueError(f"{name} expects input of shape (B, C, {', '.join('DHW'[3 - dims:])}), but got shape {tuple(x.shape)}")
    if sketch is None:
        sketch = "shifted"
    check_sketch_options(n_probes, probes, sketch, control)
    if transposed and sketch == "offset":
        raise ValueError(f"{name}: sketch='offset' is not available for transposed convolutions (their input is the "
                         "small side, so an input-grid sketch is smaller); use sketch='shifted' or 'spectral'")
    stride_t = _ntuple(stride, dims, "stride")
    dilation_t = _ntuple(dilation, dims, "dilation")
    kernel = tuple(weight.shape[2:])
    if transposed and isinstance(padding, str):
        raise ValueError(f"{name}: padding must be an int or a tuple of ints, but got padding={padding!r}")
    x, padding_t = _resolve_padding(x, padding, kernel, stride_t, dilation_t)
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
        sketch == "spectral" and n_probes >= _spectral_frequencies(x.shape[2:], geom)
    ):
        return _conv(x, weight, bias, geom)
    return _StochasticConv.apply(x, weight, bias, geom, n_probes, probes, sketch, control, next_seed() if seed is None else int(seed))


def _make_conv(dims: int):
    def conv(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride: IntOrTuple = 1,
        padding: Union[str, IntOrTuple] = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        *,
        n_probes: int = 16,
        probes: str = "rademacher",
        sketch: str = "shifted",
        control: str = "mean",
        seed: Optional[int] = None,
    ) -> torch.Tensor:
        return _apply(x, weight, bias, dims, False, stride, padding, 0, dilation, groups, n_probes, probes, sketch, control, seed)

    spatial = ", ".join("DHW"[3 - dims:])
    conv.__name__ = conv.__qualname__ = f"stochastic_conv{dims}d"
    conv.__doc__ = f"""{dims}D convolution with an exact forward pass and input gradient and an unbiased,
    sketched weight gradient. Same arguments as ``torch.nn.functional.conv{dims}d``.

    Args:
        x: input of shape ``(B, C_in, {spatial})``.
        weight: ``(C_out, C_in / groups, *K)``.
        bias: optional ``(C_out,)``.
        stride, padding, dilation, groups: as in torch (``padding`` may be ``"same"``/``"valid"``).
        n_probes: probes ``r`` of the trace estimator; ``0`` means exact backprop.
        probes: ``"rademacher"`` (default), ``"gaussian"`` or ``"orthogonal"`` (Hadamard blocks, ``r`` a power of 2).
        sketch: ``"shifted"`` (default: keeps ``r·C_in`` numbers), ``"offset"`` (keeps ``r·C_in·K``;
            lower error for strided convolutions) or ``"spectral"`` (keeps ``B·r·C_in`` complex
            Fourier coefficients, ``r`` in the hundreds; far lower error, docs/benchmarks.md).
        control: ``"mean"`` (exact per-channel-mean control variate) or ``"none"``.
        seed: probe seed; ``None`` draws one from ``app.nn.manual_seed``'s stream (never torch's global RNG).

    Returns:
        ``(B, C_out, {spatial})`` output, ``out = floor((in + 2p − d(k−1) − 1) / s) + 1`` per dimension.

    Example:
        >>> y = stochastic_conv{dims}d(x, w, padding=1, n_probes=16)
        >>> y.sum().backward()  # w.grad is an unbiased estimate, x.grad is exact
    """
    return conv


def _make_conv_transpose(dims: int):
    def conv_transpose(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        stride: IntOrTuple = 1,
        padding: IntOrTuple = 0,
        output_padding: IntOrTuple = 0,
        groups: int = 1,
        dilation: IntOrTuple = 1,
        *,
        n_probes: int = 16,
        probes: str = "rademacher",
        sketch: str = "shifted",
        control: str = "mean",
        seed: Optional[int] = None,
    ) -> torch.Tensor:
        return _apply(x, weight, bias, dims, True, stride, padding, output_padding, dilation, groups, n_probes, probes, sketch, control, seed)

    spatial = ", ".join("DHW"[3 - dims:])
    conv_transpose.__name__ = conv_transpose.__qualname__ = f"stochastic_conv_transpose{dims}d"
    conv_transpose.__doc__ = f"""{dims}D transposed convolution with a sketched weight gradient.
    Same arguments (and order) as ``torch.nn.functional.conv_transpose{dims}d``, plus the sketch
    options of ``stochastic_conv{dims}d``; the sketch is taken of the (small) input: ``"shifted"``
    (``r · C_in`` numbers) or ``"spectral"`` (``B · r · C_in`` complex coefficients on the strided
    grid, each meeting ``dY`` at all its aliases); ``"offset"`` is not available.

    Args:
        x: input of shape ``(B, C_in, {spatial})``.
        weight: ``(C_in, C_out / groups, *K)``.

    Returns:
        ``(B, C_out, {spatial})``, ``out = (in − 1)·s − 2p + d(k − 1) + output_padding + 1`` per dimension.
    """
    return conv_transpose


stochastic_conv1d = _make_conv(1)
stochastic_conv2d = _make_conv(2)
stochastic_conv3d = _make_conv(3)
stochastic_conv_transpose1d = _make_conv_transpose(1)
stochastic_conv_transpose2d = _make_conv_transpose(2)
stochastic_conv_transpose3d = _make_conv_transpose(3)

__all__ = [
    "ConvGeometry",
    "SKETCHES",
    "CONTROLS",
    "stochastic_conv1d",
    "stochastic_conv2d",
    "stochastic_conv3d",
    "stochastic_conv_transpose1d",
    "stochastic_conv_transpose2d",
    "stochastic_conv_transpose3d",
]
