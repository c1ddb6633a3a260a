"""Random probe matrices for randomized trace estimation.

A probe matrix ``Z`` has one row per voxel index ``n = (b, x)`` and one column per probe, with
``E[Z Zᵀ] = I`` for every family, so ``Zᵀ A`` / ``Zᵀ B`` give an unbiased estimate of ``Aᵀ B``.
Probes are laid out like activations, ``(B, r, *S)``, and generated block by block (a block is a
range of probe columns) from a seed, so the forward pass and the backward pass regenerate the same
numbers without storing them. A private ``torch.Generator`` on the tensor's device is used: torch's
global random state is never read or written.

The spectral sketch draws its random numbers differently (:func:`hash_bits`):
as a counter-based hash of a seed and the element index, computed by ordinary integer tensor ops.
No generator state exists on the host or the device, so the draws can be captured in a CUDA graph
or traced by ``torch.compile``; the seed may be a Python int or a 0-dim int64 tensor on the device
(:func:`device_seed`, which a captured graph advances on every replay).
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
# The device counters start from their own stream, derived from the host stream's seed or state
# without drawing from it: the host stream's draws never depend on which counters exist.
_device_stream = random.Random()
_DEVICE_SALT = 0x5DEECE66D


def manual_seed(seed: int) -> None:
    """Seeds the stream that stochastic layers draw their per-call probe seeds from.

    Training scripts call this once with their seed to make the probes reproducible. It does not
    touch ``torch``'s global generator, and the layers never do either.
    """
    with _seed_lock:
        _seed_stream.seed(int(seed))
        _device_stream.seed(int(seed) ^ _DEVICE_SALT)
        _restart_device_seeds()


def seed_state() -> tuple:
    """The state of the per-call seed stream (for :func:`set_seed_state`)."""
    with _seed_lock:
        return _seed_stream.getstate()


def set_seed_state(state: tuple) -> None:
    """Restores a state returned by :func:`seed_state`."""
    with _seed_lock:
        _seed_stream.setstate(state)
        copy = random.Random()
        copy.setstate(state)
        _device_stream.seed(copy.getrandbits(63) ^ _DEVICE_SALT)
        _restart_device_seeds()


def _restart_device_seeds() -> None:
    """Restarts :func:`device_seed`'s counters from the device stream (the lock held), in place: a
    compiled graph or a captured CUDA graph that reads a counter keeps reading the same tensor."""
    for key in sorted(_device_seeds):
        _device_seeds[key].fill_(_device_stream.getrandbits(63))


def next_seed() -> int:
    """Returns a fresh 63-bit seed from the private stream (thread-safe)."""
    with _seed_lock:
        return _seed_stream.getrandbits(63)


def _signed(value: int) -> int:
    """``value mod 2⁶⁴`` as a signed 64-bit int (what an int64 tensor holds)."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _splitmix_tensor(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on an int64 tensor (wrapping arithmetic; ``>>`` made logical by masking)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def hash_bits(seed: int | torch.Tensor, shape: Sequence[int], stream: int, device: torch.device) -> torch.Tensor:
    """64 random-looking bits per element of ``shape`` (int64), a function of ``(seed, stream, index)``
    only: element ``i`` is SplitMix64's finaliser of ``(base XOR (i + 1))·γ`` with ``base`` = the
    finaliser of the seed offset by the stream (XOR before the product: ``torch.compile`` would fold
    ``arange·γ`` into an integer index expression, which overflows its int64 printer). ``seed``: an int, or a 0-dim int64 tensor on ``device`` (then nothing is
    read on the host); equal seeds give equal bits either way. Draw everything a call needs at once
    and split it (:func:`uniform_from_bits`, :func:`signs_from_bits`): each draw is a dozen small ops."""
    salt = _signed(_mix(stream, 0))
    if isinstance(seed, torch.Tensor):
        base = _splitmix_tensor(seed + salt)
    else:
        base = _signed(_finalize(int(seed) + salt))
    index = torch.arange(1, math.prod(shape) + 1, device=device, dtype=torch.int64).view(tuple(shape))
    return _splitmix_tensor((index ^ base) * _GOLDEN)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in ``[0, 1)`` (float64, the top 53 of the 64 bits of :func:`hash_bits`)."""
    return ((bits >> 11) & ((1 << 53) - 1)).double() * (1.0 / (1 << 53))


def signs_from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Independent ±1 in ``dtype``: the sign bit of :func:`hash_bits`."""
    return ((bits >> 63) * 2 + 1).to(dtype)


