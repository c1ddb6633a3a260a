"""app.nn.lean: lean activations and normalisations match torch and keep what they claim."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import app.nn as snn
from app.nn.lean import _LeanNorm, lean_group_norm, lean_leaky_relu, pack_bits, unpack_bits

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}

# Rounding error of a layer that computes the same maths as torch's in another order is of the order
# of torch's own: bounded by this many times torch's fp32 error against float64 (summation-order
# bounds differ by small factors; the errors do not depend on the thread count beyond that).
FP32_MARGIN = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


def _assert_as_accurate_as_torch(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor, what: str = "") -> None:
    """``‖ours − exact‖ ≤ FP32_MARGIN · max(‖theirs − exact‖, u · ‖exact‖)``: ``ours`` (fp32) is as
    accurate as torch's fp32 ``theirs`` against the float64 ``exact``, norm-wise (``u = 2⁻²⁴``; the
    floor serves tensors torch happens to get exactly right)."""
    error = (ours.double() - exact).norm().item()
    torch_error = (theirs.double() - exact).norm().item()
    bound = FP32_MARGIN * max(torch_error, UNIT_ROUNDOFF[torch.float32] * exact.norm().item())
    assert error <= bound, (what, error, torch_error, exact.norm().item())


def _relative_errors(model: torch.nn.Module, reference: torch.nn.Module) -> tuple[dict[str, float], float]:
    """Per parameter ``‖g − g64‖ / ‖g64‖`` against the float64 model's gradients, and the same for all
    parameters together."""
    per_param, diff, norm = {}, 0.0, 0.0
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        d = (p.grad.double() - q.grad).norm().item()
        per_param[name] = d / max(q.grad.norm().item(), 1e-300)
        diff, norm = diff + d * d, norm + q.grad.norm().item() ** 2
    return per_param, math.sqrt(diff / norm)


def _assert_gradients_as_accurate_as_torch(model: torch.nn.Module, torch_model: torch.nn.Module, model64: torch.nn.Module) -> None:
    """Every parameter's gradient of ``model`` is within FP32_MARGIN times torch's fp32 relative error
    on that parameter, or on the whole network where that parameter's gradient happens to be more
    accurate (a sum with cancellation can land close to exact in one summation order, not in another)."""
    torch_errors, torch_network = _relative_errors(torch_model, model64)
    errors, network = _relative_errors(model, model64)
    for name, err in errors.items():
        assert err <= FP32_MARGIN * max(torch_errors[name], torch_network), (name, err, torch_errors[name], torch_network)
    assert network <= FP32_MARGIN * torch_network, (network, torch_network)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7), (2, 3, 4, 5, 6)])
def test_pack_bits_roundtrip(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


@pytest.mark.parametrize("slope", [0.0, 0.01, 0.2])
@pytest.mark.parametrize("inplace", [False, True])
def test_lean_activation_matches_torch_and_keeps_one_bit(slope, inplace):
    base = torch.randn(2, 3, 5, 6, 7)
    x = base.clone().requires_grad_()
    x_ref = base.clone().requires_grad_()
    with snn.SavedTensorCounter() as saved:
        y = lean_leaky_relu(x.clone() if inplace else x, slope, inplace)
    y_ref = F.leaky_relu(x_ref, slope)
    assert torch.equal(y, y_ref)
    gy = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(y_ref, x_ref, gy)[0])
    assert saved.bytes == -(-base.numel() // 8)


@pytest.mark.parametrize("groups", [6, 3, 1])
def test_lean_group_norm_gradcheck(groups):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(lean_group_norm(x, groups, w, b, 1e-5, torch.float64), F.group_norm(x, groups, w, b))
    assert torch.autograd.gradcheck(lambda *a: lean_group_norm(*a[:1], groups, *a[1:], 1e-5, torch.float64), (x, w, b))


def test_lean_batch_norm_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x_, w_, b_):
        return _LeanNorm.apply(x_, w_, b_, "batch", 0, 1e-5, torch.float64, None, False)

    torch.testing.assert_close(f(x, w, b), F.batch_norm(x, None, None, w, b, training=True))
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.InstanceNorm3d(4, affine=True),
        lambda: torch.nn.InstanceNorm3d(4),
        lambda: torch.nn.GroupNorm(2, 4),
        lambda: torch.nn.BatchNorm3d(4),
    ],
)
def test_lean_norm_modules_match_torch_with_float32_storage(make):
    torch.manual_seed(0)
    ref = make()
    lean = snn.convert(copy.deepcopy(ref), lean=True, lean_storage="float32")
    assert type(lean).__name__.startswith("Lean")
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(3, 4, 5, 6, 7, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y, y_ref, y64 = lean(x), ref(x), ref64(x64)
    _assert_as_accurate_as_torch(y, y_ref, y64, "output")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *lean.parameters()], gy)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], gy)
    grads64 = torch.autograd.grad(y64, [x64, *ref64.parameters()], gy.double())
    for i, (a, b, c) in enumerate(zip(grads, grads_ref, grads64)):
        _assert_as_accurate_as_torch(a, b, c, f"gradient {i}")
    for name, buf in ref.named_buffers():  # running statistics of batch norm
        if buf.is_floating_point():
            _assert_as_accurate_as_torch(dict(lean.named_buffers())[name], buf, dict(ref64.named_buffers())[name], name)
        else:
            assert torch.equal(dict(lean.named_buffers())[name], buf)
    lean.eval(), ref.eval()
    assert torch.equal(lean(x), ref(x))  # eval: torch's own layer


def _dynunet():
    from app.models import build_model

    torch.manual_seed(0)
    return build_model({"name": "dynunet", "in_channels": 1, "out_channels": 3, "patch_size": [32, 32, 32], "spacing": [1, 1, 1]})


def test_lean_dynunet_gradients_match_exact():
    """Lean layers change what is stored, not the maths: against a float64 reference, fp32 storage
    is within FP32_MARGIN times the error of torch's own fp32 layers (on that parameter, or on the
    whole network where that parameter's gradient happens to be more accurate); bf16 storage within
    a few bf16 roundings (2⁻⁸ each)."""
    ref = _dynunet().train()
    x = torch.randn(1, 1, 32, 32, 32)
    ref64 = copy.deepcopy(ref).double()
    ref64(x.double()).pow(2).mean().backward()
    ref(x).pow(2).mean().backward()
    lean = snn.convert(copy.deepcopy(ref), n_probes=0, lean=True, lean_storage="float32")
    lean.zero_grad()
    lean(x).pow(2).mean().backward()
    _assert_gradients_as_accurate_as_torch(lean, ref, ref64)
    bf16 = snn.convert(copy.deepcopy(ref), n_probes=0, lean=True, lean_storage="bfloat16")
    bf16.zero_grad()
    bf16(x).pow(2).mean().backward()
    errors, network = _relative_errors(bf16, ref64)
    torch_errors, torch_network = _relative_errors(ref, ref64)
    bf16_bound = 5 * UNIT_ROUNDOFF[torch.bfloat16]
    for name, err in errors.items():
        assert err <= max(FP32_MARGIN * max(torch_errors[name], torch_network), bf16_bound), (name, err, torch_errors[name])
    assert network <= bf16_bound, network


def test_stochastic_lean_dynunet_saves_a_fraction_of_exact():
    """Saved-for-backward bytes of the default network at 32^3: stochastic+lean < 0.3x exact."""
    x = torch.randn(1, 1, 32, 32, 32)
    counts = {}
    for variant in ("exact", "stochastic", "stochastic+lean"):
        model = _dynunet().train()
        if variant != "exact":
            snn.convert(model, 16, lean=variant.endswith("lean"))
        with snn.SavedTensorCounter(ignore=model.parameters()) as saved:
            model(x)
        counts[variant] = saved.bytes
    assert counts["stochastic"] < counts["exact"]
    assert counts["stochastic+lean"] < 0.3 * counts["exact"], counts


def test_convert_rejects_unknown_lean_storage():
    with pytest.raises(ValueError, match="lean_storage"):
        snn.convert(torch.nn.ReLU(), lean=True, lean_storage="int8")


# ------------------------------------------------------------------------- PReLU and GELU

# Inputs with the cases where keeping a rounded copy could flip the branch: exact zeros of both signs,
# and positive values that round to zero in float16 (1e-9) or even in bfloat16 (1e-45, an fp32
# denormal). Torch takes the slope branch for x <= 0 and the identity branch for x > 0.
SIGN_EDGES = [0.0, -0.0, 1e-45, -1e-45, 1e-9, -1e-9]


def _activation_input(shape=(2, 3, 5, 6, 7), seed=0):
    torch.manual_seed(seed)
    x = torch.randn(shape)
    x.view(-1)[: len(SIGN_EDGES)] = torch.tensor(SIGN_EDGES)
    return x


def _grads(fn, x, params, gy):
    x = x.clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in params]
    y = fn(x, *params)
    return (y, *torch.autograd.grad(y, [x, *params], gy))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_parameters", [1, 3])
def test_lean_prelu_input_gradient_is_exact_and_slope_gradient_within_storage_rounding(num_parameters, storage):
    x = _activation_input()
    weight = torch.rand(num_parameters) * 0.5
    gy = torch.randn_like(x)
    y, gx, gw = _grads(lambda x_, w_: snn.lean_prelu(x_, w_, storage), x, [weight], gy)
    y_ref, gx_ref, gw_ref = _grads(F.prelu, x, [weight], gy)
    assert torch.equal(y, y_ref)
    assert torch.equal(gx, gx_ref)  # the kept copy decides x > 0 exactly, also for zeros and tiny inputs
    # dA = Σ g·x·[x ≤ 0] from x rounded to storage: each term off by ≤ u·|g·x|; fp32 sums add ≤ 1e-5 of Σ|g·x|
    dims = [0, 2, 3, 4] if num_parameters > 1 else [0, 1, 2, 3, 4]
    scale = (gy * x).abs().where(x <= 0, 0).sum(dims).reshape(weight.shape)
    assert ((gw - gw_ref).abs() <= (UNIT_ROUNDOFF[storage] + 1e-5) * scale).all(), (gw, gw_ref)
    assert not torch.equal(gw, gw_ref)  # it really used the rounded copy


@pytest.mark.parametrize("num_parameters", [1, 3])
def test_lean_prelu_with_float32_storage_is_torch(num_parameters):
    x = _activation_input()
    weight = torch.rand(num_parameters) * 0.5
    gy = torch.randn_like(x)
    y, gx, gw = _grads(lambda x_, w_: snn.lean_prelu(x_, w_, torch.float32), x, [weight], gy)
    y_ref, gx_ref, gw_ref = _grads(F.prelu, x, [weight], gy)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    # only the summation order differs: each of the two fp32 sums of n terms is within the pairwise
    # summation bound log2(n) · u · Σ|g·x| of the exact sum
    dims = [0, 2, 3, 4] if num_parameters > 1 else [0, 1, 2, 3, 4]
    scale = (gy * x).abs().where(x <= 0, 0).sum(dims).reshape(weight.shape)
    n = x.numel() // num_parameters
    assert ((gw - gw_ref).abs() <= 2 * math.log2(n) * UNIT_ROUNDOFF[torch.float32] * scale).all(), (gw, gw_ref)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_lean_gelu_gradient_within_bf16_bound(approximate):
    """dx = g·GELU'(x̃) with |x̃ − x| ≤ 2⁻⁸|x|: |dx − dx_torch| ≤ |g|·max|t·GELU''(t)|·2⁻⁸, and
    max|t·GELU''(t)| = 0.3313 (erf) / 0.3309 (tanh), at t ≈ −0.66 (computed in float64)."""
    x = _activation_input()
    gy = torch.randn_like(x)
    y, gx = _grads(lambda x_: snn.lean_gelu(x_, approximate), x, [], gy)
    y_ref, gx_ref = _grads(lambda x_: F.gelu(x_, approximate=approximate), x, [], gy)
    assert torch.equal(y, y_ref)
    err = (gx - gx_ref).abs()
    assert (err <= gy.abs() * (0.3313 * 2.0**-8 + 2.0**-22)).all(), (err / gy.abs()).max()
    assert err.max() > 0  # it really recomputed from the rounded copy
    _, gx32 = _grads(lambda x_: snn.lean_gelu(x_, approximate, torch.float32), x, [], gy)
    assert torch.equal(gx32, gx_ref)  # float32 storage: ATen's own gelu_backward on the same x


def test_lean_gelu_rejects_unknown_approximate():
    with pytest.raises(ValueError, match="approximate must be one of"):
        snn.lean_gelu(torch.randn(3, requires_grad=True), "erf")


def test_lean_prelu_and_gelu_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_()  # away from PReLU's kink
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w_: snn.lean_prelu(x_, w_, torch.float64), (x, w))
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(lambda x_: snn.lean_gelu(x_, approximate, torch.float64), (x,))


@pytest.mark.parametrize(
    "make, lean_bytes, torch_bytes",
    [
        # per element: −x in bf16 vs torch's fp32 input (the slopes are parameters: ignored)
        (lambda: torch.nn.PReLU(), 2, 4),
        (lambda: torch.nn.PReLU(3, init=0.1), 2, 4),
        # x in bf16 vs torch's fp32 input
        (lambda: torch.nn.GELU(), 2, 4),
        (lambda: torch.nn.GELU("tanh"), 2, 4),
    ],
)
def test_lean_activation_modules_keep_half_of_torch(make, lean_bytes, torch_bytes):
    ref = make()
    lean = snn.convert(copy.deepcopy(ref), lean=True)
    assert type(lean).__name__ == "Lean" + type(ref).__name__
    x = _activation_input().requires_grad_()
    counts = {}
    for name, layer in (("lean", lean), ("torch", ref)):
        with snn.SavedTensorCounter(ignore=layer.parameters()) as saved:
            y = layer(x)
        counts[name] = saved.bytes
        assert torch.equal(y, ref(x))
    assert counts == {"lean": lean_bytes * x.numel(), "torch": torch_bytes * x.numel()}


@pytest.mark.parametrize("make", [lambda: torch.nn.PReLU(3), lambda: torch.nn.GELU()])
def test_lean_activation_modules_are_torch_in_eval_and_no_grad(make):
    ref = make()
    lean = snn.convert(copy.deepcopy(ref), lean=True)
    x = _activation_input().requires_grad_()
    with torch.no_grad(), snn.SavedTensorCounter() as saved:
        assert torch.equal(lean(x), ref(x))
    assert saved.bytes == 0
    lean.eval()
    y = lean(x)
    assert "Lean" not in type(y.grad_fn).__name__ and type(y.grad_fn) is type(ref(x).grad_fn)
    lean.train()
    assert "Lean" in type(lean(x).grad_fn).__name__


def test_lean_activations_under_bf16_autocast_match_torch():
    """Autocast runs prelu in bf16 (x and the slopes cast) and gelu in the input's dtype."""
    x = _activation_input()
    gy = torch.randn_like(x)
    prelu = torch.nn.PReLU(3, init=0.2)
    lean = snn.convert(copy.deepcopy(prelu), lean=True)
    results = []
    for layer in (lean, prelu):
        x_ = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x_)
        results.append((y, *torch.autograd.grad(y, [x_, layer.weight], gy.to(y.dtype))))
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = results
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    assert gx.dtype == torch.float32 and torch.equal(gx, gx_ref)
    # torch sums dA in bf16, lean in fp32 and then rounds: one or two bf16 roundings apart
    torch.testing.assert_close(gw, gw_ref, rtol=2 * 2.0**-8, atol=0)
    # a bf16 input (what a convolution under autocast hands on) is kept as it is: GELU is torch's exactly
    x16 = x.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), snn.SavedTensorCounter() as saved:
        y = snn.convert(torch.nn.GELU(), lean=True)(x16)
    assert saved.bytes == 2 * x.numel() and y.dtype == torch.bfloat16
    x16_ref = x16.detach().clone().requires_grad_()
    y_ref = F.gelu(x16_ref)
    assert torch.equal(y, y_ref)
    g16 = gy.to(torch.bfloat16)
    assert torch.equal(torch.autograd.grad(y, x16, g16)[0], torch.autograd.grad(y_ref, x16_ref, g16)[0])


