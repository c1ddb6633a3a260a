"""Training-step variants: which memory levers a measured step pulls.

A variant is a ``+``-joined set of components, e.g. ``"stochastic+lean+amp"``:

* ``exact``: plain backpropagation, fp32 (alone it means "no lever"; ``exact+amp`` is ``amp``);
* ``amp``: bf16 autocast around the forward pass (the loss is computed in fp32, as in training);
* ``fp16``: the same with fp16 autocast (``trainer.amp=fp16``);
* ``ckpt``: gradient checkpointing of every encoder/decoder stage
  (:func:`app.models.enable_grad_checkpointing`);
* ``stochastic``: stochastic-backprop convolutions (``app.nn.convert(model, n_probes)``);
* ``lean``: memory-lean activation/normalisation layers (``app.nn.convert(..., lean=True)``);
* ``blocked``: the stochastic convolutions compute results above ``app.nn.CONV_BLOCK`` elements in
  channel blocks (``app.nn.convert(..., conv_block=app.nn.CONV_BLOCK)``; with ``stochastic`` only).

Components may come in any order; :attr:`Variant.name` is the canonical spelling
(order of :data:`COMPONENTS`), used in tables and as part of the calibration-cache key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch

from app.utils import amp_dtype

__all__ = ["COMPONENTS", "Variant", "parse_variant", "training_variant"]

# component -> one-line description; the order is the canonical order of a variant's name
COMPONENTS: dict[str, str] = {
    "exact": "plain backpropagation (no lever)",
    "stochastic": "stochastic-backprop convolutions (app.nn.convert with n_probes)",
    "lean": "memory-lean activation/normalisation layers (app.nn.convert(..., lean=True))",
    "blocked": "stochastic convolutions in channel blocks above app.nn.CONV_BLOCK elements (convert(..., conv_block=...))",
    "amp": "bf16 autocast",
    "fp16": "fp16 autocast",
    "ckpt": "gradient checkpointing per encoder/decoder stage",
}


@dataclass(frozen=True)
class Variant:
    """The levers of one training-step variant (all off: ``exact``)."""

    stochastic: bool = False
    lean: bool = False
    blocked: bool = False
    amp: bool = False
    fp16: bool = False
    ckpt: bool = False

    def __post_init__(self) -> None:
        if self.amp and self.fp16:
            raise ValueError("a variant takes one autocast component: 'amp' (bf16) or 'fp16', not both")
        if self.blocked and not self.stochastic:
            raise ValueError("'blocked' applies to stochastic convolutions: use it with 'stochastic'")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The forward pass's autocast dtype (``None``: fp32)."""
        return torch.bfloat16 if self.amp else torch.float16 if self.fp16 else None

    @property
    def name(self) -> str:
        """Canonical name, e.g. ``"stochastic+lean+amp"``; ``"exact"`` when no lever is on."""
        parts = [c for c in COMPONENTS if c != "exact" and getattr(self, c)]
        return "+".join(parts) if parts else "exact"

    def __str__(self) -> str:
        return self.name


def _unknown(component: str, variant: str) -> ValueError:
    close = difflib.get_close_matches(component, list(COMPONENTS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ValueError(
        f"unknown variant component {component!r} in variant {variant!r}{hint}; valid components are "
        f"{', '.join(COMPONENTS)}, joined with '+' (e.g. 'stochastic+lean+amp')"
    )


def parse_variant(variant: str | Variant) -> Variant:
    """Parse ``"stochastic+amp"``-style strings (any order, case-insensitive).

    Raises:
        ValueError: an unknown or repeated component (the message names it and lists the valid
            ones), an empty string, or ``exact`` combined with ``stochastic``/``lean``.
    """
    if isinstance(variant, Variant):
        return variant
    text = str(variant).strip()
    parts = [p.strip().lower() for p in text.split("+")]
    if not text or any(not p for p in parts):
        raise ValueError(
            f"variant {variant!r} is empty or has an empty component; valid components are "
            f"{', '.join(COMPONENTS)}, joined with '+'"
        )
    seen: set[str] = set()
    for p in parts:
        if p not in COMPONENTS:
            raise _unknown(p, text)
        if p in seen:
            raise ValueError(f"variant {text!r} repeats component {p!r}")
        seen.add(p)
    if "exact" in seen and seen & {"stochastic", "lean"}:
        raise ValueError(
            f"variant {text!r} combines 'exact' with {sorted(seen & {'stochastic', 'lean'})}; "
            "'exact' means exact convolutions and standard layers: drop one of them"
        )
    return Variant(**{c: c in seen for c in COMPONENTS if c != "exact"})


def training_variant(*, n_probes: int, amp: Any = None, grad_checkpointing: bool = False, lean: bool = False) -> Variant:
    """The variant a training config runs: ``sketch.n_probes``, ``trainer.amp`` (``bf16`` ->
    ``amp``, ``fp16`` -> ``fp16``, ``off`` -> none), ``trainer.grad_checkpointing`` and the
    lean-layers switch."""
    dtype = amp_dtype(amp, "trainer.amp")
    return Variant(stochastic=int(n_probes) > 0, lean=bool(lean), amp=dtype == torch.bfloat16,
                   fp16=dtype == torch.float16, ckpt=bool(grad_checkpointing))
