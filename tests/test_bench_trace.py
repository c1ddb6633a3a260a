"""``python -m app.bench trace`` on the CPU: the bytes at the peak add up and are attributed."""

from __future__ import annotations

import json

import pytest
import torch

from app.bench.trace import PEAK_CATEGORIES, WORKSPACE, main, trace_step
from app.measure import TrainingStep, model_config_for_patch, parse_variant

TINY = {"name": "dynunet", "in_channels": 1, "out_channels": 2, "spacing": [1.0, 1.0, 1.0],
        "base_features": 4, "max_features": 16, "max_depth": 3}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("variant", ["stochastic+lean"])
def test_peak_bytes_split_into_categories_and_sources(variant):
    patch = (24, 24, 24)
    step = TrainingStep(model_config_for_patch(TINY, patch), parse_variant(variant), patch, 1, 8, {}, torch.device("cpu"))
    trace = trace_step(step, torch.device("cpu"), top=1000)
    assert set(trace.at_peak) == set(PEAK_CATEGORIES)
    assert sum(trace.at_peak.values()) == trace.peak_bytes > 0
    assert sum(b for *_, b in trace.sources) == trace.peak_bytes  # every live byte has a source row
    assert trace.at_peak["parameter"] > 0 and trace.at_peak["optimizer_state"] > 0
    # the peak is reached inside the step (a module's forward or an autograd node), by a tensor
    # operator or a library workspace
    scope, op = trace.peak_during
    assert scope != "-" and (op.startswith("aten::") or op == WORKSPACE)
    # the timeline's largest total is the peak the replay found
    assert max(sum(row) for row in trace.by_category) == trace.peak_bytes


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["--edge", "16", "--device", "cpu", "--variants", "exact", "stochastic+lean", "--model-arg",
                 "base_features=4", "max_features=16", "max_depth=3", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| variant | peak MiB | parameter MiB |" in text and "workspace MiB | peak reached in |" in text and "### stochastic+lean: the largest sources" in text
    raw = json.loads((tmp_path / "trace.json").read_text())
    assert set(raw["traces"]) == {"exact", "stochastic+lean"}
    assert (tmp_path / "trace.png").read_bytes().startswith(PNG_SIGNATURE)
