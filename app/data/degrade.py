"""Degraded copies of clips, the inputs of the restoration task (the clean clip is the target).

:class:`Degradation` applies, in the order a camera and a codec would: a spatial Gaussian blur of
each frame (optics, focus), additive Gaussian noise (the sensor), then a lossy round trip through
H.264 at a constant rate factor (the codec: blocking, ringing, smeared detail, chroma subsampled
to 4:2:0) and/or quantisation to a few grey levels. Every random choice comes from one seed, so a
training sample or a validation clip is degraded the same way in every worker and every run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
from scipy.ndimage import gaussian_filter

from app.utils import dataclass_from_mapping

__all__ = ["Degradation", "compress_h264"]


def compress_h264(clip: np.ndarray, crf: int, preset: str = "veryfast") -> np.ndarray:
    """Encodes a clip with libx264 (yuv420p, ``crf``) in memory and decodes it again.

    Args:
        clip: ``(C, T, H, W)`` float in [0, 1], ``C`` 1 (grey) or 3 (RGB); any ``H, W >= 1``
            (odd sizes are padded by one edge row / column for 4:2:0 and cropped back).
        crf: constant rate factor, 0..51: 18 is near transparent, 30 visibly blocky, 40 and above
            heavily damaged.
        preset: x264 speed preset.

    Returns:
        ``(C, T, H, W)`` float32 in [0, 1], what a viewer of the compressed clip would see.
    """
    channels, t_len, height, width = clip.shape
    if channels not in (1, 3):
        raise ValueError(f"clip must have 1 or 3 channels, got shape {clip.shape}")
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be in 0..51, got crf={crf}")
    fmt = "gray" if channels == 1 else "rgb24"
    frames = np.round(np.clip(clip, 0.0, 1.0) * 255.0).astype(np.uint8)
    frames = np.pad(frames, ((0, 0), (0, 0), (0, height % 2), (0, width % 2)), mode="edge")
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height = frames.shape[3], frames.shape[2]
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = Fraction(1, 25)
    encoder.framerate = 25
    encoder.thread_count = 1  # one thread: the same bytes every time, and loader workers run in parallel already
    encoder.options = {"crf": str(int(crf)), "preset": preset}
    packets = []
    for i in range(t_len):
        array = frames[0, i] if channels == 1 else np.ascontiguousarray(np.moveaxis(frames[:, i], 0, -1))
        frame = av.VideoFrame.from_ndarray(array, format=fmt)
        frame.pts = i
        packets.extend(encoder.encode(frame))
    packets.extend(encoder.encode(None))
    decoder = av.CodecContext.create("h264", "r")
    decoder.thread_count = 1
    out = []
    for packet in packets:
        out.extend(f.to_ndarray(format=fmt) for f in decoder.decode(packet))
    out.extend(f.to_ndarray(format=fmt) for f in decoder.decode(None))
    if len(out) != t_len:
        raise RuntimeError(f"H.264 round trip gave {len(out)} frames for {t_len}")
    decoded = np.stack(out).astype(np.float32) / 255.0  # (T, H', W') or (T, H', W', 3)
    decoded = decoded[None] if channels == 1 else np.moveaxis(decoded, -1, 0)
    return np.ascontiguousarray(decoded[:, :, :height, :width])


@dataclass(frozen=True)
class Degradation:
    """How a clean clip is degraded into the restoration network's input.

    Attributes:
        blur_sigma: standard deviation in pixels of the Gaussian blur of each frame (over H and
            W, not time); 0 = none.
        noise_std: standard deviation of the additive Gaussian noise (values in [0, 1]); 0 = none.
        crf: H.264 constant rate factor of the compression round trip (see :func:`compress_h264`);
            None = none.
        quantize_bits: quantise to ``2**bits`` levels (banding); None = none.
    """

    blur_sigma: float = 1.0
    noise_std: float = 0.05
    crf: int | None = 32
    quantize_bits: int | None = None

    def __post_init__(self) -> None:
        if self.blur_sigma < 0 or self.noise_std < 0:
            raise ValueError(f"blur_sigma and noise_std must be >= 0, got blur_sigma={self.blur_sigma}, "
                             f"noise_std={self.noise_std}")
        if self.crf is not None and not 0 <= int(self.crf) <= 51:
            raise ValueError(f"crf must be in 0..51 or None, got crf={self.crf}")
        if self.quantize_bits is not None and not 1 <= int(self.quantize_bits) <= 8:
            raise ValueError(f"quantize_bits must be in 1..8 or None, got quantize_bits={self.quantize_bits}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints and logs."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Degradation:
        """Inverse of :meth:`to_dict`; also accepts OmegaConf mappings.

        Raises:
            ValueError: unknown keys (the message lists the known ones).
        """
        return dataclass_from_mapping(cls, data, "degradation")

    def __call__(self, clip: np.ndarray, seed: int) -> np.ndarray:
        """Degrades one clip.

        Args:
            clip: ``(C, T, H, W)`` float in [0, 1] (C 1 or 3 for the compression step).
            seed: the seed of the noise.

        Returns:
            ``(C, T, H, W)`` float32 in [0, 1], a new array.
        """
        out = np.asarray(clip, dtype=np.float32)
        if self.blur_sigma > 0:
            out = gaussian_filter(out, sigma=(0.0, 0.0, float(self.blur_sigma), float(self.blur_sigma)), mode="reflect")
        else:
            out = out.copy()
        if self.noise_std > 0:
            rng = np.random.default_rng(int(seed))
            out += rng.normal(0.0, float(self.noise_std), size=out.shape).astype(np.float32)
        np.clip(out, 0.0, 1.0, out=out)
        if self.crf is not None:
            out = compress_h264(out, int(self.crf))
        if self.quantize_bits is not None:
            levels = float(2 ** int(self.quantize_bits) - 1)
            out = np.round(out * levels) / levels
        return out.astype(np.float32, copy=False)
