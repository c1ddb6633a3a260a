"""Long runs that survive: step checkpoints and exact mid-epoch resume, resume=auto and the fallback
from a damaged checkpoint, SIGTERM/SIGINT, non-finite steps, honest step timing (in-process, tiny)."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from app.data import make_synthetic_dataset
from app.models import CheckpointError, load_checkpoint
from app.train import Preempted, TrainingError, train
from app.train.checkpoints import CheckpointStore, find_resume
from app.train.loop import Trainer
from test_train import tiny_cfg

STEPS = ["trainer.max_epochs=2", "trainer.steps_per_epoch=3", "logger.fidelity_every=0"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", n_train=3, n_val=1, shape=(24, 24, 24))


def _signal_at(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Deliver ``signum`` to this process while optimizer step ``step`` runs."""
    original = Trainer._optimizer_step

    def step_then_signal(self, micro):
        if self.progress.global_step + 1 == step:
            os.kill(os.getpid(), signum)
        return original(self, micro)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_signal)


def test_sigterm_mid_epoch_checkpoints_and_resume_auto_continues_exactly(tmp_path, synthetic_root, monkeypatch):
    """Stopped by SIGTERM in step 4 (epoch 2, step 1 of it), resumed with resume=auto == never stopped."""
    train(tiny_cfg(tmp_path / "full", synthetic_root, *STEPS))
    reference = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")

    run = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _signal_at(m, 4)
        with pytest.raises(Preempted) as info:
            train(tiny_cfg(run, synthetic_root, *STEPS, "trainer.checkpoint_every_steps=2"))
    assert info.value.step == 4 and info.value.signal_name == "SIGTERM"
    assert info.value.checkpoint == run / "checkpoints" / "last.pt"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["global_step"] == 4 and last["epoch"] == 0
    assert last["partial_epoch"]["epoch"] == 1 and last["partial_epoch"]["steps"] == 1
    assert load_checkpoint(run / "checkpoints" / "previous.pt")["global_step"] == 3  # the epoch-end one
    assert "sketch" in last["rng"]

    resumed = train(tiny_cfg(run, synthetic_root, *STEPS, "trainer.resume=auto"))
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final["global_step"] == reference["global_step"] == 6
    for key, value in reference["model_state"].items():
        torch.testing.assert_close(final["model_state"][key], value, rtol=0, atol=0, msg=key)
    for pid, state in reference["optimizer"]["state"].items():
        torch.testing.assert_close(final["optimizer"]["state"][pid]["exp_avg_sq"], state["exp_avg_sq"], rtol=0, atol=0)
    assert resumed["train/epoch_loss"] == pytest.approx(reference["history"][-1]["train/epoch_loss"], rel=1e-6)
    assert [h["epoch"] for h in final["history"]] == [1.0, 2.0]


def test_sigint_at_the_last_step_of_an_epoch(tmp_path, synthetic_root, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at(m, 3, signal.SIGINT)
        with pytest.raises(Preempted, match="stopped by SIGINT after step 3.*trainer.resume=auto"):
            train(tiny_cfg(run, synthetic_root, *STEPS))
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["global_step"] == 3 and last["partial_epoch"]["steps"] == 3  # trained, not yet validated
    metrics = train(tiny_cfg(run, synthetic_root, *STEPS, "trainer.resume=auto"))
    assert metrics["global_step"] == 6 and [h["epoch"] for h in load_checkpoint(run / "checkpoints" / "last.pt")["history"]] == [1.0, 2.0]


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, synthetic_root, monkeypatch, caplog):
    original = Trainer._loss
    bad_steps = {2, 4, 5, 6}

    def loss(self, logits, label):
        value = original(self, logits, label)
        return value * math.nan if self.progress.global_step + 1 in bad_steps else value

    monkeypatch.setattr(Trainer, "_loss", loss)
    seen = {}
    original_step = Trainer._optimizer_step

    def spy(self, micro):
        before = [p.detach().clone() for p in self.model.parameters()]
        result = original_step(self, micro)
        seen[self.progress.global_step + 1] = (result[1], all(torch.equal(a, b) for a, b in zip(before, self.model.parameters())))
        return result

    monkeypatch.setattr(Trainer, "_optimizer_step", spy)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="app.train.loop"), pytest.raises(TrainingError) as info:
        train(tiny_cfg(run, synthetic_root, *STEPS, "trainer.max_bad_steps=3", "trainer.checkpoint_every_steps=1"))
    message = str(info.value)
    assert "\n" not in message
    assert "3 optimizer steps in a row had a non-finite loss or gradient (steps 4..6" in message
    assert f"the last good checkpoint is {run / 'checkpoints' / 'last.pt'} (step 3)" in message
    assert seen[1] == (True, False) and seen[2] == (False, True) and seen[3] == (True, False)  # bad: weights untouched
    assert "step 2: non-finite loss or gradient" in caplog.text and "optimizer step skipped" in caplog.text
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["global_step"] == 3 and last["bad_steps"] == 1 and last["history"][0]["train/bad_steps"] == 1.0
    assert all(torch.isfinite(v).all() for v in last["model_state"].values())


