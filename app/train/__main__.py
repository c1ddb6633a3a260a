"""``python -m app.train`` / ``stochprop-train``: Hydra front end of :func:`app.train.train`.

Bad data and other user-fixable errors end the program with one line on stderr and exit
status 1 (no traceback); ``HYDRA_FULL_ERROR=1`` does not change that for them. A run stopped by
SIGTERM or SIGINT writes its checkpoint, says so in one line and exits with status 75
(:data:`app.train.loop.PREEMPTED_EXIT_CODE`).
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from app.data import DataError
from app.models import CheckpointError
from app.train.config import CONFIG_NAME, config_dir
from app.train.loop import PREEMPTED_EXIT_CODE, Preempted, TrainingError, train

__all__ = ["main", "sweep_score"]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg)
    except (DataError, CheckpointError, TrainingError) as err:
        sys.exit(f"stochprop-train: error: {err}")
    except Preempted as stop:
        print(f"stochprop-train: {stop}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    return sweep_score(metrics)


def sweep_score(metrics: dict[str, float]) -> float:
    """The number Hydra sweepers optimise (``--multirun`` with an optimizer plugin): the run's best
    validation score, whichever the task's is (``val/best_mean_dice``, ``val/best_psnr``); NaN
    when no validation ran."""
    return next((float(v) for k, v in metrics.items() if k.startswith("val/best_")), float("nan"))


def main() -> None:
    """Console-script entry point (reads ``sys.argv``).

    Under ``torchrun`` every process composes the same config; only rank 0 writes Hydra's
    ``.hydra/`` folder and ``train.log`` (the others would race them, or make their own run folder
    when their clock reads another second: give ``hydra.run.dir=...``). The processes of rank > 0
    log warnings and errors to the console only, tagged with their rank (``hydra/job_logging=worker``,
    unless the command line chooses a ``hydra/job_logging`` itself).
    """
    if int(os.environ.get("RANK", "0")) > 0:
        sys.argv.append("hydra.output_subdir=null")
        if not any(a.lstrip("+~").startswith("hydra/job_logging=") for a in sys.argv[1:]):
            sys.argv.append("hydra/job_logging=worker")
    _hydra_main()


if __name__ == "__main__":
    main()
