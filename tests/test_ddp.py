"""Two training processes on the CPU (gloo), started the way ``torchrun`` starts them (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment, each in its own session):
with the default spectral sketch the ranks hold bit-identical parameters after every optimizer step
while drawing different probes; only rank 0 writes the log, checkpoints and the W&B run; a run
resumes with another number of processes from the step it stopped at; SIGTERM to one rank (and its
loader worker) stops every rank after the same step with status 75 and a checkpoint that resumes."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import app.nn
from app.data import make_synthetic_dataset
from app.models import load_checkpoint
from app.train import Preempted, train
from app.train.distributed import compare_replicas, replica_fingerprint
from app.train.loop import Trainer
from test_train import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
# 3 optimizer steps per epoch, the modules' default sketch (spectral) with 4 coefficients
ARGS = ["trainer.steps_per_epoch=3", "logger.fidelity_every=0", "trainer.console_every=1", "trainer.resume=auto"]
LAUNCH = ["trainer.patch_size=[16,16,16]", "trainer.batch_size=1", "trainer.sw_batch_size=1", "trainer.device=cpu",
          "model.base_features=4", "model.max_features=16", "sketch.n_probes=4"]
AGREE = re.compile(r"step (\d+): replicas agree: 2 ranks hold identical parameters and draw their own sketches")
STEP = re.compile(r"step (\d+)/\d+: loss")
STOPPED = re.compile(r"stochprop-train: stopped by SIGTERM after step (\d+); checkpoint (\S+);")


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", n_train=4, n_val=2, shape=(24, 24, 24))
    return [f"data.generate.root={root}", "data.generate.n_train=4", "data.generate.n_val=2", "data.generate.shape=[24,24,24]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """``python -m app.train`` as ``n`` processes of one run, each with the environment torchrun gives
    its workers and in a session of its own (torchrun signals a worker's whole process group)."""

    def __init__(self, n: int, run_dir: Path, args: list[str]) -> None:
        base = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(n),
                "LOCAL_WORLD_SIZE": str(n)}
        base.pop("HYDRA_FULL_ERROR", None)
        self.procs: list[subprocess.Popen] = []
        self.lines: list[list[str]] = [[] for _ in range(n)]
        self.readers: list[threading.Thread] = []
        for rank in range(n):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            proc = subprocess.Popen([sys.executable, "-m", "app.train", *args, f"hydra.run.dir={run_dir}"],
                                    cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            reader = threading.Thread(target=self._read, args=(proc, self.lines[rank]), daemon=True)
            reader.start()
            self.procs.append(proc)
            self.readers.append(reader)

    @staticmethod
    def _read(proc: subprocess.Popen, lines: list[str]) -> None:
        for line in proc.stdout:
            lines.extend(part for part in line.split("\r") if part.strip())

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        try:
            for proc in self.procs:
                codes.append(proc.wait(max(1.0, deadline - time.monotonic())))
        finally:
            for proc in self.procs:  # a hung rank fails the test, and is not left behind
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        for reader in self.readers:
            reader.join(10)
        return codes

    def text(self, rank: int) -> str:
        return "\n".join(self.lines[rank])


def _stop_at(monkeypatch, step: int) -> None:
    """SIGTERM to this process while optimizer step ``step`` runs."""
    original = Trainer._optimizer_step

    def step_then_signal(self, micro):
        if self.progress.global_step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, micro)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_signal)


def test_replica_fingerprints_catch_one_flipped_bit_and_shared_sketch_streams():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Conv3d(2, 1, 1))
    app.nn.manual_seed(1)
    state0 = app.nn.probes.seed_state()
    a = replica_fingerprint(model, state0)
    with torch.no_grad():
        model[1].weight.view(-1)[0:1].view(torch.int32).bitwise_xor_(1)  # the lowest mantissa bit
    b = replica_fingerprint(model, state0)
    app.nn.manual_seed(2)
    c = replica_fingerprint(model, app.nn.probes.seed_state())
    assert compare_replicas([b, c], step=7) is None
    assert compare_replicas([a, b], step=7) == ("step 7: rank 1's parameters differ from rank 0's (1.weight); "
                                                "the replicas are no longer in step")
    assert compare_replicas([b, b], step=3) == "step 3: ranks [0, 1] hold the same sketch RNG state and would draw the same probes"
    assert compare_replicas([replica_fingerprint(model), replica_fingerprint(model)], step=1) is None  # exact runs


