"""Spectral sketch: the weight gradient from a few importance-sampled Fourier coefficients of the input.

For a regular convolution the weight gradient is a cross-correlation,
``dW[o, c, k] = Σ_b Σ_n dY[b, o, n] · X[b, c, s·n + τ_k]`` with ``τ_k = d·k − p``. On an FFT grid
``M`` large enough that nothing wraps around (``M ≥ S_in + p`` and ``M ≥ s·S_out`` per dimension,
``M`` a multiple of ``s``), Parseval turns it into a sum over frequencies ``f``:

    ``dW[o, c, k] = (1/|M|) Σ_b Σ_f Re[ m_f · conj(Û_b[o, f]) · X̂_b[c, f] · exp(2πi f·τ_k / M) ]``

(``X̂ = rfftn(X, M)``, ``m_f ∈ {1, 2}`` counts the frequencies the real FFT folds onto ``f``, and
``Û_b[o, f] = DFT_{M/s}(dY_b)[f mod M/s]`` is the spectrum of ``dY`` spread onto the strided input
grid). A shift is a phase, so one coefficient of ``X`` serves every kernel offset.

The forward pass keeps, per sample, ``X̂`` at ``r`` frequencies only: ``r − r_s`` with the largest
channel energy ``s_f = m_f·‖X̂_b[:, f]‖``, exactly (this includes the mean, ``f = 0``: a built-in,
exactly computed control variate), and ``r_s = max(1, ⌊r/2⌋)`` drawn with replacement from the
``R`` other frequencies with probability ``π_f = (1 − ε) s_f / Σ s + ε / R`` and weighted
``m_f / (r_s · π_f)`` (``ε`` = :data:`UNIFORM_SHARE`). The estimate is unbiased because every
frequency outside the kept set has ``π_f > 0``, whatever the energy says: above :data:`N_MIXES`
channels ``s_f`` is estimated from random ±1 channel mixes, which cancel when channels are equal or
opposite. Importance sampling makes it accurate because activations of image networks put most of
their energy in few (mostly low) frequencies. The kept state is ``B · r · C_in`` complex numbers
plus ``2 · B · r`` indices and weights, whatever the volume, and the backward pass costs an FFT of
``dY`` and an ``r``-term sum instead of a convolution.

Transient memory: FFTs run over blocks of channels whose copies (channel mix, fp32 cast),
zero-padded copy and half-spectrum hold at most ``budget`` real numbers together (:func:`_blocks`;
the caller passes half an output), one block alive at a time; choosing the frequencies adds a few
``(B, F)`` vectors, and the backward pass transforms ``dY`` in blocks of half its size. The rows
kept for the direct sum over the first dimension (:func:`_gather`) add ``2 · B · C · S_1 · r`` real
numbers: ``2r / |S_2 ⋯ S_D|`` of the input (1/32 of it for a 128³ layer at r = 256).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Optional, Protocol, Union

import torch

from .fft_lengths import CUFFT_NS_PER_POINT
from .probes import capturing, hash_bits, signs_from_bits, uniform_from_bits

Seed = Union[int, torch.Tensor]
"""A seed: a Python int, or a 0-dim int64 tensor on the input's device (:func:`app.nn.probes.device_seed`)."""


