"""``python -m app.bench memory`` on the CPU with tiny sizes: table, markdown file, PNG plot, OOM rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

import app.nn
from app.bench import memory
from app.bench.__main__ import COMMANDS
from app.bench.__main__ import main as bench_main
from app.bench.networks import bench_model_config
from app.measure import StepStats, environment, environment_info, parse_variant
from app.measure import step as step_module
from app.nn.modules import StochasticConvMixin
from app.plan import plan

TINY = {"name": "dynunet", "in_channels": 1, "out_channels": 2, "spacing": [1.0, 1.0, 1.0],
        "base_features": 4, "max_features": 16, "max_depth": 3}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_model(monkeypatch):
    monkeypatch.setitem(memory.BENCH_MODELS, "tiny", TINY)


def test_registered():
    assert COMMANDS["memory"][0] == "app.bench.memory"


def test_environment_line_and_data_agree():
    info = environment_info()
    assert environment().startswith(f"torch {info['torch']}, python {info['python']}, ")
    assert ("gpu" in info) == torch.cuda.is_available()
    assert set(environment_info(torch.device("cpu"))) == {"python", "torch", "cpu", "threads"}
    json.dumps(info)


def test_cpu_run_writes_table_markdown_and_png(tmp_path, capsys, tiny_model):
    out = tmp_path / "bench"
    rc = bench_main(["memory", "--models", "tiny", "--sizes", "16", "24", "--variants", "exact", "stochastic",
                     "--warmup", "0", "--repeat", "1", "--out", str(out), "--cache", str(tmp_path / "c.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    md = (out / "memory.md").read_text()
    assert "| model | edge | variant | step ms | time / exact | saved MiB | saved B/voxel |" in md
    assert "peak GiB" not in md and "CPU: no peak memory" in md  # CPU: bytes and time only
    assert "torch " in md  # the environment line
    assert md.strip() in printed
    rows = [line for line in md.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 4
    png = (out / "memory.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    raw = json.loads((out / "memory.json").read_text())
    stoch = next(r for r in raw["rows"] if r["edge"] == 24 and r["variant"] == "stochastic")
    exact = next(r for r in raw["rows"] if r["edge"] == 24 and r["variant"] == "exact")
    assert 0 < stoch["saved_bytes"] < exact["saved_bytes"]
    assert stoch["step_seconds"] > 0 and stoch["peak_bytes"] is None
    # the table's ratio column divides each row by the exact row of its edge
    stoch_row = next(r for r in rows if "| 24 | stochastic |" in r).split("|")
    assert float(stoch_row[5]) == pytest.approx(stoch["step_seconds"] / exact["step_seconds"], rel=5e-3, abs=5e-3)
    assert float(stoch_row[7]) == pytest.approx(stoch["saved_bytes_per_voxel"], rel=5e-3)


def test_lean_storage_option_sets_what_the_lean_norms_keep(tmp_path, tiny_model):
    """``--lean-storage float8_e4m3fn``: the lean variant saves fewer bytes than with bf16 storage
    (x̂ in one byte instead of two), and the report names the storage."""
    saved = {}
    for storage in ("bfloat16", "float8_e4m3fn"):
        out = tmp_path / storage
        assert bench_main(["memory", "--models", "tiny", "--sizes", "16", "--variants", "stochastic+lean",
                           "--lean-storage", storage, "--warmup", "0", "--repeat", "1", "--no-cache", "--out", str(out)]) == 0
        assert f"lean storage {storage}" in (out / "memory.md").read_text()
        saved[storage] = json.loads((out / "memory.json").read_text())["rows"][0]["saved_bytes"]
    assert 0 < saved["float8_e4m3fn"] < saved["bfloat16"]


def test_conv_block_option_sets_the_blocked_variants_block_only(tiny_model):
    """``--conv-block N`` reaches the stochastic layers of ``blocked`` variants (and no other)."""
    args = memory._parser().parse_args(["--conv-block", "4096"])
    options = memory._sketch_options(args)
    cfg = bench_model_config("tiny", [], (16, 16, 16))
    blocks = {}
    for name in ("stochastic+lean", "stochastic+lean+blocked"):
        model = step_module.build_variant_model(cfg, parse_variant(name), 8, options)
        layers = [m for m in model.modules() if isinstance(m, StochasticConvMixin)]
        assert layers
        blocks[name] = {m.conv_block for m in layers}
    assert blocks == {"stochastic+lean": {None}, "stochastic+lean+blocked": {4096}}
    default = step_module.build_variant_model(cfg, parse_variant("stochastic+blocked"), 8, {})
    assert {m.conv_block for m in default.modules() if isinstance(m, StochasticConvMixin)} == {app.nn.CONV_BLOCK}


def test_planner_reuses_the_bench_measurements(tmp_path, tiny_model):
    """The bench and the planner key their shared calibration cache the same way."""
    cache = tmp_path / "cache.json"
    assert memory.main(["--models", "tiny", "--sizes", "16", "32", "--variants", "exact", "--repeat", "1",
                        "--out", str(tmp_path / "bench"), "--cache", str(cache)]) == 0

    def not_cached(patch):
        raise AssertionError(f"{patch} measured again: the bench's cache entry was not found")

    result = plan(TINY, 1.0, (1.0, 1.0, 1.0), "exact", device="cpu", max_edge=32, edge_step=16, cache=cache,
                  measure_fn=not_cached)
    assert result.patch_size == (32, 32, 32)
    assert result.trials and all(t.extra["source"] == "cached" for t in result.trials)


def test_oom_rows_and_larger_sizes_skipped(tmp_path, tiny_model, monkeypatch):
    calls = []

    def fake(cfg, *, patch_size, variant, **kwargs):
        calls.append((patch_size[0], variant))
        status = "oom" if variant == "exact" and patch_size[0] >= 24 else "ok"
        voxels = math.prod(patch_size)
        return StepStats(variant, tuple(patch_size), 1, status=status, peak_bytes=100.0 * voxels,
                         step_seconds=0.01, saved_bytes=50.0 * voxels, saved_bytes_per_voxel=50.0, device="fake")

    monkeypatch.setattr(memory, "measure_step", fake)
    monkeypatch.setattr(memory.torch.cuda, "is_available", lambda: False)
    out = tmp_path / "bench"
    assert memory.main(["--models", "tiny", "--sizes", "16", "24", "32", "--variants", "exact", "amp",
                        "--out", str(out), "--no-cache"]) == 0
    md = (out / "memory.md").read_text()
    assert "| tiny | 24 | exact | OOM |" in md and "| tiny | 32 | exact | OOM |" in md
    assert (32, "exact") not in calls  # once out of memory, larger sizes are not run
    assert (32, "amp") in calls
    assert "| tiny | 24 | amp | 10 | - |" in md  # no exact row to compare with: ratio "-"


def test_rejects_unknown_variant(capsys, tiny_model):
    with pytest.raises(SystemExit):
        memory.main(["--models", "tiny", "--variants", "exact", "magic"])
    assert "'magic'" in capsys.readouterr().err


def test_max_cube_on_cpu_is_an_estimate(tmp_path, tiny_model, capsys):
    out = tmp_path / "bench"
    assert memory.main(["--models", "tiny", "--sizes", "16", "--variants", "exact", "--repeat", "0", "--max-cube",
                        "--max-cube-variants", "exact", "stochastic", "--cap-gib", "0.1", "--max-edge", "96",
                        "--out", str(out), "--cache", str(tmp_path / "c.json")]) == 0
    md = (out / "memory.md").read_text()
    assert "Largest cube that trains within 0.1 GiB" in md and "ESTIMATED" in md
    assert "| tiny | exact |" in md and "| tiny | stochastic |" in md


def test_cuda_table_has_peaks_ratios_and_the_calibration_factor():
    gib = 2.0**30

    def row(variant, peak_gib, ms, saved_gib):
        return {"model": "m", "edge": 64, "variant": variant, "status": "ok", "peak_bytes": peak_gib * gib,
                "step_seconds": ms / 1e3, "saved_bytes": saved_gib * gib, "saved_bytes_per_voxel": saved_gib * gib / 64**3,
                "parameter_bytes": 0.25 * gib}

    oom = {"model": "m", "edge": 64, "variant": "ckpt", "status": "oom", "peak_bytes": None, "step_seconds": None,
           "saved_bytes": None, "saved_bytes_per_voxel": None, "parameter_bytes": None}
    rows = [row("exact", 10.0, 100.0, 6.0), row("amp", 5.0, 50.0, 3.0), oom]
    text = memory.table(rows, cuda=True)
    assert "| peak GiB | peak / exact |" in text and "| calib |" in text
    assert "| m | 64 | amp | 5 | 0.5 | 50 | 0.5 | 3072 | 12288 | 1.33 |" in text  # (5 - 4 x 0.25) / 3
    assert "| m | 64 | ckpt | OOM |" in text
