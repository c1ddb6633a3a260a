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

from app.measure import MIB, environment, markdown_table, median_time, peak_since, reset_peak
from app.nn import DEFAULT_N_PROBES, DEFAULT_SKETCH, SavedTensorCounter, StochasticConv3d
from app.utils import resolve_device

DEFAULT = f"{DEFAULT_SKETCH} r{DEFAULT_N_PROBES}"
"""The layers' default sketch, by its name in :data:`VARIANTS`."""

VARIANTS = {
    "exact": dict(n_probes=0),
    "shifted r16": dict(n_probes=16, sketch="shifted"),
    "offset r16": dict(n_probes=16, sketch="offset"),
    "shifted r16 gaussian": dict(n_probes=16, sketch="shifted", probes="gaussian"),
    "shifted r16 orthogonal": dict(n_probes=16, sketch="shifted", probes="orthogonal"),
    "shifted r16 no-cv": dict(n_probes=16, sketch="shifted", control="none"),
    "offset r16 no-cv": dict(n_probes=16, sketch="offset", control="none"),
    "shifted r432": dict(n_probes=432, sketch="shifted"),  # the bytes of "offset r16" (K = 27)
    "spectral r64": dict(n_probes=64, sketch="spectral"),
    "spectral r256": dict(n_probes=256, sketch="spectral"),
    "spectral r1024": dict(n_probes=1024, sketch="spectral"),
}
DEFAULT_VARIANTS = ["exact", DEFAULT, "spectral r64", "shifted r16", "offset r16"]


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


def measure(size: int, channels: int, device: torch.device, repeat: int, variants: list[str]) -> list[LayerResult]:
    """Measures each variant on one ``(1, channels, size, size, size)`` post-ReLU input; the first
    variant is the reference for the gradient error (put ``exact`` first)."""
    torch.manual_seed(0)
    x = F.relu(torch.randn(1, channels, size, size, size, device=device))
    layer = StochasticConv3d(channels, channels, 3, padding=1, device=device)
    results, exact_grad = [], None
    for name in variants:
        layer.set_sketch_options(**VARIANTS[name])
        draws: list[torch.Tensor] = []

        def forward():
            return layer(x)

        def step():
            layer.weight.grad = None
            layer.bias.grad = None
            y = layer(x)
            y.pow(2).sum().div(2).backward()
            draws.append(layer.weight.grad.detach().clone())

        with SavedTensorCounter(ignore=layer.parameters()) as saved:
            y = forward()
        del y
        baseline = reset_peak(device)
        step()
        peak = peak_since(device, baseline)
        if exact_grad is None:
            exact_grad = draws[0]
        forward_s = median_time(forward, device, repeat)
        step_s = median_time(step, device, repeat)
        # root-mean-square over the draws: one draw's error is itself noisy
        rel = torch.stack([(g - exact_grad).norm() for g in draws]).pow(2).mean().sqrt().item() / exact_grad.norm().item()
        cos = torch.stack([F.cosine_similarity(g.flatten(), exact_grad.flatten(), 0) for g in draws]).mean().item()
        results.append(LayerResult(size, name, saved.bytes / MIB, peak / MIB, forward_s * 1e3, (step_s - forward_s) * 1e3, rel, cos))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.bench layer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help="cube edges (default: 64 128 192 256 on CUDA, 16 32 48 on CPU)")
    parser.add_argument("--channels", type=int, default=32, help="input and output channels (default 32)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median reported)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                        help=f"what to compare; the first is the reference for dW error ({DEFAULT} is the layers' default; "
                        "default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device, option="--device")
    except ValueError as err:
        parser.error(str(err))
    sizes = args.sizes or ([64, 128, 192, 256] if device.type == "cuda" else [16, 32, 48])
    rows = []
    for size in sizes:
        for r in measure(size, args.channels, device, args.repeat, args.variants):
            rows.append([f"{r.size}^3", r.variant, r.saved_mib, r.peak_mib, r.forward_ms, r.backward_ms, r.rel_error, r.cosine])
    print(f"# Conv3d {args.channels}->{args.channels}, k=3, batch 1, fp32 — {environment()}")
    print(markdown_table(["volume", "variant", "saved MiB", "peak MiB", "fwd ms", "bwd ms", "dW rel err (rms)", "dW cos (mean)"], rows))
    return 0