@pytest.mark.parametrize("act", ["PRELU", "GELU"])
def test_convert_makes_monai_unet_lean_and_keeps_its_state_dict(act):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    make = lambda: UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2, act=act)
    ref = make()
    lean = snn.convert(copy.deepcopy(ref), lean=True)
    kinds = {torch.nn.PReLU: snn.LeanPReLU, torch.nn.GELU: snn.LeanGELU, torch.nn.InstanceNorm3d: snn.LeanInstanceNorm3d}
    before = [type(m) for m in ref.modules() if type(m) in kinds]
    after = [type(m) for m in lean.modules() if type(m) in kinds.values()]
    assert len(before) >= 10 and after == [kinds[k] for k in before]
    assert not any(type(m) in snn.lean.LEAN_OF for m in lean.modules())  # nothing left unconverted
    x = torch.randn(2, 1, 16, 16, 16)
    # train forward: the lean norm's fp32 maths differs from torch's in rounding only
    _assert_as_accurate_as_torch(lean(x), ref(x), copy.deepcopy(ref).double()(x.double()), "output")
    lean.eval(), ref.eval()
    assert torch.equal(lean(x), ref(x))  # eval: torch's own layers
    # state dicts load both ways, strict
    plain = make()
    plain.load_state_dict(lean.state_dict())
    again = snn.convert(make(), lean=True)
    again.load_state_dict(ref.state_dict())
    assert list(plain.state_dict()) == list(again.state_dict()) == list(ref.state_dict())
    assert torch.equal(plain.eval()(x), ref(x)) and torch.equal(again.eval()(x), ref(x))


