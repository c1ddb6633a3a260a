"""Run a trained checkpoint over NIfTI files and video clips; write the results beside each other.

NIfTI, per file: load and pre-process as the checkpoint says, with training's chain
(:func:`app.data.transforms.infer_transforms`, settings read by :mod:`app.infer.preprocess`),
sliding-window prediction (:mod:`app.infer.predict`), inversion of the spatial
pre-processing back onto the input's voxel grid, then the label map (and optionally the
class probabilities) written with the input's affine and header (:mod:`app.infer.files`).

Clips (video files and frame folders), per clip: streamed window by window through the same
sliding window (:mod:`app.infer.video`); a segmentation checkpoint gives a mask video and an
overlay video, a restoration checkpoint (run config ``task: restoration``) the restored clip.

A bad file gives a failed :class:`Result` with a one-line reason; the other files go on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import monai
import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from tqdm.auto import tqdm

from app.data.errors import DataError
from app.data.nifti import read_header_info
from app.data.transforms import infer_transforms
from app.infer.files import (
    FileError,
    collect_inputs,
    input_stem,
    output_path,
    voxel_volume_ml,
    write_like,
    write_probabilities,
    write_summary,
)
from app.infer.predict import WindowSettings, predict_logits, stitch_bytes
from app.infer.preprocess import build_inverter, checkpoint_preprocessing
from app.infer.video import ClipJob, ClipOutputs, check_clip_preprocessing, is_clip_input, open_source, read_channels
from app.models import check_patch_size, load_checkpoint, model_from_checkpoint
from app.utils import atomic_path, resolve_amp, resolve_device

__all__ = [
    "TASKS",
    "FileError",
    "InferenceOptions",
    "OutputError",
    "Result",
    "Segmenter",
    "checkpoint_task",
    "infer_files",
]

logger = logging.getLogger("app.infer")

RESAMPLE_MODES = ("probabilities", "labels")
TASKS = ("segmentation", "restoration")
"""What a checkpoint's network does: its run config's ``task`` (absent: segmentation)."""
# ROI used when neither the options nor the checkpoint's model_config give one.
FALLBACK_ROI = (96, 96, 96)


class OutputError(OSError):
    """The output folder or the summary cannot be written; the message is one line naming it.

    Attributes:
        results: the per-file results so far (empty when the folder failed before any work).
    """

    def __init__(self, message: str, results: list[Result] | None = None) -> None:
        super().__init__(message)
        self.results = results or []


@dataclass(frozen=True)
class InferenceOptions:
    """Options of :func:`infer_files` (the CLI flags of ``python -m app.infer``).

    Attributes:
        suffix: appended to the input's base name for the label map. Default ``"_seg"``.
        roi: sliding-window size; None = the checkpoint's ``model_config["patch_size"]``
            (else 96 per axis).
        overlap: window overlap fraction in [0, 1). Default 0.5.
        sw_batch_size: windows per forward pass. Default 2.
        tta: average over all flips of the spatial axes (8 passes in 3D). Default False.
        amp: ``"auto"`` (bf16 on CUDA, else off), ``"bf16"``, ``"fp16"`` or ``"off"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``: where windows run.
        stitch_on_cpu: always stitch the whole-volume output on the CPU.
        stitch_threshold_bytes: stitch on the CPU when the stitched output would exceed
            this many bytes; None = half of the free memory of the CUDA device.
        save_probabilities: also write class probabilities (channels last, 16-bit
            fixed point: NIfTI-1 has no float16).
        probability_suffix: appended to the input's base name for probabilities.
        resample: ``"probabilities"`` (default; resample class probabilities linearly
            back to the input grid, then argmax: smoother boundaries, nnU-Net's choice)
            or ``"labels"`` (argmax first, nearest-neighbour resampling: less memory).
        overwrite: replace existing outputs; otherwise inputs with an existing label
            map are skipped. Default False.
        frames: for clips, also write one PNG per frame (the mask, or the restored frame) into
            a folder ``<name><suffix>_frames``. Default False.
        overlay_suffix: appended to a clip's base name for the overlay video. Default ``"_overlay"``.
        restored_suffix: appended to a clip's base name for the restored clip. Default ``"_restored"``.
        folder_fps: frame rate of frame-folder clips; None = :data:`app.data.video.FOLDER_FPS`.
        summary: file stem of the CSV/JSON summary in the output folder; None = none.
        progress: show a tqdm progress bar over files.
    """

    suffix: str = "_seg"
    roi: Sequence[int] | None = None
    overlap: float = 0.5
    sw_batch_size: int = 2
    tta: bool = False
    amp: str = "auto"
    device: str = "auto"
    stitch_on_cpu: bool = False
    stitch_threshold_bytes: int | None = None
    save_probabilities: bool = False
    probability_suffix: str = "_prob"
    resample: str = "probabilities"
    overwrite: bool = False
    frames: bool = False
    overlay_suffix: str = "_overlay"
    restored_suffix: str = "_restored"
    folder_fps: float | None = None
    summary: str | None = "summary"
    progress: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), but got overlap={self.overlap}")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, but got sw_batch_size={self.sw_batch_size}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {list(RESAMPLE_MODES)}, but got resample={self.resample!r}")
        if self.save_probabilities and self.probability_suffix == self.suffix:
            raise ValueError("probability_suffix must differ from suffix")
        if self.overlay_suffix == self.suffix:
            raise ValueError("overlay_suffix must differ from suffix")
        if self.folder_fps is not None and not self.folder_fps > 0:
            raise ValueError(f"folder_fps must be > 0, but got folder_fps={self.folder_fps}")

    @property
    def output_suffixes(self) -> tuple[str, ...]:
        """Every suffix an output's base name can end with (inputs named so in the output folder are skipped)."""
        names = (self.suffix, self.probability_suffix, self.overlay_suffix, self.restored_suffix)
        return tuple(n for n in names if n) + tuple(f"{n}_frames" for n in (self.suffix, self.restored_suffix))


@dataclass
class Result:
    """Outcome of one input file.

    Attributes:
        input: the input file (or frame folder).
        status: ``"ok"`` (written), ``"skipped"`` (output existed, no ``overwrite``) or
            ``"failed"``.
        output: the label map, mask video or restored clip (None when failed before it was known).
        probabilities: the probability map path, when written.
        overlay: a clip's overlay video.
        frames: a clip's folder of per-frame PNGs.
        seconds: wall time spent on this file (load to write).
        volumes_ml: class name -> volume in mL, from the label map and the input's
            voxel size (also filled for skipped files, from the existing output); empty for clips.
        message: one-line reason for ``failed``/``skipped``; empty when ok.
        task: ``"segmentation"`` or ``"restoration"``.
    """

    input: Path
    status: Literal["ok", "skipped", "failed"]
    output: Path | None = None
    probabilities: Path | None = None
    overlay: Path | None = None
    frames: Path | None = None
    seconds: float = 0.0
    volumes_ml: dict[str, float] = field(default_factory=dict)
    message: str = ""
    task: str = "segmentation"

    @property
    def ok(self) -> bool:
        """True unless the file failed."""
        return self.status != "failed"

    def to_row(self) -> dict[str, Any]:
        """Plain dict for the CSV/JSON summary (paths as strings)."""
        return {
            "input": str(self.input),
            "status": self.status,
            "output": None if self.output is None else str(self.output),
            "probabilities": None if self.probabilities is None else str(self.probabilities),
            "overlay": None if self.overlay is None else str(self.overlay),
            "frames": None if self.frames is None else str(self.frames),
            "seconds": round(self.seconds, 3),
            "message": self.message,
            "volumes_ml": {k: round(v, 6) for k, v in self.volumes_ml.items()},
        }


def _innermost(exc: BaseException) -> BaseException:
    """The innermost cause of an exception (MONAI wraps them)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _one_line(exc: BaseException) -> str:
    """The innermost cause of an exception, as one line."""
    exc = _innermost(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def class_volumes(labels: np.ndarray, affine: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Volume in mL of each class of a label map, from the voxel size of ``affine``."""
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=len(class_names))
    ml = voxel_volume_ml(affine)
    return {name: float(counts[i]) * ml for i, name in enumerate(class_names)}


