"""Random probe matrices for randomized trace estimation.

A probe matrix ``Z`` has one row per voxel index ``n = (b, x)`` and one column per probe, with
``E[Z Zᵀ] = I`` for every family, so ``Zᵀ A`` / ``Zᵀ B`` give an unbiased estimate of ``Aᵀ B``.
Probes are laid out like activations, ``(B, r, *S)``, and generated block by block (a block is a
range of probe columns) from a seed, so the forward pass and the backward pass regenerate the same
numbers without storing them. A private ``torch.Generator`` on the tensor's device is used: torch's
global random state is never read or written.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator, Sequence

import torch

PROBE_FAMILIES = ("rademacher", "gaussian", "orthogonal")

_MASK64 = (1 << 64) - 1
_seed_lock = threading.Lock()
_seed_stream = random.Random()


def manual_seed(seed: int) -> None:
    """Seeds the stream that stochastic layers draw their per-call probe seeds from.

    Training scripts call this once with their seed to make the probes reproducible. It does not
    touch ``torch``'s global generator, and the layers never do either.
    """
    with _seed_lock:
        _seed_stream.seed(int(seed))


def seed_state() -> tuple:
    """The state of the per-call seed stream (for :func:`set_seed_state`)."""
    with _seed_lock:
        return _seed_stream.getstate()


def set_seed_state(state: tuple) -> None:
    """Restores a state returned by :func:`seed_state`."""
    with _seed_lock:
        _seed_stream.setstate(state)


def next_seed() -> int:
    """Returns a fresh 63-bit seed from the private stream (thread-safe)."""
    with _seed_lock:
        return _seed_stream.getrandbits(63)


def _mix(seed: int, block: int) -> int:
    """SplitMix64 of ``(seed, block)``: independent-looking seeds for consecutive blocks."""
    z = (seed + 0x9E3779B97F4A7C15 * (block + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def check_probe_options(n_probes: int, probes: str) -> None:
    """Raises ``ValueError`` naming the option when ``n_probes``/``probes`` are not usable."""
    if probes not in PROBE_FAMILIES:
        raise ValueError(f"probes must be one of {list(PROBE_FAMILIES)}, but got probes={probes!r}")
    if not isinstance(n_probes, int) or n_probes < 0:
        raise ValueError(f"n_probes must be an int >= 0 (0 means exact backprop), but got n_probes={n_probes!r}")
    if probes == "orthogonal" and n_probes & (n_probes - 1):
        raise ValueError(
            f"probes='orthogonal' uses Hadamard blocks and needs n_probes to be a power of two, "
            f"but got n_probes={n_probes}; use 16, 32, 64, ... or probes='rademacher'"
        )


def probe_blocks(n_probes: int, volume: int, budget: int) -> list[tuple[int, int]]:
    """Splits ``n_probes`` columns into ``[start, stop)`` blocks of at most ``budget`` elements.

    Args:
        n_probes: number of probe columns ``r``.
        volume: elements of one probe column, ``B * prod(S)``.
        budget: largest probe block, in elements (the layer output's size: no transient is larger).
    """
    width = max(1, min(n_probes, budget // max(volume, 1)))
    return [(start, min(start + width, n_probes)) for start in range(0, n_probes, width)]


def _hadamard_columns(rows: int, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Columns ``start:stop`` of the Sylvester Hadamard pattern ``H[a, j] = (-1)^popcount(a & j)``
    for row indices ``a = 0..rows-1``: shape ``(stop - start, rows)``."""
    a = torch.arange(rows, device=device).unsqueeze(0)
    j = torch.arange(start, stop, device=device).unsqueeze(1)
    bits = a & j
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def generate_block(
    family: str,
    seed: int,
    n_probes: int,
    block: tuple[int, int],
    batch: int,
    spatial: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Probe columns ``block = (start, stop)`` of an ``n_probes``-column probe matrix.

    Returns:
        Tensor of shape ``(B, stop - start, *S)`` with ``E[z_n z_m] = δ_nm`` per column.

    Families:
        ``rademacher``: independent ±1 entries.
        ``gaussian``: independent standard normal entries.
        ``orthogonal``: ``Z[n, j] = σ_n H[t_n mod r, j]`` with Rademacher signs ``σ`` shared by all
        columns and ``H`` the ``r × r`` Hadamard matrix indexed by the last spatial coordinate ``w``;
        ``t_n`` the index of ``n`` within the fewest trailing spatial dimensions holding ``r`` voxels;
        the columns are exactly orthogonal when those dimensions hold a multiple of ``r`` voxels.
    """
    start, stop = block
    shape = (batch, stop - start, *spatial)
    gen = torch.Generator(device=device)
    if family == "orthogonal":
        gen.manual_seed(_mix(seed, 0))
        signs = torch.empty((batch, 1, *spatial), device=device, dtype=dtype).bernoulli_(0.5, generator=gen)
        signs.mul_(2).sub_(1)
        # Index the Hadamard rows by the flattened trailing dimensions, as few as reach r voxels,
        # so small deep-layer grids (last dimension < r) still use every row.
        trailing = len(spatial) - 1
        while trailing > 0 and math.prod(spatial[trailing:]) < n_probes:
            trailing -= 1
        tail = tuple(spatial[trailing:])
        pattern = _hadamard_columns(n_probes, start, stop, device, dtype)  # (rb, r)
        pattern = pattern[:, torch.arange(math.prod(tail), device=device) % n_probes]  # (rb, prod(tail))
        pattern = pattern.view(1, stop - start, *([1] * trailing), *tail)
        return signs * pattern
    gen.manual_seed(_mix(seed, start + 1))
    if family == "rademacher":
        out = torch.empty(shape, device=device, dtype=dtype).bernoulli_(0.5, generator=gen)
        return out.mul_(2).sub_(1)
    out = torch.randn(shape, device=device, dtype=torch.float32, generator=gen)
    return out if dtype == torch.float32 else out.to(dtype)


def iter_blocks(
    family: str,
    seed: int,
    n_probes: int,
    batch: int,
    spatial: Sequence[int],
    budget: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """Yields ``((start, stop), Z_block)`` over all probe columns, each block within ``budget`` elements."""
    volume = batch
    for s in spatial:
        volume *= s
    for block in probe_blocks(n_probes, volume, budget):
        yield block, generate_block(family, seed, n_probes, block, batch, spatial, device, dtype)
