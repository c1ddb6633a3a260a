"""Per-frame masks of clips: mask videos and PNG folders (palette and grey) read as class ids, through
the data list, the checks and the preprocessed cache; bad clips and masks end in one-line errors
naming the file(s) (CPU, small)."""

from __future__ import annotations

import shutil
from pathlib import Path

import av
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from app.data import (
    DataError,
    Preprocessing,
    load_datalist,
    make_synthetic_video_dataset,
    open_clip,
    prepare_datalist,
    read_mask_clip,
    scan_cases,
    write_video,
)
from app.data.video import write_mask_pngs

SHAPE = (8, 24, 32)  # (T, H, W)


def _labels(shape: tuple[int, int, int] = SHAPE, top: int = 3) -> np.ndarray:
    """Class ids 0..top in moving bands, every class in every frame."""
    t, h, w = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return ((w // 4 + t) % (top + 1)).astype(np.uint8)


def _one_line(error: pytest.ExceptionInfo, *paths: Path) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    for path in paths:
        assert str(path) in text, (path, text)
    return text


# ----------------------------------------------------------------------------- reading masks


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_mask_video_gives_the_class_ids(tmp_path: Path, suffix: str) -> None:
    labels = _labels()
    path = write_video(tmp_path / f"mask{suffix}", labels)
    masks = read_mask_clip(path, *SHAPE)
    assert masks.dtype == np.int64 and masks.shape == SHAPE
    np.testing.assert_array_equal(masks, labels)


def test_palette_and_grey_png_folders(tmp_path: Path) -> None:
    labels = _labels()
    palette = write_mask_pngs(tmp_path / "palette", labels)
    assert Image.open(next(palette.iterdir())).mode == "P"
    np.testing.assert_array_equal(read_mask_clip(palette, *SHAPE), labels)
    grey = tmp_path / "grey"
    grey.mkdir()
    for t, frame in enumerate(labels):
        Image.fromarray(frame, mode="L").save(grey / f"m{t}.png")  # m0 .. m7, natural order
    np.testing.assert_array_equal(read_mask_clip(grey, *SHAPE), labels)
    deep = tmp_path / "deep"
    deep.mkdir()
    many = labels.astype(np.uint16) * 300  # values above 255 in 16-bit grey PNGs
    for t, frame in enumerate(many):
        Image.fromarray(frame).save(deep / f"{t:02d}.png")
    np.testing.assert_array_equal(read_mask_clip(deep), many)  # geometry taken from the masks themselves


def test_masks_from_video_png_and_nifti_preprocess_the_same(tmp_path: Path) -> None:
    pre = Preprocessing(in_channels=3, orientation=None, crop_foreground=False)
    cases = {}
    for masks in ("video", "png", "nifti"):
        root = make_synthetic_video_dataset(tmp_path / masks, n_train=2, n_val=1, shape=SHAPE, masks=masks)
        datalist = load_datalist(root)
        assert datalist.modality == "video" and datalist.n_classes == 3 and datalist.median_shape == SHAPE
        scan_cases(datalist.train + datalist.val, 3, pre)
        train, _ = prepare_datalist(datalist, pre, 3, "disk", tmp_path / "cache", progress=False)
        cases[masks] = train.case(0)
    for masks in ("png", "nifti"):
        np.testing.assert_array_equal(cases[masks].image, cases["video"].image)
        np.testing.assert_array_equal(cases[masks].label, cases["video"].label)
    assert cases["video"].image.shape == (3, *SHAPE) and set(np.unique(cases["video"].label)) == {0, 1, 2}


def test_generated_data_set_with_mask_folders_is_reused(tmp_path: Path) -> None:
    root = make_synthetic_video_dataset(tmp_path / "ds", n_train=1, n_val=1, shape=SHAPE, masks="png")
    first = root / "labelsTr" / "clip_000" / "00000.png"
    first.write_bytes(first.read_bytes())  # a new modification time, same content
    stamp = first.stat().st_mtime_ns
    assert make_synthetic_video_dataset(root, n_train=1, n_val=1, shape=SHAPE, masks="png") == root
    assert first.stat().st_mtime_ns == stamp  # found complete: nothing rewritten


def test_frame_folder_images_with_mask_folders(tmp_path: Path) -> None:
    """imagesTr/<case>/ frame folders pair with labelsTr/<case>/ mask folders by name."""
    root = tmp_path / "folders"
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        frames = root / "imagesTr" / case
        frames.mkdir(parents=True)
        for t in range(SHAPE[0]):
            Image.fromarray((rng.random((*SHAPE[1:], 3)) * 255).astype(np.uint8)).save(frames / f"{t}.png")
        write_mask_pngs(root / "labelsTr" / case, _labels(top=1))
    datalist = load_datalist(root, val_fraction=0.5)
    assert datalist.modality == "video" and datalist.class_names == ["background", "label_1"]
    assert Path(datalist.train[0]["image"]).is_dir() and datalist.median_shape == SHAPE
    train, val = prepare_datalist(datalist, Preprocessing(in_channels=3, crop_foreground=False), 2, "memory",
                                  progress=False)
    assert train.case(0).image.shape == (3, *SHAPE) and val.case(0).label.shape == (1, *SHAPE)


def test_clips_without_labels_for_restoration(tmp_path: Path) -> None:
    for name in ("x", "y", "z"):
        write_video(tmp_path / "clips" / f"{name}.mp4", _labels() * 60)
    datalist = load_datalist(tmp_path / "clips", labels=False, val_fraction=0.34)
    assert datalist.class_names == [] and len(datalist.train) == 2 and len(datalist.val) == 1
    assert all(set(item) == {"image"} for item in datalist.train + datalist.val)
    train, _ = prepare_datalist(datalist, Preprocessing(intensity="none", crop_foreground=False), 0, "disk",
                                tmp_path / "cache", progress=False)
    assert train.case(0).image.shape == (1, *SHAPE) and train.case(0).label.size == 0


# ----------------------------------------------------------------------------- bad clips and masks


def test_corrupt_truncated_and_zero_frame_clips(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01 not a video at all " * 64)
    whole = write_video(tmp_path / "whole.mkv", _labels() * 60)
    truncated = tmp_path / "truncated.mkv"
    truncated.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    cut_mp4 = tmp_path / "cut.mp4"
    cut_mp4.write_bytes(write_video(tmp_path / "full.mp4", _labels() * 60).read_bytes()[:-300])
    empty = tmp_path / "no_frames"
    empty.mkdir()
    (empty / "readme.txt").write_text("frames go here")
    no_video = tmp_path / "no_video.mp4"
    with av.open(str(no_video), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    for path, problem in [(garbage, "cannot open"), (truncated, "truncated"), (cut_mp4, "truncated|cannot open"),
                          (empty, "zero frames"), (no_video, "zero frames"), (tmp_path / "missing.mp4", "not found")]:
        with pytest.raises(DataError, match=problem) as info:
            open_clip(path)
        assert _one_line(info, path).startswith(str(path))


def test_bad_frame_folders(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for t in range(3):
        Image.fromarray(np.full((16, 20), 40 * t, np.uint8)).save(folder / f"{t}.png")
    odd = folder / "3.png"
    Image.fromarray(np.zeros((16, 18), np.uint8)).save(odd)
    with pytest.raises(DataError, match="all frames of a clip need one size") as info:
        open_clip(folder)
    _one_line(info, odd)
    odd.write_bytes(b"PNG? no")
    with pytest.raises(DataError, match="cannot read the frame image") as info:
        open_clip(folder)
    _one_line(info, odd)


def test_bad_masks(tmp_path: Path) -> None:
    clip = write_video(tmp_path / "clip.mp4", _labels() * 60)
    short = write_video(tmp_path / "short.mp4", _labels()[:6])
    with pytest.raises(DataError, match="6 frames of 24x32") as info:
        read_mask_clip(short, *SHAPE, clip=clip)
    _one_line(info, short, clip)
    folder = write_mask_pngs(tmp_path / "pngs", _labels()[:7])
    with pytest.raises(DataError, match="7 mask frames") as info:
        read_mask_clip(folder, *SHAPE, clip=clip)
    _one_line(info, folder, clip)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for t in range(SHAPE[0]):
        Image.fromarray(np.zeros((*SHAPE[1:], 3), np.uint8)).save(rgb / f"{t}.png")
    with pytest.raises(DataError, match="palette or grey") as info:
        read_mask_clip(rgb, *SHAPE, clip=clip)
    _one_line(info, rgb)


@pytest.mark.parametrize("masks", ["video", "png", "nifti"])
def test_mismatched_masks_in_a_data_set_name_both_files(tmp_path: Path, masks: str) -> None:
    root = make_synthetic_video_dataset(tmp_path / "ds", n_train=2, n_val=1, shape=SHAPE, masks=masks)
    image = root / "imagesTr" / "clip_001.mp4"
    label = next(p for p in (root / "labelsTr").iterdir() if p.name.startswith("clip_001"))
    wrong = _labels((SHAPE[0] - 1, *SHAPE[1:]), top=2)  # one frame short
    if masks == "video":
        write_video(label, wrong)
    elif masks == "png":
        shutil.rmtree(label)
        write_mask_pngs(label, wrong)
    else:
        nib.save(nib.Nifti1Image(wrong, np.eye(4)), label)
    with pytest.raises(DataError) as info:
        load_datalist(root)
    assert _one_line(info, label, image).startswith(str(label))


def test_mask_values_outside_the_classes_stop_preprocessing(tmp_path: Path) -> None:
    root = make_synthetic_video_dataset(tmp_path / "ds", n_train=2, n_val=1, shape=SHAPE, masks="png")
    label = root / "labelsTr" / "clip_000"
    shutil.rmtree(label)
    write_mask_pngs(label, _labels(top=5))
    datalist = load_datalist(root)
    with pytest.raises(DataError, match=r"label values span 0\.\.5") as info:
        prepare_datalist(datalist, Preprocessing(in_channels=3), 3, "memory", progress=False)
    _one_line(info, label)
