"""app.nn: exactness of forward and input gradient, unbiasedness of the weight gradient, memory."""

from __future__ import annotations

import gc
import inspect
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import app.nn as snn
from app.nn.fidelity import LayerFidelity
from app.nn.functional import (
    CONV_BLOCK, MIN_BLOCK_CHANNELS, ConvGeometry, _channel_block, _conv, _input_grad, _ntuple, _output_shape,
    _spectral_frequencies, _StochasticConv,
)
from app.nn.probes import generate_block, probe_blocks

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
SCONV = {1: snn.stochastic_conv1d, 2: snn.stochastic_conv2d, 3: snn.stochastic_conv3d}
SCONV_T = {1: snn.stochastic_conv_transpose1d, 2: snn.stochastic_conv_transpose2d, 3: snn.stochastic_conv_transpose3d}
SIZES = {1: (23,), 2: (9, 10), 3: (7, 6, 8)}


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread

# (dims, transposed, conv kwargs, sketch)
CASES = [
    (1, False, dict(padding=1), "offset"),
    (2, False, dict(), "offset"),
    (2, False, dict(padding=2, dilation=2), "shifted"),
    (3, False, dict(padding=1), "offset"),
    (3, False, dict(padding=1), "shifted"),
    (3, False, dict(stride=2, padding=1), "offset"),
    (3, False, dict(stride=2, padding=1), "shifted"),
    (3, False, dict(dilation=2, padding=2), "offset"),
    (3, False, dict(groups=2, padding=1), "offset"),
    (3, False, dict(groups=2, padding=1), "shifted"),
    (1, False, dict(padding=1), "spectral"),
    (2, False, dict(padding=2, dilation=2), "spectral"),
    (3, False, dict(padding=1), "spectral"),
    (3, False, dict(stride=2, padding=1), "spectral"),
    (3, False, dict(groups=2, padding=1), "spectral"),
    (1, True, dict(stride=2, padding=1, output_padding=1), "shifted"),
    (2, True, dict(stride=2, dilation=3, padding=2, output_padding=2), "shifted"),
    (3, True, dict(stride=2), "shifted"),
    (3, True, dict(groups=2, padding=1), "shifted"),
    (1, True, dict(stride=2, padding=1, output_padding=1), "spectral"),
    (2, True, dict(stride=2, dilation=3, padding=2, output_padding=2), "spectral"),
    (3, True, dict(stride=2), "spectral"),
    (3, True, dict(groups=2, padding=1), "spectral"),
]


