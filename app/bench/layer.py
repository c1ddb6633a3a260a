"""``python -m app.bench layer``: one 3D convolution, exact vs stochastic backprop.

For each cube size it reports the bytes saved for backward, the peak memory of forward+backward
(CUDA), forward and backward time, and the relative error and cosine of the sketched ``dW``
against the exact one. The loss is ``½‖y‖²`` on a post-ReLU input, so ``dW = Σ y ⊗ x_k`` is a
gradient with real signal (a random upstream gradient would make every estimator look hopeless).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from app.nn import SavedTensorCounter, StochasticConv3d

from .common import MIB, environment, markdown_table, median_time, peak_since, reset_peak

VARIANTS = {
    "exact": dict(n_probes=0),
    "offset r16": dict(n_probes=16, sketch="offset"),
    "shifted r16": dict(n_probes=16, sketch="shifted"),
    "offset r16 no-cv": dict(n_probes=16, sketch="offset", control="none"),
}


@dataclass
class LayerResult:
    size: int
    variant: str
    saved_mib: float
    peak_mib: float
    forward_ms: float
    backward_ms: float
    rel_error: float
    cosine: float


def measure(size: int, channels: int, device: torch.device, repeat: int) -> list[LayerResult]:
    torch.manual_seed(0)
    x = F.relu(torch.randn(1, channels, size, size, size, device=device))
    layer = StochasticConv3d(channels, channels, 3, padding=1, device=device)
    results, exact_grad = [], None
    for name, options in VARIANTS.items():
        layer.set_sketch_options(**options)

        def forward():
            return layer(x)

        def step():
            layer.weight.grad = None
            layer.bias.grad = None
            y = layer(x)
            y.pow(2).sum().div(2).backward()

        with SavedTensorCounter(ignore=layer.parameters()) as saved:
            y = forward()
        del y
        baseline = reset_peak(device)
        step()
        peak = peak_since(device, baseline)
        grad = layer.weight.grad.detach().clone()
        if exact_grad is None:
            exact_grad = grad
        forward_s = median_time(lambda: forward(), device, repeat)
        step_s = median_time(step, device, repeat)
        rel = (grad - exact_grad).norm().item() / exact_grad.norm().item()
        cos = F.cosine_similarity(grad.flatten(), exact_grad.flatten(), 0).item()
        results.append(LayerResult(size, name, saved.bytes / MIB, peak / MIB, forward_s * 1e3, (step_s - forward_s) * 1e3, rel, cos))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.bench layer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help="cube edges (default: 64 128 192 256 on CUDA, 16 32 48 on CPU)")
    parser.add_argument("--channels", type=int, default=32, help="input and output channels (default 32)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    sizes = args.sizes or ([64, 128, 192, 256] if device.type == "cuda" else [16, 32, 48])
    rows = []
    for size in sizes:
        for r in measure(size, args.channels, device, args.repeat):
            rows.append([f"{r.size}^3", r.variant, r.saved_mib, r.peak_mib, r.forward_ms, r.backward_ms, r.rel_error, r.cosine])
    print(f"# Conv3d {args.channels}->{args.channels}, k=3, batch 1, fp32 — {environment()}")
    print(markdown_table(["volume", "variant", "saved MiB", "peak MiB", "fwd ms", "bwd ms", "dW rel err", "dW cos"], rows))
    return 0
