"""Training-step variants: which memory levers a measured step pulls.

A variant is a ``+``-joined set of components, e.g. ``"stochastic+lean+amp"``:

* ``exact``: plain backpropagation, fp32 (alone it means "no lever"; ``exact+amp`` is ``amp``);
* ``amp``: bf16 autocast around the forward pass (the loss is computed in fp32, as in training);
* ``ckpt``: gradient checkpointing of every encoder/decoder stage
  (:func:`app.train.grad_checkpoint.enable_grad_checkpointing`);
* ``stochastic``: stochastic-backprop convolutions (``app.nn.convert(model, n_probes)``);
* ``lean``: memory-lean activation/normalisation layers (``app.nn.convert(..., lean=True)``);
  reported as unavailable while ``app.nn.convert`` has no ``lean`` option.

Components may come in any order; :attr:`Variant.name` is the canonical spelling
(order of :data:`COMPONENTS`), used in tables and as part of the calibration-cache key.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any

__all__ = ["COMPONENTS", "Variant", "lean_available", "parse_variant", "training_variant"]

# component -> one-line description; the order is the canonical order of a variant's name
COMPONENTS: dict[str, str] = {
    "exact": "plain backpropagation (no lever)",
    "stochastic": "stochastic-backprop convolutions (app.nn.convert with n_probes)",
    "lean": "memory-lean activation/normalisation layers (app.nn.convert(..., lean=True))",
    "amp": "bf16 autocast",
    "ckpt": "gradient checkpointing per encoder/decoder stage",
}


@dataclass(frozen=True)
class Variant:
    """The levers of one training-step variant (all off: ``exact``)."""

    stochastic: bool = False
    lean: bool = False
    amp: bool = False
    ckpt: bool = False

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
    return Variant(**{c: c in seen for c in ("stochastic", "lean", "amp", "ckpt")})


def lean_available() -> bool:
    """True once ``app.nn.convert`` takes a ``lean`` option (memory-lean activations/norms)."""
    import app.nn

    try:
        return "lean" in inspect.signature(app.nn.convert).parameters
    except (TypeError, ValueError):  # not introspectable: let the call itself tell
        return True


def training_variant(*, n_probes: int, amp: Any = None, grad_checkpointing: bool = False, lean: bool = False) -> Variant:
    """The variant a training config runs: ``sketch.n_probes``, ``trainer.amp``
    (``bf16``/``fp16`` -> ``amp``; off/None/False -> none), ``trainer.grad_checkpointing`` and the
    lean-layers switch."""
    amp_on = not (amp is None or amp is False or str(amp).lower() in ("off", "false", "none", ""))
    return Variant(stochastic=int(n_probes) > 0, lean=bool(lean), amp=amp_on, ckpt=bool(grad_checkpointing))
