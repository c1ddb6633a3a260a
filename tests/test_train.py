"""``train(cfg)`` end to end on tiny CPU runs: checkpoints, metrics, resume, W&B offline files,
a user's Decathlon folder, bad data, out-of-memory advice, gradient checkpointing."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import app.nn
from app.data import DataError, make_synthetic_dataset
from app.models import build_model, load_checkpoint, model_from_checkpoint
from app.train import TrainingError, config_dir, train
from app.models.grad_checkpoint import enable_grad_checkpointing, stages
from app.train.loop import Trainer, out_of_memory_message
from app.train.validation import mean_dice, overlay

# A run of a few seconds: 24^3 volumes, 16^3 patches, a 4..16-channel DynUNet, 2 epochs x 2 steps.
TINY_DYNUNET = ["model.base_features=4", "model.max_features=16"]
TINY = [
    "trainer.patch_size=[16,16,16]",
    "trainer.max_epochs=2",
    "trainer.steps_per_epoch=2",
    "trainer.batch_size=1",
    "trainer.sw_batch_size=1",
    "trainer.device=cpu",
    "sketch.n_probes=4",
    "logger=disabled",
]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", n_train=3, n_val=1, shape=(24, 24, 24))


def tiny_cfg(out: Path, data_root: Path | None, *overrides: str) -> DictConfig:
    """The real config, shrunk: ``data_root`` replaces the synthetic cache folder."""
    if not any(o.startswith("model=") and o != "model=dynunet" for o in overrides):
        overrides = (*TINY_DYNUNET, *overrides)
    data = [] if data_root is None else [f"data.generate.root={data_root}", "data.generate.n_train=3",
                                         "data.generate.n_val=1", "data.generate.shape=[24,24,24]"]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose("train", overrides=[f"output_dir={out}", *TINY, *data, *overrides])
    finally:
        GlobalHydra.instance().clear()


def test_train_end_to_end_writes_loadable_checkpoints(tmp_path, synthetic_root):
    cfg = tiny_cfg(tmp_path / "run", synthetic_root)
    metrics = train(cfg)

    assert metrics["epoch"] == 2 and metrics["global_step"] == 4
    assert math.isfinite(metrics["train/epoch_loss"]) and metrics["train/step_time_s"] > 0
    dice_keys = sorted(k for k in metrics if k.startswith("val/dice/"))
    assert len(dice_keys) == 2  # classes 1 and 2 (background excluded)
    assert 0.0 <= metrics["val/mean_dice"] <= 1.0
    assert metrics["val/mean_dice"] == pytest.approx(np.mean([metrics[k] for k in dice_keys]))
    assert metrics["val/best_mean_dice"] >= metrics["val/mean_dice"]
    # gradient fidelity of the last epoch: sketched vs exact gradient, and the SGD-noise reference
    assert -1.0 <= metrics["fidelity/cos_network"] <= 1.0 and metrics["fidelity/sgd_rel_network"] > 0

    run = tmp_path / "run"
    resolved = OmegaConf.load(run / "config_resolved.yaml")
    assert resolved.model.out_channels == 3 and list(resolved.model.spacing) == [1.0, 1.0, 1.0]
    for name in ("last.pt", "best.pt"):
        raw = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert raw["class_names"][0] == "background" and len(raw["class_names"]) == 3
        assert raw["config"]["trainer"]["max_epochs"] == 2
        assert {"optimizer", "scheduler", "scaler", "rng", "epoch", "global_step", "best_metric"} <= set(raw)
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and last["global_step"] == 4
    assert isinstance(last["rng"]["numpy"]["keys"], list) and isinstance(last["rng"]["python"]["internal"], list)
    net = model_from_checkpoint(last)  # plain MONAI net: the stochastic layers kept the state_dict keys
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


@pytest.mark.parametrize(
    "variant",
    [
        ["trainer.grad_checkpointing=true", "trainer.amp=bf16", "trainer.grad_accum=2", "trainer.max_epochs=1"],
        ["model=unet", "model.channels=[4,8,16]", "model.strides=[2,2]", "model.num_res_units=1",
         "optim=sgd", "sketch=exact", "sketch.n_probes=0", "trainer.max_epochs=1"],
        ["sketch.n_probes=auto", "sketch.auto_candidates=[2,4]", "sketch.auto_draws=1", "sketch.auto_min_voxels=0",
         "trainer.max_epochs=1"],
    ],
    ids=["ckpt-bf16-accum", "unet-sgd-exact", "auto-probes"],
)
def test_train_variants(tmp_path, synthetic_root, variant, caplog):
    with caplog.at_level("INFO", logger="app.train.loop"):
        metrics = train(tiny_cfg(tmp_path / "run", synthetic_root, *variant))
    assert math.isfinite(metrics["train/epoch_loss"]) and "val/mean_dice" in metrics
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    if "sketch=exact" in variant:
        assert not any(k.startswith("fidelity/") for k in metrics)
    if "sketch.n_probes=auto" in variant:
        assert "probes per layer" in caplog.text  # the allocator ran (at step 1)


def _stop_after_first_epoch(monkeypatch):
    original = Trainer.train_epoch

    def train_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("simulated stop")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def test_resume_continues_exactly(tmp_path, synthetic_root, monkeypatch):
    """Stopped after epoch 1 and resumed == never stopped: same weights, optimizer state and steps."""
    full = tiny_cfg(tmp_path / "full", synthetic_root)
    full_metrics = train(full)
    reference = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")

    with monkeypatch.context() as m:
        _stop_after_first_epoch(m)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_cfg(tmp_path / "stopped", synthetic_root))
    stopped = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert stopped["epoch"] == 0 and stopped["global_step"] == 2

    # The optimizer and scheduler come back exactly as saved.
    resumed_cfg = tiny_cfg(tmp_path / "resumed", synthetic_root, f"trainer.resume={tmp_path / 'stopped' / 'checkpoints' / 'last.pt'}")
    seen = {}
    original_resume = Trainer.maybe_resume

    def spy(self):
        original_resume(self)
        seen["optimizer"] = copy.deepcopy(self.optimizer.state_dict())
        seen["scheduler"] = copy.deepcopy(self.scheduler.state_dict())
        seen["progress"] = (self.progress.epoch, self.progress.global_step)

    monkeypatch.setattr(Trainer, "maybe_resume", spy)
    resumed_metrics = train(resumed_cfg)
    assert seen["progress"] == (0, 2)
    assert seen["scheduler"]["last_epoch"] == stopped["scheduler"]["last_epoch"] == 2
    for pid, state in stopped["optimizer"]["state"].items():
        assert int(seen["optimizer"]["state"][pid]["step"]) == int(state["step"]) == 2
        torch.testing.assert_close(seen["optimizer"]["state"][pid]["exp_avg"], state["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(seen["optimizer"]["state"][pid]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=0)

    # ...and the resumed run ends where the uninterrupted one did.
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert resumed["epoch"] == 1 and resumed["global_step"] == reference["global_step"] == 4
    assert resumed["scheduler"]["last_epoch"] == reference["scheduler"]["last_epoch"]
    for key, value in reference["model_state"].items():
        torch.testing.assert_close(resumed["model_state"][key], value, msg=key)
    for pid, state in reference["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][pid]["exp_avg_sq"], state["exp_avg_sq"])
    assert resumed_metrics["train/epoch_loss"] == pytest.approx(full_metrics["train/epoch_loss"], rel=1e-5)
    assert [h["epoch"] for h in resumed["history"]] == [1.0, 2.0]


def test_resume_refuses_a_different_model(tmp_path, synthetic_root):
    train(tiny_cfg(tmp_path / "a", synthetic_root, "trainer.max_epochs=1"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.pt"
    with pytest.raises(TrainingError, match="base_features|filters"):
        train(tiny_cfg(tmp_path / "b", synthetic_root, "model.base_features=8", f"trainer.resume={ckpt}"))


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file (a LevelDB-style log: 7-byte file header, then
    32 KiB blocks of chunks with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7 or data[pos + 6] == 0:  # block trailer / padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(Record.FromString(buf))
            buf = b""
    return out


def test_wandb_offline_run_holds_the_logged_keys(tmp_path, synthetic_root, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_cfg(tmp_path / "run", synthetic_root, "logger=offline", "logger.wandb.n_images=1", "trainer.max_epochs=1"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # what `wandb sync` uploads
    (log_file,) = runs[0].glob("run-*.wandb")
    records = wandb_records(log_file)
    history, summary, config = set(), set(), set()
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "summary":
            summary |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
        elif kind == "run":
            config |= {item.key for item in record.run.config.update}
    for key in ("train/loss", "train/lr", "train/epoch_loss", "train/step_time_s", "train/data_wait_s",
                "train/data_wait_fraction", "train/bad_steps", "val/mean_dice",
                "val/best_mean_dice", "val/dice/ellipsoid_1", "val/dice/box_2", "val/overlay/_type",
                "fidelity/cos_network", "fidelity/rel_network"):
        assert key in history and key in summary, key
    assert {"data", "model", "sketch", "optim", "trainer", "logger"} <= config
    assert "exit" in {r.WhichOneof("record_type") for r in records}  # finished cleanly (wandb.finish ran)
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png"))  # the validation overlay


def _write_case(folder: Path, name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> None:
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / "labelsTr" / f"{name}.nii.gz")


def make_user_decathlon(folder: Path, n_cases: int = 4, shape=(28, 30, 26)) -> Path:
    """A Decathlon task as a user would have it: dataset.json without a validation list, 1.2 mm voxels."""
    rng = np.random.default_rng(1)
    affine = np.diag([1.2, 1.2, 1.2, 1.0])
    items = []
    for i in range(n_cases):
        label = np.zeros(shape, np.uint8)
        c = rng.integers(8, 18, size=3)
        label[c[0] - 5 : c[0] + 5, c[1] - 5 : c[1] + 5, c[2] - 5 : c[2] + 5] = 1
        image = rng.normal(0.0, 0.3, shape) + 2.0 * label
        _write_case(folder, f"spleen_{i}", image, label, affine)
        items.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    meta = {"name": "Task99_Tiny", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
            "numTraining": n_cases, "training": items, "test": []}
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder


def test_train_on_a_user_decathlon_folder(tmp_path):
    root = make_user_decathlon(tmp_path / "Task99_Tiny")
    cfg = tiny_cfg(tmp_path / "run", None, "data=decathlon", f"data.root={root}", "data.val_fraction=0.25",
                   "trainer.patch_size=[16,16,16]", "trainer.max_epochs=1")
    metrics = train(cfg)
    assert set(k for k in metrics if k.startswith("val/dice/")) == {"val/dice/spleen"}
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["class_names"] == ["background", "spleen"]
    assert ckpt["model_config"]["spacing"] == [1.5, 1.5, 1.5]  # the decathlon config's resampling target
    assert ckpt["preprocessing"]["spacing"] == [1.5, 1.5, 1.5]


def test_bad_data_fails_before_training(tmp_path):
    root = make_user_decathlon(tmp_path / "bad", n_cases=3)
    (root / "labelsTr" / "spleen_1.nii.gz").unlink()
    cfg = tiny_cfg(tmp_path / "run", None, "data=decathlon", f"data.root={root}")
    with pytest.raises(DataError, match="spleen_1"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained


def test_out_of_memory_names_the_settings_to_lower(tmp_path, synthetic_root, monkeypatch):
    def oom(self, micro):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "_optimizer_step", oom)
    with pytest.raises(TrainingError) as info:
        train(tiny_cfg(tmp_path / "run", synthetic_root))
    message = str(info.value)
    assert "\n" not in message
    for part in ("lower trainer.patch_size (now [16, 16, 16])", "trainer.batch_size (now 1", "sketch.n_probes (now 4)",
                 "set trainer.amp=bf16 (now off)", "set trainer.grad_checkpointing=true (now false)"):
        assert part in message, part
    exact = tiny_cfg(tmp_path / "exact", synthetic_root, "sketch=exact", "sketch.n_probes=0", "trainer.amp=bf16")
    message = out_of_memory_message(exact, "the training step")
    assert "sketch=default (now sketch.n_probes=0)" in message and "trainer.amp" not in message
    assert "trainer.sw_batch_size (now 1)" in out_of_memory_message(exact, "validation")


# ------------------------------------------------------------------------ pieces of the loop


@pytest.mark.parametrize(
    "model_cfg",
    [
        {"name": "dynunet", "patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0], "base_features": 4, "max_features": 8},
        {"name": "unet", "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
        {"name": "basicunet", "features": [4, 4, 8, 8, 16, 4], "size": 32},
        {"name": "segresnet", "init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
    ],
    ids=lambda c: c["name"],
)
def test_grad_checkpointing_keeps_outputs_gradients_and_keys(model_cfg):
    model_cfg = dict(model_cfg)
    size = model_cfg.pop("size", 16)
    cfg = {"in_channels": 1, "out_channels": 2, **model_cfg}
    torch.manual_seed(0)
    plain = build_model(cfg)
    ckpt = build_model(cfg)
    ckpt.load_state_dict(plain.state_dict())
    keys = list(ckpt.state_dict())
    n = enable_grad_checkpointing(ckpt)
    assert n == len(stages(ckpt)) >= 3
    assert list(ckpt.state_dict()) == keys
    x = torch.randn(2, 1, size, size, size)
    out_plain, out_ckpt = plain(x), ckpt(x)
    torch.testing.assert_close(out_ckpt, out_plain)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name, atol=1e-6, rtol=1e-5)


def test_grad_checkpointing_with_stochastic_layers_saves_activations():
    cfg = {"name": "dynunet", "in_channels": 1, "out_channels": 2, "patch_size": [16, 16, 16],
           "spacing": [1.0, 1.0, 1.0], "base_features": 4, "max_features": 8}
    model = app.nn.convert(build_model(cfg), n_probes=4)
    x = torch.randn(1, 1, 16, 16, 16)

    def saved_bytes(m):
        with app.nn.SavedTensorCounter() as counter:
            m(x).sum()
        return counter.bytes if hasattr(counter, "bytes") else counter.total_bytes

    before = saved_bytes(model)
    enable_grad_checkpointing(model)
    after = saved_bytes(model)
    assert after < before
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "deep_supervision" not in n)
    with pytest.raises(ValueError, match="grad_checkpointing"):
        stages(torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3)))


def test_mean_dice_skips_absent_classes_and_overlay_shape():
    assert mean_dice([0.5, float("nan"), 1.0]) == pytest.approx(0.75)
    assert math.isnan(mean_dice([float("nan")]))
    image = np.random.default_rng(0).normal(size=(20, 18, 16))
    label = np.zeros((20, 18, 16), np.int64)
    label[5:10, 5:10, 7] = 1
    pred = np.roll(label, 2, axis=0) * 2
    rgb = overlay(image, label, pred)
    assert rgb.shape == (18, 60, 3) and rgb.dtype == np.uint8
    assert (rgb[:, 20:40] != rgb[:, :20]).any()  # the label panel is coloured


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_half_precision_on_the_cpu_warns_to_turn_it_off(tmp_path, synthetic_root, caplog, amp):
    """Half-precision 3D convolutions run torch's slow reference kernels on the CPU: the trainer says
    so and names the setting, for bf16 and fp16 alike."""
    import logging

    from app.train.distributed import DistInfo

    cfg = tiny_cfg(tmp_path / "run", synthetic_root, f"trainer.amp={amp}")
    with caplog.at_level(logging.WARNING, logger="app.train.loop"):
        Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert any(f"trainer.amp={amp} on the CPU" in r.getMessage() and "trainer.amp=off" in r.getMessage()
               for r in caplog.records)
