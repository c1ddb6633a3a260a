"""Video inference: segment or restore a clip (video file or frame folder) window by window.

A clip is a ``(C, T, H, W)`` volume with time as the first spatial axis, as in training
(:class:`app.data.video.VideoReader`: identity affine, so orientation ``RAS`` and spacing 1 leave
it as it is). It is never decoded whole:

1. one pass over the clip, in chunks, gathers what the checkpoint's pre-processing needs from
   the whole clip (the foreground box of ``crop_foreground``, the channel statistics of
   ``zscore``; :func:`plan_clip`);
2. :func:`app.infer.predict.stream_logits` then reads slabs one window deep along time, pre-processes
   them, runs the sliding window over each and hands back finished frames in order, which are
   written at once (:class:`ClipJob`).

Outputs, each written atomically (a temporary file renamed into place when complete):
segmentation gives a lossless mask video (grey value = class id), an overlay video (the
frames the model saw with a coloured layer per class) and, on request, one PNG mask per
frame; restoration gives the restored clip (and, on request, one PNG per frame).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from monai.transforms import NormalizeIntensity, ScaleIntensityRange
from PIL import Image

from app.data.errors import DataError
from app.data.transforms import Preprocessing
from app.data.video import ClipSource, is_clip, open_clip
from app.infer.files import FileError, atomic_folder
from app.infer.predict import WindowSettings, stream_logits
from app.utils import atomic_path

__all__ = [
    "OVERLAY_ALPHA",
    "PALETTE",
    "ClipJob",
    "ClipOutputs",
    "ClipPlan",
    "check_clip_preprocessing",
    "is_clip_input",
    "open_source",
    "overlay_frames",
    "plan_clip",
    "read_channels",
]

OVERLAY_ALPHA = 0.5
"""Opacity of the class colours over the frames in overlay videos."""
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    ],
    dtype=np.float32,
)
"""Overlay colours of classes 1, 2, ... (repeating after ten); background is left uncoloured."""
READ_CHUNK_BYTES = 256 * 1024**2
"""Frames read at once by the planning pass and for frames outside the foreground box: this much float32."""
MASK_CLASSES_8BIT = 256
"""Class counts up to this are written as 8-bit mask videos (mp4); more as 16-bit (mkv, FFV1)."""


def is_clip_input(path: Path) -> bool:
    """Whether an input is a clip (video file or frame folder) rather than a NIfTI file."""
    return is_clip(path)


def read_channels(in_channels: int) -> bool:
    """Whether clips are read in grey (``True``: one channel) or colour for a model's ``in_channels``.

    Raises:
        FileError: a model that takes neither 1 (grey) nor 3 (RGB) channels.
    """
    if in_channels not in (1, 3):
        raise FileError(
            f"clips are read as 1 (grey) or 3 (RGB) channels, but the model expects in_channels={in_channels}"
        )
    return in_channels == 1


def check_clip_preprocessing(pre: Preprocessing) -> None:
    """Refuses pre-processing that a clip cannot be streamed through.

    A clip's affine is the identity: orientation ``RAS`` and spacing 1 are no-ops, which is what
    training on clips sees; anything else would reorder, flip or resample time.

    Raises:
        FileError: orientation other than ``RAS``/None or spacing other than 1/None.
    """
    if pre.orientation not in (None, "RAS"):
        raise FileError(
            f"the checkpoint reorients inputs to {pre.orientation!r}; clips (identity affine) need orientation "
            "RAS or null"
        )
    if pre.spacing is not None and any(s != 1.0 for s in pre.spacing):
        raise FileError(
            f"the checkpoint resamples inputs to spacing {list(pre.spacing)}; clips are read at one frame and one "
            "pixel per unit and need spacing null or [1, 1, 1]"
        )


def open_source(path: Path, fps: float | None = None) -> ClipSource:
    """:func:`app.data.video.open_clip` (``fps``: a frame folder's rate), its one-line error as a :class:`FileError`."""
    try:
        return open_clip(path, fps=fps)
    except DataError as exc:
        raise FileError(str(exc).removeprefix(f"{path}: ")) from exc


@dataclass(frozen=True)
class ClipOutputs:
    """Where one clip's outputs go.

    Attributes:
        main: the mask video (segmentation) or the restored clip (restoration).
        overlay: the overlay video (segmentation only).
        frames: folder of per-frame PNGs, or None.
    """

    main: Path
    overlay: Path | None = None
    frames: Path | None = None

    @property
    def paths(self) -> list[Path]:
        """Every output path, main first."""
        return [p for p in (self.main, self.overlay, self.frames) if p is not None]


@dataclass(frozen=True)
class ClipPlan:
    """What pre-processing needs from the whole clip.

    Attributes:
        box: ``(time, rows, columns)`` slices of the foreground box (the whole clip without
            ``crop_foreground``).
        subtrahend: per-channel mean of the non-zero values in the box (``zscore`` only).
        divisor: per-channel standard deviation of the same (0 replaced by 1; ``zscore`` only).
    """

    box: tuple[slice, slice, slice]
    subtrahend: tuple[float, ...] | None = None
    divisor: tuple[float, ...] | None = None

    @property
    def box_shape(self) -> tuple[int, int, int]:
        """``(T', H', W')`` of the box."""
        return tuple(s.stop - s.start for s in self.box)  # type: ignore[return-value]


def _chunk_frames(source: ClipSource, channels: int) -> int:
    """Frames per read so that one read holds about :data:`READ_CHUNK_BYTES` of float32."""
    per_frame = 4 * channels * source.height * source.width
    return max(1, min(source.n_frames, READ_CHUNK_BYTES // per_frame))


def _read(source: ClipSource, start: int, count: int, grey: bool, channels: int) -> np.ndarray:
    """``(channels, count, H, W)`` float32 frames; a grey source read for a colour model gives three equal channels.

    Raises:
        FileError: the frames do not decode (damaged or truncated file, unreadable image).
    """
    try:
        frames = source.read(start, count, grey=grey)
    except DataError as exc:
        raise FileError(str(exc).removeprefix(f"{source.path}: ")) from exc
    if frames.shape[1] != count:
        raise FileError(f"frames {start}..{start + count - 1} gave {frames.shape[1]} frame(s)")
    if frames.shape[0] != channels:
        frames = np.repeat(frames, channels, axis=0)
    return frames


def _intensity_scaler(pre: Preprocessing) -> ScaleIntensityRange | None:
    """The ``ct`` window as training applies it (the same MONAI transform), else None."""
    if pre.intensity != "ct":
        return None
    low, high = pre.ct_window
    return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)


def plan_clip(source: ClipSource, pre: Preprocessing, grey: bool, channels: int) -> ClipPlan:
    """One pass over the clip, in chunks: the foreground box and the z-score statistics.

    The box is that of ``CropForegroundd`` with training's selection (voxels above the clip's
    minimum, any channel), taken after the ``ct`` window and before z-scoring, as in
    :func:`app.data.transforms.preprocessing_transforms`. The statistics are those
    ``NormalizeIntensityd(nonzero=True, channel_wise=True)`` takes over the box: mean and
    population standard deviation of the non-zero values, accumulated in float64 about a
    per-channel shift. Outside the box every value equals the minimum, so its share is
    subtracted from whole-frame sums instead of reading the clip twice.

    Args:
        source: the clip.
        pre: the checkpoint's pre-processing.
        grey: read in grey.
        channels: channels the model takes.

    Returns:
        The plan; the whole clip and no statistics when neither is needed (no pass is made).

    Raises:
        FileError: unreadable frames, or no foreground (a constant clip).
    """
    t_len, height, width = source.shape
    whole = (slice(0, t_len), slice(0, height), slice(0, width))
    need_box, need_stats = pre.crop_foreground, pre.intensity == "zscore"
    if not (need_box or need_stats):
        return ClipPlan(whole)
    scaler = _intensity_scaler(pre)
    frame_min = np.empty(t_len, np.float32)
    row_max = np.empty((t_len, height), np.float32)
    col_max = np.empty((t_len, width), np.float32)
    shift = np.full(channels, np.nan)
    sums, squares, counts = np.zeros(channels), np.zeros(channels), np.zeros(channels, np.int64)
    step = _chunk_frames(source, channels)
    for start in range(0, t_len, step):
        count = min(step, t_len - start)
        raw = _read(source, start, count, grey, channels)
        if need_box:
            values = raw if scaler is None else np.asarray(scaler(torch.from_numpy(raw)))
            top = values.max(axis=0)  # (n, H, W): any channel above the minimum counts
            frame_min[start : start + count] = values.min(axis=(0, 2, 3))
            row_max[start : start + count] = top.max(axis=2)
            col_max[start : start + count] = top.max(axis=1)
        if need_stats:
            for c in range(channels):
                nonzero = raw[c][raw[c] != 0].astype(np.float64)
                if nonzero.size == 0:
                    continue
                if np.isnan(shift[c]):
                    shift[c] = nonzero.mean()
                d = nonzero - shift[c]
                sums[c] += d.sum()
                squares[c] += np.dot(d, d)
                counts[c] += d.size
    box = whole
    if need_box:
        low = float(frame_min.min())
        rows, cols = row_max > low, col_max > low
        frames = rows.any(axis=1)
        if not frames.any():
            raise FileError("pre-processing left an empty volume (no foreground to crop: the clip is constant)")
        box = tuple(
            slice(int(idx[0]), int(idx[-1]) + 1)
            for idx in (np.flatnonzero(frames), np.flatnonzero(rows.any(axis=0)), np.flatnonzero(cols.any(axis=0)))
        )  # type: ignore[assignment]
        outside = t_len * height * width - math.prod(s.stop - s.start for s in box)
        if need_stats and outside and low != 0.0:  # every channel of every voxel outside the box is `low`
            for c in range(channels):
                if counts[c] == 0:
                    continue
                d = low - shift[c]
                sums[c] -= outside * d
                squares[c] -= outside * d * d
                counts[c] -= outside
    if not need_stats:
        return ClipPlan(box)
    means, stds = [], []
    for c in range(channels):
        if counts[c] == 0:  # nothing to normalise in this channel
            means.append(0.0)
            stds.append(1.0)
            continue
        m = sums[c] / counts[c]
        std = math.sqrt(max(squares[c] / counts[c] - m * m, 0.0))
        means.append(float(shift[c] + m))
        stds.append(std if std > 0.0 else 1.0)
    return ClipPlan(box, tuple(means), tuple(stds))


def overlay_frames(frames: np.ndarray, labels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Frames with each class but background tinted in its :data:`PALETTE` colour.

    Args:
        frames: ``(C, n, H, W)`` float in [0, 1], C = 1 (shown in grey) or 3 (RGB).
        labels: ``(n, H, W)`` class ids.
        alpha: opacity of the colour.

    Returns:
        ``(n, H, W, 3)`` uint8.
    """
    rgb = np.moveaxis(frames if frames.shape[0] == 3 else np.repeat(frames, 3, axis=0), 0, -1) * 255.0
    fg = labels > 0
    colours = PALETTE[(labels[fg].astype(np.int64) - 1) % len(PALETTE)]
    rgb[fg] = (1.0 - alpha) * rgb[fg] + alpha * colours
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    """``(C, n, H, W)`` in [0, 1] -> ``(n, H, W)`` (grey) or ``(n, H, W, 3)`` uint8."""
    out = np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)
    return out[0] if out.shape[0] == 1 else np.ascontiguousarray(np.moveaxis(out, 0, -1))


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except (av.error.FFmpegError, ValueError):
        return False
    return True


class _VideoSink:
    """Frames appended in order to one video file, opened on a temporary path.

    Kinds: ``"mask"`` (grey class ids, exact: H.264 lossless, full-range 4:4:4, in mp4; 16-bit
    FFV1 in mkv), ``"grey"`` (exact, as ``"mask"``), ``"rgb"`` (H.264 at qp 0 in 4:4:4, at most a
    couple of levels off after the YUV round trip) and ``"view"`` (H.264 at crf 18 for viewing,
    4:2:0 where the frame size allows, else 4:4:4). Without libx264 (a PyAV build without it),
    MPEG-4 part 2 is used, which is not lossless.
    """

    def __init__(self, path: Path, kind: str, fps: float, height: int, width: int) -> None:
        fmt, pix_fmt, options = {
            "mask": ("gray", "yuvj444p", {"qp": "0"}),
            "mask16": ("gray16le", "gray16le", {}),
            "grey": ("gray", "yuvj444p", {"qp": "0"}),
            "rgb": ("rgb24", "yuv444p", {"qp": "0"}),
            "view": ("rgb24", "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p", {"crf": "18"}),
        }[kind]
        codec = "ffv1" if kind == "mask16" else "libx264"
        if codec == "libx264" and not _has_encoder(codec):
            codec, pix_fmt, options = "mpeg4", "yuv420p", {"qscale": "1"}
        self.format = fmt
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(codec, rate=Fraction(float(fps)).limit_denominator(1001))
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = pix_fmt
        self.stream.options = options
        self.count = 0

    def write(self, frames: np.ndarray) -> None:
        """Appends ``(n, H, W)`` or ``(n, H, W, 3)`` frames of the sink's pixel format."""
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=self.format)
            frame.pts = self.count
            self.container.mux(self.stream.encode(frame))
            self.count += 1

    def finish(self) -> None:
        """Flushes the encoder (the file is complete once closed)."""
        self.container.mux(self.stream.encode(None))

    def close(self) -> None:
        self.container.close()


class _PngSink:
    """One PNG per frame in a folder: ``000000.png``, ``000001.png``, ... (8-bit, or 16-bit grey)."""

    def __init__(self, folder: Path, n_frames: int) -> None:
        self.folder = folder
        self.digits = max(6, len(str(n_frames - 1)))
        self.count = 0

    def write(self, frames: np.ndarray) -> None:
        """Appends ``(n, H, W)`` uint8/uint16 or ``(n, H, W, 3)`` uint8 frames."""
        for array in frames:
            Image.fromarray(np.ascontiguousarray(array)).save(self.folder / f"{self.count:0{self.digits}d}.png")
            self.count += 1


class ClipJob:
    """One clip through a checkpoint: plan, stream, write.

    Args:
        source: the opened clip.
        pre: the checkpoint's pre-processing (checked with :func:`check_clip_preprocessing`).
        in_channels: the model's input channels (1: grey, 3: RGB).
        task: ``"segmentation"`` or ``"restoration"``.
        n_classes: output channels of a segmentation model (class count).
        predict: ``(C, d, h, w) -> (K, d, h, w)`` sliding-window prediction of one slab.
        settings: the window settings for a slab's shape ``(d, h, w)`` (ROI, overlap, devices).
    """

    def __init__(
        self,
        source: ClipSource,
        pre: Preprocessing,
        in_channels: int,
        task: str,
        n_classes: int,
        predict: Callable[[torch.Tensor], torch.Tensor],
        settings: Callable[[Sequence[int]], WindowSettings],
    ) -> None:
        check_clip_preprocessing(pre)
        self.source = source
        self.pre = pre
        self.grey = read_channels(in_channels)
        self.channels = in_channels
        self.task = task
        self.n_classes = n_classes
        self.predict = predict
        self.settings = settings
        self.scaler = _intensity_scaler(pre)
        self._cache: np.ndarray | None = None  # raw frames [self._lo, self._lo + n) of the clip
        self._lo = 0

    def _frames(self, start: int, count: int) -> np.ndarray:
        """Raw frames ``[start, start + count)``, ``(C, count, H, W)``: reads only those not read yet.

        Calls ask for non-decreasing ``start``; frames before ``start`` are dropped.
        """
        cache, lo = self._cache, self._lo
        if cache is None or start >= lo + cache.shape[1]:
            cache, lo = _read(self.source, start, count, self.grey, self.channels), start
        else:
            cache = cache[:, start - lo :]
            have = cache.shape[1]
            if have < count:
                cache = np.concatenate(
                    [cache, _read(self.source, start + have, count - have, self.grey, self.channels)], axis=1
                )
            lo = start
        self._cache, self._lo = cache, lo
        return cache[:, :count]

    def _normaliser(self, plan: ClipPlan) -> Callable[[torch.Tensor], torch.Tensor]:
        """The intensity step of training's chain, element-wise with the whole clip's statistics."""
        if self.scaler is not None:
            scaler = self.scaler
            return lambda x: torch.as_tensor(scaler(x))
        if plan.subtrahend is not None:
            norm = NormalizeIntensity(
                subtrahend=list(plan.subtrahend), divisor=list(plan.divisor or ()), nonzero=True, channel_wise=True
            )
            return lambda x: torch.as_tensor(norm(x))
        return lambda x: x

    def _denormaliser(self, plan: ClipPlan) -> Callable[[np.ndarray], np.ndarray]:
        """Maps a restoration output from the model's intensities back to the clip's [0, 1]."""
        if self.pre.intensity == "ct":
            low, high = self.pre.ct_window
            return lambda y: y * (high - low) + low
        if plan.subtrahend is not None:
            sub = np.asarray(plan.subtrahend, np.float32)[:, None, None, None]
            div = np.asarray(plan.divisor, np.float32)[:, None, None, None]
            return lambda y: y * div + sub
        return lambda y: y

    def run(self, outputs: ClipOutputs) -> None:
        """Writes every output of the clip, each atomically.

        Raises:
            FileError: unreadable frames or no foreground; no output is left behind.
        """
        source = self.source
        t_len, height, width = source.shape
        plan = plan_clip(source, self.pre, self.grey, self.channels)
        box_t, box_h, box_w = plan.box
        normalise, denormalise = self._normaliser(plan), self._denormaliser(plan)
        depth = min(int(self.settings(plan.box_shape).roi_size[0]), plan.box_shape[0])
        settings = self.settings((depth, *plan.box_shape[1:]))  # where one slab's windows run and are stitched
        mask16 = self.n_classes > MASK_CLASSES_8BIT
        with contextlib.ExitStack() as stack:
            sinks: list[tuple[str, Any]] = []

            def video(path: Path, kind: str) -> None:
                tmp = stack.enter_context(atomic_path(path, suffix=path.suffix))
                sink = _VideoSink(tmp, kind, source.fps, height, width)
                stack.callback(sink.close)
                sinks.append((kind, sink))

            if self.task == "segmentation":
                video(outputs.main, "mask16" if mask16 else "mask")
                if outputs.overlay is not None:
                    video(outputs.overlay, "view")
            else:
                video(outputs.main, "grey" if self.channels == 1 else "rgb")
            if outputs.frames is not None:
                folder = stack.enter_context(atomic_folder(outputs.frames))
                sinks.append(("png", _PngSink(folder, t_len)))

            def emit(start: int, raw: np.ndarray, result: np.ndarray | None) -> None:
                """Writes frames ``start ...``: ``result`` is the box's labels or restored values, None outside it."""
                n = raw.shape[1]
                if self.task == "segmentation":
                    labels = np.zeros((n, height, width), np.uint16 if mask16 else np.uint8)
                    if result is not None:
                        labels[:, box_h, box_w] = result
                    for kind, sink in sinks:
                        sink.write(overlay_frames(raw, labels) if kind == "view" else labels)
                else:
                    frames = raw.copy()
                    if result is not None:
                        frames[:, :, box_h, box_w] = result
                    data = _to_uint8(frames)
                    for _, sink in sinks:
                        sink.write(data)

            step = _chunk_frames(source, self.channels)
            for start in range(0, box_t.start, step):  # frames before the box: background / as they are
                count = min(step, box_t.start - start)
                emit(start, self._frames(start, count), None)

            def read(start: int, count: int) -> torch.Tensor:
                raw = self._frames(box_t.start + start, count)
                # A copy: the intensity step may work in place, and the raw frames are still to be written.
                return normalise(torch.from_numpy(raw[:, :, box_h, box_w].copy()))

            for start, out in stream_logits(self.predict, read, plan.box_shape[0], settings):
                n = out.shape[1]
                raw = self._frames(box_t.start + start, n)
                if self.task == "segmentation":
                    result = out.argmax(dim=0).to("cpu").numpy()
                else:
                    result = denormalise(out.to("cpu", torch.float32).numpy())
                emit(box_t.start + start, raw, result)
            for start in range(box_t.stop, t_len, step):  # frames after the box
                count = min(step, t_len - start)
                emit(start, self._frames(start, count), None)
            for kind, sink in sinks:
                if isinstance(sink, _VideoSink):
                    sink.finish()
                if sink.count != t_len:
                    raise FileError(f"internal error: wrote {sink.count} frames of {t_len}")
