"""Gradient fidelity (app.nn.fidelity), probe allocation, the fidelity benchmark and the quality study, on the CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import app.nn as snn
from app.nn.fidelity import (
    ProbeAllocator,
    allocate_probes,
    compare_estimators,
    fidelity_figures,
    gradient_fidelity,
    split_sketch_config,
)
from tests.helpers import load_script


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see conftest.one_thread


def tiny_net(n_probes: int = 4) -> nn.Module:
    """Full-resolution convs around a batch norm and dropout (their state and masks must not leak)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.LeakyReLU(0.01), nn.Dropout3d(0.2),
        nn.Conv3d(4, 4, 3, padding=1), nn.LeakyReLU(0.01), nn.Conv3d(4, 2, 1),
    )
    return snn.convert(net, n_probes)


def make_batch(seed: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool3d(torch.randn(2, 1, size + 2, size + 2, size + 2, generator=g), 3, 1)
    return x, (x > 0).long()[:, 0]


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def test_exact_against_exact_is_perfect_with_zero_probes():
    net = tiny_net(n_probes=0)
    rep = gradient_fidelity(net, loss_fn, make_batch(0), n_draws=2)
    assert [lay.name for lay in rep.layers] == ["0", "4", "6"]
    for a in (*rep.layers, rep.network, rep.convs):
        assert a.cosine == pytest.approx(1.0, abs=1e-9) and a.rel_error == 0.0
    assert not any(lay.sketched for lay in rep.layers)
    assert math.isnan(rep.network.sgd_rel_error) and "sgd_rel_network" not in rep


def test_error_falls_and_cosine_rises_with_probes():
    net = tiny_net()
    variants = {"r4": {"n_probes": 4}, "r128": {"n_probes": 128}}
    reps = compare_estimators(net, loss_fn, make_batch(0, size=10), variants=variants, n_draws=3)
    lo, hi = reps["r4"], reps["r128"]
    assert all(lay.sketched for lay in lo.layers)
    assert hi["cos_convs"] > lo["cos_convs"] and hi["rel_convs"] < lo["rel_convs"] / 3  # 1/sqrt(r): 5.7x expected
    for a, b in zip(lo.layers, hi.layers):
        assert b.rel_error < a.rel_error and b.cosine > a.cosine
    # dX is exact, so the only gradient errors are in the sketched weights
    assert lo.network.rel_error * lo.network.norm == pytest.approx(lo.convs.rel_error * lo.convs.norm, rel=1e-9)
    # the layers' own options are back
    assert all(layer.n_probes == 4 for _, layer in snn.stochastic_layers(net))


def test_model_state_grads_and_random_streams_are_untouched():
    net = tiny_net()
    params = list(net.parameters())
    for i, p in enumerate(params):
        p.grad = None if i % 2 else torch.full_like(p, float(i))
    grads = [None if p.grad is None else (p.grad, p.grad.clone()) for p in params]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    snn.manual_seed(123)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    gradient_fidelity(net, loss_fn, make_batch(0), reference_batch=make_batch(1), n_draws=2)
    assert torch.equal(torch.get_rng_state(), rng)
    for p, saved in zip(params, grads):
        if saved is None:
            assert p.grad is None
        else:
            assert p.grad is saved[0] and torch.equal(p.grad, saved[1])
    for k, v in net.state_dict().items():  # weights and batch-norm running statistics
        assert torch.equal(v, state[k]), k
    # the probe-seed stream is where it was: the next probes are those of a fresh manual_seed(123)
    from app.nn.probes import next_seed

    first = next_seed()
    snn.manual_seed(123)
    assert next_seed() == first


def test_reference_batch_gives_sgd_noise_from_the_other_batch():
    net = tiny_net()
    rep = gradient_fidelity(net, loss_fn, make_batch(0), reference_batch=make_batch(1), n_draws=1)
    assert rep.has_reference
    for a in (*rep.layers, rep.network):
        assert 0 < a.sgd_rel_error and a.sgd_cosine < 1 - 1e-6
    same = gradient_fidelity(net, loss_fn, make_batch(0), reference_batch=make_batch(0), n_draws=0)
    assert same.network.sgd_rel_error == 0.0 and same.network.sgd_cosine == pytest.approx(1.0)
    assert math.isnan(same.network.rel_error) and "rel_network" not in same


def test_figures_for_a_logger_and_the_trainers_call():
    net = tiny_net()
    rep = gradient_fidelity(net, loss_fn, make_batch(0), reference_batch=make_batch(1), n_draws=1)
    figs = fidelity_figures(rep)
    for key in ("cos_network", "rel_network", "sgd_rel_network", "cos_convs", "noise_ratio_max", "rel/0", "sgd_rel/4"):
        assert isinstance(figs[f"fidelity/{key}"], float)
    assert dict(rep)["rel_network"] == rep.network.rel_error
    batch = make_batch(0)
    closure_rep = gradient_fidelity(net, lambda m: loss_fn(m, batch), n_draws=1)  # loss_fn(model), no batch
    assert math.isfinite(closure_rep["rel_network"])
    with pytest.raises(ValueError, match="model.train"):
        gradient_fidelity(net.eval(), loss_fn, batch)


class TwoScales(nn.Module):
    """One conv at full resolution, one after 8x pooling (8 voxels: a tiny input)."""

    def __init__(self) -> None:
        super().__init__()
        self.full = nn.Conv3d(1, 4, 3, padding=1)
        self.coarse = nn.Conv3d(4, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.full(x), 0.01)
        c = F.leaky_relu(self.coarse(F.max_pool3d(h, 8)), 0.01)
        return self.head(h + F.interpolate(c, scale_factor=8))


def test_allocate_probes_keeps_tiny_inputs_exact_and_returns_candidates():
    torch.manual_seed(0)
    net = snn.convert(TwoScales(), 16)
    batch, ref = make_batch(0, 16), make_batch(1, 16)
    candidates = (0, 4, 8, 16)
    # a loose tolerance: the full-resolution layers take the fewest probes, the 2^3 input stays exact
    alloc = allocate_probes(net, loss_fn, batch, ref, candidates=candidates, min_voxels=64, ratio=1e6, n_draws=1)
    assert alloc == {"full": 4, "coarse": 0, "head": 4}
    assert {name: layer.n_probes for name, layer in snn.stochastic_layers(net)} == alloc
    # an impossible tolerance: nothing is good enough, everything falls back to exact
    strict = allocate_probes(net, loss_fn, batch, ref, candidates=candidates, min_voxels=64, ratio=1e-9, n_draws=1, apply=False)
    assert set(strict.values()) == {0}
    thrifty = allocate_probes(net, loss_fn, batch, ref, candidates=candidates, min_voxels=64, ratio=1e-9, n_draws=1,
                              fallback="largest", apply=False)
    assert thrifty == {"full": 16, "coarse": 0, "head": 16}
    assert net.full.n_probes == 4  # apply=False left the layers alone
    # the default criterion picks only candidates
    auto = allocate_probes(net, loss_fn, batch, ref, candidates=candidates, min_voxels=64, n_draws=1)
    assert set(auto.values()) <= set(candidates) and auto["coarse"] == 0
    with pytest.raises(ValueError, match="power of two"):
        snn.convert(net, 16, probes="orthogonal")
        allocate_probes(net, loss_fn, batch, ref, candidates=(0, 6))


def test_probe_allocator_schedule_and_sketch_config():
    torch.manual_seed(0)
    net = snn.convert(TwoScales(), 16)
    allocator = ProbeAllocator(net, loss_fn, every=2, candidates=(0, 4), min_voxels=64, ratio=1e6, n_draws=1)
    results = [allocator.maybe_reallocate(step, make_batch(step, 16)) for step in range(5)]
    assert results[0] is None  # no reference batch yet
    assert results[1] == {"full": 4, "coarse": 0, "head": 4}
    assert results[2] is None and results[3] is not None and results[4] is None
    assert allocator.last_step == 3

    convert_kw, auto_kw = split_sketch_config({"n_probes": "auto", "probes": "rademacher", "auto_every": 100,
                                               "auto_candidates": [0, 8, 32], "auto_draws": 2})
    assert convert_kw == {"n_probes": 32, "probes": "rademacher"}
    assert auto_kw == {"every": 100, "candidates": (0, 8, 32), "n_draws": 2}
    assert split_sketch_config({"n_probes": 16, "auto_every": 5}) == ({"n_probes": 16}, None)
    with pytest.raises(ValueError, match="auto_evrey"):
        split_sketch_config({"n_probes": "auto", "auto_evrey": 5})


def test_estimator_names():
    from app.bench.fidelity import estimator_options

    assert estimator_options("shifted") == {"sketch": "shifted", "probes": "rademacher", "control": "mean"}
    assert estimator_options("offset-orthogonal-nocv") == {"sketch": "offset", "probes": "orthogonal", "control": "none"}
    with pytest.raises(ValueError, match="did you mean 'gaussian'"):
        estimator_options("shifted-gausian")


def test_bench_cli_prints_a_table_and_writes_a_png(tmp_path, capsys):
    from app.bench.__main__ import main

    out = tmp_path / "out"
    code = main(["fidelity", "--data", "synthetic", "--data-root", str(tmp_path / "data"), "--n-cases", "2",
                 "--patch", "16", "--batch-size", "1", "--model-arg", "base_features=4", "max_features=8",
                 "--n-probes", "4", "--estimators", "shifted", "offset", "--draws", "1", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "# Gradient fidelity — torch" in text
    assert "| shifted r4 |" in text and "| offset r4 |" in text and "`input_block.conv1.conv`" in text
    png = (out / "fidelity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(out / "fidelity.png").shape[2] in (3, 4)
    payload = json.loads((out / "fidelity.json").read_text())
    assert set(payload["reports"]) == {"shifted r4", "offset r4"}


def test_bench_cli_storages_alone_prints_the_storage_errors(tmp_path, capsys):
    """``fidelity --estimators --storages ...``: no estimator runs; one row per storage dtype, fp32
    storage has no error, fp8 more than bf16, each next to the same SGD noise."""
    from app.bench.__main__ import main

    code = main(["fidelity", "--data", "synthetic", "--data-root", str(tmp_path / "data"), "--n-cases", "2",
                 "--patch", "16", "--batch-size", "1", "--model-arg", "base_features=4", "max_features=8",
                 "--estimators", "--storages", "float32", "bfloat16", "float8_e4m3fn", "--device", "cpu",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    text = capsys.readouterr().out
    assert "# Lean storage" in text and "Gradient fidelity" not in text
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in text.splitlines() if line.startswith("| float") or line.startswith("| bfloat")}
    errors = {k: float(v[0]) for k, v in rows.items()}
    noise = {float(v[1]) for v in rows.values()}
    assert errors["float32"] == 0 < errors["bfloat16"] < errors["float8_e4m3fn"] and len(noise) == 1 and noise.pop() > 0
    assert (tmp_path / "out" / "fidelity.md").read_text().startswith("# Lean storage")


def _quality_study():
    return load_script("quality_study")


def test_quality_study_config_names():
    qs = _quality_study()
    assert qs.config_overrides("exact") == ["sketch=exact"]
    assert qs.config_overrides("stochastic-r64-offset-nocv") == [
        "sketch=default", "sketch.n_probes=64", "sketch.sketch=offset", "sketch.control=none"]
    with pytest.raises(ValueError, match="unknown modifier"):
        qs.config_overrides("stochastic-r64-fast")


def test_quality_study_runs_on_cpu(tmp_path):
    qs = _quality_study()
    out = tmp_path / "study"
    code = qs.main(["--steps", "2", "--seeds", "0", "--tasks", "synthetic", "--configs", "exact", "stochastic",
                    "--patch", "16", "--volume", "16", "--n-train", "2", "--n-val", "1", "--batch-size", "1",
                    "--device", "cpu", "--data-root", str(tmp_path / "data"), "--out", str(out),
                    "--", "model.base_features=4", "model.max_features=8"])
    assert code == 0
    text = (out / "quality_study.md").read_text()
    assert "| exact | 16³ | 2 | 0 |" in text and "| stochastic | 16³ | 2 | 0 |" in text
    assert "equal-memory comparison skipped: it needs CUDA" in text
    runs = json.loads((out / "quality_study.json").read_text())["runs"]
    assert [r["config"] for r in runs] == ["exact", "stochastic"]
    assert all(0.0 <= r["mean_dice"] <= 1.0 and np.isfinite(r["final_loss"]) for r in runs)
