"""The checkpoint format shared by training and inference.

A checkpoint is one ``torch.save`` file holding a dict of plain data only (tensors,
dicts, lists, str, int, float, bool, None), so it loads with
``torch.load(path, weights_only=True)``: loading a checkpoint never runs code from it.

Keys:

* ``format_version`` (int): :data:`FORMAT_VERSION`;
* ``model_config`` (dict): the resolved model config
  (:func:`~app.models.factory.resolve_model_config`), enough to rebuild the network;
* ``model_state`` (dict[str, Tensor]): the network's ``state_dict``;
* ``preprocessing`` (dict): how inputs were pre-processed for training (spacing,
  orientation, intensity normalisation, ...), replayed at inference;
* ``class_names`` (list[str]): one name per output channel;
* plus the keys of ``extra`` (training state added by the trainer: optimizer,
  scheduler and scaler state dicts, epoch, step, best metric, RNG states, resolved
  run config).
"""

from __future__ import annotations

import enum
import os
import pickle

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.models.factory import build_model, resolve_model_config
from app.utils import atomic_path

__all__ = [
    "FORMAT_VERSION",
    "RESERVED_KEYS",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
]

FORMAT_VERSION = 1
RESERVED_KEYS = ("format_version", "model_config", "model_state", "preprocessing", "class_names")
# Prefixes that wrappers add to state_dict keys: torch.compile, DDP / DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(ValueError):
    """A checkpoint file cannot be written or read; the message names the file."""


def _to_plain(value: Any, where: str) -> Any:
    """Return ``value`` as checkpoint-safe plain data, or raise naming the offending key.

    Tuples become lists, numpy arrays become tensors, numpy scalars and enums become
    Python scalars; anything else that ``weights_only`` loading would refuse raises.
    """
    if value is None or isinstance(value, (bool, int, float, str)) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, enum.Enum):
        return _to_plain(value.value, where)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {where}[{k!r}]: keys must be str or int, got {type(k).__name__}")
            out[k] = _to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"checkpoint entry {where} has type {type(value).__name__}; only tensors, dicts, lists, "
        "str, int, float, bool and None can be stored (convert it first)"
    )


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model_state: Mapping[str, torch.Tensor],
    model_config: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    class_names: list[str],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically: a temp file in the same folder, then ``os.replace``.

    A crash or an exception never leaves a half-written file at ``path``: either the
    previous file or the complete new one is there.

    Args:
        path: destination file; its folder is created if missing.
        model_state: the network's ``state_dict()`` (wrapper prefixes such as
            ``module.`` or ``_orig_mod.`` are kept as given and stripped at load).
        model_config: model config; stored resolved (every default explicit).
        preprocessing: pre-processing settings replayed at inference.
        class_names: one name per output channel of the network.
        extra: training state stored next to the reserved keys (optimizer/scheduler/
            scaler state dicts, epoch, step, best metric, RNG states, run config).

    Raises:
        TypeError: an entry is not plain data (the message names its key path).
        ValueError: ``extra`` uses a reserved key, or ``class_names`` does not match
            the config's ``out_channels``.
        CheckpointError: the file cannot be written.
    """
    path = Path(path)
    config = resolve_model_config(model_config)
    names = [str(n) for n in class_names]
    if len(names) != config["out_channels"]:
        raise ValueError(
            f"class_names has {len(names)} entries but model_config out_channels is {config['out_channels']}"
        )
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_config": config,
        "model_state": _to_plain(dict(model_state), "model_state"),
        "preprocessing": _to_plain(dict(preprocessing), "preprocessing"),
        "class_names": names,
    }
    for key, value in (extra or {}).items():
        if key in RESERVED_KEYS:
            raise ValueError(f"extra key {key!r} is reserved; reserved keys are {list(RESERVED_KEYS)}")
        payload[str(key)] = _to_plain(value, str(key))

    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint ({exc.strerror or exc})") from exc


def _first_line(exc: BaseException) -> str:
    """First sentence of an exception message, on one line."""
    text = " ".join(str(exc).split())
    return text.split(". ", 1)[0].rstrip(".") if text else type(exc).__name__


def _unpickler_reason(exc: BaseException) -> str:
    """Pull the one informative sentence out of torch's long weights_only error."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        tail = " ".join(text.split(marker, 1)[1].split())
        for stop in (" Please use", " Check the documentation"):
            tail = tail.split(stop, 1)[0]
        return tail.strip().rstrip(".") or _first_line(exc)
    return _first_line(exc)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(..., weights_only=True)`` and check its keys.

    Args:
        path: checkpoint file written by :func:`save_checkpoint`.
        map_location: where tensors are loaded. Default ``"cpu"``.

    Returns:
        The checkpoint dict (see the module docstring for its keys).

    Raises:
        CheckpointError: one line naming the file, if it is missing, corrupt, holds
            objects other than plain data, or lacks ``model_config``/``model_state``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickler_reason(exc)
        if "Unsupported global" in reason:
            raise CheckpointError(
                f"{path}: holds an object that weights_only loading refuses ({reason}); "
                "checkpoints must contain plain data only"
            ) from exc
        raise CheckpointError(f"{path}: corrupt or not a checkpoint ({reason})") from exc
    except Exception as exc:  # torch.load raises many types on damaged files (struct.error, EOFError, ...)
        raise CheckpointError(
            f"{path}: corrupt or not a checkpoint ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
    missing = [k for k in ("model_config", "model_state") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a stochprop checkpoint, missing keys {missing}")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version!r} is newer than this code understands ({FORMAT_VERSION})"
        )
    if not isinstance(ckpt["model_config"], dict) or not isinstance(ckpt["model_state"], dict):
        raise CheckpointError(f"{path}: model_config and model_state must be dicts")
    ckpt.setdefault("preprocessing", {})
    ckpt.setdefault("class_names", [f"class_{i}" for i in range(int(ckpt["model_config"].get("out_channels", 0)))])
    return ckpt


def _strip_wrapper_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    stripped = True
    while out and stripped:  # wrappers nest: DDP around a compiled model gives "module._orig_mod."
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                stripped = True
    return out


def model_from_checkpoint(ckpt: Mapping[str, Any]) -> nn.Module:
    """Build the checkpoint's network, load its weights (strictly) and put it in eval mode.

    Args:
        ckpt: a dict returned by :func:`load_checkpoint`.

    Returns:
        The network on the CPU (or wherever ``model_state`` tensors live), in eval mode.

    Raises:
        ValueError: the config cannot be built or the weights do not match it.
    """
    model = build_model(ckpt["model_config"])
    state = _strip_wrapper_prefixes(ckpt["model_state"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint weights do not match its model_config: {' '.join(str(exc).split())}") from exc
    return model.eval()
