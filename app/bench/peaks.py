"""``python -m app.bench peaks``: one convolution's transient memory peak, forward and backward, in
multiples of its input's bytes, for exact backprop and for the stochastic sketches.

For each mode the layer runs one warm-up forward/backward, then:

* forward peak: the most memory held during ``y = conv(x)`` above what was held before it (the
  output, the saved state and every temporary);
* kept: what the forward pass leaves held (output plus saved state; ``x`` and ``W`` exist already);
* backward peak: the most memory held during ``autograd.grad(y, (x, W), dY)`` above what was held
  before it (``dX``, ``dW`` and every temporary).

How memory is counted:

* CUDA: ``torch.cuda.reset_peak_memory_stats``, then ``torch.cuda.max_memory_allocated`` minus
  ``torch.cuda.memory_allocated`` before the pass.
* CPU: :class:`app.nn.PeakMemory`: ``torch.profiler`` with ``profile_memory=True`` records every
  allocation and free through PyTorch's CPU allocator, including buffers a kernel allocates
  internally (a convolution's workspace, an FFT's zero-padded copy); their running sum in time
  order, maximised, is the peak above the memory held when the pass began. Memory a library takes
  with its own ``malloc`` (MKL's FFT descriptors, oneDNN's primitive cache) is not seen.

Times are the minimum over ``--repeats`` passes, measured without the profiler.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

import app.nn as snn

MODES = ("exact", "spectral", "shifted", "offset")
"""``exact``: torch's own convolution (keeps its input); the others: ``app.nn``'s stochastic
convolution with that sketch."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LayerPeak:
    """One mode's measurements; memory in multiples of the input's bytes."""

    mode: str
    forward_peak: float
    kept: float
    backward_peak: float
    forward_ms: float
    backward_ms: float


def cpu_peak(fn: Callable[[], Any]) -> tuple[Any, int, int]:
    """``(fn(), peak, held)``: the most bytes of CPU tensor memory allocated at once during the call
    above the level at its start, and the net bytes still allocated when it returned (the result
    included), from :class:`app.nn.PeakMemory` (the profiler's allocation events)."""
    with snn.PeakMemory("cpu") as memory:
        result = fn()
    return result, memory.peak_bytes, memory.end_bytes


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int, int]:
    """:func:`cpu_peak` on a CUDA device, from the caching allocator's statistics."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``(fn(), milliseconds)``, synchronising CUDA around the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def layer_peaks(
    shape: Sequence[int] = (1, 32, 64, 64, 64),
    out_channels: int = 32,
    kernel: int = 3,
    padding: int = 1,
    stride: int = 1,
    n_probes: int = 256,
    modes: Sequence[str] = ("exact", "spectral"),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    seed: int = 0,
) -> list[LayerPeak]:
    """Forward and backward memory peaks and times of one convolution per mode.

    Args:
        shape: input ``(B, C_in, *S)`` with 1 to 3 spatial dimensions.
        out_channels, kernel, padding, stride: the convolution (cubic kernel, no bias).
        n_probes: ``r`` of the stochastic modes.
        modes: entries of :data:`MODES`.
        device: ``"cpu"`` or a CUDA device.
        dtype: of the input and the weight.
        repeats: timed passes per mode (after the measured one).
        seed: of the input, the weight, ``dY`` and the sketches.

    Returns:
        One :class:`LayerPeak` per mode, memory in multiples of ``x``'s bytes.
    """
    dims = len(shape) - 2
    if dims not in (1, 2, 3):
        raise ValueError(f"shape must be (B, C, *S) with 1 to 3 spatial dimensions, but got shape={tuple(shape)}")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes must be among {list(MODES)}, but got {unknown}")
    dev = torch.device(device)
    peak_of = _cuda_peak if dev.type == "cuda" else (lambda fn, _device: cpu_peak(fn))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen).relu_().to(dev, dtype).requires_grad_()
    w = (torch.randn(out_channels, shape[1], *([kernel] * dims), generator=gen) / (shape[1] * kernel**dims) ** 0.5)
    w = w.to(dev, dtype).requires_grad_()
    input_bytes = x.numel() * x.element_size()
    exact_conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    stochastic_conv = (snn.stochastic_conv1d, snn.stochastic_conv2d, snn.stochastic_conv3d)[dims - 1]
    rows = []
    for mode in modes:
        def forward(step: int = 0) -> torch.Tensor:
            if mode == "exact":
                return exact_conv(x, w, None, stride, padding)
            return stochastic_conv(x, w, None, stride, padding, n_probes=n_probes, sketch=mode, seed=seed + step)

        def backward(y: torch.Tensor, grad_y: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(y, (x, w), grad_y)

        y = forward()  # warm-up: allocator caches, FFT plans, convolution primitives
        grad_y = torch.randn(y.shape, generator=gen).to(dev, dtype)
        backward(y, grad_y)
        del y
        y, fwd_peak, kept = peak_of(forward, dev)
        grads, bwd_peak, _ = peak_of(lambda: backward(y, grad_y), dev)
        del y, grads
        fwd_ms, bwd_ms = [], []
        for step in range(repeats):
            y, ms = _timed(lambda: forward(step + 1), dev)
            fwd_ms.append(ms)
            grads, ms = _timed(lambda: backward(y, grad_y), dev)
            bwd_ms.append(ms)
            del y, grads
        rows.append(LayerPeak(mode, fwd_peak / input_bytes, kept / input_bytes, bwd_peak / input_bytes,
                              min(fwd_ms, default=float("nan")), min(bwd_ms, default=float("nan"))))
    return rows


def environment(device: str) -> str:
    """One line naming torch, the device and its FFT/convolution backends."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        return f"torch {torch.__version__}, {name}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return (f"torch {torch.__version__}, CPU with {torch.get_num_threads()} threads, "
            f"MKL {torch.backends.mkl.is_available()}, oneDNN {torch.backends.mkldnn.is_available()}")


