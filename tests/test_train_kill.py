"""A real training process killed at random moments (SIGKILL mid-step and mid-checkpoint-write) and
stopped by SIGTERM: every checkpoint left on disk loads, a resume continues from the newest one
and ends bit for bit where an uninterrupted run ends, and no more than
``trainer.checkpoint_every_steps`` steps are lost per kill."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from app.data import make_synthetic_dataset
from app.models import CheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
EVERY = 2
ARGS = [
    "trainer.patch_size=[16,16,16]", "trainer.max_epochs=3", "trainer.steps_per_epoch=4", "trainer.batch_size=1",
    "trainer.sw_batch_size=1", "trainer.device=cpu", "model.base_features=4", "model.max_features=16",
    "sketch.n_probes=4", "logger=disabled", "logger.fidelity_every=0", f"trainer.checkpoint_every_steps={EVERY}",
    "trainer.console_every=1", "trainer.resume=auto",
]
STEP_LINE = re.compile(r"step (\d+)/\d+: loss")
RESUMED_LINE = re.compile(r"resumed from (\S+): .*, step (\d+)")


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", n_train=3, n_val=1, shape=(24, 24, 24))
    return [f"data.generate.root={root}", "data.generate.n_train=3", "data.generate.n_val=1", "data.generate.shape=[24,24,24]"]


class Run:
    """``python -m app.train`` in a subprocess, its output (log and errors) read line by line in a thread."""

    def __init__(self, run_dir: Path, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "app.train", *args, f"hydra.run.dir={run_dir}"],
                                     cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.extend(part for part in line.split("\r") if part.strip())

    def steps(self) -> list[int]:
        return [int(m.group(1)) for line in list(self.lines) if (m := STEP_LINE.search(line))]

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    def text(self) -> str:
        return "\n".join(self.lines)


def _newest_good(ckpt_dir: Path) -> tuple[int, Path | None]:
    """Every checkpoint file there must load; the highest step among them."""
    best, where = 0, None
    for path in sorted(ckpt_dir.glob("*.pt")):
        try:
            step = int(load_checkpoint(path)["global_step"])
        except CheckpointError as exc:
            pytest.fail(f"a checkpoint left after a kill does not load: {exc}")
        if step > best:
            best, where = step, path
    return best, where


def _kill(run: Run, ckpt_dir: Path, mode: str, rng: random.Random, deadline: float) -> bool:
    """SIGKILL the run mid-step (after a random delay once it trains) or while a checkpoint is being
    written (a hidden temporary file beside last.pt); False if it finished first."""
    delay = rng.uniform(0.0, 0.4)
    started = None
    while time.monotonic() < deadline:
        if run.proc.poll() is not None:
            return False
        if mode == "write":
            if ckpt_dir.is_dir() and any(n.startswith((".last.pt.", ".previous.pt.")) for n in os.listdir(ckpt_dir)):
                run.proc.kill()
                return True
            time.sleep(0.0005)
        else:
            if started is None and run.steps():
                started = time.monotonic()
            if started is not None and time.monotonic() - started >= delay:
                run.proc.kill()
                return True
            time.sleep(0.01)
    pytest.fail("the training run neither reached the kill point nor finished in time")


def _kill_and_resume(tmp_path: Path, data_args: list[str], modes: list[str], seed: int) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    done = Run(reference / "run", [*ARGS, *data_args])
    assert done.wait() == 0, done.text()[-3000:]
    expected = load_checkpoint(reference / "run" / "checkpoints" / "last.pt")

    rng = random.Random(seed)
    run_dir = tmp_path / "killed" / "run"
    run_dir.parent.mkdir()
    ckpt_dir = run_dir / "checkpoints"
    kills, last_good = 0, 0
    for mode in [*modes, "finish"]:
        run = Run(run_dir, [*ARGS, *data_args])
        if mode != "finish" and _kill(run, ckpt_dir, mode, rng, time.monotonic() + 240):
            run.wait()
            kills += 1
            reached = max(run.steps(), default=last_good)
            good, path = _newest_good(ckpt_dir)
            assert reached - good <= EVERY, (mode, reached, good)  # steps lost to this kill
            assert good >= last_good
            last_good = good
            resumed = [m for line in run.lines if (m := RESUMED_LINE.search(line))]
            assert not resumed or int(resumed[0].group(2)) <= good
            continue
        assert run.wait() == 0, run.text()[-3000:]
        if last_good:
            (resumed,) = [m for line in run.lines if (m := RESUMED_LINE.search(line))]
            assert int(resumed.group(2)) == last_good  # continued from the newest good checkpoint
        break
    assert kills == len(modes)
    final = load_checkpoint(ckpt_dir / "last.pt")
    assert final["global_step"] == expected["global_step"] == 12
    for key, value in expected["model_state"].items():
        torch.testing.assert_close(final["model_state"][key], value, rtol=0, atol=0, msg=key)
    assert [p.name for p in ckpt_dir.iterdir() if p.name.startswith(".")] == []  # temporaries cleaned


def test_sigkill_mid_step_and_mid_checkpoint_write_then_resume(tmp_path, data_args):
    _kill_and_resume(tmp_path, data_args, ["write", "step"], seed=0)


@pytest.mark.slow
def test_many_random_kills(tmp_path, data_args):
    _kill_and_resume(tmp_path, data_args, ["write", "step", "step", "write", "step", "write"], seed=1)


def test_sigterm_writes_a_checkpoint_closes_wandb_and_exits_75(tmp_path, data_args):
    run_dir = tmp_path / "run"
    args = [a for a in ARGS if a not in ("logger=disabled", f"trainer.checkpoint_every_steps={EVERY}")]
    run = Run(run_dir, [*args, *data_args, "logger=offline", "trainer.checkpoint_every_minutes=null", "trainer.max_epochs=100"])
    deadline = time.monotonic() + 240
    while not run.steps() and time.monotonic() < deadline and run.proc.poll() is None:
        time.sleep(0.01)
    sent_after = max(run.steps())
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 75, run.text()[-3000:]
    last_line = next(line for line in reversed(run.lines) if "stochprop-train:" in line)
    step = int(re.search(r"stopped by SIGTERM after step (\d+)", last_line).group(1))
    assert sent_after <= step <= sent_after + 1  # the step under way is finished, no other
    assert f"checkpoint {run_dir / 'checkpoints' / 'last.pt'}" in last_line and "trainer.resume=auto" in last_line
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["global_step"] == step and ckpt["partial_epoch"]["steps"] == (step - 1) % 4 + 1
    from test_train import wandb_records

    (log_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert "exit" in {r.WhichOneof("record_type") for r in wandb_records(log_file)}  # the W&B run was closed