def _case_tensors(dims, transposed, kwargs, dtype=torch.float32, batch=2):
    gen = torch.Generator().manual_seed(1234)
    groups = kwargs.get("groups", 1)
    c_in, c_out = 4, 6
    x = (torch.rand(batch, c_in, *SIZES[dims], generator=gen, dtype=dtype) + 0.5).requires_grad_()
    shape = (c_in, c_out // groups) if transposed else (c_out, c_in // groups)
    w = torch.randn(*shape, *([3] * dims), generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(c_out, generator=gen, dtype=dtype).requires_grad_()
    return x, w, b


def _run(dims, transposed, kwargs, x, w, b, **sketch):
    if transposed:
        return SCONV_T[dims](x, w, b, **kwargs, **sketch)
    return SCONV[dims](x, w, b, **kwargs, **sketch)


def _exact(dims, transposed, kwargs, x, w, b):
    return (CONV_T if transposed else CONV)[dims](x, w, b, **kwargs)


UNIT_ROUNDOFF = 2.0**-24  # fp32


@pytest.mark.parametrize("dims,transposed,kwargs,sketch", CASES)
def test_forward_and_input_gradient_match_torch(dims, transposed, kwargs, sketch):
    """Forward and input gradient are torch's own ATen calls: bit-identical. The bias gradient is a
    sum over ``n`` values of dY in another order: within the pairwise-summation bound
    ``log2(n) · u · Σ|dY|`` of the float64 sum (the bound holds for any thread count)."""
    x, w, b = _case_tensors(dims, transposed, kwargs)
    y_ref = _exact(dims, transposed, kwargs, x, w, b)
    gy = torch.randn_like(y_ref)
    (gx_ref,) = torch.autograd.grad(y_ref, x, gy)
    y = _run(dims, transposed, kwargs, x, w, b, n_probes=4, sketch=sketch, seed=0)
    assert type(y.grad_fn).__name__.startswith("_StochasticConv")
    gx, gb, gw = torch.autograd.grad(y, (x, b, w), gy)
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)
    dims_sum = (0, *range(2, gy.dim()))
    n = gy.numel() // gy.shape[1]
    bound = math.log2(n) * UNIT_ROUNDOFF * gy.abs().sum(dims_sum, dtype=torch.float64)
    assert ((gb.double() - gy.double().sum(dims_sum)).abs() <= bound).all()
    assert gw.shape == w.shape and gw.dtype == w.dtype


def _split_by_speed(cases, fast):
    """``cases`` as pytest parameters, those not in ``fast`` marked slow (run with ``-m slow``)."""
    return [case if case in fast else pytest.param(*case, marks=pytest.mark.slow) for case in cases]


# 1D cases of each sketch (and transposed ones) run in the default suite; the 2D/3D ones with -m slow.
FAST_CASES = [CASES[0], CASES[10], CASES[15], CASES[19]]


@pytest.mark.parametrize(
    "dims,transposed,kwargs,sketch",
    _split_by_speed([CASES[0], CASES[10], CASES[15], CASES[5], CASES[8], CASES[14], CASES[16], CASES[22]], FAST_CASES),
)
def test_gradcheck_float64_input_gradient(dims, transposed, kwargs, sketch):
    """Input (and bias) gradients are exact: float64 gradcheck with the weight held fixed."""
    x, w, b = _case_tensors(dims, transposed, kwargs, dtype=torch.float64, batch=1)
    w_sketched = w.detach().requires_grad_()  # sketched dW is random, so gradcheck only x and b

    def f(x_, b_):
        return _run(dims, transposed, kwargs, x_, w_sketched, b_, n_probes=4, sketch=sketch, seed=0)

    assert type(f(x, b).grad_fn).__name__.startswith("_StochasticConv")
    # default suite: gradcheck along random directions (fast_mode); -m slow: every Jacobian entry
    fast = (dims, transposed, kwargs, sketch) in FAST_CASES
    assert torch.autograd.gradcheck(f, (x, b), eps=1e-6, atol=1e-6, fast_mode=fast)


def _z_test(estimates: torch.Tensor, exact: torch.Tensor, low: float = 0.5, high: float = 1.6) -> None:
    """Asserts that independent estimates of ``exact`` are unbiased and converge at the 1/sqrt(n) rate.

    The standardised error z = (mean − exact) / (std / sqrt(n)) has E[z²] = 1 per entry for any n;
    a bias b makes it grow like n · b² / var, so its mean over entries catches biases far smaller
    than one estimate's noise. Then the rate itself: the error of the mean of n/16 estimates
    against that of the mean of n, aggregated over entries, is sqrt(16) = 4 times larger.
    """
    n = estimates.shape[0]
    mean, std = estimates.mean(0), estimates.std(0)
    z2 = ((mean - exact) / (std / math.sqrt(n))).pow(2).mean().item()
    assert low < z2 < high, f"mean squared z-score {z2:.2f} (1 for an unbiased estimator)"
    used = n // 16 * 16
    err_part = (estimates[:used].view(16, used // 16, *exact.shape).mean(1) - exact).pow(2).sum().item() / 16
    err_all = (estimates[:used].mean(0) - exact).pow(2).sum().item()
    ratio = math.sqrt(err_part / err_all)
    assert 2.0 < ratio < 8.0, f"error ratio {ratio:.2f} for 16x more samples (4 expected)"


UNBIASED_CASES = [(*case, control) for control in ("mean", "none") for case in CASES]
FAST_UNBIASED = [(*case, "mean") for case in FAST_CASES] + [(*CASES[0], "none")]


@pytest.mark.parametrize("dims,transposed,kwargs,sketch,control", _split_by_speed(UNBIASED_CASES, FAST_UNBIASED))
def test_weight_gradient_is_unbiased(dims, transposed, kwargs, sketch, control):
    """The mean of n independent estimates converges to the exact dW at the 1/sqrt(n) rate
    (``_z_test``): n = 96 draws in the default suite, 300 with -m slow."""
    x, w, b = _case_tensors(dims, transposed, kwargs)
    y_ref = _exact(dims, transposed, kwargs, x, w, b)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7))
    (gw_ref,) = torch.autograd.grad(y_ref, w, gy)
    n = 96 if (dims, transposed, kwargs, sketch, control) in FAST_UNBIASED else 300
    estimates = torch.stack([
        torch.autograd.grad(_run(dims, transposed, kwargs, x, w, b, n_probes=4, sketch=sketch, control=control, seed=s), w, gy)[0]
        for s in range(n)
    ])
    # importance weights make the spectral estimate heavy-tailed: its sample std overstates the
    # typical error, which lowers z^2 (a bias raises it)
    _z_test(estimates, gw_ref, low=0.3 if sketch == "spectral" else 0.5)


def _padded_conv3d_case():
    """A 3D case with padding 1, its random upstream gradient and the exact dW."""
    x, w, b = _case_tensors(3, False, dict(padding=1))
    y_ref = F.conv3d(x, w, b, padding=1)
    gy = torch.randn_like(y_ref)
    (gw_ref,) = torch.autograd.grad(y_ref, w, gy)
    return x, w, b, gy, gw_ref


@pytest.mark.parametrize("dims,transposed,kwargs", [
    (1, False, dict(padding=1)), (2, False, dict(stride=(2, 3), padding=1)), (3, False, dict(padding=2, dilation=2, groups=2)),
    (3, False, dict(stride=2)), (3, True, dict(stride=2)), (2, True, dict(stride=2, dilation=3, padding=2, output_padding=2)),
    (3, True, dict(stride=2, padding=1, output_padding=1, groups=2)),
])
def test_spectral_sketch_with_every_frequency_is_exact(dims, transposed, kwargs):
    """Keeping every Fourier coefficient reproduces dW to fp32 rounding: the FFT grid neither wraps
    the correlation around nor loses the strided grid (transposed: every alias of x's frequencies)."""
    x, w, b = _case_tensors(dims, transposed, kwargs)
    geom = ConvGeometry(
        stride=_ntuple(kwargs.get("stride", 1), dims, "stride"), padding=_ntuple(kwargs.get("padding", 0), dims, "padding"),
        dilation=_ntuple(kwargs.get("dilation", 1), dims, "dilation"), groups=kwargs.get("groups", 1), kernel=tuple(w.shape[2:]),
        transposed=transposed, output_padding=_ntuple(kwargs.get("output_padding", 0), dims, "output_padding") if transposed else (),
    )
    y_ref = _exact(dims, transposed, kwargs, x, w, b)
    gy = torch.randn_like(y_ref)
    (gw_ref,) = torch.autograd.grad(y_ref, w, gy)
    everything = 2 * _spectral_frequencies(x.shape[2:], geom)
    y = _StochasticConv.apply(x, w, b, geom, everything, "rademacher", "spectral", "mean", 0)
    (gw,) = torch.autograd.grad(y, w, gy)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-4 * gw_ref.abs().max().item())