def test_lean_monai_unet_gradients_match_torch_with_float32_storage():
    """Exact convolutions, lean norms and PReLUs keeping fp32: every gradient is torch's to fp32 rounding."""
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    ref = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2).train()
    lean = snn.convert(copy.deepcopy(ref), n_probes=0, lean=True, lean_storage="float32")
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(2, 1, 16, 16, 16)
    for model in (ref, lean):
        model(x).pow(2).mean().backward()
    ref64(x.double()).pow(2).mean().backward()
    _assert_gradients_as_accurate_as_torch(lean, ref, ref64)


def test_dynunet_full_resolution_block_saved_bytes():
    """One full-resolution conv → norm → act triple of the default network (32 → 32 channels):
    stochastic+lean keeps x̂ in bf16 (2 B) and the sign mask (1/8 B) per channel and voxel, plus a
    size-independent sketch; exact torch keeps the conv input, the norm input and the act output in
    fp32 (3 × 4 B). A fused block keeping only the bf16 activation output would keep 2 B."""
    channels, edge = 32, 24
    voxels = edge**3
    counts = {}
    for variant in ("exact", "stochastic+lean"):
        model = _dynunet().train()
        if variant != "exact":
            snn.convert(model, 16, lean=True)
        block = model.input_block
        assert block.conv2.conv.in_channels == block.conv2.conv.out_channels == channels
        x = torch.randn(1, channels, edge, edge, edge, requires_grad=True)
        with snn.SavedTensorCounter(ignore=model.parameters()) as saved:
            block.lrelu(block.norm2(block.conv2(x)))
        counts[variant] = saved.bytes
    # + 4 B per channel for each of the mean, the invstd and the batch-repeated weight of torch's instance norm
    assert counts["exact"] == 3 * 4 * channels * voxels + 3 * 4 * channels
    per_voxel = (2 + 1 / 8) * channels * voxels
    assert per_voxel < counts["stochastic+lean"] < per_voxel + 8192, counts  # spectral sketch (16 x 32 complex), seed, invstd


