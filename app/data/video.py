"""Video clips as 3D volumes (T, H, W), on PyAV and Pillow.

A clip is a video file (``.mp4`` / ``.avi`` / ``.mkv`` / ``.webm``) or a folder of numbered frame
images (``.png`` / ``.jpg`` / ``.jpeg``, in natural order: ``f2.png`` before ``f10.png``).
:func:`open_clip` probes one and returns a :class:`ClipSource` whose :meth:`ClipSource.read`
decodes a window of frames, ``(C, T, H, W)`` float32 in [0, 1], seeking to the keyframe before
the window instead of decoding the file from its start. :func:`read_mask_clip` reads per-frame
masks (a mask video or a folder of palette / grey PNGs) as ``(T, H, W)`` class ids.

A clip is segmented like any volume: the time axis plays the part of the first spatial axis.
:class:`VideoReader` lets MONAI's ``LoadImage(d)`` read clips as channel-first ``(1, T, H, W)``
(``(3, T, H, W)`` in colour) arrays with an identity affine; :class:`MaskClipReader` reads mask
clips for the label key.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from fractions import Fraction
from os import PathLike
from pathlib import Path
from typing import Any, Union

import av
import numpy as np
from monai.data import ImageReader
from monai.utils import ensure_tuple
from PIL import Image, UnidentifiedImageError

from app.data.errors import DataError, data_error
from app.data.nifti import VolumeInfo, save_nifti
from app.data.synthetic import bias_field, claim_dataset_root, finish_dataset_root, nifti_image

__all__ = [
    "FOLDER_FPS",
    "FRAME_SUFFIXES",
    "MASK_FORMATS",
    "VIDEO_SUFFIXES",
    "ClipSource",
    "MaskClipReader",
    "VideoReader",
    "is_clip",
    "is_frame_folder",
    "is_video",
    "make_synthetic_video_dataset",
    "open_clip",
    "read_mask_clip",
    "read_video_info",
    "read_video_volume",
    "write_mask_pngs",
    "write_video",
]

PathLikeStr = Union[str, "PathLike[str]"]

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm")
FRAME_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
FOLDER_FPS = 25.0
"""Frame rate given to a folder of frames (it has none of its own)."""
# Tried in order per container; the first that opens wins. Grey clips go to libx264 as full-range
# 4:4:4 (yuvj444p) with qp=0, which gives every grey level back exactly (mask videos keep their
# class ids); colour clips as yuv444p qp=0, at most 2 levels off after the YUV round trip. ffv1
# (mkv, avi) and lossless VP9 in planar RGB (webm) are exact; mpeg4 is the last resort.
_CODECS: dict[str, tuple[tuple[str, str, str, dict[str, str]], ...]] = {
    # suffix: ((codec, grey pix_fmt, colour pix_fmt, options), ...)
    ".mp4": (("libx264", "yuvj444p", "yuv444p", {"qp": "0"}), ("mpeg4", "yuv420p", "yuv420p", {"qscale": "1"})),
    ".mkv": (("ffv1", "gray", "yuv444p", {}), ("libx264", "yuvj444p", "yuv444p", {"qp": "0"})),
    ".avi": (("ffv1", "gray", "yuv444p", {}), ("mpeg4", "yuv420p", "yuv420p", {"qscale": "1"})),
    ".webm": (("libvpx-vp9", "gbrp", "gbrp", {"lossless": "1"}),),
}
# write_video(lossless=False): what browsers play.
_PLAYABLE: dict[str, tuple[tuple[str, str, str, dict[str, str]], ...]] = {
    ".mp4": (("libx264", "yuv420p", "yuv420p", {"crf": "20", "preset": "fast"}), ("mpeg4", "yuv420p", "yuv420p", {"qscale": "3"})),
    ".webm": (("libvpx-vp9", "yuv420p", "yuv420p", {"crf": "30", "b": "0"}),),
}
_AV_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError)
_NATURAL = re.compile(r"(\d+)")


def is_video(path: PathLikeStr) -> bool:
    """Whether the file name ends in one of :data:`VIDEO_SUFFIXES` (case-insensitive)."""
    return str(path).lower().endswith(VIDEO_SUFFIXES)


def _frame_files(folder: Path) -> list[Path]:
    """The frame images of a folder (hidden files skipped), in natural order of their names."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(FRAME_SUFFIXES)]
    return sorted(files, key=lambda p: [int(s) if s.isdigit() else s.lower() for s in _NATURAL.split(p.name)])


def is_frame_folder(path: PathLikeStr) -> bool:
    """Whether ``path`` is a folder holding at least one frame image (:data:`FRAME_SUFFIXES`)."""
    p = Path(path)
    return p.is_dir() and any(
        q.is_file() and not q.name.startswith(".") and q.name.lower().endswith(FRAME_SUFFIXES) for q in p.iterdir()
    )