def test_step_time_includes_the_data_wait_and_a_slow_loader_warns_once(tmp_path, synthetic_root, monkeypatch, caplog):
    original = Trainer._next_batch

    def slow(self, batches):
        time.sleep(0.5)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "_next_batch", slow)
    with caplog.at_level(logging.INFO, logger="app.train.loop"):
        metrics = train(tiny_cfg(tmp_path / "run", synthetic_root, "trainer.max_epochs=2", "trainer.steps_per_epoch=2",
                                 "logger.fidelity_every=0", "data.cache=none", "trainer.console_every=1"))
    assert metrics["train/data_wait_s"] >= 0.5
    assert metrics["train/step_time_s"] >= metrics["train/data_wait_s"] + 0.001
    assert metrics["train/data_wait_fraction"] == pytest.approx(metrics["train/data_wait_s"] / metrics["train/step_time_s"], rel=1e-6)
    warnings = [r.getMessage() for r in caplog.records if "waited for data" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per run, not per epoch
    assert "trainer.num_workers (now 0)" in warnings[0] and "data.cache=memory or disk (now none)" in warnings[0]
    assert "% data wait)" in caplog.text and "step 4/4: loss" in caplog.text


# ----------------------------------------------------------------------------- resume candidates


def _checkpoint(path: Path, step: int) -> None:
    from app.models import save_checkpoint

    cfg = {"name": "unet", "in_channels": 1, "out_channels": 2, "channels": [2, 4], "strides": [2], "num_res_units": 0}
    from app.models import build_model

    save_checkpoint(path, model_state=build_model(cfg).state_dict(), model_config=cfg, preprocessing={},
                    class_names=["background", "fg"], extra={"global_step": step})


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_store_keeps_the_previous_last_and_cleans_temporaries(tmp_path):
    store = CheckpointStore(tmp_path)
    store.write("last.pt", lambda p: _checkpoint(p, 1))
    store.write("last.pt", lambda p: _checkpoint(p, 2))
    assert load_checkpoint(tmp_path / "previous.pt")["global_step"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["global_step"] == 2
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half")
    assert store.clean_temporaries() == [tmp_path / ".last.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]
    assert oct((tmp_path / "last.pt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_resume_falls_back_from_a_damaged_last_and_says_so(tmp_path, caplog):
    assert find_resume("auto", tmp_path / "none") is None and find_resume(None, tmp_path) is None
    store = CheckpointStore(tmp_path)
    for step in (1, 2, 3):
        store.write("last.pt", lambda p, s=step: _checkpoint(p, s))
    store.write("best.pt", lambda p: _checkpoint(p, 1))
    assert find_resume("auto", tmp_path)[1]["global_step"] == 3
    _damage(tmp_path / "last.pt")
    with caplog.at_level(logging.WARNING):
        for setting in ("auto", str(tmp_path / "last.pt")):
            path, ckpt = find_resume(setting, tmp_path)
            assert path == tmp_path / "previous.pt" and ckpt["global_step"] == 2
    assert "last.pt: corrupt" in caplog.text and f"resuming from {tmp_path / 'previous.pt'} (step 2) instead" in caplog.text
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:100])  # truncated
    _damage(tmp_path / "previous.pt")
    assert find_resume("auto", tmp_path)[0] == tmp_path / "best.pt"
    _damage(tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="no checkpoint there loads"):
        find_resume("auto", tmp_path)
    with pytest.raises(CheckpointError, match="missing.pt: checkpoint file not found"):
        find_resume(str(tmp_path / "elsewhere" / "missing.pt"), tmp_path)