def _norm_dropout_prelu(shared: bool):
    """MONAI's ADN order (norm, Dropout(0), act) with an affine-free lean norm and a lean PReLU."""
    block = torch.nn.Sequential(torch.nn.InstanceNorm3d(6), torch.nn.Dropout(0.0), torch.nn.PReLU(6, init=0.2))
    snn.convert(block, 0, lean=True)
    if not shared:
        block.insert(2, torch.nn.Identity())
        block[2].forward = lambda t: t * 1.0  # a new tensor: nothing to share
    return block.train()


def test_lean_prelu_keeps_the_lean_norms_copy():
    """After an affine-free lean norm (MONAI UNet's ADN blocks) the PReLU keeps no tensor of its
    own: 2 B per element for the pair instead of 4, with the same gradients as unshared."""
    x = torch.randn(2, 6, 8, 8, 8, requires_grad=True)
    grads, saved = {}, {}
    for shared in (True, False):
        block = _norm_dropout_prelu(shared)
        with snn.SavedTensorCounter(ignore=block.parameters()) as counter:
            y = block(x)
        saved[shared] = counter.bytes
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
        grads[shared] = torch.autograd.grad(y, (x, block[-1].weight), gy)
    elements = x.numel()
    assert saved[True] < 2 * elements + 1024 < saved[False], saved  # bf16 x̂ once (+ σ⁻¹), vs twice
    # the shared copy holds x̂ rounded to bf16, the own one −x̂ rounded to bf16: the same numbers
    assert torch.equal(grads[True][0], grads[False][0]) and torch.equal(grads[True][1], grads[False][1])