def is_clip(path: PathLikeStr) -> bool:
    """A video file name (:func:`is_video`) or a folder of frame images (:func:`is_frame_folder`)."""
    return is_video(path) or is_frame_folder(path)


# --------------------------------------------------------------------------------------------
# Reading clips: ClipSource
# --------------------------------------------------------------------------------------------


def _timestamp(obj: Any) -> int | None:
    """A packet's or frame's presentation time, its decoding time when it has none."""
    return obj.pts if obj.pts is not None else obj.dts


def _frame_depth(pix_fmt: str | None) -> tuple[int, int]:
    """``(channels, bits)`` of a decoder pixel format: grey formats 1 channel, the rest 3; 8 or 16 bits."""
    name = str(pix_fmt or "")
    channels = 1 if name.startswith(("gray", "ya", "mono")) else 3
    try:
        bits = max(c.bits for c in av.VideoFormat(name).components) if name else 8
    except (ValueError, av.error.FFmpegError):
        bits = 8
    return channels, 16 if bits > 8 else 8


def _image_channels(mode: str) -> int:
    """Channels a Pillow mode gives: grey modes 1, the rest (RGB, RGBA, palette, CMYK ...) 3."""
    return 1 if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F") else 3


class ClipSource:
    """A probed clip: its geometry and frame rate, and frame-accurate windowed reads.

    Made by :func:`open_clip`. A video file's packets are indexed once (demuxed, not decoded) when
    it is opened; :meth:`read` seeks to the keyframe at or before the window and decodes forward
    from there, so the cost of a read does not grow with the window's position in the file. The
    container opened by a read stays open for the next one, and a read that starts after the
    previous one ended, with no keyframe in between, goes on decoding where that one stopped, so
    reading a clip window by window decodes each frame once (:meth:`close` closes the container;
    a pickled source, e.g. in a loader worker, opens its own).

    Attributes:
        path: the video file or the frame folder.
        n_frames: frames in the clip.
        height: frame height in pixels.
        width: frame width in pixels.
        channels: 1 (grey source) or 3 (colour source).
        fps: frames per second (:data:`FOLDER_FPS` for a frame folder unless given).
        decoded_frames: frames decoded (video) or images read (folder) by this source so far,
            those decoded on the way to a window included.
    """

    def __init__(
        self,
        path: Path,
        n_frames: int,
        height: int,
        width: int,
        channels: int,
        fps: float,
        *,
        frames: list[Path] | None = None,
        timestamps: list[int] | None = None,
        keyframes: list[int] | None = None,
        bits: int = 8,
    ) -> None:
        self.path = path
        self.n_frames = int(n_frames)
        self.height = int(height)
        self.width = int(width)
        self.channels = int(channels)
        self.fps = float(fps)
        self._frames = frames  # frame folder: one file per frame
        self._timestamps = timestamps  # video: presentation time of frame i, ascending
        self._keyframes = keyframes  # video: indices of the frames that are keyframes, ascending
        self._bits = bits
        self._container: Any = None
        self._frames_iter: Iterator[tuple[int, Any]] | None = None  # the open decoder, where the last read stopped
        self._last_index: int | None = None  # the last frame that decoder gave
        self._index_of: dict[int, int] | None = None  # timestamp -> frame index
        self.decoded_frames = 0

    def __repr__(self) -> str:
        return (f"ClipSource({str(self.path)!r}, n_frames={self.n_frames}, height={self.height}, width={self.width}, "
                f"channels={self.channels}, fps={self.fps:g})")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_container=None, _frames_iter=None, _last_index=None)  # an open decoder does not cross processes
        return state

    def __enter__(self) -> ClipSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the container a read left open (reads reopen it)."""
        self._frames_iter, self._last_index = None, None
        if self._container is not None:
            self._container.close()
            self._container = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(T, H, W)``."""
        return (self.n_frames, self.height, self.width)

    def read(
        self,
        start: int,
        count: int,
        stride: int = 1,
        size: tuple[int, int] | None = None,
        grey: bool = False,
    ) -> np.ndarray:
        """Decodes frames ``start, start + stride, ...`` (``count`` of them).

        Args:
            start: index of the first frame, ``0 <= start < n_frames``.
            count: frames to return, >= 1; the last one, ``start + (count - 1) * stride``, must exist.
            stride: step between returned frames, >= 1.
            size: ``(H, W)`` to resize every frame to (bilinear); None keeps the clip's size.
            grey: luma only (one channel); else the source's channels (:attr:`channels`).

        Returns:
            ``(C, count, H, W)`` float32 in [0, 1], ``C = 1`` if ``grey`` else :attr:`channels`.

        Raises:
            ValueError: a window outside the clip, or bad ``count`` / ``stride`` / ``size``.
            DataError: a frame cannot be decoded (damaged or truncated file, unreadable image);
                one line naming the file.
        """
        start, count, stride = int(start), int(count), int(stride)
        if count < 1 or stride < 1:
            raise ValueError(f"count and stride must be >= 1, got count={count}, stride={stride}")
        last = start + (count - 1) * stride
        if start < 0 or last >= self.n_frames:
            raise ValueError(
                f"{self.path}: frames {start}..{last} (start={start}, count={count}, stride={stride}) "
                f"are outside the clip's {self.n_frames} frames"
            )
        if size is not None:
            size = (int(size[0]), int(size[1]))
            if min(size) < 1:
                raise ValueError(f"size must be (H, W) with H, W >= 1, got size={size}")
        indices = list(range(start, last + 1, stride))
        channels = 1 if grey else self.channels
        if self._frames is not None:
            frames = [self._read_image(self._frames[i], size, channels) for i in indices]
            self.decoded_frames += len(indices)
        else:
            frames = self._read_video(indices, size, channels)
        return np.ascontiguousarray(np.stack(frames, axis=1))  # (C, count, H, W)

    # ----------------------------------------------------------------------------- frame folders

    def _read_image(self, path: Path, size: tuple[int, int] | None, channels: int) -> np.ndarray:
        """One frame image as ``(C, H, W)`` float32 in [0, 1]."""
        try:
            with Image.open(path) as img:
                img.load()
                if img.size != (self.width, self.height):
                    raise data_error(path, f"frame is {img.size[1]}x{img.size[0]}, the other frames of "
                                           f"{self.path} are {self.height}x{self.width}")
                array = _image_array(img, channels)
        except DataError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise data_error(path, f"cannot read the frame image ({type(e).__name__}: {e})") from e
        if size is not None and size != (self.height, self.width):
            array = np.stack([np.asarray(Image.fromarray(c).resize((size[1], size[0]), Image.BILINEAR)) for c in array])
        return np.clip(array, 0.0, 1.0, out=array) if size is not None else array

    # ----------------------------------------------------------------------------- video files

    def _open(self) -> Any:
        if self._container is None:
            self._container = av.open(str(self.path))
            self._container.streams.video[0].thread_type = "AUTO"
        return self._container

    def _read_video(self, indices: list[int], size: tuple[int, int] | None, channels: int) -> list[np.ndarray]:
        try:
            return self._decode(indices, size, channels)
        except DataError:
            self.close()
            raise
        except _AV_ERRORS as e:
            self.close()
            raise data_error(self.path, f"cannot decode frames {indices[0]}..{indices[-1]} "
                                        f"({type(e).__name__}: {e}); the file is damaged or truncated") from e

    def _decode(self, indices: list[int], size: tuple[int, int] | None, channels: int) -> list[np.ndarray]:
        bits16 = self._bits > 8
        fmt = ("gray16le" if bits16 else "gray") if channels == 1 else ("rgb48le" if bits16 else "rgb24")
        scale = 65535.0 if bits16 else 255.0
        out: dict[int, np.ndarray] = {}
        wanted = set(indices)
        frames = self._positioned(indices[0])
        restarted = False
        while True:
            try:
                index, frame = next(frames)
            except StopIteration:
                self._frames_iter = None
                break
            if not out and index > indices[0] and not restarted:  # the seek landed past the window
                restarted = True
                frames = self._decoder(seek_to=None)
                continue
            if index in wanted:
                if size is not None:
                    frame = frame.reformat(width=size[1], height=size[0], format=fmt, interpolation="BILINEAR")
                array = frame.to_ndarray(format=fmt).astype(np.float32) / scale
                out[index] = array[None] if channels == 1 else np.moveaxis(array, -1, 0)
            if index >= indices[-1]:
                break
        missing = [i for i in indices if i not in out]
        if missing:
            raise data_error(self.path, f"frame(s) {missing[:5]}{'...' if len(missing) > 5 else ''} of {self.n_frames} "
                                        "did not decode; the file is damaged or truncated")
        return [out[i] for i in indices]

    def _positioned(self, first: int) -> Iterator[tuple[int, Any]]:
        """Decoded ``(index, frame)`` pairs that reach frame ``first`` soonest: the previous read's decoder
        when it stopped before ``first`` with no keyframe in between, else a new one from the keyframe
        at or before ``first`` (from the start for a clip without timestamps)."""
        last = self._last_index
        if self._frames_iter is not None and last is not None and last < first:
            if self._timestamps is None or self._key_before(first) <= last:
                return self._frames_iter
        if self._timestamps is None:
            return self._decoder(seek_to=None)
        return self._decoder(seek_to=self._timestamps[self._key_before(first)])

    def _key_before(self, index: int) -> int:
        assert self._keyframes is not None
        return self._keyframes[max(0, bisect_right(self._keyframes, index) - 1)]

    def _decoder(self, seek_to: int | None) -> Iterator[tuple[int, Any]]:
        """Seeks (``seek_to``: to the keyframe at or before that timestamp; None: to the start) and
        returns the decoder's ``(index, frame)`` pairs, in presentation order; kept for the next read."""
        container = self._open()
        stream = container.streams.video[0]
        if seek_to is None:
            container.seek(0)
        else:
            container.seek(seek_to, stream=stream, backward=True, any_frame=False)
        self._last_index = None
        self._frames_iter = self._indexed(container.decode(stream), counting=self._timestamps is None)
        return self._frames_iter

    def _indexed(self, frames: Iterator[Any], counting: bool) -> Iterator[tuple[int, Any]]:
        """Frames with their index: counted from the start, or looked up by timestamp."""
        if not counting and self._index_of is None:
            self._index_of = {ts: i for i, ts in enumerate(self._timestamps or [])}
        count = -1
        for frame in frames:
            self.decoded_frames += 1
            if counting:
                count += 1
                index = count
            else:
                ts = _timestamp(frame)
                index = self._index_of.get(ts) if ts is not None else None  # type: ignore[union-attr]
                if index is None:
                    continue
            self._last_index = index
            yield index, frame