def test_spectral_sketch_with_mixed_channel_energy_is_unbiased():
    """Above N_MIXES channels the frequencies are picked from random channel mixes: still unbiased."""
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 8, 6, 7, 5, generator=gen) + 0.2
    w = torch.randn(3, 8, 3, 3, 3, generator=gen, requires_grad=True)
    gy = torch.randn(2, 3, 6, 7, 5, generator=gen)
    (gw_ref,) = torch.autograd.grad(F.conv3d(x, w, padding=1), w, gy)
    est = torch.stack([torch.autograd.grad(snn.stochastic_conv3d(x, w, padding=1, n_probes=6, sketch="spectral", seed=s), w, gy)[0]
                       for s in range(96)])
    _z_test(est, gw_ref, low=0.3)


def test_spectral_sketch_falls_back_to_exact_when_it_would_not_be_smaller():
    """With as many probes as frequencies the layer keeps its input (an ordinary conv node)."""
    x, w, b = _case_tensors(3, False, dict(padding=1))
    y = snn.stochastic_conv3d(x, w, b, padding=1, n_probes=10_000, sketch="spectral")
    assert "Convolution" in type(y.grad_fn).__name__
    y = snn.stochastic_conv3d(x, w, b, padding=1, n_probes=8, sketch="spectral")
    assert "Convolution" not in type(y.grad_fn).__name__


def test_spectral_sketch_beats_probes_on_smooth_inputs():
    """Image-like (smooth) inputs concentrate their energy in few frequencies: at equal r the
    importance-sampled spectral sketch has a several times lower dW error than shifted probes."""
    gen = torch.Generator().manual_seed(3)
    coarse = torch.rand(2, 4, 4, 4, 4, generator=gen)
    x = F.interpolate(coarse, size=(20, 20, 20), mode="trilinear", align_corners=True) + 0.05 * torch.rand(2, 4, 20, 20, 20, generator=gen)
    w = torch.randn(6, 4, 3, 3, 3, generator=gen, requires_grad=True)
    gy = torch.randn(2, 6, 20, 20, 20, generator=gen)
    (gw_ref,) = torch.autograd.grad(F.conv3d(x, w, padding=1), w, gy)

    def error(sketch):
        errs = [(torch.autograd.grad(snn.stochastic_conv3d(x, w, padding=1, n_probes=16, sketch=sketch, seed=s), w, gy)[0]
                 - gw_ref).norm() / gw_ref.norm() for s in range(10)]
        return torch.stack(errs).mean().item()

    spectral_error, shifted_error = error("spectral"), error("shifted")
    assert spectral_error < shifted_error / 2, (spectral_error, shifted_error)


def test_relative_error_falls_as_one_over_sqrt_probes():
    x, w, b, gy, gw_ref = _padded_conv3d_case()

    def rms_rel_error(r: int) -> float:
        errs = [
            (torch.autograd.grad(snn.stochastic_conv3d(x, w, b, padding=1, n_probes=r, sketch="shifted", seed=s), w, gy)[0] - gw_ref).pow(2).sum()
            for s in range(32)
        ]
        return math.sqrt(torch.stack(errs).mean().item()) / gw_ref.norm().item()

    ratio = rms_rel_error(2) / rms_rel_error(32)
    assert 3.0 < ratio < 5.3, f"relative error ratio r=2 vs r=32 is {ratio:.2f} (4 expected)"


def test_control_variate_lowers_error_on_positive_inputs():
    x, w, b, gy, gw_ref = _padded_conv3d_case()
    errors = {}
    for control in ("mean", "none"):
        errs = [
            (torch.autograd.grad(snn.stochastic_conv3d(x, w, b, padding=1, n_probes=8, sketch="shifted", control=control, seed=s), w, gy)[0] - gw_ref).norm()
            for s in range(30)
        ]
        errors[control] = torch.stack(errs).mean().item()
    assert errors["mean"] < 0.6 * errors["none"]


@pytest.mark.parametrize("probes", ["rademacher", "gaussian", "orthogonal"])
def test_probe_families_have_identity_second_moment(probes):
    """E[z_n z_m] = delta_nm per column: check the empirical second moment over many seeds."""
    r, spatial = 8, (3, 4, 8)
    samples = torch.cat([
        generate_block(probes, seed, r, (0, r), 1, spatial, torch.device("cpu"), torch.float32).reshape(r, -1)
        for seed in range(400)
    ])  # (400 r, N)
    second = samples.t() @ samples / samples.shape[0]
    torch.testing.assert_close(second.diagonal(), torch.ones(second.shape[0]), atol=0.2, rtol=0)
    off = second - torch.diag(second.diagonal())
    assert off.abs().max() < 0.2
    if probes == "orthogonal":  # columns exactly orthogonal when the trailing dims hold a multiple of r
        for shape in [spatial, (4, 2, 4), (3, 2, 2)]:  # last dim >= r; last two hold r; all three hold 12 (not 8k)
            z = generate_block(probes, 0, r, (0, r), 1, shape, torch.device("cpu"), torch.float32).reshape(r, -1)
            gram = z @ z.t()
            if math.prod(shape) % r == 0:
                torch.testing.assert_close(gram, torch.eye(r) * z.shape[1])
            assert torch.linalg.matrix_rank(z) == min(r, z.shape[1])


