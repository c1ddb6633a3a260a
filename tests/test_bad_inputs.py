"""Malformed inputs generated here, each answered in one line before any training step or output
write, with nothing written: voxel-level problems of training and validation data, inference
inputs, output folders and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import pytest
import torch

from app.data import DataError, make_synthetic_video_dataset
from app.infer.__main__ import main as infer_main
from app.infer.files import collect_inputs
from app.models import CheckpointError, load_checkpoint, save_checkpoint
from app.train import train
from test_train import tiny_cfg

SHAPE = (24, 24, 24)


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def _folder(root: Path, n: int = 3, labels: dict | None = None, validation: bool = False) -> Path:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        label = np.zeros(SHAPE, np.uint8)
        label[8:16, 8:16, 8:16] = 1
        _save(root / "imagesTr" / f"case_{i}.nii.gz", (rng.normal(size=SHAPE) + label).astype(np.float32))
        _save(root / "labelsTr" / f"case_{i}.nii.gz", label)
        items.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    meta = {"labels": labels or {"0": "background", "1": "organ"}, "modality": {"0": "MRI"}, "training": items[:-1] if validation else items}
    if validation:
        meta["validation"] = items[-1:]
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _nan_voxels(root: Path) -> tuple[Path, str]:
    path = root / "imagesTr" / "case_1.nii.gz"
    data = np.asanyarray(nib.load(path).dataobj).copy()
    data[3, 4, 5], data[6, 7, 8] = np.nan, np.inf
    _save(path, data)
    return path, "image holds 2 NaN/inf voxels"


def _gzip_damaged_inside(root: Path) -> tuple[Path, str]:
    """One byte of the deflate stream flipped; the gzip trailer (CRC, length) left intact."""
    path = root / "imagesTr" / "case_2.nii.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    return path, "compressed data is damaged"


def _all_zero_image(root: Path) -> tuple[Path, str]:
    return _save(root / "imagesTr" / "case_0.nii.gz", np.zeros(SHAPE, np.float32)), "same value (0) in every voxel"


def _label_above_classes(root: Path) -> tuple[Path, str]:
    label = np.zeros(SHAPE, np.uint8)
    label[2:5, 2:5, 2:5] = 3
    return _save(root / "labelsTr" / "case_1.nii.gz", label), "label values span 0..3, outside 0..1"


def _non_integer_labels(root: Path) -> tuple[Path, str]:
    label = np.zeros(SHAPE, np.float32)
    label[8:16, 8:16, 8:16] = 0.75
    label[2:4, 2:4, 2:4] = 1.25
    return _save(root / "labelsTr" / "case_0.nii.gz", label), "label has non-integer values (e.g. "


def _negative_label(root: Path) -> tuple[Path, str]:
    label = np.zeros(SHAPE, np.int16)
    label[0, 0, 0] = -1
    return _save(root / "labelsTr" / "case_2.nii.gz", label), "label values span -1..0"


def _nan_label(root: Path) -> tuple[Path, str]:
    label = np.zeros(SHAPE, np.float32)
    label[1, 1, 1] = np.nan
    return _save(root / "labelsTr" / "case_1.nii.gz", label), "label holds NaN/inf values"


def _truncated_raw_nii(root: Path) -> tuple[Path, str]:
    path = _save(root / "imagesTr" / "case_1.nii", np.ones(SHAPE, np.float32))
    (root / "imagesTr" / "case_1.nii.gz").unlink()
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["image"] = "./imagesTr/case_1.nii"
    (root / "dataset.json").write_text(json.dumps(meta))
    path.write_bytes(path.read_bytes()[:4000])
    return path, "file is truncated"


BREAKERS = [_nan_voxels, _gzip_damaged_inside, _all_zero_image, _label_above_classes, _non_integer_labels,
            _negative_label, _nan_label, _truncated_raw_nii]


@pytest.mark.parametrize("break_it", BREAKERS, ids=lambda f: f.__name__.strip("_"))
def test_training_data_voxel_problems_stop_before_training(tmp_path, break_it):
    root = _folder(tmp_path / "task")
    culprit, expected = break_it(root)
    run = tmp_path / "run"
    with pytest.raises(DataError) as info:
        train(tiny_cfg(run, None, "data=folder", f"data.root={root}", "data.val_fraction=0.34"))
    message = str(info.value)
    assert message.startswith(f"{culprit}: ") and expected in message and "\n" not in message, message
    assert not run.exists()  # nothing written, nothing trained


def test_validation_label_out_of_range_stops_before_training(tmp_path):
    root = _folder(tmp_path / "task", validation=True)
    culprit, expected = _label_above_classes_in(root / "labelsTr" / "case_2.nii.gz")
    with pytest.raises(DataError, match=expected) as info:
        train(tiny_cfg(tmp_path / "run", None, "data=folder", f"data.root={root}"))
    assert str(info.value).startswith(str(culprit))
    assert not (tmp_path / "run").exists()


def _label_above_classes_in(path: Path) -> tuple[Path, str]:
    label = np.zeros(SHAPE, np.uint8)
    label[1, 1, 1] = 7
    return _save(path, label), r"label values span 0\.\.7"


def test_corrupt_video_payload_stops_before_training(tmp_path):
    root = make_synthetic_video_dataset(tmp_path / "video", n_train=2, n_val=1, shape=(12, 24, 24))
    clip = sorted((root / "imagesTr").iterdir())[0]
    data = bytearray(clip.read_bytes())
    for at in range(len(data) // 4, 3 * len(data) // 4, 7):
        data[at] ^= 0xA5
    clip.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        train(tiny_cfg(tmp_path / "run", None, "data=video", f"data.root={root}", "data.generate=null",
                       "trainer.patch_size=[8,16,16]"))
    assert str(info.value).startswith(str(clip)) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_negative_n_probes_is_refused(tmp_path):
    root = _folder(tmp_path / "task")
    with pytest.raises(ValueError, match=r"sketch.n_probes must be an integer >= 0 \(0 = exact backprop\) or auto, but got sketch.n_probes=-4"):
        train(tiny_cfg(tmp_path / "run", None, "data=folder", f"data.root={root}", "sketch.n_probes=-4"))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = {"name": "unet", "in_channels": 1, "out_channels": 2, "channels": [2, 4], "strides": [2], "num_res_units": 0,
           "patch_size": [16, 16, 16]}
    from app.models import build_model

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model_state=build_model(cfg).state_dict(), model_config=cfg,
                    preprocessing={"orientation": None, "crop_foreground": False}, class_names=["background", "fg"])
    return path


def _huge_header_small_file(folder: Path) -> tuple[Path, str]:
    """A 2000³ float32 header on a file of about 1 KB: refused before any allocation."""
    path = folder / "huge.nii"
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.float32)
    header.set_qform(np.eye(4), 1)
    header.set_sform(np.eye(4), 1)
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 600)
    return path, "file is truncated"


def _singular_affine(folder: Path) -> tuple[Path, str]:
    img = nib.Nifti1Image(np.ones((16, 16, 16), np.float32), None)
    singular = np.eye(4)
    singular[2, 2] = 0.0
    img.header.set_sform(singular, code=1)  # the header stores it; nibabel reads it back as the affine
    nib.save(img, folder / "singular.nii.gz")
    return folder / "singular.nii.gz", "affine is singular"


def _gzip_damaged_header(folder: Path) -> tuple[Path, str]:
    path = _save(folder / "gz.nii.gz", np.ones((16, 16, 16), np.float32))
    path.write_bytes(path.read_bytes()[:30])
    return path, "cannot read NIfTI header"


@pytest.mark.parametrize("make", [_huge_header_small_file, _singular_affine, _gzip_damaged_header],
                         ids=["2000^3-header-on-1KB", "singular-affine", "cut-gzip"])
def test_inference_header_problems_are_answered_before_any_work(tmp_path, checkpoint, capsys, make):
    folder = tmp_path / "in"
    folder.mkdir()
    culprit, expected = make(folder)
    out = tmp_path / "out"
    assert infer_main([str(checkpoint), str(culprit), "-o", str(out), "--no-progress", "--no-summary"]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("FAILED ")]
    assert line.startswith(f"FAILED {culprit}: ") and expected in line, line
    assert [p.name for p in out.iterdir()] == []


def test_unusable_output_folder_is_refused_before_work_and_leaves_nothing(tmp_path, checkpoint, capsys):
    src = _save(tmp_path / "case.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert infer_main([str(checkpoint), str(src), "-o", str(blocker / "out" / "deeper"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {blocker / 'out' / 'deeper'}: output folder cannot be written") and "\n" not in err
    # an argument error (a bad checkpoint) leaves no empty output folder behind
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert infer_main([str(tmp_path / "bad.pt"), str(src), "-o", str(tmp_path / "new" / "out")]) == 2
    assert not (tmp_path / "new").exists()


def test_read_only_output_folder_is_refused_before_work(tmp_path, checkpoint, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    src = _save(tmp_path / "case.nii.gz", np.ones((16, 16, 16), np.float32))
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    assert infer_main([str(checkpoint), str(src), "-o", str(out), "--no-progress"]) == 2
    assert "output folder cannot be written" in capsys.readouterr().err


def test_rerun_regenerates_a_missing_probability_map_and_skips_complete_outputs(tmp_path, checkpoint, capsys):
    src = _save(tmp_path / "in" / "case.nii.gz", np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
    out = tmp_path / "out"
    args = [str(checkpoint), str(src.parent), "-o", str(out), "--no-progress", "--save-probabilities"]
    assert infer_main(args) == 0
    (out / "case_prob.nii.gz").unlink()  # killed between the two writes
    summary = (out / "summary.json").read_text()
    (src.parent / ".case.nii.gz.x1y2.nii.gz").write_bytes(b"half-written temporary")  # hidden: not an input
    assert infer_main(args) == 0
    err = capsys.readouterr().err
    assert (out / "case_prob.nii.gz").is_file() and "1 segmented" in err
    assert "summary.json exists; kept" in err or "summary.csv exists; kept" in err
    assert (out / "summary.json").read_text() == summary  # not rewritten without --overwrite
    assert infer_main(args) == 0 and "1 skipped" in capsys.readouterr().err
    files, _ = collect_inputs([src.parent])
    assert files == [src]


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_problems_are_one_line(tmp_path, checkpoint):
    raw = torch.load(checkpoint, weights_only=True)
    raw["class_names"] = ["background"]
    raw.pop("checksum")
    torch.save(raw, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="class_names has 1 entries but the model has out_channels=2"):
        load_checkpoint(tmp_path / "short.pt")
    raw = torch.load(checkpoint, weights_only=True)
    raw["config"] = PurePosixPath("/x")  # an object weights_only loading refuses
    torch.save(raw, tmp_path / "refused.pt")
    with pytest.raises(CheckpointError, match="holds an object that weights_only loading refuses"):
        load_checkpoint(tmp_path / "refused.pt")
    weight = next(v for v in raw["model_state"].values() if v.numel() >= 16)
    data = bytearray(checkpoint.read_bytes())
    data[data.find(weight.numpy().tobytes()) + 5] ^= 0xFF  # one bit pattern inside the stored weights
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.pt: corrupt"):
        load_checkpoint(tmp_path / "flipped.pt")
