"""Time sliding-window inference and its peak memory on one synthetic volume.

Builds the default nnU-Net-style DynUNet (planned for ``--patch`` at 1 mm, random
weights), makes one synthetic volume (default 512 x 512 x 300) and measures:

* ``predict``: :func:`app.infer.predict.predict_logits` on the in-memory volume (the
  network over all windows plus gaussian stitching), for each stitching placement asked;
* ``pipeline`` (unless ``--no-pipeline``): :func:`app.infer.infer_files` on the volume
  written as an uncompressed NIfTI with 0.8 x 0.8 x 1.5 mm voxels (load, resample to 1 mm,
  predict, invert to the input grid, write the label map).

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (reset before each row); on the
CPU the process's peak resident set size (``ru_maxrss``, which only grows: each row shows
the peak so far). The table starts with the environment (torch, CUDA, cuDNN, GPU).

Run from the repository root with the package importable (``pip install -e .`` or
``PYTHONPATH=.``).

Examples:
    python scripts/bench_infer.py                                  # CUDA if available, full size
    python scripts/bench_infer.py --device cpu --size 96 96 64 --patch 64 64 64
    python scripts/bench_infer.py --stitch gpu cpu --tta --amp bf16
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from app.infer import infer_files
from app.infer.predict import WindowSettings, predict_logits, stitch_bytes
from app.measure import environment_info
from app.models import build_model, save_checkpoint
from app.utils import resolve_amp, resolve_device


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware the numbers were measured on: :func:`app.measure.environment_info` plus MONAI."""
    import monai

    return {**environment_info(device), "monai": monai.__version__}


def synthetic_volume(size: Sequence[int], seed: int = 0) -> np.ndarray:
    """Smooth blobs plus noise, float32, shape ``size``."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in size]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    vol = np.sin(4 * x) * np.cos(3 * y) + 0.5 * np.sin(5 * z)
    vol = vol + 0.1 * rng.standard_normal(size=tuple(size), dtype=np.float32)
    return vol.astype(np.float32)


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[float, int]:
    """Run ``fn`` once; return (seconds, peak bytes) as described in the module docstring."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return time.perf_counter() - start, peak


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], metavar="N", help="volume size (voxels)")
    p.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128], metavar="N", help="DynUNet patch / ROI")
    p.add_argument("--out-channels", type=int, default=3, help="classes (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--sw-batch-size", type=int, default=2)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--tta", action="store_true", help="flip TTA (8 passes per window)")
    p.add_argument(
        "--stitch",
        nargs="+",
        choices=["same", "cpu"],
        default=None,
        help="where to stitch in the predict rows: same (as the windows) and/or cpu; default: both on CUDA",
    )
    p.add_argument("--no-pipeline", action="store_true", help="skip the file-to-file pipeline row")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN pick conv algorithms by timing them")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = resolve_device(args.device, option="--device")
    amp = resolve_amp(args.amp, device, option="--amp")
    stitches = args.stitch or (["same", "cpu"] if device.type == "cuda" else ["same"])
    cfg = {
        "name": "dynunet",
        "in_channels": 1,
        "out_channels": args.out_channels,
        "patch_size": list(args.patch),
        "spacing": [1.0, 1.0, 1.0],
    }
    torch.manual_seed(0)
    model = build_model(cfg).eval().to(device)
    n_params = sum(t.numel() for t in model.parameters())
    vol = synthetic_volume(args.size)
    image = torch.from_numpy(vol)[None]
    image = (image - image.mean()) / image.std()

    rows: list[tuple[str, str, float, int]] = []
    for stitch in stitches:
        settings = WindowSettings(
            roi_size=tuple(args.patch),
            overlap=args.overlap,
            sw_batch_size=args.sw_batch_size,
            tta=args.tta,
            amp=amp,
            sw_device=device,
            device=device if stitch == "same" else torch.device("cpu"),
        )
        # warm-up on one window's worth of data (cuDNN autotuning, allocator)
        predict_logits(model, image[:, : args.patch[0], : args.patch[1], : args.patch[2]], settings)
        seconds, peak = measure(lambda s=settings: predict_logits(model, image, s), device)
        rows.append(("predict", f"stitch on {settings.device.type}", seconds, peak))

    if not args.no_pipeline:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "bench.pt"
            save_checkpoint(
                ckpt,
                model_state={k: v.cpu() for k, v in model.state_dict().items()},
                model_config=cfg,
                preprocessing={"spacing": [1.0, 1.0, 1.0], "orientation": "RAS", "intensity": "zscore"},
                class_names=[f"class_{i}" for i in range(args.out_channels)],
            )
            src = Path(tmp) / "volume.nii"
            nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 1.5, 1.0])), src)
            del model
            results: list[Any] = []
            seconds, peak = measure(
                lambda: results.extend(
                    infer_files(
                        ckpt,
                        [src],
                        Path(tmp) / "out",
                        device=str(device),
                        amp=amp,
                        sw_batch_size=args.sw_batch_size,
                        overlap=args.overlap,
                        tta=args.tta,
                        summary=None,
                    )
                ),
                device,
            )
            if results[0].status != "ok":
                print(f"pipeline failed: {results[0].message}", file=sys.stderr)
                return 1
            rows.append(("pipeline", "NIfTI 0.8x0.8x1.5 mm -> 1 mm -> back", seconds, peak))

    env = environment(device)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(
        f"volume {'x'.join(map(str, args.size))}, DynUNet {n_params / 1e6:.1f} M parameters, "
        f"roi {'x'.join(map(str, args.patch))}, overlap {args.overlap}, sw_batch_size {args.sw_batch_size}, "
        f"amp {amp}, tta {args.tta}, device {device}, cudnn.benchmark {args.cudnn_benchmark}; "
        f"stitched output needs {gib(stitch_bytes(args.size, 1, args.out_channels))}"
    )
    mem_kind = "peak CUDA allocated" if device.type == "cuda" else "peak process RSS"
    header = f"| {'row':<9} | {'setting':<38} | {'seconds':>8} | {mem_kind:>20} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, setting, seconds, peak in rows:
        print(f"| {name:<9} | {setting:<38} | {seconds:>8.2f} | {gib(peak):>20} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