def format_table(rows: Sequence[LayerPeak]) -> str:
    """A markdown table of :func:`layer_peaks`'s rows."""
    lines = ["| mode | forward peak (× input) | kept after forward (× input) | backward peak (× input) | forward ms | backward ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.mode} | {r.forward_peak:.2f} | {r.kept:.2f} | {r.backward_peak:.2f} | {r.forward_ms:.0f} | {r.backward_ms:.0f} |")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be comma-separated ints such as 1,32,64,64,64, but got {text!r}") from None
    if not 3 <= len(shape) <= 5:
        raise argparse.ArgumentTypeError(f"--shape must be B,C and 1 to 3 spatial sizes, but got {text!r}")
    return shape


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.bench peaks",
        description="Per-layer forward/backward memory peak (multiples of the input's bytes) and time of one "
                    "convolution: torch's exact one and app.nn's stochastic sketches. CPU: torch.profiler memory "
                    "events; CUDA: torch.cuda.max_memory_allocated.",
    )
    parser.add_argument("--shape", type=_shape, default=(1, 32, 64, 64, 64), help="input B,C,*S (default 1,32,64,64,64)")
    parser.add_argument("--out-channels", type=int, default=32, help="output channels (default 32)")
    parser.add_argument("--kernel", type=int, default=3, help="cubic kernel size (default 3)")
    parser.add_argument("--padding", type=int, default=1, help="zero padding (default 1)")
    parser.add_argument("--stride", type=int, default=1, help="stride (default 1)")
    parser.add_argument("--n-probes", type=int, default=256, help="r of the stochastic modes (default 256)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["exact", "spectral"], help="modes to measure (default exact spectral)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="input and weight dtype (default float32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode; the minimum is shown (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the sketches (default 0)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} needs CUDA, which this torch build or machine lacks")
    rows = layer_peaks(args.shape, args.out_channels, args.kernel, args.padding, args.stride, args.n_probes,
                       args.modes, args.device, DTYPES[args.dtype], args.repeats, args.seed)
    print(f"conv {args.kernel}^{len(args.shape) - 2}, {args.shape[1]}->{args.out_channels}, input {'x'.join(map(str, args.shape))}, "
          f"padding {args.padding}, stride {args.stride}, r = {args.n_probes}, {args.dtype}; {environment(args.device)}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