def test_saved_state_is_under_one_percent_and_does_not_grow():
    """StochasticConv3d(32 -> 32) on 1x32x64^3 keeps < 1% of nn.Conv3d's saved bytes, volume-independent."""
    layer = snn.StochasticConv3d(32, 32, 3, padding=1, n_probes=16)
    reference = torch.nn.Conv3d(32, 32, 3, padding=1)

    def saved(module, size):
        x = torch.randn(1, 32, size, size, size, requires_grad=True)
        with snn.SavedTensorCounter() as counter:
            module(x)
        return counter.bytes

    exact_bytes = saved(reference, 64)
    stochastic_bytes = saved(layer, 64)
    assert exact_bytes >= 4 * 32 * 64**3  # the input itself
    assert stochastic_bytes < 0.01 * exact_bytes, (stochastic_bytes, exact_bytes)
    assert saved(layer, 24) == stochastic_bytes


def test_saved_tensor_counter_frees_the_graph():
    """Counting must not keep the forward graph alive: ops that save their own output (sigmoid)
    would otherwise form a cycle through C++ that gc cannot collect."""
    x = torch.randn(4, 8, requires_grad=True)
    with snn.SavedTensorCounter() as counter:
        y = torch.sigmoid(x)
        z = y.exp().sum()
    assert counter.bytes >= 2 * 4 * 8 * 4  # sigmoid's output and exp's output
    alive = weakref.ref(y)
    del y, z  # no backward: it would release the saved tensors and hide a cycle
    gc.collect()
    assert alive() is None
    with snn.SavedTensorCounter():
        z = torch.sigmoid(x).exp().sum()
    z.backward()  # the counted graph still differentiates correctly
    torch.testing.assert_close(x.grad, torch.sigmoid(x) * (1 - torch.sigmoid(x)) * torch.sigmoid(x).exp())


def test_probe_blocks_never_exceed_the_output_size():
    """Probe generation is chunked: no probe block is larger than the layer output."""
    for r, volume, budget in [(16, 64**3, 32 * 64**3), (64, 64**3, 32 * 64**3), (432, 64**3, 32 * 64**3), (16, 10, 5)]:
        blocks = probe_blocks(r, volume, budget)
        assert blocks[0][0] == 0 and blocks[-1][1] == r
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert all((stop - start) * volume <= max(budget, volume) for start, stop in blocks)


def test_global_rng_untouched_and_deterministic_given_seed():
    x, w, b = _case_tensors(3, False, dict(padding=1))
    cpu_state = torch.get_rng_state()
    grads = []
    for _ in range(2):
        y = snn.stochastic_conv3d(x, w, b, padding=1, n_probes=8, seed=42)
        grads.append(torch.autograd.grad(y.sum(), w)[0])
    snn.stochastic_conv3d(x, w, b, padding=1, n_probes=8).sum().backward()  # seed drawn from the private stream
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert torch.equal(grads[0], grads[1])
    snn.manual_seed(3)
    g1 = torch.autograd.grad(snn.stochastic_conv3d(x, w, b, padding=1, n_probes=8).sum(), w)[0]
    snn.manual_seed(3)
    g2 = torch.autograd.grad(snn.stochastic_conv3d(x, w, b, padding=1, n_probes=8).sum(), w)[0]
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_returns_weight_gradient_in_parameter_dtype(dtype):
    snn.manual_seed(0)  # the probes too: the cosine below is then one fixed number
    layer = snn.StochasticConv3d(4, 6, 3, padding=1, n_probes=64)  # loss y^2/2: dW is a large, well-estimated signal
    ref = torch.nn.Conv3d(4, 6, 3, padding=1)
    ref.load_state_dict(layer.state_dict())
    x = torch.rand(2, 4, 8, 8, 8) + 0.5
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
        y_ref = ref(x)
    assert y.dtype == y_ref.dtype == dtype
    torch.testing.assert_close(y, y_ref)
    y.float().pow(2).sum().div(2).backward()
    y_ref.float().pow(2).sum().div(2).backward()
    assert layer.weight.grad.dtype == torch.float32
    cos = F.cosine_similarity(layer.weight.grad.flatten(), ref.weight.grad.flatten(), 0)
    assert cos > 0.8


def test_eval_and_no_grad_are_plain_convolutions():
    layer = snn.StochasticConv3d(2, 3, 3, padding=1, n_probes=8)
    x = torch.randn(1, 2, 6, 6, 6, requires_grad=True)
    assert type(layer(x).grad_fn).__name__.startswith("_StochasticConv")
    layer.eval()
    assert type(layer(x).grad_fn).__name__ == "ConvolutionBackward0"
    layer.train()
    with torch.no_grad():
        assert layer(x).grad_fn is None
    with snn.exact(layer):
        assert type(layer(x).grad_fn).__name__ == "ConvolutionBackward0"
    layer.min_voxels = 1000
    assert type(layer(x).grad_fn).__name__ == "ConvolutionBackward0"


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_module_padding_modes_match_torch(padding_mode):
    torch.manual_seed(0)
    snn.manual_seed(0)
    layer = snn.StochasticConv2d(3, 4, 3, padding=1, padding_mode=padding_mode, n_probes=64)
    ref = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    ref.load_state_dict(layer.state_dict())
    x = torch.rand(2, 3, 12, 11, requires_grad=True)
    y, y_ref = layer(x), ref(x)
    assert torch.equal(y, y_ref)
    gy = torch.randn_like(y)
    gx = torch.autograd.grad(y, x, gy, retain_graph=True)[0]
    gx_ref = torch.autograd.grad(y_ref, x, gy, retain_graph=True)[0]
    assert torch.equal(gx, gx_ref)
    y.pow(2).sum().div(2).backward()  # dW = sum of y x: a large signal the sketch must find
    y_ref.pow(2).sum().div(2).backward()
    assert F.cosine_similarity(layer.weight.grad.flatten(), ref.weight.grad.flatten(), 0) > 0.9


