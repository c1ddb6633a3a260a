"""The networks the benchmarks measure, and their ``--model``/``--model-arg`` options."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from app.measure import model_config_for_patch
from app.utils import parse_key_values

__all__ = ["BENCH_MODELS", "add_model_arguments", "bench_model_config"]

BENCH_MODELS: dict[str, dict[str, Any]] = {
    "unet": {"name": "unet", "in_channels": 1, "out_channels": 3, "channels": [32, 64, 128, 256, 320],
             "strides": [2, 2, 2, 2], "num_res_units": 2},
    "dynunet": {"name": "dynunet", "in_channels": 1, "out_channels": 3, "spacing": [1.0, 1.0, 1.0]},
}
"""MONAI's UNet in the 32-320-channel style of nnU-Net, and the project's default network (a
DynUNet planned for each patch size, app.models defaults)."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (one of :data:`BENCH_MODELS`) and ``--model-arg KEY=VALUE ...``."""
    parser.add_argument("--model", default="dynunet", choices=list(BENCH_MODELS), help="network. Default dynunet")
    parser.add_argument("--model-arg", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra model config keys, e.g. base_features=16 max_features=128")


def bench_model_config(name: str, model_args: Sequence[str], patch: Sequence[int]) -> dict[str, Any]:
    """The resolved config of benchmark network ``name`` with ``--model-arg`` pairs, for ``patch``.

    Raises:
        ValueError: a malformed ``--model-arg``.
    """
    return model_config_for_patch({**BENCH_MODELS[name], **parse_key_values(model_args)}, patch)