def checkpoint_task(ckpt: dict[str, Any]) -> str:
    """A checkpoint's task: its run config's ``task`` (or a top-level ``task`` key); absent = segmentation.

    Raises:
        ValueError: a task other than :data:`TASKS`.
    """
    config = ckpt.get("config")
    task = config.get("task") if isinstance(config, dict) else None
    if task is None:
        task = ckpt.get("task")
    task = "segmentation" if task is None else str(task)
    if task not in TASKS:
        raise ValueError(f"checkpoint task must be one of {list(TASKS)}, but got task={task!r}")
    return task


class Segmenter:
    """A checkpoint ready to segment (or restore) files: model on its device, transforms built.

    Args:
        checkpoint: path of a checkpoint written by :func:`app.models.save_checkpoint`.
        options: inference options.

    Raises:
        app.models.CheckpointError: the checkpoint cannot be loaded.
        ValueError: an option does not fit the checkpoint (ROI size, device).
    """

    def __init__(self, checkpoint: str | os.PathLike[str], options: InferenceOptions) -> None:
        self.checkpoint = Path(checkpoint)
        self.options = options
        ckpt = load_checkpoint(self.checkpoint)
        self.model_config: dict[str, Any] = ckpt["model_config"]
        self.class_names: list[str] = [str(c) for c in ckpt["class_names"]]
        self.spatial_dims = int(self.model_config.get("spatial_dims", 3))
        self.in_channels = int(self.model_config["in_channels"])
        self.task = checkpoint_task(ckpt)
        if self.task == "restoration" and int(self.model_config["out_channels"]) != self.in_channels:
            raise ValueError(
                f"{self.checkpoint}: a restoration network must give as many channels as it takes, but "
                f"in_channels={self.in_channels} and out_channels={self.model_config['out_channels']}"
            )
        self.preprocessing = checkpoint_preprocessing(ckpt["preprocessing"], in_channels=self.in_channels)
        self.roi = self._resolve_roi(options.roi)
        self.sw_device = resolve_device(options.device, option="--device")
        self.amp = resolve_amp(options.amp, self.sw_device, option="--amp")
        self.model = model_from_checkpoint(ckpt).to(self.sw_device)
        del ckpt
        self.transform = infer_transforms(self.preprocessing)
        self.invert_probabilities = build_inverter(self.transform, nearest=False)
        self.invert_labels = build_inverter(self.transform, nearest=True)

    def _resolve_roi(self, roi: Sequence[int] | None) -> tuple[int, ...]:
        source = "--roi"
        if roi is None:
            roi, source = self.model_config.get("patch_size"), "the checkpoint's patch_size"
        if roi is None:
            roi, source = FALLBACK_ROI[: self.spatial_dims], "the default ROI"
        size = tuple(int(r) for r in roi)
        if len(size) != self.spatial_dims or any(r < 1 for r in size):
            raise ValueError(f"ROI {list(size)} ({source}) must have {self.spatial_dims} positive sizes")
        if self.model_config.get("name") == "dynunet":
            try:
                check_patch_size(size, self.model_config["strides"])
            except ValueError as exc:
                raise ValueError(f"ROI from {source} does not fit the network: {exc}") from exc
        return size

    def window_settings(self, spatial_shape: Sequence[int]) -> WindowSettings:
        """Window settings for a volume of ``spatial_shape``: stitched on the CPU when it is too large for the GPU."""
        stitch = self.sw_device
        if stitch.type == "cuda":
            need = stitch_bytes(spatial_shape, self.in_channels, len(self.class_names))
            limit = self.options.stitch_threshold_bytes
            if limit is None:
                free, _ = torch.cuda.mem_get_info(stitch)
                limit = free // 2
            if self.options.stitch_on_cpu or need > limit:
                logger.debug("stitching on the CPU (%d bytes needed, limit %d)", need, limit)
                stitch = torch.device("cpu")
        return WindowSettings(
            roi_size=self.roi,
            overlap=self.options.overlap,
            sw_batch_size=self.options.sw_batch_size,
            tta=self.options.tta,
            amp=self.amp,
            sw_device=self.sw_device,
            device=stitch,
        )

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(K, *S)`` of a pre-processed ``(C, *S)`` volume; on CUDA out-of-memory while stitching
        on the GPU, retry stitching on the CPU."""
        spatial = tuple(image.shape[1:])
        settings = self.window_settings(spatial)
        try:
            return predict_logits(self.model, image, settings)
        except torch.cuda.OutOfMemoryError:
            if settings.device.type == "cpu":
                raise
        # Retried outside the except block, so the failed attempt's tensors are freed first.
        logger.warning(
            "out of GPU memory stitching %s voxels on %s; retrying with the output on the CPU",
            list(spatial),
            settings.device,
        )
        torch.cuda.empty_cache()
        return predict_logits(self.model, image, dataclasses.replace(settings, device=torch.device("cpu")))

    def _invert(self, inverter: Invertd, image: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Map ``pred (K, *S')`` back to the input grid ``(K, *S)``; on CUDA out-of-memory, redo it on the CPU."""
        try:
            out = inverter({"image": image, "pred": MetaTensor(pred)})["pred"]
            return out.as_tensor() if isinstance(out, MetaTensor) else out
        except torch.cuda.OutOfMemoryError:
            if pred.device.type == "cpu":
                raise
        logger.warning("out of GPU memory resampling the prediction back; retrying on the CPU")
        pred = pred.cpu()
        torch.cuda.empty_cache()
        out = inverter({"image": image, "pred": MetaTensor(pred)})["pred"]
        return out.as_tensor() if isinstance(out, MetaTensor) else out

    def check_input(self, path: Path) -> None:
        """Checks an input before any work: a clip (:meth:`check_clip`) or a NIfTI header (:meth:`check_header`).

        Raises:
            FileError: one line saying what is wrong.
        """
        if is_clip_input(path):
            self.check_clip(path)
            return
        if self.task != "segmentation":
            raise FileError(f"a {self.task} checkpoint takes clips (video files or frame folders), not NIfTI files")
        self.check_header(path)

    def check_clip(self, path: Path) -> None:
        """A clip's checks: it opens (not corrupt, truncated or empty), the model takes 1 or 3
        channels, and the checkpoint's pre-processing can be streamed (:func:`check_clip_preprocessing`).

        Raises:
            FileError: one line saying what is wrong.
        """
        read_channels(self.in_channels)
        check_clip_preprocessing(self.preprocessing)
        with open_source(path, self.options.folder_fps):
            pass

    def clip_outputs(self, path: Path, out_dir: Path) -> ClipOutputs:
        """The outputs of a clip in ``out_dir``: ``<name><suffix>.mp4`` (mask video; ``.mkv`` beyond 256
        classes) and ``<name><overlay_suffix>.mp4`` for segmentation, ``<name><restored_suffix>.mp4``
        for restoration, and with ``frames`` the PNG folder ``<name><suffix or restored_suffix>_frames``."""
        stem, opts = input_stem(path), self.options
        if self.task == "restoration":
            main = out_dir / f"{stem}{opts.restored_suffix}.mp4"
            frames = out_dir / f"{stem}{opts.restored_suffix}_frames" if opts.frames else None
            return ClipOutputs(main, None, frames)
        ext = ".mp4" if len(self.class_names) <= 256 else ".mkv"
        frames = out_dir / f"{stem}{opts.suffix}_frames" if opts.frames else None
        return ClipOutputs(out_dir / f"{stem}{opts.suffix}{ext}", out_dir / f"{stem}{opts.overlay_suffix}.mp4", frames)

    def process_clip(self, path: Path, outputs: ClipOutputs) -> None:
        """Segment or restore one clip, streamed window by window, and write its outputs.

        Raises:
            FileError: the clip cannot be processed (one-line reason); nothing is left behind.
        """
        with open_source(path, self.options.folder_fps) as source:
            job = ClipJob(
                source,
                self.preprocessing,
                self.in_channels,
                self.task,
                len(self.class_names),
                self.predict,
                self.window_settings,
            )
            job.run(outputs)

    def check_existing_clip(self, path: Path) -> None:
        """An existing clip output opens as a clip (frames folder: exists).

        Raises:
            FileError: it cannot be read.
        """
        try:
            with open_source(path):
                pass
        except FileError as exc:
            raise FileError(
                f"existing output {path.name} cannot be read ({exc}); use --overwrite to replace it"
            ) from exc

    def check_header(self, path: Path) -> nib.Nifti1Image:
        """The input's header, checked as training checks its data: readable, 3D or 3D + channels,
        voxel data as large as the header says (a 2000³ header on a 1 KB file fails here, not in a
        32 GB allocation), an invertible affine, the model's channel count.

        Raises:
            FileError: one line saying what is wrong.
        """
        try:
            read_header_info(path)
        except DataError as exc:
            raise FileError(str(exc).removeprefix(f"{path}: ")) from exc
        try:
            ref = nib.load(path)
        except Exception as exc:  # nibabel raises many types for unreadable files
            raise FileError(f"unreadable NIfTI ({_one_line(exc)})") from exc
        if not isinstance(ref, (nib.Nifti1Image, nib.Nifti2Image)):
            raise FileError(f"not a NIfTI image ({type(ref).__name__})")
        shape = ref.shape
        if len(shape) not in (self.spatial_dims, self.spatial_dims + 1):
            raise FileError(
                f"expected a {self.spatial_dims}D image or {self.spatial_dims}D + channels, "
                f"but got shape {tuple(shape)}"
            )
        channels = 1 if len(shape) == self.spatial_dims else shape[-1]
        if channels != self.in_channels:
            raise FileError(f"image has {channels} channel(s) but the model expects in_channels={self.in_channels}")
        return ref

    def segment(self, path: Path, out_path: Path, prob_path: Path | None) -> dict[str, float]:
        """Segment one file and write its outputs.

        Args:
            path: input NIfTI.
            out_path: label map to write.
            prob_path: probability map to write, or None.

        Returns:
            Class volumes in mL.

        Raises:
            FileError: the file cannot be segmented (one-line reason).
        """
        ref = self.check_header(path)
        try:
            data = self.transform({"image": str(path)})
        except Exception as exc:
            cause = _innermost(exc)
            if isinstance(cause, DataError):  # app.data's checks (NaN, channels) say "<path>: <problem>"
                raise FileError(str(cause).removeprefix(f"{path}: ")) from exc
            raise FileError(f"cannot load/pre-process ({_one_line(exc)})") from exc
        image = data["image"]
        spatial = tuple(image.shape[1:])
        if min(spatial) == 0:
            raise FileError("pre-processing left an empty volume (no foreground to crop?)")
        logits = self.predict(image)

        lab = logits.argmax(dim=0, keepdim=True).float() if self.options.resample == "labels" else None
        probs = None
        if lab is None or prob_path is not None:
            probs = torch.softmax(logits, dim=0)
            del logits
            probs = self._invert(self.invert_probabilities, image, probs)
            # Voxels outside a foreground crop come back as all-zero: they are background.
            probs[0] += (1.0 - probs.sum(dim=0)).clamp_(min=0.0)
        else:
            del logits
        if lab is None:
            assert probs is not None
            labels_t = probs.argmax(dim=0)
        else:
            labels_t = self._invert(self.invert_labels, image, lab)[0].round()
        labels = labels_t.to("cpu", torch.int64).numpy()
        if labels.shape != tuple(ref.shape[: self.spatial_dims]):
            raise FileError(f"internal error: inverted label map has shape {labels.shape}, input {ref.shape}")

        n_classes = len(self.class_names)
        write_like(labels, ref, out_path, np.uint8 if n_classes <= 256 else np.uint16)
        if prob_path is not None and probs is not None:
            write_probabilities(probs.movedim(0, -1).to("cpu").numpy(), ref, prob_path)
        return class_volumes(labels, ref.affine, self.class_names)

    def volumes_of(self, label_path: Path) -> dict[str, float]:
        """Class volumes (mL) of an existing label map.

        Raises:
            FileError: the label map cannot be read (damaged or not NIfTI).
        """
        try:
            img = cast(nib.Nifti1Image, nib.load(label_path))
            labels = np.asanyarray(img.dataobj).astype(np.int64)
        except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
            raise FileError(f"existing output {label_path.name} cannot be read ({_one_line(exc)}); "
                            "use --overwrite to replace it") from exc
        return class_volumes(labels, img.affine, self.class_names)