def _image_array(img: Image.Image, channels: int) -> np.ndarray:
    """A Pillow image as ``(C, H, W)`` float32 in [0, 1] (8-bit / 255, 16-bit / 65535, float as is)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(img).astype(np.float32) / 65535.0
        return grey[None] if channels == 1 else np.repeat(grey[None], 3, axis=0)
    if mode == "F":
        grey = np.asarray(img, dtype=np.float32)
        return grey[None] if channels == 1 else np.repeat(grey[None], 3, axis=0)
    converted = img.convert("L" if channels == 1 else "RGB")
    array = np.asarray(converted).astype(np.float32) / 255.0
    return array[None] if channels == 1 else np.ascontiguousarray(np.moveaxis(array, -1, 0))


def _open_folder(p: Path, fps: float | None) -> ClipSource:
    frames = _frame_files(p)
    if not frames:
        raise data_error(p, f"folder holds no frame images ({', '.join(FRAME_SUFFIXES)}): a clip with zero frames")
    sizes: dict[tuple[int, int], Path] = {}
    channels = 1
    for f in frames:
        try:
            with Image.open(f) as img:
                size, mode = img.size, img.mode
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise data_error(f, f"cannot read the frame image ({type(e).__name__}: {e})") from e
        if sizes and size not in sizes:
            (first_size, first), = list(sizes.items())[:1]
            raise data_error(f, f"frame is {size[1]}x{size[0]}, but {first.name} in the same folder is "
                                f"{first_size[1]}x{first_size[0]}: all frames of a clip need one size")
        sizes.setdefault(size, f)
        channels = max(channels, _image_channels(mode))
    width, height = next(iter(sizes))
    return ClipSource(p, len(frames), height, width, channels, FOLDER_FPS if fps is None else float(fps), frames=frames)


def _open_video(p: Path) -> ClipSource:
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise data_error(p, "no video stream in the file (zero frames of video)")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            height, width = int(ctx.height), int(ctx.width)
            channels, bits = _frame_depth(ctx.pix_fmt)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            declared = int(stream.frames or 0)
            # Matroska/WebM declare no frame count, but a duration in their header
            duration = float(container.duration) / av.time_base if container.duration and len(container.streams) == 1 else 0.0
            stamps: list[tuple[int, bool]] = []
            untimed = 0
            try:
                for packet in container.demux(stream):
                    if packet.size == 0:  # the demuxer's end-of-stream marker
                        continue
                    ts = _timestamp(packet)
                    if ts is None:
                        untimed += 1
                    else:
                        stamps.append((int(ts), bool(packet.is_keyframe)))
            except EOFError:  # some demuxers (Matroska) end a stream without frames this way
                pass
    except DataError:
        raise
    except _AV_ERRORS as e:
        raise data_error(p, f"cannot open the video ({type(e).__name__}: {e}); the file is damaged, truncated or "
                            "not a video") from e
    n_frames = len(stamps) + untimed
    if n_frames == 0 or height == 0 or width == 0:
        raise data_error(p, f"video has no frames (frames={n_frames}, size={height}x{width})")
    if declared and n_frames < declared:
        raise data_error(p, f"the header declares {declared} frames but only {n_frames} are in the file; it is truncated")
    if fps <= 0:
        fps = FOLDER_FPS
    if not declared and duration and n_frames < 0.98 * duration * fps - 1:
        raise data_error(p, f"the header declares {duration:.2f} s ({duration * fps:.0f} frames at {fps:g} fps) but only "
                            f"{n_frames} frames are in the file; it is truncated")
    if untimed:  # frames without timestamps: reads count frames from the start
        return ClipSource(p, n_frames, height, width, channels, fps, bits=bits)
    order = sorted(range(len(stamps)), key=lambda i: stamps[i][0])
    timestamps = [stamps[i][0] for i in order]
    keyframes = [rank for rank, i in enumerate(order) if stamps[i][1]] or [0]
    return ClipSource(p, n_frames, height, width, channels, fps, timestamps=timestamps, keyframes=keyframes, bits=bits)


def open_clip(path: PathLikeStr, *, fps: float | None = None) -> ClipSource:
    """Probes a clip: a video file or a folder of numbered frame images.

    A video's packets are read (not decoded) to index its frames; a folder's images are opened
    for their size and mode only.

    Args:
        path: ``.mp4`` / ``.avi`` / ``.mkv`` / ``.webm`` (anything FFmpeg decodes), or a folder of
            ``.png`` / ``.jpg`` / ``.jpeg`` frames sorted in natural order of their names.
        fps: frame rate of a frame folder (default :data:`FOLDER_FPS`); ignored for video files.

    Returns:
        The :class:`ClipSource`.

    Raises:
        DataError: one line naming the file: missing, not decodable (corrupt), truncated, no
            video stream, zero frames, an unreadable frame image, or frames of different sizes
            in a folder.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return _open_folder(p, fps)
    if not p.is_file():
        raise data_error(p, "file not found")
    return _open_video(p)


