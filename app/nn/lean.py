"""Memory-lean companions of the stochastic convolutions: activations and normalisations that keep
as little as their backward pass needs.

A stochastic convolution keeps no activation, but in a U-Net block the normalisation keeps its input
and the activation keeps its input or output, so removing the convolution's copy alone saves little.
These layers shrink what is left:

- ``LeanReLU`` / ``LeanLeakyReLU`` keep a bit-packed sign mask: 1 bit per element (1/32 of fp32).
- ``LeanPReLU`` keeps its input in ``storage`` dtype (bfloat16 by default: half of fp32), negated so that
  its sign bit is exactly ``x > 0``: the input gradient is exact, the slope's gradient bf16-accurate.
- ``LeanGELU`` keeps its input in ``storage`` dtype and recomputes ``GELU'(x)`` in fp32 from it.
- ``LeanInstanceNorm{1,2,3}d``, ``LeanGroupNorm``, ``LeanBatchNorm{1,2,3}d`` keep only the normalised
  tensor ``x̂`` (optionally in bfloat16: half of fp32) and per-group inverse standard deviations;
  the input gradient is rebuilt from ``x̂``: ``dx = σ⁻¹ (g − mean(g) − x̂ · mean(g x̂))`` with
  ``g = γ · dy`` and the means taken over the normalisation groups.

All are drop-in subclasses of their ``torch.nn`` classes (same parameters and state-dict keys) and
behave like them in eval mode and under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

STORAGE_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}
"""``lean_storage`` names -> dtypes. The fp8 ones are for measuring the norms' ``x̂`` at 1 byte per
element (``app.nn.convert`` keeps PReLU's and GELU's tensors in bfloat16 for them); not a default."""

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


CHUNK = 1 << 24
"""Smallest chunk, in elements, in which the lean layers work through a tensor (64 MiB in fp32).
Tensors are worked through in at most :data:`CHUNKS` chunks of at least this size, so the
transients of a lean layer (a full-precision copy in a norm, the sign mask of an activation) are an
eighth of its tensor at most, and small tensors take one chunk (one set of kernel launches)."""

CHUNKS = 8
"""Most chunks a lean layer splits a large tensor into (see :data:`CHUNK`)."""


def _row_chunks(rows: int, row_elements: int, multiple: int = 1) -> list[tuple[int, int]]:
    """``(r0, r1)`` ranges of ``rows`` rows of ``row_elements`` elements each, chunked as
    :data:`CHUNK` says (at least one row per chunk; chunk widths a multiple of ``multiple``)."""
    target = max(CHUNK, -(-rows * row_elements // CHUNKS))
    width = max(1, min(rows, target // max(1, row_elements)))
    width = -(-width // multiple) * multiple
    return [(r0, min(rows, r0 + width)) for r0 in range(0, rows, width)]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Packs a boolean tensor into ``ceil(numel / 8)`` bytes (little-endian bit order)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # eager reinterprets the bools in place; traced code converts (a bool-to-byte view does not trace everywhere)
    bits = (flat.to(torch.uint8) if torch.compiler.is_compiling() else flat.view(torch.uint8)).view(-1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)  # made on the device: capturable
    return (bits << shifts).sum(1, dtype=torch.uint8)  # distinct powers of two: no overflow


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor of ``shape``."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    numel = 1
    for s in shape:
        numel *= s
    flat = bits.view(-1)[:numel]
    # eager reinterprets the 0/1 bytes in place; inductor's CPU code cannot bit-cast bytes to bool
    mask = flat != 0 if torch.compiler.is_compiling() else flat.view(torch.bool)
    return mask.view(shape)


class _SignMaskActivation(torch.autograd.Function):
    """``y = x`` where ``x > 0`` else ``slope · x``, keeping only the packed mask ``x > 0``.

    Contiguous tensors are worked through in chunks (:func:`_row_chunks`, whole bytes of the mask):
    the boolean mask and its packing transients exist for one chunk at a time, in the forward pass
    and in the backward pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float, inplace: bool) -> torch.Tensor:
        ctx.slope, ctx.shape = slope, x.shape
        if x.is_contiguous():
            flat = x.view(-1)
            packed = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8, device=x.device)
            for start, stop in _row_chunks(flat.numel(), 1, multiple=8):
                packed[start // 8: -(-stop // 8)] = pack_bits(flat[start:stop] > 0)
        else:
            packed = pack_bits(x > 0)
        ctx.save_for_backward(packed)
        if inplace:
            ctx.mark_dirty(x)
            return F.leaky_relu_(x, slope)
        return F.leaky_relu(x, slope)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        (packed,) = ctx.saved_tensors
        if not grad_y.is_contiguous():
            positive = unpack_bits(packed, ctx.shape)
            grad_x = grad_y * ctx.slope
            return torch.where(positive, grad_y, grad_x, out=grad_x), None, None
        grad_x = torch.empty_like(grad_y)
        dy, dx = grad_y.view(-1), grad_x.view(-1)
        for start, stop in _row_chunks(dy.numel(), 1, multiple=8):
            positive = unpack_bits(packed[start // 8: -(-stop // 8)], (stop - start,))
            part = dy[start:stop]
            torch.where(positive, part, part * ctx.slope, out=dx[start:stop])
        return grad_x, None, None


def lean_leaky_relu(x: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    """LeakyReLU (``negative_slope=0``: ReLU) whose backward keeps one bit per element.

    Args:
        x: any shape.
        negative_slope: slope for ``x <= 0``.
        inplace: overwrite ``x`` (as ``torch.nn.LeakyReLU(inplace=True)``).
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.leaky_relu(x, negative_slope, inplace) if negative_slope else F.relu(x, inplace)
    # a traced graph plans its own buffers, and dynamo cannot trace a Function that dirties its input
    return _SignMaskActivation.apply(x, float(negative_slope), inplace and not torch.compiler.is_compiling())


def _kept_dtype(dtype: torch.dtype, storage: torch.dtype) -> torch.dtype:
    """The narrower of the input's dtype and ``storage`` (a bf16 input is never widened)."""
    return storage if storage.itemsize < dtype.itemsize else dtype


def _channel_view(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``(C,)`` weight viewed for broadcasting against a ``(B, C, *S)`` tensor of ``dim`` dims (as ``F.prelu``)."""
    return weight.reshape(()) if weight.numel() == 1 else weight.view((1, -1) + (1,) * max(dim - 2, 0))


class NormOutputCopies:
    """Hands the copy of ``x̂`` an affine-free lean norm keeps to the lean PReLU that reads its output.

    Without affine parameters a lean norm returns ``x̂`` itself and keeps a copy of it (in its
    ``storage`` dtype) for its own backward pass. A lean PReLU keeps its input, so when that input
    is the norm's output (MONAI's ADN blocks: norm, ``Dropout(0)``, PReLU) it can keep the norm's
    copy instead of making a second full-size one (``x > 0`` is then read as ``kept > 0``).

    The norm calls :meth:`offer` with its output and the kept copy; the PReLU calls :meth:`claim`
    with its input. A copy is handed over only when the input is that very output tensor, not
    modified in place since (same ``_version``), and the copy has the dtype the PReLU would keep.
    Entries are keyed by the output tensor's identity and live as long as it does; an entry holds
    the kept copy, which the norm's graph holds anyway.
    """

    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def offer(self, out: torch.Tensor, kept: torch.Tensor) -> None:
        """Registers ``kept`` (the norm's saved ``x̂``) as a copy of ``out`` at its current version."""
        self._entries[out] = (kept, out._version)

    def claim(self, x: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The kept copy of ``x`` in ``dtype``, or None when there is none (or it is stale)."""
        entry = self._entries.get(x)
        if entry is None:
            return None
        kept, version = entry
        return kept if version == x._version and kept.dtype == dtype else None


NORM_OUTPUT_COPIES = NormOutputCopies()
"""The handoff between :class:`_LeanNorm` (``offer``) and :class:`_LeanPReLU` (``claim``)."""


class _LeanPReLU(torch.autograd.Function):
    """``y = x`` where ``x > 0`` else ``a · x``, keeping ``−x`` in ``storage`` dtype.

    ``−x`` is written as ``0 − x`` straight into the narrow dtype: both zeros become ``+0`` and a
    positive input too small for the narrow dtype rounds to ``−0``, so ``signbit`` of the kept tensor
    is exactly ``x > 0`` and the input gradient ``g · where(x > 0, 1, a)`` is torch's, bit for bit.
    The slope's gradient ``Σ g · x · [x ≤ 0]`` uses the rounded ``x`` and is summed in fp32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
        y = F.prelu(x, weight)
        dtype = _kept_dtype(x.dtype, storage)
        # x may be an affine-free lean norm's untouched output: then keep the x̂ copy that norm
        # keeps (no second full-size tensor), read as x > 0 <=> kept > 0.
        kept = NORM_OUTPUT_COPIES.claim(x, dtype)
        ctx.negated = kept is None
        if ctx.negated:
            kept = torch.empty(x.shape, dtype=dtype, device=x.device)
            torch.sub(x.new_zeros(()), x, out=kept)  # one kernel on CUDA; the cast happens on store
        ctx.save_for_backward(kept, weight)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        kept, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            # Σ g · x · [x ≤ 0] = −Σ g · relu(−x), per channel (C weights) or over everything (one weight)
            dims = [d for d in range(kept.dim()) if d != 1 or weight.numel() == 1]
            compute = torch.promote_types(grad_y.dtype, torch.float32)
            neg_part = F.relu(kept) if ctx.negated else F.relu(kept.neg())
            grad_w = torch.mul(neg_part, grad_y).sum(dims, dtype=compute).neg_().reshape(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            slope = _channel_view(weight.to(grad_y.dtype), grad_y.dim())
            positive = torch.signbit(kept) if ctx.negated else kept > 0
            grad_x = torch.where(positive, grad_y.new_ones(()), slope).mul_(grad_y)
        return grad_x, grad_w, None


def lean_prelu(x: torch.Tensor, weight: torch.Tensor, storage: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """PReLU (``torch.nn.functional.prelu``) whose backward keeps ``x`` in ``storage`` dtype.

    The input gradient is exact (the kept copy carries ``x > 0`` exactly, see ``_LeanPReLU``); the
    slope's gradient ``Σ g · x · [x ≤ 0]`` is computed from the rounded ``x`` (bfloat16: relative
    error of each term ≤ 2⁻⁸, summed in fp32). Under autocast, ``x`` and ``weight`` are cast to the
    autocast dtype first, as autocast does for ``prelu``.

    Args:
        x: ``(B, C, *S)`` or any shape if ``weight`` has one element.
        weight: the slopes ``a``: one, or one per channel ``(C,)``.
        storage: dtype of the kept copy; an input already as narrow is kept as it is.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.prelu(x, weight)
    return _LeanPReLU.apply(x, weight, storage)


class _LeanGELU(torch.autograd.Function):
    """GELU keeping ``x`` in ``storage`` dtype; the backward is ATen's ``gelu_backward`` in fp32 on it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, approximate: str, storage: torch.dtype) -> torch.Tensor:
        ctx.approximate = approximate
        ctx.save_for_backward(x.to(_kept_dtype(x.dtype, storage)))
        return F.gelu(x, approximate=approximate)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        (kept,) = ctx.saved_tensors
        compute = torch.promote_types(grad_y.dtype, torch.float32)
        out = kept.to(compute, copy=True)  # the result is written over this copy, never over the saved tensor
        torch.ops.aten.gelu_backward.grad_input(grad_y.to(compute), out, approximate=ctx.approximate, grad_input=out)
        return out.to(grad_y.dtype), None, None


def lean_gelu(x: torch.Tensor, approximate: str = "none", storage: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """GELU (``torch.nn.functional.gelu``) whose backward keeps ``x`` in ``storage`` dtype.

    The backward evaluates ``GELU'`` in fp32 at the kept, rounded ``x̃`` (``|x̃ − x| ≤ 2⁻⁸ |x|`` in
    bfloat16), so ``|dx − dx_exact| ≤ |g| · max|t · GELU''(t)| · 2⁻⁸ ≈ 0.33 · 2⁻⁸ · |g|`` (both
    ``approximate`` modes): a relative error of the order of bf16 rounding wherever ``GELU'`` is not
    small, larger only near its zero at ``x ≈ −0.75`` (the minimum of GELU), where ``dx`` itself is
    close to zero. With ``storage=torch.float32`` (or an input already as narrow) the gradient is
    torch's, bit for bit.

    Args:
        x: any shape.
        approximate: ``"none"`` (erf) or ``"tanh"``, as ``torch.nn.GELU``.
        storage: dtype of the kept copy.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be one of ['none', 'tanh'], but got approximate={approximate!r}")
    if not (torch.is_grad_enabled() and x.requires_grad):
        return F.gelu(x, approximate=approximate)
    return _LeanGELU.apply(x, approximate, storage)


class _LeanNorm(torch.autograd.Function):
    """Normalisation over groups of a ``(B, C, *S)`` tensor keeping only ``x̂`` and ``σ⁻¹``.

    ``mode="group"`` normalises each sample over ``(C / G) · prod(S)`` elements per group;
    ``mode="batch"`` normalises each channel over ``B · prod(S)`` elements. Computation is in
    fp32 (or the input's dtype if wider), chunk by chunk (:func:`_row_chunks`: whole groups, or
    whole channels for ``"batch"``), so neither pass holds a full-size full-precision copy: the
    forward pass allocates the kept ``x̂`` and, unless ``inplace``, the output; the backward pass
    the input gradient, in the incoming gradient's dtype. ``inplace`` writes the output over ``x``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mode: str, groups: int, eps: float, storage: torch.dtype,
                stats_out: Optional[list], inplace: bool):
        batch, channels = x.shape[:2]
        compute = torch.promote_types(x.dtype, torch.float32)
        inplace = inplace and x.is_contiguous()
        source = x if x.is_contiguous() else x.contiguous()
        out = source if inplace else torch.empty_like(source)
        kept = torch.empty(x.shape, dtype=storage, device=x.device)
        rows = groups if mode == "group" else channels
        per_row = channels // rows  # channels per row
        xv, ov, kv = (t.view(batch, rows, -1) for t in (source, out, kept))
        stat_shape = (batch, rows) if mode == "group" else (rows,)
        mean = torch.empty(stat_shape, dtype=compute, device=x.device)
        var = torch.empty(stat_shape, dtype=compute, device=x.device)
        row_elements = xv.shape[2] * (1 if mode == "group" else batch)
        for r0, r1 in _row_chunks(rows, row_elements):
            part = xv[:, r0:r1].to(compute, copy=True)
            if mode == "group":
                v, m = torch.var_mean(part, dim=2, unbiased=False, keepdim=True)
                mean[:, r0:r1], var[:, r0:r1] = m.view(batch, -1), v.view(batch, -1)
            else:
                v, m = torch.var_mean(part, dim=(0, 2), unbiased=False, keepdim=True)
                mean[r0:r1], var[r0:r1] = m.view(-1), v.view(-1)
            rstd = torch.rsqrt(v + eps)
            torch.addcmul(-m * rstd, part, rstd, out=part)  # x̂ = (x − mean) · σ⁻¹ in one pass
            kv[:, r0:r1] = part
            c0, c1 = r0 * per_row, r1 * per_row
            if weight is None and bias is None:
                ov[:, r0:r1] = part
            else:  # y = x̂ · γ + β, written in the output's dtype in one pass
                gamma = part.new_ones(()) if weight is None else weight[c0:c1].to(compute).view(1, -1, 1)
                beta = part.new_zeros(()) if bias is None else bias[c0:c1].to(compute).view(1, -1, 1)
                torch.addcmul(beta, part.view(batch, c1 - c0, -1), gamma, out=ov[:, r0:r1].view(batch, c1 - c0, -1))
            del part
        invstd = torch.rsqrt(var + eps)
        if mode == "group":
            invstd = invstd.view(batch, groups, 1)
        else:
            invstd = invstd.view(1, channels, 1)
            if stats_out is not None:
                stats_out += [mean, var, batch * xv.shape[2]]
        ctx.mode, ctx.groups, ctx.has_weight, ctx.has_bias = mode, groups, weight is not None, bias is not None
        ctx.save_for_backward(kept, invstd, weight)
        if inplace:
            ctx.mark_dirty(x)
            return x
        if weight is None and bias is None:  # out is x̂: a lean PReLU right after may keep this same copy
            NORM_OUTPUT_COPIES.offer(out, kept)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x_hat, invstd, weight = ctx.saved_tensors
        batch, channels = x_hat.shape[:2]
        compute = torch.promote_types(grad_y.dtype, torch.float32)
        dy = grad_y.reshape(batch, channels, -1)  # a view when grad_y is contiguous
        xh = x_hat.view(batch, channels, -1)
        chunks = _row_chunks(channels, batch * xh.shape[2])
        # pass 1: per-channel Σ dy and Σ dy · x̂, in fp32, chunk by chunk (elementwise product and
        # sum: a batched matmul of 1 x N by N x 1 runs far below the memory bandwidth)
        sum_dy = torch.empty((batch, channels), dtype=compute, device=grad_y.device)
        sum_dy_xhat = torch.empty_like(sum_dy)
        for c0, c1 in chunks:
            d = dy[:, c0:c1]
            torch.sum(d, 2, dtype=compute, out=sum_dy[:, c0:c1])
            h = xh[:, c0:c1].to(compute, copy=True)  # never the saved tensor itself
            torch.sum(h.mul_(d), 2, out=sum_dy_xhat[:, c0:c1])
            del d, h
        gamma = weight.to(compute) if ctx.has_weight else sum_dy.new_ones(channels)
        grad_w = sum_dy_xhat.sum(0).to(weight.dtype) if ctx.has_weight and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.sum(0).to(grad_y.dtype if weight is None else weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = σ⁻¹ (γ dy − mean(γ dy) − x̂ · mean(γ dy x̂)), means over each normalisation group
            if ctx.mode == "group":
                per_group = channels // ctx.groups
                count = per_group * xh.shape[2]
                mean_g = (gamma * sum_dy).view(batch, ctx.groups, per_group).sum(2) / count
                mean_gx = (gamma * sum_dy_xhat).view(batch, ctx.groups, per_group).sum(2) / count
                inv = invstd.view(batch, ctx.groups)
                expand = lambda t: t.repeat_interleave(per_group, dim=1)  # (B, G) -> (B, C)
                scale_x, shift = expand(-mean_gx * inv), expand(-mean_g * inv)
                scale_dy = gamma * expand(inv)
            else:
                count = batch * xh.shape[2]
                inv = invstd.view(channels)
                mean_g = gamma * sum_dy.sum(0) / count
                mean_gx = gamma * sum_dy_xhat.sum(0) / count
                scale_x, shift, scale_dy = (-mean_gx * inv).expand(batch, -1), (-mean_g * inv).expand(batch, -1), (gamma * inv).expand(batch, -1)
            # pass 2: the input gradient, chunk by chunk, in the incoming gradient's dtype
            grad_x = torch.empty((batch, channels, xh.shape[2]), dtype=grad_y.dtype, device=grad_y.device)
            for c0, c1 in chunks:
                part = xh[:, c0:c1].to(compute, copy=True)  # never the saved tensor itself
                torch.addcmul(shift[:, c0:c1, None], part, scale_x[:, c0:c1, None], out=part)
                # + γσ⁻¹ dy, written in the incoming gradient's dtype in the same pass
                torch.addcmul(part, dy[:, c0:c1], scale_dy[:, c0:c1, None], out=grad_x[:, c0:c1])
                del part
            grad_x = grad_x.view(grad_y.shape)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def lean_group_norm(
    x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5, storage: torch.dtype = torch.bfloat16, inplace: bool = False,
) -> torch.Tensor:
    """Group normalisation (instance norm: ``num_groups = C``) keeping ``x̂`` in ``storage`` dtype.

    Args:
        x: ``(B, C, *S)``; ``C`` divisible by ``num_groups``.
        weight, bias: optional per-channel affine ``(C,)``.
        eps: added to the variance. Default 1e-5.
        storage: dtype of the kept ``x̂`` (:data:`STORAGE_DTYPES`). Default bfloat16.
        inplace: write the output over ``x`` (contiguous ``x`` only; ignored otherwise) instead of
            allocating it. ``x`` must not be needed afterwards, by the caller or by autograd.
            Default False.
    """
    return _LeanNorm.apply(x, weight, bias, "group", num_groups, eps, storage, None, inplace)


class LeanStorageMixin:
    """``storage``: dtype in which lean layers keep their one tensor."""

    storage: torch.dtype = torch.bfloat16

    def _lean_active(self, x: torch.Tensor) -> bool:
        return self.training and torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))


class LeanNormMixin(LeanStorageMixin):
    """``inplace``: the lean norm writes its output over its input (in training, with gradients).

    Off by default, as in torch's norms. The lean blocks (:mod:`app.nn.blocks`) turn it on for the
    norms that read a convolution output the block owns and nothing else reads.
    """

    inplace: bool = False


class LeanInstanceNormNd(LeanNormMixin):
    """Forward of the lean instance norms (without running statistics; torch's layer otherwise)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.track_running_stats or not self._lean_active(input) or input.dim() != self._get_no_batch_dim() + 1:
            return super().forward(input)
        return lean_group_norm(input, input.shape[1], self.weight, self.bias, self.eps, self.storage, self.inplace)


class LeanGroupNorm(LeanNormMixin, nn.GroupNorm):
    """``torch.nn.GroupNorm`` keeping only ``x̂`` (in ``storage`` dtype) and ``σ⁻¹`` for backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._lean_active(input):
            return super().forward(input)
        return lean_group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.storage, self.inplace)


class LeanBatchNormNd(LeanNormMixin):
    """Forward of the lean batch norms (training with running statistics; torch's layer otherwise)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self._lean_active(input) and self.track_running_stats and self.momentum is not None):
            return super().forward(input)
        stats: list = []
        out = _LeanNorm.apply(input, self.weight, self.bias, "batch", 0, self.eps, self.storage, stats, self.inplace)
        mean, var, count = stats
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * count / max(count - 1, 1)).to(self.running_var.dtype), self.momentum)
        return out


class LeanLeakyReLU(nn.LeakyReLU):
    """``torch.nn.LeakyReLU`` keeping a 1-bit mask for backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return lean_leaky_relu(input, self.negative_slope, self.inplace)


class LeanReLU(nn.ReLU):
    """``torch.nn.ReLU`` keeping a 1-bit mask for backward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return lean_leaky_relu(input, 0.0, self.inplace)


class LeanPReLU(LeanStorageMixin, nn.PReLU):
    """``torch.nn.PReLU`` keeping its input in ``storage`` dtype for backward (see :func:`lean_prelu`).

    Same ``__init__`` (``num_parameters`` 1 or C, ``init``) and parameter ``weight``: state dicts
    load both ways. Eval mode and ``torch.no_grad()`` run ``torch.nn.PReLU`` itself.

    Shape:
        input ``(B, C, *S)`` (any shape if ``num_parameters == 1``); output the same.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._lean_active(input):
            return super().forward(input)
        return lean_prelu(input, self.weight, self.storage)


class LeanGELU(LeanStorageMixin, nn.GELU):
    """``torch.nn.GELU`` (``approximate`` ``"none"`` or ``"tanh"``) keeping its input in ``storage`` dtype
    for backward; ``GELU'`` is recomputed in fp32 from it (see :func:`lean_gelu` for the error bound).
    Eval mode and ``torch.no_grad()`` run ``torch.nn.GELU`` itself.

    Shape:
        any; output the same.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._lean_active(input):
            return super().forward(input)
        return lean_gelu(input, self.approximate, self.storage)


class LeanInstanceNorm1d(LeanInstanceNormNd, nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` keeping only ``x̂`` (in ``storage`` dtype) and ``σ⁻¹`` for backward."""


class LeanInstanceNorm2d(LeanInstanceNormNd, nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` keeping only ``x̂`` (in ``storage`` dtype) and ``σ⁻¹`` for backward."""


class LeanInstanceNorm3d(LeanInstanceNormNd, nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` keeping only ``x̂`` (in ``storage`` dtype) and ``σ⁻¹`` for backward."""


class LeanBatchNorm1d(LeanBatchNormNd, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` keeping only ``x̂`` (in ``storage`` dtype) and ``σ⁻¹`` for backward."""


class LeanBatchNorm2d(LeanBatchNormNd, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` keeping only ``x̂`` (in ``storage`` dtype) and ``σ⁻¹`` for backward."""


class LeanBatchNorm3d(LeanBatchNormNd, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` keeping only ``x̂`` (in ``storage`` dtype) and ``σ⁻¹`` for backward."""


LEAN_OF: dict[type, type] = {
    nn.ReLU: LeanReLU,
    nn.LeakyReLU: LeanLeakyReLU,
    nn.PReLU: LeanPReLU,
    nn.GELU: LeanGELU,
    nn.InstanceNorm1d: LeanInstanceNorm1d,
    nn.InstanceNorm2d: LeanInstanceNorm2d,
    nn.InstanceNorm3d: LeanInstanceNorm3d,
    nn.GroupNorm: LeanGroupNorm,
    nn.BatchNorm1d: LeanBatchNorm1d,
    nn.BatchNorm2d: LeanBatchNorm2d,
    nn.BatchNorm3d: LeanBatchNorm3d,
}