def infer_files(
    ckpt_path: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    **options: Any,
) -> list[Result]:
    """Segment NIfTI files with a checkpoint; one label map per input in ``out_dir``.

    Args:
        ckpt_path: checkpoint written by :func:`app.models.save_checkpoint`.
        inputs: NIfTI files, folders (their ``*.nii``/``*.nii.gz``) and glob patterns.
        out_dir: output folder (created if missing).
        **options: fields of :class:`InferenceOptions`.

    Returns:
        One :class:`Result` per input file (and per input argument that matched
        nothing), in input order. A bad file is a failed result, not an exception.

    Clips (video files, frame folders) go through :meth:`Segmenter.process_clip` instead (see
    :mod:`app.infer.video`); with a restoration checkpoint only clips are accepted.

    Every input header is checked, and the output folder is created and test-written, before
    the first file is segmented; nothing is created when an argument is refused. Each output is
    written atomically (a kill leaves complete outputs only); an input is skipped when every output
    it would get exists (the label map, and with ``save_probabilities`` the probability map), unless
    ``overwrite``. An existing summary is kept unless ``overwrite``.

    Raises:
        TypeError: unknown option.
        ValueError: invalid option values, or options that do not fit the checkpoint.
        app.models.CheckpointError: the checkpoint cannot be loaded.
        OutputError: the output folder (before any work) or the summary (after it, with the
            per-file results attached) cannot be written.
    """
    known = {f.name for f in dataclasses.fields(InferenceOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"infer_files() got unknown options {unknown}; allowed: {sorted(known)}")
    opts = InferenceOptions(**options)
    out = Path(out_dir)
    segmenter = Segmenter(ckpt_path, opts)
    files, problems = collect_inputs(inputs, exclude_dir=out, exclude_suffix=opts.output_suffixes)
    _prepare_output_folder(out)

    task = segmenter.task
    results: list[Result] = [Result(input=p, status="failed", message=reason, task=task) for p, reason in problems]
    for p, reason in problems:
        logger.warning("%s: %s", p, reason)
    usable = []
    for path in files:  # every header checked before the first file is segmented
        try:
            segmenter.check_input(path)
        except FileError as exc:
            logger.warning("%s: %s", path, exc)
            results.append(Result(input=path, status="failed", message=str(exc), task=task))
            continue
        usable.append(path)
    if opts.save_probabilities and any(is_clip_input(p) for p in usable):
        logger.warning("--save-probabilities applies to NIfTI inputs only; clips get no probability output")
    claimed: dict[Path, Path] = {}
    for path in tqdm(usable, desc="segmenting", unit="file", disable=not opts.progress):
        results.append(_run_one(segmenter, path, out, opts, claimed))
    order = {p: i for i, p in enumerate([p for p, _ in problems] + files)}
    results.sort(key=lambda r: order.get(r.input, len(order)))

    if opts.summary:
        meta = {
            "checkpoint": str(segmenter.checkpoint),
            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()},
            "task": segmenter.task,
            "roi": list(segmenter.roi),
            "device": str(segmenter.sw_device),
            "amp": segmenter.amp,
            "versions": {"torch": torch.__version__, "monai": monai.__version__, "nibabel": nib.__version__},
        }
        kept = [p for p in (out / f"{opts.summary}.csv", out / f"{opts.summary}.json") if p.exists()]
        if kept and not opts.overwrite:
            logger.warning("%s exists; kept (use --overwrite to replace the summary)", kept[0])
        else:
            try:
                write_summary((r.to_row() for r in results), segmenter.class_names, out, opts.summary, meta)
            except OSError as exc:
                raise OutputError(f"{out}: cannot write the summary ({exc.strerror or exc})", results) from exc
    return results