def read_mask_clip(
    path: PathLikeStr,
    n_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    *,
    clip: PathLikeStr | None = None,
) -> np.ndarray:
    """Reads per-frame masks aligned with a clip: values are class ids.

    Args:
        path: a mask video (its grey values are the class ids: write it losslessly, e.g. with
            :func:`write_video`), or a folder of per-frame mask PNGs in natural order: palette
            PNGs give their palette indices, grey PNGs (8 or 16 bit) their values.
        n_frames: frames of the clip the masks belong to (None: not checked).
        height: its frame height (None: not checked, with ``width``).
        width: its frame width.
        clip: the clip's path, named in mismatch errors.

    Returns:
        ``(T, H, W)`` int64.

    Raises:
        DataError: unreadable masks, colour (RGB) mask images, or a frame count or frame size
            other than the clip's (one line naming both files).
    """
    p = Path(path).expanduser()
    against = f" {clip}" if clip is not None else " the clip"
    if p.is_dir():
        files = _frame_files(p)
        if not files:
            raise data_error(p, f"folder holds no mask images ({', '.join(FRAME_SUFFIXES)})")
        if n_frames is not None and len(files) != n_frames:
            raise data_error(p, f"{len(files)} mask frames, but{against} has {n_frames} frames")
        masks: np.ndarray | None = None
        for t, f in enumerate(files):
            try:
                with Image.open(f) as img:
                    img.load()
                    mode = img.mode
                    if height is None or width is None:
                        height, width = img.size[1], img.size[0]
                    if img.size != (width, height):
                        raise data_error(f, f"mask frame is {img.size[1]}x{img.size[0]}, but{against} is {height}x{width}")
                    if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                        raise data_error(f, f"mask frame is a {mode} image; save masks as palette or grey PNGs "
                                            "whose values are the class ids")
                    array = np.asarray(img.convert("L") if mode in ("1", "LA") else img)
            except DataError:
                raise
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                raise data_error(f, f"cannot read the mask image ({type(e).__name__}: {e})") from e
            if masks is None:
                masks = np.empty((len(files), height, width), dtype=np.int64)
            masks[t] = array
        assert masks is not None
        return masks
    source = open_clip(p)
    n_frames = source.n_frames if n_frames is None else n_frames
    if height is None or width is None:
        height, width = source.height, source.width
    if source.n_frames != n_frames or (source.height, source.width) != (height, width):
        raise data_error(p, f"mask clip has {source.n_frames} frames of {source.height}x{source.width}, but{against} "
                            f"has {n_frames} frames of {height}x{width}")
    with source:
        frames = source.read(0, n_frames, grey=True)[0]  # (T, H, W) in [0, 1]
    scale = 65535.0 if source._bits > 8 else 255.0
    return np.rint(frames * scale).astype(np.int64)


