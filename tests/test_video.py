"""app.data.video: PyAV round trips, the MONAI reader, and video datasets through the pipeline (CPU, small)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImaged

from app.data import (
    DataError,
    Preprocessing,
    build_loaders,
    load_datalist,
    make_synthetic_video_dataset,
    read_video_volume,
    train_transforms,
    val_transforms,
)
from app.data.video import VideoReader, read_video_info, write_video

CLIP = (10, 20, 22)  # (T, H, W)


def _ramp(shape: tuple[int, ...] = CLIP) -> np.ndarray:
    """Smooth content (codecs keep it well): a moving diagonal ramp in [0.1, 0.9]."""
    t, h, w = np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in shape[-3:]], indexing="ij")
    return (0.1 + 0.8 * (0.5 * (h + w) * 0.7 + 0.3 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_video_dataset(tmp_path_factory.mktemp("vid") / "ds", n_train=3, n_val=1, shape=(12, 24, 26),
                                        colour=False, masks="nifti")


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".avi"])
def test_write_then_read_grey(tmp_path: Path, suffix: str) -> None:
    clip = _ramp()
    path = write_video(tmp_path / f"clip{suffix}", clip, fps=12)
    back = read_video_volume(path)
    assert back.shape == CLIP and back.dtype == np.float32
    assert 0.0 <= back.min() and back.max() <= 1.0
    assert np.abs(back - clip).max() < 4 / 255  # near-lossless codecs
    assert read_video_info(path).shape == CLIP


def test_read_colour_resize_and_max_frames(tmp_path: Path) -> None:
    clip = np.stack([_ramp(), _ramp()[:, ::-1], 1.0 - _ramp()])  # (3, T, H, W)
    path = write_video(tmp_path / "rgb.mp4", clip)
    back = read_video_volume(path, grayscale=False)
    assert back.shape == (3, *CLIP)
    assert np.abs(back - clip).mean() < 4 / 255
    small = read_video_volume(path, size=(8, 12), max_frames=4)
    assert small.shape == (4, 8, 12)


def test_bad_videos_raise_with_the_path(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01 definitely not a video" * 50)
    truncated = write_video(tmp_path / "truncated.mp4", _ramp())
    truncated.write_bytes(truncated.read_bytes()[:200])
    for path in (garbage, truncated, tmp_path / "missing.mp4"):
        with pytest.raises(DataError) as info:
            read_video_volume(path)
        assert str(info.value).startswith(str(path))
        with pytest.raises(DataError, match=str(path)):
            read_video_info(path)
    with pytest.raises(DataError, match="neither"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 3, 8, 8)))


def test_video_reader_in_monai_loader(tmp_path: Path) -> None:
    path = write_video(tmp_path / "c.mkv", _ramp())
    loader = LoadImaged("image", image_only=False)
    loader.register(VideoReader())
    out = loader({"image": str(path)})
    assert tuple(out["image"].shape) == CLIP
    assert np.allclose(out["image"].affine.numpy(), np.eye(4))
    assert out["image"].meta["filename_or_obj"] == str(path)


def test_synthetic_video_dataset(video_root: Path) -> None:
    meta = json.loads((video_root / "dataset.json").read_text())
    assert meta["modality"] == "video" and len(meta["training"]) == 3 and len(meta["validation"]) == 1
    for item in meta["training"]:
        assert item["image"].endswith(".mp4")
        label = nib.load(video_root / item["label"])
        assert label.shape == (12, 24, 26)
        assert set(np.unique(np.asarray(label.dataobj)).tolist()) == {0, 1, 2}
        frames = read_video_volume(video_root / item["image"])
        assert frames.shape == (12, 24, 26)
    assert make_synthetic_video_dataset(video_root, n_train=3, n_val=1, shape=(12, 24, 26), colour=False,
                                        masks="nifti") == video_root
    with pytest.raises(DataError, match=str(video_root)):
        make_synthetic_video_dataset(video_root, n_train=3, n_val=1, shape=(12, 24, 28), colour=False, masks="nifti")


def test_video_datalist_and_transforms(video_root: Path) -> None:
    dl = load_datalist(video_root)
    assert dl.modality == "video" and dl.n_classes == 3 and dl.n_channels == 1
    assert dl.median_shape == (12, 24, 26)
    patches = train_transforms(Preprocessing(), (8, 16, 16), dl.n_classes, num_samples=2)(dl.train[0])
    assert len(patches) == 2
    for patch in patches:
        assert tuple(patch["image"].shape) == (1, 8, 16, 16)
        assert tuple(patch["label"].shape) == (1, 8, 16, 16)
    whole = val_transforms(Preprocessing(crop_foreground=False))(dl.val[0])
    assert tuple(whole["image"].shape) == (1, 12, 24, 26) == tuple(whole["label"].shape)
    colour = val_transforms(Preprocessing(in_channels=3, crop_foreground=False))(dl.val[0])
    assert tuple(colour["image"].shape) == (3, 12, 24, 26)
    train, val = build_loaders(dl, Preprocessing(), (8, 16, 16), 3, batch_size=2)
    batch = next(iter(train))
    assert tuple(batch["image"].shape) == (2, 1, 8, 16, 16)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0, 2.0}
    assert next(iter(val))["image"].shape[:2] == (1, 1)


def test_video_label_mismatch_names_both_files(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    image = write_video(root / "imagesTr" / "a.mp4", _ramp())
    label = root / "labelsTr" / "a.nii.gz"
    label.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((10, 20, 23), np.uint8), np.eye(4)), label)
    with pytest.raises(DataError) as info:
        load_datalist(root)
    assert str(info.value).startswith(str(label)) and str(image) in str(info.value)
    nib.save(nib.Nifti1Image(np.zeros(CLIP, np.uint8), np.eye(4)), label)
    assert load_datalist(root, val_fraction=0.0).modality == "video"
