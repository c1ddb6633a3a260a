"""Command-line values shared by the entry points."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any, TypeVar

import yaml

__all__ = ["dataclass_from_mapping", "parse_key_values"]

T = TypeVar("T")


def parse_key_values(pairs: Sequence[str], option: str = "--model-arg") -> dict[str, Any]:
    """``["channels=[32,64]", "norm=batch"]`` -> ``{"channels": [32, 64], "norm": "batch"}``.

    Values are read as JSON where they are JSON (``1e-3`` is a number), else as YAML (bare words
    are strings, ``[a, b]`` a list of strings).

    Raises:
        ValueError: a pair without ``=`` or an empty key, or a value YAML cannot read (naming ``option``).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} takes KEY=VALUE (VALUE read as JSON or YAML, e.g. channels=[32,64]), but got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
            continue
        except ValueError:
            pass
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"{option} {pair!r}: the value is neither JSON nor valid YAML ({' '.join(str(exc).split())})") from exc
    return out


def dataclass_from_mapping(cls: type[T], data: Mapping[str, Any], what: str) -> T:
    """``cls(**data)`` for a dataclass, from a dict or an OmegaConf mapping.

    Raises:
        ValueError: keys ``cls`` has no field for, named with ``what`` and the known keys listed.
    """
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; known keys are {sorted(known)}")
    return cls(**{k: data[k] for k in data})
