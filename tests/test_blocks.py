"""app.nn.blocks: the lean DynUNet blocks compute MONAI's blocks' maths with fewer tensors alive.

Every lever is checked against MONAI's own block on the same weights: outputs, input gradients and
every parameter gradient within FP32_MARGIN times torch's own fp32 error against a float64
reference (exact backprop, fp32 storage, so only the order of the sums differs), then memory.
"""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock, UnetUpBlock
from monai.networks.nets.dynunet import DynUNetSkipLayer

import app.nn as snn
import app.nn.lean as lean_module
from app.nn.blocks import LeanDynUNetSkipLayer, LeanUnetBasicBlock, LeanUnetResBlock, LeanUnetUpBlock, split_conv

FP32_MARGIN = 8
NORM = ("INSTANCE", {"affine": True})


pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture of conftest.py


def _accurate(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """``‖ours − exact‖ ≤ FP32_MARGIN · max(‖theirs − exact‖, 2⁻²⁴ ‖exact‖)``."""
    error = (ours.double() - exact).norm().item()
    bound = FP32_MARGIN * max((theirs.double() - exact).norm().item(), 2.0**-24 * exact.norm().item())
    assert error <= bound, (what, error, bound)


def _compare(make, inputs, monkeypatch=None):
    """Runs MONAI's block, its lean conversion (n_probes=0, fp32 storage) and the float64 block on
    ``inputs``; checks output and every gradient. Returns the lean block."""
    torch.manual_seed(0)
    ref = make().train()
    lean = snn.convert(copy.deepcopy(ref), n_probes=0, lean=True, lean_storage="float32")
    ref64 = copy.deepcopy(ref).double()
    assert lean.state_dict().keys() == ref.state_dict().keys()
    results = []
    for model, dtype in ((lean, torch.float32), (ref, torch.float32), (ref64, torch.float64)):
        xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
        y = model(*xs)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        grads = torch.autograd.grad(y, [*xs, *model.parameters()], gy)
        results.append((y, grads))
    (y, g), (y_ref, g_ref), (y64, g64) = results
    _accurate(y, y_ref, y64, "output")
    names = [f"input {i}" for i in range(len(inputs))] + [n for n, _ in lean.named_parameters()]
    for name, a, b, c in zip(names, g, g_ref, g64):
        _accurate(a, b, c, name)
    return lean


@pytest.mark.parametrize("res", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_lean_encoder_blocks_match_monai(res, stride):
    cls = UnetResBlock if res else UnetBasicBlock
    lean = _compare(lambda: cls(3, 3, 4, 3, stride, NORM), [torch.randn(2, 3, 7, 6, 5)])
    assert type(lean) is (LeanUnetResBlock if res else LeanUnetBasicBlock)
    assert lean.norm1.inplace and lean.norm2.inplace


def test_lean_up_block_matches_monai():
    lean = _compare(lambda: UnetUpBlock(3, 6, 4, 3, 1, 2, NORM), [torch.randn(2, 6, 3, 4, 3), torch.randn(2, 4, 6, 8, 6)])
    assert type(lean) is LeanUnetUpBlock and lean.splits()


def test_lean_up_block_with_group_norm_and_prelu_matches_monai():
    """Other norms and activations in the block: group norm (in place, chunked per group), PReLU."""
    lean = _compare(lambda: UnetUpBlock(3, 6, 4, 3, 1, 2, ("GROUP", {"num_groups": 2}), act_name=("PRELU", {"num_parameters": 4})),
                    [torch.randn(1, 6, 3, 4, 3), torch.randn(1, 4, 6, 8, 6)])
    assert lean.splits()


def test_lean_skip_layer_matches_monai():
    def make():
        down = UnetBasicBlock(3, 2, 4, 3, 1, NORM)
        bottom = UnetBasicBlock(3, 4, 6, 3, 2, NORM)
        up = UnetUpBlock(3, 6, 4, 3, 1, 2, NORM)
        return DynUNetSkipLayer(0, downsample=down, upsample=up, next_layer=bottom)

    lean = _compare(make, [torch.randn(2, 2, 6, 8, 4)])
    assert type(lean) is LeanDynUNetSkipLayer


@pytest.mark.parametrize("res_block", [False, True])
def test_lean_dynunet_with_chunked_norms_matches_monai(res_block, monkeypatch):
    """The whole network, with the norms working through their tensors in several chunks."""
    from app.models import build_model

    monkeypatch.setattr(lean_module, "CHUNK", 256)
    cfg = {"name": "dynunet", "in_channels": 1, "out_channels": 3, "spatial_dims": 3, "kernel_size": [3, 3, 3],
           "strides": [1, 2, 2], "filters": [4, 8, 8], "res_block": res_block}
    _compare(lambda: build_model(cfg), [torch.randn(1, 1, 12, 8, 8)])


def test_split_conv_runs_pre_hooks_on_the_concatenated_shape_and_empties_parts():
    conv = snn.StochasticConv3d(6, 5, 3, padding=1, bias=True, n_probes=0)
    seen = []
    conv.register_forward_pre_hook(lambda m, args: seen.append((args[0].device.type, tuple(args[0].shape))))
    a, b = torch.randn(2, 2, 4, 5, 6), torch.randn(2, 4, 4, 5, 6)
    parts = [a, b]
    y = split_conv(conv, parts)
    assert parts == [] and seen == [("meta", (2, 6, 4, 5, 6))]
    torch.testing.assert_close(y, torch.nn.functional.conv3d(torch.cat([a, b], 1), conv.weight, conv.bias, padding=1))
    with pytest.raises(ValueError, match="in_channels"):
        split_conv(conv, [a])


def test_up_block_with_forward_hook_or_checkpointing_takes_monai_path():
    """A forward hook on the first convolution sees the concatenated input; gradient checkpointing
    (a replaced forward) runs and gives the same gradients."""
    from app.models.grad_checkpoint import _checkpointed_class

    torch.manual_seed(0)
    block = snn.convert(UnetUpBlock(3, 6, 4, 3, 1, 2, NORM), n_probes=0, lean=True, lean_storage="float32").train()
    seen = []
    handle = block.conv_block.conv1.conv.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    assert not block.splits()
    inputs = [torch.randn(1, 6, 2, 3, 2), torch.randn(1, 4, 4, 6, 4)]
    y = block(*inputs)
    assert seen == [8]
    handle.remove()
    assert block.splits()
    torch.testing.assert_close(block(*inputs), y)
    skip = LeanDynUNetSkipLayer.__new__(LeanDynUNetSkipLayer)
    torch.nn.Module.__init__(skip)
    skip.downsample, skip.next_layer, skip.upsample = torch.nn.Identity(), torch.nn.Conv3d(4, 6, 2, 2), block
    skip.super_head, skip.heads, skip.index = None, None, 0
    x = torch.randn(1, 4, 4, 6, 4, requires_grad=True)
    g_plain = torch.autograd.grad(skip(x).square().sum(), x)[0]
    block.__class__ = _checkpointed_class(type(block))
    g_ckpt = torch.autograd.grad(skip(x).square().sum(), x)[0]
    torch.testing.assert_close(g_ckpt, g_plain)


def test_in_place_norm_returns_its_input_with_the_same_gradients():
    torch.manual_seed(0)
    base = torch.randn(2, 4, 5, 6, 7)
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    x1, x2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    h1, h2 = x1 * 1.0, x2 * 1.0  # non-leaf inputs, as a convolution output is
    y1 = lean_module.lean_group_norm(h1, 2, w, b, storage=torch.float32)
    y2 = lean_module.lean_group_norm(h2, 2, w, b, storage=torch.float32, inplace=True)
    assert y2.data_ptr() == h2.data_ptr() and y1.data_ptr() != h1.data_ptr()
    assert torch.equal(y1, y2)
    gy = torch.randn_like(y1)
    assert all(torch.equal(p, q) for p, q in zip(torch.autograd.grad(y1, (x1, w, b), gy), torch.autograd.grad(y2, (x2, w, b), gy)))


@pytest.mark.parametrize("mode", ["group", "batch"])
def test_chunked_norm_gradcheck(mode, monkeypatch):
    """Several chunks (one group or one channel each) give the same maths: float64 gradcheck."""
    monkeypatch.setattr(lean_module, "CHUNK", 8)
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert len(lean_module._row_chunks(6 if mode == "batch" else 3, 24)) > 1

    def f(x_, w_, b_):
        return lean_module._LeanNorm.apply(x_, w_, b_, mode, 3 if mode == "group" else 0, 1e-5, torch.float64, None, False)

    reference = torch.nn.functional.group_norm(x, 3, w, b) if mode == "group" else torch.nn.functional.batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(f(x, w, b), reference)
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("storage", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_storage_keeps_one_byte_per_element(storage):
    """fp8 ``lean_storage``: the norm keeps x̂ at 1 B per element (plus σ⁻¹); PReLU stays at bf16."""
    block = snn.convert(torch.nn.Sequential(torch.nn.InstanceNorm3d(4, affine=True), torch.nn.PReLU()), lean=True, lean_storage=storage)
    assert block[0].storage == getattr(torch, storage) and block[1].storage == torch.bfloat16
    x = torch.randn(2, 4, 6, 6, 6, requires_grad=True)
    with snn.SavedTensorCounter(ignore=block.parameters()) as saved:
        y = block[0](x)
    assert saved.bytes == x.numel() * 1 + 2 * 4 * 4  # x̂ in fp8, σ⁻¹ (B, C) in fp32
    gx = torch.autograd.grad(y, x, torch.ones_like(y) + x.detach())[0]
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_chunked_sign_mask_activation_matches_one_chunk(inplace, monkeypatch):
    """The activation's mask packed and unpacked in chunks of whole bytes (a partial last chunk):
    the same output, mask and gradient as in one chunk."""
    base = torch.randn(2, 3, 5, 7)  # 210 elements: 7 chunks of 32 (an eighth, rounded up to whole bytes), the last of 18
    results = []
    for chunk in (1 << 24, 24):
        monkeypatch.setattr(lean_module, "CHUNK", chunk)
        x = base.clone().requires_grad_()
        h = x * 1.0
        y = lean_module.lean_leaky_relu(h, 0.1, inplace)
        assert len(lean_module._row_chunks(210, 1, multiple=8)) == (1 if chunk > 210 else 7)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
        results.append((y.detach().clone(), y.grad_fn.saved_tensors[0].clone(), torch.autograd.grad(y, x, gy)[0]))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    torch.testing.assert_close(results[0][0], torch.nn.functional.leaky_relu(base, 0.1), rtol=0, atol=0)


def test_storage_errors_grow_as_storage_narrows_and_vanish_at_float32():
    """app.nn.storage_errors: fp32 storage reproduces torch's gradients; bf16 < e4m3 < e5m2."""
    from app.nn.storage import storage_errors

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True),
                                torch.nn.LeakyReLU(0.01), torch.nn.Conv3d(4, 2, 3, padding=1), torch.nn.InstanceNorm3d(2))

    def loss_fn(m, batch):
        x, y = batch
        return (m(x) - y).square().mean()

    batches = [(torch.randn(2, 2, 6, 6, 6), torch.randn(2, 2, 6, 6, 6)) for _ in range(2)]
    results = storage_errors(model, loss_fn, *batches, storages=("float32", "bfloat16", "float8_e4m3fn", "float8_e5m2"))
    errors = [r.network for r in results]
    assert errors[0] < 1e-6 and errors[0] < errors[1] < errors[2] < errors[3], errors
    assert all(r.sgd_noise > 0.1 for r in results)
    assert type(model[1]) is torch.nn.InstanceNorm3d  # the model itself is left alone
    with pytest.raises(ValueError, match="storages"):
        storage_errors(model, loss_fn, *batches, storages=("int8",))