def test_two_ranks_stay_in_step_only_rank0_writes_and_resume_changes_process_count(tmp_path, data_args, monkeypatch, caplog):
    run = tmp_path / "run"
    # one process, stopped in the middle of epoch 1 (after step 2)
    with monkeypatch.context() as m:
        _stop_at(m, 2)
        with pytest.raises(Preempted):
            train(tiny_cfg(run, None, *data_args, *ARGS, "trainer.max_epochs=1"))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["partial_epoch"]["steps"] == 2

    # 1 -> 2 processes: rank 0 continues its own RNG streams, rank 1 starts fresh ones of its own
    ranks = Ranks(2, run, [*LAUNCH, *data_args, *ARGS, "trainer.max_epochs=2", "trainer.checkpoint_every_steps=2",
                           "trainer.ddp_check_every=1", "logger=offline"])
    assert ranks.wait() == [0, 0], (ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    log = (run / "train.log").read_text()
    assert re.search(r"resumed from \S+last\.pt: epoch 1, step 2 of it, step 2", log), log[-3000:]
    assert "resuming a run of 1 process(es) with 2" in log
    assert [int(m.group(1)) for m in AGREE.finditer(log)] == [3, 4, 5, 6]  # identical after every step
    assert log.count("x 2 processes") == 1 and "[rank 1]" not in log  # rank 1 writes no log file lines
    assert not any(re.search(r"\]\[INFO\]", line) for line in ranks.lines[1])  # and logs warnings only
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert {p.name for p in (run / "checkpoints").iterdir()} <= {"last.pt", "previous.pt", "best.pt"}
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints", "config_resolved.yaml", "train.log", "wandb"]
    mid = load_checkpoint(run / "checkpoints" / "previous.pt")  # step 6, written inside epoch 2 before its end
    assert mid["global_step"] == 6 and mid["world_size"] == 2 and len(mid["rng_by_rank"]) == 2
    sketch0, sketch1 = (r["sketch"]["internal"] for r in mid["rng_by_rank"])
    assert sketch0 != sketch1  # the ranks draw different probes
    two = load_checkpoint(run / "checkpoints" / "last.pt")
    assert two["global_step"] == 6 and not any(k.startswith("module.") for k in two["model_state"])

    # 2 -> 1 process: continues from step 6
    with caplog.at_level(logging.INFO, logger="app.train.loop"):
        metrics = train(tiny_cfg(run, None, *data_args, *ARGS, "trainer.max_epochs=3"))
    assert re.search(r"resumed from \S+last\.pt: epoch 2 done, step 6", caplog.text)
    assert metrics["global_step"] == 9
    assert [h["epoch"] for h in load_checkpoint(run / "checkpoints" / "last.pt")["history"]] == [1.0, 2.0, 3.0]


@pytest.mark.slow  # the single-process SIGTERM test (tests/test_train_kill.py) runs in the default suite
def test_sigterm_to_one_rank_stops_both_after_the_same_step_with_75(tmp_path, data_args, caplog):
    run = tmp_path / "run"
    ranks = Ranks(2, run, [*LAUNCH, *data_args, *ARGS, "trainer.max_epochs=100", "trainer.num_workers=1",
                           "trainer.checkpoint_every_minutes=null", "logger=disabled"])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and all(p.poll() is None for p in ranks.procs):
        steps = [int(m.group(1)) for line in list(ranks.lines[0]) if (m := STEP.search(line))]
        if steps and max(steps) >= 2:
            break
        time.sleep(0.05)
    os.killpg(ranks.procs[1].pid, signal.SIGTERM)  # rank 1 and its loader worker, as torchrun would
    assert ranks.wait(timeout=180) == [75, 75], (ranks.text(0)[-3000:], ranks.text(1)[-3000:])
    stops = [STOPPED.search(ranks.text(r)) for r in (0, 1)]
    assert all(stops), (ranks.text(0)[-2000:], ranks.text(1)[-2000:])
    step = int(stops[0].group(1))
    assert stops[1].group(1) == str(step) and stops[0].group(2) == stops[1].group(2) == str(run / "checkpoints" / "last.pt")
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["global_step"] == step >= 2 and len(last["rng_by_rank"]) == 2
    assert last["partial_epoch"]["steps"] == (step - 1) % 3 + 1

    # trainer.resume=auto continues from it (here with one process: 2 -> 1 inside an epoch)
    epochs = (step + 2) // 3 + 1
    with caplog.at_level(logging.INFO, logger="app.train.loop"):
        metrics = train(tiny_cfg(run, None, *data_args, *ARGS, f"trainer.max_epochs={epochs}"))
    assert re.search(rf"resumed from \S+last\.pt: epoch \d+, step \d+ of it, step {step}\b", caplog.text), caplog.text
    assert metrics["global_step"] == 3 * epochs