@pytest.mark.parametrize("sketch", ["spectral", "shifted"])
def test_transposed_module_with_output_size(sketch):
    """``forward(x, output_size)`` on the stochastic path (output_padding 1 here) is torch's layer."""
    torch.manual_seed(0)
    layer = snn.StochasticConvTranspose3d(4, 2, 3, stride=2, padding=1, n_probes=8, sketch=sketch)
    ref = torch.nn.ConvTranspose3d(4, 2, 3, stride=2, padding=1)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 5, 6, 7, requires_grad=True)
    size = [10, 12, 14]  # default output (9, 11, 13): output_padding 1 in every dimension
    out = layer(x, output_size=size)
    out_ref = ref(x, output_size=size)
    assert layer.uses_sketch(x) and type(out.grad_fn).__name__.startswith("_StochasticConv")  # no exact fallback
    assert out.shape == (1, 2, *size) and torch.equal(out, out_ref)
    gy = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, layer.weight), gy)
    gx_ref, gw_ref = torch.autograd.grad(out_ref, (x, ref.weight), gy)
    assert torch.equal(gx, gx_ref)
    assert gw.shape == gw_ref.shape and not torch.equal(gw, gw_ref)  # an estimate


def test_same_padding_string():
    x = torch.randn(1, 2, 9, 8, requires_grad=True)
    w = torch.randn(3, 2, 4, 3, requires_grad=True)
    torch.testing.assert_close(snn.stochastic_conv2d(x, w, padding="same"), F.conv2d(x, w, padding="same"))
    torch.testing.assert_close(snn.stochastic_conv2d(x, w, padding="valid"), F.conv2d(x, w, padding="valid"))


def test_unsupported_options_raise_errors_naming_the_option():
    x = torch.randn(1, 2, 5, 5, 5)
    w = torch.randn(3, 2, 3, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="probes"):
        snn.stochastic_conv3d(x, w, probes="sobol")
    with pytest.raises(ValueError, match="n_probes"):
        snn.stochastic_conv3d(x, w, n_probes=-1)
    with pytest.raises(ValueError, match="n_probes"):
        snn.stochastic_conv3d(x, w, n_probes=12, probes="orthogonal")
    with pytest.raises(ValueError, match="sketch"):
        snn.stochastic_conv3d(x, w, sketch="roll")
    with pytest.raises(ValueError, match="control"):
        snn.stochastic_conv3d(x, w, control="pooled2")
    with pytest.raises(ValueError, match="stride=1"):
        snn.stochastic_conv3d(x, w, padding="same", stride=2)
    with pytest.raises(ValueError, match="padding"):
        snn.stochastic_conv3d(x, w, padding="full")
    with pytest.raises(ValueError, match="channels"):
        snn.stochastic_conv3d(torch.randn(1, 5, 5, 5, 5), w)
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        snn.stochastic_conv3d(torch.randn(2, 5, 5, 5), w)
    with pytest.raises(ValueError, match="min_voxels"):
        snn.StochasticConv3d(2, 3, 3, min_voxels=-1)


def test_convert_keeps_parameters_and_state_dict_and_exact_switch():
    from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet

    nets = [
        UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1),
        BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4), norm="batch"),
        DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16]),
        SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)),
    ]
    x = torch.randn(2, 1, 16, 16, 16)
    for net in nets:
        n_convs = sum(type(m) in (torch.nn.Conv3d, torch.nn.ConvTranspose3d) for m in net.modules())
        params = list(net.parameters())
        keys = list(net.state_dict())
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        assert snn.convert(net, n_probes=8) is net
        assert all(a is b for a, b in zip(params, net.parameters()))
        assert list(net.state_dict()) == keys
        assert len(list(snn.stochastic_layers(net))) == n_convs > 0
        net(x).sum().backward()
        before = [p.detach().clone() for p in params]
        optimizer.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, params))
        with snn.exact(net):
            assert all(layer.force_exact for _, layer in snn.stochastic_layers(net))
        assert not any(layer.force_exact for _, layer in snn.stochastic_layers(net))


def test_convert_include_exclude_and_min_voxels():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Conv3d(2, 2, 3), torch.nn.Linear(2, 2))
    snn.convert(net, 4, exclude=["1"], min_voxels=10)
    assert isinstance(net[0], snn.StochasticConv3d) and net[0].min_voxels == 10
    assert type(net[1]) is torch.nn.Conv3d
    snn.convert(net, 0, include=["0"])
    assert net[0].n_probes == 0


def test_exact_mode_gives_exact_weight_gradient():
    torch.manual_seed(0)
    net = snn.convert(torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 3)), 4)
    ref = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 1, 3))
    ref.load_state_dict(net.state_dict())
    x = torch.randn(2, 2, 7, 7, 7)
    with snn.exact(net):
        net(x).sum().backward()
    ref(x).sum().backward()
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def _small_net():
    torch.manual_seed(0)
    snn.manual_seed(0)  # the probes too: the statistics below are then fixed numbers
    return snn.convert(
        torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 3, padding=1)),
        n_probes=8,
    )