def read_video_info(path: PathLikeStr) -> VolumeInfo:
    """Probes a clip (:func:`open_clip`): ``shape=(T, H, W)``, one channel (grey, as read by default), identity affine.

    Raises:
        DataError: missing file, not decodable, no video stream, or no frames.
    """
    source = open_clip(path)
    return VolumeInfo(source.path, source.shape, 1, np.eye(4), (1.0, 1.0, 1.0), "uint8")


def read_video_volume(
    path: PathLikeStr,
    *,
    grayscale: bool = True,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Decodes a whole clip (video file or frame folder) into a float32 volume with values in [0, 1].

    Args:
        path: a clip (see :func:`open_clip`).
        grayscale: luma only (default) or RGB (a grey source gives three equal channels).
        size: optional ``(H, W)`` to rescale every frame to.
        max_frames: keep at most this many frames from the start.

    Returns:
        ``(T, H, W)`` if ``grayscale`` else ``(3, T, H, W)``, float32 in [0, 1].

    Raises:
        DataError: naming the file, if it cannot be opened or decoded or has no frames.
    """
    with open_clip(path) as source:
        n = source.n_frames if max_frames is None else max(1, min(int(max_frames), source.n_frames))
        volume = source.read(0, n, size=size, grey=grayscale)
    if grayscale:
        return volume[0]
    return volume if volume.shape[0] == 3 else np.ascontiguousarray(np.repeat(volume, 3, axis=0))


def _to_uint8(volume: np.ndarray) -> np.ndarray:
    if volume.dtype == np.uint8:
        return volume
    if np.issubdtype(volume.dtype, np.floating):
        return np.round(np.clip(volume, 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(volume.dtype, np.integer) or volume.dtype == np.bool_:
        return np.clip(volume, 0, 255).astype(np.uint8)
    raise TypeError(f"volume dtype must be float in [0, 1] or integer in [0, 255], got {volume.dtype}")


def _frame_rate(fps: float) -> Fraction:
    """``fps`` as the exact fraction containers store (29.97 -> 30000/1001)."""
    return Fraction(float(fps)).limit_denominator(1001)


def _encode(path: Path, frames: np.ndarray, fmt: str, fps: float, codec: str, pix_fmt: str, options: dict) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=_frame_rate(fps))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = pix_fmt
        stream.options = dict(options)
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=fmt)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_video(
    path: PathLikeStr, volume: Any, fps: float = 10, codec: str | None = None, *, lossless: bool = True
) -> Path:
    """Writes a volume as a clip, trying codecs PyAV ships until one opens.

    Grey clips are written so that every grey level reads back exactly (mask videos keep their
    class ids); colour clips near-losslessly (``.mp4``) or exactly (``.webm``, ``.mkv``); see ``_CODECS``.

    Args:
        path: ``.mp4``, ``.avi``, ``.mkv`` or ``.webm``; folders are created.
        volume: ``(T, H, W)`` or ``(1, T, H, W)`` grey, or ``(3, T, H, W)`` RGB; float in [0, 1]
            (clipped) or integers in [0, 255]. Numpy array or torch tensor.
        fps: frame rate (fractional rates such as 29.97 are kept as 30000/1001).
        codec: force one FFmpeg encoder (e.g. ``"mpeg4"``); default: per container, see ``_CODECS``.
        lossless: True (default) keeps the values as described above; False writes a small clip
            that browsers and W&B play (``.mp4``: H.264 4:2:0 at crf 20; ``.webm``: VP9 4:2:0), an
            odd frame size padded by one edge row / column.

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
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        frames, fmt = array, "gray"
    elif array.ndim == 4 and array.shape[0] == 3:
        frames, fmt = np.moveaxis(array, 0, -1), "rgb24"  # (T, H, W, 3)
    else:
        raise data_error(p, f"volume shape {array.shape} is neither (T, H, W), (1, T, H, W) nor (3, T, H, W)")
    if frames.shape[0] < 1 or min(frames.shape[1:3]) < 2:
        raise data_error(p, f"volume shape {array.shape} has no frames or frames smaller than 2x2")
    p.parent.mkdir(parents=True, exist_ok=True)
    candidates = _CODECS[suffix]
    if not lossless:
        if suffix not in _PLAYABLE:
            raise data_error(p, f"lossless=False writes {sorted(_PLAYABLE)} clips only")
        pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2)) + ((0, 0),) * (frames.ndim - 3)
        frames = np.pad(frames, pad, mode="edge")  # 4:2:0 needs even sizes
        candidates = _PLAYABLE[suffix]
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
        """True when every given name is a clip: a video file or a folder of frame images."""
        names = ensure_tuple(filename)
        return len(names) > 0 and all(is_clip(n) for n in names)

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


