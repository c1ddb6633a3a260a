"""Cost per point of cuFFT's real 3D transform by cube edge: the table of ``app/nn/fft_lengths.py``.

For each edge ``m``, ``torch.fft.rfftn`` of an ``(1, C, m, m, m)`` fp32 tensor with about 2^25
points (``C`` channels, at most 512: from edge 41 on, every call holds 2^25 points), the best of two timed runs, divided by ``C·m³``. Prints the
``CUFFT_NS_PER_POINT`` dictionary (nanoseconds per point). About a minute on an H200.

    python scripts/fft_lengths.py --min-edge 41 --max-edge 320
"""

from __future__ import annotations

import argparse
import time

import torch


def seconds_per_call(fn, calls: int) -> float:
    """Mean wall time of ``calls`` back-to-back calls of ``fn`` after one untimed call, between two
    device synchronisations (``app.measure.timed_calls`` synchronises around each call, which would
    add its latency to transforms of well under a millisecond)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-edge", type=int, default=41)
    parser.add_argument("--max-edge", type=int, default=320)
    parser.add_argument("--points", type=int, default=1 << 25, help="points per call (channels × m³). Default 2^25")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fft_lengths.py measures cuFFT: it needs a CUDA device")
    costs = {}
    for m in range(args.min_edge, args.max_edge + 1):
        channels = max(1, min(512, args.points // m ** 3))
        x = torch.zeros(1, channels, m, m, m, device="cuda")
        calls = 3 if m > 160 else 6
        best = min(seconds_per_call(lambda: torch.fft.rfftn(x, dim=(2, 3, 4)), calls) for _ in range(2))
        costs[m] = best / (channels * m ** 3) * 1e9
        del x
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("CUFFT_NS_PER_POINT = {" + ", ".join(f"{m}: {v:.4f}" for m, v in costs.items()) + "}")


if __name__ == "__main__":
    main()
