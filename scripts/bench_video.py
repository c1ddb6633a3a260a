"""Peak memory and step time of video clips (T x H x W, colour) per variant, and the longest clip
each variant trains within a memory budget.

Each row is one :func:`app.measure.measure_step` (forward under the variant's autocast, DiceCE over
the deep-supervision heads, backward, AdamW) of the project's default DynUNet, planned for the
clip's shape with isotropic spacing (time counts as a spatial axis), on random colour frames.
``--longest`` then searches, per variant and per ``--cap-gib``, the largest frame count (a multiple
of ``--frame-step``) whose training step fits: doubling, then bisection. Prints markdown.

    python scripts/bench_video.py --device cuda --frames 64 --size 512 \\
        --variants exact amp stochastic+lean+amp --longest --cap-gib 24 0
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Callable

import torch

from app.measure import GIB, OK, StepStats, environment, markdown_table, measure_step, parse_variant
from app.utils import resolve_device

VIDEO_MODEL: dict[str, Any] = {"name": "dynunet", "in_channels": 3, "out_channels": 2, "spacing": [1.0, 1.0, 1.0]}
"""A colour segmentation network with the project's default DynUNet topology."""


def measure_clip(frames: int, size: int, variant: str, device: torch.device, cap_gib: float | None,
                 warmup: int, repeat: int) -> StepStats:
    """One training step on a ``(3, frames, size, size)`` clip; out of memory gives ``status="oom"``."""
    return measure_step(VIDEO_MODEL, patch_size=(frames, size, size), variant=variant, device=device, warmup=warmup,
                        repeat=repeat, memory_cap_gib=cap_gib, report_errors=True)


def longest(fits: Callable[[int], bool], step: int, limit: int) -> int:
    """The largest multiple of ``step`` up to ``limit`` for which ``fits`` holds (0: not even ``step``),
    assuming ``fits`` is monotone: doubling from ``step``, then bisection."""
    if not fits(step):
        return 0
    good, bad = step, None
    while bad is None:
        trial = min(2 * good, limit)
        if trial == good:
            return good
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=64, help="frames of the measured clip. Default 64")
    p.add_argument("--size", type=int, default=512, help="frame height and width. Default 512")
    p.add_argument("--variants", nargs="+", default=["exact", "amp", "stochastic+lean+amp"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--longest", action="store_true", help="also search the longest clip per variant and --cap-gib")
    p.add_argument("--cap-gib", type=float, nargs="+", default=[24.0],
                   help="memory budgets of --longest in GiB; 0 = the whole device. Default 24")
    p.add_argument("--frame-step", type=int, default=16, help="granularity of --longest in frames. Default 16")
    p.add_argument("--max-frames", type=int, default=2048, help="longest clip tried. Default 2048")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, cpu. Default auto")
    args = p.parse_args(argv)
    try:
        variants = [parse_variant(v).name for v in args.variants]
        device = resolve_device(args.device, option="--device")
    except ValueError as err:
        p.error(str(err))
    cuda = device.type == "cuda"
    print(f"# Video clips, colour, DynUNet default — {environment()}\n")
    rows = []
    for variant in variants:
        s = measure_clip(args.frames, args.size, variant, device, None, args.warmup, args.repeat)
        peak = f"{s.peak_bytes / GIB:.2f}" if s.status == OK and cuda else s.status if s.status != OK else "–"
        time_ms = f"{s.step_seconds * 1e3:.0f}" if s.status == OK else "–"
        rows.append([f"{args.frames}x{args.size}x{args.size}", variant, peak, time_ms,
                     f"{s.saved_bytes_per_voxel:.0f}" if math.isfinite(s.saved_bytes_per_voxel) else "–"])
        print("[video] " + " ".join(rows[-1]), file=sys.stderr, flush=True)
    print(markdown_table(["clip (T x H x W)", "variant", "peak GiB", "step ms", "saved B/voxel"], rows))
    if not args.longest:
        return 0
    found = []
    for cap in args.cap_gib:
        budget = None if cap <= 0 else cap
        for variant in variants:
            def fits(frames: int, variant: str = variant) -> bool:
                ok = measure_clip(frames, args.size, variant, device, budget, 0, 1).status == OK
                print(f"[video] {variant} {frames} frames within {budget or 'the device'}: {ok}", file=sys.stderr, flush=True)
                return ok

            frames = longest(fits, args.frame_step, args.max_frames)
            found.append(["whole device" if budget is None else f"{cap:g} GiB", variant, str(frames)])
    print(f"\n## Longest clip that trains ({args.size}x{args.size} colour frames, steps of {args.frame_step})\n")
    print(markdown_table(["budget", "variant", "frames"], found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