class Geometry(Protocol):
    """A convolution's per-dimension geometry (``app.nn.functional.ConvGeometry`` is one)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    kernel: tuple[int, ...]
    groups: int


def _is_smooth(n: int) -> bool:
    """Whether ``n >= 1`` has no prime factor above 7."""
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


def _smooth(n: int, multiple: int) -> int:
    """Smallest ``m = multiple · j >= n`` with ``j`` free of prime factors above 7: a multiple of
    the stride with a fast FFT. ``m``'s only larger prime factors are the stride's own (11, 13, …),
    whose FFTs torch computes exactly, if more slowly. Bounded: with ``q = ⌈n / multiple⌉``, a power
    of two lies in ``[q, 2q)``, so at most ``q`` candidates are tried."""
    j = max(1, -(-n // multiple))
    while not _is_smooth(j):
        j += 1
    return multiple * j


MAX_GRID_GROWTH = 1.125
"""Largest CUDA FFT length :func:`fft_sizes` considers, as a multiple of the shortest one allowed."""

COST_TOLERANCE = 1.1
"""Lengths within this factor of the cheapest measured cost count as equally fast (the shortest is
taken: fewer points, less memory; the table's timings are good to a few percent)."""


@functools.lru_cache(maxsize=None)
def _fast_cuda_length(n: int, multiple: int, dims: int) -> int:
    """The multiple of ``multiple`` from ``n`` to ``MAX_GRID_GROWTH · n`` (or the 7-smooth one, if
    larger) whose ``dims``-dimensional transform costs least by cuFFT's measured cost per point
    (:data:`app.nn.fft_lengths.CUFFT_NS_PER_POINT`, within :data:`COST_TOLERANCE`); the 7-smooth
    length below or beyond the measured lengths."""
    smooth = _smooth(n, multiple)
    if n < min(CUFFT_NS_PER_POINT):
        return smooth
    first = -(-n // multiple) * multiple
    last = max(smooth, int(MAX_GRID_GROWTH * n))
    costs = [(m ** dims * CUFFT_NS_PER_POINT[m], m) for m in range(first, last + 1, multiple) if m in CUFFT_NS_PER_POINT]
    if not costs:
        return smooth
    least = min(costs)[0]
    return min(m for cost, m in costs if cost <= COST_TOLERANCE * least)  # the shortest of the cheapest


def fft_sizes(in_spatial: Sequence[int], out_spatial: Sequence[int], geom: Geometry, device_type: str = "cpu") -> tuple[int, ...]:
    """Per dimension, the FFT length on which the weight-gradient correlation of the regular
    convolution ``in_spatial -> out_spatial`` does not wrap around (for a transposed convolution:
    its output grid is ``in_spatial``, its input grid ``out_spatial``). A multiple of the stride:
    on ``"cuda"`` the fastest by cuFFT's measured costs (:func:`_fast_cuda_length`), elsewhere the
    shortest 7-smooth one."""
    dims = len(in_spatial)
    shortest = [max(n_in + p, s * n_out, s * (n_out - 1) + d * (k - 1) - p + 1)
                for n_in, n_out, s, p, d, k in zip(in_spatial, out_spatial, geom.stride, geom.padding, geom.dilation, geom.kernel)]
    if device_type == "cuda":
        return tuple(_fast_cuda_length(n, s, dims) for n, s in zip(shortest, geom.stride))
    return tuple(_smooth(n, s) for n, s in zip(shortest, geom.stride))


def n_frequencies(sizes: Sequence[int]) -> int:
    """Frequencies of a real FFT of ``sizes``: ``prod(sizes[:-1]) · (sizes[-1] // 2 + 1)``."""
    return math.prod(sizes[:-1]) * (sizes[-1] // 2 + 1)


_MULTIPLICITY: dict[tuple, torch.Tensor] = {}


def _multiplicity(sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """``m_f`` along the real FFT's last axis (it depends on nothing else): 1 on the self-conjugate
    planes (index 0 and, for even lengths, the Nyquist index), 2 elsewhere. Shape ``(M_last // 2 + 1,)``.
    Cached per length and device, except while a graph is traced or captured (as :func:`_taus`)."""
    key = (sizes[-1], str(device))
    cached = _MULTIPLICITY.get(key)
    if cached is not None:
        return cached
    last = sizes[-1] // 2 + 1
    index = torch.arange(last, device=device)
    mult = torch.where((index == 0) | (2 * index == sizes[-1]), 1.0, 2.0)
    if not capturing(device):
        _MULTIPLICITY[key] = mult
    return mult


def _unravel(index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(..., len(shape))`` coordinates of a flat ``index`` into ``shape``."""
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index = index // size
    return torch.stack(coords[::-1], dim=-1)


MIN_BLOCK = 1 << 18
"""Smallest FFT block, in real numbers (1 MiB in fp32): spares tiny layers one FFT call per
channel; a transient this small never sets a network's peak."""

N_MIXES = 4
"""Random ±1 channel mixes whose spectra estimate the channel energy that picks the frequencies."""

_STREAM = 1
"""Hash stream (:func:`app.nn.probes.hash_bits`) of the sketch's draws: the channel mixes' signs,
then the sampled frequencies' uniforms, all from one call."""

UNIFORM_SHARE = 1 / 16
"""``ε``: the share of the sampling distribution spread evenly over the frequencies outside the
kept set (defensive importance sampling). It keeps ``π_f ≥ ε / R`` where the energy estimate is 0
or too small, and costs at most a factor ``1 / (1 − ε)`` in variance against ``π_f ∝ s_f``."""


def _channel_cost(t: torch.Tensor, grid: Sequence[int], copies: int) -> int:
    """Real numbers one channel of ``t`` ``(B, C, *S)`` holds while its FFT on ``grid`` runs:
    ``copies`` input-sized copies (a channel mix, an fp32 cast: ``B·|S|`` each), the zero-padded
    copy (``B·|M|``) and the half-spectrum (``2·B·F``)."""
    return t.shape[0] * (copies * math.prod(t.shape[2:]) + math.prod(grid) + 2 * n_frequencies(grid))


def _blocks(channels: int, per_channel: int, budget: int) -> Iterator[tuple[int, int]]:
    """``(c0, c1)`` channel blocks of at most ``max(budget, MIN_BLOCK)`` real numbers (at least one channel)."""
    width = max(1, min(channels, max(budget, MIN_BLOCK) // max(1, per_channel)))
    for c0 in range(0, channels, width):
        yield c0, min(channels, c0 + width)


def _rfft(t: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``rfftn(t, grid)`` over the last ``len(grid)`` dimensions, in fp32, flattened to ``(*lead, F)``.

    A ``t`` smaller than ``grid`` is cast and zero-padded in one copy (into a zeroed fp32 tensor of
    the grid's size) rather than cast, then padded by ``rfftn``."""
    lead, spatial, grid = t.shape[: t.dim() - len(grid)], tuple(t.shape[t.dim() - len(grid):]), tuple(grid)
    dims = tuple(range(len(lead), t.dim()))
    if spatial != grid and all(n <= g for n, g in zip(spatial, grid)):
        padded = torch.zeros((*lead, *grid), dtype=torch.float32, device=t.device)
        padded[(Ellipsis, *[slice(0, n) for n in spatial])] = t
        return torch.fft.rfftn(padded, dim=dims).flatten(len(lead))
    return torch.fft.rfftn(t.float(), s=grid, dim=dims).flatten(len(lead))


def _pruned(t: torch.Tensor, grid: Sequence[int]) -> bool:
    """Whether :func:`_gather` transforms ``t`` ``(B, C, *S)`` over its trailing dimensions only and
    sums the first one directly (2 or more dimensions, ``S_1 <= M_1``)."""
    return len(grid) >= 2 and t.shape[2] <= grid[0]


def _gather(t: torch.Tensor, grid: Sequence[int], flat: torch.Tensor, budget: int) -> torch.Tensor:
    """``rfftn(t, grid)`` at the flat half-spectrum indices ``flat`` ``(B, n)``, transformed in
    channel blocks (:func:`_blocks`). Shape ``(B, C, n)`` complex64.

    In two or more dimensions only the trailing ones are transformed: the first is summed directly,
    ``X̂[f_1, f'] = Σ_{k < S_1} e^{−2πi f_1 k / M_1} · FFT'(t[k])[f']``, at the ``n`` kept
    frequencies alone. That skips one FFT pass, and the padding of the first dimension, over every
    channel, for a sum of ``S_1 · n`` terms per channel."""
    batch, channels = t.shape[:2]
    if not _pruned(t, grid):
        blocks = list(_blocks(channels, _channel_cost(t, grid, int(t.dtype != torch.float32)), budget))
        index = flat[:, None, :].expand(batch, channels, -1)
        parts = []
        for c0, c1 in blocks:
            spec = _rfft(t[:, c0:c1], grid)
            parts.append(spec.gather(2, index[:, : c1 - c0]))
            del spec  # freed before the next block's FFT
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    first, tail = t.shape[2], tuple(grid[1:])
    plane = n_frequencies(tail)
    f1, rest = flat // plane, flat % plane  # (B, n): the first coordinate and the trailing plane's index
    k = torch.arange(first, device=t.device)[:, None]
    angle = (f1[:, None, :] * k).remainder_(grid[0]).float().mul_(-2 * math.pi / grid[0])  # (B, S_1, n), exact mod M_1
    phase = torch.polar(torch.ones_like(angle), angle)
    blocks = list(_blocks(channels, _channel_cost(t, (first, *tail), int(t.dtype != torch.float32)), budget))
    index = rest[:, None, None, :].expand(batch, blocks[0][1], first, -1)  # the last block may be narrower
    parts = []
    for c0, c1 in blocks:
        spec = _rfft(t[:, c0:c1], tail)  # (B, c, S_1, P)
        parts.append(spec.gather(3, index[:, : c1 - c0]))  # (B, c, S_1, n): n of each row's P coefficients
        del spec  # freed before the next block's FFT
    picked = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return (picked * phase[:, None]).sum(2)  # one sum for every block: few host calls per layer


def _channel_energy(
    x: torch.Tensor, sizes: Sequence[int], signs: Optional[torch.Tensor], budget: int
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``Σ_c |X̂_b[c, f]|²`` per sample ``(B, F)``, fp32, from FFTs in blocks (:func:`_blocks`).

    Exact for up to :data:`N_MIXES` channels, otherwise estimated without bias from ``N_MIXES``
    random ±1 mixes of the channels (``E|Σ_c s_c X̂_c|² = Σ_c |X̂_c|²``), so the forward pass
    transforms every channel only once more: ``signs`` ``(N_MIXES, C)`` (±1 in ``x``'s dtype) when
    ``C > N_MIXES``, else None. The second value is ``X̂`` itself ``(B, C, F)``, for
    reuse, when the energy is exact and every channel fit one block, else ``None``.
    """
    batch, channels = x.shape[:2]
    mixed = signs is not None
    rows = N_MIXES if mixed else channels
    blocks = list(_blocks(rows, _channel_cost(x, sizes, int(mixed) + int(x.dtype != torch.float32)), budget))
    energy = None
    for m0, m1 in blocks:
        if signs is not None:
            part = torch.einsum("mc,bc...->bm...", signs if len(blocks) == 1 else signs[m0:m1], x)
        else:
            part = x if len(blocks) == 1 else x[:, m0:m1]
        spec = _rfft(part, sizes)
        del part
        block_energy = torch.linalg.vector_norm(spec, dim=1).square_()
        energy = block_energy if energy is None else energy.add_(block_energy)
        if signs is None and len(blocks) == 1:
            return energy, spec
        del spec, block_energy  # freed before the next block's FFT
    return (energy.div_(N_MIXES) if mixed else energy), None


def sketch(
    x: torch.Tensor, sizes: Sequence[int], n_probes: int, seed: Seed, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward pass's spectral sketch of ``x``.

    Args:
        x: ``(B, C_in, *S_in)``.
        sizes: FFT lengths (:func:`fft_sizes`).
        n_probes: frequencies ``r >= 1`` kept per sample: ``max(1, r // 2)`` sampled, the rest the
            largest (all of them, unsampled, if ``r`` reaches the number of frequencies).
        seed: draws the channel mixes and the sampled frequencies (:data:`Seed`; counter-based
            hashes on ``x``'s device, so the sketch has no generator state, reads nothing back to the
            host and has static shapes: it can be captured in a CUDA graph).
        budget: largest FFT block, in real numbers (at least :data:`MIN_BLOCK`, at least one
            channel): the transient of the zero-padded copy and the spectrum of one channel block.

    Returns:
        ``values`` ``(B, C_in, r)`` complex64 (``X̂`` at the kept frequencies), ``index`` ``(B, r)``
        int64 (flat frequency index), ``weight`` ``(B, r)`` fp32 (``m_f`` for the largest ones,
        ``m_f / (r_s · π_f)`` for the sampled ones).
    """
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1 for the spectral sketch, but got n_probes={n_probes}")
    batch, channels = x.shape[:2]
    freqs = n_frequencies(sizes)
    mult = _multiplicity(sizes, x.device)  # m_f = mult[f % last]
    last = mult.shape[0]
    n_drawn = max(1, n_probes // 2)
    n_top = min(n_probes - n_drawn, freqs)
    if n_top == freqs:
        n_drawn = 0
    # every random number of the call from one hash: the channel mixes' signs, then the uniforms
    n_signs = N_MIXES * channels if channels > N_MIXES else 0
    bits = hash_bits(seed, (n_signs + batch * n_drawn,), _STREAM, x.device) if n_signs + n_drawn else None
    signs = signs_from_bits(bits[:n_signs], x.dtype).view(N_MIXES, channels) if n_signs else None
    energy, spectrum = _channel_energy(x, sizes, signs, budget)
    score = energy.sqrt_()
    score.view(batch, -1, last).mul_(mult)
    top = torch.topk(score, n_top, dim=1, sorted=False).indices  # (B, n_top)
    index, weight = top, mult[top % last]
    if n_drawn > 0:
        # π_f ∝ s_f + ε/(1 − ε) · Σs / R on the R frequencies outside the kept set (uniform where Σs = 0)
        rest = score.scatter_(1, top, 0.0)
        total = rest.sum(1, keepdim=True, dtype=torch.float64)
        floor = torch.where(total > 0, total * (UNIFORM_SHARE / (1 - UNIFORM_SHARE) / (freqs - n_top)), 1.0)
        rest += floor.float().clamp_min_(torch.finfo(torch.float32).tiny)
        rest.scatter_(1, top, 0.0)
        cdf = torch.cumsum(rest, dim=1, dtype=torch.float64)
        total = cdf[:, -1:]
        u = uniform_from_bits(bits[n_signs:].view(batch, n_drawn)) * total
        drawn = torch.searchsorted(cdf, u, right=True).clamp_(max=freqs - 1)
        del cdf
        prob = (rest.gather(1, drawn).double() / total).float()
        drawn_weight = torch.where(prob > 0, mult[drawn % last] / (n_drawn * prob.clamp_min(1e-30)), 0.0)
        index = torch.cat([top, drawn], dim=1)
        weight = torch.cat([weight, drawn_weight], dim=1)
    if spectrum is not None:
        values = spectrum.gather(2, index[:, None, :].expand(batch, channels, -1))
    else:
        values = _gather(x, sizes, index, budget)
    return values, index, weight


def _spectrum_at(t: torch.Tensor, grid: Sequence[int], coords: Sequence[torch.Tensor], budget: int) -> torch.Tensor:
    """``DFT_grid(t)`` at the full-grid frequencies ``coords`` (one ``(B, n)`` tensor per dimension,
    ``0 <= f_d < grid_d``), from real FFTs in channel blocks of at most ``budget`` real numbers:
    a frequency past the real FFT's last half is the conjugate of its mirror. Shape ``(B, C, n)``."""
    mirror = coords[-1] > grid[-1] // 2
    half = (*grid[:-1], grid[-1] // 2 + 1)
    flat = torch.zeros_like(coords[0])
    for d, f in enumerate(coords):
        flat = flat * half[d] + torch.where(mirror, (-f) % grid[d], f)
    out = _gather(t, grid, flat, budget)
    return torch.where(mirror[:, None, :], out.conj(), out)


_TAUS: dict[tuple, torch.Tensor] = {}
""":func:`_taus` per geometry, FFT grid and device: a handful of small tensors for a whole network."""


def _taus(geom: Geometry, sizes: Sequence[int], device: torch.device) -> torch.Tensor:
    """``τ_{k,d} / M_d`` (in turns) for every kernel offset ``k``: shape ``(D, K)``, fp32. Cached,
    except while a graph is traced or captured (a tensor made then is only filled when it runs)."""
    key = (geom.kernel, geom.dilation, geom.padding, tuple(sizes), str(device))
    cached = _TAUS.get(key)
    if cached is not None:
        return cached
    # τ = d·k − p for k = 0..K_d − 1: one arange per dimension
    taus = torch.cartesian_prod(*[torch.arange(-p, k * dl - p, dl, device=device, dtype=torch.float32) / m
                                  for k, dl, p, m in zip(geom.kernel, geom.dilation, geom.padding, sizes)])
    taus = taus.view(-1, len(sizes)).t().contiguous()
    if not capturing(device):
        _TAUS[key] = taus
    return taus


def _phase(coords: torch.Tensor, sizes: Sequence[int], geom: Geometry) -> torch.Tensor:
    """``exp(2πi Σ_d f_d τ_{k,d} / M_d)`` with ``τ = d·k − p`` for frequencies ``coords``
    ``(*S, D)`` (integer coordinates, one per dimension): shape ``(*S, K)``."""
    # in turns; a sum of D products rather than a matmul, which autocast would round to bf16 (a
    # compiled backward is traced under the forward's autocast)
    angle = (coords.float().unsqueeze(-1) * _taus(geom, sizes, coords.device)).sum(-2)
    # the angle is only needed modulo 1 turn: keep it small before the float32 sin/cos
    angle = torch.frac(angle).mul_(2 * math.pi)
    return torch.polar(torch.ones_like(angle), angle)


def weight_grad(
    grad_y: torch.Tensor, values: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, sizes: Sequence[int],
    geom: Geometry, budget: int,
) -> torch.Tensor:
    """The unbiased weight-gradient estimate from :func:`sketch`'s output.

    Args:
        grad_y: ``(B, C_out, *S_out)``.
        values, index, weight: the sketch.
        sizes: its FFT lengths; geom: the convolution's geometry.
        budget: ``dY``'s size in real numbers: its spectrum is taken in blocks of at most half of it.

    Returns:
        ``(C_out, C_in / groups, *K)`` in fp32.
    """
    batch, c_out = grad_y.shape[:2]
    c_in, r = values.shape[1], values.shape[2]
    half = (*sizes[:-1], sizes[-1] // 2 + 1)
    freq = _unravel(index, half)  # (B, r, D)
    # dY's spectrum on the strided grid: Û[f] = DFT_L(dY)[f mod L], L = M / s; the estimate needs conj(Û)
    if all(s == 1 for s in geom.stride):  # L = M: the kept indices are dY's own half-spectrum indices
        u = _gather(grad_y, sizes, index, budget // 2).conj()
    else:
        lengths = [m // s for m, s in zip(sizes, geom.stride)]
        u = _spectrum_at(grad_y, lengths, [freq[..., d] % n for d, n in enumerate(lengths)], budget // 2).conj()
    phase = _phase(freq, sizes, geom)  # (B, r, K)
    scale = (weight / math.prod(sizes)).to(torch.complex64)  # (B, r)
    groups = geom.groups
    cog, cig = c_out // groups, c_in // groups
    left = (u * scale[:, None, :]).view(batch, groups, cog, r)
    right = values.view(batch, groups, cig, r)
    k_numel = phase.shape[-1]
    # Σ_{b,j} left[b,g,o,j] · phase[b,j,k] · right[b,g,c,j] as one complex matmul per group
    lp = (left[..., None] * phase[:, None, None]).permute(1, 2, 4, 0, 3).reshape(groups, cog * k_numel, batch * r)
    rv = right.permute(1, 0, 3, 2).reshape(groups, batch * r, cig)
    grad_w = torch.bmm(lp, rv).real.view(groups, cog, k_numel, cig).permute(0, 1, 3, 2)
    return grad_w.reshape(c_out, cig, *geom.kernel)


def transposed_weight_grad(
    grad_y: torch.Tensor, values: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, sizes: Sequence[int],
    geom: Geometry, budget: int,
) -> torch.Tensor:
    """The unbiased weight-gradient estimate of a transposed convolution from :func:`sketch`'s
    output, taken of its (small) input ``x`` on the grid ``L = M / s``.

    ``dW[c, o, k] = Σ_b Σ_n x[b, c, n] · dY[b, o, s·n + τ_k]`` is the correlation of the regular
    convolution with the roles swapped: ``x`` spread on the strided grid has the spectrum
    ``x̂[f mod L]``, so each kept frequency ``f'`` of ``x`` meets ``dY``'s spectrum at its ``prod(s)``
    aliases ``f' + j·L``, all summed exactly.

    Args:
        grad_y: ``(B, C_out, *S_out)``.
        values, index, weight: the sketch of ``x`` (frequencies of the ``L`` grid).
        sizes: ``M`` (:func:`fft_sizes` of the output grid onto the input grid).
        geom: the transposed convolution's geometry.
        budget: ``dY``'s size in real numbers: its spectrum is taken in blocks of at most half of it.

    Returns:
        ``(C_in, C_out / groups, *K)`` in fp32.
    """
    batch, c_out = grad_y.shape[:2]
    c_in, r = values.shape[1], values.shape[2]
    dims, dev = len(sizes), grad_y.device
    lengths = [m // s for m, s in zip(sizes, geom.stride)]
    small = _unravel(index, (*lengths[:-1], lengths[-1] // 2 + 1))  # (B, r, D)
    # F_d = f'_d + j_d·L_d for every alias j: (B, A, r) with A = prod(stride)
    big = []
    for d in range(dims):
        shape = [1] * (dims + 2)
        shape[1 + d] = geom.stride[d]
        offsets = (torch.arange(geom.stride[d], device=dev) * lengths[d]).view(shape)
        big.append((small[..., d].view(batch, *([1] * dims), r) + offsets).expand(batch, *geom.stride, r).reshape(batch, -1, r))
    aliases = big[0].shape[1]
    spec_y = _spectrum_at(grad_y, sizes, [f.reshape(batch, -1) for f in big], budget // 2).view(batch, c_out, aliases, r)
    phase = _phase(torch.stack(big, dim=-1), sizes, geom)  # (B, A, r, K)
    summed = torch.einsum("boaj,bajk->bojk", spec_y, phase)  # Σ over aliases: (B, C_out, r, K)
    scale = (weight / math.prod(sizes)).to(torch.complex64)  # (B, r)
    groups = geom.groups
    cig, cog = c_in // groups, c_out // groups
    k_numel = phase.shape[-1]
    left = (values.conj() * scale[:, None, :]).view(batch, groups, cig, r).permute(1, 2, 0, 3).reshape(groups, cig, batch * r)
    right = summed.view(batch, groups, cog, r, k_numel).permute(1, 0, 3, 2, 4).reshape(groups, batch * r, cog * k_numel)
    grad_w = torch.bmm(left, right).real  # (G, C_in/G, C_out/G · K)
    return grad_w.reshape(c_in, cog, *geom.kernel)


__all__ = ["Geometry", "fft_sizes", "n_frequencies", "sketch", "transposed_weight_grad", "weight_grad"]
