"""Capturable training steps: the spectral sketch's counter-based draws (int and device seeds give
the same numbers, the device counter advances, ``manual_seed`` resets it), a stochastic network
traced by ``torch.compile`` in one graph, ``trainer.compile`` training like eager; on CUDA, a
forward/backward captured in a CUDA graph that draws new frequencies on every replay."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import app.nn as snn
from app.nn import probes, spectral


pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture of conftest.py


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.LeakyReLU(), nn.Conv3d(8, 8, 3, padding=1, stride=2),
                        nn.LeakyReLU(), nn.ConvTranspose3d(8, 4, 2, stride=2))
    return snn.convert(net, 16)


def _z2(estimates: torch.Tensor, reference: torch.Tensor) -> float:
    n = estimates.shape[0]
    return ((estimates.mean(0) - reference) / (estimates.std(0) / math.sqrt(n)).clamp_min(1e-12)).pow(2).mean().item()


@pytest.mark.parametrize("seed", [0, 12345, -(2**62), 2**63 - 1])
def test_int_and_device_seeds_draw_the_same_numbers(seed):
    cpu = torch.device("cpu")
    for shape in [(7,), (3, 5)]:
        a = probes.hash_bits(seed, shape, 1, cpu)
        b = probes.hash_bits(torch.tensor(seed, dtype=torch.int64), shape, 1, cpu)
        assert torch.equal(a, b)
    x = torch.randn(2, 6, 9, 10, generator=torch.Generator().manual_seed(1))
    one = spectral.sketch(x, (10, 11), 12, seed, 1 << 20)
    two = spectral.sketch(x, (10, 11), 12, torch.tensor(seed, dtype=torch.int64), 1 << 20)
    assert all(torch.equal(p, q) for p, q in zip(one, two))


def test_hash_draws_are_uniform_and_signs_balanced():
    u = probes.uniform_from_bits(probes.hash_bits(3, (200_000,), 2, torch.device("cpu")))
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    expected = u.numel() / 20
    assert ((counts - expected).pow(2) / expected).sum() < 60  # chi² with 19 dof: p ≈ 1e-6
    s = probes.signs_from_bits(probes.hash_bits(3, (4, 50_000), 1, torch.device("cpu")), torch.float32)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert s.mean().abs() < 0.02 and (s[0] * s[1]).mean().abs() < 0.02


def test_device_seed_advances_and_manual_seed_resets_it():
    cpu = torch.device("cpu")
    snn.manual_seed(5)
    first = [int(probes.device_seed(cpu)) for _ in range(3)]
    assert len(set(first)) == 3
    snn.manual_seed(5)
    assert [int(probes.device_seed(cpu)) for _ in range(3)] == first


def test_compiled_spectral_network_is_one_graph_and_unbiased():
    """Traced whole (no graph break from the sketch, its seed or the autograd function), and the
    compiled backward's estimates average to the exact gradient."""
    net = _small_net()
    x = torch.rand(2, 2, 8, 8, 8)
    probes.ensure_device_seed(x.device)
    explanation = torch._dynamo.explain(lambda t: net(t).pow(2).sum())(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager")
    with snn.exact(net):
        (reference,) = torch.autograd.grad(net(x).pow(2).sum(), net[2].weight)
    estimates = torch.stack([torch.autograd.grad(compiled(x).pow(2).sum(), net[2].weight)[0] for _ in range(48)])
    assert not torch.equal(estimates[0], estimates[1])  # the device counter advanced between calls
    assert 0.3 < _z2(estimates, reference) < 1.8


def test_trainer_compile_trains_like_eager(tmp_path: Path):
    """``trainer.compile`` on a stochastic run: the losses follow eager's (the sketch's draws differ,
    so not bit for bit), and the checkpoint keys are the plain model's. Lean layers off: under
    tracing, an in-place lean activation on a lean norm's output is refused by autograd (app.nn.lean)."""
    from tests.test_train import tiny_cfg
    from app.data import make_synthetic_dataset
    from app.train import train

    root = make_synthetic_dataset(tmp_path / "data", n_train=3, n_val=1, shape=(24, 24, 24))
    common = ["trainer.max_epochs=1", "trainer.steps_per_epoch=3", "logger.fidelity_every=0", "sketch.lean=false"]
    eager = train(tiny_cfg(tmp_path / "eager", root, *common))
    compiled = train(tiny_cfg(tmp_path / "compiled", root, *common, "trainer.compile=default", "trainer.compile_backend=aot_eager"))
    assert compiled["train/epoch_loss"] == pytest.approx(eager["train/epoch_loss"], rel=0.05)
    keys = torch.load(tmp_path / "compiled" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model_state"]
    assert not any("_orig_mod" in k for k in keys)


def test_unknown_compile_mode_names_the_option():
    from app.models.compiled import compile_model

    with pytest.raises(ValueError, match="trainer.compile must be one of"):
        compile_model(nn.Linear(2, 2), "fast", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_spectral_forward_backward_captures_in_a_cuda_graph():
    """One stochastic layer's forward and backward captured with ``torch.cuda.graph`` after eager
    warm-up: every replay draws new frequencies (the seed counter advances inside the graph), and the
    replays' weight gradients average to the exact one."""
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 8, 20, 20, 20, generator=gen) + 0.5).to(dev)
    w = torch.randn(8, 8, 3, 3, 3, generator=gen).to(dev).requires_grad_()
    gy = torch.randn(2, 8, 20, 20, 20, generator=gen).to(dev)
    (reference,) = torch.autograd.grad(F.conv3d(x, w, padding=1), w, gy)

    def step():
        w.grad = None
        snn.stochastic_conv3d(x, w, padding=1, n_probes=64, sketch="spectral").backward(gy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    w.grad = None
    with torch.cuda.graph(graph):
        snn.stochastic_conv3d(x, w, padding=1, n_probes=64, sketch="spectral").backward(gy)
    estimates = []
    for _ in range(200):
        graph.replay()
        estimates.append(w.grad.detach().clone())
    torch.cuda.synchronize()
    estimates = torch.stack(estimates)
    assert not torch.equal(estimates[0], estimates[1])
    assert 0.5 < _z2(estimates.double(), reference.double()) < 1.6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["reduce-overhead", "default"])
def test_compiled_converted_dynunet_step_on_cuda(mode):
    """A converted (stochastic + lean) network compiled with ``mode`` trains under bf16 autocast:
    finite loss and gradients, and the loss falls over a few AdamW steps, as eager's does."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.InstanceNorm3d(16, affine=True), nn.LeakyReLU(0.01),
                        nn.Conv3d(16, 16, 3, padding=1), nn.InstanceNorm3d(16, affine=True), nn.LeakyReLU(0.01),
                        nn.Conv3d(16, 2, 1))
    snn.convert(net, 64, lean=True)
    net.to(dev)
    probes.ensure_device_seed(dev)
    compiled = torch.compile(net, mode=mode)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, capturable=True)
    x = torch.rand(2, 1, 32, 32, 32, device=dev)
    target = (x > 0.5).long().squeeze(1)
    losses = []
    for _ in range(8):
        torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(x)
        loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("sketch", ["spectral", pytest.param("shifted", marks=pytest.mark.slow)])
def test_compiled_gradients_equal_eager_under_autocast(sketch):
    """With the seeds fixed, a compiled regular + transposed stochastic pair under bf16 autocast gives
    eager's gradients: exactly for the spectral sketch (its backward, traced under the forward's
    autocast, has no operation that autocast rounds), within bf16 rounding of the probe products for
    the probe sketches; and the layers leave autocast on for what follows them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 12, 12, 12, generator=gen).requires_grad_()
    w = torch.randn(6, 4, 3, 3, 3, generator=gen).requires_grad_()
    wt = torch.randn(6, 3, 2, 2, 2, generator=gen).requires_grad_()

    def pair(inp):
        y = snn.stochastic_conv3d(inp, w, padding=1, n_probes=16, sketch=sketch, seed=7)
        z = snn.stochastic_conv_transpose3d(torch.relu(y), wt, stride=2, n_probes=16, sketch=sketch, seed=11)
        return z, torch.is_autocast_enabled("cpu")

    def grads(fn):
        for t in (x, w, wt):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, autocast_on = fn(x)
        assert autocast_on
        (out.float() ** 2).sum().backward()
        return [t.grad.clone() for t in (x, w, wt)]

    eager = grads(pair)
    torch._dynamo.reset()
    # the probe sketches seed host generators, a graph break; the spectral sketch traces whole
    compiled = grads(torch.compile(pair, backend="aot_eager", fullgraph=sketch == "spectral"))
    tolerance = 0.0 if sketch == "spectral" else 0.01
    for a, b in zip(eager, compiled):
        assert ((a - b).norm() / a.norm()).item() <= tolerance


