"""Tests for video inference: clips in (mp4, frame folders), mask / overlay / restored videos out (CPU, tiny)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import CropForeground
from PIL import Image

from app.data.transforms import Preprocessing
from app.data.video import ClipSource, open_clip, write_video
from app.infer import infer_files, video
from app.infer.__main__ import main
from app.infer.engine import checkpoint_task
from app.infer.files import collect_inputs
from app.infer.predict import WindowSettings, predict_logits, stream_logits
from app.models import build_model, load_checkpoint, model_from_checkpoint, save_checkpoint

T, H, W = 10, 24, 28  # 10 frames of 24x28: two slabs one window (8 frames) deep
FPS = 12.5
CLASSES = ["background", "low", "high"]


def read_back(path: Path, fmt: str) -> tuple[np.ndarray, Fraction, tuple[int, int]]:
    """All frames of a video read with PyAV, its average rate and its (height, width)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format=fmt) for f in container.decode(stream)])
        return frames, stream.average_rate, (stream.codec_context.height, stream.codec_context.width)


def make_clip(t: int = T, h: int = H, w: int = W, colour: bool = False, seed: int = 0) -> np.ndarray:
    """A smooth moving pattern in [0, 1] with a black first frame and black top rows (cropped away)."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    base = 0.5 + 0.25 * np.sin((xx + 2 * tt) / 4.0) + 0.2 * np.cos((yy - tt) / 5.0)
    rng = np.random.default_rng(seed)
    clip = np.clip(base + rng.normal(0, 0.02, base.shape), 0.0, 1.0).astype(np.float32)
    clip[0] = 0.0
    clip[:, :3] = 0.0
    if colour:
        clip = np.stack([clip, clip[:, ::-1] * 0.8, 1.0 - clip])
    return clip


def dynunet_config(in_channels: int, out_channels: int) -> dict:
    return {
        "name": "dynunet",
        "in_channels": in_channels,
        "out_channels": out_channels,
        "patch_size": [8, 16, 16],
        "spacing": [1.0, 1.0, 1.0],
        "base_features": 4,
        "max_features": 8,
    }


@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny DynUNet, grey clips, z-score and foreground crop (the pre-processing that needs the whole clip)."""
    torch.manual_seed(0)
    cfg = dynunet_config(1, 3)
    path = tmp_path_factory.mktemp("ckpt") / "seg.pt"
    pre = {"spacing": None, "orientation": "RAS", "intensity": "zscore", "crop_foreground": True, "in_channels": 1}
    save_checkpoint(path, model_state=build_model(cfg).state_dict(), model_config=cfg, preprocessing=pre,
                    class_names=CLASSES)
    return path


