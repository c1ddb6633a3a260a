"""Soak test of training's checkpoints: train for N minutes under random SIGKILLs and resumes.

A real ``python -m app.train`` run (tiny network, synthetic data, ``trainer.resume=auto``) is killed
at random moments, half of them while a checkpoint is being written (a hidden temporary file
beside ``last.pt``), and started again, until the time is up or the run finishes. After each kill
every checkpoint file must load (torch's checks and the stored sha256), and the steps lost (the
last step logged minus the newest good checkpoint's) must not exceed
``trainer.checkpoint_every_steps``. Prints one line per kill and a summary; exit status 1 when a
check failed.

    PYTHONPATH=. python scripts/soak.py --minutes 30 --out outputs/soak   # or after pip install -e .
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from app.data import make_synthetic_dataset
from app.models import CheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]  # the training runs import app from this checkout

STEP_LINE = re.compile(r"step (\d+)/(\d+): loss")
RESUMED_LINE = re.compile(r"resumed from (\S+): .*, step (\d+)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="wall time of the soak (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("outputs/soak"), help="work folder (default: %(default)s)")
    p.add_argument("--every", type=int, default=5, help="trainer.checkpoint_every_steps (default: %(default)s)")
    p.add_argument("--mean-interval", type=float, default=20.0,
                   help="mean seconds of training between kills (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def newest_good(ckpt_dir: Path) -> tuple[int, int, list[str]]:
    """``(newest step, files verified, failures)`` over every checkpoint file there."""
    best, verified, failures = 0, 0, []
    for path in sorted(ckpt_dir.glob("*.pt")):
        try:
            best = max(best, int(load_checkpoint(path)["global_step"]))
            verified += 1
        except CheckpointError as exc:
            failures.append(str(exc))
    return best, verified, failures


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_synthetic_dataset(args.out / "data", n_train=4, n_val=1, shape=(32, 32, 32))
    run_dir = (args.out / "run").absolute()
    ckpt_dir = run_dir / "checkpoints"
    command = [
        sys.executable, "-m", "app.train", f"data.generate.root={data}", "data.generate.n_train=4",
        "data.generate.n_val=1", "data.generate.shape=[32,32,32]", "trainer.patch_size=[16,16,16]",
        "trainer.max_epochs=100000", "trainer.steps_per_epoch=20", "trainer.batch_size=1", "trainer.sw_batch_size=1",
        "trainer.device=cpu", "model.base_features=4", "model.max_features=16", "sketch.n_probes=4",
        "logger=disabled", "logger.fidelity_every=0", f"trainer.checkpoint_every_steps={args.every}",
        "trainer.console_every=1", "trainer.resume=auto", f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    deadline = time.monotonic() + 60 * args.minutes
    kills, lost, verified, problems, last_good, launches = 0, [], 0, [], 0, 0
    while time.monotonic() < deadline:
        lines: list[str] = []
        proc = subprocess.Popen(command, cwd=args.out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        launches += 1
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        mode = rng.choice(["step", "write"])
        wait = rng.expovariate(1.0 / args.mean_interval)
        started = None
        killed = False
        while proc.poll() is None and time.monotonic() < deadline:
            if started is None and any(STEP_LINE.search(x) for x in list(lines)):
                started = time.monotonic()
            if started is not None and time.monotonic() - started >= wait:
                if mode == "step" or (ckpt_dir.is_dir() and any(n.startswith((".last.pt.", ".previous.pt."))
                                                                 for n in os.listdir(ckpt_dir))):
                    proc.kill()
                    killed = True
                    break
            time.sleep(0.0005 if mode == "write" and started is not None else 0.01)
        timed_out = not killed and proc.poll() is None
        if timed_out:  # time is up: stop it the polite way (SIGTERM: checkpoint and exit 75)
            proc.terminate()
        proc.wait()
        reader.join(10)
        if timed_out and started is None:  # stopped while starting up: nothing to check
            break
        resumed = [m for x in lines if (m := RESUMED_LINE.search(x))]
        if last_good and (not resumed or int(resumed[0].group(2)) != last_good):
            problems.append(f"launch {launches}: did not resume from step {last_good} ({resumed[:1]})")
        steps = [int(m.group(1)) for x in lines if (m := STEP_LINE.search(x))]
        good, n_ok, failures = newest_good(ckpt_dir)
        verified += n_ok
        problems += failures
        if killed:
            kills += 1
            reached = max(steps, default=last_good)
            lost.append(reached - good)
            if reached - good > args.every:
                problems.append(f"kill {kills}: {reached - good} steps lost (> {args.every})")
            print(f"kill {kills} ({mode}): reached step {reached}, newest good checkpoint step {good}, "
                  f"lost {reached - good}, {n_ok} checkpoint files verified", flush=True)
        elif proc.returncode not in (0, 75):
            problems.append(f"launch {launches}: exit status {proc.returncode}: {lines[-3:]}")
        last_good = good
    print(f"soak {args.minutes:g} min: {launches} launches, {kills} kills, steps reached {last_good}, "
          f"steps lost per kill max {max(lost, default=0)} / mean {sum(lost) / max(len(lost), 1):.2f} "
          f"(checkpoint_every_steps={args.every}), {verified} checkpoint loads verified, {len(problems)} problems")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
