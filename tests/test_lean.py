"""app.nn.lean: lean activations and normalisations match torch and keep what they claim."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import app.nn as snn
from app.nn.lean import _LeanNorm, lean_group_norm, lean_leaky_relu, pack_bits, unpack_bits


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
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(y_ref, x_ref, gy)[0])
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
        return _LeanNorm.apply(x_, w_, b_, "batch", 0, 1e-5, torch.float64, None)

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
    x = torch.randn(3, 4, 5, 6, 7, requires_grad=True)
    y, y_ref = lean(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    gx = torch.autograd.grad(y, [x, *lean.parameters()], gy)
    gx_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], gy)
    for a, b in zip(gx, gx_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name, buf in ref.named_buffers():  # running statistics of batch norm
        torch.testing.assert_close(dict(lean.named_buffers())[name], buf)
    lean.eval(), ref.eval()
    torch.testing.assert_close(lean(x), ref(x))


def _dynunet():
    from app.models import build_model

    torch.manual_seed(0)
    return build_model({"name": "dynunet", "in_channels": 1, "out_channels": 3, "patch_size": [32, 32, 32], "spacing": [1, 1, 1]})


def test_lean_dynunet_gradients_match_exact():
    """Lean layers change what is stored, not the maths: exact-backprop gradients agree with a
    float64 reference as well as torch's own fp32 layers do (bf16 storage: within 2%)."""
    ref = _dynunet().train()
    x = torch.randn(2, 1, 32, 32, 32)
    ref64 = copy.deepcopy(ref).double()
    ref64(x.double()).pow(2).mean().backward()
    ref(x).pow(2).mean().backward()

    def errors(model):
        return {
            name: ((p.grad.double() - q.grad).norm() / q.grad.norm().clamp_min(1e-30)).item()
            for (name, p), q in zip(model.named_parameters(), ref64.parameters())
        }

    torch_errors = errors(ref)
    for storage in ("float32", "bfloat16"):
        lean = snn.convert(copy.deepcopy(ref), n_probes=0, lean=True, lean_storage=storage)
        lean.zero_grad()
        lean(x).pow(2).mean().backward()
        for name, err in errors(lean).items():
            bound = max(2 * torch_errors[name], 1e-4) if storage == "float32" else 2e-2
            assert err < bound, (storage, name, err, torch_errors[name])


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
