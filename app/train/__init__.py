"""Training app: ``python -m app.train`` (``stochprop-train``) and its pure core :func:`train`.

``train(cfg)`` takes the composed Hydra config (``conf/train.yaml``) and returns the run's
metrics; ``python -m app.train --help`` lists the config groups and main options.
"""

from app.train.config import CONFIG_NAME, config_dir
from app.train.loop import PREEMPTED_EXIT_CODE, Preempted, TrainingError, train

__all__ = ["CONFIG_NAME", "PREEMPTED_EXIT_CODE", "Preempted", "TrainingError", "config_dir", "train"]
