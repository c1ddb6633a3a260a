"""``python -m app.train`` as a user runs it: overrides reach the run folder, --help lists the
groups, bad data ends in one line naming the file, DDP under torchrun, configs found from a wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from app.data import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "trainer.patch_size=[16,16,16]",
    "trainer.steps_per_epoch=2",
    "trainer.batch_size=1",
    "trainer.sw_batch_size=1",
    "trainer.device=cpu",
    "model.base_features=4",
    "model.max_features=16",
    "sketch.n_probes=4",
    "logger=disabled",
]


def run_cli(args: list[str], cwd: Path, launcher: list[str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run the app from ``cwd`` (not the repository: the configs must be found from anywhere)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = (launcher or [sys.executable, "-m"]) + ["app.train", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", n_train=3, n_val=2, shape=(24, 24, 24))


def data_overrides(root: Path) -> list[str]:
    return [f"data.generate.root={root}", "data.generate.n_train=3", "data.generate.n_val=2", "data.generate.shape=[24,24,24]"]


def test_command_line_overrides_reach_the_run_folder(tmp_path, synthetic_root):
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, *data_overrides(synthetic_root), "trainer.max_epochs=1", "optim.optimizer.lr=0.002",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    composed = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert composed["trainer"]["max_epochs"] == 1 and composed["optim"]["optimizer"]["lr"] == 0.002
    assert "trainer.max_epochs=1" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert resolved["output_dir"] == str(run_dir) and resolved["model"]["out_channels"] == 3
    assert (run_dir / "train.log").is_file() and "val mean Dice" in (run_dir / "train.log").read_text()
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["config"]["trainer"]["max_epochs"] == 1


def test_help_lists_groups_and_main_options(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for line in ("data: decathlon, folder, mni, synthetic, video", "model: basicunet, dynunet, segresnet, unet",
                 "sketch: default, exact", "optim: adamw, sgd", "logger: disabled, offline, online",
                 "optim/scheduler: constant, cosine, poly", "trainer: default"):
        assert line in text, line
    for option in ("trainer.patch_size", "trainer.amp=bf16|fp16|off", "trainer.grad_checkpointing", "trainer.resume",
                   "sketch.n_probes", "data.root", "hydra.run.dir"):
        assert option in text, option
    assert "In use: data=synthetic model=dynunet sketch=default optim=adamw logger=offline" in text


# ----------------------------------------------------------------------------- bad data


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def _good_folder(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        label = np.zeros((24, 24, 24), np.uint8)
        label[8:16, 8:16, 8:16] = 1
        _save(root / "imagesTr" / f"case_{i}.nii.gz", (rng.normal(size=(24, 24, 24)) + label).astype(np.float32))
        _save(root / "labelsTr" / f"case_{i}.nii.gz", label)
        items.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"},
                                                   "modality": {"0": "MRI"}, "training": items}))
    return root


def _missing_label(root: Path) -> Path:
    path = root / "labelsTr" / "case_1.nii.gz"
    path.unlink()
    return path


def _shape_mismatch(root: Path) -> Path:
    path = root / "labelsTr" / "case_2.nii.gz"
    _save(path, np.zeros((24, 24, 20), np.uint8))
    return path


def _affine_mismatch(root: Path) -> Path:
    path = root / "labelsTr" / "case_0.nii.gz"
    _save(path, np.zeros((24, 24, 24), np.uint8), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    return path


def _two_d(root: Path) -> Path:
    path = root / "imagesTr" / "case_1.nii.gz"
    _save(path, np.zeros((24, 24), np.float32))
    return path


def _five_d(root: Path) -> Path:
    path = root / "imagesTr" / "case_2.nii.gz"
    _save(path, np.zeros((24, 24, 24, 1, 2), np.float32))
    return path


def _empty(root: Path) -> Path:
    shutil.rmtree(root)
    root.mkdir()
    return root


@pytest.mark.parametrize(
    "break_it", [_missing_label, _shape_mismatch, _affine_mismatch, _two_d, _five_d, _empty],
    ids=["missing-label", "shape-mismatch", "affine-mismatch", "2d-nifti", "5d-nifti", "empty-folder"],
)
def test_bad_data_fails_before_training_with_the_file_named(tmp_path, break_it):
    root = _good_folder(tmp_path / "task")
    culprit = break_it(root)
    run_dir = tmp_path / "run"
    result = run_cli([*TINY, "data=folder", f"data.root={root}", "logger=offline", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode != 0
    assert str(culprit) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("stochprop-train: error: ")
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "wandb").exists()  # stopped before training


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow  # tests/test_ddp.py runs two ranks by default, checking more
def test_ddp_two_processes_on_cpu(tmp_path, synthetic_root):
    run_dir = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    result = run_cli([*TINY, *data_overrides(synthetic_root), "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path, launcher=launcher, timeout=400)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    log = (run_dir / "train.log").read_text()
    assert "x 2 processes" in log
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["global_step"] == 2 and not any(k.startswith("module.") for k in ckpt["model_state"])
    history = ckpt["history"][-1]
    assert 0.0 <= history["val/mean_dice"] <= 1.0  # gathered over both ranks' validation shards
    assert list(run_dir.glob("*.pt")) == [] and len(list(run_dir.rglob("last.pt"))) == 1


# ----------------------------------------------------------------------------- installed wheel


@pytest.mark.slow
def test_configs_are_found_from_an_installed_wheel(tmp_path):
    """Build the wheel from a copy of the sources; the unpacked package runs with app/conf only."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(REPO / "app", src / "app", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", src / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", src)
    readme = REPO / "README.md"
    (src / "README.md").write_text(readme.read_text() if readme.exists() else "stochprop\n")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("stochprop-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {"app/conf/train.yaml", "app/conf/data/synthetic.yaml", "app/conf/hydra/help/train.yaml",
                "app/conf/optim/scheduler/poly.yaml", "app/train/__main__.py"} <= names
        zf.extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    where = subprocess.run([sys.executable, "-c", "from app.train import config_dir; print(config_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(tmp_path / "site" / "app" / "conf"), where.stderr
    job = subprocess.run([sys.executable, "-m", "app.train", "--cfg", "job", "model=unet"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "name: unet" in job.stdout


@pytest.mark.parametrize("metrics, expected", [
    ({"val/mean_dice": 0.4, "val/best_mean_dice": 0.7}, 0.7),
    ({"val/psnr": 30.0, "val/best_psnr": 31.5, "val/ssim": 0.9}, 31.5),
    ({"train/epoch_loss": 0.3}, None),
])
def test_sweepers_get_the_tasks_best_validation_score(metrics, expected):
    """What ``python -m app.train`` returns to a Hydra sweeper: the best Dice for segmentation, the
    best PSNR for restoration, NaN without validation."""
    import math

    from app.train.__main__ import sweep_score

    score = sweep_score(metrics)
    assert math.isnan(score) if expected is None else score == expected
