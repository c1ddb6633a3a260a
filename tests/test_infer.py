"""Tests for app.infer: checkpoint -> NIfTI label maps in the inputs' original space (CPU, small)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from app.infer import infer_files
from app.infer.__main__ import main
from app.infer.files import collect_inputs, output_path
from app.infer.predict import flip_axes
from app.models import build_model, save_checkpoint

# Non-RAS voxel axes (permuted and flipped) with anisotropic spacing (1.5, 2.0, 3.0 mm):
# voxel axis i runs along world -y, j along +z, k along -x.
AFFINE = np.array(
    [
        [0.0, 0.0, -3.0, 50.0],
        [-1.5, 0.0, 0.0, 20.0],
        [0.0, 2.0, 0.0, -10.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (20, 14, 9)
THRESHOLDS = (0.35, 0.65)
CLASSES = ["background", "low", "high"]
# Resample to 1 mm isotropic RAS, intensities taken as they are ("ct" window [0, 1] maps
# [0, 1] to itself), so the threshold net's labels are a known function of intensity.
PRE_PERFECT = {
    "spacing": [1.0, 1.0, 1.0],
    "orientation": "RAS",
    "intensity": "ct",
    "ct_window": [0.0, 1.0],
    "crop_foreground": False,
    "in_channels": 1,
}


def world_coords(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World (mm) coordinates of every voxel centre, shape ``(3, *shape)``."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:]).reshape(3, *shape)


def smooth_image(shape: tuple[int, ...] = SHAPE, affine: np.ndarray = AFFINE) -> np.ndarray:
    """A smooth intensity field in [0, 1], defined in world space (so any grid samples the same scene)."""
    x, y, z = world_coords(shape, affine)
    return (0.5 + 0.25 * np.sin(x / 9.0) + 0.25 * np.cos(y / 7.0) * np.cos(z / 11.0)).astype(np.float32)


def truth_labels(img: np.ndarray) -> np.ndarray:
    return (img >= THRESHOLDS[0]).astype(np.int64) + (img >= THRESHOLDS[1])


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture(scope="module")
def perfect_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoint of the diagnostic threshold net: labels are a known function of intensity."""
    cfg = {
        "name": "threshold",
        "in_channels": 1,
        "out_channels": 3,
        "thresholds": list(THRESHOLDS),
        "sharpness": 20.0,
        "patch_size": [16, 16, 16],
    }
    net = build_model(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "perfect.pt"
    save_checkpoint(
        path, model_state=net.state_dict(), model_config=cfg, preprocessing=PRE_PERFECT, class_names=CLASSES
    )
    return path


def with_preprocessing(ckpt_path: Path, out: Path, preprocessing: dict) -> Path:
    """A copy of a checkpoint with other pre-processing settings."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    save_checkpoint(
        out,
        model_state=ckpt["model_state"],
        model_config=ckpt["model_config"],
        preprocessing=preprocessing,
        class_names=CLASSES,
    )
    return out


def interior(labels: np.ndarray) -> np.ndarray:
    """Voxels whose 3x3x3 neighbourhood holds a single label (away from class boundaries)."""
    keep = np.ones(labels.shape, bool)
    for c in np.unique(labels):
        inside = labels == c
        keep &= ~(ndimage.binary_dilation(inside) & ndimage.binary_dilation(~inside))
    return keep


# ---------------------------------------------------------------------------- (1) trained DynUNet


def test_trained_dynunet_outputs_on_input_grid(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = {
        "name": "dynunet",
        "in_channels": 1,
        "out_channels": 2,
        "patch_size": [16, 16, 16],
        "spacing": [1.0, 1.0, 1.0],
        "base_features": 4,
        "max_features": 16,
    }
    net = build_model(cfg)
    # A tiny synthetic task: a bright ball on noise; a few steps of plain training.
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    target = ((grid - 7.5).square().sum(0) < 25).long()[None]
    image = (target.float() + 0.3 * torch.randn(1, 16, 16, 16))[None]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(image), target).backward()
        opt.step()
    ckpt = tmp_path / "dyn.pt"
    pre = {
        "spacing": [1.0, 1.0, 1.0],
        "orientation": "RAS",
        "intensity": "zscore",
        "crop_foreground": False,
        "in_channels": 1,
    }
    save_checkpoint(
        ckpt,
        model_state=net.state_dict(),
        model_config=cfg,
        preprocessing=pre,
        class_names=["background", "ball"],
        extra={"step": 5},
    )

    other = np.diag([-0.8, 1.2, 2.5, 1.0])  # LAS-like, anisotropic
    other[:3, 3] = [10.0, -5.0, 3.0]
    inputs = [
        save_nifti(tmp_path / "a.nii.gz", smooth_image(SHAPE, AFFINE)),
        save_nifti(tmp_path / "b.nii", smooth_image((17, 11, 6), other), other),
    ]
    results = infer_files(ckpt, inputs, tmp_path / "out", sw_batch_size=1, overlap=0.25)
    assert [r.status for r in results] == ["ok", "ok"], [r.message for r in results]
    for src, res in zip(inputs, results, strict=True):
        ref, out = nib.load(src), nib.load(res.output)
        assert res.output == output_path(src, tmp_path / "out", "_seg")
        assert res.output.name.endswith("_seg.nii.gz" if src.name.endswith(".gz") else "_seg.nii")
        assert out.shape == ref.shape
        np.testing.assert_array_equal(out.affine, ref.affine)
        assert out.header.get_sform(coded=True)[1] == ref.header.get_sform(coded=True)[1]
        assert out.header.get_qform(coded=True)[1] == ref.header.get_qform(coded=True)[1]
        assert out.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}


# ---------------------------------------------------------------------------- (2) perfect model


@pytest.mark.parametrize("resample, min_agreement", [("probabilities", 0.99), ("labels", 0.98)])
def test_perfect_model_labels_land_on_the_right_voxels(
    tmp_path: Path, perfect_ckpt: Path, resample: str, min_agreement: float
) -> None:
    img = smooth_image()
    truth = truth_labels(img)
    # The check can see a one-voxel misplacement: shifting the truth by one voxel along
    # any axis (or flipping an axis) agrees on far fewer than 99% of voxels.
    for axis in range(3):
        assert (np.roll(truth, 1, axis) == truth)[1:-1, 1:-1, 1:-1].mean() < 0.97
        assert (np.flip(truth, axis) == truth).mean() < 0.9
    src = save_nifti(tmp_path / "case.nii.gz", img)
    [res] = infer_files(perfect_ckpt, [src], tmp_path / "out", resample=resample, roi=[8, 8, 8])
    assert res.status == "ok", res.message
    out = nib.load(res.output)
    labels = np.asarray(out.dataobj)
    np.testing.assert_array_equal(out.affine, AFFINE)
    assert (labels == truth).mean() > min_agreement
    away = interior(truth)
    assert away.mean() > 0.5
    np.testing.assert_array_equal(labels[away], truth[away])


def test_perfect_model_with_foreground_crop_and_probabilities(tmp_path: Path, perfect_ckpt: Path) -> None:
    img = smooth_image()
    img[:4] = 0.0  # a zero border: cropped away, must come back as background
    truth = truth_labels(img)
    cropped = with_preprocessing(perfect_ckpt, tmp_path / "crop.pt", {**PRE_PERFECT, "crop_foreground": True})
    src = save_nifti(tmp_path / "case.nii", img)
    [res] = infer_files(cropped, [src], tmp_path / "out", save_probabilities=True, tta=True)
    assert res.status == "ok", res.message
    labels = np.asarray(nib.load(res.output).dataobj)
    assert (labels == truth).mean() > 0.99
    assert (labels[:4] == 0).all()
    probs_img = nib.load(res.probabilities)
    assert res.probabilities.name == "case_prob.nii"
    probs = probs_img.get_fdata()
    assert probs.shape == SHAPE + (3,)
    np.testing.assert_array_equal(probs_img.affine, AFFINE)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-3)
    np.testing.assert_array_equal(probs.argmax(-1), labels)


# ---------------------------------------------------------------------------- (3) bad files


def test_bad_files_do_not_stop_the_others(
    tmp_path: Path, perfect_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    save_nifti(folder / "good1.nii.gz", smooth_image())
    save_nifti(folder / "good2.nii", smooth_image())
    good = (folder / "good1.nii.gz").read_bytes()
    (folder / "corrupt.nii.gz").write_bytes(good[: len(good) // 2])  # truncated gzip stream
    (folder / "garbage.nii.gz").write_bytes(b"this is not a nifti file")
    save_nifti(folder / "flat.nii.gz", np.zeros((8, 8), np.float32), np.eye(4))  # 2D
    save_nifti(folder / "twochan.nii.gz", np.zeros((8, 8, 8, 2), np.float32), np.eye(4))  # 2 channels
    nan = smooth_image()
    nan[2, 3, 4] = np.nan
    save_nifti(folder / "nan.nii.gz", nan)
    (folder / "notes.txt").write_text("ignored: not NIfTI")
    out = tmp_path / "out"
    code = main([str(perfect_ckpt), str(folder), str(tmp_path / "missing.nii.gz"), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert (out / "good1_seg.nii.gz").is_file() and (out / "good2_seg.nii").is_file()
    assert not (out / "corrupt_seg.nii.gz").exists()
    failed_lines = [line for line in err.splitlines() if line.startswith("FAILED ")]
    assert len(failed_lines) == 6
    by_name = {Path(line.split()[1].rstrip(":")).name: line for line in failed_lines}
    assert set(by_name) == {
        "corrupt.nii.gz",
        "garbage.nii.gz",
        "flat.nii.gz",
        "twochan.nii.gz",
        "missing.nii.gz",
        "nan.nii.gz",
    }
    assert "image is 2D with shape (8, 8); a 3D volume" in by_name["flat.nii.gz"]
    assert "2 channel(s) but the model expects in_channels=1" in by_name["twochan.nii.gz"]
    assert "no such file" in by_name["missing.nii.gz"]
    assert "NaN/inf" in by_name["nan.nii.gz"]
    assert "8 file(s): 2 segmented, 0 skipped (existing output), 6 failed" in err
    rows = {Path(r["input"]).name: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["corrupt.nii.gz"]["status"] == "failed" and rows["good2.nii"]["status"] == "ok"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


# ---------------------------------------------------------------------------- (4) overwrite


def test_existing_outputs_kept_unless_overwrite(
    tmp_path: Path, perfect_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = save_nifti(tmp_path / "case.nii.gz", smooth_image())
    out = tmp_path / "out"
    out.mkdir()
    existing = save_nifti(out / "case_seg.nii.gz", np.ones(SHAPE, np.uint8))
    precious = existing.read_bytes()
    args = [str(perfect_ckpt), str(src), "-o", str(out), "--no-progress"]
    assert main(args) == 0
    assert existing.read_bytes() == precious
    err = capsys.readouterr().err
    assert "skipped" in err and "--overwrite" in err and "1 skipped" in err
    assert main([*args, "--overwrite"]) == 0
    assert nib.load(existing).shape == SHAPE
    # A second run over the output folder does not take earlier outputs for inputs.
    files, _ = collect_inputs([out], exclude_dir=out, exclude_suffix="_seg")
    assert files == []


def test_unreadable_existing_output_is_kept_and_reported(
    tmp_path: Path, perfect_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = save_nifti(tmp_path / "case.nii.gz", smooth_image())
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "case_seg.nii.gz"
    existing.write_bytes(b"precious")
    assert main([str(perfect_ckpt), str(src), "-o", str(out), "--no-progress"]) == 1
    assert existing.read_bytes() == b"precious"
    err = capsys.readouterr().err
    assert "existing output case_seg.nii.gz cannot be read" in err and "--overwrite" in err and "1 failed" in err


# ---------------------------------------------------------------------------- (5) summary


def test_summary_volumes_for_perfect_model(tmp_path: Path, perfect_ckpt: Path) -> None:
    img = smooth_image()
    src = save_nifti(tmp_path / "case.nii.gz", img)
    out = tmp_path / "out"
    [res] = infer_files(perfect_ckpt, [src], out, summary="vols")
    labels = np.asarray(nib.load(res.output).dataobj)
    voxel_ml = 1.5 * 2.0 * 3.0 / 1000.0
    expected = {c: float((labels == i).sum()) * voxel_ml for i, c in enumerate(CLASSES)}
    truth = truth_labels(img)
    for i, c in enumerate(CLASSES):  # and close to the ground truth volumes
        assert abs(expected[c] - (truth == i).sum() * voxel_ml) <= 0.01 * truth.size * voxel_ml
    data = json.loads((out / "vols.json").read_text())
    assert data["class_names"] == CLASSES and data["roi"] == [16, 16, 16]
    [row] = data["files"]
    assert row["status"] == "ok" and row["output"] == str(res.output) and row["seconds"] > 0
    for c in CLASSES:
        assert row["volumes_ml"][c] == pytest.approx(expected[c])
    [crow] = list(csv.DictReader((out / "vols.csv").open()))
    assert crow["output"] == str(res.output)
    for c in CLASSES:
        assert float(crow[f"volume_ml_{c}"]) == pytest.approx(expected[c])
    assert sum(expected.values()) == pytest.approx(np.prod(SHAPE) * voxel_ml)


# ---------------------------------------------------------------------------- (6) CLI and helpers


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--suffix",
        "--roi",
        "--overlap",
        "--sw-batch-size",
        "--tta",
        "--amp",
        "--device",
        "--save-probabilities",
        "--overwrite",
        "CHECKPOINT",
        "INPUT",
    ):
        assert flag in text


def test_bad_checkpoint_and_roi_are_usage_errors(
    tmp_path: Path, perfect_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = save_nifti(tmp_path / "case.nii.gz", smooth_image())
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert main([str(tmp_path / "bad.pt"), str(src), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.pt" in err and len(err.strip().splitlines()) == 1
    assert main([str(perfect_ckpt), str(src), "-o", str(tmp_path / "o"), "--roi", "8", "8"]) == 2
    assert "3 positive sizes" in capsys.readouterr().err


def test_glob_inputs_and_flip_axes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("x.nii.gz", "sub/y.nii", "sub/z.txt"):
        (tmp_path / name).write_bytes(b"")
    files, problems = collect_inputs([str(tmp_path / "**" / "*")])
    assert sorted(p.name for p in files) == ["x.nii.gz", "y.nii"] and not problems
    assert flip_axes(3)[0] == () and len(flip_axes(3)) == 8 and (2, 3, 4) in flip_axes(3)


# ---------------------------------------------------------------------------- same pre-processing as training


@pytest.mark.parametrize(
    "pre",
    [
        {"spacing": [1.0, 1.0, 1.0], "intensity": "zscore", "crop_foreground": True},
        {
            "spacing": [2.0, 1.5, 1.0],
            "orientation": "LPS",
            "intensity": "ct",
            "ct_window": [0.2, 0.9],
            "crop_foreground": True,
        },
        {"spacing": None, "intensity": "none", "crop_foreground": False},
    ],
    ids=["zscore-crop", "ct-lps", "none"],
)
def test_model_sees_what_validation_in_training_sees(
    tmp_path: Path, perfect_ckpt: Path, monkeypatch: pytest.MonkeyPatch, pre: dict
) -> None:
    """The pre-processed volume handed to the network is val_transforms' image for the same settings."""
    import app.infer.engine as engine
    from app.data import Preprocessing, val_transforms

    img = smooth_image()
    img[:3] = 0.0  # padding for the foreground crop
    src = save_nifti(tmp_path / "case.nii.gz", img)
    lab = save_nifti(tmp_path / "case_label.nii.gz", truth_labels(img).astype(np.uint8))
    full = {"orientation": "RAS", "in_channels": 1, **pre}
    path = with_preprocessing(perfect_ckpt, tmp_path / "ckpt.pt", full)
    seen: list[torch.Tensor] = []
    real = engine.predict_logits

    def spy(model: torch.nn.Module, image: torch.Tensor, settings: engine.WindowSettings) -> torch.Tensor:
        seen.append(image.detach().clone())
        return real(model, image, settings)

    monkeypatch.setattr(engine, "predict_logits", spy)
    [res] = infer_files(path, [src], tmp_path / "out", roi=[8, 8, 8])
    assert res.status == "ok", res.message
    [ours] = seen
    theirs = val_transforms(Preprocessing.from_dict(full))({"image": str(src), "label": str(lab)})["image"]
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(np.asarray(ours.affine), np.asarray(theirs.affine))
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


# ---------------------------------------------------------------------------- CUDA (run with -m gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stitching_placements_agree_with_cpu(
    tmp_path: Path, perfect_ckpt: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """GPU windows with GPU stitching, forced CPU stitching, and the out-of-memory fallback give the CPU's labels."""
    import app.infer.engine as engine

    src = save_nifti(tmp_path / "case.nii.gz", smooth_image())
    runs = {
        "cpu": {"device": "cpu"},
        "gpu": {"device": "cuda", "stitch_threshold_bytes": 1 << 40},
        "gpu-stitch-cpu": {"device": "cuda", "stitch_on_cpu": True},
        "gpu-tiny-threshold": {"device": "cuda", "stitch_threshold_bytes": 1},
    }
    labels = {}
    for name, opts in runs.items():
        [res] = infer_files(perfect_ckpt, [src], tmp_path / name, roi=[8, 8, 8], tta=True, **opts)
        assert res.status == "ok", res.message
        labels[name] = np.asarray(nib.load(res.output).dataobj)

    real = engine.predict_logits

    def oom_on_gpu_stitch(model: torch.nn.Module, image: torch.Tensor, settings: engine.WindowSettings) -> torch.Tensor:
        if settings.device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(model, image, settings)

    monkeypatch.setattr(engine, "predict_logits", oom_on_gpu_stitch)
    [res] = infer_files(perfect_ckpt, [src], tmp_path / "oom", device="cuda", stitch_threshold_bytes=1 << 40)
    assert res.status == "ok", res.message
    assert "retrying with the output on the CPU" in caplog.text
    labels["oom"] = np.asarray(nib.load(res.output).dataobj)
    for name, lab in labels.items():
        np.testing.assert_array_equal(lab, labels["cpu"], err_msg=name)