def test_lean_prelu_does_not_share_a_copy_modified_in_place():
    """An in-place change between the norm and the PReLU makes the norm's copy stale: the PReLU then
    keeps its own, and its gradients stay right."""
    x = torch.randn(1, 3, 5, 5, 5, requires_grad=True)
    norm, act = snn.LeanInstanceNorm3d(3), snn.LeanPReLU(3, init=0.3)
    act.storage = norm.storage = torch.float32
    h = norm(x)
    h.mul_(-1.0)  # bumps the version: the kept x̂ no longer equals h
    y = act(h)
    gy = torch.randn_like(y)
    gx, ga = torch.autograd.grad(y, (x, act.weight), gy)
    references = []
    for dtype in (torch.float32, torch.float64):  # torch's layers in fp32, and the exact values
        xr = x.detach().to(dtype).requires_grad_()
        ar = act.weight.detach().to(dtype).requires_grad_()
        yr = F.prelu(-F.instance_norm(xr), ar)
        references.append(torch.autograd.grad(yr, (xr, ar), gy.to(dtype)))
    (gx32, ga32), (gx64, ga64) = references
    _assert_as_accurate_as_torch(gx, gx32, gx64, "input gradient")
    _assert_as_accurate_as_torch(ga, ga32, ga64, "slope gradient")