def test_works_under_non_reentrant_checkpoint():
    """With checkpointing the recomputed sketch and its seed stay together: estimates stay unbiased."""
    net = _small_net()
    x = torch.rand(2, 2, 6, 6, 6)
    with snn.exact(net):
        (gw_ref,) = torch.autograd.grad(net(x).pow(2).sum(), net[0].weight)
    estimates = torch.stack([
        torch.autograd.grad(checkpoint(net, x, use_reentrant=False).pow(2).sum(), net[0].weight)[0] for _ in range(64)
    ])
    _z_test(estimates, gw_ref, low=0.3, high=1.7)


@pytest.mark.slow  # compiled correctness runs by default in tests/test_capture.py
def test_works_under_torch_compile():
    net = _small_net()
    x = torch.rand(2, 2, 6, 6, 6)
    compiled = torch.compile(net, backend="aot_eager")
    assert torch.equal(compiled(x), net(x))  # the same ATen calls
    with snn.exact(net):
        (gw_ref,) = torch.autograd.grad(net(x).pow(2).sum(), net[0].weight)
    estimates = torch.stack([torch.autograd.grad(compiled(x).pow(2).sum(), net[0].weight)[0] for _ in range(64)])
    _z_test(estimates, gw_ref, low=0.3, high=1.8)


@pytest.mark.slow
def test_works_under_torch_compile_inductor():
    net = _small_net()
    x = torch.rand(2, 2, 6, 6, 6)
    compiled = torch.compile(net)
    torch.testing.assert_close(compiled(x), net(x))
    compiled(x).sum().backward()
    assert net[0].weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_is_unbiased():
    x, w, b = (t.detach().cuda().requires_grad_() for t in _case_tensors(3, False, dict(padding=1)))
    y_ref = F.conv3d(x, w, b, padding=1)
    gy = torch.randn_like(y_ref)
    (gw_ref,) = torch.autograd.grad(y_ref, w, gy)
    n = 300
    est = torch.stack([torch.autograd.grad(snn.stochastic_conv3d(x, w, b, padding=1, n_probes=4, sketch="shifted", seed=s), w, gy)[0] for s in range(n)])
    z2 = ((est.mean(0) - gw_ref) / (est.std(0) / math.sqrt(n))).pow(2).mean().item()
    assert 0.5 < z2 < 1.6


def test_autograd_function_saves_no_input():
    """The function's saved tensors are the weight, the sketch, the mean and (probe sketches) the seed: none is the input."""
    x = torch.randn(1, 3, 10, 10, 10, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, 3, requires_grad=True)
    geom = ConvGeometry(stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1), groups=1, kernel=(3, 3, 3))
    for sketch, sketch_shapes in [("offset", [(1, 3), (4, 3, 3, 3, 3)]), ("shifted", [(1, 3), (4, 3)]),
                                  ("spectral", [(1, 3, 4), (1, 4), (1, 4)])]:  # coefficients, frequencies, weights
        y = _StochasticConv.apply(x, w, None, geom, 4, "rademacher", sketch, "mean", 0)
        shapes = sorted(tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None)
        seed = [] if sketch == "spectral" else [()]
        assert shapes == sorted([*seed, *sketch_shapes, (5, 3, 3, 3, 3)])


def test_module_default_sketch_is_spectral():
    x = torch.randn(1, 3, 8, 8, 8, requires_grad=True)
    for stride in (1, 2):
        layer = snn.StochasticConv3d(3, 4, 3, stride=stride, padding=1, n_probes=16)
        assert layer.sketch == "spectral"
        sketch_shapes = [tuple(t.shape) for t in layer(x).grad_fn.saved_tensors if t is not None and t.dim() >= 2]
        assert (1, 3, 16) in sketch_shapes, (stride, sketch_shapes)  # (B, C_in, r) Fourier coefficients
    layer = snn.StochasticConvTranspose3d(3, 4, 2, stride=2, n_probes=16)
    assert layer.sketch == "spectral"
    sketch_shapes = [tuple(t.shape) for t in layer(x).grad_fn.saved_tensors if t is not None and t.dim() >= 2]
    assert (1, 3, 16) in sketch_shapes, sketch_shapes


FUNCTIONALS = [
    (snn.stochastic_conv1d, F.conv1d), (snn.stochastic_conv2d, F.conv2d), (snn.stochastic_conv3d, F.conv3d),
    (snn.stochastic_conv_transpose1d, F.conv_transpose1d), (snn.stochastic_conv_transpose2d, F.conv_transpose2d),
    (snn.stochastic_conv_transpose3d, F.conv_transpose3d),
]
MODULES = [
    (snn.StochasticConv1d, torch.nn.Conv1d), (snn.StochasticConv2d, torch.nn.Conv2d), (snn.StochasticConv3d, torch.nn.Conv3d),
    (snn.StochasticConvTranspose1d, torch.nn.ConvTranspose1d), (snn.StochasticConvTranspose2d, torch.nn.ConvTranspose2d),
    (snn.StochasticConvTranspose3d, torch.nn.ConvTranspose3d),
]


