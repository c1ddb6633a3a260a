"""The training app's Hydra configs: every group option composes, overrides take effect,
the derived pieces (schedules, optimizer, model config) build from what they hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from app.models import build_model, resolve_model_config
from app.train import config_dir
from app.train.schedules import poly, warmup_constant, warmup_cosine

GROUPS = {
    "data": ["synthetic", "decathlon", "folder", "mni", "video"],
    "model": ["dynunet", "unet", "basicunet", "segresnet"],
    "sketch": ["default", "exact"],
    "optim": ["adamw", "sgd"],
    "trainer": ["default"],
    "logger": ["offline", "online", "disabled"],
    "experiment": ["smoke"],
    "task": ["segmentation", "restoration"],
}
# data configs that read a folder the user names
NEEDS_ROOT = {"decathlon", "folder"}


def _compose(overrides: list[str] = ()):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose("train", overrides=["output_dir=/tmp/unused", *overrides])
    finally:
        GlobalHydra.instance().clear()


def test_config_dir_is_the_checkout_conf():
    folder = config_dir()
    assert folder.is_absolute()
    assert folder == Path(__file__).resolve().parents[1] / "conf"
    assert (folder / "train.yaml").is_file()
    assert all((folder / group).is_dir() for group in GROUPS)


def test_group_options_on_disk_are_the_tested_ones():
    for group, options in GROUPS.items():
        on_disk = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
        assert on_disk == sorted(options), group


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_and_resolves(group, option):
    overrides = [f"{group}={option}"]
    if option in NEEDS_ROOT:
        overrides.append("data.root=/some/folder")
    cfg = _compose(overrides)
    plain = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert set(plain) >= {"data", "model", "sketch", "optim", "trainer", "logger", "output_dir"}
    assert cfg.model.patch_size == cfg.trainer.patch_size
    assert isinstance(plain["data"]["root"], str) and plain["output_dir"] == "/tmp/unused"


def test_defaults_are_the_cpu_quickstart(monkeypatch):
    monkeypatch.delenv("STOCHPROP_DATA", raising=False)
    cfg = _compose()
    assert cfg.data.generate._target_ == "app.data.make_synthetic_dataset"
    assert cfg.data.root == "~/.cache/stochprop/synthetic"
    assert cfg.data.generate.n_classes == 3 and list(cfg.data.generate.shape) == [48, 48, 48]
    assert cfg.model.name == "dynunet" and cfg.model.out_channels is None
    assert cfg.sketch.n_probes > 0
    assert cfg.logger.wandb.mode == "offline"
    assert cfg.trainer.amp == "off" and cfg.trainer.resume is None and cfg.trainer.device == "auto"


def test_data_cache_folder_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STOCHPROP_DATA", str(tmp_path))
    assert _compose().data.root == f"{tmp_path}/synthetic"
    assert _compose(["data=mni"]).data.root == f"{tmp_path}/mni"


def test_mandatory_root_for_user_folders():
    cfg = _compose(["data=decathlon"])
    assert OmegaConf.is_missing(cfg.data, "root")
    assert cfg.data.generate is None


def test_overrides_take_effect():
    cfg = _compose(
        [
            "model=unet",
            "sketch=exact",
            "optim=sgd",
            "optim/scheduler=cosine",
            "logger=disabled",
            "trainer.max_epochs=3",
            "trainer.patch_size=[64,64,32]",
            "trainer.amp=bf16",
            "trainer.grad_checkpointing=true",
            "sketch.n_probes=8",
            "optim.optimizer.lr=0.5",
        ]
    )
    assert cfg.model.name == "unet" and list(cfg.model.patch_size) == [64, 64, 32]
    assert cfg.sketch.n_probes == 8
    assert cfg.optim.optimizer._target_ == "torch.optim.SGD" and cfg.optim.optimizer.lr == 0.5
    assert cfg.optim.scheduler._target_ == "app.train.schedules.warmup_cosine"
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.amp == "bf16" and cfg.trainer.grad_checkpointing is True
    assert cfg.logger.wandb.mode == "disabled"


def test_exact_sketch_and_smoke_experiment():
    assert _compose(["sketch=exact"]).sketch.n_probes == 0
    smoke = _compose(["experiment=smoke"])
    assert smoke.logger.wandb.mode == "disabled"
    assert list(smoke.trainer.patch_size) == [32, 32, 32] and smoke.trainer.max_epochs == 2
    assert smoke.data.generate.root.endswith("synthetic-smoke")


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
@pytest.mark.parametrize("scheduler", ["cosine", "poly", "constant"])
def test_optimizer_and_scheduler_instantiate(optim, scheduler):
    cfg = _compose([f"optim={optim}", f"optim/scheduler={scheduler}"])
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = instantiate(cfg.optim.optimizer, _convert_="all")(params)
    sched = instantiate(cfg.optim.scheduler, _convert_="all")(opt, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    base = cfg.optim.optimizer.lr
    assert max(lrs) <= base * (1 + 1e-9)
    if scheduler != "constant":
        assert lrs[-1] < 0.5 * base


@pytest.mark.parametrize("model", GROUPS["model"])
def test_model_configs_build_with_data_filled_in(model):
    cfg = _compose([f"model={model}", "trainer.patch_size=[32,32,32]"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.update(out_channels=3, spacing=[1.0, 1.0, 1.0])
    if model == "dynunet":
        model_cfg.update(base_features=4, max_features=8)
    net = build_model(resolve_model_config(model_cfg))
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 1, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)


# --------------------------------------------------------------------------- schedules


def test_warmup_cosine_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup=0.1, min_lr_ratio=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then non-increasing
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_poly_matches_nnunet_formula():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = poly(opt, total_steps=50, exponent=0.9)
    for step in range(50):
        assert sched.get_last_lr()[0] == pytest.approx(0.01 * (1 - step / 50) ** 0.9)
        opt.step()
        sched.step()


def test_constant_with_warmup_and_bad_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_constant(opt, total_steps=10, warmup=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0] + [2.0] * 8)
    with pytest.raises(ValueError, match="warmup"):
        warmup_cosine(opt, total_steps=10, warmup=1.5)
    with pytest.raises(ValueError, match="total_steps"):
        poly(opt, total_steps=0)


def test_sketch_config_defaults_are_the_layers_defaults():
    """conf/sketch/default.yaml states app.nn's defaults, and every key it sets is an option of
    app.nn.convert or of the probe allocator."""
    import inspect

    import app.nn
    from app.nn.fidelity import split_sketch_config

    sketch = OmegaConf.to_container(OmegaConf.load(config_dir() / "sketch" / "default.yaml"))
    assert sketch["sketch"] == app.nn.DEFAULT_SKETCH and sketch["n_probes"] == app.nn.DEFAULT_N_PROBES
    convert_kwargs, _ = split_sketch_config(sketch)
    parameters = inspect.signature(app.nn.convert).parameters
    assert set(convert_kwargs) <= set(parameters)
    assert sketch["conv_block"] is parameters["conv_block"].default is None  # off unless asked for
