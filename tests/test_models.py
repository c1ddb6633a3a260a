"""Tests for app.models: planner, factory, checkpoint format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import app.nn

from app.models import (
    CheckpointError,
    build_model,
    check_patch_size,
    load_checkpoint,
    model_from_checkpoint,
    plan_dynunet,
    resolve_model_config,
    save_checkpoint,
)

TINY_DYNUNET = {"base_features": 4, "max_features": 16}

# (config, input shape, expected output shape)
FORWARD_CASES: list[tuple[dict[str, Any], tuple[int, ...], tuple[int, ...]]] = [
    (
        {
            "name": "dynunet",
            "in_channels": 1,
            "out_channels": 3,
            "patch_size": [32, 32, 32],
            "spacing": [1.0, 1.0, 1.0],
            **TINY_DYNUNET,
        },
        (2, 1, 32, 32, 32),
        (2, 3, 32, 32, 32),
    ),
    (  # anisotropic plan, non-cubic input (any multiple of the divisor works)
        {
            "name": "dynunet",
            "in_channels": 2,
            "out_channels": 2,
            "patch_size": [16, 32, 24],
            "spacing": [3.0, 1.0, 1.0],
            **TINY_DYNUNET,
        },
        (1, 2, 8, 48, 24),
        (1, 2, 8, 48, 24),
    ),
    (  # explicit topology, no planner
        {
            "name": "dynunet",
            "in_channels": 1,
            "out_channels": 2,
            "kernel_size": [3, 3, [1, 3, 3]],
            "strides": [1, 2, [1, 2, 2]],
            "filters": [4, 8, 8],
        },
        (1, 1, 12, 20, 28),
        (1, 2, 12, 20, 28),
    ),
    (
        {
            "name": "unet",
            "in_channels": 2,
            "out_channels": 2,
            "channels": [4, 8, 16],
            "strides": [2, 2],
            "num_res_units": 1,
        },
        (2, 2, 12, 16, 20),
        (2, 2, 12, 16, 20),
    ),
    (  # BasicUNet pads odd sizes itself
        {"name": "basicunet", "in_channels": 1, "out_channels": 2, "features": [4, 4, 8, 8, 16, 4]},
        (2, 1, 33, 34, 35),
        (2, 2, 33, 34, 35),
    ),
    (
        {"name": "segresnet", "in_channels": 1, "out_channels": 4, "init_filters": 8},
        (1, 1, 16, 24, 32),
        (1, 4, 16, 24, 32),
    ),
    (
        {"name": "threshold", "in_channels": 1, "out_channels": 3, "thresholds": [0.3, 0.6]},
        (1, 1, 5, 6, 7),
        (1, 3, 5, 6, 7),
    ),
]


@pytest.mark.parametrize(
    "cfg, in_shape, out_shape", FORWARD_CASES, ids=lambda v: v.get("name") if isinstance(v, dict) else None
)
def test_forward_shape(cfg: dict[str, Any], in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    with torch.no_grad():
        out = net(torch.randn(in_shape))
    assert tuple(out.shape) == out_shape


@pytest.mark.parametrize("cfg", [c for c, _, _ in FORWARD_CASES], ids=lambda c: c["name"])
def test_resolved_config_is_plain_fixed_point_and_rebuilds_identically(cfg: dict[str, Any]) -> None:
    resolved = resolve_model_config(cfg)
    assert resolve_model_config(resolved) == resolved

    def plain(v: Any) -> bool:
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or type(v) in (bool, int, float, str)

    assert plain(resolved)
    torch.manual_seed(0)
    a = build_model(cfg)
    b = build_model(resolved)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].shape == sb[k].shape for k in sa)


def test_dynunet_defaults_are_nnunet() -> None:
    net = build_model({"in_channels": 1, "out_channels": 2, "patch_size": [32, 32, 32], "spacing": [1, 1, 1]})
    cfg = resolve_model_config({"in_channels": 1, "out_channels": 2, "patch_size": [32, 32, 32], "spacing": [1, 1, 1]})
    assert cfg["name"] == "dynunet" and cfg["deep_supervision"] is False
    assert cfg["norm_name"][0].lower() == "instance"
    assert cfg["act_name"][0].lower() == "leakyrelu" and cfg["act_name"][1]["negative_slope"] == 0.01
    kinds = {type(m).__name__ for m in net.modules()}
    assert {"InstanceNorm3d", "LeakyReLU", "ConvTranspose3d"} <= kinds
    assert not any("Pool" in k for k in kinds)  # strided-conv downsampling


def test_unknown_name_suggests() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'dynunet'.*allowed names: dynunet, unet, basicunet, segresnet"):
        build_model({"name": "dynunt", "in_channels": 1, "out_channels": 2})


def test_unknown_key_and_missing_channels_rejected() -> None:
    with pytest.raises(ValueError, match="does not accept config keys \\['chanels'\\]"):
        build_model({"name": "unet", "in_channels": 1, "out_channels": 2, "chanels": [4, 8]})
    with pytest.raises(ValueError, match="in_channels"):
        build_model({"name": "unet", "out_channels": 2})
    with pytest.raises(ValueError, match="patch_size"):
        build_model({"name": "dynunet", "in_channels": 1, "out_channels": 2})


# ---------------------------------------------------------------------------- planner


def test_plan_isotropic_128() -> None:
    plan = plan_dynunet((128, 128, 128), (1.0, 1.0, 1.0))
    assert plan.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5  # 128 -> 4 voxels, 6 stages
    assert plan.kernel_size == [[3, 3, 3]] * 6
    assert plan.filters == [32, 64, 128, 256, 320, 320]
    assert plan.upsample_kernel_size == plan.strides[1:]
    assert plan.divisor == [32, 32, 32]
    check_patch_size((128, 128, 128), plan)


def test_plan_anisotropic() -> None:
    plan = plan_dynunet((40, 192, 160), (3.0, 0.8, 0.8))
    # The 3 mm axis waits until the in-plane spacing is within 2x (0.8 -> 1.6 mm),
    # and stops at 5 voxels (< 2 * min_feature_size) while the others continue.
    assert plan.strides == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    # Kernel 1 along the coarse axis at full resolution only (3.0 / 0.8 >= 2; 3.0 / 1.6 < 2).
    assert plan.kernel_size == [[1, 3, 3]] + [[3, 3, 3]] * 5
    assert plan.divisor == [8, 32, 32]
    check_patch_size((40, 192, 160), plan)


def test_plan_very_anisotropic_keeps_kernel_1_for_two_stages() -> None:
    plan = plan_dynunet((20, 320, 256), (5.0, 0.7, 0.7))
    assert plan.kernel_size[:3] == [[1, 3, 3], [1, 3, 3], [3, 3, 3]]
    assert plan.strides[:3] == [[1, 1, 1], [1, 2, 2], [1, 2, 2]]


def test_plan_small_and_limits() -> None:
    plan = plan_dynunet((32, 32, 32), (1.0, 1.0, 1.0))
    assert plan.strides == [[1, 1, 1]] + [[2, 2, 2]] * 3  # stops at 4 voxels
    assert plan.filters == [32, 64, 128, 256]
    shallow = plan_dynunet((128, 128, 128), (1.0, 1.0, 1.0), max_depth=3, base_features=8, max_features=16)
    assert len(shallow.strides) == 3 and shallow.filters == [8, 16, 16]
    # A single poolable axis needs >= 3 * min_feature_size voxels.
    assert plan_dynunet((4, 4, 10), (1.0, 1.0, 1.0)).strides == [[1, 1, 1]]
    assert plan_dynunet((4, 4, 12), (1.0, 1.0, 1.0)).strides == [[1, 1, 1], [1, 1, 2]]


def test_check_patch_size_names_divisibility() -> None:
    plan = plan_dynunet((40, 192, 160), (3.0, 0.8, 0.8))
    with pytest.raises(
        ValueError, match=r"divisible by \[8, 32, 32\].*axes \[1\].*\[40, 160, 160\] or \[40, 192, 160\]"
    ):
        check_patch_size((40, 170, 160), plan)
    with pytest.raises(ValueError, match="divisible"):
        resolve_model_config(
            {"in_channels": 1, "out_channels": 2, "patch_size": [40, 170, 160], "spacing": [3.0, 0.8, 0.8]}
        )


def test_plan_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="spacing"):
        plan_dynunet((32, 32, 32), (1.0, 1.0))
    with pytest.raises(ValueError, match="patch_size"):
        plan_dynunet((32, 0, 32), (1.0, 1.0, 1.0))


# ---------------------------------------------------------------------------- checkpoint

CKPT_CFG = {
    "name": "dynunet",
    "in_channels": 1,
    "out_channels": 2,
    "patch_size": [16, 16, 16],
    "spacing": [1.0, 1.0, 1.0],
    **TINY_DYNUNET,
}
PRE = {"spacing": [1.0, 1.0, 1.0], "orientation": "RAS", "normalization": "zscore", "in_channels": 1}


def _save_tiny(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model(CKPT_CFG)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loss = net(torch.randn(1, 1, 16, 16, 16)).square().mean()
    loss.backward()
    opt.step()
    save_checkpoint(
        path,
        model_state=net.state_dict(),
        model_config=CKPT_CFG,
        preprocessing=PRE,
        class_names=["background", "tumour"],
        extra={
            "optimizer": opt.state_dict(),
            "epoch": 3,
            "step": 120,
            "best_metric": 0.5,
            "rng": {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state())},
            "config": {"lr": 0.1, "tags": ("a", "b")},
        },
    )
    return net


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "model.pt"
    net = _save_tiny(path)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)  # plain data only
    assert {
        "format_version",
        "model_config",
        "model_state",
        "preprocessing",
        "class_names",
        "optimizer",
        "epoch",
        "step",
        "best_metric",
        "rng",
        "config",
        "checksum",
    } == set(raw)
    ckpt = load_checkpoint(path)
    assert ckpt["model_config"] == resolve_model_config(CKPT_CFG)
    assert ckpt["preprocessing"] == PRE and ckpt["class_names"] == ["background", "tumour"]
    assert ckpt["config"]["tags"] == ["a", "b"] and ckpt["epoch"] == 3
    rebuilt = model_from_checkpoint(ckpt)
    assert not rebuilt.training
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net.eval()(x))
    opt = torch.optim.SGD(rebuilt.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(ckpt["optimizer"])


def test_checkpoint_takes_numpy_numbers_in_the_model_config(tmp_path: Path) -> None:
    """A model config holding numpy numbers (a spacing read from a NIfTI header) is saved as Python
    numbers: the checkpoint loads with ``weights_only`` and equals the plain config."""
    net = build_model(CKPT_CFG)
    numpy_cfg = {**CKPT_CFG, "spacing": [np.float64(s) for s in CKPT_CFG["spacing"]], "in_channels": np.int64(1)}
    save_checkpoint(tmp_path / "np.pt", model_state=net.state_dict(), model_config=numpy_cfg, preprocessing=PRE,
                    class_names=["background", "tumour"])
    ckpt = load_checkpoint(tmp_path / "np.pt")
    assert ckpt["model_config"] == resolve_model_config(CKPT_CFG)
    assert all(type(s) is float for s in ckpt["model_config"]["spacing"])


def test_model_from_checkpoint_strips_wrapper_prefix(tmp_path: Path) -> None:
    net = _save_tiny(tmp_path / "a.pt")
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):  # DDP, torch.compile, both
        state = {f"{prefix}{k}": v for k, v in net.state_dict().items()}
        save_checkpoint(
            tmp_path / "b.pt", model_state=state, model_config=CKPT_CFG, preprocessing=PRE, class_names=["bg", "fg"]
        )
        rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "b.pt"))
        assert rebuilt.state_dict().keys() == net.state_dict().keys()
        for key, value in net.state_dict().items():
            assert torch.equal(rebuilt.state_dict()[key], value), (prefix, key)


def test_save_rejects_non_plain_objects_and_reserved_keys(tmp_path: Path) -> None:
    net = build_model(CKPT_CFG)
    kw = dict(model_state=net.state_dict(), model_config=CKPT_CFG, preprocessing=PRE, class_names=["bg", "fg"])
    with pytest.raises(TypeError, match=r"extra_obj\['fn'\]"):
        save_checkpoint(tmp_path / "x.pt", **kw, extra={"extra_obj": {"fn": object()}})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", **kw, extra={"model_state": {}})
    with pytest.raises(ValueError, match="class_names"):
        save_checkpoint(tmp_path / "x.pt", **{**kw, "class_names": ["only-one"]})
    assert not list(tmp_path.iterdir())  # nothing written, not even a temp file


def test_failed_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pt"
    _save_tiny(path)
    before = path.read_bytes()

    def boom(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # interrupted mid-write

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        _save_tiny(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_load_refuses_non_allowed_object(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    _save_tiny(tmp_path / "good.pt")
    good = torch.load(tmp_path / "good.pt", weights_only=True)
    good["extra"] = np.float64(1.0)  # a pickled numpy object: loadable only with weights_only=False
    torch.save(good, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: holds an object that weights_only loading refuses"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content", [b"", b"junk", b"not a checkpoint at all", None], ids=["empty", "short", "garbage", "truncated"]
)
def test_load_corrupt_names_file(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.pt"
    if content is None:
        _save_tiny(tmp_path / "good.pt")
        data = (tmp_path / "good.pt").read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"broken\.pt: corrupt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_load_missing_and_incomplete(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"model_state": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial\.pt: .*missing keys \['model_config'\]"):
        load_checkpoint(tmp_path / "partial.pt")
    torch.save({"format_version": 99, "model_state": {}, "model_config": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(os.fspath(tmp_path / "future.pt"))


def test_checkpoint_of_stochastic_model_loads_into_plain_model(tmp_path: Path) -> None:
    """Training converts convolutions with app.nn.convert; inference rebuilds the plain MONAI net."""
    torch.manual_seed(0)
    net = app.nn.convert(build_model(CKPT_CFG), n_probes=4, lean=True)
    assert any(True for _ in app.nn.stochastic_layers(net))
    save_checkpoint(
        tmp_path / "s.pt",
        model_state=net.state_dict(),
        model_config=CKPT_CFG,
        preprocessing=PRE,
        class_names=["a", "b"],
    )
    plain = model_from_checkpoint(load_checkpoint(tmp_path / "s.pt"))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net.eval()(x))


def test_flipped_byte_in_the_weights_is_found_by_the_checksum(tmp_path: Path) -> None:
    """torch.load does not check the CRC of tensor records: the stored checksum does."""
    path = tmp_path / "model.pt"
    _save_tiny(path)
    raw = torch.load(path, weights_only=True)
    weight = next(v for k, v in raw["model_state"].items() if v.numel() > 64)
    data = bytearray(path.read_bytes())
    at = data.find(weight.numpy().tobytes()[:64])
    assert at > 0
    data[at + 8] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.pt: corrupt \(checksum mismatch"):
        load_checkpoint(path)


def test_class_names_must_cover_every_output(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    _save_tiny(path)
    raw = torch.load(path, weights_only=True)
    raw["class_names"] = ["background"]
    raw.pop("checksum")  # an older checkpoint without one
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"model\.pt: class_names has 1 entries but the model has out_channels=2"):
        load_checkpoint(path)


def test_a_plain_pickle_is_refused_not_called_corrupt(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "pickled.pt"
    path.write_bytes(pickle.dumps({"model_config": {}, "model_state": {}}, protocol=5))
    with pytest.raises(CheckpointError, match=r"pickled\.pt: holds an object that weights_only loading refuses \(Unsupported operand"):
        load_checkpoint(path)
