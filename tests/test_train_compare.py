"""scripts/train_compare.py: exact and stochastic runs of the same config, one report."""

from __future__ import annotations

import json

from app.data import make_synthetic_dataset
from tests.helpers import load_script


def test_compare_reports_exact_and_stochastic(tmp_path):
    module = load_script("train_compare")
    root = make_synthetic_dataset(tmp_path / "data", n_train=2, n_val=1, shape=(24, 24, 24))
    overrides = [f"data.generate.root={root}", "data.generate.n_train=2", "data.generate.n_val=1",
                 "data.generate.shape=[24,24,24]", "trainer.patch_size=[16,16,16]", "trainer.max_epochs=2",
                 "trainer.steps_per_epoch=1", "trainer.batch_size=1", "trainer.sw_batch_size=1", "trainer.device=cpu",
                 "model.base_features=4", "model.max_features=8", "logger=disabled"]
    assert module.main(["--out", str(tmp_path / "cmp"), "--probes", "0,4", *overrides]) == 0
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["n_probes"] for r in report["runs"]] == [0, 4]
    assert all(r["steps"] == 2 and 0.0 <= r["best_mean_dice"] <= 1.0 and r["step_time_s"] > 0 for r in report["runs"])
    assert report["environment"]["torch"]
    assert "| exact | 2 |" in (tmp_path / "cmp" / "compare.md").read_text()
