"""``python -m app.bench profile`` on the CPU: every layer profiled, converted against plain."""

from __future__ import annotations

import json

import torch

from app.bench.__main__ import COMMANDS
from app.bench.profile import main, profile_calls, profile_layers
from app.models import build_model, resolve_model_config

TINY = {"name": "dynunet", "in_channels": 1, "out_channels": 2, "spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
        "base_features": 4, "max_features": 8, "max_depth": 3}


def test_profile_calls_counts_the_ops_it_runs():
    x = torch.randn(8, 8)
    one = profile_calls([lambda: x.add(1)] * 4, torch.device("cpu"))
    three = profile_calls([lambda: x.add(1).mul(2).sub(3)] * 4, torch.device("cpu"))
    assert 0 < one.ops < three.ops and one.kernels == 0 and one.device_ms == 0
    assert one.host_ms > 0


def test_every_layer_is_profiled_and_the_sketch_costs_ops():
    torch.manual_seed(0)
    model = build_model(resolve_model_config(TINY))
    rows = profile_layers(model, torch.randn(1, 1, 16, 16, 16), {"n_probes": 8, "lean": True}, None, repeat=1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert sum(r.kind == "conv" for r in rows) == len(convs)
    assert {r.kind for r in rows} == {"conv", "norm", "act"}
    first = rows[0]
    assert first.kind == "conv" and first.input_shape == (1, 1, 16, 16, 16)
    # the sketch's forward and backward dispatch more operators than a plain convolution
    assert first.converted_forward.ops > first.plain_forward.ops
    assert first.converted_backward.ops > first.plain_backward.ops


def test_cli_prints_and_writes_the_summary(tmp_path, capsys):
    assert COMMANDS["profile"][0] == "app.bench.profile"
    assert main(["--edge", "16", "--device", "cpu", "--repeat", "1", "--n-probes", "8", "--layers",
                 "--model-arg", "base_features=4", "max_features=8", "max_depth=3",
                 "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| kind | layers | pass | converted ops | converted host ms | plain ops | plain host ms |" in text
    assert (tmp_path / "profile.md").read_text().strip() == text.strip()
    raw = json.loads((tmp_path / "profile.json").read_text())
    assert raw["layers"] and {"converted_forward", "plain_backward"} <= set(raw["layers"][0])


def test_step_profile_names_the_operators_of_each_variant(tmp_path, capsys):
    """``--steps``: one table of totals, then per variant its operators by time; the stochastic step
    runs FFTs that the exact one does not, and the operators' times add up to the step's."""
    assert main(["--edge", "16", "--device", "cpu", "--repeat", "1", "--n-probes", "8", "--top", "200",
                 "--steps", "exact", "stochastic+lean", "--model-arg", "base_features=4", "max_features=8",
                 "max_depth=3", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| variant | ops/step | host ms |" in text
    assert "**exact**: top 200 operators" in text and "**stochastic+lean**: top 200 operators" in text
    steps = {s["variant"]: s for s in json.loads((tmp_path / "profile.json").read_text())["steps"]}
    names = {v: {op[0] for op in s["operators"]} for v, s in steps.items()}
    assert "aten::_fft_r2c" in names["stochastic+lean"] and "aten::_fft_r2c" not in names["exact"]
    for s in steps.values():
        total = sum(op[2] for op in s["operators"])
        assert 0 < total <= s["host_ms"] * 1.05  # self times partition the profiled host time
