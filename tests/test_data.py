"""app.data: NIfTI checks, datalists, synthetic / MNI datasets, transforms and loaders (CPU, small)."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from app.data import (
    DataError,
    DataList,
    Preprocessing,
    build_loaders,
    infer_transforms,
    load_datalist,
    make_mni_dataset,
    make_synthetic_dataset,
    save_like,
    train_transforms,
    val_transforms,
)
from app.data.datalist import check_pair
from app.data.nifti import read_header_info
from app.data.transforms import CheckLabelsd

SHAPE = (24, 26, 28)


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def _case(shape: tuple[int, ...] = (12, 13, 14), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(1.0, 0.1, size=shape).astype(np.float32)
    label = np.zeros(shape[:3], dtype=np.uint8)
    label[2:6, 3:7, 4:8] = 1
    label[7:10, 8:11, 2:5] = 2
    return image, label


def _folder(root: Path, n: int = 3, suffix: str = "") -> Path:
    """imagesTr/labelsTr pairs without dataset.json."""
    for i in range(n):
        image, label = _case(seed=i)
        _save(root / "imagesTr" / f"case_{i}{suffix}.nii.gz", image)
        _save(root / "labelsTr" / f"case_{i}.nii.gz", label)
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "ds", n_train=3, n_val=1, shape=SHAPE, seed=1)


# ------------------------------------------------------------------------------ synthetic data


def test_synthetic_dataset_is_complete_and_consistent(synthetic: Path) -> None:
    meta = json.loads((synthetic / "dataset.json").read_text())
    assert meta["labels"]["0"] == "background" and len(meta["labels"]) == 3
    assert len(meta["training"]) == 3 and len(meta["validation"]) == 1
    assert meta["synthetic"]["shape"] == list(SHAPE)
    for item in meta["training"] + meta["validation"]:
        image = nib.load(synthetic / item["image"])
        label = nib.load(synthetic / item["label"])
        assert image.shape == label.shape == SHAPE
        np.testing.assert_allclose(image.affine, label.affine)
        values = np.unique(np.asarray(label.dataobj))
        assert values.tolist() == [0, 1, 2]
        data = image.get_fdata()
        assert np.isfinite(data).all() and data.std() > 0


def test_synthetic_classes_differ_in_intensity(synthetic: Path) -> None:
    image = nib.load(synthetic / "imagesTr" / "case_000.nii.gz").get_fdata()
    label = np.asarray(nib.load(synthetic / "labelsTr" / "case_000.nii.gz").dataobj)
    means = [image[label == c].mean() for c in range(3)]
    assert means[0] < means[1] < means[2]


def test_synthetic_dataset_is_reused_not_rewritten(synthetic: Path) -> None:
    files = sorted(synthetic.rglob("*.nii.gz"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = make_synthetic_dataset(synthetic, n_train=3, n_val=1, shape=SHAPE, seed=1)
    assert again == synthetic
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_synthetic_refuses_to_overwrite(synthetic: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(synthetic)):
        make_synthetic_dataset(synthetic, n_train=3, n_val=1, shape=SHAPE, seed=2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=str(other)):
        make_synthetic_dataset(other, shape=SHAPE)
    assert (other / "notes.txt").read_text() == "mine"


def test_synthetic_finishes_an_interrupted_generation(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "ds", n_train=2, n_val=0, shape=SHAPE, n_classes=4)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    make_synthetic_dataset(root, n_train=2, n_val=0, shape=SHAPE, n_classes=4)
    assert load_datalist(root, val_fraction=0.0).n_classes == 4


def test_synthetic_default_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_synthetic_dataset(tmp_path / "default")
    assert time.perf_counter() - start < 5.0


def test_synthetic_anisotropic_spacing(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "aniso", n_train=1, n_val=0, shape=SHAPE, spacing=(0.8, 1.0, 2.5))
    info = read_header_info(root / "imagesTr" / "case_000.nii.gz")
    np.testing.assert_allclose(info.spacing, (0.8, 1.0, 2.5))


# ------------------------------------------------------------------------------ datalists


def test_load_datalist_decathlon(synthetic: Path) -> None:
    dl = load_datalist(synthetic)
    assert isinstance(dl, DataList)
    assert dl.root == synthetic and dl.modality == "MRI" and dl.n_classes == 3
    assert dl.class_names[0] == "background"
    assert len(dl.train) == 3 and len(dl.val) == 1  # the json's own validation list
    for item in dl.train + dl.val:
        assert set(item) == {"image", "label"}
        assert Path(item["image"]).is_absolute() and Path(item["image"]).is_file()
        assert "/./" not in item["image"]
    assert dl.n_channels == 1 and dl.median_shape == SHAPE and dl.median_spacing == (1.0, 1.0, 1.0)


def test_load_datalist_splits_deterministically(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "ds", n_train=10, n_val=0, shape=SHAPE)
    a = load_datalist(root, val_fraction=0.3, seed=4, validate=False)
    b = load_datalist(root, val_fraction=0.3, seed=4, validate=False)
    c = load_datalist(root, val_fraction=0.3, seed=5, validate=False)
    assert a.train == b.train and a.val == b.val and len(a.val) == 3
    assert {i["image"] for i in a.val} != {i["image"] for i in c.val}
    assert not {i["image"] for i in a.train} & {i["image"] for i in a.val}
    assert len(load_datalist(root, val_fraction=0.0, validate=False).val) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        load_datalist(root, val_fraction=1.0)


def test_load_datalist_plain_folder_with_channel_suffix(tmp_path: Path) -> None:
    root = _folder(tmp_path / "plain", n=4, suffix="_0000")
    (root / "imagesTr" / "._case_0_0000.nii.gz").write_bytes(b"\x00\x05")  # macOS resource fork: ignored
    dl = load_datalist(root, val_fraction=0.25)
    assert dl.class_names == ["background", "label_1", "label_2"]
    assert len(dl.train) == 3 and len(dl.val) == 1
    for item in dl.train + dl.val:
        case = Path(item["label"]).name.removesuffix(".nii.gz")
        assert Path(item["image"]).name == f"{case}_0000.nii.gz"


def test_load_datalist_nnunet_v2_labels(tmp_path: Path) -> None:
    root = _folder(tmp_path / "v2")
    labels = {"background": 0, "liver": 1, "tumour": 2}
    meta = {"channel_names": {"0": "CT"}, "labels": labels, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    dl = load_datalist(root)
    assert dl.class_names == ["background", "liver", "tumour"] and dl.modality == "CT"


def test_load_datalist_multichannel(tmp_path: Path) -> None:
    root = tmp_path / "mc"
    for i in range(2):
        image, label = _case(shape=(12, 13, 14, 2), seed=i)
        _save(root / "imagesTr" / f"c{i}.nii.gz", image)
        _save(root / "labelsTr" / f"c{i}.nii.gz", label)
    assert load_datalist(root).n_channels == 2


def _break_missing_label(root: Path) -> Path:
    path = root / "labelsTr" / "case_1.nii.gz"
    path.unlink()
    return path


def _break_shape(root: Path) -> Path:
    return _save(root / "labelsTr" / "case_1.nii.gz", np.zeros((12, 13, 15), np.uint8))


def _break_affine(root: Path) -> Path:
    return _save(root / "labelsTr" / "case_2.nii.gz", _case()[1], np.diag([1.0, 1.0, 1.5, 1.0]))


def _break_2d(root: Path) -> Path:
    return _save(root / "imagesTr" / "case_0.nii.gz", np.zeros((12, 13), np.float32))


def _break_5d(root: Path) -> Path:
    return _save(root / "imagesTr" / "case_0.nii.gz", np.zeros((12, 13, 14, 1, 2), np.float32))


def _break_4d_label(root: Path) -> Path:
    return _save(root / "labelsTr" / "case_0.nii.gz", np.zeros((12, 13, 14, 2), np.uint8))


def _break_truncated_gz(root: Path) -> Path:
    path = root / "imagesTr" / "case_2.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _break_truncated_nii(root: Path) -> Path:
    path = root / "imagesTr" / "case_2.nii"
    (root / "imagesTr" / "case_2.nii.gz").unlink()
    _save(path, _case()[0])
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _break_garbage(root: Path) -> Path:
    path = root / "labelsTr" / "case_0.nii.gz"
    path.write_bytes(b"this is not a NIfTI file" * 10)
    return path


def _break_bad_gzip_body(root: Path) -> Path:
    path = root / "imagesTr" / "case_1.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    packed = bytearray(gzip.compress(raw))
    packed[len(packed) // 2 : len(packed) // 2 + 64] = bytes(64)  # corrupt the middle, keep the trailer
    path.write_bytes(bytes(packed))
    return path


def _break_empty_folder(root: Path) -> Path:
    for f in (root / "imagesTr").iterdir():
        f.unlink()
    return root / "imagesTr"


def _break_no_layout(root: Path) -> Path:
    shutil.rmtree(root / "imagesTr")
    return root


def _break_json_missing_file(root: Path) -> Path:
    items = [{"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"} for i in range(3)]
    items[2]["image"] = "./imagesTr/case_9.nii.gz"
    meta = {"labels": {"0": "background", "1": "a", "2": "b"}, "training": items}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root / "imagesTr" / "case_9.nii.gz"


def _break_json_syntax(root: Path) -> Path:
    path = root / "dataset.json"
    path.write_text('{"labels": {"0": "background"},')
    return path


@pytest.mark.parametrize(
    "breaker, words",
    [
        (_break_missing_label, "label not found"),
        (_break_shape, "does not match image shape"),
        (_break_affine, "affine"),
        (_break_2d, "2D"),
        (_break_5d, "5D"),
        (_break_4d_label, "labels must be 3D"),
        (_break_truncated_gz, "truncated"),
        (_break_truncated_nii, "truncated"),
        (_break_garbage, "cannot read"),
        (_break_empty_folder, "no images"),
        (_break_no_layout, "no dataset.json"),
        (_break_json_missing_file, "not found"),
        (_break_json_syntax, "JSON"),
    ],
)
def test_load_datalist_rejects_bad_input(tmp_path: Path, breaker, words: str) -> None:
    root = _folder(tmp_path / "bad")
    culprit = breaker(root)
    with pytest.raises(DataError) as info:
        load_datalist(root)
    message = str(info.value)
    assert message.startswith(str(culprit)), message
    assert words in message
    assert "\n" not in message


def _cause(error: BaseException, kind: type) -> BaseException | None:
    while error is not None and not isinstance(error, kind):
        error = error.__cause__
    return error


def test_corrupt_voxels_found_by_checksum_option(tmp_path: Path) -> None:
    """Damage inside the compressed voxels passes the header check; verify_checksums finds it."""
    root = _folder(tmp_path / "bad")
    culprit = _break_bad_gzip_body(root)
    load_datalist(root)
    with pytest.raises(DataError) as info:
        load_datalist(root, verify_checksums=True)
    assert str(info.value).startswith(str(culprit)) and "corrupt" in str(info.value)


def test_unloadable_file_fails_on_load_naming_the_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "bad")
    culprit = _break_truncated_gz(root)
    dl = load_datalist(root, val_fraction=0.0, validate=False)
    item = next(i for i in dl.train if i["image"] == str(culprit))
    with pytest.raises(RuntimeError) as info:
        val_transforms(Preprocessing())(item)
    cause = _cause(info.value, DataError)
    assert cause is not None and str(cause).startswith(str(culprit)) and "cannot load" in str(cause)


def test_nan_image_fails_naming_the_file(tmp_path: Path) -> None:
    image, label = _case()
    image[0, 0, :3] = np.nan
    path = _save(tmp_path / "nan.nii.gz", image)
    item = {"image": str(path), "label": str(_save(tmp_path / "l.nii.gz", label))}
    with pytest.raises(RuntimeError) as info:
        val_transforms(Preprocessing())(item)
    cause = _cause(info.value, DataError)
    assert cause is not None and str(path) in str(cause) and "3 NaN" in str(cause)


def test_check_pair_names_both_files(tmp_path: Path) -> None:
    image = _save(tmp_path / "img.nii.gz", np.zeros((8, 9, 10), np.float32))
    label = _save(tmp_path / "lab.nii.gz", np.zeros((8, 9, 11), np.uint8))
    with pytest.raises(DataError) as info:
        check_pair(image, label)
    assert str(label) in str(info.value) and str(image) in str(info.value)


def test_read_header_info_channels(tmp_path: Path) -> None:
    info = read_header_info(_save(tmp_path / "mc.nii.gz", np.zeros((8, 9, 10, 3), np.float32)))
    assert info.shape == (8, 9, 10) and info.n_channels == 3
    with pytest.raises(DataError, match="channels"):
        read_header_info(_save(tmp_path / "ts.nii.gz", np.zeros((8, 9, 10, 40), np.float32)))
    with pytest.raises(DataError, match="not a NIfTI"):
        read_header_info(_save(tmp_path / "x.nii.gz", np.zeros((4, 4, 4))).rename(tmp_path / "x.nrrd"))


def test_save_like_keeps_reference_grid(tmp_path: Path) -> None:
    affine = np.array([[0, 0, -2.0, 30], [-0.8, 0, 0, 10], [0, 1.2, 0, -5], [0, 0, 0, 1]])
    ref = nib.Nifti1Image(np.zeros((10, 11, 12), np.int16), affine)
    ref.header.set_slope_inter(0.5, -100)  # a CT-style scaling must not leak into the labels
    ref.set_sform(affine, code=2)
    ref_path = tmp_path / "ref.nii.gz"
    nib.save(ref, ref_path)
    seg = np.random.default_rng(0).integers(0, 3, size=(10, 11, 12))
    out = save_like(torch.as_tensor(seg), ref_path, tmp_path / "out" / "seg.nii.gz", dtype=np.uint8)
    back = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), seg)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, affine)
    assert int(back.header["sform_code"]) == 2
    with pytest.raises(DataError, match="does not fit"):
        save_like(seg[:-1], ref_path, tmp_path / "bad.nii.gz")


# ------------------------------------------------------------------------------ transforms


def test_preprocessing_plain_data_roundtrip() -> None:
    pre = Preprocessing(spacing=[1, 1, 2.5], intensity="CT", ct_window=[-100, 200], in_channels=2)
    assert pre.spacing == (1.0, 1.0, 2.5) and pre.intensity == "ct"
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert Preprocessing(spacing=1.5).spacing == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match="zscore"):
        Preprocessing(intensity="zscroe")
    with pytest.raises(ValueError, match="orientation"):
        Preprocessing(orientation="RAR")
    with pytest.raises(ValueError, match="unknown"):
        Preprocessing.from_dict({"spacng": None})


@pytest.mark.parametrize(
    "patch, num_samples, channels",
    [((16, 16, 16), 1, 1), ((32, 12, 20), 3, 1), ((8, 8, 8), 2, 2)],
)
def test_train_transforms_patches(tmp_path: Path, patch, num_samples: int, channels: int) -> None:
    image, label = _case(shape=(20, 21, 22, channels) if channels > 1 else (20, 21, 22))
    item = {
        "image": str(_save(tmp_path / "i.nii.gz", image)),
        "label": str(_save(tmp_path / "l.nii.gz", label)),
    }
    tf = train_transforms(Preprocessing(in_channels=channels, spacing=(1.0, 1.0, 1.0)), patch, 3, num_samples)
    tf.set_random_state(seed=0)
    out = tf(item)
    assert isinstance(out, list) and len(out) == num_samples
    for sample in out:
        assert tuple(sample["image"].shape) == (channels, *patch)
        assert tuple(sample["label"].shape) == (1, *patch)
        assert set(torch.unique(sample["label"]).tolist()) <= {0.0, 1.0, 2.0}
        assert torch.isfinite(sample["image"]).all()
        assert "label_cls_indices" not in sample


def test_train_transforms_reject_out_of_range_labels(tmp_path: Path) -> None:
    image, label = _case()
    label[0, 0, 0] = 7
    path = _save(tmp_path / "l.nii.gz", label)
    item = {"image": str(_save(tmp_path / "i.nii.gz", image)), "label": str(path)}
    with pytest.raises(RuntimeError) as info:
        train_transforms(Preprocessing(), 8, 3)(item)
    cause = _cause(info.value, DataError)
    assert isinstance(cause, DataError) and str(path) in str(cause) and "0..2" in str(cause)
    assert isinstance(CheckLabelsd("label", 3), CheckLabelsd)


def _oblique_case(tmp_path: Path) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """Axes permuted and flipped (voxel i -> -y, j -> z, k -> -x), anisotropic 0.7 / 2.0 / 1.3 mm."""
    affine = np.array([[0.0, 0.0, -1.3, 20.0], [-0.7, 0.0, 0.0, 8.0], [0.0, 2.0, 0.0, -12.0], [0.0, 0.0, 0.0, 1.0]])
    shape = (30, 9, 14)
    image = np.zeros(shape, np.float32) + 1.0
    label = np.zeros(shape, np.uint8)
    label[10:16, 3:6, 4:9] = 1
    image[label == 1] = 5.0
    item = {
        "image": str(_save(tmp_path / "img.nii.gz", image, affine)),
        "label": str(_save(tmp_path / "lab.nii.gz", label, affine)),
    }
    centroid = affine @ np.array([*np.argwhere(label == 1).mean(axis=0), 1.0])
    return item, affine, centroid[:3]


def test_val_transforms_reorient_and_resample(tmp_path: Path) -> None:
    item, affine, centroid = _oblique_case(tmp_path)
    out = val_transforms(Preprocessing(spacing=(1.0, 1.0, 1.0), crop_foreground=False))(item)
    image, label = out["image"], out["label"]
    out_affine = image.affine.numpy()
    np.testing.assert_allclose(np.diag(out_affine)[:3], (1.0, 1.0, 1.0), atol=1e-6)  # RAS, 1 mm
    np.testing.assert_allclose(out_affine[:3, :3], np.eye(3), atol=1e-6)
    extent = np.array([14 * 1.3, 30 * 0.7, 9 * 2.0])  # world extent per axis: R <- k, A <- i, S <- j
    assert np.all(np.abs(np.array(image.shape[1:]) - extent) <= 1.5), (image.shape, extent)
    assert image.shape == label.shape
    assert set(torch.unique(label).tolist()) == {0.0, 1.0}
    new_centroid = out_affine @ np.array([*np.argwhere(label[0].numpy() == 1).mean(axis=0), 1.0])
    np.testing.assert_allclose(new_centroid[:3], centroid, atol=1.0)
    assert abs(float(image.mean())) < 1e-4  # z-scored


def test_no_orientation_keeps_the_voxel_axes(tmp_path: Path) -> None:
    item, affine, _ = _oblique_case(tmp_path)
    pre = Preprocessing(orientation=None, crop_foreground=False)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    out = val_transforms(pre)(item)
    assert tuple(out["image"].shape) == (1, 30, 9, 14) and tuple(out["label"].shape) == (1, 30, 9, 14)
    np.testing.assert_allclose(out["image"].affine.numpy(), affine, atol=1e-6)
    np.testing.assert_array_equal(out["label"][0].numpy(), np.asarray(nib.load(item["label"]).dataobj))


def test_infer_transforms_invert_to_original_grid(tmp_path: Path) -> None:
    item, affine, _ = _oblique_case(tmp_path)
    pre = Preprocessing(spacing=(1.0, 1.0, 1.0))
    tf = infer_transforms(pre)
    data = tf({"image": item["image"]})
    assert "label" not in data
    data["pred"] = (data["image"] > 1.0).float()  # a "segmentation" in the preprocessed space
    inverted = Invertd("pred", transform=tf, orig_keys="image", nearest_interp=True)(data)
    pred = inverted["pred"]
    assert tuple(pred.shape) == (1, 30, 9, 14)
    truth = np.asarray(nib.load(item["label"]).dataobj)
    agreement = (pred[0].numpy() == truth).mean()
    assert agreement > 0.97
    out = save_like(pred[0], item["image"], tmp_path / "pred.nii.gz", dtype=np.uint8)
    np.testing.assert_allclose(nib.load(out).affine, affine)


def test_ct_intensity_window(tmp_path: Path) -> None:
    image = np.full((16, 16, 16), -1000.0, np.float32)
    image[4:12, 4:12, 4:12] = 40.0
    image[6:8, 6:8, 6:8] = 900.0
    label = (image > 0).astype(np.uint8)
    item = {"image": str(_save(tmp_path / "ct.nii.gz", image)), "label": str(_save(tmp_path / "l.nii.gz", label))}
    out = val_transforms(Preprocessing(intensity="ct", ct_window=(-175, 250)))(item)
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) == pytest.approx(1.0)
    assert tuple(out["image"].shape) == (1, 8, 8, 8)  # cropped to the body (above the window floor)


# ------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_build_loaders_batches(synthetic: Path, tmp_path: Path, cache: str) -> None:
    dl = load_datalist(synthetic)
    pre = Preprocessing(spacing=(1.2, 1.2, 1.2))
    train, val = build_loaders(
        dl, pre, (16, 16, 8), 3, batch_size=2, cache=cache, cache_dir=tmp_path / "cache", num_samples=2
    )
    batch = next(iter(train))
    assert tuple(batch["image"].shape) == (4, 1, 16, 16, 8)
    assert tuple(batch["label"].shape) == (4, 1, 16, 16, 8)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0, 2.0}
    vbatch = next(iter(val))
    assert vbatch["image"].shape[:2] == (1, 1) and vbatch["image"].shape == vbatch["label"].shape
    assert len(val) == 1
    if cache == "disk":
        assert len(list((tmp_path / "cache").glob("*.json"))) == 4  # one entry per case
        again = next(iter(train))  # now read back from the cache files
        assert tuple(again["image"].shape) == (4, 1, 16, 16, 8)


def test_build_loaders_checks(synthetic: Path) -> None:
    dl = load_datalist(synthetic)
    with pytest.raises(DataError, match="n_classes=4"):
        build_loaders(dl, Preprocessing(), 8, 4)
    with pytest.raises(DataError, match="in_channels=2"):
        build_loaders(dl, Preprocessing(in_channels=2), 8, 3)
    with pytest.raises(ValueError, match="memory"):
        build_loaders(dl, Preprocessing(), 8, 3, cache="ram")
    with pytest.raises(ValueError, match="distributed"):
        build_loaders(dl, Preprocessing(), 8, 3, distributed=True)


# ------------------------------------------------------------------------------ MNI152


def test_mni_dataset_from_package_data(tmp_path: Path) -> None:
    pytest.importorskip("nilearn")
    root = make_mni_dataset(tmp_path / "mni", shape=(40, 48, 40), n_train=2, n_val=1)
    dl = load_datalist(root)
    assert dl.class_names == ["background", "grey_matter", "white_matter"]
    assert len(dl.train) == 2 and len(dl.val) == 1 and dl.median_shape == (40, 48, 40)
    label = np.asarray(nib.load(dl.train[0]["label"]).dataobj)
    counts = np.bincount(label.ravel(), minlength=3)
    assert counts.size == 3 and (counts > 500).all()
    image = nib.load(dl.train[0]["image"]).get_fdata()
    assert image[label == 2].mean() > image[label == 1].mean()  # T1: white matter brighter than grey
    assert make_mni_dataset(root, shape=(40, 48, 40), n_train=2, n_val=1) == root


def test_mni_dataset_reused_without_nilearn(tmp_path: Path, monkeypatch) -> None:
    """A folder that holds the dataset is reused where nilearn is not installed (a GPU machine given
    the files); an empty one fails naming nilearn, before the folder is created."""
    pytest.importorskip("nilearn")
    root = make_mni_dataset(tmp_path / "mni", shape=(24, 24, 24), n_train=1, n_val=1)
    monkeypatch.setitem(sys.modules, "nilearn", None)  # `import nilearn` raises ImportError
    assert make_mni_dataset(root, shape=(24, 24, 24), n_train=1, n_val=1) == root
    with pytest.raises(DataError, match="needs nilearn"):
        make_mni_dataset(tmp_path / "new", shape=(24, 24, 24), n_train=1, n_val=1)
    assert not (tmp_path / "new").exists()


def test_build_loaders_distributed_single_process(synthetic: Path, tmp_path: Path) -> None:
    """One-rank gloo group: the training sampler is the distributed one, validation takes volume i on
    rank i % world_size; both still cover every case."""
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        dl = load_datalist(synthetic)
        train, val = build_loaders(dl, Preprocessing(), 8, 3, batch_size=1, distributed=True, seed=3)
        assert isinstance(train.batch_sampler.sampler, DistributedSampler) and list(val.sampler) == list(range(len(dl.val)))
        train.batch_sampler.set_epoch(1)
        assert len(list(train)) == len(dl.train) and len(list(val)) == len(dl.val)
    finally:
        dist.destroy_process_group()