class MaskClipReader(ImageReader):
    """MONAI reader for per-frame masks (a mask video or a folder of mask PNGs), for the label key.

    Produces ``(T, H, W)`` int64 class ids (see :func:`read_mask_clip`; the frame count and size are
    checked against the clip when the data list is loaded) with an identity affine, like
    :class:`VideoReader`'s clips, so both stay on one grid through the transforms.
    """

    def verify_suffix(self, filename: Sequence[PathLikeStr] | PathLikeStr) -> bool:
        """True for one name that is a video file or a folder of frame images."""
        names = ensure_tuple(filename)
        return len(names) == 1 and is_clip(names[0])

    def read(self, data: Sequence[PathLikeStr] | PathLikeStr, **kwargs: Any) -> tuple[str, np.ndarray]:
        """Reads the masks; returns ``(path, (T, H, W) int64)``."""
        (name,) = ensure_tuple(data)
        return str(name), read_mask_clip(name)

    def get_data(self, img: tuple[str, np.ndarray]) -> tuple[np.ndarray, dict]:
        """Returns ``(array, meta)`` as :meth:`VideoReader.get_data` does for a grey clip."""
        array = img[1]
        return array, {"affine": np.eye(4), "original_affine": np.eye(4), "spatial_shape": np.asarray(array.shape),
                       "space": "RAS", "original_channel_dim": float("nan")}


