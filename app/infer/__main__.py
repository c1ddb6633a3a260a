"""Command line: ``python -m app.infer CHECKPOINT INPUT [INPUT ...] -o OUTDIR`` (``stochprop-infer``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from app.infer.engine import RESAMPLE_MODES, OutputError, infer_files
from app.infer.predict import AMP_MODES
from app.models import CheckpointError

DESCRIPTION = """\
Segment NIfTI scans and video clips, or restore clips, with a trained stochprop checkpoint.

The checkpoint carries the model, its pre-processing (orientation, spacing, intensity
normalisation, foreground crop), the class names and its task (segmentation, or restoration
when its run config says task: restoration). Each input is pre-processed the same way and run
through gaussian-weighted sliding windows. A NIfTI prediction is mapped back onto the input's
own voxel grid: the label map has the input's shape, affine and header. A clip (time as the
first axis) is read and written window by window, never whole: its outputs have the input's
frame count, frame size and frame rate.
"""

EPILOG = """\
inputs:
  a .nii/.nii.gz file, a video (.mp4/.avi/.mkv/.webm), a folder of numbered frames
  (.png/.jpg/.jpeg: one clip), a folder (its NIfTI and video files), or a quoted glob
  ('scans/**/*.nii.gz'). A model with in_channels=1 reads clips in grey, 3 in RGB.

outputs (in OUTDIR):
  <name><suffix>.nii[.gz]       label map (uint8), same grid as the input
  <name>_prob.nii[.gz]          class probabilities in [0, 1], channels last, 16 bits (--save-probabilities)
  <name><suffix>.mp4            clip: mask video, grey value = class id, lossless (H.264 lossless, 4:4:4)
  <name>_overlay.mp4            clip: the frames with a coloured layer per class
  <name>_restored.mp4           clip, restoration checkpoint: the restored clip
  <name><suffix>_frames/        clip: one PNG per frame, 000000.png ... (--frames; masks or restored frames)
  summary.csv, summary.json     per file: status, class volumes in mL (NIfTI), seconds, output paths

Every output is written atomically: after a crash or a kill only complete files are there, and
a re-run skips each input whose outputs all exist (label map, and probabilities with
--save-probabilities; for a clip each of its outputs). Existing outputs and the summary are
kept unless --overwrite is given. Exit status: 0 if every file was processed or skipped, 1 if
any file failed, 2 on a usage or checkpoint error.

examples:
  python -m app.infer run/best.pt scan.nii.gz -o seg/
  python -m app.infer run/best.pt scans/ -o seg/ --tta --save-probabilities
  python -m app.infer run/best.pt 'data/*/t1.nii.gz' -o seg/ --device cuda --roi 128 128 128
  python -m app.infer run/best.pt clip.mp4 frames_dir/ -o seg/ --frames
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m app.infer``."""
    p = argparse.ArgumentParser(
        prog="python -m app.infer",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint file (.pt) written by training")
    p.add_argument(
        "inputs", metavar="INPUT", nargs="+", help="NIfTI or video file, frame folder, folder or glob pattern"
    )
    p.add_argument("-o", "--output", metavar="OUTDIR", required=True, help="output folder (created if missing)")
    p.add_argument(
        "--suffix", default="_seg", help="added to the input's base name for the label map (default: %(default)s)"
    )
    win = p.add_argument_group("sliding window")
    win.add_argument(
        "--roi", type=int, nargs="+", metavar="N", help="window size per axis (default: the checkpoint's patch_size)"
    )
    win.add_argument(
        "--overlap", type=float, default=0.5, help="overlap of neighbouring windows, in [0, 1) (default: %(default)s)"
    )
    win.add_argument(
        "--sw-batch-size", type=int, default=2, metavar="N", help="windows per forward pass (default: %(default)s)"
    )
    win.add_argument(
        "--tta", action="store_true", help="test-time augmentation: average over all axis flips (8x slower in 3D)"
    )
    dev = p.add_argument_group("device")
    dev.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N: where the network runs (default: %(default)s)"
    )
    dev.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="autocast dtype; auto = bf16 on CUDA, off on CPU (default: %(default)s)",
    )
    dev.add_argument(
        "--stitch-on-cpu",
        action="store_true",
        help="stitch the whole-volume output on the CPU while windows run on the GPU (automatic for large volumes)",
    )
    dev.add_argument(
        "--stitch-threshold-gb",
        type=float,
        default=None,
        metavar="GB",
        help="stitch on the CPU when the stitched output exceeds this size (default: half the free GPU memory)",
    )
    out = p.add_argument_group("outputs")
    out.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write class probabilities (16-bit fixed point: NIfTI-1 has no float16)",
    )
    out.add_argument(
        "--resample",
        choices=RESAMPLE_MODES,
        default="probabilities",
        help="how predictions go back to the input grid: resample probabilities then argmax (default), "
        "or argmax then nearest-neighbour labels (less memory)",
    )
    out.add_argument(
        "--frames", action="store_true", help="clips: also write one PNG per frame (masks, or restored frames)"
    )
    out.add_argument(
        "--fps",
        type=float,
        default=None,
        help="frame rate of frame-folder inputs (default: 25); video files keep theirs",
    )
    out.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs (default: keep them and skip the input)"
    )
    out.add_argument(
        "--summary", default="summary", metavar="NAME", help="stem of the CSV/JSON summary (default: %(default)s)"
    )
    out.add_argument("--no-summary", action="store_true", help="write no summary files")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    out.add_argument("-q", "--quiet", action="store_true", help="only print failures")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 some file failed, 2 usage/checkpoint error)."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("app.infer")
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.propagate = False
    options = dict(
        suffix=args.suffix,
        roi=args.roi,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        tta=args.tta,
        amp=args.amp,
        device=args.device,
        stitch_on_cpu=args.stitch_on_cpu,
        stitch_threshold_bytes=None if args.stitch_threshold_gb is None else int(args.stitch_threshold_gb * 1024**3),
        save_probabilities=args.save_probabilities,
        resample=args.resample,
        overwrite=args.overwrite,
        frames=args.frames,
        folder_fps=args.fps,
        summary=None if args.no_summary else args.summary,
        progress=not args.no_progress,
    )
    summary_error = None
    try:
        with logging_redirect_tqdm([log]):
            results = infer_files(args.checkpoint, args.inputs, args.output, **options)
    except OutputError as exc:
        if not exc.results:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        results, summary_error = exc.results, " ".join(str(exc).split())
    except (CheckpointError, ValueError, TypeError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)

    failed = [r for r in results if r.status == "failed"]
    written = sum(r.status == "ok" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    verb = "restored" if results and all(r.task == "restoration" for r in results) else "segmented"
    if not args.quiet or failed:
        print(
            f"{len(results)} file(s): {written} {verb}, {skipped} skipped (existing output), {len(failed)} failed",
            file=sys.stderr,
        )
        if options["summary"] and not args.quiet and summary_error is None:
            print(f"summary: {args.output}/{options['summary']}.csv and .json", file=sys.stderr)
    for r in failed:
        print(f"FAILED {r.input}: {r.message}", file=sys.stderr)
    if summary_error is not None:
        print(f"error: {summary_error}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
