"""Video clips as 3D volumes (T, H, W), on PyAV.

A clip is segmented like any volume: the time axis plays the part of the first spatial axis.
:class:`VideoReader` lets MONAI's ``LoadImage(d)`` read clips as channel-first ``(1, T, H, W)``
(``(3, T, H, W)`` in colour) arrays with an identity affine; their labels are ``(T, H, W)`` NIfTI
files with an identity affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Union

import av
import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple

from app.data.errors import DataError, data_error
from app.data.nifti import VolumeInfo, save_nifti
from app.data.synthetic import bias_field, claim_dataset_root, decathlon_items, finish_dataset_root, nifti_image

__all__ = [
    "VIDEO_SUFFIXES",
    "VideoReader",
    "is_video",
    "make_synthetic_video_dataset",
    "read_video_info",
    "read_video_volume",
    "write_video",
]

PathLikeStr = Union[str, "PathLike[str]"]

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mkv")
# Tried in order per container; the first that opens wins. libx264 with qp=0 and 4:4:4 chroma is
# close to lossless (at most 1 grey level off after the YUV round trip) and accepts odd sizes;
# ffv1 is lossless but not every player reads it from .mp4; mpeg4 is the last resort.
_CODECS: dict[str, tuple[tuple[str, str, str, dict[str, str]], ...]] = {
    # suffix: ((codec, grey pix_fmt, colour pix_fmt, options), ...)
    ".mp4": (("libx264", "yuv444p", "yuv444p", {"qp": "0"}), ("mpeg4", "yuv420p", "yuv420p", {"qscale": "1"})),
    ".mkv": (("ffv1", "gray", "yuv444p", {}), ("libx264", "yuv444p", "yuv444p", {"qp": "0"})),
    ".avi": (("ffv1", "gray", "yuv444p", {}), ("mpeg4", "yuv420p", "yuv420p", {"qscale": "1"})),
}
_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError)


def is_video(path: PathLikeStr) -> bool:
    """Whether the file name ends in one of :data:`VIDEO_SUFFIXES` (case-insensitive)."""
    return str(path).lower().endswith(VIDEO_SUFFIXES)


def read_video_info(path: PathLikeStr) -> VolumeInfo:
    """Probes a clip: ``shape=(T, H, W)``, one channel (grey, as read by default), identity affine.

    The frame count comes from the container header where it has one (mp4, avi), else the
    frames are decoded and counted (mkv).

    Raises:
        DataError: missing file, not decodable, no video stream, or no frames.
    """
    p = Path(path)
    if not p.is_file():
        raise data_error(p, "file not found")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise data_error(p, "no video stream in the file")
            stream = container.streams.video[0]
            height, width = int(stream.codec_context.height), int(stream.codec_context.width)
            n_frames = int(stream.frames or 0)
            if n_frames == 0:
                n_frames = sum(1 for _ in container.decode(stream))
    except _AV_ERRORS as e:
        raise data_error(p, f"cannot decode video ({type(e).__name__}: {e})") from e
    if n_frames == 0 or height == 0 or width == 0:
        raise data_error(p, f"video has no frames (frames={n_frames}, size={height}x{width})")
    return VolumeInfo(p, (n_frames, height, width), 1, np.eye(4), (1.0, 1.0, 1.0), "uint8")


def read_video_volume(
    path: PathLikeStr,
    *,
    grayscale: bool = True,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Decodes a clip into a float32 volume with values in [0, 1].

    Args:
        path: ``.mp4`` / ``.avi`` / ``.mkv`` (anything FFmpeg decodes).
        grayscale: luma only (default) or RGB.
        size: optional ``(H, W)`` to rescale every frame to.
        max_frames: keep at most this many frames from the start.

    Returns:
        ``(T, H, W)`` if ``grayscale`` else ``(3, T, H, W)``, float32 in [0, 1].

    Raises:
        DataError: naming the file, if it cannot be opened or decoded or has no frames.
    """
    p = Path(path)
    if not p.is_file():
        raise data_error(p, "file not found")
    fmt = "gray" if grayscale else "rgb24"
    frames: list[np.ndarray] = []
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise data_error(p, "no video stream in the file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if size is not None:
                    frame = frame.reformat(width=int(size[1]), height=int(size[0]))
                frames.append(frame.to_ndarray(format=fmt))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except DataError:
        raise
    except _AV_ERRORS as e:
        raise data_error(p, f"cannot decode video ({type(e).__name__}: {e})") from e
    if not frames:
        raise data_error(p, "video has no frames")
    volume = np.stack(frames).astype(np.float32) / 255.0  # (T, H, W) or (T, H, W, 3)
    if not grayscale:
        volume = np.ascontiguousarray(np.moveaxis(volume, -1, 0))  # (3, T, H, W)
    return volume


def _to_uint8(volume: np.ndarray) -> np.ndarray:
    if volume.dtype == np.uint8:
        return volume
    if np.issubdtype(volume.dtype, np.floating):
        return np.round(np.clip(volume, 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(volume.dtype, np.integer) or volume.dtype == np.bool_:
        return np.clip(volume, 0, 255).astype(np.uint8)
    raise TypeError(f"volume dtype must be float in [0, 1] or integer in [0, 255], got {volume.dtype}")


def _encode(path: Path, frames: np.ndarray, fmt: str, fps: int, codec: str, pix_fmt: str, options: dict) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = pix_fmt
        stream.options = dict(options)
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=fmt)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_video(path: PathLikeStr, volume: Any, fps: int = 10, codec: str | None = None) -> Path:
    """Writes a volume as a clip, trying codecs PyAV ships until one opens.

    Args:
        path: ``.mp4``, ``.avi`` or ``.mkv``; folders are created.
        volume: ``(T, H, W)`` grey or ``(3, T, H, W)`` RGB; float in [0, 1] (clipped) or uint8.
            Numpy array or torch tensor.
        fps: frame rate.
        codec: force one FFmpeg encoder (e.g. ``"mpeg4"``); default: per container, see ``_CODECS``.

    Returns:
        ``path`` as a Path.

    Raises:
        DataError: unsupported suffix, bad shape, or no codec could encode the clip.
    """
    p = Path(path)
    suffix = next((s for s in VIDEO_SUFFIXES if p.name.lower().endswith(s)), None)
    if suffix is None:
        raise data_error(p, f"video name must end in one of {VIDEO_SUFFIXES}")
    if hasattr(volume, "detach"):
        volume = volume.detach().cpu().numpy()
    array = _to_uint8(np.asarray(volume))
    if array.ndim == 3:
        frames, fmt = array, "gray"
    elif array.ndim == 4 and array.shape[0] == 3:
        frames, fmt = np.moveaxis(array, 0, -1), "rgb24"  # (T, H, W, 3)
    else:
        raise data_error(p, f"volume shape {array.shape} is neither (T, H, W) nor (3, T, H, W)")
    if frames.shape[0] < 1 or min(frames.shape[1:3]) < 2:
        raise data_error(p, f"volume shape {array.shape} has no frames or frames smaller than 2x2")
    p.parent.mkdir(parents=True, exist_ok=True)
    candidates = _CODECS[suffix]
    if codec is not None:
        candidates = tuple(c for c in candidates if c[0] == codec) or ((codec, "yuv420p", "yuv420p", {}),)
    errors = []
    for name, grey_pix, colour_pix, options in candidates:
        try:
            _encode(p, frames, fmt, fps, name, grey_pix if fmt == "gray" else colour_pix, options)
            return p
        except _AV_ERRORS as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")
    p.unlink(missing_ok=True)
    raise data_error(p, f"no codec could write the clip ({'; '.join(errors)})")


class VideoReader(ImageReader):
    """MONAI image reader for clips: ``LoadImage(reader=VideoReader())`` / ``LoadImaged``.

    Produces ``(T, H, W)`` (no channel; ``EnsureChannelFirst`` adds it) or, in colour, ``(3, T, H, W)``
    with ``original_channel_dim=0``; affine identity (1 unit per frame / pixel, RAS), so
    orientation and spacing transforms leave the clip as it is. Several files are stacked as channels.

    Args:
        grayscale: luma only (one channel) or RGB (three).
        size: optional ``(H, W)`` to rescale frames to.
        max_frames: keep at most this many frames.
    """

    def __init__(self, grayscale: bool = True, size: tuple[int, int] | None = None, max_frames: int | None = None):
        super().__init__()
        self.grayscale = grayscale
        self.size = size
        self.max_frames = max_frames

    def verify_suffix(self, filename: Sequence[PathLikeStr] | PathLikeStr) -> bool:
        """True when every given name is a video (``.mp4`` / ``.avi`` / ``.mkv``)."""
        names = ensure_tuple(filename)
        return len(names) > 0 and all(is_video(n) for n in names)

    def read(self, data: Sequence[PathLikeStr] | PathLikeStr, **kwargs: Any) -> list[tuple[str, np.ndarray]]:
        """Decodes each clip with :func:`read_video_volume`; returns ``[(path, volume), ...]``."""
        return [
            (str(f), read_video_volume(f, grayscale=self.grayscale, size=self.size, max_frames=self.max_frames))
            for f in ensure_tuple(data)
        ]

    def get_data(self, img: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, dict]:
        """Returns ``(array, meta)``; meta holds affine, original_affine, spatial_shape, channel dim.

        Raises:
            DataError: several clips of different shapes (naming the first that differs).
        """
        paths = [p for p, _ in img]
        arrays = [a for _, a in img]
        for path, array in zip(paths[1:], arrays[1:]):
            if array.shape[-3:] != arrays[0].shape[-3:]:
                raise data_error(
                    path, f"clip shape {array.shape[-3:]} differs from {arrays[0].shape[-3:]} of {paths[0]}"
                )
        if len(arrays) == 1:
            array = arrays[0]
            channel_dim: float = float("nan") if self.grayscale else 0
        else:
            array = np.concatenate([a[None] if self.grayscale else a for a in arrays], axis=0)
            channel_dim = 0
        meta = {
            "affine": np.eye(4),
            "original_affine": np.eye(4),
            "spatial_shape": np.asarray(array.shape[-3:]),
            "space": "RAS",
            "original_channel_dim": channel_dim,
        }
        return array, meta


# --------------------------------------------------------------------------------------------
# Synthetic clips
# --------------------------------------------------------------------------------------------

_VIDEO_VERSION = 1
_VIDEO_CLASSES = ("background", "bright_blob", "dim_blob")


def _synthetic_clip(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(frames float32 (T, H, W) in [0, 1], label uint8 (T, H, W))``: blobs that move and deform.

    Each blob is an ellipse whose centre moves on a straight line, whose axes pulse and which
    turns over time; class 1 blobs are bright, class 2 blobs dim and more elongated.
    """
    t_len, height, width = shape
    label = np.zeros(shape, dtype=np.uint8)
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    small = min(height, width)
    for cls in (1, 2, 1, 2)[: int(rng.integers(2, 5))]:
        r0 = small * rng.uniform(0.1, 0.18)
        elong = rng.uniform(1.0, 1.4) if cls == 1 else rng.uniform(1.6, 2.2)
        p0 = rng.uniform([r0, r0], [height - r0, width - r0])
        p1 = rng.uniform([r0, r0], [height - r0, width - r0])
        phase, turn = rng.uniform(0, 2 * np.pi), rng.uniform(-np.pi, np.pi)
        for t in range(t_len):
            s = t / max(t_len - 1, 1)
            cy, cx = p0 + (p1 - p0) * s
            r = r0 * (1.0 + 0.25 * np.sin(2 * np.pi * s + phase))
            angle = phase + turn * s
            dy, dx = yy - cy, xx - cx
            u = dx * np.cos(angle) + dy * np.sin(angle)
            v = -dx * np.sin(angle) + dy * np.cos(angle)
            inside = (u / (r * elong)) ** 2 + (v / (r / np.sqrt(elong))) ** 2 <= 1.0
            label[t][inside & (label[t] == 0)] = cls
    for cls in (1, 2):  # make sure both classes appear
        if not np.any(label == cls):
            r = max(2.0, small * 0.1)
            cy, cx = rng.uniform([r, r], [height - r, width - r])
            label[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = cls
    levels = np.array([0.2, 0.85, 0.5], dtype=np.float32)
    frames = levels[label] * bias_field(shape, rng, strength=0.2)
    frames += rng.normal(0.0, 0.03, size=shape).astype(np.float32)
    return np.clip(frames, 0.0, 1.0).astype(np.float32), label


def make_synthetic_video_dataset(
    root: PathLikeStr,
    n_train: int = 4,
    n_val: int = 1,
    shape: Sequence[int] = (16, 64, 64),
    seed: int = 0,
) -> Path:
    """Writes (or reuses) a Decathlon-style video segmentation dataset.

    Layout: ``imagesTr/clip_000.mp4`` (grey clips), ``labelsTr/clip_000.nii.gz`` (uint8 ``(T, H, W)``,
    identity affine; 0 background, 1 bright blob, 2 dim blob), ``dataset.json`` with
    ``"modality": "video"``, ``training`` / ``validation`` lists and the parameters under
    ``"synthetic_video"``. Readable by :func:`app.data.load_datalist` and the transforms.

    Args:
        root: target folder; must be absent, empty, or hold this same dataset.
        n_train: number of training clips.
        n_val: number of validation clips.
        shape: ``(T, H, W)``; ``T >= 2``, ``H, W >= 8``.
        seed: random seed.

    Returns:
        ``root`` as a Path.

    Raises:
        DataError: ``root`` holds something else, or no codec could write the clips.
    """
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or shape_t[0] < 2 or min(shape_t[1:]) < 8:
        raise ValueError(f"shape must be (T, H, W) with T >= 2 and H, W >= 8, got shape={shape}")
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    root = Path(root).expanduser()
    params = {"version": _VIDEO_VERSION, "n_train": n_train, "n_val": n_val, "shape": shape_t, "seed": seed}
    if claim_dataset_root(root, "synthetic_video", params):
        return root
    rng = np.random.default_rng(seed)
    names = [f"clip_{i:03d}" for i in range(n_train + n_val)]
    for name in names:
        frames, label = _synthetic_clip(shape_t, rng)  # type: ignore[arg-type]
        write_video(root / "imagesTr" / f"{name}.mp4", frames)
        save_nifti(nifti_image(label, np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
    meta = {
        "name": "stochprop-synthetic-video",
        "description": "Moving, deforming bright / dim blobs; clips as (T, H, W) volumes",
        "tensorImageSize": "3D",
        "modality": "video",
        "labels": {str(k): n for k, n in enumerate(_VIDEO_CLASSES)},
        "numTraining": n_train,
        "numTest": 0,
        "training": decathlon_items(names[:n_train], ".mp4"),
        "validation": decathlon_items(names[n_train:], ".mp4"),
        "test": [],
        "synthetic_video": params,
    }
    return finish_dataset_root(root, meta)