# --------------------------------------------------------------------------------------------
# Synthetic clips
# --------------------------------------------------------------------------------------------

_VIDEO_VERSION = 2
_VIDEO_CLASSES = ("background", "striped_object", "spotted_object")
MASK_FORMATS = ("video", "png", "nifti")
"""How :func:`make_synthetic_video_dataset` writes masks: a lossless grey mask video, a folder of
palette PNGs (one per frame), or a ``(T, H, W)`` NIfTI volume."""
# Palette of the mask PNGs: class 0 black, then the overlay colours.
_MASK_PALETTE = [0, 0, 0, 230, 25, 75, 60, 180, 75, 255, 225, 25, 0, 130, 200]


def _synthetic_clip(
    shape: tuple[int, int, int], rng: np.random.Generator, colour: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(frames float32 (3, T, H, W) or (T, H, W) in [0, 1], label uint8 (T, H, W))``: textured objects that move.

    The background is a smooth colour field with a faint fixed texture. Each object is an ellipse
    whose centre moves on a straight line, whose axes pulse and which turns over time; its texture
    turns with it: class 1 objects carry stripes in a warm colour, class 2 objects spots in a cool
    colour (in grey: bright stripes, dim spots), so both the texture and the colour tell them apart.
    """
    t_len, height, width = shape
    label = np.zeros(shape, dtype=np.uint8)
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    small = min(height, width)
    field = bias_field(shape, rng, strength=0.3)  # (T, H, W), ~[0.75, 1.3]
    base = rng.uniform(0.15, 0.35, size=3).astype(np.float32)
    grain = 0.04 * np.sin(xx * rng.uniform(0.3, 0.6) + yy * rng.uniform(0.3, 0.6))
    frames = (base[:, None, None, None] * field[None] + grain[None, None]).astype(np.float32)  # (3, T, H, W)
    for cls in (1, 2, 1, 2)[: int(rng.integers(2, 5))]:
        r0 = small * rng.uniform(0.12, 0.2)
        elong = rng.uniform(1.0, 1.6)
        p0 = rng.uniform([r0, r0], [height - r0, width - r0])
        p1 = rng.uniform([r0, r0], [height - r0, width - r0])
        phase, turn = rng.uniform(0, 2 * np.pi), rng.uniform(-np.pi, np.pi)
        period = rng.uniform(3.0, 5.0)
        hue = rng.uniform([0.75, 0.3, 0.05], [0.95, 0.6, 0.25]) if cls == 1 else rng.uniform([0.05, 0.35, 0.6], [0.3, 0.7, 0.95])
        for t in range(t_len):
            s = t / max(t_len - 1, 1)
            cy, cx = p0 + (p1 - p0) * s
            r = r0 * (1.0 + 0.2 * np.sin(2 * np.pi * s + phase))
            angle = phase + turn * s
            dy, dx = yy - cy, xx - cx
            u = dx * np.cos(angle) + dy * np.sin(angle)
            v = -dx * np.sin(angle) + dy * np.cos(angle)
            inside = ((u / (r * elong)) ** 2 + (v / r) ** 2 <= 1.0) & (label[t] == 0)
            if cls == 1:
                texture = 0.65 + 0.35 * np.sin(2 * np.pi * u / period)
            else:
                texture = 0.65 + 0.35 * np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)
            for c in range(3):
                frames[c, t][inside] = (hue[c] * texture)[inside]
            label[t][inside] = cls
    for cls in (1, 2):  # make sure both classes appear
        if not np.any(label == cls):
            r = max(2.0, small * 0.1)
            cy, cx = rng.uniform([r, r], [height - r, width - r])
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            label[:, disc] = cls
            frames[:, :, disc] = (0.85 if cls == 1 else 0.45)
    frames += rng.normal(0.0, 0.02, size=frames.shape).astype(np.float32)
    frames = np.clip(frames, 0.0, 1.0)
    if not colour:
        frames = (0.299 * frames[0] + 0.587 * frames[1] + 0.114 * frames[2]).astype(np.float32)
    return frames.astype(np.float32), label


def write_mask_pngs(folder: PathLikeStr, label: np.ndarray) -> Path:
    """Writes ``(T, H, W)`` class ids as palette PNGs ``folder/00000.png, ...`` (values < 256)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    array = np.asarray(label)
    if array.ndim != 3 or array.min() < 0 or array.max() > 255:
        raise data_error(out, f"masks must be (T, H, W) with values 0..255, got shape {array.shape}")
    digits = max(5, len(str(array.shape[0] - 1)))
    for t, frame in enumerate(array.astype(np.uint8)):
        img = Image.fromarray(frame, mode="P")
        img.putpalette(_MASK_PALETTE + [0] * (768 - len(_MASK_PALETTE)))
        img.save(out / f"{t:0{digits}d}.png")
    return out


def make_synthetic_video_dataset(
    root: PathLikeStr,
    n_train: int = 4,
    n_val: int = 1,
    shape: Sequence[int] = (16, 64, 64),
    seed: int = 0,
    colour: bool = True,
    masks: str = "video",
    fps: float = 10.0,
) -> Path:
    """Writes (or reuses) a Decathlon-style video segmentation dataset.

    Layout: ``imagesTr/clip_000.mp4`` (colour or grey clips), masks in ``labelsTr/`` as
    ``clip_000.mp4`` (lossless grey mask video, ``masks="video"``), ``clip_000/00000.png ...``
    (palette PNGs, ``"png"``) or ``clip_000.nii.gz`` (uint8 ``(T, H, W)``, identity affine,
    ``"nifti"``); class 0 background, 1 striped object, 2 spotted object. ``dataset.json`` has
    ``"modality": "video"``, ``training`` / ``validation`` lists and the parameters under
    ``"synthetic_video"``. Readable by :func:`app.data.load_datalist` and the transforms.

    Args:
        root: target folder; must be absent, empty, or hold this same dataset.
        n_train: number of training clips.
        n_val: number of validation clips.
        shape: ``(T, H, W)``; ``T >= 2``, ``H, W >= 8``.
        seed: random seed.
        colour: RGB clips (default) or grey ones.
        masks: one of :data:`MASK_FORMATS`.
        fps: frame rate of the clips.

    Returns:
        ``root`` as a Path.

    Raises:
        DataError: ``root`` holds something else, or no codec could write the clips.
        ValueError: bad ``shape``, counts or ``masks``.
    """
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or shape_t[0] < 2 or min(shape_t[1:]) < 8:
        raise ValueError(f"shape must be (T, H, W) with T >= 2 and H, W >= 8, got shape={shape}")
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    if masks not in MASK_FORMATS:
        raise ValueError(f"masks must be one of {list(MASK_FORMATS)}, but got masks={masks!r}")
    root = Path(root).expanduser()
    params = {"version": _VIDEO_VERSION, "n_train": n_train, "n_val": n_val, "shape": shape_t, "seed": seed,
              "colour": bool(colour), "masks": masks, "fps": float(fps)}
    if claim_dataset_root(root, "synthetic_video", params):
        return root
    rng = np.random.default_rng(seed)
    names = [f"clip_{i:03d}" for i in range(n_train + n_val)]
    label_suffix = {"video": ".mp4", "png": "", "nifti": ".nii.gz"}[masks]
    for name in names:
        frames, label = _synthetic_clip(shape_t, rng, colour=colour)  # type: ignore[arg-type]
        write_video(root / "imagesTr" / f"{name}.mp4", frames, fps=fps)
        target = root / "labelsTr" / f"{name}{label_suffix}"
        if masks == "video":
            write_video(target, label, fps=fps)
        elif masks == "png":
            write_mask_pngs(target, label)
        else:
            save_nifti(nifti_image(label, np.eye(4)), target)
    items = [{"image": f"./imagesTr/{n}.mp4", "label": f"./labelsTr/{n}{label_suffix}"} for n in names]
    meta = {
        "name": "stochprop-synthetic-video",
        "description": "Moving, turning striped / spotted objects on a smooth background; clips as (T, H, W) volumes",
        "tensorImageSize": "3D",
        "modality": "video",
        "labels": {str(k): n for k, n in enumerate(_VIDEO_CLASSES)},
        "numTraining": n_train,
        "numTest": 0,
        "training": items[:n_train],
        "validation": items[n_train:],
        "test": [],
        "synthetic_video": params,
    }
    return finish_dataset_root(root, meta)
