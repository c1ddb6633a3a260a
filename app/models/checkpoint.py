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
* ``checksum`` (str): ``"sha256:<hex>"`` of everything else (:func:`payload_digest`), checked at
  load: torch's zip container does not check the CRCs of tensor records, so a flipped bit in
  the weights would otherwise load silently;
* plus the keys of ``extra`` (training state added by the trainer: optimizer,
  scheduler and scaler state dicts, epoch, step, best metric, RNG states, resolved
  run config).
"""

from __future__ import annotations

import enum
import hashlib
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
    "payload_digest",
]

FORMAT_VERSION = 1
RESERVED_KEYS = ("format_version", "model_config", "model_state", "preprocessing", "class_names", "checksum")
# Prefixes that wrappers add to state_dict keys: torch.compile, DDP / DataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(ValueError):
    """A checkpoint file cannot be written or read; the message names the file."""


def _python_scalars(value: Any) -> Any:
    """``value`` with numpy scalars as Python scalars (``weights_only`` loading refuses numpy
    objects), containers kept as they are (a config's tuples stay tuples)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: _python_scalars(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_python_scalars(v) for v in value)
    return value


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


def _digest(value: Any, h: Any) -> None:
    """Feed one plain-data value into the hash: a type tag, then its content, in storage order."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    elif isinstance(value, Mapping):
        h.update(f"D{len(value)}".encode())
        for k, v in value.items():
            h.update(f"K{type(k).__name__}:{k!r}".encode())
            _digest(v, h)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _digest(v, h)
    else:
        h.update(f"S{type(value).__name__}:{value!r}".encode())


def payload_digest(payload: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of a checkpoint's plain data, its ``checksum`` key left out.

    Tensors contribute dtype, shape and raw bytes; dicts their keys in order; scalars their
    ``repr``. The same data gives the same digest before saving and after loading.
    """
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "checksum"}, h)
    return f"sha256:{h.hexdigest()}"


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
    config = resolve_model_config(_python_scalars(dict(model_config)))
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
    payload["checksum"] = payload_digest(payload)

    try:
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint ({exc.strerror or exc})") from exc


def _first_line(exc: BaseException) -> str:
    """First sentence of an exception message, on one line."""
    text = " ".join(str(exc).split())
    return text.split(". ", 1)[0].rstrip(".") if text else type(exc).__name__


# torch's weights_only refusals start with the first marker and name the reason after the second.
_REFUSED_MARKER = "Weights only load failed"
_REASON_MARKER = "WeightsUnpickler error:"


def _unpickler_reason(exc: BaseException) -> str:
    """Pull the one informative sentence out of torch's long weights_only error."""
    text = str(exc)
    if _REASON_MARKER in text:
        tail = " ".join(text.split(_REASON_MARKER, 1)[1].split())
        for stop in (" Please use", " Check the documentation"):
            tail = tail.split(stop, 1)[0]
        return tail.strip().rstrip(".") or _first_line(exc)
    return _first_line(exc)


def _well_formed(path: Path) -> bool:
    """Whether a file starts like a torch.save zip archive or a pickle (not like random bytes)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


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
        if "Unsupported global" in reason or (_REFUSED_MARKER in str(exc) and _well_formed(path)):
            raise CheckpointError(
                f"{path}: holds an object that weights_only loading refuses ({reason}); checkpoints hold "
                "plain data only (tensors, dicts, lists, numbers, strings), so that loading one never runs code"
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
    stored = ckpt.get("checksum")
    if stored is not None and stored != payload_digest(ckpt):
        raise CheckpointError(f"{path}: corrupt (checksum mismatch: its data differs from what was written; "
                              "damaged, or edited without app.models.save_checkpoint)")
    ckpt.setdefault("preprocessing", {})
    n_out = ckpt["model_config"].get("out_channels")
    ckpt.setdefault("class_names", [f"class_{i}" for i in range(int(n_out or 0))])
    names = ckpt["class_names"]
    if not isinstance(names, list) or (n_out is not None and len(names) != int(n_out)):
        raise CheckpointError(
            f"{path}: class_names has {len(names) if isinstance(names, list) else type(names).__name__} "
            f"entries but the model has out_channels={n_out}; one name per output channel is needed"
        )
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