def _torch_functional_parameters(fn) -> list[tuple[str, object]]:
    """``(name, default)`` of a torch functional from its documented signature (builtins have no
    ``inspect.signature``): ``conv3d(input, weight, bias=None, stride=1, ...) -> Tensor``."""
    line = next(line for line in fn.__doc__.splitlines() if line.startswith(fn.__name__ + "("))
    out = []
    for part in line[len(fn.__name__) + 1 : line.index(")")].split(", "):
        name, _, default = part.partition("=")
        out.append((name, eval(default) if default else inspect.Parameter.empty))
    return out


def _split_parameters(sig: inspect.Signature) -> tuple[list[tuple[str, object]], dict[str, object]]:
    torch_like = [(n, p.default) for n, p in sig.parameters.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword_only = {n: p.default for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return torch_like, keyword_only


@pytest.mark.parametrize("ours, theirs", FUNCTIONALS, ids=lambda f: f.__name__)
def test_functional_signature_is_torchs_plus_keyword_sketch_options(ours, theirs):
    torch_like, keyword_only = _split_parameters(inspect.signature(ours))
    assert torch_like == _torch_functional_parameters(theirs)  # names, order and defaults
    assert keyword_only == {"n_probes": snn.DEFAULT_N_PROBES, "probes": "rademacher", "sketch": snn.DEFAULT_SKETCH,
                            "control": "mean", "seed": None}
    assert ours.__name__ == "stochastic_" + theirs.__name__ and ours.__module__ == "app.nn.functional"
    assert all(section in ours.__doc__ for section in ("Args:", "Shape:", "Example:"))


@pytest.mark.parametrize("ours, theirs", MODULES, ids=lambda c: c.__name__)
def test_module_signature_is_torchs_plus_keyword_sketch_options(ours, theirs):
    torch_like, keyword_only = _split_parameters(inspect.signature(ours))
    expected = [(n, p.default) for n, p in inspect.signature(theirs).parameters.items()]
    assert torch_like == expected
    assert keyword_only == {"n_probes": snn.DEFAULT_N_PROBES, "probes": "rademacher", "sketch": snn.DEFAULT_SKETCH,
                            "control": "mean", "min_voxels": 0}
    assert list(inspect.signature(ours.forward).parameters) == list(inspect.signature(theirs.forward).parameters)
    assert ours.__name__ == "Stochastic" + theirs.__name__ and ours.__module__ == "app.nn.modules" and issubclass(ours, theirs)
    assert all(section in ours.__doc__ for section in ("Args:", "Shape:", "Example:"))


def test_one_set_of_defaults_and_one_transposed_rule():
    """Every entry point defaults to app.nn.DEFAULT_SKETCH / DEFAULT_N_PROBES; None means the
    default sketch everywhere; a transposed convolution runs "shifted" for "offset" everywhere."""
    defaults = {"sketch": snn.DEFAULT_SKETCH, "n_probes": snn.DEFAULT_N_PROBES}
    entry_points = [f for f, _ in FUNCTIONALS] + [c for c, _ in MODULES] + [snn.convert, snn.StochasticConvMixin.set_sketch_options]
    for entry in entry_points:
        params = inspect.signature(entry).parameters
        assert {k: params[k].default for k in defaults} == defaults, entry
    assert LayerFidelity.sketch == snn.DEFAULT_SKETCH
    assert (snn.DEFAULT_SKETCH, snn.DEFAULT_N_PROBES) == ("spectral", 256)

    assert snn.resolve_sketch(None, transposed=False) == snn.resolve_sketch(None, transposed=True) == snn.DEFAULT_SKETCH
    assert snn.resolve_sketch("offset", transposed=True) == "shifted"
    assert snn.resolve_sketch("offset", transposed=False) == "offset"
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 2, 3), torch.nn.ConvTranspose3d(2, 2, 2, stride=2))
    assert [m.sketch for m in snn.convert(net, 8, sketch=None)] == [snn.DEFAULT_SKETCH] * 2
    assert [m.sketch for m in snn.convert(net, 8, sketch="offset")] == ["offset", "shifted"]
    assert snn.StochasticConvTranspose3d(2, 2, 2, sketch="offset").sketch == "shifted"
    # the functional runs the same rule: an input-grid sketch (r, C_in), not per-offset (r, C_in, *K)
    x = torch.randn(1, 3, 6, 6, 6)
    w = torch.randn(3, 4, 2, 2, 2, requires_grad=True)
    y = snn.stochastic_conv_transpose3d(x, w, stride=2, n_probes=4, sketch="offset", seed=0)
    assert y.grad_fn.sketch == "shifted" and (4, 3) in [tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None]


