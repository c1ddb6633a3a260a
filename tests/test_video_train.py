"""Training on video through ``python -m app.train``: segmentation (data=video) and restoration
(task=restoration) for two epochs of tiny clips; the degradation, the restoration metrics and the
side-by-side validation clips on their own (CPU, small)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.data import Degradation, make_synthetic_video_dataset, open_clip
from app.data.degrade import compress_h264
from app.models import build_model
from app.train.validation import restoration_clip, segmentation_clip, validate_restoration

REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 32, 32)  # (T, H, W) of the clips
TINY = [
    "trainer.patch_size=[8,16,16]",
    "trainer.max_epochs=2",
    "trainer.steps_per_epoch=2",
    "trainer.batch_size=1",
    "trainer.sw_batch_size=2",
    "trainer.num_workers=0",
    "trainer.device=cpu",
    "model.base_features=4",
    "model.max_features=16",
    "sketch.n_probes=4",
    "logger.fidelity_every=0",
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "app.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def clips_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_video_dataset(tmp_path_factory.mktemp("video") / "clips", n_train=2, n_val=1, shape=SHAPE,
                                        masks="png")


def _data(root: Path) -> list[str]:
    return ["data=video", f"data.generate.root={root}", "data.generate.n_train=2", "data.generate.n_val=1",
            f"data.generate.shape={list(SHAPE)}", "data.generate.masks=png"]


def test_segmentation_of_colour_clips(tmp_path: Path, clips_root: Path) -> None:
    run = tmp_path / "seg"
    result = _run([*TINY, *_data(clips_root), "logger=disabled", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["task"] == "segmentation" and ckpt["config"]["task"] == "segmentation"
    assert ckpt["model_config"]["in_channels"] == 3 and ckpt["model_config"]["out_channels"] == 3
    assert ckpt["class_names"] == ["background", "striped_object", "spotted_object"]
    history = ckpt["history"]
    assert len(history) == 2 and all(0.0 <= h["val/mean_dice"] <= 1.0 for h in history)
    assert {"val/dice/striped_object", "val/dice/spotted_object"} <= set(history[-1])
    assert "val mean Dice" in (run / "train.log").read_text()


def test_restoration_logs_psnr_ssim_and_a_validation_clip(tmp_path: Path, clips_root: Path) -> None:
    run = tmp_path / "restore"
    result = _run([*TINY, *_data(clips_root), "task=restoration", "restoration.loss=mse",
                   "restoration.degradation.crf=36", "logger=offline", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["task"] == "restoration" and ckpt["config"]["task"] == "restoration"
    assert ckpt["config"]["restoration"]["loss"] == "mse" and ckpt["config"]["restoration"]["degradation"]["crf"] == 36
    config = ckpt["model_config"]
    assert config["in_channels"] == config["out_channels"] == 3 and config["residual"] is True
    assert ckpt["class_names"] == ["red", "green", "blue"] and ckpt["preprocessing"]["intensity"] == "none"
    last = ckpt["history"][-1]
    assert {"val/psnr", "val/ssim", "val/input_psnr", "val/input_ssim", "val/best_psnr"} <= set(last)
    assert 10.0 < last["val/psnr"] < 60.0 and -1.0 <= last["val/ssim"] <= 1.0
    assert (run / "checkpoints" / "best.pt").is_file() and "val PSNR" in (run / "train.log").read_text()
    # the validation clip: kept as an H.264 file and in the offline W&B run
    clips = sorted((run / "val_clips").glob("*.mp4"))
    assert len(clips) == 2  # one per validation
    clip = open_clip(clips[-1])
    assert (clip.n_frames, clip.height, clip.width) == (SHAPE[0], SHAPE[1], 3 * SHAPE[2])
    logged = list((run / "wandb").glob("offline-run-*/files/media/videos/val/clip_*.mp4"))
    assert len(logged) == 2, list((run / "wandb").rglob("*"))


def test_restoration_refuses_normalised_intensities(tmp_path: Path, clips_root: Path) -> None:
    result = _run([*TINY, *_data(clips_root), "task=restoration", "data.preprocessing.intensity=zscore",
                   "logger=disabled", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode != 0 and "set data.preprocessing.intensity=none (now zscore)" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- pieces


def _clip(channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(1)
    t, h, w = np.meshgrid(*[np.linspace(0, 1, n, dtype=np.float32) for n in (8, 20, 22)], indexing="ij")
    smooth = 0.2 + 0.6 * (0.5 * np.sin(6 * h + 3 * t) * np.cos(5 * w) + 0.5) * 0.9
    return np.clip(np.stack([smooth * (0.8 + 0.1 * c) for c in range(channels)]) + rng.normal(0, 0.01, (channels, 8, 20, 22)),
                   0, 1).astype(np.float32)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def test_degradation_is_seeded_and_each_step_degrades() -> None:
    clean = _clip()
    full = Degradation(blur_sigma=1.0, noise_std=0.05, crf=32)
    out = full(clean, seed=7)
    assert out.shape == clean.shape and out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_array_equal(out, full(clean, seed=7))
    assert not np.array_equal(out, full(clean, seed=8))
    none = Degradation(blur_sigma=0.0, noise_std=0.0, crf=None)
    np.testing.assert_array_equal(none(clean, 0), clean)
    for step in (Degradation(1.5, 0.0, None), Degradation(0.0, 0.05, None), Degradation(0.0, 0.0, 40),
                 Degradation(0.0, 0.0, None, quantize_bits=3)):
        assert 15.0 < _psnr(step(clean, 0), clean) < 45.0, step
    assert _psnr(compress_h264(clean, 45), clean) < _psnr(compress_h264(clean, 20), clean)
    grey = compress_h264(clean[:1, :, :19, :21], 30)  # grey, odd sizes
    assert grey.shape == (1, 8, 19, 21)
    with pytest.raises(ValueError, match="unknown degradation keys"):
        Degradation.from_dict({"noise": 0.1})


def test_restoration_metrics_of_an_identity_network() -> None:
    net = build_model({"name": "unet", "in_channels": 3, "out_channels": 3, "channels": [4, 8], "strides": [2],
                       "residual": True})  # output layers start at zero: returns its input
    clean = torch.from_numpy(_clip())[None]
    degraded = torch.from_numpy(Degradation(crf=None)(_clip(), 0))[None]
    per_case, clips = validate_restoration(net, [{"image": degraded, "label": clean}], roi_size=[8, 16, 16],
                                           device=torch.device("cpu"), n_clips=1, clip_frames=5)
    psnr, ssim, input_psnr, input_ssim = per_case[0]
    assert psnr == pytest.approx(input_psnr, abs=1e-3) and ssim == pytest.approx(input_ssim, abs=1e-3)
    assert input_psnr == pytest.approx(_psnr(degraded.numpy(), clean.numpy()), abs=0.05)
    assert 0.0 < ssim < 1.0 and clips[0].shape == (5, 20, 66, 3) and clips[0].dtype == np.uint8


def test_side_by_side_clips() -> None:
    image = _clip(1)
    pred = np.zeros((8, 20, 22), np.int64)
    label = pred.copy()
    label[:, 5:10, 5:10] = 2
    seg = segmentation_clip(image, pred, label)
    assert seg.shape == (8, 20, 66, 3)
    outside = np.ones((20, 22), bool)
    outside[5:10, 5:10] = False  # the reference and its outline (white in both coloured panels)
    assert (seg[:, :, :22][:, outside] == seg[:, :, 22:44][:, outside]).all()  # nothing predicted: the input
    assert (seg[:, 6:9, 50:53] != seg[:, 6:9, 6:9]).any(axis=-1).all()  # the target panel is coloured inside
    rest = restoration_clip(image, image, image)
    assert rest.shape == (8, 20, 66, 3) and (rest[..., 0] == rest[..., 1]).all()  # grey shown as grey