def _prepare_output_folder(out: Path) -> None:
    """Create the output folder and check that a file can be written there, before any work.

    A folder this function created is removed again when the check fails.

    Raises:
        OutputError: one line naming the folder.
    """
    missing = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing.append(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / ".stochprop-write-check") as tmp:
            tmp.write_bytes(b"")
        (out / ".stochprop-write-check").unlink()
    except OSError as exc:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break
        raise OutputError(f"{out}: output folder cannot be written ({exc.strerror or exc})") from exc


def _run_one(
    segmenter: Segmenter, path: Path, out_dir: Path, opts: InferenceOptions, claimed: dict[Path, Path]
) -> Result:
    if is_clip_input(path):
        return _run_clip(segmenter, path, out_dir, opts, claimed)
    start = time.perf_counter()
    out_path = output_path(path, out_dir, opts.suffix)
    prob_path = output_path(path, out_dir, opts.probability_suffix) if opts.save_probabilities else None
    key = out_path.resolve()
    if key in claimed:
        msg = f"output {out_path.name} would collide with that of {claimed[key]}"
        logger.warning("%s: %s", path, msg)
        return Result(input=path, status="failed", output=None, message=msg)
    claimed[key] = path
    if key == path.resolve():
        msg = "output would replace the input (empty suffix and output folder = input folder)"
        logger.warning("%s: %s", path, msg)
        return Result(input=path, status="failed", message=msg)
    outputs = [out_path] + ([prob_path] if prob_path is not None else [])
    if out_path.exists() and not opts.overwrite and all(p.exists() for p in outputs):
        try:
            volumes = segmenter.volumes_of(out_path)
        except FileError as exc:
            logger.warning("%s: %s", path, exc)
            return Result(input=path, status="failed", output=None, message=str(exc))
        msg = f"{out_path} exists; kept (use --overwrite to replace it)" if prob_path is None else (
            f"{out_path} and {prob_path.name} exist; kept (use --overwrite to replace them)")
        logger.info("%s: skipped, %s", path, msg)
        return Result(input=path, status="skipped", output=out_path, message=msg, volumes_ml=volumes)
    try:
        volumes = segmenter.segment(path, out_path, prob_path)
    except FileError as exc:
        logger.warning("%s: %s", path, exc)
        return Result(input=path, status="failed", message=str(exc), seconds=time.perf_counter() - start)
    except (RuntimeError, ValueError, OSError, MemoryError) as exc:
        msg = _one_line(exc)
        logger.warning("%s: %s", path, msg)
        return Result(input=path, status="failed", message=msg, seconds=time.perf_counter() - start)
    return Result(
        input=path,
        status="ok",
        output=out_path,
        probabilities=prob_path,
        seconds=time.perf_counter() - start,
        volumes_ml=volumes,
    )