def test_input_gradient_allocates_no_more_than_torchs():
    """The stochastic layer's backward computes dX without an input-sized placeholder: its CPU
    allocation peak is torch's own conv backward's (the input itself is not kept, so a copy of a
    stride-0 placeholder would add one input-sized buffer). The dX is torch's, bit for bit, and
    dY, whose memory lends the shape argument, is left untouched."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 12, 13, 14, generator=gen, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, 3, generator=gen)  # not trainable: the backward computes dX alone
    geom = ConvGeometry(stride=(1, 1, 1), padding=(1, 1, 1), dilation=(1, 1, 1), groups=1, kernel=(3, 3, 3))
    y_ref = F.conv3d(x, w, padding=1)
    gy = torch.randn(y_ref.shape, generator=gen)
    gy_before = gy.clone()
    with snn.PeakMemory() as torch_peak:
        y_ref.backward(gy)
    y = _StochasticConv.apply(x.detach().requires_grad_(), w, None, geom, 4, "rademacher", "shifted", "mean", 0)
    with snn.PeakMemory() as ours:
        (gx,) = torch.autograd.grad(y, y.grad_fn.next_functions[0][0].variable, gy)
    assert torch.equal(gx, x.grad) and torch.equal(gy, gy_before)
    assert 0 < ours.peak_bytes <= torch_peak.peak_bytes, (ours.peak_bytes / x.nbytes, torch_peak.peak_bytes / x.nbytes)
    # and where dY is smaller than X (a strided convolution), still torch's dX, dY untouched
    y_ref = F.conv3d(x, w, stride=2, padding=1)
    gy = torch.randn(y_ref.shape, generator=gen)
    gy_before = gy.clone()
    (gx_ref,) = torch.autograd.grad(y_ref, x, gy)
    strided = ConvGeometry(stride=(2, 2, 2), padding=(1, 1, 1), dilation=(1, 1, 1), groups=1, kernel=(3, 3, 3))
    assert torch.equal(_input_grad(x.shape, w, gy, strided), gx_ref) and torch.equal(gy, gy_before)


@pytest.mark.parametrize("transposed", [False, True])
def test_output_and_input_gradient_in_channel_blocks_equal_one_call(transposed):
    """Y computed for a few output channels at a time and dX for a few input channels at a time
    (each with its slice of the weight and bias) are torch's: regular and transposed (strided,
    output padding) convolutions, a last block narrower than the others; the output shape is
    predicted from the geometry."""
    gen = torch.Generator().manual_seed(0)
    if transposed:
        x = torch.randn(2, 10, 5, 6, 7, generator=gen, requires_grad=True)
        w = torch.randn(10, 6, 3, 3, 3, generator=gen)  # (C_in, C_out, *K)
        b = torch.randn(6, generator=gen)
        y = F.conv_transpose3d(x, w, b, stride=2, padding=1, output_padding=1)
        geom = ConvGeometry(stride=(2,) * 3, padding=(1,) * 3, dilation=(1,) * 3, groups=1, kernel=(3,) * 3,
                            transposed=True, output_padding=(1,) * 3)
    else:
        x = torch.randn(2, 10, 9, 8, 7, generator=gen, requires_grad=True)
        w = torch.randn(6, 10, 3, 3, 3, generator=gen)
        b = torch.randn(6, generator=gen)
        y = F.conv3d(x, w, b, padding=1, dilation=(1, 2, 1))
        geom = ConvGeometry(stride=(1,) * 3, padding=(1,) * 3, dilation=(1, 2, 1), groups=1, kernel=(3,) * 3)
    gy = torch.randn(y.shape, generator=gen)
    (gx_ref,) = torch.autograd.grad(y, x, gy)
    assert _output_shape(x.shape, w, geom) == tuple(y.shape)
    for block in (1, 4, 9):
        torch.testing.assert_close(_input_grad(x.shape, w, gy, geom, block), gx_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_conv(x.detach(), w, b, geom, block), y.detach(), rtol=1e-5, atol=1e-5)


def test_channel_blocks_only_above_the_layer_option():
    """One call without ``conv_block`` or for results up to it; above it, blocks of at most that
    many elements, never fewer than MIN_BLOCK_CHANNELS channels."""
    full_res = (1, 32, 256, 256, 256)  # 2^29 elements: 4 blocks of 8 channels under CONV_BLOCK
    assert _channel_block(full_res, None) is None
    assert _channel_block((1, 32, 128, 128, 128), CONV_BLOCK) is None  # 2^26 elements
    assert _channel_block(full_res, CONV_BLOCK) == 8 and 8 * 256 ** 3 == CONV_BLOCK
    assert _channel_block((1, 32, 512, 512, 512), CONV_BLOCK) == MIN_BLOCK_CHANNELS


@pytest.mark.parametrize("lean", [False, True])
def test_converted_network_with_conv_block_gives_the_same_output_and_gradients(lean):
    """``convert(..., conv_block=...)``: every stochastic layer computes its output and input
    gradient in channel blocks; the sketch is the same, so output, input gradient and every
    weight gradient match the unblocked network's (same seeds)."""
    from monai.networks.nets import DynUNet

    def run(conv_block):
        torch.manual_seed(0)
        net = DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[16, 24, 32])
        snn.convert(net, 8, lean=lean, conv_block=conv_block)
        snn.manual_seed(5)
        x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = net(x)
        y.square().mean().backward()
        return y.detach(), x.grad, {n: p.grad.clone() for n, p in net.named_parameters()}, net

    y_ref, gx_ref, gw_ref, _ = run(None)
    y, gx, gw, net = run(16 * 8 ** 3)  # full-resolution layers (16 channels of 16^3) in blocks of 8 channels
    assert {layer.conv_block for _, layer in snn.stochastic_layers(net)} == {16 * 8 ** 3}
    assert "conv_block=8192" in repr(next(layer for _, layer in snn.stochastic_layers(net)))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-7)
    for name in gw_ref:
        torch.testing.assert_close(gw[name], gw_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="conv_block must be an int >= 1"):
        snn.convert(net, 8, conv_block=0)


def test_peak_memory_counts_transients():
    """PeakMemory sees a buffer allocated and freed inside the block, and what is left at exit."""
    n = 1 << 20
    with snn.PeakMemory() as mem:
        kept = torch.ones(n)
        torch.zeros(3 * n).sum()  # a transient three times as large, freed at once
    assert 16 * n <= mem.peak_bytes < 16 * n + 1024  # + the sum's scalar result
    assert 4 * n <= mem.end_bytes < 4 * n + 1024
    del kept