@pytest.fixture(scope="module")
def threshold_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The convolution-free threshold net: fast, for the file-handling tests."""
    cfg = {"name": "threshold", "in_channels": 1, "out_channels": 3, "thresholds": [0.35, 0.65],
           "sharpness": 20.0, "patch_size": [8, 8, 8]}
    path = tmp_path_factory.mktemp("ckpt") / "threshold.pt"
    pre = {"spacing": None, "orientation": "RAS", "intensity": "none", "crop_foreground": False, "in_channels": 1}
    save_checkpoint(path, model_state=build_model(cfg).state_dict(), model_config=cfg, preprocessing=pre,
                    class_names=CLASSES)
    return path


@pytest.fixture(scope="module")
def clip_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("clips") / "clip.mp4", make_clip(), fps=FPS)


# ---------------------------------------------------------------------------- segmentation of an mp4


def test_mp4_mask_overlay_frames_equal_nifti_prediction(
    tmp_path: Path, seg_ckpt: Path, clip_mp4: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[int, int]] = []
    real_read = ClipSource.read

    def spy(self: ClipSource, start: int, count: int, *args: object, **kwargs: object) -> np.ndarray:
        reads.append((start, count))
        return real_read(self, start, count, *args, **kwargs)

    monkeypatch.setattr(ClipSource, "read", spy)
    monkeypatch.setattr(video, "READ_CHUNK_BYTES", 3 * 4 * H * W)  # the planning pass reads 3 frames at a time
    out = tmp_path / "out"
    [res] = infer_files(seg_ckpt, [clip_mp4], out, frames=True, overlap=0.5)
    assert res.status == "ok", res.message
    assert res.output == out / "clip_seg.mp4" and res.overlay == out / "clip_overlay.mp4"
    assert res.frames == out / "clip_seg_frames"

    # Read window by window: never more than a window's depth (8 frames) at once, each frame at most twice
    # (the planning pass and the prediction pass).
    assert reads and max(c for _, c in reads) <= 8
    hits = np.zeros(T, int)
    for s, c in reads:
        hits[s : s + c] += 1
    assert hits.max() <= 2 and hits.min() >= 1

    mask, rate, size = read_back(res.output, "gray")
    assert mask.shape == (T, H, W) and size == (H, W) and rate == Fraction(FPS)
    assert set(np.unique(mask)) <= {0, 1, 2} and len(np.unique(mask[1:, 3:])) > 1
    assert (mask[0] == 0).all() and (mask[:, :3] == 0).all()  # outside the foreground box: background

    # The same volume through the NIfTI path (identity affine, as training reads clips) gives the same labels.
    with open_clip(clip_mp4) as src:
        decoded = src.read(0, T, grey=True)[0]
    nii = tmp_path / "clip.nii.gz"
    nib.save(nib.Nifti1Image(decoded, np.eye(4)), nii)
    [ref] = infer_files(seg_ckpt, [nii], tmp_path / "nifti", overlap=0.5)
    np.testing.assert_array_equal(mask, np.asarray(nib.load(ref.output).dataobj))

    overlay, rate, size = read_back(res.overlay, "rgb24")
    assert overlay.shape == (T, H, W, 3) and rate == Fraction(FPS)
    grey = np.rint(decoded * 255.0)
    fg = mask > 0
    assert np.abs(overlay[~fg].astype(float) - grey[~fg][:, None]).mean() < 8  # background: the frame itself
    spread = overlay.max(axis=-1).astype(float) - overlay.min(axis=-1)
    assert spread[fg].mean() > 40 > spread[~fg].mean()  # classes: coloured

    pngs = sorted(res.frames.iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(T)]
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), mask)


# ---------------------------------------------------------------------------- restoration of a frame folder


def test_frame_folder_restoration_in_colour(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    cfg = dynunet_config(3, 3)
    ckpt = tmp_path / "restore.pt"
    pre = {"spacing": None, "orientation": "RAS", "intensity": "none", "crop_foreground": False, "in_channels": 3}
    save_checkpoint(ckpt, model_state=build_model(cfg).state_dict(), model_config=cfg, preprocessing=pre,
                    class_names=["r", "g", "b"], extra={"config": {"task": "restoration"}})
    t, h, w = 9, 21, 26  # odd height
    clip = make_clip(t, h, w, colour=True)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(t):  # natural order: f2 before f10
        Image.fromarray(np.rint(np.moveaxis(clip[:, i], 0, -1) * 255).astype(np.uint8)).save(folder / f"f{i}.png")
    nii = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), nii)
    out = tmp_path / "out"
    assert main([str(ckpt), str(folder), str(nii), "-o", str(out), "--no-progress", "--frames", "--fps", "12.5"]) == 1
    err = capsys.readouterr().err
    assert "2 file(s): 1 restored, 0 skipped (existing output), 1 failed" in err
    assert f"FAILED {nii}: a restoration checkpoint takes clips" in err
    restored, rate, size = read_back(out / "frames_restored.mp4", "rgb24")
    assert restored.shape == (t, h, w, 3) and rate == Fraction(25, 2) and size == (h, w)
    assert not (out / "frames_overlay.mp4").exists()
    assert len(list((out / "frames_restored_frames").iterdir())) == t

    # Values: the whole-volume sliding window of the same network, clipped to [0, 1] (H.264 4:4:4, qp 0: a few levels).
    model = model_from_checkpoint(load_checkpoint(ckpt)).eval()
    with open_clip(folder) as src:
        volume = torch.from_numpy(src.read(0, t))
    whole = predict_logits(model, volume, WindowSettings(roi_size=(8, 16, 16)))
    expected = np.rint(np.clip(whole.numpy(), 0, 1) * 255)
    assert np.abs(np.moveaxis(restored, -1, 0).astype(float) - expected).max() <= 3
    png = np.stack([np.asarray(Image.open(p)) for p in sorted((out / "frames_restored_frames").iterdir())])
    assert np.abs(np.moveaxis(png, -1, 0).astype(float) - expected).max() <= 1


def test_checkpoint_task() -> None:
    assert checkpoint_task({}) == "segmentation"
    assert checkpoint_task({"config": {"task": "restoration"}}) == "restoration"
    with pytest.raises(ValueError, match="task must be one of"):
        checkpoint_task({"config": {"task": "denoise"}})


# ---------------------------------------------------------------------------- bad clips


def test_bad_clips_one_line_each_nothing_written(
    tmp_path: Path, threshold_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "in"
    bad.mkdir()
    good = write_video(bad / "good.mp4", make_clip(6, 16, 16), fps=FPS)
    (bad / "garbage.mp4").write_bytes(b"this is not a video" * 20)
    data = good.read_bytes()
    (bad / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    avi = write_video(tmp_path / "whole.avi", make_clip(6, 16, 16), fps=FPS)
    (bad / "cut.avi").write_bytes(avi.read_bytes()[: avi.stat().st_size * 7 // 10])
    container = av.open(str(bad / "empty.mkv"), "w")  # a stream and no frames
    stream = container.add_stream("ffv1", rate=10)
    stream.width, stream.height, stream.pix_fmt = 16, 16, "gray"
    container.start_encoding()
    container.mux(stream.encode(None))
    container.close()
    no_frames = tmp_path / "no_frames"
    no_frames.mkdir()
    broken = tmp_path / "broken_frames"  # opens (headers fine), fails half-way through
    broken.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(broken / f"{i:02d}.png")
    last = broken / "05.png"
    last.write_bytes(last.read_bytes()[:150])  # header intact, pixel data cut

    out = tmp_path / "out"
    code = main([str(threshold_ckpt), str(bad), str(no_frames), str(broken), "-o", str(out), "--no-progress",
                 "--frames"])
    err = capsys.readouterr().err
    assert code == 1
    failed = [line for line in err.splitlines() if line.startswith("FAILED ")]
    names = {Path(line.split()[1].rstrip(":")).name for line in failed}
    assert names == {"garbage.mp4", "cut.mp4", "cut.avi", "empty.mkv", "no_frames", "broken_frames"}, err
    assert len(failed) == 6
    assert "6 failed" in err and "1 segmented" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "good_overlay.mp4", "good_seg.mp4", "good_seg_frames", "summary.csv", "summary.json"
    ]


# ---------------------------------------------------------------------------- skip / overwrite


def test_rerun_skips_existing_outputs_and_overwrite_rewrites(
    tmp_path: Path, threshold_ckpt: Path, clip_mp4: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = [str(threshold_ckpt), str(clip_mp4), "-o", str(out), "--no-progress", "--frames"]
    assert main(args) == 0
    paths = [out / "clip_seg.mp4", out / "clip_overlay.mp4", out / "clip_seg_frames"]
    first = [os.stat(p).st_ino for p in paths]
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "1 skipped" in err and "--overwrite" in err
    assert [os.stat(p).st_ino for p in paths] == first
    assert main([*args, "--overwrite"]) == 0
    assert "1 segmented" in capsys.readouterr().err
    assert all(os.stat(p).st_ino != i for p, i in zip(paths, first))
    mask, _, _ = read_back(paths[0], "gray")
    assert mask.shape == (T, H, W)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # A run over the output folder takes none of the outputs for inputs.
    files, _ = collect_inputs([out], exclude_dir=out, exclude_suffix=("_seg", "_overlay", "_seg_frames"))
    assert files == []


# ---------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize(
    "shape, roi, overlap",
    [
        ((23, 13, 9), (8, 8, 16), 0.5),
        ((5, 13, 9), (8, 8, 8), 0.25),  # shorter than a window: one slab
        ((17, 7, 12), (6, 6, 6), 0.6),
        ((9, 9, 9), (8, 8, 8), 0.0),
    ],
)
def test_stream_logits_is_the_whole_volume_window(shape: tuple, roi: tuple, overlap: float, one_thread: None) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 3, padding=1))
    x = torch.randn(2, *shape)
    settings = WindowSettings(roi_size=roi, overlap=overlap, sw_batch_size=1)
    whole = predict_logits(net.eval(), x, settings)
    asked: list[tuple[int, int]] = []

    def read(start: int, count: int) -> torch.Tensor:
        asked.append((start, count))
        return x[:, start : start + count]

    blocks = list(stream_logits(lambda s: predict_logits(net, s, settings), read, shape[0], settings))
    assert [s for s, _ in blocks] == list(np.cumsum([0] + [b.shape[1] for _, b in blocks[:-1]]))
    assert {c for _, c in asked} == {min(shape[0], roi[0])}  # one window deep (the whole axis when shorter)
    torch.testing.assert_close(torch.cat([b for _, b in blocks], dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("crop", [True, False], ids=["crop-grey-border", "no-crop-inner-zeros"])
def test_plan_matches_monai_crop_and_zscore(tmp_path: Path, crop: bool) -> None:
    """Box and statistics from one chunked pass equal CropForeground + NormalizeIntensity(nonzero) on the whole clip."""
    clip = make_clip(seed=3)
    if crop:  # a non-zero constant border, the minimum: its share is taken out of the whole-frame sums
        clip = np.where(clip == 0, 0.2, np.maximum(clip, 0.25)).astype(np.float32)
    else:  # zeros inside: left out of the statistics
        clip[4:6, 10:14, 10:20] = 0.0
    path = write_video(tmp_path / "c.mp4", clip, fps=FPS)
    pre = Preprocessing(spacing=None, intensity="zscore", crop_foreground=crop, in_channels=1)
    with open_clip(path) as src:
        whole = src.read(0, T, grey=True)
        video.READ_CHUNK_BYTES, old = 4 * H * W * 2, video.READ_CHUNK_BYTES
        try:
            plan = video.plan_clip(src, pre, grey=True, channels=1)
        finally:
            video.READ_CHUNK_BYTES = old
    if crop:
        cropper = CropForeground(select_fn=lambda x: x > x.min(), allow_smaller=True)
        start, end = cropper.compute_bounding_box(torch.from_numpy(whole))
        assert plan.box == tuple(slice(int(a), int(b)) for a, b in zip(start, end))
        assert plan.box == (slice(1, T), slice(3, H), slice(0, W))
    else:
        assert plan.box == (slice(0, T), slice(0, H), slice(0, W))
    inside = torch.from_numpy(whole[(slice(None), *plan.box)])
    values = inside[inside != 0]
    assert values.numel() < inside.numel() or crop
    assert plan.subtrahend[0] == pytest.approx(values.double().mean().item(), rel=1e-9)
    assert plan.divisor[0] == pytest.approx(values.double().std(unbiased=False).item(), rel=1e-9)