def test_lean_stochastic_block_compiles_as_one_graph():
    """Lean norms and in-place lean activations between stochastic convolutions trace without a graph
    break (``fullgraph=True`` raises on one), forward and backward, under bf16 autocast."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True), nn.LeakyReLU(0.01, inplace=True),
                        nn.Conv3d(8, 8, 3, padding=1, stride=2), nn.InstanceNorm3d(8, affine=True), nn.ReLU(inplace=True),
                        nn.ConvTranspose3d(8, 2, 2, stride=2))
    snn.convert(net, 16, lean=True)
    probes.ensure_device_seed(torch.device("cpu"))
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
    out.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def _dynunet_step(compile: str, variant: str = "stochastic+lean+amp", device: str = "cuda", edge: int = 32):
    from app.bench.networks import bench_model_config
    from app.measure.step import TrainingStep
    from app.measure.variants import parse_variant

    patch = (edge,) * 3
    return TrainingStep(bench_model_config("dynunet", [], patch), parse_variant(variant), patch, 2, 64, {},
                        torch.device(device), compile=compile)


def test_training_step_runs_the_compiled_network():
    """``TrainingStep`` calls the ``torch.compile``d module (whose truth value raises: it has no
    ``len``), and its step updates the weights."""
    from app.measure.step import TrainingStep, model_config_for_patch
    from app.measure.variants import parse_variant

    patch = (16, 16, 16)
    cfg = model_config_for_patch({"name": "dynunet", "in_channels": 1, "out_channels": 2, "spacing": [1.0, 1.0, 1.0],
                                  "base_features": 4, "max_features": 8, "max_depth": 3}, patch)
    step = TrainingStep(cfg, parse_variant("exact"), patch, 1, 0, {}, torch.device("cpu"))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step.model = torch.compile(step.eager_model, backend=backend)
    before = [p.detach().clone() for p in step.parameters]
    step()
    assert graphs, "the compiled module was not called"
    assert any(not torch.equal(a, p) for a, p in zip(before, step.parameters))


@pytest.mark.parametrize("case, match", [
    ("cpu", "needs a CUDA device"),
    ("fp16", "not fp16"),
    ("ddp", "with 2 processes use trainer.compile=reduce-overhead"),
    ("shifted", "layer .* uses sketch='shifted'"),
])
def test_cuda_graphs_refuses_what_a_replay_cannot_reproduce(case, match):
    """``trainer.compile=cuda-graphs`` names the setting it cannot capture, in one line."""
    from app.models.compiled import check_capturable

    net = snn.convert(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1)), 8, sketch="shifted" if case == "shifted" else "spectral")
    device = torch.device("cpu" if case == "cpu" else "cuda")
    amp = torch.float16 if case == "fp16" else torch.bfloat16
    with pytest.raises(ValueError, match=f"trainer.compile=cuda-graphs .*{match}") as err:
        check_capturable(net, device, amp, world_size=2 if case == "ddp" else 1)
    assert "\n" not in str(err.value)


def test_cuda_graphs_on_the_cpu_is_a_config_error(tmp_path: Path):
    """The trainer refuses ``trainer.compile=cuda-graphs`` on the CPU before it trains (no checkpoint)."""
    from tests.test_train import tiny_cfg
    from app.data import make_synthetic_dataset
    from app.train import train

    root = make_synthetic_dataset(tmp_path / "data", n_train=3, n_val=1, shape=(24, 24, 24))
    with pytest.raises(ValueError, match="trainer.compile=cuda-graphs needs a CUDA device"):
        train(tiny_cfg(tmp_path / "run", root, "trainer.compile=cuda-graphs"))
    assert not list(tmp_path.glob("run/checkpoints/*.pt"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_backward_gives_eager_gradients_and_accumulates():
    """An exact network's captured step: the gradients of a replay equal eager backward's on the same
    batch, a batch copied into the static inputs is the one used, two calls without zeroing add up,
    and a batch of another shape runs eagerly."""
    from app.models.compiled import CapturedBackward

    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True), nn.LeakyReLU(0.01),
                        nn.Conv3d(8, 2, 1)).to(dev)
    params = list(net.parameters())

    def loss_of(image, label):
        return F.cross_entropy(net(image), label[:, 0])

    captured = CapturedBackward(loss_of, params, warmup=2)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 1, 16, 16, 16, generator=gen).to(dev), torch.randint(0, 2, (2, 1, 16, 16, 16), generator=gen).to(dev))
               for _ in range(4)]

    def eager_grads(*pairs):
        for p in params:
            p.grad = None
        for image, label in pairs:
            loss_of(image, label).backward()
        return [p.grad.clone() for p in params]

    for image, label in batches[:2]:  # warm-up calls: eager
        for p in params:
            p.grad = None
        captured(image, label)
    assert not captured.captured
    for image, label in batches[2:]:
        for p in params:
            p.grad = None
        loss = captured(image, label)
        got = [p.grad.clone() for p in params]
        assert captured.captured
        assert loss.item() == pytest.approx(loss_of(image, label).item(), rel=1e-5)
        for a, b in zip(got, eager_grads((image, label))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p in params:
        p.grad = None
    captured(*batches[2])
    captured(*batches[3])
    summed = [p.grad.clone() for p in params]
    for a, b in zip(summed, eager_grads(batches[2], batches[3])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    odd = (torch.randn(1, 1, 8, 8, 8, device=dev), torch.randint(0, 2, (1, 1, 8, 8, 8), device=dev))
    for p in params:
        p.grad = None
    captured(*odd)
    for a, b in zip([p.grad.clone() for p in params], eager_grads(odd)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_stochastic_dynunet_step_samples_afresh_and_trains():
    """A converted DynUNet's training step under ``compile="cuda-graphs"`` (bf16, lean): every replay
    draws a new sketch (the same batch gives different weight gradients, whose mean over replays
    approaches eager exact backprop's), and the loss falls over AdamW steps as eager's does."""
    step = _dynunet_step("cuda-graphs")
    losses = []
    for _ in range(12):
        step()
        losses.append(step.captured.static_loss.item() if step.captured.captured else float("nan"))
    assert step.captured.captured
    assert all(math.isfinite(v) for v in losses[3:])
    assert losses[-1] < losses[3]
    first = [p for p in step.parameters if p.dim() == 5][0]
    grads = []
    for _ in range(2):
        step.optimizer.zero_grad(set_to_none=True)
        step.captured(step.x, step.y)
        grads.append(first.grad.clone())
    assert not torch.equal(grads[0], grads[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_cuda_graphs_trains_like_eager(tmp_path: Path):
    """``trainer.compile=cuda-graphs`` on CUDA under bf16: the run captures after its warm-up steps,
    its losses follow eager's (the sketch draws differ), and the checkpoint resumes."""
    from tests.test_train import tiny_cfg
    from app.data import make_synthetic_dataset
    from app.train import train

    root = make_synthetic_dataset(tmp_path / "data", n_train=3, n_val=1, shape=(24, 24, 24))
    common = ["trainer.max_epochs=2", "trainer.steps_per_epoch=6", "logger.fidelity_every=0", "trainer.device=cuda",
              "trainer.amp=bf16"]
    eager = train(tiny_cfg(tmp_path / "eager", root, *common))
    graphed = train(tiny_cfg(tmp_path / "graphed", root, *common, "trainer.compile=cuda-graphs"))
    assert math.isfinite(graphed["train/epoch_loss"])
    assert graphed["train/epoch_loss"] == pytest.approx(eager["train/epoch_loss"], rel=0.1)
    resumed = train(tiny_cfg(tmp_path / "graphed", root, *common, "trainer.compile=cuda-graphs", "trainer.max_epochs=3",
                             "trainer.resume=auto"))
    assert resumed["epoch"] == 3
