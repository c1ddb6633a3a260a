"""app.utils: atomic writes, device and autocast settings, KEY=VALUE options."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from app.utils import amp_dtype, atomic_path, parse_key_values, resolve_amp, resolve_device


def test_atomic_path_replaces_whole_files_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".")
        tmp.write_text("new")
    assert target.read_text() == "new"
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_atomic_path_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_amp_and_device_settings():
    assert amp_dtype("bf16") is torch.bfloat16 and amp_dtype("FP16") is torch.float16
    assert amp_dtype(False) is None and amp_dtype(None) is None and amp_dtype("off") is None
    with pytest.raises(ValueError, match=r"trainer.amp must be one of \['bf16', 'fp16', 'off'\], but got trainer.amp='fp8'"):
        amp_dtype("fp8", "trainer.amp")
    assert resolve_amp("auto", torch.device("cpu")) == "off" and resolve_amp("bf16", torch.device("cpu")) == "bf16"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0", option="--device")


def test_key_values_read_as_yaml():
    assert parse_key_values(["channels=[32, 64]", "norm=batch", "x=null", "lr=1e-3"]) == {
        "channels": [32, 64], "norm": "batch", "x": None, "lr": 1e-3}
    with pytest.raises(ValueError, match="--model-arg takes KEY=VALUE"):
        parse_key_values(["channels"])