def hash_uniform(seed: int | torch.Tensor, shape: Sequence[int], stream: int, device: torch.device) -> torch.Tensor:
    """Uniform numbers in ``[0, 1)`` (float64, 53 random bits) of ``shape``."""
    return uniform_from_bits(hash_bits(seed, shape, stream, device))


def hash_signs(seed: int | torch.Tensor, shape: Sequence[int], stream: int, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """Independent ±1 of ``shape`` in ``dtype``."""
    return signs_from_bits(hash_bits(seed, shape, stream, device), dtype)


def capturing(device: torch.device) -> bool:
    """Whether the code runs inside ``torch.compile``'s tracing or a CUDA-graph capture on ``device``:
    then a value computed on the host is frozen into the graph, the same on every replay, and a
    tensor made now holds its values only once the graph runs."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_device_seeds: dict[str, torch.Tensor] = {}


def ensure_device_seed(device: torch.device) -> None:
    """Makes :func:`device_seed`'s counter for ``device`` if it has none (a dict lookup otherwise):
    eager stochastic layers call it, so the warm-up steps before a CUDA-graph capture make it."""
    if str(device) not in _device_seeds:
        _new_counter(device)


def device_seed(device: torch.device) -> torch.Tensor:
    """A fresh seed as a 0-dim int64 tensor on ``device``, with no host work after the first call.

    Each device has a counter tensor, started from the device stream on its first use (and
    restarted in place by :func:`manual_seed`); a call increments it in place and hashes it into a
    seed. Make it before ``torch.compile`` traces a model (:func:`ensure_device_seed`): made while
    tracing, it breaks the graph.
    Inside a captured CUDA graph the increment is part of the graph, so every replay draws new
    seeds. The counter is not part of :func:`seed_state`: a run restored from a checkpoint draws
    different (equally valid) seeds on this path.
    """
    counter = _device_seeds.get(str(device))
    if counter is None:
        counter = _new_counter(device)
    # advance first, then hash the new value: a compiled graph then derives the seed from an
    # intermediate tensor, and never saves the counter itself (which later layers advance) for backward
    counter.add_(1)
    return _splitmix_tensor(counter * _GOLDEN)


@torch.compiler.disable
def _new_counter(device: torch.device) -> torch.Tensor:
    """Starts :func:`device_seed`'s counter for ``device`` from the device stream. Runs outside any
    traced graph (it reads the host stream, behind a lock); marked as a static address, so a
    ``torch.compile(mode="reduce-overhead")`` graph that increments it keeps its CUDA graph."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"app.nn.probes.device_seed: no seed counter on {device} yet, and one made during a CUDA-graph "
            f"capture would be reset on every replay; run one eager step first (stochastic layers make it), "
            f"or call app.nn.probes.device_seed(torch.device({str(device)!r})) before capturing"
        )
    with _seed_lock:
        start = _device_stream.getrandbits(63)
    counter = torch.full((), start, dtype=torch.int64, device=device)
    torch._dynamo.mark_static_address(counter)
    _device_seeds[str(device)] = counter
    return counter


def _finalize(z: int) -> int:
    """SplitMix64's finaliser of ``z mod 2⁶⁴`` (an unsigned 64-bit int; :func:`_splitmix_tensor` on the host)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


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
