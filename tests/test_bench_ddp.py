"""scripts/bench_ddp.py on the CPU: one process in this one (throughput rows, the training part, the
tables), and the whole script over 1 and 2 gloo processes under torchrun (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.data import make_synthetic_dataset
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_ddp.py"
TINY = ["--device", "cpu", "--sizes", "16", "--variants", "exact", "stochastic+lean", "--model-arg", "base_features=4",
        "max_features=16", "--warmup", "1", "--repeat", "2", "--train-steps", "2"]


def _overrides(root: Path) -> list[str]:
    return [f"data.generate.root={root}", "data.generate.n_train=2", "data.generate.n_val=1",
            "data.generate.shape=[24,24,24]", "trainer.patch_size=[16,16,16]", "trainer.steps_per_epoch=2",
            "trainer.batch_size=1", "trainer.sw_batch_size=1", "model.base_features=4", "model.max_features=16",
            "sketch.n_probes=4", "logger.fidelity_every=0"]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_ddp")


def test_one_process_measures_trains_and_tabulates(tmp_path, bench, monkeypatch, one_thread):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    root = make_synthetic_dataset(tmp_path / "data", n_train=2, n_val=1, shape=(24, 24, 24))
    out = tmp_path / "bench"
    assert bench.main(["--worker", *TINY, "--out", str(out), "--", *_overrides(root)]) == 0
    report = json.loads((out / "nproc_1.json").read_text())
    rows = report["throughput"]
    assert [(r["size"], r["variant"], r["nproc"], r["status"]) for r in rows] == [
        (16, "exact", 1, "ok"), (16, "stochastic+lean", 1, "ok")]
    assert all(r["step_s"] > 0 and r["volumes_per_s"] == pytest.approx(1 / r["step_s"]) for r in rows)
    assert math.isnan(rows[0]["peak_gib"])  # CPU: no device peak
    training = report["training"]
    assert training["steps"] == 2 and training["patches_per_step"] == 1 and 0 <= training["final_mean_dice"] <= 1
    text = bench.tables([report, {**report, "nproc": 2, "throughput": [{**r, "nproc": 2, "volumes_per_s": 2 * r["volumes_per_s"]}
                                                                           for r in rows], "training": None}])
    assert "| 16^3 | exact | 2 | ok |" in text and "| 2 | 1 |" in text  # speedup 2, efficiency 1
    assert "final mean Dice" in text and '"torch"' in text


@pytest.mark.slow
def test_one_and_two_gloo_processes_under_torchrun(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", n_train=2, n_val=1, shape=(24, 24, 24))
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--processes", "1", "2", "--out", str(out), "--",
                             *_overrides(root)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((out / "bench_ddp.json").read_text())["runs"]
    assert [r["nproc"] for r in runs] == [1, 2]
    assert all(row["status"] == "ok" and row["volumes_per_s"] > 0 for r in runs for row in r["throughput"])
    assert [r["training"]["patches_per_step"] for r in runs] == [1, 2]
    assert all(r["training"]["steps"] == 2 for r in runs)
    assert "| 16^3 | stochastic+lean | 2 | ok |" in result.stdout
