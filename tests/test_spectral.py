"""app.nn.spectral: FFT lengths for every stride in bounded time, unbiasedness at r = 1 and with
linearly dependent channels, transient memory within the block budget; app.bench.peaks' counting."""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import app.nn as snn
from app.bench import peaks
from app.nn import spectral
from app.nn.fft_lengths import CUFFT_NS_PER_POINT

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass(frozen=True)
class Geom:
    """A regular or transposed convolution's geometry (:class:`app.nn.spectral.Geometry`)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    kernel: tuple[int, ...]
    groups: int = 1
    transposed: bool = False

    @staticmethod
    def of(dims: int, kernel: Sequence[int], stride=1, padding=0, dilation=1, transposed: bool = False) -> Geom:
        def tup(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
        return Geom(tup(stride), tup(padding), tup(dilation), tuple(kernel), 1, transposed)

    def conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)


class _Expired(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Fails the test, instead of hanging it, when the block runs longer than ``seconds``."""
    def expire(signum, frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        pytest.fail(f"{what} did not return within {seconds:g} s", pytrace=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _seven_smooth(n: int) -> bool:
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Many draws on tiny tensors: one intra-op thread, as thread hand-offs dominate on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grids(x: torch.Tensor, y_spatial: Sequence[int], geom: Geom, device_type: str = "cpu") -> tuple[tuple[int, ...], list[int]]:
    """``(M, grid of x)`` as the functional chooses them on a ``device_type`` device (a transposed
    conv's ``x`` lies on ``M / s``)."""
    if geom.transposed:
        sizes = spectral.fft_sizes(y_spatial, x.shape[2:], geom, device_type)
        return sizes, [m // s for m, s in zip(sizes, geom.stride)]
    sizes = spectral.fft_sizes(x.shape[2:], y_spatial, geom, device_type)
    return sizes, list(sizes)


def _exact_weight_grad(x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor, geom: Geom) -> torch.Tensor:
    w = w.detach().requires_grad_()
    conv = (CONV_T if geom.transposed else CONV)[x.dim() - 2]
    (grad,) = torch.autograd.grad(conv(x, w, **geom.conv_kwargs()), w, gy)
    return grad


def _estimate(x: torch.Tensor, gy: torch.Tensor, geom: Geom, n_probes: int, seeds: Sequence[int], budget: int = 1 << 30,
              device_type: str = "cpu") -> torch.Tensor:
    """The mean of the sketched dW over one draw per seed, on the FFT grid of a ``device_type``
    device: the draws are stacked along the batch axis, where ``weight_grad`` sums, so one call
    evaluates them all."""
    sizes, grid = _grids(x, gy.shape[2:], geom, device_type)
    parts = [spectral.sketch(x, grid, n_probes, s, budget) for s in seeds]
    values, index, weight = (torch.cat(t) for t in zip(*parts))
    estimate = spectral.transposed_weight_grad if geom.transposed else spectral.weight_grad
    grad_y = gy.repeat(len(seeds), *([1] * (gy.dim() - 1)))
    return estimate(grad_y, values, index, weight, sizes, geom, budget) / len(seeds)


def _z2(x: torch.Tensor, w_shape: Sequence[int], geom: Geom, n_probes: int, n: int = 1000, groups: int = 20) -> tuple[float, float]:
    """``(mean squared z-score, relative bias)`` of ``n`` independent sketched dW against the exact one.

    Batch means: the draws form ``groups`` groups whose means are close to normal even though one
    importance-weighted draw is heavy-tailed, so ``z = (mean − exact) / (std_groups / √groups)`` is
    t-distributed for an unbiased estimator (``E z² ≈ 1.1``), while a bias ``b`` adds ``n b² / var``.
    """
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(*w_shape, generator=gen)
    conv = (CONV_T if geom.transposed else CONV)[x.dim() - 2]
    gy = torch.randn(conv(x, w, **geom.conv_kwargs()).shape, generator=gen)
    exact = _exact_weight_grad(x, w, gy, geom)
    size = n // groups
    means = torch.stack([_estimate(x, gy, geom, n_probes, range(g * size, (g + 1) * size)) for g in range(groups)])
    mean, se = means.mean(0), means.std(0) / math.sqrt(groups)
    live = exact.abs() > 1e-6 * exact.abs().max()  # zero channels have dW = 0 exactly
    z = (mean - exact)[live] / se[live].clamp_min(1e-9 * exact.abs().max())
    return z.pow(2).mean().item(), ((mean - exact).norm() / exact.norm()).item()


# --- FFT lengths: any stride, bounded time ---------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2, 3, 7, 11, 13, 22, 49, 97])
@pytest.mark.parametrize("n", [1, 50, 1000])
def test_fft_length_is_the_smallest_fast_multiple_of_the_stride(stride, n):
    """``m = stride · j >= n`` with ``j`` 7-smooth and minimal: it exists for every stride (a stride
    with a prime factor above 7 has no 7-smooth multiple at all) and costs at most ``j`` tries."""
    with deadline(5, f"_smooth({n}, {stride})"):
        m = spectral._smooth(n, stride)
    j = m // stride
    assert m >= n and m % stride == 0 and _seven_smooth(j), (n, stride, m)
    assert not any(stride * i >= n and _seven_smooth(i) for i in range(1, j)), (n, stride, m)
    if _seven_smooth(stride):
        assert _seven_smooth(m)  # a fast FFT wherever one exists


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("n", [41, 65, 97, 129, 161, 200, 257, 300])
def test_cuda_fft_length_is_the_shortest_of_the_cheapest_measured(stride, n):
    """On CUDA: a multiple of the stride from ``n`` to ``MAX_GRID_GROWTH · n`` (or the 7-smooth
    length), whose measured cost is within ``COST_TOLERANCE`` of every candidate's, and no shorter
    candidate is."""
    m = spectral._fast_cuda_length(n, stride, 3)
    smooth = spectral._smooth(n, stride)
    candidates = [c for c in range(n, max(smooth, int(spectral.MAX_GRID_GROWTH * n)) + 1)
                  if c % stride == 0 and c in CUFFT_NS_PER_POINT]
    cost = {c: c ** 3 * CUFFT_NS_PER_POINT[c] for c in candidates}
    assert m >= n and m % stride == 0 and m in cost, (n, stride, m)
    assert cost[m] <= spectral.COST_TOLERANCE * min(cost.values())
    assert all(cost[c] > spectral.COST_TOLERANCE * min(cost.values()) for c in candidates if c < m)


def test_cuda_fft_lengths_are_faster_than_the_smooth_rule_where_measured():
    """The 128³ layers' grid: 132 (2²·3·11) on CUDA, where the 7-smooth rule gives 135 (3³·5), which
    cuFFT runs at over 1.5 times the cost per point; tiny and unmeasured lengths keep the rule."""
    geom = Geom.of(3, (3, 3, 3), padding=1)
    assert spectral.fft_sizes((128,) * 3, (128,) * 3, geom) == (135,) * 3
    assert spectral.fft_sizes((128,) * 3, (128,) * 3, geom, "cuda") == (132,) * 3
    assert CUFFT_NS_PER_POINT[135] > 1.5 * CUFFT_NS_PER_POINT[132]
    for n in (8, 16, 32, 400):
        assert spectral.fft_sizes((n,) * 3, (n,) * 3, geom, "cuda") == spectral.fft_sizes((n,) * 3, (n,) * 3, geom)


@pytest.mark.parametrize("spatial,kernel,kwargs,transposed", [
    ((64, 6, 5), (3, 3, 3), dict(padding=1), False),  # 65 -> 66 on CUDA, 70 on the CPU
    ((64, 7, 6), (3, 3, 3), dict(stride=2, padding=1), False),
    ((33, 4, 3), (2, 2, 2), dict(stride=2), True),  # output 66: grid 66 (70 on the CPU), x on 33
    ((44, 5, 6), (3, 3, 1), dict(padding=(1, 0, 0)), False),  # 45 -> 49 on CUDA
])
def test_every_frequency_is_exact_on_the_cuda_grids(spatial, kernel, kwargs, transposed):
    """The CUDA grids differ from the CPU's (checked) and dW is exact on them with every coefficient kept."""
    gen = torch.Generator().manual_seed(5)
    dims = 3
    geom = Geom.of(dims, kernel, transposed=transposed, **kwargs)
    x = torch.randn(2, 3, *spatial, generator=gen)
    w = torch.randn(*((3, 4) if transposed else (4, 3)), *kernel, generator=gen)
    conv = (CONV_T if transposed else CONV)[dims]
    gy = torch.randn(conv(x, w, **geom.conv_kwargs()).shape, generator=gen)
    cuda_grid = _grids(x, gy.shape[2:], geom, "cuda")[1]
    assert cuda_grid != _grids(x, gy.shape[2:], geom)[1]
    grad = _estimate(x, gy, geom, 2 * spectral.n_frequencies(cuda_grid), [0], device_type="cuda")
    exact = _exact_weight_grad(x, w, gy, geom)
    torch.testing.assert_close(grad, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


@pytest.mark.parametrize("spatial,grid,dtype,budget", [
    ((12, 10, 9), (14, 12, 10), torch.float32, 1 << 30),  # one block
    ((12, 10, 9), (13, 10, 11), torch.bfloat16, 1),  # a block per channel
    ((7, 9), (9, 12), torch.float32, 1),
    ((6,), (8,), torch.float32, 1 << 30),  # 1D: the whole FFT
])
def test_gather_sums_the_first_dimension_as_the_full_fft(spatial, grid, dtype, budget, monkeypatch):
    """``_gather`` (the first dimension summed directly) equals indexing the full ``rfftn``."""
    monkeypatch.setattr(spectral, "MIN_BLOCK", 1)
    gen = torch.Generator().manual_seed(6)
    t = torch.randn(2, 5, *spatial, generator=gen).to(dtype)
    full = torch.fft.rfftn(t.float(), s=grid, dim=tuple(range(2, t.dim()))).flatten(2)  # (B, C, F)
    flat = torch.randint(0, full.shape[2], (2, 17), generator=gen)
    got = spectral._gather(t, grid, flat, budget)
    want = full.gather(2, flat[:, None, :].expand(2, 5, -1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert spectral._pruned(t, grid) == (len(grid) >= 2)


def test_issue_repro_stride_11_runs():
    """The repro of a layer whose stride has the prime factor 11: forward and backward return."""
    with deadline(30, "stochastic_conv1d(stride=11, sketch='spectral')"):
        w = torch.randn(3, 2, 11).requires_grad_()
        y = snn.stochastic_conv1d(torch.randn(1, 2, 50), w, stride=11, n_probes=4, sketch="spectral", seed=0)
        (grad,) = torch.autograd.grad(y.sum(), w)
    assert grad.shape == w.shape and torch.isfinite(grad).all()


def test_converted_conv3d_with_stride_13_trains():
    """``convert(nn.Conv3d(1, 8, 13, stride=13))``: its first training forward and backward return."""
    layer = snn.convert(nn.Conv3d(1, 8, 13, stride=13))
    x = torch.randn(1, 1, 26, 26, 27)
    with deadline(30, "a converted Conv3d(1, 8, 13, stride=13)"):
        layer(x).square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("dims,kernel,kwargs,transposed", [
    (1, (11,), dict(stride=11), False),
    (1, (13,), dict(stride=13, padding=2), False),
    (2, (13, 3), dict(stride=(13, 2), padding=(0, 1)), False),
    (1, (11,), dict(stride=11, padding=3), True),
    (2, (3, 13), dict(stride=(2, 13)), True),
])
def test_every_frequency_is_exact_for_large_prime_strides(dims, kernel, kwargs, transposed):
    """With every Fourier coefficient kept, dW is exact on the stride-11/13 FFT grids too."""
    gen = torch.Generator().manual_seed(2)
    geom = Geom.of(dims, kernel, transposed=transposed, **kwargs)
    x = torch.randn(2, 3, *((9, 7)[:dims] if transposed else (53, 40)[:dims]), generator=gen)
    w = torch.randn(*((3, 4) if transposed else (4, 3)), *kernel, generator=gen)
    conv = (CONV_T if transposed else CONV)[dims]
    gy = torch.randn(conv(x, w, **geom.conv_kwargs()).shape, generator=gen)
    with deadline(30, f"the spectral sketch with stride {geom.stride}"):
        every = 2 * spectral.n_frequencies(_grids(x, gy.shape[2:], geom)[1])
        grad = _estimate(x, gy, geom, every, [0])
    exact = _exact_weight_grad(x, w, gy, geom)
    torch.testing.assert_close(grad, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


@pytest.mark.usefixtures("one_thread")
def test_large_prime_stride_is_unbiased():
    x = torch.randn(2, 2, 50, generator=torch.Generator().manual_seed(3))
    with deadline(30, "the spectral sketch with stride 11"):
        z2, bias = _z2(x, (3, 2, 11), Geom.of(1, (11,), stride=11, padding=2), n_probes=4)
    assert z2 < 4, f"mean squared z-score {z2:.2f} (about 1 without bias), relative bias {bias:.3f}"


# --- r = 1: at least one sampled frequency --------------------------------------------------------

@pytest.mark.parametrize("channels", [3, 6])
@pytest.mark.usefixtures("one_thread")
def test_one_probe_is_unbiased(channels):
    """r = 1 samples its one frequency (keeping the strongest one alone would drop all others)."""
    x = torch.rand(2, channels, 23, generator=torch.Generator().manual_seed(4)) + 0.5
    z2, bias = _z2(x, (4, channels, 3), Geom.of(1, (3,), padding=1), n_probes=1)
    assert z2 < 4, f"mean squared z-score {z2:.3g} (about 1 without bias), relative bias {bias:.3f}"


@pytest.mark.parametrize("n_probes,top,drawn", [(1, 0, 1), (2, 1, 1), (3, 2, 1), (8, 4, 4), (9, 5, 4)])
def test_split_of_kept_and_sampled_frequencies(n_probes, top, drawn):
    x = torch.randn(1, 2, 40, generator=torch.Generator().manual_seed(5))
    values, index, weight = spectral.sketch(x, (41,), n_probes, 0, 1 << 20)
    mult = spectral._multiplicity((41,), x.device)
    assert index.shape == weight.shape == (1, top + drawn) and values.shape == (1, 2, top + drawn)
    torch.testing.assert_close(weight[:, :top], mult[index[:, :top]])  # kept exactly, weight m_f


# --- dependent channels: sampling probabilities stay positive -------------------------------------

DEPENDENT = {  # channel coefficients of one random signal: the ±1 energy mixes cancel in 1/16 of draws
    "duplicated, zero": [1, 1, 0, 0, 0],
    "negated, zero": [0, 1, 0, -1, 0, 0],
}


@pytest.mark.parametrize("name", list(DEPENDENT))
@pytest.mark.usefixtures("one_thread")
def test_linearly_dependent_channels_are_unbiased(name):
    """Equal or opposite channels (and zero ones) make every ±1 channel mix vanish in 1/16 of the
    draws; the frequencies outside the kept set must stay reachable then."""
    coef = torch.tensor(DEPENDENT[name], dtype=torch.float32)
    x = torch.randn(2, 1, 23, generator=torch.Generator().manual_seed(6)) * coef.view(1, -1, 1)
    z2, bias = _z2(x, (4, len(coef), 3), Geom.of(1, (3,), padding=1), n_probes=12)
    assert z2 < 4, f"mean squared z-score {z2:.2f} (about 1 without bias), relative bias {bias:.3f}"


@pytest.mark.usefixtures("one_thread")
def test_sampled_weights_are_positive_and_bounded_when_the_energy_estimate_cancels():
    """``π_f >= ε / R`` on the R frequencies outside the kept set: every sampled weight is positive
    and at most ``m_f · R / (ε · r_s)``, in every draw, also when all channel mixes cancel."""
    x = torch.randn(2, 1, 30, 31, generator=torch.Generator().manual_seed(7)) * torch.tensor([1.0, -1, 0, 0, 0]).view(1, -1, 1, 1)
    sizes = (32, 32)
    n_probes, drawn = 16, 8
    rest = spectral.n_frequencies(sizes) - (n_probes - drawn)
    sampled = torch.stack([spectral.sketch(x, sizes, n_probes, seed, 1 << 20)[2][:, -drawn:]
                           for seed in range(100)])  # (seeds, B, r_s)
    zero = (sampled == 0).any(-1).any(-1).nonzero().flatten().tolist()
    assert not zero, f"draws {zero} sample a frequency of probability 0 (weight 0)"
    assert sampled.max() <= 2 * rest / (spectral.UNIFORM_SHARE * drawn) * (1 + 1e-4)


# --- transient memory ------------------------------------------------------------------------------

def test_sketch_and_weight_grad_transients_stay_within_the_block_budget():
    """The forward sketch and the backward dY spectrum transform one channel block at a time: their
    transient peaks stay within the block budget plus a few ``(B, F)`` and ``(B, r, C, K)`` terms."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 24, 32, 32, 32, generator=gen)
    gy = torch.randn(1, 24, 32, 32, 32, generator=gen)
    geom = Geom.of(3, (3, 3, 3), padding=1)
    sizes = spectral.fft_sizes(x.shape[2:], gy.shape[2:], geom)
    block, r = 400_000, 16  # above MIN_BLOCK: the budget, not the floor, sets the blocks
    small = 8 * spectral.n_frequencies(sizes) + 8 * r * 24 * 27  # real numbers
    state, fwd_peak, _ = peaks.cpu_peak(lambda: spectral.sketch(x, sizes, r, 0, block))
    _, bwd_peak, _ = peaks.cpu_peak(lambda: spectral.weight_grad(gy, *state, sizes, geom, 2 * block))  # dY: half its size
    assert fwd_peak <= 4 * (block + small), (fwd_peak / 4, block + small)
    assert bwd_peak <= 4 * (block + small), (bwd_peak / 4, block + small)


def test_cpu_peak_counts_allocations_and_frees():
    def allocations():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(2000, 1000)  # 8 MB: 12 MB at once
        del a
        c = torch.empty(500, 1000)  # 2 MB
        del b
        return c

    out, peak, held = peaks.cpu_peak(allocations)
    assert peak == 12_000_000 and held == 2_000_000 and out.numel() == 500_000


def test_peaks_cli_prints_a_table(capsys):
    assert peaks.main(["--shape", "1,4,8,8,8", "--out-channels", "4", "--n-probes", "8", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "| exact |" in text and "| spectral |" in text
    rows = peaks.layer_peaks((1, 4, 8, 8, 8), 4, n_probes=8, repeats=0)
    assert [r.mode for r in rows] == ["exact", "spectral"]
    assert all(r.kept >= 1.0 and r.forward_peak >= r.kept and r.backward_peak > 0 for r in rows)