def _run_clip(
    segmenter: Segmenter, path: Path, out_dir: Path, opts: InferenceOptions, claimed: dict[Path, Path]
) -> Result:
    """One clip: the same collision, skip and failure rules as a NIfTI file, for every output of the clip."""
    start = time.perf_counter()
    task = segmenter.task
    outputs = segmenter.clip_outputs(path, out_dir)
    for out_path in outputs.paths:
        key = out_path.resolve()
        if key in claimed:
            msg = f"output {out_path.name} would collide with that of {claimed[key]}"
            logger.warning("%s: %s", path, msg)
            return Result(input=path, status="failed", message=msg, task=task)
        if key == path.resolve():
            msg = f"output {out_path.name} would replace the input"
            logger.warning("%s: %s", path, msg)
            return Result(input=path, status="failed", message=msg, task=task)
    for out_path in outputs.paths:
        claimed[out_path.resolve()] = path
    done = dict(input=path, output=outputs.main, overlay=outputs.overlay, frames=outputs.frames, task=task)
    if not opts.overwrite and all(p.exists() for p in outputs.paths):
        try:
            segmenter.check_existing_clip(outputs.main)
        except FileError as exc:
            logger.warning("%s: %s", path, exc)
            return Result(input=path, status="failed", message=str(exc), task=task)
        names = " and ".join(p.name for p in outputs.paths)
        msg = (f"{names} exists; kept (use --overwrite to replace it)" if len(outputs.paths) == 1
               else f"{names} exist; kept (use --overwrite to replace them)")
        logger.info("%s: skipped, %s", path, msg)
        return Result(status="skipped", message=msg, **done)  # type: ignore[arg-type]
    try:
        segmenter.process_clip(path, outputs)
    except FileError as exc:
        logger.warning("%s: %s", path, exc)
        return Result(input=path, status="failed", message=str(exc), seconds=time.perf_counter() - start, task=task)
    except (RuntimeError, ValueError, OSError, MemoryError) as exc:
        msg = _one_line(exc)
        logger.warning("%s: %s", path, msg)
        return Result(input=path, status="failed", message=msg, seconds=time.perf_counter() - start, task=task)
    return Result(status="ok", seconds=time.perf_counter() - start, **done)  # type: ignore[arg-type]
