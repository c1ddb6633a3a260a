"""``python -m app.train`` / ``stochprop-train``: Hydra front end of :func:`app.train.train`.

Bad data and other user-fixable errors end the program with one line on stderr and exit
status 1 (no traceback); ``HYDRA_FULL_ERROR=1`` does not change that for them.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from app.data import DataError
from app.models import CheckpointError
from app.train.config import CONFIG_NAME, config_dir
from app.train.loop import TrainingError, train

__all__ = ["main"]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg)
    except (DataError, CheckpointError, TrainingError) as err:
        sys.exit(f"stochprop-train: error: {err}")
    # a number for Hydra sweepers (--multirun with an optimizer plugin)
    return metrics.get("val/best_mean_dice", float("nan"))


def main() -> None:
    """Console-script entry point (reads ``sys.argv``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
